//! What the load goes to, and which cell each request is charged to.
//!
//! - `router`: cellplane routers. The serving cell comes from the `cellplane-cell`
//!   response metadata (on errors too); when a request fails before a cell was
//!   chosen (a client-side timeout, a dead router) it is charged to the cell the
//!   tenant was last seen on, else the cell the map gives it, else `unattributed`.
//! - `cell`: the members of one cell, charged to that cell.
//! - `etcd`: an etcd cluster, charged to `etcd`.
//! - `map`: every cell of a cell map, each tenant sent straight to its cell's
//!   members (what a router does, without the router: the baseline of
//!   through-router versus direct).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use anyhow::Context;
use cellplane_map::CellMap;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::env::UpEnvironment;
use crate::scenario::Flow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Router,
    Cell,
    Etcd,
    Map,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Router => "router",
            TargetKind::Cell => "cell",
            TargetKind::Etcd => "etcd",
            TargetKind::Map => "map",
        }
    }
}

/// Requests whose cell cannot be told.
pub const UNATTRIBUTED: &str = "unattributed";

#[derive(Debug, Clone)]
pub struct Target {
    pub kind: TargetKind,
    /// The cell name requests are charged to (`cell`, `etcd`), or the label of the
    /// routers.
    pub name: String,
    pub endpoints: Vec<String>,
    /// The map: routes `map` targets, attributes router requests with no metadata.
    pub map: Option<CellMap>,
}

impl Target {
    pub fn router(endpoints: Vec<String>) -> Target {
        Target {
            kind: TargetKind::Router,
            name: "router".into(),
            endpoints,
            map: None,
        }
    }

    pub fn cell(name: &str, endpoints: Vec<String>) -> Target {
        Target {
            kind: TargetKind::Cell,
            name: name.to_string(),
            endpoints,
            map: None,
        }
    }

    pub fn etcd(endpoints: Vec<String>) -> Target {
        Target {
            kind: TargetKind::Etcd,
            name: "etcd".into(),
            endpoints,
            map: None,
        }
    }

    pub fn by_map(map: CellMap) -> Target {
        let endpoints = map.cells.iter().flat_map(|c| c.endpoints.clone()).collect();
        Target {
            kind: TargetKind::Map,
            name: "map".into(),
            endpoints,
            map: Some(map),
        }
    }

    /// A target from command-line parts: explicit endpoints win; else they come
    /// from the `cellplane up` environment (the routers, or the members of
    /// `cell`).
    pub fn resolve(
        kind: TargetKind,
        endpoints: Vec<String>,
        cell: Option<String>,
        env: Option<&UpEnvironment>,
        map: Option<CellMap>,
    ) -> anyhow::Result<Target> {
        let from_env = |what: &str| -> anyhow::Result<&UpEnvironment> {
            env.with_context(|| format!("--target {what}: give --endpoints, or --up DATA_DIR"))
        };
        let mut t = match kind {
            TargetKind::Router => {
                let eps = if endpoints.is_empty() {
                    from_env("router")?
                        .routers()
                        .iter()
                        .map(|r| r.client.clone())
                        .collect()
                } else {
                    endpoints
                };
                Target::router(eps)
            }
            TargetKind::Cell => {
                let eps = if endpoints.is_empty() {
                    let name = cell
                        .as_deref()
                        .context("--target cell: name the cell with --cell, or give --endpoints")?;
                    let env = from_env("cell")?;
                    let eps: Vec<String> =
                        env.members(name).iter().map(|m| m.client.clone()).collect();
                    if eps.is_empty() {
                        anyhow::bail!(
                            "--cell {name}: the environment has no such cell (cells: {})",
                            env.cells().join(", ")
                        );
                    }
                    eps
                } else {
                    endpoints
                };
                Target::cell(cell.as_deref().unwrap_or("cell"), eps)
            }
            TargetKind::Etcd => {
                anyhow::ensure!(!endpoints.is_empty(), "--target etcd needs --endpoints");
                Target::etcd(endpoints)
            }
            TargetKind::Map => Target::by_map(
                map.clone()
                    .context("--target map needs the cell map: --map cells/routing.toml")?,
            ),
        };
        if t.map.is_none() {
            t.map = map;
        }
        anyhow::ensure!(!t.endpoints.is_empty(), "the target has no endpoints");
        Ok(t)
    }

    pub fn label(&self) -> String {
        match self.kind {
            TargetKind::Cell => format!("cell {} ({})", self.name, self.endpoints.join(",")),
            TargetKind::Map => format!(
                "cells of map version {} ({})",
                self.map.as_ref().map(|m| m.version).unwrap_or(0),
                self.map
                    .as_ref()
                    .map(|m| m
                        .cells
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()
            ),
            k => format!("{} {}", k.name(), self.endpoints.join(",")),
        }
    }
}

/// Opens a channel to `endpoint` (`host:port` or a URL).
pub async fn connect_one(endpoint: &str) -> anyhow::Result<Channel> {
    connect_flow(endpoint, Flow::Default).await
}

/// [`connect_one`] with the given HTTP/2 flow control.
pub async fn connect_flow(endpoint: &str, flow: Flow) -> anyhow::Result<Channel> {
    let uri = if endpoint.starts_with("http") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Endpoint::from_shared(uri.clone())
        .with_context(|| format!("bad endpoint {endpoint:?}"))?
        .tcp_nodelay(true)
        .http2_adaptive_window(flow == Flow::Adaptive)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri}"))
}

/// `n` channels spread round-robin over `endpoints`.
pub async fn connect_n(endpoints: &[String], n: usize) -> anyhow::Result<Vec<Channel>> {
    connect_n_flow(endpoints, n, Flow::Default).await
}

