//! Runs one router until shut down.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use cellplane_proto::discovery::discovery_server::DiscoveryServer;
use cellplane_proto::etcdserverpb::auth_server::AuthServer;
use cellplane_proto::etcdserverpb::lease_server::LeaseServer;
use cellplane_proto::etcdserverpb::watch_server::WatchServer;
use cellplane_proto::router::router_admin_server::RouterAdminServer;
use cellplane_security::ClientAuth;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::admin::{Admin, AdminService};
use crate::auth::{AuthSetupError, Authenticator};
use crate::cell_client::Cells;
use crate::config::RouterConfig;
use crate::core::Core;
use crate::directory::{self, Directory};
use crate::map_source::{self, ActiveMap, MapHolder, MapSource};
use crate::metrics::{CallMetrics, RouterMetrics, StateCollector};
use crate::services::auth::RouterAuth;
use crate::services::discovery::RouterDiscovery;
use crate::services::kv::RouterKv;
use crate::services::lease::RouterLease;
use crate::services::watch::RouterWatch;
use crate::status_page::{self, MovesCache};

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
    let calls = CallMetrics::default();
    let cells = Cells::new(
        s.pool.clone(),
        limits,
        client_tls.clone(),
        calls.clone(),
        shutdown.child_token(),
    );
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
    // The status page reads the directory with a client of its own.
    let page_directory = Directory::new(
        &config.directory_endpoints,
        Duration::from_millis(s.directory_timeout_ms),
        client_tls.as_ref(),
    )
    .map_err(RouterError::Config)?;
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
    let metrics = Arc::new(RouterMetrics::new(
        &calls,
        StateCollector {
            maps: holder.clone(),
            cells: cells.clone(),
            auth: auth.clone(),
        },
    ));
    let http = Http {
        id: config.id,
        admin,
        metrics,
        moves: Arc::new(MovesCache::new(page_directory)),
    };
    tasks.spawn(serve_http(listeners.http, http, shutdown.clone()));
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

/// What the router's HTTP port serves from.
#[derive(Clone)]
struct Http {
    id: u64,
    admin: Arc<Admin>,
    metrics: Arc<RouterMetrics>,
    moves: Arc<MovesCache>,
}

/// Connections the HTTP port serves at once; more wait in the kernel's backlog.
const HTTP_CONNECTIONS: usize = 64;

/// A request's headers must arrive within this, or its connection is closed, and
/// a connection serves one request: a client that connects and sends nothing, or
/// idles, holds one of [`HTTP_CONNECTIONS`] for no longer than this.
const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP port: `/` (the status page), `/metrics`, `/healthz`, `/readyz` (a
/// map is loaded, which is always true once serving: the router never serves
/// without one).
async fn serve_http(listener: TcpListener, http: Http, shutdown: CancellationToken) {
    let app = axum::Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .with_state(http);
    let slots = Arc::new(Semaphore::new(HTTP_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let sock = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of file descriptors, say: let some close before trying again.
                    tracing::warn!(error = %e, "HTTP port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(sock, app.clone(), slot, shutdown.clone()));
    }
}

async fn serve_connection(
    sock: tokio::net::TcpStream,
    app: axum::Router,
    _slot: tokio::sync::OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HTTP_HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(
            hyper_util::rt::TokioIo::new(sock),
            hyper_util::service::TowerToHyperService::new(app),
        );
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HTTP_HEADER_TIMEOUT, conn).await;
        }
    }
}

async fn metrics(State(h): State<Http>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.render(),
    )
}

async fn status_page(State(h): State<Http>) -> impl IntoResponse {
    let moves = h.moves.get().await;
    let page = status_page::render(h.id, &h.admin.status(), &moves);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page needs nothing but itself: a browser refuses anything else.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        page,
    )
}
