//! IO limits of one volume (QoS): operations per second and bytes per second through the export,
//! reads and writes together, each enforced by a token bucket. Limits change live; 0 is no limit.
//!
//! A bucket holds at most a tenth of a second of its rate (a short burst, so a limit caps what a
//! benchmark measures over a second or two) and may go into debt: an IO larger than the bucket
//! is admitted and the IOs after it wait until the debt is paid. When the limits change, the
//! buckets start empty under the new rates and every waiting IO asks again, so lifting a limit
//! releases the queue at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Seconds of its rate a bucket holds when full.
const BURST_SECONDS: f64 = 0.1;

/// A volume's IO limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Reads and writes (trims and zeroes count as operations without bytes) per second; 0: none.
    pub iops: u64,
    /// Bytes read and written per second; 0: none.
    pub bytes_per_sec: u64,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        #[allow(clippy::cast_precision_loss)]
        Bucket { rate: rate as f64, tokens: 0.0 }
    }

    fn refill(&mut self, seconds: f64) {
        if self.rate > 0.0 {
            self.tokens = (self.tokens + self.rate * seconds).min((self.rate * BURST_SECONDS).max(1.0));
        }
    }

    /// Takes `cost` tokens; how long until the bucket is out of debt again.
    fn take(&mut self, cost: f64) -> f64 {
        if self.rate <= 0.0 {
            return 0.0;
        }
        self.tokens -= cost;
        if self.tokens >= 0.0 { 0.0 } else { -self.tokens / self.rate }
    }
}

#[derive(Debug)]
struct State {
    limits: Limits,
    /// Bumped by every change of the limits.
    generation: u64,
    ios: Bucket,
    bytes: Bucket,
    last: Instant,
}

/// The limiter of one volume.
#[derive(Debug)]
pub struct Qos {
    /// Whether any limit is set: an unlimited volume's IO takes no lock here.
    limited: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    changed: Notify,
    throttled: AtomicU64,
    waited_us: AtomicU64,
}

impl Qos {
    pub fn new(limits: Limits) -> Qos {
        Qos {
            limited: std::sync::atomic::AtomicBool::new(limits != Limits::default()),
            state: Mutex::new(State {
                limits,
                generation: 0,
                ios: Bucket::new(limits.iops),
                bytes: Bucket::new(limits.bytes_per_sec),
                last: Instant::now(),
            }),
            changed: Notify::new(),
            throttled: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> Limits {
        self.state.lock().limits
    }

    /// Applies new limits now; IOs waiting under the old ones ask again.
    pub fn set(&self, limits: Limits) {
        {
            let mut s = self.state.lock();
            if s.limits == limits {
                return;
            }
            s.limits = limits;
            s.generation += 1;
            s.ios = Bucket::new(limits.iops);
            s.bytes = Bucket::new(limits.bytes_per_sec);
            s.last = Instant::now();
            self.limited.store(limits != Limits::default(), Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }

    /// IOs that had to wait, and the time they waited in all.
    pub fn throttled(&self) -> (u64, Duration) {
        (
            self.throttled.load(Ordering::Relaxed),
            Duration::from_micros(self.waited_us.load(Ordering::Relaxed)),
        )
    }

    /// Reserves one operation of `bytes` and how long it must wait for it, under the limits of
    /// the returned generation.
    fn reserve(&self, bytes: u64) -> (Duration, u64) {
        let mut s = self.state.lock();
        if s.limits == Limits::default() {
            return (Duration::ZERO, s.generation);
        }
        let now = Instant::now();
        let elapsed = now.duration_since(s.last).as_secs_f64();
        s.last = now;
        s.ios.refill(elapsed);
        s.bytes.refill(elapsed);
        #[allow(clippy::cast_precision_loss)]
        let wait = s.ios.take(1.0).max(s.bytes.take(bytes as f64));
        (Duration::from_secs_f64(wait), s.generation)
    }

    /// Waits until the limits admit one operation of `bytes`.
    pub async fn admit(&self, bytes: u64) {
        if !self.limited.load(Ordering::Relaxed) {
            return;
        }
        let started = Instant::now();
        let mut waited = false;
        loop {
            // Registered before the reservation, so a change in between is not missed.
            let changed = self.changed.notified();
            let (wait, generation) = self.reserve(bytes);
            if wait.is_zero() {
                break;
            }
            waited = true;
            tokio::select! {
                () = tokio::time::sleep(wait) => break,
                () = changed => {
                    if self.state.lock().generation == generation {
                        break;
                    }
                }
            }
        }
        if waited {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.waited_us.fetch_add(us, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits `n` operations of `bytes` from `tasks` concurrent tasks; the seconds it took.
    async fn run(q: &std::sync::Arc<Qos>, tasks: u64, n: u64, bytes: u64) -> f64 {
        let t = Instant::now();
        let hs: Vec<_> = (0..tasks)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move {
                    for _ in 0..n / tasks {
                        q.admit(bytes).await;
                    }
                })
            })
            .collect();
        for h in hs {
            h.await.unwrap();
        }
        t.elapsed().as_secs_f64()
    }

    // Paused time: the limiter's arithmetic is checked without depending on this machine's load.
    #[tokio::test(start_paused = true)]
    async fn operations_are_capped_at_the_rate() {
        let q = std::sync::Arc::new(Qos::new(Limits { iops: 100, bytes_per_sec: 0 }));
        let secs = run(&q, 8, 400, 4096).await;
        // 400 operations at 100/s from an empty bucket: 4 s (the burst is 0.1 s of the rate).
        assert!((3.9..=4.1).contains(&secs), "400 IOs at 100 IOPS took {secs} s");
        assert!(q.throttled().0 > 300, "{:?}", q.throttled());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_capped_at_the_rate_and_large_ios_run_into_debt() {
        let q = std::sync::Arc::new(Qos::new(Limits { iops: 0, bytes_per_sec: 1 << 20 }));
        // 8 MiB in 1 MiB IOs (each bigger than the 0.1 MiB bucket) at 1 MiB/s.
        let secs = run(&q, 4, 8, 1 << 20).await;
        assert!((7.9..=8.1).contains(&secs), "8 MiB at 1 MiB/s took {secs} s");
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_never_waits_and_lifting_a_limit_releases_the_waiters() {
        let q = std::sync::Arc::new(Qos::new(Limits::default()));
        assert_eq!(run(&q, 4, 10_000, 1 << 20).await, 0.0);
        assert_eq!(q.throttled().0, 0);

        q.set(Limits { iops: 1, bytes_per_sec: 0 });
        // 16 waiters queue up for 16 s at 1 IOPS; lifting the limit after 1 s lets them all go.
        let waiting = {
            let q = q.clone();
            tokio::spawn(async move { run(&q, 16, 16, 0).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        q.set(Limits::default());
        let secs = waiting.await.unwrap();
        assert!(secs < 1.1, "waiters were not released when the limit was lifted: {secs} s");
        assert_eq!(q.limits(), Limits::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_limit_applies_to_the_waiters_too() {
        let q = std::sync::Arc::new(Qos::new(Limits { iops: 1000, bytes_per_sec: 0 }));
        q.set(Limits { iops: 10, bytes_per_sec: 0 });
        let secs = run(&q, 4, 40, 0).await;
        assert!((3.9..=4.1).contains(&secs), "40 IOs at 10 IOPS took {secs} s");
    }
}
