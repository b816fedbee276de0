//! The report of a run: built from a [`Recorder`], written as JSON (schema
//! `cellplane-loadgen-report/1`, documented field by field in `loadgen/REPORT.md`)
//! and printed as a summary table. The HTML rendering is in [`crate::html`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::faults::{FaultEvent, FaultWindow};
use crate::record::{OpCell, Recorder};
use crate::scenario::Scenario;

pub const SCHEMA: &str = "cellplane-loadgen-report/1";

/// The operation under which watch event deliveries are recorded.
pub const WATCH_EVENT_OP: &str = "watch_event";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub scenario: Scenario,
    pub scenario_file: Option<String>,
    pub target: TargetInfo,
    /// Wall-clock start of measurement, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    pub machine: Machine,
    /// Seconds measured (the warm-up excluded).
    pub measured_s: f64,
    /// Every request, all cells and operations.
    pub totals: Stats,
    pub cells: Vec<CellStats>,
    pub ops: Vec<OpStats>,
    pub series: Vec<CellSeries>,
    pub faults: Vec<FaultEvent>,
    pub fault_windows: Vec<FaultWindow>,
    pub blast_radius: Vec<Blast>,
    pub watch: Option<WatchInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// router, cell, etcd or map.
    pub kind: String,
    pub name: String,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub os: String,
    pub kernel: String,
    pub hostname: String,
}

impl Machine {
    pub fn this() -> Machine {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            os: std::env::consts::OS.to_string(),
            kernel: read("/proc/sys/kernel/osrelease"),
            hostname: read("/proc/sys/kernel/hostname"),
        }
    }
}

/// Latencies of successful requests, microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean().round() as u64,
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Rounded to `decimals`, as the nearest double to a short decimal: its JSON
/// text is that decimal and reads back to the same number.
pub fn round_to(x: f64, decimals: usize) -> f64 {
    if x.is_finite() {
        format!("{x:.decimals$}").parse().unwrap_or(0.0)
    } else {
        0.0
    }
}

fn round2(x: f64) -> f64 {
    round_to(x, 2)
}

