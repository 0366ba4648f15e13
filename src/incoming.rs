//! A client's request body as the gateway reads it, whichever connection it came on: HTTP/2
//! streams through hyper's body, HTTP/1 through the gateway's own connection (`http1`), which
//! hands each piece over a one-slot channel read only when the body asks for more.
//!
//! Also the HTTP/1 side of a protocol upgrade: the request carries an [`OnUpgrade`] that resolves
//! to the client's socket once the `101` has been written to it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// The body of a client's request.
#[derive(Debug)]
pub enum Incoming {
    /// No body (the common case: nothing to poll, nothing allocated).
    Empty,
    /// An HTTP/2 stream's body.
    Hyper(hyper::body::Incoming),
    /// An HTTP/1 body, fed by the connection.
    H1(H1Body),
}

/// The client's request body failed while being read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// hyper's HTTP/2 body failed.
    #[error("{0}")]
    Hyper(#[from] hyper::Error),
    /// The client closed the connection before the end of a delimited body.
    #[error("client closed the connection before the end of the request body")]
    Closed,
    /// The chunked framing of the body is broken.
    #[error("malformed chunked request body")]
    Chunked,
    /// Reading the socket failed.
    #[error("reading the request body failed: {0}")]
    Io(io::ErrorKind),
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Incoming::Empty => Poll::Ready(None),
            Incoming::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::Hyper))),
            Incoming::H1(body) => body.poll_data(cx).map(|f| f.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Incoming::Empty => true,
            Incoming::Hyper(body) => body.is_end_stream(),
            Incoming::H1(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Incoming::Empty => SizeHint::with_exact(0),
            Incoming::Hyper(body) => body.size_hint(),
            Incoming::H1(body) => match body.length {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

/// How a body channel ended, as the reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    Done,
    Failed(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Closed,
    Chunked,
    Io(io::ErrorKind),
}

impl From<Failure> for BodyError {
    fn from(f: Failure) -> BodyError {
        match f {
            Failure::Closed => BodyError::Closed,
            Failure::Chunked => BodyError::Chunked,
            Failure::Io(kind) => BodyError::Io(kind),
        }
    }
}

#[derive(Debug)]
struct Slot {
    data: Option<Bytes>,
    /// The reader is waiting for the next piece.
    wanted: bool,
    end: End,
    /// The reader is gone.
    dropped: bool,
}

/// The channel between an HTTP/1 connection and its request's body: one piece at a time, read
/// from the socket only when the body asks (so `Expect: 100-continue` is answered, and bytes are
/// read, only once someone reads the body).
#[derive(Debug)]
struct Channel {
    slot: Mutex<Slot>,
    reader: AtomicWaker,
    conn: AtomicWaker,
}

/// The reading end: the request's body.
#[derive(Debug)]
pub struct H1Body {
    channel: Arc<Channel>,
    /// The declared length, for the size hint.
    length: Option<u64>,
}

/// The connection's end of a body channel.
#[derive(Debug)]
pub struct BodySender {
    channel: Arc<Channel>,
}

/// What the body wants from the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Demand {
    /// The next piece.
    More,
    /// Nothing yet (the reader has not asked, or has not taken the last piece).
    Nothing,
    /// The reader is gone: nobody will read the rest.
    Gone,
}

/// A body channel for a request whose body is `length` bytes long (`None`: chunked).
pub fn body_channel(length: Option<u64>) -> (BodySender, Incoming) {
    let channel = Arc::new(Channel {
        slot: Mutex::new(Slot {
            data: None,
            wanted: false,
            end: End::Open,
            dropped: false,
        }),
        reader: AtomicWaker::new(),
        conn: AtomicWaker::new(),
    });
    let sender = BodySender {
        channel: channel.clone(),
    };
    (sender, Incoming::H1(H1Body { channel, length }))
}

impl H1Body {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let mut slot = self.channel.slot.lock().unwrap();
        if let Some(data) = slot.data.take() {
            return Poll::Ready(Some(Ok(data)));
        }
        match slot.end {
            End::Done => return Poll::Ready(None),
            End::Failed(f) => return Poll::Ready(Some(Err(f.into()))),
            End::Open => {}
        }
        self.channel.reader.register(cx.waker());
        let asked = !slot.wanted;
        slot.wanted = true;
        drop(slot);
        if asked {
            self.channel.conn.wake();
        }
        Poll::Pending
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        self.channel.slot.lock().unwrap().dropped = true;
        self.channel.conn.wake();
    }
}

impl BodySender {
    /// What the body wants; registers the connection's waker for when that changes.
    pub fn poll_demand(&self, cx: &mut Context<'_>) -> Demand {
        self.channel.conn.register(cx.waker());
        let slot = self.channel.slot.lock().unwrap();
        if slot.dropped {
            Demand::Gone
        } else if slot.wanted && slot.data.is_none() {
            Demand::More
        } else {
            Demand::Nothing
        }
    }

    /// Hands the next piece to the body.
    pub fn send(&self, data: Bytes) {
        let mut slot = self.channel.slot.lock().unwrap();
        slot.data = Some(data);
        slot.wanted = false;
        drop(slot);
        self.channel.reader.wake();
    }

    /// The body ended well.
    pub fn finish(&self) {
        self.end(End::Done);
    }

    /// The client closed the connection inside the body.
    pub fn closed(&self) {
        self.end(End::Failed(Failure::Closed));
    }

    /// The body's chunked framing is broken.
    pub fn malformed(&self) {
        self.end(End::Failed(Failure::Chunked));
    }

    /// Reading the socket failed.
    pub fn failed(&self, kind: io::ErrorKind) {
        self.end(End::Failed(Failure::Io(kind)));
    }

    fn end(&self, end: End) {
        let mut slot = self.channel.slot.lock().unwrap();
        if slot.end == End::Open {
            slot.end = end;
        }
        drop(slot);
        self.channel.reader.wake();
    }
}

/// The client's side of an upgraded HTTP/1 connection, once the `101` has been written: its
/// socket, and whatever it sent after the request head that the connection had already read.
#[derive(Debug)]
pub struct Upgraded {
    read: Bytes,
    io: TcpStream,
}

impl Upgraded {
    /// The socket, with `read` to be read before it.
    pub fn new(io: TcpStream, read: Bytes) -> Upgraded {
        Upgraded { read, io }
    }
}

/// Resolves to the client's [`Upgraded`] connection once the `101` response has been written;
/// fails when the connection ended first. Found in an HTTP/1 upgrade request's extensions.
#[derive(Debug)]
pub struct OnUpgrade(Option<oneshot::Receiver<Upgraded>>);

/// Requests' extensions must be `Clone`: a copy is an upgrade that never happens (only the
/// original is ever answered).
impl Clone for OnUpgrade {
    fn clone(&self) -> OnUpgrade {
        OnUpgrade(None)
    }
}

/// The connection's end of an [`OnUpgrade`].
pub type UpgradeSender = oneshot::Sender<Upgraded>;

/// An upgrade's pair of ends.
pub fn on_upgrade() -> (UpgradeSender, OnUpgrade) {
    let (tx, rx) = oneshot::channel();
    (tx, OnUpgrade(Some(rx)))
}

/// The connection ended before the upgrade completed.
#[derive(Debug, thiserror::Error)]
#[error("the client connection ended before the protocol upgrade")]
pub struct UpgradeFailed;

impl Future for OnUpgrade {
    type Output = Result<Upgraded, UpgradeFailed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Some(rx) => Pin::new(rx).poll(cx).map_err(|_| UpgradeFailed),
            None => Poll::Ready(Err(UpgradeFailed)),
        }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
