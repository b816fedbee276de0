//! The requests: keys (uniform or zipf, per tenant), values, and one request of
//! each operation through the etcd v3 KV API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cellplane_proto::discovery::discovery_client::DiscoveryClient;
use cellplane_proto::discovery::{
    Check, HeartbeatRequest, Instance, RegisterRequest, ResolveRequest,
};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest, compare, request_op, response_op,
};
use rand::RngExt;
use rand::rngs::StdRng;
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::scenario::{Consistency, Discovery, Distribution, Op, Scenario};

/// The response metadata in which a cellplane router names the serving cell.
pub const CELL_METADATA: &str = "cellplane-cell";

/// Zipf-distributed ranks `1..=n` with exponent `s`, by rejection-inversion
/// (Hörmann and Derflinger, 1996): O(1) memory and time per sample, any `n`.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    threshold: f64,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Zipf {
        let mut z = Zipf {
            n: n.max(1) as f64,
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            threshold: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.threshold = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }

    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.s) * log_x) * log_x
    }

    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper1(t) * x).exp()
    }

    /// A rank in `1..=n`; rank 1 is the most frequent.
    pub fn sample(&self, rng: &mut StdRng) -> u64 {
        loop {
            let u: f64 = rng.random();
            let u = self.h_integral_n + u * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inv(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.threshold || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }
}

/// `ln(1 + x) / x`, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// `(e^x - 1) / x`, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// The tenant a key belongs to at a router: its first path segment.
pub fn tenant_of_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix('/').unwrap_or(key);
    let (t, _) = rest.split_once('/')?;
    (!t.is_empty()).then_some(t)
}

/// The keys of a scenario.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
    width: usize,
    space: u64,
    zipf: Option<Zipf>,
    /// The next key of a sequential distribution, shared by every client.
    sequential: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// With `[tenants]`, their names and keys are `/<tenant><prefix>…`; without,
    /// the tenant of the prefix (if it has one) and keys are `<prefix>…`.
    pub tenants: Vec<String>,
    explicit_tenants: bool,
}

impl KeySpace {
    pub fn new(s: &Scenario) -> KeySpace {
        let k = &s.keys;
        let digits = (k.space.max(1) - 1).to_string().len();
        let width = match k.size {
            Some(size) => size.saturating_sub(k.prefix.len()).max(digits),
            None => 12.max(digits),
        };
        let explicit = s.tenants.resolve();
        let explicit_tenants = !explicit.is_empty();
        let tenants = if explicit_tenants {
            explicit
        } else {
            tenant_of_key(&k.prefix)
                .map(|t| vec![t.to_string()])
                .unwrap_or_default()
        };
        KeySpace {
            prefix: k.prefix.clone(),
            width,
            space: k.space.max(1),
            zipf: (k.distribution == Distribution::Zipf)
                .then(|| Zipf::new(k.space, k.zipf_exponent)),
            sequential: (k.distribution == Distribution::Sequential)
                .then(|| Arc::new(std::sync::atomic::AtomicU64::new(0))),
            tenants,
            explicit_tenants,
        }
    }

    /// Key `k` of tenant `t` (an index into `tenants`).
    pub fn key(&self, tenant: Option<usize>, k: u64) -> Vec<u8> {
        let width = self.width;
        match tenant {
            Some(t) if self.explicit_tenants => {
                format!("/{}{}{k:0width$}", self.tenants[t], self.prefix).into_bytes()
            }
            _ => format!("{}{k:0width$}", self.prefix).into_bytes(),
        }
    }

    /// The prefix of every key of tenant `t` (what a watcher watches).
    pub fn key_prefix(&self, tenant: Option<usize>) -> String {
        match tenant {
            Some(t) if self.explicit_tenants => format!("/{}{}", self.tenants[t], self.prefix),
            _ => self.prefix.clone(),
        }
    }

    pub fn space(&self) -> u64 {
        self.space
    }

    /// The tenant of client `client`: clients are spread evenly over the tenants
    /// and keep theirs, so each tenant is its own population of clients and a slow
    /// cell cannot hold up the requests of another cell's tenants.
    pub fn tenant_of_client(&self, client: usize) -> Option<usize> {
        (!self.tenants.is_empty()).then(|| client % self.tenants.len())
    }

    /// A random key number.
    pub fn pick(&self, rng: &mut StdRng) -> u64 {
        if let Some(next) = &self.sequential {
            return next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.space;
        }
        match &self.zipf {
            Some(z) => z.sample(rng) - 1,
            None => rng.random_range(0..self.space),
        }
    }
}

/// One request's result.
#[derive(Debug, Clone)]
pub struct Done {
    pub op: &'static str,
    pub tenant: Option<usize>,
    /// The serving cell, when the response (or error) named one.
    pub cell: Option<String>,
    pub result: Result<(), Code>,
    /// The error's message (empty on success).
    pub message: String,
    /// A compare-and-swap whose compare failed.
    pub conflict: bool,
}

