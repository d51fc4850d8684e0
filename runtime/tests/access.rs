//! Access control end to end: peers that are not on the run's allowlist, or whose membership certificate is
//! expired, for another run or from another authority, are refused when they connect, on the in-process
//! and the TCP transport, and told why; authorised peers join and train; records whose owner is not
//! admitted are ignored and counted, also when a third peer relays them; a peer whose certificate expires
//! while it runs is dropped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony::membership::{Membership, MembershipConfig, MembershipError, SwimConfig};
use colony::optimizer::{CollaborativeOptimizer, CollaborativeOptions, OptimizerServices, RoundKind, RoundResult};
use colony::records::sync::{self, SyncStep, steps};
use colony::records::wire::{WireBatch, WireRecord};
use colony::records::{Record, Schemas, Subkey, View};
use colony_averaging::tensor::TensorInfo;
use colony_offload::OptimizerConfig;
use colony_transports::access::{AccessPolicy, Certificate, format_unix_time};
use colony_transports::emulation::{LinkConfig, LinkEmulator};
use colony_transports::mem::MemHub;
use colony_transports::rpc::{self, StreamConfig};
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::{Address, Keypair, PeerId, Transport};

const RUN: &str = "access-test";

/// The tests start swarms against deadlines: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[derive(Debug, Clone, Copy)]
enum Net {
    Mem,
    Tcp,
}

/// Where test peers meet: an in-process hub (with 1 ms links) or TCP on loopback.
struct Network {
    net: Net,
    hub: MemHub,
    emulator: LinkEmulator,
    names: usize,
}

impl Network {
    fn new(net: Net) -> Self {
        let emulator = LinkEmulator::with_seed(5);
        emulator.set_default_link(LinkConfig {
            latency: Duration::from_millis(1),
            bandwidth_bytes_per_sec: None,
            datagram_loss: 0.0,
        });
        Self {
            net,
            hub: MemHub::with_emulator(emulator.clone()),
            emulator,
            names: 0,
        }
    }

    fn listen(&mut self) -> Address {
        self.names += 1;
        match self.net {
            Net::Mem => format!("mem://access-{}", self.names).parse().unwrap(),
            Net::Tcp => "tcp://127.0.0.1:0".parse().unwrap(),
        }
    }

    fn transport(&self, keypair: &Keypair) -> Arc<dyn Transport> {
        match self.net {
            Net::Mem => self.hub.transport(keypair),
            Net::Tcp => Arc::new(TcpTransport::new(keypair.clone(), TcpConfig::default())),
        }
    }

    /// Membership settings with test timings, listening on a fresh address, joining through `initial`.
    fn config(&mut self, initial: Option<Address>) -> MembershipConfig {
        let mut config = MembershipConfig::new(RUN, Some(self.listen()));
        config.initial_peers = initial.into_iter().collect();
        config.swim = SwimConfig {
            probe_period: Duration::from_millis(300),
            probe_rtt: Duration::from_millis(150),
            suspect_to_down_after: Duration::from_millis(900),
            gossip_interval: Duration::from_millis(50),
            ..SwimConfig::default()
        };
        config.sync_interval = Duration::from_millis(200);
        config.bootstrap_timeout = Duration::from_secs(10);
        config
    }

    async fn start(&self, keypair: &Keypair, config: MembershipConfig) -> Result<Membership, MembershipError> {
        Membership::start(config, Arc::new(keypair.clone()), self.transport(keypair), schemas()).await
    }
}

