//! The embedded async store: accepted invocations in a redb database, written by one thread that
//! commits (and fsyncs) whatever has queued up meanwhile in one transaction, and delivered from
//! this process with a cursor and retry timers per function.
//!
//! Tables, all keyed by `(function name, sequence number)` so that each function's invocations
//! read back in the order they were accepted:
//!
//! * `pending`: every invocation accepted and not yet finished (the request as it will be sent);
//! * `attempts`: attempts made so far and the last status, for invocations that failed at least once;
//! * `dead`: invocations that ran out of attempts, with their final status (deleted only by a
//!   replay, which stores the invocation in `pending` again, or a discard);
//! * `meta`: the next sequence number.
//!
//! and, keyed by call id, `records` (each invocation's [`AsyncRecord`], written in the same
//! transaction as the change it records) with `record_expiry` (`(expires at, call id)` of the
//! records of finished invocations). The writer thread deletes expired records when it has been
//! idle for a while and at least every [`SWEEP_EVERY_MAX`]; a record read after its expiry is
//! never returned, swept or not. Marking an attempt `running` is committed without an fsync of
//! its own (`Durability::None`, made durable by the next commit): losing it in a crash loses
//! nothing but that word, and the attempt would run again anyway.
//!
//! Nothing is acknowledged before its transaction is committed with `Durability::Immediate`, so an
//! invocation the client saw `202` for survives a crash (even `SIGKILL`) of the gateway.
//!
//! Delivery: each function's `Plan` scans `pending` forward from a cursor for first attempts,
//! and holds the retries it was told about on the tokio clock. The waits are not stored: after a
//! restart the scan starts again from the beginning, so every stored invocation is due at once,
//! with the attempts it had made.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition,
};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::record::{dead_invocation, decode, decode_dead, encode, encode_dead, head};
use super::{
    unix_ms, AsyncRecord, AsyncState, AsyncStore, DeadLetter, DeadLetters, Invocation, Pending,
    Settlement, StoreError, StoreFuture,
};
use crate::state::{check_key, StateError, StateFuture, StateStore};

type Key<'a> = (&'a str, u64);

const PENDING: TableDefinition<Key, &[u8]> = TableDefinition::new("pending");
const ATTEMPTS: TableDefinition<Key, (u32, u16)> = TableDefinition::new("attempts");
const DEAD: TableDefinition<Key, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The gateway's [`StateStore`] values, keyed by `(bucket, key)`.
const STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("state");
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const RECORD_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("record_expiry");
const NEXT_SEQ: &str = "next_seq";

/// Most operations committed in one transaction.
const MAX_BATCH_OPS: usize = 4096;
/// Most body bytes committed in one transaction (one large body still goes alone).
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Longest time between two sweeps of expired records.
pub const SWEEP_EVERY_MAX: Duration = Duration::from_secs(60);
/// Most expired records deleted in one transaction.
const MAX_SWEPT: usize = 10_000;

fn db_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

type Done<T> = Box<dyn FnOnce(Result<T, StoreError>) + Send>;

enum Op {
    Insert {
        function: String,
        call_id: String,
        accepted_unix_ms: u64,
        record: Vec<u8>,
        done: Done<u64>,
    },
    Started {
        function: String,
        seq: u64,
        attempt: u32,
        done: Done<()>,
    },
    Attempted {
        function: String,
        seq: u64,
        attempts: u32,
        status: u16,
        done: Done<()>,
    },
    Remove {
        function: String,
        seq: u64,
        attempts: u32,
        status: u16,
        reason: String,
        done: Done<()>,
    },
    DeadLetter {
        function: String,
        seq: u64,
        attempts: u32,
        status: u16,
        reason: String,
        done: Done<()>,
    },
    Replay {
        function: String,
        id: u64,
        done: Done<Option<AsyncRecord>>,
    },
    Discard {
        function: String,
        id: u64,
        done: Done<Option<AsyncRecord>>,
    },
}

/// What committing one operation gave: a new sequence number (insert, replay), a record
/// (replay, discard).
#[derive(Default)]
struct Committed {
    seq: u64,
    record: Option<AsyncRecord>,
}

impl Op {
    fn size(&self) -> usize {
        match self {
            Op::Insert { record, .. } => record.len(),
            _ => 64,
        }
    }
}

/// One function's delivery from this process: where the scan for first attempts is, and the
/// retries it holds.
#[derive(Default)]
struct Plan {
    /// First attempts: the next sequence number to look at.
    cursor: u64,
    /// Invocations of the function stored by this process so far.
    inserted: u64,
    /// `inserted` as it was when a scan from `cursor` last found nothing.
    exhausted_at: Option<u64>,
    /// Retries whose time has come, oldest invocation first, with the attempts already made.
    due: BTreeMap<u64, u32>,
    /// Retries waiting for their time.
    waiting: BTreeSet<(Instant, u64, u32)>,
}

/// What to read next for a function.
enum Look {
    /// A retry that is due.
    Retry { seq: u64, attempts: u32 },
    /// The first pending invocation from `from` on; `inserted` as it was when asked.
    First { from: u64, inserted: u64 },
    /// Nothing until an insert, or until `until` (the next retry).
    Wait { until: Option<Instant> },
}

impl Plan {
    /// Moves the retries whose time has come to `due`, then says what to read.
    fn look(&mut self, now: Instant) -> Look {
        while let Some(&(at, seq, attempts)) = self.waiting.first() {
            if at > now {
                break;
            }
            self.waiting.pop_first();
            self.due.insert(seq, attempts);
        }
        if let Some((&seq, &attempts)) = self.due.first_key_value() {
            Look::Retry { seq, attempts }
        } else if self.exhausted_at != Some(self.inserted) {
            Look::First {
                from: self.cursor,
                inserted: self.inserted,
            }
        } else {
            Look::Wait {
                until: self.waiting.first().map(|w| w.0),
            }
        }
    }
}

