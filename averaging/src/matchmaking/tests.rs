//! Unit tests of the matchmaking core: keys and declarations, the Moshpit rotation, the wire messages, every
//! rule of the leader and follower state machine, and whole swarms of searches driven in one thread through
//! a simulated network.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use colony_transports::PeerId;

use super::keys::{self, Declaration, DeclarationBoard, GroupKeyManager, SplitMix64, rotate_bits};
use super::messages::{JoinRequest, MessageCode, MessageFromLeader};
use super::search::{Action, Search, SearchRequest};
use super::{GroupInfo, MatchmakingConfig, MatchmakingError, Time};
use crate::tensor::SchemaHash;

fn peer(n: u8) -> PeerId {
    PeerId::from_bytes([n; 32])
}

const T0: Time = 1_000_000.0;
const HASH: SchemaHash = SchemaHash([7; 32]);

fn config(min: usize, target: Option<usize>) -> MatchmakingConfig {
    MatchmakingConfig {
        min_group_size: min,
        target_group_size: target,
        min_matchmaking_time: Duration::from_secs(5),
        request_timeout: Duration::from_secs(1),
        ..MatchmakingConfig::new("grads")
    }
}

fn request(deadline: Time) -> SearchRequest {
    SearchRequest {
        schema_hash: HASH,
        gather: Bytes::from_static(b"me"),
        scheduled_start: None,
        deadline,
        client_mode: false,
        expected_group_size: None,
    }
}

fn drain(search: &mut Search) -> Vec<Action> {
    std::iter::from_fn(|| search.poll_action()).collect()
}

fn join_request(expiration: Time) -> JoinRequest {
    JoinRequest {
        schema_hash: HASH.0.to_vec(),
        expiration,
        gather: Bytes::from_static(b"follower"),
        client_mode: false,
        group_key: "grads.0b".into(),
    }
}

// ---- keys and declarations ----

#[test]
fn key_manager_declarations_follow_the_record_rules() {
    // Hivemind's test_key_manager, on the declaration board: two declarations, a re-declaration, a peer that
    // stops looking, and a key nobody used.
    let (alice, bob) = (peer(1), peer(2));
    let key = keys::group_key("grads", "10110");
    let mut board = DeclarationBoard::new();
    let looking = |expiration| Declaration {
        expiration,
        looking: true,
    };
    assert!(board.observe(&key, alice, looking(T0 + 60.0), T0 + 60.0));
    assert!(board.observe(&key, bob, looking(T0 + 61.0), T0 + 61.0));
    assert_eq!(
        board.averagers(&key, T0, true),
        vec![(alice, T0 + 60.0), (bob, T0 + 61.0)]
    );
    // A re-declaration with a later time replaces the earlier one; an older record does not.
    assert!(board.observe(&key, alice, looking(T0 + 66.0), T0 + 66.0));
    assert!(!board.observe(&key, alice, looking(T0 + 50.0), T0 + 50.0));
    assert_eq!(
        board.averagers(&key, T0, true),
        vec![(bob, T0 + 61.0), (alice, T0 + 66.0)]
    );
    // Bob stops looking: hidden from the active averagers, still listed among all.
    let stopped = Declaration {
        expiration: T0 + 61.0,
        looking: false,
    };
    assert!(board.observe(&key, bob, stopped, T0 + 61.5));
    assert_eq!(board.averagers(&key, T0, true), vec![(alice, T0 + 66.0)]);
    assert_eq!(board.averagers(&key, T0, false).len(), 2);
    // Unknown keys are empty; expired records vanish.
    assert!(
        board
            .averagers(&keys::group_key("grads", "10111"), T0, false)
            .is_empty()
    );
    assert_eq!(board.averagers(&key, T0 + 62.0, false), vec![(alice, T0 + 66.0)]);
    board.forget_expired(T0 + 70.0);
    assert!(board.averagers(&key, T0, false).is_empty());
    // A deletion older than the declaration held leaves it; a newer one removes it.
    board.observe(&key, alice, looking(T0 + 80.0), T0 + 80.0);
    board.forget(&key, &alice, T0 + 79.0);
    assert_eq!(board.averagers(&key, T0, true).len(), 1);
    board.forget(&key, &alice, T0 + 81.0);
    assert!(board.averagers(&key, T0, true).is_empty());
}

#[test]
fn group_keys_are_written_and_checked_as_in_hivemind() {
    assert_eq!(keys::group_key("grads", "0110"), "grads.0b0110");
    assert_eq!(keys::group_key("grads", ""), "grads.0b");
    assert_eq!(keys::parse_group_key("grads.0b0110"), Some(("grads", "0110")));
    assert_eq!(keys::parse_group_key("grads.0b"), Some(("grads", "")));
    assert_eq!(keys::parse_group_key("grads.0b012"), None);
    assert_eq!(keys::parse_group_key("a.b.0b1"), None);
    for bad in ["", "a.b", "a/b", "a b", &"x".repeat(129)] {
        assert!(keys::validate_prefix(bad).is_err(), "{bad:?}");
    }
    assert!(keys::validate_bits(&"1".repeat(65)).is_err());
    let mut manager = GroupKeyManager::new("grads", "00101011101010", Some(2)).unwrap();
    assert_eq!(manager.bits(), "00101011101010");
    manager.set_bits("0110").unwrap();
    assert_eq!(manager.key(), "grads.0b0110");
    assert!(manager.set_bits("0120").is_err());
    assert_eq!(manager.bits(), "0110", "a refused change keeps the bits");
}

