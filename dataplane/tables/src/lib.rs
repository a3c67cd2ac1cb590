//! ferry's forwarding tables: what the workers look up for every packet, and how the control
//! thread changes them while traffic flows without ever making a worker wait.
//!
//! - **Shared types** (both sides; no AF_XDP, so `control` links this crate freely):
//!   [`desired`] describes what the tables should say; [`PortId`], [`NextHop`] and [`Route`] are
//!   what they say.
//! - **Control side**: [`Tables`] compiles a [`DesiredState`] plus the underlay [`neigh`]bours
//!   into an immutable [`Snapshot`] and publishes it ([`publish`]); [`lpm::RouteSet`] and the LPM
//!   builders do the compiling.
//! - **Hot path**: a worker keeps a [`Reader`], calls [`Reader::load`] once per batch (no lock, no
//!   shared write) and asks the snapshot [`Snapshot::route`] / [`Snapshot::routes_v4`],
//!   [`Snapshot::source_allowed`] and [`Snapshot::is_known_node`]. Old snapshots are freed on the
//!   control thread once no worker holds them.
//!
//! The LPM structure (a poptrie for both families) was chosen by measurement against DIR-24-8,
//! `ip_network_table` and a linear scan: `cargo bench --bench lpm` (lookups, bytes per prefix),
//! `--bench publish` and `--bench reader_latency` (publication) in the workspace root.

pub mod desired;
mod exact;
pub mod lpm;
pub mod neigh;
pub mod policy;
pub mod publish;
pub mod services;
mod snapshot;
mod tables;
mod types;

pub use desired::{DesiredState, LocalPod, RemoteNode, Underlay};
pub use publish::{Publisher, Reader};
pub use services::{
    Backend, EndpointSpec, ExternalSpec, Frontend, Protocol, Service, ServiceError, ServiceSpec, Services,
};
pub use snapshot::Snapshot;
pub use tables::{BuildError, Publication, Tables};
pub use types::{NextHop, PortId, Route};
