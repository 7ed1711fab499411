//! Request bodies kept for retries: read up to the retry buffer limit and replayed per
//! attempt. A body over the limit is passed on once, its buffered head first.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::pool::{BoxError, ReqBody};

/// A complete request body that can be sent again.
pub(crate) struct Replay {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

/// Why a body could not be kept for retries.
pub(crate) enum Overflow {
    /// It is larger than the limit: here it is again, whole, to be sent once.
    Limit(ReqBody),
    /// Reading it failed.
    Body(BoxError),
}

/// Reads `body` whole if it fits in `limit` bytes.
pub(crate) async fn buffer(mut body: ReqBody, limit: u32) -> Result<Replay, Overflow> {
    if body.is_end_stream() {
        return Ok(Replay {
            data: Bytes::new(),
            trailers: None,
        });
    }
    let limit = u64::from(limit);
    if body.size_hint().lower() > limit {
        return Err(Overflow::Limit(body));
    }
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len: u64 = 0;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Overflow::Body)?;
        if let Some(d) = frame.data_ref() {
            len += d.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            trailers = Some(t.clone());
        }
        frames.push_back(frame);
        if len > limit {
            return Err(Overflow::Limit(
                Prefixed {
                    head: frames,
                    rest: Some(body),
                }
                .boxed_unsync(),
            ));
        }
    }
    let data = if frames.len() == 1 {
        frames
            .pop_front()
            .and_then(|f| f.into_data().ok())
            .unwrap_or_default()
    } else {
        let mut buf = BytesMut::with_capacity(len as usize);
        for f in frames {
            if let Ok(d) = f.into_data() {
                buf.extend_from_slice(&d);
            }
        }
        buf.freeze()
    };
    Ok(Replay { data, trailers })
}

impl Replay {
    /// An empty body.
    pub(crate) fn empty() -> Replay {
        Replay {
            data: Bytes::new(),
            trailers: None,
        }
    }

    /// A fresh body for one attempt (the bytes are shared, not copied).
    pub(crate) fn body(&self) -> ReqBody {
        ReplayBody {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone(),
        }
        .boxed_unsync()
    }
}

struct ReplayBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    head: VecDeque<Frame<Bytes>>,
    rest: Option<ReqBody>,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.head.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match this.rest.as_mut() {
            Some(r) => Pin::new(r).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn boxed(b: &'static [u8]) -> ReqBody {
        Full::new(Bytes::from_static(b))
            .map_err(|e| match e {})
            .boxed_unsync()
    }

    #[tokio::test]
    async fn small_bodies_replay_and_big_ones_pass_once() {
        let Ok(r) = buffer(boxed(b"hello"), 10).await else {
            panic!("fits")
        };
        for _ in 0..2 {
            let got = r.body().collect().await.unwrap().to_bytes();
            assert_eq!(&got[..], b"hello");
        }
        match buffer(boxed(b"hello world"), 10).await {
            Err(Overflow::Limit(b)) => {
                assert_eq!(&b.collect().await.unwrap().to_bytes()[..], b"hello world");
            }
            _ => panic!("over the limit"),
        }
        // A streamed body over the limit keeps its head.
        let stream = http_body_util::StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
            Ok(Frame::data(Bytes::from_static(b"ghi"))),
        ]))
        .boxed_unsync();
        match buffer(stream, 5).await {
            Err(Overflow::Limit(b)) => {
                assert_eq!(&b.collect().await.unwrap().to_bytes()[..], b"abcdefghi");
            }
            _ => panic!("over the limit"),
        }
    }
}
