//! Every LPM structure against the linear-scan reference, on random route sets and addresses,
//! including the default route, host routes, deletes and updates.

use std::net::{Ipv4Addr, Ipv6Addr};

use ferry_tables::lpm::{Address, Dir248, Lpm, NaiveLpm, Poptrie, Prefix, RouteSet};
use proptest::prelude::*;

/// Route edits: insert (or replace) a prefix, or delete the prefix at some index of those
/// inserted so far.
#[derive(Debug, Clone)]
enum Op {
    Insert { seed: u128, len: u8, value: u32 },
    Remove { pick: usize },
}

/// Addresses cluster around a few bases so that random prefixes nest and overlap, which is where
/// LPM structures go wrong; lengths favour the edges (/0, host routes) and the stride boundaries.
fn op(bits: u8) -> impl Strategy<Value = Op> {
    let bases = [0u128, u128::MAX, 0x0a00_0000u128 << 96, 0xfd00u128 << 112, 0x8000_0000u128 << 96];
    let len = prop_oneof![Just(0u8), Just(bits), 0..=bits, (bits.saturating_sub(10))..=bits, 14u8..=26];
    prop_oneof![
        6 => (0..bases.len(), any::<u128>(), 0u32..=64, len, 0u32..40).prop_map(move |(b, noise, spread, len, value)| {
            // Keep the base's top bits, randomise the rest below `spread` bits from the top.
            let keep = if spread == 0 { 0 } else { u128::MAX << (128 - spread) };
            Op::Insert { seed: (bases[b] & keep) | (noise & !keep), len, value }
        }),
        1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
    ]
}

fn apply<A: Address>(ops: &[Op]) -> RouteSet<A> {
    let mut set = RouteSet::new();
    let mut inserted: Vec<Prefix<A>> = Vec::new();
    for op in ops {
        match *op {
            Op::Insert { seed, len, value } => {
                let p = Prefix::containing(A::from_u128(seed), len);
                set.insert(p, value).expect("small value");
                inserted.push(p);
            }
            Op::Remove { pick } if !inserted.is_empty() => {
                let p = inserted.swap_remove(pick % inserted.len());
                set.remove(&p);
            }
            Op::Remove { .. } => {}
        }
    }
    set
}

/// Probe addresses: random ones plus, for every route, its first and last address and the
/// addresses just outside it.
fn probes<A: Address>(set: &RouteSet<A>, random: &[u128]) -> Vec<A> {
    let mut out: Vec<A> = random.iter().map(|r| A::from_u128(*r)).collect();
    for (p, _) in set.iter() {
        let first = p.addr().to_u128();
        let span = if p.prefix_len() == 0 { u128::MAX } else { (1u128 << (128 - u32::from(p.prefix_len()))) - 1 };
        let unit = 1u128 << (128 - u32::from(A::BITS));
        let last = first | span;
        out.extend([first, last, first.wrapping_sub(unit), last.wrapping_add(unit)].map(A::from_u128));
    }
    out
}

/// Both batch walks of a poptrie (level by level, and one address at a time).
fn check_poptrie<A: Address, const S: u32>(
    name: &str,
    set: &RouteSet<A>,
    reference: &NaiveLpm<A>,
    addrs: &[A],
) -> Result<(), TestCaseError> {
    let p = Poptrie::<A, S>::build(set).expect("build");
    check(name, &p.clone().with_interleaved_batches(true), reference, addrs)?;
    check(name, &p.with_interleaved_batches(false), reference, addrs)
}

