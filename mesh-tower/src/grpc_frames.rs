//! gRPC message counting for Istio's `istio_request_messages_total` /
//! `istio_response_messages_total`, as Envoy's `grpc_stats` filter counts them: over the body
//! bytes as they stream, a message is counted at the first byte of each 5-byte
//! length-prefixed header (1 byte compressed flag, 4 bytes big-endian length), and its payload
//! is skipped by length. The counter is a few bytes of state that never buffers or allocates;
//! a message split anywhere across data frames is counted once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

/// Istio's counter of gRPC request messages (same labels as `istio_requests_total`).
pub const REQUEST_MESSAGES_TOTAL: &str = "istio_request_messages_total";
/// Istio's counter of gRPC response messages (same labels as `istio_requests_total`).
pub const RESPONSE_MESSAGES_TOTAL: &str = "istio_response_messages_total";

/// Where the counter is in the gRPC framing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// At the compressed-flag byte of the next message.
    #[default]
    Flag,
    /// Reading the length: `read` of its 4 bytes so far, accumulated in `len`.
    Length { read: u8, len: u32 },
    /// Skipping `left` payload bytes.
    Payload { left: u32 },
    /// The body's bytes could not all be seen (a non-contiguous buffer): counting stopped.
    Lost,
}

/// Counts gRPC length-prefixed messages in a byte stream fed in arbitrary pieces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcFrameCounter {
    count: u64,
    state: State,
}

impl GrpcFrameCounter {
    /// A counter at the start of a body.
    pub const fn new() -> Self {
        GrpcFrameCounter {
            count: 0,
            state: State::Flag,
        }
    }

    /// Messages started so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Feeds the next bytes of the body; returns how many messages started in them.
    pub fn inspect(&mut self, mut data: &[u8]) -> u64 {
        let before = self.count;
        while !data.is_empty() {
            match self.state {
                State::Flag => {
                    self.count += 1;
                    self.state = State::Length { read: 0, len: 0 };
                    data = &data[1..];
                }
                State::Length { read, len } => {
                    let len = (len << 8) | u32::from(data[0]);
                    data = &data[1..];
                    self.state = match read + 1 {
                        4 if len == 0 => State::Flag,
                        4 => State::Payload { left: len },
                        read => State::Length { read, len },
                    };
                }
                State::Payload { left } => {
                    let skip = data.len().min(left as usize);
                    data = &data[skip..];
                    // `skip` ≤ `left`, a u32.
                    let left = left - skip as u32;
                    self.state = if left == 0 {
                        State::Flag
                    } else {
                        State::Payload { left }
                    };
                }
                State::Lost => break,
            }
        }
        self.count - before
    }

    /// Feeds a data frame of any [`Buf`] type without consuming it. A buffer whose bytes are
    /// spread over more slices than can be seen at once stops the counting (no frame of
    /// hyper, tonic or `Bytes` is like that).
    pub fn inspect_buf<B: Buf>(&mut self, data: &B) -> u64 {
        let chunk = data.chunk();
        if chunk.len() == data.remaining() {
            return self.inspect(chunk);
        }
        let mut slices = [std::io::IoSlice::new(&[]); 8];
        let n = data.chunks_vectored(&mut slices);
        let seen: usize = slices[..n].iter().map(|s| s.len()).sum();
        if seen != data.remaining() {
            self.state = State::Lost;
            return 0;
        }
        slices[..n].iter().map(|s| self.inspect(s)).sum()
    }
}

/// The number of gRPC messages a request body carried, shared between the body (moved into
/// the upstream connection) and the request's telemetry record.
#[derive(Clone, Debug, Default)]
pub struct MessageCount(Arc<AtomicU64>);

