//! Reference vectors for every rule (exact where the arithmetic is exact in binary, otherwise against an `f64`
//! transcription of PyTorch's formulas), thread-count independence, validation and metadata.

// One-tensor groups are written `vec![0..n]` on purpose: a list of ranges that has one entry.
#![allow(clippy::single_range_in_vec_init)]

use proptest::prelude::*;

use super::*;
use crate::test_support::random_values;

fn group(ranges: Vec<std::ops::Range<usize>>, lr: f32, weight_decay: f32) -> ParamGroup {
    ParamGroup::new(ranges, lr, weight_decay)
}

fn optimizer(kind: OptimizerKind, groups: Vec<ParamGroup>, total: usize) -> CpuOptimizer {
    CpuOptimizer::new(OptimizerConfig::new(kind, groups), total).expect("a valid test configuration")
}

fn sgd(momentum: f32, dampening: f32, nesterov: bool) -> OptimizerKind {
    OptimizerKind::Sgd {
        momentum,
        dampening,
        nesterov,
    }
}

fn assert_close(got: &[f32], expected: &[f64], tolerance: f64, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let error = (f64::from(g) - e).abs();
        assert!(
            error <= tolerance * e.abs().max(1.0),
            "{what}[{i}]: got {g}, expected {e} (error {error:e})"
        );
    }
}

fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// SGD

#[test]
fn sgd_with_momentum_dampening_and_weight_decay_matches_hand_computed_steps() {
    // lr 0.5, momentum 0.5, dampening 0.5, weight decay 0.5: every intermediate is a short binary fraction.
    let mut opt = optimizer(sgd(0.5, 0.5, false), vec![group(vec![0..3], 0.5, 0.5)], 3);
    let mut params = [1.0, -2.0, 0.0];
    let grads = [0.5, 1.0, -1.0];
    // Step 1: d = g + 0.5 p = [1, 0, -1]; buf = d (no dampening on the first step); p -= 0.5 buf.
    opt.step(&mut params, &grads, 1.0).unwrap();
    assert_eq!(params, [0.5, -2.0, 0.5]);
    assert_eq!(opt.state(MOMENTUM_BUFFER).unwrap(), [1.0, 0.0, -1.0]);
    // Step 2: d = [0.75, 0, -0.75]; buf = 0.5 buf + 0.5 d = [0.875, 0, -0.875].
    opt.step(&mut params, &grads, 1.0).unwrap();
    assert_eq!(params, [0.0625, -2.0, 0.9375]);
    // Step 3: d = [0.53125, 0, -0.53125]; buf = [0.703125, 0, -0.703125].
    opt.step(&mut params, &grads, 1.0).unwrap();
    assert_eq!(params, [-0.2890625, -2.0, 1.2890625]);
    assert_eq!(opt.state(MOMENTUM_BUFFER).unwrap(), [0.703125, 0.0, -0.703125]);
    assert!(opt.momentum_initialised());
}

#[test]
fn sgd_nesterov_per_group_weight_decay_matches_hand_computed_steps() {
    // Two groups (no weight decay; weight decay 0.5), lr 0.5, momentum 0.5, Nesterov, constant gradient 1.
    let groups = vec![group(vec![0..1], 0.5, 0.0), group(vec![1..2], 0.5, 0.5)];
    let mut opt = optimizer(sgd(0.5, 0.0, true), groups, 2);
    let mut params = [1.0, 1.0];
    let mut history = Vec::new();
    for _ in 0..3 {
        opt.step(&mut params, &[1.0, 1.0], 1.0).unwrap();
        history.push(params);
    }
    // Value 0: buf = 1, 1.5, 1.75; d = g + 0.5 buf = 1.5, 1.75, 1.875.
    // Value 1: d = 1 + 0.5 p = 1.5, 0.9375, 0.4921875; buf = 1.5, 1.6875, 1.3359375 (last p: -1.595703125);
    //          d + 0.5 buf = 2.25, 1.78125, 1.16015625.
    assert_eq!(
        history,
        [[0.25, -0.125], [-0.625, -1.015625], [-1.5625, -817.0 / 512.0]]
    );
    assert_eq!(opt.state(MOMENTUM_BUFFER).unwrap(), [1.75, 1.3359375]);
}