fn check<A: Address, L: Lpm<A>>(
    name: &str,
    lpm: &L,
    reference: &NaiveLpm<A>,
    addrs: &[A],
) -> Result<(), TestCaseError> {
    let mut batch = vec![None; addrs.len()];
    lpm.lookup_batch(addrs, &mut batch);
    for (a, b) in addrs.iter().zip(&batch) {
        let want = reference.lookup(*a);
        prop_assert_eq!(lpm.lookup(*a), want, "{} lookup {}", name, a);
        prop_assert_eq!(*b, want, "{} batch lookup {}", name, a);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ipv4_structures_match_the_reference(
        ops in prop::collection::vec(op(32), 0..120),
        random in prop::collection::vec(any::<u128>(), 64),
    ) {
        let set = apply::<Ipv4Addr>(&ops);
        let reference = NaiveLpm::build(&set);
        let addrs = probes(&set, &random);
        check_poptrie::<Ipv4Addr, 18>("poptrie/18", &set, &reference, &addrs)?;
        check_poptrie::<Ipv4Addr, 16>("poptrie/16", &set, &reference, &addrs)?;
        check_poptrie::<Ipv4Addr, 1>("poptrie/1", &set, &reference, &addrs)?;
    }

    #[test]
    fn ipv6_structures_match_the_reference(
        ops in prop::collection::vec(op(128), 0..120),
        random in prop::collection::vec(any::<u128>(), 64),
    ) {
        let set = apply::<Ipv6Addr>(&ops);
        let reference = NaiveLpm::build(&set);
        let addrs = probes(&set, &random);
        check_poptrie::<Ipv6Addr, 18>("poptrie/18", &set, &reference, &addrs)?;
        check_poptrie::<Ipv6Addr, 16>("poptrie/16", &set, &reference, &addrs)?;
        check_poptrie::<Ipv6Addr, 5>("poptrie/5", &set, &reference, &addrs)?;
    }
}

// Fewer cases: every DIR-24-8 build writes 64 MiB, which is slow in an unoptimised test build.
proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn ipv4_dir248_matches_the_reference(
        ops in prop::collection::vec(op(32), 0..120),
        random in prop::collection::vec(any::<u128>(), 64),
    ) {
        let set = apply::<Ipv4Addr>(&ops);
        let addrs = probes(&set, &random);
        check("dir-24-8", &Dir248::build(&set).expect("build"), &NaiveLpm::build(&set), &addrs)?;
    }
}

/// The cases the random search might need luck for, spelled out.
#[test]
fn default_route_host_routes_and_full_depth() {
    let v4 = |s: &str| s.parse::<Ipv4Addr>().expect("v4");
    let mut set = RouteSet::new();
    set.insert(Prefix::new(v4("0.0.0.0"), 0).expect("p"), 1).expect("v");
    set.insert(Prefix::new(v4("255.255.255.255"), 32).expect("p"), 2).expect("v");
    set.insert(Prefix::new(v4("10.1.2.3"), 32).expect("p"), 3).expect("v");
    set.insert(Prefix::new(v4("10.1.2.0"), 31).expect("p"), 4).expect("v");
    let pt = Poptrie::<Ipv4Addr>::build(&set).expect("build");
    let dir = Dir248::build(&set).expect("build");
    for (addr, want) in
        [("255.255.255.255", 2), ("255.255.255.254", 1), ("10.1.2.3", 3), ("10.1.2.1", 4), ("10.1.2.2", 1)]
    {
        assert_eq!(pt.lookup(v4(addr)), Some(want), "poptrie {addr}");
        assert_eq!(dir.lookup(v4(addr)), Some(want), "dir-24-8 {addr}");
    }
    set.remove(&Prefix::new(v4("0.0.0.0"), 0).expect("p"));
    assert_eq!(Poptrie::<Ipv4Addr>::build(&set).expect("build").lookup(v4("10.1.2.2")), None);

    let v6 = |s: &str| s.parse::<Ipv6Addr>().expect("v6");
    let mut set = RouteSet::new();
    set.insert(Prefix::new(v6("::"), 0).expect("p"), 7).expect("v");
    set.insert(Prefix::new(v6("fd00::1"), 128).expect("p"), 8).expect("v");
    set.insert(Prefix::new(v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 128).expect("p"), 9).expect("v");
    let pt = Poptrie::<Ipv6Addr>::build(&set).expect("build");
    assert_eq!(pt.lookup(v6("fd00::1")), Some(8));
    assert_eq!(pt.lookup(v6("fd00::")), Some(7));
    assert_eq!(pt.lookup(v6("fd00::2")), Some(7));
    assert_eq!(pt.lookup(v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")), Some(9));
    assert_eq!(pt.lookup(v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")), Some(7));
}
