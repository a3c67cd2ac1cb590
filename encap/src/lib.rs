//! ferry's wire layer: VXLAN and Geneve encapsulation and decapsulation, the headers they carry,
//! checksums, ECN across the tunnel, and ICMP errors toward pods.
//!
//! Pure functions over byte buffers: no I/O, no threads, no logging, and no allocation on the
//! per-packet path. Two sides meet here:
//!
//! - **Setup** (control thread): [`TunnelTemplate::new`] builds each remote node's outer headers
//!   once; [`DecapConfig`] describes what this node accepts.
//! - **Hot path** (workers): [`flow::classify`] parses an inner frame once; [`encap()`] copies a
//!   template into the frame's headroom and patches it; [`decap()`] validates and strips the outer
//!   headers; [`offload::complete_checksum`] finishes checksums a veth left undone;
//!   [`icmp::build_error`] answers packets that cannot be forwarded; [`gso::Segmenter`] cuts a
//!   tap's GSO super-packets (behind a [`wire::virtio_net::VirtioNetHdr`]) into wire-sized
//!   segments and [`gro::Coalescer`] merges received segments back, as Linux's GSO and GRO do.
//!
//! Every failure on the hot path is a [`DropReason`], a `#[repr(u8)]` enum the data plane counts
//! per reason. A pipeline stage reports its decision as a [`Verdict`].

pub mod checksum;
pub mod decap;
mod drop;
pub mod ecn;
pub mod encap;
pub mod flow;
mod frame;
pub mod gro;
pub mod gso;
pub mod icmp;
pub mod offload;
pub mod template;
pub mod wire;

pub use decap::{DecapConfig, Decapped, decap, decap_payload};
pub use drop::DropReason;
pub use encap::{encap, encap_with};
pub use frame::FrameBuf;
pub use template::{Dscp, Family, TemplateError, TemplateParams, TunnelKind, TunnelTemplate};
pub use wire::ethernet::MacAddr;

/// What a pipeline stage (classify, policy, service, route, encap) decided for a packet.
///
/// `E` is the egress the data plane forwards to (a port, a queue); this crate does not know ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<E> {
    /// Transmit the (rewritten) frame on this egress.
    Forward(E),
    /// The frame was rewritten into a reply (ARP reply, ICMP error) for the port it came from.
    Reply,
    /// Drop the frame and count it under this reason.
    Drop(DropReason),
}

impl<E> From<DropReason> for Verdict<E> {
    fn from(reason: DropReason) -> Self {
        Verdict::Drop(reason)
    }
}
