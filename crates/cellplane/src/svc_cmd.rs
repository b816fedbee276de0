//! `cellplane svc register | deregister | heartbeat | list | watch`: service
//! discovery through a router (the namespace is the tenant it routes by) or
//! directly against the members of one cell.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::bail;
use cellplane_proto::discovery::discovery_client::DiscoveryClient;
use cellplane_proto::discovery::{
    Change, ChangeKind, Check, DeregisterRequest, GrpcCheck, Health, HeartbeatRequest, HttpCheck,
    Instance, RegisterRequest, ResolveRequest, TcpCheck, WatchRequest, WatchResponse, check,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::client::{Conn, TargetArgs, parse_duration};
use crate::lease_cmd::parse_lease_id;

#[derive(clap::Args, Debug)]
pub struct SvcArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The namespace: the tenant the service belongs to (the router routes by it).
    /// Default: --tenant, else `default`.
    #[arg(long, global = true)]
    pub namespace: Option<String>,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: SvcCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum SvcCmd {
    /// Register an instance (or replace the one with the same id).
    Register(Box<RegisterArgs>),
    /// Remove an instance.
    Deregister {
        #[arg(long)]
        service: String,
        #[arg(long)]
        id: String,
    },
    /// Renew a TTL instance's lease once.
    Heartbeat {
        #[arg(long)]
        service: String,
        #[arg(long)]
        id: String,
    },
    /// List a service's instances.
    List {
        #[arg(long)]
        service: String,
        /// Only instances with this tag (repeat: every tag must match).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Only healthy instances.
        #[arg(long)]
        healthy: bool,
    },
    /// Print a service's instances on every change until interrupted.
    Watch {
        #[arg(long)]
        service: String,
        /// Start with the state at this revision, then every change after it.
        #[arg(long, default_value_t = 0)]
        rev: i64,
    },
}

#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    #[arg(long)]
    pub service: String,
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub address: String,
    #[arg(long)]
    pub port: u32,
    /// A tag (repeat for several).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Metadata `key=value` (repeat for several).
    #[arg(long = "meta", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// TTL health: the instance must heartbeat at least this often (whole seconds).
    #[arg(long, value_parser = parse_duration, conflicts_with = "lease")]
    pub ttl: Option<Duration>,
    /// Attach to an existing lease (hex ID, as `lease grant` prints it).
    #[arg(long, value_parser = parse_lease_id)]
    pub lease: Option<i64>,
    /// Active check: GET this http:// URL, 2xx is healthy.
    #[arg(long, group = "active")]
    pub http_check: Option<String>,
    /// Active check: a TCP connection to host:port.
    #[arg(long, group = "active")]
    pub tcp_check: Option<String>,
    /// Active check: grpc.health.v1 Health/Check on host:port.
    #[arg(long, group = "active")]
    pub grpc_check: Option<String>,
    /// The service name the gRPC check asks about (default: the whole server).
    #[arg(long, requires = "grpc_check")]
    pub grpc_service: Option<String>,
    /// Between two runs of the active check (default 10s).
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Deadline of one run of the active check (default 2s).
    #[arg(long, value_parser = parse_duration)]
    pub check_timeout: Option<Duration>,
    /// Remove the instance once unhealthy this long (whole seconds; default 60s).
    #[arg(long, value_parser = parse_duration)]
    pub deregister_after: Option<Duration>,
    /// Stay running and heartbeat (at a third of the TTL) until interrupted, then
    /// deregister; registers again if the instance was removed meanwhile.
    #[arg(long)]
    pub heartbeat: bool,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

/// Whole seconds of `d`, refusing fractions (leases count in seconds).
fn whole_seconds(flag: &str, d: Duration) -> anyhow::Result<i64> {
    if d.subsec_nanos() != 0 || d.is_zero() {
        bail!("{flag}: use a whole, positive number of seconds (got {d:?})");
    }
    Ok(d.as_secs() as i64)
}

impl RegisterArgs {
    fn request(&self, namespace: &str) -> anyhow::Result<RegisterRequest> {
        let active = if let Some(url) = &self.http_check {
            Some(check::Active::Http(HttpCheck { url: url.clone() }))
        } else if let Some(a) = &self.tcp_check {
            Some(check::Active::Tcp(TcpCheck { address: a.clone() }))
        } else {
            self.grpc_check.as_ref().map(|a| {
                check::Active::Grpc(GrpcCheck {
                    address: a.clone(),
                    service: self.grpc_service.clone().unwrap_or_default(),
                })
            })
        };
        if active.is_none() && (self.interval.is_some() || self.check_timeout.is_some()) {
            bail!(
                "--interval and --check-timeout need an active check (--http-check, --tcp-check or --grpc-check)"
            );
        }
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis() as u64);
        let check = Check {
            ttl_seconds: self
                .ttl
                .map(|d| whole_seconds("--ttl", d))
                .transpose()?
                .unwrap_or(0),
            active,
            interval_ms: ms(self.interval),
            timeout_ms: ms(self.check_timeout),
            deregister_after_seconds: self
                .deregister_after
                .map(|d| whole_seconds("--deregister-after", d))
                .transpose()?
                .unwrap_or(0),
        };
        Ok(RegisterRequest {
            instance: Some(Instance {
                namespace: namespace.to_string(),
                service: self.service.clone(),
                id: self.id.clone(),
                address: self.address.clone(),
                port: self.port,
                tags: self.tags.clone(),
                metadata: self.meta.iter().cloned().collect::<HashMap<_, _>>(),
                check: Some(check),
                ..Default::default()
            }),
            lease_id: self.lease.unwrap_or(0),
        })
    }
}

