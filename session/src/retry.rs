//! The one retry helper: exponential backoff with jitter, a permanent-error predicate, and a
//! time after which it gives up. Every retried call of a worker goes through [`retry`], so a
//! fleet that failed together (a coordinator restart) does not retry together.
//!
//! Time is tokio's: under a paused clock (`#[tokio::test(start_paused = true)]`) the waits take
//! no real time, which is how this is tested.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How long to wait between tries: `first`, doubling up to `max`, each wait a random part of
/// the step between half of it and all of it ("equal jitter").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Reports and finishes: quick, since a report holds up training.
    pub const CALLS: Backoff = Backoff { first: Duration::from_millis(100), max: Duration::from_secs(2) };
    /// Registering with a coordinator that is not up yet.
    pub const REGISTER: Backoff = Backoff { first: Duration::from_millis(200), max: Duration::from_secs(5) };
    /// A long poll for work that failed.
    pub const POLL: Backoff = Backoff { first: Duration::from_millis(500), max: Duration::from_secs(5) };

    /// The step before retry `n` (0 for the first retry): `first × 2ⁿ`, at most `max`.
    pub fn step(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry `n`: between half the step and the whole step, at random.
    pub fn delay(&self, n: u32, jitter: &mut Jitter) -> Duration {
        let step = self.step(n);
        let half = step / 2;
        half + half.mul_f64(jitter.unit())
    }
}

/// A small random source for jitter (xorshift64*, seeded from the clock, the process and a
/// counter, so two workers started at the same instant still differ). Not for secrets.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

static SEEDS: AtomicU64 = AtomicU64::new(0);

impl Jitter {
    /// A source seeded from the time, the process id and a per-process counter.
    pub fn new() -> Jitter {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = SEEDS.fetch_add(1, Ordering::Relaxed);
        Jitter::seeded((nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// A source with a given seed (tests).
    pub fn seeded(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter::new()
    }
}

/// How [`retry`] ended without a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<E> {
    /// The last error.
    pub error: E,
    /// True when `is_permanent` said so; false when it gave up after `give_up`.
    pub permanent: bool,
}

/// Calls `op` until it succeeds, or an error is permanent (`is_permanent`), or `give_up` has
/// passed since the first try (`None`: never); waits per `backoff`, with jitter, between tries.
/// `on_error` sees every error (for logs and counts).
pub async fn retry<T, E, Fut>(
    backoff: Backoff,
    give_up: Option<Duration>,
    is_permanent: impl Fn(&E) -> bool,
    mut on_error: impl FnMut(&E),
    mut op: impl FnMut() -> Fut,
) -> Result<T, Failure<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut jitter = Jitter::new();
    let mut n = 0u32;
    loop {
        let error = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        on_error(&error);
        if is_permanent(&error) {
            return Err(Failure { error, permanent: true });
        }
        let wait = backoff.delay(n, &mut jitter);
        if give_up.is_some_and(|limit| started.elapsed() + wait > limit) {
            return Err(Failure { error, permanent: false });
        }
        tokio::time::sleep(wait).await;
        n = n.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn steps_double_up_to_the_cap_and_waits_stay_within_half_and_whole() {
        let b = Backoff { first: Duration::from_millis(100), max: Duration::from_secs(2) };
        let steps: Vec<u64> = (0..8).map(|n| b.step(n).as_millis() as u64).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(b.step(u32::MAX), Duration::from_secs(2));
        let mut j = Jitter::seeded(7);
        for n in 0..50 {
            let d = b.delay(n, &mut j);
            assert!(d >= b.step(n) / 2 && d <= b.step(n), "{n}: {d:?}");
        }
    }

    #[test]
    fn two_sources_do_not_retry_in_lockstep() {
        let b = Backoff::CALLS;
        let (mut x, mut y) = (Jitter::new(), Jitter::new());
        let a: Vec<Duration> = (0..10).map(|n| b.delay(n, &mut x)).collect();
        let c: Vec<Duration> = (0..10).map(|n| b.delay(n, &mut y)).collect();
        assert_ne!(a, c);
        // Spread over the whole range, not bunched at one end.
        let mut j = Jitter::seeded(42);
        let units: Vec<f64> = (0..1000).map(|_| j.unit()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = units.iter().sum::<f64>() / units.len() as f64;
        assert!((0.45..0.55).contains(&mean), "{mean}");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_waiting_with_backoff() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let c = calls.clone();
        let r: Result<u32, Failure<&str>> = retry(
            Backoff { first: Duration::from_secs(1), max: Duration::from_secs(8) },
            None,
            |_| false,
            |_| {},
            move || {
                let c = c.clone();
                async move {
                    let mut c = c.lock().unwrap();
                    c.push(started.elapsed());
                    if c.len() < 5 { Err("busy") } else { Ok(c.len() as u32) }
                }
            },
        )
        .await;
        assert_eq!(r, Ok(5));
        let at = calls.lock().unwrap().clone();
        // Waits of ½–1, 1–2, 2–4, 4–8 s between the five calls (paused time: exact).
        for (i, w) in at.windows(2).enumerate() {
            let gap = w[1] - w[0];
            let step = Duration::from_secs(1 << i);
            assert!(gap >= step / 2 && gap <= step, "wait {i}: {gap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_ends_at_once_and_a_deadline_gives_up() {
        let mut seen = 0;
        let r: Result<(), Failure<u32>> =
            retry(Backoff::CALLS, None, |e| *e == 403, |_| seen += 1, || async { Err(403) }).await;
        assert_eq!(r, Err(Failure { error: 403, permanent: true }));
        assert_eq!(seen, 1);

        let started = Instant::now();
        let mut tries = 0;
        let r: Result<(), Failure<u32>> =
            retry(Backoff::CALLS, Some(Duration::from_secs(10)), |_| false, |_| tries += 1, || async { Err(503) })
                .await;
        assert_eq!(r, Err(Failure { error: 503, permanent: false }));
        let took = started.elapsed();
        assert!(took <= Duration::from_secs(10) && took >= Duration::from_secs(7), "{took:?}");
        assert!(tries >= 6, "{tries}");
    }
}
