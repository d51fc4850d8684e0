//! Flood: one hostile peer, over a connection the test makes itself, sends 100,000 join requests, then
//! 100,000 all-reduce part streams, then 100,000 records at a training peer of a three-peer swarm. The
//! limits refuse at least 90 % of each flood and count it (the router's `colony_streams_refused_total`, the
//! record store's refusals), and the honest peers reach new epochs throughout and average with each other
//! after it.
//!
//! The metrics recorder is process-global, so this binary holds this one test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony::membership::join::{self, JoinRequest, JoinResponse};
use colony::membership::{MemberId, Membership, MembershipConfig, Role, SwimConfig};
use colony::optimizer::{CollaborativeOptimizer, CollaborativeOptions, OptimizerServices};
use colony::records::sync::{self as records_sync, SyncStep, steps};
use colony::records::wire::{WireBatch, WireRecord};
use colony::records::{Record, Schemas, Subkey};
use colony_averaging::allreduce::{self, ToReducer, ToSender};
use colony_averaging::tensor::TensorInfo;
use colony_offload::OptimizerConfig;
use colony_transports::access::{AccessControl, AccessPolicy};
use colony_transports::mem::MemHub;
use colony_transports::rpc::{self, StreamConfig};
use colony_transports::wire::WireError;
use colony_transports::{Address, Connection, Keypair};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

const RUN: &str = "flood-test";
/// Messages of each flood.
const FLOOD: usize = 100_000;
/// Requests the hostile peer keeps in flight: more than the streams one peer may have in progress (64 by
/// default), so that the cap is hit as well as the rate.
const IN_FLIGHT: usize = 128;
/// Records per anti-entropy batch the hostile peer pushes.
const RECORDS_PER_BATCH: usize = 1_000;
/// Of each batch, this many are signed by the hostile peer (it owns them: beyond its records-per-peer
/// limit); the rest name no owner.
const SIGNED_PER_BATCH: usize = 10;