#[test]
fn plain_sgd_has_no_state_and_scales_with_the_lr_factor() {
    let mut opt = optimizer(sgd(0.0, 0.0, false), vec![group(vec![0..2], 1.0, 0.0)], 2);
    assert!(opt.state_names().is_empty());
    assert!(opt.state(MOMENTUM_BUFFER).is_none());
    assert!(opt.state_mut(EXP_AVG).is_none());
    let mut params = [1.0, 1.0];
    opt.step(&mut params, &[1.0, -2.0], 0.25).unwrap();
    assert_eq!(params, [0.75, 1.5]);
    assert!(!opt.momentum_initialised());
}

// ---------------------------------------------------------------------------------------------------------------
// Adam and AdamW

/// `steps` Adam or AdamW steps in `f64`, written as PyTorch states them (bias corrections divided out per step).
#[allow(clippy::too_many_arguments)]
fn adam_reference(
    params: &[f32],
    grads: &[Vec<f32>],
    lr: f32,
    (beta1, beta2, eps): (f32, f32, f32),
    weight_decay: f32,
    decoupled: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b1, b2, eps, lr, wd) = (
        f64::from(beta1),
        f64::from(beta2),
        f64::from(eps),
        f64::from(lr),
        f64::from(weight_decay),
    );
    let mut p = to_f64(params);
    let mut m = vec![0.0; p.len()];
    let mut v = vec![0.0; p.len()];
    for (t, grads) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for i in 0..p.len() {
            let mut g = f64::from(grads[i]);
            if decoupled {
                p[i] *= 1.0 - lr * wd;
            } else {
                g += wd * p[i];
            }
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let denom = v[i].sqrt() / bc2.sqrt() + eps;
            p[i] -= lr / bc1 * m[i] / denom;
        }
    }
    (p, m, v)
}

#[test]
fn adam_first_step_is_exact() {
    // beta1 0.5, beta2 0.75, eps 2: m̂ = g, v̂ = g², step = lr · g / (|g| + 2).
    let kind = OptimizerKind::Adam {
        beta1: 0.5,
        beta2: 0.75,
        eps: 2.0,
    };
    let mut opt = optimizer(kind, vec![group(vec![0..3], 0.5, 0.0)], 3);
    let mut params = [1.0, 1.0, 1.0];
    opt.step(&mut params, &[2.0, -2.0, 0.0], 1.0).unwrap();
    assert_eq!(params, [0.75, 1.25, 1.0]);
    assert_eq!(opt.state(EXP_AVG).unwrap(), [1.0, -1.0, 0.0]);
    assert_eq!(opt.state(EXP_AVG_SQ).unwrap(), [1.0, 1.0, 0.0]);
}

#[test]
fn adamw_first_step_is_exact() {
    // As above, after the decoupled decay p *= 1 - 0.5 · 0.5.
    let kind = OptimizerKind::AdamW {
        beta1: 0.5,
        beta2: 0.75,
        eps: 2.0,
    };
    let mut opt = optimizer(kind, vec![group(vec![0..3], 0.5, 0.5)], 3);
    let mut params = [1.0, 1.0, -2.0];
    opt.step(&mut params, &[2.0, -2.0, 0.0], 1.0).unwrap();
    assert_eq!(params, [0.5, 1.0, -1.5]);
}

#[test]
fn adam_and_adamw_follow_torch_over_three_steps() {
    let params = [0.5f32, -1.25, 2.0, 0.0, 3.5];
    let grads = vec![
        vec![0.1f32, -0.3, 0.25, 1e-3, -2.0],
        vec![0.2, 0.1, -0.5, 0.0, -1.0],
        vec![-0.05, 0.4, 0.25, 2e-3, 0.5],
    ];
    let hyper = (DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_ADAM_EPS);
    for (decoupled, weight_decay) in [(false, 0.0), (false, 0.1), (true, 0.1)] {
        let kind = if decoupled {
            OptimizerKind::AdamW {
                beta1: hyper.0,
                beta2: hyper.1,
                eps: hyper.2,
            }
        } else {
            OptimizerKind::Adam {
                beta1: hyper.0,
                beta2: hyper.1,
                eps: hyper.2,
            }
        };
        let mut opt = optimizer(kind, vec![group(vec![0..5], 0.01, weight_decay)], 5);
        let mut p = params;
        for g in &grads {
            opt.step(&mut p, g, 1.0).unwrap();
        }
        let (p_ref, m_ref, v_ref) = adam_reference(&params, &grads, 0.01, hyper, weight_decay, decoupled);
        let what = format!("{} wd {weight_decay}", kind.name());
        assert_close(&p, &p_ref, 1e-6, &format!("{what} params"));
        assert_close(opt.state(EXP_AVG).unwrap(), &m_ref, 1e-6, &format!("{what} exp_avg"));
        assert_close(
            opt.state(EXP_AVG_SQ).unwrap(),
            &v_ref,
            1e-6,
            &format!("{what} exp_avg_sq"),
        );
        assert_eq!(opt.steps(), 3);
    }
}

