//! `bench -- optimizer`: how fast `colony-offload`'s CPU optimizers step, in parameters per second, against the
//! rate the machine's memory bandwidth allows for the bytes each rule must move.
//!
//! Parameters and gradients are `randn(values)` (64 Mi values, 256 MiB each, by default) from fixed seeds; every
//! optimizer keeps its state between rounds, as in training. Round 0 is an untimed warm-up that touches every
//! buffer; then cases take turns in each of `repeat` rounds and the best round is reported.
//!
//! The bound is a STREAM-like triad (`a[i] = b[i] + s · c[i]`, [`colony_offload::kernels::triad`]: the same
//! rayon chunking as the optimizers) over three arrays as large together as Adam's four, counted as STREAM
//! does: 12 bytes per value. A case's bound is that byte rate divided by the bytes it moves per parameter:
//!
//! | case           | reads             | writes    | bytes |
//! |----------------|-------------------|-----------|-------|
//! | `adam`, `adamw`| p, g, m, v        | p, m, v   | 28    |
//! | `sgd-momentum` | p, g, buf         | p, buf    | 20    |
//! | `lamb`         | p, g, m, v; p, m, v | m, v; p | 40 (two passes) |
//! | `axpy`         | y, x              | y         | 12    |
//!
//! A ratio of 1 means the step runs at the triad's memory speed. (STREAM's count ignores the read that a
//! cache fills before a write, which the triad pays for `a` and the optimizers do not, since they read what they
//! write; a ratio slightly above 1 is therefore possible.)

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use colony_offload::kernels::{axpy, triad};
use colony_offload::{CpuOptimizer, OptimizerConfig};

use super::{Measurement, randn};

const SUITE: &str = "optimizer";
const SEED: u64 = 5113;
/// Bytes per value of the triad, as STREAM counts them.
const TRIAD_BYTES: f64 = 12.0;
/// The learning rate of every case: small, so that repeated steps keep the parameters finite.
const LR: f32 = 1e-4;

/// The cases, with the bytes each moves per parameter.
const CASES: [(&str, f64); 5] = [
    ("adam", 28.0),
    ("adamw", 28.0),
    ("sgd-momentum", 20.0),
    ("lamb", 40.0),
    ("axpy", 12.0),
];

/// What a case runs each round.
enum Work {
    Step(Box<CpuOptimizer>),
    Axpy,
}

/// Runs the suite on `values` parameters: every case (or only the one named `only`), best of `repeat` rounds,
/// with the triad bound always measured.
pub fn run(values: usize, repeat: usize, only: Option<&str>) -> anyhow::Result<Vec<Measurement>> {
    if values == 0 {
        bail!("the optimizer suite needs at least one parameter");
    }
    let cases: Vec<(&str, f64)> = match only {
        None => CASES.to_vec(),
        Some(name) => vec![*CASES.iter().find(|(case, _)| *case == name).with_context(|| {
            let names: Vec<&str> = CASES.iter().map(|(case, _)| *case).collect();
            format!("the optimizer suite has the cases {}, not {name}", names.join(", "))
        })?],
    };
    let mut work = Vec::with_capacity(cases.len());
    for &(name, _) in &cases {
        let config = match name {
            "adam" => OptimizerConfig::adam(LR, values),
            "adamw" => OptimizerConfig::adamw(LR, 0.01, values),
            "sgd-momentum" => OptimizerConfig::sgd(LR, 0.9, values),
            "lamb" => OptimizerConfig::lamb(LR, 0.01, values),
            _ => {
                work.push(Work::Axpy);
                continue;
            }
        };
        let optimizer = CpuOptimizer::new(config, values).with_context(|| format!("the {name} configuration"))?;
        work.push(Work::Step(Box::new(optimizer)));
    }

    let mut params = randn(values, SEED);
    let grads = randn(values, SEED + 1);
    // Adam's four arrays, as three for the triad.
    let triad_len = (values * 4).div_ceil(3);
    let mut triad_target = vec![1.0f32; triad_len];
    let triad_b = vec![2.0f32; triad_len];
    let triad_c = vec![0.5f32; triad_len];

    let mut triad_times = Vec::with_capacity(repeat);
    let mut case_times = vec![Vec::with_capacity(repeat); cases.len()];
    for round in 0..=repeat {
        let triad_time = timed(|| triad(&mut triad_target, &triad_b, 3.0, &triad_c));
        if round > 0 {
            triad_times.push(triad_time);
        }
        for (c, work) in work.iter_mut().enumerate() {
            let elapsed = match work {
                Work::Step(optimizer) => {
                    let started = Instant::now();
                    optimizer
                        .step(&mut params, &grads, 1.0)
                        .with_context(|| format!("{} steps", cases[c].0))?;
                    started.elapsed()
                }
                Work::Axpy => timed(|| axpy(&mut params, -LR, &grads)),
            };
            if round > 0 {
                case_times[c].push(elapsed);
            }
        }
    }
    black_box((&triad_target, &params));
    if let Some(bad) = params.iter().position(|p| !p.is_finite()) {
        bail!("parameter {bad} is {} after the runs: the cases diverged", params[bad]);
    }

    let best = |all: &[Duration]| all.iter().min().expect("repeat is at least 1").as_secs_f64();
    let triad_bytes_per_s = TRIAD_BYTES * triad_len as f64 / best(&triad_times);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = format!("{} Mi params", values as f64 / f64::from(1 << 20));
    let mut results = vec![
        Measurement::new(SUITE, "triad", triad_bytes_per_s / 1e9, "GB/s", triad_bytes_per_s / 1e9)
            .bound_case("triad")
            .note(format!(
                "{:.2} Mi values x 3 arrays, {threads} threads, best of {repeat}, STREAM bytes",
                triad_len as f64 / f64::from(1 << 20)
            )),
    ];
    for (c, &(name, bytes)) in cases.iter().enumerate() {
        let seconds = best(&case_times[c]);
        let rate = values as f64 / seconds / 1e6;
        let bound = triad_bytes_per_s / bytes / 1e6;
        results.push(
            Measurement::new(SUITE, name, rate, "M/s", bound)
                .bound_case(format!("triad/{bytes:.0}B"))
                .note(format!(
                    "{size}, {:.1} ms/step, {:.1} GB/s moved",
                    seconds * 1e3,
                    rate * bytes / 1e3
                )),
        );
    }
    Ok(results)
}