#[test]
fn declarations_round_trip_and_garbage_is_refused() {
    let declaration = Declaration {
        expiration: T0 + 1.5,
        looking: true,
    };
    assert_eq!(Declaration::decode(&declaration.encode()), Ok(declaration));
    assert!(Declaration::decode(b"nonsense").is_err());
    assert!(Declaration::decode(&[]).is_err());
    let infinite = Declaration {
        expiration: f64::INFINITY,
        looking: true,
    };
    assert!(Declaration::decode(&infinite.encode()).is_err());
}

// ---- Moshpit rotation ----

#[test]
fn splitmix64_matches_the_reference_sequence() {
    // The reference outputs of SplitMix64 from state 0 (Steele, Lea and Flood; Vigna's C code).
    let mut rng = SplitMix64::new(0);
    assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
    assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
}

#[test]
fn rotation_is_deterministic_and_gives_members_distinct_buckets() {
    for seed in 0..200u64 {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&seed.to_le_bytes());
        for (size, target) in [
            (2, Some(2)),
            (3, Some(4)),
            (4, Some(4)),
            (3, None),
            (5, None),
            (8, Some(8)),
        ] {
            let rotated: Vec<String> = (0..size).map(|i| rotate_bits("0110", &id, i, size, target)).collect();
            let again: Vec<String> = (0..size).map(|i| rotate_bits("0110", &id, i, size, target)).collect();
            assert_eq!(rotated, again, "the same group id gives the same bits");
            let buckets = keys::bucket_count(size, target);
            let width = (usize::BITS - (buckets - 1).leading_zeros()) as usize;
            let mut suffixes: Vec<&str> = rotated.iter().map(|b| &b[4 - width..]).collect();
            for bits in &rotated {
                assert_eq!(bits.len(), 4);
                assert_eq!(&bits[..4 - width], &"0110"[width..], "old bits shift left");
            }
            suffixes.sort();
            suffixes.dedup();
            assert_eq!(suffixes.len(), size, "every member lands in its own bucket");
        }
    }
    assert_eq!(rotate_bits("", &[1; 32], 0, 2, Some(2)), "", "empty bits stay empty");
    // Fewer bits than the rotation shifts in: the newest bits are kept.
    assert_eq!(rotate_bits("1", &[1; 32], 0, 2, Some(8)).len(), 1);
    // A pinned vector, so that a change of the generator or the draw shows.
    let pinned: Vec<String> = (0..4).map(|i| rotate_bits("0000", &[42; 32], i, 4, Some(4))).collect();
    assert_eq!(pinned, ["0010", "0001", "0000", "0011"]);
}

#[test]
fn moshpit_grid_of_eight_peers_in_pairs_reaches_the_exact_average_in_three_rounds() {
    // 8 peers, 2-bit keys bin(i / 2), groups of 2: each round pairs the peers that share a key, averages
    // them, and rotates the keys with the group's id.
    let mut bits: Vec<String> = (0..8).map(|i| format!("{:02b}", i / 2)).collect();
    let mut values: Vec<f64> = vec![3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.0, 6.5];
    let mean = values.iter().sum::<f64>() / 8.0;
    for round in 0..3u8 {
        let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, b) in bits.iter().enumerate() {
            by_key.entry(b.clone()).or_default().push(i);
        }
        assert_eq!(by_key.len(), 4, "round {round}: four keys");
        for (key, members) in &by_key {
            assert_eq!(members.len(), 2, "round {round}: key {key} holds exactly two peers");
            let average = (values[members[0]] + values[members[1]]) / 2.0;
            let mut group_id = [round; 32];
            group_id[1..3].copy_from_slice(&[members[0] as u8, members[1] as u8]);
            for (index, &m) in members.iter().enumerate() {
                values[m] = average;
                bits[m] = rotate_bits(&bits[m], &group_id, index, 2, Some(2));
            }
        }
    }
    for value in values {
        assert!((value - mean).abs() < 1e-12, "{value} != {mean}");
    }
}

// ---- wire messages ----

#[test]
fn messages_round_trip_through_their_wire_form() {
    let request = join_request(T0 + 5.0);
    let (header, payload) = request.to_wire();
    assert_eq!(
        payload,
        Bytes::from_static(b"follower"),
        "the gather travels as the payload"
    );
    let bytes = colony_transports::wire::WireMessage::encode(&header).unwrap();
    let decoded = <super::messages::JoinRequestHeader as colony_transports::wire::WireMessage>::access_archived(&bytes)
        .and_then(<super::messages::JoinRequestHeader as colony_transports::wire::WireMessage>::decode_archived)
        .unwrap();
    assert_eq!(JoinRequest::from_wire(decoded, payload).unwrap(), request);

    let message = MessageFromLeader {
        code: MessageCode::BeginAllreduce,
        group_id: Some([9; 32]),
        suggested_leader: None,
        members: vec![peer(1), peer(2), peer(3)],
        gathered: vec![Bytes::from_static(b"a"), Bytes::new(), Bytes::from_static(b"ccc")],
    };
    let (header, payload) = message.to_wire();
    assert_eq!(payload.len(), 4);
    assert_eq!(MessageFromLeader::from_wire(header, payload).unwrap(), message);
}

