//! Turns SIGINT and SIGTERM into a cancellation.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = token.cancelled() => return,
    }
    token.cancel();
}

/// Cancels `token` once this process's parent is no longer `parent` (it died and
/// the process was re-parented).
pub async fn cancel_when_orphaned(parent: u32, token: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        if nix::unistd::getppid().as_raw() as u32 != parent {
            tracing::warn!(parent, "supervisor is gone: shutting down");
            token.cancel();
            return;
        }
    }
}

/// The shutdown token of a long-running process: cancelled on SIGINT or SIGTERM,
/// and, when `parent` is given (a child of `cellplane up`), once that parent is
/// gone.
pub fn process_shutdown(parent: Option<u32>) -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(cancel_on_signal(token.clone()));
    if let Some(parent) = parent {
        tokio::spawn(cancel_when_orphaned(parent, token.clone()));
    }
    token
}