/// Upper bound of every wait.
const WAIT: Duration = Duration::from_secs(60);

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the counter `series` (name and labels as rendered), 0 when absent.
fn counter(metrics: &PrometheusHandle, series: &str) -> f64 {
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn streams_refused(metrics: &PrometheusHandle) -> (f64, f64) {
    (
        counter(metrics, r#"colony_streams_refused_total{reason="rate_limited"}"#),
        counter(metrics, r#"colony_streams_refused_total{reason="too_many_streams"}"#),
    )
}

fn member_config(name: &str, bootstrap: Option<Address>) -> MembershipConfig {
    let mut config = MembershipConfig::new(RUN, Some(format!("mem://{name}").parse().unwrap()));
    config.initial_peers = bootstrap.into_iter().collect();
    config.swim = SwimConfig {
        probe_period: Duration::from_millis(300),
        probe_rtt: Duration::from_millis(150),
        suspect_to_down_after: Duration::from_millis(900),
        gossip_interval: Duration::from_millis(50),
        ..SwimConfig::default()
    };
    config.sync_interval = Duration::from_millis(200);
    // Progress is published several times a second per peer; keep the per-key limit above it. Every other
    // limit keeps its default: the defaults are what must hold a flood.
    config.publish_limits.rate_per_sec = 50.0;
    config.publish_limits.burst = 50;
    config
}

fn options() -> CollaborativeOptions {
    let mut options = CollaborativeOptions::new(24, OptimizerConfig::sgd(0.1, 0.0, 4));
    options.matchmaking_time = Duration::from_millis(500);
    options.request_timeout = Duration::from_millis(300);
    options.averaging_timeout = Duration::from_secs(5);
    options.next_chunk_timeout = Some(Duration::from_secs(2));
    options.load_state_timeout = Duration::from_secs(20);
    options.min_refresh_period = Duration::from_millis(20);
    options.max_refresh_period = Duration::from_millis(200);
    options
}

/// What a training peer reports while it trains.
#[derive(Default)]
struct Progress {
    epoch: AtomicU64,
    averaged_gradient_rounds: AtomicU64,
}

struct Honest {
    membership: Membership,
    progress: Arc<Progress>,
    trainer: tokio::task::JoinHandle<()>,
}

/// Starts a peer that trains (batches of 2 every 20 ms, pulling its 4 parameters towards `centre`) until
/// `stop` is set.
async fn honest(hub: &MemHub, name: &str, bootstrap: Option<Address>, centre: f32, stop: Arc<AtomicBool>) -> Honest {
    let keypair = Arc::new(Keypair::generate());
    let transport = hub.transport(&keypair);
    let services = OptimizerServices::new(Duration::from_secs(3));
    let mut schemas = Schemas::default();
    OptimizerServices::register_schemas(&mut schemas);
    let membership = Membership::start_with(member_config(name, bootstrap), keypair, transport, schemas, |router| {
        services.register(router)
    })
    .await
    .expect("membership starts");
    let tensors = vec![TensorInfo::new("w", [4])];
    let mut optimizer = CollaborativeOptimizer::start(&membership, &services, tensors, &[0.0; 4], options())
        .expect("the optimizer starts");
    let progress = Arc::new(Progress::default());
    let report = progress.clone();
    let trainer = tokio::spawn(async move {
        let mut params = vec![0.0f32; 4];
        let mut grads = vec![0.0f32; 4];
        while !stop.load(Ordering::Relaxed) {
            grads.iter_mut().zip(&params).for_each(|(g, w)| *g = w - centre);
            let outcome = optimizer
                .step(&mut params, &mut grads, Some(2))
                .await
                .expect("a step of an honest peer");
            report.epoch.store(outcome.epoch, Ordering::Relaxed);
            report.averaged_gradient_rounds.store(
                optimizer.counters().gradient_rounds.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        optimizer.shutdown().await;
    });
    Honest {
        membership,
        progress,
        trainer,
    }
}

fn epochs(peers: &[Honest]) -> Vec<u64> {
    peers.iter().map(|p| p.progress.epoch.load(Ordering::Relaxed)).collect()
}

/// Waits until every peer has passed the epoch it had in `from` by at least `by`.
async fn advance(peers: &[Honest], from: &[u64], by: u64, what: &str) {
    wait_until(&format!("every honest peer advanced {by} epochs {what}"), || {
        epochs(peers).iter().zip(from).all(|(now, then)| *now >= then + by)
    })
    .await;
}

/// How the hostile peer's messages of one flood were answered.
#[derive(Default, Debug)]
struct Tally {
    served: AtomicUsize,
    rate_limited: AtomicUsize,
    over_stream_cap: AtomicUsize,
    other: AtomicUsize,
    /// The first answer counted as `other`.
    first_other: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn count<T>(&self, result: &Result<T, WireError>) {
        let counter = match result {
            Ok(_) => &self.served,
            Err(WireError::Remote(message)) if message.starts_with("rate limited: ") => &self.rate_limited,
            Err(WireError::Remote(message)) if message.contains("streams in progress") => &self.over_stream_cap,
            Err(error) => {
                self.first_other
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| error.to_string());
                &self.other
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn refused(&self) -> usize {
        self.rate_limited.load(Ordering::Relaxed) + self.over_stream_cap.load(Ordering::Relaxed)
    }
}

/// Runs `operation(i)` for i in 0..`total`, `IN_FLIGHT` at a time.
async fn flood<F, Fut>(total: usize, operation: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let operation = Arc::new(operation);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (next, operation) = (next.clone(), operation.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                operation(i).await;
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.expect("a flood worker");
    }
}

/// One anti-entropy exchange pushing `records` at the peer on `conn`, as the initiator. The digest it
/// sends back is the peer's own, so the peer pushes nothing in return.
async fn push_records(conn: &Connection, records: Vec<WireRecord>) -> Result<(), WireError> {
    let config = StreamConfig::default();
    let (mut send, mut recv) = rpc::open::<SyncStep>(conn, &records_sync::protocol(), &config).await?;
    let offer = SyncStep {
        step: steps::OFFER,
        fingerprint: [0xAB; 32],
    };
    send.send(&offer, Bytes::new()).await?;
    let (step, payload) = recv.recv_required("the peer's digest").await?;
    assert_eq!(step.step, steps::DIGEST, "a made-up fingerprint never matches");
    let theirs = WireBatch::decode(&payload).expect("the peer's digest decodes");
    let batch = WireBatch {
        records,
        digest: theirs.digest,
    };
    let batch = batch.encode().expect("the batch encodes");
    send.send(&SyncStep::plain(steps::REPLY), batch).await?;
    recv.recv_required("the peer's push").await?;
    send.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_refused_and_counted_while_the_swarm_trains_on() {
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .expect("the test installs the only metrics recorder");
    let started = Instant::now();
    let hub = MemHub::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut peers = Vec::new();
    let mut bootstrap = None;
    for (index, centre) in [1.0f32, 3.0, 5.0].into_iter().enumerate() {
        let peer = honest(
            &hub,
            &format!("honest-{index}"),
            bootstrap.clone(),
            centre,
            stop.clone(),
        )
        .await;
        bootstrap = peer.membership.address();
        peers.push(peer);
    }
    wait_until("the swarm formed", || {
        peers.iter().all(|p| p.membership.members().len() == 2)
    })
    .await;
    advance(&peers, &[0, 0, 0], 1, "before the flood").await;
    let target = peers[0].membership.address().expect("the target listens");

    // The hostile peer: its own key, a plain connection through the run's (open) access exchange, nothing
    // of Colony's peer code.
    let hostile = Keypair::generate();
    let access = Arc::new(
        AccessControl::new(
            hostile.peer_id(),
            AccessPolicy::Open,
            None,
            colony_transports::access::system_clock(),
        )
        .unwrap(),
    );
    let transport = access.wrap(hub.transport(&hostile));
    let conn = transport.dial(&target).await.expect("the hostile peer connects");
    let hostile_id = MemberId {
        peer: hostile.peer_id(),
        generation: 1,
        role: Role::Client,
        address: None,
        bandwidth_mbps: 0.0,
    };
    let flood_start = epochs(&peers);
    let averaged_before: Vec<u64> = peers
        .iter()
        .map(|p| p.progress.averaged_gradient_rounds.load(Ordering::Relaxed))
        .collect();

    // 1. Join requests.
    let before = streams_refused(&metrics);
    let phase = Instant::now();
    let tally = Arc::new(Tally::default());
    {
        let (tally, conn) = (tally.clone(), conn.clone());
        let member = join::encode_id(&hostile_id);
        flood(FLOOD, move |_| {
            let (tally, conn, member) = (tally.clone(), conn.clone(), member.clone());
            async move {
                let request = JoinRequest {
                    run_id: RUN.into(),
                    member,
                    time: colony::membership::system_clock()(),
                };
                let result = rpc::call::<_, JoinResponse>(
                    &conn,
                    &join::protocol(),
                    &request,
                    Bytes::new(),
                    Duration::from_secs(20),
                    &StreamConfig::default(),
                )
                .await;
                tally.count(&result);
            }
        })
        .await;
    }
    let after = streams_refused(&metrics);
    let counted = (after.0 - before.0) + (after.1 - before.1);
    println!(
        "join flood: {FLOOD} requests in {:.1} s: {tally:?}; counted refusals: {counted}",
        phase.elapsed().as_secs_f64()
    );
    assert!(tally.refused() >= FLOOD * 9 / 10, "join requests refused: {tally:?}");
    assert!(
        counted >= tally.refused() as f64,
        "the router counted {counted}, the hostile saw {tally:?}"
    );
    assert_eq!(
        tally.other.load(Ordering::Relaxed),
        0,
        "every request was answered: {tally:?}"
    );
    let served = tally.served.load(Ordering::Relaxed);
    advance(&peers, &flood_start, 1, "after the join flood").await;

    // 2. All-reduce part streams for groups that do not exist here.
    let before = streams_refused(&metrics);
    let phase_epochs = epochs(&peers);
    let phase = Instant::now();
    let part_tally = Arc::new(Tally::default());
    {
        let (tally, conn) = (part_tally.clone(), conn.clone());
        flood(FLOOD, move |i| {
            let (tally, conn) = (tally.clone(), conn.clone());
            async move {
                let part = async {
                    let config = StreamConfig::default();
                    let (mut send, mut recv) = rpc::open::<ToSender>(&conn, &allreduce::protocol(), &config).await?;
                    let mut group_id = [0u8; 32];
                    group_id[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    // A refused stream may fail the write; its answer says why.
                    let _ = send.send(&ToReducer::Begin { group_id }, Bytes::new()).await;
                    recv.recv_required("the reducer's answer").await
                };
                let result = tokio::time::timeout(Duration::from_secs(20), part)
                    .await
                    .unwrap_or_else(|_| Err(WireError::EndOfStream("an answer within 20 s")));
                tally.count(&result);
            }
        })
        .await;
    }
    let after = streams_refused(&metrics);
    let counted = (after.0 - before.0) + (after.1 - before.1);
    println!(
        "part-stream flood: {FLOOD} streams in {:.1} s: {part_tally:?}; counted refusals: {counted}",
        phase.elapsed().as_secs_f64()
    );
    assert!(
        part_tally.refused() >= FLOOD * 9 / 10,
        "part streams refused: {part_tally:?}"
    );
    assert!(counted >= part_tally.refused() as f64);
    assert!(
        part_tally.over_stream_cap.load(Ordering::Relaxed) > 0,
        "part streams held for their group fill the peer's streams in progress: {part_tally:?}"
    );
    advance(&peers, &phase_epochs, 1, "after the part-stream flood").await;

    // 3. Records: signed ones beyond the hostile peer's records-per-peer limit, unsigned ones (owned by
    // nobody, so charged to it as their sender) beyond its publishing budget.
    let target_records = peers[0].membership.replica().clone();
    let (refused_before, stored_before) = (
        target_records.counters().refused_total(),
        target_records.counters().stored(),
    );
    let phase_epochs = epochs(&peers);
    let phase = Instant::now();
    let now = colony::membership::system_clock()();
    let batches: Vec<Vec<WireRecord>> = (0..FLOOD / RECORDS_PER_BATCH)
        .map(|batch| {
            (0..RECORDS_PER_BATCH)
                .map(|i| {
                    let n = batch * RECORDS_PER_BATCH + i;
                    let record = if i < SIGNED_PER_BATCH {
                        Record::signed(
                            RUN,
                            &hostile,
                            format!("flood/signed-{n}"),
                            Some(Subkey::Peer(hostile.peer_id())),
                            None,
                            now + 60.0,
                        )
                    } else {
                        Record {
                            key: format!("flood/unsigned-{n}"),
                            subkey: Some(Subkey::Name("x".into())),
                            value: None,
                            expiration: now + 60.0,
                            signature: None,
                        }
                    };
                    WireRecord::from(&record)
                })
                .collect()
        })
        .collect();
    let record_tally = Arc::new(Tally::default());
    for batch in batches {
        let result = push_records(&conn, batch).await;
        record_tally.count(&result);
    }
    let refused = target_records.counters().refused_total() - refused_before;
    let stored = target_records.counters().stored() - stored_before;
    let throttled = target_records.counters().refused("throttled");
    let over_limit = target_records.counters().refused("limit_reached");
    println!(
        "records flood: {FLOOD} records in {:.1} s: {refused} refused ({throttled} throttled, {over_limit} over a count limit), {stored} stored; exchanges: {record_tally:?}",
        phase.elapsed().as_secs_f64()
    );
    assert_eq!(record_tally.served.load(Ordering::Relaxed), FLOOD / RECORDS_PER_BATCH);
    assert!(
        refused as usize >= FLOOD * 9 / 10,
        "records refused: {refused} of {FLOOD}"
    );
    assert!(throttled > 0 && over_limit > 0, "both record limits were hit");
    assert!(
        counter(&metrics, r#"colony_records_refused_total{reason="throttled"}"#) >= throttled as f64,
        "the metric counts the refusals"
    );
    advance(&peers, &phase_epochs, 1, "after the records flood").await;

    // The swarm trains on: more epochs, and gradient rounds that still average among the honest peers.
    println!(
        "epochs at the flood's start {flood_start:?}, now {:?}; join requests served: {served}",
        epochs(&peers)
    );
    let end = epochs(&peers);
    advance(&peers, &end, 2, "after the floods").await;
    wait_until("every honest peer averaged gradients after the floods", || {
        peers
            .iter()
            .zip(&averaged_before)
            .all(|(p, before)| p.progress.averaged_gradient_rounds.load(Ordering::Relaxed) > *before)
    })
    .await;
    for peer in &peers {
        let trainers = peer
            .membership
            .members()
            .iter()
            .filter(|m| m.role == Role::Trainer)
            .count();
        assert_eq!(trainers, 2, "each honest peer still sees the other two");
    }

    stop.store(true, Ordering::Relaxed);
    for peer in peers {
        tokio::time::timeout(WAIT, peer.trainer)
            .await
            .expect("the trainer stops")
            .expect("the trainer ran without panicking");
        peer.membership.shutdown();
    }
    println!("flood test took {:.1} s", started.elapsed().as_secs_f64());
}
