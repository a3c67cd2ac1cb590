//! Underlay neighbours: node (or gateway) address -> MAC (control side).
//!
//! Entries are either *static* (configured; never age, never overwritten by learning) or
//! *learned* (from ARP/ND answers; they age out `reachable` after they were last confirmed).
//! Time is always passed in by the caller: the table reads no clock, so its owner decides what
//! "now" is and tests can step time exactly.
//!
//! Every mutation reports what changed ([`Learned`], the entries [`Neighbours::expire`] removed),
//! because a neighbour's MAC is baked into the outer header templates of the nodes behind it: the
//! owner rebuilds those (`TunnelTemplate::with_next_hop_mac`) and publishes a new snapshot.
//! The hot path never reads this table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferry_encap::MacAddr;

/// How an entry came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Configured; never ages.
    Static,
    /// Learned; ages out `reachable` after `confirmed`.
    Learned {
        /// When it was last learned or confirmed.
        confirmed: Instant,
    },
}

/// One neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    /// Its MAC.
    pub mac: MacAddr,
    /// Static or learned.
    pub origin: Origin,
}

impl Neighbour {
    fn valid(&self, now: Instant, reachable: Duration) -> bool {
        match self.origin {
            Origin::Static => true,
            Origin::Learned { confirmed } => now.saturating_duration_since(confirmed) < reachable,
        }
    }
}

/// What [`Neighbours::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new entry.
    Added,
    /// An entry whose MAC changed: templates using `old` must be rebuilt.
    Changed {
        /// The MAC it had.
        old: MacAddr,
    },
    /// The same MAC again; only its age was reset.
    Confirmed,
    /// A static entry exists for the address; learning does not override configuration.
    KeptStatic,
}

impl Learned {
    /// Whether the MAC for the address is different from before (something to republish).
    pub fn mac_changed(self) -> bool {
        matches!(self, Learned::Added | Learned::Changed { .. })
    }
}

/// The neighbour table.
#[derive(Debug, Clone)]
pub struct Neighbours {
    entries: HashMap<IpAddr, Neighbour>,
    reachable: Duration,
}

impl Neighbours {
    /// An empty table whose learned entries stay valid for `reachable` after each confirmation.
    pub fn new(reachable: Duration) -> Self {
        Neighbours { entries: HashMap::new(), reachable }
    }

    /// How long a learned entry stays valid.
    pub fn reachable(&self) -> Duration {
        self.reachable
    }

    /// Configure a static entry (replacing a learned one); returns the MAC the address had.
    pub fn set_static(&mut self, addr: IpAddr, mac: MacAddr) -> Option<MacAddr> {
        self.entries.insert(addr, Neighbour { mac, origin: Origin::Static }).map(|n| n.mac)
    }

    /// Remove a static entry; returns its MAC. Learned entries are left alone (they age).
    pub fn remove_static(&mut self, addr: IpAddr) -> Option<MacAddr> {
        match self.entries.get(&addr) {
            Some(Neighbour { origin: Origin::Static, mac }) => {
                let mac = *mac;
                self.entries.remove(&addr);
                Some(mac)
            }
            _ => None,
        }
    }

    /// Record that `addr` answered from `mac` at `now`.
    pub fn learn(&mut self, addr: IpAddr, mac: MacAddr, now: Instant) -> Learned {
        let fresh = Neighbour { mac, origin: Origin::Learned { confirmed: now } };
        let reachable = self.reachable;
        match self.entries.get_mut(&addr) {
            None => {
                self.entries.insert(addr, fresh);
                Learned::Added
            }
            Some(Neighbour { origin: Origin::Static, .. }) => Learned::KeptStatic,
            Some(entry) => {
                let old = entry.mac;
                // An entry that had already aged out (but was not yet expired) counts as new: the
                // owner treated it as absent.
                let was_valid = entry.valid(now, reachable);
                *entry = fresh;
                match (was_valid, old == mac) {
                    (true, true) => Learned::Confirmed,
                    (true, false) => Learned::Changed { old },
                    (false, _) => Learned::Added,
                }
            }
        }
    }

