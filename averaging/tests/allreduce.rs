//! The butterfly all-reduce among peers on the in-process and TCP transports: every combination of roles,
//! weights, a hypercube of pairs, rogue senders, and the failure rules under injected faults.

use std::sync::Arc;
use std::time::Duration;

use colony_averaging::aggregation::Aggregation;
use colony_averaging::allreduce::{
    self, AllReduceConfig, AllReduceService, Fault, GroupId, GroupMember, GroupPlan, Outcome, PeerMode, ServiceConfig,
    ToReducer, ToSender,
};
use colony_averaging::balance::load_balance_peers;
use colony_averaging::codec::{Codec, CodecPolicy};
use colony_averaging::net::{ConnectError, Connector, Endpoint};
use colony_averaging::tensor::{FlatTensors, TensorInfo, TensorLayout};
use colony_transports::mem::MemHub;
use colony_transports::rpc::{Router, StreamConfig};
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::{Address, Connection, Keypair, PeerId, Transport};

/// A deterministic source of test values.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

struct Peer {
    endpoint: Endpoint,
    service: AllReduceService,
    keypair: Keypair,
}

impl Peer {
    fn id(&self) -> PeerId {
        self.keypair.peer_id()
    }

    /// Starts this peer's run of `plan` with `values` (`None` for an auxiliary).
    fn start(
        &self,
        plan: &GroupPlan,
        layout: &Arc<TensorLayout>,
        values: Option<&[f32]>,
        config: AllReduceConfig,
    ) -> allreduce::AllReduceRun {
        let tensors = values.map(|v| FlatTensors::new(layout.clone(), v.to_vec()).unwrap());
        self.start_with(plan, layout, tensors, config)
    }

    /// Starts this peer's run of `plan` with `tensors` as they are (`None` for an auxiliary).
    fn start_with(
        &self,
        plan: &GroupPlan,
        layout: &Arc<TensorLayout>,
        tensors: Option<FlatTensors>,
        config: AllReduceConfig,
    ) -> allreduce::AllReduceRun {
        allreduce::start(
            &self.service,
            self.endpoint.connector(),
            plan.clone(),
            self.id(),
            layout.clone(),
            tensors,
            config,
        )
        .unwrap()
    }
}

#[derive(Clone, Copy)]
enum Net {
    Mem,
    Tcp,
}

async fn peers(count: usize, net: Net, registration_timeout: Duration) -> Vec<Peer> {
    let hub = MemHub::new();
    let mut peers = Vec::new();
    for index in 0..count {
        let keypair = Keypair::generate();
        let (transport, address): (Arc<dyn Transport>, Address) = match net {
            Net::Mem => (hub.transport(&keypair), format!("mem://peer-{index}").parse().unwrap()),
            Net::Tcp => (
                Arc::new(TcpTransport::new(keypair.clone(), TcpConfig::default())),
                "tcp://127.0.0.1:0".parse().unwrap(),
            ),
        };
        let service = AllReduceService::new(ServiceConfig {
            registration_timeout,
            ..ServiceConfig::default()
        });
        let mut router = Router::default();
        service.serve(&mut router);
        let endpoint = Endpoint::listen(transport, &address, router).await.unwrap();
        peers.push(Peer {
            endpoint,
            service,
            keypair,
        });
    }
    let addresses: Vec<Address> = peers.iter().map(|p| p.endpoint.local_address().clone()).collect();
    for peer in &peers {
        for address in &addresses {
            peer.endpoint.add_address(address.clone());
        }
    }
    peers
}

fn plan(peers: &[Peer], modes: &[PeerMode], weights: &[f32], group: u8) -> GroupPlan {
    let bandwidths: Vec<Option<f64>> = modes
        .iter()
        .map(|m| if *m == PeerMode::Client { Some(0.0) } else { None })
        .collect();
    let shares = if modes.iter().all(|m| *m == PeerMode::Client) {
        vec![0; modes.len()]
    } else {
        load_balance_peers(1 << 20, &bandwidths, 0).unwrap()
    };
    GroupPlan {
        group_id: GroupId([group; 32]),
        members: peers
            .iter()
            .zip(modes)
            .zip(weights)
            .zip(shares)
            .map(|(((peer, mode), weight), share)| GroupMember {
                peer: peer.id(),
                mode: *mode,
                weight: *weight,
                share: share as f64,
            })
            .collect(),
    }
}

