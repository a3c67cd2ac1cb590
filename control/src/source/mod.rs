//! Route sources (control side): each runs as a task on the control thread's runtime, turns what
//! it learns into [`Update`]s and sends them to the engine. A source survives its server going
//! away: it marks itself down, retries with backoff and resyncs in full when it is back, while
//! forwarding continues on the last published tables.

pub mod etcd;
pub mod kube;
pub mod kube_policy;
pub mod kube_services;
pub mod static_file;

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::model::Update;

/// An update and when the source saw it (the start of the convergence measurement).
#[derive(Debug)]
pub(crate) struct SourceEvent {
    pub(crate) seen: Instant,
    pub(crate) update: Update,
}

/// The engine is gone (the control plane is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the control plane's engine has stopped")]
pub(crate) struct EngineGone;

/// Where sources send their updates.
#[derive(Debug, Clone)]
pub(crate) struct EventTx(pub(crate) mpsc::Sender<SourceEvent>);

impl EventTx {
    pub(crate) async fn send(&self, seen: Instant, update: Update) -> Result<(), EngineGone> {
        self.0.send(SourceEvent { seen, update }).await.map_err(|_| EngineGone)
    }
}

/// Exponential backoff with jitter, for reconnecting.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    seed: u64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
        Backoff { min, max, next: min, seed }
    }

    /// The delay before the next attempt: doubles up to `max`, +-25% jitter so that many nodes
    /// do not reconnect in lock step.
    pub(crate) fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter only, not security.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let permille = 750 + self.seed % 501;
        base * u32::try_from(permille).unwrap_or(1000) / 1000
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert!((75..=125).contains(&delays[0]), "{delays:?}");
        assert!((150..=250).contains(&delays[1]), "{delays:?}");
        assert!((750..=1250).contains(&delays[5]), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
