//! DIR-24-8 (Gupta, Lin and McKeown, 1998), IPv4 only. Built on the control side, looked up on
//! the hot path.
//!
//! The first 24 bits of the address index a flat array of 2^24 entries (64 MiB); an entry is
//! either a value or, for a /24 that holds longer routes, the number of a 256-entry group indexed
//! by the last 8 bits. One load for routes up to /24, two beyond.
//!
//! Kept as a measured candidate, not used by the snapshots: its 64 MiB must be written (or
//! copied) for every rebuild, which alone takes longer than the publication budget
//! (`cargo bench --bench publish -- lpm_build`).

use std::net::Ipv4Addr;

use super::{Lpm, LpmError, NO_ROUTE, RouteSet, decode};

/// Entry flag: the low bits are a group number, not a value.
const GROUP: u32 = 1 << 31;

/// Most groups: `group << 8 | low byte` must stay below the flag bit.
const MAX_GROUPS: usize = 1 << 23;

/// A compiled DIR-24-8 table.
#[derive(Clone)]
pub struct Dir248 {
    tbl24: Box<[u32]>,
    tbl8: Box<[u32]>,
}

impl std::fmt::Debug for Dir248 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dir248").field("groups", &(self.tbl8.len() / 256)).finish_non_exhaustive()
    }
}

impl Dir248 {
    /// Compile `set`.
    ///
    /// # Errors
    /// [`LpmError::CapacityExceeded`] with more than 2^23 /24s holding longer routes.
    pub fn build(set: &RouteSet<Ipv4Addr>) -> Result<Self, LpmError> {
        let mut tbl24 = vec![NO_ROUTE; 1 << 24];
        let mut tbl8 = Vec::new();
        // Routes come covering-first (see `RouteSet::iter`), so a short route never paints over a
        // group: any group inside it is created later, by a longer route, from the painted value.
        for e in set.sorted_entries() {
            let i24 = e.slot(0, 24);
            if e.len <= 24 {
                tbl24[i24..i24 + (1 << (24 - e.len))].fill(e.value);
                continue;
            }
            let group = if tbl24[i24] & GROUP != 0 {
                (tbl24[i24] & !GROUP) as usize
            } else {
                let group = tbl8.len() / 256;
                if group >= MAX_GROUPS {
                    return Err(LpmError::CapacityExceeded {
                        what: "dir-24-8 groups",
                        needed: group + 1,
                        max: MAX_GROUPS,
                    });
                }
                tbl8.extend_from_slice(&[tbl24[i24]; 256]);
                // Fits: group < 2^23.
                tbl24[i24] = GROUP | group as u32;
                group
            };
            let first = group * 256 + e.slot(24, 8);
            tbl8[first..first + (1 << (32 - e.len))].fill(e.value);
        }
        Ok(Dir248 { tbl24: tbl24.into_boxed_slice(), tbl8: tbl8.into_boxed_slice() })
    }

    #[inline(always)]
    fn find(&self, addr: Ipv4Addr) -> u32 {
        let a = u32::from(addr);
        let e = self.tbl24[(a >> 8) as usize];
        if e & GROUP == 0 {
            return e;
        }
        self.tbl8[((e & !GROUP) << 8 | (a & 0xff)) as usize]
    }
}

impl Lpm<Ipv4Addr> for Dir248 {
    #[inline]
    fn lookup(&self, addr: Ipv4Addr) -> Option<u32> {
        decode(self.find(addr))
    }

    fn heap_bytes(&self) -> usize {
        size_of_val(&*self.tbl24) + size_of_val(&*self.tbl8)
    }
}
