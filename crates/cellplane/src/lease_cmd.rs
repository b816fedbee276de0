//! `cellplane lease`: grant, keep alive, inspect, list and revoke leases.
//!
//! Lease IDs are printed and read in hex, as etcdctl does.

use anyhow::Context;
use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest,
};

use crate::client::TargetArgs;

#[derive(clap::Args, Debug)]
pub struct LeaseArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(subcommand)]
    pub command: LeaseCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum LeaseCmd {
    /// Create a lease with a TTL in seconds. Through a router, name the tenant
    /// (`--tenant`): the lease lives in that tenant's cell.
    Grant { ttl: i64 },
    /// Keep a lease alive until interrupted (or once with --once).
    Keepalive {
        #[arg(value_parser = parse_lease_id)]
        id: i64,
        #[arg(long)]
        once: bool,
    },
    /// Show a lease's remaining and granted TTL, and with --keys its keys.
    Ttl {
        #[arg(value_parser = parse_lease_id)]
        id: i64,
        #[arg(long)]
        keys: bool,
    },
    /// Revoke a lease, deleting its keys.
    Revoke {
        #[arg(value_parser = parse_lease_id)]
        id: i64,
    },
    /// List every lease.
    List,
}

/// Parses a lease ID in hex (`694d77aa9e38260f`, with or without `0x`).
pub fn parse_lease_id(s: &str) -> Result<i64, String> {
    let digits = s.trim().trim_start_matches("0x");
    let id = u64::from_str_radix(digits, 16)
        .map_err(|_| format!("`{s}` is not a lease ID (hex, as `lease grant` prints it)"))?;
    i64::try_from(id).map_err(|_| format!("`{s}`: lease IDs are positive 63-bit numbers"))
}

pub async fn run(args: LeaseArgs) -> anyhow::Result<()> {
    let streaming = matches!(args.command, LeaseCmd::Keepalive { .. });
    let mut client = LeaseClient::new(args.target.connect(streaming).await?);
    match args.command {
        LeaseCmd::Grant { ttl } => {
            if ttl <= 0 {
                anyhow::bail!("TTL must be a positive number of seconds, got {ttl}");
            }
            let r = client
                .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                .await
                .context("lease grant failed")?
                .into_inner();
            crate::outln!("lease {:016x} granted with TTL({}s)", r.id, r.ttl);
        }
        LeaseCmd::Keepalive { id, once } => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut responses = client
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .context("lease keep-alive failed")?
                .into_inner();
            loop {
                tx.send(LeaseKeepAliveRequest { id })
                    .await
                    .context("keep-alive stream closed")?;
                let r = tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    r = responses.message() => r.context("keep-alive failed")?,
                };
                let Some(r) = r else {
                    anyhow::bail!("the server ended the keep-alive stream");
                };
                if r.ttl <= 0 {
                    anyhow::bail!("lease {id:016x} expired or was revoked");
                }
                crate::outln!("lease {id:016x} keepalived with TTL({})", r.ttl);
                if once {
                    return Ok(());
                }
                // Renew at a third of the TTL, as etcd's client does.
                let wait = std::time::Duration::from_millis((r.ttl as u64 * 1000 / 3).max(500));
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        LeaseCmd::Ttl { id, keys } => {
            let r = client
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys })
                .await
                .context("lease time-to-live failed")?
                .into_inner();
            if r.ttl < 0 {
                crate::outln!("lease {id:016x} already expired");
            } else {
                crate::out!(
                    "lease {id:016x} granted with TTL({}s), remaining({}s)",
                    r.granted_ttl,
                    r.ttl
                );
                if keys {
                    let names: Vec<String> = r
                        .keys
                        .iter()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .collect();
                    crate::out!(", attached keys([{}])", names.join(" "));
                }
                crate::outln!();
            }
        }
        LeaseCmd::Revoke { id } => {
            client
                .lease_revoke(LeaseRevokeRequest { id })
                .await
                .context("lease revoke failed")?;
            crate::outln!("lease {id:016x} revoked");
        }
        LeaseCmd::List => {
            let r = client
                .lease_leases(LeaseLeasesRequest {})
                .await
                .context("lease list failed")?
                .into_inner();
            crate::outln!("found {} leases", r.leases.len());
            for l in r.leases {
                crate::outln!("{:016x}", l.id);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_lease_id;

    #[test]
    fn lease_ids_are_hex() {
        assert_eq!(parse_lease_id("694d77aa9e38260f"), Ok(0x694d77aa9e38260f));
        assert_eq!(parse_lease_id("0x10"), Ok(16));
        assert!(parse_lease_id("zz").unwrap_err().contains("not a lease ID"));
        assert!(parse_lease_id("ffffffffffffffff").is_err());
    }
}
