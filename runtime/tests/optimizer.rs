//! The collaborative optimizer end to end on in-process swarms (1 ms links): Hivemind's optimizer scenarios
//! rewritten for Colony (samples-weighted gradients, loading the state of epoch 1337, one peer in all eight
//! flag combinations) and the resilience rules (a failed round steps on local gradients, state rounds leave
//! identical parameters, a late peer catches up).

use std::sync::Arc;
use std::time::{Duration, Instant};

use colony::membership::{Membership, MembershipConfig, SwimConfig};
use colony::optimizer::{
    CollaborativeOptimizer, CollaborativeOptions, EpochGradients, GradientAccumulator, GradientAverager, Layouts,
    OptimizerServices, RoundKind, RoundResult, StepOutcome, averager_config,
};
use colony::records::Schemas;
use colony_averaging::tensor::TensorInfo;
use colony_offload::{LrSchedule, OptimizerConfig};
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::mem::MemHub;
use colony_transports::{Address, Keypair};

/// Each test runs swarms against deadlines: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn hub() -> MemHub {
    let emulator = LinkEmulator::with_seed(11);
    emulator.set_default_link(LinkConfig {
        latency: Duration::from_millis(1),
        bandwidth_bytes_per_sec: None,
        datagram_loss: 0.0,
    });
    MemHub::with_emulator(emulator)
}

/// Options with test timings: short matchmaking window and timeouts.
fn options(target: u64, optimizer: OptimizerConfig) -> CollaborativeOptions {
    let mut options = CollaborativeOptions::new(target, optimizer);
    options.matchmaking_time = Duration::from_secs(1);
    options.request_timeout = Duration::from_millis(300);
    options.averaging_timeout = Duration::from_secs(5);
    options.next_chunk_timeout = Some(Duration::from_secs(2));
    options.load_state_timeout = Duration::from_secs(20);
    options.min_refresh_period = Duration::from_millis(20);
    options.max_refresh_period = Duration::from_millis(200);
    options
}

struct Peer {
    membership: Membership,
    optimizer: CollaborativeOptimizer,
    params: Vec<f32>,
    grads: Vec<f32>,
}

/// Starts membership for a peer named `name` that joins through `bootstrap` (none: the first peer), with
/// the optimizer's protocols on its router.
async fn member(hub: &MemHub, name: &str, bootstrap: Option<Address>) -> (Membership, OptimizerServices) {
    let config = member_config(name, bootstrap);
    let keypair = Arc::new(Keypair::generate());
    let transport = hub.transport(&keypair);
    let services = OptimizerServices::new(Duration::from_secs(3));
    let mut schemas = Schemas::default();
    OptimizerServices::register_schemas(&mut schemas);
    let membership = Membership::start_with(config, keypair, transport, schemas, |router| services.register(router))
        .await
        .expect("membership starts");
    (membership, services)
}

/// The membership settings of a test peer named `name` (test timings).
fn member_config(name: &str, bootstrap: Option<Address>) -> MembershipConfig {
    let listen: Address = format!("mem://{name}").parse().unwrap();
    let mut config = MembershipConfig::new("optimizer-test", Some(listen));
    config.initial_peers = bootstrap.into_iter().collect();
    config.swim = SwimConfig {
        probe_period: Duration::from_millis(300),
        probe_rtt: Duration::from_millis(150),
        suspect_to_down_after: Duration::from_millis(900),
        gossip_interval: Duration::from_millis(50),
        ..SwimConfig::default()
    };
    config.sync_interval = Duration::from_millis(200);
    // Progress is published several times a second per peer; keep the record store's limit above it.
    config.publish_limits.rate_per_sec = 50.0;
    config.publish_limits.burst = 50;
    config
}