#[test]
fn adam_uses_the_step_count_for_bias_correction() {
    // After set_steps(1000) the corrections are ≈ 1 - 0.9^1001 ≈ 1 and 1 - 0.999^1001 ≈ 0.632.
    let mut opt = CpuOptimizer::new(OptimizerConfig::adam(0.1, 1), 1).unwrap();
    opt.set_steps(1000);
    let mut p = [0.0];
    opt.step(&mut p, &[1.0], 1.0).unwrap();
    let (b1, b2) = (f64::from(DEFAULT_BETA1), f64::from(DEFAULT_BETA2));
    let (m, v) = (1.0 - b1, 1.0 - b2);
    let expected = -0.1 / (1.0 - b1.powi(1001)) * m / (v.sqrt() / (1.0 - b2.powi(1001)).sqrt() + 1e-8);
    assert_close(&p, &[expected], 1e-6, "adam after set_steps");
    assert_eq!(opt.steps(), 1001);
}

// ---------------------------------------------------------------------------------------------------------------
// LAMB

fn lamb_kind(beta1: f32, beta2: f32, eps: f32, clamp_value: f32) -> OptimizerKind {
    OptimizerKind::Lamb {
        beta1,
        beta2,
        eps,
        clamp_value,
    }
}

#[test]
fn lamb_first_step_uses_one_trust_ratio_per_range() {
    // beta1 0.5, beta2 0.75, eps 1, g = ±1: m̂ = g, √v̂ = 1, u = g / 2, ‖u‖ = 1 for four values.
    let kind = lamb_kind(0.5, 0.75, 1.0, 10.0);
    let ranges = vec![0..4, 4..8, 8..12, 12..16];
    let mut opt = optimizer(kind, vec![group(ranges, 0.25, 0.0)], 16);
    #[rustfmt::skip]
    let mut params = [
        3.0, 4.0, 0.0, 0.0,    // ‖p‖ = 5: ratio 5
        20.0, 0.0, 0.0, 0.0,   // ‖p‖ = 20, clamped to 10: ratio 10
        0.0, 0.0, 0.0, 0.0,    // ‖p‖ = 0: ratio 1
        1.0, 2.0, 3.0, 4.0,    // u = 0: ratio 1, nothing moves
    ];
    #[rustfmt::skip]
    let grads = [
        1.0, -1.0, 1.0, -1.0,
        1.0, 1.0, 1.0, 1.0,
        1.0, 1.0, -1.0, -1.0,
        0.0, 0.0, 0.0, 0.0,
    ];
    opt.step(&mut params, &grads, 1.0).unwrap();
    #[rustfmt::skip]
    let expected = [
        2.375, 4.625, -0.625, 0.625,      // p -= 0.25 · 5 · u
        18.75, -1.25, -1.25, -1.25,       // p -= 0.25 · 10 · u
        -0.125, -0.125, 0.125, 0.125,     // p -= 0.25 · u
        1.0, 2.0, 3.0, 4.0,
    ];
    assert_eq!(params, expected);
}

/// `steps` LAMB steps in `f64`: Adam's moments with bias correction, then per range
/// `p -= lr · min(‖p‖, clamp) / ‖u‖ · u`.
fn lamb_reference(
    params: &[f32],
    grads: &[Vec<f32>],
    ranges: &[std::ops::Range<usize>],
    lr: f32,
    weight_decay: f32,
) -> Vec<f64> {
    let (b1, b2, eps) = (
        f64::from(DEFAULT_BETA1),
        f64::from(DEFAULT_BETA2),
        f64::from(DEFAULT_LAMB_EPS),
    );
    let (lr, wd, clamp) = (f64::from(lr), f64::from(weight_decay), f64::from(DEFAULT_LAMB_CLAMP));
    let mut p = to_f64(params);
    let mut m = vec![0.0; p.len()];
    let mut v = vec![0.0; p.len()];
    for (t, grads) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for range in ranges {
            let mut u = Vec::new();
            for i in range.clone() {
                let g = f64::from(grads[i]);
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                u.push((m[i] / bc1) / ((v[i] / bc2).sqrt() + eps) + wd * p[i]);
            }
            let weight_norm = p[range.clone()].iter().map(|x| x * x).sum::<f64>().sqrt().min(clamp);
            let update_norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
            let ratio = if weight_norm == 0.0 || update_norm == 0.0 {
                1.0
            } else {
                weight_norm / update_norm
            };
            for (i, u) in range.clone().zip(u) {
                p[i] -= lr * ratio * u;
            }
        }
    }
    p
}

