//! Follows the directory: a normal cellplane cell holding the cell map as JSON under
//! [`MAP_KEY`]. Reads the map, then watches the key from the next revision and
//! offers every newer map to the [`MapHolder`]; when the watch breaks (the
//! directory member died, the stream was cut), it goes back to reading every
//! `directory_poll_ms` until a read succeeds and a new watch starts. A directory
//! outage only freezes the map: the request path never waits on this task.

use std::time::Duration;

use cellplane_map::CellMap;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::{RangeRequest, RangeResponse};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::map_source::MapHolder;

/// The well-known key of the cell map in the directory cell.
pub const MAP_KEY: &str = "/cellplane/cellmap";

/// A client of the directory cell (any of its members).
#[derive(Clone)]
pub struct Directory {
    channels: Vec<Channel>,
    /// The same members without a per-request deadline, for the watch stream;
    /// HTTP/2 keep-alives notice a member that went silent.
    stream_channels: Vec<Channel>,
    timeout: Duration,
}

/// Where movers keep one record per moving tenant (`cellplane-mover`'s
/// `RECORD_PREFIX`; the router reads them only for its status page).
pub const MOVES_PREFIX: &str = "/cellplane/moves/";

/// Moves the status page lists at most.
pub const MAX_MOVES_LISTED: i64 = 100;

/// What the status page shows of a move record (the fields it needs of it).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MoveView {
    pub tenant: String,
    pub from: String,
    pub to: String,
    pub state: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory unreachable: {0}")]
    Unreachable(String),
    #[error("the directory holds no map under {MAP_KEY}")]
    Empty,
    /// A map is stored but cannot be used: it is refused, not the directory.
    #[error("the directory's map (revision {revision}) is refused: {error}")]
    Invalid {
        error: cellplane_map::MapError,
        revision: i64,
    },
}

impl Directory {
    /// A client of the directory's members at `endpoints`, each call bounded by
    /// `timeout`; with `tls`, over TLS with that client identity (a router's or an
    /// operator's: only operators may write the map).
    pub fn new(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Directory, String> {
        let mut channels = Vec::new();
        let mut stream_channels = Vec::new();
        for ep in endpoints {
            let endpoint = cellplane_security::endpoint(ep, tls)
                .map_err(|e| format!("bad directory endpoint {ep}: {e}"))?;
            channels.push(
                endpoint
                    .clone()
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_lazy(),
            );
            stream_channels.push(
                endpoint
                    .connect_timeout(timeout)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_lazy(),
            );
        }
        if channels.is_empty() {
            return Err("the directory has no endpoints".into());
        }
        Ok(Directory {
            channels,
            stream_channels,
            timeout,
        })
    }

    /// Sends `req` to each member in turn until one answers.
    async fn range_any(&self, req: RangeRequest) -> Result<RangeResponse, DirectoryError> {
        let mut last = String::new();
        for ch in &self.channels {
            let mut c = KvClient::new(ch.clone());
            match tokio::time::timeout(self.timeout, c.range(req.clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => last = s.message().to_string(),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(DirectoryError::Unreachable(last))
    }

    /// Reads the map (linearizable), trying each member in turn. Returns the map and
    /// the revision it was last modified at.
    pub async fn read(&self) -> Result<(CellMap, i64), DirectoryError> {
        let r = self
            .range_any(RangeRequest {
                key: MAP_KEY.into(),
                ..Default::default()
            })
            .await?;
        let kv = r.kvs.first().ok_or(DirectoryError::Empty)?;
        let map = CellMap::from_json(&kv.value).map_err(|error| DirectoryError::Invalid {
            error,
            revision: kv.mod_revision,
        })?;
        Ok((map, kv.mod_revision))
    }

    /// The moves in progress (the movers' records), at most [`MAX_MOVES_LISTED`],
    /// and whether there were more. For the status page: never on a request path.
    pub async fn moves(&self) -> Result<(Vec<MoveView>, bool), DirectoryError> {
        let r = self
            .range_any(RangeRequest {
                key: MOVES_PREFIX.into(),
                range_end: cellplane_proto::prefix_end(MOVES_PREFIX.as_bytes()),
                limit: MAX_MOVES_LISTED,
                // For a page: any member's view will do, and no ReadIndex round.
                serializable: true,
                ..Default::default()
            })
            .await?;
        let moves = r
            .kvs
            .iter()
            .map(|kv| {
                serde_json::from_slice(&kv.value).unwrap_or_else(|e| MoveView {
                    tenant: String::from_utf8_lossy(&kv.key).into_owned(),
                    from: "?".into(),
                    to: "?".into(),
                    state: format!("unreadable record: {e}"),
                })
            })
            .collect();
        Ok((moves, r.more))
    }

    /// Writes `map` (already validated by the caller) if the stored one is still at
    /// `expected_revision` (0: no map stored yet): a compare-and-swap, so two
    /// operators cannot overwrite each other's change unseen.
    pub async fn write(&self, map: &CellMap, expected_revision: i64) -> Result<(), MapWriteError> {
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
                Ok(_) => return Err(MapWriteError::Changed),
                Err(s) if s.code() == tonic::Code::Unavailable => last = s.message().to_string(),
                // The directory's own answer (a refusal): another member would
                // answer the same.
                Err(s) => return Err(MapWriteError::Refused(s.message().to_string())),
            }
        }
        Err(MapWriteError::Unreachable(last))
    }
}

/// Why a map was not written.
#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    /// Another writer changed the map since it was read: read it again.
    #[error("the map in the directory changed meanwhile; read it again")]
    Changed,
    #[error("the directory refused the write: {0}")]
    Refused(String),
    #[error("directory unreachable: {0}")]
    Unreachable(String),
}

/// What ended a watch of the map key.
enum WatchEnd {
    Shutdown,
    /// The watch could not start or broke; the message says why.
    Broken(String),
}

impl Directory {
    /// Watches the map key from `start` (a revision just read), calling `on_map`
    /// for every new version, until the watch breaks or `shutdown`.
    async fn watch_from(
        &self,
        start: i64,
        shutdown: &CancellationToken,
        mut on_map: impl FnMut(Result<CellMap, DirectoryError>, i64),
    ) -> WatchEnd {
        use cellplane_proto::etcdserverpb::watch_client::WatchClient;
        use cellplane_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, watch_request};
        use cellplane_proto::mvccpb::event::EventType;
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: MAP_KEY.into(),
                    start_revision: start,
                    ..Default::default()
                },
            )),
        };
        let mut last = String::from("no directory member");
        for ch in &self.stream_channels {
            // The request side stays open for the life of the watch (closing it
            // ends the watch); one message only, so a buffer of one suffices.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            if tx.send(create.clone()).await.is_err() {
                continue;
            }
            let opened = tokio::time::timeout(
                self.timeout,
                WatchClient::new(ch.clone()).watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await;
            let mut stream = match opened {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(e)) => {
                    last = e.message().to_string();
                    continue;
                }
                Err(_) => {
                    last = "timed out opening the watch".into();
                    continue;
                }
            };
            tracing::info!(from_revision = start, "watching the directory's map");
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return WatchEnd::Shutdown,
                    m = stream.message() => m,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return WatchEnd::Broken("the directory ended the watch".into()),
                    Err(e) => return WatchEnd::Broken(e.message().to_string()),
                };
                if resp.canceled {
                    return WatchEnd::Broken(format!("watch canceled: {}", resp.cancel_reason));
                }
                for e in resp.events {
                    let Some(kv) = e.kv else { continue };
                    let revision = kv.mod_revision;
                    if e.r#type == EventType::Delete as i32 {
                        on_map(Err(DirectoryError::Empty), revision);
                    } else {
                        let map = CellMap::from_json(&kv.value)
                            .map_err(|error| DirectoryError::Invalid { error, revision });
                        on_map(map, revision);
                    }
                }
            }
        }
        WatchEnd::Broken(last)
    }
}

