//! Properties and reference vectors of partitioning and load balancing: what every peer must compute
//! identically before a butterfly all-reduce can start.
//!
//! Partitioning: any layout, part size and fractions split, transform and reassemble to exactly the
//! transformed input, with parts inside tensors, contiguous owners and straddling parts given to the larger
//! overlap. Load balancing: the split sums to the vector, skips zero-bandwidth peers, does not depend on
//! the order of the peers, and its cost matches an independent LP solver (good_lp with microlp).

use colony_averaging::balance::{BalanceError, balance_fractions, hagenbach_bischoff, load_balance_peers};
use colony_averaging::partition::{PartitionError, PartitionPlan, reassemble, values_per_part};
use colony_averaging::tensor::{TensorInfo, TensorLayout};
use good_lp::{Expression, Solution, SolverModel, constraint, microlp, variable, variables};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------------------
// Partitioning
// ---------------------------------------------------------------------------------------------------------

fn layout(shapes: &[Vec<usize>]) -> TensorLayout {
    TensorLayout::new(
        shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| TensorInfo::new(format!("tensor{i}"), shape.clone()))
            .collect(),
    )
    .unwrap()
}

/// The input buffer: distinct, irregular values so a misplaced part cannot go unnoticed.
fn input(total: usize) -> Vec<f32> {
    (0..total)
        .map(|i| (i as f32 * 0.618_034).fract() * 10.0 - 5.0 + i as f32 * 1e-3)
        .collect()
}

/// What each "reducer" does to its parts: any function will do, as long as the test can apply it too.
fn transform(x: f32) -> f32 {
    x.sin()
}

/// The ideal boundaries of each peer's range, computed as the contract states them.
fn reference_pivots(fractions: &[f64], total: usize) -> Vec<usize> {
    let sum: f64 = fractions.iter().sum();
    let mut cumulative = 0.0;
    let mut pivots: Vec<usize> = fractions
        .iter()
        .map(|f| {
            cumulative += f;
            ((cumulative / sum * total as f64).floor() as usize).min(total)
        })
        .collect();
    *pivots.last_mut().unwrap() = total;
    pivots
}

/// Splits, lets every peer transform its own parts, reassembles, and checks every invariant of the plan.
fn check_round_trip(shapes: &[Vec<usize>], part_values: &dyn Fn(usize) -> usize, fractions: &[f64]) -> PartitionPlan {
    let layout = layout(shapes);
    let total = layout.total_values();
    let plan = PartitionPlan::new(&layout, |t, _| part_values(t), fractions).unwrap();
    let parts = plan.parts();

    // Parts tile the buffer in order, are never empty, never span tensors and respect the size.
    let mut next = 0;
    for part in parts {
        assert_eq!(part.range.start, next, "parts tile the buffer");
        assert!(!part.range.is_empty());
        let tensor = layout.range(part.tensor);
        assert!(
            tensor.start <= part.range.start && part.range.end <= tensor.end,
            "{part:?} spans tensors"
        );
        assert!(part.range.len() <= part_values(part.tensor).max(1));
        next = part.range.end;
    }
    assert_eq!(next, total);
    for t in 0..layout.len() {
        let own = plan.parts_of_tensor(t);
        assert!(own.clone().all(|p| parts[p].tensor == t));
        assert_eq!(own.map(|p| parts[p].range.len()).sum::<usize>(), layout.range(t).len());
    }

    // Owners: contiguous runs in peer order, consistent with owner_of and values_of_peer.
    assert_eq!(plan.num_peers(), fractions.len());
    let mut next_part = 0;
    for (peer, &fraction) in fractions.iter().enumerate() {
        let own = plan.parts_of_peer(peer);
        if !own.is_empty() {
            assert_eq!(own.start, next_part, "peer {peer}'s run follows the previous peer's");
            next_part = own.end;
        }
        assert!(own.clone().all(|p| plan.owner_of(p) == peer));
        assert_eq!(
            plan.values_of_peer(peer),
            own.map(|p| parts[p].range.len()).sum::<usize>()
        );
        if fraction == 0.0 {
            assert_eq!(plan.values_of_peer(peer), 0, "a zero fraction reduces nothing");
        }
    }
    assert_eq!(next_part, parts.len());

    // Each part goes to the peer whose ideal range covers most of it, ties to the lower index.
    if total > 0 {
        let pivots = reference_pivots(fractions, total);
        for (index, part) in parts.iter().enumerate() {
            let overlaps: Vec<usize> = (0..pivots.len())
                .map(|j| {
                    let start = if j == 0 { 0 } else { pivots[j - 1] };
                    pivots[j]
                        .min(part.range.end)
                        .saturating_sub(start.max(part.range.start))
                })
                .collect();
            let best = *overlaps.iter().max().unwrap();
            let winner = overlaps.iter().position(|&o| o == best).unwrap();
            assert_eq!(
                plan.owner_of(index),
                winner,
                "part {index} {part:?}, overlaps {overlaps:?}"
            );
        }
    }

    // Round trip: each peer transforms its parts; reassembly gives exactly the transformed input.
    let data = input(total);
    let shards: Vec<Vec<Vec<f32>>> = (0..plan.num_peers())
        .map(|peer| {
            plan.parts_of_peer(peer)
                .map(|p| data[parts[p].range.clone()].iter().copied().map(transform).collect())
                .collect()
        })
        .collect();
    let output = reassemble(&plan, total, &shards).unwrap();
    let expected: Vec<f32> = data.iter().copied().map(transform).collect();
    assert!(
        output.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()) && output.len() == expected.len(),
        "reassembled buffer differs from the transformed input"
    );
    plan
}

