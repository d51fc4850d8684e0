//! The examples' data and model: determinism, gradients, the flat-buffer round trip, learning, and the chart.
//!
//! Two `#[ignore]`d tests measure the numbers quoted in the docs (run them in release):
//! `cargo test --release -p colony-examples --test model -- --ignored --nocapture`.

use std::collections::HashSet;
use std::time::Instant;

use colony_examples::data::{Batches, DataSpec, Dataset, generate};
use colony_examples::model::{Mlp, MlpSpec};
use colony_examples::plot::{Series, plot_loss_curves};

fn small_spec(seed: u64) -> DataSpec {
    DataSpec {
        seed,
        train: 2_000,
        validation: 500,
        ..DataSpec::default()
    }
}

fn bytes(data: &Dataset) -> Vec<u8> {
    let inputs = data.inputs.iter().flat_map(|v| v.to_le_bytes());
    inputs.chain(data.labels.iter().flat_map(|v| v.to_le_bytes())).collect()
}

#[test]
fn data_is_a_function_of_the_seed() {
    let (train, validation) = generate(&small_spec(7));
    let (train_again, validation_again) = generate(&small_spec(7));
    assert_eq!(bytes(&train), bytes(&train_again));
    assert_eq!(bytes(&validation), bytes(&validation_again));
    let (other, _) = generate(&small_spec(8));
    assert_ne!(bytes(&train), bytes(&other));

    assert_eq!(
        (train.len(), validation.len(), train.dim, train.classes),
        (2_000, 500, 64, 10)
    );
    assert_eq!(train.inputs.len(), 2_000 * 64);
    assert!(train.inputs.iter().all(|v| v.is_finite()));
    // Every class occurs, none dominates.
    let mut counts = [0usize; 10];
    train.labels.iter().for_each(|&label| counts[label as usize] += 1);
    assert!(
        counts.iter().all(|&count| (50..500).contains(&count)),
        "class counts {counts:?}"
    );
}

#[test]
fn data_is_the_same_on_every_machine() {
    // Pinned values: a change here means peers on different versions would train on different data.
    let (train, validation) = generate(&DataSpec {
        seed: 42,
        dim: 4,
        classes: 3,
        train: 3,
        validation: 1,
    });
    let digest = |data: &Dataset| {
        bytes(data).iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    };
    assert_eq!(train.labels, vec![1, 0, 2]);
    assert_eq!(train.inputs[..4], [0.20733003, -0.031537455, -1.465606, 0.9750905]);
    assert_eq!(validation.inputs, [0.11748868, 0.56747925, 0.52681607, -1.1373769]);
    assert_eq!(
        (digest(&train), digest(&validation)),
        (4_336_219_063_012_826_111, 14_633_936_695_268_782_385)
    );
}