/// A function's [`Plan`] and the wake-up of the one `next` waiting on it.
#[derive(Default)]
struct Deliveries {
    plan: Mutex<Plan>,
    wake: Notify,
}

impl Deliveries {
    /// An invocation was stored: there is something past the cursor again.
    fn inserted(&self) {
        self.plan.lock().unwrap().inserted += 1;
        self.wake.notify_one();
    }

    /// `seq` is handed out again at `at`, `attempts` made.
    fn retry_at(&self, at: Instant, seq: u64, attempts: u32) {
        self.plan
            .lock()
            .unwrap()
            .waiting
            .insert((at, seq, attempts));
        self.wake.notify_one();
    }
}

/// The redb store: reads from the blocking pool, writes through one committing thread.
pub struct RedbStore {
    path: PathBuf,
    retention: Duration,
    db: RwLock<Option<Arc<Database>>>,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    deliveries: Mutex<HashMap<String, Arc<Deliveries>>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens (or creates, with its parent directories) the store at `path`, keeping the records
    /// of finished invocations for the default retention. Blocking: call it from a blocking
    /// context.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_retention(path, crate::config::DEFAULT_ASYNC_RECORD_RETENTION)
    }

    /// [`RedbStore::open`], keeping the records of finished invocations for `retention`.
    pub fn open_with_retention(path: &Path, retention: Duration) -> Result<RedbStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| db_error(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db =
            Database::create(path).map_err(|e| db_error(format!("{}: {e}", path.display())))?;
        // Create the tables, so that readers never meet a missing one.
        let txn = db.begin_write().map_err(db_error)?;
        let next_seq;
        {
            txn.open_table(PENDING).map_err(db_error)?;
            txn.open_table(ATTEMPTS).map_err(db_error)?;
            txn.open_table(DEAD).map_err(db_error)?;
            txn.open_table(STATE).map_err(db_error)?;
            txn.open_table(RECORDS).map_err(db_error)?;
            txn.open_table(RECORD_EXPIRY).map_err(db_error)?;
            let meta = txn.open_table(META).map_err(db_error)?;
            next_seq = meta
                .get(NEXT_SEQ)
                .map_err(db_error)?
                .map_or(1, |v| v.value());
        }
        txn.commit().map_err(db_error)?;

        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("sluicegate-async-store".into())
            .spawn(move || write_loop(&writer_db, next_seq, &rx, retention))
            .map_err(|e| db_error(format!("cannot start the store writer: {e}")))?;
        Ok(RedbStore {
            path: path.to_owned(),
            retention,
            db: RwLock::new(Some(db)),
            ops: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            deliveries: Mutex::default(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn deliveries(&self, function: &str) -> Arc<Deliveries> {
        let mut all = self.deliveries.lock().unwrap();
        if let Some(d) = all.get(function) {
            return d.clone();
        }
        let d = Arc::new(Deliveries::default());
        all.insert(function.to_owned(), d.clone());
        d
    }

    /// Hands `op` to the writer; its `done` gets the result once committed (on the writer
    /// thread), or [`StoreError::Closed`] at once.
    fn submit(&self, op: Op) {
        let ops = self.ops.lock().unwrap();
        let unsent = match ops.as_ref() {
            Some(tx) => tx.send(op).err().map(|e| e.0),
            None => Some(op),
        };
        drop(ops);
        if let Some(op) = unsent {
            complete(op, Err(StoreError::Closed));
        }
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.read().unwrap().clone().ok_or(StoreError::Closed)
    }

    /// Runs `read` on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .unwrap_or_else(|e| Err(db_error(format!("store read panicked: {e}"))))
    }

    /// The first pending invocation of `function` with a sequence number in `seqs`.
    async fn first(
        &self,
        function: &str,
        seqs: RangeInclusive<u64>,
    ) -> Result<Option<Pending>, StoreError> {
        let function = function.to_owned();
        self.read(move |db| first_pending(db, &function, seqs))
            .await
    }
}

/// The first pending invocation of `function` with a sequence number in `seqs`. Blocking.
fn first_pending(
    db: &Database,
    function: &str,
    seqs: RangeInclusive<u64>,
) -> Result<Option<Pending>, StoreError> {
    let read = db.begin_read().map_err(db_error)?;
    let pending = read.open_table(PENDING).map_err(db_error)?;
    let mut range = pending
        .range((function, *seqs.start())..=(function, *seqs.end()))
        .map_err(db_error)?;
    let Some(entry) = range.next() else {
        return Ok(None);
    };
    let (key, value) = entry.map_err(db_error)?;
    let seq = key.value().1;
    let invocation = decode(value.value()).map_err(|reason| StoreError::Corrupt {
        function: function.to_owned(),
        seq,
        reason,
    })?;
    let attempts = read.open_table(ATTEMPTS).map_err(db_error)?;
    let (attempts, last_status) = attempts
        .get((function, seq))
        .map_err(db_error)?
        .map_or((0, 0), |v| v.value());
    Ok(Some(Pending {
        seq,
        invocation,
        attempts,
        last_status,
    }))
}

impl AsyncStore for RedbStore {
    fn insert<'a>(&'a self, function: &'a str, invocation: &'a Invocation) -> StoreFuture<'a, ()> {
        let (tx, rx) = oneshot::channel();
        let deliveries = self.deliveries(function);
        self.submit(Op::Insert {
            function: function.to_owned(),
            call_id: invocation.call_id.clone(),
            accepted_unix_ms: invocation.accepted_unix_ms,
            record: encode(invocation),
            done: Box::new(move |result| {
                if result.is_ok() {
                    deliveries.inserted();
                }
                let _ = tx.send(result.map(|_| ()));
            }),
        });
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    fn next<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Pending> {
        Box::pin(async move {
            let deliveries = self.deliveries(function);
            loop {
                let look = deliveries.plan.lock().unwrap().look(Instant::now());
                // Nothing below changes the plan before its read is back, so that a dropped
                // future loses nothing.
                match look {
                    Look::Wait { until } => {
                        tokio::select! {
                            _ = deliveries.wake.notified() => {}
                            _ = crate::queue::sleep_until_opt(until) => {}
                        }
                    }
                    Look::Retry { seq, attempts } => {
                        let read = self.first(function, seq..=seq).await;
                        if !matches!(read, Err(StoreError::Database(_) | StoreError::Closed)) {
                            deliveries.plan.lock().unwrap().due.remove(&seq);
                        }
                        // None: settled meanwhile; nothing to retry.
                        if let Some(mut pending) = read? {
                            // The attempt count may not have been stored.
                            pending.attempts = pending.attempts.max(attempts);
                            return Ok(pending);
                        }
                    }
                    Look::First { from, inserted } => {
                        let read = self.first(function, from..=u64::MAX).await;
                        let mut plan = deliveries.plan.lock().unwrap();
                        match &read {
                            Ok(Some(pending)) => plan.cursor = pending.seq + 1,
                            Ok(None) => plan.exhausted_at = Some(inserted),
                            Err(StoreError::Corrupt { seq, .. }) => plan.cursor = seq + 1,
                            Err(_) => {}
                        }
                        drop(plan);
                        if let Some(pending) = read? {
                            return Ok(pending);
                        }
                    }
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
        let (tx, rx) = oneshot::channel();
        let function = function.to_owned();
        let op = match settlement {
            Settlement::Done {
                attempts,
                status,
                reason,
            } => Op::Remove {
                function,
                seq,
                attempts,
                status,
                reason,
                done: Box::new(move |result| {
                    let _ = tx.send(result);
                }),
            },
            Settlement::Retry {
                attempts,
                status,
                after,
            } => {
                let at = Instant::now() + after;
                let deliveries = self.deliveries(&function);
                Op::Attempted {
                    function,
                    seq,
                    attempts,
                    status,
                    // Scheduled once the count is stored (or failed to be), never lost.
                    done: Box::new(move |result| {
                        deliveries.retry_at(at, seq, attempts);
                        let _ = tx.send(result);
                    }),
                }
            }
            Settlement::DeadLetter {
                attempts,
                status,
                reason,
            } => Op::DeadLetter {
                function,
                seq,
                attempts,
                status,
                reason,
                done: Box::new(move |result| {
                    let _ = tx.send(result);
                }),
            },
        };
        self.submit(op);
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    fn started<'a>(&'a self, function: &'a str, seq: u64, attempt: u32) -> StoreFuture<'a, ()> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Started {
            function: function.to_owned(),
            seq,
            attempt,
            done: Box::new(move |result| {
                let _ = tx.send(result);
            }),
        });
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    fn record<'a>(&'a self, call_id: &'a str) -> StoreFuture<'a, Option<AsyncRecord>> {
        let call_id = call_id.to_owned();
        let retention = self.retention;
        Box::pin(self.read(move |db| {
            let read = db.begin_read().map_err(db_error)?;
            let records = read.open_table(RECORDS).map_err(db_error)?;
            let Some(value) = records.get(call_id.as_str()).map_err(db_error)? else {
                return Ok(None);
            };
            let record = AsyncRecord::decode(value.value())
                .map_err(|reason| db_error(format!("async record {call_id:?}: {reason}")))?;
            Ok((!record.expired(retention, unix_ms())).then_some(record))
        }))
    }

    fn list_dead_letters<'a>(
        &'a self,
        function: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, DeadLetters> {
        let function = function.map(str::to_owned);
        Box::pin(self.read(move |db| {
            let read = db.begin_read().map_err(db_error)?;
            let dead = read.open_table(DEAD).map_err(db_error)?;
            let (entries, total) = match &function {
                Some(f) => {
                    let range = (f.as_str(), 0)..=(f.as_str(), u64::MAX);
                    let total = dead.range(range.clone()).map_err(db_error)?.count() as u64;
                    (dead.range(range).map_err(db_error)?, total)
                }
                None => (
                    dead.iter().map_err(db_error)?,
                    dead.len().map_err(db_error)?,
                ),
            };
            let mut letters = Vec::new();
            for entry in entries.take(limit) {
                let (key, value) = entry.map_err(db_error)?;
                let (name, seq) = key.value();
                match decode_dead(seq, value.value()) {
                    Ok(letter) => letters.push((name.to_owned(), letter)),
                    Err(reason) => {
                        warn!(
                            function = name,
                            seq, reason, "async store: unreadable dead letter skipped"
                        )
                    }
                }
            }
            Ok(DeadLetters { letters, total })
        }))
    }

    fn replay<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>> {
        let (tx, rx) = oneshot::channel();
        let deliveries = self.deliveries(function);
        self.submit(Op::Replay {
            function: function.to_owned(),
            id,
            done: Box::new(move |result| {
                if matches!(result, Ok(Some(_))) {
                    deliveries.inserted();
                }
                let _ = tx.send(result);
            }),
        });
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    fn discard<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Discard {
            function: function.to_owned(),
            id,
            done: Box::new(move |result| {
                let _ = tx.send(result);
            }),
        });
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    fn pending(&self) -> StoreFuture<'_, BTreeMap<String, u64>> {
        Box::pin(self.read(|db| {
            let read = db.begin_read().map_err(db_error)?;
            let pending = read.open_table(PENDING).map_err(db_error)?;
            let mut counts = BTreeMap::<String, u64>::new();
            for entry in pending.iter().map_err(db_error)? {
                let (key, _) = entry.map_err(db_error)?;
                let (function, _) = key.value();
                match counts.get_mut(function) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(function.to_owned(), 1);
                    }
                }
            }
            Ok(counts)
        }))
    }

    fn pending_count<'a>(&'a self, function: &'a str) -> StoreFuture<'a, u64> {
        let function = function.to_owned();
        Box::pin(self.read(move |db| {
            let read = db.begin_read().map_err(db_error)?;
            let pending = read.open_table(PENDING).map_err(db_error)?;
            let n = pending
                .range((function.as_str(), 0)..=(function.as_str(), u64::MAX))
                .map_err(db_error)?
                .count();
            Ok(n as u64)
        }))
    }

    fn dead_letters<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Vec<DeadLetter>> {
        let function = function.to_owned();
        Box::pin(self.read(move |db| {
            let read = db.begin_read().map_err(db_error)?;
            let dead = read.open_table(DEAD).map_err(db_error)?;
            let mut out = Vec::new();
            for entry in dead
                .range((function.as_str(), 0)..=(function.as_str(), u64::MAX))
                .map_err(db_error)?
            {
                let (key, value) = entry.map_err(db_error)?;
                let seq = key.value().1;
                out.push(decode_dead(seq, value.value()).map_err(|reason| {
                    StoreError::Corrupt {
                        function: function.clone(),
                        seq,
                        reason,
                    }
                })?);
            }
            Ok(out)
        }))
    }

    fn dead_letter_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.read(|db| {
            let read = db.begin_read().map_err(db_error)?;
            let dead = read.open_table(DEAD).map_err(db_error)?;
            dead.len().map_err(db_error)
        }))
    }

    /// Commits what was submitted, stops the writer and closes the file.
    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            drop(self.ops.lock().unwrap().take());
            let writer = self.writer.lock().unwrap().take();
            if let Some(writer) = writer {
                let _ = tokio::task::spawn_blocking(move || writer.join()).await;
            }
            let db = self.db.write().unwrap().take();
            if let Some(mut db) = db {
                // Readers hold the database for microseconds; wait for them to let go.
                for _ in 0..1000 {
                    match Arc::try_unwrap(db) {
                        Ok(db) => {
                            drop(db);
                            debug!(path = %self.path.display(), "async store closed");
                            return;
                        }
                        Err(shared) => db = shared,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                warn!(path = %self.path.display(), "async store still in use at close");
            }
        })
    }
}

