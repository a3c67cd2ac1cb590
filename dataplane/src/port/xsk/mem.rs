//! A worker's AF_XDP frame memory: one xsk-rs UMEM shared by all of that worker's sockets
//! (created on the setup side; [`FrameMem`] access and [`XskMem::addr`] are hot path).
//!
//! Frame `i` is the whole of UMEM chunk `i`. The kernel writes a received packet
//! [`RX_HEADROOM`] bytes in (the XDP headroom, in copy and zero-copy mode alike), so every packet
//! arrives with room in front of it: encapsulation prepends the outer headers there, in place, and
//! decapsulation just moves the packet's offset. Ports transmit from the packet's own offset
//! (`super::txring`), so no packet moves on either path. A table of xsk-rs [`FrameDesc`]s, one per
//! frame, is built once and shared with the ports (read-only) for the fill ring, so a [`FrameId`]
//! turns into a descriptor with one index and a descriptor address into a [`FrameId`] and an
//! offset with a shift and a mask.

use std::num::NonZeroU32;
use std::ptr::NonNull;
use std::slice;
use std::sync::Arc;

use xsk_rs::config::{FrameSize, QueueSize, UmemConfig};
use xsk_rs::{FrameDesc, Umem};

use super::error::{XskError, classify_probe, classify_umem};
use crate::frame::{FrameId, FrameMem, Pkt};
use crate::xdp::sys::{RealSys, Sys};

/// Where a received packet starts in its frame: the kernel's `XDP_PACKET_HEADROOM` (ferry registers
/// the UMEM with no headroom of its own). Encapsulation needs at most 70 bytes of it (VXLAN over
/// IPv6) plus Geneve options.
pub const RX_HEADROOM: u16 = 256;

/// How sockets on this memory move frames: the first socket bound on a UMEM decides for all of
/// them (the kernel binds the others with the first one's mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BindMode {
    /// Zero-copy where the driver supports it, copy otherwise (the kernel decides).
    #[default]
    Auto,
    /// Always copy (works on every interface, veth included).
    Copy,
    /// Always zero-copy; binding fails where the driver cannot.
    ZeroCopy,
}

/// The shape of a worker's frame memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskMemConfig {
    /// Number of frames. Enough for every port's fill ring, every port's transmit ring, and one
    /// batch in flight: a port keeps its fill ring full from the free frames.
    pub frame_count: u32,
    /// Bytes per UMEM chunk, a power of two from 2048 to 4096 (larger only with huge pages): the
    /// frame. Received packets start [`RX_HEADROOM`] bytes in, so they can be this minus 256 long.
    pub frame_size: u32,
    /// Fill ring entries per (interface, queue), a power of two.
    pub fill_ring: u32,
    /// Completion ring entries per (interface, queue), a power of two.
    pub comp_ring: u32,
    /// Copy or zero-copy.
    pub bind: BindMode,
    /// Let the kernel sleep and be woken (`XDP_USE_NEED_WAKEUP`): saves CPU when idle and is what
    /// makes copy-mode transmission explicit (one `sendto` kick per batch).
    pub need_wakeup: bool,
    /// Back the UMEM with huge pages (`vm.nr_hugepages` must have room for it).
    pub huge_pages: bool,
}

impl Default for XskMemConfig {
    fn default() -> Self {
        XskMemConfig {
            frame_count: 4096,
            frame_size: 2048,
            fill_ring: 1024,
            comp_ring: 1024,
            bind: BindMode::Auto,
            need_wakeup: true,
            huge_pages: false,
        }
    }
}

impl XskMemConfig {
    /// The UMEM's size in bytes.
    pub fn bytes(&self) -> usize {
        self.frame_count as usize * self.frame_size as usize
    }

