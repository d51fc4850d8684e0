//! The averager end to end on membership swarms (in-process transport, 1 ms links): matchmaking, load
//! balancing and the all-reduce together. Eight peers in groups of two under 2-bit Moshpit keys reach the
//! exact global mean in three rounds; clients and auxiliaries average with trainers; too few peers fail
//! with a clear error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use colony::actors::matchmaker;
use colony::averager::{Averager, AveragerConfig, AveragerError, AveragerServices};
use colony::membership::{Membership, MembershipConfig, Role, SwimConfig};
use colony::records::Schemas;
use colony_averaging::allreduce::{PeerMode, ServiceConfig};
use colony_averaging::matchmaking::MatchmakingError;
use colony_averaging::tensor::{FlatTensors, TensorInfo, TensorLayout};
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::mem::MemHub;
use colony_transports::{Address, Keypair};

/// Each test runs a swarm against deadlines: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Peer {
    membership: Membership,
    averager: Arc<Averager>,
}

/// A swarm of one peer per `(role, config)`, all seeing each other.
async fn swarm(peers_config: &[(Role, AveragerConfig)], layout: &Arc<TensorLayout>) -> Vec<Peer> {
    let emulator = LinkEmulator::with_seed(5);
    emulator.set_default_link(LinkConfig {
        latency: Duration::from_millis(1),
        bandwidth_bytes_per_sec: None,
        datagram_loss: 0.0,
    });
    let hub = MemHub::with_emulator(emulator);
    let mut peers: Vec<Peer> = Vec::new();
    let mut bootstrap: Option<Address> = None;
    for (index, (role, config)) in peers_config.iter().enumerate() {
        let listen = (*role != Role::Client).then(|| format!("mem://avg-{index}").parse::<Address>().unwrap());
        let mut membership_config = MembershipConfig::new("averaging-test", listen);
        membership_config.role = if *role == Role::Client { Role::Trainer } else { *role };
        membership_config.initial_peers = bootstrap.iter().cloned().collect();
        membership_config.swim = SwimConfig {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            suspect_to_down_after: Duration::from_millis(1500),
            gossip_interval: Duration::from_millis(100),
            ..SwimConfig::default()
        };
        membership_config.sync_interval = Duration::from_millis(500);
        let keypair = Arc::new(Keypair::generate());
        let transport = hub.transport(&keypair);
        let services = AveragerServices::new(ServiceConfig {
            registration_timeout: Duration::from_secs(2),
            ..ServiceConfig::default()
        });
        let mut schemas = Schemas::default();
        matchmaker::register_schema(&mut schemas);
        let membership = Membership::start_with(membership_config, keypair, transport, schemas, |router| {
            services.register(router)
        })
        .await
        .expect("membership starts");
        if bootstrap.is_none() {
            bootstrap = membership.address();
        }
        let averager =
            Averager::start(&membership, &services, layout.clone(), config.clone()).expect("averager starts");
        peers.push(Peer {
            membership,
            averager: Arc::new(averager),
        });
    }
    let n = peers.len();
    let start = Instant::now();
    while !peers.iter().all(|p| p.membership.members().len() == n - 1) {
        assert!(start.elapsed() < Duration::from_secs(20), "the swarm did not converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peers
}

fn shutdown(peers: &[Peer]) {
    for peer in peers {
        peer.averager.shutdown();
        peer.membership.shutdown();
    }
}

fn mean(values: &[Vec<f32>], include: &[bool]) -> Vec<f32> {
    let n = include.iter().filter(|i| **i).count() as f64;
    (0..values[0].len())
        .map(|k| {
            (values
                .iter()
                .zip(include)
                .filter(|(_, i)| **i)
                .map(|(v, _)| v[k] as f64)
                .sum::<f64>()
                / n) as f32
        })
        .collect()
}

fn values(seed: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|k| (((seed * 7919 + k * 104_729) % 2003) as f32 / 1000.0) - 1.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_peers_in_pairs_with_two_bit_keys_reach_the_global_mean_in_three_rounds() {
    let _serial = SERIAL.lock().await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("x", [3])]).unwrap());
    let mut config = AveragerConfig::new("grid");
    config.matchmaking.target_group_size = Some(2);
    config.matchmaking.min_matchmaking_time = Duration::from_secs(3);
    config.matchmaking.request_timeout = Duration::from_secs(1);
    let configs: Vec<(Role, AveragerConfig)> = (0..8)
        .map(|index| {
            let mut config = config.clone();
            config.matchmaking.initial_group_bits = format!("{:02b}", index / 2);
            (Role::Trainer, config)
        })
        .collect();
    let peers = swarm(&configs, &layout).await;
    let mut current: Vec<Vec<f32>> = (0..8).map(|i| values(i, 3)).collect();
    let global = mean(&current, &[true; 8]);
    for round in 0..3 {
        let mut steps = Vec::new();
        for (index, peer) in peers.iter().enumerate() {
            let averager = peer.averager.clone();
            let tensors = FlatTensors::new(layout.clone(), current[index].clone()).unwrap();
            steps.push(tokio::spawn(async move {
                averager.step(Some(tensors), 1.0, Duration::from_secs(20)).await
            }));
        }
        for (index, step) in steps.into_iter().enumerate() {
            let averaged = step
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}, peer {index}: {e}"));
            assert_eq!(averaged.group.members.len(), 2, "round {round}: groups of exactly two");
            current[index] = averaged.outcome.tensors.unwrap().into_vec();
        }
        let mean_now = mean(&current, &[true; 8]);
        for (a, b) in mean_now.iter().zip(&global) {
            assert!((a - b).abs() < 1e-6, "round {round}: the mean moved");
        }
    }
    for (index, value) in current.iter().enumerate() {
        for (a, b) in value.iter().zip(&global) {
            assert!(
                (a - b).abs() < 1e-6,
                "peer {index} holds {value:?}, the global mean is {global:?}"
            );
        }
    }
    shutdown(&peers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainers_a_client_and_an_auxiliary_average_together() {
    let _serial = SERIAL.lock().await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("w", [40, 50]), TensorInfo::new("b", [50])]).unwrap());
    let mut config = AveragerConfig::new("mixed");
    config.matchmaking.target_group_size = Some(4);
    config.matchmaking.min_matchmaking_time = Duration::from_secs(3);
    config.matchmaking.request_timeout = Duration::from_secs(1);
    config.allreduce.part_size_bytes = 1024;
    let roles = [Role::Trainer, Role::Trainer, Role::Client, Role::Auxiliary];
    let configs: Vec<_> = roles.iter().map(|r| (*r, config.clone())).collect();
    let peers = swarm(&configs, &layout).await;
    assert_eq!(peers[2].averager.mode(), PeerMode::Client);
    assert_eq!(peers[3].averager.mode(), PeerMode::Auxiliary);
    let inputs: Vec<Vec<f32>> = (0..4).map(|i| values(i, layout.total_values())).collect();
    let mut steps = Vec::new();
    for (index, peer) in peers.iter().enumerate() {
        let averager = peer.averager.clone();
        let tensors = (index != 3).then(|| FlatTensors::new(layout.clone(), inputs[index].clone()).unwrap());
        steps.push(tokio::spawn(async move {
            averager.step(tensors, 1.0, Duration::from_secs(20)).await
        }));
    }
    let expected = mean(&inputs, &[true, true, true, false]);
    for (index, step) in steps.into_iter().enumerate() {
        let averaged = step.await.unwrap().unwrap_or_else(|e| panic!("peer {index}: {e}"));
        assert_eq!(averaged.group.members.len(), 4);
        match averaged.outcome.tensors {
            Some(tensors) => {
                let diff = tensors
                    .as_slice()
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-6, "peer {index} is off by {diff}");
            }
            None => assert_eq!(index, 3, "only the auxiliary gets no tensors"),
        }
    }
    shutdown(&peers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lonely_peer_fails_with_no_group() {
    let _serial = SERIAL.lock().await;
    let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("x", [8])]).unwrap());
    let mut config = AveragerConfig::new("alone");
    config.matchmaking.min_matchmaking_time = Duration::from_millis(500);
    config.matchmaking.request_timeout = Duration::from_millis(300);
    let peers = swarm(&[(Role::Trainer, config)], &layout).await;
    let started = Instant::now();
    let tensors = FlatTensors::new(layout.clone(), vec![1.0; 8]).unwrap();
    let error = peers[0]
        .averager
        .step(Some(tensors), 1.0, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(error, AveragerError::Matchmaking(MatchmakingError::NoGroup { .. })),
        "unexpected error {error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the step failed only after {:?}",
        started.elapsed()
    );
    shutdown(&peers);
}
