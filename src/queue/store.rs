//! The durable async store: accepted invocations in an embedded redb database, written by one
//! thread that commits (and fsyncs) whatever has queued up meanwhile in one transaction.
//!
//! Tables, all keyed by `(function name, sequence number)` so that each function's invocations
//! read back in the order they were accepted:
//!
//! * `pending`: every invocation accepted and not yet finished (the request as it will be sent);
//! * `attempts`: attempts made so far and the last status, for invocations that failed at least once;
//! * `dead`: invocations that ran out of attempts, with their final status (never deleted by the
//!   gateway);
//! * `meta`: the next sequence number.
//!
//! Nothing is acknowledged before its transaction is committed with `Durability::Immediate`, so an
//! invocation the client saw `202` for survives a crash (even `SIGKILL`) of the gateway.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tracing::{debug, warn};

type Key<'a> = (&'a str, u64);

const PENDING: TableDefinition<Key, &[u8]> = TableDefinition::new("pending");
const ATTEMPTS: TableDefinition<Key, (u32, u16)> = TableDefinition::new("attempts");
const DEAD: TableDefinition<Key, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";

/// Version byte at the start of every encoded invocation.
const RECORD_VERSION: u8 = 1;
/// Version byte at the start of every encoded dead letter.
const DEAD_VERSION: u8 = 1;
/// Most operations committed in one transaction.
const MAX_BATCH_OPS: usize = 4096;
/// Most body bytes committed in one transaction (one large body still goes alone).
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Why the store could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
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

fn db_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
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

/// An invocation read back from the store.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Its sequence number (unique in the store, increasing in acceptance order).
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
    /// Its sequence number.
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

/// What the store held when it was opened.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    /// Pending invocations per function name (including names no longer configured).
    pub pending: std::collections::BTreeMap<String, u64>,
}

type Done<T> = Box<dyn FnOnce(Result<T, StoreError>) + Send>;

enum Op {
    Insert {
        function: String,
        record: Vec<u8>,
        done: Done<u64>,
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
}

impl Op {
    fn size(&self) -> usize {
        match self {
            Op::Insert { record, .. } => record.len(),
            _ => 64,
        }
    }
}

/// The store: reads from any thread, writes through one committing thread.
pub struct Store {
    path: PathBuf,
    db: RwLock<Option<Arc<Database>>>,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates, with its parent directories) the store at `path` and counts what it
    /// holds. Blocking: call it from a blocking context.
    pub fn open(path: &Path) -> Result<(Store, Recovered), StoreError> {
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
            let meta = txn.open_table(META).map_err(db_error)?;
            next_seq = meta
                .get(NEXT_SEQ)
                .map_err(db_error)?
                .map_or(1, |v| v.value());
        }
        txn.commit().map_err(db_error)?;

        let mut recovered = Recovered::default();
        {
            let read = db.begin_read().map_err(db_error)?;
            let pending = read.open_table(PENDING).map_err(db_error)?;
            for entry in pending.iter().map_err(db_error)? {
                let (key, _) = entry.map_err(db_error)?;
                let (function, _) = key.value();
                *recovered.pending.entry(function.to_owned()).or_default() += 1;
            }
        }

        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("sluicegate-async-store".into())
            .spawn(move || write_loop(&writer_db, next_seq, &rx))
            .map_err(|e| db_error(format!("cannot start the store writer: {e}")))?;
        Ok((
            Store {
                path: path.to_owned(),
                db: RwLock::new(Some(db)),
                ops: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
            },
            recovered,
        ))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn submit(&self, op: Op) {
        let ops = self.ops.lock().unwrap();
        let unsent = match ops.as_ref() {
            Some(tx) => tx.send(op).err().map(|e| e.0),
            None => Some(op),
        };
        drop(ops);
        if let Some(op) = unsent {
            match op {
                Op::Insert { done, .. } => done(Err(StoreError::Closed)),
                Op::Attempted { done, .. }
                | Op::Remove { done, .. }
                | Op::DeadLetter { done, .. } => done(Err(StoreError::Closed)),
            }
        }
    }