const REFERENCE_FRACTIONS: [&[f64]; 5] = [
    &[1.0, 1.0],
    &[0.333, 0.1667, 0.5003],
    &[1.0, 0.0],
    &[0.0, 0.4, 0.6, 0.0],
    &[0.1; 9],
];

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        1 => Just(vec![]),
        1 => prop::collection::vec(0usize..3, 1..4),
        4 => prop::collection::vec(1usize..40, 1..3),
        1 => (1usize..5000).prop_map(|n| vec![n]),
    ]
}

fn part_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 1usize..10,
        2 => 1usize..1000,
        1 => 1usize..=10_000_000,
        1 => Just(2_500_000_000usize),
        1 => Just(usize::MAX),
    ]
}

fn fractions() -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        2 => prop::sample::select(REFERENCE_FRACTIONS.to_vec()).prop_map(<[f64]>::to_vec),
        3 => prop::collection::vec(prop_oneof![1 => Just(0.0), 3 => 0.0f64..1.0, 1 => 0.0f64..1e6], 1..12),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn partition_round_trips_for_any_layout_part_size_and_fractions(
        shapes in prop::collection::vec(shape(), 0..7),
        sizes in prop::collection::vec(part_size(), 7),
        per_tensor in any::<bool>(),
        fractions in fractions(),
    ) {
        let part_values = |t: usize| if per_tensor { sizes[t] } else { sizes[0] };
        let total = layout(&shapes).total_values();
        if total > 0 && fractions.iter().all(|&f| f == 0.0) {
            let error = PartitionPlan::new(&layout(&shapes), |t, _| part_values(t), &fractions).unwrap_err();
            let expected = PartitionError::AllFractionsZero { num_peers: fractions.len(), total_values: total };
            prop_assert_eq!(error, expected);
        } else {
            check_round_trip(&shapes, &part_values, &fractions);
        }
    }
}

