//! ferry's data plane: frame memory, batch ports, the forwarding pipeline and the pinned
//! poll-mode workers that run it.
//!
//! Setup code (opening ports, loading XDP programs, starting workers) lives apart from the
//! per-packet path (`frame`, `port`, the pipeline); each module's doc says which side it is on.

pub mod conntrack;
pub mod counters;
pub mod flows;
pub mod frame;
pub mod kernel;
pub mod nat;
pub mod neighbour;
pub mod pipeline;
pub mod policy;
pub mod port;
pub mod related;
pub mod service;
pub mod trace;
pub mod worker;
pub mod xdp;
