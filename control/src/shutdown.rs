//! Waiting for the control plane's shutdown signal (control side): a `watch` channel that turns
//! true once, shared by the sources, the engine task and the metrics server.

use std::time::Duration;

use tokio::sync::watch;

/// Resolves once shutdown is asked for (or the control plane is gone). Holds no guard across
/// awaits, so futures using it stay `Send`.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Sleeps for `d` unless shutdown comes first; returns true on shutdown.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stopped(shutdown) => true,
    }
}
