//! Sliding-window request counter: a ring of atomic buckets, lock-free on the request path.
//!
//! The window is cut into [`BUCKETS`] buckets. Each bucket packs the epoch it belongs to (upper 32
//! bits) and its count (lower 32 bits) into one `AtomicU64`, so a stale bucket is recognised and
//! reset by whichever request first lands in it after its epoch has passed. Reading sums the buckets
//! whose epochs fall inside the span asked for; nothing is ever cleared by a background task. The
//! buckets are allocated at the first event, so a function never invoked costs no ring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window. The burst window (a tenth of the window) is `BUCKETS / 10` buckets.
pub const BUCKETS: usize = 60;

const COUNT_MASK: u64 = 0xffff_ffff;

/// The window's ring of buckets, addressed by time elapsed since an origin: no clock.
///
/// [`Window`] wraps it with an origin `Instant` for the request path; the offline simulator drives
/// it with virtual time, so both count exactly alike.
#[derive(Debug)]
pub struct Ring {
    buckets: OnceLock<Box<[AtomicU64]>>,
    bucket_nanos: u64,
}

impl Ring {
    /// A ring covering `length`, split into [`BUCKETS`] buckets (at least 1 ms each).
    pub fn new(length: Duration) -> Ring {
        let bucket_nanos = (length.as_nanos() as u64 / BUCKETS as u64).max(1_000_000);
        Ring {
            buckets: OnceLock::new(),
            bucket_nanos,
        }
    }

    /// Length of one bucket.
    pub fn bucket(&self) -> Duration {
        Duration::from_nanos(self.bucket_nanos)
    }

    /// Length of the whole window.
    pub fn length(&self) -> Duration {
        self.bucket() * BUCKETS as u32
    }

    fn epoch(&self, elapsed: Duration) -> u64 {
        (elapsed.as_nanos() as u64 / self.bucket_nanos) & COUNT_MASK
    }

    /// Counts one event `elapsed` after the origin.
    pub fn record(&self, elapsed: Duration) {
        let epoch = self.epoch(elapsed);
        let buckets = self
            .buckets
            .get_or_init(|| (0..BUCKETS).map(|_| AtomicU64::new(0)).collect());
        let slot = &buckets[(epoch % BUCKETS as u64) as usize];
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            if current >> 32 == epoch {
                slot.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match slot.compare_exchange_weak(
                current,
                (epoch << 32) | 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// Events in the last `buckets` buckets up to and including the one holding `elapsed`
    /// (at most [`BUCKETS`]).
    pub fn sum_last(&self, elapsed: Duration, buckets: usize) -> u64 {
        let Some(ring) = self.buckets.get() else {
            return 0;
        };
        let epoch = self.epoch(elapsed);
        let span = buckets.clamp(1, BUCKETS) as u64;
        let mut total = 0;
        for back in 0..span {
            let Some(e) = epoch.checked_sub(back) else {
                break;
            };
            let v = ring[(e % BUCKETS as u64) as usize].load(Ordering::Relaxed);
            if v >> 32 == e {
                total += v & COUNT_MASK;
            }
        }
        total
    }

    /// Events in the whole window ending at `elapsed`.
    pub fn sum(&self, elapsed: Duration) -> u64 {
        self.sum_last(elapsed, BUCKETS)
    }

    /// Events in the burst window (a tenth of the window) ending at `elapsed`.
    pub fn sum_burst(&self, elapsed: Duration) -> u64 {
        self.sum_last(elapsed, BUCKETS / 10)
    }
}

/// Counts events in a sliding window of fixed length.
#[derive(Debug)]
pub struct Window {
    ring: Ring,
    origin: Instant,
}

impl Window {
    /// A window of `length`, split into [`BUCKETS`] buckets (at least 1 ms each), starting at `origin`.
    pub fn new(length: Duration, origin: Instant) -> Window {
        Window {
            ring: Ring::new(length),
            origin,
        }
    }

    /// Length of one bucket.
    pub fn bucket(&self) -> Duration {
        self.ring.bucket()
    }

    /// Length of the whole window.
    pub fn length(&self) -> Duration {
        self.ring.length()
    }

    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    /// Counts one event at `now`.
    pub fn record(&self, now: Instant) {
        self.ring.record(self.elapsed(now));
    }

    /// Events in the last `buckets` buckets up to and including `now`'s (at most [`BUCKETS`]).
    pub fn sum_last(&self, now: Instant, buckets: usize) -> u64 {
        self.ring.sum_last(self.elapsed(now), buckets)
    }

    /// Events in the whole window ending at `now`.
    pub fn sum(&self, now: Instant) -> u64 {
        self.ring.sum(self.elapsed(now))
    }

    /// Events in the burst window (a tenth of the window) ending at `now`.
    pub fn sum_burst(&self, now: Instant) -> u64 {
        self.ring.sum_burst(self.elapsed(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_slide_out_of_the_window() {
        let w = Window::new(Duration::from_secs(6), Instant::now());
        assert_eq!(w.bucket(), Duration::from_millis(100));
        for _ in 0..10 {
            w.record(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        for _ in 0..5 {
            w.record(Instant::now());
        }
        assert_eq!(w.sum(Instant::now()), 15);
        assert_eq!(w.sum_burst(Instant::now()), 5, "burst window is 600ms");
        tokio::time::advance(Duration::from_millis(3001)).await;
        assert_eq!(w.sum(Instant::now()), 5, "the first ten left the window");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(w.sum(Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_reused_after_a_full_turn_starts_from_zero() {
        let w = Window::new(Duration::from_secs(60), Instant::now());
        w.record(Instant::now());
        w.record(Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
        w.record(Instant::now());
        assert_eq!(w.sum(Instant::now()), 1);
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let w = std::sync::Arc::new(Window::new(Duration::from_secs(3600), Instant::now()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        w.record(w.origin);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(w.sum(w.origin), 40_000);
    }
}