/// The best of `repeat` timings (after one untimed warm-up) of a bare [`axpy`] of `values` values, in seconds:
/// the cost that accumulating a micro-batch's gradient into the buffer is compared with.
pub fn bare_axpy_seconds(values: usize, repeat: usize) -> f64 {
    let mut y = randn(values, SEED);
    let x = randn(values, SEED + 1);
    let mut best = Duration::MAX;
    for round in 0..=repeat.max(1) {
        let elapsed = timed(|| axpy(&mut y, 1e-3, &x));
        if round > 0 {
            best = best.min(elapsed);
        }
    }
    black_box(&y);
    best.as_secs_f64()
}

fn timed(f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

/// `step` case: what [`CollaborativeOptimizer::step`] costs between epochs (accumulating one micro-batch's
/// gradient and reporting progress) on `values` parameters, against a bare [`axpy`] over the same gradient.
/// One peer alone on the in-process transport, with a target batch it never reaches. Here the ratio is step
/// time / axpy time (lower is better); the goal is at most 1.2.
///
/// [`CollaborativeOptimizer::step`]: colony::optimizer::CollaborativeOptimizer::step
pub async fn step_cost(values: usize, repeat: usize) -> anyhow::Result<Measurement> {
    use colony::membership::MembershipConfig;
    use colony::optimizer::CollaborativeOptions;
    use colony_averaging::tensor::TensorInfo;
    use colony_transports::Keypair;
    use colony_transports::mem::MemHub;

    let keypair = Keypair::generate();
    let hub = MemHub::new();
    let transport = hub.transport(&keypair);
    let config = MembershipConfig::new("bench-step", Some("mem://step".parse()?));
    let options = CollaborativeOptions::new(u64::MAX / 2, OptimizerConfig::adam(1e-3, values));
    let params = randn(values, SEED);
    let mut peer = colony::peer::start_training_peer(
        config,
        keypair,
        Some(transport),
        vec![TensorInfo::new("w", [values])],
        &params,
        options,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let mut params = params;
    let mut grads = randn(values, SEED + 1);
    let mut best = Duration::MAX;
    let mut all = Vec::new();
    for round in 0..=repeat.max(1) * 10 {
        let started = Instant::now();
        let outcome = peer.optimizer.step(&mut params, &mut grads, Some(64)).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(!outcome.epoch_finished, "the step suite's epoch must not end");
        if round > 0 {
            best = best.min(elapsed);
            all.push(elapsed.as_secs_f64());
        }
    }
    all.sort_by(f64::total_cmp);
    let median = all[all.len() / 2];
    peer.optimizer.shutdown().await;
    peer.membership.shutdown();
    let axpy = bare_axpy_seconds(values, repeat.max(1) * 10);
    Ok(
        Measurement::new("optimizer", "step", best.as_secs_f64() * 1e3, "ms", axpy * 1e3)
            .bound_case("bare axpy")
            .note(format!(
                "{values} params; best of {} steps {:.3} ms, median {:.3} ms; ratio = step / axpy (goal <= 1.2)",
                all.len(),
                best.as_secs_f64() * 1e3,
                median * 1e3
            )),
    )
}
