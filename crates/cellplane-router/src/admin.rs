//! The router's admin service and its HTTP endpoint.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cellplane_map::CellState;
use cellplane_proto::router::router_admin_server::RouterAdmin;
use cellplane_proto::router::{
    CellStatus, MemberStatus, RouterStatusRequest, RouterStatusResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::cell_client::Cells;
use crate::map_source::MapHolder;

pub struct Admin {
    maps: MapHolder,
    pools: Arc<Cells>,
    auth: Arc<Authenticator>,
    tls: bool,
    /// Counters at the last status call, per cell, for rates.
    last: Mutex<HashMap<String, (Instant, u64, u64)>>,
}

impl Admin {
    pub fn new(maps: MapHolder, pools: Arc<Cells>, auth: Arc<Authenticator>, tls: bool) -> Admin {
        Admin {
            maps,
            pools,
            auth,
            tls,
            last: Mutex::default(),
        }
    }

    pub fn status(&self) -> RouterStatusResponse {
        let active = self.maps.current();
        let down = self.maps.directory_down_for();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let cells = self
            .pools
            .all()
            .into_iter()
            .map(|pool| {
                let c = &pool.inner;
                let requests = c.stats.requests.load(Ordering::Relaxed);
                let errors = c.stats.errors.load(Ordering::Relaxed);
                let (at, r0, e0) = last
                    .get(&c.name)
                    .copied()
                    .unwrap_or((now, requests, errors));
                let secs = now.duration_since(at).as_secs_f64();
                let (rps, eps) = if secs > 0.0 {
                    ((requests - r0) as f64 / secs, (errors - e0) as f64 / secs)
                } else {
                    (0.0, 0.0)
                };
                last.insert(c.name.clone(), (now, requests, errors));
                let state = active
                    .map
                    .cells
                    .iter()
                    .find(|e| e.name == c.name)
                    .map(|e| match e.state {
                        CellState::Active => "active",
                        CellState::Draining => "draining",
                    })
                    .unwrap_or("unknown");
                CellStatus {
                    name: c.name.clone(),
                    state: state.to_string(),
                    members: c
                        .members
                        .iter()
                        .map(|m| {
                            let h = m.health.view();
                            MemberStatus {
                                endpoint: m.endpoint.clone(),
                                healthy: m.healthy(),
                                member_id: m.member_id(),
                                ejected: h.ejected,
                                ejection_reason: h.reason,
                                latency_ms: h.ewma_ms,
                                probe_ms: h.probe_ms,
                                pending: h.pending,
                                failures_in_a_row: h.failures_in_a_row,
                                applied_index: h.applied_index,
                                ejections_total: h.ejections_total,
                            }
                        })
                        .collect(),
                    leader_id: c
                        .members
                        .iter()
                        .filter(|m| m.healthy())
                        .map(|m| m.leader_id())
                        .find(|l| *l != 0)
                        .unwrap_or(0),
                    requests_per_sec: rps,
                    errors_per_sec: eps,
                    p99_ms: c.stats.recent_p99_us() as f64 / 1000.0,
                    requests_total: requests,
                    errors_total: errors,
                    shed_total: c.stats.shed.load(Ordering::Relaxed),
                }
            })
            .collect();
        let (maps_refused_total, last_refused_map) = self.maps.refusals();
        RouterStatusResponse {
            map_version: active.map.version,
            map_source: active.source.to_string(),
            cells,
            directory_reachable: down.is_none(),
            directory_unreachable_ms: down.map_or(0, |d| d.as_millis() as u64),
            maps_refused_total,
            last_refused_map,
            auth_enabled: self.auth.enabled(),
            tls: self.tls,
        }
    }

    /// Prometheus text for the router's `/metrics`.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let active = self.maps.current();
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE cellplane_router_map_version gauge");
        let _ = writeln!(
            out,
            "cellplane_router_map_version{{source=\"{}\"}} {}",
            active.source, active.map.version
        );
        let _ = writeln!(
            out,
            "# HELP cellplane_router_directory_reachable 1 while the directory answers\n\
             # TYPE cellplane_router_directory_reachable gauge\n\
             cellplane_router_directory_reachable {}",
            u8::from(self.maps.directory_down_for().is_none())
        );
        let _ = writeln!(
            out,
            "# HELP cellplane_router_maps_refused_total maps from the directory this router refused\n\
             # TYPE cellplane_router_maps_refused_total counter\n\
             cellplane_router_maps_refused_total {}",
            self.maps.refusals().0
        );
        let a = &self.auth.stats;
        let _ = writeln!(
            out,
            "# HELP cellplane_router_auth_enabled 1 when every request must prove an identity\n\
             # TYPE cellplane_router_auth_enabled gauge\n\
             cellplane_router_auth_enabled {}\n\
             # HELP cellplane_router_logins_total password logins, by outcome\n\
             # TYPE cellplane_router_logins_total counter\n\
             cellplane_router_logins_total{{outcome=\"ok\"}} {}\n\
             cellplane_router_logins_total{{outcome=\"failed\"}} {}\n\
             cellplane_router_logins_total{{outcome=\"busy\"}} {}\n\
             # HELP cellplane_router_credential_reload_errors_total credentials or key files that did not load\n\
             # TYPE cellplane_router_credential_reload_errors_total counter\n\
             cellplane_router_credential_reload_errors_total {}",
            u8::from(self.auth.enabled()),
            a.logins_ok.load(Ordering::Relaxed),
            a.logins_failed.load(Ordering::Relaxed),
            a.logins_refused_busy.load(Ordering::Relaxed),
            a.reload_errors.load(Ordering::Relaxed),
        );
        for (name, help) in [
            (
                "cellplane_router_requests_total",
                "requests forwarded, by cell",
            ),
            (
                "cellplane_router_errors_total",
                "requests that failed for the cell's availability",
            ),
            (
                "cellplane_router_shed_total",
                "requests shed by the cell's bulkhead",
            ),
            (
                "cellplane_router_hedged_total",
                "serializable reads sent a second time because the first was slow",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for pool in self.pools.all() {
                let s = &pool.inner.stats;
                let v = match name {
                    "cellplane_router_requests_total" => s.requests.load(Ordering::Relaxed),
                    "cellplane_router_errors_total" => s.errors.load(Ordering::Relaxed),
                    "cellplane_router_hedged_total" => s.hedged.load(Ordering::Relaxed),
                    _ => s.shed.load(Ordering::Relaxed),
                };
                let _ = writeln!(out, "{name}{{cell=\"{}\"}} {v}", pool.inner.name);
            }
        }
        let families: [(&str, &str, &str); 6] = [
            (
                "cellplane_router_member_healthy",
                "gauge",
                "1 while the member's probes answer",
            ),
            (
                "cellplane_router_member_ejected",
                "gauge",
                "1 while the member is ejected (see status for why)",
            ),
            (
                "cellplane_router_member_latency_seconds",
                "gauge",
                "peak-EWMA latency of calls to the member",
            ),
            (
                "cellplane_router_member_probe_seconds",
                "gauge",
                "peak-EWMA latency of the member's probes",
            ),
            (
                "cellplane_router_member_pending",
                "gauge",
                "calls in flight to the member",
            ),
            (
                "cellplane_router_member_ejections_total",
                "counter",
                "times the member was ejected",
            ),
        ];
        for (name, kind, help) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for pool in self.pools.all() {
                for m in &pool.inner.members {
                    let h = m.health.view();
                    let v = match name {
                        "cellplane_router_member_healthy" => f64::from(u8::from(m.healthy())),
                        "cellplane_router_member_ejected" => f64::from(u8::from(h.ejected)),
                        "cellplane_router_member_latency_seconds" => h.ewma_ms / 1000.0,
                        "cellplane_router_member_probe_seconds" => h.probe_ms / 1000.0,
                        "cellplane_router_member_pending" => h.pending as f64,
                        _ => h.ejections_total as f64,
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{cell=\"{}\",endpoint=\"{}\"}} {v}",
                        pool.inner.name, m.endpoint
                    );
                }
            }
        }
        out
    }
}

pub struct AdminService(pub Arc<Admin>);

#[tonic::async_trait]
impl RouterAdmin for AdminService {
    async fn status(
        &self,
        r: Request<RouterStatusRequest>,
    ) -> Result<Response<RouterStatusResponse>, Status> {
        // With TLS the port already required a certificate from the CA; it must
        // be an operator's.
        if let Some(proven) = cellplane_security::peer_identity(r.extensions()) {
            match proven {
                Ok(id) if id.is_operator() => {}
                Ok(id) => {
                    return Err(Status::permission_denied(format!(
                        "{id} may not use the router's admin port: it needs an operator \
                         certificate"
                    )));
                }
                Err(e) => return Err(Status::permission_denied(e.to_string())),
            }
        }
        Ok(Response::new(self.0.status()))
    }
}