/// Starts one peer named `name` with an optimizer.
async fn peer(
    hub: &MemHub,
    name: &str,
    bootstrap: Option<Address>,
    tensors: Vec<TensorInfo>,
    initial: &[f32],
    options: CollaborativeOptions,
) -> Peer {
    let (membership, services) = member(hub, name, bootstrap).await;
    let optimizer =
        CollaborativeOptimizer::start(&membership, &services, tensors, initial, options).expect("the optimizer starts");
    Peer {
        membership,
        optimizer,
        params: initial.to_vec(),
        grads: vec![0.0; initial.len()],
    }
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every peer sees the others as members.
async fn connected(peers: &[&Peer]) {
    let n = peers.len();
    wait_until("the swarm formed", Duration::from_secs(20), || {
        peers.iter().all(|p| p.membership.members().len() == n - 1)
    })
    .await;
}

/// What a training loop saw.
#[derive(Default)]
struct Trace {
    /// Every outcome, in order.
    outcomes: Vec<StepOutcome>,
    /// Samples passed to `step`.
    samples: u64,
    /// The trainer's parameters right after each call that ended an epoch, by the epoch it started.
    after_epoch: Vec<(u64, Vec<f32>)>,
}

impl Trace {
    fn rounds(&self, kind: RoundKind) -> Vec<RoundResult> {
        self.outcomes
            .iter()
            .flat_map(|o| o.rounds.iter())
            .filter(|r| r.kind == kind)
            .map(|r| r.result.clone())
            .collect()
    }
}

/// The peers' host parameters agree: every peer started from the same state (loaded or initial) and took
/// the same averaged steps, with state rounds pulling stragglers back. The bound leaves room for the last
/// epoch or two, which the peers may end at different moments under load, and for a last state round a
/// peer did not join; a peer that trained on its own
/// would be far off (the centres the peers pull towards are 1, 3 and 5, two apart).
fn assert_close(peers: &[&Peer]) {
    let params: Vec<Vec<f32>> = peers.iter().map(|p| p.optimizer.parameters()).collect();
    for (index, other) in params.iter().enumerate().skip(1) {
        for (a, b) in params[0].iter().zip(other) {
            assert!((a - b).abs() < 0.5, "peer {index}: {b} against {a}");
        }
    }
}

/// Asserts that the peers whose traces these are held identical parameters after every epoch (from `from`
/// on) whose state round averaged all of them (parameters compared right after the call that ended the
/// epoch, so the state round must run in that call: `delay_state_averaging = false`). Returns how many
/// epochs were compared.
fn identical_after_full_state_rounds(traces: &[&Trace], from: u64) -> usize {
    let everyone = RoundResult::Averaged { peers: traces.len() };
    let mut compared = 0;
    for (epoch, params) in traces[0].after_epoch.iter().filter(|(e, _)| *e >= from) {
        let all_averaged = traces.iter().all(|t| {
            t.outcomes.iter().any(|o| {
                o.epoch == *epoch
                    && o.rounds
                        .iter()
                        .any(|r| r.kind == RoundKind::State && r.result == everyone)
            })
        });
        if !all_averaged {
            continue;
        }
        for (index, trace) in traces.iter().enumerate().skip(1) {
            let theirs = trace.after_epoch.iter().find(|(e, _)| e == epoch).map(|(_, p)| p);
            let Some(theirs) = theirs else {
                continue;
            };
            assert_eq!(params, theirs, "peer {index} after epoch {epoch}");
        }
        compared += 1;
    }
    compared
}

/// The gradient of `½‖w − centre‖²`: each peer pulls towards its own centre.
fn pull_towards(centre: f32) -> impl Fn(&[f32]) -> Vec<f32> {
    move |w: &[f32]| w.iter().map(|w| w - centre).collect()
}

/// Trains `peer` with batches of `batch` samples every `pace` until its epoch reaches `until`.
async fn train(
    peer: &mut Peer,
    gradient: impl Fn(&[f32]) -> Vec<f32>,
    batch: u32,
    pace: Duration,
    until: u64,
    timeout: Duration,
) -> Trace {
    let start = Instant::now();
    let mut trace = Trace::default();
    let reuse = peer.optimizer.options().reuse_grad_buffers;
    while peer.optimizer.local_epoch() < until {
        assert!(start.elapsed() < timeout, "epoch {until} did not come in {timeout:?}");
        let g = gradient(&peer.params);
        if reuse {
            peer.grads.iter_mut().zip(&g).for_each(|(acc, g)| *acc += g);
        } else {
            peer.grads.copy_from_slice(&g);
        }
        let outcome = peer
            .optimizer
            .step(&mut peer.params, &mut peer.grads, Some(batch))
            .await
            .unwrap();
        if outcome.accumulated {
            trace.samples += u64::from(batch);
        }
        if outcome.epoch_finished {
            trace.after_epoch.push((outcome.epoch, peer.params.clone()));
        }
        trace.outcomes.push(outcome);
        tokio::time::sleep(pace).await;
    }
    trace
}

/// Hivemind's `test_grad_averager`: a 5×5 parameter at 0; peer 1 accumulates 4 batches of 2 samples of
/// the gradient of `mean((w − 1)²)`, peer 2 (reusing its gradient buffer) 6 batches of 3 of `mean((w + 1)²)`;
/// after one round both hold the samples-weighted average `8/26 · g1 + 18/26 · g2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gradient_averager_weights_peers_by_their_samples() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("w", [5, 5])];
    let options = options(26, OptimizerConfig::sgd(1.0, 0.0, 25));
    let layouts = Layouts::new(&tensors, &options.optimizer.kind, &[], &[]).unwrap();
    let mut peers = Vec::new();
    let mut bootstrap = None;
    for name in ["grad-a", "grad-b"] {
        let (membership, services) = member(&hub, name, bootstrap.clone()).await;
        bootstrap = membership.address();
        let config = averager_config(&options, "grads", GradientAverager::codecs(&options.grad_compression));
        let averager = GradientAverager::start(&membership, services.averagers(), layouts.grads.clone(), config)
            .expect("the gradient averager starts");
        peers.push((membership, averager));
    }
    wait_until("the two peers see each other", Duration::from_secs(20), || {
        peers.iter().all(|(m, _)| m.members().len() == 1)
    })
    .await;

    let g1 = -2.0f32 / 25.0; // d/dw mean((w - 1)²) at w = 0
    let g2 = 2.0f32 / 25.0; // d/dw mean((w + 1)²) at w = 0
    let mut first = GradientAccumulator::new(25, false);
    let mut first_trainer = vec![g1; 25];
    for _ in 0..4 {
        first.accumulate(&first_trainer, 2);
    }
    let mut second = GradientAccumulator::new(25, true);
    let mut second_trainer = vec![0.0f32; 25];
    for _ in 0..6 {
        // The trainer adds each gradient into its own buffer, which is the accumulator.
        second_trainer.iter_mut().for_each(|g| *g += g2);
        second.accumulate(&second_trainer, 3);
    }
    let first_gradients = EpochGradients::take(&mut first, &mut first_trainer, 26);
    let second_gradients = EpochGradients::take(&mut second, &mut second_trainer, 26);
    assert_eq!((first_gradients.samples(), second_gradients.samples()), (8, 18));
    assert!(
        second_trainer.iter().all(|g| *g == 0.0),
        "the reused buffer is zeroed by Colony"
    );

    async fn round(averager: &GradientAverager, gradients: EpochGradients) -> Option<Vec<f32>> {
        let group = averager
            .find_group(2, None, Duration::from_secs(10))
            .await
            .expect("a group of two");
        assert_eq!(group.len(), 2);
        averager.average(&group, gradients).await.expect("the round averages")
    }
    let (a, b) = tokio::join!(
        round(&peers[0].1, first_gradients),
        round(&peers[1].1, second_gradients)
    );
    let expected = 8.0 / 26.0 * g1 + 18.0 / 26.0 * g2;
    for grads in [a.unwrap(), b.unwrap()] {
        assert_eq!(grads.len(), 25);
        for (i, g) in grads.iter().enumerate() {
            assert!((g - expected).abs() < 1e-8, "grad[{i}] = {g}, expected {expected}");
        }
    }
}

