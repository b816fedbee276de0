//! Follows the directory: a normal cellplane cell holding the cell map as JSON under
//! [`MAP_KEY`]. Polls with the revision it last saw (until etcd Watch lands in the
//! cells) and offers every newer map to the [`MapHolder`]. A directory outage only
//! freezes the map: the request path never waits on this task.

use std::time::Duration;

use cellplane_map::CellMap;
use cellplane_proto::etcdserverpb::RangeRequest;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::map_source::MapHolder;

/// The well-known key of the cell map in the directory cell.
pub const MAP_KEY: &str = "/cellplane/cellmap";

/// A client of the directory cell (any of its members).
#[derive(Clone)]
pub struct Directory {
    channels: Vec<Channel>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory unreachable: {0}")]
    Unreachable(String),
    #[error("the directory holds no map under {MAP_KEY}")]
    Empty,
    #[error("the directory's map is invalid: {0}")]
    Invalid(#[from] cellplane_map::MapError),
}

impl Directory {
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Directory, String> {
        let mut channels = Vec::new();
        for ep in endpoints {
            let uri = if ep.starts_with("http") {
                ep.clone()
            } else {
                format!("http://{ep}")
            };
            channels.push(
                Endpoint::from_shared(uri)
                    .map_err(|e| format!("bad directory endpoint {ep}: {e}"))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_lazy(),
            );
        }
        if channels.is_empty() {
            return Err("the directory has no endpoints".into());
        }
        Ok(Directory { channels, timeout })
    }

    /// Reads the map (linearizable), trying each member in turn. Returns the map and
    /// the revision it was last modified at.
    pub async fn read(&self) -> Result<(CellMap, i64), DirectoryError> {
        let mut last = String::new();
        for ch in &self.channels {
            let mut c = KvClient::new(ch.clone());
            let req = RangeRequest {
                key: MAP_KEY.into(),
                ..Default::default()
            };
            match tokio::time::timeout(self.timeout, c.range(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let kv = r.kvs.first().ok_or(DirectoryError::Empty)?;
                    return Ok((CellMap::from_json(&kv.value)?, kv.mod_revision));
                }
                Ok(Err(s)) => last = s.message().to_string(),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(DirectoryError::Unreachable(last))
    }

    /// Writes `map` (already validated by the caller) if the stored one is still at
    /// `expected_revision` (0: no map stored yet): a compare-and-swap, so two
    /// operators cannot overwrite each other's change unseen.
    pub async fn write(&self, map: &CellMap, expected_revision: i64) -> Result<(), String> {
        use cellplane_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
        use cellplane_proto::etcdserverpb::{
            Compare, PutRequest, RequestOp, TxnRequest, request_op,
        };
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: MAP_KEY.into(),
                target_union: Some(TargetUnion::ModRevision(expected_revision)),
                range_end: vec![],
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: MAP_KEY.into(),
                    value: map.to_json(),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        let mut last = String::new();
        for ch in &self.channels {
            let mut c = KvClient::new(ch.clone());
            match c.txn(txn.clone()).await {
                Ok(r) if r.get_ref().succeeded => return Ok(()),
                Ok(_) => {
                    return Err("the map in the directory changed meanwhile; read it again".into());
                }
                Err(s) => last = s.message().to_string(),
            }
        }
        Err(format!("directory unreachable: {last}"))
    }
}

/// Polls the directory until `shutdown`, offering newer maps to `holder`.
pub async fn follow(
    dir: Directory,
    holder: MapHolder,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut seen_revision = 0;
    let mut was_down = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match dir.read().await {
            Ok((map, rev)) => {
                if was_down {
                    tracing::info!("directory reachable again");
                    was_down = false;
                }
                if rev == seen_revision
                    && holder.current().source == crate::map_source::MapSource::Directory
                {
                    continue;
                }
                seen_revision = rev;
                if let Err(e) = holder.offer(map) {
                    tracing::warn!(error = %e, revision = rev, "refused the directory's map");
                }
            }
            Err(e) => {
                if !was_down {
                    tracing::warn!(error = %e, "directory unavailable: routing continues with the map in force");
                    was_down = true;
                }
            }
        }
    }
}
