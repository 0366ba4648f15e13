//! The shared async store: NATS JetStream, for several gateways in front of the same functions.
//! Any gateway accepts, any dispatches; redelivery, its timing and dead letters are JetStream's.
//!
//! * **Streams.** `SLUICEGATE_ASYNC` (work-queue retention, file storage, subjects
//!   `sluicegate.async.<function>`) holds what is accepted and not yet final: an ack deletes the
//!   message, so the stream is the backlog. `SLUICEGATE_DLQ` (limits retention, file storage,
//!   subjects `sluicegate.dlq.<function>`) keeps the dead letters. Both are created when missing
//!   (one replica; create them beforehand with 3 replicas on a cluster: an existing stream is
//!   used as it is).
//! * **Accept** ([`AsyncStore::insert`]): a publish with `Nats-Msg-Id` = the call id (JetStream
//!   drops a second publish of the same id within two minutes), resolved once JetStream's
//!   publish ack arrived. Nothing is published while the client is not connected: the answer is
//!   an error at once (a publish buffered during an outage could be stored after its caller was
//!   told it failed).
//! * **Delivery** ([`AsyncStore::next`]): one durable pull consumer per function, `fn-<name>`,
//!   shared by every gateway. `next` pulls one message, and only when the dispatcher asks, that
//!   is when it has a slot for an attempt: nothing is prefetched, so nothing waits in this
//!   process while another gateway could run it. A delivery is a lease of `async_ack_wait`,
//!   renewed (`+WPI`) every third of it until the invocation is settled; if this gateway dies the
//!   lease runs out and JetStream hands the message to whichever gateway pulls next. The
//!   attempts made are the message's delivery count minus one.
//! * **Settlements** ([`AsyncStore::settle`]): done → ack (awaiting the server's confirmation);
//!   retry after D → nak with delay D (JetStream redelivers it after D, to any gateway); dead
//!   letter → publish to the dead-letter stream, await its ack, then term. `max_deliver` is a
//!   bound, [`EXTRA_DELIVERIES`] above the function's `async_max_attempts`: the dispatcher dead-letters
//!   an invocation out of attempts when it is handed out, before JetStream would stop delivering
//!   it. No timer here: the retry wait is JetStream's.
//! * **Counts** ([`AsyncStore::pending`]): the stream's message count per subject, one request
//!   for every function; per function, the consumer's `num_pending + num_ack_pending`.
//! * **Records** (`records.rs`): each invocation's record in a third stream,
//!   `SLUICEGATE_RECORDS`, written before the step it records is acknowledged (so that a crash
//!   leaves the record at most one step behind, and the redelivery moves it on).
//! * **Replay and discard** of a dead letter (its id is its sequence in `SLUICEGATE_DLQ`): a
//!   replay publishes the invocation again with `Nats-Msg-Id` = `replay-<id>` (a second replay
//!   of the same dead letter within two minutes is not stored twice), then deletes the dead
//!   letter; a discard deletes it.

mod records;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::record::{dead_invocation, decode, decode_dead, encode, encode_dead, head};
use super::{
    unix_ms, AsyncRecord, AsyncState, AsyncStore, DeadLetter, DeadLetters, Invocation, Pending,
    Settlement, StoreError, StoreFuture,
};
use crate::state::{check_key, StateError, StateFuture, StateStore};
pub use records::{RECORDS_STREAM, RECORDS_SUBJECT_PREFIX};

/// The stream of accepted invocations (work-queue retention).
pub const ASYNC_STREAM: &str = "SLUICEGATE_ASYNC";
/// Subject prefix of accepted invocations: `sluicegate.async.<function>`.
pub const ASYNC_SUBJECT_PREFIX: &str = "sluicegate.async.";
/// The stream of dead letters (limits retention, kept until deleted by hand).
pub const DLQ_STREAM: &str = "SLUICEGATE_DLQ";
/// Subject prefix of dead letters: `sluicegate.dlq.<function>`.
pub const DLQ_SUBJECT_PREFIX: &str = "sluicegate.dlq.";
/// Prefix of each function's durable consumer name: `fn-<function>`.
pub const CONSUMER_PREFIX: &str = "fn-";
/// Deliveries JetStream makes beyond `async_max_attempts` before it stops delivering a message:
/// room for deliveries that made no attempt (a gateway stopped or died before admitting it).
pub const EXTRA_DELIVERIES: i64 = 10;
/// JetStream drops a publish whose `Nats-Msg-Id` it saw within this window.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long starting the store waits for the first connection before going on without it.
const INITIAL_CONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long one pull request waits at the server for a message.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often `next` looks at the connection while NATS is unreachable.
const RECONNECT_POLL: Duration = Duration::from_millis(200);
/// Time a JetStream API request or publish ack has before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing the store may take to give back what it holds.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most dead letters [`AsyncStore::dead_letters`] lists for a function.
const MAX_LISTED: usize = 10_000;

