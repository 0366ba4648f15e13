//! What goes to a replica: the client's body streamed under `max_body_bytes`, or a body held in
//! memory (async invocations, probes).

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::incoming::{BodyError, Incoming};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A request body exceeded `max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds max_body_bytes ({0} bytes)")]
pub struct BodyLimitExceeded(pub u64);

/// The client's request body failed while streaming (the client went away, or sent garbage).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(#[source] pub BodyError);

/// The body sent to a replica.
#[derive(Debug)]
pub enum UpstreamBody {
    /// The client's body, streamed, with an optional size limit (`0` is none).
    Stream {
        /// The client's body.
        inner: Incoming,
        /// Largest number of bytes passed on.
        limit: u64,
        /// Bytes passed on so far.
        seen: u64,
    },
    /// A body held in memory (async invocations, probes).
    Full(Option<Bytes>),
}

impl UpstreamBody {
    /// Streams `inner`, failing with [`BodyLimitExceeded`] once more than `limit` bytes passed.
    pub fn stream(inner: Incoming, limit: u64) -> UpstreamBody {
        UpstreamBody::Stream {
            inner,
            limit,
            seen: 0,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamBody::Stream { inner, limit, seen } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        *seen += data.len() as u64;
                        if *limit > 0 && *seen > *limit {
                            return Poll::Ready(Some(Err(Box::new(BodyLimitExceeded(*limit)))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(d) => d.is_none(),
            UpstreamBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            UpstreamBody::Full(None) => SizeHint::with_exact(0),
            UpstreamBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}