    /// The MAC for `addr` at `now`: static entries always, learned ones until they age out (even
    /// before [`Neighbours::expire`] removes them).
    pub fn mac(&self, addr: IpAddr, now: Instant) -> Option<MacAddr> {
        self.entries.get(&addr).filter(|n| n.valid(now, self.reachable)).map(|n| n.mac)
    }

    /// The entry for `addr`, whatever its age.
    pub fn get(&self, addr: IpAddr) -> Option<Neighbour> {
        self.entries.get(&addr).copied()
    }

    /// Remove the learned entries that aged out by `now`; returns them, so that the owner can
    /// rebuild what used them.
    pub fn expire(&mut self, now: Instant) -> Vec<(IpAddr, MacAddr)> {
        let mut gone = Vec::new();
        let reachable = self.reachable;
        self.entries.retain(|addr, n| {
            let keep = n.valid(now, reachable);
            if !keep {
                gone.push((*addr, n.mac));
            }
            keep
        });
        gone
    }

    /// When the next learned entry ages out, if any: when the owner should call
    /// [`Neighbours::expire`] next (or re-probe the neighbour shortly before).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|n| match n.origin {
                Origin::Learned { confirmed } => Some(confirmed + self.reachable),
                Origin::Static => None,
            })
            .min()
    }

    /// Number of entries (static and learned, aged or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, last])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn learned_entries_age_and_static_ones_do_not() {
        let t0 = Instant::now();
        let secs = |s| t0 + Duration::from_secs(s);
        let mut n = Neighbours::new(Duration::from_secs(30));
        assert_eq!(n.learn(ip("192.0.2.2"), mac(2), t0), Learned::Added);
        n.set_static(ip("192.0.2.1"), mac(1));
        assert_eq!(n.next_expiry(), Some(secs(30)));

        // Confirmed at 20 s: valid until 50 s.
        assert_eq!(n.learn(ip("192.0.2.2"), mac(2), secs(20)), Learned::Confirmed);
        assert_eq!(n.mac(ip("192.0.2.2"), secs(49)), Some(mac(2)));
        assert_eq!(n.mac(ip("192.0.2.2"), secs(50)), None, "aged out even before expire()");
        assert!(n.expire(secs(49)).is_empty());
        assert_eq!(n.expire(secs(50)), vec![(ip("192.0.2.2"), mac(2))]);
        assert_eq!(n.get(ip("192.0.2.2")), None);

        // A day later the static entry is still there, and learning does not displace it.
        assert!(n.expire(secs(86_400)).is_empty());
        assert_eq!(n.mac(ip("192.0.2.1"), secs(86_400)), Some(mac(1)));
        assert_eq!(n.learn(ip("192.0.2.1"), mac(9), secs(86_400)), Learned::KeptStatic);
        assert_eq!(n.mac(ip("192.0.2.1"), secs(86_400)), Some(mac(1)));
        assert_eq!(n.next_expiry(), None);
        assert_eq!(n.remove_static(ip("192.0.2.1")), Some(mac(1)));
        assert!(n.is_empty());
    }

    #[test]
    fn a_new_mac_is_reported_as_a_change() {
        let t0 = Instant::now();
        let mut n = Neighbours::new(Duration::from_secs(30));
        n.learn(ip("fd00::2"), mac(2), t0);
        let change = n.learn(ip("fd00::2"), mac(3), t0 + Duration::from_secs(1));
        assert_eq!(change, Learned::Changed { old: mac(2) });
        assert!(change.mac_changed());
        assert_eq!(n.mac(ip("fd00::2"), t0 + Duration::from_secs(1)), Some(mac(3)));
        // Relearned after aging out (not yet expired): reported as new, whatever the MAC.
        assert_eq!(n.learn(ip("fd00::2"), mac(3), t0 + Duration::from_secs(40)), Learned::Added);
        // A static entry replaces a learned one; removing it leaves nothing behind.
        assert_eq!(n.set_static(ip("fd00::2"), mac(4)), Some(mac(3)));
        assert_eq!(n.remove_static(ip("fd00::3")), None);
        assert_eq!(n.len(), 1);
    }
}