/// Part size in bytes, fractions, then the expected parts and values of each peer.
type ReferenceCase = (usize, &'static [f64], &'static [usize], &'static [usize]);

/// The reference tensor set (large, small, many-axis, empty and scalar tensors) with parts of 31337,
/// 2^20 and 10^10 bytes at 4 bytes per value. The per-peer part and value counts were computed by an
/// independent implementation of the contract.
#[test]
fn reference_tensor_set_for_every_part_size_and_fraction() {
    let shapes: Vec<Vec<usize>> = vec![
        vec![30_000, 128],
        vec![128],
        vec![1, 1, 1, 1, 1, 1, 8],
        vec![1, 0],
        vec![0],
        vec![],
        vec![65_536],
        vec![512, 2048],
        vec![1024, 1024],
        vec![1020],
        vec![4096],
    ];
    assert_eq!(layout(&shapes).total_values(), 6_007_941);
    #[rustfmt::skip]
    let expected: [ReferenceCase; 12] = [
        (31337, &[1.0, 1.0], &[383, 390], &[3_000_422, 3_007_519]),
        (31337, &[0.333, 0.1667, 0.5003], &[255, 128, 390], &[1_997_670, 1_002_752, 3_007_519]),
        (31337, &[1.0, 0.0], &[773, 0], &[6_007_941, 0]),
        (31337, &[0.0, 0.4, 0.6, 0.0], &[0, 307, 466, 0], &[0, 2_405_038, 3_602_903, 0]),
        (1 << 20, &[1.0, 1.0], &[11, 18], &[2_883_584, 3_124_357]),
        (1 << 20, &[0.333, 0.1667, 0.5003], &[8, 3, 18], &[2_097_152, 786_432, 3_124_357]),
        (1 << 20, &[1.0, 0.0], &[29, 0], &[6_007_941, 0]),
        (1 << 20, &[0.0, 0.4, 0.6, 0.0], &[0, 9, 20, 0], &[0, 2_359_296, 3_648_645, 0]),
        (10_000_000_000, &[1.0, 1.0], &[1, 8], &[3_840_000, 2_167_941]),
        (10_000_000_000, &[0.333, 0.1667, 0.5003], &[1, 0, 8], &[3_840_000, 0, 2_167_941]),
        (10_000_000_000, &[1.0, 0.0], &[9, 0], &[6_007_941, 0]),
        (10_000_000_000, &[0.0, 0.4, 0.6, 0.0], &[0, 1, 8, 0], &[0, 3_840_000, 2_167_941, 0]),
    ];
    for (part_size_bytes, fractions, parts, values) in expected {
        let per_part = values_per_part(part_size_bytes, 4.0);
        let plan = check_round_trip(&shapes, &|_| per_part, fractions);
        let got_parts: Vec<usize> = (0..plan.num_peers()).map(|p| plan.parts_of_peer(p).len()).collect();
        let got_values: Vec<usize> = (0..plan.num_peers()).map(|p| plan.values_of_peer(p)).collect();
        assert_eq!(got_parts, parts, "{part_size_bytes} bytes, fractions {fractions:?}");
        assert_eq!(got_values, values, "{part_size_bytes} bytes, fractions {fractions:?}");
    }
    // A random-looking subset (every other tensor) also round-trips.
    let subset: Vec<Vec<usize>> = shapes.iter().step_by(2).cloned().collect();
    for fractions in REFERENCE_FRACTIONS {
        check_round_trip(&subset, &|_| values_per_part(31337, 4.0), fractions);
    }
}

/// Tiny parts (16 bytes = 4 values) over layouts that are mostly empty tensors.
#[test]
fn partition_edge_cases_with_16_byte_parts() {
    let per_part = values_per_part(16, 4.0);
    assert_eq!(per_part, 4);
    let layouts: [Vec<Vec<usize>>; 3] = [
        vec![vec![0]],
        vec![vec![0], vec![0], vec![1]],
        vec![vec![0], vec![999], vec![0], vec![0]],
    ];
    let fraction_sets: [&[f64]; 5] = [&[0.33, 0.44, 0.23], &[0.5, 0.5], &[0.1, 0.0, 0.9], &[1.0], &[0.1; 9]];
    for shapes in &layouts {
        for fractions in fraction_sets {
            check_round_trip(shapes, &|_| per_part, fractions);
        }
    }
    // Exact values per peer for the 999-value layout, from an independent implementation.
    #[rustfmt::skip]
    let expected: [(&[f64], &[usize]); 5] = [
        (&[0.33, 0.44, 0.23], &[328, 440, 231]),
        (&[0.5, 0.5], &[500, 499]),
        (&[0.1, 0.0, 0.9], &[100, 0, 899]),
        (&[1.0], &[999]),
        (&[0.1; 9], &[112, 112, 108, 112, 112, 112, 108, 112, 111]),
    ];
    for (fractions, values) in expected {
        let plan = PartitionPlan::new(&layout(&layouts[2]), |_, _| per_part, fractions).unwrap();
        let got: Vec<usize> = (0..plan.num_peers()).map(|p| plan.values_of_peer(p)).collect();
        assert_eq!(got, values, "fractions {fractions:?}");
        assert_eq!(plan.parts().len(), 250);
        assert_eq!(plan.parts_of_tensor(1), 0..250);
        assert_eq!(plan.parts_of_tensor(3), 250..250);
    }
    // One value and nine peers: the last peer's ideal range holds it.
    let plan = PartitionPlan::new(&layout(&layouts[1]), |_, _| per_part, &[0.1; 9]).unwrap();
    assert_eq!(plan.owner_of(0), 8);
    assert_eq!(plan.parts_of_tensor(2), 0..1);
}

// ---------------------------------------------------------------------------------------------------------
// Load balancing
// ---------------------------------------------------------------------------------------------------------

/// The None bandwidths replaced by the mean of the positive ones (the test's own computation), or by 1
/// when none is positive (then the unknown peers are alike).
fn known_bandwidths(bandwidths: &[Option<f64>]) -> Vec<f64> {
    let positive: Vec<f64> = bandwidths.iter().flatten().copied().filter(|&b| b > 0.0).collect();
    let mean = if positive.is_empty() {
        1.0
    } else {
        positive.iter().sum::<f64>() / positive.len() as f64
    };
    bandwidths.iter().map(|b| b.unwrap_or(mean)).collect()
}

/// The optimum ξ of the load-balancing LP, from good_lp's microlp (bandwidths scaled so the largest is 1).
fn lp_optimum(bandwidths: &[f64]) -> f64 {
    let n = bandwidths.len();
    let load = n as f64 - 2.0;
    let mut vars = variables!();
    let xi = vars.add(variable().min(0.0));
    let w: Vec<_> = bandwidths
        .iter()
        .map(|&b| vars.add(variable().min(0.0).max(if b > 0.0 { 1.0 } else { 0.0 })))
        .collect();
    let mut model = vars
        .minimise(xi)
        .using(microlp)
        .with(constraint!(w.iter().copied().sum::<Expression>() >= 1.0));
    for (i, &b) in bandwidths.iter().enumerate() {
        if b > 0.0 {
            model = model.with(constraint!(1.0 + load * w[i] <= b * xi));
        }
    }
    model.solve().expect("the load-balancing LP is feasible").value(xi)
}

/// The round time of real-valued fractions `w` (per unit vector): max over b_i > 0 of (1 + (N−2)·w_i)/b_i.
fn cost(bandwidths: &[f64], w: &[f64]) -> f64 {
    let load = bandwidths.len() as f64 - 2.0;
    bandwidths
        .iter()
        .zip(w)
        .filter(|(b, _)| **b > 0.0)
        .map(|(b, w)| (1.0 + load * w) / b)
        .fold(f64::NEG_INFINITY, f64::max)
}

/// The round time of an integer split: max over b_i > 0 of (V − p_i + (N−1)·p_i)/b_i.
fn integer_cost(bandwidths: &[f64], vector_size: usize, split: &[usize]) -> f64 {
    let n = bandwidths.len() as f64;
    let v = vector_size as f64;
    bandwidths
        .iter()
        .zip(split)
        .filter(|(b, _)| **b > 0.0)
        .map(|(b, &p)| (v - p as f64 + (n - 1.0) * p as f64) / b)
        .fold(f64::NEG_INFINITY, f64::max)
}

fn bandwidth() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(0.0)),
        5 => (-2.0f64..3.0).prop_map(|e| Some(10f64.powf(e))),
        1 => prop::sample::select(vec![1.0, 2.0, 10.0]).prop_map(Some),
    ]
}

