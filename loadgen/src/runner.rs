//! One run of a scenario against a target: connect, preload, open watchers,
//! drive the clients (open or closed loop) through the warm-up and the measured
//! time while the fault schedule runs, then build the report.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use cellplane_proto::discovery::RegisterRequest;
use cellplane_proto::discovery::discovery_client::DiscoveryClient;
use cellplane_proto::etcdserverpb::PutRequest;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::faults::{self, FaultEvent, Injector};
use crate::progress::Progress;
use crate::record::{Outcome, Recorder, code_name};
use crate::report::{Report, ReportInput, TargetInfo, WATCH_EVENT_OP};
use crate::scenario::{Model, Op as ScenarioOp, Scenario, WatchMode};
use crate::schedule::{ClientSchedule, Timing, drive_closed, drive_open};
use crate::target::{Attribution, Connections, Target};
use crate::watch::Watchers;
use crate::workload::{ClientState, Done, Workload};

/// Keys written at once while preloading.
const PRELOAD_WRITERS: usize = 32;

pub struct RunConfig {
    pub scenario: Scenario,
    pub scenario_file: Option<String>,
    pub target: Target,
    /// The `cellplane up` data directory (needed by a fault schedule).
    pub up_dir: Option<PathBuf>,
    /// Draw the progress bar.
    pub progress: bool,
    /// Print fault lines on stderr when the bar is hidden.
    pub log_faults: bool,
}

pub struct RunOutput {
    pub report: Report,
    pub recorder: Recorder,
    /// When the measured window began and ended (tokio clock) (the last client finished), so a
    /// caller can charge what it sampled alongside (CPU) to the same window.
    pub window: (Instant, Instant),
}