#[test]
fn lamb_follows_the_reference_over_three_steps_on_two_ranges() {
    // Two tensors of different norms (one above the clamp) and lengths that are not multiples of the lanes.
    let ranges = vec![0..13, 13..40];
    let mut start = random_values(40, 11);
    start[13..].iter_mut().for_each(|p| *p *= 8.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|s| random_values(40, 20 + s)).collect();
    for weight_decay in [0.0, 0.01] {
        let kind = lamb_kind(DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_LAMB_EPS, DEFAULT_LAMB_CLAMP);
        let mut opt = optimizer(kind, vec![group(ranges.clone(), 0.02, weight_decay)], 40);
        let mut p = start.clone();
        for g in &grads {
            opt.step(&mut p, g, 1.0).unwrap();
        }
        let expected = lamb_reference(&start, &grads, &ranges, 0.02, weight_decay);
        assert_close(&p, &expected, 2e-6, &format!("lamb wd {weight_decay}"));
    }
}

#[test]
fn lamb_norms_over_many_segments_and_blocks_follow_the_reference() {
    // A tensor of several segments with ragged blocks and lanes, beside a tiny one, in two groups.
    let total = 2 * crate::kernels::CHUNK_VALUES + 1000 + 3;
    let ranges = [0..3, 3..total];
    // Scaled so that the long tensor's norm is 5, below the clamp: every segment's sum counts.
    let mut start = random_values(total, 31);
    let norm = start[3..]
        .iter()
        .map(|&p| f64::from(p) * f64::from(p))
        .sum::<f64>()
        .sqrt();
    start[3..]
        .iter_mut()
        .for_each(|p| *p = (f64::from(*p) * 5.0 / norm) as f32);
    let grads: Vec<Vec<f32>> = (0..3).map(|s| random_values(total, 40 + s)).collect();
    let kind = lamb_kind(DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_LAMB_EPS, DEFAULT_LAMB_CLAMP);
    let groups = vec![
        group(vec![ranges[0].clone()], 0.02, 0.01),
        group(vec![ranges[1].clone()], 0.02, 0.01),
    ];
    let mut opt = optimizer(kind, groups, total);
    let mut p = start.clone();
    for g in &grads {
        opt.step(&mut p, g, 1.0).unwrap();
    }
    let expected = lamb_reference(&start, &grads, &ranges, 0.02, 0.01);
    assert_close(&p, &expected, 2e-6, "lamb on a long range");
}

// ---------------------------------------------------------------------------------------------------------------
// Threads

/// One configuration of every rule over `total` values: several groups, ranges of odd lengths, a gap.
fn large_configs(total: usize) -> Vec<OptimizerConfig> {
    let third = total / 3;
    let groups = |wd: f32| {
        vec![
            group(vec![0..1000, 1000..third], 0.01, wd),
            group(vec![third + 7..2 * third, 2 * third..total - 5], 0.003, 0.0),
        ]
    };
    vec![
        OptimizerConfig::new(sgd(0.9, 0.0, true), groups(1e-4)),
        OptimizerConfig::new(sgd(0.9, 0.1, false), groups(0.0)),
        OptimizerConfig::new(
            OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            groups(0.01),
        ),
        OptimizerConfig::new(
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-6,
            },
            groups(0.1),
        ),
        // A clamp far above the weight norms, so that the weight norm sums count too.
        OptimizerConfig::new(lamb_kind(0.9, 0.999, 1e-6, 1e6), groups(0.01)),
    ]
}

