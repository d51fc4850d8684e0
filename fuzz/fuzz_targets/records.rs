//! Fuzzes the records that peers exchange: the input is tried as an anti-entropy batch
//! (`WireBatch::decode`, the payload of `/colony/records/2`), as one record broadcast on SWIM packets
//! (`RecordBroadcasts::receive_item`), and as a sync step header (`SyncStep`).
//!
//! A decoded batch is applied as `/colony/records/2` applies it: every record through a `Replica` with the
//! default limits (validation, signatures, the value schemas of progress and matchmaking records,
//! publishing rate limits) and through a `RecordStore` with tiny limits; the batch's digest is read with
//! `digest_entries` and answered with `missing_from`; the progress records stored are read back with
//! `parse_records` and turned into the swarm's progress with `estimate`.
//!
//! Invariants: a decoded batch re-encodes and decodes to the same bytes; a record converts to its wire
//! form and back unchanged; whatever a store holds passes the store's own validation again (finite
//! expiration after now, sizes within the limits, a valid owner signature, a value of its kind's schema)
//! and respects the count limits; digests are sorted and list every entry; the records offered to a peer
//! are live entries of the store; progress read from the store names its owner, and the estimate is finite
//! and never behind the local epoch.

#![no_main]

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, LazyLock};

use colony::membership::broadcast::RecordBroadcasts;
use colony::membership::{MemberId, Role};
use colony::progress::{LocalProgress, PROGRESS_KEY, ProgressConfig, estimate, parse_records};
use colony::records::replica::{PublishLimits, Replica};
use colony::records::sync::SyncStep;
use colony::records::wire::{WireBatch, WireRecord};
use colony::records::{DigestEntry, Record, RecordLimits, RecordStore, Stored, Subkey};
use colony_fuzz::{NOW, RUN_ID, aligned, peer, schemas, tight_record_limits};
use colony_transports::wire::WireMessage;
use foca::BroadcastHandler;
use libfuzzer_sys::fuzz_target;

/// A replica with the default limits and the trainer's schemas, at [`NOW`].
fn new_replica() -> Arc<Replica> {
    Arc::new(Replica::new(
        RecordStore::new(RUN_ID, RecordLimits::default(), schemas()),
        Arc::new(|| NOW),
        PublishLimits::default(),
    ))
}

static UNDECODABLE: LazyLock<Arc<Replica>> = LazyLock::new(new_replica);

fuzz_target!(|data: &[u8]| {
    check_sync_step(data);
    check_broadcast_item(data);

    let Ok(batch) = WireBatch::decode(data) else { return };
    let encoded = batch.encode().expect("a decoded batch re-encodes");
    let again = WireBatch::decode(&encoded).expect("a re-encoded batch decodes");
    assert_eq!(
        again.encode().expect("re-encodes").as_ref(),
        encoded.as_ref(),
        "a batch changed on a round trip"
    );

    let remote = batch.digest_entries();
    if let Ok(remote) = &remote {
        assert_eq!(remote.len(), batch.digest.len());
        assert!(is_sorted(remote), "digest_entries did not sort the digest");
    }

    // The default limits, behind a replica: what `/colony/records/2` applies records to.
    let replica = new_replica();
    for wire in &batch.records {
        let record = Record::try_from(wire.clone());
        if let Ok(record) = &record {
            let back = Record::try_from(WireRecord::from(record)).expect("converts back");
            assert!(same_record(&back, record), "{back:?} came back as {record:?}");
        }
        let applied = replica.apply_wire(wire.clone(), peer(15));
        if record.is_err() {
            assert!(applied.is_err(), "a malformed record was applied");
        }
    }
    let counters = replica.counters();
    assert!(counters.stored() + counters.refused_total() <= batch.records.len() as u64);
    let (digest, _) = replica.digest();
    assert_eq!(digest.len(), replica.len());
    assert!(is_sorted(&digest));
    if let Ok(remote) = &remote {
        for record in replica.missing_from(remote) {
            assert!(record.expiration > NOW, "an expired record was offered");
            assert!(digest.iter().any(|e| e.key == record.key && e.subkey == record.subkey));
        }
    }
    check_progress(replica.get(PROGRESS_KEY).as_ref());

    // Tiny limits, on a bare store.
    let limits = tight_record_limits();
    let mut store = RecordStore::new(RUN_ID, limits.clone(), schemas());
    for wire in &batch.records {
        if let Ok(record) = Record::try_from(wire.clone()) {
            let _ = store.store(record, NOW);
        }
    }
    check_store(&store, &limits);
    check_store_records(&mut store);
});

/// Records are equal, with expirations compared bit for bit (a NaN decodes, and is refused later).
fn same_record(a: &Record, b: &Record) -> bool {
    a.key == b.key
        && a.subkey == b.subkey
        && a.value == b.value
        && a.signature == b.signature
        && a.expiration.to_bits() == b.expiration.to_bits()
}

