//! Fuzzes matchmaking's decoders and its state machine. The whole input is also tried as a declaration
//! record value (`Declaration::decode`) and as a member's gather bytes (`decode_gather`). Then it is read
//! as a stream of frames (see `colony_fuzz::frames`) fed to one peer's `Search` (peer 0, leading and
//! following at once: it has declared, and it has asked peer 1, whose declaration is earlier, to lead it):
//!
//! - a frame whose header is a `JoinRequestHeader` is a follower's join request (`JoinRequest::from_wire`,
//!   the payload is its gather), from one of peers 2 to 7 by the frame's position;
//! - a `LeaderMessageHeader` is the answer of the leader peer 0 asked last (`MessageFromLeader::from_wire`,
//!   the payload holds the gathered bytes);
//! - a payload that is a valid declaration is a declaration record of one of peers 1 to 7;
//! - an error frame fails the open request.
//!
//! Time moves 0.4 s per frame, with a tick at every `next_timeout`.
//!
//! Invariants: headers and messages re-encode and decode to themselves; accepted values are finite and
//! within the limits (group key length, group size, gathered entries aligned with members); the answer to a
//! join request is one a leader may give; the search finishes at most once and does nothing afterwards; a
//! group it reports holds peer 0 exactly once and no member twice, with a gather entry per member; messages
//! it sends to followers are final messages, and a `BeginAllreduce` names the follower.

#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use colony::averager::{decode_gather, encode_gather};
use colony_averaging::allreduce::PeerMode;
use colony_averaging::matchmaking::messages::{JoinRequestHeader, LeaderMessageHeader, MAX_GROUP_KEY_BYTES};
use colony_averaging::matchmaking::{
    Action, Declaration, JoinRequest, MAX_GROUP_SIZE, MatchmakingConfig, MessageCode, MessageFromLeader, Search,
    SearchRequest,
};
use colony_averaging::tensor::SchemaHash;
use colony_fuzz::{GROUP_PREFIX, NOW, SCHEMA_HASH, assert_round_trip, frames, group_key, peer};
use colony_transports::wire::{FrameKind, WireMessage};
use libfuzzer_sys::fuzz_target;

/// Seconds between two frames.
const STEP: f64 = 0.4;

fuzz_target!(|data: &[u8]| {
    check_declaration(data);
    check_gather(data);

    let mut config = MatchmakingConfig::new(GROUP_PREFIX);
    config.target_group_size = Some(4);
    config.min_matchmaking_time = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(3);
    config.max_gather_bytes = 64;
    let request = SearchRequest {
        schema_hash: SchemaHash(SCHEMA_HASH),
        gather: encode_gather(PeerMode::Node, 1.0, Some(100.0)),
        scheduled_start: None,
        deadline: NOW + 20.0,
        client_mode: false,
        expected_group_size: None,
    };
    let leader = Declaration {
        expiration: NOW + 2.0,
        looking: true,
    };
    let mut search = Search::new(
        &config,
        peer(0),
        group_key(),
        request,
        [3; 32],
        [(peer(1), leader, NOW + 60.0)],
        NOW,
    );
    let mut checker = Checker::default();
    checker.drain(&mut search);

    let mut now = NOW;
    for (position, frame) in frames(data).into_iter().enumerate() {
        now += STEP;
        if search.next_timeout().is_some_and(|at| at <= now) {
            search.on_timeout(now);
            checker.drain(&mut search);
        }
        if frame.kind == FrameKind::Error {
            if let Some(id) = checker.open_request {
                search.on_request_failed(id, now);
            }
            checker.drain(&mut search);
            continue;
        }
        if let Ok(header) = frame.decode::<JoinRequestHeader>() {
            assert_round_trip(&header);
            if let Ok(request) = JoinRequest::from_wire(header, frame.payload.clone()) {
                assert!(request.group_key.len() <= MAX_GROUP_KEY_BYTES);
                let (again_header, again_payload) = request.to_wire();
                assert_eq!(again_payload, request.gather);
                let again = JoinRequest::from_wire(again_header.clone(), again_payload).expect("a request re-reads");
                let encoded = |header: &JoinRequestHeader| header.encode().expect("encodes").to_vec();
                assert_eq!(
                    encoded(&again.to_wire().0),
                    encoded(&again_header),
                    "a request changed on a round trip"
                );
                let from = peer(2 + position % 6);
                let answer = search.on_join_request(from, &request, now);
                checker.check_answer(&answer);
                if answer.code == MessageCode::Accepted {
                    checker.followers.insert(from);
                }
            }
        }
        if let Ok(header) = frame.decode::<LeaderMessageHeader>() {
            assert_round_trip(&header);
            if let Ok(message) = MessageFromLeader::from_wire(header, frame.payload.clone()) {
                check_leader_message(&message);
                if let Some(id) = checker.open_request {
                    search.on_leader_message(id, message, now);
                }
            }
        }
        if let Ok(declaration) = Declaration::decode(&frame.payload) {
            search.on_declaration(peer(1 + position % 7), declaration, now + 30.0, now);
        }
        checker.drain(&mut search);
    }
    search.on_timeout(NOW + 1000.0);
    checker.drain(&mut search);
    assert!(checker.finished, "the search is not over after its deadline");
});

