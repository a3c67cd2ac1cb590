//! ferry's forwarding tables.
//!
//! - [`lpm`]: longest-prefix match structures (control builds, workers look up).
//! - [`neigh`]: underlay neighbours with static and aging entries (control side).

pub mod lpm;
pub mod neigh;
