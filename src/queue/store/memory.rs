//! An [`AsyncStore`] in memory, for unit tests of the queue without a file: nothing survives the
//! process, and a retry's wait is a deadline on the tokio clock (so tests can pause time). It
//! remembers every settlement it was given.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    AsyncRecord, AsyncState, AsyncStore, DeadLetter, DeadLetters, Invocation, Pending, Settlement,
    StoreFuture,
};

/// The store; see the module doc.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// The gateway state kept beside the invocations.
    values: crate::state::MemoryState,
    /// Rung on every change, for every waiting `next`.
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    last_seq: u64,
    pending: BTreeMap<(String, u64), Entry>,
    dead: Vec<(String, DeadLetter)>,
    settled: Vec<Settled>,
    /// Every invocation's record, by call id (never expired here).
    records: std::collections::HashMap<String, AsyncRecord>,
}

impl State {
    fn mark(
        &mut self,
        function: &str,
        seq: u64,
        state: AsyncState,
        change: impl FnOnce(&mut AsyncRecord),
    ) {
        let Some(entry) = self.pending.get(&(function.to_owned(), seq)) else {
            return;
        };
        let inv = &entry.invocation;
        let mut record = AsyncRecord::new(
            inv.call_id.clone(),
            function,
            seq,
            inv.accepted_unix_ms,
            state,
        );
        change(&mut record);
        if let Some(merged) = AsyncRecord::merge(self.records.get(&inv.call_id), record) {
            self.records.insert(merged.call_id.clone(), merged);
        }
    }
}

#[derive(Debug)]
struct Entry {
    invocation: Invocation,
    attempts: u32,
    last_status: u16,
    /// Not handed out before this.
    due: Instant,
    /// Handed out and not settled.
    out: bool,
}

/// A settlement the store was given, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    /// The invocation's function.
    pub function: String,
    /// Its sequence number.
    pub seq: u64,
    /// What became of it.
    pub settlement: Settlement,
    /// When the store was told.
    pub at: Instant,
}

impl MemoryStore {
    /// Stores an invocation that has already made `attempts` attempts, the last one answering
    /// `last_status`; returns its sequence number.
    pub fn put(
        &self,
        function: &str,
        invocation: Invocation,
        attempts: u32,
        last_status: u16,
    ) -> u64 {
        let mut state = self.state.lock().unwrap();
        state.last_seq += 1;
        let seq = state.last_seq;
        let entry = Entry {
            invocation,
            attempts,
            last_status,
            due: Instant::now(),
            out: false,
        };
        state.pending.insert((function.to_owned(), seq), entry);
        state.mark(function, seq, AsyncState::Queued, |r| {
            (r.attempts, r.status) = (attempts, last_status);
        });
        drop(state);
        self.changed.notify_waiters();
        seq
    }

    /// Every settlement so far, in order.
    pub fn settled(&self) -> Vec<Settled> {
        self.state.lock().unwrap().settled.clone()
    }

    /// The invocation `seq` of `function`, if it is pending: its attempts and whether it is out.
    pub fn get(&self, function: &str, seq: u64) -> Option<(u32, bool)> {
        let state = self.state.lock().unwrap();
        let entry = state.pending.get(&(function.to_owned(), seq))?;
        Some((entry.attempts, entry.out))
    }
}