fn write_loop(db: &Database, mut next_seq: u64, rx: &mpsc::Receiver<Op>, retention: Duration) {
    // Expired records are swept when nothing was written for a while, and at least this often.
    let every = (retention / 4).clamp(Duration::from_millis(100), SWEEP_EVERY_MAX);
    let mut last_sweep = std::time::SystemTime::now();
    loop {
        let first = match rx.recv_timeout(every) {
            Ok(op) => Some(op),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let since = last_sweep.elapsed().unwrap_or(Duration::ZERO);
        if first.is_none() || since >= every {
            last_sweep = std::time::SystemTime::now();
            match sweep(db) {
                Ok(0) => {}
                Ok(n) => debug!(expired = n, "async store: expired records deleted"),
                Err(e) => warn!(error = %e, "async store: sweeping expired records failed"),
            }
        }
        let Some(first) = first else { continue };
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(op) => {
                    bytes += op.size();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        match commit(db, next_seq, &batch, retention) {
            Ok((results, next)) => {
                next_seq = next;
                for (op, result) in batch.into_iter().zip(results) {
                    complete(op, result);
                }
            }
            Err(e) => {
                warn!(error = %e, ops = batch.len(), "async store: commit failed");
                for op in batch {
                    complete(op, Err(e.clone()));
                }
            }
        }
    }
}

/// Deletes the records whose expiry has passed (at most [`MAX_SWEPT`]); returns how many.
fn sweep(db: &Database) -> Result<usize, StoreError> {
    let now = unix_ms();
    let due = {
        let read = db.begin_read().map_err(db_error)?;
        let expiry = read.open_table(RECORD_EXPIRY).map_err(db_error)?;
        let mut due = Vec::new();
        for entry in expiry.range((0, "")..(now, "")).map_err(db_error)? {
            let (key, _) = entry.map_err(db_error)?;
            let (at, call_id) = key.value();
            due.push((at, call_id.to_owned()));
            if due.len() == MAX_SWEPT {
                break;
            }
        }
        due
    };
    if due.is_empty() {
        return Ok(0);
    }
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(Durability::None).map_err(db_error)?;
    {
        let mut expiry = txn.open_table(RECORD_EXPIRY).map_err(db_error)?;
        let mut records = txn.open_table(RECORDS).map_err(db_error)?;
        for (at, call_id) in &due {
            // An entry in the expiry table is always the current expiry of its record.
            if expiry
                .remove((*at, call_id.as_str()))
                .map_err(db_error)?
                .is_some()
            {
                records.remove(call_id.as_str()).map_err(db_error)?;
            }
        }
    }
    txn.commit().map_err(db_error)?;
    Ok(due.len())
}

fn complete(op: Op, result: Result<Committed, StoreError>) {
    match op {
        Op::Insert { done, .. } => done(result.map(|c| c.seq)),
        Op::Replay { done, .. } | Op::Discard { done, .. } => done(result.map(|c| c.record)),
        Op::Started { done, .. }
        | Op::Attempted { done, .. }
        | Op::Remove { done, .. }
        | Op::DeadLetter { done, .. } => done(result.map(|_| ())),
    }
}

/// The tables one transaction writes.
struct Tables<'t> {
    pending: Table<'t, Key<'static>, &'static [u8]>,
    attempts: Table<'t, Key<'static>, (u32, u16)>,
    dead: Table<'t, Key<'static>, &'static [u8]>,
    records: Table<'t, &'static str, &'static [u8]>,
    expiry: Table<'t, (u64, &'static str), ()>,
    retention: Duration,
}

