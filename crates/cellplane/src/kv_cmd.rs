//! `cellplane kv`: put, get, delete and watch keys through a router or a cell.

use anyhow::Context;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, watch_request,
};
use cellplane_proto::mvccpb::event::EventType;

use crate::client::TargetArgs;
use crate::lease_cmd::parse_lease_id;

#[derive(clap::Args, Debug)]
pub struct KvArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(subcommand)]
    pub command: KvCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum KvCmd {
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Attach the key to this lease (hex ID, as `lease grant` prints it).
        #[arg(long, value_parser = parse_lease_id)]
        lease: Option<i64>,
    },
    /// Read a key, or every key under a prefix.
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Read at this revision instead of the newest.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Serve from the member asked, without a linearizable read barrier.
        #[arg(long)]
        serializable: bool,
    },
    /// Delete a key, or every key under a prefix.
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Print every change to a key (or prefix) until interrupted.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Start from this revision (replaying history), instead of now.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Print each change's previous value too.
        #[arg(long)]
        prev_kv: bool,
    },
}

use cellplane_proto::prefix_end;

fn range_end(key: &str, prefix: bool) -> Vec<u8> {
    if prefix {
        prefix_end(key.as_bytes())
    } else {
        Vec::new()
    }
}

pub async fn run(args: KvArgs) -> anyhow::Result<()> {
    let streaming = matches!(args.command, KvCmd::Watch { .. });
    let conn = args.target.connect(streaming).await?;
    match args.command {
        KvCmd::Put { key, value, lease } => {
            let r = KvClient::new(conn)
                .put(PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    lease: lease.unwrap_or(0),
                    ..Default::default()
                })
                .await
                .context("put failed")?
                .into_inner();
            let rev = r.header.map_or(0, |h| h.revision);
            crate::outln!("OK (revision {rev})");
        }
        KvCmd::Get {
            key,
            prefix,
            rev,
            serializable,
        } => {
            let end = range_end(&key, prefix);
            let r = KvClient::new(conn)
                .range(RangeRequest {
                    key: key.into_bytes(),
                    range_end: end,
                    revision: rev,
                    serializable,
                    ..Default::default()
                })
                .await
                .context("get failed")?
                .into_inner();
            for kv in r.kvs {
                crate::outln!("{}", String::from_utf8_lossy(&kv.key));
                crate::outln!("{}", String::from_utf8_lossy(&kv.value));
            }
        }
        KvCmd::Del { key, prefix } => {
            let end = range_end(&key, prefix);
            let r = KvClient::new(conn)
                .delete_range(DeleteRangeRequest {
                    key: key.into_bytes(),
                    range_end: end,
                    ..Default::default()
                })
                .await
                .context("delete failed")?
                .into_inner();
            crate::outln!("{}", r.deleted);
        }
        KvCmd::Watch {
            key,
            prefix,
            rev,
            prev_kv,
        } => watch(conn, key, prefix, rev, prev_kv).await?,
    }
    Ok(())
}

async fn watch(
    conn: crate::client::Conn,
    key: String,
    prefix: bool,
    rev: i64,
    prev_kv: bool,
) -> anyhow::Result<()> {
    let end = range_end(&key, prefix);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: key.into_bytes(),
                range_end: end,
                start_revision: rev,
                prev_kv,
                ..Default::default()
            },
        )),
    };
    // The request stream stays open (a closed one ends the watch on some servers).
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create)
        .await
        .context("watch: cannot queue the request")?;
    let mut stream = WatchClient::new(conn)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("watch failed")?
        .into_inner();
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            m = stream.message() => m.context("watch stream failed")?,
        };
        let Some(resp) = msg else {
            anyhow::bail!("the server ended the watch");
        };
        if resp.canceled {
            if resp.compact_revision > 0 {
                anyhow::bail!(
                    "watch canceled: revision {rev} is compacted; the oldest is {}",
                    resp.compact_revision
                );
            }
            anyhow::bail!("watch canceled: {}", resp.cancel_reason);
        }
        for e in resp.events {
            let kv = e.kv.unwrap_or_default();
            let key = String::from_utf8_lossy(&kv.key);
            if e.r#type == EventType::Delete as i32 {
                crate::outln!("DELETE {key} (revision {})", kv.mod_revision);
            } else {
                crate::outln!(
                    "PUT {key} {} (revision {})",
                    String::from_utf8_lossy(&kv.value),
                    kv.mod_revision
                );
            }
            if let Some(p) = e.prev_kv {
                crate::outln!("  previous: {}", String::from_utf8_lossy(&p.value));
            }
        }
    }
}