#[test]
fn validation_is_held_out() {
    let (train, validation) = generate(&small_spec(3));
    let rows = |data: &Dataset| -> HashSet<Vec<u32>> {
        data.inputs
            .chunks_exact(data.dim)
            .map(|row| row.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    let train_rows = rows(&train);
    assert_eq!(train_rows.len(), train.len(), "training rows are distinct draws");
    assert!(rows(&validation).is_disjoint(&train_rows));
}

#[test]
fn batches_are_per_peer_and_full() {
    let a: Vec<Vec<usize>> = Batches::new(1_000, 64, 1).take(40).collect();
    let b: Vec<Vec<usize>> = Batches::new(1_000, 64, 2).take(40).collect();
    assert_ne!(a, b, "peers with different seeds visit the data in different orders");
    assert!(
        a.iter()
            .all(|batch| batch.len() == 64 && batch.iter().all(|&i| i < 1_000))
    );
    // 15 batches per pass of 1000 / 64: the first pass has no repeated index.
    let first_pass: HashSet<usize> = a[..15].iter().flatten().copied().collect();
    assert_eq!(first_pass.len(), 15 * 64);
}

#[test]
fn gradients_match_finite_differences() {
    let spec = MlpSpec {
        input: 5,
        hidden: vec![7, 6],
        classes: 4,
        seed: 11,
    };
    let mut model = Mlp::new(&spec).unwrap();
    // Random inputs and labels, and random (not zero) biases so every bias gradient is exercised.
    let mut rng = colony_examples::data::SplitMix64::new(4);
    let inputs: Vec<f32> = (0..3 * 5).map(|_| rng.normal() as f32).collect();
    let labels = vec![0, 3, 2];
    let params: Vec<f32> = model.params().iter().map(|&p| p + 0.1 * rng.normal() as f32).collect();
    model.set_params(&params).unwrap();

    let mut grads = vec![0.0; model.num_params()];
    let mut scratch = vec![0.0; model.num_params()];
    model.loss_and_grads(&inputs, &labels, &mut grads).unwrap();
    let mut loss_at = |flat: &[f32]| {
        model.set_params(flat).unwrap();
        f64::from(model.loss_and_grads(&inputs, &labels, &mut scratch).unwrap())
    };
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    for i in 0..params.len() {
        let mut shifted = params.clone();
        shifted[i] = params[i] + eps;
        let up = loss_at(&shifted);
        shifted[i] = params[i] - eps;
        let down = loss_at(&shifted);
        let numeric = (up - down) / (2.0 * f64::from(eps));
        let error = (numeric - f64::from(grads[i])).abs() / (1e-2 + numeric.abs());
        worst = worst.max(error);
        assert!(error < 2e-2, "parameter {i}: analytic {} numeric {numeric}", grads[i]);
    }
    assert!(grads.iter().any(|&g| g.abs() > 1e-3));
    println!(
        "worst relative gradient error {worst:.2e} over {} parameters",
        params.len()
    );
}

#[test]
fn gradients_are_overwritten_not_accumulated() {
    let mut model = Mlp::new(&MlpSpec {
        input: 3,
        hidden: vec![4],
        classes: 2,
        seed: 0,
    })
    .unwrap();
    let mut first = vec![0.0; model.num_params()];
    let mut second = vec![123.0; model.num_params()];
    model.loss_and_grads(&[1.0, -1.0, 0.5], &[1], &mut first).unwrap();
    model.loss_and_grads(&[1.0, -1.0, 0.5], &[1], &mut second).unwrap();
    assert_eq!(first, second);
}

#[test]
fn parameters_round_trip_through_the_flat_buffer() {
    let spec = MlpSpec {
        input: 6,
        hidden: vec![5, 4],
        classes: 3,
        seed: 2,
    };
    let mut model = Mlp::new(&spec).unwrap();
    assert_eq!(model.num_params(), spec.num_params());
    assert_eq!(model.num_params(), 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3);
    let infos = model.tensor_infos();
    let names: Vec<&str> = infos.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "layer0.weight",
            "layer0.bias",
            "layer1.weight",
            "layer1.bias",
            "layer2.weight",
            "layer2.bias"
        ]
    );
    assert_eq!(infos[0].1, vec![5, 6]);
    assert_eq!(
        infos
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum::<usize>(),
        model.num_params()
    );

    let new: Vec<f32> = (0..model.num_params()).map(|i| i as f32 * 0.5 - 3.0).collect();
    model.set_params(&new).unwrap();
    assert_eq!(model.params(), new);
    let mut out = vec![0.0; model.num_params()];
    model.write_params_into(&mut out);
    assert_eq!(out, new);
    assert!(model.set_params(&new[1..]).is_err());
    assert!(model.loss_and_grads(&[0.0; 6], &[0], &mut out[1..]).is_err());
    assert!(
        model.loss_and_grads(&[0.0; 5], &[0], &mut out).is_err(),
        "input length is checked"
    );
    assert!(
        model.loss_and_grads(&[0.0; 6], &[3], &mut out).is_err(),
        "labels are checked"
    );

    // The weights are in the [out, in] layout: layer0.weight[0][1] is the 2nd value, and a model with only
    // that weight set to 1 (and the others 0) copies input 1 into hidden unit 0.
    let mut probe = vec![0.0; model.num_params()];
    probe[1] = 1.0;
    model.set_params(&probe).unwrap();
    let logits_before = model.logits(&[0.0, 2.0, 0.0, 0.0, 0.0, 0.0], 1).unwrap();
    assert_eq!(logits_before, vec![0.0; 3]);
}