    /// Stores `invocation` for `function`; `done` gets its sequence number once the transaction
    /// holding it is durably committed, or the error. `done` runs on the writer thread: keep it short.
    pub fn insert(
        &self,
        function: &str,
        invocation: &Invocation,
        done: impl FnOnce(Result<u64, StoreError>) + Send + 'static,
    ) {
        self.submit(Op::Insert {
            function: function.to_owned(),
            record: encode(invocation),
            done: Box::new(done),
        });
    }

    /// Records that `attempts` attempts have been made, the last one answering `status`.
    pub fn attempted(
        &self,
        function: &str,
        seq: u64,
        attempts: u32,
        status: u16,
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.submit(Op::Attempted {
            function: function.to_owned(),
            seq,
            attempts,
            status,
            done: Box::new(done),
        });
    }

    /// Deletes a finished invocation.
    pub fn remove(
        &self,
        function: &str,
        seq: u64,
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.submit(Op::Remove {
            function: function.to_owned(),
            seq,
            done: Box::new(done),
        });
    }

    /// Moves an invocation out of attempts to the dead-letter table.
    pub fn dead_letter(
        &self,
        function: &str,
        seq: u64,
        attempts: u32,
        status: u16,
        reason: &str,
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.submit(Op::DeadLetter {
            function: function.to_owned(),
            seq,
            attempts,
            status,
            reason: reason.to_owned(),
            done: Box::new(done),
        });
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.read().unwrap().clone().ok_or(StoreError::Closed)
    }

