//! Runs one router until shut down.

use std::sync::Arc;
use std::time::Duration;

use cellplane_proto::discovery::discovery_server::DiscoveryServer;
use cellplane_proto::etcdserverpb::auth_server::AuthServer;
use cellplane_proto::etcdserverpb::lease_server::LeaseServer;
use cellplane_proto::etcdserverpb::watch_server::WatchServer;
use cellplane_proto::router::router_admin_server::RouterAdminServer;
use cellplane_security::ClientAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::admin::{Admin, AdminService};
use crate::auth::{AuthSetupError, Authenticator};
use crate::cell_client::Cells;
use crate::config::RouterConfig;
use crate::core::Core;
use crate::directory::{self, Directory};
use crate::map_source::{self, ActiveMap, MapHolder, MapSource};
use crate::services::auth::RouterAuth;
use crate::services::discovery::RouterDiscovery;
use crate::services::kv::RouterKv;
use crate::services::lease::RouterLease;
use crate::services::watch::RouterWatch;

pub struct RouterListeners {
    pub client: TcpListener,
    pub admin: TcpListener,
    pub http: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Source(#[from] map_source::SourceError),
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
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
    let client_tls = config.tls.as_ref().map(|t| t.client());
    let dir = Directory::new(
        &config.directory_endpoints,
        Duration::from_millis(s.directory_timeout_ms),
        client_tls.as_ref(),
    )
    .map_err(RouterError::Config)?;
    let initial = boot(&dir, &config).await?;
    let holder = MapHolder::new(initial.clone(), config.state_dir.clone());
    let limits = s.message_limits();
    let cells = Cells::new(s.pool.clone(), limits, client_tls, shutdown.child_token());
    cells.reconcile(&initial.map);
    let auth = Arc::new(Authenticator::new(config.auth.clone())?);
    if !auth.enabled() {
        tracing::warn!(
            "auth is off: a request acts for the tenant its metadata or keys name, unchecked \
             (the local default; set [auth] enabled = true in routers.toml)"
        );
    }
    if config.tls.is_none() {
        tracing::warn!("TLS is off: the router serves plaintext and dials cells in plaintext");
    }
    let core = Core::new(holder.clone(), cells.clone(), auth.clone());

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(follow_map(holder.clone(), cells.clone(), shutdown.clone()));
    tasks.spawn(directory::follow(
        dir,
        holder.clone(),
        Duration::from_millis(s.directory_poll_ms),
        shutdown.child_token(),
    ));
    tasks.spawn(auth.clone().reload_loop(shutdown.child_token()));

    let admin = Arc::new(Admin::new(
        holder.clone(),
        cells.clone(),
        auth.clone(),
        config.tls.is_some(),
    ));
    let client = server(&config, ClientAuth::Optional)?
        .add_service(RouterKv::new(
            core.clone(),
            s.max_request_bytes,
            limits.response,
        ))
        .add_service(
            WatchServer::new(RouterWatch::new(core.clone()))
                .max_decoding_message_size(s.max_request_bytes)
                .max_encoding_message_size(limits.response),
        )
        .add_service(
            LeaseServer::new(RouterLease::new(core.clone()))
                .max_decoding_message_size(s.max_request_bytes)
                .max_encoding_message_size(limits.response),
        )
        .add_service(
            DiscoveryServer::new(RouterDiscovery::new(core.clone()))
                .max_decoding_message_size(s.max_request_bytes)
                .max_encoding_message_size(limits.response),
        )
        .add_service(
            AuthServer::new(RouterAuth::new(auth.clone())).max_decoding_message_size(64 << 10),
        );
    let stop = shutdown.clone();
    let incoming =
        tonic::transport::server::TcpIncoming::from(listeners.client).with_nodelay(Some(true));
    tasks.spawn(async move {
        let r = client
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
    let admin_server = server(&config, ClientAuth::Required)?.add_service(admin_svc);
    tasks.spawn(async move {
        let r = admin_server
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "router admin server failed");
        }
    });
    tasks.spawn(serve_http(listeners.http, admin, shutdown.clone()));
    tasks.close();
    tracing::info!(
        router = config.id,
        tls = config.tls.is_some(),
        auth = auth.enabled(),
        "router serving"
    );
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    Ok(())
}

/// The map to start with: the directory's, else the last-known-good copy, else
/// the static map. A directory map the router cannot use is refused, not booted.
async fn boot(dir: &Directory, config: &RouterConfig) -> Result<ActiveMap, RouterError> {
    match dir.read().await {
        Ok((map, _)) => {
            tracing::info!(version = map.version, "booting with the directory's map");
            if let Err(e) = map_source::write_last_known_good(&config.state_dir, &map) {
                tracing::error!(error = %e, "cannot write the last-known-good map");
            }
            Ok(ActiveMap {
                map: Arc::new(map),
                source: MapSource::Directory,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "no usable map from the directory at boot");
            Ok(map_source::boot_map(&config.state_dir, &config.static_map)?)
        }
    }
}

/// Keeps the cells' clients in step with the map in force.
async fn follow_map(holder: MapHolder, cells: Arc<Cells>, stop: CancellationToken) {
    let mut maps = holder.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = maps.changed() => if changed.is_err() { return },
        }
        let active = maps.borrow_and_update().clone();
        cells.reconcile(&active.map);
    }
}

/// A server for one of the router's gRPC ports: TLS when configured, with a
/// client certificate optional (client port: a password works too) or required
/// (admin port).
fn server(config: &RouterConfig, auth: ClientAuth) -> Result<Server, RouterError> {
    let builder = Server::builder().tcp_nodelay(true);
    match &config.tls {
        Some(tls) => builder
            .tls_config(tls.server(auth))
            .map_err(|e| RouterError::Config(format!("TLS: {e}"))),
        None => Ok(builder),
    }
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
