//! A socket's AF_XDP transmit ring, mapped by ferry itself (the mapping is set-up side; `produce`,
//! `pending` and `needs_wakeup` are hot path).
//!
//! xsk-rs 0.11 builds every transmit descriptor from a [`xsk_rs::FrameDesc`], whose address is
//! crate-private and always the start of a frame's data segment, so it cannot send a packet that
//! starts anywhere else in its frame. The kernel takes any address inside a chunk (in aligned mode
//! it checks only that the packet does not cross the chunk's end), so ferry maps the socket's
//! transmit ring a second time and writes `xdp_desc { addr, len }` itself: a packet is sent from
//! wherever encapsulation or decapsulation left it, and no byte moves.
//!
//! The ring is single-producer: once a port owns a [`TxRing`], xsk-rs's own `TxQueue` for the
//! socket must never produce again (it keeps the socket open and nothing else). The layout and the
//! memory ordering are the kernel's (`include/uapi/linux/if_xdp.h`, `net/xdp/xsk_queue.h`): the
//! producer publishes descriptors with a release store of its index, and reads the consumer index
//! with an acquire load before reusing slots.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// The transmit ring of one AF_XDP socket.
#[derive(Debug)]
pub(super) struct TxRing {
    map: NonNull<libc::c_void>,
    map_len: usize,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<libc::xdp_desc>,
    size: u32,
    mask: u32,
    /// Our producer index (the shared one is only ever written from here).
    prod: u32,
    /// The last consumer index read, plus `size`: slots up to it are free.
    cons_limit: u32,
}

// SAFETY: the ring is a private mapping of this socket's ring; the pointers stay valid until `Drop`
// unmaps it, and `&mut self` on every producing method keeps a single producer. Moving the value to
// another thread (a port opened on a setup thread, then served by its worker) changes nothing.
unsafe impl Send for TxRing {}

impl TxRing {
    /// Map the transmit ring of the bound socket `fd`, whose ring has `size` entries.
    ///
    /// # Errors
    /// The offsets query or the mapping failed; the kernel refuses a second mapping of a bound
    /// socket's ring on some versions (EBUSY).
    pub(super) fn map(fd: RawFd, size: u32) -> io::Result<Self> {
        if !size.is_power_of_two() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: all-zero bytes are a valid `xdp_mmap_offsets` (plain integers).
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `off` and `len` are valid for writes of the sizes passed.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_XDP, libc::XDP_MMAP_OFFSETS, (&raw mut off).cast(), &mut len) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // Kernels before 5.4 answer with the layout without `flags` (and have no need_wakeup).
        if len as usize != size_of::<libc::xdp_mmap_offsets>() {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let map_len = off.tx.desc as usize + size as usize * size_of::<libc::xdp_desc>();
        // SAFETY: a fresh shared mapping of the socket's transmit ring; the kernel checks the length
        // against the ring it allocated.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                libc::XDP_PGOFF_TX_RING,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the kernel's offsets lie inside the ring it mapped (`map_len` covers the
        // descriptors, which come last); the indices are 4-byte aligned u32s written by the kernel
        // and by this producer only.
        let at = |o: u64| unsafe { NonNull::new_unchecked(p.cast::<u8>().add(o as usize)) };
        let producer = at(off.tx.producer).cast::<AtomicU32>();
        let consumer = at(off.tx.consumer).cast::<AtomicU32>();
        // SAFETY: as above; the ring is live.
        let prod = unsafe { producer.as_ref() }.load(Ordering::Relaxed);
        // SAFETY: as above.
        let cons = unsafe { consumer.as_ref() }.load(Ordering::Acquire);
        Ok(TxRing {
            map,
            map_len,
            producer,
            consumer,
            flags: at(off.tx.flags).cast(),
            descs: at(off.tx.desc).cast(),
            size,
            mask: size - 1,
            prod,
            cons_limit: cons.wrapping_add(size),
        })
    }

    /// Free slots, at least `want` if that many are free (reads the kernel's consumer index only
    /// when the cached one does not show enough).
    #[inline]
    pub(super) fn free(&mut self, want: u32) -> u32 {
        let free = self.cons_limit.wrapping_sub(self.prod);
        if free >= want {
            return free;
        }
        // SAFETY: the consumer index lives in the mapping, valid until drop.
        let cons = unsafe { self.consumer.as_ref() }.load(Ordering::Acquire);
        self.cons_limit = cons.wrapping_add(self.size);
        self.cons_limit.wrapping_sub(self.prod)
    }

    /// Queue one descriptor per `(addr, len)` for as many as there are free slots, then publish
    /// them; returns how many (a prefix).
    #[inline]
    pub(super) fn produce(&mut self, descs: impl ExactSizeIterator<Item = (u64, u32)>) -> usize {
        let n = self.free(descs.len() as u32).min(descs.len() as u32);
        for (i, (addr, len)) in descs.take(n as usize).enumerate() {
            let slot = (self.prod.wrapping_add(i as u32) & self.mask) as usize;
            // SAFETY: `slot` is below `size`, inside the descriptor array; the slot is free (behind
            // the consumer by at least `size`), so the kernel does not read it now.
            unsafe { self.descs.add(slot).write(libc::xdp_desc { addr, len, options: 0 }) };
        }
        self.prod = self.prod.wrapping_add(n);
        // SAFETY: the producer index lives in the mapping; the release store orders the
        // descriptor writes above before the kernel can see the new index.
        unsafe { self.producer.as_ref() }.store(self.prod, Ordering::Release);
        n as usize
    }

    /// Descriptors queued and not yet taken by the kernel.
    #[inline]
    pub(super) fn pending(&self) -> usize {
        // SAFETY: as in `free`.
        let cons = unsafe { self.consumer.as_ref() }.load(Ordering::Acquire);
        self.prod.wrapping_sub(cons) as usize
    }

    /// Whether the kernel asks for a `sendto` kick (`XDP_USE_NEED_WAKEUP`).
    #[inline]
    pub(super) fn needs_wakeup(&self) -> bool {
        // SAFETY: the flags word lives in the mapping, valid until drop.
        unsafe { self.flags.as_ref() }.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }
}

impl Drop for TxRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no pointer into it outlives `self`.
        unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
    }
}