    /// The first pending invocation of `function` with a sequence number of at least `from`.
    /// Blocking.
    pub fn next(&self, function: &str, from: u64) -> Result<Option<Pending>, StoreError> {
        let db = self.db()?;
        let read = db.begin_read().map_err(db_error)?;
        let pending = read.open_table(PENDING).map_err(db_error)?;
        let mut range = pending
            .range((function, from)..=(function, u64::MAX))
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

    /// One pending invocation by key, if it is still pending. Blocking.
    pub fn get(&self, function: &str, seq: u64) -> Result<Option<Pending>, StoreError> {
        Ok(self.next(function, seq)?.filter(|p| p.seq == seq))
    }

    /// Number of pending invocations of `function`. Blocking.
    pub fn pending_count(&self, function: &str) -> Result<u64, StoreError> {
        let db = self.db()?;
        let read = db.begin_read().map_err(db_error)?;
        let pending = read.open_table(PENDING).map_err(db_error)?;
        let n = pending
            .range((function, 0)..=(function, u64::MAX))
            .map_err(db_error)?
            .count();
        Ok(n as u64)
    }

    /// Every dead letter of `function`, oldest first. Blocking.
    pub fn dead_letters(&self, function: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let db = self.db()?;
        let read = db.begin_read().map_err(db_error)?;
        let dead = read.open_table(DEAD).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in dead
            .range((function, 0)..=(function, u64::MAX))
            .map_err(db_error)?
        {
            let (key, value) = entry.map_err(db_error)?;
            let seq = key.value().1;
            out.push(
                decode_dead(seq, value.value()).map_err(|reason| StoreError::Corrupt {
                    function: function.to_owned(),
                    seq,
                    reason,
                })?,
            );
        }
        Ok(out)
    }

    /// Number of dead letters in the whole store. Blocking.
    pub fn dead_letter_count(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        let read = db.begin_read().map_err(db_error)?;
        let dead = read.open_table(DEAD).map_err(db_error)?;
        dead.len().map_err(db_error)
    }

    /// Commits what was submitted, stops the writer and closes the file (so that another gateway
    /// can open it). Later operations fail with [`StoreError::Closed`].
    pub async fn close(&self) {
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
    }
}

fn write_loop(db: &Database, mut next_seq: u64, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
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
        match commit(db, next_seq, &batch) {
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

fn complete(op: Op, result: Result<u64, StoreError>) {
    match op {
        Op::Insert { done, .. } => done(result),
        Op::Attempted { done, .. } | Op::Remove { done, .. } | Op::DeadLetter { done, .. } => {
            done(result.map(|_| ()))
        }
    }
}

/// One transaction for the whole batch. Per-operation failures (a value too large) fail only
/// that operation; a failure of the transaction fails them all.
fn commit(
    db: &Database,
    mut next_seq: u64,
    batch: &[Op],
) -> Result<(Vec<Result<u64, StoreError>>, u64), StoreError> {
    let txn = db.begin_write().map_err(db_error)?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut pending = txn.open_table(PENDING).map_err(db_error)?;
        let mut attempts = txn.open_table(ATTEMPTS).map_err(db_error)?;
        let mut dead = txn.open_table(DEAD).map_err(db_error)?;
        let mut meta = txn.open_table(META).map_err(db_error)?;
        for op in batch {
            let result = match op {
                Op::Insert {
                    function, record, ..
                } => {
                    let seq = next_seq;
                    match pending.insert((function.as_str(), seq), record.as_slice()) {
                        Ok(_) => {
                            next_seq += 1;
                            Ok(seq)
                        }
                        Err(e) => Err(db_error(e)),
                    }
                }
                Op::Attempted {
                    function,
                    seq,
                    attempts: n,
                    status,
                    ..
                } => {
                    let key = (function.as_str(), *seq);
                    // Only for invocations still pending: a late update must not resurrect one.
                    match pending.get(key).map_err(db_error)? {
                        Some(_) => attempts
                            .insert(key, (*n, *status))
                            .map(|_| 0)
                            .map_err(db_error),
                        None => Ok(0),
                    }
                }
                Op::Remove { function, seq, .. } => {
                    let key = (function.as_str(), *seq);
                    pending.remove(key).map_err(db_error)?;
                    attempts.remove(key).map_err(db_error)?;
                    Ok(0)
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
                    let record = pending
                        .remove(key)
                        .map_err(db_error)?
                        .map(|v| v.value().to_vec());
                    attempts.remove(key).map_err(db_error)?;
                    match record {
                        Some(record) => {
                            let value = encode_dead(&record, *n, *status, reason, unix_ms());
                            dead.insert(key, value.as_slice())
                                .map(|_| 0)
                                .map_err(db_error)
                        }
                        None => Ok(0),
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

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------------------------
// Encoding: a version byte, then fields, each variable-length one prefixed by its u32 LE length.

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode(inv: &Invocation) -> Vec<u8> {
    let headers: usize = inv.headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum();
    let mut out = Vec::with_capacity(
        64 + inv.call_id.len() + inv.path_and_query.len() + headers + inv.body.len(),
    );
    out.push(RECORD_VERSION);
    out.extend_from_slice(&inv.accepted_unix_ms.to_le_bytes());
    put_bytes(&mut out, inv.call_id.as_bytes());
    put_bytes(&mut out, inv.path_and_query.as_bytes());
    match &inv.callback {
        Some(url) => {
            out.push(1);
            put_bytes(&mut out, url.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(inv.headers.len() as u32).to_le_bytes());
    for (name, value) in &inv.headers {
        put_bytes(&mut out, name.as_bytes());
        put_bytes(&mut out, value);
    }
    put_bytes(&mut out, &inv.body);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, &'static str> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "invalid utf-8")
    }
}

fn decode(data: &[u8]) -> Result<Invocation, &'static str> {
    let mut r = Reader(data);
    if r.u8()? != RECORD_VERSION {
        return Err("unknown record version");
    }
    let accepted_unix_ms = r.u64()?;
    let call_id = r.string()?;
    let path_and_query = r.string()?;
    let callback = match r.u8()? {
        0 => None,
        1 => Some(r.string()?),
        _ => return Err("invalid callback flag"),
    };
    let n = r.u32()? as usize;
    let mut headers = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let name = r.string()?;
        let value = Bytes::copy_from_slice(r.bytes()?);
        headers.push((name, value));
    }
    let body = Bytes::copy_from_slice(r.bytes()?);
    if !r.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok(Invocation {
        call_id,
        path_and_query,
        headers,
        body,
        callback,
        accepted_unix_ms,
    })
}

fn encode_dead(record: &[u8], attempts: u32, status: u16, reason: &str, at: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len() + reason.len() + 32);
    out.push(DEAD_VERSION);
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&attempts.to_le_bytes());
    out.extend_from_slice(&status.to_le_bytes());
    put_bytes(&mut out, reason.as_bytes());
    put_bytes(&mut out, record);
    out
}

fn decode_dead(seq: u64, data: &[u8]) -> Result<DeadLetter, &'static str> {
    let mut r = Reader(data);
    if r.u8()? != DEAD_VERSION {
        return Err("unknown dead-letter version");
    }
    let dead_unix_ms = r.u64()?;
    let attempts = r.u32()?;
    let status = r.u16()?;
    let reason = r.string()?;
    let invocation = decode(r.bytes()?)?;
    Ok(DeadLetter {
        seq,
        invocation,
        attempts,
        status,
        reason,
        dead_unix_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(n: u32) -> Invocation {
        Invocation {
            call_id: format!("call-{n}"),
            path_and_query: format!("/p/{n}?q=1"),
            headers: vec![
                ("x-a".into(), Bytes::from_static(b"1")),
                ("x-b".into(), Bytes::from_static(b"\xff")),
            ],
            body: Bytes::from(vec![n as u8; 100]),
            callback: (n % 2 == 0).then(|| "http://127.0.0.1:1/cb".to_owned()),
            accepted_unix_ms: 1_700_000_000_000 + n as u64,
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluicegate-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("store.redb")
    }

    async fn insert(store: &Store, function: &str, inv: &Invocation) -> u64 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.insert(function, inv, move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap().unwrap()
    }

    async fn wait(f: impl FnOnce(Box<dyn FnOnce(Result<(), StoreError>) + Send>)) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        f(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.unwrap().unwrap();
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let inv = invocation(2);
        assert_eq!(decode(&encode(&inv)).unwrap(), inv);
        let mut bad = encode(&inv);
        bad.truncate(bad.len() - 1);
        assert!(decode(&bad).is_err());
        assert!(decode(&[9]).is_err());
    }

    #[tokio::test]
    async fn invocations_survive_a_reopen_in_order_per_function() {
        let path = temp_path("reopen");
        let (store, recovered) = Store::open(&path).unwrap();
        assert!(recovered.pending.is_empty());
        let a1 = insert(&store, "a", &invocation(1)).await;
        let b1 = insert(&store, "b", &invocation(2)).await;
        let a2 = insert(&store, "a", &invocation(3)).await;
        assert!(a1 < b1 && b1 < a2);
        wait(|d| store.attempted("a", a1, 2, 503, d)).await;
        store.close().await;

        let (store, recovered) = Store::open(&path).unwrap();
        assert_eq!(recovered.pending["a"], 2);
        assert_eq!(recovered.pending["b"], 1);
        let first = store.next("a", 0).unwrap().unwrap();
        assert_eq!(first.seq, a1);
        assert_eq!(first.invocation, invocation(1));
        assert_eq!((first.attempts, first.last_status), (2, 503));
        let second = store.next("a", a1 + 1).unwrap().unwrap();
        assert_eq!((second.seq, second.attempts), (a2, 0));
        assert!(store.next("a", a2 + 1).unwrap().is_none());
        // Sequence numbers keep increasing after a reopen.
        let a3 = insert(&store, "a", &invocation(4)).await;
        assert!(a3 > a2);

        wait(|d| store.remove("a", a1, d)).await;
        wait(|d| store.dead_letter("a", a2, 5, 502, "refused", d)).await;
        assert_eq!(store.pending_count("a").unwrap(), 1);
        let dead = store.dead_letters("a").unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].seq, dead[0].attempts, dead[0].status),
            (a2, 5, 502)
        );
        assert_eq!(dead[0].reason, "refused");
        assert_eq!(dead[0].invocation, invocation(3));
        // An update for a finished invocation does not bring it back.
        wait(|d| store.attempted("a", a1, 3, 500, d)).await;
        assert!(store.get("a", a1).unwrap().is_none());
        store.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn a_closed_store_refuses_work_and_frees_the_file() {
        let path = temp_path("closed");
        let (store, _) = Store::open(&path).unwrap();
        store.close().await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.insert("a", &invocation(1), move |r| {
            let _ = tx.send(r);
        });
        assert!(matches!(rx.await.unwrap(), Err(StoreError::Closed)));
        // The file is free for another opener.
        let (again, _) = Store::open(&path).unwrap();
        again.close().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
