//! The gateway's own durable state beside the async invocations: small values under
//! `(bucket, key)`, e.g. which functions are paused, service-token hashes, idle-time histograms.
//!
//! It lives where the async invocations live, so that it survives what they survive and is shared
//! by whoever shares them: a table in the embedded redb file (one gateway), or a JetStream
//! key-value bucket when `async_store` is a NATS server (every gateway naming it sees the same
//! state). Every async store (`queue::AsyncStore`) is a [`StateStore`].
//!
//! Buckets are fixed names chosen by the code (`paused`, `tokens`, …); keys are function names,
//! identifiers and the like: ASCII letters, digits, `-`, `_` and `=`, at most 200 bytes (what a
//! NATS key-value key allows in one token). Values are opaque bytes; each feature encodes its own.
//! Operations are not on the request path: a feature keeps what it needs in memory and writes
//! through here when it changes.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

/// A state operation in progress.
pub type StateFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StateError>> + Send + 'a>>;

/// Why a state operation failed, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state store: {0}")]
pub struct StateError(pub String);

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 200;

/// `Ok` when `key` is one every backend stores as it is.
pub fn check_key(key: &str) -> Result<(), StateError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(StateError(format!(
            "key `{key}` must be 1 to {MAX_KEY_LEN} bytes"
        )));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=')))
    {
        return Err(StateError(format!(
            "key `{key}` has `{c}`: only ASCII letters, digits, `-`, `_` and `=` are allowed"
        )));
    }
    Ok(())
}

/// Small durable values under `(bucket, key)`. Each operation resolves once it is durable (a
/// `put` or `delete` that resolved `Ok` survives a crash of the gateway).
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// The value under `key` in `bucket`, if any.
    fn state_get<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
    ) -> StateFuture<'a, Option<Vec<u8>>>;

    /// Stores `value` under `key` in `bucket`, replacing what was there.
    fn state_put<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
        value: Vec<u8>,
    ) -> StateFuture<'a, ()>;

    /// Removes `key` from `bucket` (nothing happens when it is absent).
    fn state_delete<'a>(&'a self, bucket: &'static str, key: &'a str) -> StateFuture<'a, ()>;

    /// Every key of `bucket` with its value, in key order.
    fn state_scan(&self, bucket: &'static str) -> StateFuture<'_, BTreeMap<String, Vec<u8>>>;
}

/// State in memory only: for tests and for gateways embedded without a store.
#[derive(Debug, Default)]
pub struct MemoryState {
    values: Mutex<BTreeMap<(&'static str, String), Vec<u8>>>,
}

impl StateStore for MemoryState {
    fn state_get<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
    ) -> StateFuture<'a, Option<Vec<u8>>> {
        let found = check_key(key).map(|()| {
            self.values
                .lock()
                .unwrap()
                .get(&(bucket, key.to_owned()))
                .cloned()
        });
        Box::pin(std::future::ready(found))
    }

    fn state_put<'a>(
        &'a self,
        bucket: &'static str,
        key: &'a str,
        value: Vec<u8>,
    ) -> StateFuture<'a, ()> {
        let done = check_key(key).map(|()| {
            self.values
                .lock()
                .unwrap()
                .insert((bucket, key.to_owned()), value);
        });
        Box::pin(std::future::ready(done))
    }

    fn state_delete<'a>(&'a self, bucket: &'static str, key: &'a str) -> StateFuture<'a, ()> {
        let done = check_key(key).map(|()| {
            self.values
                .lock()
                .unwrap()
                .remove(&(bucket, key.to_owned()));
        });
        Box::pin(std::future::ready(done))
    }

    fn state_scan(&self, bucket: &'static str) -> StateFuture<'_, BTreeMap<String, Vec<u8>>> {
        let all = self
            .values
            .lock()
            .unwrap()
            .iter()
            .filter(|((b, _), _)| *b == bucket)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect();
        Box::pin(std::future::ready(Ok(all)))
    }
}

/// Unix milliseconds as an RFC 3339 UTC time with milliseconds (`2025-01-31T12:00:00.250Z`).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Milliseconds since the Unix epoch, now (for times kept in the store, which outlive the
/// process: `tokio::time` has no epoch).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("echo").is_ok());
        assert!(check_key("fn-1_a=").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a.b").is_err());
        assert!(check_key("a b").is_err());
        assert!(check_key(&"x".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[tokio::test]
    async fn memory_state_round_trips_per_bucket() {
        let state = MemoryState::default();
        state.state_put("a", "k1", b"1".to_vec()).await.unwrap();
        state.state_put("a", "k2", b"2".to_vec()).await.unwrap();
        state.state_put("b", "k1", b"x".to_vec()).await.unwrap();
        assert_eq!(
            state.state_get("a", "k1").await.unwrap(),
            Some(b"1".to_vec())
        );
        assert_eq!(state.state_get("a", "k3").await.unwrap(), None);
        let a = state.state_scan("a").await.unwrap();
        assert_eq!(a.keys().collect::<Vec<_>>(), ["k1", "k2"]);
        state.state_delete("a", "k1").await.unwrap();
        state.state_delete("a", "absent").await.unwrap();
        assert_eq!(state.state_get("a", "k1").await.unwrap(), None);
        assert_eq!(
            state.state_get("b", "k1").await.unwrap(),
            Some(b"x".to_vec())
        );
        assert!(state.state_put("a", "bad key", vec![]).await.is_err());
    }
}