/// Hivemind's `test_load_state_from_peers`: a donor at epoch 1337 with parameters 42 and the scheduler
/// `1/max(1, t)`; a newcomer loads them and its learning rate is 0.1/1337.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_loads_the_state_and_the_learning_rate_of_epoch_1337() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("w", [4])];
    let schedule = LrSchedule::Custom(Arc::new(|t| 1.0 / (t.max(1) as f64)));
    let mut donor_options = options(1, OptimizerConfig::sgd(0.1, 0.0, 4));
    donor_options.scheduler = schedule.clone();
    let mut donor = peer(
        &hub,
        "load-donor",
        None,
        tensors.clone(),
        &[42.0; 4],
        donor_options.clone(),
    )
    .await;
    // Alone, with a target of one sample, every step is an epoch; zero gradients leave the parameters.
    while donor.optimizer.local_epoch() < 1337 {
        donor.grads.fill(0.0);
        donor
            .optimizer
            .step(&mut donor.params, &mut donor.grads, Some(1))
            .await
            .unwrap();
    }
    let mut newcomer = peer(
        &hub,
        "load-newcomer",
        donor.membership.address(),
        tensors,
        &[0.0; 4],
        donor_options,
    )
    .await;
    wait_until("the newcomer sees the donor's epoch", Duration::from_secs(20), || {
        newcomer.optimizer.tracker().global().epoch == 1337
    })
    .await;
    let epoch = newcomer
        .optimizer
        .load_state_from_peers(&mut newcomer.params, &mut newcomer.grads)
        .await
        .unwrap();
    assert_eq!(epoch, 1337);
    assert_eq!(newcomer.optimizer.local_epoch(), 1337);
    assert_eq!(newcomer.params, [42.0; 4]);
    let lr = 0.1 * newcomer.optimizer.state().lr_factor;
    assert!((lr - 0.1 / 1337.0).abs() < 1e-12, "lr {lr}");
    assert_eq!(
        newcomer
            .optimizer
            .counters()
            .loads
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    newcomer.optimizer.shutdown().await;
    donor.optimizer.shutdown().await;
}

