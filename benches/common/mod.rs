//! Route sets and lookup addresses shared by the table benchmarks (setup only, never timed).
//!
//! - *random*: addresses drawn uniformly, prefix lengths drawn from the shape of a public BGP
//!   table (mostly /24 for IPv4, /48 for IPv6), plus a share of longer and host routes, which
//!   pod networks have and BGP tables do not.
//! - *realistic*: one pod CIDR per node, allocated in order: IPv4 /24s from 10.0.0.0 (inside
//!   10.0.0.0/16 up to 256 nodes, inside 10.0.0.0/8 up to 65,536; the 100k and 1M sets continue
//!   into 11.0.0.0/8 and beyond), IPv6 /64s from fd00:10::/48 (the same spill past 65,536).
//!
//! Lookup addresses: 7 in 8 fall inside a route picked at random (host bits random), 1 in 8 is
//! uniformly random (mostly misses in the realistic sets).

#![allow(dead_code, unreachable_pub, reason = "each bench binary uses a different part of this module")]

use std::net::{Ipv4Addr, Ipv6Addr};

use ferry_tables::lpm::{Address, Prefix, RouteSet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Distinct next hops in the random sets (a cluster's nodes, roughly).
pub const RANDOM_NEXT_HOPS: u32 = 5_000;

/// Table sizes every LPM candidate is measured at.
pub const SIZES: [usize; 5] = [10, 1_000, 10_000, 100_000, 1_000_000];

/// How the route set is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Random,
    Realistic,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Random => "random",
            Shape::Realistic => "realistic",
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// (length, weight per mille). IPv4: the length mix of a public BGP table with /25-/32 added.
#[rustfmt::skip]
const V4_LENGTHS: &[(u8, u32)] = &[
    (8, 1), (9, 1), (10, 1), (11, 1), (12, 1), (13, 1), (14, 1), (15, 1), (16, 13), (17, 7), (18, 12),
    (19, 25), (20, 40), (21, 45), (22, 100), (23, 90), (24, 600), (25, 5), (26, 5), (27, 5), (28, 5), (29, 5),
    (30, 5), (31, 5), (32, 20),
];

/// IPv6: the length mix of a public BGP table (/29, /32, /48 dominate) with /64 pod and host
/// routes added.
#[rustfmt::skip]
const V6_LENGTHS: &[(u8, u32)] = &[
    (16, 2), (19, 2), (20, 2), (22, 2), (24, 2), (26, 2), (28, 4), (29, 50), (30, 5), (31, 5), (32, 150),
    (33, 10), (34, 10), (35, 10), (36, 15), (37, 10), (38, 10), (39, 10), (40, 25), (41, 5), (42, 10),
    (43, 5), (44, 25), (45, 5), (46, 10), (47, 10), (48, 450), (52, 5), (56, 15), (60, 5), (64, 60), (80, 5),
    (96, 5), (112, 5), (120, 5), (127, 5), (128, 40),
];

fn pick_len(rng: &mut StdRng, table: &[(u8, u32)]) -> u8 {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total);
    for (len, w) in table {
        if x < *w {
            return *len;
        }
        x -= w;
    }
    table[table.len() - 1].0
}

fn random_set<A: Address>(n: usize, seed: u64, lengths: &[(u8, u32)]) -> RouteSet<A> {
    let mut rng = rng(seed);
    let mut set = RouteSet::new();
    while set.len() < n {
        let len = pick_len(&mut rng, lengths);
        let p = Prefix::containing(A::from_u128(rng.random()), len);
        set.insert(p, rng.random_range(0..RANDOM_NEXT_HOPS)).expect("small value");
    }
    set
}

pub fn v4_set(shape: Shape, n: usize, seed: u64) -> RouteSet<Ipv4Addr> {
    match shape {
        Shape::Random => random_set(n, seed, V4_LENGTHS),
        Shape::Realistic => (0..n)
            .map(|i| {
                let node = u32::try_from(i).expect("fits");
                (Prefix::new(Ipv4Addr::from(0x0a00_0000 + (node << 8)), 24).expect("aligned"), node)
            })
            .collect(),
    }
}

pub fn v6_set(shape: Shape, n: usize, seed: u64) -> RouteSet<Ipv6Addr> {
    match shape {
        Shape::Random => random_set(n, seed, V6_LENGTHS),
        Shape::Realistic => (0..n)
            .map(|i| {
                let node = u32::try_from(i).expect("fits");
                let base = 0xfd00_0010_0000_u128 << 80;
                (Prefix::new(Ipv6Addr::from(base + (u128::from(node) << 64)), 64).expect("aligned"), node)
            })
            .collect(),
    }
}

/// `count` lookup addresses for `set` (see the module doc for the mix).
pub fn addresses<A: Address>(set: &RouteSet<A>, count: usize, seed: u64) -> Vec<A> {
    let mut rng = rng(seed ^ 0x5eed);
    let routes: Vec<Prefix<A>> = set.iter().map(|(p, _)| p).collect();
    (0..count)
        .map(|_| {
            let noise: u128 = rng.random();
            if routes.is_empty() || rng.random_range(0..8) == 0 {
                return A::from_u128(noise);
            }
            let p = routes[rng.random_range(0..routes.len())];
            let host = u128::MAX.checked_shr(u32::from(p.prefix_len())).unwrap_or(0);
            A::from_u128(p.addr().to_u128() | (noise & host))
        })
        .collect()
}

/// A cluster as control would describe it to a node: `nodes` remote nodes with one /24 each
/// (the realistic IPv4 allocation above), reached through one underlay gateway, and `pods` local
/// pods with /32s in this node's own /24 (100.64.0.0/24, outside the remote range), which is
/// blackholed for addresses without a pod.
pub fn cluster(nodes: usize, pods: usize) -> (ferry_tables::Underlay, ferry_tables::DesiredState) {
    use ferry_encap::{MacAddr, TunnelKind};
    use ferry_tables::{DesiredState, LocalPod, PortId, RemoteNode, Underlay};

    let mut underlay = Underlay::new(MacAddr([2, 0, 0, 0, 0, 1]), Some(Ipv4Addr::new(172, 16, 0, 1)), None);
    underlay.gateway_v4 = Some(GATEWAY);
    let nodes = (0..nodes)
        .map(|i| {
            let n = u32::try_from(i).expect("fits");
            RemoteNode {
                name: format!("node-{i}"),
                pod_cidrs: vec![ipnet::IpNet::V4(
                    ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (n << 8)), 24).expect("valid"),
                )],
                underlay: Ipv4Addr::from(0xac10_0002 + n).into(),
                other_underlays: Vec::new(),
                vtep_mac: MacAddr([2, 0xee, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8]),
                vni: 1,
                tunnel: TunnelKind::Vxlan,
                port: 4789,
            }
        })
        .collect();
    let local_pods = (0..pods)
        .map(|j| {
            let j = u8::try_from(j + 2).expect("at most 253 pods");
            LocalPod {
                port: PortId(u16::from(j)),
                mac: MacAddr([2, 0x0d, 0, 0, 0, j]),
                addrs: vec![Ipv4Addr::new(100, 64, 0, j).into()],
                source_only: vec![],
            }
        })
        .collect();
    let own = ipnet::IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 24).expect("valid"));
    (underlay, DesiredState { nodes, local_pods, blackholes: vec![own] })
}

/// The underlay gateway every node in [`cluster`] is reached through.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 254);

/// `desired` with node 0's CIDR moved to a spare /24 when `flip` is set: a one-route change.
pub fn with_change(desired: &ferry_tables::DesiredState, flip: bool) -> ferry_tables::DesiredState {
    let mut d = desired.clone();
    if flip && let Some(n) = d.nodes.first_mut() {
        n.pod_cidrs = vec![ipnet::IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(100, 65, 0, 0), 24).expect("valid"))];
    }
    d
}