fn check_declaration(data: &[u8]) {
    let Ok(declaration) = Declaration::decode(data) else {
        return;
    };
    assert!(declaration.expiration.is_finite());
    assert_eq!(Declaration::decode(&declaration.encode()), Ok(declaration));
}

fn check_gather(data: &[u8]) {
    let Ok((mode, weight, bandwidth)) = decode_gather(data) else {
        return;
    };
    assert!(weight.is_finite() && weight >= 0.0);
    assert!(bandwidth.is_none_or(|b| b.is_finite() && b >= 0.0));
    let again = decode_gather(&encode_gather(mode, weight, bandwidth)).expect("a re-encoded gather decodes");
    assert_eq!(again.0, mode);
    assert_eq!(again.1.to_bits(), weight.to_bits());
    assert_eq!(again.2.map(f64::to_bits), bandwidth.map(f64::to_bits));
}

fn check_leader_message(message: &MessageFromLeader) {
    assert!(message.members.len() <= MAX_GROUP_SIZE);
    assert_eq!(message.gathered.len(), message.members.len());
    let (header, payload) = message.to_wire();
    assert_eq!(payload.len(), message.gathered.iter().map(Bytes::len).sum::<usize>());
    assert_eq!(MessageFromLeader::from_wire(header, payload).as_ref(), Ok(message));
}

/// What the search has done so far, checked action by action.
#[derive(Default)]
struct Checker {
    finished: bool,
    open_request: Option<u64>,
    followers: HashSet<colony_transports::PeerId>,
}

impl Checker {
    fn check_answer(&self, answer: &MessageFromLeader) {
        use MessageCode::*;
        assert!(
            matches!(
                answer.code,
                Accepted
                    | NotLookingForGroup
                    | ProtocolViolation
                    | BadSchemaHash
                    | BadGroupKey
                    | NotDeclared
                    | BadExpirationTime
                    | NotALeader
                    | DuplicatePeerId
                    | GroupIsFull
            ),
            "a leader answered {:?} at once",
            answer.code
        );
        assert!(answer.members.is_empty() && answer.gathered.is_empty() && answer.group_id.is_none());
        if self.finished {
            assert_eq!(answer.code, NotLookingForGroup, "a finished search accepted a follower");
        }
    }

    fn drain(&mut self, search: &mut Search) {
        while let Some(action) = search.poll_action() {
            if !matches!(action, Action::Declare(Declaration { looking: false, .. })) {
                assert!(
                    !self.finished || matches!(action, Action::Declare(_)),
                    "{action:?} after the end"
                );
            }
            match action {
                Action::Declare(declaration) => assert!(declaration.expiration.is_finite()),
                Action::RequestJoin {
                    request_id,
                    leader,
                    request,
                    keep_until,
                } => {
                    assert!(!self.finished, "a request after the end");
                    assert_ne!(leader, peer(0), "the search asked itself");
                    assert!(keep_until.is_finite());
                    assert_eq!(request.schema_hash, SCHEMA_HASH);
                    self.open_request = Some(request_id);
                }
                Action::AbandonRequest { request_id } => {
                    if self.open_request == Some(request_id) {
                        self.open_request = None;
                    }
                }
                Action::SendToFollower { follower, message } => {
                    assert!(
                        matches!(
                            message.code,
                            MessageCode::BeginAllreduce | MessageCode::GroupDisbanded | MessageCode::Cancelled
                        ),
                        "a final message {:?}",
                        message.code
                    );
                    assert!(
                        self.followers.remove(&follower),
                        "a final message to a peer that is no follower"
                    );
                    if message.code == MessageCode::BeginAllreduce {
                        assert!(message.members.contains(&follower));
                        check_group(&message.members, &message.gathered);
                    }
                }
                Action::Finished(result) => {
                    assert!(!self.finished, "finished twice");
                    self.finished = true;
                    if let Ok(group) = result {
                        check_group(&group.members, &group.gathered);
                    }
                }
            }
        }
    }
}

fn check_group(members: &[colony_transports::PeerId], gathered: &[Bytes]) {
    assert_eq!(
        members.iter().filter(|m| **m == peer(0)).count(),
        1,
        "peer 0 is not in its group once"
    );
    let distinct: HashSet<_> = members.iter().collect();
    assert_eq!(distinct.len(), members.len(), "a member is listed twice");
    assert_eq!(gathered.len(), members.len());
    assert!(members.len() <= MAX_GROUP_SIZE);
}