/// Two peers that load the state at the same moment (as two survivors do when a peer that ran ahead of
/// them crashes) download it from each other: a peer keeps serving its state while it loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_loading_at_once_download_from_each_other() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("w", [4])];
    let options = options(1000, OptimizerConfig::sgd(0.1, 0.0, 4));
    let mut a = peer(&hub, "both-a", None, tensors.clone(), &[1.0; 4], options.clone()).await;
    let mut b = peer(&hub, "both-b", a.membership.address(), tensors, &[2.0; 4], options).await;
    for p in [&mut a, &mut b] {
        p.grads.fill(0.0);
        p.optimizer.step(&mut p.params, &mut p.grads, Some(1)).await.unwrap();
    }
    wait_until("each sees the other's progress", Duration::from_secs(20), || {
        a.optimizer.tracker().global().num_peers == 2 && b.optimizer.tracker().global().num_peers == 2
    })
    .await;
    let started = Instant::now();
    let (loaded_a, loaded_b) = tokio::join!(
        a.optimizer.load_state_from_peers(&mut a.params, &mut a.grads),
        b.optimizer.load_state_from_peers(&mut b.params, &mut b.grads),
    );
    let took = started.elapsed();
    assert_eq!(loaded_a.expect("a loads"), 0);
    assert_eq!(loaded_b.expect("b loads"), 0);
    assert!(took < Duration::from_secs(5), "the loads took {took:?}");
    // Each downloaded a snapshot of the other's state, taken when its request arrived.
    assert_eq!(a.params, [2.0; 4]);
    assert_eq!(b.params, [1.0; 4]);
    a.optimizer.shutdown().await;
    b.optimizer.shutdown().await;
}

/// Hivemind's `test_optimizer`: one peer alone, in each of the eight flag combinations (use_local_updates,
/// delay_state_averaging, delay_optimizer_step, delay_grad_averaging, reuse_grad_buffers), a linear model,
/// SGD with lr 0.1 halved every epoch, target 32, batches of 4: after three epochs the local and global
/// epochs are 3, it passed 96 to 115.2 samples, its rate estimate is near the true rate, and shutdown
/// leaves nothing running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_in_all_eight_flag_combinations_reaches_epoch_three() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let combinations = [
        (false, false, false, false, false),
        (false, true, false, false, false),
        (false, true, true, true, false),
        (false, false, false, false, true),
        (false, true, true, true, true),
        (false, true, true, false, true),
        (true, false, false, false, false),
        (true, true, false, false, false),
    ];
    let tensors = vec![TensorInfo::new("weight", [1, 5]), TensorInfo::new("bias", [1])];
    // Targets of a linear regression y = x·[1, -2, 3, -4, 5] + 0.5 on a fixed batch.
    let inputs: Vec<[f32; 5]> = (0..4)
        .map(|i| std::array::from_fn(|j| ((i * 5 + j) as f32 * 0.37).sin()))
        .collect();
    let truth = [1.0f32, -2.0, 3.0, -4.0, 5.0];
    let gradient = |w: &[f32]| {
        let mut g = vec![0.0f32; 6];
        for x in &inputs {
            let target: f32 = x.iter().zip(&truth).map(|(x, t)| x * t).sum::<f32>() + 0.5;
            let prediction: f32 = x.iter().zip(&w[..5]).map(|(x, w)| x * w).sum::<f32>() + w[5];
            let error = 2.0 * (prediction - target) / inputs.len() as f32;
            for j in 0..5 {
                g[j] += error * x[j];
            }
            g[5] += error;
        }
        g
    };
    let pace = Duration::from_millis(60);
    for (index, (local_updates, delay_state, delay_optimizer, delay_grads, reuse)) in
        combinations.into_iter().enumerate()
    {
        let mut options = options(32, OptimizerConfig::sgd(0.1, 0.0, 6));
        options.scheduler = LrSchedule::Step {
            step_size: 1,
            gamma: 0.5,
        };
        options.use_local_updates = local_updates;
        options.delay_state_averaging = delay_state;
        options.delay_optimizer_step = Some(delay_optimizer);
        options.delay_grad_averaging = delay_grads;
        options.reuse_grad_buffers = reuse;
        let flags = format!(
            "{:?}",
            (local_updates, delay_state, delay_optimizer, delay_grads, reuse)
        );
        let mut alone = peer(
            &hub,
            &format!("alone-{index}"),
            None,
            tensors.clone(),
            &[0.0; 6],
            options,
        )
        .await;
        let trace = train(&mut alone, gradient, 4, pace, 3, Duration::from_secs(30)).await;
        let state = alone.optimizer.state();
        assert_eq!((state.epoch, state.global_epoch), (3, 3), "{flags}");
        assert!(
            (96..=115).contains(&trace.samples),
            "{flags}: {} samples",
            trace.samples
        );
        let rate = alone.optimizer.tracker().samples_per_second();
        let true_rate = 4.0 / pace.as_secs_f64();
        assert!(
            rate > 0.5 * true_rate && rate < 1.2 * true_rate,
            "{flags}: rate {rate}, true rate at most {true_rate}"
        );
        assert_ne!(alone.params, [0.0; 6], "{flags}: the model trained");
        alone.optimizer.shutdown().await;
        assert!(alone.optimizer.is_shut_down(), "{flags}");
        wait_until("the tracker stopped", Duration::from_secs(5), || {
            !alone.optimizer.tracker().is_running()
        })
        .await;
        let error = alone
            .optimizer
            .step(&mut alone.params, &mut alone.grads, Some(4))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("shut down"), "{flags}: {error}");
        alone.membership.shutdown();
    }
}

