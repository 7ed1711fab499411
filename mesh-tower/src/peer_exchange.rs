//! Istio's TCP metadata exchange on a connection (the sidecar's `istio.metadata_exchange`
//! network filter; frame format in [`mesh_core::metadata_exchange`]).
//!
//! When the TLS handshake negotiated `istio-peer-exchange`, [`exchange`] writes this
//! workload's frame at once, then reads the peer's: the peer's metadata names the other side
//! in `istio_tcp_*`. Whatever the peer sent that is not its frame (all of it when it has no
//! exchange, the bytes after the frame otherwise) is replayed to the application by
//! [`Replay`], so application bytes pass through unchanged. The frames are not the
//! application's bytes and are not counted in `istio_tcp_*_bytes_total`.
//!
//! Envoy waits for the peer's frame without limit; mesh waits at most
//! [`PEER_EXCHANGE_TIMEOUT`] and then treats the peer as unknown (a sidecar peer sends its
//! frame as soon as it receives this one, so only a peer without the exchange that sends
//! nothing first meets the limit).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::metadata_exchange::{FrameDecode, MAX_FRAME_LEN, PeerExchange, decode_frame};
use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// How long the peer's frame is waited for before the peer counts as unknown.
pub const PEER_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream that first returns bytes already read from it (what followed the peer's frame),
/// then reads on. Writes go straight through.
#[pin_project]
#[derive(Debug)]
pub struct Replay<S> {
    #[pin]
    inner: S,
    replay: Vec<u8>,
    at: usize,
}

impl<S> Replay<S> {
    /// `inner` with nothing to replay.
    pub fn new(inner: S) -> Self {
        Replay {
            inner,
            replay: Vec::new(),
            at: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.at < this.replay.len() {
            let rest = &this.replay[*this.at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            *this.at += n;
            if *this.at == this.replay.len() {
                *this.replay = Vec::new();
                *this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Runs the exchange on `io` (whose ALPN is `istio-peer-exchange`): writes `frame`, reads the
/// peer's frame (at most [`PEER_EXCHANGE_TIMEOUT`]), and returns the stream for the
/// application with the peer's metadata, `None` when the peer is unknown (no magic, a body
/// that does not parse, too long, too slow, or the peer closed). Fails only when writing the
/// frame or reading fails.
pub async fn exchange<S>(mut io: S, frame: &[u8]) -> io::Result<(Replay<S>, Option<PeerExchange>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(frame).await?;
    io.flush().await?;
    let mut received = Vec::new();
    let read = tokio::time::timeout(PEER_EXCHANGE_TIMEOUT, async {
        loop {
            match decode_frame(&received) {
                FrameDecode::Done { consumed, result } => return Ok(Some((consumed, result))),
                FrameDecode::Incomplete(need) => {
                    // Bounded: `decode_frame` never asks for more than a maximal frame.
                    let want = need.saturating_sub(received.len()).max(1);
                    let start = received.len();
                    received.resize(start + want.min(MAX_FRAME_LEN), 0);
                    let n = io.read(&mut received[start..]).await;
                    received.truncate(start + *n.as_ref().unwrap_or(&0));
                    if n? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    })
    .await;
    let (consumed, peer) = match read {
        Ok(Ok(Some((consumed, Ok(peer))))) => (consumed, Some(*peer)),
        Ok(Ok(Some((consumed, Err(error))))) => {
            tracing::debug!(%error, "istio-peer-exchange: peer metadata not found");
            (consumed, None)
        }
        Ok(Ok(None)) => {
            tracing::debug!("istio-peer-exchange: the peer closed before its frame");
            (0, None)
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            tracing::debug!("istio-peer-exchange: no frame from the peer in time");
            (0, None)
        }
    };
    received.drain(..consumed);
    Ok((
        Replay {
            inner: io,
            replay: received,
            at: 0,
        },
        peer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::identity::NodeIdentity;
    use mesh_core::metadata_exchange::frame_for_node;

    fn node(pod: &str, workload: &str) -> NodeIdentity {
        let mut n = NodeIdentity::new(pod, "prod", "10.0.0.1".parse().unwrap(), workload);
        n.workload_name = workload.into();
        n
    }

    #[tokio::test]
    async fn both_sides_exchange_and_application_bytes_follow() {
        let (a, b) = tokio::io::duplex(4096);
        let (fa, fb) = (
            frame_for_node(&node("a-0", "a")),
            frame_for_node(&node("b-0", "b")),
        );
        let side_b = tokio::spawn(async move {
            let (mut s, peer) = exchange(b, &fb).await.unwrap();
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.unwrap();
            s.write_all(b"world").await.unwrap();
            (peer, hello)
        });
        let (mut s, peer) = exchange(a, &fa).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut world = [0u8; 5];
        s.read_exact(&mut world).await.unwrap();
        let (peer_of_b, hello) = side_b.await.unwrap();
        assert_eq!((&hello, &world), (b"hello", b"world"));
        let workload =
            |p: Option<PeerExchange>| p.and_then(|p| p.metadata).map(|m| m.workload_name);
        assert_eq!(workload(peer), Some("b".into()));
        assert_eq!(workload(peer_of_b), Some("a".into()));
    }

    #[tokio::test]
    async fn a_peer_without_the_exchange_has_its_bytes_replayed() {
        let (a, mut b) = tokio::io::duplex(4096);
        b.write_all(b"PING and more").await.unwrap();
        let (mut s, peer) = exchange(a, b"\x3d\x23\x04\x67\0\0\0\0").await.unwrap();
        assert_eq!(peer, None);
        let mut got = [0u8; 13];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PING and more");
        // Our frame went out first.
        let mut ours = [0u8; 8];
        b.read_exact(&mut ours).await.unwrap();
        assert_eq!(&ours[..4], &[0x3d, 0x23, 0x04, 0x67]);
    }

    #[tokio::test]
    async fn a_peer_that_closes_early_is_unknown_and_its_bytes_are_kept() {
        let (a, mut b) = tokio::io::duplex(4096);
        b.write_all(&[0x3d, 0x23]).await.unwrap();
        b.shutdown().await.unwrap();
        let (mut s, peer) = exchange(a, b"frame").await.unwrap();
        assert_eq!(peer, None);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0x3d, 0x23]);
    }
}
