//! Issue 7's robust aggregation criterion: eight peers, one of them Byzantine (it sends its gradients scaled
//! by 10³, or random values of that size). With CenteredClip (`gradient_aggregation`) the honest peers' final
//! validation loss ends within 5 % of the honest-only run's; with the mean it is measurably worse.
//!
//! The task is the example's (the synthetic 64-input, 10-class data set) with a small MLP trained by plain
//! SGD: SGD follows the gradient's magnitude, so a peer that scales its gradient scales everyone's step (Adam
//! would normalise most of the 10³ away and hide the attack). Every peer runs a training loop on its own std
//! thread on the mem transport (1 ms links), as the convergence test does; the attacker is an ordinary peer
//! whose trainer corrupts its gradients before handing them to `step`, so nothing in Colony knows about it.
//!
//! Three runs on the same data, initial model and data orders: the seven honest peers alone, then the
//! seven with the attacker under the mean, then under CenteredClip. The attacker trains honestly otherwise:
//! its samples count towards the epoch as anyone's, and it reduces its share of the parts like any peer.
//!
//! Two settings keep the comparison about gradient aggregation (each run uses them):
//! - `min_group_size` = every peer of the run: each gradient round averages the whole swarm. The first
//!   epoch's groups otherwise form while the peers' progress estimates are still settling, in twos to fours
//!   (measured), and in a group of two the attacker holds half the weight, which no aggregate can outvote
//!   (Colony refuses CenteredClip with `min_group_size` below 3).
//! - no state rounds: they average parameters with the mean. When the attacker's gradient round fails it
//!   steps on its own corrupted gradient (every peer falls back to its local gradient), and the next state
//!   round hands an eighth of its wrecked parameters to everyone, whatever the gradient rounds did
//!   (measured: a validation loss of 2.7 against 1.7 in one run of three). The honest peers stay together
//!   without them, since they all step on the same averaged gradients.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use colony::membership::{MembershipConfig, SwimConfig};
use colony::optimizer::{RoundKind, RoundResult};
use colony::peer::{TrainingPeer, start_training_peer};
use colony_examples::data::{Batches, SplitMix64};
use colony_examples::swarm::{TrainFlags, tensor_infos};
use colony_examples::{Dataset, Mlp, generate};
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::mem::MemHub;
use colony_transports::{Address, Keypair};

/// The swarm's samples per epoch.
const TARGET: u64 = 1024;
/// Samples per local step: eight peers take about eight steps each per epoch.
const BATCH: u32 = 16;
/// Epochs (global optimizer steps) of every run.
const EPOCHS: u64 = 20;
/// Honest peers; the attack runs add one more.
const HONEST: usize = 7;
/// The data order of peer `i` is `FIRST_SEED + i` (the attacker's is `FIRST_SEED + HONEST`).
const FIRST_SEED: u64 = 700;
/// A peer sleeps this long after each step, as if its device took that long per micro-batch: epochs last
/// long enough for the progress estimate to see every peer's samples (see the convergence test).
const PACE: Duration = Duration::from_millis(10);
/// The attacker's factor.
const SCALE: f32 = 1e3;
/// CenteredClip's radius, per gradient value as sent (a peer's summed gradient times its share of the
/// batch, about an eighth of its mean gradient). Measured on the honest run: the copies' mean is about 1e-3
/// per value (root mean square) and each honest copy lies about 1.5e-3 from it. τ a little below that clips
/// the honest copies slightly too (the centre tends to their geometric median) and bounds the attacker's
/// pull to about τ/8 per value, while its copy lies some 10³ times further out.
const TAU: f32 = 1e-3;
/// The longest one run may take before it fails (the runs take a few seconds).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The flags of the example trainer, parsed as the trainer parses them.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    train: TrainFlags,
}

/// The trainer's flags of this task, plus `extra`.
fn flags(extra: &[&str]) -> TrainFlags {
    let (target, batch, epochs) = (TARGET.to_string(), BATCH.to_string(), EPOCHS.to_string());
    let mut args = vec![
        "robust",
        "--target-batch-size",
        &target,
        "--batch-size",
        &batch,
        "--max-epochs",
        &epochs,
        "--hidden=40",
        "--train-samples=16384",
        "--optimizer=sgd",
        "--lr=0.5",
        "--target-accuracy=0",
        "--eval-every=0",
        // No state rounds: they average parameters with the mean, which robust gradient aggregation does not
        // cover (see the module's documentation).
        "--average-state-every=1000",
        // Test timings, as in the convergence test.
        "--matchmaking-time=1",
        "--request-timeout=0.3",
        "--averaging-timeout=5",
        "--next-chunk-timeout=2",
        "--load-state-timeout=20",
    ];
    args.extend_from_slice(extra);
    Flags::parse_from(args).train
}

