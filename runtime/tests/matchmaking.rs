//! Matchmaking end to end: membership swarms on the in-process transport (1 ms links), a matchmaker per
//! peer, and the scenarios of Hivemind's averaging tests: one group of four, too few peers, cancelled
//! peers, different schemas, client mode, Moshpit rounds; plus the wire protocol's answers, the membership
//! connector, and shutdown.
//!
//! Every wait is on a condition with a deadline; the timings that matter are asserted against what the
//! feature promises (a full group forms long before the leader's declared time).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony::actors::matchmaker::{self, GroupRequest, Matchmaker, MatchmakingService};
use colony::membership::{Membership, MembershipConfig, Role, SwimConfig};
use colony::records::{Schemas, Subkey, View};
use colony_averaging::matchmaking::keys::rotate_bits;
use colony_averaging::matchmaking::messages::{JoinRequestHeader, LeaderMessageHeader, protocol};
use colony_averaging::matchmaking::{
    Declaration, GroupInfo, JoinRequest, MatchmakingConfig, MatchmakingError, MessageCode, MessageFromLeader,
};
use colony_averaging::tensor::SchemaHash;
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::mem::MemHub;
use colony_transports::rpc::{self, StreamConfig};
use colony_transports::{Address, Keypair, PeerId};

const RUN: &str = "matchmaking-test";
const HASH: SchemaHash = SchemaHash([7; 32]);

/// The tests of this file measure timings against deadlines, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn swim() -> SwimConfig {
    SwimConfig {
        probe_period: Duration::from_millis(500),
        probe_rtt: Duration::from_millis(200),
        suspect_to_down_after: Duration::from_millis(1500),
        gossip_interval: Duration::from_millis(100),
        down_announce_interval: Duration::from_millis(500),
        ..SwimConfig::default()
    }
}

fn schemas() -> Schemas {
    let mut schemas = Schemas::default();
    matchmaker::register_schema(&mut schemas);
    schemas
}

struct Peer {
    membership: Membership,
    matchmaker: Arc<Matchmaker>,
}

impl Peer {
    fn id(&self) -> PeerId {
        self.membership.local_peer()
    }
}

struct Swarm {
    hub: MemHub,
    peers: Vec<Peer>,
}

impl Swarm {
    fn new() -> Self {
        let emulator = LinkEmulator::with_seed(11);
        emulator.set_default_link(LinkConfig {
            latency: Duration::from_millis(1),
            bandwidth_bytes_per_sec: None,
            datagram_loss: 0.0,
        });
        Self {
            hub: MemHub::with_emulator(emulator),
            peers: Vec::new(),
        }
    }

    /// Starts a peer listening at `mem://name` (`None`: a client-mode member) joining through the first
    /// peer, with a matchmaker of `config`.
    async fn start(&mut self, name: Option<&str>, config: &MatchmakingConfig) -> &Peer {
        let listen = name.map(|n| format!("mem://{n}").parse::<Address>().unwrap());
        let mut membership_config = MembershipConfig::new(RUN, listen);
        membership_config.initial_peers = self
            .peers
            .first()
            .and_then(|p| p.membership.address())
            .into_iter()
            .collect();
        membership_config.swim = swim();
        membership_config.sync_interval = Duration::from_millis(500);
        membership_config.bootstrap_timeout = Duration::from_secs(20);
        let keypair = Arc::new(Keypair::generate());
        let transport = self.hub.transport(&keypair);
        let service = MatchmakingService::new();
        let membership = Membership::start_with(membership_config, keypair, transport, schemas(), |router| {
            service.register(router)
        })
        .await
        .expect("membership starts");
        let matchmaker = Matchmaker::start(&membership, &service, config.clone()).expect("matchmaker starts");
        self.peers.push(Peer {
            membership,
            matchmaker: Arc::new(matchmaker),
        });
        self.peers.last().unwrap()
    }

    /// `n` listening peers named `{prefix}-{i}`, all seeing each other.
    async fn start_many(prefix: &str, n: usize, config: &MatchmakingConfig) -> Self {
        let mut swarm = Self::new();
        for i in 0..n {
            swarm.start(Some(&format!("{prefix}-{i}")), config).await;
        }
        swarm.converge().await;
        swarm
    }

    async fn converge(&self) {
        let n = self.peers.len();
        wait_until("every peer sees every other", Duration::from_secs(20), || {
            self.peers.iter().all(|p| p.membership.members().len() == n - 1)
        })
        .await;
    }

    fn shutdown(&self) {
        for peer in &self.peers {
            peer.matchmaker.shutdown();
            peer.membership.shutdown();
        }
    }
}

