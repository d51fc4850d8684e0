//! Hivemind's storage and validator cases, rewritten for Colony, and the convergence property.

use super::*;
use proptest::prelude::*;

const RUN: &str = "run-1";
const NOW: Time = 1_000.0;

#[derive(Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Progress {
    epoch: u64,
    samples: u64,
}

fn schemas() -> Schemas {
    let mut schemas = Schemas::default();
    schemas
        .register::<Progress>("progress")
        .register_with("test", |_| Ok(()));
    schemas
}

fn store() -> RecordStore {
    RecordStore::new(RUN, RecordLimits::default(), schemas())
}

fn plain(key: &str, value: &str, expiration: Time) -> Record {
    Record {
        key: key.into(),
        subkey: None,
        value: Some(Bytes::from(value.to_owned())),
        expiration,
        signature: None,
    }
}

fn sub(key: &str, subkey: &str, value: &str, expiration: Time) -> Record {
    Record {
        key: key.into(),
        subkey: Some(Subkey::Name(subkey.into())),
        value: Some(Bytes::from(value.to_owned())),
        expiration,
        signature: None,
    }
}

fn value_of(view: Option<View>) -> Option<String> {
    match view {
        Some(View::Value { value, .. }) => Some(String::from_utf8(value.to_vec()).unwrap()),
        _ => None,
    }
}

fn dictionary(view: Option<View>) -> (Vec<(String, String)>, Time) {
    match view {
        Some(View::Dictionary { entries, expiration }) => (
            entries
                .into_iter()
                .map(|(subkey, (value, _))| {
                    let Subkey::Name(name) = subkey else {
                        panic!("a named subkey")
                    };
                    (name, String::from_utf8(value.to_vec()).unwrap())
                })
                .collect(),
            expiration,
        ),
        other => panic!("expected a dictionary, got {other:?}"),
    }
}

#[test]
fn entries_expire() {
    let mut store = store();
    assert_eq!(
        store.store(plain("test/k", "v", NOW + 0.1), NOW).unwrap(),
        Stored::Visible
    );
    assert_eq!(value_of(store.get("test/k", NOW)), Some("v".into()));
    assert_eq!(store.get("test/k", NOW + 0.5), None);
    assert!(store.is_empty());
    let err = store.store(plain("test/k", "late", NOW - 1.0), NOW).unwrap_err();
    assert!(matches!(err, RecordError::Expired { .. }), "{err}");
    let err = store.store(plain("test/k", "nan", f64::NAN), NOW).unwrap_err();
    assert!(matches!(err, RecordError::InvalidExpiration { .. }), "{err}");
}

#[test]
fn a_newer_expiration_overwrites_an_older_does_not() {
    let mut store = store();
    store.store(plain("test/k", "v1", NOW + 10.0), NOW).unwrap();
    assert_eq!(
        store.store(plain("test/k", "v2", NOW + 5.0), NOW).unwrap(),
        Stored::Outdated
    );
    // At an equal expiration the greater bytes win (so that every replica keeps the same write).
    let tie = store.store(plain("test/k", "a-tie", NOW + 10.0), NOW).unwrap();
    assert_eq!(tie, Stored::Outdated);
    let tie = store.store(plain("test/k", "z-tie", NOW + 10.0), NOW).unwrap();
    assert_eq!(tie, Stored::Visible);
    assert_eq!(
        store.store(plain("test/k", "v3", NOW + 20.0), NOW).unwrap(),
        Stored::Visible
    );
    assert_eq!(value_of(store.get("test/k", NOW)), Some("v3".into()));
    // Re-delivering the same write changes nothing.
    assert_eq!(
        store.store(plain("test/k", "v3", NOW + 20.0), NOW).unwrap(),
        Stored::Outdated
    );
    assert_eq!(store.len(), 1);
}

