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
                    let r = requests.saturating_sub(r0);
                    (r as f64 / secs, errors.saturating_sub(e0) as f64 / secs)
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