/// A status as a user should read it: the server's message says what to do.
fn failed(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what} failed: {} ({:?})", s.message(), s.code())
}

pub async fn run(args: SvcArgs) -> anyhow::Result<()> {
    let namespace = args
        .namespace
        .clone()
        .or_else(|| args.target.tenant.clone())
        .unwrap_or_else(|| "default".to_string());
    let streaming = match &args.command {
        SvcCmd::Watch { .. } => true,
        SvcCmd::Register(r) => r.heartbeat,
        _ => false,
    };
    let client = DiscoveryClient::new(args.target.connect(streaming).await?)
        .max_decoding_message_size(
            cellplane_proto::DEFAULT_MAX_RESPONSE_BYTES + cellplane_proto::RESPONSE_FRAME_BYTES,
        );
    let mut c = client.clone();
    let ns = namespace.clone();
    match args.command {
        SvcCmd::Register(r) => register(client, &ns, &r, args.json, args.target.timeout).await,
        SvcCmd::Deregister { service, id } => {
            let resp = c
                .deregister(DeregisterRequest {
                    namespace: ns.clone(),
                    service: service.clone(),
                    id: id.clone(),
                })
                .await
                .map_err(|s| failed("deregister", s))?
                .into_inner();
            crate::outln!(
                "deregistered {id} (service {service}, namespace {ns}) at revision {}",
                resp.revision
            );
            Ok(())
        }
        SvcCmd::Heartbeat { service, id } => {
            let r = c
                .heartbeat(HeartbeatRequest {
                    namespace: ns,
                    service,
                    id: id.clone(),
                })
                .await
                .map_err(|s| failed("heartbeat", s))?
                .into_inner();
            crate::outln!(
                "{id}: lease renewed, TTL {}s, health {}",
                r.lease_ttl_seconds,
                health_name(r.health)
            );
            Ok(())
        }
        SvcCmd::List {
            service,
            tags,
            healthy,
        } => {
            let r = c
                .resolve(ResolveRequest {
                    namespace: ns.clone(),
                    service: service.clone(),
                    tags,
                    healthy_only: healthy,
                })
                .await
                .map_err(|s| failed("list", s))?
                .into_inner();
            if args.json {
                let v = serde_json::json!({
                    "revision": r.revision,
                    "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>(),
                });
                crate::outln!("{v}");
            } else {
                crate::outln!(
                    "service {service} in namespace {ns} at revision {}: {} instance(s)",
                    r.revision,
                    r.instances.len()
                );
                print_table(&r.instances);
            }
            Ok(())
        }
        SvcCmd::Watch { service, rev } => watch(client, &ns, &service, rev, args.json).await,
    }
}

