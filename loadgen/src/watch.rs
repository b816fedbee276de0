//! Watchers opened before the load: active ones read every event and measure its
//! delivery latency from the write (the value's first 8 bytes are the write's send
//! time); idle ones watch keys nobody writes; stalled ones never read their
//! stream, so the server must bound what it buffers for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, watch_request,
};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::record::histogram;
use crate::scenario::{Scenario, WatchMode};
use crate::target::{Attribution, Connections, Target};
use cellplane_proto::prefix_end;

use crate::workload::KeySpace;

/// What one watch stream measured: its tenant and its delivery latencies (µs).
pub struct StreamResult {
    pub tenant: Option<usize>,
    pub hist: Histogram<u64>,
}

/// The open watchers; [`Watchers::finish`] closes them.
pub struct Watchers {
    tasks: JoinSet<StreamResult>,
    /// Stalled streams and the request senders, held open until the end.
    held: Vec<tonic::Streaming<WatchResponse>>,
    senders: Vec<mpsc::Sender<WatchRequest>>,
    pub events: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Watchers {
    pub fn none() -> Watchers {
        Watchers {
            tasks: JoinSet::new(),
            held: Vec::new(),
            senders: Vec::new(),
            events: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        }
    }

    /// Opens the scenario's watchers and waits until every watch is created.
    pub async fn open(
        s: &Scenario,
        target: &Target,
        keys: &KeySpace,
        attribution: &Attribution,
        epoch: Instant,
        stop: CancellationToken,
    ) -> anyhow::Result<Watchers> {
        let w = &s.watch;
        let mut out = Watchers::none();
        out.stop = stop;
        if w.watchers == 0 {
            return Ok(out);
        }
        let conns = Connections::open_flow(target, w.connections, w.flow).await?;
        let per_stream = if w.mode == WatchMode::Idle {
            w.watches_per_stream
        } else {
            1
        };
        let tenants = keys.tenants.len();
        let (mut opened, mut stream_no) = (0usize, 0usize);
        while opened < w.watchers {
            let here = per_stream.min(w.watchers - opened);
            let tenant = (tenants > 0).then(|| stream_no % tenants);
            let tenant_name = tenant.map(|t| keys.tenants[t].as_str());
            let (tx, rx) = mpsc::channel(here + 1);
            // Queue the creates before the call: a server may send its response
            // headers only with the first response (etcd does), and the call
            // returns only after the headers.
            for k in 0..here {
                let (key, range_end) = match w.mode {
                    WatchMode::Idle => {
                        // Keys nobody writes, of the stream's tenant (a router
                        // sends the watch to that tenant's cell).
                        let base = match tenant_name {
                            Some(t) => format!("/{t}/idle-watch/"),
                            None => "/idle-watch/".to_string(),
                        };
                        (format!("{base}{}", opened + k).into_bytes(), vec![])
                    }
                    _ => {
                        let p = keys.key_prefix(tenant).into_bytes();
                        let end = prefix_end(&p);
                        (p, end)
                    }
                };
                tx.send(WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(
                        WatchCreateRequest {
                            key,
                            range_end,
                            ..Default::default()
                        },
                    )),
                })
                .await?;
            }
            let cell = attribution.route(tenant_name);
            let channel = conns
                .pick(stream_no, cell)
                .ok_or_else(|| anyhow::anyhow!("no connection for watchers of {tenant_name:?}"))?;
            let mut stream = tokio::time::timeout(
                Duration::from_secs(30),
                WatchClient::new(channel).watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("opening watch stream {stream_no}: no answer in 30 s"))??
            .into_inner();
            for _ in 0..here {
                let r = tokio::time::timeout(Duration::from_secs(30), stream.message())
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "watch stream {stream_no}: creates not acknowledged in 30 s"
                        )
                    })??;
                match r {
                    Some(r) if r.created && !r.canceled => {}
                    Some(r) => anyhow::bail!(
                        "watch stream {stream_no}: create refused: {}",
                        r.cancel_reason
                    ),
                    None => anyhow::bail!("watch stream {stream_no} ended while creating"),
                }
            }
            opened += here;
            stream_no += 1;
            out.senders.push(tx);
            match w.mode {
                WatchMode::Stalled => out.held.push(stream),
                mode => {
                    let events = out.events.clone();
                    let stop = out.stop.clone();
                    let measure = mode == WatchMode::Active;
                    out.tasks.spawn(async move {
                        let mut hist = histogram(2);
                        loop {
                            let msg = tokio::select! {
                                m = stream.message() => m,
                                _ = stop.cancelled() => break,
                            };
                            let Ok(Some(r)) = msg else { break };
                            events.fetch_add(r.events.len() as u64, Ordering::Relaxed);
                            if !measure {
                                continue;
                            }
                            let now = epoch.elapsed().as_nanos() as u64;
                            for e in &r.events {
                                let Some(kv) = &e.kv else { continue };
                                if kv.value.len() < 8 {
                                    continue;
                                }
                                let mut b = [0u8; 8];
                                b.copy_from_slice(&kv.value[..8]);
                                let sent = u64::from_le_bytes(b);
                                hist.saturating_record((now.saturating_sub(sent) / 1000).max(1));
                            }
                        }
                        StreamResult { tenant, hist }
                    });
                }
            }
        }
        Ok(out)
    }

    /// Stops the watchers; returns what each active stream measured.
    pub async fn finish(mut self) -> Vec<StreamResult> {
        self.stop.cancel();
        let mut out = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            if let Ok(r) = r {
                out.push(r);
            }
        }
        drop(self.held);
        drop(self.senders);
        out
    }
}
