//! Wire formats: one file per header, each a typed view over bytes with a checked/unchecked
//! contract, a `Repr` with `parse`/`emit`, and its RFC diagram (hot path; no I/O, no allocation).
//!
//! ARP, NDP and ICMP are not re-implemented here: [`crate::icmp`] builds ICMP errors with
//! etherparse's types, and the data plane answers ARP/ND with smoltcp's (re-exported below).

pub mod ethernet;
pub mod geneve;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod virtio_net;
pub mod vxlan;

pub use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, Icmpv6Packet, Icmpv6Repr, NdiscRepr};
