//! `loadgen compare`: one scenario against several systems (cellplane through a
//! cell's members, through the router, etcd), alternated round by round in one
//! run so that they share the machine's state, then each figure and its ratio to
//! the baseline (etcd when present).

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::record::Recorder;
use crate::report::{Stats, WATCH_EVENT_OP, load_label, round_to};
use crate::runner::{RunConfig, run};
use crate::scenario::Scenario;
use crate::target::{Target, TargetKind};

pub const COMPARE_SCHEMA: &str = "cellplane-loadgen-compare/1";

/// A system under comparison.
#[derive(Debug, Clone)]
pub struct System {
    pub name: String,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemResult {
    pub name: String,
    pub kind: String,
    pub endpoints: Vec<String>,
    /// Every request of each round.
    pub rounds: Vec<Stats>,
    /// All rounds merged (histograms added, seconds summed).
    pub overall: Stats,
}

/// `system` against `baseline`: throughput as system / baseline (higher is
/// better), latencies as system / baseline (lower is better).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub system: String,
    pub baseline: String,
    pub throughput: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    pub schema: String,
    pub scenario: Scenario,
    pub rounds: usize,
    pub systems: Vec<SystemResult>,
    pub ratios: Vec<Ratio>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { round_to(a / b, 3) } else { 0.0 }
}

pub fn ratio_of(system: &SystemResult, baseline: &SystemResult) -> Ratio {
    let (a, b) = (&system.overall, &baseline.overall);
    Ratio {
        system: system.name.clone(),
        baseline: baseline.name.clone(),
        throughput: ratio(a.throughput, b.throughput),
        p50: ratio(a.latency.p50_us as f64, b.latency.p50_us as f64),
        p99: ratio(a.latency.p99_us as f64, b.latency.p99_us as f64),
        p999: ratio(a.latency.p999_us as f64, b.latency.p999_us as f64),
    }
}

fn line(name: &str, what: &str, s: &Stats) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "{what:<9} {name:<16} {:>10.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}",
        s.throughput,
        ms(s.latency.p50_us),
        ms(s.latency.p99_us),
        ms(s.latency.p999_us),
        s.errors
    )
}

/// What to compare, and how.
pub struct CompareConfig {
    pub scenario: Scenario,
    pub scenario_file: Option<String>,
    pub systems: Vec<System>,
    pub rounds: usize,
    /// Idle time between two runs (lets the previous system's background work,
    /// compactions and fsyncs, settle).
    pub pause: Duration,
    pub progress: bool,
}

/// Runs `rounds` rounds; within a round every system once, the order reversed
/// every other round (so no system always runs right after the same other one).
/// Each line of results goes to `out` as it is known.
pub async fn compare(
    cfg: &CompareConfig,
    shutdown: CancellationToken,
    mut out: impl FnMut(&str),
) -> anyhow::Result<CompareReport> {
    let (scenario, systems, rounds) = (&cfg.scenario, &cfg.systems, cfg.rounds);
    anyhow::ensure!(!systems.is_empty(), "nothing to compare");
    anyhow::ensure!(rounds > 0, "--rounds must be > 0");
    out(&format!(
        "# {} · {} · {} round(s) · {} cores",
        scenario.name,
        load_label(scenario),
        rounds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    ));
    let mut merged: Vec<(Recorder, f64)> = systems.iter().map(|_| (Recorder::new(), 0.0)).collect();
    let mut per_round: Vec<Vec<Stats>> = systems.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..systems.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            if shutdown.is_cancelled() {
                anyhow::bail!("interrupted");
            }
            let sys = &systems[i];
            let result = run(
                RunConfig {
                    scenario: scenario.clone(),
                    scenario_file: cfg.scenario_file.clone(),
                    target: sys.target.clone(),
                    up_dir: None,
                    progress: cfg.progress,
                    log_faults: false,
                },
                shutdown.clone(),
            )
            .await
            .map_err(|e| e.context(format!("round {} on {}", round + 1, sys.name)))?;
            out(&line(
                &sys.name,
                &format!("round {}", round + 1),
                &result.report.totals,
            ));
            merged[i].0.merge(&result.recorder);
            merged[i].1 += result.report.measured_s;
            per_round[i].push(result.report.totals.clone());
            tokio::time::sleep(cfg.pause).await;
        }
    }
    let results: Vec<SystemResult> = systems
        .iter()
        .zip(merged.iter().zip(per_round))
        .map(|(sys, ((rec, secs), rounds))| SystemResult {
            name: sys.name.clone(),
            kind: sys.target.kind.name().to_string(),
            endpoints: sys.target.endpoints.clone(),
            rounds,
            overall: Stats::of(&rec.aggregate(|o| o.op != WATCH_EVENT_OP), *secs),
        })
        .collect();
    for r in &results {
        out(&line(&r.name, "overall", &r.overall));
    }
    let baseline = results
        .iter()
        .position(|r| r.kind == TargetKind::Etcd.name())
        .unwrap_or(results.len() - 1);
    let mut ratios = Vec::new();
    for (i, r) in results.iter().enumerate() {
        if i != baseline {
            ratios.push(ratio_of(r, &results[baseline]));
        }
    }
    let direct = results.iter().find(|r| r.kind == TargetKind::Cell.name());
    let routed = results.iter().find(|r| r.kind == TargetKind::Router.name());
    if let (Some(d), Some(r)) = (direct, routed) {
        ratios.push(ratio_of(r, d));
    }
    for r in &ratios {
        let mut s = String::new();
        let _ = write!(
            s,
            "ratio     {} / {}: throughput {:.2}×, p50 {:.2}×, p99 {:.2}×, p99.9 {:.2}×",
            r.system, r.baseline, r.throughput, r.p50, r.p99, r.p999
        );
        out(&s);
    }
    Ok(CompareReport {
        schema: COMPARE_SCHEMA.to_string(),
        scenario: scenario.clone(),
        rounds,
        systems: results,
        ratios,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Latency;

    fn result(name: &str, tput: f64, p99: u64) -> SystemResult {
        SystemResult {
            name: name.into(),
            kind: "cell".into(),
            endpoints: vec![],
            rounds: vec![],
            overall: Stats {
                throughput: tput,
                latency: Latency {
                    p50_us: p99 / 4,
                    p99_us: p99,
                    p999_us: p99 * 2,
                    ..Latency::default()
                },
                ..Stats::default()
            },
        }
    }

    #[test]
    fn ratios_are_system_over_baseline() {
        let r = ratio_of(
            &result("cellplane", 7000.0, 60_000),
            &result("etcd", 3500.0, 90_000),
        );
        assert_eq!((r.throughput, r.p99), (2.0, 0.667));
        let zero = ratio_of(&result("a", 1.0, 0), &result("b", 0.0, 0));
        assert_eq!((zero.throughput, zero.p99), (0.0, 0.0));
    }
}
