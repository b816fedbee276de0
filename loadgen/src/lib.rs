//! `loadgen`: drives a cellplane router, the members of one cell, every cell of a
//! map, or an etcd cluster, all through the etcd v3 API, so the same scenario runs
//! against each; measures latency with HDR histograms per operation and per cell;
//! injects faults into a `cellplane up` environment on a schedule; and reports in
//! the terminal, as JSON (schema in `loadgen/REPORT.md`) and as an offline HTML
//! page with SVG plots.
//!
//! Modules, in the order a run uses them: [`scenario`] (the TOML file, validated),
//! [`target`] (endpoints, connections, which cell a request is charged to),
//! [`workload`] (keys and requests), [`schedule`] (open- and closed-loop pacing),
//! [`watch`] (watch fan-out), [`faults`] and [`env`] (the fault schedule against
//! `up.json`), [`record`] (histograms and the per-second series), [`runner`] (one
//! run), [`cpu`] (CPU time of processes over a run's window), [`report`] and [`html`] (outputs), [`compare`] (several systems
//! alternated), [`progress`] (the terminal bar).
//!
//! Depends on `cellplane-proto` (the wire types) and `cellplane-map` (tenant →
//! cell), never on a server crate: it measures cellplane from the outside.

#![forbid(unsafe_code)]

pub mod compare;
pub mod cpu;
pub mod env;
pub mod failover;
pub mod faults;
pub mod html;
pub mod progress;
pub mod record;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod target;
pub mod watch;
pub mod workload;

use std::path::{Path, PathBuf};

pub use report::Report;
pub use runner::{RunConfig, RunOutput, run};
pub use scenario::Scenario;

/// Writes `report.json` and `report.html` (or the given paths); returns the paths
/// written.
pub fn write_report(
    report: &Report,
    json: &Path,
    html: &Path,
) -> std::io::Result<(PathBuf, PathBuf)> {
    for p in [json, html] {
        if let Some(dir) = p.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(json, report.to_json())?;
    std::fs::write(html, html::render(report))?;
    Ok((json.to_path_buf(), html.to_path_buf()))
}