fn vector_size() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..1000, 0usize..=100_000_000]
}

/// Bandwidths with a random permutation of their indices.
fn bandwidths_and_permutation() -> impl Strategy<Value = (Vec<Option<f64>>, Vec<usize>)> {
    prop::collection::vec(bandwidth(), 1..=20).prop_flat_map(|bandwidths| {
        let n = bandwidths.len();
        (Just(bandwidths), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn load_balance_is_exact_order_independent_and_optimal(
        (bandwidths, permutation) in bandwidths_and_permutation(),
        vector_size in vector_size(),
    ) {
        let n = bandwidths.len();
        if bandwidths.iter().all(|b| *b == Some(0.0)) {
            prop_assert_eq!(
                load_balance_peers(vector_size, &bandwidths, 0),
                Err(BalanceError::NobodyCanReduce { num_peers: n })
            );
            return Ok(());
        }
        let split = load_balance_peers(vector_size, &bandwidths, 0).unwrap();
        let fractions = balance_fractions(&bandwidths).unwrap();

        // Sums to the vector, nothing for zero bandwidth, the same on a repeated call.
        prop_assert_eq!(split.iter().sum::<usize>(), vector_size);
        for (i, b) in bandwidths.iter().enumerate() {
            if *b == Some(0.0) {
                prop_assert_eq!(split[i], 0);
                prop_assert_eq!(fractions[i], 0.0);
            }
        }
        prop_assert_eq!(&load_balance_peers(vector_size, &bandwidths, 0).unwrap(), &split);

        // Permuting the peers permutes the fractions bit for bit, and the split too — except that peers with
        // identical fractions may swap the leftover values that Hagenbach-Bischoff gives the lowest index.
        let permuted: Vec<Option<f64>> = permutation.iter().map(|&i| bandwidths[i]).collect();
        let permuted_fractions = balance_fractions(&permuted).unwrap();
        for (k, &i) in permutation.iter().enumerate() {
            prop_assert_eq!(permuted_fractions[k].to_bits(), fractions[i].to_bits());
        }
        let permuted_split = load_balance_peers(vector_size, &permuted, 0).unwrap();
        let mut unpermuted = vec![0; n];
        for (k, &i) in permutation.iter().enumerate() {
            unpermuted[i] = permuted_split[k];
        }
        let mut groups: Vec<u64> = fractions.iter().map(|f| f.to_bits()).collect();
        groups.sort_unstable();
        groups.dedup();
        for group in groups {
            let members: Vec<usize> = (0..n).filter(|&i| fractions[i].to_bits() == group).collect();
            let mut a: Vec<usize> = members.iter().map(|&i| split[i]).collect();
            let mut b: Vec<usize> = members.iter().map(|&i| unpermuted[i]).collect();
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b, "peers with fraction {}", f64::from_bits(group));
        }

        // Optimality against microlp, in units where the largest bandwidth is 1.
        let known = known_bandwidths(&bandwidths);
        let max = known.iter().copied().fold(0.0, f64::max);
        let scaled: Vec<f64> = known.iter().map(|b| b / max).collect();
        let optimum = lp_optimum(&scaled);
        let ours = cost(&scaled, &fractions);
        prop_assert!(fractions.iter().all(|&w| w >= 0.0));
        prop_assert!((fractions.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        prop_assert!(ours <= optimum * (1.0 + 1e-6) + 1e-9, "ours {} vs LP {}", ours, optimum);
        prop_assert!(ours >= optimum * (1.0 - 1e-6) - 1e-9, "ours {} below the LP optimum {}?", ours, optimum);
        // Rounding: every peer gets at least the floor of its quota, so only the fewer than N leftover
        // values can raise a peer's load; each costs (N − 2)/b_i at most.
        let v = vector_size as f64;
        for (i, &p) in split.iter().enumerate() {
            let quota = v * fractions[i];
            prop_assert!(p as f64 >= quota.floor() - 1.0, "peer {} got {} of quota {}", i, p, quota);
        }
        if vector_size > 0 {
            let leftover_slack = scaled
                .iter()
                .filter(|&&b| b > 0.0)
                .map(|b| (n as f64 - 2.0).max(0.0) * (n as f64 - 1.0) / b)
                .fold(0.0, f64::max);
            let integer = integer_cost(&scaled, vector_size, &split);
            prop_assert!(
                integer <= v * optimum * 1.01 + leftover_slack,
                "integer cost {} vs LP {} × {}", integer, optimum, v
            );
        }
    }

    #[test]
    fn small_shares_are_dropped_unless_every_share_is_small(
        bandwidths in prop::collection::vec(bandwidth(), 1..=20),
        vector_size in 1usize..1_000_000,
        min_fraction in 0.0f64..0.6,
    ) {
        prop_assume!(bandwidths.iter().any(|b| *b != Some(0.0)));
        let min_vector_size = (vector_size as f64 * min_fraction) as usize;
        let fractions = balance_fractions(&bandwidths).unwrap();
        let split = load_balance_peers(vector_size, &bandwidths, min_vector_size).unwrap();
        prop_assert_eq!(split.iter().sum::<usize>(), vector_size);
        let threshold = min_vector_size as f64 / vector_size as f64;
        let any_large = fractions.iter().any(|&f| f >= threshold);
        for (i, &f) in fractions.iter().enumerate() {
            if any_large && f < threshold * (1.0 - 1e-12) {
                prop_assert_eq!(split[i], 0, "peer {} with fraction {} below {}", i, f, threshold);
            }
            if f >= threshold * (1.0 + 1e-12) && f > 0.0 {
                // Kept shares only grow when others are dropped.
                prop_assert!(split[i] + 1 >= min_vector_size, "peer {} kept {} < {}", i, split[i], min_vector_size);
                prop_assert!(min_vector_size == 0 || split[i] > 0, "peer {} kept nothing", i);
            }
        }
        if !any_large {
            prop_assert_eq!(split, load_balance_peers(vector_size, &bandwidths, 0).unwrap());
        }
    }

    #[test]
    fn hagenbach_bischoff_allocates_everything_and_at_least_each_floor(
        total in 0usize..10_000_000,
        scores in prop::collection::vec(prop_oneof![1 => Just(0.0), 4 => 0.0f64..100.0], 1..30),
    ) {
        let split = hagenbach_bischoff(total, &scores);
        let sum: f64 = scores.iter().sum();
        if sum == 0.0 {
            prop_assert!(split.iter().all(|&p| p == 0));
            return Ok(());
        }
        prop_assert_eq!(split.iter().sum::<usize>(), total);
        for (i, &s) in scores.iter().enumerate() {
            let quota = total as f64 * s / sum;
            prop_assert!(split[i] as f64 >= quota.floor() - 1.0, "peer {} got {} of quota {}", i, split[i], quota);
            if s == 0.0 {
                prop_assert_eq!(split[i], 0);
            }
        }
    }
}
