//! What one client connection is doing, shared lock-free by its reader, its requests, its task
//! and the server's sweeper: requests in flight, when the current head began, when it went idle,
//! and what it has been asked to do (finish gracefully, or close now). A leaf: atomics only.
//!
//! The request path only marks events (no clock read per request); the sweeper stamps their time
//! when it first sees them, at most one sweep period late.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::time::Instant;

/// Nothing asked of a connection.
pub const RUN: u8 = 0;
/// Finish what is in flight, then close (drain, idle timeout).
pub const GRACEFUL: u8 = 1;
/// Close now (header timeout, or still idle after a graceful request).
pub const ABORT: u8 = 2;

/// Event times in [`ConnState`] are `nanoseconds since origin + STAMP_BASE`, or [`UNSTAMPED`]: the
/// request path only marks that something happened (no clock read per request); the sweeper
/// stamps the time when it first sees the mark, at most one sweep period late.
const UNSTAMPED: u64 = 1;
const STAMP_BASE: u64 = 2;

/// What one connection is doing, shared by its reader, its requests, its task and the sweeper.
#[derive(Debug)]
pub struct ConnState {
    origin: Instant,
    peer: SocketAddr,
    inflight: AtomicU32,
    /// When the current request head began (see [`UNSTAMPED`]); 0 when none is pending.
    head_started: AtomicU64,
    /// When the connection last became idle (see [`UNSTAMPED`]).
    idle_since: AtomicU64,
    /// What the sweeper or a drain asks: [`RUN`], [`GRACEFUL`] or [`ABORT`] (only ever raised).
    signal: AtomicU8,
    /// HTTP/2: bytes between requests are not a head (see [`ConnState::set_multiplexed`]).
    multiplexed: AtomicBool,
    /// Wakes the connection's task when `signal` is raised.
    waker: AtomicWaker,
}

impl ConnState {
    /// A new connection from `peer`; it must send its first head within `header_read_timeout`.
    pub fn new(peer: SocketAddr) -> ConnState {
        ConnState {
            origin: Instant::now(),
            peer,
            inflight: AtomicU32::new(0),
            // A new connection must send its first head within header_read_timeout.
            head_started: AtomicU64::new(STAMP_BASE),
            idle_since: AtomicU64::new(STAMP_BASE),
            signal: AtomicU8::new(RUN),
            multiplexed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// What has been asked of the connection: [`RUN`], [`GRACEFUL`] or [`ABORT`].
    pub fn signal(&self) -> u8 {
        self.signal.load(Ordering::Acquire)
    }

    /// Registers the connection task's waker, woken by [`ConnState::raise`].
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Raises the request made of the connection and wakes its task.
    pub fn raise(&self, signal: u8) {
        self.signal.fetch_max(signal, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The time recorded in `slot` (see [`UNSTAMPED`]); an unstamped event is stamped `now`, the
    /// first time the sweeper sees it.
    fn stamped(&self, slot: &AtomicU64, value: u64, now: Instant) -> Instant {
        if value != UNSTAMPED {
            return self.origin + Duration::from_nanos(value - STAMP_BASE);
        }
        let nanos = now.saturating_duration_since(self.origin).as_nanos() as u64;
        // Lost races are harmless: a request began (0) or the event was stamped already.
        let _ = slot.compare_exchange(
            UNSTAMPED,
            nanos + STAMP_BASE,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        now
    }

    /// The connection speaks HTTP/2 (its first bytes were the client preface): from now on bytes
    /// arriving while nothing is in flight are not a request head being sent — an idle h2
    /// connection carries PINGs, SETTINGS and WINDOW_UPDATEs — so only `idle_timeout` applies
    /// between its requests (hyper bounds a header block itself: `max_header_list_size`).
    pub fn set_multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
    }

    /// Request bytes arrived: a new head begins if nothing is in flight.
    pub fn on_read(&self) {
        if self.multiplexed.load(Ordering::Relaxed) {
            return;
        }
        if self.inflight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            let _ = self.head_started.compare_exchange(
                0,
                UNSTAMPED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Whether the connection is within its limits at `now`.
    pub fn check(&self, now: Instant, header_timeout: Duration, idle_timeout: Duration) -> Verdict {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return Verdict::Fine;
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != 0 {
            let started = self.stamped(&self.head_started, head, now);
            return if now >= started + header_timeout {
                Verdict::HeaderTimeout
            } else {
                Verdict::Fine
            };
        }
        let idle = self.idle_since.load(Ordering::Relaxed);
        let since = self.stamped(&self.idle_since, idle, now);
        if now >= since + idle_timeout {
            Verdict::Idle
        } else {
            Verdict::Fine
        }
    }
}

/// What the sweeper should do about a connection.
pub enum Verdict {
    /// Within its limits.
    Fine,
    /// The request head did not arrive within `header_read_timeout`.
    HeaderTimeout,
    /// Idle (no request in flight) for `idle_timeout`.
    Idle,
}

/// Marks one request in flight on its connection; dropped with the response body.
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnState>);

impl RequestGuard {
    /// Marks a request in flight on `state`'s connection.
    pub fn new(state: Arc<ConnState>) -> RequestGuard {
        state.inflight.fetch_add(1, Ordering::Relaxed);
        state.head_started.store(0, Ordering::Relaxed);
        RequestGuard(state)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let s = &self.0;
        if s.inflight.fetch_sub(1, Ordering::Relaxed) == 1 {
            s.idle_since.store(UNSTAMPED, Ordering::Relaxed);
        }
    }
}