/// A peer whose partner vanished mid-epoch fails its gradient round, steps on its local gradients, and
/// training goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_round_falls_back_to_local_gradients_and_training_goes_on() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("w", [3])];
    let options = options(16, OptimizerConfig::sgd(0.5, 0.0, 3));
    let mut a = peer(&hub, "fail-a", None, tensors.clone(), &[0.0; 3], options.clone()).await;
    let mut b = peer(&hub, "fail-b", a.membership.address(), tensors, &[0.0; 3], options).await;
    // Both report some samples, so A counts on B; then B dies without a word.
    for p in [&mut a, &mut b] {
        p.grads.fill(1.0);
        p.optimizer.step(&mut p.params, &mut p.grads, Some(4)).await.unwrap();
    }
    wait_until("A sees B's progress", Duration::from_secs(20), || {
        a.optimizer.tracker().global().num_peers == 2
    })
    .await;
    b.membership.shutdown();
    drop(b);
    // A's gradient is constant, so each local step moves w by exactly -lr·g.
    let trace = train(
        &mut a,
        |_| vec![1.0; 3],
        4,
        Duration::from_millis(20),
        2,
        Duration::from_secs(60),
    )
    .await;
    let failures = trace
        .rounds(RoundKind::Gradients)
        .iter()
        .filter(|r| matches!(r, RoundResult::Failed { .. }))
        .count();
    assert!(failures >= 1, "{:?}", trace.rounds(RoundKind::Gradients));
    assert_eq!(a.optimizer.local_epoch(), 2);
    wait_until("both optimizer steps applied", Duration::from_secs(10), || {
        a.optimizer.parameters() == [-1.0; 3]
    })
    .await;
    a.optimizer.shutdown().await;
}

/// With local updates each peer's parameters drift apart; every state round makes them identical again
/// (exactly: no compression).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_rounds_leave_every_peer_with_identical_parameters() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("w", [8])];
    let mut options = options(24, OptimizerConfig::sgd(0.1, 0.0, 8));
    options.use_local_updates = true;
    options.delay_state_averaging = false;
    let mut peers = Vec::new();
    let mut bootstrap = None;
    for index in 0..3 {
        let p = peer(
            &hub,
            &format!("state-{index}"),
            bootstrap.clone(),
            tensors.clone(),
            &[0.0; 8],
            options.clone(),
        )
        .await;
        bootstrap = p.membership.address();
        peers.push(p);
    }
    connected(&peers.iter().collect::<Vec<_>>()).await;
    let mut peers = peers.into_iter();
    let (mut p0, mut p1, mut p2) = (peers.next().unwrap(), peers.next().unwrap(), peers.next().unwrap());
    let pace = Duration::from_millis(25);
    let timeout = Duration::from_secs(60);
    let (t0, t1, t2) = tokio::join!(
        train(&mut p0, pull_towards(1.0), 4, pace, 6, timeout),
        train(&mut p1, pull_towards(2.0), 4, pace, 6, timeout),
        train(&mut p2, pull_towards(6.0), 4, pace, 6, timeout),
    );
    let compared = identical_after_full_state_rounds(&[&t0, &t1, &t2], 0);
    // Every round that all three joined is checked; under load some rounds form with two, so at least one
    // of the five must have had all three.
    assert!(
        compared >= 1,
        "state rounds of all three peers: {compared}; rounds {:?}",
        t0.rounds(RoundKind::State)
    );
    for p in [&mut p0, &mut p1, &mut p2] {
        p.optimizer.shutdown().await;
    }
}

