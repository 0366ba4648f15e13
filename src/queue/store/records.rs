//! The record of one async invocation by its call id: what state it is in, the attempts made,
//! its last status and why it failed; its byte form; and the rule that orders updates.

use std::time::Duration;

use super::record::{put_bytes, Reader};
use super::DeadLetter;

/// Version byte at the start of every encoded record.
const VERSION: u8 = 1;

/// Dead letters listed when the request names no `limit`.
pub const DEFAULT_LISTED_DEAD_LETTERS: usize = 100;

/// Where an invocation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncState {
    /// Stored, waiting for its first attempt, or for a retry (then `attempts` > 0).
    Queued,
    /// An attempt is under way (admission, the call, the callback).
    Running,
    /// Final: the function answered below 400.
    Succeeded,
    /// Final: the function answered a status that is not retried (or the gateway could not
    /// forward it in a way a retry would fix).
    Failed,
    /// Out of attempts: kept as a dead letter until replayed or discarded.
    DeadLettered,
    /// Its dead letter was discarded.
    Discarded,
}

impl AsyncState {
    /// The name in JSON and logs.
    pub fn name(self) -> &'static str {
        match self {
            AsyncState::Queued => "queued",
            AsyncState::Running => "running",
            AsyncState::Succeeded => "succeeded",
            AsyncState::Failed => "failed",
            AsyncState::DeadLettered => "dead_lettered",
            AsyncState::Discarded => "discarded",
        }
    }

    /// Whether the invocation is over and nothing is kept of it but this record (which then
    /// expires after the retention).
    pub fn finished(self) -> bool {
        matches!(
            self,
            AsyncState::Succeeded | AsyncState::Failed | AsyncState::Discarded
        )
    }

    fn code(self) -> u8 {
        match self {
            AsyncState::Queued => 0,
            AsyncState::Running => 1,
            AsyncState::Succeeded => 2,
            AsyncState::Failed => 3,
            AsyncState::DeadLettered => 4,
            AsyncState::Discarded => 5,
        }
    }

    fn from_code(code: u8) -> Result<AsyncState, &'static str> {
        Ok(match code {
            0 => AsyncState::Queued,
            1 => AsyncState::Running,
            2 => AsyncState::Succeeded,
            3 => AsyncState::Failed,
            4 => AsyncState::DeadLettered,
            5 => AsyncState::Discarded,
            _ => return Err("unknown record state"),
        })
    }

    /// A final settlement's state: `status` below 400 (and not 0) is a success.
    pub fn done(status: u16) -> AsyncState {
        if (1..400).contains(&status) {
            AsyncState::Succeeded
        } else {
            AsyncState::Failed
        }
    }
}

/// The record of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsyncRecord {
    /// Its `X-Call-Id`.
    pub call_id: String,
    /// Its function.
    pub function: String,
    /// Its handle in the store (a replay stores it again under a new one).
    pub seq: u64,
    /// Where it is.
    pub state: AsyncState,
    /// Attempts made (while `running`: the number of the attempt under way).
    pub attempts: u32,
    /// The last attempt's status (the function's, or the gateway's); 0 before the first.
    pub status: u16,
    /// Why it failed, in one line; empty otherwise.
    pub reason: String,
    /// When it was accepted, Unix milliseconds.
    pub accepted_unix_ms: u64,
    /// When this record last changed, Unix milliseconds.
    pub updated_unix_ms: u64,
    /// While dead-lettered: the dead letter's id (what replay and discard name).
    pub dead_letter: Option<u64>,
    /// Times it was replayed from the dead letters.
    pub replays: u32,
}

impl AsyncRecord {
    /// A record in `state` for the invocation `seq` of `function`, changed now.
    pub fn new(
        call_id: String,
        function: &str,
        seq: u64,
        accepted_unix_ms: u64,
        state: AsyncState,
    ) -> AsyncRecord {
        AsyncRecord {
            call_id,
            function: function.to_owned(),
            seq,
            state,
            attempts: 0,
            status: 0,
            reason: String::new(),
            accepted_unix_ms,
            updated_unix_ms: super::unix_ms(),
            dead_letter: None,
            replays: 0,
        }
    }

    /// Where the record is in its invocation's life: queued before attempt n+1 is `2n`, attempt
    /// n running is `2n - 1`, settled after attempt n is `2n`, discarded is last.
    pub fn step(&self) -> u64 {
        let n = u64::from(self.attempts);
        match self.state {
            AsyncState::Running => (2 * n).saturating_sub(1),
            AsyncState::Discarded => u64::MAX,
            _ => 2 * n,
        }
    }

    /// What to store when `update` arrives and `stored` is there: `update`, unless `stored`
    /// ranks above it (a later invocation with the same call id, or a later step of the same
    /// one); then nothing (`None`), but for a higher replay count of the same invocation, which
    /// is kept either way (a replayed invocation may run before its replay is recorded).
    pub fn merge(stored: Option<&AsyncRecord>, mut update: AsyncRecord) -> Option<AsyncRecord> {
        let Some(stored) = stored else {
            return Some(update);
        };
        if (stored.seq, stored.step()) > (update.seq, update.step()) {
            return (stored.seq == update.seq && update.replays > stored.replays).then(|| {
                AsyncRecord {
                    replays: update.replays,
                    ..stored.clone()
                }
            });
        }
        update.replays = update.replays.max(stored.replays);
        Some(update)
    }

