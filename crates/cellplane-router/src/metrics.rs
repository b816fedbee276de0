//! The router's Prometheus metrics, with the library members use
//! (prometheus-client): one registry per router, rendered at `/metrics`.
//!
//! Latency is recorded where calls happen ([`CallMetrics`], histograms by cell,
//! method and code, and by member); everything else (counters of the cell pools,
//! member health, the map in force, auth) is read from the state it describes at
//! scrape time ([`StateCollector`]), so no figure is kept twice. Every family is
//! listed in `docs/metrics.md`, which a test checks against [`RouterMetrics::render`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::auth::Authenticator;
use crate::cell_client::{CellClient, CellStats, Cells};
use crate::map_source::MapHolder;
use crate::member_health::HealthView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub cell: Arc<String>,
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub cell: Arc<String>,
    pub endpoint: Arc<String>,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~13 s: a forwarded call costs at least a member's round trip, and
    // the slowest a client waits is the cell's request timeout.
    Histogram::new(exponential_buckets(0.00005, 2.0, 19))
}

/// The histograms calls are recorded in; shared by every cell's client and kept
/// across map changes (a cell's pool is rebuilt when its members change, its
/// series are not reset).
#[derive(Clone)]
pub struct CallMetrics {
    calls: Family<CallLabels, Histogram, fn() -> Histogram>,
    member_calls: Family<MemberLabels, Histogram, fn() -> Histogram>,
}