#[test]
fn malformed_leader_messages_are_refused() {
    let message = MessageFromLeader {
        members: vec![peer(1), peer(2)],
        gathered: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")],
        ..MessageFromLeader::code(MessageCode::BeginAllreduce)
    };
    let (header, _) = message.to_wire();
    let error = MessageFromLeader::from_wire(header.clone(), Bytes::from_static(b"abcd")).unwrap_err();
    assert!(error.0.contains("do not add up"), "{error}");
    let mut unknown = MessageFromLeader::code(MessageCode::Accepted).to_wire().0;
    let bytes = colony_transports::wire::WireMessage::encode(&unknown).unwrap();
    assert!(!bytes.is_empty());
    // Codes outside the table are refused by number.
    assert_eq!(MessageCode::from_u8(4), None);
    assert_eq!(MessageCode::from_u8(18), Some(MessageCode::BadGroupKey));
    unknown = MessageFromLeader::redirect(MessageCode::NotALeader, Some(peer(3)))
        .to_wire()
        .0;
    let back = MessageFromLeader::from_wire(unknown, Bytes::new()).unwrap();
    assert_eq!(back.suggested_leader, Some(peer(3)));
    let too_long = JoinRequest {
        group_key: "k".repeat(300),
        ..join_request(T0)
    };
    let (header, payload) = too_long.to_wire();
    assert!(JoinRequest::from_wire(header, payload).is_err());
}

#[test]
fn configuration_is_validated_with_the_field_named() {
    assert!(MatchmakingConfig::new("grads").validate().is_ok());
    let cases: Vec<(MatchmakingConfig, &str)> = vec![
        (MatchmakingConfig::new("a.b"), "prefix"),
        (
            MatchmakingConfig {
                initial_group_bits: "012".into(),
                ..MatchmakingConfig::new("g")
            },
            "initial_group_bits",
        ),
        (
            MatchmakingConfig {
                min_group_size: 0,
                ..MatchmakingConfig::new("g")
            },
            "min_group_size",
        ),
        (
            MatchmakingConfig {
                min_group_size: 4,
                target_group_size: Some(2),
                ..MatchmakingConfig::new("g")
            },
            "target_group_size",
        ),
        (
            MatchmakingConfig {
                request_timeout: Duration::from_secs(5),
                ..MatchmakingConfig::new("g")
            },
            "request_timeout",
        ),
    ];
    for (config, field) in cases {
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(field), "{error} should name {field}");
    }
    let odd = MatchmakingConfig {
        target_group_size: Some(3),
        initial_group_bits: "01".into(),
        ..MatchmakingConfig::new("g")
    };
    assert_eq!(odd.warnings().len(), 1);
}

// ---- the leader's answers ----

/// A leader that declared at T0 + 5 and has one follower (peer 8).
fn leader_with_one_follower(target: Option<usize>) -> Search {
    let mut leader = Search::new(
        &config(2, target),
        peer(5),
        "grads.0b".into(),
        request(T0 + 30.0),
        [0; 32],
        [],
        T0,
    );
    let answer = leader.on_join_request(peer(8), &join_request(T0 + 6.0), T0 + 0.1);
    assert_eq!(answer.code, MessageCode::Accepted);
    leader
}

#[test]
fn a_leader_checks_join_requests_in_hivemind_order() {
    use MessageCode::*;
    let mut leader = leader_with_one_follower(Some(3));
    let now = T0 + 0.2;
    let good = join_request(T0 + 6.0);
    let ask = |leader: &mut Search, from: u8, request: JoinRequest| leader.on_join_request(peer(from), &request, now);

    // Each case breaks one rule and every rule after it, so the answer shows the order.
    let wrong_everything = JoinRequest {
        schema_hash: vec![1; 32],
        expiration: T0,
        group_key: "grads.0b1".into(),
        ..good.clone()
    };
    assert_eq!(
        ask(
            &mut leader,
            9,
            JoinRequest {
                schema_hash: vec![],
                ..wrong_everything.clone()
            }
        )
        .code,
        ProtocolViolation
    );
    let non_finite = JoinRequest {
        expiration: f64::NAN,
        ..good.clone()
    };
    assert_eq!(ask(&mut leader, 9, non_finite).code, ProtocolViolation);
    let too_much = JoinRequest {
        gather: Bytes::from(vec![0; 20_000]),
        ..good.clone()
    };
    assert_eq!(ask(&mut leader, 9, too_much).code, ProtocolViolation);
    assert_eq!(ask(&mut leader, 9, wrong_everything.clone()).code, BadSchemaHash);
    let wrong_key = JoinRequest {
        schema_hash: good.schema_hash.clone(),
        ..wrong_everything.clone()
    };
    assert_eq!(ask(&mut leader, 9, wrong_key).code, BadGroupKey);
    let early = JoinRequest {
        expiration: T0,
        ..good.clone()
    };
    assert_eq!(ask(&mut leader, 9, early).code, BadExpirationTime);
    // Same time: the smaller peer id leads, so peer 4 may not follow peer 5, but peer 9 may.
    let same_time = JoinRequest {
        expiration: T0 + 5.0,
        ..good.clone()
    };
    assert_eq!(ask(&mut leader, 4, same_time.clone()).code, BadExpirationTime);
    assert_eq!(ask(&mut leader, 8, same_time).code, DuplicatePeerId);
    assert_eq!(
        ask(&mut leader, 5, good.clone()).code,
        DuplicatePeerId,
        "itself, at a later time than it declared"
    );
    // Peer 9 fills the group (target 3): it assembles; later requests find it not looking.
    assert_eq!(ask(&mut leader, 9, good.clone()).code, Accepted);
    assert!(leader.is_finished());
    assert_eq!(ask(&mut leader, 10, good.clone()).code, NotLookingForGroup);

    // Group full: target 2 with one follower.
    let mut full = Search::new(
        &config(2, Some(3)),
        peer(5),
        "grads.0b".into(),
        request(T0 + 30.0),
        [0; 32],
        [],
        T0,
    );
    assert_eq!(full.on_join_request(peer(8), &good, now).code, Accepted);
    // While it waits for a better leader's answer it holds a full group without assembling.
    full.on_declaration(
        peer(1),
        Declaration {
            expiration: T0 + 1.0,
            looking: true,
        },
        T0 + 2.0,
        now,
    );
    let requested = drain(&mut full)
        .into_iter()
        .any(|a| matches!(a, Action::RequestJoin { leader, .. } if leader == peer(1)));
    assert!(requested, "the leader asks the better leader");
    assert_eq!(full.on_join_request(peer(9), &good, now).code, Accepted);
    assert!(
        !full.is_finished(),
        "no assembly while the better leader's answer is awaited"
    );
    assert_eq!(full.on_join_request(peer(10), &good, now).code, GroupIsFull);
    // Accepted by the better leader: its followers are sent there, and newcomers are told.
    full.on_leader_message(0, MessageFromLeader::code(Accepted), now);
    let sent: Vec<(PeerId, MessageFromLeader)> = drain(&mut full)
        .into_iter()
        .filter_map(|a| match a {
            Action::SendToFollower { follower, message } => Some((follower, message)),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), 2);
    for (_, message) in &sent {
        assert_eq!(message.code, GroupDisbanded);
        assert_eq!(message.suggested_leader, Some(peer(1)));
    }
    let answer = full.on_join_request(peer(10), &good, now);
    assert_eq!((answer.code, answer.suggested_leader), (NotALeader, Some(peer(1))));

    // A leader in client mode cannot lead: a protocol violation.
    let client = SearchRequest {
        client_mode: true,
        ..request(T0 + 30.0)
    };
    let mut client = Search::new(&config(2, None), peer(5), "grads.0b".into(), client, [0; 32], [], T0);
    assert_eq!(client.on_join_request(peer(9), &good, now).code, ProtocolViolation);
}

