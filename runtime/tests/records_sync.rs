//! Anti-entropy over real connections: peers that each hold their own signed record converge by pairwise
//! digest exchanges, sending only what is missing; forged records pushed by a peer are refused and counted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use colony::records::replica::{PublishLimits, Replica};
use colony::records::sync::{self, Clock, SyncStep, steps};
use colony::records::wire::{WireBatch, WireRecord};
use colony::records::{Record, RecordLimits, RecordStore, Schemas, Subkey};
use colony_transports::mem::MemHub;
use colony_transports::rpc::{Router, StreamConfig};
use colony_transports::{Connection, Keypair, Transport};

const RUN: &str = "sync-test";
const NOW: f64 = 1_000.0;
const WAIT: Duration = Duration::from_secs(20);

struct Peer {
    replica: Arc<Replica>,
    transport: Arc<dyn Transport>,
}

fn clock() -> Clock {
    Arc::new(|| NOW)
}

fn new_replica() -> Arc<Replica> {
    let mut schemas = Schemas::default();
    schemas.register_with("progress", |value| {
        if value.len() == 8 {
            Ok(())
        } else {
            Err("8 bytes expected".into())
        }
    });
    let store = RecordStore::new(RUN, RecordLimits::default(), schemas);
    Arc::new(Replica::new(store, clock(), PublishLimits::default()))
}

fn own_record(keypair: &Keypair, epoch: u64) -> Record {
    let value = Bytes::from(epoch.to_le_bytes().to_vec());
    Record::signed(
        RUN,
        keypair,
        "progress",
        Some(Subkey::Peer(keypair.peer_id())),
        Some(value),
        NOW + 60.0,
    )
}

/// Starts `n` peers on one hub, each listening at `mem://peer-<i>` and serving the exchange.
async fn start_peers(hub: &MemHub, n: usize) -> (Vec<Peer>, Vec<tokio::task::JoinHandle<()>>) {
    let mut peers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let keypair = Keypair::generate();
        let replica = new_replica();
        replica
            .apply(own_record(&keypair, i as u64), keypair.peer_id())
            .unwrap();
        let transport = hub.transport(&keypair);
        let mut router = Router::default();
        sync::serve(&mut router, replica.clone());
        let router = Arc::new(router);
        let mut listener = transport
            .listen(&format!("mem://peer-{i}").parse().unwrap())
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut serving = tokio::task::JoinSet::new();
            while let Ok(conn) = listener.accept().await {
                serving.spawn(router.clone().serve(conn));
            }
        }));
        peers.push(Peer { replica, transport });
    }
    (peers, tasks)
}

async fn dial(peer: &Peer, index: usize) -> Connection {
    peer.transport
        .dial(&format!("mem://peer-{index}").parse().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_exchanges_converges() {
    let hub = MemHub::new();
    let n = 8;
    let (peers, tasks) = start_peers(&hub, n).await;
    let mut connections = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        connections.push(dial(peer, (i + 1) % n).await);
    }
    // Each round, every peer exchanges with its successor; news travels both ways around the ring.
    let mut rounds = 0;
    while peers.iter().any(|peer| peer.replica.len() < n) {
        rounds += 1;
        assert!(rounds <= n, "no convergence after {n} rounds");
        for (peer, conn) in peers.iter().zip(&connections) {
            let config = StreamConfig::default();
            let exchange = sync::sync_with(conn, &peer.replica, &config);
            tokio::time::timeout(WAIT, exchange)
                .await
                .expect("exchange in time")
                .expect("exchange succeeds");
        }
    }
    println!("converged after {rounds} rounds");
    let digest = peers[0].replica.digest();
    assert_eq!(digest.0.len(), n);
    for peer in &peers {
        assert_eq!(peer.replica.digest(), digest);
        assert_eq!(peer.replica.counters().refused_total(), 0);
    }
    // A further exchange between converged peers stops at the fingerprints and carries no record.
    let again = sync::sync_with(&connections[0], &peers[0].replica, &StreamConfig::default())
        .await
        .unwrap();
    assert_eq!(again.received, 0);
    for task in tasks {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_pushed_by_a_peer_are_refused() {
    let hub = MemHub::new();
    let (peers, tasks) = start_peers(&hub, 1).await;
    let victim = Keypair::generate();
    let mallory = Keypair::generate();
    let conn = hub
        .transport(&mallory)
        .dial(&"mem://peer-0".parse().unwrap())
        .await
        .unwrap();

    // Mallory speaks the protocol by hand: a fingerprint that matches nothing, then a reply carrying a record
    // she signed for the victim.
    let config = StreamConfig::default();
    let (mut send, mut recv) = colony_transports::rpc::open::<SyncStep>(&conn, &sync::protocol(), &config)
        .await
        .unwrap();
    send.send(&SyncStep::plain(steps::OFFER), Bytes::new()).await.unwrap();
    let (step, digest) = tokio::time::timeout(WAIT, recv.recv_required("digest"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(step.step, steps::DIGEST);
    assert_eq!(
        WireBatch::decode(&digest).unwrap().digest.len(),
        1,
        "the honest peer shows its digest"
    );
    let mut forged = own_record(&mallory, 666);
    forged.subkey = Some(Subkey::Peer(victim.peer_id()));
    let push = WireBatch {
        records: vec![WireRecord::from(&forged)],
        digest: Vec::new(),
    };
    send.send(&SyncStep::plain(steps::REPLY), push.encode().unwrap())
        .await
        .unwrap();
    // The honest peer answers with what Mallory lacks: its own record.
    let (step, pushed) = tokio::time::timeout(WAIT, recv.recv_required("push"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(step.step, steps::PUSH);
    assert_eq!(WireBatch::decode(&pushed).unwrap().records.len(), 1);
    send.finish().await.unwrap();

    let replica = peers[0].replica.clone();
    assert_eq!(
        replica.counters().refused("bad_signature"),
        1,
        "the forged record is refused"
    );
    assert_eq!(replica.len(), 1, "only the peer's own record is stored");
    for task in tasks {
        task.abort();
    }
}