/// Follows the directory until `shutdown`: read, then watch; on failure, read
/// again every `every`. Offers newer maps to `holder`; a map it cannot use is
/// refused and reported there (the directory is reachable, its map is not), and
/// the router keeps routing with the map in force.
pub async fn follow(
    dir: Directory,
    holder: MapHolder,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut seen_revision = 0;
    let mut was_down = false;
    let on_map = |map: Result<CellMap, DirectoryError>, rev: i64, seen: &mut i64| {
        if rev == *seen && holder.current().source == crate::map_source::MapSource::Directory {
            return;
        }
        *seen = rev;
        match map {
            Ok(map) => {
                if let Err(e) = holder.offer(map) {
                    holder.refuse(&format!("revision {rev}: {e}"));
                }
            }
            Err(DirectoryError::Invalid { error, revision }) => {
                holder.refuse(&format!("revision {revision}: {error}"))
            }
            Err(e) => tracing::warn!(error = %e, revision = rev, "ignored a map change"),
        }
    };
    loop {
        let read = match dir.read().await {
            Ok((map, rev)) => Some((Ok(map), rev)),
            Err(DirectoryError::Invalid { error, revision }) => {
                Some((Err(DirectoryError::Invalid { error, revision }), revision))
            }
            Err(e) => {
                holder.directory_unreachable();
                if !was_down {
                    tracing::warn!(error = %e, "directory unavailable: routing continues with the map in force");
                    was_down = true;
                }
                None
            }
        };
        if let Some((map, rev)) = read {
            holder.directory_reached();
            if was_down {
                tracing::info!("directory reachable again");
                was_down = false;
            }
            on_map(map, rev, &mut seen_revision);
            let end = dir
                .watch_from(rev + 1, &shutdown, |map, rev| {
                    on_map(map, rev, &mut seen_revision)
                })
                .await;
            match end {
                WatchEnd::Shutdown => return,
                WatchEnd::Broken(why) => {
                    tracing::warn!(reason = %why, "directory watch ended: reading again");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