fn schemas() -> Schemas {
    let mut schemas = Schemas::default();
    schemas.register_with("note", |_| Ok(()));
    schemas
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lists(membership: &Membership, peer: PeerId) -> bool {
    membership.members().iter().any(|m| m.peer == peer)
}

/// The subkeys of `key` that `membership` sees.
fn owners(membership: &Membership, key: &str) -> BTreeSet<PeerId> {
    match membership.get(key) {
        Some(View::Dictionary { entries, .. }) => entries
            .keys()
            .filter_map(|subkey| match subkey {
                Subkey::Peer(peer) => Some(*peer),
                Subkey::Name(_) => None,
            })
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn note(keypair: &Keypair, expiration: f64) -> Record {
    let subkey = Some(Subkey::Peer(keypair.peer_id()));
    Record::signed(
        RUN,
        keypair,
        "note",
        subkey,
        Some(Bytes::from_static(b"hi")),
        expiration,
    )
}

/// The reason a refused join reports, or a panic naming what happened instead.
fn refusal(result: Result<Membership, MembershipError>) -> String {
    match result {
        Err(MembershipError::Refused { reason, .. }) => reason,
        Err(other) => panic!("expected an access refusal, got: {other}"),
        Ok(_) => panic!("expected an access refusal, but the peer joined"),
    }
}

/// An authority and the certificates it issues.
struct Authority(Keypair);

impl Authority {
    fn policy(&self) -> AccessPolicy {
        AccessPolicy::Certificates {
            authority: self.0.peer_id(),
            run_id: RUN.into(),
        }
    }

    fn issue(&self, peer: &Keypair, run: &str, not_before: u64, not_after: u64) -> Certificate {
        Certificate::issue(&self.0, peer.peer_id(), run, not_before, not_after).unwrap()
    }

    /// A certificate valid for the next hour.
    fn valid(&self, peer: &Keypair) -> Certificate {
        let now = unix_now();
        self.issue(peer, RUN, now - 60, now + 3600)
    }
}

/// The settings of a peer that checks certificates and presents its own.
fn certified(mut config: MembershipConfig, authority: &Authority, certificate: Certificate) -> MembershipConfig {
    config.access = authority.policy();
    config.certificate = Some(certificate);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_peer_is_refused_at_the_handshake_on_mem_and_tcp() {
    let _serial = SERIAL.lock().await;
    for net in [Net::Mem, Net::Tcp] {
        let mut network = Network::new(net);
        let (a, b, stranger) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        let allowlist = AccessPolicy::Allowlist([a.peer_id(), b.peer_id()].into());
        let mut config = network.config(None);
        config.access = allowlist.clone();
        let first = network.start(&a, config).await.unwrap();
        let mut config = network.config(first.address());
        config.access = allowlist;
        let second = network.start(&b, config).await.unwrap();
        wait_until("the listed peers see each other", Duration::from_secs(10), || {
            lists(&first, b.peer_id()) && lists(&second, a.peer_id())
        })
        .await;

        // The stranger runs an open policy of its own: it still learns why it is refused, at once.
        let started = Instant::now();
        let config = network.config(first.address());
        let reason = refusal(network.start(&stranger, config).await);
        assert_eq!(
            reason,
            format!("peer {} is not on the run's allowlist", stranger.peer_id()),
            "{net:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refusals are final, not retried"
        );
        assert_eq!(first.access().refused("not_allowlisted"), 1, "{net:?}");
        assert_eq!(first.access().refused_total(), 1, "{net:?}");
        assert!(!lists(&first, stranger.peer_id()));
        first.shutdown();
        second.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_foreign_run_and_foreign_authority_certificates_are_refused_at_the_handshake() {
    let _serial = SERIAL.lock().await;
    let authority = Authority(Keypair::generate());
    let other_authority = Authority(Keypair::generate());
    for net in [Net::Mem, Net::Tcp] {
        let mut network = Network::new(net);
        let (a, b) = (Keypair::generate(), Keypair::generate());
        let config = certified(network.config(None), &authority, authority.valid(&a));
        let first = network.start(&a, config).await.unwrap();
        let config = certified(network.config(first.address()), &authority, authority.valid(&b));
        let second = network.start(&b, config).await.unwrap();
        wait_until("the certified peers see each other", Duration::from_secs(10), || {
            lists(&first, b.peer_id()) && lists(&second, a.peer_id())
        })
        .await;

        let now = unix_now();
        let joiner = Keypair::generate();
        let id = joiner.peer_id();
        let expired_at = now - 3600;
        // Each joiner presents its certificate without checking others (an open policy of its own); the
        // expired one runs a clock that lags, so that it does not refuse its own certificate at start.
        let cases = [
            (
                Some(authority.issue(&joiner, RUN, now - 7200, expired_at)),
                5_000.0,
                format!(
                    "certificate of peer {id} expired at {} (it is now ",
                    format_unix_time(expired_at)
                ),
                "expired",
            ),
            (
                Some(authority.issue(&joiner, "another-run", now - 60, now + 3600)),
                0.0,
                format!("certificate of peer {id} is for run 'another-run', not '{RUN}'"),
                "wrong_run",
            ),
            (
                Some(other_authority.valid(&joiner)),
                0.0,
                format!(
                    "certificate of peer {id} is signed by authority {}, this run's authority is {}",
                    other_authority.0.peer_id(),
                    authority.0.peer_id()
                ),
                "wrong_authority",
            ),
            (
                None,
                0.0,
                format!("peer {id} presented no membership certificate"),
                "no_certificate",
            ),
        ];
        for (certificate, lag, expected, reason) in cases {
            let mut config = network.config(first.address());
            config.certificate = certificate;
            config.clock = Arc::new(move || unix_now() as f64 - lag);
            let message = refusal(network.start(&joiner, config).await);
            assert!(message.starts_with(&expected), "{net:?}: {message}");
            assert_eq!(first.access().refused(reason), 1, "{net:?} {reason}");
        }
        assert_eq!(first.access().refused_total(), 4, "{net:?}");
        assert!(!lists(&first, id) && !lists(&second, id));
        first.shutdown();
        second.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_cannot_be_used_stops_the_peer_at_start() {
    let _serial = SERIAL.lock().await;
    let mut network = Network::new(Net::Mem);
    let authority = Authority(Keypair::generate());
    let peer = Keypair::generate();
    let now = unix_now();
    let config = certified(
        network.config(None),
        &authority,
        authority.issue(&peer, RUN, now - 7200, now - 3600),
    );
    let message = network.start(&peer, config).await.err().expect("refused").to_string();
    assert!(
        message.contains("own certificate cannot be used") && message.contains("expired at"),
        "{message}"
    );
    let mut config = network.config(None);
    config.access = authority.policy();
    let message = network.start(&peer, config).await.err().expect("refused").to_string();
    assert!(message.contains("colony authority issue"), "{message}");
}

/// Options with test timings: short matchmaking window and timeouts.
fn training_options() -> CollaborativeOptions {
    let mut options = CollaborativeOptions::new(16, OptimizerConfig::sgd(0.5, 0.0, 3));
    options.matchmaking_time = Duration::from_secs(1);
    options.request_timeout = Duration::from_millis(300);
    options.averaging_timeout = Duration::from_secs(5);
    options.next_chunk_timeout = Some(Duration::from_secs(2));
    options.min_refresh_period = Duration::from_millis(20);
    options.max_refresh_period = Duration::from_millis(200);
    options
}

struct Trainer {
    membership: Membership,
    optimizer: CollaborativeOptimizer,
    params: Vec<f32>,
    grads: Vec<f32>,
}

async fn trainer(network: &Network, keypair: &Keypair, mut config: MembershipConfig) -> Trainer {
    config.publish_limits.rate_per_sec = 50.0;
    config.publish_limits.burst = 50;
    let services = OptimizerServices::new(Duration::from_secs(3));
    let mut schemas = Schemas::default();
    OptimizerServices::register_schemas(&mut schemas);
    let membership = Membership::start_with(
        config,
        Arc::new(keypair.clone()),
        network.transport(keypair),
        schemas,
        |router| services.register(router),
    )
    .await
    .expect("an authorised peer starts");
    let tensors = vec![TensorInfo::new("w", [3])];
    let optimizer = CollaborativeOptimizer::start(&membership, &services, tensors, &[0.0; 3], training_options())
        .expect("the optimizer starts");
    Trainer {
        membership,
        optimizer,
        params: vec![0.0; 3],
        grads: vec![0.0; 3],
    }
}

/// Steps with batches of 4 samples of a constant gradient until the epoch reaches `until`; returns the
/// gradient rounds' results.
async fn train(trainer: &mut Trainer, until: u64) -> Vec<RoundResult> {
    let start = Instant::now();
    let mut rounds = Vec::new();
    while trainer.optimizer.local_epoch() < until {
        assert!(start.elapsed() < Duration::from_secs(60), "epoch {until} did not come");
        trainer.grads.fill(1.0);
        let outcome = trainer
            .optimizer
            .step(&mut trainer.params, &mut trainer.grads, Some(4))
            .await
            .unwrap();
        rounds.extend(
            outcome
                .rounds
                .into_iter()
                .filter(|round| round.kind == RoundKind::Gradients)
                .map(|round| round.result),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorised_peers_join_and_average_their_gradients() {
    let _serial = SERIAL.lock().await;
    let mut network = Network::new(Net::Mem);
    let authority = Authority(Keypair::generate());
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let config = certified(network.config(None), &authority, authority.valid(&a));
    let mut first = trainer(&network, &a, config).await;
    let config = certified(
        network.config(first.membership.address()),
        &authority,
        authority.valid(&b),
    );
    let mut second = trainer(&network, &b, config).await;
    wait_until(
        "each trainer sees the other's progress",
        Duration::from_secs(20),
        || lists(&first.membership, b.peer_id()) && lists(&second.membership, a.peer_id()),
    )
    .await;
    let (rounds_a, rounds_b) = tokio::join!(train(&mut first, 3), train(&mut second, 3));
    let together = RoundResult::Averaged { peers: 2 };
    assert!(
        rounds_a.contains(&together) && rounds_b.contains(&together),
        "gradient rounds: {rounds_a:?} / {rounds_b:?}"
    );
    for peer in [&first, &second] {
        assert_eq!(peer.membership.access().refused_total(), 0);
        assert_eq!(peer.membership.replica().counters().refused("not_admitted"), 0);
    }
    first.optimizer.shutdown().await;
    second.optimizer.shutdown().await;
    first.membership.shutdown();
    second.membership.shutdown();
}

/// Plays an admitted peer that relays `records` to the peer at the other end of `conn` in an anti-entropy
/// exchange, as if it had them from their owners.
async fn relay(conn: &colony_transports::Connection, records: &[Record]) {
    let config = StreamConfig::default();
    let (mut send, mut recv) = rpc::open::<SyncStep>(conn, &sync::protocol(), &config).await.unwrap();
    let offer = SyncStep {
        step: steps::OFFER,
        fingerprint: [0; 32],
    };
    send.send(&offer, Bytes::new()).await.unwrap();
    let (step, _) = recv.recv_required("the digest").await.unwrap();
    assert_eq!(step.step, steps::DIGEST);
    let batch = WireBatch {
        records: records.iter().map(WireRecord::from).collect(),
        digest: Vec::new(),
    };
    send.send(&SyncStep::plain(steps::REPLY), batch.encode().unwrap())
        .await
        .unwrap();
    let (step, _) = recv.recv_required("the push").await.unwrap();
    assert_eq!(step.step, steps::PUSH);
    send.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_relayed_by_a_third_peer_count_only_from_admitted_owners() {
    let _serial = SERIAL.lock().await;
    let mut network = Network::new(Net::Mem);
    let authority = Authority(Keypair::generate());
    let (a, b, c, outsider) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    // A and C cannot reach each other: whatever A learns of C comes through B.
    network.emulator.partition(&[a.peer_id()], &[c.peer_id()]);
    let config = certified(network.config(None), &authority, authority.valid(&a));
    let first = network.start(&a, config).await.unwrap();
    let config = certified(network.config(first.address()), &authority, authority.valid(&b));
    let second = network.start(&b, config).await.unwrap();
    let config = certified(network.config(second.address()), &authority, authority.valid(&c));
    let third = network.start(&c, config).await.unwrap();
    let expiration = third.replica().now() + 600.0;
    third
        .publish(
            "note",
            Some(Subkey::Peer(c.peer_id())),
            Some(Bytes::from_static(b"hi")),
            expiration,
        )
        .unwrap();
    // C's certificate reaches A in C's access record, relayed by B; then C's note counts at A.
    wait_until("A holds C's note", Duration::from_secs(20), || {
        owners(&first, "note").contains(&c.peer_id())
    })
    .await;
    assert!(owners(&first, "access").contains(&c.peer_id()));
    first
        .access()
        .admits(&c.peer_id())
        .expect("C admitted by its access record");
    assert_eq!(first.access().refused_total(), 0, "A and C never connected");

    // B relays records of a peer that holds no certificate of this run: a note, and an access record with a
    // certificate of another authority. Both are authentic (signed by their owner), neither counts.
    let refused_before = first.replica().counters().refused("not_admitted");
    let other_authority = Authority(Keypair::generate());
    let forged_access = Record::signed(
        RUN,
        &outsider,
        "access",
        Some(Subkey::Peer(outsider.peer_id())),
        Some(Bytes::from(other_authority.valid(&outsider).encode())),
        expiration,
    );
    let conn = second.connector().connect(&a.peer_id()).await.unwrap();
    relay(
        &conn,
        &[forged_access, note(&outsider, expiration), note(&b, expiration)],
    )
    .await;
    wait_until("A stores B's own note", Duration::from_secs(10), || {
        owners(&first, "note").contains(&b.peer_id())
    })
    .await;
    assert_eq!(first.replica().counters().refused("not_admitted") - refused_before, 2);
    assert!(!owners(&first, "note").contains(&outsider.peer_id()));
    assert!(!owners(&first, "access").contains(&outsider.peer_id()));
    for peer in [&first, &second, &third] {
        peer.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_certificate_expires_is_dropped_and_refused() {
    let _serial = SERIAL.lock().await;
    let mut network = Network::new(Net::Mem);
    let authority = Authority(Keypair::generate());
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let now = unix_now();
    // A's clock can be moved forward; B's certificate ends in two minutes.
    let offset = Arc::new(AtomicI64::new(0));
    let clock_offset = offset.clone();
    let mut config = certified(network.config(None), &authority, authority.valid(&a));
    config.clock = Arc::new(move || unix_now() as f64 + clock_offset.load(Ordering::Relaxed) as f64);
    let first = network.start(&a, config).await.unwrap();
    let short = authority.issue(&b, RUN, now - 60, now + 120);
    let config = certified(network.config(first.address()), &authority, short);
    let second = network.start(&b, config).await.unwrap();
    wait_until("A lists B", Duration::from_secs(10), || lists(&first, b.peer_id())).await;

    offset.store(600, Ordering::Relaxed);
    wait_until("A drops B", Duration::from_secs(20), || !lists(&first, b.peer_id())).await;
    assert!(first.access().refused("expired") >= 1);
    let refusal = first.access().admits(&b.peer_id()).unwrap_err();
    assert_eq!(refusal.reason(), "expired", "{refusal}");
    // B, dialing again with its own access control, is told why.
    let error = second
        .access()
        .wrap(network.transport(&b))
        .dial(&first.address().unwrap())
        .await
        .unwrap_err()
        .to_string();
    let expected = format!(
        "certificate of peer {} expired at {}",
        b.peer_id(),
        format_unix_time(now + 120)
    );
    assert!(error.contains(&expected), "{error}");
    first.shutdown();
    second.shutdown();
}

#[test]
fn the_operations_guide_lists_every_access_refusal_reason() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md");
    let text = std::fs::read_to_string(path).unwrap();
    let row = text
        .lines()
        .find(|line| line.starts_with("| `colony_access_refused_total` | counter |"))
        .expect("docs/operations.md lists colony_access_refused_total");
    for reason in colony_transports::access::REFUSAL_REASONS {
        assert!(
            row.contains(&format!("`{reason}`")),
            "the metric's row does not name {reason}"
        );
    }
}

#[test]
fn the_node_settings_choose_the_policy_and_name_what_is_wrong() {
    use colony::config::NodeSettings;
    let dir = tempfile::tempdir().unwrap();
    let (authority, peer, other) = (Authority(Keypair::generate()), Keypair::generate(), Keypair::generate());
    let cert = dir.path().join("peer.cert");
    Certificate::issue(&authority.0, peer.peer_id(), "my-run", 0, u64::MAX)
        .unwrap()
        .save(&cert)
        .unwrap();
    let settings = NodeSettings {
        run_id: Some("my-run".into()),
        ..NodeSettings::default()
    };
    let error = |settings: NodeSettings| settings.membership().expect_err("refused").to_string();

    let listed = NodeSettings {
        allow_peers: Some(vec![peer.peer_id().to_string(), other.peer_id().to_string()]),
        ..settings.clone()
    };
    let config = listed.membership().unwrap();
    assert_eq!(
        config.access,
        AccessPolicy::Allowlist([peer.peer_id(), other.peer_id()].into())
    );
    let certified = NodeSettings {
        authority: Some(authority.0.peer_id().to_string()),
        certificate: Some(cert.clone()),
        ..settings.clone()
    };
    let config = certified.membership().unwrap();
    assert_eq!(
        config.access,
        AccessPolicy::Certificates {
            authority: authority.0.peer_id(),
            run_id: "my-run".into()
        }
    );
    assert_eq!(config.certificate.unwrap().peer(), peer.peer_id());

    let message = error(NodeSettings {
        allow_peers: Some(vec!["nope".into()]),
        ..settings.clone()
    });
    assert!(
        message.contains("allow_peers") && message.contains("'nope'"),
        "{message}"
    );
    let message = error(NodeSettings {
        allow_peers: Some(Vec::new()),
        ..settings.clone()
    });
    assert!(message.contains("admits no peer"), "{message}");
    let message = error(NodeSettings {
        allow_peers: listed.allow_peers.clone(),
        ..certified.clone()
    });
    assert!(message.contains("cannot both be set"), "{message}");
    let message = error(NodeSettings {
        certificate: None,
        ..certified.clone()
    });
    assert!(message.contains("authority needs certificate"), "{message}");
    let message = error(NodeSettings {
        certificate: Some(dir.path().join("missing.cert")),
        ..certified.clone()
    });
    assert!(
        message.contains("certificate") && message.contains("missing.cert"),
        "{message}"
    );
    let message = error(NodeSettings {
        authority: Some("xyz0".into()),
        ..certified
    });
    assert!(message.contains("authority") && message.contains("xyz0"), "{message}");
}