/// The flag that turns CenteredClip on.
fn centered_clip_flags() -> Vec<String> {
    vec![
        "--gradient-aggregation".to_owned(),
        format!("{{ kind = \"centered_clip\", tau = {TAU}, iterations = 5 }}"),
    ]
}

/// What the Byzantine peer does to its gradient before `step`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Multiplies it by [`SCALE`].
    Scaled,
    /// Replaces it by normal random values of [`SCALE`] times its root mean square.
    Random,
}

/// What a run gave.
struct Run {
    /// Validation loss of each honest peer's final parameters (non-finite if training diverged).
    losses: Vec<f32>,
    /// Averaged gradient rounds of each honest peer.
    gradient_rounds: Vec<u64>,
    seconds: f64,
}

impl Run {
    /// The worst honest peer's loss; infinite if any diverged.
    fn worst(&self) -> f32 {
        self.losses
            .iter()
            .map(|&l| if l.is_finite() { l } else { f32::INFINITY })
            .fold(0.0, f32::max)
    }

    fn mean(&self) -> f32 {
        self.losses.iter().sum::<f32>() / self.losses.len() as f32
    }
}

/// The training and validation sets, generated once.
fn data() -> Arc<(Dataset, Dataset)> {
    static DATA: OnceLock<Arc<(Dataset, Dataset)>> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut spec = flags(&[]).data_spec();
        spec.validation = 4096;
        Arc::new(generate(&spec))
    })
    .clone()
}

/// The in-process network: 1 ms links, no loss.
fn hub() -> MemHub {
    let emulator = LinkEmulator::with_seed(7);
    emulator.set_default_link(LinkConfig {
        latency: Duration::from_millis(1),
        bandwidth_bytes_per_sec: None,
        datagram_loss: 0.0,
    });
    MemHub::with_emulator(emulator)
}

/// A peer's training loop: EPOCHS epochs of BATCH-sample steps in the data order `seed`, its gradient
/// corrupted by `attack`. Returns the averaged gradient rounds it saw.
fn train(
    peer: &mut TrainingPeer,
    model: &mut Mlp,
    train_set: &Dataset,
    seed: u64,
    attack: Option<Attack>,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut params = model.params();
    let mut grads = vec![0.0f32; params.len()];
    let mut batches = Batches::new(train_set.len(), BATCH as usize, seed);
    let mut noise = SplitMix64::new(seed ^ 0x5eed);
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    let mut gradient_rounds = 0;
    while peer.optimizer.local_epoch() < EPOCHS {
        anyhow::ensure!(
            started.elapsed() < RUN_TIMEOUT,
            "peer {seed} reached epoch {} of {EPOCHS} in {RUN_TIMEOUT:?}",
            peer.optimizer.local_epoch()
        );
        let indices = batches.next().context("the data set is empty")?;
        train_set.batch_into(&indices, &mut inputs, &mut labels);
        // Once the mean has blown the parameters up, the forward pass may fail or give NaN: the peer goes
        // on stepping (with zero gradients), as a trainer that does not check its loss would.
        if model.loss_and_grads(&inputs, &labels, &mut grads).is_err() {
            grads.fill(0.0);
        }
        match attack {
            None => {}
            Some(Attack::Scaled) => grads.iter_mut().for_each(|g| *g *= SCALE),
            Some(Attack::Random) => {
                let rms = (grads.iter().map(|g| f64::from(*g).powi(2)).sum::<f64>() / grads.len() as f64).sqrt();
                let rms = if rms.is_finite() && rms > 0.0 { rms } else { 1e-3 };
                grads
                    .iter_mut()
                    .for_each(|g| *g = (noise.normal() * rms * f64::from(SCALE)) as f32);
            }
        }
        let outcome = peer.optimizer.step_blocking(&mut params, &mut grads, Some(BATCH))?;
        if outcome.parameters_updated && model.set_params(&params).is_err() {
            anyhow::bail!("peer {seed}: the optimizer's parameters do not fit the model");
        }
        gradient_rounds += outcome
            .rounds
            .iter()
            .filter(|r| r.kind == RoundKind::Gradients && matches!(r.result, RoundResult::Averaged { .. }))
            .count() as u64;
        std::thread::sleep(PACE);
    }
    Ok(gradient_rounds)
}