#[test]
fn initialisation_is_a_function_of_the_seed() {
    let spec = MlpSpec {
        input: 8,
        hidden: vec![16],
        classes: 3,
        seed: 5,
    };
    let a = Mlp::new(&spec).unwrap().params();
    assert_eq!(a, Mlp::new(&spec).unwrap().params());
    assert_ne!(
        a,
        Mlp::new(&MlpSpec {
            seed: 6,
            ..spec.clone()
        })
        .unwrap()
        .params()
    );
    // He-uniform bounds: first layer within ±√(6/8), zero biases.
    assert!(a[..16 * 8].iter().all(|w| w.abs() <= (6.0f32 / 8.0).sqrt()));
    assert!(a[16 * 8..16 * 8 + 16].iter().all(|&b| b == 0.0));
    // Pinned: peers on different machines must start from the same weights.
    assert_eq!(a[..4], [0.12909822, 0.6167728, -0.6807612, -0.76149726]);
    let digest = a.iter().fold(0u64, |h, w| h.rotate_left(5) ^ u64::from(w.to_bits()));
    assert_eq!(digest, 10_645_028_320_752_618_507);
}

/// Plain SGD (`params -= learning_rate · grads`) on `model` for `steps` batches of 64.
fn train_sgd(model: &mut Mlp, train: &Dataset, steps: usize, learning_rate: f32, seed: u64) {
    let mut params = model.params();
    let mut grads = vec![0.0; model.num_params()];
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    for batch in Batches::new(train.len(), 64, seed).take(steps) {
        train.batch_into(&batch, &mut inputs, &mut labels);
        model.loss_and_grads(&inputs, &labels, &mut grads).unwrap();
        params.iter_mut().zip(&grads).for_each(|(p, g)| *p -= learning_rate * g);
        model.set_params(&params).unwrap();
    }
}

#[test]
fn an_mlp_learns_the_task_and_a_linear_model_cannot() {
    let (train, validation) = generate(&DataSpec {
        seed: 1,
        train: 16_384,
        validation: 2_048,
        ..DataSpec::default()
    });
    let mut mlp = Mlp::new(&MlpSpec {
        input: 64,
        hidden: vec![128, 128],
        classes: 10,
        seed: 1,
    })
    .unwrap();
    let mut linear = Mlp::new(&MlpSpec {
        input: 64,
        hidden: vec![],
        classes: 10,
        seed: 1,
    })
    .unwrap();
    let before = mlp.evaluate(&validation).unwrap();
    let started = Instant::now();
    train_sgd(&mut mlp, &train, 1_500, 0.1, 1);
    train_sgd(&mut linear, &train, 1_500, 0.1, 1);
    let (after, linear_after) = (
        mlp.evaluate(&validation).unwrap(),
        linear.evaluate(&validation).unwrap(),
    );
    println!(
        "validation: before {before:?}, MLP after {after:?}, linear after {linear_after:?} ({:?})",
        started.elapsed()
    );
    assert!(
        after.loss < 0.5 * before.loss,
        "the validation loss falls clearly: {before:?} → {after:?}"
    );
    assert!(after.accuracy > 0.8, "the MLP learns the task: {after:?}");
    assert!(
        after.accuracy > linear_after.accuracy + 0.25,
        "MLP {after:?} vs linear {linear_after:?}"
    );
}

