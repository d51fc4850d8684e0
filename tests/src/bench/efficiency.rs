//! `bench -- efficiency`: how much of a peer's compute turns into training when it trains with others.
//!
//! Two peers run as separate processes of this binary (`bench efficiency-peer`) on loopback TCP, each
//! with the example MLP (about 1 M parameters) and its own shuffled batches of 64. Both first train alone at
//! the same time (plain local Adam steps, the same threads as later), which is the bound; then they join one
//! run and train 10 epochs of 4096 samples with the collaborative optimizer's defaults. The ratio is a
//! peer's collaborative samples/s over its solo samples/s in the same run. The second figure compares an
//! epoch's wall time with the pure compute time of its samples split between the peers (the time an epoch
//! would take if averaging, matchmaking and stepping cost nothing).

use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use colony::membership::MembershipConfig;
use colony::peer::start_training_peer;
use colony_examples::swarm::{TrainFlags, tensor_infos, train};
use colony_examples::{Batches, Mlp, generate};
use colony_offload::{CpuOptimizer, OptimizerConfig};
use colony_transports::{Address, Keypair};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::Measurement;

/// Epochs of the collaborative phase.
const EPOCHS: u64 = 10;
/// Samples per epoch for the whole swarm.
const TARGET: u64 = 4096;
/// Samples per step.
const BATCH: u32 = 64;
/// Hidden widths for about 1 M parameters with 64 inputs and 10 classes.
const HIDDEN: &str = "963,963";

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    flags: TrainFlags,
}

/// What a peer process reports.
#[derive(Debug, Serialize, Deserialize)]
struct PeerResult {
    solo_samples_per_second: f64,
    samples: u64,
    seconds: f64,
    compute_seconds: f64,
    epochs: u64,
    failures: u64,
    gradient_rounds: u64,
}

fn flags() -> TrainFlags {
    let args = [
        "efficiency".to_owned(),
        format!("--target-batch-size={TARGET}"),
        format!("--batch-size={BATCH}"),
        format!("--hidden={HIDDEN}"),
        format!("--max-epochs={EPOCHS}"),
        "--target-accuracy=0".into(),
        "--eval-every=0".into(),
        "--lr=0.001".into(),
    ];
    Flags::parse_from(args).flags
}

/// Runs the suite: two peer processes, solo then together.
pub async fn run(solo_steps: usize) -> anyhow::Result<Vec<Measurement>> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        listener.local_addr()?.port()
    };
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let mut children = Vec::new();
    for index in 0..2usize {
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg("efficiency-peer")
            .arg("--index")
            .arg(index.to_string())
            .arg("--repeat")
            .arg(solo_steps.to_string())
            .arg("--case")
            .arg(format!("tcp://127.0.0.1:{port}"))
            // One compute thread each: two processes share the two cores, in both phases.
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().context("spawning a peer process")?;
        let stdout = BufReader::new(child.stdout.take().context("peer stdout")?).lines();
        children.push((child, stdout));
    }
    // Both solo phases start together, once both processes hold their data and model.
    for (index, (_, stdout)) in children.iter_mut().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(300), stdout.next_line())
            .await
            .context("a peer process took more than 5 minutes to start")??;
        if line.as_deref() != Some("READY") {
            bail!("peer {index} said {line:?} instead of READY");
        }
    }
    for (child, _) in children.iter_mut() {
        let stdin = child.stdin.as_mut().context("peer stdin")?;
        tokio::io::AsyncWriteExt::write_all(stdin, b"GO\n").await?;
    }
    let mut results = Vec::new();
    for (index, (child, stdout)) in children.iter_mut().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(900), stdout.next_line())
            .await
            .context("a peer process took more than 15 minutes")??
            .with_context(|| format!("peer {index} ended without a result"))?;
        let result: PeerResult =
            serde_json::from_str(line.trim_start_matches("RESULT ")).context("a peer's result line")?;
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        results.push(result);
    }
    let mut measurements = Vec::new();
    for (index, result) in results.iter().enumerate() {
        let collaborative = result.samples as f64 / result.seconds;
        measurements.push(
            Measurement::new(
                "efficiency",
                format!("peer {index} samples/s"),
                collaborative,
                "samp/s",
                result.solo_samples_per_second,
            )
            .bound_case("same peer solo")
            .note(format!(
                "{} epochs of {TARGET} in {:.1} s, {} gradient rounds, {} failed rounds; compute {:.1} s",
                result.epochs, result.seconds, result.gradient_rounds, result.failures, result.compute_seconds
            )),
        );
    }
    // An epoch's wall time against the compute of its samples split between the two peers.
    let epoch_seconds = results
        .iter()
        .map(|r| r.seconds / r.epochs.max(1) as f64)
        .fold(0.0, f64::max);
    let compute_per_sample = results
        .iter()
        .map(|r| r.compute_seconds / r.samples.max(1) as f64)
        .sum::<f64>()
        / results.len() as f64;
    let ideal = compute_per_sample * TARGET as f64 / results.len() as f64;
    measurements.push(
        Measurement::new("efficiency", "epoch time", ideal, "s", epoch_seconds)
            .bound_case("measured epoch")
            .note(format!(
                "ratio = compute of {TARGET} samples split over 2 peers ({ideal:.3} s) / wall time of an epoch \
                 ({epoch_seconds:.3} s); compute of {TARGET} samples on one peer {:.3} s",
                compute_per_sample * TARGET as f64
            )),
    );
    Ok(measurements)
}