#[test]
fn a_leader_whose_declaration_was_not_published_answers_not_declared_until_it_declares_again() {
    let mut leader = Search::new(
        &config(2, None),
        peer(5),
        "grads.0b".into(),
        request(T0 + 30.0),
        [0; 32],
        [],
        T0,
    );
    assert!(drain(&mut leader).contains(&Action::Declare(Declaration {
        expiration: T0 + 5.0,
        looking: true
    })));
    // A refusal of an older declaration changes nothing; of the current one, the peer is undeclared.
    leader.on_declaration_refused(T0 + 4.0);
    assert_eq!(
        leader.on_join_request(peer(8), &join_request(T0 + 6.0), T0 + 0.1).code,
        MessageCode::Accepted
    );
    leader.on_declaration_refused(T0 + 5.0);
    let answer = leader.on_join_request(peer(9), &join_request(T0 + 6.0), T0 + 0.2);
    assert_eq!(answer.code, MessageCode::NotDeclared);
    // Its time comes: it still assembles the follower it has (it did lead it), and is done.
    leader.on_timeout(T0 + 5.0);
    assert!(matches!(drain(&mut leader).last(), Some(Action::Finished(Ok(group))) if group.len() == 2));

    // Alone at its time, it declares again (with a later time) and leads from then on.
    let mut alone = Search::new(
        &config(2, None),
        peer(5),
        "grads.0b".into(),
        request(T0 + 30.0),
        [0; 32],
        [],
        T0,
    );
    alone.on_declaration_refused(T0 + 5.0);
    alone.on_timeout(T0 + 5.0);
    assert!(drain(&mut alone).contains(&Action::Declare(Declaration {
        expiration: T0 + 10.0,
        looking: true
    })));
    // A request ordered before the new declaration is too early; one after it is accepted.
    assert_eq!(
        alone.on_join_request(peer(9), &join_request(T0 + 6.0), T0 + 5.1).code,
        MessageCode::BadExpirationTime
    );
    assert_eq!(
        alone.on_join_request(peer(9), &join_request(T0 + 11.0), T0 + 5.1).code,
        MessageCode::Accepted
    );
}

#[test]
fn a_search_whose_deadline_is_now_ends_at_once() {
    let mut none = Search::new(
        &config(2, None),
        peer(5),
        "grads.0b".into(),
        request(T0),
        [0; 32],
        [],
        T0,
    );
    assert_eq!(none.status().declared, None, "nothing left to declare");
    assert!(none.is_finished());
    assert!(matches!(
        drain(&mut none).last(),
        Some(Action::Finished(Err(MatchmakingError::NoGroup { .. })))
    ));
    assert_eq!(
        none.on_join_request(peer(9), &join_request(T0 + 6.0), T0).code,
        MessageCode::NotLookingForGroup
    );
    // A deadline before the window's end caps the declaration.
    let capped = Search::new(
        &config(2, None),
        peer(5),
        "grads.0b".into(),
        request(T0 + 2.0),
        [0; 32],
        [],
        T0,
    );
    assert_eq!(capped.status().declared, Some(T0 + 2.0));
}

// ---- assembly and disbanding ----