#[test]
fn a_dictionary_expires_with_its_latest_subkey() {
    let mut store = store();
    for (subkey, offset) in [("subkey1", 2.0), ("subkey2", 3.0), ("subkey3", 1.0)] {
        assert_eq!(
            store.store(sub("test/foo", subkey, subkey, NOW + offset), NOW).unwrap(),
            Stored::Visible
        );
    }
    let (entries, expiration) = dictionary(store.get("test/foo", NOW));
    assert_eq!(entries.len(), 3);
    assert_eq!(expiration, NOW + 3.0);
    store
        .store(sub("test/foo", "subkey4", "subkey4", NOW + 4.0), NOW)
        .unwrap();
    assert_eq!(dictionary(store.get("test/foo", NOW)).1, NOW + 4.0);
    // Subkeys expire one by one.
    let (entries, _) = dictionary(store.get("test/foo", NOW + 2.5));
    assert_eq!(
        entries.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["subkey2", "subkey4"]
    );
}

#[test]
fn a_subkey_replaces_a_plain_value_only_when_later() {
    let mut store = store();
    store.store(plain("test/bar", "plain", NOW + 2.0), NOW).unwrap();
    assert_eq!(
        store.store(sub("test/bar", "subkeyA", "a1", NOW + 1.0), NOW).unwrap(),
        Stored::Hidden
    );
    assert_eq!(value_of(store.get("test/bar", NOW)), Some("plain".into()));
    assert_eq!(
        store.store(sub("test/bar", "subkeyA", "a3", NOW + 3.0), NOW).unwrap(),
        Stored::Visible
    );
    assert_eq!(
        dictionary(store.get("test/bar", NOW)),
        (vec![("subkeyA".into(), "a3".into())], NOW + 3.0)
    );
    store.store(sub("test/bar", "subkeyB", "b4", NOW + 4.0), NOW).unwrap();
    store.store(sub("test/bar", "subkeyA", "a5", NOW + 5.0), NOW).unwrap();
    assert_eq!(
        dictionary(store.get("test/bar", NOW)),
        (
            vec![("subkeyA".into(), "a5".into()), ("subkeyB".into(), "b4".into())],
            NOW + 5.0
        )
    );
}

#[test]
fn a_plain_value_replaces_a_dictionary_only_when_later() {
    let mut store = store();
    for (subkey, offset) in [("subkey1", 2.0), ("subkey2", 3.0), ("subkey3", 1.0), ("subkey4", 4.0)] {
        store.store(sub("test/foo", subkey, subkey, NOW + offset), NOW).unwrap();
    }
    assert_eq!(
        store.store(plain("test/foo", "plain", NOW + 3.5), NOW).unwrap(),
        Stored::Hidden
    );
    assert_eq!(dictionary(store.get("test/foo", NOW)).0.len(), 4);
    assert_eq!(
        store.store(plain("test/foo", "plain", NOW + 5.0), NOW).unwrap(),
        Stored::Visible
    );
    assert_eq!(value_of(store.get("test/foo", NOW)), Some("plain".into()));
}

#[test]
fn storing_none_deletes_until_the_deletion_expires() {
    let mut store = store();
    store.store(plain("test/k", "v", NOW + 10.0), NOW).unwrap();
    let delete = Record {
        value: None,
        ..plain("test/k", "", NOW + 20.0)
    };
    assert_eq!(store.store(delete, NOW).unwrap(), Stored::Visible);
    assert_eq!(store.get("test/k", NOW), None);
    assert_eq!(
        store.store(plain("test/k", "older", NOW + 15.0), NOW).unwrap(),
        Stored::Outdated
    );
    assert_eq!(store.get("test/k", NOW), None);
    // Once the deletion expired, the key is free again.
    assert_eq!(
        store.store(plain("test/k", "again", NOW + 30.0), NOW + 21.0).unwrap(),
        Stored::Visible
    );

    store.store(sub("test/d", "a", "a", NOW + 10.0), NOW).unwrap();
    store.store(sub("test/d", "b", "b", NOW + 10.0), NOW).unwrap();
    let delete_a = Record {
        value: None,
        ..sub("test/d", "a", "", NOW + 11.0)
    };
    store.store(delete_a, NOW).unwrap();
    assert_eq!(
        dictionary(store.get("test/d", NOW)).0,
        vec![("b".to_owned(), "b".to_owned())]
    );
}