/// One peer process: solo for `solo_steps` steps, then the collaborative run; prints `RESULT {json}`.
pub fn peer_process(index: usize, solo_steps: usize, address: &str) -> anyhow::Result<()> {
    let flags = flags();
    let data_spec = flags.data_spec();
    let (train_set, validation) = generate(&data_spec);
    let model_spec = flags.model_spec(&data_spec);
    let seed = 7 + index as u64;

    // Solo: the same model, batches and thread count, with a plain local Adam step per batch.
    let mut model = Mlp::new(&model_spec)?;
    let mut params = model.params();
    let mut grads = vec![0.0f32; params.len()];
    let lr = flags.settings()?.lr.context("the trainer's defaults set lr")?;
    let mut optimizer = CpuOptimizer::new(OptimizerConfig::adam(lr, params.len()), params.len())?;
    let mut batches = Batches::new(train_set.len(), BATCH as usize, seed);
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    println!("READY");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).context("waiting for GO")?;
    let started = Instant::now();
    for _ in 0..solo_steps {
        let indices = batches.next().context("the data set is empty")?;
        train_set.batch_into(&indices, &mut inputs, &mut labels);
        model.loss_and_grads(&inputs, &labels, &mut grads)?;
        optimizer.step(&mut params, &grads, 1.0)?;
        model.set_params(&params)?;
    }
    let solo_samples_per_second = (solo_steps as f64 * f64::from(BATCH)) / started.elapsed().as_secs_f64();

    // Together.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut model = Mlp::new(&model_spec)?;
    let tensors = tensor_infos(&model);
    let options = flags.options(&tensors)?;
    let address: Address = address.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = if index == 0 {
        MembershipConfig::new("colony-efficiency", Some(address))
    } else {
        let mut config = MembershipConfig::new("colony-efficiency", Some("tcp://127.0.0.1:0".parse()?));
        config.initial_peers = vec![address];
        config
    };
    config.bootstrap_timeout = Duration::from_secs(60);
    let initial = model.params();
    let mut peer = runtime
        .block_on(start_training_peer(
            config,
            Keypair::generate(),
            None,
            tensors,
            &initial,
            options,
        ))
        .map_err(anyhow::Error::msg)?;
    let joined = Instant::now();
    while peer.membership.members().is_empty() {
        if joined.elapsed() > Duration::from_secs(60) {
            bail!("the other peer did not join within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = AtomicBool::new(false);
    let summary = train(
        &mut peer,
        &mut model,
        (&train_set, &validation),
        &flags,
        seed,
        &stop,
        |_| {},
    )?;
    runtime.block_on(async {
        peer.optimizer.shutdown().await;
        peer.membership.leave().await;
    });
    let result = PeerResult {
        solo_samples_per_second,
        samples: summary.samples,
        seconds: summary.seconds,
        compute_seconds: summary.compute_seconds,
        epochs: summary.epochs,
        failures: summary.failures,
        gradient_rounds: summary.gradient_rounds,
    };
    println!("RESULT {}", serde_json::to_string(&result)?);
    Ok(())
}
