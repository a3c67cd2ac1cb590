//! A worker's AF_XDP frame memory: one xsk-rs UMEM shared by all of that worker's sockets
//! (created on the setup side; [`FrameMem`] access and [`XskMem::move_to_front`] are hot path).
//!
//! Frame `i` is the data segment of UMEM chunk `i`: it starts where the kernel writes received
//! packets (after the 256-byte XDP headroom) and where xsk-rs transmits from, and runs to the end
//! of the chunk. A table of xsk-rs [`FrameDesc`]s, one per frame, is built once and shared with
//! the ports (read-only), so a [`FrameId`] turns into a descriptor with one index and a descriptor
//! into a [`FrameId`] with one shift.

use std::num::NonZeroU32;
use std::slice;
use std::sync::Arc;

use xsk_rs::config::{FrameSize, QueueSize, UmemConfig};
use xsk_rs::{FrameDesc, Umem};

use super::error::{XskError, classify_probe, classify_umem};
use crate::frame::{FrameId, FrameMem, Pkt};
use crate::xdp::sys::{RealSys, Sys};

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
    /// Bytes per UMEM chunk, a power of two from 2048 to 4096 (larger only with huge pages); the
    /// frame for packets is this minus the kernel's 256-byte XDP headroom.
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
    umem: Umem,
    descs: Arc<[FrameDesc]>,
    data_size: usize,
    cfg: XskMemConfig,
    handle: XskMemHandle,
}

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

        // Every table entry spans its whole data segment, so `frame` can hand out the segment.
        for d in &mut descs {
            // SAFETY: `d` is a descriptor of `umem`, just created; no other view of the frame exists
            // and the kernel holds no frame yet.
            unsafe { umem.data_mut(d) }.cursor().set_pos(usize::MAX);
        }
        let data_size = descs.first().map_or(0, |d| d.lengths().data());
        tracing::debug!(frames = cfg.frame_count, frame_size = cfg.frame_size, data_size, "created UMEM");
        let descs: Arc<[FrameDesc]> = descs.into();
        let shift = cfg.frame_size.trailing_zeros();
        let handle = XskMemHandle { umem: umem.clone(), descs: Arc::clone(&descs), shift, cfg };
        Ok(XskMem { umem, descs, data_size, cfg, handle })
    }

    /// The configuration the memory was made with.
    pub fn config(&self) -> &XskMemConfig {
        &self.cfg
    }

    /// A handle for opening ports on this memory from another thread.
    pub fn handle(&self) -> &XskMemHandle {
        &self.handle
    }

    /// Move `pkt` to the start of its frame (xsk-rs transmits from there) and return it as moved.
    /// A packet already at offset 0 is returned unchanged, without touching memory.
    ///
    /// # Panics
    /// If the packet's frame or range is outside this memory.
    #[inline]
    pub fn move_to_front(&mut self, pkt: Pkt) -> Pkt {
        if pkt.offset == 0 {
            return pkt;
        }
        self.frame_mut(pkt.frame).copy_within(pkt.range(), 0);
        Pkt { offset: 0, ..pkt }
    }

    /// The descriptor that transmits `pkt`, after moving the packet to the front of its frame if
    /// it is not there (one view of the frame for both).
    ///
    /// # Panics
    /// If the packet's frame or range is outside this memory.
    #[inline]
    pub(super) fn tx_desc(&mut self, pkt: Pkt) -> FrameDesc {
        let mut d = self.descs[pkt.frame.0 as usize];
        // SAFETY: `d` is a copy of this UMEM's descriptor for a frame the caller owns (the kernel
        // does not hold it), spanning the frame's data segment; `&mut self` rules out any other
        // view of it through this value.
        let mut data = unsafe { self.umem.data_mut(&mut d) };
        if pkt.offset != 0 {
            data.contents_mut().copy_within(pkt.range(), 0);
        }
        data.cursor().set_pos(usize::from(pkt.len));
        d
    }
}

impl FrameMem for XskMem {
    fn frame_size(&self) -> usize {
        self.data_size
    }

    fn frame_count(&self) -> u32 {
        self.descs.len() as u32
    }

    #[inline]
    fn frame(&self, id: FrameId) -> &[u8] {
        let d = &self.descs[id.0 as usize];
        // SAFETY: `d` is one of this UMEM's descriptors and spans exactly its frame's data segment,
        // so the slice stays inside the mapping, which lives as long as `self.umem`. The kernel
        // writes a frame only while it sits in a fill ring, and the `Port` contract keeps such a
        // frame away from the worker; `&self` rules out a writable view through this value.
        unsafe { self.umem.data(d) }.contents()
    }

    #[inline]
    fn frame_mut(&mut self, id: FrameId) -> &mut [u8] {
        let mut d = self.descs[id.0 as usize];
        // SAFETY: as in `frame`; `&mut self` rules out any other view through this value.
        let mut data = unsafe { self.umem.data_mut(&mut d) };
        let bytes = data.contents_mut();
        let (ptr, len) = (bytes.as_mut_ptr(), bytes.len());
        // SAFETY: `ptr..ptr + len` is this frame's data segment inside the UMEM mapping, which lives
        // as long as `self.umem`. xsk-rs ties its view to a local descriptor copy, so the slice is
        // rebuilt here with the lifetime of `&mut self`, which keeps it exclusive.
        unsafe { slice::from_raw_parts_mut(ptr, len) }
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