fn is_sorted(entries: &[DigestEntry]) -> bool {
    entries
        .windows(2)
        .all(|w| (&w[0].key, &w[0].subkey) <= (&w[1].key, &w[1].subkey))
}

/// Everything a store holds is within its limits.
fn check_store(store: &RecordStore, limits: &RecordLimits) {
    assert!(store.len() <= limits.max_records, "more records than max_records");
    let mut per_peer: HashMap<_, usize> = HashMap::new();
    for record in store.records() {
        assert!(record.key.len() <= limits.max_key_bytes);
        if let Some(Subkey::Name(name)) = &record.subkey {
            assert!(name.len() <= limits.max_subkey_bytes);
        }
        if let Some(Subkey::Peer(owner)) = &record.subkey {
            *per_peer.entry(*owner).or_default() += 1;
        }
        if let Some(value) = &record.value {
            assert!(value.len() <= limits.max_value_bytes);
        }
    }
    assert!(
        per_peer.values().all(|&n| n <= limits.max_records_per_peer),
        "more records than max_records_per_peer"
    );
    assert_eq!(store.digest().len(), store.len());
}

/// Everything a store holds passes its validation again, and storing it again changes nothing.
fn check_store_records(store: &mut RecordStore) {
    for record in store.records() {
        assert!(record.expiration.is_finite() && record.expiration > NOW);
        if let Err(err) = store.validate(&record, NOW) {
            panic!("a stored record fails validation: {err}");
        }
        assert_eq!(store.store(record, NOW), Ok(Stored::Outdated));
    }
}

/// Progress records as the progress tracker reads them, and the estimate made from them.
fn check_progress(view: Option<&colony::records::View>) {
    let records = parse_records(view);
    if let Some(colony::records::View::Dictionary { entries, .. }) = view {
        for progress in &records {
            assert!(
                entries.contains_key(&Subkey::Peer(progress.peer)),
                "progress of a peer that is not its owner"
            );
        }
    }
    let local = LocalProgress {
        peer: peer(0),
        epoch: 3,
        samples_accumulated: 10,
        samples_per_second: 5.0,
        time: NOW - 1.0,
        client_mode: false,
        target_batch_size: 256,
    };
    let config = ProgressConfig::new(256);
    let global = estimate(&records, &local, NOW, &config);
    assert!(global.epoch >= local.epoch);
    assert_eq!(global.num_peers, records.len());
    assert!(global.num_clients <= global.num_peers);
    assert!(
        global.eta_next_epoch.is_finite() && global.eta_next_epoch >= NOW,
        "ETA {}",
        global.eta_next_epoch
    );
    let wait = global.next_fetch_time - NOW;
    let longest = config
        .max_refresh_period
        .max(config.default_refresh_period)
        .as_secs_f64();
    assert!(
        wait.is_finite() && wait >= 0.0 && wait <= longest + 1e-6,
        "next refresh in {wait} s"
    );
}

fn check_sync_step(data: &[u8]) {
    let bytes = aligned(data);
    let Ok(step) = SyncStep::access_archived(&bytes).and_then(SyncStep::decode_archived) else {
        return;
    };
    let again = step.encode().expect("a step re-encodes");
    assert_eq!(
        SyncStep::access_archived(&again).and_then(SyncStep::decode_archived),
        Ok(step)
    );
}

/// The input as one record broadcast item: `RecordBroadcasts` applies it to a replica as SWIM delivers it.
fn check_broadcast_item(data: &[u8]) {
    let bytes = aligned(data);
    let wire = WireRecord::access_archived(&bytes).and_then(WireRecord::decode_archived);
    let replica = if wire.is_ok() {
        new_replica()
    } else {
        // Bytes that are no record only count as malformed: one replica serves them all (and must stay
        // empty), which spares building one per input.
        UNDECODABLE.clone()
    };
    let fresh = Arc::new(AtomicBool::new(false));
    let mut handler = RecordBroadcasts::new(replica.clone(), fresh.clone());
    let sender = MemberId {
        peer: peer(14),
        generation: 1,
        role: Role::Trainer,
        address: None,
        bandwidth_mbps: 0.0,
    };
    let result = handler.receive_item(data, Some(&sender));
    let version = result.expect("the record broadcast handler never fails a packet");
    let stored = replica.len();
    if version.is_some() {
        assert_eq!(stored, 1, "a broadcast that won its slot was not stored");
        assert!(fresh.load(std::sync::atomic::Ordering::Relaxed));
        assert!(wire.is_ok());
    } else {
        assert_eq!(stored, 0, "a refused broadcast was stored");
    }
    if let Ok(wire) = wire
        && let Ok(record) = Record::try_from(wire)
    {
        let encoded = colony::membership::broadcast::encode(&record).expect("a record encodes");
        let back = WireRecord::access_archived(&aligned(&encoded))
            .and_then(WireRecord::decode_archived)
            .map(Record::try_from);
        assert!(matches!(back, Ok(Ok(ref r)) if same_record(r, &record)));
    }
}