/// A record under `owner`'s own subkey of `key`, signed by `signer` for `run`.
fn peer_record(
    run: &str,
    signer: &Keypair,
    owner: PeerId,
    key: &str,
    value: Option<Bytes>,
    expiration: Time,
) -> Record {
    Record::signed(run, signer, key, Some(Subkey::Peer(owner)), value, expiration)
}

fn progress(epoch: u64) -> Bytes {
    Bytes::from(
        rkyv::to_bytes::<rkyv::rancor::Error>(&Progress {
            epoch,
            samples: 64 * epoch,
        })
        .unwrap()
        .to_vec(),
    )
}

#[test]
fn a_peer_subkey_needs_its_owners_signature() {
    let (alice, bob, mallory) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
    let mut store = store();
    let own = peer_record(RUN, &alice, alice.peer_id(), "progress", Some(progress(1)), NOW + 10.0);
    assert_eq!(store.store(own, NOW).unwrap(), Stored::Visible);

    let unsigned = Record {
        signature: None,
        ..peer_record(RUN, &bob, bob.peer_id(), "progress", Some(progress(1)), NOW + 10.0)
    };
    let err = store.store(unsigned, NOW).unwrap_err();
    assert!(err.to_string().contains("is not signed"), "{err}");

    let mut invalid = peer_record(RUN, &bob, bob.peer_id(), "progress", Some(progress(1)), NOW + 10.0);
    invalid.signature = Some([0xab; SIGNATURE_LEN]);
    let err = store.store(invalid, NOW).unwrap_err();
    assert!(err.to_string().contains("not the owner's"), "{err}");

    let forged = peer_record(RUN, &mallory, bob.peer_id(), "progress", Some(progress(1)), NOW + 10.0);
    assert!(matches!(
        store.store(forged, NOW),
        Err(RecordError::BadSignature { .. })
    ));

    let other_run = peer_record("run-2", &bob, bob.peer_id(), "progress", Some(progress(1)), NOW + 10.0);
    assert!(
        matches!(store.store(other_run, NOW), Err(RecordError::BadSignature { .. })),
        "signed for another run"
    );

    // A changed value under a valid signature of other bytes is refused too.
    let mut tampered = peer_record(RUN, &bob, bob.peer_id(), "progress", Some(progress(1)), NOW + 10.0);
    tampered.value = Some(progress(2));
    assert!(matches!(
        store.store(tampered, NOW),
        Err(RecordError::BadSignature { .. })
    ));
}

#[test]
fn nobody_overwrites_a_departed_peers_subkey() {
    let mallory = Keypair::generate();
    let mut store = store();
    {
        let bob = Keypair::generate();
        let bobs = peer_record(RUN, &bob, bob.peer_id(), "progress", Some(progress(3)), NOW + 60.0);
        store.store(bobs, NOW).unwrap();
    }
    // Bob has left the swarm, and his key with him; his record lives on until it expires.
    let victim = store.records()[0].subkey.clone();
    let overwrite = Record::signed(
        RUN,
        &mallory,
        "progress",
        victim.clone(),
        Some(progress(99)),
        NOW + 120.0,
    );
    assert!(store.store(overwrite, NOW).is_err());
    let delete = Record::signed(RUN, &mallory, "progress", victim, None, NOW + 120.0);
    assert!(store.store(delete, NOW).is_err());
    let Some(View::Dictionary { entries, .. }) = store.get("progress", NOW) else {
        panic!("bob's record is there")
    };
    assert_eq!(entries.values().next().unwrap().0, progress(3));
}

#[test]
fn values_are_checked_against_their_kind() {
    let mut store = store();
    let keypair = Keypair::generate();
    let garbage = peer_record(
        RUN,
        &keypair,
        keypair.peer_id(),
        "progress",
        Some(Bytes::from_static(b"xyz")),
        NOW + 1.0,
    );
    let err = store.store(garbage, NOW).unwrap_err();
    assert!(
        matches!(err, RecordError::InvalidValue { ref kind, .. } if kind == "progress"),
        "{err}"
    );
    let err = store.store(plain("unknown/k", "v", NOW + 1.0), NOW).unwrap_err();
    assert!(err.to_string().contains("unknown key kind 'unknown'"), "{err}");
}