impl Tables<'_> {
    /// When the pending invocation `key` was accepted, and its call id; `None` when it is not
    /// pending (settled meanwhile) or cannot be read (it is dead-lettered as corrupt then).
    fn head(&self, key: Key<'_>) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self
            .pending
            .get(key)
            .map_err(db_error)?
            .and_then(|v| head(v.value()).ok()))
    }

    /// Writes `update` over the record of its call id unless that ranks above it; returns what
    /// was written.
    fn put_record(&mut self, update: AsyncRecord) -> Result<Option<AsyncRecord>, StoreError> {
        let call_id = update.call_id.clone();
        let stored = self
            .records
            .get(call_id.as_str())
            .map_err(db_error)?
            .and_then(|v| AsyncRecord::decode(v.value()).ok());
        let Some(record) = AsyncRecord::merge(stored.as_ref(), update) else {
            return Ok(None);
        };
        if let Some(at) = stored.and_then(|s| s.expires_unix_ms(self.retention)) {
            self.expiry
                .remove((at, call_id.as_str()))
                .map_err(db_error)?;
        }
        self.records
            .insert(call_id.as_str(), record.encode().as_slice())
            .map_err(db_error)?;
        if let Some(at) = record.expires_unix_ms(self.retention) {
            self.expiry
                .insert((at, call_id.as_str()), ())
                .map_err(db_error)?;
        }
        Ok(Some(record))
    }

    /// The record of the pending invocation `function`/`seq`, now in `state` after `attempts`.
    fn mark(
        &mut self,
        function: &str,
        seq: u64,
        state: AsyncState,
        attempts: u32,
        status: u16,
        reason: &str,
    ) -> Result<(), StoreError> {
        if let Some((accepted, call_id)) = self.head((function, seq))? {
            let mut record = AsyncRecord::new(call_id, function, seq, accepted, state);
            record.attempts = attempts;
            record.status = status;
            record.reason = reason.to_owned();
            if state == AsyncState::DeadLettered {
                record.dead_letter = Some(seq);
            }
            self.put_record(record)?;
        }
        Ok(())
    }
}