/// A peer that joins at epoch 10 loads the state, trains along, and holds the same parameters as the
/// others; a peer killed mid-training and restarted loads the state again and continues at the swarm's
/// epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_and_restarted_peers_catch_up_and_agree_on_parameters() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("w", [16])];
    let mut options = options(64, OptimizerConfig::sgd(0.2, 0.9, 16));
    // State rounds in the epoch's call, so the parameters right after it show their result.
    options.delay_state_averaging = false;
    let mut a = peer(&hub, "late-a", None, tensors.clone(), &[0.0; 16], options.clone()).await;
    let mut b = peer(
        &hub,
        "late-b",
        a.membership.address(),
        tensors.clone(),
        &[0.0; 16],
        options.clone(),
    )
    .await;
    connected(&[&a, &b]).await;
    let pace = Duration::from_millis(15);
    let timeout = Duration::from_secs(90);
    tokio::join!(
        train(&mut a, pull_towards(1.0), 4, pace, 10, timeout),
        train(&mut b, pull_towards(3.0), 4, pace, 10, timeout),
    );
    let mut c = peer(
        &hub,
        "late-c",
        a.membership.address(),
        tensors.clone(),
        &[5.0; 16],
        options.clone(),
    )
    .await;
    let (ta, tb, tc) = tokio::join!(
        train(&mut a, pull_towards(1.0), 4, pace, 16, timeout),
        train(&mut b, pull_towards(3.0), 4, pace, 16, timeout),
        train(&mut c, pull_towards(5.0), 4, pace, 16, timeout),
    );
    let loaded: Vec<u64> = tc.outcomes.iter().filter_map(|o| o.loaded_state).collect();
    assert!(loaded.first().is_some_and(|e| *e >= 10), "C loaded {loaded:?}");
    assert!(
        tc.after_epoch.iter().any(|(e, _)| *e == 16),
        "C ended epochs up to 16 with the others"
    );
    // After each state round of all three, C holds exactly the others' parameters.
    let compared = identical_after_full_state_rounds(&[&ta, &tb, &tc], loaded[0]);
    assert!(compared >= 1, "no state round of all three after C joined");
    assert_close(&[&a, &b, &c]);

    // A dies; a new process takes its place (new identity), loads the state and trains at the swarm's epoch.
    a.membership.shutdown();
    drop(a);
    let mut a2 = peer(&hub, "late-a2", b.membership.address(), tensors, &[0.0; 16], options).await;
    let (_, _, ta2) = tokio::join!(
        train(&mut b, pull_towards(3.0), 4, pace, 22, timeout),
        train(&mut c, pull_towards(5.0), 4, pace, 22, timeout),
        train(&mut a2, pull_towards(1.0), 4, pace, 22, timeout),
    );
    let loaded: Vec<u64> = ta2.outcomes.iter().filter_map(|o| o.loaded_state).collect();
    assert!(
        loaded.first().is_some_and(|e| *e >= 16),
        "the restarted peer loaded {loaded:?}"
    );
    // It trains on at the swarm's epoch: it ends epochs by training after its first load (it may load once
    // more: the others' state rounds wait for the dead peer until it is declared down, and the in-call state
    // rounds of this test hold a peer for up to the matchmaking window, so it can fall behind again).
    let trained: Vec<u64> = ta2
        .after_epoch
        .iter()
        .map(|(e, _)| *e)
        .filter(|e| *e > loaded[0])
        .collect();
    assert!(
        trained.len() >= 2 && a2.optimizer.local_epoch() >= 22,
        "the restarted peer (loaded {loaded:?}) ended epochs {trained:?} by training, and is at epoch {}",
        a2.optimizer.local_epoch()
    );
    // Within a few epochs of a restart the peers' state rounds may form in pairs (the restarted peer loads
    // again if it fell behind), so this phase checks closeness, not identity.
    assert_close(&[&b, &c, &a2]);
    for p in [&mut b, &mut c, &mut a2] {
        p.optimizer.shutdown().await;
    }
}