#[test]
fn limits_are_enforced() {
    let limits = RecordLimits {
        max_key_bytes: 16,
        max_value_bytes: 8,
        max_records_per_peer: 2,
        ..RecordLimits::default()
    };
    let mut store = RecordStore::new(RUN, limits, schemas());
    let err = store
        .store(plain("test/a-very-long-key-indeed", "v", NOW + 1.0), NOW)
        .unwrap_err();
    assert!(
        err.to_string().contains("key of 27 bytes exceeds the limit of 16"),
        "{err}"
    );
    let err = store.store(plain("test/k", "123456789", NOW + 1.0), NOW).unwrap_err();
    assert!(
        err.to_string().contains("value of 9 bytes exceeds the limit of 8"),
        "{err}"
    );
    let peer = Keypair::generate();
    for key in ["test/1", "test/2"] {
        let record = peer_record(
            RUN,
            &peer,
            peer.peer_id(),
            key,
            Some(Bytes::from_static(b"v")),
            NOW + 1.0,
        );
        store.store(record, NOW).unwrap();
    }
    let third = peer_record(
        RUN,
        &peer,
        peer.peer_id(),
        "test/3",
        Some(Bytes::from_static(b"v")),
        NOW + 1.0,
    );
    let err = store.store(third.clone(), NOW).unwrap_err();
    assert!(err.to_string().contains("records per peer limit of 2"), "{err}");
    // Updating a record it owns is still fine, and expiry frees the quota.
    let update = peer_record(
        RUN,
        &peer,
        peer.peer_id(),
        "test/1",
        Some(Bytes::from_static(b"w")),
        NOW + 2.0,
    );
    store.store(update, NOW).unwrap();
    let later = Record {
        expiration: NOW + 5.0,
        ..third
    };
    let later = Record::signed(RUN, &peer, later.key, later.subkey, later.value, later.expiration);
    assert_eq!(store.store(later, NOW + 1.5).unwrap(), Stored::Visible);
}

#[test]
fn a_digest_exchange_sends_only_what_is_missing_and_converges() {
    let (mut a, mut b) = (store(), store());
    a.store(plain("test/shared", "old", NOW + 5.0), NOW).unwrap();
    b.store(plain("test/shared", "new", NOW + 9.0), NOW).unwrap();
    a.store(sub("test/only-a", "x", "1", NOW + 5.0), NOW).unwrap();
    b.store(sub("test/only-b", "y", "2", NOW + 5.0), NOW).unwrap();
    let same = sub("test/both", "z", "3", NOW + 5.0);
    a.store(same.clone(), NOW).unwrap();
    b.store(same, NOW).unwrap();

    let to_b = a.missing_from(&b.digest(), NOW);
    let to_a = b.missing_from(&a.digest(), NOW);
    // Only the records the other side lacks or holds older travel.
    assert_eq!(to_b.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["test/only-a"]);
    let mut keys: Vec<&str> = to_a.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["test/only-b", "test/shared"]);
    for record in to_b {
        b.store(record, NOW).unwrap();
    }
    for record in to_a {
        a.store(record, NOW).unwrap();
    }
    assert_eq!(a.digest(), b.digest());
    assert_eq!(value_of(a.get("test/shared", NOW)), Some("new".into()));
    assert!(a.missing_from(&b.digest(), NOW).is_empty() && b.missing_from(&a.digest(), NOW).is_empty());
}