async fn register(
    mut c: DiscoveryClient<Conn>,
    ns: &str,
    args: &RegisterArgs,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let req = args.request(ns)?;
    let call = |mut c: DiscoveryClient<Conn>, req: RegisterRequest| async move {
        match tokio::time::timeout(timeout, c.register(req)).await {
            Ok(r) => r
                .map(tonic::Response::into_inner)
                .map_err(|s| failed("register", s)),
            Err(_) => Err(anyhow::anyhow!("register: no answer within {timeout:?}")),
        }
    };
    let r = call(c.clone(), req.clone()).await?;
    let i = r.instance.clone().unwrap_or_default();
    if json {
        crate::outln!(
            "{}",
            serde_json::json!({
                "revision": r.revision,
                "lease": format!("{:016x}", r.lease_id),
                "lease_ttl_seconds": r.lease_ttl_seconds,
                "instance": instance_json(&i),
            })
        );
    } else {
        crate::outln!(
            "registered {} (service {}, namespace {ns}) at revision {}, health {}{}",
            i.id,
            i.service,
            r.revision,
            health_name(i.health),
            if r.lease_id != 0 {
                format!(", lease {:016x} TTL {}s", r.lease_id, r.lease_ttl_seconds)
            } else {
                String::new()
            }
        );
    }
    if !args.heartbeat {
        return Ok(());
    }
    if r.lease_id == 0 {
        bail!("--heartbeat needs --ttl or --lease: this instance has no lease to renew");
    }
    let every_secs = match args.ttl {
        Some(ttl) => ttl.as_secs_f64(),
        None => r.lease_ttl_seconds as f64,
    };
    let every = Duration::from_millis((every_secs * 1000.0 / 3.0).max(200.0) as u64);
    let stop = CancellationToken::new();
    tokio::spawn(crate::signals::cancel_on_signal(stop.clone()));
    let beat = HeartbeatRequest {
        namespace: ns.to_string(),
        service: args.service.clone(),
        id: args.id.clone(),
    };
    eprintln!("heartbeating every {every:?}; Ctrl-C deregisters and exits");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        let hb = tokio::time::timeout(timeout, c.heartbeat(beat.clone())).await;
        match hb {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == Code::NotFound => {
                eprintln!("{}: registering again", s.message());
                match call(c.clone(), req.clone()).await {
                    Ok(_) => eprintln!("registered {} again", args.id),
                    Err(e) => eprintln!("{e:#}"),
                }
            }
            Ok(Err(s)) => eprintln!(
                "heartbeat failed: {} ({:?}); retrying",
                s.message(),
                s.code()
            ),
            Err(_) => eprintln!("heartbeat: no answer within {timeout:?}; retrying"),
        }
    }
    let d = tokio::time::timeout(
        timeout,
        c.deregister(DeregisterRequest {
            namespace: ns.to_string(),
            service: args.service.clone(),
            id: args.id.clone(),
        }),
    )
    .await;
    match d {
        Ok(Ok(_)) => {
            eprintln!("deregistered {}", args.id);
            Ok(())
        }
        Ok(Err(s)) => Err(failed("deregister", s)),
        Err(_) => bail!("deregister: no answer within {timeout:?}"),
    }
}

async fn watch(
    client: DiscoveryClient<Conn>,
    ns: &str,
    service: &str,
    rev: i64,
    json: bool,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    tokio::spawn(crate::signals::cancel_on_signal(stop.clone()));
    let mut start = rev;
    let mut last: Option<WatchResponse> = None;
    let mut failures = 0u32;
    loop {
        let mut c = client.clone();
        let opened = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = c.watch(WatchRequest {
                namespace: ns.to_string(),
                service: service.to_string(),
                start_revision: start,
            }) => r,
        };
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(s) if retryable(&s) && last.is_some() && failures < 5 => {
                failures += 1;
                eprintln!("watch: {}; reopening", s.message());
                tokio::time::sleep(Duration::from_millis(500 * u64::from(failures))).await;
                continue;
            }
            Err(s) => return Err(failed("watch", s)),
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                m = stream.message() => m,
            };
            match msg {
                Ok(Some(snap)) => {
                    failures = 0;
                    // A resumed stream starts with the snapshot already printed.
                    if last.as_ref().is_some_and(|l| {
                        l.revision == snap.revision && l.instances == snap.instances
                    }) {
                        continue;
                    }
                    print_snapshot(&snap, json);
                    start = snap.revision;
                    last = Some(snap);
                }
                Ok(None) => bail!("the server ended the watch"),
                Err(s) if retryable(&s) && failures < 5 => {
                    failures += 1;
                    eprintln!("watch: {}; resuming from revision {start}", s.message());
                    break;
                }
                Err(s) => return Err(failed("watch", s)),
            }
        }
    }
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::ResourceExhausted)
}

fn health_name(h: i32) -> &'static str {
    match Health::try_from(h) {
        Ok(Health::Healthy) => "healthy",
        Ok(Health::Unhealthy) => "unhealthy",
        _ => "unknown",
    }
}

fn change_sign(kind: i32) -> char {
    match ChangeKind::try_from(kind) {
        Ok(ChangeKind::ChangeAdded) => '+',
        Ok(ChangeKind::ChangeRemoved) => '-',
        _ => '~',
    }
}

fn instance_json(i: &Instance) -> serde_json::Value {
    serde_json::json!({
        "id": i.id,
        "service": i.service,
        "namespace": i.namespace,
        "address": i.address,
        "port": i.port,
        "tags": i.tags,
        "metadata": i.metadata,
        "health": health_name(i.health),
        "health_reason": i.health_reason,
        "lease": format!("{:016x}", i.lease_id),
        "mod_revision": i.mod_revision,
    })
}

