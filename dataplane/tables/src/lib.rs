//! ferry's forwarding tables.
//!
//! - [`lpm`]: longest-prefix match structures (control builds, workers look up).

pub mod lpm;