fn db_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(format!("NATS JetStream: {what}: {e}"))
}

/// An invocation handed out and not yet settled: the delivery, and the task renewing its lease.
struct Outstanding {
    message: Arc<jetstream::Message>,
    renew: JoinHandle<()>,
}

/// The JetStream store; see the module doc.
pub struct JetStreamStore {
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    ack_wait: Duration,
    /// How long the records of finished invocations are kept.
    retention: Duration,
    /// The streams exist (created or found since the last time one was missing).
    ready: tokio::sync::Mutex<bool>,
    consumers: tokio::sync::Mutex<HashMap<String, PullConsumer>>,
    /// Each function's `async_max_attempts` (see [`AsyncStore::configure`]).
    max_attempts: Mutex<HashMap<String, u32>>,
    out: Mutex<HashMap<(String, u64), Outstanding>>,
    closed: AtomicBool,
    /// The key-value bucket of the gateway state, once opened.
    state: tokio::sync::OnceCell<jetstream::kv::Store>,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("url", &self.url)
            .field("state", &self.client.connection_state())
            .finish()
    }
}

impl JetStreamStore {
    /// A store on the NATS server at `url`. Waits up to two seconds for the first connection,
    /// then returns: the client goes on connecting in the
    /// background and reconnects by itself for as long as the gateway runs; meanwhile every
    /// operation fails with the reason (`async_store_unavailable`) and `next` waits.
    ///
    /// The records of finished invocations are kept for `retention`.
    pub async fn connect(
        url: &str,
        ack_wait: Duration,
        retention: Duration,
    ) -> Result<JetStreamStore, StoreError> {
        let name = url.to_owned();
        let client = async_nats::ConnectOptions::new()
            .name("sluicegate")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .event_callback(move |event| {
                let url = name.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => info!(%url, "NATS connected"),
                        async_nats::Event::Disconnected => {
                            warn!(%url, "NATS disconnected: async invocations get 503 until it is back")
                        }
                        other => debug!(%url, event = %other, "NATS event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| db_error("connect", e))?;
        // A server that is up is connected before the gateway starts answering; one that is
        // not is waited for in the background.
        let deadline = Instant::now() + INITIAL_CONNECT_WAIT;
        while client.connection_state() != State::Connected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        Ok(JetStreamStore {
            url: url.to_owned(),
            client,
            js,
            ack_wait,
            retention,
            ready: tokio::sync::Mutex::new(false),
            consumers: tokio::sync::Mutex::new(HashMap::new()),
            max_attempts: Mutex::new(HashMap::new()),
            out: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            state: tokio::sync::OnceCell::new(),
        })
    }

    /// `Ok` when the store is open and the client connected.
    fn check(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(StoreError::Database(format!(
                "NATS at {} is not connected ({state:?})",
                self.url
            ))),
        }
    }

    /// Creates the two streams unless they exist.
    async fn ensure_streams(&self) -> Result<(), StoreError> {
        self.check()?;
        let mut ready = self.ready.lock().await;
        if *ready {
            return Ok(());
        }
        let queue = stream::Config {
            name: ASYNC_STREAM.into(),
            subjects: vec![format!("{ASYNC_SUBJECT_PREFIX}>")],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: 1,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(queue)
            .await
            .map_err(|e| db_error("create stream SLUICEGATE_ASYNC", e))?;
        let dlq = stream::Config {
            name: DLQ_STREAM.into(),
            subjects: vec![format!("{DLQ_SUBJECT_PREFIX}>")],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: 1,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(dlq)
            .await
            .map_err(|e| db_error("create stream SLUICEGATE_DLQ", e))?;
        self.js
            .get_or_create_stream(records::stream_config())
            .await
            .map_err(|e| db_error("create stream SLUICEGATE_RECORDS", e))?;
        *ready = true;
        Ok(())
    }

    /// Something failed in a way a missing stream or consumer explains: look them up again
    /// next time.
    async fn forget(&self, function: &str) {
        *self.ready.lock().await = false;
        self.consumers.lock().await.remove(function);
    }

    /// The function's durable pull consumer, created (or brought to this gateway's settings)
    /// the first time.
    async fn consumer(&self, function: &str) -> Result<PullConsumer, StoreError> {
        if let Some(consumer) = self.consumers.lock().await.get(function) {
            return Ok(consumer.clone());
        }
        self.ensure_streams().await?;
        let max_attempts = self
            .max_attempts
            .lock()
            .unwrap()
            .get(function)
            .copied()
            .unwrap_or(crate::config::DEFAULT_ASYNC_MAX_ATTEMPTS);
        let config = pull::Config {
            durable_name: Some(format!("{CONSUMER_PREFIX}{function}")),
            filter_subject: format!("{ASYNC_SUBJECT_PREFIX}{function}"),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: i64::from(max_attempts) + EXTRA_DELIVERIES,
            // Unbounded: each gateway's admission bounds the attempts in flight, and messages
            // waiting out a retry delay count as ack-pending (a cap would stall new ones).
            max_ack_pending: -1,
            ..Default::default()
        };
        let consumer: PullConsumer = self
            .js
            .create_consumer_on_stream(config, ASYNC_STREAM)
            .await
            .map_err(|e| db_error(&format!("create consumer for {function}"), e))?;
        self.consumers
            .lock()
            .await
            .insert(function.to_owned(), consumer.clone());
        Ok(consumer)
    }

    /// Keeps `message` (stream sequence `seq`) until it is settled, renewing its lease.
    fn hold(&self, function: &str, seq: u64, message: jetstream::Message) {
        let message = Arc::new(message);
        let renew = tokio::spawn(renew(message.clone(), self.ack_wait / 3));
        let held = Outstanding { message, renew };
        if let Some(old) = self
            .out
            .lock()
            .unwrap()
            .insert((function.to_owned(), seq), held)
        {
            old.renew.abort();
        }
    }

    async fn publish_dead(
        &self,
        function: &str,
        seq: u64,
        record: &[u8],
        attempts: u32,
        status: u16,
        reason: &str,
    ) -> Result<u64, StoreError> {
        self.check()?;
        let letter = encode_dead(record, attempts, status, reason, unix_ms());
        let publish = PublishMessage::build()
            .payload(Bytes::from(letter))
            .message_id(format!("dlq-{seq}"));
        let ack = self
            .js
            .send_publish(format!("{DLQ_SUBJECT_PREFIX}{function}"), publish)
            .await
            .map_err(|e| db_error("publish dead letter", e))?;
        let ack = ack.await.map_err(|e| db_error("publish dead letter", e))?;
        Ok(ack.sequence)
    }

    /// Records that the invocation in `payload` (stream sequence `seq` of `function`) is now in
    /// `state`; a failure is logged, never the invocation's.
    async fn mark(
        &self,
        function: &str,
        seq: u64,
        payload: &[u8],
        state: AsyncState,
        change: impl FnOnce(&mut AsyncRecord),
    ) {
        let Ok((accepted, call_id)) = head(payload) else {
            return;
        };
        let mut record = AsyncRecord::new(call_id, function, seq, accepted, state);
        change(&mut record);
        if let Err(e) = self.put_record(record).await {
            warn!(function, seq, error = %e, state = state.name(), "NATS: async record not written");
        }
    }

    /// The dead letter `id` of `function`: its message, unless there is none (or it is
    /// another function's).
    async fn dead_message(
        &self,
        function: &str,
        id: u64,
    ) -> Result<Option<(stream::Stream<stream::Info>, Bytes)>, StoreError> {
        self.ensure_streams().await?;
        let stream = self
            .js
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| db_error("dead letters", e))?;
        match stream.get_raw_message(id).await {
            Ok(message)
                if message.subject.as_str() == format!("{DLQ_SUBJECT_PREFIX}{function}") =>
            {
                Ok(Some((stream, message.payload)))
            }
            Ok(_) => Ok(None),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => Err(db_error("dead letter", e)),
        }
    }
}

/// Renews the lease on `message` every `every` until aborted.
async fn renew(message: Arc<jetstream::Message>, every: Duration) {
    let every = every.max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = message.ack_with(AckKind::Progress).await {
            debug!(error = %e, "NATS: could not renew a delivery's lease");
        }
    }
}

impl AsyncStore for JetStreamStore {
    fn insert<'a>(&'a self, function: &'a str, invocation: &'a Invocation) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.ensure_streams().await?;
            let publish = PublishMessage::build()
                .payload(Bytes::from(encode(invocation)))
                .message_id(&invocation.call_id);
            let subject = format!("{ASYNC_SUBJECT_PREFIX}{function}");
            let sent = self.js.send_publish(subject, publish).await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => {
                    debug!(
                        function,
                        seq = ack.sequence,
                        duplicate = ack.duplicate,
                        "async invocation stored in JetStream"
                    );
                    if !ack.duplicate {
                        let record = AsyncRecord::new(
                            invocation.call_id.clone(),
                            function,
                            ack.sequence,
                            invocation.accepted_unix_ms,
                            AsyncState::Queued,
                        );
                        if let Err(e) = self.create_record(record).await {
                            warn!(function, seq = ack.sequence, error = %e, "NATS: async record not written");
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    if e.kind() == PublishErrorKind::StreamNotFound {
                        self.forget(function).await;
                    }
                    Err(db_error("publish", e))
                }
            }
        })
    }

    fn next<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Pending> {
        Box::pin(async move {
            loop {
                match self.check() {
                    Err(StoreError::Closed) => return Err(StoreError::Closed),
                    Err(_) => {
                        // Reconnecting by itself: nothing to report until it is back.
                        tokio::time::sleep(RECONNECT_POLL).await;
                        continue;
                    }
                    Ok(()) => {}
                }
                let consumer = self.consumer(function).await?;
                let pulled = consumer
                    .batch()
                    .max_messages(1)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await;
                let mut batch = match pulled {
                    Ok(batch) => batch,
                    Err(e) => {
                        self.forget(function).await;
                        return Err(db_error("pull", e));
                    }
                };
                let message = match batch.next().await {
                    None => continue,
                    Some(Err(e)) => {
                        self.forget(function).await;
                        return Err(db_error("pull", e));
                    }
                    Some(Ok(message)) => message,
                };
                let (seq, delivered) = match message.info() {
                    Ok(info) => (info.stream_sequence, info.delivered),
                    Err(e) => {
                        // Not a JetStream delivery: nothing to settle.
                        warn!(function, error = %e, "NATS: a pulled message has no delivery info; ignored");
                        continue;
                    }
                };
                let decoded = decode(&message.payload);
                self.hold(function, seq, message);
                let attempts = u32::try_from(delivered.saturating_sub(1)).unwrap_or(0);
                return match decoded {
                    Ok(invocation) => Ok(Pending {
                        seq,
                        invocation,
                        attempts,
                        last_status: 0,
                    }),
                    Err(reason) => Err(StoreError::Corrupt {
                        function: function.to_owned(),
                        seq,
                        reason,
                    }),
                };
            }
        })
    }

    fn settle<'a>(
        &'a self,
        function: &'a str,
        seq: u64,
        settlement: Settlement,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let held = self.out.lock().unwrap().remove(&(function.to_owned(), seq));
            let Some(held) = held else {
                return Err(StoreError::Database(format!(
                    "{function}/{seq} is not handed out by this gateway"
                )));
            };
            held.renew.abort();
            let message = held.message;
            // The record first: a crash before the ack leaves it one step behind, and the
            // redelivery moves it on.
            match settlement {
                Settlement::Done {
                    attempts,
                    status,
                    reason,
                } => {
                    let state = AsyncState::done(status);
                    self.mark(function, seq, &message.payload, state, |r| {
                        (r.attempts, r.status, r.reason) = (attempts, status, reason);
                    })
                    .await;
                    message.double_ack().await.map_err(|e| db_error("ack", e))
                }
                Settlement::Retry {
                    attempts,
                    status,
                    after,
                } => {
                    self.mark(function, seq, &message.payload, AsyncState::Queued, |r| {
                        (r.attempts, r.status) = (attempts, status);
                    })
                    .await;
                    message
                        .ack_with(AckKind::Nak(Some(after)))
                        .await
                        .map_err(|e| db_error("nak", e))
                }
                Settlement::DeadLetter {
                    attempts,
                    status,
                    reason,
                } => {
                    // If this fails the lease runs out and the invocation comes back, out of
                    // attempts: dead-lettered again then.
                    let id = self
                        .publish_dead(function, seq, &message.payload, attempts, status, &reason)
                        .await?;
                    self.mark(
                        function,
                        seq,
                        &message.payload,
                        AsyncState::DeadLettered,
                        |r| {
                            (r.attempts, r.status, r.reason) = (attempts, status, reason);
                            r.dead_letter = Some(id);
                        },
                    )
                    .await;
                    message
                        .double_ack_with(AckKind::Term)
                        .await
                        .map_err(|e| db_error("term", e))
                }
            }
        })
    }

    fn started<'a>(&'a self, function: &'a str, seq: u64, attempt: u32) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let held = self
                .out
                .lock()
                .unwrap()
                .get(&(function.to_owned(), seq))
                .map(|held| held.message.clone());
            if let Some(message) = held {
                self.mark(function, seq, &message.payload, AsyncState::Running, |r| {
                    r.attempts = attempt;
                })
                .await;
            }
            Ok(())
        })
    }

    fn record<'a>(&'a self, call_id: &'a str) -> StoreFuture<'a, Option<AsyncRecord>> {
        Box::pin(self.read_record(call_id))
    }

    fn list_dead_letters<'a>(
        &'a self,
        function: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, DeadLetters> {
        Box::pin(async move {
            self.ensure_streams().await?;
            let stream = self
                .js
                .get_stream_no_info(DLQ_STREAM)
                .await
                .map_err(|e| db_error("dead letters", e))?;
            let subject = match function {
                Some(f) => format!("{DLQ_SUBJECT_PREFIX}{f}"),
                None => format!("{DLQ_SUBJECT_PREFIX}>"),
            };
            let mut total = 0;
            let mut subjects = stream
                .info_with_subjects(subject.clone())
                .await
                .map_err(|e| db_error("dead letters", e))?;
            while let Some(entry) = subjects.next().await {
                total += entry.map_err(|e| db_error("dead letters", e))?.1 as u64;
            }
            let mut letters = Vec::new();
            let mut from = 1;
            while letters.len() < limit.min(MAX_LISTED) {
                let found = stream
                    .raw_message_builder()
                    .sequence(from)
                    .next_by_subject(subject.clone())
                    .send()
                    .await;
                let message = match found {
                    Ok(message) => message,
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        break
                    }
                    Err(e) => return Err(db_error("dead letters", e)),
                };
                from = message.sequence + 1;
                let name = message
                    .subject
                    .strip_prefix(DLQ_SUBJECT_PREFIX)
                    .unwrap_or_default()
                    .to_owned();
                match decode_dead(message.sequence, &message.payload) {
                    Ok(letter) => letters.push((name, letter)),
                    Err(reason) => {
                        warn!(function = %name, seq = message.sequence, reason, "NATS: unreadable dead letter skipped")
                    }
                }
            }
            Ok(DeadLetters { letters, total })
        })
    }

    fn replay<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>> {
        Box::pin(async move {
            let Some((stream, letter)) = self.dead_message(function, id).await? else {
                return Ok(None);
            };
            let corrupt = |reason| StoreError::Corrupt {
                function: function.to_owned(),
                seq: id,
                reason,
            };
            let invocation = dead_invocation(&letter).map_err(corrupt)?;
            let (accepted, call_id) = head(invocation).map_err(corrupt)?;
            let publish = PublishMessage::build()
                .payload(Bytes::copy_from_slice(invocation))
                .message_id(format!("replay-{id}"));
            let ack = self
                .js
                .send_publish(format!("{ASYNC_SUBJECT_PREFIX}{function}"), publish)
                .await
                .map_err(|e| db_error("replay", e))?
                .await
                .map_err(|e| db_error("replay", e))?;
            let replays = self
                .current_record(&call_id)
                .await
                .ok()
                .flatten()
                .filter(|r| r.dead_letter == Some(id))
                .map_or(0, |r| r.replays);
            let mut record = AsyncRecord::new(
                call_id,
                function,
                ack.sequence,
                accepted,
                AsyncState::Queued,
            );
            record.replays = replays + 1;
            if let Err(e) = self.put_record(record.clone()).await {
                warn!(function, seq = ack.sequence, error = %e, "NATS: async record not written");
            }
            // Stored again: the dead letter goes. If this fails it stays listed, and replaying
            // it again within two minutes stores nothing twice.
            stream
                .delete_message(id)
                .await
                .map_err(|e| db_error("delete dead letter", e))?;
            Ok(Some(record))
        })
    }

    fn discard<'a>(&'a self, function: &'a str, id: u64) -> StoreFuture<'a, Option<AsyncRecord>> {
        Box::pin(async move {
            let Some((stream, letter)) = self.dead_message(function, id).await? else {
                return Ok(None);
            };
            let letter = decode_dead(id, &letter).map_err(|reason| StoreError::Corrupt {
                function: function.to_owned(),
                seq: id,
                reason,
            });
            stream
                .delete_message(id)
                .await
                .map_err(|e| db_error("delete dead letter", e))?;
            let letter = match letter {
                Ok(letter) => letter,
                Err(e) => {
                    warn!(function, seq = id, error = %e, "NATS: unreadable dead letter discarded");
                    return Ok(None);
                }
            };
            let inv = letter.invocation;
            let stored = self.current_record(&inv.call_id).await.ok().flatten();
            // The invocation's handle, so that the record ranks above the dead-lettered one.
            let (seq, replays) = stored
                .filter(|r| r.dead_letter == Some(id))
                .map_or((0, 0), |r| (r.seq, r.replays));
            let mut record = AsyncRecord::new(
                inv.call_id,
                function,
                seq,
                inv.accepted_unix_ms,
                AsyncState::Discarded,
            );
            (record.attempts, record.status, record.reason) =
                (letter.attempts, letter.status, letter.reason);
            record.replays = replays;
            if let Err(e) = self.put_record(record.clone()).await {
                warn!(function, seq, error = %e, "NATS: async record not written");
            }
            Ok(Some(record))
        })
    }

    fn pending(&self) -> StoreFuture<'_, BTreeMap<String, u64>> {
        Box::pin(async move {
            self.ensure_streams().await?;
            let stream = self
                .js
                .get_stream_no_info(ASYNC_STREAM)
                .await
                .map_err(|e| db_error("stream info", e))?;
            let mut subjects = stream
                .info_with_subjects(format!("{ASYNC_SUBJECT_PREFIX}>"))
                .await
                .map_err(|e| db_error("stream info", e))?;
            let mut counts = BTreeMap::new();
            while let Some(entry) = subjects.next().await {
                let (subject, count) = entry.map_err(|e| db_error("stream info", e))?;
                if let Some(function) = subject.strip_prefix(ASYNC_SUBJECT_PREFIX) {
                    if count > 0 {
                        counts.insert(function.to_owned(), count as u64);
                    }
                }
            }
            Ok(counts)
        })
    }

    fn pending_count<'a>(&'a self, function: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let mut consumer = self.consumer(function).await?;
            let info = consumer
                .info()
                .await
                .map_err(|e| db_error("consumer info", e))?;
            Ok(info.num_pending + info.num_ack_pending as u64)
        })
    }

    fn dead_letters<'a>(&'a self, function: &'a str) -> StoreFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move {
            self.ensure_streams().await?;
            let stream = self
                .js
                .get_stream_no_info(DLQ_STREAM)
                .await
                .map_err(|e| db_error("dead letters", e))?;
            let subject = format!("{DLQ_SUBJECT_PREFIX}{function}");
            let mut letters = Vec::new();
            let mut from = 1;
            while letters.len() < MAX_LISTED {
                let found = stream
                    .raw_message_builder()
                    .sequence(from)
                    .next_by_subject(subject.clone())
                    .send()
                    .await;
                let message = match found {
                    Ok(message) => message,
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        break
                    }
                    Err(e) => return Err(db_error("dead letters", e)),
                };
                from = message.sequence + 1;
                match decode_dead(message.sequence, &message.payload) {
                    Ok(letter) => letters.push(letter),
                    Err(reason) => {
                        warn!(
                            function,
                            seq = message.sequence,
                            reason,
                            "NATS: unreadable dead letter skipped"
                        )
                    }
                }
            }
            Ok(letters)
        })
    }

    fn dead_letter_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            self.ensure_streams().await?;
            let mut stream = self
                .js
                .get_stream(DLQ_STREAM)
                .await
                .map_err(|e| db_error("dead letters", e))?;
            let info = stream
                .info()
                .await
                .map_err(|e| db_error("dead letters", e))?;
            Ok(info.state.messages)
        })
    }

    fn configure(&self, function: &str, max_attempts: u32) {
        self.max_attempts
            .lock()
            .unwrap()
            .insert(function.to_owned(), max_attempts);
    }

    fn shared(&self) -> bool {
        true
    }

    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if self.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            // What this gateway holds and did not finish goes back at once, for another gateway
            // (or the next start), rather than after its lease runs out.
            // Bounded: with NATS away this would wait for it (JetStream redelivers them anyway).
            let held: Vec<_> = self.out.lock().unwrap().drain().collect();
            let give_back = async {
                for (_, held) in held {
                    held.renew.abort();
                    let _ = held.message.ack_with(AckKind::Nak(None)).await;
                }
                self.client.flush().await
            };
            match tokio::time::timeout(CLOSE_TIMEOUT, give_back).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "NATS: flush at close failed"),
                Err(_) => debug!(
                    "NATS: not reachable at close; held deliveries come back after their ack wait"
                ),
            }
        })
    }
}

