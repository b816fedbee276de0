//! `cellplane status`: the map in force and every cell as a router sees it,
//! then the tenant moves in flight as the cells record them.

use anyhow::Context;
use cellplane_proto::router::RouterStatusRequest;
use cellplane_proto::router::router_admin_client::RouterAdminClient;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The router's admin address.
    #[arg(long, default_value = "127.0.0.1:2378")]
    pub admin: String,
    /// With TLS on, the admin port needs an operator's certificate.
    #[command(flatten)]
    pub tls: crate::client::TlsArgs,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let channel = args
        .tls
        .endpoint(&args.admin)?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the router admin at {}", args.admin))?;
    let s = RouterAdminClient::new(channel)
        .status(RouterStatusRequest {})
        .await
        .context(
            "router status failed (if the router serves TLS, pass --cacert and an operator's \
             --cert and --key)",
        )?
        .into_inner();
    let directory = if s.directory_reachable {
        "directory reachable".to_string()
    } else {
        format!(
            "directory UNREACHABLE for {:.0} s: routing on the map in force",
            s.directory_unreachable_ms as f64 / 1000.0
        )
    };
    crate::outln!(
        "map version {} (source: {}; {directory})",
        s.map_version,
        s.map_source
    );
    crate::outln!(
        "auth {}; TLS {}",
        if s.auth_enabled {
            "on"
        } else {
            "OFF (requests act for the tenant they name)"
        },
        if s.tls { "on" } else { "OFF (plaintext)" }
    );
    if s.maps_refused_total > 0 {
        crate::outln!(
            "refused {} map(s) from the directory; the last: {}",
            s.maps_refused_total,
            s.last_refused_map
        );
    }
    crate::outln!(
        "{:<10} {:<9} {:>9} {:>7} {:>9} {:>9} {:>9}  members (healthy)",
        "CELL",
        "STATE",
        "REACHABLE",
        "LEADER",
        "REQ/S",
        "ERR/S",
        "P99 MS"
    );
    for c in &s.cells {
        let up = c.members.iter().filter(|m| m.healthy).count();
        let members: Vec<String> = c
            .members
            .iter()
            .map(|m| {
                let state = match (m.healthy, m.ejected) {
                    (_, true) => " (EJECTED)",
                    (false, _) => " (down)",
                    _ => "",
                };
                format!("{}{state}", m.endpoint)
            })
            .collect();
        crate::outln!(
            "{:<10} {:<9} {:>9} {:>7} {:>9.1} {:>9.1} {:>9.2}  {}",
            c.name,
            c.state,
            format!("{up}/{}", c.members.len()),
            if c.leader_id == 0 {
                "-".to_string()
            } else {
                c.leader_id.to_string()
            },
            c.requests_per_sec,
            c.errors_per_sec,
            c.p99_ms,
            members.join(", ")
        );
    }
    show_members(&s.cells);
    show_moves(&args, &s.cells).await;
    Ok(())
}

/// Each member as the router's calls and probes see it, and why one is ejected.
fn show_members(cells: &[cellplane_proto::router::CellStatus]) {
    crate::outln!(
        "{:<10} {:>6} {:<24} {:>10} {:>9} {:>7} {:>8} {:>10}  state",
        "CELL",
        "MEMBER",
        "ENDPOINT",
        "LATENCY MS",
        "PROBE MS",
        "PENDING",
        "FAILURES",
        "APPLIED"
    );
    for c in cells {
        for m in &c.members {
            let state = if m.ejected {
                format!("EJECTED: {}", m.ejection_reason)
            } else if !m.healthy {
                "down (probes fail)".to_string()
            } else {
                "serving".to_string()
            };
            crate::outln!(
                "{:<10} {:>6} {:<24} {:>10.2} {:>9.2} {:>7} {:>8} {:>10}  {state}",
                c.name,
                m.member_id,
                m.endpoint,
                m.latency_ms,
                m.probe_ms,
                m.pending,
                m.failures_in_a_row,
                m.applied_index
            );
        }
    }
}

/// Prints the tenant moves in flight as the cells record them: a tenant a cell
/// expects (being copied and tailed into it) or has fenced (writes refused
/// until the cut-over). A cell that cannot be asked is named, not fatal.
async fn show_moves(args: &StatusArgs, cells: &[cellplane_proto::router::CellStatus]) {
    let mut lines = Vec::new();
    for c in cells {
        match ownership_of(args, c).await {
            Ok(own) => {
                for m in &own.incoming {
                    lines.push(format!(
                        "tenant {}: {} -> {} (copying: {} takes its writes until the fence)",
                        m.tenant, m.cell, own.cell, m.cell
                    ));
                }
                for m in &own.fenced {
                    lines.push(format!(
                        "tenant {}: {} -> {} (FENCED: its writes are refused until the cut-over \
                         to map version {})",
                        m.tenant, own.cell, m.cell, m.version
                    ));
                }
            }
            Err(e) => lines.push(format!("cell {}: moves not known: {e:#}", c.name)),
        }
    }
    if lines.is_empty() {
        crate::outln!("no tenant moves in flight");
        return;
    }
    crate::outln!("moves in flight (`cellplane tenant moves` for their records):");
    for l in lines {
        crate::outln!("  {l}");
    }
}

/// Cell `c`'s ownership record, from the first member that answers.
async fn ownership_of(
    args: &StatusArgs,
    c: &cellplane_proto::router::CellStatus,
) -> anyhow::Result<cellplane_proto::cell::ShowOwnershipResponse> {
    use cellplane_proto::cell::ShowOwnershipRequest;
    use cellplane_proto::cell::ownership_client::OwnershipClient;
    let mut last = anyhow::anyhow!("no member listed");
    for m in &c.members {
        let shown = async {
            let ch = args
                .tls
                .endpoint(&m.endpoint)?
                .connect_timeout(std::time::Duration::from_secs(1))
                .timeout(std::time::Duration::from_secs(2))
                .connect()
                .await?;
            let r = OwnershipClient::new(ch)
                .show(ShowOwnershipRequest {})
                .await?;
            anyhow::Ok(r.into_inner())
        };
        match shown.await {
            Ok(own) => return Ok(own),
            Err(e) => last = e,
        }
    }
    Err(last)
}