/// One transaction for the whole batch. Per-operation failures (a value too large) fail only
/// that operation; a failure of the transaction fails them all.
fn commit(
    db: &Database,
    mut next_seq: u64,
    batch: &[Op],
    retention: Duration,
) -> Result<(Vec<Result<Committed, StoreError>>, u64), StoreError> {
    let mut txn = db.begin_write().map_err(db_error)?;
    if batch.iter().all(|op| matches!(op, Op::Started { .. })) {
        // Only `running` marks: made durable by the next commit (see the module doc).
        txn.set_durability(Durability::None).map_err(db_error)?;
    }
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut t = Tables {
            pending: txn.open_table(PENDING).map_err(db_error)?,
            attempts: txn.open_table(ATTEMPTS).map_err(db_error)?,
            dead: txn.open_table(DEAD).map_err(db_error)?,
            records: txn.open_table(RECORDS).map_err(db_error)?,
            expiry: txn.open_table(RECORD_EXPIRY).map_err(db_error)?,
            retention,
        };
        let mut meta = txn.open_table(META).map_err(db_error)?;
        for op in batch {
            let result = match op {
                Op::Insert {
                    function,
                    call_id,
                    accepted_unix_ms,
                    record,
                    ..
                } => {
                    let seq = next_seq;
                    let inserted = t
                        .pending
                        .insert((function.as_str(), seq), record.as_slice())
                        .map(|_| ());
                    match inserted {
                        Ok(()) => {
                            next_seq += 1;
                            let queued = AsyncRecord::new(
                                call_id.clone(),
                                function,
                                seq,
                                *accepted_unix_ms,
                                AsyncState::Queued,
                            );
                            t.put_record(queued)?;
                            Ok(Committed { seq, record: None })
                        }
                        Err(e) => Err(db_error(e)),
                    }
                }
                Op::Started {
                    function,
                    seq,
                    attempt,
                    ..
                } => t
                    .mark(function, *seq, AsyncState::Running, *attempt, 0, "")
                    .map(|()| Committed::default()),
                Op::Attempted {
                    function,
                    seq,
                    attempts: n,
                    status,
                    ..
                } => {
                    let key = (function.as_str(), *seq);
                    // Only for invocations still pending: a late update must not resurrect one.
                    let still_pending = t.pending.get(key).map_err(db_error)?.is_some();
                    match still_pending {
                        true => {
                            t.attempts.insert(key, (*n, *status)).map_err(db_error)?;
                            t.mark(function, *seq, AsyncState::Queued, *n, *status, "")?;
                            Ok(Committed::default())
                        }
                        false => Ok(Committed::default()),
                    }
                }
                Op::Remove {
                    function,
                    seq,
                    attempts: n,
                    status,
                    reason,
                    ..
                } => {
                    let key = (function.as_str(), *seq);
                    let state = AsyncState::done(*status);
                    t.mark(function, *seq, state, *n, *status, reason)?;
                    t.pending.remove(key).map_err(db_error)?;
                    t.attempts.remove(key).map_err(db_error)?;
                    Ok(Committed::default())
                }
                Op::DeadLetter {
                    function,
                    seq,
                    attempts: n,
                    status,
                    reason,
                    ..
                } => {
                    let key = (function.as_str(), *seq);
                    t.mark(
                        function,
                        *seq,
                        AsyncState::DeadLettered,
                        *n,
                        *status,
                        reason,
                    )?;
                    let record = t
                        .pending
                        .remove(key)
                        .map_err(db_error)?
                        .map(|v| v.value().to_vec());
                    t.attempts.remove(key).map_err(db_error)?;
                    match record {
                        Some(record) => {
                            let value = encode_dead(&record, *n, *status, reason, unix_ms());
                            t.dead
                                .insert(key, value.as_slice())
                                .map(|_| Committed::default())
                                .map_err(db_error)
                        }
                        None => Ok(Committed::default()),
                    }
                }
                Op::Replay { function, id, .. } => {
                    let key = (function.as_str(), *id);
                    let letter = t
                        .dead
                        .get(key)
                        .map_err(db_error)?
                        .map(|v| v.value().to_vec());
                    match letter {
                        None => Ok(Committed::default()),
                        Some(letter) => match dead_invocation(&letter)
                            .and_then(|inv| head(inv).map(|h| (inv, h)))
                        {
                            Err(reason) => Err(StoreError::Corrupt {
                                function: function.clone(),
                                seq: *id,
                                reason,
                            }),
                            Ok((invocation, (accepted, call_id))) => {
                                let seq = next_seq;
                                t.pending
                                    .insert((function.as_str(), seq), invocation)
                                    .map_err(db_error)?;
                                t.dead.remove(key).map_err(db_error)?;
                                next_seq += 1;
                                let replays = t
                                    .records
                                    .get(call_id.as_str())
                                    .map_err(db_error)?
                                    .and_then(|v| AsyncRecord::decode(v.value()).ok())
                                    .filter(|r| r.seq == *id)
                                    .map_or(0, |r| r.replays);
                                let mut record = AsyncRecord::new(
                                    call_id,
                                    function,
                                    seq,
                                    accepted,
                                    AsyncState::Queued,
                                );
                                record.replays = replays + 1;
                                t.put_record(record.clone())?;
                                Ok(Committed {
                                    seq,
                                    record: Some(record),
                                })
                            }
                        },
                    }
                }
                Op::Discard { function, id, .. } => {
                    let key = (function.as_str(), *id);
                    let letter = t
                        .dead
                        .remove(key)
                        .map_err(db_error)?
                        .map(|v| v.value().to_vec());
                    match letter.map(|l| decode_dead(*id, &l)) {
                        None => Ok(Committed::default()),
                        Some(Err(reason)) => {
                            warn!(function = %function, seq = id, reason, "async store: unreadable dead letter discarded");
                            Ok(Committed::default())
                        }
                        Some(Ok(letter)) => {
                            let inv = letter.invocation;
                            let mut record = AsyncRecord::new(
                                inv.call_id,
                                function,
                                *id,
                                inv.accepted_unix_ms,
                                AsyncState::Discarded,
                            );
                            record.attempts = letter.attempts;
                            record.status = letter.status;
                            record.reason = letter.reason;
                            let written = t.put_record(record.clone())?.unwrap_or(record);
                            Ok(Committed {
                                seq: 0,
                                record: Some(written),
                            })
                        }
                    }
                }
            };
            results.push(result);
        }
        meta.insert(NEXT_SEQ, next_seq).map_err(db_error)?;
    }
    txn.commit().map_err(db_error)?;
    Ok((results, next_seq))
}