/// Trains HONEST honest peers, plus one attacker when `attack` is given, with the trainer's `extra` flags;
/// evaluates the honest peers' final parameters on the validation set after their optimizers shut down.
fn run(name: &str, attack: Option<Attack>, extra: &[String]) -> anyhow::Result<Run> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let data = data();
    let peers = HONEST + usize::from(attack.is_some());
    // Every gradient round averages the whole swarm (see the module's documentation).
    let min_group_size = format!("--min-group-size={peers}");
    let extra: Vec<&str> = extra
        .iter()
        .map(String::as_str)
        .chain([min_group_size.as_str()])
        .collect();
    let flags = flags(&extra);
    let model_spec = flags.model_spec(&flags.data_spec());
    let model = Mlp::new(&model_spec)?;
    let tensors = tensor_infos(&model);
    let mut options = flags.options(&tensors)?;
    options.min_refresh_period = Duration::from_millis(20);
    options.max_refresh_period = Duration::from_millis(200);
    let initial = model.params();
    let hub = hub();
    let mut started: Vec<TrainingPeer> = Vec::new();
    let mut bootstrap: Option<Address> = None;
    for index in 0..peers {
        let listen: Address = format!("mem://robust-{name}-{index}").parse()?;
        let mut config = MembershipConfig::new(format!("robust-{name}"), Some(listen));
        config.initial_peers = bootstrap.iter().cloned().collect();
        config.swim = SwimConfig {
            probe_period: Duration::from_millis(300),
            probe_rtt: Duration::from_millis(150),
            suspect_to_down_after: Duration::from_millis(900),
            gossip_interval: Duration::from_millis(50),
            ..SwimConfig::default()
        };
        config.sync_interval = Duration::from_millis(200);
        config.publish_limits.rate_per_sec = 50.0;
        config.publish_limits.burst = 50;
        let keypair = Keypair::generate();
        let transport = hub.transport(&keypair);
        let peer = runtime
            .block_on(start_training_peer(
                config,
                keypair,
                Some(transport),
                tensors.clone(),
                &initial,
                options.clone(),
            ))
            .map_err(anyhow::Error::msg)?;
        if bootstrap.is_none() {
            bootstrap = peer.membership.address();
        }
        started.push(peer);
    }
    let joining = Instant::now();
    while !started.iter().all(|p| p.membership.members().len() + 1 == peers) {
        anyhow::ensure!(
            joining.elapsed() < Duration::from_secs(20),
            "{name}: the peers did not see each other within 20 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let clock = Instant::now();
    let threads: Vec<_> = started
        .into_iter()
        .enumerate()
        .map(|(index, mut peer)| {
            let (data, spec) = (data.clone(), model_spec.clone());
            let attack = attack.filter(|_| index == HONEST);
            std::thread::spawn(move || -> anyhow::Result<(u64, TrainingPeer)> {
                let mut model = Mlp::new(&spec)?;
                let rounds = train(&mut peer, &mut model, &data.0, FIRST_SEED + index as u64, attack)?;
                Ok((rounds, peer))
            })
        })
        .collect();
    let mut finished = Vec::new();
    let mut failure = None;
    for thread in threads {
        match thread.join() {
            Ok(Ok(result)) => finished.push(result),
            Ok(Err(error)) => failure = failure.or(Some(error)),
            Err(_) => failure = failure.or(Some(anyhow::anyhow!("{name}: a training thread panicked"))),
        }
    }
    let seconds = clock.elapsed().as_secs_f64();
    runtime.block_on(async {
        for (_, peer) in &mut finished {
            peer.optimizer.shutdown().await;
        }
    });
    let mut losses = Vec::new();
    let mut gradient_rounds = Vec::new();
    let mut model = Mlp::new(&model_spec)?;
    for (rounds, peer) in finished.iter().take(HONEST) {
        let params = peer.optimizer.parameters();
        let loss = if params.iter().all(|p| p.is_finite()) {
            model.set_params(&params)?;
            model.evaluate(&data.1).map_or(f32::NAN, |e| e.loss)
        } else {
            f32::NAN
        };
        losses.push(loss);
        gradient_rounds.push(*rounds);
    }
    runtime.block_on(async {
        for (_, peer) in &finished {
            peer.membership.leave().await;
        }
    });
    let steps: Vec<u64> = finished
        .iter()
        .map(|(_, p)| p.optimizer.counters().optimizer_steps.load(Ordering::Relaxed))
        .collect();
    drop(finished);
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Some(error) = failure {
        return Err(error.context(format!("{name}: a peer failed")));
    }
    eprintln!(
        "{name}: honest validation losses {losses:?}; gradient rounds {gradient_rounds:?}; optimizer steps \
         {steps:?}; {seconds:.1} s"
    );
    Ok(Run {
        losses,
        gradient_rounds,
        seconds,
    })
}

/// Swarms train against deadlines on a small machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The honest-only run, trained once for both attacks.
fn honest_only() -> f32 {
    static HONEST_LOSS: OnceLock<f32> = OnceLock::new();
    *HONEST_LOSS.get_or_init(|| {
        let run = run("honest", None, &[]).expect("the honest peers train");
        let (mean, worst) = (run.mean(), run.worst());
        assert!(worst.is_finite(), "the honest-only run diverged: {:?}", run.losses);
        // The task is learnt (a 10-class problem starts at ln 10 = 2.3) and the peers agree (without state
        // rounds a peer that missed a gradient round stays a step apart: about 1 %, measured).
        assert!(mean < 1.8, "the honest-only run did not learn: {:?}", run.losses);
        assert!(worst <= mean * 1.03, "the honest peers disagree: {:?}", run.losses);
        assert_rounds_averaged("honest", &run);
        eprintln!("honest-only: mean validation loss {mean:.4} ({:.1} s)", run.seconds);
        mean
    })
}

/// Most epochs averaged: the swarm trained together rather than peer by peer.
fn assert_rounds_averaged(name: &str, run: &Run) {
    for (index, rounds) in run.gradient_rounds.iter().enumerate() {
        assert!(
            rounds * 10 >= EPOCHS * 7,
            "{name}: honest peer {index} averaged in {rounds} gradient rounds of {EPOCHS}"
        );
    }
}

fn attacked(attack: Attack) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let honest = honest_only();

    let mean = run(&format!("{attack:?}-mean"), Some(attack), &[]).expect("the attacked swarm runs");
    let clipped =
        run(&format!("{attack:?}-clip"), Some(attack), &centered_clip_flags()).expect("the clipped swarm runs");
    eprintln!(
        "{attack:?}: honest-only {honest:.4}; with the attacker, mean: worst honest {:.4}; CenteredClip: worst \
         honest {:.4} (ratio {:.4})",
        mean.worst(),
        clipped.worst(),
        clipped.worst() / honest
    );
    // With CenteredClip every honest peer ends within 5 % of the honest-only run. Ending lower is fine: the
    // clipped centre is not the mean, and at this stage the loss still falls fast and moves with the steps'
    // length (measured: 1 to 5 % below). Far lower would mean the clipped swarm did something else than train.
    assert_rounds_averaged(&format!("{attack:?} with CenteredClip"), &clipped);
    let ratio = clipped.worst() / honest;
    assert!(
        ratio <= 1.05,
        "{attack:?}: with CenteredClip the honest peers' validation losses {:?} are not within 5 % of the \
         honest-only run's {honest:.4}",
        clipped.losses
    );
    assert!(
        ratio >= 0.85,
        "{attack:?}: with CenteredClip the honest peers' validation losses {:?} are far below the honest-only \
         run's {honest:.4}",
        clipped.losses
    );
    // With the mean the attacker wrecks the run: diverged, or far worse.
    assert!(
        mean.worst() > honest * 1.5,
        "{attack:?}: with the mean the honest peers' validation losses {:?} are not measurably worse than the \
         honest-only run's {honest:.4}",
        mean.losses
    );
}

#[test]
fn centered_clip_bounds_a_peer_that_scales_its_gradients() {
    attacked(Attack::Scaled);
}

#[test]
fn centered_clip_bounds_a_peer_that_sends_random_gradients() {
    attacked(Attack::Random);
}
