//! The body sent back to the client: in memory (the gateway's own answers) or a replica's,
//! streamed frame by frame, never buffered whole. The response body carries the request's
//! [`Permit`] and connection guard, so the replica slot is freed the moment the last frame has been
//! handed to the client, or the client goes away mid-response.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::conn::RequestGuard;
use crate::function::Permit;
use crate::upstream::{BoxError, PooledBody};

enum Kind {
    Full(Option<Bytes>),
    /// A replica's body and the connection it arrives on (see [`PooledBody`]).
    Upstream(PooledBody),
}

/// The body sent to the client.
pub struct ResponseBody {
    // Field order matters: `kind` drops before `permit`, so a replica's connection is back in its
    // pool (see `PooledBody`) before the permit's release admits the next queued request.
    kind: Kind,
    permit: Option<Permit>,
    guard: Option<RequestGuard>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// A body held in memory.
    pub fn full(data: impl Into<Bytes>) -> ResponseBody {
        let data = data.into();
        ResponseBody {
            kind: Kind::Full((!data.is_empty()).then_some(data)),
            permit: None,
            guard: None,
        }
    }

    /// An empty body.
    pub fn empty() -> ResponseBody {
        ResponseBody {
            kind: Kind::Full(None),
            permit: None,
            guard: None,
        }
    }

    /// A replica's body, streamed; when it ends, its connection goes back to the replica's pool
    /// and then the permit is released. Dropped early, both are released.
    pub fn upstream(inner: PooledBody, permit: Permit) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream(inner),
            permit: Some(permit),
            guard: None,
        }
    }

    /// Attaches the connection guard, released with the body.
    pub fn set_guard(&mut self, guard: RequestGuard) {
        self.guard = Some(guard);
    }

    /// The body has ended (its connection, if any, is already back in the pool: `PooledBody`
    /// returns it when it yields its end): release the slot and the connection guard now.
    fn finish(&mut self) {
        self.permit = None;
        self.guard = None;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream(inner) => Pin::new(inner).poll_frame(cx),
        };
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = polled {
            this.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(d) => d.is_none(),
            Kind::Upstream(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(inner) => inner.size_hint(),
        }
    }
}
