//! When requests start, for both load models.
//!
//! Open loop (as wrk2 does): request `i` of the whole run is meant to start at
//! `i / rate` seconds; client `c` of `C` sends requests `c, c + C, c + 2C, …`, one
//! at a time. A request is never sent before its intended time, and its latency
//! counts from that time, not from when it was actually sent: when the server
//! stalls, the requests that queue up behind the stall are charged for the wait
//! (coordinated omission corrected). Intended times are computed from the index,
//! never accumulated, so they do not drift.
//!
//! Closed loop: each client sends its next request when the last returns; latency
//! counts from the actual send.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The offset from the run's start at which request `index` (over all clients) is
/// meant to start, at `rate` requests per second.
pub fn intended_offset(index: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(index as f64 / rate)
}

/// One client's share of the open-loop schedule.
#[derive(Debug, Clone)]
pub struct ClientSchedule {
    client: u64,
    clients: u64,
    rate: f64,
    next: u64,
}

impl ClientSchedule {
    /// Client `client` (0-based) of `clients`, at `rate` requests per second in all.
    pub fn new(client: usize, clients: usize, rate: f64) -> ClientSchedule {
        ClientSchedule {
            client: client as u64,
            clients: clients.max(1) as u64,
            rate,
            next: 0,
        }
    }
}

impl Iterator for ClientSchedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let index = self.client + self.next * self.clients;
        self.next += 1;
        Some(intended_offset(index, self.rate))
    }
}

/// What one request of a driven client looked like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// When it was meant to start (open loop) or started (closed loop), from the
    /// run's start.
    pub start: Duration,
    /// From `start` to its completion.
    pub latency: Duration,
    /// When it completed, from the run's start.
    pub done: Duration,
}

/// Drives one open-loop client: for each intended start before `end` (offsets from
/// `run_start`), waits until then (or sends at once when late), runs `op` on the
/// client's state, and hands `on_done` its timing and output. Returns the state
/// when the schedule passes `end` or `stop` fires.
pub async fn drive_open<S, T, F, Fut>(
    run_start: Instant,
    schedule: ClientSchedule,
    end: Duration,
    stop: &CancellationToken,
    mut state: S,
    mut op: F,
    mut on_done: impl FnMut(Timing, T),
) -> S
where
    F: FnMut(S) -> Fut,
    Fut: Future<Output = (S, T)>,
{
    for offset in schedule {
        if offset >= end || stop.is_cancelled() {
            break;
        }
        let intended = run_start + offset;
        tokio::select! {
            _ = tokio::time::sleep_until(intended) => {}
            _ = stop.cancelled() => break,
        }
        let (s, out) = op(state).await;
        state = s;
        let now = Instant::now();
        on_done(
            Timing {
                start: offset,
                latency: now.saturating_duration_since(intended),
                done: now.saturating_duration_since(run_start),
            },
            out,
        );
    }
    state
}