/// Per-client state: its tenant, its random stream and what its CAS txns last
/// saw.
pub struct ClientState {
    pub tenant: Option<usize>,
    pub rng: StdRng,
    cas_revisions: HashMap<(Option<usize>, u64), i64>,
}

impl ClientState {
    pub fn new(seed: u64, client: usize, keys: &KeySpace) -> ClientState {
        ClientState {
            tenant: keys.tenant_of_client(client),
            rng: <StdRng as rand::SeedableRng>::seed_from_u64(
                seed.wrapping_mul(1_000_003).wrapping_add(client as u64),
            ),
            cas_revisions: HashMap::new(),
        }
    }
}

/// The request mix of a scenario.
pub struct Workload {
    pub op: Op,
    pub serializable: bool,
    pub read_ratio: f64,
    pub keys: KeySpace,
    value: Arc<Vec<u8>>,
    /// Values carry the time they were sent (active watchers measure delivery).
    stamp: Option<tokio::time::Instant>,
    timeout: Duration,
    pub discovery: Discovery,
}

fn cell_of(meta: &MetadataMap) -> Option<String> {
    meta.get(CELL_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl Workload {
    pub fn new(s: &Scenario, stamp: Option<tokio::time::Instant>) -> Workload {
        Workload {
            op: s.workload.op,
            serializable: s.workload.consistency == Consistency::Serializable,
            read_ratio: s.workload.read_ratio,
            keys: KeySpace::new(s),
            value: Arc::new(vec![b'x'; s.keys.value_size]),
            stamp,
            timeout: s.load.timeout.duration(),
            discovery: s.discovery.clone(),
        }
    }

    /// The discovery namespace of tenant `t` (the tenant itself; `loadgen` when
    /// there is none).
    pub fn namespace(&self, tenant: Option<usize>) -> String {
        tenant
            .map(|t| self.keys.tenants[t].clone())
            .unwrap_or_else(|| "loadgen".to_string())
    }

    /// Instance `k` of tenant `t`, as registered.
    pub fn instance(&self, tenant: Option<usize>, k: u64) -> Instance {
        Instance {
            namespace: self.namespace(tenant),
            service: format!("svc-{:03}", k % self.discovery.services.max(1)),
            id: format!("i-{k:06}"),
            address: "127.0.0.1".into(),
            port: 20_000 + (k % 40_000) as u32,
            tags: vec!["loadgen".into()],
            check: Some(Check {
                ttl_seconds: self.discovery.ttl_seconds,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The value of a put: the send time since `stamp` in its first 8 bytes when
    /// stamping.
    fn value(&self) -> Vec<u8> {
        let mut v = self.value.to_vec();
        if let Some(epoch) = self.stamp
            && v.len() >= 8
        {
            let nanos = epoch.elapsed().as_nanos() as u64;
            v[..8].copy_from_slice(&nanos.to_le_bytes());
        }
        v
    }

    /// The operation the next request will be, and its key.
    pub fn choose(&self, st: &mut ClientState) -> (&'static str, Option<usize>, u64) {
        let (t, k) = (st.tenant, self.keys.pick(&mut st.rng));
        let read_name = if self.serializable {
            "get_serializable"
        } else {
            "get"
        };
        let op = match self.op {
            Op::Put => "put",
            Op::Get => read_name,
            Op::Mixed => {
                if st.rng.random_bool(self.read_ratio) {
                    read_name
                } else {
                    "put"
                }
            }
            Op::TxnCas => "txn_cas",
            Op::Discovery => {
                let x: f64 = st.rng.random();
                let d = &self.discovery;
                if x < d.register_ratio {
                    "register"
                } else if x < d.register_ratio + d.heartbeat_ratio {
                    "heartbeat"
                } else {
                    "resolve"
                }
            }
        };
        (op, t, k)
    }

    /// Sends one request chosen by [`Workload::choose`] on `channel`.
    pub async fn execute(
        &self,
        st: &mut ClientState,
        channel: Channel,
        op: &'static str,
        tenant: Option<usize>,
        k: u64,
    ) -> Done {
        let key = self.keys.key(tenant, k);
        let mut discovery = DiscoveryClient::new(channel.clone());
        let mut kv = KvClient::new(channel);
        let mut conflict = false;
        let call = async {
            match op {
                "put" => kv
                    .put(PutRequest {
                        key,
                        value: self.value(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| cell_of(r.metadata())),
                "register" => discovery
                    .register(RegisterRequest {
                        instance: Some(self.instance(tenant, k)),
                        lease_id: 0,
                    })
                    .await
                    .map(|r| cell_of(r.metadata())),
                "heartbeat" | "resolve" => {
                    let i = self.instance(tenant, k);
                    if op == "heartbeat" {
                        discovery
                            .heartbeat(HeartbeatRequest {
                                namespace: i.namespace,
                                service: i.service,
                                id: i.id,
                            })
                            .await
                            .map(|r| cell_of(r.metadata()))
                    } else {
                        discovery
                            .resolve(ResolveRequest {
                                namespace: i.namespace,
                                service: i.service,
                                tags: vec![],
                                healthy_only: self.discovery.healthy_only,
                            })
                            .await
                            .map(|r| cell_of(r.metadata()))
                    }
                }
                "txn_cas" => {
                    let seen = st.cas_revisions.get(&(tenant, k)).copied().unwrap_or(0);
                    let r = kv
                        .txn(TxnRequest {
                            compare: vec![Compare {
                                result: compare::CompareResult::Equal as i32,
                                target: compare::CompareTarget::Mod as i32,
                                key: key.clone(),
                                target_union: Some(compare::TargetUnion::ModRevision(seen)),
                                ..Default::default()
                            }],
                            success: vec![RequestOp {
                                request: Some(request_op::Request::RequestPut(PutRequest {
                                    key: key.clone(),
                                    value: self.value(),
                                    ..Default::default()
                                })),
                            }],
                            failure: vec![RequestOp {
                                request: Some(request_op::Request::RequestRange(RangeRequest {
                                    key: key.clone(),
                                    ..Default::default()
                                })),
                            }],
                        })
                        .await?;
                    let cell = cell_of(r.metadata());
                    let r = r.into_inner();
                    let now = if r.succeeded {
                        r.header.map(|h| h.revision).unwrap_or(0)
                    } else {
                        conflict = true;
                        r.responses
                            .first()
                            .and_then(|o| match &o.response {
                                Some(response_op::Response::ResponseRange(rr)) => {
                                    rr.kvs.first().map(|kv| kv.mod_revision)
                                }
                                _ => None,
                            })
                            .unwrap_or(0)
                    };
                    st.cas_revisions.insert((tenant, k), now);
                    Ok(cell)
                }
                _ => kv
                    .range(RangeRequest {
                        key,
                        serializable: op == "get_serializable",
                        ..Default::default()
                    })
                    .await
                    .map(|r| cell_of(r.metadata())),
            }
        };
        let (cell, result, message) = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(cell)) => (cell, Ok(()), String::new()),
            Ok(Err(status)) => (
                cell_of(status.metadata()),
                Err(status.code()),
                status.message().to_string(),
            ),
            Err(_) => (
                None,
                Err(Code::DeadlineExceeded),
                format!("no answer within load.timeout ({:?})", self.timeout),
            ),
        };
        Done {
            op,
            tenant,
            cell,
            result,
            message,
            conflict,
        }
    }

    /// The value every preloaded key gets.
    pub fn preload_value(&self) -> Vec<u8> {
        self.value.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> StdRng {
        <StdRng as rand::SeedableRng>::seed_from_u64(7)
    }

    #[test]
    fn zipf_matches_its_distribution() {
        // s = 1, n = 1000: P(rank 1) = 1 / H(1000) ≈ 0.1336, P(rank 2) ≈ 0.0668.
        let z = Zipf::new(1000, 1.0);
        let mut r = rng();
        let n = 200_000;
        let mut counts = vec![0u64; 1001];
        for _ in 0..n {
            let k = z.sample(&mut r);
            assert!((1..=1000).contains(&k));
            counts[k as usize] += 1;
        }
        let h: f64 = (1..=1000).map(|i| 1.0 / i as f64).sum();
        for rank in [1usize, 2, 10] {
            let expected = 1.0 / (rank as f64 * h);
            let got = counts[rank] as f64 / n as f64;
            assert!(
                (got - expected).abs() < expected * 0.05,
                "rank {rank}: {got} vs {expected}"
            );
        }
        // s != 1 takes the other branch of the helpers.
        let z = Zipf::new(10, 0.5);
        assert!((0..1000).all(|_| (1..=10).contains(&z.sample(&mut r))));
    }

    #[test]
    fn keys_have_the_tenant_prefix_and_the_size() {
        let mut s = Scenario::default();
        s.keys.prefix = "/kv/".into();
        s.keys.space = 100;
        s.keys.size = Some(10);
        s.tenants.names = vec!["a".into(), "b".into()];
        let ks = KeySpace::new(&s);
        assert_eq!(ks.key(Some(1), 7), b"/b/kv/000007");
        assert_eq!(ks.key_prefix(Some(0)), "/a/kv/");
        assert_eq!(ks.tenant_of_client(3), Some(1));
        let mut s = Scenario::default();
        s.keys.prefix = "/a/bench/".into();
        let ks = KeySpace::new(&s);
        assert_eq!(ks.tenants, ["a"]);
        assert_eq!(ks.key(Some(0), 42), b"/a/bench/000000000042");
    }

    #[test]
    fn tenants_of_keys_and_prefix_ends() {
        assert_eq!(tenant_of_key("/acme/x"), Some("acme"));
        assert_eq!(tenant_of_key("acme/x"), Some("acme"));
        assert_eq!(tenant_of_key("/bench/"), Some("bench"));
        assert_eq!(tenant_of_key("flat"), None);
    }
}
