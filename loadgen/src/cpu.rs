//! CPU time of processes over a run's measured window, read from
//! `/proc/<pid>/stat` (user + system time of every thread), so a benchmark can
//! report CPU per operation for each process of the system under test and for the
//! client itself: on a machine whose cores the servers and the client share, CPU
//! spent per operation is throughput.
//!
//! A [`Sampler`] reads every process every [`SAMPLE_EVERY`] from when it starts;
//! [`Sampler::finish`] charges to each group the CPU between the first sample at
//! or after the window's start and one read at its end.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the sampler reads: the window's start is known to within this.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Linux reports process times in USER_HZ ticks, fixed at 100 in its user ABI.
const TICKS_PER_SEC: u64 = 100;

/// A named set of processes whose CPU is added up (a cell's three members).
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub pids: Vec<u32>,
}

impl Group {
    /// Parses `NAME=PID[+PID…]`; the client itself is `NAME=self`.
    pub fn parse(s: &str) -> Result<Group, String> {
        let (name, pids) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected NAME=PID[+PID...] or NAME=self"))?;
        if name.is_empty() {
            return Err(format!("`{s}`: the group has no name"));
        }
        let pids = pids
            .split('+')
            .map(|p| match p {
                "self" => Ok(std::process::id()),
                p => p
                    .parse::<u32>()
                    .map_err(|_| format!("`{s}`: `{p}` is not a process ID")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Group {
            name: name.to_string(),
            pids,
        })
    }
}

/// CPU time, in milliseconds, `pid` has used so far; `None` when it is gone.
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields are
    // counted from the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 1000 / TICKS_PER_SEC)
}

fn group_ms(g: &Group) -> Option<u64> {
    g.pids.iter().map(|p| cpu_ms(*p)).sum()
}

/// CPU one group used in a window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Used {
    pub name: String,
    pub cpu_ms: u64,
    /// The window it was measured over (seconds).
    pub seconds: f64,
}

impl Used {
    /// Milliseconds of CPU per 1,000 operations at `ops_per_sec` over the window.
    pub fn per_1k_ops(&self, ops_per_sec: f64) -> f64 {
        let ops = ops_per_sec * self.seconds;
        if ops > 0.0 {
            self.cpu_ms as f64 * 1000.0 / ops
        } else {
            0.0
        }
    }
}

/// Samples groups in the background until [`Sampler::finish`].
pub struct Sampler {
    groups: Vec<Group>,
    task: tokio::task::JoinHandle<Vec<(Instant, Vec<Option<u64>>)>>,
    stop: CancellationToken,
}

/// How many samples are kept: older ones are dropped (a run of hours keeps the
/// last ~20 minutes, more than any warm-up).
const MAX_SAMPLES: usize = 60_000;

impl Sampler {
    pub fn start(groups: Vec<Group>) -> Sampler {
        let stop = CancellationToken::new();
        let (g, s) = (groups.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut samples = std::collections::VecDeque::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if samples.len() == MAX_SAMPLES {
                    samples.pop_front();
                }
                samples.push_back((Instant::now(), g.iter().map(group_ms).collect()));
            }
            samples.into()
        });
        Sampler { groups, task, stop }
    }

    /// Each group's CPU between `from` and now. Errors name a group whose
    /// process was gone at either end, or a window the samples do not cover.
    pub async fn finish(self, from: Instant) -> Result<Vec<Used>, String> {
        let end: Vec<Option<u64>> = self.groups.iter().map(group_ms).collect();
        let now = Instant::now();
        self.stop.cancel();
        let samples = self
            .task
            .await
            .map_err(|e| format!("the CPU sampler failed: {e}"))?;
        let (at, first) = samples
            .into_iter()
            .find(|(t, _)| *t >= from)
            .ok_or("no CPU sample inside the measured window")?;
        let seconds = now.saturating_duration_since(at).as_secs_f64();
        self.groups
            .iter()
            .zip(first.iter().zip(&end))
            .map(|(g, pair)| match pair {
                (Some(a), Some(b)) => Ok(Used {
                    name: g.name.clone(),
                    cpu_ms: b.saturating_sub(*a),
                    seconds,
                }),
                _ => Err(format!(
                    "{}: a process of {:?} exited during the run",
                    g.name, g.pids
                )),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_and_name_what_is_wrong() {
        let g = Group::parse("members=1+2+3").unwrap();
        assert_eq!((g.name.as_str(), g.pids), ("members", vec![1, 2, 3]));
        assert_eq!(
            Group::parse("client=self").unwrap().pids,
            vec![std::process::id()]
        );
        assert!(Group::parse("members").unwrap_err().contains("NAME=PID"));
        assert!(Group::parse("m=1+x").unwrap_err().contains("`x`"));
    }

    #[tokio::test]
    async fn this_process_burning_cpu_is_charged_for_it() {
        let g = Group::parse("me=self").unwrap();
        assert!(cpu_ms(std::process::id()).is_some());
        let sampler = Sampler::start(vec![g]);
        tokio::time::sleep(SAMPLE_EVERY * 2).await;
        let from = Instant::now();
        tokio::time::sleep(SAMPLE_EVERY * 2).await;
        // Spin until the kernel has charged at least 50 ms (5 ticks) to us.
        let start = cpu_ms(std::process::id()).unwrap();
        let mut x = 0u64;
        while cpu_ms(std::process::id()).unwrap() < start + 50 {
            for i in 0..100_000u64 {
                x = x.wrapping_add(i * i);
            }
        }
        std::hint::black_box(x);
        let used = sampler.finish(from).await.unwrap();
        assert!(used[0].cpu_ms >= 50, "{used:?}");
        assert!(used[0].seconds > 0.0);
    }
}
