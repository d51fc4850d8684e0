//! Membership on the in-process transport with link emulation: joining through one bootstrap peer, failure
//! detection, partitions and healing, rejoining, client mode, refusals at join, and forged records.
//!
//! Every wait is on a condition, with a deadline; timings are printed so that the figures can be reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony::membership::{Membership, MembershipConfig, MembershipError, Role, SwimConfig};
use colony::records::sync::{SyncStep, steps};
use colony::records::wire::{WireBatch, WireRecord};
use colony::records::{Record, Schemas, Subkey, View};
use colony_transports::access::AccessControl;
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::mem::MemHub;
use colony_transports::rpc::StreamConfig;
use colony_transports::{Address, Keypair, PeerId, Transport};

const RUN: &str = "membership-test";

/// The tests of this file measure timings against deadlines, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A metrics recorder that sums counters by name and labels, installed for this test process, to check
/// what the runtime exports.
mod recorded {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    #[derive(Default)]
    struct Sums(Mutex<HashMap<String, Arc<AtomicU64>>>);

    struct Handle(Arc<AtomicU64>);

    impl metrics::CounterFn for Handle {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::Relaxed);
        }
        fn absolute(&self, value: u64) {
            self.0.store(value, Ordering::Relaxed);
        }
    }

    fn name(key: &Key) -> String {
        let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        labels.sort();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }

    impl Recorder for &'static Sums {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let sum = self.0.lock().unwrap().entry(name(key)).or_default().clone();
            Counter::from_arc(Arc::new(Handle(sum)))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    static SUMS: OnceLock<&'static Sums> = OnceLock::new();

    /// The sum of the counter `name{labels}` (labels as `k=v`, sorted, comma-separated).
    pub fn counter(key: &str) -> u64 {
        let sums = SUMS.get_or_init(|| {
            let sums: &'static Sums = Box::leak(Box::default());
            metrics::set_global_recorder(sums).expect("the only recorder of this test process");
            sums
        });
        sums.0
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |sum| sum.load(Ordering::Relaxed))
    }
}

fn schemas() -> Schemas {
    let mut schemas = Schemas::default();
    schemas.register_with("progress", |value| {
        if value.len() == 8 {
            Ok(())
        } else {
            Err(format!("8 bytes expected, got {}", value.len()))
        }
    });
    schemas
}

/// Fast timings so that failure detection is measured in seconds, as a LAN deployment would tune it.
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

struct Swarm {
    hub: MemHub,
    emulator: LinkEmulator,
    peers: Vec<(Arc<Keypair>, Membership)>,
}

impl Swarm {
    fn new() -> Self {
        let emulator = LinkEmulator::with_seed(7);
        emulator.set_default_link(LinkConfig {
            latency: Duration::from_millis(2),
            bandwidth_bytes_per_sec: None,
            datagram_loss: 0.01,
        });
        Self {
            hub: MemHub::with_emulator(emulator.clone()),
            emulator,
            peers: Vec::new(),
        }
    }

    fn config(&self, name: &str, initial: Option<Address>) -> MembershipConfig {
        let mut config = MembershipConfig::new(RUN, Some(format!("mem://{name}").parse().unwrap()));
        config.initial_peers = initial.into_iter().collect();
        config.swim = swim();
        config.sync_interval = Duration::from_millis(500);
        config.bootstrap_timeout = Duration::from_secs(20);
        config
    }

    async fn start(&mut self, config: MembershipConfig) -> Membership {
        let keypair = Arc::new(Keypair::generate());
        let transport = self.hub.transport(&keypair);
        let membership = Membership::start(config, keypair.clone(), transport, schemas())
            .await
            .expect("membership starts");
        self.peers.push((keypair, membership.clone()));
        membership
    }

    /// Starts a peer at `mem://<names[0]>` and the others joining through it; returns its address.
    async fn start_joined(&mut self, names: &[String]) -> Address {
        let first = self.config(&names[0], None);
        self.start(first).await;
        let bootstrap = self.peers[0].1.address().unwrap();
        for name in &names[1..] {
            let config = self.config(name, Some(bootstrap.clone()));
            self.start(config).await;
        }
        bootstrap
    }
}

