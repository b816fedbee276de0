//! `cellplane status`: the map in force and every cell as a router sees it.

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
            .map(|m| format!("{}{}", m.endpoint, if m.healthy { "" } else { " (down)" }))
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
    Ok(())
}