/// Hivemind's `test_state_averager`, rewritten: two peers with local updates (Adam, averaging `exp_avg_sq` and
/// an extra tensor), one with a delayed state round and one with an immediate one, pulling towards +1 and
/// −1. After each epoch's state round both hold the same parameters, the same averaged statistic and the
/// same extra tensor (the mean of the two), though their local steps had pulled them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_and_an_immediate_state_round_leave_the_same_state() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("weight", [3, 2]), TensorInfo::new("bias", [3])];
    let mut options = options(32, OptimizerConfig::adam(0.1, 9));
    options.use_local_updates = true;
    options.average_opt_statistics = vec!["exp_avg_sq".into()];
    options.extra_tensors = vec![TensorInfo::new("running_mean", [3])];
    let mut delayed = options.clone();
    delayed.delay_state_averaging = true;
    let mut immediate = options;
    immediate.delay_state_averaging = false;
    let mut a = peer(&hub, "sa-delayed", None, tensors.clone(), &[0.0; 9], delayed).await;
    let mut b = peer(
        &hub,
        "sa-immediate",
        a.membership.address(),
        tensors,
        &[0.0; 9],
        immediate,
    )
    .await;
    connected(&[&a, &b]).await;
    a.optimizer.set_extra_tensors(&[1.0, 2.0, 3.0]).unwrap();
    b.optimizer.set_extra_tensors(&[3.0, 2.0, 1.0]).unwrap();
    let pace = Duration::from_millis(20);
    let timeout = Duration::from_secs(60);
    // The first epoch only lets each peer see the other's progress (a peer that sees no other does not
    // average); the checks start with the second.
    for epoch in 1..=3u64 {
        let (ta, tb) = tokio::join!(
            train(&mut a, pull_towards(1.0), 4, pace, epoch, timeout),
            train(&mut b, pull_towards(-1.0), 4, pace, epoch, timeout),
        );
        let averaged = |t: &Trace| {
            t.rounds(RoundKind::State)
                .iter()
                .filter(|r| **r == RoundResult::Averaged { peers: 2 })
                .count()
        };
        if epoch == 1 {
            continue;
        }
        let _ = ta;
        // The immediate peer's round is over when its call returns; the delayed peer's runs on.
        assert!(averaged(&tb) >= 1, "epoch {epoch}: {:?}", tb.rounds(RoundKind::State));
        let state_rounds = |p: &Peer| {
            p.optimizer
                .counters()
                .state_rounds
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let rounds_of_b = state_rounds(&b);
        wait_until("the delayed peer's state round ended", Duration::from_secs(10), || {
            state_rounds(&a) >= rounds_of_b
        })
        .await;
        assert_eq!(a.optimizer.parameters(), b.optimizer.parameters(), "epoch {epoch}");
        let (sa, sb) = (
            a.optimizer.statistic("exp_avg_sq").unwrap(),
            b.optimizer.statistic("exp_avg_sq").unwrap(),
        );
        assert_eq!(sa, sb, "epoch {epoch}: the averaged statistic");
        assert!(sa.iter().any(|v| *v > 0.0), "the statistic holds the squared gradients");
        assert_eq!(a.optimizer.extra_tensors(), [2.0, 2.0, 2.0], "epoch {epoch}");
        assert_eq!(b.optimizer.extra_tensors(), [2.0, 2.0, 2.0], "epoch {epoch}");
        // Not averaged: the first moments stay each peer's own.
        assert_ne!(
            a.optimizer.statistic("exp_avg"),
            b.optimizer.statistic("exp_avg"),
            "epoch {epoch}"
        );
    }
    a.optimizer.shutdown().await;
    b.optimizer.shutdown().await;
}