fn run_steps(config: &OptimizerConfig, total: usize, parallel: bool, threads: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut opt = CpuOptimizer::new(config.clone(), total).unwrap();
    if !parallel {
        opt.set_parallel_min_values(usize::MAX);
    }
    let mut params = random_values(total, 3);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        for step in 0..3 {
            let grads = random_values(total, 100 + step);
            opt.step(&mut params, &grads, 0.5).unwrap();
        }
    });
    let state = opt
        .state_names()
        .iter()
        .map(|name| opt.state(name).unwrap().to_vec())
        .collect();
    (params, state)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn threaded_steps_equal_sequential_steps_bit_for_bit() {
    let total = 1 << 20;
    for config in large_configs(total) {
        let name = config.kind.name();
        let (sequential, sequential_state) = run_steps(&config, total, false, 1);
        let untouched = random_values(total, 3);
        let third = total / 3;
        assert_eq!(
            sequential[third..third + 7],
            untouched[third..third + 7],
            "{name}: the gap stays"
        );
        assert_eq!(
            sequential[total - 5..],
            untouched[total - 5..],
            "{name}: values in no range stay"
        );
        assert_ne!(sequential[..10], untouched[..10], "{name} moved the parameters");
        for threads in [1, 2, 4] {
            let (threaded, threaded_state) = run_steps(&config, total, true, threads);
            assert!(same_bits(&threaded, &sequential), "{name} params on {threads} threads");
            for (a, b) in threaded_state.iter().zip(&sequential_state) {
                assert!(same_bits(a, b), "{name} state on {threads} threads");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Validation

#[test]
fn invalid_configurations_are_refused_naming_the_field() {
    let adam = |beta1: f32, beta2: f32, eps: f32| OptimizerKind::Adam { beta1, beta2, eps };
    let one = |lr: f32, wd: f32| vec![group(vec![0..10], lr, wd)];
    let cases: Vec<(OptimizerKind, Vec<ParamGroup>, &str)> = vec![
        (
            adam(0.9, 0.999, 1e-8),
            one(-0.1, 0.0),
            "`groups[0].lr` is -0.1, but it must be finite and at least 0",
        ),
        (adam(0.9, 0.999, 1e-8), one(f32::NAN, 0.0), "`groups[0].lr` is NaN"),
        (
            adam(0.9, 0.999, 1e-8),
            one(0.1, f32::INFINITY),
            "`groups[0].weight_decay` is inf",
        ),
        (
            adam(1.0, 0.999, 1e-8),
            one(0.1, 0.0),
            "`beta1` is 1, but it must be in [0, 1)",
        ),
        (adam(0.9, -0.5, 1e-8), one(0.1, 0.0), "`beta2` is -0.5"),
        (
            adam(0.9, 0.999, 0.0),
            one(0.1, 0.0),
            "`eps` is 0, but it must be finite and greater than 0",
        ),
        (
            OptimizerKind::AdamW {
                beta1: f32::NAN,
                beta2: 0.9,
                eps: 1e-8,
            },
            one(0.1, 0.0),
            "`beta1` is NaN",
        ),
        (
            lamb_kind(0.9, 0.999, 1e-6, f32::INFINITY),
            one(0.1, 0.0),
            "`clamp_value` is inf",
        ),
        (lamb_kind(0.9, 0.999, 1e-6, 0.0), one(0.1, 0.0), "`clamp_value` is 0"),
        (sgd(-0.9, 0.0, false), one(0.1, 0.0), "`momentum` is -0.9"),
        (
            sgd(0.9, 1.5, false),
            one(0.1, 0.0),
            "`dampening` is 1.5, but it must be in [0, 1]",
        ),
        (
            sgd(0.9, 0.1, true),
            one(0.1, 0.0),
            "`nesterov` is true (with momentum 0.9 and dampening 0.1)",
        ),
        (
            sgd(0.0, 0.0, true),
            one(0.1, 0.0),
            "`nesterov` is true (with momentum 0 and dampening 0)",
        ),
        (
            sgd(0.0, 0.0, false),
            vec![
                group(vec![0..10], 0.1, 0.0),
                group(vec![std::ops::Range { start: 8, end: 4 }], 0.1, 0.0),
            ],
            "`groups[1].ranges[0]` is 8..4, but it must not be reversed",
        ),
        (
            sgd(0.0, 0.0, false),
            vec![group(vec![0..5, 5..11], 0.1, 0.0)],
            "`groups[0].ranges[1]` is 5..11, but it must end within the buffer (the buffer holds 10 values)",
        ),
        (
            sgd(0.0, 0.0, false),
            vec![group(vec![0..5], 0.1, 0.0), group(vec![6..8, 4..6], 0.1, 0.0)],
            "`groups[0].ranges[0]` (0..5) and `groups[1].ranges[1]` (4..6) overlap",
        ),
    ];
    for (kind, groups, expected) in cases {
        let config = OptimizerConfig::new(kind, groups);
        let error = CpuOptimizer::new(config.clone(), 10).expect_err(&format!("{config:?} must be refused"));
        let message = error.to_string();
        assert!(message.contains(expected), "{message:?} should contain {expected:?}");
    }
    // Empty ranges anywhere inside the buffer, and gaps, are fine.
    let config = OptimizerConfig::new(sgd(0.9, 0.0, true), vec![group(vec![3..3, 0..2, 10..10], 0.1, 0.0)]);
    CpuOptimizer::new(config, 10).unwrap();
}

#[test]
fn steps_with_wrong_buffers_or_factors_are_refused_without_changes() {
    let mut opt = CpuOptimizer::new(OptimizerConfig::adam(0.1, 4), 4).unwrap();
    let mut params = [1.0; 4];
    let error = opt.step(&mut params[..3], &[1.0; 4], 1.0).unwrap_err();
    assert_eq!(
        error.to_string(),
        "optimizer step: `params` holds 3 values, but the optimizer was built for 4"
    );
    let error = opt.step(&mut params, &[1.0; 5], 1.0).unwrap_err();
    assert_eq!(
        error.to_string(),
        "optimizer step: `grads` holds 5 values, but the optimizer was built for 4"
    );
    for factor in [f64::NAN, -1.0, f64::INFINITY] {
        let error = opt.step(&mut params, &[1.0; 4], factor).unwrap_err();
        assert!(
            error.to_string().contains(&format!("`lr_factor` is {factor}")),
            "{error}"
        );
    }
    assert_eq!(params, [1.0; 4]);
    assert_eq!(opt.steps(), 0);
    assert!(opt.state(EXP_AVG).unwrap().iter().all(|&m| m == 0.0));
    // A factor of 0 moves the moments but not the parameters.
    opt.step(&mut params, &[1.0; 4], 0.0).unwrap();
    assert_eq!(params, [1.0; 4]);
    assert_eq!(opt.steps(), 1);
}

#[test]
fn state_buffers_are_named_full_length_and_writable() {
    let mut opt = CpuOptimizer::new(OptimizerConfig::lamb(0.1, 0.0, 6), 6).unwrap();
    assert_eq!(opt.state_names(), [EXP_AVG, EXP_AVG_SQ]);
    assert_eq!(opt.state(EXP_AVG_SQ).unwrap().len(), 6);
    assert!(opt.state(MOMENTUM_BUFFER).is_none());
    opt.state_mut(EXP_AVG).unwrap()[2] = 4.0;
    assert_eq!(opt.state(EXP_AVG).unwrap()[2], 4.0);
    let opt = CpuOptimizer::new(OptimizerConfig::sgd(0.1, 0.9, 6), 6).unwrap();
    assert_eq!(opt.state_names(), [MOMENTUM_BUFFER]);
    assert_eq!(opt.config().groups[0].ranges, [0..6]);
    assert_eq!(opt.total_values(), 6);
}

// ---------------------------------------------------------------------------------------------------------------
// Metadata

#[test]
fn metadata_round_trips_and_continues_identically() {
    // An SGD optimizer that has stepped, copied into a fresh one through its state and metadata, steps the same.
    let config = OptimizerConfig::new(sgd(0.9, 0.5, false), vec![group(vec![0..8], 0.1, 0.01)]);
    let mut donor = CpuOptimizer::new(config.clone(), 8).unwrap();
    let mut params = random_values(8, 1);
    for step in 0..3 {
        donor.step(&mut params, &random_values(8, 2 + step), 1.0).unwrap();
    }
    let bytes = donor.metadata();
    assert_eq!(bytes.len(), METADATA_LEN);
    assert_eq!(bytes, [1, 1, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    let mut receiver = CpuOptimizer::new(config, 8).unwrap();
    receiver.load_metadata(&bytes).unwrap();
    receiver
        .state_mut(MOMENTUM_BUFFER)
        .unwrap()
        .copy_from_slice(donor.state(MOMENTUM_BUFFER).unwrap());
    assert_eq!(receiver.steps(), 3);
    assert!(receiver.momentum_initialised());
    let mut received_params = params.clone();
    let grads = random_values(8, 9);
    donor.step(&mut params, &grads, 1.0).unwrap();
    receiver.step(&mut received_params, &grads, 1.0).unwrap();
    assert!(same_bits(&params, &received_params));

    let mut adam = CpuOptimizer::new(OptimizerConfig::adamw(0.1, 0.0, 1), 1).unwrap();
    adam.set_steps(u64::MAX - 1);
    let bytes = adam.metadata();
    assert_eq!(bytes[..4], [1, 3, 0, 0]);
    let mut other = CpuOptimizer::new(OptimizerConfig::adamw(0.1, 0.0, 1), 1).unwrap();
    other.load_metadata(&bytes).unwrap();
    assert_eq!(other.steps(), u64::MAX - 1);
}

#[test]
fn garbage_metadata_is_refused_naming_the_field() {
    let mut opt = CpuOptimizer::new(OptimizerConfig::adam(0.1, 1), 1).unwrap();
    opt.set_steps(7);
    let good = opt.metadata();
    let with = |index: usize, byte: u8| {
        let mut bytes = good.clone();
        bytes[index] = byte;
        bytes
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "`length` is 0 bytes, but it must be 12 bytes"),
        (
            vec![1, 2, 0],
            "`length` is 3 bytes, but it must be 12 bytes for version 1",
        ),
        ([&good[..], &[0]].concat(), "`length` is 13 bytes"),
        (with(0, 2), "`version` is 2, but it must be 1"),
        (with(1, 1), "`kind` is 1, but it must be 2 (adam)"),
        (with(1, 200), "`kind` is 200"),
        (with(2, 1), "`flags` is 0x01, but it must be within 0x00 for adam"),
        (with(3, 9), "`reserved` is 9, but it must be 0"),
    ];
    for (bytes, expected) in cases {
        let error = opt
            .load_metadata(&bytes)
            .expect_err(&format!("{bytes:?} must be refused"));
        assert!(
            error.to_string().contains(expected),
            "{error} should contain {expected:?}"
        );
        assert_eq!(opt.steps(), 7, "a refused load changes nothing");
    }
    let mut sgd_opt = CpuOptimizer::new(OptimizerConfig::sgd(0.1, 0.9, 1), 1).unwrap();
    let mut bytes = sgd_opt.metadata();
    bytes[2] = 0b10;
    let error = sgd_opt.load_metadata(&bytes).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("`flags` is 0x02, but it must be within 0x01 for sgd"),
        "{error}"
    );
}

proptest! {
    #[test]
    fn any_metadata_bytes_load_or_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
        let mut opt = CpuOptimizer::new(OptimizerConfig::sgd(0.1, 0.9, 1), 1).unwrap();
        match opt.load_metadata(&bytes) {
            Ok(()) => prop_assert_eq!(opt.metadata(), bytes),
            Err(error) => {
                let is_metadata_error = matches!(error, OptimizerError::InvalidMetadata { .. });
                prop_assert!(is_metadata_error, "{}", error);
                prop_assert_eq!(opt.steps(), 0);
            }
        }
    }

    /// Any valid configuration steps without panicking and keeps finite parameters finite.
    #[test]
    fn random_layouts_step_without_panicking(
        cuts in proptest::collection::vec(0usize..200, 0..8),
        kind in 0u8..4,
        lr in 0.0f32..1.0,
        weight_decay in 0.0f32..0.1,
    ) {
        let total = 200;
        let mut cuts = cuts;
        cuts.sort_unstable();
        let ranges: Vec<_> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
        let kind = match kind {
            0 => sgd(0.9, 0.0, true),
            1 => OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            2 => OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            _ => lamb_kind(0.9, 0.999, 1e-6, 10.0),
        };
        let config = OptimizerConfig::new(kind, vec![group(ranges.clone(), lr, weight_decay)]);
        let mut opt = CpuOptimizer::new(config, total).unwrap();
        let mut params = random_values(total, 5);
        let before = params.clone();
        opt.step(&mut params, &random_values(total, 6), 1.0).unwrap();
        prop_assert!(params.iter().all(|p| p.is_finite()));
        for i in 0..total {
            if !ranges.iter().any(|r| r.contains(&i)) {
                prop_assert_eq!(params[i].to_bits(), before[i].to_bits());
            }
        }
    }
}