/// Runs one round on every peer of `plan` whose `faults` entry is not `FailBefore` (`None` in `skip`).
async fn run_round(
    peers: &[Peer],
    plan: &GroupPlan,
    layout: &Arc<TensorLayout>,
    inputs: &[Vec<f32>],
    config: &AllReduceConfig,
    faults: &[Option<Fault>],
    skip: &[bool],
) -> Vec<Option<tokio::task::JoinHandle<Result<Outcome, allreduce::AllReduceError>>>> {
    let mut handles = Vec::new();
    for (index, peer) in peers.iter().enumerate() {
        if skip[index] {
            handles.push(None);
            continue;
        }
        let values = (plan.members[index].mode != PeerMode::Auxiliary).then_some(inputs[index].as_slice());
        let config = AllReduceConfig {
            fault: faults[index],
            ..config.clone()
        };
        let run = peer.start(plan, layout, values, config);
        handles.push(Some(tokio::spawn(run.finish())));
    }
    handles
}

fn weighted_mean(inputs: &[Vec<f32>], weights: &[f32], include: &[bool]) -> Vec<f32> {
    let total: f64 = weights
        .iter()
        .zip(include)
        .filter(|(_, i)| **i)
        .map(|(w, _)| *w as f64)
        .sum();
    (0..inputs[0].len())
        .map(|k| {
            let sum: f64 = inputs
                .iter()
                .zip(weights)
                .zip(include)
                .filter(|(_, i)| **i)
                .map(|((x, w), _)| x[k] as f64 * *w as f64)
                .sum();
            (sum / total) as f32
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn small_layout() -> Arc<TensorLayout> {
    Arc::new(TensorLayout::new(vec![TensorInfo::new("a", [123]), TensorInfo::new("b", [3])]).unwrap())
}

/// The four peers' tensors of the reference scenario: randn, rand, −rand and randn³ beside zeros, ones,
/// arange and arange/2.
fn small_inputs(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng(seed);
    let tails = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 2.0], [0.0, 0.5, 1.0]];
    (0..4)
        .map(|peer| {
            let mut values: Vec<f32> = (0..123)
                .map(|_| match peer {
                    0 => rng.normal(),
                    1 => rng.uniform(),
                    2 => -rng.uniform(),
                    _ => rng.normal().powi(3),
                })
                .collect();
            values.extend_from_slice(&tails[peer]);
            values
        })
        .collect()
}

async fn check_modes(net: Net, clients: usize, auxiliaries: usize) {
    let peers = peers(4, net, Duration::from_secs(5)).await;
    let modes: Vec<PeerMode> = (0..4)
        .map(|i| {
            if i < clients {
                PeerMode::Client
            } else if i < clients + auxiliaries {
                PeerMode::Auxiliary
            } else {
                PeerMode::Node
            }
        })
        .collect();
    let weights = vec![1.0; 4];
    let plan = plan(&peers, &modes, &weights, (clients * 3 + auxiliaries) as u8);
    let layout = small_layout();
    let inputs = small_inputs(7 + clients as u64 * 3 + auxiliaries as u64);
    let config = AllReduceConfig {
        part_size_bytes: 64, // many parts even for 126 values
        ..AllReduceConfig::default()
    };
    let handles = run_round(&peers, &plan, &layout, &inputs, &config, &[None; 4], &[false; 4]).await;
    let senders: Vec<bool> = modes.iter().map(|m| *m != PeerMode::Auxiliary).collect();
    let expected = senders
        .iter()
        .any(|s| *s)
        .then(|| weighted_mean(&inputs, &weights, &senders));
    for (index, handle) in handles.into_iter().enumerate() {
        let outcome = handle.unwrap().await.unwrap().unwrap();
        match (&expected, modes[index]) {
            (Some(expected), PeerMode::Node | PeerMode::Client) => {
                let values = outcome.tensors.expect("senders get results");
                let diff = max_diff(values.as_slice(), expected);
                assert!(
                    diff < 1e-6,
                    "clients {clients}, auxiliaries {auxiliaries}: peer {index} is off by {diff}"
                );
                assert!(outcome.report.failed_reducers.is_empty() && outcome.report.dropped_senders.is_empty());
            }
            _ => assert!(outcome.tensors.is_none(), "auxiliaries get no tensors"),
        }
    }
}

const MODE_CASES: [(usize, usize); 12] = [
    (0, 0),
    (0, 1),
    (0, 2),
    (1, 0),
    (1, 1),
    (1, 2),
    (2, 0),
    (2, 1),
    (2, 2),
    (0, 4),
    (1, 3),
    (0, 3),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_combination_of_clients_and_auxiliaries_holds_the_mean_on_mem() {
    for (clients, auxiliaries) in MODE_CASES {
        check_modes(Net::Mem, clients, auxiliaries).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_combination_of_clients_and_auxiliaries_holds_the_mean_on_tcp() {
    for (clients, auxiliaries) in MODE_CASES {
        check_modes(Net::Tcp, clients, auxiliaries).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_averages_in_the_callers_buffer_and_reuses_the_sums_of_earlier_parts() {
    let peers = peers(4, Net::Tcp, Duration::from_secs(5)).await;
    let modes = [PeerMode::Node; 4];
    let weights = [1.0; 4];
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("w", [64 * 1024])]).unwrap());
    let mut rng = Rng(2026);
    let inputs: Vec<Vec<f32>> = (0..4).map(|_| (0..64 * 1024).map(|_| rng.normal()).collect()).collect();
    let expected = weighted_mean(&inputs, &weights, &[true; 4]);
    let config = AllReduceConfig {
        codecs: CodecPolicy::Fixed(Codec::None),
        part_size_bytes: 4096, // 16 parts per reducer, each sent as a payload borrowing the buffer
        ..AllReduceConfig::default()
    };
    for round in 0..2u8 {
        let plan = plan(&peers, &modes, &weights, 200 + round);
        let mut handles = Vec::new();
        for (peer, input) in peers.iter().zip(&inputs) {
            let tensors = FlatTensors::new(layout.clone(), input.clone()).unwrap();
            let address = tensors.as_slice().as_ptr() as usize;
            let run = peer.start_with(&plan, &layout, Some(tensors), config.clone());
            handles.push((address, tokio::spawn(run.finish())));
        }
        for (index, (address, handle)) in handles.into_iter().enumerate() {
            let outcome = handle.await.unwrap().unwrap();
            assert_eq!(
                outcome.report.parts_averaged, outcome.report.parts,
                "round {round}, peer {index}"
            );
            let values = outcome.tensors.expect("a node gets its tensors back");
            assert_eq!(
                values.as_slice().as_ptr() as usize,
                address,
                "round {round}, peer {index}: the result is not in the caller's buffer"
            );
            let diff = max_diff(values.as_slice(), &expected);
            assert!(diff < 1e-6, "round {round}, peer {index} is off by {diff}");
        }
        for (index, peer) in peers.iter().enumerate() {
            let spare = peer.service.spare_sum_buffers();
            assert!(
                (1..=ServiceConfig::default().spare_sum_buffers).contains(&spare),
                "round {round}, peer {index}: {spare} spare sum buffers"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_means_with_two_clients() {
    let peers = peers(4, Net::Mem, Duration::from_secs(5)).await;
    let mut rng = Rng(99);
    let weights: Vec<f32> = (0..4).map(|_| rng.uniform() * 10.0 + 0.01).collect();
    let modes = [PeerMode::Client, PeerMode::Node, PeerMode::Client, PeerMode::Node];
    let plan = plan(&peers, &modes, &weights, 77);
    let layout = small_layout();
    let inputs = small_inputs(5);
    let config = AllReduceConfig {
        part_size_bytes: 100,
        ..AllReduceConfig::default()
    };
    let handles = run_round(&peers, &plan, &layout, &inputs, &config, &[None; 4], &[false; 4]).await;
    let expected = weighted_mean(&inputs, &weights, &[true; 4]);
    for handle in handles {
        let outcome = handle.unwrap().await.unwrap().unwrap();
        let diff = max_diff(outcome.tensors.unwrap().as_slice(), &expected);
        assert!(diff < 1e-6, "off by {diff}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_are_delivered_in_order_as_they_complete() {
    let peers = peers(3, Net::Mem, Duration::from_secs(5)).await;
    let layout = Arc::new(
        TensorLayout::new(vec![
            TensorInfo::new("w", [64, 32]),
            TensorInfo::new("empty", [0]),
            TensorInfo::new("scalar", []),
            TensorInfo::new("b", [1000]),
        ])
        .unwrap(),
    );
    let mut rng = Rng(3);
    let inputs: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..layout.total_values()).map(|_| rng.normal()).collect())
        .collect();
    let plan = plan(&peers, &[PeerMode::Node; 3], &[1.0; 3], 5);
    let config = AllReduceConfig {
        part_size_bytes: 1024,
        ..AllReduceConfig::default()
    };
    let mut runs: Vec<_> = peers
        .iter()
        .zip(&inputs)
        .map(|(peer, input)| peer.start(&plan, &layout, Some(input), config.clone()))
        .collect();
    let expected = weighted_mean(&inputs, &[1.0; 3], &[true; 3]);
    for run in runs.iter_mut() {
        for index in 0..layout.len() {
            let ready = tokio::time::timeout(Duration::from_secs(10), run.next_tensor())
                .await
                .expect("a tensor within 10 s")
                .expect("every tensor is delivered");
            assert_eq!(ready.index, index);
            assert!(max_diff(&ready.values, &expected[layout.range(index)]) < 1e-6);
        }
    }
    for run in runs {
        let outcome = run.finish().await.unwrap();
        assert_eq!(outcome.report.parts_averaged, outcome.report.parts);
        assert!(max_diff(outcome.tensors.unwrap().as_slice(), &expected) < 1e-6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_peers_in_pairs_reach_the_global_mean_in_three_rounds() {
    // A 2×2×2 hypercube: in round r, peers that differ in bit r average together.
    let peers = peers(8, Net::Mem, Duration::from_secs(5)).await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("x", [3])]).unwrap());
    let mut rng = Rng(11);
    let mut values: Vec<Vec<f32>> = (0..8).map(|_| (0..3).map(|_| rng.normal()).collect()).collect();
    let global = weighted_mean(&values, &[1.0; 8], &[true; 8]);
    for round in 0..3 {
        let mut handles = Vec::new();
        for index in 0..8usize {
            let partner = index ^ (1 << round);
            let pair = [index.min(partner), index.max(partner)];
            let group = [&peers[pair[0]], &peers[pair[1]]];
            let plan = GroupPlan {
                group_id: GroupId([(round * 8 + pair[0]) as u8; 32]),
                members: group
                    .iter()
                    .map(|p| GroupMember {
                        peer: p.id(),
                        mode: PeerMode::Node,
                        weight: 1.0,
                        share: 1.0,
                    })
                    .collect(),
            };
            let run = peers[index].start(&plan, &layout, Some(&values[index]), AllReduceConfig::default());
            handles.push(tokio::spawn(run.finish()));
        }
        for (index, handle) in handles.into_iter().enumerate() {
            values[index] = handle.await.unwrap().unwrap().tensors.unwrap().into_vec();
        }
    }
    for value in &values {
        assert!(max_diff(value, &global) < 1e-6, "{value:?} vs {global:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_sender_is_dropped_and_the_others_finish() {
    let peers = peers(3, Net::Mem, Duration::from_secs(5)).await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("x", [4096])]).unwrap());
    let mut rng = Rng(21);
    let inputs: Vec<Vec<f32>> = (0..3).map(|_| (0..4096).map(|_| rng.normal()).collect()).collect();
    let plan = plan(&peers, &[PeerMode::Node; 3], &[1.0; 3], 9);
    let config = AllReduceConfig {
        part_size_bytes: 4096,
        sender_timeout: Duration::from_secs(2),
        reducer_timeout: Duration::from_secs(4),
        ..AllReduceConfig::default()
    };
    // Peer 2 is rogue: instead of its run it sends garbage to peer 0 (a NaN part) and peer 1 (wrong index).
    let handles = run_round(
        &peers,
        &plan,
        &layout,
        &inputs,
        &config,
        &[None; 3],
        &[false, false, true],
    )
    .await;
    let connector = peers[2].endpoint.connector();
    let stream = StreamConfig::default();
    for (target, message) in [
        (
            0,
            ToReducer::Part {
                index: 0,
                codec: Codec::None.id(),
            },
        ),
        (
            1,
            ToReducer::Part {
                index: 999,
                codec: Codec::None.id(),
            },
        ),
    ] {
        let conn = connector.connect(&peers[target].id()).await.unwrap();
        let (mut send, mut recv) = colony_transports::rpc::open::<ToSender>(&conn, &allreduce::protocol(), &stream)
            .await
            .unwrap();
        send.send(&ToReducer::Begin { group_id: [9; 32] }, bytes::Bytes::new())
            .await
            .unwrap();
        let nan = f32::NAN.to_le_bytes().repeat(1024);
        let _ = send.send(&message, bytes::Bytes::from(nan)).await;
        // The reducer answers nothing useful to a rogue sender; it must not crash.
        let _ = tokio::time::timeout(Duration::from_secs(5), recv.recv()).await;
    }
    let honest = weighted_mean(&inputs, &[1.0; 3], &[true, true, false]);
    for (index, handle) in handles.into_iter().take(2).enumerate() {
        let outcome = handle.unwrap().await.unwrap().unwrap();
        assert!(
            outcome.report.dropped_senders.contains(&peers[2].id()),
            "{:?}",
            outcome.report
        );
        // Peer 0 got the NaN part and counts it; peer 1's refusal (a wrong index) is not a NaN.
        assert_eq!(
            outcome.report.non_finite_parts,
            usize::from(index == 0),
            "peer {index}: {:?}",
            outcome.report
        );
        let values = outcome.tensors.unwrap().into_vec();
        // Peer 2's own shard is never reduced (it runs no reducer): those parts keep local values.
        let matching = values
            .iter()
            .zip(&honest)
            .filter(|(a, b)| (*a - *b).abs() < 1e-5)
            .count();
        assert!(
            matching * 3 > values.len(),
            "only {matching} of {} values averaged",
            values.len()
        );
    }
}

/// Four peers, one of which sends its values scaled by 10³ (and, in a second round, random values of that
/// size): with CenteredClip every peer's result stays within the outlier's bounded pull of the honest mean,
/// for exact and compressed parts; with the mean it is dragged far away. Reducers count what they clipped.
/// A connector that knows one peer to be gone, as the runtime's does for a member whose connections broke.
struct KnowsGone {
    inner: Arc<dyn Connector>,
    gone: PeerId,
}

#[async_trait::async_trait]
impl Connector for KnowsGone {
    async fn connect(&self, peer: &PeerId) -> Result<Connection, ConnectError> {
        self.inner.connect(peer).await
    }

    fn is_gone(&self, peer: &PeerId) -> bool {
        *peer == self.gone
    }
}

/// A member that crashed after its group formed never opens its streams: a reducer that is told it is gone
/// stops waiting for it at once, not after the sender timeout, and its parts keep local values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_known_to_be_gone_is_not_waited_for() {
    let peers = peers(3, Net::Mem, Duration::from_millis(500)).await;
    let layout = small_layout();
    let inputs = small_inputs(9);
    let plan = plan(&peers, &[PeerMode::Node; 3], &[1.0; 3], 9);
    let gone = peers[2].id();
    peers[2].endpoint.shutdown();
    let config = AllReduceConfig {
        sender_timeout: Duration::from_secs(8),
        reducer_timeout: Duration::from_secs(16),
        allreduce_timeout: Duration::from_secs(30),
        ..AllReduceConfig::default()
    };
    let started = std::time::Instant::now();
    let runs: Vec<_> = peers[..2]
        .iter()
        .zip(&inputs)
        .map(|(peer, values)| {
            let connector = Arc::new(KnowsGone {
                inner: peer.endpoint.connector(),
                gone,
            });
            let tensors = FlatTensors::new(layout.clone(), values.clone()).unwrap();
            let run = allreduce::start(
                &peer.service,
                connector,
                plan.clone(),
                peer.id(),
                layout.clone(),
                Some(tensors),
                config.clone(),
            )
            .unwrap();
            tokio::spawn(run.finish())
        })
        .collect();
    let reference = weighted_mean(&inputs, &[1.0; 3], &[true, true, false]);
    for (index, run) in runs.into_iter().enumerate() {
        let outcome = run.await.unwrap().unwrap();
        let values = outcome.tensors.unwrap().into_vec();
        let averaged = values
            .iter()
            .zip(&reference)
            .filter(|(v, r)| (*v - *r).abs() < 1e-5)
            .count();
        assert!(
            averaged * 2 > values.len(),
            "peer {index}: {averaged} of {} averaged",
            values.len()
        );
        assert!(
            values
                .iter()
                .zip(&reference)
                .zip(&inputs[index])
                .all(|((v, r), own)| (v - r).abs() < 1e-5 || (v - own).abs() < 1e-5),
            "peer {index} holds values that are neither averaged nor its own"
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the round took {took:?} (sender timeout 8 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn centered_clip_bounds_a_peer_that_sends_scaled_or_random_values() {
    let peers = peers(4, Net::Mem, Duration::from_secs(5)).await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("w", [3000]), TensorInfo::new("b", [40])]).unwrap());
    let mut rng = Rng(31);
    let signal: Vec<f32> = (0..3040).map(|_| 2.0 * rng.normal()).collect();
    let honest: Vec<Vec<f32>> = (0..3)
        .map(|_| signal.iter().map(|s| s + 0.1 * rng.normal()).collect())
        .collect();
    let honest_mean = weighted_mean(&honest, &[1.0; 3], &[true; 3]);
    let scaled: Vec<f32> = honest[0].iter().map(|v| v * 1e3).collect();
    let random: Vec<f32> = (0..3040).map(|_| 2e3 * rng.normal()).collect();
    let tau = 0.5;
    let clip = Aggregation::CenteredClip { tau, iterations: 5 };
    // The outlier's pull: at most τ per value (root mean square) in a quarter of the weight, balanced by the
    // honest copies' three quarters, so the centre lies within τ/3 per value of their mean.
    let bound = tau / 3.0;
    let mut group = 40;
    for (attack, outlier) in [("scaled", &scaled), ("random", &random)] {
        let mut inputs = honest.clone();
        inputs.push(outlier.clone());
        for codec in [Codec::None, Codec::Float16] {
            for aggregation in [Aggregation::Mean, clip] {
                group += 1;
                let plan = plan(&peers, &[PeerMode::Node; 4], &[1.0; 4], group);
                let config = AllReduceConfig {
                    part_size_bytes: 1024,
                    codecs: CodecPolicy::Fixed(codec),
                    aggregation,
                    ..AllReduceConfig::default()
                };
                let handles = run_round(&peers, &plan, &layout, &inputs, &config, &[None; 4], &[false; 4]).await;
                let mut clipped = 0;
                let mut parts = 0;
                for (index, handle) in handles.into_iter().enumerate() {
                    let outcome = handle.unwrap().await.unwrap().unwrap();
                    assert_eq!(outcome.report.parts_averaged, outcome.report.parts);
                    parts = outcome.report.parts;
                    assert_eq!(outcome.report.non_finite_parts, 0);
                    clipped += outcome.report.clipped_copies;
                    if index == 3 {
                        continue;
                    }
                    // The root-mean-square deviation per value from the honest mean, the quantity τ bounds.
                    let values = outcome.tensors.unwrap().into_vec();
                    let squares: f64 = values
                        .iter()
                        .zip(&honest_mean)
                        .map(|(a, b)| f64::from(a - b).powi(2))
                        .sum();
                    let off = (squares / values.len() as f64).sqrt() as f32;
                    let what = format!("{attack}, {codec:?}, {aggregation:?}: peer {index} is off by {off} per value");
                    if aggregation == Aggregation::Mean {
                        assert!(off > 100.0, "{what}");
                    } else {
                        // float16 adds its rounding of values of a few units (relative 2^-11).
                        assert!(off < 1.2 * bound + 0.01, "{what}");
                    }
                }
                if aggregation == Aggregation::Mean {
                    assert_eq!(clipped, 0);
                } else {
                    // Every part clips the outlier's copy, and only it (the honest spread, 0.1, is below τ).
                    assert_eq!(clipped, parts, "{attack}, {codec:?}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_aggregation_is_refused_before_the_round() {
    let peers = peers(2, Net::Mem, Duration::from_secs(1)).await;
    let layout = small_layout();
    let plan = plan(&peers, &[PeerMode::Node; 2], &[1.0; 2], 60);
    let config = AllReduceConfig {
        aggregation: Aggregation::CenteredClip {
            tau: -1.0,
            iterations: 5,
        },
        ..AllReduceConfig::default()
    };
    let tensors = FlatTensors::new(layout.clone(), vec![0.0; layout.total_values()]).unwrap();
    let error = allreduce::start(
        &peers[0].service,
        peers[0].endpoint.connector(),
        plan,
        peers[0].id(),
        layout,
        Some(tensors),
        config,
    )
    .err()
    .expect("refused");
    assert!(
        matches!(error, allreduce::AllReduceError::InvalidConfig(_)) && error.to_string().contains("tau"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_parts_keep_each_senders_error_small() {
    let peers = peers(4, Net::Mem, Duration::from_secs(5)).await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("x", [20_000])]).unwrap());
    let mut rng = Rng(4);
    let inputs: Vec<Vec<f32>> = (0..4).map(|_| (0..20_000).map(|_| rng.normal()).collect()).collect();
    let expected = weighted_mean(&inputs, &[1.0; 4], &[true; 4]);
    for (codec, bound) in [(Codec::Float16, 1e-5), (Codec::Uniform8Bit, 1e-2)] {
        let plan = plan(
            &peers,
            &[PeerMode::Node, PeerMode::Client, PeerMode::Node, PeerMode::Node],
            &[1.0; 4],
            codec.id(),
        );
        let config = AllReduceConfig {
            part_size_bytes: 8192,
            codecs: CodecPolicy::Fixed(codec),
            ..AllReduceConfig::default()
        };
        let handles = run_round(&peers, &plan, &layout, &inputs, &config, &[None; 4], &[false; 4]).await;
        for handle in handles {
            let values = handle.unwrap().await.unwrap().unwrap().tensors.unwrap().into_vec();
            let mse = values
                .iter()
                .zip(&expected)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / values.len() as f64;
            assert!(mse > 0.0 && mse < bound, "{codec:?}: mse {mse}");
        }
    }
}

// --- Fault tolerance: five peers (peer 1 a client), 64 KiB parts, ~1.1 M values, sub-second timeouts. ---

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    None,
    FailBefore,
    Fault(Fault),
}

async fn fault_round(first: Scenario, second: Scenario, seed: u64) {
    let peers = peers(5, Net::Mem, Duration::from_millis(500)).await;
    let layout = Arc::new(
        TensorLayout::new(vec![
            TensorInfo::new("a", [16, 1024]),
            TensorInfo::new("b", [3, 8192]),
            TensorInfo::new("c", [4, 4, 4]),
            TensorInfo::new("d", [1024, 1024]),
        ])
        .unwrap(),
    );
    let mut rng = Rng(seed);
    let inputs: Vec<Vec<f32>> = (0..5)
        .map(|_| {
            let mut v = Vec::with_capacity(layout.total_values());
            v.extend((0..16 * 1024).map(|_| rng.uniform()));
            v.extend((0..3 * 8192).map(|_| -rng.uniform()));
            v.extend((0..64).map(|_| 2.0 * rng.normal()));
            v.extend((0..1024 * 1024).map(|_| rng.normal()));
            v
        })
        .collect();
    let modes = [
        PeerMode::Node,
        PeerMode::Client,
        PeerMode::Node,
        PeerMode::Node,
        PeerMode::Node,
    ];
    let plan = plan(&peers, &modes, &[1.0; 5], 42);
    let config = AllReduceConfig {
        part_size_bytes: 64 * 1024,
        sender_timeout: Duration::from_millis(500),
        reducer_timeout: Duration::from_millis(1000),
        allreduce_timeout: Duration::from_secs(5),
        ..AllReduceConfig::default()
    };
    let scenarios = [first, second, Scenario::None, Scenario::None, Scenario::None];
    let faults: Vec<Option<Fault>> = scenarios
        .iter()
        .map(|s| match s {
            Scenario::Fault(fault) => Some(*fault),
            _ => None,
        })
        .collect();
    let skip: Vec<bool> = scenarios.iter().map(|s| *s == Scenario::FailBefore).collect();
    let handles = run_round(&peers, &plan, &layout, &inputs, &config, &faults, &skip).await;
    let include: Vec<bool> = scenarios
        .iter()
        .map(|s| !matches!(s, Scenario::FailBefore | Scenario::Fault(Fault::Cancel)))
        .collect();
    let reference = weighted_mean(&inputs, &[1.0; 5], &include);
    let reducing_faults = [first, second]
        .iter()
        .all(|s| matches!(s, Scenario::Fault(Fault::FailReducing)));
    let mut handles = handles.into_iter();
    let faulty: Vec<_> = handles.by_ref().take(2).collect();
    for (offset, handle) in handles.enumerate() {
        let index = offset + 2;
        let outcome = handle
            .unwrap()
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{first:?}/{second:?}: peer {index} failed: {e}"));
        assert!(
            !outcome.report.timed_out,
            "{first:?}/{second:?}: peer {index} timed out"
        );
        let values = outcome.tensors.unwrap().into_vec();
        let matches = |a: f32, b: f32| (a - b).abs() < 1e-5;
        let matching = values.iter().zip(&reference).filter(|(a, b)| matches(**a, **b)).count();
        if first == Scenario::None {
            let diff = max_diff(&values, &reference);
            assert!(diff < 1e-5, "{first:?}/{second:?}: peer {index} is off by {diff}");
        } else if reducing_faults {
            assert!(
                matching * 2 > values.len(),
                "{first:?}/{second:?}: peer {index}: {matching} match"
            );
            let own = &inputs[index];
            assert!(
                values
                    .iter()
                    .zip(&reference)
                    .zip(own)
                    .all(|((v, r), o)| matches(*v, *r) || matches(*v, *o)),
                "{first:?}/{second:?}: peer {index} holds values that are neither averaged nor its own"
            );
        } else {
            assert!(
                matching * 2 > values.len(),
                "{first:?}/{second:?}: peer {index}: {matching} match"
            );
        }
    }
    for handle in faulty.into_iter().flatten() {
        handle.abort();
    }
}

/// How many times each fault scenario runs (`COLONY_FAULT_RUNS`, default 1; the bar is 100).
fn fault_runs() -> u64 {
    std::env::var("COLONY_FAULT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

async fn repeat_fault(first: Scenario, second: Scenario) {
    for run in 0..fault_runs() {
        fault_round(first, second, 1000 + run).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_client_fails_before() {
    repeat_fault(Scenario::None, Scenario::FailBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_two_fail_before() {
    repeat_fault(Scenario::FailBefore, Scenario::FailBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_sending_and_fail_sending() {
    repeat_fault(Scenario::Fault(Fault::SlowSending), Scenario::Fault(Fault::FailSending)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_fail_sending_and_fail_before() {
    repeat_fault(Scenario::Fault(Fault::FailSending), Scenario::FailBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_reducing_and_fail_sending() {
    repeat_fault(
        Scenario::Fault(Fault::SlowReducing),
        Scenario::Fault(Fault::FailSending),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_both_fail_reducing() {
    repeat_fault(
        Scenario::Fault(Fault::FailReducing),
        Scenario::Fault(Fault::FailReducing),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_client_cancels() {
    repeat_fault(Scenario::None, Scenario::Fault(Fault::Cancel)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_leaves_and_the_others_finish() {
    let peers = peers(3, Net::Mem, Duration::from_millis(500)).await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("x", [256, 1024])]).unwrap());
    let mut rng = Rng(31);
    let inputs: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..256 * 1024).map(|_| rng.normal()).collect())
        .collect();
    let plan = plan(&peers, &[PeerMode::Node; 3], &[1.0; 3], 13);
    let config = AllReduceConfig {
        part_size_bytes: 16 * 1024,
        sender_timeout: Duration::from_millis(500),
        reducer_timeout: Duration::from_millis(1000),
        allreduce_timeout: Duration::from_secs(10),
        ..AllReduceConfig::default()
    };
    // The cancelled peer starts and cancels before the others start: started together, a loaded machine
    // could let the whole round finish before the cancel lands, and then there is nothing to notice.
    let cancelled = peers[2].start(&plan, &layout, Some(&inputs[2]), config.clone());
    cancelled.cancel();
    assert!(matches!(
        cancelled.finish().await,
        Err(allreduce::AllReduceError::Cancelled)
    ));
    let runs: Vec<_> = peers[..2]
        .iter()
        .zip(&inputs)
        .map(|(peer, input)| peer.start(&plan, &layout, Some(input), config.clone()))
        .collect();
    let started = std::time::Instant::now();
    for (index, run) in runs.into_iter().enumerate() {
        let outcome = run.finish().await.unwrap();
        assert!(!outcome.report.timed_out, "peer {index} timed out");
        let report = &outcome.report;
        // Its parts stay local; as a sender it is left out (dropped, or never waited for once it left).
        assert!(
            report.failed_reducers.contains(&peers[2].id()) && report.parts_averaged < report.parts,
            "peer {index} did not notice the cancelled peer: {report:?}"
        );
        // Values are finite and each is either averaged (with or without the cancelled peer) or local.
        assert!(outcome.tensors.unwrap().as_slice().iter().all(|v| v.is_finite()));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the others took {:?}",
        started.elapsed()
    );
}
