//! Publication (control side -> data plane): what the engine hands over after each batch that
//! changed something.
//!
//! [`Publish`] is the seam: the control thread calls it with the whole table and the batch's diff.
//! [`TablesPublisher`](crate::TablesPublisher) compiles it into the data plane's tables, on the
//! control thread, never on a worker.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::engine::Diff;
use crate::model::Route;

/// What the engine publishes after a batch that changed the table.
#[derive(Debug, Clone, Copy)]
pub struct RouteTable<'a> {
    /// Increments with every publication.
    pub generation: u64,
    /// Every installed CIDR and its route.
    pub routes: &'a BTreeMap<IpNet, Route>,
    /// What changed since the previous publication.
    pub diff: &'a Diff,
}

/// Receives tables from the control thread. Runs on the control thread: keep it short (compile,
/// swap, return).
pub trait Publish: Send + 'static {
    /// Publishes a new table.
    fn publish(&mut self, table: &RouteTable<'_>);

    /// Publishes a new set of services (the whole set). The default ignores them (a publisher
    /// without a data plane).
    fn services(&mut self, _services: &[ferry_tables::ServiceSpec]) {}

    /// Namespaces, pods or NetworkPolicies changed: `changed` lists the kinds and keys whose
    /// effective object in `store` differs from the previous call's. The default ignores them (a
    /// publisher without a data plane).
    fn objects(&mut self, _store: &crate::policy::PolicyStore, _changed: &[(crate::model::ObjectKind, String)]) {}

    /// Publishes a change to the services: only the changed ones are recompiled. The default
    /// ignores it.
    fn services_changed(&mut self, _delta: &crate::model::ServiceDelta) {}
}
