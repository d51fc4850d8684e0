//! State transfer over the in-process transport: donor choice by priority, refusals, donors that die,
//! stall or lie, parallel donors, and cancellation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use colony_averaging::net::{Connector, Endpoint};
use colony_averaging::state_transfer::{
    self, Donor, DonorIssue, DownloadConfig, DownloadError, DownloadedState, StateInfo, StateProvider, StateRequest,
    StateResponse, StateSnapshot,
};
use colony_averaging::tensor::{FlatTensors, TensorInfo, TensorLayout};
use colony_transports::emulation::LinkEmulator;
use colony_transports::mem::{MemConfig, MemHub};
use colony_transports::rpc::{self, IncomingStream, Router};
use colony_transports::wire::WireError;
use colony_transports::{Address, Keypair, PeerId, Scheme};
use tokio::sync::Semaphore;

/// A model of `values` values: a large weight and a 3-value bias that holds the donor's number.
fn layout(values: usize) -> Arc<TensorLayout> {
    Arc::new(
        TensorLayout::new(vec![
            TensorInfo::new("weight", [values - 3]),
            TensorInfo::new("bias", [3]),
        ])
        .unwrap(),
    )
}

/// Values that identify donor `donor` everywhere in the buffer.
fn state_of(layout: &Arc<TensorLayout>, donor: u32) -> FlatTensors {
    let mut tensors = layout.zeros();
    for (j, value) in tensors.tensor_mut(0).iter_mut().enumerate() {
        *value = donor as f32 * 1000.0 + (j % 997) as f32 * 0.25;
    }
    tensors.tensor_mut(1).fill(donor as f32);
    tensors
}

fn snapshot(layout: &Arc<TensorLayout>, donor: u32, epoch: u64) -> Arc<StateSnapshot> {
    Arc::new(StateSnapshot {
        epoch,
        metadata: Bytes::from(format!("optimizer of donor {donor}")),
        tensors: state_of(layout, donor),
    })
}

/// A provider the test switches on and off.
#[derive(Default)]
struct Switch(Mutex<Option<Arc<StateSnapshot>>>);

impl Switch {
    fn set(&self, snapshot: Option<Arc<StateSnapshot>>) {
        *self.0.lock().unwrap() = snapshot;
    }
}

impl StateProvider for Switch {
    fn snapshot(&self) -> Option<Arc<StateSnapshot>> {
        self.0.lock().unwrap().clone()
    }
}

struct Peer {
    id: PeerId,
    endpoint: Endpoint,
    connector: Arc<dyn Connector>,
}

async fn start_peer(hub: &MemHub, name: &str, router: Router) -> Peer {
    let keypair = Keypair::generate();
    let address = Address::new(Scheme::Mem, name, None).unwrap();
    let endpoint = Endpoint::listen(hub.transport(&keypair), &address, router)
        .await
        .unwrap();
    let connector = endpoint.connector();
    Peer {
        id: keypair.peer_id(),
        endpoint,
        connector,
    }
}

async fn honest_donor(hub: &MemHub, name: &str, provider: Arc<dyn StateProvider>) -> Peer {
    let mut router = Router::default();
    state_transfer::serve(&mut router, provider);
    start_peer(hub, name, router).await
}

fn introduce(receiver: &Peer, donors: &[&Peer]) {
    for donor in donors {
        receiver.endpoint.add_address(donor.endpoint.local_address().clone());
    }
}

/// Short timeouts, small chunks (several per test state) and a fixed tie order.
fn config() -> DownloadConfig {
    DownloadConfig {
        chunk_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(4),
        chunk_bytes: 4096,
        tie_break_seed: Some(7),
        ..DownloadConfig::default()
    }
}

