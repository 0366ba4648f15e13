//! The records of async invocations in JetStream, shared by every gateway: one stream,
//! `SLUICEGATE_RECORDS`, with one message per call id on `sluicegate.record.<key>` (at most one
//! kept per subject, so the stream is a map), read with a direct get of the subject's last
//! message.
//!
//! * **Updates** are compare-and-set: read the subject's last message, [`AsyncRecord::merge`]
//!   the update over it, publish with `Nats-Expected-Last-Subject-Sequence` = what was read;
//!   a conflict (another gateway wrote meanwhile) reads again. So an update that arrives late
//!   never overwrites a later state.
//! * **Expiry** is JetStream's per-message TTL (`Nats-TTL`, nats-server 2.11 or newer): a record
//!   of a finished invocation is written with the retention as its TTL, the others with none.
//!   A record read after its expiry is not returned either way, so an older server that keeps
//!   the message only costs its storage.
//! * **Keys**: a call id made of `[A-Za-z0-9_-]` (at most 64 characters) is its own key; any
//!   other is `h.<hex of its bytes>`, or for a longer one `f.<FNV-1a hash>.<length>`; the record
//!   holds the call id itself, and one read under the key of another id is not returned.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind, RetentionPolicy, StorageType};
use bytes::Bytes;
use tracing::debug;

use super::{db_error, JetStreamStore};
use crate::queue::store::{unix_ms, AsyncRecord, StoreError};

/// The stream of records.
pub const RECORDS_STREAM: &str = "SLUICEGATE_RECORDS";
/// Subject prefix of records: `sluicegate.record.<key>`.
pub const RECORDS_SUBJECT_PREFIX: &str = "sluicegate.record.";
/// Compare-and-set attempts before an update is given up (and logged).
const MAX_CAS: usize = 8;

/// The stream's configuration.
pub(super) fn stream_config() -> stream::Config {
    stream::Config {
        name: RECORDS_STREAM.into(),
        subjects: vec![format!("{RECORDS_SUBJECT_PREFIX}>")],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: 1,
        max_messages_per_subject: 1,
        allow_direct: true,
        allow_message_ttl: true,
        ..Default::default()
    }
}

/// The subject of `call_id`'s record.
pub(super) fn subject(call_id: &str) -> String {
    let plain = !call_id.is_empty()
        && call_id.len() <= 64
        && call_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        return format!("{RECORDS_SUBJECT_PREFIX}{call_id}");
    }
    if !call_id.is_empty() && call_id.len() <= 64 {
        let hex: String = call_id.bytes().map(|b| format!("{b:02x}")).collect();
        return format!("{RECORDS_SUBJECT_PREFIX}h.{hex}");
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in call_id.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{RECORDS_SUBJECT_PREFIX}f.{hash:016x}.{}", call_id.len())
}

/// The retention in whole seconds, rounded up (JetStream's TTLs are whole seconds).
fn ttl(retention: Duration) -> Duration {
    Duration::from_secs(retention.as_secs() + u64::from(retention.subsec_nanos() > 0))
        .max(Duration::from_secs(1))
}

impl JetStreamStore {
    /// The record stored for `call_id` (expired or not) and the sequence of its message; `None`
    /// and 0 when there is none.
    async fn stored_record(&self, call_id: &str) -> Result<(Option<AsyncRecord>, u64), StoreError> {
        let stream = self
            .js
            .get_stream_no_info(RECORDS_STREAM)
            .await
            .map_err(|e| db_error("records", e))?;
        match stream
            .get_last_raw_message_by_subject(&subject(call_id))
            .await
        {
            Ok(message) => {
                let record = AsyncRecord::decode(&message.payload)
                    .ok()
                    .filter(|r| r.call_id == call_id);
                Ok((record, message.sequence))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((None, 0)),
            Err(e) => Err(db_error("read record", e)),
        }
    }

    /// The record of `call_id`, unless it expired.
    pub(super) async fn read_record(
        &self,
        call_id: &str,
    ) -> Result<Option<AsyncRecord>, StoreError> {
        self.ensure_streams().await?;
        let (record, _) = self.stored_record(call_id).await?;
        Ok(record.filter(|r| !r.expired(self.retention, unix_ms())))
    }

    /// The record stored for `call_id` now (for a replay's or a discard's count and handle).
    pub(super) async fn current_record(
        &self,
        call_id: &str,
    ) -> Result<Option<AsyncRecord>, StoreError> {
        Ok(self.stored_record(call_id).await?.0)
    }

    /// Writes `update` unless the stored record ranks above it (see the module doc).
    pub(super) async fn put_record(&self, update: AsyncRecord) -> Result<(), StoreError> {
        self.write_record(update, false).await
    }

    /// The record of an invocation just accepted: written as the call id's first record
    /// without reading (one round trip, the common case), merged like any update when the id
    /// already has one.
    pub(super) async fn create_record(&self, record: AsyncRecord) -> Result<(), StoreError> {
        self.write_record(record, true).await
    }

    async fn write_record(&self, update: AsyncRecord, fresh: bool) -> Result<(), StoreError> {
        self.check()?;
        for round in 0..MAX_CAS {
            let (stored, last) = if fresh && round == 0 {
                (None, 0)
            } else {
                self.stored_record(&update.call_id).await?
            };
            let Some(record) = AsyncRecord::merge(stored.as_ref(), update.clone()) else {
                return Ok(());
            };
            let mut publish = PublishMessage::build()
                .payload(Bytes::from(record.encode()))
                .expected_last_subject_sequence(last);
            if record.state.finished() {
                publish = publish.ttl(ttl(self.retention));
            }
            let sent = self
                .js
                .send_publish(subject(&record.call_id), publish)
                .await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    debug!(call_id = %record.call_id, "NATS: record changed meanwhile; merging again");
                }
                Err(e) => return Err(db_error("write record", e)),
            }
        }
        Err(StoreError::Database(format!(
            "NATS JetStream: record of {} kept changing; update given up",
            update.call_id
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_id_gets_a_valid_subject_of_its_own() {
        assert_eq!(subject("a-1_B"), "sluicegate.record.a-1_B");
        assert_eq!(subject("a.b"), "sluicegate.record.h.612e62");
        assert_eq!(subject("x y"), "sluicegate.record.h.782079");
        let long = "z".repeat(100);
        assert!(subject(&long).starts_with("sluicegate.record.f."));
        assert!(subject(&long).ends_with(".100"));
        assert_ne!(subject(&long), subject(&"z".repeat(101)));
        assert_eq!(ttl(Duration::from_millis(1500)), Duration::from_secs(2));
        assert_eq!(ttl(Duration::from_secs(86400)), Duration::from_secs(86400));
    }
}
