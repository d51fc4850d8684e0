//! Anti-entropy over real connections: peers that each hold their own signed record converge by pairwise
//! digest exchanges, sending only what is missing; forged records pushed by a peer are refused and counted.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use colony::records::sync::{self, Clock, SharedStore, SyncCounters, SyncStep};
use colony::records::wire::{WireBatch, WireRecord};
use colony::records::{Record, RecordLimits, RecordStore, Schemas, Subkey};
use colony_transports::mem::MemHub;
use colony_transports::rpc::{Router, StreamConfig};
use colony_transports::{Connection, Keypair, Transport};

const RUN: &str = "sync-test";
const NOW: f64 = 1_000.0;
const WAIT: Duration = Duration::from_secs(20);

struct Peer {
    store: SharedStore,
    counters: Arc<SyncCounters>,
    transport: Arc<dyn Transport>,
}

fn clock() -> Clock {
    Arc::new(|| NOW)
}

fn new_store() -> SharedStore {
    let mut schemas = Schemas::default();
    schemas.register_with("progress", |value| {
        if value.len() == 8 {
            Ok(())
        } else {
            Err("8 bytes expected".into())
        }
    });
    Arc::new(Mutex::new(RecordStore::new(RUN, RecordLimits::default(), schemas)))
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
        let store = new_store();
        store
            .lock()
            .unwrap()
            .store(own_record(&keypair, i as u64), NOW)
            .unwrap();
        let counters = Arc::new(SyncCounters::default());
        let transport = hub.transport(&keypair);
        let mut router = Router::default();
        sync::serve(&mut router, store.clone(), clock(), counters.clone());
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
        peers.push(Peer {
            store,
            counters,
            transport,
        });
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
    while peers.iter().any(|peer| peer.store.lock().unwrap().len() < n) {
        rounds += 1;
        assert!(rounds <= n, "no convergence after {n} rounds");
        for (peer, conn) in peers.iter().zip(&connections) {
            let (clock, config) = (clock(), StreamConfig::default());
            let exchange = sync::sync_with(conn, &peer.store, &clock, &peer.counters, &config);
            tokio::time::timeout(WAIT, exchange)
                .await
                .expect("exchange in time")
                .expect("exchange succeeds");
        }
    }
    println!("converged after {rounds} rounds");
    let digest = peers[0].store.lock().unwrap().digest();
    assert_eq!(digest.len(), n);
    for peer in &peers {
        assert_eq!(peer.store.lock().unwrap().digest(), digest);
        assert_eq!(peer.counters.refused.load(Ordering::Relaxed), 0);
    }
    // A further exchange between converged peers carries no record.
    let again = sync::sync_with(
        &connections[0],
        &peers[0].store,
        &clock(),
        &peers[0].counters,
        &StreamConfig::default(),
    )
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

    // Mallory speaks the protocol by hand: an empty digest, then a push of a record she signed for the victim.
    let config = StreamConfig::default();
    let (mut send, mut recv) = colony_transports::rpc::open::<SyncStep>(&conn, &sync::protocol(), &config)
        .await
        .unwrap();
    let empty = WireBatch::default().encode().unwrap();
    send.send(&sync::step(1), empty).await.unwrap();
    let (_, reply) = tokio::time::timeout(WAIT, recv.recv_required("reply"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        WireBatch::decode(&reply).unwrap().records.len(),
        1,
        "the honest peer offers its own record"
    );
    let mut forged = own_record(&mallory, 666);
    forged.subkey = Some(Subkey::Peer(victim.peer_id()));
    let push = WireBatch {
        records: vec![WireRecord::from(&forged)],
        digest: Vec::new(),
    };
    send.send(&sync::step(3), push.encode().unwrap()).await.unwrap();
    send.finish().await.unwrap();

    let counters = peers[0].counters.clone();
    tokio::time::timeout(WAIT, async {
        while counters.refused.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the forged record is refused");
    assert_eq!(
        peers[0].store.lock().unwrap().len(),
        1,
        "only the peer's own record is stored"
    );
    for task in tasks {
        task.abort();
    }
}