#[test]
fn a_full_group_assembles_at_once_with_one_order_for_all() {
    let mut leader = leader_with_one_follower(Some(3));
    let _ = drain(&mut leader);
    let answer = leader.on_join_request(peer(9), &join_request(T0 + 6.0), T0 + 0.3);
    assert_eq!(answer.code, MessageCode::Accepted);
    let actions = drain(&mut leader);
    let mut begins = Vec::new();
    let mut group = None;
    let mut withdrawn = false;
    for action in actions {
        match action {
            Action::SendToFollower { follower, message } => begins.push((follower, message)),
            Action::Finished(Ok(info)) => group = Some(info),
            Action::Declare(declaration) => withdrawn = !declaration.looking && declaration.expiration == T0 + 5.0,
            other => panic!("unexpected {other:?}"),
        }
    }
    let group: GroupInfo = group.expect("the group assembled");
    assert!(withdrawn, "the declaration is withdrawn");
    assert_eq!(group.len(), 3);
    let mut members = group.members.clone();
    members.sort();
    assert_eq!(members, vec![peer(5), peer(8), peer(9)]);
    for (peer_id, gather) in group.members.iter().zip(&group.gathered) {
        let expected: &[u8] = if *peer_id == peer(5) { b"me" } else { b"follower" };
        assert_eq!(&gather[..], expected, "gathered bytes follow the member order");
    }
    assert_eq!(begins.len(), 2);
    for (_, message) in begins {
        assert_eq!(message.code, MessageCode::BeginAllreduce);
        assert_eq!(message.group_id, Some(group.group_id));
        assert_eq!(message.members, group.members);
    }
}

#[test]
fn below_min_at_the_declared_time_the_leader_disbands_and_looks_again_until_its_deadline() {
    let mut leader = Search::new(
        &config(3, None),
        peer(5),
        "grads.0b".into(),
        request(T0 + 12.0),
        [0; 32],
        [],
        T0,
    );
    assert_eq!(leader.next_timeout(), Some(T0 + 5.0));
    assert_eq!(
        leader.on_join_request(peer(8), &join_request(T0 + 6.0), T0 + 1.0).code,
        MessageCode::Accepted
    );
    let _ = drain(&mut leader);
    leader.on_timeout(T0 + 5.0);
    let actions = drain(&mut leader);
    assert!(actions.iter().any(|a| matches!(a,
        Action::SendToFollower { follower, message } if *follower == peer(8) && message.code == MessageCode::GroupDisbanded)));
    assert!(actions.contains(&Action::Declare(Declaration {
        expiration: T0 + 10.0,
        looking: true
    })));
    assert!(!leader.is_finished());
    // The next window is capped at the deadline; at the deadline the search fails, naming the key.
    leader.on_timeout(T0 + 10.0);
    assert!(drain(&mut leader).contains(&Action::Declare(Declaration {
        expiration: T0 + 12.0,
        looking: true
    })));
    assert_eq!(leader.next_timeout(), Some(T0 + 12.0));
    leader.on_timeout(T0 + 12.0);
    let actions = drain(&mut leader);
    let Some(Action::Finished(Err(error))) = actions.last() else {
        panic!("the search ends with an error: {actions:?}")
    };
    match error {
        MatchmakingError::NoGroup {
            key,
            waited,
            largest_group,
            min_group_size,
            ..
        } => {
            assert_eq!(key, "grads.0b");
            assert_eq!(*waited, Duration::from_secs(12));
            assert_eq!((*largest_group, *min_group_size), (2, 3));
        }
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("grads.0b"));
    assert!(actions.contains(&Action::Declare(Declaration {
        expiration: T0 + 12.0,
        looking: false
    })));
}

#[test]
fn with_min_reached_the_leader_assembles_at_its_declared_time() {
    let mut leader = leader_with_one_follower(None);
    let _ = drain(&mut leader);
    leader.on_timeout(T0 + 4.9);
    assert!(!leader.is_finished(), "not before its time");
    leader.on_timeout(T0 + 5.0);
    let actions = drain(&mut leader);
    assert!(matches!(actions.last(), Some(Action::Finished(Ok(group))) if group.len() == 2));
}

#[test]
fn a_follower_that_leaves_is_dropped_from_the_group() {
    let mut leader = leader_with_one_follower(None);
    leader.on_follower_left(&peer(8));
    leader.on_timeout(T0 + 5.0);
    assert!(!leader.is_finished(), "alone below min: looks again");
    assert_eq!(leader.status().followers, vec![]);
}

// ---- the follower's side ----