/// The key-value bucket holding every gateway's [`StateStore`] values, keys `<bucket>.<key>`.
pub const STATE_BUCKET: &str = "sluicegate_state";

fn state_error(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError(format!("NATS JetStream: {what}: {e}"))
}

impl JetStreamStore {
    /// The state bucket, created when missing (file storage, one value per key).
    async fn state_bucket(&self) -> Result<&jetstream::kv::Store, StateError> {
        self.check().map_err(|e| StateError(e.to_string()))?;
        self.state
            .get_or_try_init(|| async {
                if let Ok(kv) = self.js.get_key_value(STATE_BUCKET).await {
                    return Ok(kv);
                }
                let created = self
                    .js
                    .create_key_value(jetstream::kv::Config {
                        bucket: STATE_BUCKET.into(),
                        description:
                            "sluicegate's gateway state (paused functions, tokens, idle histories)"
                                .into(),
                        history: 1,
                        storage: StorageType::File,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(kv) => Ok(kv),
                    // Another gateway may have created it meanwhile.
                    Err(e) => self
                        .js
                        .get_key_value(STATE_BUCKET)
                        .await
                        .map_err(|_| state_error("create the state bucket", e)),
                }
            })
            .await
    }
}

impl StateStore for JetStreamStore {
    fn state_get<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
    ) -> StateFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            check_key(key)?;
            let kv = self.state_bucket().await?;
            let value = kv
                .get(format!("{bucket}.{key}"))
                .await
                .map_err(|e| state_error("get", e))?;
            Ok(value.map(|v| v.to_vec()))
        })
    }

    fn state_put<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
        value: Vec<u8>,
    ) -> StateFuture<'a, ()> {
        Box::pin(async move {
            check_key(key)?;
            let kv = self.state_bucket().await?;
            kv.put(format!("{bucket}.{key}"), Bytes::from(value))
                .await
                .map_err(|e| state_error("put", e))?;
            Ok(())
        })
    }

    fn state_delete<'a>(&'a self, bucket: &'static str, key: &'a str) -> StateFuture<'a, ()> {
        Box::pin(async move {
            check_key(key)?;
            let kv = self.state_bucket().await?;
            kv.purge(format!("{bucket}.{key}"))
                .await
                .map_err(|e| state_error("delete", e))?;
            Ok(())
        })
    }

    fn state_scan(&self, bucket: &'static str) -> StateFuture<'_, BTreeMap<String, Vec<u8>>> {
        Box::pin(async move {
            let kv = self.state_bucket().await?;
            let prefix = format!("{bucket}.");
            let mut keys = kv.keys().await.map_err(|e| state_error("list", e))?;
            let mut names = Vec::new();
            while let Some(key) = keys.next().await {
                let key = key.map_err(|e| state_error("list", e))?;
                if let Some(name) = key.strip_prefix(&prefix) {
                    names.push(name.to_owned());
                }
            }
            let mut all = BTreeMap::new();
            for name in names {
                if let Some(value) = kv
                    .get(format!("{prefix}{name}"))
                    .await
                    .map_err(|e| state_error("get", e))?
                {
                    all.insert(name, value.to_vec());
                }
            }
            Ok(all)
        })
    }
}
