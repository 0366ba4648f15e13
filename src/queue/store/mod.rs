//! The async store seam: [`AsyncStore`], what a backend must do to hold accepted invocations and
//! deliver them to the dispatchers, and the records that cross it.
//!
//! A store owns *delivery*: it keeps invocations durable, hands each function's dispatcher the
//! next one due ([`AsyncStore::next`]), and is told how each attempt went
//! ([`AsyncStore::settle`]). When a retry runs again, and how that wait survives, is the store's
//! business: the embedded [`RedbStore`] keeps a cursor and retry timers in this process and stores
//! the attempt count; a broker with its own acknowledgements and redelivery (NATS JetStream: ack,
//! nak with a delay, term) uses those instead of keeping timers of its own. How long to wait,
//! and how many attempts, is the dispatcher's (from config): it arrives here as
//! [`Settlement::Retry`]'s `after`.
//!
//! A store also keeps the **record** of each invocation by its call id ([`AsyncRecord`]: queued,
//! running, succeeded, failed, dead-lettered, discarded), written as the invocation moves
//! (accept, [`AsyncStore::started`], settle, replay, discard) and readable from any gateway that
//! shares the store. Records of finished invocations expire after the store's retention;
//! records of invocations still pending, and of dead letters, do not. Updates may arrive out
//! of order (two gateways, a task that lost a race): each record has a rank,
//! ([`AsyncRecord::seq`], [`AsyncRecord::step`]), and an update that ranks below what is stored is
//! dropped ([`AsyncRecord::merge`]).

mod jetstream;
mod record;
mod records;
mod redb;

#[cfg(test)]
pub(crate) mod memory;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

pub use self::jetstream::{
    JetStreamStore, ASYNC_STREAM, ASYNC_SUBJECT_PREFIX, CONSUMER_PREFIX, DLQ_STREAM,
    DLQ_SUBJECT_PREFIX, RECORDS_STREAM, RECORDS_SUBJECT_PREFIX,
};
pub use self::records::{AsyncRecord, AsyncState, DeadLetters, DEFAULT_LISTED_DEAD_LETTERS};
pub use self::redb::RedbStore;

/// For the fuzz target of record decoding: `data` decodes or fails cleanly, and what decodes
/// re-encodes to a record that decodes and encodes to the same bytes.
#[doc(hidden)]
pub fn check_record_round_trip(data: &[u8]) {
    if let Ok(inv) = record::decode(data) {
        let once = record::encode(&inv);
        let again = record::decode(&once).expect("an encoded record decodes");
        assert_eq!(record::encode(&again), once);
    }
}

