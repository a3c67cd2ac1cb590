//! The reference LPM: a linear scan over every route (any side; far too slow for the hot path).
//!
//! It is obviously correct, which is its only job: the property tests check the real structures
//! against it and the benchmarks show what a structure buys over doing nothing clever.

use super::{Address, Lpm, Prefix, RouteSet};

/// Linear-scan longest-prefix match.
#[derive(Debug, Clone)]
pub struct NaiveLpm<A: Address> {
    routes: Vec<(Prefix<A>, u32)>,
}

impl<A: Address> NaiveLpm<A> {
    /// Copy the routes of `set`.
    pub fn build(set: &RouteSet<A>) -> Self {
        NaiveLpm { routes: set.iter().collect() }
    }
}

impl<A: Address> Lpm<A> for NaiveLpm<A> {
    fn lookup(&self, addr: A) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        for (p, v) in &self.routes {
            if p.contains(addr) && best.is_none_or(|(len, _)| p.prefix_len() > len) {
                best = Some((p.prefix_len(), *v));
            }
        }
        best.map(|(_, v)| v)
    }

    fn heap_bytes(&self) -> usize {
        self.routes.capacity() * size_of::<(Prefix<A>, u32)>()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn longest_wins_whatever_the_order() {
        let p = |a: [u8; 4], l| Prefix::containing(Ipv4Addr::from(a), l);
        let set: RouteSet<Ipv4Addr> =
            [(p([10, 1, 2, 0], 24), 3), (p([0, 0, 0, 0], 0), 1), (p([10, 0, 0, 0], 8), 2)].into_iter().collect();
        let n = NaiveLpm::build(&set);
        assert_eq!(n.lookup(Ipv4Addr::new(10, 1, 2, 3)), Some(3));
        assert_eq!(n.lookup(Ipv4Addr::new(10, 1, 3, 3)), Some(2));
        assert_eq!(n.lookup(Ipv4Addr::new(11, 0, 0, 0)), Some(1));
        assert_eq!(NaiveLpm::build(&RouteSet::new()).lookup(Ipv4Addr::LOCALHOST), None);
    }
}
