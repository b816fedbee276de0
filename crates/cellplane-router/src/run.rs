//! Runs one router until shut down.

use std::sync::Arc;
use std::time::Duration;

use cellplane_proto::etcdserverpb::kv_server::KvServer;
use cellplane_proto::router::router_admin_server::RouterAdminServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, AdminService};
use crate::config::RouterConfig;
use crate::directory::{self, Directory};
use crate::map_source::{self, ActiveMap, MapHolder, MapSource};
use crate::server::{Pools, RouterKv};

pub struct RouterListeners {
    pub client: TcpListener,
    pub admin: TcpListener,
    pub http: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Source(#[from] map_source::SourceError),
    #[error("{0}")]
    Config(String),
}

/// Boots the map (directory, else last-known-good, else static) and serves until
/// `shutdown`.
pub async fn run(
    config: RouterConfig,
    listeners: RouterListeners,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let s = &config.settings;
    let dir = Directory::new(
        &config.directory_endpoints,
        Duration::from_millis(s.directory_timeout_ms),
    )
    .map_err(RouterError::Config)?;
    let initial = match dir.read().await {
        Ok((map, _)) => {
            tracing::info!(version = map.version, "booting with the directory's map");
            if let Err(e) = map_source::write_last_known_good(&config.state_dir, &map) {
                tracing::error!(error = %e, "cannot write the last-known-good map");
            }
            ActiveMap {
                map: Arc::new(map),
                source: MapSource::Directory,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no map from the directory at boot");
            map_source::boot_map(&config.state_dir, &config.static_map)?
        }
    };
    let holder = MapHolder::new(initial.clone(), config.state_dir.clone());
    let pools = Pools::new(s.pool.clone(), s.max_request_bytes, shutdown.child_token());
    pools.reconcile(&initial.map);

    let tasks = tokio_util::task::TaskTracker::new();
    // Keep the pools in step with the map.
    {
        let pools = pools.clone();
        let mut maps = holder.subscribe();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = maps.changed() => if changed.is_err() { return },
                }
                let active = maps.borrow_and_update().clone();
                pools.reconcile(&active.map);
            }
        });
    }
    tasks.spawn(directory::follow(
        dir,
        holder.clone(),
        Duration::from_millis(s.directory_poll_ms),
        shutdown.child_token(),
    ));

    let admin = Arc::new(Admin::new(holder.clone(), pools.clone()));
    let kv = KvServer::new(RouterKv::new(holder.clone(), pools.clone()))
        .max_decoding_message_size(s.max_request_bytes)
        .max_encoding_message_size(usize::MAX);
    let watch = cellplane_proto::etcdserverpb::watch_server::WatchServer::new(
        crate::watch_proxy::RouterWatch::new(holder.clone(), pools.clone()),
    );
    let lease = cellplane_proto::etcdserverpb::lease_server::LeaseServer::new(
        crate::lease_proxy::RouterLease::new(holder.clone(), pools.clone()),
    );
    let discovery = cellplane_proto::discovery::discovery_server::DiscoveryServer::new(
        crate::discovery_proxy::RouterDiscovery::new(
            holder.clone(),
            pools.clone(),
            Duration::from_millis(s.pool.request_timeout_ms),
        ),
    );
    let stop = shutdown.clone();
    let incoming =
        tonic::transport::server::TcpIncoming::from(listeners.client).with_nodelay(Some(true));
    tasks.spawn(async move {
        let r = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(kv)
            .add_service(watch)
            .add_service(discovery)
            .add_service(lease)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "router client server failed");
        }
    });
    let stop = shutdown.clone();
    let incoming =
        tonic::transport::server::TcpIncoming::from(listeners.admin).with_nodelay(Some(true));
    let admin_svc = RouterAdminServer::new(AdminService(admin.clone()));
    tasks.spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(admin_svc)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "router admin server failed");
        }
    });
    tasks.spawn(serve_http(listeners.http, admin, shutdown.clone()));
    tasks.close();
    tracing::info!(router = config.id, "router serving");
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    Ok(())
}

/// `/metrics`, `/healthz`, `/readyz` (a map is loaded, which is always true once
/// serving: the router never serves without one). A bare HTTP/1.0 responder: these
/// three fixed paths need nothing more.
async fn serve_http(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = match path {
                "/metrics" => ("200 OK", admin.metrics()),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" => ("200 OK", "ready\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
