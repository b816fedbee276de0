//! A member's Prometheus metrics. The registry lives in the member's own process:
//! reading them never depends on any other process being up.

use std::sync::Arc;

use cellplane_storage::SyncStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// The metrics of one member.
pub struct Metrics {
    pub registry: Registry,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub last_log_index: Gauge,
    pub applied_index: Gauge,
    pub snapshot_index: Gauge,
    pub purged_index: Gauge,
    pub revision: Gauge,
    pub db_size_bytes: Gauge,
    pub proposals_committed: Counter,
    pub log_syncs: Gauge,
    pub log_synced_appends: Gauge,
    pub proposals_failed: Counter,
    pub leases_expired: Counter,
    pub auto_compactions: Counter,
    pub corruption_checks: Counter,
    pub history_compacted_revision: Gauge,
    pub history_versions_removed: Counter,
    /// The read barrier's confirmation rounds and the reads they answered.
    pub read_index: crate::read_index::Counts,
    pub state_size_bytes: Gauge,
    /// The configured space quota (`maintenance.quota_backend_bytes`).
    pub space_quota_bytes: Gauge,
    /// 1 while an alarm of the kind is raised in the cell.
    pub alarm_nospace: Gauge,
    pub alarm_corrupt: Gauge,
    pub requests: Family<ResultLabels, Counter>,
    pub request_seconds: Family<MethodLabels, Histogram>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cellplane");
        let m = Metrics {
            term: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            purged_index: Gauge::default(),
            revision: Gauge::default(),
            db_size_bytes: Gauge::default(),
            proposals_committed: Counter::default(),
            log_syncs: Gauge::default(),
            log_synced_appends: Gauge::default(),
            proposals_failed: Counter::default(),
            leases_expired: Counter::default(),
            auto_compactions: Counter::default(),
            corruption_checks: Counter::default(),
            history_compacted_revision: Gauge::default(),
            history_versions_removed: Counter::default(),
            read_index: crate::read_index::Counts::default(),
            state_size_bytes: Gauge::default(),
            space_quota_bytes: Gauge::default(),
            alarm_nospace: Gauge::default(),
            alarm_corrupt: Gauge::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(|| {
                // 100 µs .. ~6.5 s
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0001, 2.0, 17,
                ))
            }),
            registry: Registry::default(),
        };
        registry.register("raft_term", "Current Raft term", m.term.clone());
        registry.register(
            "auto_compactions",
            "Compactions this member proposed as leader (auto-compaction)",
            m.auto_compactions.clone(),
        );
        registry.register(
            "corruption_checks",
            "Corruption checks this member ran as leader",
            m.corruption_checks.clone(),
        );
        registry.register(
            "history_compacted_revision",
            "Compaction revision up to which this member has removed old versions from disk",
            m.history_compacted_revision.clone(),
        );
        registry.register(
            "history_versions_removed",
            "Old versions this member removed from disk after compactions",
            m.history_versions_removed.clone(),
        );
        registry.register(
            "read_index_rounds",
            "Leadership confirmation rounds this member ran for linearizable reads (a \
             heartbeat to every follower on the leader; one ReadIndex call to the leader on a \
             follower)",
            m.read_index.rounds.clone(),
        );
        registry.register(
            "read_index_reads",
            "Linearizable reads answered by those rounds (on the leader, followers' ReadIndex \
             calls included): reads per round is how well rounds are shared",
            m.read_index.reads.clone(),
        );
        registry.register(
            "state_size_bytes",
            "Size of the key-value state (what the space quota limits)",
            m.state_size_bytes.clone(),
        );
        registry.register(
            "space_quota_bytes",
            "The space quota: past this state size the leader raises NOSPACE",
            m.space_quota_bytes.clone(),
        );
        registry.register(
            "alarm_nospace",
            "1 while a NOSPACE alarm is raised in the cell",
            m.alarm_nospace.clone(),
        );
        registry.register(
            "alarm_corrupt",
            "1 while a CORRUPT alarm is raised in the cell",
            m.alarm_corrupt.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 if this member is the leader",
            m.is_leader.clone(),
        );
        registry.register(
            "raft_leader_changes",
            "Leader changes seen",
            m.leader_changes.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Last index in this member's Raft log (openraft 0.9 does not report the commit index of followers)",
            m.last_log_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Last applied log index",
            m.applied_index.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Last log index covered by this member's snapshot",
            m.snapshot_index.clone(),
        );
        registry.register(
            "raft_purged_index",
            "Last log index removed from this member's log (covered by a snapshot)",
            m.purged_index.clone(),
        );
        registry.register("mvcc_revision", "Current MVCC revision", m.revision.clone());
        registry.register(
            "raft_log_syncs",
            "WAL fsyncs of the Raft log (each covers every append queued behind it)",
            m.log_syncs.clone(),
        );
        registry.register(
            "raft_log_synced_appends",
            "Raft log appends made durable; divided by raft_log_syncs: the group-commit factor",
            m.log_synced_appends.clone(),
        );
        registry.register(
            "db_size_bytes",
            "RocksDB size (SST files and memtables)",
            m.db_size_bytes.clone(),
        );
        registry.register(
            "proposals_committed",
            "Proposals committed and applied through this member",
            m.proposals_committed.clone(),
        );
        registry.register(
            "proposals_failed",
            "Proposals that failed",
            m.proposals_failed.clone(),
        );
        registry.register(
            "leases_expired",
            "Leases this member, as leader, found expired and revoked",
            m.leases_expired.clone(),
        );
        registry.register(
            "grpc_requests",
            "Client requests by method and gRPC code",
            m.requests.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "Client request latency by method",
            m.request_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Exports the Raft log's fsync latency and where its reads were answered,
    /// read from `stats` at each scrape.
    pub fn with_fsync(mut self, stats: Arc<SyncStats>) -> Metrics {
        self.registry
            .register_collector(Box::new(LogStoreCollector(stats)));
        self
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The fsync histogram and the log's read counts, kept by the storage as plain
/// counters.
struct LogStoreCollector(Arc<SyncStats>);

impl std::fmt::Debug for LogStoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStoreCollector")
    }
}

impl Collector for LogStoreCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let l = self.0.latency();
        let mut m = e.encode_descriptor(
            "raft_log_fsync_duration_seconds",
            "Latency of the Raft log's WAL fsyncs (each makes every append queued behind it \
             durable)",
            None,
            MetricType::Histogram,
        )?;
        m.encode_histogram::<NoLabelSet>(l.sum_secs, l.count, &l.buckets, None)?;
        let mut m = e.encode_descriptor(
            "raft_log_reads",
            "Reads of Raft log entries (replication, apply) by where they were answered: the \
             in-memory tail of the newest entries, or RocksDB",
            None,
            MetricType::Counter,
        )?;
        for (from, count) in [
            ("memory", &self.0.reads_cached),
            ("rocksdb", &self.0.reads_stored),
        ] {
            let n = count.load(std::sync::atomic::Ordering::Relaxed);
            m.encode_family(&[("from", from)])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The exposition of a member that served one request (families without a
/// series are not exported at all): every family's `# HELP` and `# TYPE`
/// lines, what `docs/metrics.md` is checked against.
pub fn describe() -> String {
    let m = Metrics::new().with_fsync(Arc::new(SyncStats::default()));
    let method = "Range";
    m.request_seconds
        .get_or_create(&MethodLabels { method })
        .observe(0.001);
    let code = "OK";
    m.requests
        .get_or_create(&ResultLabels { method, code })
        .inc();
    m.render()
}