async fn connect_n_flow(
    endpoints: &[String],
    n: usize,
    flow: Flow,
) -> anyhow::Result<Vec<Channel>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        v.push(connect_flow(&endpoints[i % endpoints.len()], flow).await?);
    }
    Ok(v)
}

/// The clients' connections to a target.
pub struct Connections {
    channels: Vec<Channel>,
    /// `map` targets: `connections` channels per cell.
    by_cell: HashMap<String, Vec<Channel>>,
}

impl Connections {
    pub async fn open(target: &Target, n: usize) -> anyhow::Result<Connections> {
        Connections::open_flow(target, n, Flow::Default).await
    }

    /// [`Connections::open`] with the given HTTP/2 flow control.
    pub async fn open_flow(target: &Target, n: usize, flow: Flow) -> anyhow::Result<Connections> {
        let mut by_cell = HashMap::new();
        let mut channels = Vec::new();
        if target.kind == TargetKind::Map {
            let map = target.map.as_ref().context("map target without a map")?;
            for c in &map.cells {
                by_cell.insert(c.name.clone(), connect_n_flow(&c.endpoints, n, flow).await?);
            }
        } else {
            channels = connect_n_flow(&target.endpoints, n, flow).await?;
        }
        Ok(Connections { channels, by_cell })
    }

    /// The channel client `i` uses (for `cell` on a map target).
    pub fn pick(&self, i: usize, cell: Option<&str>) -> Option<Channel> {
        let list = match cell {
            Some(c) if !self.by_cell.is_empty() => self.by_cell.get(c)?,
            _ => &self.channels,
        };
        (!list.is_empty()).then(|| list[i % list.len()].clone())
    }

    /// Every channel, for work spread over all of them (preload).
    pub fn all(&self) -> Vec<(Option<String>, Channel)> {
        let mut v: Vec<(Option<String>, Channel)> =
            self.channels.iter().map(|c| (None, c.clone())).collect();
        for (cell, chans) in &self.by_cell {
            v.extend(chans.iter().map(|c| (Some(cell.clone()), c.clone())));
        }
        v
    }
}

/// Which cell each request is charged to (see the module doc).
pub struct Attribution {
    kind: TargetKind,
    name: String,
    map: Option<CellMap>,
    learned: RwLock<HashMap<String, String>>,
}

impl Attribution {
    pub fn new(target: &Target) -> Attribution {
        Attribution {
            kind: target.kind,
            name: target.name.clone(),
            map: target.map.clone(),
            learned: RwLock::new(HashMap::new()),
        }
    }

    /// The cell a `map` target sends `tenant` to.
    pub fn route(&self, tenant: Option<&str>) -> Option<&str> {
        let map = self.map.as_ref()?;
        map.cell_for(tenant?).map(|c| c.name.as_str())
    }

    /// The cell a request of `tenant` is charged to, given the cell its response
    /// named (if any).
    pub fn cell(&self, tenant: Option<&str>, reported: Option<String>) -> String {
        match self.kind {
            TargetKind::Cell | TargetKind::Etcd => self.name.clone(),
            TargetKind::Map => self.route(tenant).unwrap_or(UNATTRIBUTED).to_string(),
            TargetKind::Router => match (reported, tenant) {
                (Some(cell), Some(t)) => {
                    let known = self
                        .learned
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(t)
                        .is_some_and(|c| *c == cell);
                    if !known {
                        self.learned
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(t.to_string(), cell.clone());
                    }
                    cell
                }
                (Some(cell), None) => cell,
                (None, Some(t)) => self.guess(t),
                (None, None) => UNATTRIBUTED.to_string(),
            },
        }
    }

    /// Where `tenant` was last served, else where the map puts it.
    pub fn guess(&self, tenant: &str) -> String {
        if let Some(c) = self
            .learned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            return c.clone();
        }
        match self.kind {
            TargetKind::Cell | TargetKind::Etcd => self.name.clone(),
            _ => self.route(Some(tenant)).unwrap_or(UNATTRIBUTED).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> CellMap {
        CellMap::from_toml(
            "version = 1\n[[cells]]\nname = \"alpha\"\nendpoints = [\"127.0.0.1:1\"]\n\
             [[cells]]\nname = \"beta\"\nendpoints = [\"127.0.0.1:2\"]\n\
             [[ranges]]\nfrom = 0\nto = 4095\ncell = \"alpha\"\n[tenants]\nb = \"beta\"\n",
        )
        .unwrap()
    }

    #[test]
    fn router_requests_are_charged_to_the_reported_cell_then_the_learned_one() {
        let mut t = Target::router(vec!["x:1".into()]);
        t.map = Some(map());
        let a = Attribution::new(&t);
        // Nothing learned yet: the map.
        assert_eq!(a.cell(Some("b"), None), "beta");
        // The router said gamma (the live map moved b): learned.
        assert_eq!(a.cell(Some("b"), Some("gamma".into())), "gamma");
        assert_eq!(a.cell(Some("b"), None), "gamma");
        assert_eq!(a.cell(None, None), UNATTRIBUTED);
        let no_map = Attribution::new(&Target::router(vec!["x:1".into()]));
        assert_eq!(no_map.cell(Some("z"), None), UNATTRIBUTED);
    }

    #[test]
    fn map_targets_route_by_tenant() {
        let a = Attribution::new(&Target::by_map(map()));
        assert_eq!(a.route(Some("b")), Some("beta"));
        assert_eq!(a.cell(Some("zz"), None), "alpha");
        let c = Attribution::new(&Target::cell("alpha", vec!["x:1".into()]));
        assert_eq!(c.cell(Some("b"), Some("beta".into())), "alpha");
    }
}