/// `prefix-0` … `prefix-<n-1>`.
fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn publish_progress(membership: &Membership, value: u64) {
    let expiration = membership.replica().now() + 120.0;
    membership
        .publish(
            "progress",
            Some(Subkey::Peer(membership.local_peer())),
            Some(Bytes::from(value.to_le_bytes().to_vec())),
            expiration,
        )
        .expect("own record accepted");
}

fn progress_entries(membership: &Membership) -> usize {
    match membership.get("progress") {
        Some(View::Dictionary { entries, .. }) => entries.len(),
        _ => 0,
    }
}

async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn member_ids(membership: &Membership) -> Vec<PeerId> {
    membership.members().into_iter().map(|m| m.peer).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_peers_join_detect_failures_and_heal_a_partition() {
    let _serial = SERIAL.lock().await;
    let n = 64;
    let mut swarm = Swarm::new();
    let started = Instant::now();
    swarm.start_joined(&names("peer", n)).await;
    for (i, (_, peer)) in swarm.peers.iter().enumerate() {
        publish_progress(peer, i as u64);
    }
    let joined = started.elapsed();
    let all = |swarm: &Swarm, members: usize, records: usize| {
        swarm
            .peers
            .iter()
            .all(|(_, p)| p.members().len() == members && progress_entries(p) == records)
    };
    let converged = wait_until("64 peers see every member and record", Duration::from_secs(5), || {
        all(&swarm, n - 1, n)
    })
    .await;
    println!(
        "64 peers: joined in {joined:?}, every member and record seen on every peer {:?} after the last join",
        converged
    );

    // Kill 8 peers: their links drop at once and they stop, as after a crash.
    let detection = swim().failure_detection_time();
    let killed: Vec<PeerId> = swarm.peers[56..].iter().map(|(k, _)| k.peer_id()).collect();
    let kill_start = Instant::now();
    for (keypair, peer) in swarm.peers.drain(56..) {
        swarm.emulator.kill(keypair.peer_id());
        peer.shutdown();
    }
    let noticed = wait_until("all survivors drop the 8 killed peers", detection, || {
        swarm.peers.iter().all(|(_, p)| {
            let ids = member_ids(p);
            ids.len() == 55 && killed.iter().all(|k| !ids.contains(k))
        })
    })
    .await;
    println!(
        "8 killed peers dropped by all 56 survivors after {noticed:?} ({:?} including the kills; configured \
         failure detection time {detection:?})",
        kill_start.elapsed()
    );

    // Split the survivors in halves; each half drops the other; a record published on each side during the
    // partition reaches the other side after healing.
    let ids: Vec<PeerId> = swarm.peers.iter().map(|(k, _)| k.peer_id()).collect();
    let (left, right) = ids.split_at(28);
    swarm.emulator.partition(left, right);
    // A partition breaks no connection, so only probes find it: every member of the other half must be
    // picked by some probe first. The slowest case is a member whose view holds a newer incarnation of a
    // member of the other half than the others declared dead: only its own probe, once per cycle through
    // its member list (about 28 probe periods), drops it.
    let split = wait_until("each half drops the other", Duration::from_secs(60), || {
        swarm.peers.iter().all(|(_, p)| p.members().len() == 27)
    })
    .await;
    println!("partition: each half dropped the other after {split:?}");
    publish_progress(&swarm.peers[0].1, 1_000);
    publish_progress(&swarm.peers[30].1, 2_000);
    let heal_start = Instant::now();
    swarm.emulator.heal();
    wait_until("the healed swarm converges", Duration::from_secs(30), || {
        swarm.peers.iter().all(|(_, p)| {
            let seen = |peer: &Membership, value: u64| match p.get("progress") {
                Some(View::Dictionary { entries, .. }) => entries
                    .get(&Subkey::Peer(peer.local_peer()))
                    .is_some_and(|(v, _)| v[..] == value.to_le_bytes()),
                _ => false,
            };
            p.members().len() == 55 && seen(&swarm.peers[0].1, 1_000) && seen(&swarm.peers[30].1, 2_000)
        })
    })
    .await;
    println!(
        "partition healed: all 56 peers converged {:?} after healing",
        heal_start.elapsed()
    );
    for (_, peer) in &swarm.peers {
        assert_eq!(peer.replica().counters().refused_total(), 0);
        peer.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_is_seen_at_once_and_a_revived_peer_rejoins_under_a_new_generation() {
    let _serial = SERIAL.lock().await;
    let mut swarm = Swarm::new();
    swarm.start_joined(&names("l", 4)).await;
    wait_until("4 peers see each other", Duration::from_secs(10), || {
        swarm.peers.iter().all(|(_, p)| p.members().len() == 3)
    })
    .await;

    // A graceful leave is noticed well before the failure detection time.
    let (_, leaving) = swarm.peers.pop().unwrap();
    let gone = leaving.local_peer();
    let start = Instant::now();
    leaving.leave().await;
    let seen = wait_until("a leave is noticed", swim().suspect_to_down_after, || {
        swarm.peers.iter().all(|(_, p)| !member_ids(p).contains(&gone))
    })
    .await;
    println!(
        "graceful leave noticed after {seen:?} ({:?} including the leave)",
        start.elapsed()
    );

    // A peer cut off long enough to be declared dead comes back under a new generation once revived.
    let (keypair, victim) = (swarm.peers[2].0.clone(), swarm.peers[2].1.clone());
    let before = victim.identity().await.unwrap().generation;
    swarm.emulator.kill(keypair.peer_id());
    wait_until(
        "the cut-off peer is declared dead",
        swim().failure_detection_time() * 2,
        || {
            swarm.peers[..2]
                .iter()
                .all(|(_, p)| !member_ids(p).contains(&keypair.peer_id()))
        },
    )
    .await;
    swarm.emulator.revive(keypair.peer_id());
    wait_until("the revived peer rejoins", Duration::from_secs(20), || {
        swarm.peers[..2].iter().all(|(_, p)| {
            p.members()
                .iter()
                .any(|m| m.peer == keypair.peer_id() && m.generation > before)
        })
    })
    .await;
    assert!(victim.identity().await.unwrap().generation > before);
    for (_, peer) in &swarm.peers {
        peer.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_peer_is_suspected_at_once_while_still_listed_then_dropped() {
    let _serial = SERIAL.lock().await;
    let mut swarm = Swarm::new();
    swarm.start_joined(&names("s", 2)).await;
    wait_until("2 peers see each other", Duration::from_secs(10), || {
        swarm.peers.iter().all(|(_, p)| p.members().len() == 1)
    })
    .await;
    let (keypair, crashed) = swarm.peers.pop().unwrap();
    let (gone, survivor) = (keypair.peer_id(), swarm.peers[0].1.clone());
    assert!(!survivor.is_suspected(&gone));
    swarm.emulator.kill(gone);
    crashed.shutdown();
    // Its connection broke and it cannot be dialed again: suspected well before the suspicion time ends,
    // while it is still listed.
    let suspected = wait_until(
        "the crashed peer is suspected",
        swim().suspect_to_down_after / 2,
        || survivor.is_suspected(&gone),
    )
    .await;
    assert!(
        survivor.is_member(&gone),
        "still listed while suspected ({suspected:?} after the crash)"
    );
    wait_until("the crashed peer is dropped", swim().failure_detection_time(), || {
        !survivor.is_member(&gone)
    })
    .await;
    assert!(!survivor.is_suspected(&gone), "a dropped peer is no longer suspected");
    println!("a crashed peer was suspected after {suspected:?}");
    survivor.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_peers_are_members_reached_over_their_own_connections() {
    let _serial = SERIAL.lock().await;
    let mut swarm = Swarm::new();
    let bootstrap = swarm.start_joined(&names("server", 2)).await;
    let mut config = swarm.config("unused", Some(bootstrap));
    config.listen = None;
    let client = swarm.start(config).await;
    assert_eq!(client.role(), Role::Client);
    assert!(client.address().is_none());
    publish_progress(&client, 42);
    wait_until(
        "servers list the client and its record",
        Duration::from_secs(10),
        || {
            swarm.peers[..2].iter().all(|(_, p)| {
                p.members()
                    .iter()
                    .any(|m| m.peer == client.local_peer() && m.role == Role::Client && m.address.is_none())
                    && progress_entries(p) == 1
            })
        },
    )
    .await;
    // The client stays a member: several failure detection times later nobody has dropped it.
    let hold = swim().failure_detection_time() * 2;
    let start = Instant::now();
    while start.elapsed() < hold {
        for (_, p) in &swarm.peers[..2] {
            assert!(
                member_ids(p).contains(&client.local_peer()),
                "a server dropped the client"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (_, peer) in &swarm.peers {
        peer.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_fails_clearly_on_clock_skew_another_run_or_no_answer() {
    let _serial = SERIAL.lock().await;
    let mut swarm = Swarm::new();
    let bootstrap = swarm.start_joined(&names("boot", 1)).await;

    // A clock 10 s ahead is refused, and the error names the skew.
    let mut skewed = swarm.config("skewed", Some(bootstrap.clone()));
    let clock = skewed.clock.clone();
    skewed.clock = Arc::new(move || clock() + 10.0);
    let keypair = Arc::new(Keypair::generate());
    let error = Membership::start(skewed, keypair.clone(), swarm.hub.transport(&keypair), schemas())
        .await
        .err()
        .expect("a skewed clock is refused");
    let message = error.to_string();
    match error {
        MembershipError::ClockSkew { skew_secs, .. } => assert!((skew_secs + 10.0).abs() < 0.5, "{message}"),
        other => panic!("expected a clock skew error, got: {other}"),
    }
    assert!(message.contains("-9.9") || message.contains("-10.0"), "{message}");
    assert!(message.contains("bound of 3s"), "{message}");

    // Another run is refused with both run ids.
    let mut other = swarm.config("other", Some(bootstrap.clone()));
    other.run_id = "another-run".into();
    let keypair = Arc::new(Keypair::generate());
    let error = Membership::start(other, keypair.clone(), swarm.hub.transport(&keypair), schemas())
        .await
        .err()
        .expect("another run is refused");
    let message = error.to_string();
    assert!(message.contains("another-run") && message.contains(RUN), "{message}");

    // Nobody answers: the error names every address tried and why.
    let mut lost = swarm.config("lost", None);
    lost.initial_peers = vec!["mem://nobody-here".parse().unwrap(), "mem://nor-here".parse().unwrap()];
    lost.bootstrap_timeout = Duration::from_millis(600);
    let keypair = Arc::new(Keypair::generate());
    let start = Instant::now();
    let error = Membership::start(lost, keypair.clone(), swarm.hub.transport(&keypair), schemas())
        .await
        .err()
        .expect("no bootstrap peer answers");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "gave up after {:?}",
        start.elapsed()
    );
    let message = error.to_string();
    assert!(
        message.contains("mem://nobody-here") && message.contains("mem://nor-here") && message.contains("600ms"),
        "{message}"
    );
    for (_, peer) in &swarm.peers {
        peer.shutdown();
    }
}

/// A peer that speaks the records exchange by hand and pushes `records` to the peer at `address`.
async fn push_records(transport: &Arc<dyn Transport>, address: &Address, records: &[Record]) {
    let conn = transport.dial(address).await.unwrap();
    let config = StreamConfig::default();
    let protocol = colony::records::sync::protocol();
    let (mut send, mut recv) = colony_transports::rpc::open::<SyncStep>(&conn, &protocol, &config)
        .await
        .unwrap();
    send.send(&SyncStep::plain(steps::OFFER), Bytes::new()).await.unwrap();
    let (step, _) = recv.recv_required("digest").await.unwrap();
    assert_eq!(step.step, steps::DIGEST);
    let batch = WireBatch {
        records: records.iter().map(WireRecord::from).collect(),
        digest: Vec::new(),
    };
    send.send(&SyncStep::plain(steps::REPLY), batch.encode().unwrap())
        .await
        .unwrap();
    let (step, _) = recv.recv_required("push").await.unwrap();
    assert_eq!(step.step, steps::PUSH);
    send.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_refused_by_every_peer_and_counted() {
    let _serial = SERIAL.lock().await;
    let mut swarm = Swarm::new();
    swarm.start_joined(&names("f", 8)).await;
    let victim = swarm.peers[1].1.local_peer();
    let mallory = Keypair::generate();
    let now = swarm.peers[0].1.replica().now();
    let value = Bytes::from(7u64.to_le_bytes().to_vec());
    let signed = |subkey: PeerId, value: Bytes| {
        Record::signed(
            RUN,
            &mallory,
            "progress",
            Some(Subkey::Peer(subkey)),
            Some(value),
            now + 60.0,
        )
    };
    // Wrong owner: Mallory signs the victim's subkey. Bad signature: her own record with a changed value.
    let wrong_owner = signed(victim, value.clone());
    let mut bad_signature = signed(mallory.peer_id(), value.clone());
    bad_signature.value = Some(Bytes::from(8u64.to_le_bytes().to_vec()));
    // Oversize and wrong schema.
    let oversize = signed(mallory.peer_id(), Bytes::from(vec![0u8; 20_000]));
    let wrong_schema = signed(mallory.peer_id(), Bytes::from_static(b"not eight bytes"));
    let forged = [wrong_owner, bad_signature, oversize, wrong_schema];

    let metric = |reason: &str| recorded::counter(&format!("colony_records_refused_total{{reason={reason}}}"));
    let before = [metric("bad_signature"), metric("too_large"), metric("invalid_value")];
    // Mallory passes the access exchange (the run is open) and speaks the records exchange by hand.
    let transport = Arc::new(AccessControl::open(mallory.peer_id())).wrap(swarm.hub.transport(&mallory));
    for (_, peer) in &swarm.peers {
        push_records(&transport, &peer.address().unwrap(), &forged).await;
    }
    // The metric counts every refusal of every peer of this process.
    let after = [metric("bad_signature"), metric("too_large"), metric("invalid_value")];
    assert_eq!(
        [after[0] - before[0], after[1] - before[1], after[2] - before[2]],
        [16, 8, 8]
    );
    for (_, peer) in &swarm.peers {
        let counters = peer.replica().counters();
        assert_eq!(counters.refused("bad_signature"), 2, "wrong owner and bad signature");
        assert_eq!(counters.refused("too_large"), 1);
        assert_eq!(counters.refused("invalid_value"), 1);
        assert!(peer.get("progress").is_none(), "nothing forged was stored");
    }
    for (_, peer) in &swarm.peers {
        peer.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_spoofed_membership_packets_are_dropped_and_counted() {
    let _serial = SERIAL.lock().await;
    let mut swarm = Swarm::new();
    let bootstrap = swarm.start_joined(&names("g", 2)).await;
    let honest = swarm.peers[1].1.clone();
    wait_until("two peers see each other", Duration::from_secs(10), || {
        swarm.peers.iter().all(|(_, p)| p.members().len() == 1)
    })
    .await;
    let target = &swarm.peers[0].1;

    // A stranger connects and sends garbage, truncated packets, and a packet claiming to be the honest peer.
    let stranger = Keypair::generate();
    let conn = Arc::new(AccessControl::open(stranger.peer_id()))
        .wrap(swarm.hub.transport(&stranger))
        .dial(&bootstrap)
        .await
        .unwrap();
    let mut garbage: Vec<Bytes> = vec![
        Bytes::new(),
        Bytes::from_static(&[0xff; 3]),
        Bytes::from(vec![7u8; 900]),
    ];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for len in [40usize, 120, 400, 1000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        garbage.push(Bytes::from(bytes));
    }
    let honest_id = honest.identity().await.unwrap();
    let target_id = target.identity().await.unwrap();
    let spoofed = {
        use foca::Codec;
        let header = foca::Header {
            src: honest_id,
            src_incarnation: 0,
            dst: target_id,
            message: foca::Message::Ping(1),
        };
        let mut buf = Vec::new();
        colony::membership::identity::MemberCodec
            .encode_header(&header, &mut buf)
            .unwrap();
        Bytes::from(buf)
    };
    // Junk after the stranger's own id passes the sender check and is refused by the decoder.
    let mut own_prefix = stranger.peer_id().as_bytes().to_vec();
    own_prefix.extend_from_slice(&[0xee; 64]);
    garbage.push(Bytes::from(own_prefix));
    let counters = target.counters();
    let dropped = || counters.datagrams_malformed.get() + counters.datagrams_spoofed.get();
    let (dropped_before, malformed_before, spoofed_before) = (
        dropped(),
        counters.datagrams_malformed.get(),
        counters.datagrams_spoofed.get(),
    );
    for packet in &garbage {
        conn.send_datagram(packet.clone()).unwrap();
    }
    conn.send_datagram(spoofed).unwrap();
    wait_until("bad packets are counted", Duration::from_secs(10), || {
        dropped() > dropped_before + garbage.len() as u64
            && counters.datagrams_spoofed.get() > spoofed_before
            && counters.datagrams_malformed.get() > malformed_before
    })
    .await;
    // The stranger is not a member, and the swarm still works.
    assert!(!member_ids(target).contains(&stranger.peer_id()));
    publish_progress(&honest, 5);
    wait_until("a record still spreads", Duration::from_secs(10), || {
        progress_entries(target) == 1
    })
    .await;
    for (_, peer) in &swarm.peers {
        peer.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announces_its_advertised_address_and_is_dialled_there() {
    use colony_transports::tcp::{TcpConfig, TcpTransport};
    let _serial = SERIAL.lock().await;
    let start = |config: MembershipConfig| async {
        let keypair = Arc::new(Keypair::generate());
        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new((*keypair).clone(), TcpConfig::default()));
        Membership::start(config, keypair, transport, schemas()).await
    };
    // Bound on 127.0.0.1, announced under the name `localhost` with the bound port (port 0 keeps it).
    let mut first = MembershipConfig::new(RUN, Some("tcp://127.0.0.1:0".parse().unwrap()));
    first.advertise = Some("tcp://localhost:0".parse().unwrap());
    first.swim = swim();
    let first = start(first).await.expect("the first peer starts");
    let announced = first.address().expect("a listening peer has an address");
    let (host, port) = announced.location().rsplit_once(':').unwrap();
    assert_eq!(host, "localhost", "announced {announced}");
    assert_ne!(port, "0", "the bound port replaces port 0: {announced}");

    // A second peer joins through the announced address and sees it as the first peer's address.
    let mut second = MembershipConfig::new(RUN, Some("tcp://127.0.0.1:0".parse().unwrap()));
    second.initial_peers = vec![announced.clone()];
    second.swim = swim();
    let second = start(second)
        .await
        .expect("the second peer joins through the advertised address");
    wait_until(
        "the second peer lists the first at its advertised address",
        Duration::from_secs(20),
        || second.members().iter().any(|m| m.address.as_ref() == Some(&announced)),
    )
    .await;

    // advertise without listen, or with another scheme, is refused with both named.
    let mut client = MembershipConfig::new(RUN, None);
    client.advertise = Some("tcp://localhost:4000".parse().unwrap());
    client.initial_peers = vec![announced.clone()];
    let error = start(client)
        .await
        .err()
        .expect("advertise without listen is refused")
        .to_string();
    assert!(error.contains("advertise tcp://localhost:4000 needs listen"), "{error}");
    let mut mismatch = MembershipConfig::new(RUN, Some("tcp://127.0.0.1:0".parse().unwrap()));
    mismatch.advertise = Some("quic://localhost:4000".parse().unwrap());
    let error = start(mismatch)
        .await
        .err()
        .expect("another scheme is refused")
        .to_string();
    assert!(error.contains("scheme of listen tcp://127.0.0.1:0"), "{error}");
    first.shutdown();
    second.shutdown();
}