async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// Like [`wait_until`], for conditions that ask an actor.
async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

fn config() -> MatchmakingConfig {
    MatchmakingConfig::new("grads")
}

/// Every peer looks for a group at once; returns each result and when it came, after the start.
async fn look_all(
    peers: &[&Peer],
    request: impl Fn(usize, &Peer) -> GroupRequest,
) -> Vec<(Result<GroupInfo, MatchmakingError>, Duration)> {
    let start = Instant::now();
    let tasks: Vec<_> = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            let matchmaker = peer.matchmaker.clone();
            let request = request(i, peer);
            tokio::spawn(async move {
                let result = matchmaker.look_for_group(request).await;
                (result, start.elapsed())
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("the search task does not panic"));
    }
    results
}

fn declarations(membership: &Membership, group_key: &str) -> Vec<(PeerId, Declaration)> {
    match membership.get(&matchmaker::declaration_key(group_key)) {
        Some(View::Dictionary { entries, .. }) => entries
            .into_iter()
            .filter_map(|(subkey, (value, _))| match subkey {
                Subkey::Peer(peer) => Some((peer, Declaration::decode(&value).unwrap())),
                Subkey::Name(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_with_target_four_form_one_group_long_before_their_declared_time() {
    let _serial = SERIAL.lock().await;
    let config = MatchmakingConfig {
        target_group_size: Some(4),
        ..config()
    };
    let swarm = Swarm::start_many("four", 4, &config).await;
    let peers: Vec<&Peer> = swarm.peers.iter().collect();
    let results = look_all(&peers, |i, peer| GroupRequest {
        gather: Bytes::from(format!("peer {i}")),
        scheduled_start: Some(peer.matchmaker.now()),
        ..GroupRequest::new(HASH, Duration::from_secs(20))
    })
    .await;
    let ids: Vec<PeerId> = peers.iter().map(|p| p.id()).collect();
    let first = results[0].0.as_ref().expect("peer 0 found a group").clone();
    let mut slowest = Duration::ZERO;
    for (i, (result, elapsed)) in results.iter().enumerate() {
        let group = result.as_ref().unwrap_or_else(|e| panic!("peer {i}: {e}"));
        assert_eq!(group.group_id, first.group_id, "one group id on every peer");
        assert_eq!(group.members, first.members, "one member order on every peer");
        assert_eq!(group.group_key, "grads.0b");
        slowest = slowest.max(*elapsed);
    }
    let members: BTreeSet<PeerId> = first.members.iter().copied().collect();
    assert_eq!(members, ids.iter().copied().collect(), "all four peers");
    for (member, gathered) in first.members.iter().zip(&first.gathered) {
        let index = ids.iter().position(|id| id == member).unwrap();
        assert_eq!(
            &gathered[..],
            format!("peer {index}").as_bytes(),
            "gathered bytes follow the order"
        );
    }
    // The declared time is 5 s away (min_matchmaking_time): a full group does not wait for it.
    println!("4 peers, target 4: every peer held the group after {slowest:?}");
    assert!(
        slowest < Duration::from_secs(3),
        "the group formed as it filled up, not at the declared time"
    );
    // Each peer withdrew its declaration.
    wait_until("declarations withdrawn", Duration::from_secs(5), || {
        peers.iter().all(|p| {
            let seen = declarations(&p.membership, "grads.0b");
            seen.len() == 4 && seen.iter().all(|(_, d)| !d.looking)
        })
    })
    .await;
    for peer in &peers {
        assert_eq!(peer.matchmaker.group_bits(), "", "empty bits do not rotate");
        assert!(peer.matchmaker.status().await.is_none(), "no search left running");
    }
    swarm.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_peers_each_fail_with_no_group_within_their_timeout() {
    let _serial = SERIAL.lock().await;
    // Hivemind's test_too_few_peers: four peers, each alone in its 3-bit bucket.
    let config = MatchmakingConfig {
        target_group_size: Some(2),
        min_matchmaking_time: Duration::from_secs(1),
        request_timeout: Duration::from_millis(500),
        initial_group_bits: "000".into(),
        ..config()
    };
    let swarm = Swarm::start_many("few", 4, &config).await;
    for (i, peer) in swarm.peers.iter().enumerate() {
        peer.matchmaker.set_group_bits(&format!("{i:03b}")).unwrap();
    }
    let peers: Vec<&Peer> = swarm.peers.iter().collect();
    let timeout = Duration::from_secs(2);
    let results = look_all(&peers, |_, _| GroupRequest::new(HASH, timeout)).await;
    for (i, (result, elapsed)) in results.iter().enumerate() {
        match result {
            Err(MatchmakingError::NoGroup { key, seen, .. }) => {
                assert_eq!(key, &format!("grads.0b{i:03b}"), "the error names the key");
                assert_eq!(*seen, 0, "nobody else looked under it");
            }
            other => panic!("peer {i}: expected NoGroup, got {other:?}"),
        }
        let message = result.as_ref().unwrap_err().to_string();
        assert!(message.contains(&format!("grads.0b{i:03b}")), "{message}");
        assert!(
            *elapsed >= timeout - Duration::from_millis(50),
            "peer {i} gave up early: {elapsed:?}"
        );
        assert!(
            *elapsed < timeout + Duration::from_millis(750),
            "peer {i} failed late: {elapsed:?}"
        );
    }
    println!("too few peers: {}", results[0].0.as_ref().unwrap_err());
    swarm.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_peers_leave_and_the_other_two_group() {
    let _serial = SERIAL.lock().await;
    // Hivemind's test_averaging_cancel: no target, so a leader gathers followers until its declared time.
    let config = MatchmakingConfig {
        min_matchmaking_time: Duration::from_secs(2),
        request_timeout: Duration::from_millis(500),
        ..config()
    };
    let swarm = Swarm::start_many("cancel", 4, &config).await;
    let [p0, p1, p2, p3] = [0, 1, 2, 3].map(|i| &swarm.peers[i]);
    let look = |peer: &Peer| {
        let matchmaker = peer.matchmaker.clone();
        tokio::spawn(async move {
            matchmaker
                .look_for_group(GroupRequest::new(HASH, Duration::from_secs(10)))
                .await
        })
    };
    // Peers 0 and 1 look first, so one of them leads the others.
    let (t0, t1) = (look(p0), look(p1));
    let started = Instant::now();
    let leader = loop {
        let mut found = None;
        for peer in [p0, p1] {
            if peer.matchmaker.status().await.is_some_and(|s| s.followers.len() == 1) {
                found = Some(peer.id());
            }
        }
        if let Some(leader) = found {
            break leader;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "peer 0 or 1 leads the other: not within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let leading = if leader == p0.id() { p0 } else { p1 };
    let (t2, t3) = (look(p2), look(p3));
    wait_for(
        "peers 2 and 3 follow the same leader",
        Duration::from_secs(5),
        || async {
            leading
                .matchmaker
                .status()
                .await
                .is_some_and(|s| s.followers.len() == 3)
        },
    )
    .await;
    // Peer 0 cancels explicitly; peer 1's caller drops its future.
    p0.matchmaker.cancel();
    t1.abort();
    assert_eq!(t0.await.unwrap(), Err(MatchmakingError::Cancelled));
    assert!(t1.await.unwrap_err().is_cancelled());
    wait_for(
        "peer 1's search ended when its future was dropped",
        Duration::from_secs(5),
        || async { p1.matchmaker.status().await.is_none() },
    )
    .await;
    let (g2, g3) = (
        t2.await.unwrap().expect("peer 2 groups"),
        t3.await.unwrap().expect("peer 3 groups"),
    );
    assert_eq!(g2.group_id, g3.group_id);
    assert_eq!(g2.members, g3.members);
    let members: HashSet<PeerId> = g2.members.iter().copied().collect();
    assert_eq!(
        members,
        HashSet::from([p2.id(), p3.id()]),
        "only the peers that did not cancel"
    );
    swarm.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_different_schema_hashes_never_group() {
    let _serial = SERIAL.lock().await;
    let config = MatchmakingConfig {
        target_group_size: Some(4),
        min_matchmaking_time: Duration::from_millis(1500),
        request_timeout: Duration::from_millis(500),
        ..config()
    };
    let swarm = Swarm::start_many("schema", 4, &config).await;
    let peers: Vec<&Peer> = swarm.peers.iter().collect();
    let hash = |i: usize| SchemaHash([(i % 2) as u8; 32]);
    let results = look_all(&peers, |i, _| GroupRequest::new(hash(i), Duration::from_secs(8))).await;
    for (i, (result, _)) in results.iter().enumerate() {
        let group = result.as_ref().unwrap_or_else(|e| panic!("peer {i}: {e}"));
        assert_eq!(group.len(), 2, "peer {i}: two peers per schema");
        for member in &group.members {
            let j = peers.iter().position(|p| p.id() == *member).unwrap();
            assert_eq!(hash(j), hash(i), "peer {i} grouped with peer {j} of another schema");
        }
    }
    swarm.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_peers_never_declare_and_join_a_leader() {
    let _serial = SERIAL.lock().await;
    let config = MatchmakingConfig {
        target_group_size: Some(4),
        ..config()
    };
    let mut swarm = Swarm::new();
    swarm.start(Some("server"), &config).await;
    swarm.start(None, &config).await;
    swarm.start(None, &config).await;
    swarm.start(Some("listening-client"), &config).await;
    swarm.converge().await;
    assert_eq!(swarm.peers[1].membership.role(), Role::Client);
    let peers: Vec<&Peer> = swarm.peers.iter().collect();
    // Peers 1 and 2 are client-mode members (their requests do not say so: the role decides); peer 3
    // listens but asks for client mode.
    let results = look_all(&peers, |i, _| GroupRequest {
        client_mode: i == 3,
        ..GroupRequest::new(HASH, Duration::from_secs(20))
    })
    .await;
    let group = results[0].0.as_ref().expect("the server leads a group").clone();
    assert_eq!(group.len(), 4);
    for (i, (result, _)) in results.iter().enumerate() {
        assert_eq!(result.as_ref().map(|g| g.group_id), Ok(group.group_id), "peer {i}");
    }
    let declared: Vec<PeerId> = declarations(&swarm.peers[0].membership, "grads.0b")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(declared, vec![swarm.peers[0].id()], "only the server declared");
    swarm.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moshpit_rounds_pair_eight_peers_rotate_their_keys_and_average_exactly_in_three_rounds() {
    let _serial = SERIAL.lock().await;
    // Hivemind's test_allreduce_grid: 8 peers, groups of 2, 2-bit keys bin(i / 2).
    let config = MatchmakingConfig {
        target_group_size: Some(2),
        initial_group_bits: "00".into(),
        ..config()
    };
    let swarm = Swarm::start_many("grid", 8, &config).await;
    let peers: Vec<&Peer> = swarm.peers.iter().collect();
    for (i, peer) in peers.iter().enumerate() {
        peer.matchmaker.set_group_bits(&format!("{:02b}", i / 2)).unwrap();
    }
    let mut values: Vec<f64> = vec![3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.0, 6.5];
    let mean = values.iter().sum::<f64>() / 8.0;
    let mut all_ids = HashSet::new();
    for round in 0..3 {
        let bits_before: Vec<String> = peers.iter().map(|p| p.matchmaker.group_bits()).collect();
        let results = look_all(&peers, |_, _| GroupRequest::new(HASH, Duration::from_secs(20))).await;
        let mut round_ids = HashSet::new();
        let mut next = values.clone();
        for (i, (result, _)) in results.iter().enumerate() {
            let group = result
                .as_ref()
                .unwrap_or_else(|e| panic!("round {round}, peer {i}: {e}"));
            assert_eq!(group.len(), 2, "round {round}: groups of exactly two");
            assert_eq!(group.group_key, format!("grads.0b{}", bits_before[i]));
            let partner = group.members.iter().find(|m| **m != peers[i].id()).unwrap();
            let j = peers.iter().position(|p| p.id() == *partner).unwrap();
            assert_eq!(bits_before[j], bits_before[i], "round {round}: partners share a key");
            next[i] = (values[i] + values[j]) / 2.0;
            // The key rotates as the core's rule says, from the group's id and this peer's place.
            let index = group.index_of(&peers[i].id()).unwrap();
            let rotated = rotate_bits(&bits_before[i], &group.group_id, index, 2, Some(2));
            assert_eq!(peers[i].matchmaker.group_bits(), rotated);
            round_ids.insert(group.group_id);
        }
        assert_eq!(round_ids.len(), 4, "round {round}: four distinct groups");
        for id in round_ids {
            assert!(all_ids.insert(id), "group ids are never reused");
        }
        let keys_after: HashSet<String> = peers.iter().map(|p| p.matchmaker.group_bits()).collect();
        assert_eq!(
            keys_after.len(),
            4,
            "round {round}: the rotated keys again hold two peers each"
        );
        values = next;
    }
    for (i, value) in values.iter().enumerate() {
        assert!(
            (value - mean).abs() < 1e-12,
            "peer {i}: {value} after three rounds, mean {mean}"
        );
    }
    swarm.shutdown();
}

/// Sends `request` to `leader` over `from`'s connector and returns the leader's first answer.
async fn raw_join(from: &Membership, leader: PeerId, request: &JoinRequest) -> MessageFromLeader {
    let conn = from
        .connector()
        .connect(&leader)
        .await
        .expect("the leader is reachable");
    let (mut send, mut recv) = rpc::open::<LeaderMessageHeader>(&conn, &protocol(), &StreamConfig::default())
        .await
        .unwrap();
    let (header, payload): (JoinRequestHeader, Bytes) = request.to_wire();
    send.send(&header, payload).await.unwrap();
    let (header, payload) = recv.recv_required("the answer").await.unwrap();
    MessageFromLeader::from_wire(header, payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_protocol_answers_join_requests_and_shutdown_stops_the_matchmaker() {
    let _serial = SERIAL.lock().await;
    let config = config();
    let swarm = Swarm::start_many("wire", 2, &config).await;
    let (leader, asker) = (&swarm.peers[0], &swarm.peers[1]);
    let request = JoinRequest {
        schema_hash: HASH.0.to_vec(),
        expiration: leader.matchmaker.now() + 3600.0,
        gather: Bytes::new(),
        client_mode: false,
        group_key: "grads.0b".into(),
    };
    assert_eq!(
        raw_join(&asker.membership, leader.id(), &request).await.code,
        MessageCode::NotLookingForGroup,
        "not looking yet"
    );
    let looking = {
        let matchmaker = leader.matchmaker.clone();
        tokio::spawn(async move {
            matchmaker
                .look_for_group(GroupRequest::new(HASH, Duration::from_secs(30)))
                .await
        })
    };
    wait_for("the leader looks", Duration::from_secs(5), || async {
        leader.matchmaker.status().await.is_some()
    })
    .await;
    let other_schema = JoinRequest {
        schema_hash: vec![1; 32],
        ..request.clone()
    };
    assert_eq!(
        raw_join(&asker.membership, leader.id(), &other_schema).await.code,
        MessageCode::BadSchemaHash
    );
    let other_key = JoinRequest {
        group_key: "grads.0b1".into(),
        ..request.clone()
    };
    assert_eq!(
        raw_join(&asker.membership, leader.id(), &other_key).await.code,
        MessageCode::BadGroupKey
    );
    assert_eq!(
        raw_join(
            &asker.membership,
            leader.id(),
            &JoinRequest {
                schema_hash: vec![],
                ..request.clone()
            }
        )
        .await
        .code,
        MessageCode::ProtocolViolation
    );
    // A second search on the same peer is refused while one runs.
    assert_eq!(
        leader
            .matchmaker
            .look_for_group(GroupRequest::new(HASH, Duration::from_secs(1)))
            .await,
        Err(MatchmakingError::AlreadyLooking)
    );

    leader.matchmaker.shutdown();
    assert_eq!(looking.await.unwrap(), Err(MatchmakingError::Shutdown));
    wait_until("the actor stopped", Duration::from_secs(5), || {
        !leader.matchmaker.is_running()
    })
    .await;
    assert_eq!(
        raw_join(&asker.membership, leader.id(), &request).await.code,
        MessageCode::NotLookingForGroup,
        "a stopped matchmaker takes nobody"
    );
    assert_eq!(
        leader
            .matchmaker
            .look_for_group(GroupRequest::new(HASH, Duration::from_secs(1)))
            .await,
        Err(MatchmakingError::Shutdown)
    );
    wait_until("its declaration is withdrawn", Duration::from_secs(5), || {
        declarations(&asker.membership, "grads.0b")
            .iter()
            .all(|(_, d)| !d.looking)
    })
    .await;
    swarm.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_connector_reaches_members_by_id() {
    let _serial = SERIAL.lock().await;
    let config = config();
    let mut swarm = Swarm::new();
    swarm.start(Some("conn-server"), &config).await;
    swarm.start(Some("conn-other"), &config).await;
    swarm.start(None, &config).await;
    swarm.converge().await;
    let (server, other, client) = (&swarm.peers[0], &swarm.peers[1], &swarm.peers[2]);
    let connector = server.membership.connector();
    assert_eq!(connector.connect(&other.id()).await.unwrap().remote_peer(), other.id());
    // A client-mode member is reached over the connection it opened.
    assert_eq!(
        connector.connect(&client.id()).await.unwrap().remote_peer(),
        client.id()
    );
    let stranger = Keypair::generate().peer_id();
    let error = connector.connect(&stranger).await.unwrap_err();
    assert!(error.reason.contains("not a member"), "{error}");
    // From the client, a listening member it never talked to is dialed.
    let conn = client.membership.connector().connect(&other.id()).await.unwrap();
    assert_eq!(conn.remote_peer(), other.id());
    swarm.shutdown();
    assert!(
        connector.connect(&other.id()).await.is_err(),
        "nothing is reached after shutdown"
    );
}