    /// When the record expires, Unix milliseconds: `retention` after it changed, for a finished
    /// invocation; never (`None`) while the invocation is pending or dead-lettered.
    pub fn expires_unix_ms(&self, retention: Duration) -> Option<u64> {
        self.state.finished().then(|| {
            self.updated_unix_ms
                .saturating_add(retention.as_millis() as u64)
        })
    }

    /// Whether the record has expired at `now` (Unix milliseconds).
    pub fn expired(&self, retention: Duration, now: u64) -> bool {
        self.expires_unix_ms(retention).is_some_and(|at| at <= now)
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.call_id.len() + self.reason.len());
        out.push(VERSION);
        put_bytes(&mut out, self.call_id.as_bytes());
        put_bytes(&mut out, self.function.as_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.push(self.state.code());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        put_bytes(&mut out, self.reason.as_bytes());
        out.extend_from_slice(&self.accepted_unix_ms.to_le_bytes());
        out.extend_from_slice(&self.updated_unix_ms.to_le_bytes());
        match self.dead_letter {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.to_le_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.replays.to_le_bytes());
        out
    }

    pub(super) fn decode(data: &[u8]) -> Result<AsyncRecord, &'static str> {
        let mut r = Reader(data);
        if r.u8()? != VERSION {
            return Err("unknown async record version");
        }
        let record = AsyncRecord {
            call_id: r.string()?,
            function: r.string()?,
            seq: r.u64()?,
            state: AsyncState::from_code(r.u8()?)?,
            attempts: r.u32()?,
            status: r.u16()?,
            reason: r.string()?,
            accepted_unix_ms: r.u64()?,
            updated_unix_ms: r.u64()?,
            dead_letter: match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                _ => return Err("invalid dead-letter flag"),
            },
            replays: r.u32()?,
        };
        if !r.0.is_empty() {
            return Err("trailing bytes");
        }
        Ok(record)
    }
}

/// A page of dead letters, oldest first.
#[derive(Clone, Debug, Default)]
pub struct DeadLetters {
    /// Each with its function's name.
    pub letters: Vec<(String, DeadLetter)>,
    /// Dead letters there are in all (of the function asked for, or of every function).
    pub total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, state: AsyncState, attempts: u32) -> AsyncRecord {
        AsyncRecord {
            attempts,
            ..AsyncRecord::new("c".into(), "f", seq, 1, state)
        }
    }

    #[test]
    fn records_round_trip() {
        let mut r = record(7, AsyncState::DeadLettered, 3);
        r.reason = "function answered 503".into();
        r.dead_letter = Some(9);
        r.replays = 2;
        assert_eq!(AsyncRecord::decode(&r.encode()).unwrap(), r);
        assert!(AsyncRecord::decode(&[9]).is_err());
    }

    #[test]
    fn an_update_that_ranks_below_the_stored_record_is_dropped() {
        use AsyncState::*;
        let queued = record(1, Queued, 0);
        let running = record(1, Running, 1);
        let retrying = record(1, Queued, 1);
        let done = record(1, Succeeded, 1);
        // In order, each step replaces the last.
        assert!(AsyncRecord::merge(Some(&queued), running.clone()).is_some());
        assert!(AsyncRecord::merge(Some(&running), retrying.clone()).is_some());
        assert!(AsyncRecord::merge(Some(&running), done.clone()).is_some());
        // Late: a `running` after the attempt settled, a `queued` after the first attempt ran.
        assert!(AsyncRecord::merge(Some(&done), running.clone()).is_none());
        assert!(AsyncRecord::merge(Some(&running), queued.clone()).is_none());
        // A later invocation (a replay) wins over anything of the earlier one, keeps the count.
        let mut discarded = record(1, Discarded, 5);
        discarded.replays = 1;
        let replayed = AsyncRecord::merge(Some(&discarded), record(2, Queued, 0)).unwrap();
        assert_eq!(replayed.replays, 1);
        assert!(AsyncRecord::merge(Some(&replayed), record(1, Running, 9)).is_none());
        // A replay recorded after its invocation finished: the count is kept, the state too.
        let mut late = record(2, Queued, 0);
        late.replays = 2;
        let kept = AsyncRecord::merge(Some(&record(2, Succeeded, 1)), late).unwrap();
        assert_eq!((kept.state, kept.replays), (Succeeded, 2));
    }

    #[test]
    fn only_finished_records_expire() {
        let retention = Duration::from_secs(10);
        let mut r = record(1, AsyncState::Succeeded, 1);
        r.updated_unix_ms = 1_000;
        assert_eq!(r.expires_unix_ms(retention), Some(11_000));
        assert!(!r.expired(retention, 10_999));
        assert!(r.expired(retention, 11_000));
        for state in [
            AsyncState::Queued,
            AsyncState::Running,
            AsyncState::DeadLettered,
        ] {
            r.state = state;
            assert!(!r.expired(retention, u64::MAX));
        }
    }
}