fn state_error(e: impl std::fmt::Display) -> StateError {
    StateError(e.to_string())
}

impl RedbStore {
    /// Runs `op` on the blocking pool against the open database. A write transaction here waits
    /// for the writer thread's current one (redb has one writer at a time); state writes are rare.
    async fn state_op<T: Send + 'static>(
        &self,
        key: Option<&str>,
        op: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StateError> {
        if let Some(key) = key {
            check_key(key)?;
        }
        let db = self.db().map_err(state_error)?;
        tokio::task::spawn_blocking(move || op(&db).map_err(state_error))
            .await
            .unwrap_or_else(|e| Err(state_error(format!("state operation panicked: {e}"))))
    }
}

/// One write transaction, committed durably, running `write` on the state table.
fn write_state(
    db: &Database,
    write: impl FnOnce(&mut redb::Table<(&str, &str), &[u8]>) -> Result<(), redb::StorageError>,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(STATE)?;
        write(&mut table)?;
    }
    txn.commit()?;
    Ok(())
}

impl StateStore for RedbStore {
    fn state_get<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
    ) -> StateFuture<'a, Option<Vec<u8>>> {
        let owned = key.to_owned();
        Box::pin(self.state_op(Some(key), move |db| {
            let read = db.begin_read()?;
            let table = read.open_table(STATE)?;
            Ok(table
                .get((bucket, owned.as_str()))?
                .map(|v| v.value().to_vec()))
        }))
    }

    fn state_put<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
        value: Vec<u8>,
    ) -> StateFuture<'a, ()> {
        let owned = key.to_owned();
        Box::pin(self.state_op(Some(key), move |db| {
            write_state(db, |table| {
                table
                    .insert((bucket, owned.as_str()), value.as_slice())
                    .map(drop)
            })
        }))
    }

    fn state_delete<'a>(&'a self, bucket: &'static str, key: &'a str) -> StateFuture<'a, ()> {
        let owned = key.to_owned();
        Box::pin(self.state_op(Some(key), move |db| {
            write_state(db, |table| table.remove((bucket, owned.as_str())).map(drop))
        }))
    }

    fn state_scan(&self, bucket: &'static str) -> StateFuture<'_, BTreeMap<String, Vec<u8>>> {
        Box::pin(self.state_op(None, move |db| {
            let read = db.begin_read()?;
            let table = read.open_table(STATE)?;
            let mut all = BTreeMap::new();
            // Keys sort by bucket first; `""` is below every key.
            for entry in table.range((bucket, "")..)? {
                let (k, v) = entry?;
                let (b, key) = k.value();
                if b != bucket {
                    break;
                }
                all.insert(key.to_owned(), v.value().to_vec());
            }
            Ok(all)
        }))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn invocation(n: u32) -> Invocation {
        Invocation {
            call_id: format!("call-{n}"),
            path_and_query: format!("/p/{n}?q=1"),
            headers: vec![("x-a".into(), Bytes::from_static(b"1"))],
            body: Bytes::from(vec![n as u8; 100]),
            callback: n
                .is_multiple_of(2)
                .then(|| "http://127.0.0.1:1/cb".to_owned()),
            accepted_unix_ms: 1_700_000_000_000 + n as u64,
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluicegate-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("store.redb")
    }

    fn done() -> Settlement {
        Settlement::Done {
            attempts: 1,
            status: 200,
            reason: String::new(),
        }
    }

    fn retry(attempts: u32, after: Duration) -> Settlement {
        Settlement::Retry {
            attempts,
            status: 503,
            after,
        }
    }

    #[tokio::test]
    async fn invocations_survive_a_reopen_in_order_per_function_with_their_attempts() {
        let path = temp_path("reopen");
        let store = RedbStore::open(&path).unwrap();
        assert!(store.pending().await.unwrap().is_empty());
        for (function, n) in [("a", 1), ("b", 2), ("a", 3)] {
            store.insert(function, &invocation(n)).await.unwrap();
        }
        let a1 = store.next("a").await.unwrap();
        assert_eq!(a1.invocation, invocation(1));
        store
            .settle("a", a1.seq, retry(2, Duration::from_secs(3600)))
            .await
            .unwrap();
        store.close().await;

        // After a reopen every stored invocation is due at once, oldest first, attempts kept.
        let store = RedbStore::open(&path).unwrap();
        let pending = store.pending().await.unwrap();
        assert_eq!((pending["a"], pending["b"]), (2, 1));
        let first = store.next("a").await.unwrap();
        assert_eq!(
            (first.seq, first.attempts, first.last_status),
            (a1.seq, 2, 503)
        );
        let second = store.next("a").await.unwrap();
        assert!(second.seq > first.seq);
        assert_eq!(
            (second.invocation.clone(), second.attempts),
            (invocation(3), 0)
        );
        // Sequence numbers keep increasing after a reopen.
        store.insert("a", &invocation(4)).await.unwrap();
        let third = store.next("a").await.unwrap();
        assert!(third.seq > second.seq);

        store.settle("a", first.seq, done()).await.unwrap();
        let dead_letter = Settlement::DeadLetter {
            attempts: 5,
            status: 502,
            reason: "refused".into(),
        };
        store.settle("a", second.seq, dead_letter).await.unwrap();
        assert_eq!(store.pending_count("a").await.unwrap(), 1);
        assert_eq!(store.dead_letter_count().await.unwrap(), 1);
        let dead = store.dead_letters("a").await.unwrap();
        assert_eq!(
            (dead[0].seq, dead[0].attempts, dead[0].status),
            (second.seq, 5, 502)
        );
        assert_eq!(dead[0].reason, "refused");
        assert_eq!(dead[0].invocation, invocation(3));
        // An update for a finished invocation does not bring it back.
        store
            .settle("a", first.seq, retry(3, Duration::ZERO))
            .await
            .unwrap();
        store.settle("a", third.seq, done()).await.unwrap();
        assert_eq!(store.pending_count("a").await.unwrap(), 0);
        let b = store.next("b").await.unwrap();
        assert_eq!(b.invocation, invocation(2));
        store.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_is_handed_out_when_its_wait_is_over_before_newer_invocations() {
        let path = temp_path("retry");
        let store = Arc::new(RedbStore::open(&path).unwrap());
        for n in 1..=3 {
            store.insert("f", &invocation(n)).await.unwrap();
        }
        let one = store.next("f").await.unwrap();
        let start = Instant::now();
        store
            .settle("f", one.seq, retry(1, Duration::from_secs(10)))
            .await
            .unwrap();
        // The retry waits; newer invocations do not.
        let two = store.next("f").await.unwrap();
        assert_eq!(two.invocation, invocation(2));
        assert_eq!(Instant::now(), start);
        store.settle("f", two.seq, done()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(11)).await;
        let again = store.next("f").await.unwrap();
        assert_eq!((again.seq, again.attempts), (one.seq, 1));
        let three = store.next("f").await.unwrap();
        assert_eq!(three.invocation, invocation(3));

        // With nothing else to hand out, `next` waits for the retry's time.
        let at = Instant::now();
        store
            .settle("f", again.seq, retry(2, Duration::from_secs(20)))
            .await
            .unwrap();
        let last = store.next("f").await.unwrap();
        assert_eq!((last.seq, last.attempts), (one.seq, 2));
        assert_eq!(Instant::now() - at, Duration::from_secs(20));

        // ... or for an insert.
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.next("f").await }
        });
        tokio::task::yield_now().await;
        store.insert("f", &invocation(4)).await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap().invocation, invocation(4));
        store.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn records_follow_an_invocation_through_dead_letter_replay_and_discard() {
        let path = temp_path("records");
        let store = RedbStore::open(&path).unwrap();
        let state = |r: Option<AsyncRecord>| r.map(|r| (r.state, r.attempts, r.status));
        store.insert("a", &invocation(1)).await.unwrap();
        assert_eq!(
            state(store.record("call-1").await.unwrap()),
            Some((AsyncState::Queued, 0, 0))
        );
        assert!(store.record("call-9").await.unwrap().is_none());
        let one = store.next("a").await.unwrap();
        store.started("a", one.seq, 1).await.unwrap();
        assert_eq!(
            state(store.record("call-1").await.unwrap()),
            Some((AsyncState::Running, 1, 0))
        );
        store
            .settle("a", one.seq, retry(1, Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(
            state(store.record("call-1").await.unwrap()),
            Some((AsyncState::Queued, 1, 503))
        );
        // A late `running` mark of the first attempt changes nothing.
        store.started("a", one.seq, 1).await.unwrap();
        assert_eq!(
            state(store.record("call-1").await.unwrap()),
            Some((AsyncState::Queued, 1, 503))
        );
        let dead = Settlement::DeadLetter {
            attempts: 2,
            status: 502,
            reason: "refused".into(),
        };
        let again = store.next("a").await.unwrap();
        store.settle("a", again.seq, dead).await.unwrap();
        let record = store.record("call-1").await.unwrap().unwrap();
        assert_eq!(
            (record.state, record.attempts, record.status),
            (AsyncState::DeadLettered, 2, 502)
        );
        assert_eq!(
            (record.reason.as_str(), record.dead_letter),
            ("refused", Some(one.seq))
        );

        // Listed, replayed (a new invocation, handed out again), dead again, then discarded.
        store.insert("b", &invocation(2)).await.unwrap();
        let listed = store.list_dead_letters(None, 10).await.unwrap();
        assert_eq!((listed.total, listed.letters.len()), (1, 1));
        assert_eq!(listed.letters[0].0, "a");
        assert!(store.replay("a", one.seq + 100).await.unwrap().is_none());
        assert!(
            store.replay("b", one.seq).await.unwrap().is_none(),
            "another function's id"
        );
        let replayed = store.replay("a", one.seq).await.unwrap().unwrap();
        assert!(replayed.seq > one.seq);
        assert_eq!((replayed.state, replayed.replays), (AsyncState::Queued, 1));
        assert_eq!(
            store.list_dead_letters(Some("a"), 10).await.unwrap().total,
            0
        );
        let back = store.next("a").await.unwrap();
        assert_eq!((back.seq, back.attempts), (replayed.seq, 0));
        assert_eq!(back.invocation, invocation(1));
        let dead = Settlement::DeadLetter {
            attempts: 1,
            status: 500,
            reason: "again".into(),
        };
        store.settle("a", back.seq, dead).await.unwrap();
        let discarded = store.discard("a", back.seq).await.unwrap().unwrap();
        assert_eq!(
            (discarded.state, discarded.replays),
            (AsyncState::Discarded, 1)
        );
        assert!(store.discard("a", back.seq).await.unwrap().is_none());
        assert_eq!(store.dead_letter_count().await.unwrap(), 0);
        let record = store.record("call-1").await.unwrap().unwrap();
        assert_eq!((record.state, record.replays), (AsyncState::Discarded, 1));
        store.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn records_of_finished_invocations_expire_and_are_swept() {
        let path = temp_path("expiry");
        let retention = Duration::from_millis(200);
        let store = RedbStore::open_with_retention(&path, retention).unwrap();
        store.insert("a", &invocation(1)).await.unwrap();
        store.insert("a", &invocation(2)).await.unwrap();
        let one = store.next("a").await.unwrap();
        let done = Settlement::Done {
            attempts: 1,
            status: 204,
            reason: String::new(),
        };
        store.settle("a", one.seq, done).await.unwrap();
        let record = store.record("call-1").await.unwrap().unwrap();
        assert_eq!((record.state, record.status), (AsyncState::Succeeded, 204));
        // Finished: gone after the retention (read or swept); pending: kept.
        let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
        while store.record("call-1").await.unwrap().is_some() {
            assert!(std::time::SystemTime::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.record("call-2").await.unwrap().is_some());
        // The sweeper deletes it from the file too.
        let db = store.db().unwrap();
        let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
        loop {
            let read = db.begin_read().unwrap();
            let records = read.open_table(RECORDS).unwrap();
            if records.get("call-1").unwrap().is_none() {
                assert!(records.get("call-2").unwrap().is_some());
                break;
            }
            assert!(std::time::SystemTime::now() < deadline, "never swept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(db);
        store.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn a_closed_store_refuses_work_and_frees_the_file() {
        let path = temp_path("closed");
        let store = RedbStore::open(&path).unwrap();
        store.close().await;
        assert!(matches!(
            store.insert("a", &invocation(1)).await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(store.next("a").await, Err(StoreError::Closed)));
        // The file is free for another opener.
        let again = RedbStore::open(&path).unwrap();
        again.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn state_survives_reopening_and_keeps_buckets_apart() {
        let path = temp_path("state");
        let store = RedbStore::open(&path).unwrap();
        store
            .state_put("paused", "echo", b"1".to_vec())
            .await
            .unwrap();
        store
            .state_put("paused", "sleep", b"2".to_vec())
            .await
            .unwrap();
        store
            .state_put("tokens", "echo", b"t".to_vec())
            .await
            .unwrap();
        store
            .state_put("pausedx", "a", b"x".to_vec())
            .await
            .unwrap();
        store.state_delete("paused", "sleep").await.unwrap();
        assert!(store.state_put("paused", "a.b", vec![]).await.is_err());
        store.close().await;

        let store = RedbStore::open(&path).unwrap();
        let paused = store.state_scan("paused").await.unwrap();
        assert_eq!(
            paused.into_iter().collect::<Vec<_>>(),
            [("echo".to_owned(), b"1".to_vec())]
        );
        assert_eq!(
            store.state_get("tokens", "echo").await.unwrap(),
            Some(b"t".to_vec())
        );
        assert_eq!(store.state_get("tokens", "sleep").await.unwrap(), None);
        store.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
