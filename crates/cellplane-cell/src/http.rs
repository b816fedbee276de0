//! The member's own HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the
//! process is up) and `/readyz` (the member is in a cell with a known leader and has
//! applied its log). Served from this process alone.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::node::Shared;

/// A follower this many entries behind its log end still counts as caught up.
const READY_MAX_LAG: u64 = 1_000;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Whether this member can serve requests, and if not, why.
pub fn readiness(s: &Shared) -> Result<(), String> {
    let m = s.raft.metrics().borrow().clone();
    m.current_leader.ok_or("no leader known")?;
    let last = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    if last.saturating_sub(applied) > READY_MAX_LAG {
        return Err(format!("catching up: applied {applied} of {last}"));
    }
    Ok(())
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match readiness(&s) {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