/// A store operation under way: boxed, so that [`AsyncStore`] is object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where accepted invocations wait: durable storage plus delivery to the dispatchers.
///
/// Guarantees a backend gives: [`insert`](Self::insert) resolves `Ok` only once the invocation
/// survives a crash of the gateway (it is what makes a `202`); each function's invocations are
/// handed out oldest first; an invocation handed out and not yet settled is not handed out again
/// by this gateway, and one never settled (the gateway died) is handed out again later: at least
/// once. Between [`next`](Self::next) handing an invocation out and its
/// [`settle`](Self::settle), the invocation is the dispatcher's (admission, the call, the callback:
/// minutes, possibly); a backend whose broker redelivers unacknowledged messages after a deadline
/// keeps that delivery alive meanwhile.
pub trait AsyncStore: crate::state::StateStore + Send + Sync + std::fmt::Debug {
    /// Stores `invocation` for `function`; resolves once it is durable, or with why it is not
    /// (then nothing was stored).
    fn insert<'a>(&'a self, function: &'a str, invocation: &'a Invocation) -> StoreFuture<'a, ()>;

    /// The next invocation of `function` due for an attempt, waiting until there is one: a retry
    /// whose wait is over (oldest first), else the oldest never handed out. Called by the
    /// function's dispatcher, one call at a time. Cancel-safe: dropping the future loses nothing.
    ///
    /// [`StoreError::Corrupt`] names a record that cannot be read: it is not handed out again,
    /// and the caller dead-letters it with [`settle`](Self::settle).
    fn next<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Pending>;

    /// What became of the invocation `seq` of `function` that [`next`](Self::next) handed out.
    /// Resolves once recorded. A [`Settlement::Retry`] is handed out again after its `after`,
    /// counted from this call, even if recording the attempt failed.
    fn settle<'a>(
        &'a self,
        function: &'a str,
        seq: u64,
        settlement: Settlement,
    ) -> StoreFuture<'a, ()>;

    /// The invocation `seq` of `function` that [`next`](Self::next) handed out is being attempted
    /// (its `attempt`-th attempt, the first is 1): its record says `running`. Resolves once
    /// recorded; the attempt does not wait for it, and a record that could not be written is
    /// logged, never a failure of the invocation.
    fn started<'a>(&'a self, function: &'a str, seq: u64, attempt: u32) -> StoreFuture<'a, ()>;

    /// The record of the invocation accepted with `call_id` (the latest, if a client reused the
    /// id); `None` when there is none, or it expired.
    fn record<'a>(&'a self, call_id: &'a str) -> StoreFuture<'a, Option<AsyncRecord>>;

    /// Dead letters, oldest first, at most `limit`: of `function`, or of every function.
    fn list_dead_letters<'a>(
        &'a self,
        function: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, DeadLetters>;

    /// Stores the dead letter `id` of `function` again as a new invocation (same call id,
    /// request and callback; no attempts made) and removes the dead letter. Resolves with the
    /// invocation's record, or `None` when there is no such dead letter.
    fn replay<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>>;

    /// Removes the dead letter `id` of `function` for good; its record says `discarded` (and
    /// expires like a finished invocation's). `None` when there is no such dead letter.
    fn discard<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>>;

    /// Invocations stored and not yet settled for good, per function name (names no longer
    /// configured included; a function with none is absent).
    fn pending(&self) -> StoreFuture<'_, BTreeMap<String, u64>>;

    /// Invocations of `function` stored and not yet settled for good.
    fn pending_count<'a>(&'a self, function: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move { Ok(self.pending().await?.get(function).copied().unwrap_or(0)) })
    }

    /// The dead letters of `function`, oldest first.
    fn dead_letters<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Vec<DeadLetter>>;

    /// Dead letters of every function.
    fn dead_letter_count(&self) -> StoreFuture<'_, u64>;

    /// Tells the store a function's `async_max_attempts`, before its dispatcher starts: a
    /// broker that bounds deliveries itself sets its bound above it.
    fn configure(&self, _function: &str, _max_attempts: u32) {}

    /// `true` when other gateways use the same store (accept into it and dispatch from it):
    /// the queue then reads each function's backlog from the store every second instead of
    /// counting only its own accepts and settlements, and a store that cannot be read at start
    /// is kept (it is a server that may come back) instead of being given up.
    fn shared(&self) -> bool {
        false
    }

    /// Makes what was submitted durable and lets go of the storage (so that another gateway can
    /// open it). Later operations fail with [`StoreError::Closed`].
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// How an attempt ended, as the store is told it.
#[derive(Clone, Debug, PartialEq)]
pub enum Settlement {
    /// Final and not kept: succeeded, or failed in a way another attempt would not change.
    Done {
        /// Attempts made, this one included (0 when the invocation was final without one).
        attempts: u32,
        /// The last attempt's status: below 400 is a success.
        status: u16,
        /// Why it failed, in one line; empty on success.
        reason: String,
    },
    /// Failed; hand it out again once `after` has passed.
    Retry {
        /// Attempts made so far, this one included.
        attempts: u32,
        /// This attempt's status (the function's, or the gateway's).
        status: u16,
        /// The wait before the next attempt.
        after: Duration,
    },
    /// Out of attempts (or unreadable): kept as a dead letter, never handed out again.
    DeadLetter {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's status (0 when there was none).
        status: u16,
        /// Why, in one line.
        reason: String,
    },
}

/// Why the store could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The storage could not be opened, read or written.
    #[error("{0}")]
    Database(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {function}/{seq}: {reason}")]
    Corrupt {
        /// Its function.
        function: String,
        /// Its sequence number.
        seq: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The store has been closed (the gateway is shutting down).
    #[error("the async store is closed")]
    Closed,
}

/// One accepted invocation: the request as the function will receive it.
#[derive(Clone, Debug, PartialEq)]
pub struct Invocation {
    /// The `X-Call-Id` sent to the function and to the callback.
    pub call_id: String,
    /// `/{rest}` plus `?query` as the function sees it.
    pub path_and_query: String,
    /// End-to-end request headers, already rewritten for the function (`X-Forwarded-*`,
    /// `X-Call-Id`; no hop-by-hop headers, no `Host`, no `Content-Length`).
    pub headers: Vec<(String, Bytes)>,
    /// The request body.
    pub body: Bytes,
    /// Where to POST the outcome (`X-Callback-Url`), if anywhere.
    pub callback: Option<String>,
    /// When it was accepted, Unix milliseconds.
    pub accepted_unix_ms: u64,
}

/// An invocation handed out by the store.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Its handle in the store, given back to [`AsyncStore::settle`]: unique per function,
    /// increasing in acceptance order.
    pub seq: u64,
    /// The request.
    pub invocation: Invocation,
    /// Attempts made so far.
    pub attempts: u32,
    /// The status of the last attempt (0 before the first).
    pub last_status: u16,
}

/// An invocation that ran out of attempts.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Its id among the dead letters (what replay and discard name): the invocation's sequence
    /// number in the redb store, the dead-letter stream's sequence in JetStream.
    pub seq: u64,
    /// The request.
    pub invocation: Invocation,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's status (the function's, or the gateway's 502/503/504).
    pub status: u16,
    /// Why the last attempt failed, in one line.
    pub reason: String,
    /// When it was dead-lettered, Unix milliseconds.
    pub dead_unix_ms: u64,
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
