//! Maglev's two properties, over random backend sets: every backend's permutation reaches every
//! slot and the table gives each backend an even share; adding or removing one backend moves
//! about 1/N of the slots, nearly all of them to or from that backend.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ferry_tables::services::{Backend, MAGLEV_DEFAULT, maglev_table};
use proptest::prelude::*;

fn backends(ids: &BTreeSet<u32>) -> Vec<Backend> {
    ids.iter()
        .map(|&i| Backend {
            addr: IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0000 | (i & 0xffff))),
            port: 80 + (i >> 16) as u16,
        })
        .collect()
}

fn ids(max: usize) -> impl Strategy<Value = BTreeSet<u32>> {
    proptest::collection::btree_set(0u32..200_000, 2..max)
}

/// Slots whose backend differs between the two tables (compared by backend, not by index).
fn moved(a: &[u16], ba: &[Backend], b: &[u16], bb: &[Backend]) -> Vec<(Backend, Backend)> {
    a.iter().zip(b).map(|(&x, &y)| (ba[usize::from(x)], bb[usize::from(y)])).filter(|(x, y)| x != y).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn table_is_full_and_even(set in ids(160)) {
        let bs = backends(&set);
        let t = maglev_table(&bs, MAGLEV_DEFAULT);
        prop_assert_eq!(t.len(), MAGLEV_DEFAULT);
        let mut counts = vec![0usize; bs.len()];
        for &i in t.iter() {
            prop_assert!(usize::from(i) < bs.len());
            counts[usize::from(i)] += 1;
        }
        // Each backend claims one slot per round, so shares differ by at most one round's worth:
        // floor(M/N) or ceil(M/N).
        let fair = MAGLEV_DEFAULT / bs.len();
        prop_assert!(counts.iter().all(|&c| c == fair || c == fair + 1), "{:?} (fair {})", counts, fair);
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth(set in ids(120), pick in any::<prop::sample::Index>()) {
        let before = backends(&set);
        let gone = before[pick.index(before.len())];
        let after: Vec<Backend> = before.iter().copied().filter(|b| *b != gone).collect();
        let (ta, tb) = (maglev_table(&before, MAGLEV_DEFAULT), maglev_table(&after, MAGLEV_DEFAULT));
        let moved = moved(&ta, &before, &tb, &after);
        let from_gone = moved.iter().filter(|(x, _)| *x == gone).count();
        // Every slot of the removed backend moves, and they are about 1/N of the table.
        let share = MAGLEV_DEFAULT / before.len();
        prop_assert!(from_gone == share || from_gone == share + 1);
        // Slots moving between surviving backends: the paper's "near minimal", not minimal, and
        // random per set. Usually under 2% of the table, but unlucky permutations move more: CI
        // found {0, 133332, 135246} minus 0 moving 4,497 slots (27%), and random sets just over the
        // removed backend's own share (1,176 for 1,170), which an earlier per-case bound of that
        // share failed on. So per case only a guard against a reshuffle (a table rebuilt from
        // scratch moves all but about 1/N of the slots): at most half the table. The typical figure
        // is checked over fixed sets in `collateral_is_small_over_many_sets`.
        let collateral = moved.len() - from_gone;
        let bound = MAGLEV_DEFAULT / 2;
        prop_assert!(collateral <= bound, "{} slots moved between survivors (bound {})", collateral, bound);
    }

    #[test]
    fn adding_one_backend_moves_about_one_nth(set in ids(120), extra in 200_000u32..300_000) {
        let before = backends(&set);
        let mut with = set.clone();
        with.insert(extra);
        let after = backends(&with);
        let added = backends(&BTreeSet::from([extra]))[0];
        let (ta, tb) = (maglev_table(&before, MAGLEV_DEFAULT), maglev_table(&after, MAGLEV_DEFAULT));
        let moved = moved(&ta, &before, &tb, &after);
        let to_new = moved.iter().filter(|(_, y)| *y == added).count();
        let share = MAGLEV_DEFAULT / after.len();
        prop_assert!(to_new == share || to_new == share + 1);
        // As for removal: a guard per case, the typical figure over fixed sets (403 slots moved for
        // a bound of 372, the new backend's share, failed the earlier per-case bound in CI).
        let collateral = moved.len() - to_new;
        let bound = MAGLEV_DEFAULT / 2;
        prop_assert!(collateral <= bound, "{} slots moved between old backends (bound {})", collateral, bound);
    }
}

/// The table does not depend on the order the backends are listed in once sorted (the compiler
/// sorts them), and lookups of the same hash agree across rebuilds.
#[test]
fn same_backends_same_table() {
    let set: BTreeSet<u32> = (0..50).collect();
    let a = maglev_table(&backends(&set), MAGLEV_DEFAULT);
    let b = maglev_table(&backends(&set), MAGLEV_DEFAULT);
    assert_eq!(a, b);
}

/// Removing one backend, then adding one, over 400 fixed pseudo-random sets of 2 to 119 backends:
/// slots moving between the backends that stay stay under 1.5% of the table on average and under 2%
/// in 95% of the sets (the unlucky cases the property tests allow are rare), and the case CI found
/// stays below a third of the table.
#[test]
fn collateral_is_small_over_many_sets() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) as u32
    };
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    for _ in 0..400 {
        let n = 2 + (rnd() as usize) % 118;
        let set: BTreeSet<u32> = (0..n).map(|_| rnd() % 200_000).collect();
        let before = backends(&set);
        let gone = before[(rnd() as usize) % before.len()];
        let after: Vec<Backend> = before.iter().copied().filter(|b| *b != gone).collect();
        let (ta, tb) = (maglev_table(&before, MAGLEV_DEFAULT), maglev_table(&after, MAGLEV_DEFAULT));
        let collateral = moved(&ta, &before, &tb, &after).iter().filter(|(x, _)| *x != gone).count();
        removed.push(collateral as f64 / MAGLEV_DEFAULT as f64);
        let mut with = set.clone();
        with.insert(200_000 + rnd() % 100_000);
        let grown = backends(&with);
        let new = *grown.iter().find(|b| !before.contains(b)).expect("one new backend");
        let tg = maglev_table(&grown, MAGLEV_DEFAULT);
        let collateral = moved(&ta, &before, &tg, &grown).iter().filter(|(_, y)| *y != new).count();
        added.push(collateral as f64 / MAGLEV_DEFAULT as f64);
    }
    for (what, mut fractions) in [("removing", removed), ("adding", added)] {
        fractions.sort_by(f64::total_cmp);
        let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
        let p95 = fractions[fractions.len() * 95 / 100];
        println!("{what} one backend: collateral mean {:.2}%, p95 {:.2}%", mean * 100.0, p95 * 100.0);
        // Measured on this implementation: removing mean 1.02%, p95 1.40%; adding 1.02%, 1.39%.
        assert!(mean < 0.015 && p95 < 0.02, "{what}: collateral mean {mean:.4}, p95 {p95:.4}");
    }

    let before = backends(&BTreeSet::from([0, 133_332, 135_246]));
    let after = backends(&BTreeSet::from([133_332, 135_246]));
    let (ta, tb) = (maglev_table(&before, MAGLEV_DEFAULT), maglev_table(&after, MAGLEV_DEFAULT));
    let collateral = moved(&ta, &before, &tb, &after).iter().filter(|(x, _)| *x != before[0]).count();
    assert!(collateral <= MAGLEV_DEFAULT / 3, "{collateral}");
}
