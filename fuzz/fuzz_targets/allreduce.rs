//! Fuzzes what a member of an all-reduce reads from the network. The input is read as a stream of frames
//! (see `colony_fuzz::frames`):
//!
//! - the first frame is the leader's final matchmaking message (`LeaderMessageHeader`, the gathered bytes
//!   as payload); a `BeginAllreduce` that names peer 0 gives the group plan as every member derives it
//!   (`colony_fuzz::group_plan`: `decode_gather`, `load_balance_peers`, `PartitionPlan::new`) over a layout
//!   with one tensor per codec;
//! - every later frame is read as a reducer reads a sender's stream (`ToReducer`: `Begin` with the group
//!   id, then peer 0's parts in order, each decoded with the codec it names and the part's length) and as a
//!   sender reads a reducer's results (`ToSender`: `Averaged` for each of that reducer's parts in order, in
//!   the tensor's codec, or `Refused`).
//!
//! Invariants: headers re-encode and decode to themselves; a plan's shares add up to the layout's values
//! with nothing for clients, and its partition gives every part to exactly one member; a part or result
//! that is accepted decodes to exactly the part's length of finite values; refusal codes round-trip.

#![no_main]

use colony_averaging::allreduce::{PeerMode, Refusal, ToReducer, ToSender};
use colony_averaging::codec::Codec;
use colony_averaging::matchmaking::MessageFromLeader;
use colony_averaging::matchmaking::messages::LeaderMessageHeader;
use colony_fuzz::{GroupPlan, allreduce_layout, assert_round_trip, frames, group_plan, peer};
use colony_transports::wire::FrameKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames = frames(data);
    let Some((first, rest)) = frames.split_first() else {
        return;
    };
    let Ok(header) = first.decode::<LeaderMessageHeader>() else {
        return;
    };
    assert_round_trip(&header);
    let Ok(message) = MessageFromLeader::from_wire(header, first.payload.clone()) else {
        return;
    };
    let (layout, codecs) = allreduce_layout();
    let Ok(plan) = group_plan(&message, &layout, &codecs) else {
        return;
    };
    check_plan(&plan, layout.total_values());
    let Some(me) = plan.members.iter().position(|m| m.peer == peer(0)) else {
        return;
    };

    // As a reducer: one sender's stream to peer 0.
    let mut reducer = Some(plan.partition.parts_of_peer(me));
    let mut begun = false;
    // As a sender: the results of the first other member that reduces something.
    let reducer_index = (0..plan.members.len()).find(|&j| j != me && !plan.partition.parts_of_peer(j).is_empty());
    let mut results = reducer_index.map(|j| plan.partition.parts_of_peer(j));

    for frame in rest {
        if frame.kind != FrameKind::Message {
            // An error frame ends both streams, as `FramedRecv::recv` reports it.
            reducer = None;
            results = None;
            continue;
        }
        if let Some(parts) = reducer.as_mut() {
            let ok = match frame.decode::<ToReducer>() {
                Ok(message) => {
                    assert_round_trip(&message);
                    match message {
                        ToReducer::Begin { group_id } if !begun => {
                            begun = true;
                            group_id == plan.group_id
                        }
                        ToReducer::Part { index, codec } if begun => match parts.next() {
                            Some(part) if index == part as u64 => {
                                accept_part(&plan, &codecs, part, codec, &frame.payload, None).is_ok()
                            }
                            _ => false,
                        },
                        _ => false,
                    }
                }
                Err(_) => false,
            };
            if !ok {
                reducer = None;
            }
        }
        if let Some(parts) = results.as_mut() {
            let ok = match frame.decode::<ToSender>() {
                Ok(message) => {
                    assert_round_trip(&message);
                    match message {
                        ToSender::Averaged { index, codec } => match parts.next() {
                            Some(part) if index == part as u64 => {
                                let expected = codecs[plan.partition.parts()[part].tensor];
                                accept_part(&plan, &codecs, part, codec, &frame.payload, Some(expected)).is_ok()
                            }
                            _ => false,
                        },
                        ToSender::Refused { code, .. } => {
                            if let Some(refusal) = Refusal::from_code(code) {
                                assert_eq!(refusal.code(), code);
                                assert!(!refusal.to_string().is_empty());
                            }
                            false
                        }
                    }
                }
                Err(_) => false,
            };
            if !ok {
                results = None;
            }
        }
    }
});

/// A part (or a result) as the all-reduce takes it: a known codec (the tensor's, for results), decoded to
/// the part's length.
fn accept_part(
    plan: &GroupPlan,
    codecs: &[Codec],
    part: usize,
    codec_id: u8,
    payload: &[u8],
    expected: Option<Codec>,
) -> Result<Vec<f32>, String> {
    let codec = Codec::from_id(codec_id).map_err(|e| e.to_string())?;
    if expected.is_some_and(|expected| expected != codec) {
        return Err("a result in another codec".into());
    }
    let range = plan.partition.parts()[part].range.clone();
    let values = codec.decode(payload, range.len()).map_err(|e| e.to_string())?;
    assert_eq!(values.len(), range.len(), "part {part}: wrong length");
    assert!(
        values.iter().all(|v| v.is_finite()),
        "part {part}: a non-finite value was accepted"
    );
    assert!(codecs.len() > plan.partition.parts()[part].tensor);
    Ok(values)
}

/// The plan every member derives: shares add up, clients reduce nothing, every part has one owner.
fn check_plan(plan: &GroupPlan, total_values: usize) {
    assert_eq!(plan.shares.len(), plan.members.len());
    assert_eq!(
        plan.shares.iter().sum::<usize>(),
        total_values,
        "shares do not add up to the values"
    );
    assert!(plan.members.iter().all(|m| m.weight.is_finite() && m.weight >= 0.0));
    let parts = plan.partition.parts();
    let mut next = 0;
    let mut owned = 0;
    for (member, m) in plan.members.iter().enumerate() {
        let mine = plan.partition.parts_of_peer(member);
        assert_eq!(
            mine.start, next,
            "member {member}'s parts do not follow the previous member's"
        );
        next = mine.end;
        owned += mine.len();
        if m.mode == PeerMode::Client {
            assert!(mine.is_empty(), "a client reduces parts");
        }
        let values: usize = parts[mine].iter().map(|p| p.len()).sum();
        assert_eq!(values, plan.partition.values_of_peer(member));
    }
    assert_eq!(owned, parts.len(), "some parts have no reducer");
    assert!(parts.iter().all(|p| !p.is_empty()));
    assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), total_values);
}
