//! `loadgen`: drives a cellplane cell (or router, or an etcd cluster) through the
//! etcd v3 API and reports throughput and latency from HDR histograms.
//!
//! This first version runs closed-loop workloads (N clients, each as fast as its
//! responses come back, spread over a separate number of connections). Open-loop
//! schedules, scenarios, fault schedules and reports are tracked by the loadgen
//! issue.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for the etcd v3 API (cellplane or etcd)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed-loop load: each client sends its next request when the last returns.
    Closed(ClosedArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Op {
    /// Put random keys.
    Put,
    /// Linearizable get of random keys.
    Get,
    /// Serializable get of random keys.
    SerializableGet,
}

#[derive(clap::Args, Debug)]
struct ClosedArgs {
    /// Comma-separated client endpoints (host:port).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, value_enum, default_value = "put")]
    op: Op,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// gRPC connections shared by the clients (round-robin over endpoints).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured warm-up, seconds.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Prefix of every key.
    #[arg(long, default_value = "/bench/")]
    prefix: String,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
    /// Watchers opened before the load starts (see --watch-mode).
    #[arg(long, default_value_t = 0)]
    watchers: usize,
    /// idle: watch keys nobody writes; stalled: watch the written keys and never
    /// read the stream; active: watch the written keys and read every event.
    #[arg(long, value_enum, default_value = "idle")]
    watch_mode: WatchMode,
    /// Connections the watchers use, apart from the writers' connections.
    #[arg(long, default_value_t = 16)]
    watch_connections: usize,
    /// Watches per watch stream (idle mode; stalled and active use one each).
    #[arg(long, default_value_t = 100)]
    watches_per_stream: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum WatchMode {
    Idle,
    Stalled,
    Active,
}

/// Holds the watchers open for the run; active ones count the events they read.
struct Watchers {
    _streams: Vec<tonic::Streaming<cellplane_proto::etcdserverpb::WatchResponse>>,
    _senders: Vec<tokio::sync::mpsc::Sender<cellplane_proto::etcdserverpb::WatchRequest>>,
    events: Arc<std::sync::atomic::AtomicU64>,
}

async fn open_watchers(a: &ClosedArgs) -> anyhow::Result<Watchers> {
    use cellplane_proto::etcdserverpb::watch_client::WatchClient;
    use cellplane_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, watch_request};
    let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    if a.watchers == 0 {
        return Ok(Watchers {
            _streams: streams,
            _senders: senders,
            events,
        });
    }
    let mut channels = Vec::new();
    for i in 0..a.watch_connections.max(1) {
        channels.push(connect(&a.endpoints[i % a.endpoints.len()]).await?);
    }
    let per_stream = if a.watch_mode == WatchMode::Idle {
        a.watches_per_stream.max(1)
    } else {
        1
    };
    let mut opened = 0;
    let mut n = 0;
    while opened < a.watchers {
        let (tx, rx) = tokio::sync::mpsc::channel(per_stream + 1);
        let here = per_stream.min(a.watchers - opened);
        // Queue the creates before the call: a gRPC server may send its response
        // headers only with the first response (etcd does), and the call returns
        // only after the headers.
        for k in 0..here {
            let (key, range_end) = match a.watch_mode {
                WatchMode::Idle => (format!("/idle-watch/{}", opened + k).into_bytes(), vec![]),
                _ => {
                    let mut end = a.prefix.as_bytes().to_vec();
                    if let Some(last) = end.last_mut() {
                        *last += 1;
                    }
                    (a.prefix.clone().into_bytes(), end)
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
        let mut client = WatchClient::new(channels[n % channels.len()].clone());
        n += 1;
        let mut stream = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        // Wait for the creates to be acknowledged, so the load starts with every
        // watcher in place.
        for _ in 0..here {
            stream.message().await?;
        }
        opened += here;
        senders.push(tx);
        match a.watch_mode {
            WatchMode::Stalled => streams.push(stream),
            _ => {
                let events = events.clone();
                tokio::spawn(async move {
                    while let Ok(Some(r)) = stream.message().await {
                        events
                            .fetch_add(r.events.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        }
    }
    Ok(Watchers {
        _streams: streams,
        _senders: senders,
        events,
    })
}

#[derive(Debug, serde::Serialize)]
struct Summary {
    op: String,
    clients: usize,
    connections: usize,
    seconds: f64,
    ok: u64,
    errors: u64,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Closed(a) => closed(a).await,
        }
    })
}

async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    let uri = if endpoint.starts_with("http") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Endpoint::from_shared(uri.clone())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri}"))
}

async fn closed(a: ClosedArgs) -> anyhow::Result<()> {
    if a.clients == 0 || a.connections == 0 || a.key_space == 0 {
        bail!("--clients, --connections and --key-space must be > 0");
    }
    let mut channels = Vec::new();
    for i in 0..a.connections {
        channels.push(connect(&a.endpoints[i % a.endpoints.len()]).await?);
    }
    let value = Arc::new(vec![b'x'; a.value_size]);
    if a.op != Op::Put {
        // Reads need keys to read: write the key space once, 32 writers at a time.
        let keys = a.key_space.min(100_000);
        let mut writers = Vec::new();
        for w in 0..32u64 {
            let mut c = KvClient::new(channels[w as usize % channels.len()].clone());
            let (value, prefix) = (value.clone(), a.prefix.clone());
            writers.push(tokio::spawn(async move {
                let mut k = w;
                while k < keys {
                    c.put(PutRequest {
                        key: format!("{prefix}{k:012}").into(),
                        value: value.to_vec(),
                        ..Default::default()
                    })
                    .await?;
                    k += 32;
                }
                Ok::<(), tonic::Status>(())
            }));
        }
        for w in writers {
            w.await??;
        }
    }
    let watchers = open_watchers(&a).await?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(a.warmup);
    let stop_at = measure_from + Duration::from_secs(a.duration);
    let mut tasks = Vec::new();
    for i in 0..a.clients {
        let mut client = KvClient::new(channels[i % channels.len()].clone());
        let value = value.clone();
        let prefix = a.prefix.clone();
        let (op, key_space) = (a.op, a.key_space);
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let (mut ok, mut errors) = (0u64, 0u64);
            // Seeded per client: runs are repeatable.
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(i as u64);
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                let k: u64 = rand::RngExt::random_range(&mut rng, 0..key_space);
                let key = format!("{prefix}{k:012}").into_bytes();
                let result = match op {
                    Op::Put => client
                        .put(PutRequest {
                            key,
                            value: value.to_vec(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    Op::Get | Op::SerializableGet => client
                        .range(RangeRequest {
                            key,
                            serializable: op == Op::SerializableGet,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                };
                if now >= measure_from {
                    let us = now.elapsed().as_micros() as u64;
                    match result {
                        Ok(()) => {
                            ok += 1;
                            let _ = hist.record(us.max(1));
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, ok, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (h, o, e) = t.await?;
        hist.add(&h)?;
        ok += o;
        errors += e;
    }
    let seconds = a.duration as f64;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let s = Summary {
        op: format!("{:?}", a.op).to_lowercase(),
        clients: a.clients,
        connections: a.connections,
        seconds,
        ok,
        errors,
        throughput: ok as f64 / seconds,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
    };
    if a.watchers > 0 {
        print!(
            "[{} {:?} watchers, {} events read] ",
            a.watchers,
            a.watch_mode,
            watchers.events.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    println!(
        "{} clients={} connections={}: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, errors {}",
        s.op,
        s.clients,
        s.connections,
        s.throughput,
        s.p50_ms,
        s.p99_ms,
        s.p999_ms,
        s.max_ms,
        s.errors
    );
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}