impl AsyncStore for MemoryStore {
    fn insert<'a>(&'a self, function: &'a str, invocation: &'a Invocation) -> StoreFuture<'a, ()> {
        self.put(function, invocation.clone(), 0, 0);
        Box::pin(async { Ok(()) })
    }

    fn next<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Pending> {
        Box::pin(async move {
            let keys = (function.to_owned(), 0)..=(function.to_owned(), u64::MAX);
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let now = Instant::now();
                let mut earliest = None::<Instant>;
                {
                    let mut state = self.state.lock().unwrap();
                    for ((_, seq), entry) in state.pending.range_mut(keys.clone()) {
                        if entry.out {
                            continue;
                        }
                        if entry.due <= now {
                            entry.out = true;
                            return Ok(Pending {
                                seq: *seq,
                                invocation: entry.invocation.clone(),
                                attempts: entry.attempts,
                                last_status: entry.last_status,
                            });
                        }
                        earliest = Some(earliest.map_or(entry.due, |e| e.min(entry.due)));
                    }
                }
                tokio::select! {
                    _ = changed => {}
                    _ = crate::queue::sleep_until_opt(earliest) => {}
                }
            }
        })
    }

    fn settle<'a>(
        &'a self,
        function: &'a str,
        seq: u64,
        settlement: Settlement,
    ) -> StoreFuture<'a, ()> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let key = (function.to_owned(), seq);
        match &settlement {
            Settlement::Done {
                attempts, status, ..
            } => {
                state.mark(function, seq, AsyncState::done(*status), |r| {
                    (r.attempts, r.status) = (*attempts, *status);
                });
                state.pending.remove(&key);
            }
            Settlement::Retry {
                attempts,
                status,
                after,
            } => {
                state.mark(function, seq, AsyncState::Queued, |r| {
                    (r.attempts, r.status) = (*attempts, *status);
                });
                if let Some(entry) = state.pending.get_mut(&key) {
                    entry.attempts = *attempts;
                    entry.last_status = *status;
                    entry.due = now + *after;
                    entry.out = false;
                }
            }
            Settlement::DeadLetter {
                attempts,
                status,
                reason,
            } => {
                state.mark(function, seq, AsyncState::DeadLettered, |r| {
                    (r.attempts, r.status, r.reason) = (*attempts, *status, reason.clone());
                    r.dead_letter = Some(seq);
                });
                if let Some(entry) = state.pending.remove(&key) {
                    let dead = DeadLetter {
                        seq,
                        invocation: entry.invocation,
                        attempts: *attempts,
                        status: *status,
                        reason: reason.clone(),
                        dead_unix_ms: super::unix_ms(),
                    };
                    state.dead.push((function.to_owned(), dead));
                }
            }
        }
        state.settled.push(Settled {
            function: function.to_owned(),
            seq,
            settlement,
            at: now,
        });
        drop(state);
        self.changed.notify_waiters();
        Box::pin(async { Ok(()) })
    }

    fn started<'a>(&'a self, function: &'a str, seq: u64, attempt: u32) -> StoreFuture<'a, ()> {
        self.state
            .lock()
            .unwrap()
            .mark(function, seq, AsyncState::Running, |r| r.attempts = attempt);
        Box::pin(async { Ok(()) })
    }

    fn record<'a>(&'a self, call_id: &'a str) -> StoreFuture<'a, Option<AsyncRecord>> {
        let record = self.state.lock().unwrap().records.get(call_id).cloned();
        Box::pin(async { Ok(record) })
    }

    fn list_dead_letters<'a>(
        &'a self,
        function: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, DeadLetters> {
        let state = self.state.lock().unwrap();
        let all: Vec<_> = state
            .dead
            .iter()
            .filter(|(f, _)| function.is_none_or(|name| f == name))
            .cloned()
            .collect();
        let total = all.len() as u64;
        let letters = all.into_iter().take(limit).collect();
        Box::pin(async move { Ok(DeadLetters { letters, total }) })
    }

    fn replay<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>> {
        let mut state = self.state.lock().unwrap();
        let found = state
            .dead
            .iter()
            .position(|(f, d)| f == function && d.seq == id);
        let letter = found.map(|i| state.dead.remove(i).1);
        drop(state);
        let record = letter.map(|letter| {
            let call_id = letter.invocation.call_id.clone();
            self.put(function, letter.invocation, 0, 0);
            let mut state = self.state.lock().unwrap();
            let record = state.records.get_mut(&call_id).expect("just recorded");
            record.replays += 1;
            record.clone()
        });
        Box::pin(async { Ok(record) })
    }

    fn discard<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>> {
        let mut state = self.state.lock().unwrap();
        let found = state
            .dead
            .iter()
            .position(|(f, d)| f == function && d.seq == id);
        let record = found.map(|i| {
            let (_, letter) = state.dead.remove(i);
            let inv = letter.invocation;
            let mut record = AsyncRecord::new(
                inv.call_id.clone(),
                function,
                id,
                inv.accepted_unix_ms,
                AsyncState::Discarded,
            );
            record.attempts = letter.attempts;
            state.records.insert(inv.call_id, record.clone());
            record
        });
        Box::pin(async { Ok(record) })
    }

    fn pending(&self) -> StoreFuture<'_, BTreeMap<String, u64>> {
        let mut counts = BTreeMap::new();
        for (function, _) in self.state.lock().unwrap().pending.keys() {
            *counts.entry(function.clone()).or_default() += 1;
        }
        Box::pin(async { Ok(counts) })
    }

    fn dead_letters<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Vec<DeadLetter>> {
        let state = self.state.lock().unwrap();
        let dead = state
            .dead
            .iter()
            .filter(|(f, _)| f == function)
            .map(|(_, d)| d.clone())
            .collect();
        Box::pin(async { Ok(dead) })
    }

    fn dead_letter_count(&self) -> StoreFuture<'_, u64> {
        let n = self.state.lock().unwrap().dead.len() as u64;
        Box::pin(async move { Ok(n) })
    }

    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}

impl crate::state::StateStore for MemoryStore {
    fn state_get<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
    ) -> crate::state::StateFuture<'a, Option<Vec<u8>>> {
        self.values.state_get(bucket, key)
    }

    fn state_put<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
        value: Vec<u8>,
    ) -> crate::state::StateFuture<'a, ()> {
        self.values.state_put(bucket, key, value)
    }

    fn state_delete<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
    ) -> crate::state::StateFuture<'a, ()> {
        self.values.state_delete(bucket, key)
    }

    fn state_scan(
        &self,
        bucket: &'static str,
    ) -> crate::state::StateFuture<'_, BTreeMap<String, Vec<u8>>> {
        self.values.state_scan(bucket)
    }
}
