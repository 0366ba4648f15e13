//! The retry policy, for attempts and callback deliveries alike: which statuses are worth
//! another try, and how long to wait before it (doubling, honouring `Retry-After`).

use std::time::Duration;

use http::header::HeaderMap;

/// Longest `Retry-After` from a function that is honoured between attempts.
pub const MAX_HONOURED_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Statuses that are worth another attempt (OpenFaaS Pro's list).
pub(super) fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// `Retry-After` in whole seconds (the HTTP-date form is not honoured).
pub(super) fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// The wait before attempt `attempts + 1`: `async_initial_retry_wait` doubled per earlier retry,
/// at most `async_max_retry_wait`; at least the `Retry-After` asked for (up to an hour).
pub fn retry_wait(
    initial: Duration,
    max: Duration,
    attempts: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    let backoff = initial.saturating_mul(1u32 << doublings).min(max);
    match retry_after {
        Some(asked) => backoff.max(asked.min(MAX_HONOURED_RETRY_AFTER)),
        None => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_wait_doubles_up_to_the_max_and_honours_retry_after() {
        let s = Duration::from_secs;
        assert_eq!(retry_wait(s(1), s(60), 1, None), s(1));
        assert_eq!(retry_wait(s(1), s(60), 2, None), s(2));
        assert_eq!(retry_wait(s(1), s(60), 4, None), s(8));
        assert_eq!(retry_wait(s(1), s(60), 30, None), s(60));
        assert_eq!(retry_wait(s(1), s(60), 1, Some(s(7))), s(7));
        assert_eq!(retry_wait(s(1), s(60), 4, Some(s(2))), s(8));
        assert_eq!(
            retry_wait(s(1), s(60), 1, Some(s(86_400))),
            MAX_HONOURED_RETRY_AFTER
        );
    }

    #[test]
    fn retryable_statuses_are_openfaas_list() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retryable(s), "{s}");
        }
        for s in [200, 202, 301, 400, 404, 409, 422, 501] {
            assert!(!retryable(s), "{s}");
        }
    }
}