impl MessageCount {
    /// Messages counted so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request body that counts its gRPC messages into a [`MessageCount`] as it streams.
pub struct CountedBody<B> {
    inner: B,
    counter: GrpcFrameCounter,
    shared: MessageCount,
}

impl<B> CountedBody<B> {
    /// Wraps `inner`; the returned count follows the messages read from it.
    pub fn new(inner: B) -> (Self, MessageCount) {
        let shared = MessageCount::default();
        (
            CountedBody {
                inner,
                counter: GrpcFrameCounter::new(),
                shared: shared.clone(),
            },
            shared,
        )
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for CountedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedBody")
            .field("inner", &self.inner)
            .field("messages", &self.counter.count())
            .finish()
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            let delta = this.counter.inspect(d);
            if delta > 0 {
                this.shared.0.fetch_add(delta, Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `messages` gRPC frames with payload lengths `lens` (payload bytes 0xAB).
    fn framed(lens: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            out.push(u8::from(i % 2 == 1)); // compressed flag on every other message
            out.extend_from_slice(&len.to_be_bytes());
            out.extend(std::iter::repeat_n(0xAB, len as usize));
        }
        out
    }

    #[test]
    fn whole_bodies_count_every_message() {
        for lens in [
            &[][..],
            &[0],
            &[3],
            &[0, 0, 0],
            &[5, 0, 300, 1],
            &[70_000, 2],
        ] {
            let body = framed(lens);
            let mut c = GrpcFrameCounter::new();
            assert_eq!(c.inspect(&body), lens.len() as u64, "{lens:?}");
            assert_eq!(c.count(), lens.len() as u64);
        }
    }

    #[test]
    fn a_body_split_at_every_byte_boundary_counts_the_same() {
        let lens = [0, 1, 4, 5, 0, 17, 256];
        let body = framed(&lens);
        for cut in 0..=body.len() {
            let mut c = GrpcFrameCounter::new();
            let (a, b) = body.split_at(cut);
            c.inspect(a);
            c.inspect(b);
            assert_eq!(c.count(), lens.len() as u64, "cut at {cut}");
        }
        for cut1 in 0..=body.len() {
            for cut2 in cut1..=body.len() {
                let mut c = GrpcFrameCounter::new();
                c.inspect(&body[..cut1]);
                c.inspect(&body[cut1..cut2]);
                c.inspect(&body[cut2..]);
                assert_eq!(c.count(), lens.len() as u64, "cuts {cut1} {cut2}");
            }
        }
        // One byte at a time: a message is counted at its first header byte, as Envoy does.
        let mut c = GrpcFrameCounter::new();
        let mut started = Vec::new();
        for (i, b) in body.iter().enumerate() {
            if c.inspect(std::slice::from_ref(b)) == 1 {
                started.push(i);
            }
        }
        assert_eq!(started, vec![0, 5, 11, 20, 30, 35, 57]);
    }

    #[test]
    fn a_partial_header_counts_the_message_started() {
        let mut c = GrpcFrameCounter::new();
        assert_eq!(c.inspect(&[0, 0]), 1);
        assert_eq!(c.inspect(&[0, 0, 2, 9]), 0, "payload byte 1 of 2");
        assert_eq!(c.inspect(&[9, 0]), 1, "payload done, next flag");
        assert_eq!(c.count(), 2);
    }

    #[test]
    fn non_contiguous_buffers_are_read_without_consuming() {
        let body = framed(&[2, 0, 9]);
        let (a, b) = body.split_at(7);
        let chained = Bytes::copy_from_slice(a).chain(Bytes::copy_from_slice(b));
        let mut c = GrpcFrameCounter::new();
        assert_eq!(c.inspect_buf(&chained), 3);
        assert_eq!(chained.remaining(), body.len(), "nothing consumed");
    }

    /// A body yielding `chunks` one data frame each.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_counted_body_streams_unchanged_and_shares_its_count() {
        use http_body_util::BodyExt;
        let body = framed(&[3, 0, 10]);
        let chunks = body.chunks(4).map(Bytes::copy_from_slice).collect();
        let (counted, count) = CountedBody::new(Chunks(chunks));
        let out = counted.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], &body[..]);
        assert_eq!(count.get(), 3);
    }
}