/// A small universe of writes: few keys, subkeys and expirations, so that conflicts are frequent.
fn arbitrary_record(signers: &[Keypair]) -> impl Strategy<Value = Record> + use<> {
    let signers: Vec<Keypair> = signers.to_vec();
    (0..3usize, 0..5usize, prop::option::weighted(0.85, 0..3u8), 1..6u8).prop_map(
        move |(key, subkey, value, expiration)| {
            let key = format!("test/{key}");
            let value = value.map(|v| Bytes::from(vec![v]));
            let expiration = NOW + f64::from(expiration);
            match subkey {
                0 => Record {
                    key,
                    subkey: None,
                    value,
                    expiration,
                    signature: None,
                },
                1 | 2 => Record {
                    key,
                    subkey: Some(Subkey::Name(format!("s{subkey}"))),
                    value,
                    expiration,
                    signature: None,
                },
                n => {
                    let signer = &signers[n - 3];
                    Record::signed(
                        RUN,
                        signer,
                        key,
                        Some(Subkey::Peer(signer.peer_id())),
                        value,
                        expiration,
                    )
                }
            }
        },
    )
}

fn snapshot(store: &mut RecordStore, now: Time) -> (Vec<DigestEntry>, Vec<Option<View>>) {
    let views = (0..3).map(|key| store.get(&format!("test/{key}"), now)).collect();
    (store.digest(), views)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_order_and_duplication_converges(
        (records, order, extra) in {
            let signers = vec![Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32])];
            prop::collection::vec(arbitrary_record(&signers), 1..24).prop_flat_map(|records| {
                let n = records.len();
                (Just(records), Just((0..n).collect::<Vec<_>>()).prop_shuffle(), prop::collection::vec(0..n, 0..12))
            })
        }
    ) {
        let mut first = store();
        for record in &records {
            let _ = first.store(record.clone(), NOW);
        }
        let mut second = store();
        for index in order.iter().chain(extra.iter()).chain(order.iter()) {
            let _ = second.store(records[*index].clone(), NOW);
        }
        for now in [NOW, NOW + 2.5, NOW + 4.5] {
            prop_assert_eq!(snapshot(&mut first, now), snapshot(&mut second, now));
        }
    }

    #[test]
    fn a_write_is_visible_exactly_when_the_read_changes(
        (records, times) in {
            let signers = vec![Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32])];
            (
                prop::collection::vec(arbitrary_record(&signers), 1..32),
                prop::collection::vec(0..4u8, 32),
            )
        }
    ) {
        // Time moves forward between writes, so entries also expire on the way.
        let mut store = store();
        for (record, step) in records.into_iter().zip(times) {
            let now = NOW + f64::from(step) * 0.5;
            let key = record.key.clone();
            let before = store.get(&key, now);
            let fingerprint = store.fingerprint();
            match store.store(record, now) {
                Ok(Stored::Visible) => prop_assert_ne!(store.get(&key, now), before),
                Ok(Stored::Hidden) => prop_assert_eq!(store.get(&key, now), before),
                Ok(Stored::Outdated) | Err(_) => {
                    prop_assert_eq!(store.get(&key, now), before);
                    prop_assert_eq!(store.fingerprint(), fingerprint);
                }
            }
            // The cached digest is the digest.
            let digest = store.digest();
            prop_assert_eq!(&store.digest_and_fingerprint().0[..], &digest[..]);
        }
    }
}

#[test]
fn the_verified_signature_cache_keeps_its_size_and_still_checks_signatures() {
    let keypair = Keypair::generate();
    let peer = keypair.peer_id();
    let capacity = {
        let verified = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
        (verified.0.capacity(), verified.1.capacity())
    };
    assert!(capacity.0 >= VERIFIED_GENERATION && capacity.1 >= VERIFIED_GENERATION);
    // Three generations' worth of distinct signatures: the tables are reused, never grown.
    for i in 0..3 * VERIFIED_GENERATION as u64 {
        let message = i.to_le_bytes();
        let signature = keypair.sign(&message);
        assert!(verify_signature(&peer, &message, &signature));
        // The same message with a signature it does not carry is refused, cached or not.
        let mut forged = signature;
        forged[0] ^= 1;
        if i % 512 == 0 {
            assert!(!verify_signature(&peer, &message, &forged));
            assert!(
                verify_signature(&peer, &message, &signature),
                "a cached signature is accepted"
            );
        }
    }
    let verified = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!((verified.0.capacity(), verified.1.capacity()), capacity);
    assert!(verified.0.len() <= VERIFIED_GENERATION && verified.1.len() <= VERIFIED_GENERATION);
}
