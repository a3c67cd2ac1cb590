//! The `ferry` package's library: what the `ferry` and `ferry-cni` binaries share (setup side;
//! no per-packet work here).

pub mod admin;
pub mod agent;
pub mod cni;
pub mod install;
pub mod netlink;
pub mod pktgen;