fn change_json(c: &Change) -> serde_json::Value {
    let kind = match ChangeKind::try_from(c.kind) {
        Ok(ChangeKind::ChangeAdded) => "added",
        Ok(ChangeKind::ChangeRemoved) => "removed",
        _ => "updated",
    };
    serde_json::json!({
        "kind": kind,
        "id": c.instance.as_ref().map(|i| i.id.clone()),
        "health": c.instance.as_ref().map(|i| health_name(i.health)),
    })
}

fn print_snapshot(s: &WatchResponse, json: bool) {
    if json {
        let v = serde_json::json!({
            "revision": s.revision,
            "instances": s.instances.iter().map(instance_json).collect::<Vec<_>>(),
            "changes": s.changes.iter().map(change_json).collect::<Vec<_>>(),
        });
        crate::outln!("{v}");
        return;
    }
    let changes: Vec<String> = s
        .changes
        .iter()
        .filter_map(|c| {
            let i = c.instance.as_ref()?;
            Some(format!(
                "{}{} ({})",
                change_sign(c.kind),
                i.id,
                health_name(i.health)
            ))
        })
        .collect();
    crate::outln!(
        "revision {}: {} instance(s); changes: {}",
        s.revision,
        s.instances.len(),
        if changes.is_empty() {
            "none".to_string()
        } else {
            changes.join(", ")
        }
    );
    print_table(&s.instances);
}

fn print_table(instances: &[Instance]) {
    if instances.is_empty() {
        return;
    }
    crate::outln!(
        "  {:<24} {:<28} {:<10} {:<24} {:<16} METADATA",
        "ID",
        "ADDRESS",
        "HEALTH",
        "TAGS",
        "LEASE"
    );
    for i in instances {
        let mut meta: Vec<String> = i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        meta.sort();
        crate::outln!(
            "  {:<24} {:<28} {:<10} {:<24} {:<16} {}",
            i.id,
            format!("{}:{}", i.address, i.port),
            health_name(i.health),
            if i.tags.is_empty() {
                "-".to_string()
            } else {
                i.tags.join(",")
            },
            if i.lease_id == 0 {
                "-".to_string()
            } else {
                format!("{:016x}", i.lease_id)
            },
            if meta.is_empty() {
                "-".to_string()
            } else {
                meta.join(",")
            }
        );
        if !i.health_reason.is_empty() {
            crate::outln!("  {:<24} reason: {}", "", i.health_reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        svc: SvcArgs,
    }

    fn parse(args: &[&str]) -> Result<SvcArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("svc").chain(args.iter().copied())).map(|c| c.svc)
    }

    #[test]
    fn register_flags_become_a_request() {
        let a = parse(&[
            "--namespace",
            "a",
            "register",
            "--service",
            "web",
            "--id",
            "w1",
            "--address",
            "10.0.0.1",
            "--port",
            "80",
            "--tag",
            "v2",
            "--meta",
            "zone=z1",
            "--ttl",
            "10s",
            "--http-check",
            "http://10.0.0.1:80/health",
            "--interval",
            "500ms",
            "--deregister-after",
            "1m",
        ])
        .unwrap();
        let SvcCmd::Register(r) = &a.command else {
            panic!("not register")
        };
        let req = r.request("a").unwrap();
        let i = req.instance.unwrap();
        assert_eq!((i.namespace.as_str(), i.port), ("a", 80));
        assert_eq!(i.metadata.get("zone").map(String::as_str), Some("z1"));
        let c = i.check.unwrap();
        assert_eq!(
            (c.ttl_seconds, c.interval_ms, c.deregister_after_seconds),
            (10, 500, 60)
        );
        assert!(matches!(c.active, Some(check::Active::Http(_))));
    }

    #[test]
    fn conflicting_or_fractional_flags_are_refused() {
        let base = [
            "register",
            "--service",
            "s",
            "--id",
            "i",
            "--address",
            "h",
            "--port",
            "1",
        ];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert!(with(&["--ttl", "5s", "--lease", "10"]).is_err());
        assert!(with(&["--http-check", "http://h/", "--tcp-check", "h:1"]).is_err());
        assert!(with(&["--meta", "novalue"]).is_err());
        let a = with(&["--ttl", "1500ms"]).unwrap();
        let SvcCmd::Register(r) = &a.command else {
            panic!()
        };
        assert!(r.request("n").unwrap_err().to_string().contains("whole"));
        let a = with(&["--lease", "1f", "--interval", "1s"]).unwrap();
        let SvcCmd::Register(r) = &a.command else {
            panic!()
        };
        assert!(
            r.request("n")
                .unwrap_err()
                .to_string()
                .contains("active check")
        );
    }
}