    fn validate(&self) -> Result<(), XskError> {
        let bad = |problem: String, fix| Err(XskError::InvalidConfig { problem, fix });
        if self.frame_count == 0 {
            return bad("the UMEM has 0 frames".to_owned(), "give it at least the ports' ring sizes in frames");
        }
        if !self.frame_size.is_power_of_two() || !(2048..=65536).contains(&self.frame_size) {
            return bad(
                format!("frame size {} is not a power of two from 2048 to 65536", self.frame_size),
                "use 2048 or 4096",
            );
        }
        for (name, size) in [("fill ring", self.fill_ring), ("completion ring", self.comp_ring)] {
            if !size.is_power_of_two() {
                return bad(format!("the {name} size {size} is not a power of two"), "use a power of two such as 1024");
            }
        }
        Ok(())
    }
}

/// One worker's UMEM and its frames.
#[derive(Debug)]
pub struct XskMem {
    /// The first byte of the UMEM mapping (kept alive by `handle`'s UMEM).
    base: NonNull<u8>,
    frame_size: usize,
    frame_count: u32,
    shift: u32,
    cfg: XskMemConfig,
    handle: XskMemHandle,
}

// SAFETY: `base` points into the UMEM mapping that `handle` (which is `Send`) keeps alive wherever the
// value goes; frames are reached only through `&self`/`&mut self`, so moving the memory to its
// worker's thread moves its only accessor with it.
unsafe impl Send for XskMem {}

/// What opening a socket on a worker's UMEM needs, and nothing that reaches a frame's bytes: it
/// can be cloned and sent to a setup thread that opens ports for a running worker
/// ([`super::XskPort::open_shared`]).
#[derive(Debug, Clone)]
pub struct XskMemHandle {
    umem: Umem,
    descs: Arc<[FrameDesc]>,
    shift: u32,
    cfg: XskMemConfig,
}

impl XskMemHandle {
    /// The configuration the memory was made with.
    pub fn config(&self) -> &XskMemConfig {
        &self.cfg
    }

    pub(super) fn umem(&self) -> &Umem {
        &self.umem
    }

    pub(super) fn descs(&self) -> Arc<[FrameDesc]> {
        Arc::clone(&self.descs)
    }

    pub(super) fn shift(&self) -> u32 {
        self.shift
    }
}

impl XskMem {
    /// Create and register the UMEM.
    ///
    /// # Errors
    /// A bad configuration ([`XskError::InvalidConfig`]); no AF_XDP in the kernel
    /// ([`XskError::NoAfXdp`]); missing privileges ([`XskError::NotPermitted`]); the
    /// locked-memory limit ([`XskError::UmemRefused`]); no memory ([`XskError::UmemMemory`]).
    pub fn new(cfg: XskMemConfig) -> Result<Self, XskError> {
        Self::new_with(&RealSys, cfg)
    }

    pub(crate) fn new_with(sys: &impl Sys, cfg: XskMemConfig) -> Result<Self, XskError> {
        cfg.validate()?;
        // Probe first, so that EPERM from the UMEM registration below can only mean RLIMIT_MEMLOCK.
        sys.probe_af_xdp().map_err(classify_probe)?;

        let invalid = |problem: String| XskError::InvalidConfig { problem, fix: "see the UMEM configuration" };
        let frame_size = FrameSize::new(cfg.frame_size).map_err(|e| invalid(e.to_string()))?;
        let fill = QueueSize::new(cfg.fill_ring).map_err(|e| invalid(e.to_string()))?;
        let comp = QueueSize::new(cfg.comp_ring).map_err(|e| invalid(e.to_string()))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(frame_size)
            .fill_queue_size(fill)
            .comp_queue_size(comp)
            .frame_headroom(0)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let count = NonZeroU32::new(cfg.frame_count).ok_or_else(|| invalid("0 frames".to_owned()))?;
        let (umem, mut descs) = Umem::new(umem_cfg, count, cfg.huge_pages).map_err(|e| {
            let source = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error)
                .map_or_else(|| std::io::Error::other(e.to_string()), std::io::Error::from_raw_os_error);
            classify_umem(source, cfg.bytes(), cfg.huge_pages)
        })?;