fn ratio(part: u64, all: u64) -> f64 {
    if all == 0 {
        0.0
    } else {
        round_to(part as f64 / all as f64, 6)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub ok: u64,
    pub errors: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    /// The first error message seen per code.
    #[serde(default)]
    pub error_samples: BTreeMap<String, String>,
    /// Successful requests per measured second.
    pub throughput: f64,
    /// errors / (ok + errors).
    pub error_rate: f64,
    /// Compare-and-swap txns whose compare failed (counted in `ok`).
    pub conflicts: u64,
    pub latency: Latency,
}

impl Stats {
    pub fn of(o: &OpCell, seconds: f64) -> Stats {
        let errors = o.error_count();
        let all = o.ok + errors;
        Stats {
            ok: o.ok,
            errors,
            errors_by_code: o.errors.clone(),
            error_samples: o.error_samples.clone(),
            throughput: if seconds > 0.0 {
                round2(o.ok as f64 / seconds)
            } else {
                0.0
            },
            error_rate: ratio(errors, all),
            conflicts: o.conflicts,
            latency: Latency::of(&o.hist),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellStats {
    pub cell: String,
    #[serde(flatten)]
    pub stats: Stats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpStats {
    pub op: String,
    pub cell: String,
    #[serde(flatten)]
    pub stats: Stats,
}

/// One second of one cell.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Second of the measured run (requests are placed by completion time).
    pub t: u64,
    pub ok: u64,
    pub errors: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    /// 0 when the second had no successful request.
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellSeries {
    pub cell: String,
    pub points: Vec<Point>,
}

/// One cell's figures over a span of seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Span {
    pub from_s: u64,
    pub to_s: u64,
    pub throughput: f64,
    pub error_rate: f64,
    pub p99_us: u64,
}

/// One cell during a fault window against the same cell just before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlastCell {
    pub cell: String,
    /// The cell the fault hit.
    pub faulty: bool,
    pub before: Span,
    pub during: Span,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blast {
    pub fault: String,
    pub start_s: f64,
    pub end_s: f64,
    pub cells: Vec<BlastCell>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchInfo {
    pub watchers: usize,
    pub mode: String,
    /// Events read by active watchers.
    pub events: u64,
    /// Delivery latency (from the write's send to the watcher reading it).
    pub delivery: Latency,
}

fn span(r: &Recorder, cell: &str, from: usize, to: usize) -> Span {
    let w = r.window(cell, from, to);
    let secs = w.seconds.max(1) as f64;
    let all = w.ok + w.errors;
    Span {
        from_s: from as u64,
        to_s: to as u64,
        throughput: round2(w.ok as f64 / secs),
        error_rate: ratio(w.errors, all),
        p99_us: w.p99_us,
    }
}

/// For each window: every cell's throughput, error rate and p99 during the window
/// (whole seconds it touches) against the seconds before it (as many, at most;
/// from 0).
pub fn blast_radius(r: &Recorder, windows: &[FaultWindow]) -> Vec<Blast> {
    let cells = r.cells();
    windows
        .iter()
        .map(|w| {
            let start = w.start_s.max(0.0).floor() as usize;
            let end = (w.end_s.ceil() as usize).max(start + 1);
            let len = end - start;
            let before_from = start.saturating_sub(len);
            Blast {
                fault: w.label.clone(),
                start_s: w.start_s,
                end_s: w.end_s,
                cells: cells
                    .iter()
                    .filter(|c| r.series.contains_key(*c))
                    .map(|c| BlastCell {
                        cell: c.clone(),
                        faulty: w.cell.as_deref() == Some(c.as_str()),
                        before: span(r, c, before_from, start),
                        during: span(r, c, start, end),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// What [`Report::build`] needs besides the recorder.
pub struct ReportInput<'a> {
    pub scenario: &'a Scenario,
    pub scenario_file: Option<String>,
    pub target: TargetInfo,
    pub started_unix_ms: u64,
    pub measured_s: f64,
    pub faults: Vec<FaultEvent>,
    pub fault_windows: Vec<FaultWindow>,
    pub watch_events: u64,
}

impl Report {
    pub fn build(r: &Recorder, input: ReportInput<'_>) -> Report {
        let secs = input.measured_s;
        let is_request = |o: &OpCell| o.op != WATCH_EVENT_OP;
        let totals = Stats::of(&r.aggregate(is_request), secs);
        let cells = r
            .cells()
            .into_iter()
            .filter(|c| r.ops.iter().any(|o| &o.cell == c && is_request(o)))
            .map(|c| CellStats {
                stats: Stats::of(&r.aggregate(|o| o.cell == c && is_request(o)), secs),
                cell: c,
            })
            .collect();
        let mut ops: Vec<OpStats> = r
            .ops
            .iter()
            .map(|o| OpStats {
                op: o.op.clone(),
                cell: o.cell.clone(),
                stats: Stats::of(o, secs),
            })
            .collect();
        ops.sort_by(|a, b| (&a.op, &a.cell).cmp(&(&b.op, &b.cell)));
        let last = secs.ceil() as usize;
        let series = r
            .series
            .iter()
            .map(|(cell, seconds)| CellSeries {
                cell: cell.clone(),
                points: (0..last.max(seconds.len()))
                    .map(|t| {
                        let Some(s) = seconds.get(t) else {
                            return Point {
                                t: t as u64,
                                ..Point::default()
                            };
                        };
                        let q =
                            |x: f64| s.hist.as_ref().map(|h| h.value_at_quantile(x)).unwrap_or(0);
                        Point {
                            t: t as u64,
                            ok: s.ok,
                            errors: s.error_count(),
                            errors_by_code: s.errors.clone(),
                            p50_us: q(0.5),
                            p99_us: q(0.99),
                            p999_us: q(0.999),
                        }
                    })
                    .collect(),
            })
            .collect();
        let w = &input.scenario.watch;
        let watch = (w.watchers > 0).then(|| WatchInfo {
            watchers: w.watchers,
            mode: format!("{:?}", w.mode).to_lowercase(),
            events: input.watch_events,
            delivery: Latency::of(&r.aggregate(|o| o.op == WATCH_EVENT_OP).hist),
        });
        Report {
            schema: SCHEMA.to_string(),
            scenario: input.scenario.clone(),
            scenario_file: input.scenario_file,
            target: input.target,
            started_unix_ms: input.started_unix_ms,
            machine: Machine::this(),
            measured_s: round2(secs),
            totals,
            cells,
            ops,
            series,
            blast_radius: blast_radius(r, &input.fault_windows),
            faults: input.faults,
            fault_windows: input.fault_windows,
            watch,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Report, String> {
        let r: Report = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if r.schema != SCHEMA {
            return Err(format!(
                "schema {:?}: this loadgen reads {SCHEMA:?}",
                r.schema
            ));
        }
        Ok(r)
    }

    /// The terminal summary: per operation and cell, faults, blast radius.
    pub fn summary(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n{} → {} · {} · {:.1}s measured",
            self.scenario.name,
            self.target.kind,
            load_label(&self.scenario),
            self.measured_s
        );
        let _ = writeln!(
            s,
            "{:<18} {:<14} {:>10} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
            "op", "cell", "ok/s", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let mut row = |op: &str, cell: &str, st: &Stats| {
            let _ = writeln!(
                s,
                "{:<18} {:<14} {:>10.1} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2}",
                op,
                cell,
                st.throughput,
                st.errors,
                ms(st.latency.p50_us),
                ms(st.latency.p90_us),
                ms(st.latency.p99_us),
                ms(st.latency.p999_us),
                ms(st.latency.max_us)
            );
        };
        for o in &self.ops {
            row(&o.op, &o.cell, &o.stats);
        }
        if self.ops.len() > 1 {
            row("all requests", "all", &self.totals);
        }
        if !self.totals.errors_by_code.is_empty() {
            let codes: Vec<String> = self
                .totals
                .errors_by_code
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "errors by code: {}", codes.join(", "));
            for (code, msg) in &self.totals.error_samples {
                let _ = writeln!(s, "  e.g. {code}: {msg}");
            }
        }
        if self.totals.conflicts > 0 {
            let _ = writeln!(s, "compare-and-swap conflicts: {}", self.totals.conflicts);
        }
        if let Some(w) = &self.watch {
            let _ = writeln!(
                s,
                "watch: {} {} watchers, {} events read, delivery p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
                w.watchers,
                w.mode,
                w.events,
                ms(w.delivery.p50_us),
                ms(w.delivery.p99_us),
                ms(w.delivery.max_us)
            );
        }
        for f in &self.faults {
            let _ = writeln!(s, "fault: {}", f.describe());
        }
        for w in &self.fault_windows {
            let _ = writeln!(
                s,
                "fault window: {} from {:.1}s to {:.1}s{}",
                w.label,
                w.start_s,
                w.end_s,
                if w.healed { "" } else { " (not undone)" }
            );
        }
        for b in &self.blast_radius {
            let _ = writeln!(
                s,
                "blast radius of {} ({:.1}s–{:.1}s): before → during",
                b.fault, b.start_s, b.end_s
            );
            for c in &b.cells {
                let _ = writeln!(
                    s,
                    "  {:<14}{} ok/s {:>9.1} → {:>9.1}  error rate {:>7.3}% → {:>7.3}%  p99 {:>8.2} → {:>8.2} ms",
                    c.cell,
                    if c.faulty { "*" } else { " " },
                    c.before.throughput,
                    c.during.throughput,
                    c.before.error_rate * 100.0,
                    c.during.error_rate * 100.0,
                    ms(c.before.p99_us),
                    ms(c.during.p99_us)
                );
            }
        }
        s
    }
}

/// `closed, 64 clients on 8 connections` / `open at 2000/s, …`.
pub fn load_label(s: &Scenario) -> String {
    let l = &s.load;
    let reads = match s.workload.consistency {
        crate::scenario::Consistency::Linearizable => "linearizable",
        crate::scenario::Consistency::Serializable => "serializable",
    };
    let op = match s.workload.op {
        crate::scenario::Op::Put => "put".to_string(),
        crate::scenario::Op::Get => format!("{reads} get"),
        crate::scenario::Op::Mixed => {
            format!("mixed {:.0}% {reads} reads", s.workload.read_ratio * 100.0)
        }
        crate::scenario::Op::TxnCas => "txn compare-and-swap".to_string(),
        crate::scenario::Op::Discovery => format!(
            "discovery {:.0}% register / {:.0}% heartbeat / {:.0}% resolve",
            s.discovery.register_ratio * 100.0,
            s.discovery.heartbeat_ratio * 100.0,
            (1.0 - s.discovery.register_ratio - s.discovery.heartbeat_ratio) * 100.0
        ),
    };
    match l.model {
        crate::scenario::Model::Closed => format!(
            "{op}, closed loop, {} clients on {} connections",
            l.clients, l.connections
        ),
        crate::scenario::Model::Open => format!(
            "{op}, open loop at {}/s, {} clients on {} connections",
            l.rate, l.clients, l.connections
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::Outcome;
    use crate::scenario::FaultAction;
    use std::time::Duration;

    pub(crate) fn sample_report() -> Report {
        let mut r = Recorder::new();
        for s in 0..10usize {
            for i in 0..50u64 {
                r.record(
                    "put",
                    "alpha",
                    s,
                    Duration::from_micros(900 + i * 37),
                    Outcome::Ok { conflict: false },
                );
                if (4..7).contains(&s) {
                    r.record(
                        "put",
                        "beta",
                        s,
                        Duration::from_millis(3),
                        Outcome::Err("Unavailable"),
                    );
                } else {
                    r.record(
                        "put",
                        "beta",
                        s,
                        Duration::from_micros(1100 + i),
                        Outcome::Ok {
                            conflict: i % 7 == 0,
                        },
                    );
                }
            }
        }
        let faults = vec![
            FaultEvent {
                planned_s: 4.0,
                at_s: 4.01,
                done_s: 4.01,
                action: FaultAction::Kill,
                target: "cell beta".into(),
                cell: Some("beta".into()),
                processes: vec!["beta/1".into(), "beta/2".into(), "beta/3".into()],
                pids: vec![11, 12, 13],
                ok: true,
                message: "SIGKILL sent".into(),
            },
            FaultEvent {
                planned_s: 6.0,
                at_s: 6.0,
                done_s: 6.93,
                action: FaultAction::Restart,
                target: "cell beta".into(),
                cell: Some("beta".into()),
                processes: vec!["beta/1".into(), "beta/2".into(), "beta/3".into()],
                pids: vec![21, 22, 23],
                ok: true,
                message: "restarted".into(),
            },
        ];
        let windows = crate::faults::windows(&faults, 10.0);
        let mut scenario = Scenario {
            name: "sample".into(),
            ..Scenario::default()
        };
        scenario.keys.zipf_exponent = 1.07;
        Report::build(
            &r,
            ReportInput {
                scenario: &scenario,
                scenario_file: Some("loadgen/scenarios/sample.toml".into()),
                target: TargetInfo {
                    kind: "router".into(),
                    name: "router".into(),
                    endpoints: vec!["127.0.0.1:2379".into()],
                },
                started_unix_ms: 1_795_000_000_123,
                measured_s: 10.0,
                faults,
                fault_windows: windows,
                watch_events: 0,
            },
        )
    }

    #[test]
    fn json_round_trips() {
        let report = sample_report();
        let text = report.to_json();
        let back = Report::from_json(&text).unwrap();
        assert_eq!(back, report);
        // And the text is stable through a second trip.
        assert_eq!(back.to_json(), text);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["cells"][0]["cell"], "alpha");
        assert!(v["cells"][0]["latency"]["p99_us"].as_u64().unwrap() > 0);
        assert!(v["series"][1]["points"][5]["errors_by_code"]["Unavailable"].as_u64() == Some(50));
    }

    #[test]
    fn other_schemas_are_refused() {
        let text = sample_report().to_json().replace(SCHEMA, "something/9");
        assert!(
            Report::from_json(&text)
                .unwrap_err()
                .contains("something/9")
        );
    }

    #[test]
    fn blast_radius_compares_during_with_before() {
        let r = sample_report();
        assert_eq!(r.fault_windows.len(), 1);
        let b = &r.blast_radius[0];
        assert_eq!((b.start_s, b.end_s), (4.01, 6.93));
        let beta = b.cells.iter().find(|c| c.cell == "beta").unwrap();
        let alpha = b.cells.iter().find(|c| c.cell == "alpha").unwrap();
        assert!(beta.faulty && !alpha.faulty);
        // During = seconds 4..7, before = 1..4.
        assert_eq!((beta.during.from_s, beta.during.to_s), (4, 7));
        assert_eq!((beta.before.from_s, beta.before.to_s), (1, 4));
        assert_eq!(beta.before.error_rate, 0.0);
        assert_eq!(beta.during.error_rate, 1.0);
        assert_eq!(alpha.during.error_rate, 0.0);
        assert_eq!(alpha.during.throughput, 50.0);
        let text = r.summary();
        assert!(text.contains("kill cell beta"), "{text}");
        assert!(text.contains("blast radius"), "{text}");
    }
}
