//! Prometheus scrape configs: every member's and router's `/metrics`, with the
//! labels the alert rules of `deploy/prometheus/alerts.yml` rely on: jobs
//! [`MEMBER_JOB`] and [`ROUTER_JOB`], `cell` and `member` on a member, `router`
//! on a router.
//!
//! Two renders share [`scrape_config`]: `deploy/prometheus/prometheus.yml` for
//! `cellplane up` (127.0.0.1 and the ports of `cells/`, [`render_local`]) and
//! `deploy/compose/prometheus.yml` for the Compose environment's Prometheus
//! container (container addresses, rendered by [`super::compose`]). The rules
//! (`deploy/prometheus/alerts.yml`) are written by hand and tested with `promtool
//! test rules`; neither render writes them.

use std::path::PathBuf;

use anyhow::Context;
use cellplane_cell::CellDef;
use cellplane_cell::config::MemberDef;
use serde_json::{Value, json};

use super::Rendered;
use crate::up::EnvDef;

/// The scrape job of the members.
pub const MEMBER_JOB: &str = "cellplane-members";
/// The scrape job of the routers.
pub const ROUTER_JOB: &str = "cellplane-routers";
/// The config's file name, in both renders.
pub const CONFIG_FILE: &str = "prometheus.yml";
/// The alert rules, relative to the config (Prometheus resolves `rule_files`
/// from the config's folder): `deploy/prometheus/alerts.yml` beside the local
/// config, mounted beside it in the Compose container.
pub const RULES_FILE: &str = "alerts.yml";

/// How often every target is scraped and the rules evaluated. A small
/// environment: 5 s costs little and lets an alert's state follow a fault within
/// seconds.
const INTERVAL: &str = "5s";

const LOCAL_HEADER: &str = "# Rendered by `cellplane deploy render prometheus` from cells/: do not edit,\n\
                            # change cells/ and render again.\n\
                            # Prometheus for `cellplane up` (every process of cells/ on 127.0.0.1):\n\
                            #   prometheus --config.file=deploy/prometheus/prometheus.yml\n";

/// One member to scrape: its cell, its id, the host:port of its http listener.
pub struct MemberTarget {
    pub cell: String,
    pub id: u64,
    pub http: String,
}

/// One router to scrape: its id and the host:port of its http listener.
pub struct RouterTarget {
    pub id: u64,
    pub http: String,
}

/// A Prometheus config scraping `members` and `routers` and loading the alert
/// rules at `rules` (relative to the config's folder, or absolute), as YAML under
/// `header`. A rules file that does not exist is no error to Prometheus (the
/// entry is a glob), so the config works before the rules are written.
pub fn scrape_config(
    header: &str,
    rules: &str,
    members: &[MemberTarget],
    routers: &[RouterTarget],
) -> anyhow::Result<String> {
    // One static_config per target: its labels are its own.
    let member_configs: Vec<Value> = members
        .iter()
        .map(|m| {
            json!({
                "targets": [m.http],
                "labels": { "cell": m.cell, "member": m.id.to_string() },
            })
        })
        .collect();
    let router_configs: Vec<Value> = routers
        .iter()
        .map(|r| {
            json!({
                "targets": [r.http],
                "labels": { "router": r.id.to_string() },
            })
        })
        .collect();
    let doc = json!({
        "global": { "scrape_interval": INTERVAL, "evaluation_interval": INTERVAL },
        "rule_files": [rules],
        "scrape_configs": [
            { "job_name": MEMBER_JOB, "metrics_path": "/metrics", "static_configs": member_configs },
            { "job_name": ROUTER_JOB, "metrics_path": "/metrics", "static_configs": router_configs },
        ],
    });
    Ok(format!(
        "{header}{}",
        serde_saphyr::to_string(&doc).context("cannot encode the Prometheus config")?
    ))
}

/// The members of `env` as targets, their http address given by `http`.
pub fn member_targets(
    env: &EnvDef,
    http: &dyn Fn(&CellDef, &MemberDef) -> String,
) -> Vec<MemberTarget> {
    let mut out = Vec::new();
    for (_, def) in &env.cells {
        for m in &def.members {
            out.push(MemberTarget {
                cell: def.name.clone(),
                id: m.id,
                http: http(def, m),
            });
        }
    }
    out
}

/// `deploy/prometheus/prometheus.yml`: every process `cellplane up` runs from
/// `cells/`, at the http address `cells/` gives it. Every router of
/// `routers.toml` is listed; `up` starts only the first unless `--routers N`, so
/// the others' targets show as down until then.
pub fn render_local(env: &EnvDef) -> anyhow::Result<Rendered> {
    let members = member_targets(env, &|_, m| m.http.to_string());
    let routers: Vec<RouterTarget> = env
        .routers
        .routers
        .iter()
        .map(|r| RouterTarget {
            id: r.id,
            http: r.http.to_string(),
        })
        .collect();
    let mut files = Rendered::new();
    files.insert(
        PathBuf::from(CONFIG_FILE),
        scrape_config(LOCAL_HEADER, RULES_FILE, &members, &routers)?,
    );
    Ok(files)
}
