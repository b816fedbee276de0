//! loadgen against a `cellplane up` environment (cells alpha and beta, the
//! directory, a router) with a fault in the middle: every member of beta is killed
//! 3 s into the measured run. The report must mark the fault window, charge errors
//! to beta, and none to alpha.

mod common;

use loadgen::env::UpEnvironment;
use loadgen::scenario::Scenario;
use loadgen::target::{Target, TargetKind};
use loadgen::{RunConfig, run};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_cell_mid_run_shows_in_the_report_and_nowhere_else() {
    let up = common::Up::start();
    let env = UpEnvironment::read(&up.data).expect("up.json");
    // up.json records each process's command line (for restarts).
    assert!(env.members("beta").iter().all(|m| m.argv.len() > 3));
    let map_text = std::fs::read_to_string(up.cells.join("routing.toml")).unwrap();
    let map = cellplane_map::CellMap::from_toml(&map_text).unwrap();
    let target = Target::resolve(TargetKind::Router, vec![], None, Some(&env), Some(map)).unwrap();
    assert_eq!(target.endpoints, [up.router.to_string()]);

    let s = Scenario::parse(
        "[load]\nmodel = \"open\"\nrate = 100\nclients = 16\nconnections = 4\n\
         duration = \"8s\"\nwarmup = \"1s\"\ntimeout = \"5s\"\n\
         [keys]\nprefix = \"/kv/\"\nspace = 100\nvalue_size = 64\n\
         [workload]\nop = \"mixed\"\nread_ratio = 0.5\n\
         [tenants]\nnames = [\"a\", \"b\"]\n\
         [[faults]]\nat = \"3s\"\naction = \"kill\"\ncell = \"beta\"\n",
        "fault.toml",
        "fault",
        &[],
    )
    .unwrap();
    let out = run(
        RunConfig {
            scenario: s,
            scenario_file: None,
            target,
            up_dir: Some(up.data.clone()),
            progress: false,
            log_faults: true,
        },
        CancellationToken::new(),
    )
    .await
    .expect("run");
    let r = out.report;
    let summary = r.summary();

    assert_eq!(r.faults.len(), 1, "{summary}");
    assert!(r.faults[0].ok, "{summary}");
    assert_eq!(r.faults[0].pids.len(), 3, "{summary}");
    assert_eq!(r.fault_windows.len(), 1, "{summary}");
    let w = &r.fault_windows[0];
    assert_eq!(w.label, "kill cell beta");
    assert_eq!(w.cell.as_deref(), Some("beta"));
    assert!(
        w.start_s >= 3.0 && w.end_s == r.measured_s && !w.healed,
        "{w:?}"
    );

    let cell = |name: &str| {
        r.cells
            .iter()
            .find(|c| c.cell == name)
            .unwrap_or_else(|| panic!("no {name} in the report:\n{summary}"))
    };
    assert!(cell("beta").stats.errors > 0, "{summary}");
    assert!(
        cell("beta").stats.ok > 0,
        "beta served before the kill:\n{summary}"
    );
    assert_eq!(cell("alpha").stats.errors, 0, "{summary}");
    assert!(cell("alpha").stats.ok > 0, "{summary}");

    let b = &r.blast_radius[0];
    let alpha = b.cells.iter().find(|c| c.cell == "alpha").unwrap();
    let beta = b.cells.iter().find(|c| c.cell == "beta").unwrap();
    assert!(beta.faulty && !alpha.faulty);
    assert_eq!(alpha.during.error_rate, 0.0, "{summary}");
    assert!(beta.during.error_rate > 0.5, "{summary}");

    // Every output marks the window: the summary, the JSON, every plot.
    assert!(summary.contains("kill cell beta"), "{summary}");
    assert!(r.to_json().contains("\"fault_windows\""));
    let html = loadgen::html::render(&r);
    let plots = loadgen::html::svgs(&html);
    assert!(plots.len() >= 3);
    assert!(plots.iter().all(|p| p.contains("kill cell beta")));
}