        // The mapping's first byte: xsk-rs places a descriptor's data segment at the mapping's start
        // plus the descriptor's address.
        let first = descs.first_mut().ok_or_else(|| invalid("0 frames".to_owned()))?;
        let first_addr = first.addr();
        if first_addr != usize::from(RX_HEADROOM) {
            return Err(invalid(format!("xsk-rs placed frame 0's data at {first_addr}, not {RX_HEADROOM}")));
        }
        // SAFETY: `first` is a descriptor of `umem`, just created; the kernel holds no frame yet.
        let data = unsafe { umem.data_mut(first) }.contents_mut().as_mut_ptr();
        // SAFETY: the data segment starts `first_addr` bytes into the mapping, so stepping back stays
        // inside it, at its first byte.
        let base = NonNull::new(unsafe { data.sub(first_addr) })
            .ok_or_else(|| invalid("the UMEM mapping is null".to_owned()))?;
        tracing::debug!(frames = cfg.frame_count, frame_size = cfg.frame_size, "created UMEM");
        let descs: Arc<[FrameDesc]> = descs.into();
        let shift = cfg.frame_size.trailing_zeros();
        let handle = XskMemHandle { umem, descs: Arc::clone(&descs), shift, cfg };
        Ok(XskMem { base, frame_size: cfg.frame_size as usize, frame_count: cfg.frame_count, shift, cfg, handle })
    }

    /// The configuration the memory was made with.
    pub fn config(&self) -> &XskMemConfig {
        &self.cfg
    }

    /// A handle for opening ports on this memory from another thread.
    pub fn handle(&self) -> &XskMemHandle {
        &self.handle
    }

    /// The UMEM address of `pkt`'s first byte: what a transmit descriptor names.
    #[inline]
    pub fn addr(&self, pkt: Pkt) -> u64 {
        (u64::from(pkt.frame.0) << self.shift) + u64::from(pkt.offset)
    }

    /// The frame and offset a descriptor address names (received and completed descriptors).
    #[inline]
    pub(super) fn locate(shift: u32, addr: u64) -> (FrameId, u16) {
        // Offsets are below the frame size, at most 65536 (checked in `validate`); a frame size of
        // exactly 65536 would need an offset of 65536 to overflow, past the chunk's last byte.
        (FrameId((addr >> shift) as u32), (addr & ((1 << shift) - 1)) as u16)
    }
}

impl FrameMem for XskMem {
    fn frame_size(&self) -> usize {
        self.frame_size
    }

    fn frame_count(&self) -> u32 {
        self.frame_count
    }

    #[inline]
    fn frame(&self, id: FrameId) -> &[u8] {
        assert!(id.0 < self.frame_count, "frame {} of {}", id.0, self.frame_count);
        // SAFETY: chunk `id` lies inside the mapping (checked above), which lives as long as
        // `self.handle`. The kernel writes a frame only while it sits in a fill ring, and the `Port`
        // contract keeps such a frame away from the worker; `&self` rules out a writable view
        // through this value.
        unsafe { slice::from_raw_parts(self.base.as_ptr().add((id.0 as usize) << self.shift), self.frame_size) }
    }

    #[inline]
    fn frame_mut(&mut self, id: FrameId) -> &mut [u8] {
        assert!(id.0 < self.frame_count, "frame {} of {}", id.0, self.frame_count);
        // SAFETY: as in `frame`; `&mut self` rules out any other view through this value.
        unsafe { slice::from_raw_parts_mut(self.base.as_ptr().add((id.0 as usize) << self.shift), self.frame_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_problem() {
        let err =
            XskMemConfig { frame_size: 3000, ..Default::default() }.validate().expect_err("3000 is not a power of two");
        assert!(err.to_string().contains("frame size 3000"), "{err}");
        let err = XskMemConfig { fill_ring: 1000, ..Default::default() }.validate().expect_err("1000");
        assert!(err.to_string().contains("fill ring size 1000"), "{err}");
        let err = XskMemConfig { frame_count: 0, ..Default::default() }.validate().expect_err("0 frames");
        assert!(err.to_string().contains("0 frames"), "{err}");
        XskMemConfig::default().validate().expect("the default is valid");
        assert_eq!(XskMemConfig::default().bytes(), 8 << 20);
    }
}