/// Byte-for-byte equality, reporting the first difference rather than printing millions of values.
fn assert_same(got: &FlatTensors, expected: &FlatTensors) {
    assert_eq!(got.as_slice().len(), expected.as_slice().len());
    if let Some(at) = got
        .as_slice()
        .iter()
        .zip(expected.as_slice())
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        panic!(
            "value {at} differs: got {}, expected {}",
            got.as_slice()[at],
            expected.as_slice()[at]
        );
    }
}

fn issue_of<'a>(state_or_error: &'a [state_transfer::DonorReport], peer: &Peer) -> Option<&'a DonorIssue> {
    state_or_error.iter().find(|r| r.peer == peer.id).map(|r| &r.issue)
}

async fn fetch(
    receiver: &Peer,
    donors: &[Donor],
    layout: &Arc<TensorLayout>,
    own_epoch: Option<u64>,
) -> DownloadedState {
    state_transfer::download(&*receiver.connector, donors, layout, own_epoch, &config())
        .await
        .unwrap_or_else(|error| panic!("download failed: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_donor_with_the_highest_priority_serves_the_state() {
    let hub = MemHub::new();
    let layout = layout(10_000);
    let priority = |i: u64| 5 - 2u64.abs_diff(i);
    let mut providers = Vec::new();
    let mut peers = Vec::new();
    for i in 0..4u32 {
        let provider = Arc::new(Switch::default());
        if i != 1 {
            provider.set(Some(snapshot(&layout, i, priority(i as u64))));
        }
        peers.push(honest_donor(&hub, &format!("peer-{i}"), provider.clone()).await);
        providers.push(provider);
    }
    for receiver in &peers {
        introduce(receiver, &peers.iter().collect::<Vec<_>>());
    }
    let donors_for = |receiver: usize, priorities: &[u64]| -> Vec<Donor> {
        (0..4)
            .filter(|&i| i != receiver)
            .map(|i| Donor {
                peer: peers[i].id,
                priority: priorities[i],
            })
            .collect()
    };
    let mut priorities: Vec<u64> = (0..4).map(priority).collect();

    // Peer 0 sees priorities 4, 5, 4: peer 2 serves alone.
    let got = fetch(&peers[0], &donors_for(0, &priorities), &layout, None).await;
    assert_same(&got.tensors, &state_of(&layout, 2));
    assert_eq!(got.tensors.tensor(1), &[2.0; 3]);
    assert_eq!((got.epoch, &got.metadata[..]), (5, &b"optimizer of donor 2"[..]));
    assert_eq!(got.donors, vec![peers[2].id]);

    // Peer 2 sees 3, 4 (not sharing), 4: peer 3 serves; peer 1, if it was asked, refused.
    let got = fetch(&peers[2], &donors_for(2, &priorities), &layout, None).await;
    assert_same(&got.tensors, &state_of(&layout, 3));
    assert_eq!(got.donors, vec![peers[3].id]);
    if let Some(issue) = issue_of(&got.issues, &peers[1]) {
        assert!(matches!(issue, DonorIssue::NotSharing(_)), "{issue}");
    }

    // Peer 0 moves to epoch 10: now it is peer 2's best donor.
    priorities[0] = 10;
    providers[0].set(Some(snapshot(&layout, 0, 10)));
    let got = fetch(&peers[2], &donors_for(2, &priorities), &layout, None).await;
    assert_same(&got.tensors, &state_of(&layout, 0));
    assert_eq!((got.epoch, got.donors.clone()), (10, vec![peers[0].id]));

    // Peers 1 and 2 stop sharing: peer 0 is served by peer 3 and learns why peer 2 was skipped.
    providers[2].set(None);
    let got = fetch(&peers[0], &donors_for(0, &priorities), &layout, None).await;
    assert_same(&got.tensors, &state_of(&layout, 3));
    assert_eq!(got.donors, vec![peers[3].id]);
    let issue = issue_of(&got.issues, &peers[2]).expect("the best donor was asked first");
    assert!(
        matches!(issue, DonorIssue::NotSharing(reason) if reason.contains("does not share")),
        "{issue}"
    );
    assert!(issue.is_refusal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn donors_behind_the_receiver_are_refused() {
    let hub = MemHub::new();
    let layout = layout(5_000);
    let low = honest_donor(&hub, "low", Arc::new(Switch(Mutex::new(Some(snapshot(&layout, 1, 4)))))).await;
    let mid = honest_donor(&hub, "mid", Arc::new(Switch(Mutex::new(Some(snapshot(&layout, 2, 5)))))).await;
    // Announced 12, but its state is at epoch 7.
    let stale = honest_donor(
        &hub,
        "stale",
        Arc::new(Switch(Mutex::new(Some(snapshot(&layout, 3, 7))))),
    )
    .await;
    let receiver = start_peer(&hub, "receiver", Router::default()).await;
    introduce(&receiver, &[&low, &mid, &stale]);
    let donors = [
        Donor {
            peer: low.id,
            priority: 4,
        },
        Donor {
            peer: mid.id,
            priority: 5,
        },
        Donor {
            peer: stale.id,
            priority: 12,
        },
    ];

    let error = state_transfer::download(&*receiver.connector, &donors, &layout, Some(10), &config())
        .await
        .unwrap_err();
    assert!(matches!(error, DownloadError::Exhausted { .. }), "{error}");
    assert_eq!(error.donors().len(), 3);
    for (peer, priority) in [(&low, 4), (&mid, 5)] {
        assert_eq!(
            issue_of(error.donors(), peer),
            Some(&DonorIssue::PriorityBelowOwnEpoch {
                priority,
                own_epoch: 10
            })
        );
    }
    assert_eq!(
        issue_of(error.donors(), &stale),
        Some(&DonorIssue::EpochBelowOwn {
            epoch: 7,
            own_epoch: 10
        })
    );
    let message = error.to_string();
    for peer in [&low, &mid, &stale] {
        assert!(message.contains(&peer.id.to_string()), "{message}");
    }

    // A donor at the receiver's own epoch is fine.
    let got = fetch(&receiver, &donors, &layout, Some(5)).await;
    assert_eq!(got.epoch, 7);
    assert_same(&got.tensors, &state_of(&layout, 3));

    let config = config();
    let no_donors = state_transfer::download(&*receiver.connector, &[], &layout, None, &config);
    assert_send(&no_donors);
    let no_donors = no_donors.await;
    assert!(matches!(no_donors, Err(DownloadError::NoDonors)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_answers_bogus_requests_with_errors_and_keeps_serving() {
    let hub = MemHub::new();
    let layout = layout(5_000);
    let expected = snapshot(&layout, 5, 2);
    let donor = honest_donor(&hub, "donor", Arc::new(Switch(Mutex::new(Some(expected.clone()))))).await;
    let receiver = start_peer(&hub, "receiver", Router::default()).await;
    introduce(&receiver, &[&donor]);
    let conn = receiver.connector.connect(&donor.id).await.unwrap();
    let bogus = [
        (0, 0, 1, "not served"),
        (u64::MAX, 0, 1, "not served"),
        (1024, u64::MAX, 2, "requested"),
        (1024, 4, 2, "requested"),
    ];
    for (chunk_values, start_chunk, chunk_count, expected_error) in bogus {
        let (mut send, mut recv) = rpc::open::<StateResponse>(&conn, &state_transfer::protocol(), &Default::default())
            .await
            .unwrap();
        let request = StateRequest {
            chunk_values,
            start_chunk,
            chunk_count,
        };
        send.send(&request, Bytes::new()).await.unwrap();
        send.finish().await.unwrap();
        let error = loop {
            match recv.recv().await {
                Ok(Some((StateResponse::Info(info), _))) => assert_eq!(info.total_values, 5_000),
                Ok(other) => panic!("{request:?}: unexpected {other:?}"),
                Err(error) => break error,
            }
        };
        assert!(
            matches!(&error, WireError::Remote(message) if message.contains(expected_error)),
            "{request:?}: {error}"
        );
    }
    let got = fetch(
        &receiver,
        &[Donor {
            peer: donor.id,
            priority: 2,
        }],
        &layout,
        None,
    )
    .await;
    assert_same(&got.tensors, &expected.tensors);
}

/// What a scripted donor does wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Script {
    /// Kills its own peer (all connections drop) after sending this many chunks.
    KillAfter(u64),
    /// Stops sending after this many chunks, without closing anything.
    StallAfter(u64),
    /// Sends this chunk one value short.
    Truncate(u64),
    /// Numbers its second chunk wrongly.
    WrongIndex,
    /// Sends a chunk before the info.
    ChunkFirst,
    /// Announces one value more than it has.
    WrongTotal,
    /// Answers with bytes that are not a frame.
    Garbage,
}

/// A donor that follows `script`, built on the public messages like a third-party implementation would be.
async fn scripted_donor(
    hub: &MemHub,
    name: &str,
    snapshot: Arc<StateSnapshot>,
    script: Script,
    emulator: Option<LinkEmulator>,
) -> Peer {
    let keypair = Keypair::generate();
    let id = keypair.peer_id();
    let mut router = Router::default();
    router.stream(state_transfer::protocol(), move |incoming| {
        serve_script(incoming, snapshot.clone(), script, emulator.clone(), id)
    });
    let address = Address::new(Scheme::Mem, name, None).unwrap();
    let endpoint = Endpoint::listen(hub.transport(&keypair), &address, router)
        .await
        .unwrap();
    let connector = endpoint.connector();
    Peer {
        id,
        endpoint,
        connector,
    }
}

async fn serve_script(
    mut incoming: IncomingStream,
    snapshot: Arc<StateSnapshot>,
    script: Script,
    emulator: Option<LinkEmulator>,
    me: PeerId,
) -> Result<(), WireError> {
    let (request, _) = incoming.framed::<StateRequest>().recv_required("the request").await?;
    let mut send = incoming.send;
    if script == Script::Garbage {
        let mut raw = send.into_inner();
        raw.write_all(&[0xff; 64]).await?;
        raw.finish().await?;
        return Ok(());
    }
    let values = snapshot.tensors.as_slice();
    let chunk = request.chunk_values as usize;
    if script == Script::ChunkFirst {
        send.send(&StateResponse::Chunk { index: 0 }, encode(&values[..chunk]))
            .await?;
    }
    let info = StateInfo {
        epoch: snapshot.epoch,
        schema_hash: snapshot.tensors.layout().schema_hash().0,
        total_values: values.len() as u64 + u64::from(script == Script::WrongTotal),
        chunk_values: request.chunk_values,
    };
    send.send(&StateResponse::Info(info), snapshot.metadata.clone()).await?;
    for (sent, index) in (request.start_chunk..request.start_chunk + request.chunk_count).enumerate() {
        let sent = sent as u64;
        match script {
            Script::KillAfter(after) if sent == after => {
                emulator.as_ref().expect("a kill needs the emulator").kill(me);
                return Ok(());
            }
            Script::StallAfter(after) if sent == after => std::future::pending::<()>().await,
            _ => {}
        }
        let start = index as usize * chunk;
        let end = (start + chunk).min(values.len());
        let mut payload = encode(&values[start..end]);
        if script == Script::Truncate(index) {
            payload.truncate(payload.len() - 4);
        }
        let index = if script == Script::WrongIndex && sent == 1 {
            index + 1
        } else {
            index
        };
        send.send(&StateResponse::Chunk { index }, payload).await?;
    }
    send.finish().await
}

fn encode(values: &[f32]) -> Bytes {
    values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_killed_mid_transfer_is_replaced_by_the_next() {
    let emulator = LinkEmulator::new();
    let hub = MemHub::with_emulator(emulator.clone());
    let layout = layout(64 * 1024);
    let expected = snapshot(&layout, 1, 5);
    let dying = scripted_donor(
        &hub,
        "dying",
        expected.clone(),
        Script::KillAfter(3),
        Some(emulator.clone()),
    )
    .await;
    // Its record is older (priority 4) but its state is the same epoch's.
    let backup = honest_donor(&hub, "backup", Arc::new(Switch(Mutex::new(Some(expected.clone()))))).await;
    let receiver = start_peer(&hub, "receiver", Router::default()).await;
    introduce(&receiver, &[&dying, &backup]);
    let donors = [
        Donor {
            peer: backup.id,
            priority: 4,
        },
        Donor {
            peer: dying.id,
            priority: 5,
        },
    ];

    let got = fetch(&receiver, &donors, &layout, Some(4)).await;
    assert_same(&got.tensors, &expected.tensors);
    assert_eq!((got.epoch, got.metadata.clone()), (5, expected.metadata.clone()));
    assert_eq!(got.donors, vec![dying.id, backup.id], "both served: {:?}", got.issues);
    let issue = issue_of(&got.issues, &dying).expect("the killed donor is reported");
    assert!(matches!(issue, DonorIssue::StreamFailed(_)), "{issue}");
    assert_eq!(got.issues.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_donor_times_out_per_chunk_and_the_next_finishes() {
    let hub = MemHub::new();
    let layout = layout(64 * 1024);
    let expected = snapshot(&layout, 1, 5);
    let stalling = scripted_donor(&hub, "stalling", expected.clone(), Script::StallAfter(2), None).await;
    let backup = honest_donor(&hub, "backup", Arc::new(Switch(Mutex::new(Some(expected.clone()))))).await;
    let receiver = start_peer(&hub, "receiver", Router::default()).await;
    introduce(&receiver, &[&stalling, &backup]);
    let donors = [
        Donor {
            peer: stalling.id,
            priority: 5,
        },
        Donor {
            peer: backup.id,
            priority: 4,
        },
    ];
    let config = DownloadConfig {
        chunk_timeout: Duration::from_millis(300),
        ..config()
    };

    let started = tokio::time::Instant::now();
    let got = state_transfer::download(&*receiver.connector, &donors, &layout, None, &config)
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the stall was waited out"
    );
    assert_same(&got.tensors, &expected.tensors);
    assert_eq!(got.donors, vec![stalling.id, backup.id]);
    let issue = issue_of(&got.issues, &stalling).expect("the stalled donor is reported");
    assert!(matches!(issue, DonorIssue::TimedOut(_)), "{issue}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_donors_serve_disjoint_ranges_in_parallel() {
    let hub = MemHub::new();
    let layout = layout(8 * 1024 * 1024);
    let expected = snapshot(&layout, 4, 7);
    let mut donors = Vec::new();
    for i in 0..3 {
        donors.push(
            honest_donor(
                &hub,
                &format!("donor-{i}"),
                Arc::new(Switch(Mutex::new(Some(expected.clone())))),
            )
            .await,
        );
    }
    let receiver = start_peer(&hub, "receiver", Router::default()).await;
    introduce(&receiver, &donors.iter().collect::<Vec<_>>());
    let list: Vec<Donor> = donors
        .iter()
        .map(|d| Donor {
            peer: d.id,
            priority: 7,
        })
        .collect();
    let config = DownloadConfig {
        chunk_bytes: state_transfer::DEFAULT_CHUNK_BYTES,
        ..config()
    };

    let got = state_transfer::download(&*receiver.connector, &list, &layout, Some(7), &config)
        .await
        .unwrap();
    assert_same(&got.tensors, &expected.tensors);
    assert_eq!(got.epoch, 7);
    assert!(got.issues.is_empty(), "{:?}", got.issues);
    assert!(got.donors.len() > 1, "only {:?} served", got.donors);
}

/// A misbehaving donor asked first (priority 9), an honest one after it (priority 1, another epoch so that
/// nothing of the first is mixed in): the download succeeds with the honest state and reports the first.
async fn misbehaving_donor_is_dropped(
    bad: Arc<StateSnapshot>,
    script: Option<Script>,
    config: DownloadConfig,
) -> DonorIssue {
    let hub = MemHub::new();
    let layout = layout(16 * 1024);
    let bad_donor = match script {
        Some(script) => scripted_donor(&hub, "bad", bad, script, None).await,
        None => honest_donor(&hub, "bad", Arc::new(Switch(Mutex::new(Some(bad))))).await,
    };
    let expected = snapshot(&layout, 2, 1);
    let good = honest_donor(&hub, "good", Arc::new(Switch(Mutex::new(Some(expected.clone()))))).await;
    let receiver = start_peer(&hub, "receiver", Router::default()).await;
    introduce(&receiver, &[&bad_donor, &good]);
    let donors = [
        Donor {
            peer: bad_donor.id,
            priority: 9,
        },
        Donor {
            peer: good.id,
            priority: 1,
        },
    ];
    let got = state_transfer::download(&*receiver.connector, &donors, &layout, None, &config)
        .await
        .unwrap_or_else(|error| panic!("the honest donor should have served: {error}"));
    assert_same(&got.tensors, &expected.tensors);
    assert_eq!((got.epoch, got.donors.clone()), (1, vec![good.id]));
    assert_eq!(got.issues.len(), 1, "{:?}", got.issues);
    issue_of(&got.issues, &bad_donor)
        .expect("the bad donor is reported")
        .clone()
}

fn bad_snapshot() -> Arc<StateSnapshot> {
    snapshot(&layout(16 * 1024), 6, 9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_of_the_wrong_length_drops_the_donor() {
    let issue = misbehaving_donor_is_dropped(bad_snapshot(), Some(Script::Truncate(2)), config()).await;
    assert_eq!(
        issue,
        DonorIssue::ChunkLength {
            index: 2,
            bytes: 4092,
            expected_bytes: 4096
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_values_drop_the_donor() {
    let mut bad = (*bad_snapshot()).clone();
    bad.tensors.as_mut_slice()[3 * 1024 + 5] = f32::NAN;
    let issue = misbehaving_donor_is_dropped(Arc::new(bad), None, config()).await;
    assert_eq!(issue, DonorIssue::NonFinite { index: 3, position: 5 });

    let mut bad = (*bad_snapshot()).clone();
    bad.tensors.as_mut_slice()[0] = f32::NEG_INFINITY;
    let issue = misbehaving_donor_is_dropped(Arc::new(bad), None, config()).await;
    assert_eq!(issue, DonorIssue::NonFinite { index: 0, position: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_schema_or_size_drops_the_donor() {
    let other = Arc::new(TensorLayout::new(vec![TensorInfo::new("other", [16 * 1024])]).unwrap());
    let bad = Arc::new(StateSnapshot {
        epoch: 9,
        metadata: Bytes::new(),
        tensors: other.zeros(),
    });
    let issue = misbehaving_donor_is_dropped(bad, None, config()).await;
    assert!(matches!(issue, DonorIssue::SchemaMismatch { .. }), "{issue}");

    let issue = misbehaving_donor_is_dropped(bad_snapshot(), Some(Script::WrongTotal), config()).await;
    assert_eq!(
        issue,
        DonorIssue::SizeMismatch {
            announced: 16 * 1024 + 1,
            expected: 16 * 1024
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_drop_the_donor() {
    for script in [Script::WrongIndex, Script::ChunkFirst, Script::Garbage] {
        let issue = misbehaving_donor_is_dropped(bad_snapshot(), Some(script), config()).await;
        assert!(matches!(issue, DonorIssue::Malformed(_)), "{script:?}: {issue}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_drops_the_donor() {
    let mut bad = (*bad_snapshot()).clone();
    bad.metadata = Bytes::from(vec![7u8; 2048]);
    let config = DownloadConfig {
        max_metadata_bytes: 1024,
        ..config()
    };
    let issue = misbehaving_donor_is_dropped(Arc::new(bad), None, config).await;
    assert_eq!(issue, DonorIssue::MetadataTooLarge { len: 2048, limit: 1024 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_download_stops_its_streams() {
    // One chunk of buffer per stream: a reader that is gone cannot hide behind buffered chunks, so the
    // donor either meets a closed stream or blocks (and never finishes).
    let hub = MemHub::with_config(MemConfig {
        stream_buffer_chunks: 1,
        ..MemConfig::default()
    });
    let layout = layout(64 * 1024);
    let expected = snapshot(&layout, 1, 3);
    let gate = Arc::new(Semaphore::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let donor_failed = Arc::new(AtomicBool::new(false));
    let mut router = Router::default();
    {
        let (gate, sent, donor_failed, snapshot) = (gate.clone(), sent.clone(), donor_failed.clone(), expected.clone());
        router.stream(state_transfer::protocol(), move |mut incoming| {
            let (gate, sent, donor_failed, snapshot) =
                (gate.clone(), sent.clone(), donor_failed.clone(), snapshot.clone());
            async move {
                let (request, _) = incoming.framed::<StateRequest>().recv_required("the request").await?;
                let info = StateInfo {
                    epoch: snapshot.epoch,
                    schema_hash: snapshot.tensors.layout().schema_hash().0,
                    total_values: snapshot.tensors.as_slice().len() as u64,
                    chunk_values: request.chunk_values,
                };
                incoming.send.send(&StateResponse::Info(info), Bytes::new()).await?;
                let chunk = request.chunk_values as usize;
                for index in request.start_chunk..request.start_chunk + request.chunk_count {
                    gate.acquire().await.unwrap().forget();
                    let start = index as usize * chunk;
                    let payload = encode(&snapshot.tensors.as_slice()[start..start + chunk]);
                    if let Err(error) = incoming.send.send(&StateResponse::Chunk { index }, payload).await {
                        donor_failed.store(true, Ordering::Release);
                        return Err(error);
                    }
                    sent.fetch_add(1, Ordering::AcqRel);
                }
                incoming.send.finish().await
            }
        });
    }
    let donor = start_peer(&hub, "gated", router).await;
    let receiver = start_peer(&hub, "receiver", Router::default()).await;
    introduce(&receiver, &[&donor]);
    let donors = [Donor {
        peer: donor.id,
        priority: 3,
    }];

    let config = config();
    {
        let download = state_transfer::download(&*receiver.connector, &donors, &layout, None, &config);
        tokio::pin!(download);
        gate.add_permits(2);
        // Poll the download until the two chunks let through are sent, then drop it.
        tokio::select! {
            result = &mut download => panic!("2 of 64 chunks cannot finish a download: {:?}", result.map(|s| s.epoch)),
            () = wait_until(|| sent.load(Ordering::Acquire) == 2, Duration::from_secs(3)) => {}
        }
        assert_eq!(sent.load(Ordering::Acquire), 2, "the download did not start");
    }
    // The receiver's stream is gone: the donor's sends fail.
    gate.add_permits(64);
    wait_until(|| donor_failed.load(Ordering::Acquire), Duration::from_secs(3)).await;
    assert!(
        donor_failed.load(Ordering::Acquire),
        "the donor kept sending to a dropped download"
    );
    // Cancellation is asynchronous (tasks stop at their next poll), so a few chunks may still have left.
    let sent = sent.load(Ordering::Acquire);
    assert!(sent < 10, "{sent} of 64 chunks sent after the download was dropped");
}

/// The runtime spawns downloads on its own tasks: the future must be `Send`.
fn assert_send<T: Send>(_: &T) {}

async fn wait_until(condition: impl Fn() -> bool, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