/// `colony node --auxiliary`'s peer: two trainers and an auxiliary peer that learned the run's schema from
/// them (tensors, their codecs). The auxiliary joins the gradient rounds (groups of three) and follows the
/// swarm's epochs; in such a round both trainers receive the same averaged gradient (within float16's error
/// for the compressed tensor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auxiliary_peer_learns_the_schema_and_reduces_in_the_gradient_rounds() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let tensors = vec![TensorInfo::new("w", [6, 2]), TensorInfo::new("b", [4])];
    let mut trainer = options(48, OptimizerConfig::sgd(0.1, 0.0, 16));
    trainer.average_state_every = 1000;
    trainer.grad_compression = colony_averaging::codec::CodecPolicy::ByName {
        codecs: [("w".to_string(), colony_averaging::codec::Codec::Float16)]
            .into_iter()
            .collect(),
        default: Box::new(colony_averaging::codec::CodecPolicy::Fixed(
            colony_averaging::codec::Codec::None,
        )),
    };
    let mut a = peer(&hub, "aux-a", None, tensors.clone(), &[0.0; 16], trainer.clone()).await;
    let mut b = peer(
        &hub,
        "aux-b",
        a.membership.address(),
        tensors.clone(),
        &[0.0; 16],
        trainer.clone(),
    )
    .await;
    let keypair = Keypair::generate();
    let transport = hub.transport(&Arc::new(keypair.clone()));
    let (mut aux, schema) = colony::peer::start_auxiliary_peer(
        member_config("aux-x", a.membership.address()),
        keypair,
        Some(transport),
        options(1, OptimizerConfig::sgd(0.1, 0.0, 1)),
        Duration::from_secs(20),
    )
    .await
    .expect("the auxiliary peer starts");
    assert_eq!(schema.target_batch_size, 48);
    let names: Vec<&str> = schema.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["w", "b"]);
    assert_eq!(
        schema.codecs,
        [
            colony_averaging::codec::Codec::Float16,
            colony_averaging::codec::Codec::None
        ]
    );
    wait_until("the swarm formed", Duration::from_secs(20), || {
        a.membership.members().len() == 2 && b.membership.members().len() == 2 && aux.membership.members().len() == 2
    })
    .await;

    let stop = std::sync::atomic::AtomicBool::new(false);
    let auxiliary_loop = async {
        let mut outcomes = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let outcome = aux.optimizer.step_auxiliary().await.expect("step_auxiliary");
            outcomes.push(outcome);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes
    };
    let trainers = async {
        let timeout = Duration::from_secs(60);
        let traces = tokio::join!(
            train(&mut a, pull_towards(1.0), 4, Duration::from_millis(15), 8, timeout),
            train(&mut b, pull_towards(3.0), 4, Duration::from_millis(15), 8, timeout),
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        traces
    };
    let ((ta, tb), aux_outcomes) = tokio::join!(trainers, auxiliary_loop);

    let three = RoundResult::Averaged { peers: 3 };
    let aux_rounds: Vec<&RoundResult> = aux_outcomes
        .iter()
        .flat_map(|o| o.rounds.iter())
        .filter(|r| r.kind == RoundKind::Gradients)
        .map(|r| &r.result)
        .collect();
    let reduced = aux_rounds.iter().filter(|r| ***r == three).count();
    assert!(
        reduced >= 4,
        "the auxiliary reduced in {reduced} rounds of three: {aux_rounds:?}"
    );
    // A round of three (with the auxiliary) gives both trainers the same averaged gradient, so each applies
    // the same step (plain SGD, no momentum) — at its own epoch: early on one trainer may be an epoch behind
    // (it catches up by jumping), so steps are matched by value, not by epoch label. Each trainer's steps
    // after rounds of three, with the parameters they started from.
    let steps = |t: &Trace| -> Vec<(u64, Vec<f32>, Vec<f32>)> {
        let mut steps = Vec::new();
        for pair in t.after_epoch.windows(2) {
            let ((from, before), (epoch, after)) = (&pair[0], &pair[1]);
            let loaded = t
                .outcomes
                .iter()
                .any(|o| o.loaded_state.is_some_and(|l| l > *from && l <= *epoch));
            let three_round = t.outcomes.iter().any(|o| {
                o.epoch == *epoch
                    && o.rounds
                        .iter()
                        .any(|r| r.kind == RoundKind::Gradients && r.result == three)
            });
            if *epoch == from + 1 && !loaded && three_round {
                let step = before.iter().zip(after).map(|(b, a)| b - a).collect();
                steps.push((*epoch, step, before.clone()));
            }
        }
        steps
    };
    let (steps_a, steps_b) = (steps(&ta), steps(&tb));
    // `w` (12 values) travels in float16: each trainer applies the reducers' deltas in that codec, so the two
    // agree within its error; `b` travels exact (differences of parameters round at 1e-7).
    let same = |x: &[f32], y: &[f32]| {
        x.iter().zip(y).enumerate().all(|(index, (x, y))| {
            let tolerance = if index < 12 { 1e-3 } else { 1e-5 };
            (x - y).abs() <= tolerance * x.abs().max(1.0)
        })
    };
    let mut compared = 0;
    for (epoch, step, before_a) in &steps_a {
        let Some((_, _, before_b)) = steps_b.iter().find(|(_, other, _)| same(step, other)) else {
            continue;
        };
        compared += 1;
        // The average lies between the two trainers' own gradients (`w - 1` and `w - 3` at their parameters
        // before the step): the auxiliary added nothing. Checked on `b`, which travels exact.
        for index in 12..16 {
            let (own_a, own_b) = (0.1 * (before_a[index] - 1.0), 0.1 * (before_b[index] - 3.0));
            let (low, high) = (own_a.min(own_b) - 1e-5, own_a.max(own_b) + 1e-5);
            assert!(
                (low..=high).contains(&step[index]),
                "A's epoch {epoch}: the step of b[{}] {} is not between the trainers' own {own_a} and {own_b}",
                index - 12,
                step[index]
            );
        }
    }
    assert!(
        compared >= 1,
        "no step after a round of three that both trainers took: A {steps_a:?}, B {steps_b:?}"
    );
    assert!(
        aux.optimizer.local_epoch() >= 7,
        "the auxiliary followed to epoch {}",
        aux.optimizer.local_epoch()
    );
    for p in [&mut a, &mut b] {
        p.optimizer.shutdown().await;
    }
    aux.optimizer.shutdown().await;
}