#[test]
fn the_chart_is_written_as_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    let curve = |label: &str, scale: f64| Series {
        label: label.into(),
        points: (0..200)
            .map(|i| (i as f64 * 10.0, scale * 2.3 / (1.0 + i as f64 / 20.0)))
            .collect(),
    };
    let series = [
        curve("solo", 1.0),
        curve("4 peers (collaborative)", 0.8),
        Series {
            label: "empty".into(),
            points: vec![],
        },
    ];
    plot_loss_curves(&path, "Validation loss: MLP, 1.0M params", "samples", &series).unwrap();
    let png = std::fs::read(&path).unwrap();
    assert!(png.len() > 1_000, "{} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Degenerate input still draws: no series, a single point, non-finite values.
    plot_loss_curves(&path, "", "", &[]).unwrap();
    let odd = Series {
        label: "odd".into(),
        points: vec![(1.0, f64::NAN), (2.0, 0.5), (f64::INFINITY, 1.0)],
    };
    plot_loss_curves(&path, "one point", "x", &[odd]).unwrap();
    // An unwritable path is an error, not a panic.
    assert!(plot_loss_curves(&dir.path().join("missing/dir/loss.png"), "t", "x", &series).is_err());
}

/// Time of one `loss_and_grads` at about 1 M parameters, batch 64. Release mode: see the file's doc.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn measure_loss_and_grads_at_one_million_parameters() {
    let spec = MlpSpec::with_params_near(64, 10, 1_000_000);
    let mut model = Mlp::new(&spec).unwrap();
    let (train, _) = generate(&DataSpec {
        train: 4_096,
        validation: 1,
        ..DataSpec::default()
    });
    let mut grads = vec![0.0; model.num_params()];
    let mut params = model.params();
    let batches: Vec<Vec<usize>> = Batches::new(train.len(), 64, 0).take(300).collect();
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    for batch in &batches[..20] {
        train.batch_into(batch, &mut inputs, &mut labels);
        model.loss_and_grads(&inputs, &labels, &mut grads).unwrap();
    }
    let started = Instant::now();
    for batch in &batches[20..] {
        train.batch_into(batch, &mut inputs, &mut labels);
        model.loss_and_grads(&inputs, &labels, &mut grads).unwrap();
    }
    let step = started.elapsed() / (batches.len() - 20) as u32;
    let started = Instant::now();
    for _ in 0..100 {
        model.write_params_into(&mut params);
        model.set_params(&params).unwrap();
    }
    let copy = started.elapsed() / 100;
    println!(
        "{:?}: {} params; loss_and_grads at batch 64: {step:?} per step; write_params_into + set_params: {copy:?}",
        spec.hidden,
        model.num_params()
    );
}

/// Validation accuracy against steps for the ~1 M-parameter model and a linear one, plain SGD (lr 0.1), batch 64.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn measure_accuracy_against_steps() {
    let (train, validation) = generate(&DataSpec::default());
    let checkpoints = [100, 250, 500, 750, 1_000, 1_500, 2_000, 2_500, 3_000];
    for hidden in [None, Some(vec![])] {
        let spec = match hidden {
            None => MlpSpec::with_params_near(64, 10, 1_000_000),
            Some(hidden) => MlpSpec {
                input: 64,
                hidden,
                classes: 10,
                seed: 0,
            },
        };
        let mut model = Mlp::new(&spec).unwrap();
        let mut params = model.params();
        let mut grads = vec![0.0; model.num_params()];
        let (mut inputs, mut labels) = (Vec::new(), Vec::new());
        let mut training = std::time::Duration::ZERO;
        for (step, batch) in Batches::new(train.len(), 64, 0).take(3_000).enumerate() {
            let started = Instant::now();
            train.batch_into(&batch, &mut inputs, &mut labels);
            model.loss_and_grads(&inputs, &labels, &mut grads).unwrap();
            params.iter_mut().zip(&grads).for_each(|(p, g)| *p -= 0.1 * g);
            model.set_params(&params).unwrap();
            training += started.elapsed();
            if checkpoints.contains(&(step + 1)) {
                let evaluation = model.evaluate(&validation).unwrap();
                println!(
                    "{:?} step {:5} (training time {:5.1} s): validation loss {:.3}, accuracy {:.3}",
                    spec.hidden,
                    step + 1,
                    training.as_secs_f64(),
                    evaluation.loss,
                    evaluation.accuracy
                );
            }
        }
    }
}