#[test]
fn a_follower_asks_the_earliest_leader_below_itself_and_follows_suggestions() {
    let declared = |expiration| Declaration {
        expiration,
        looking: true,
    };
    // Known: peer 9 earlier than us (T0+5), peer 3 at the same time (smaller id: it leads), peer 2 later,
    // peer 4 no longer looking, and peer 1 whose time is over.
    let known = vec![
        (peer(9), declared(T0 + 2.0), T0 + 3.0),
        (peer(3), declared(T0 + 5.0), T0 + 6.0),
        (peer(2), declared(T0 + 7.0), T0 + 8.0),
        (
            peer(4),
            Declaration {
                expiration: T0 + 1.0,
                looking: false,
            },
            T0 + 2.0,
        ),
        (peer(1), declared(T0 - 1.0), T0 + 1.0),
    ];
    let mut follower = Search::new(
        &config(2, None),
        peer(5),
        "grads.0b".into(),
        request(T0 + 30.0),
        [0; 32],
        known,
        T0,
    );
    let asked = |search: &mut Search| -> Vec<(u64, PeerId)> {
        drain(search)
            .into_iter()
            .filter_map(|a| match a {
                Action::RequestJoin {
                    request_id,
                    leader,
                    request,
                    ..
                } => {
                    assert_eq!(request.expiration, T0 + 5.0, "it sends its declared time");
                    Some((request_id, leader))
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(asked(&mut follower), vec![(0, peer(9))], "the earliest leader first");
    follower.on_leader_message(0, MessageFromLeader::code(MessageCode::GroupIsFull), T0 + 0.1);
    assert_eq!(
        asked(&mut follower),
        vec![(1, peer(3))],
        "then the next, never a later one"
    );
    // Told to go to peer 7, which it does not know yet: it asks it.
    follower.on_leader_message(
        1,
        MessageFromLeader::redirect(MessageCode::NotALeader, Some(peer(7))),
        T0 + 0.2,
    );
    assert_eq!(asked(&mut follower), vec![(2, peer(7))]);
    // Stale answers (an old request id) change nothing.
    follower.on_leader_message(1, MessageFromLeader::code(MessageCode::Accepted), T0 + 0.3);
    assert_eq!(follower.status().leader, None);
    follower.on_leader_message(2, MessageFromLeader::code(MessageCode::Accepted), T0 + 0.3);
    assert_eq!(follower.status().leader, Some(peer(7)));
    assert_eq!(
        follower.next_timeout(),
        Some(T0 + 6.0),
        "waits until its own time plus request_timeout"
    );
    // Disbanded with a suggestion: it asks the suggested leader.
    follower.on_leader_message(
        2,
        MessageFromLeader::redirect(MessageCode::GroupDisbanded, Some(peer(6))),
        T0 + 0.4,
    );
    assert_eq!(asked(&mut follower), vec![(3, peer(6))]);
    follower.on_leader_message(3, MessageFromLeader::code(MessageCode::Accepted), T0 + 0.5);
    follower.on_leader_message(3, begin([3; 32], vec![peer(5), peer(6)]), T0 + 0.6);
    let actions = drain(&mut follower);
    assert!(
        matches!(actions.last(), Some(Action::Finished(Ok(g))) if g.group_id == [3; 32] && g.group_key == "grads.0b")
    );
}

/// A leader's `BeginAllreduce` for `members`, with nothing gathered.
fn begin(group_id: [u8; 32], members: Vec<PeerId>) -> MessageFromLeader {
    MessageFromLeader {
        code: MessageCode::BeginAllreduce,
        group_id: Some(group_id),
        suggested_leader: None,
        gathered: vec![Bytes::new(); members.len()],
        members,
    }
}

/// Peer 5 looking until `deadline`, knowing one leader, peer 9 (declared at `leader_declared`), which
/// accepted its request (id 0) at T0 + 0.1. Its actions so far are drained.
fn follower_accepted_by_peer_9(leader_declared: Time, deadline: Time) -> Search {
    let known = vec![(
        peer(9),
        Declaration {
            expiration: leader_declared,
            looking: true,
        },
        leader_declared + 1.0,
    )];
    let mut follower = Search::new(
        &config(2, None),
        peer(5),
        "grads.0b".into(),
        request(deadline),
        [0; 32],
        known,
        T0,
    );
    let _ = drain(&mut follower);
    follower.on_leader_message(0, MessageFromLeader::code(MessageCode::Accepted), T0 + 0.1);
    let _ = drain(&mut follower);
    follower
}

#[test]
fn a_group_that_does_not_name_the_follower_is_refused() {
    let mut follower = follower_accepted_by_peer_9(T0 + 2.0, T0 + 30.0);
    let bogus = begin([3; 32], vec![peer(9), peer(6)]);
    follower.on_leader_message(0, bogus, T0 + 0.2);
    assert!(!follower.is_finished());
    assert!(drain(&mut follower).contains(&Action::AbandonRequest { request_id: 0 }));
}

#[test]
fn an_unanswered_request_times_out_and_the_next_leader_is_asked() {
    let declared = |expiration| Declaration {
        expiration,
        looking: true,
    };
    let known = vec![
        (peer(1), declared(T0 + 2.0), T0 + 3.0),
        (peer(2), declared(T0 + 3.0), T0 + 4.0),
    ];
    let mut follower = Search::new(
        &config(2, None),
        peer(5),
        "grads.0b".into(),
        request(T0 + 30.0),
        [0; 32],
        known,
        T0,
    );
    let _ = drain(&mut follower);
    assert_eq!(follower.next_timeout(), Some(T0 + 1.0), "request_timeout");
    follower.on_timeout(T0 + 1.0);
    let actions = drain(&mut follower);
    assert_eq!(actions[0], Action::AbandonRequest { request_id: 0 });
    assert!(matches!(&actions[1], Action::RequestJoin { leader, .. } if *leader == peer(2)));
    follower.on_request_failed(1, T0 + 1.1);
    assert!(
        drain(&mut follower).is_empty(),
        "nobody left to ask; it waits as a leader"
    );
    follower.cancel();
    let actions = drain(&mut follower);
    assert_eq!(
        actions.last(),
        Some(&Action::Finished(Err(MatchmakingError::Cancelled)))
    );
}

#[test]
fn a_client_mode_peer_never_declares_and_follows_any_earlier_leader() {
    let known = vec![(
        peer(9),
        Declaration {
            expiration: T0 + 4.0,
            looking: true,
        },
        T0 + 5.0,
    )];
    let client = SearchRequest {
        client_mode: true,
        ..request(T0 + 30.0)
    };
    let mut search = Search::new(&config(2, None), peer(1), "grads.0b".into(), client, [0; 32], known, T0);
    let actions = drain(&mut search);
    assert!(!actions.iter().any(|a| matches!(a, Action::Declare(_))));
    assert!(
        matches!(&actions[..], [Action::RequestJoin { leader, request, .. }] if *leader == peer(9) && request.client_mode)
    );
    search.cancel();
    assert!(
        !drain(&mut search).iter().any(|a| matches!(a, Action::Declare(_))),
        "nothing to withdraw"
    );
}

// ---- whole swarms, simulated ----

/// Searches of several peers connected by an instant, lossless network, driven in one thread. Declarations
/// reach every peer at once; messages are delivered in order.
struct Simulation {
    searches: BTreeMap<PeerId, Search>,
    results: HashMap<PeerId, Result<GroupInfo, MatchmakingError>>,
    /// (leader, follower, request id) of open streams.
    open: Vec<(PeerId, PeerId, u64)>,
    /// Every declaration made so far: (key, peer, declaration), what a newcomer's record replica holds.
    declarations: Vec<(String, PeerId, Declaration)>,
    queue: VecDeque<(PeerId, Action)>,
    now: Time,
}

impl Simulation {
    fn new(peers: &[(PeerId, &str, SearchRequest)], config: &MatchmakingConfig) -> Self {
        let mut sim = Self {
            searches: BTreeMap::new(),
            results: HashMap::new(),
            open: Vec::new(),
            declarations: Vec::new(),
            queue: VecDeque::new(),
            now: T0,
        };
        for (i, (id, key, request)) in peers.iter().enumerate() {
            // Peers start a millisecond apart, each knowing the declarations made so far.
            sim.now = T0 + i as f64 * 1e-3;
            let known: Vec<(PeerId, Declaration, Time)> = sim
                .declarations
                .iter()
                .filter(|(k, _, _)| k == key)
                .map(|(_, p, d)| (*p, *d, d.expiration + 1.0))
                .collect();
            let search = Search::new(
                config,
                *id,
                key.to_string(),
                request.clone(),
                [i as u8; 32],
                known,
                sim.now,
            );
            sim.searches.insert(*id, search);
            sim.pump(*id);
            sim.run();
        }
        sim
    }

    fn pump(&mut self, id: PeerId) {
        if let Some(search) = self.searches.get_mut(&id) {
            while let Some(action) = search.poll_action() {
                self.queue.push_back((id, action));
            }
        }
    }

    fn run(&mut self) {
        while let Some((from, action)) = self.queue.pop_front() {
            let now = self.now;
            match action {
                Action::Declare(declaration) => {
                    let key = self.searches[&from].group_key().to_owned();
                    self.declarations.push((key.clone(), from, declaration));
                    let others: Vec<PeerId> = self.searches.keys().copied().filter(|p| *p != from).collect();
                    for other in others {
                        let search = self.searches.get_mut(&other).unwrap();
                        if search.group_key() == key {
                            search.on_declaration(from, declaration, declaration.expiration + 1.0, now);
                        }
                        self.pump(other);
                    }
                }
                Action::RequestJoin {
                    request_id,
                    leader,
                    request,
                    ..
                } => {
                    let answer = self
                        .searches
                        .get_mut(&leader)
                        .unwrap()
                        .on_join_request(from, &request, now);
                    if answer.code == MessageCode::Accepted {
                        self.open.push((leader, from, request_id));
                    }
                    // The answer reaches the follower before anything the leader does next.
                    self.searches
                        .get_mut(&from)
                        .unwrap()
                        .on_leader_message(request_id, answer, now);
                    self.pump(from);
                    self.pump(leader);
                }
                Action::AbandonRequest { request_id } => {
                    if let Some(index) = self.open.iter().position(|(_, f, id)| *f == from && *id == request_id) {
                        let (leader, follower, _) = self.open.remove(index);
                        self.searches.get_mut(&leader).unwrap().on_follower_left(&follower);
                        self.pump(leader);
                    }
                }
                Action::SendToFollower { follower, message } => {
                    if let Some(index) = self.open.iter().position(|(l, f, _)| *l == from && *f == follower) {
                        let (_, _, request_id) = self.open.remove(index);
                        self.searches
                            .get_mut(&follower)
                            .unwrap()
                            .on_leader_message(request_id, message, now);
                        self.pump(follower);
                    }
                }
                Action::Finished(result) => {
                    self.results.insert(from, result);
                }
            }
        }
    }

    /// Advances the clock to the earliest timeout until every search finished.
    fn finish(&mut self) {
        while self.results.len() < self.searches.len() {
            let (id, at) = self
                .searches
                .iter()
                .filter_map(|(id, s)| s.next_timeout().map(|t| (*id, t)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .expect("an unfinished search has a timeout");
            self.now = self.now.max(at);
            self.searches.get_mut(&id).unwrap().on_timeout(self.now);
            self.pump(id);
            self.run();
        }
    }
}

fn peers(n: u8, key: impl Fn(u8) -> String, deadline: Time) -> Vec<(PeerId, String, SearchRequest)> {
    (0..n)
        .map(|i| {
            let mut req = request(deadline);
            req.gather = Bytes::from(vec![i]);
            (PeerId::from_bytes([100 - i; 32]), key(i), req)
        })
        .collect()
}

fn as_refs(peers: &[(PeerId, String, SearchRequest)]) -> Vec<(PeerId, &str, SearchRequest)> {
    peers.iter().map(|(p, k, r)| (*p, k.as_str(), r.clone())).collect()
}

#[test]
fn four_peers_with_target_four_form_one_group_at_once() {
    let list = peers(4, |_| "grads.0b".into(), T0 + 30.0);
    let mut sim = Simulation::new(&as_refs(&list), &config(2, Some(4)));
    assert_eq!(sim.results.len(), 4, "assembled without any timeout");
    assert!(sim.now < T0 + 0.01);
    sim.finish();
    let groups: Vec<&GroupInfo> = sim.results.values().map(|r| r.as_ref().unwrap()).collect();
    for group in &groups {
        assert_eq!(group.group_id, groups[0].group_id);
        assert_eq!(group.members, groups[0].members);
        assert_eq!(group.len(), 4);
        for (member, gathered) in group.members.iter().zip(&group.gathered) {
            assert_eq!(PeerId::from_bytes([100 - gathered[0]; 32]), *member);
        }
    }
}

#[test]
fn with_no_target_an_expected_group_size_assembles_as_soon_as_everyone_joined() {
    let mut list = peers(3, |_| "grads.0b".into(), T0 + 30.0);
    for (_, _, request) in &mut list {
        request.expected_group_size = Some(3);
    }
    let mut sim = Simulation::new(&as_refs(&list), &config(2, None));
    assert_eq!(sim.results.len(), 3, "assembled without waiting for the declared time");
    assert!(sim.now < T0 + 0.01);
    sim.finish();
    let groups: Vec<&GroupInfo> = sim.results.values().map(|r| r.as_ref().unwrap()).collect();
    assert!(groups.iter().all(|g| g.len() == 3 && g.group_id == groups[0].group_id));

    // Without it the same peers wait for the leader's declared time (the matchmaking window).
    let list = peers(3, |_| "grads.0b".into(), T0 + 30.0);
    let mut sim = Simulation::new(&as_refs(&list), &config(2, None));
    assert!(sim.results.is_empty());
    sim.finish();
    assert!(sim.now >= T0 + 5.0);
    assert!(sim.results.values().all(|r| r.as_ref().unwrap().len() == 3));
}

#[test]
fn eight_peers_with_target_two_pair_up_and_a_lone_peer_fails() {
    let list = peers(8, |_| "grads.0b".into(), T0 + 30.0);
    let mut sim = Simulation::new(&as_refs(&list), &config(2, Some(2)));
    sim.finish();
    let mut ids: HashMap<[u8; 32], usize> = HashMap::new();
    for result in sim.results.values() {
        let group = result.as_ref().unwrap();
        assert_eq!(group.len(), 2);
        *ids.entry(group.group_id).or_default() += 1;
    }
    assert_eq!(ids.len(), 4);
    assert!(ids.values().all(|n| *n == 2));

    // Different keys never meet: alone in its key, each peer fails at its deadline.
    let list = peers(3, |i| format!("grads.0b{i:03b}"), T0 + 2.0);
    let mut sim = Simulation::new(&as_refs(&list), &config(2, Some(2)));
    sim.finish();
    for result in sim.results.values() {
        assert!(
            matches!(result, Err(MatchmakingError::NoGroup { seen: 0, .. })),
            "{result:?}"
        );
    }
    assert!(sim.now <= T0 + 2.0 + 1e-9);
}

#[test]
fn peers_with_different_schemas_never_group() {
    let mut list = peers(4, |_| "grads.0b".into(), T0 + 30.0);
    for (i, (_, _, request)) in list.iter_mut().enumerate() {
        request.schema_hash = SchemaHash([(i % 2) as u8; 32]);
    }
    let mut sim = Simulation::new(&as_refs(&list), &config(2, Some(4)));
    sim.finish();
    for (peer_id, result) in &sim.results {
        let group = result.as_ref().unwrap();
        assert_eq!(group.len(), 2, "each schema forms its own group at the leader's time");
        let index = |p: &PeerId| list.iter().position(|(q, _, _)| q == p).unwrap() % 2;
        assert!(group.members.iter().all(|m| index(m) == index(peer_id)));
    }
}

#[test]
fn an_accepted_follower_waits_for_its_leader_past_the_deadline_up_to_the_request_timeout() {
    // The leader declared a moment before the follower, whose declaration is capped at its deadline: the
    // leader's group can reach the follower just after that deadline.
    let mut follower = follower_accepted_by_peer_9(T0 + 4.99, T0 + 5.0);
    assert_eq!(
        follower.next_timeout(),
        Some(T0 + 6.0),
        "its declared time plus request_timeout"
    );
    follower.on_timeout(T0 + 5.0);
    assert!(!follower.is_finished(), "the leader's answer may still come");
    assert!(drain(&mut follower).is_empty());
    follower.on_leader_message(0, begin([4; 32], vec![peer(9), peer(5)]), T0 + 5.2);
    assert!(matches!(
        drain(&mut follower).last(),
        Some(Action::Finished(Ok(g))) if g.group_id == [4; 32]
    ));

    // A leader that never answers: the follower gives up at the request's expiry, not later.
    let mut follower = follower_accepted_by_peer_9(T0 + 4.99, T0 + 5.0);
    follower.on_timeout(T0 + 5.0);
    assert!(!follower.is_finished());
    follower.on_timeout(T0 + 6.0);
    let actions = drain(&mut follower);
    assert!(actions.contains(&Action::AbandonRequest { request_id: 0 }));
    assert!(matches!(
        actions.last(),
        Some(Action::Finished(Err(MatchmakingError::NoGroup { .. })))
    ));
    assert_eq!(follower.next_timeout(), None);
}