impl Default for CallMetrics {
    fn default() -> Self {
        CallMetrics {
            calls: Family::new_with_constructor(latency_histogram),
            member_calls: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl CallMetrics {
    /// Records one call to `cell` as its client saw it (retries and hedges
    /// included), by the gRPC method of `path` and the code it ended with.
    pub fn call(&self, cell: &Arc<String>, path: &'static str, code: tonic::Code, secs: f64) {
        let labels = CallLabels {
            cell: cell.clone(),
            method: method_of(path),
            code: cellplane_proto::code_label(code),
        };
        self.calls.get_or_create(&labels).observe(secs);
    }

    /// The histogram of one member's attempts (each try of a call on it).
    pub fn member(&self, cell: &Arc<String>, endpoint: &str) -> Histogram {
        self.member_calls.get_or_create_owned(&MemberLabels {
            cell: cell.clone(),
            endpoint: Arc::new(endpoint.to_string()),
        })
    }
}

/// Times one call to a cell: recorded with its code by [`CallTimer::finish`],
/// or, when the call's future is dropped first (the client went away, its
/// deadline passed), as `Cancelled`, so the slowest calls are never the ones
/// missing from the histogram.
pub struct CallTimer<'a> {
    calls: &'a CallMetrics,
    cell: &'a Arc<String>,
    path: &'static str,
    started: Instant,
    done: bool,
}

impl<'a> CallTimer<'a> {
    pub fn start(calls: &'a CallMetrics, cell: &'a Arc<String>, path: &'static str) -> Self {
        CallTimer {
            calls,
            cell,
            path,
            started: Instant::now(),
            done: false,
        }
    }

    /// Records the call as ended with `code`; answers how long it took.
    pub fn finish(mut self, code: tonic::Code) -> Duration {
        self.done = true;
        let took = self.started.elapsed();
        self.calls
            .call(self.cell, self.path, code, took.as_secs_f64());
        took
    }
}

impl Drop for CallTimer<'_> {
    fn drop(&mut self) {
        if !self.done {
            let secs = self.started.elapsed().as_secs_f64();
            self.calls
                .call(self.cell, self.path, tonic::Code::Cancelled, secs);
        }
    }
}

/// Observes, when dropped, the time since it was made: an attempt on a member
/// is timed however it ends (answered, failed, or abandoned for a hedge, a
/// timeout or an ejection).
pub struct AttemptTimer(pub Histogram, pub Instant);

impl Drop for AttemptTimer {
    fn drop(&mut self) {
        self.0.observe(self.1.elapsed().as_secs_f64());
    }
}

/// The method name of a gRPC path: `/etcdserverpb.KV/Range` → `Range`.
fn method_of(path: &'static str) -> &'static str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The router's registry.
pub struct RouterMetrics {
    registry: Registry,
}

impl RouterMetrics {
    pub fn new(calls: &CallMetrics, state: StateCollector) -> RouterMetrics {
        let mut registry = Registry::with_prefix("cellplane_router");
        registry.register(
            "request_duration_seconds",
            "Calls forwarded to a cell, by cell, gRPC method and code, as the client saw them \
             (retries and hedges included)",
            calls.calls.clone(),
        );
        registry.register(
            "member_request_duration_seconds",
            "Attempts on one member, by cell and member endpoint (a retried call counts once \
             per member tried)",
            calls.member_calls.clone(),
        );
        registry.register_collector(Box::new(state));
        RouterMetrics { registry }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What the router's state says at scrape time.
pub struct StateCollector {
    pub maps: MapHolder,
    pub cells: Arc<Cells>,
    pub auth: Arc<Authenticator>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

/// Encodes one unlabelled value.
fn single(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

/// Encodes one family from `(labels, value)` pairs.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut f = e.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        metric.encode(f.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let active = self.maps.current();
        family(
            &mut e,
            "map_version",
            "Version of the cell map in force, labelled with where it came from (directory, \
             last-known-good or static)",
            MetricType::Gauge,
            [(
                [("source", active.source.to_string())],
                ConstGauge::new(active.map.version as i64),
            )],
        )?;
        single(
            &mut e,
            "directory_reachable",
            "1 while the directory answers",
            ConstGauge::new(i64::from(self.maps.directory_down_for().is_none())),
        )?;
        single(
            &mut e,
            "maps_refused",
            "Maps from the directory this router refused",
            ConstCounter::new(self.maps.refusals().0),
        )?;
        self.encode_auth(&mut e)?;
        // One reading of the pools for every family, so they agree.
        let pools = self.cells.all();
        encode_cells(&mut e, &pools)?;
        encode_members(&mut e, &pools)
    }
}

impl StateCollector {
    fn encode_auth(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let a = &self.auth.stats;
        single(
            e,
            "auth_enabled",
            "1 when every request must prove an identity",
            ConstGauge::new(i64::from(self.auth.enabled())),
        )?;
        family(
            e,
            "logins",
            "Password logins, by outcome",
            MetricType::Counter,
            [
                ("ok", &a.logins_ok),
                ("failed", &a.logins_failed),
                ("busy", &a.logins_refused_busy),
            ]
            .map(|(o, c)| {
                (
                    [("outcome", o)],
                    ConstCounter::new(c.load(Ordering::Relaxed)),
                )
            }),
        )?;
        single(
            e,
            "credential_reload_errors",
            "Credentials or key files that did not load",
            ConstCounter::new(a.reload_errors.load(Ordering::Relaxed)),
        )
    }
}

fn encode_cells(e: &mut DescriptorEncoder, pools: &[CellClient]) -> Result<(), std::fmt::Error> {
    type Read = fn(&CellStats) -> u64;
    let counters: [(&str, &str, Read); 5] = [
        ("requests", "Calls forwarded, by cell", |s| {
            s.requests.load(Ordering::Relaxed)
        }),
        (
            "errors",
            "Calls that failed for the cell's availability (UNAVAILABLE or INTERNAL)",
            |s| s.errors.load(Ordering::Relaxed),
        ),
        (
            "shed",
            "Calls and streams refused by the cell's bulkhead (in-flight or stream limit)",
            |s| s.shed.load(Ordering::Relaxed),
        ),
        (
            "hedged",
            "Serializable reads sent a second time because the first was slow",
            |s| s.hedged.load(Ordering::Relaxed),
        ),
        (
            "budget_exhausted",
            "Retries not sent because the cell's retry budget was spent (the call failed \
                 where another member might have answered)",
            |s| s.budget_exhausted.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, read) in counters {
        family(
            e,
            name,
            help,
            MetricType::Counter,
            pools.iter().map(|p| {
                (
                    [("cell", p.inner.name.as_str())],
                    ConstCounter::new(read(&p.inner.stats)),
                )
            }),
        )?;
    }
    Ok(())
}

fn encode_members(e: &mut DescriptorEncoder, pools: &[CellClient]) -> Result<(), std::fmt::Error> {
    // One reading of every member, so all families agree with each other.
    let rows: Vec<MemberRow> = pools
        .iter()
        .flat_map(|p| {
            p.inner.members.iter().map(|m| {
                let labels = [
                    ("cell", p.inner.name.as_str()),
                    ("endpoint", m.endpoint.as_str()),
                ];
                (labels, m.healthy(), m.health.view())
            })
        })
        .collect();
    // Flags and counts as integers (`1`, not `1.0`): alert rules and tests
    // compare them exactly.
    let counts: [GaugeSpec<i64>; 3] = [
        (
            "member_healthy",
            "1 while the member's probes answer",
            |ok, _| i64::from(ok),
        ),
        (
            "member_ejected",
            "1 while the member is ejected (the status page and `cellplane status` say why)",
            |_, h| i64::from(h.ejected),
        ),
        ("member_pending", "Calls in flight to the member", |_, h| {
            i64::try_from(h.pending).unwrap_or(i64::MAX)
        }),
    ];
    member_gauges(e, &counts, &rows)?;
    let latencies: [GaugeSpec<f64>; 2] = [
        (
            "member_latency_seconds",
            "Peak-EWMA latency of calls to the member",
            |_, h| h.ewma_ms / 1000.0,
        ),
        (
            "member_probe_seconds",
            "Peak-EWMA latency of the member's probes",
            |_, h| h.probe_ms / 1000.0,
        ),
    ];
    member_gauges(e, &latencies, &rows)?;
    family(
        e,
        "member_ejections",
        "Times the member was ejected",
        MetricType::Counter,
        rows.iter()
            .map(|(l, _, h)| (*l, ConstCounter::new(h.ejections_total))),
    )
}

/// One member's labels, whether its probes answer, and its health.
type MemberRow<'a> = ([(&'static str, &'a str); 2], bool, HealthView);

/// A gauge of every member: name, help, and how to read it from a row.
type GaugeSpec<T> = (&'static str, &'static str, fn(bool, &HealthView) -> T);

fn member_gauges<T>(
    e: &mut DescriptorEncoder,
    specs: &[GaugeSpec<T>],
    rows: &[MemberRow],
) -> Result<(), std::fmt::Error>
where
    ConstGauge<T>: EncodeMetric,
{
    for (name, help, read) in specs {
        family(
            e,
            name,
            help,
            MetricType::Gauge,
            rows.iter()
                .map(|(l, ok, h)| (*l, ConstGauge::new(read(*ok, h)))),
        )?;
    }
    Ok(())
}

/// The exposition of a router with an empty map that made one call (families
/// without a series are not exported at all): every family's `# HELP` and
/// `# TYPE` lines, what `docs/metrics.md` is checked against.
pub fn describe() -> String {
    let empty = cellplane_map::CellMap {
        version: 0,
        buckets: 1,
        cells: Vec::new(),
        ranges: Vec::new(),
        tenants: Default::default(),
    };
    let maps = MapHolder::new(
        crate::map_source::ActiveMap {
            map: Arc::new(empty),
            source: crate::map_source::MapSource::Static,
        },
        std::env::temp_dir(),
    );
    let calls = CallMetrics::default();
    let example = Arc::new("example".to_string());
    calls.call(&example, "/etcdserverpb.KV/Range", tonic::Code::Ok, 0.001);
    calls.member(&example, "127.0.0.1:2379").observe(0.001);
    let cells = Cells::new(
        crate::cell_client::PoolSettings::default(),
        crate::config::RouterSettings::default().message_limits(),
        None,
        calls.clone(),
        tokio_util::sync::CancellationToken::new(),
    );
    let auth = Arc::new(Authenticator::disabled());
    RouterMetrics::new(&calls, StateCollector { maps, cells, auth }).render()
}