/// Drives one closed-loop client until `end` (from `run_start`) or `stop`.
pub async fn drive_closed<S, T, F, Fut>(
    run_start: Instant,
    end: Option<Duration>,
    stop: &CancellationToken,
    mut state: S,
    mut op: F,
    mut on_done: impl FnMut(Timing, T),
) -> S
where
    F: FnMut(S) -> Fut,
    Fut: Future<Output = (S, T)>,
{
    loop {
        let start = Instant::now();
        let offset = start.saturating_duration_since(run_start);
        if end.is_some_and(|e| offset >= e) || stop.is_cancelled() {
            break;
        }
        let (s, out) = op(state).await;
        state = s;
        let now = Instant::now();
        on_done(
            Timing {
                start: offset,
                latency: now.saturating_duration_since(start),
                done: now.saturating_duration_since(run_start),
            },
            out,
        );
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn intended_starts_are_evenly_spaced_and_interleaved() {
        // 4 clients at 100/s: each client every 40 ms, offset by 10 ms per client.
        let c0: Vec<_> = ClientSchedule::new(0, 4, 100.0).take(3).collect();
        let c3: Vec<_> = ClientSchedule::new(3, 4, 100.0).take(3).collect();
        assert_eq!(c0, [ms(0), ms(40), ms(80)]);
        assert_eq!(c3, [ms(30), ms(70), ms(110)]);
        // Together the clients cover the global schedule once: i / rate for every i.
        let mut all: Vec<Duration> = (0..4)
            .flat_map(|c| ClientSchedule::new(c, 4, 100.0).take(25))
            .collect();
        all.sort();
        let expected: Vec<Duration> = (0..100).map(|i| intended_offset(i, 100.0)).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn intended_starts_do_not_drift() {
        // A million requests at 3/s: computed, not accumulated, so the millionth
        // start is exactly where it belongs (to the microsecond).
        let mut s = ClientSchedule::new(0, 1, 3.0);
        let last = s.nth(999_999).unwrap();
        let exact = 999_999.0 / 3.0;
        assert!((last.as_secs_f64() - exact).abs() < 1e-6, "{last:?}");
    }

    // The tests below run on the real clock: they assert what the schedule
    // guarantees however slow the machine is (intended starts are exact, a request
    // is never sent before its intended start, latency counts from it), never how
    // fast anything went.

    #[tokio::test]
    async fn open_loop_charges_latency_from_the_intended_start() {
        // 100/s (every 10 ms); the server takes 25 ms per request. A closed loop
        // would report 25 ms every time; the open loop charges the queueing the
        // schedule implies: request n waits for the n before it, so its latency is
        // at least 25 + 15·n ms.
        let start = Instant::now();
        let stop = CancellationToken::new();
        let mut seen = Vec::new();
        let mut sent_at = Vec::new();
        drive_open(
            start,
            ClientSchedule::new(0, 1, 100.0),
            ms(50),
            &stop,
            (),
            |()| {
                sent_at.push(Instant::now() - start);
                async {
                    tokio::time::sleep(ms(25)).await;
                    ((), ())
                }
            },
            |t, ()| seen.push(t),
        )
        .await;
        let starts: Vec<_> = seen.iter().map(|t| t.start).collect();
        assert_eq!(starts, [ms(0), ms(10), ms(20), ms(30), ms(40)]);
        for (n, t) in seen.iter().enumerate() {
            let floor = ms(25 + 15 * n as u64);
            assert!(
                t.latency >= floor,
                "request {n}: {:?} < {floor:?}",
                t.latency
            );
            // Latency is measured from the intended start, to the completion.
            assert_eq!(t.start + t.latency, t.done);
            assert!(sent_at[n] >= t.start, "request {n} sent early");
        }
    }

    #[tokio::test]
    async fn open_loop_never_sends_early() {
        let start = Instant::now();
        let stop = CancellationToken::new();
        let mut sent_at = Vec::new();
        let mut starts = Vec::new();
        drive_open(
            start,
            ClientSchedule::new(1, 2, 40.0),
            ms(150),
            &stop,
            (),
            |()| {
                sent_at.push(Instant::now() - start);
                async { ((), ()) }
            },
            |t, ()| starts.push(t.start),
        )
        .await;
        // Client 1 of 2 at 40/s: requests 1, 3, 5 → 25, 75, 125 ms.
        assert_eq!(starts, [ms(25), ms(75), ms(125)]);
        for (sent, intended) in sent_at.iter().zip(&starts) {
            assert!(sent >= intended, "sent at {sent:?}, meant for {intended:?}");
        }
    }

    #[tokio::test]
    async fn open_loop_stops_when_told() {
        let stop = CancellationToken::new();
        stop.cancel();
        let mut n = 0;
        drive_open(
            Instant::now(),
            ClientSchedule::new(0, 1, 1000.0),
            Duration::from_secs(3600),
            &stop,
            (),
            |()| async { ((), ()) },
            |_, ()| n += 1,
        )
        .await;
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn closed_loop_threads_its_state_and_stops_at_the_end() {
        let start = Instant::now();
        let stop = CancellationToken::new();
        let mut n = 0;
        let calls = drive_closed(
            start,
            Some(ms(100)),
            &stop,
            0u32,
            |calls| async move {
                tokio::time::sleep(ms(10)).await;
                (calls + 1, ())
            },
            |t, ()| {
                assert!(t.latency >= ms(10));
                n += 1
            },
        )
        .await;
        // Each request takes at least 10 ms and none starts after 100 ms.
        assert!((1..=10).contains(&calls), "{calls}");
        assert_eq!(calls, n);
    }
}