/// Runs the scenario; `shutdown` ends it early (the report covers what ran).
pub async fn run(cfg: RunConfig, shutdown: CancellationToken) -> anyhow::Result<RunOutput> {
    let s = Arc::new(cfg.scenario.clone());
    let file = cfg.scenario_file.clone().unwrap_or_else(|| s.name.clone());
    let injector = if s.faults.is_empty() {
        None
    } else {
        let dir = cfg.up_dir.as_ref().with_context(|| {
            format!(
                "{file}: the scenario has faults: give --up DATA_DIR (the --data-dir of `cellplane up`)"
            )
        })?;
        let inj = Injector::new(dir);
        inj.check(&s.faults)
            .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        Some(Arc::new(inj))
    };

    let conns = Arc::new(Connections::open(&cfg.target, s.load.connections).await?);
    let attribution = Arc::new(Attribution::new(&cfg.target));
    let epoch = Instant::now();
    let stamp = (s.watch.watchers > 0 && s.watch.mode == WatchMode::Active).then_some(epoch);
    let workload = Arc::new(Workload::new(&s, stamp));
    if s.preload() {
        preload(&s, &workload, &conns, &attribution)
            .await
            .context("preloading the key space")?;
    }
    let stop = shutdown.child_token();
    let watchers = Watchers::open(
        &s,
        &cfg.target,
        &workload.keys,
        &attribution,
        epoch,
        stop.child_token(),
    )
    .await
    .context("opening the watchers")?;

    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let warmup = s.load.warmup.duration();
    let measured = s.duration();
    let end = measured.map(|d| warmup + d);
    // Requests sent in the last second may complete after it: they count in it,
    // so the series has no partial second at its end.
    let last_second = measured.map(|d| (d.as_secs_f64().ceil() as usize).max(1) - 1);
    let start = Instant::now();
    let measure_from = start + warmup;
    let started_unix_ms = SystemTime::now()
        .checked_add(warmup)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let progress = Progress::new(
        cfg.progress,
        measured.map(|d| d.as_secs_f64()),
        cfg.log_faults,
    );

    // The fault schedule, on the measured clock.
    let fault_note = Arc::new(Mutex::new(String::new()));
    let fault_task = injector.clone().map(|inj| {
        let faults = s.faults.clone();
        let stop = stop.child_token();
        let progress = progress.clone();
        let note = fault_note.clone();
        tokio::spawn(async move {
            faults::run_schedule(&inj, &faults, measure_from, stop, move |ev: &FaultEvent| {
                progress.println(&format!("fault: {}", ev.describe()));
                *note.lock().unwrap_or_else(|p| p.into_inner()) =
                    format!("[{} {}]", ev.action.name(), ev.target);
            })
            .await
        })
    });

    // The progress line.
    let progress_task = {
        let recorder = recorder.clone();
        let progress = progress.clone();
        let stop = stop.child_token();
        let note = fault_note.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let now = Instant::now();
                let measured_s = if now < measure_from {
                    -(measure_from - now).as_secs_f64()
                } else {
                    (now - measure_from).as_secs_f64()
                };
                let last = (measured_s.floor() as i64 - 1).max(0) as usize;
                let (ok, _, p99) = recorder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .second_overall(last);
                let errors = recorder.lock().unwrap_or_else(|p| p.into_inner()).errors();
                let note = note.lock().unwrap_or_else(|p| p.into_inner()).clone();
                progress.update(measured_s, ok, errors, p99, &note);
            }
        })
    };

    // The clients.
    let clients = s.load.clients;
    let measured_count = Arc::new(AtomicU64::new(0));
    let enough = stop.child_token();
    let mut tasks = JoinSet::new();
    for i in 0..clients {
        let (workload, conns, attribution) = (workload.clone(), conns.clone(), attribution.clone());
        let (recorder, s, measured_count, enough) = (
            recorder.clone(),
            s.clone(),
            measured_count.clone(),
            enough.clone(),
        );
        let stop = stop.clone();
        tasks.spawn(async move {
            let state = ClientState::new(s.seed, i, &workload.keys);
            let op = move |mut st: ClientState| {
                let (workload, conns, attribution) =
                    (workload.clone(), conns.clone(), attribution.clone());
                async move {
                    let (op, tenant, k) = workload.choose(&mut st);
                    let tenant_name = tenant.map(|t| workload.keys.tenants[t].clone());
                    let route = attribution
                        .route(tenant_name.as_deref())
                        .map(str::to_string);
                    let done = match conns.pick(i, route.as_deref()) {
                        Some(channel) => workload.execute(&mut st, channel, op, tenant, k).await,
                        None => Done {
                            op,
                            tenant,
                            cell: None,
                            result: Err(tonic::Code::Unavailable),
                            message: format!("no connection to cell {route:?}"),
                            conflict: false,
                        },
                    };
                    let cell = attribution.cell(tenant_name.as_deref(), done.cell.clone());
                    (st, (done, cell))
                }
            };
            let requests = s.load.requests;
            let on_done = |t: Timing, (done, cell): (Done, String)| {
                if t.start < warmup {
                    return;
                }
                let second = (t.done - warmup).as_secs() as usize;
                let second = last_second.map_or(second, |l| second.min(l));
                let outcome = match done.result {
                    Ok(()) => Outcome::Ok {
                        conflict: done.conflict,
                    },
                    Err(code) => Outcome::Err(code_name(code)),
                };
                let mut rec = recorder.lock().unwrap_or_else(|p| p.into_inner());
                rec.record(done.op, &cell, second, t.latency, outcome);
                if let Outcome::Err(code) = outcome {
                    rec.note_error(done.op, &cell, code, &done.message);
                }
                drop(rec);
                let n = measured_count.fetch_add(1, Ordering::Relaxed) + 1;
                if requests.is_some_and(|r| n >= r) {
                    enough.cancel();
                }
            };
            match s.load.model {
                Model::Open => {
                    let schedule = ClientSchedule::new(i, clients, s.load.rate);
                    let end = end.unwrap_or(Duration::MAX);
                    drive_open(start, schedule, end, &stop, state, op, on_done).await;
                }
                Model::Closed => {
                    drive_closed(start, end, &enough, state, op, on_done).await;
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a client task failed")?;
    }
    let finished = Instant::now();
    let interrupted = shutdown.is_cancelled();
    let measured_s = match measured {
        Some(d) if !interrupted => d.as_secs_f64(),
        _ => finished
            .saturating_duration_since(measure_from)
            .as_secs_f64(),
    };

    // Stop the schedule (a fault being applied completes first) and undo pauses.
    stop.cancel();
    let mut events = Vec::new();
    if let Some(t) = fault_task
        && let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(120), t).await
    {
        events = ev;
    }
    if let Some(inj) = &injector {
        let resumed = inj.resume_paused();
        if !resumed.is_empty() {
            progress.println(&format!(
                "resumed paused pids {resumed:?} at the end of the run"
            ));
        }
    }
    let _ = progress_task.await;
    progress.finish();

    let watch_events = watchers.events.load(Ordering::Relaxed);
    let streams = watchers.finish().await;
    let mut rec = std::mem::take(&mut *recorder.lock().unwrap_or_else(|p| p.into_inner()));
    for st in streams {
        let tenant = st.tenant.map(|t| workload.keys.tenants[t].clone());
        let cell = match &tenant {
            Some(t) => attribution.guess(t),
            None => attribution.cell(None, None),
        };
        if !st.hist.is_empty() {
            rec.record_histogram(WATCH_EVENT_OP, &cell, &st.hist);
        }
    }

    let windows = faults::windows(&events, measured_s);
    let report = Report::build(
        &rec,
        ReportInput {
            scenario: &s,
            scenario_file: cfg.scenario_file.clone(),
            target: TargetInfo {
                kind: cfg.target.kind.name().to_string(),
                name: cfg.target.name.clone(),
                endpoints: cfg.target.endpoints.clone(),
            },
            started_unix_ms,
            measured_s,
            faults: events,
            fault_windows: windows,
            watch_events,
        },
    );
    Ok(RunOutput {
        report,
        recorder: rec,
        window: (measure_from, finished),
    })
}

/// Writes the key space (at most `keys.preload_limit` keys over all tenants),
/// [`PRELOAD_WRITERS`] at a time.
async fn preload(
    s: &Scenario,
    workload: &Arc<Workload>,
    conns: &Arc<Connections>,
    attribution: &Arc<Attribution>,
) -> anyhow::Result<()> {
    let tenants: Vec<Option<usize>> = if workload.keys.tenants.is_empty() {
        vec![None]
    } else {
        (0..workload.keys.tenants.len()).map(Some).collect()
    };
    let per_tenant = workload
        .keys
        .space()
        .min((s.keys.preload_limit / tenants.len() as u64).max(1));
    let jobs: Arc<Vec<(Option<usize>, u64)>> = Arc::new(
        tenants
            .iter()
            .flat_map(|t| (0..per_tenant).map(move |k| (*t, k)))
            .collect(),
    );
    let value = workload.preload_value();
    let timeout = s.load.timeout.duration();
    let mut writers = JoinSet::new();
    for w in 0..PRELOAD_WRITERS {
        let (jobs, workload, conns, attribution, value) = (
            jobs.clone(),
            workload.clone(),
            conns.clone(),
            attribution.clone(),
            value.clone(),
        );
        writers.spawn(async move {
            let mut j = w;
            while j < jobs.len() {
                let (tenant, k) = jobs[j];
                let name = tenant.map(|t| workload.keys.tenants[t].as_str());
                let channel = conns
                    .pick(w, attribution.route(name))
                    .context("no connection to preload with")?;
                // The discovery workload starts with every instance registered;
                // the others with every key written.
                let (what, result) = if workload.op == ScenarioOp::Discovery {
                    let instance = workload.instance(tenant, k);
                    let what = format!(
                        "register {}/{}/{}",
                        instance.namespace, instance.service, instance.id
                    );
                    let mut client = DiscoveryClient::new(channel);
                    let register = client.register(RegisterRequest {
                        instance: Some(instance),
                        lease_id: 0,
                    });
                    (
                        what,
                        tokio::time::timeout(timeout, register)
                            .await
                            .map(|r| r.map(|_| ())),
                    )
                } else {
                    let key = workload.keys.key(tenant, k);
                    let what = format!("put {}", String::from_utf8_lossy(&key));
                    let mut client = KvClient::new(channel);
                    let put = client.put(PutRequest {
                        key,
                        value: value.clone(),
                        ..Default::default()
                    });
                    (
                        what,
                        tokio::time::timeout(timeout, put)
                            .await
                            .map(|r| r.map(|_| ())),
                    )
                };
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(status)) => anyhow::bail!("{what}: {}", status.message()),
                    Err(_) => anyhow::bail!("{what}: timed out"),
                }
                j += PRELOAD_WRITERS;
            }
            Ok(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r.context("a preload writer failed")??;
    }
    Ok(())
}
