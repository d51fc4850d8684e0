//! Progress tracking end to end: membership swarms on the in-process transport (1 ms links), a progress
//! tracker per peer, and Hivemind's `test_progress_tracker` (a fast peer joining for three epochs makes
//! them faster), plus what one peer sees of another, client mode, the publishing limits, and shutdown.
//!
//! Every wait is on a condition with a deadline. The sleeps in the workers are their simulated compute
//! time, not synchronisation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use colony::actors::progress_tracker::{self, ProgressTracker};
use colony::membership::{Membership, MembershipConfig, SwimConfig};
use colony::progress::{LocalProgress, PROGRESS_KEY, ProgressConfig, PublishBudget, parse_records};
use colony::records::Schemas;
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::mem::MemHub;
use colony_transports::{Address, Keypair};

const RUN: &str = "progress-test";

/// The tests of this file measure timings, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn hub() -> MemHub {
    hub_and_emulator().0
}

/// A hub over 1 ms links, and its emulator (to kill a peer's links).
fn hub_and_emulator() -> (MemHub, LinkEmulator) {
    let emulator = LinkEmulator::with_seed(5);
    emulator.set_default_link(LinkConfig {
        latency: Duration::from_millis(1),
        bandwidth_bytes_per_sec: None,
        datagram_loss: 0.0,
    });
    (MemHub::with_emulator(emulator.clone()), emulator)
}

/// A member listening at `mem://{name}` (`None`: client mode), joining through `bootstrap`.
async fn member(hub: &MemHub, name: Option<&str>, bootstrap: Option<&Membership>) -> Membership {
    let listen = name.map(|n| format!("mem://{n}").parse::<Address>().unwrap());
    let mut config = MembershipConfig::new(RUN, listen);
    config.initial_peers = bootstrap.and_then(Membership::address).into_iter().collect();
    config.swim = SwimConfig {
        probe_period: Duration::from_millis(500),
        probe_rtt: Duration::from_millis(200),
        suspect_to_down_after: Duration::from_millis(1500),
        gossip_interval: Duration::from_millis(100),
        down_announce_interval: Duration::from_millis(500),
        ..SwimConfig::default()
    };
    config.sync_interval = Duration::from_millis(500);
    config.bootstrap_timeout = Duration::from_secs(20);
    let keypair = Arc::new(Keypair::generate());
    let transport = hub.transport(&keypair);
    let mut schemas = Schemas::default();
    progress_tracker::register_schema(&mut schemas);
    Membership::start(config, keypair, transport, schemas)
        .await
        .expect("membership starts")
}

async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

async fn converge(members: &[&Membership]) {
    let n = members.len();
    wait_until("every peer sees every other", Duration::from_secs(20), || {
        members.iter().all(|m| m.members().len() == n - 1)
    })
    .await;
}

/// The progress records a member's replica holds.
fn records(membership: &Membership) -> Vec<LocalProgress> {
    parse_records(membership.get(PROGRESS_KEY).as_ref())
}

/// Hivemind's timings (periods, refresh periods) times this factor.
const SCALE: f64 = 0.5;

fn scaled(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds * SCALE)
}

fn hivemind_test_config() -> ProgressConfig {
    ProgressConfig {
        min_refresh_period: scaled(0.1),
        default_refresh_period: scaled(0.2),
        max_refresh_period: scaled(0.5),
        ..ProgressConfig::new(256)
    }
}

/// A worker of Hivemind's test: accumulates `batch` samples every `period`, and starts the next epoch when
/// the tracker says so, as the optimizer does. With `leave_after`, it leaves once it is ready to end that
/// epoch or a later one. Returns its measured rate.
async fn work(
    tracker: ProgressTracker,
    batch: u64,
    period: Duration,
    mut epoch: u64,
    leave_after: Option<u64>,
    finished: Arc<AtomicBool>,
) -> f64 {
    let mut samples = 0;
    // Time before this point (waiting for the others) is not compute time.
    tracker.report_local_progress(epoch, 0);
    loop {
        tokio::time::sleep(period).await;
        if finished.load(Ordering::SeqCst) {
            break;
        }
        samples += batch;
        tracker.report_local_progress(epoch, samples);
        if tracker.ready_to_update_epoch() {
            if leave_after.is_some_and(|last| epoch >= last) {
                tokio::time::sleep(scaled(0.5)).await;
                break;
            }
            epoch = tracker.global().epoch.max(epoch + 1);
            samples = 0;
            tracker.update_epoch(epoch);
        }
    }
    let rate = tracker.samples_per_second();
    tracker.shutdown().await;
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_peer_joining_for_three_epochs_makes_them_faster() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let root = member(&hub, Some("root"), None).await;
    let mut workers = Vec::new();
    for i in 1..=4 {
        workers.push(member(&hub, Some(&format!("worker-{i}")), Some(&root)).await);
    }
    let all: Vec<&Membership> = std::iter::once(&root).chain(&workers).collect();
    converge(&all).await;

    let config = hivemind_test_config();
    let finished = Arc::new(AtomicBool::new(false));
    let root_tracker = ProgressTracker::start(&root, config.clone()).unwrap();
    let mut tasks = Vec::new();
    for (membership, (batch, period)) in workers.iter().zip([(12, 0.6), (16, 0.5), (24, 0.4)]) {
        let tracker = ProgressTracker::start(membership, config.clone()).unwrap();
        tasks.push(tokio::spawn(work(
            tracker,
            batch,
            scaled(period),
            0,
            None,
            finished.clone(),
        )));
    }
    // The fourth (fastest) worker is a member from the start but tracks progress only from epoch 2 on.
    let (join, joined) = tokio::sync::oneshot::channel::<()>();
    let fourth = workers[3].clone();
    let fourth_config = config.clone();
    let fourth_finished = finished.clone();
    tasks.push(tokio::spawn(async move {
        if joined.await.is_err() {
            return 0.0;
        }
        let tracker = ProgressTracker::start(&fourth, fourth_config).unwrap();
        work(tracker, 64, scaled(0.4), 2, Some(4), fourth_finished).await
    }));

    // The root only watches: it never reports samples, and counts its epochs one by one. It looks every
    // 10 ms (Hivemind: every 0.1 s), so that its measurement adds little to the epochs' own variation.
    let mut join = Some(join);
    let mut epoch = 0u64;
    let mut last = Instant::now();
    let mut step_times = Vec::new();
    let test_start = Instant::now();
    while epoch < 6 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            test_start.elapsed() < Duration::from_secs(60),
            "epochs so far took {step_times:?}"
        );
        if root_tracker.ready_to_update_epoch() {
            epoch += 1;
            root_tracker.update_epoch(epoch);
            step_times.push(last.elapsed().as_secs_f64());
            last = Instant::now();
            if epoch == 2
                && let Some(join) = join.take()
            {
                let _ = join.send(());
            }
        }
    }
    finished.store(true, Ordering::SeqCst);
    let mut rates = Vec::new();
    for task in tasks {
        rates.push(task.await.expect("a worker does not panic"));
    }
    let root_rate = root_tracker.samples_per_second();
    root_tracker.shutdown().await;
    assert!(!root_tracker.is_running());
    for membership in &all {
        membership.shutdown();
    }

    let mean = step_times.iter().sum::<f64>() / step_times.len() as f64;
    let ratios: Vec<f64> = step_times.iter().map(|t| t / mean).collect();
    eprintln!("epoch times {step_times:.3?} s, mean {mean:.3} s, ratios {ratios:.2?}, rates {rates:.1?}");
    // Hivemind's bounds: without the fourth worker an epoch takes longer than average, with it shorter.
    for i in [0, 1, 5] {
        assert!(
            1.05 < ratios[i] && ratios[i] < 2.0,
            "epoch {i} (three workers) took {:.2}× the mean; epochs {step_times:.3?}",
            ratios[i]
        );
    }
    for i in [2, 3, 4] {
        assert!(
            0.5 < ratios[i] && ratios[i] < 0.95,
            "epoch {i} (four workers) took {:.2}× the mean; epochs {step_times:.3?}",
            ratios[i]
        );
    }
    // True rates: 20, 32, 60 and 160 samples/s (at SCALE 1).
    assert!(
        rates.windows(2).all(|pair| pair[0] < pair[1]),
        "rates ordered by speed: {rates:?}"
    );
    assert!(root_rate < 1e-9, "the root never reported samples: {root_rate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sees_anothers_samples_and_its_departure() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let a = member(&hub, Some("a"), None).await;
    let b = member(&hub, Some("b"), Some(&a)).await;
    converge(&[&a, &b]).await;
    let config = ProgressConfig::new(1000);
    let tracker_a = ProgressTracker::start(&a, config.clone()).unwrap();
    let tracker_b = ProgressTracker::start(&b, config).unwrap();
    assert_eq!(tracker_b.global().num_peers, 0);

    tracker_a.report_local_progress(0, 0);
    tokio::time::sleep(Duration::from_millis(20)).await; // compute time of the first batch
    tracker_a.report_local_progress(0, 100);
    assert_eq!(
        tracker_a.global().samples_accumulated,
        100,
        "a's own samples show at once"
    );
    let seen = wait_until("b sees a's samples", Duration::from_secs(5), || {
        let global = tracker_b.global();
        global.num_peers == 1 && global.samples_accumulated == 100
    })
    .await;
    // A publish is gossiped at once and a new peer makes b refresh at once (at most min_refresh_period
    // after its last refresh).
    assert!(seen < Duration::from_secs(1), "b saw a's samples after {seen:?}");
    assert!(tracker_b.global().eta_next_epoch.is_finite());
    assert_eq!(tracker_b.global().epoch, 0);
    // b only watches: it is not a peer of the estimate, and publishes nothing.
    assert!(records(&a).iter().all(|r| r.peer == a.local_peer()));

    // a moves to the next epoch: b is behind and ready to move at once.
    tracker_a.update_epoch(1);
    wait_until("b sees a's epoch", Duration::from_secs(5), || {
        tracker_b.global().epoch == 1
    })
    .await;
    assert!(tracker_b.ready_to_update_epoch());
    assert!(tracker_b.estimated_next_update_time() <= tracker_b.now(), "due now");

    tracker_a.shutdown().await;
    let gone = wait_until(
        "a's record is deleted and b counts no peer",
        Duration::from_secs(5),
        || records(&b).is_empty() && tracker_b.global().num_peers == 0,
    )
    .await;
    assert!(gone < Duration::from_secs(2), "b noticed a's departure after {gone:?}");
    assert!(records(&a).is_empty(), "deleted in a's replica too");
    tracker_b.shutdown().await;
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_peer_ahead_stops_counting_once_the_membership_drops_it() {
    let _serial = SERIAL.lock().await;
    let (hub, emulator) = hub_and_emulator();
    let a = member(&hub, Some("crash-a"), None).await;
    let b = member(&hub, Some("crash-b"), Some(&a)).await;
    converge(&[&a, &b]).await;
    let config = ProgressConfig::new(1000);
    let tracker_a = ProgressTracker::start(&a, config.clone()).unwrap();
    let tracker_b = ProgressTracker::start(&b, config).unwrap();
    tracker_a.report_local_progress(0, 10);
    // b runs two epochs ahead of a, then crashes: its record stays behind until it expires.
    tracker_b.update_epoch(2);
    tracker_b.report_local_progress(2, 10);
    wait_until("a sees b two epochs ahead", Duration::from_secs(5), || {
        tracker_a.global().epoch == 2
    })
    .await;
    emulator.kill(b.local_peer());
    tracker_b.shutdown().await; // its deletion of the record cannot leave b any more
    b.shutdown();
    let detection = a.config().swim.failure_detection_time();
    let dropped = wait_until("a's estimate drops b", detection + Duration::from_secs(5), || {
        !a.is_member(&b.local_peer()) && tracker_a.global().epoch == 0
    })
    .await;
    assert!(
        records(&a).iter().any(|r| r.peer == b.local_peer() && r.epoch == 2),
        "b's record is still there: only its departure took it out of the estimate"
    );
    let global = tracker_a.global();
    assert_eq!(global.num_peers, 1, "a alone: {global:?}");
    assert_eq!(global.samples_accumulated, 10);
    println!("a's estimate dropped the crashed peer after {dropped:?} (failure detection time {detection:?})");
    tracker_a.shutdown().await;
    a.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_mode_peer_publishes_but_does_not_move_the_swarms_epoch() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let a = member(&hub, Some("a"), None).await;
    let client = member(&hub, None, Some(&a)).await;
    converge(&[&a, &client]).await;
    // Not asked for client mode: a client-mode member always tracks in it.
    let tracker_client = ProgressTracker::start(&client, ProgressConfig::new(1000)).unwrap();
    let tracker_a = ProgressTracker::start(&a, ProgressConfig::new(1000)).unwrap();
    tracker_a.report_local_progress(0, 10);
    tracker_client.update_epoch(5);
    tracker_client.report_local_progress(5, 40);
    wait_until("a sees the client", Duration::from_secs(5), || {
        tracker_a.global().num_clients == 1
    })
    .await;
    let global = tracker_a.global();
    assert_eq!((global.epoch, global.num_peers), (0, 2), "{global:?}");
    assert_eq!(
        global.samples_accumulated, 10,
        "the client's samples are at another epoch"
    );
    assert!(
        records(&a)
            .iter()
            .any(|r| r.peer == client.local_peer() && r.client_mode && r.epoch == 5)
    );
    // The client itself counts its own epoch.
    assert_eq!(tracker_client.global().epoch, 5);
    tracker_a.shutdown().await;
    tracker_client.shutdown().await;
    a.shutdown();
    client.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_loop_of_reports_and_epoch_changes_stays_within_the_publishing_limits() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let a = member(&hub, Some("a"), None).await;
    let b = member(&hub, Some("b"), Some(&a)).await;
    converge(&[&a, &b]).await;
    let tracker = ProgressTracker::start(&a, ProgressConfig::new(1_000_000)).unwrap();
    let start = Instant::now();
    let mut epoch = 0;
    let mut reports = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        for samples in 1..=1000 {
            tracker.report_local_progress(epoch, samples);
            reports += 1;
        }
        epoch += 1;
        tracker.update_epoch(epoch);
        tokio::task::yield_now().await;
    }
    wait_until("b sees a's last epoch", Duration::from_secs(5), || {
        records(&b).iter().any(|r| r.epoch == epoch)
    })
    .await;
    for (name, membership) in [("a", &a), ("b", &b)] {
        let counters = membership.replica().counters();
        assert_eq!(counters.refused("throttled"), 0, "{name} throttled a's progress");
        // The tracker's budget (within the record store's default limits) over the loop's 2 s plus its burst,
        // whatever the number of reports.
        let budget = PublishBudget::within(&a.config().publish_limits);
        let bound = (budget.rate_per_sec * 2.5).ceil() as u64 + u64::from(budget.burst) + 2;
        assert!(
            counters.stored() <= bound,
            "{name} stored {} progress records, more than {bound}",
            counters.stored()
        );
    }
    assert!(reports > 10_000, "the hot loop ran ({reports} reports)");
    tracker.shutdown().await;
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_actor_and_its_task_and_is_idempotent() {
    let _serial = SERIAL.lock().await;
    let hub = hub();
    let a = member(&hub, Some("a"), None).await;
    let tracker = ProgressTracker::start(&a, ProgressConfig::new(100)).unwrap();
    tracker.report_local_progress(0, 10);
    wait_until("a publishes", Duration::from_secs(5), || records(&a).len() == 1).await;
    assert!(tracker.is_running());
    let clone = tracker.clone();
    tokio::join!(tracker.shutdown(), clone.shutdown());
    assert!(!tracker.is_running(), "the actor and the subscription task are gone");
    assert!(records(&a).is_empty(), "its record is deleted");
    // Everything after shutdown is a no-op, not a panic.
    let before = tracker.local();
    tracker.report_local_progress(0, 50);
    tracker.update_epoch(7);
    tracker.refresh_now();
    assert_eq!(tracker.local(), before);
    assert_eq!(tracker.global().epoch, 0);
    tracker.shutdown().await;
    // A tracker dropped without shutdown stops too (its record is left to expire).
    let dropped = ProgressTracker::start(&a, ProgressConfig::new(100)).unwrap();
    let observer = dropped.clone();
    drop(dropped);
    assert!(observer.is_running(), "a clone keeps it alive");
    a.shutdown();
    // Starting needs a valid configuration.
    let error = ProgressTracker::start(&a, ProgressConfig::new(0))
        .err()
        .expect("refused");
    assert!(error.to_string().contains("target_batch_size"), "{error}");
}
