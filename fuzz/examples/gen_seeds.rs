//! Writes the seed corpora of Colony's fuzz targets, `seeds/<target>/*.bin`: real messages, encoded by
//! Colony's own code (frames by the wire code, headers by rkyv, records signed by real keys, SWIM packets
//! by a SWIM instance talking to another, parts by the codecs). Run from `fuzz/` with
//! `cargo run --example gen_seeds` (stable is enough); it rewrites every seed. Regenerate the seeds when a
//! format changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use colony::averager::encode_gather;
use colony::membership::broadcast::{self, RecordBroadcasts};
use colony::membership::identity::CachingCodec;
use colony::membership::join::{self, JoinRequest as JoinMessage, JoinResponse};
use colony::progress::{LocalProgress, PROGRESS_KEY};
use colony::records::replica::{PublishLimits, Replica};
use colony::records::sync::{SyncStep, steps};
use colony::records::wire::{WireBatch, WireDigestEntry, WireRecord};
use colony::records::{DigestEntry, Record, RecordLimits, RecordStore, Subkey};
use colony_averaging::allreduce::{PeerMode, Refusal, ToReducer, ToSender};
use colony_averaging::codec::Codec;
use colony_averaging::matchmaking::{Declaration, JoinRequest, MessageCode, MessageFromLeader};
use colony_averaging::state_transfer::{StateInfo, StateRequest, StateResponse, chunk_range, encode_values};
use colony_fuzz::{
    FREE_KIND, NOW, RUN_ID, SCHEMA_HASH, allreduce_layout, frame_bytes, group_key, group_plan, keypair, message_frame,
    peer, sample_values, schemas, swim_config, swim_id,
};
use colony_transports::wire::{ErrorHeader, FrameKind, OpenHeader, WireMessage, encode_preamble};
use foca::{AccumulatingRuntime, Codec as _, Foca, Member, State};
use rand::SeedableRng;
use rand::rngs::StdRng;

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, seeds) in [
        ("frame_decode", frame_seeds()?),
        ("records", record_seeds()),
        ("membership", membership_seeds()),
        ("matchmaking", matchmaking_seeds()),
        ("allreduce", allreduce_seeds()),
        ("state_transfer", state_seeds()),
        ("codec", codec_seeds()),
    ] {
        write(&root.join(target), &seeds)?;
    }
    Ok(())
}

fn write(dir: &PathBuf, seeds: &Seeds) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
        println!("{}/{name}: {} bytes", dir.display(), bytes.len());
    }
    Ok(())
}

/// Frames: an open frame, a message with a payload, error frames (a message stored out of line and one
/// stored inline in the archive), and two frames back to back.
fn frame_seeds() -> Result<Seeds, Box<dyn std::error::Error>> {
    let frame = |kind: FrameKind, header: &[u8], payload: &[u8]| {
        let mut out = encode_preamble(kind, header.len() as u32, payload.len() as u64).to_vec();
        out.extend_from_slice(header);
        out.extend_from_slice(payload);
        out
    };
    let open = OpenHeader {
        protocol: "/colony/echo/1".into(),
    }
    .encode()?;
    let open_frame = frame(FrameKind::Open, &open, b"");
    // A protocol message header: rkyv lays a struct out like this tuple (a name, a step, a count).
    let message_header = ("grads".to_string(), 7u64, 16u32).encode()?;
    let payload: Vec<u8> = (0..16u32).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let message_frame = frame(FrameKind::Message, &message_header, &payload);
    let error = ErrorHeader {
        message: "unknown protocol /colony/nope/1".into(),
    }
    .encode()?;
    let error_frame = frame(FrameKind::Error, &error, b"");
    let short_error = ErrorHeader { message: "busy".into() }.encode()?;
    let short_error_frame = frame(FrameKind::Error, &short_error, b"");
    let stream = [open_frame.as_slice(), message_frame.as_slice()].concat();
    Ok(vec![
        ("open.bin", open_frame),
        ("message.bin", message_frame),
        ("error.bin", error_frame),
        ("error_short.bin", short_error_frame),
        ("open_then_message.bin", stream),
    ])
}

fn progress(n: usize, epoch: u64, client_mode: bool) -> LocalProgress {
    LocalProgress {
        peer: peer(n),
        epoch,
        samples_accumulated: 40 * n as u64,
        samples_per_second: 12.5 * n as f64,
        time: NOW - 2.0,
        client_mode,
        target_batch_size: 256,
    }
}

fn progress_record(n: usize, epoch: u64, client_mode: bool) -> Record {
    Record::signed(
        RUN_ID,
        keypair(n),
        PROGRESS_KEY,
        Some(Subkey::Peer(peer(n))),
        Some(progress(n, epoch, client_mode).encode()),
        NOW + 60.0,
    )
}

fn batch(records: &[Record], digest: &[DigestEntry]) -> Vec<u8> {
    WireBatch {
        records: records.iter().map(WireRecord::from).collect(),
        digest: digest.iter().map(WireDigestEntry::from).collect(),
    }
    .encode()
    .expect("a batch encodes")
    .to_vec()
}

/// Anti-entropy batches (signed progress and matchmaking records, free records, a named subkey, a
/// deletion, digests), one record broadcast and a sync step.
fn record_seeds() -> Seeds {
    let declaration = Record::signed(
        RUN_ID,
        keypair(2),
        colony::actors::matchmaker::declaration_key(&group_key()),
        Some(Subkey::Peer(peer(2))),
        Some(
            Declaration {
                expiration: NOW + 5.0,
                looking: true,
            }
            .encode(),
        ),
        NOW + 30.0,
    );
    let free = Record {
        key: format!("{FREE_KIND}/model"),
        subkey: None,
        value: Some(Bytes::from_static(b"a value anyone may write")),
        expiration: NOW + 90.0,
        signature: None,
    };
    let named = Record {
        key: FREE_KIND.into(),
        subkey: Some(Subkey::Name("notes".into())),
        value: Some(Bytes::from_static(b"n")),
        expiration: NOW + 10.0,
        signature: None,
    };
    let deletion = Record {
        key: format!("{FREE_KIND}/gone"),
        subkey: None,
        value: None,
        expiration: NOW + 10.0,
        signature: None,
    };
    let digest = vec![
        DigestEntry {
            key: PROGRESS_KEY.into(),
            subkey: Some(Subkey::Peer(peer(1))),
            expiration: NOW + 1.0,
        },
        DigestEntry {
            key: format!("{FREE_KIND}/model"),
            subkey: None,
            expiration: NOW + 200.0,
        },
    ];
    let mixed = batch(
        &[progress_record(1, 4, false), declaration, free, named, deletion],
        &digest,
    );
    let progress_batch = batch(
        &[
            progress_record(1, 4, false),
            progress_record(2, 5, false),
            progress_record(3, 9, true),
            progress_record(4, 5, false),
        ],
        &[],
    );
    let digest_only = batch(&[], &digest);
    let item = broadcast::encode(&progress_record(5, 7, false)).expect("a record encodes");
    let offer = SyncStep {
        step: steps::OFFER,
        fingerprint: [9; 32],
    }
    .encode()
    .expect("a step encodes");
    vec![
        ("batch_mixed.bin", mixed),
        ("batch_progress.bin", progress_batch),
        ("batch_digest.bin", digest_only),
        ("broadcast_progress.bin", item.to_vec()),
        ("sync_offer.bin", offer.to_vec()),
    ]
}

type Swim = Foca<colony::membership::MemberId, CachingCodec, StdRng, RecordBroadcasts>;

fn swim(n: usize) -> (Swim, Arc<Replica>) {
    let replica = Arc::new(Replica::new(
        RecordStore::new(RUN_ID, RecordLimits::default(), schemas()),
        Arc::new(|| NOW),
        PublishLimits::default(),
    ));
    let swim = Foca::with_custom_broadcast(
        swim_id(n),
        swim_config(),
        StdRng::seed_from_u64(n as u64),
        CachingCodec::default(),
        RecordBroadcasts::new(replica.clone(), Arc::new(AtomicBool::new(false))),
    );
    (swim, replica)
}

/// Packets a SWIM instance of peer 1 sends to peer 0 (announce, gossip with members, a record broadcast,
/// probes), and the join protocol's messages.
fn membership_seeds() -> Seeds {
    let (mut one, replica) = swim(1);
    let (mut zero, _) = swim(0);
    let mut to_zero = Vec::new();
    let mut rt_one = AccumulatingRuntime::new();
    let mut rt_zero = AccumulatingRuntime::new();
    // Peer 1 knows the client peer 2 and a fourth member, so that its packets carry updates.
    let known = [
        Member::new(swim_id(2), 0, State::Alive),
        Member::new(swim_id(3), 1, State::Suspect),
    ];
    one.apply_many(known.into_iter(), true, &mut rt_one)
        .expect("members apply");
    one.announce(swim_id(0), &mut rt_one).expect("announces");
    let record = progress_record(1, 4, false);
    replica
        .apply(record.clone(), peer(1))
        .expect("peer 1 stores its own record");
    one.add_broadcast(&broadcast::encode(&record).expect("encodes"))
        .expect("a broadcast is added");
    for _ in 0..4 {
        while let Some((dst, packet)) = rt_one.to_send() {
            if dst == swim_id(0) {
                to_zero.push(packet.to_vec());
                let _ = zero.handle_data(&packet, &mut rt_zero);
            }
        }
        while let Some((dst, packet)) = rt_zero.to_send() {
            if dst == swim_id(1) {
                let _ = one.handle_data(&packet, &mut rt_one);
            }
        }
        one.gossip(&mut rt_one).expect("gossips");
        one.broadcast(&mut rt_one).expect("broadcasts");
        // Fire the timers due so far (probes, periodic gossip); those they schedule wait for the next turn.
        let mut due = Vec::new();
        while let Some((_, timer)) = rt_one.to_schedule() {
            due.push(timer);
        }
        for timer in due {
            let _ = one.handle_timer(timer, &mut rt_one);
        }
    }
    to_zero.sort_by_key(Vec::len);
    to_zero.dedup();
    let mut seeds: Seeds = Vec::new();
    let names = [
        "swim_a.bin",
        "swim_b.bin",
        "swim_c.bin",
        "swim_d.bin",
        "swim_e.bin",
        "swim_f.bin",
    ];
    // The shortest and the longest packets, and some between.
    let picks: Vec<usize> = if to_zero.len() <= names.len() {
        (0..to_zero.len()).collect()
    } else {
        (0..names.len())
            .map(|i| i * (to_zero.len() - 1) / (names.len() - 1))
            .collect()
    };
    for (name, index) in names.iter().zip(picks) {
        seeds.push((name, to_zero[index].clone()));
    }

    let request = JoinMessage {
        run_id: RUN_ID.into(),
        member: join::encode_id(&swim_id(1)),
        time: NOW,
    };
    let response = JoinResponse {
        outcome: join::outcome::ADMITTED,
        message: String::new(),
        time: NOW + 0.01,
        member: join::encode_id(&swim_id(0)),
    };
    let members = join::encode_members(&[
        Member::new(swim_id(0), 0, State::Alive),
        Member::new(swim_id(2), 3, State::Suspect),
        Member::new(swim_id(3), 1, State::Down),
    ]);
    let mut header = Vec::new();
    CachingCodec::default()
        .encode_header(
            &foca::Header {
                src: swim_id(1),
                src_incarnation: 2,
                dst: swim_id(0),
                message: foca::Message::PingReq {
                    target: swim_id(2),
                    probe_number: 5,
                },
            },
            &mut header,
        )
        .expect("a header encodes");
    seeds.extend([
        ("join_request.bin", request.encode().expect("encodes").to_vec()),
        ("join_response.bin", response.encode().expect("encodes").to_vec()),
        ("join_members.bin", members.to_vec()),
        ("join_id.bin", join::encode_id(&swim_id(1))),
        ("header_ping_req.bin", header),
    ]);
    seeds
}

fn join_request(expiration: f64, gather: Bytes) -> Vec<u8> {
    let (header, payload) = JoinRequest {
        schema_hash: SCHEMA_HASH.to_vec(),
        expiration,
        gather,
        client_mode: false,
        group_key: group_key(),
    }
    .to_wire();
    message_frame(&header, &payload)
}

fn leader_message(message: &MessageFromLeader) -> Vec<u8> {
    let (header, payload) = message.to_wire();
    message_frame(&header, &payload)
}

fn begin(members: &[usize], gathered: Vec<Bytes>) -> MessageFromLeader {
    MessageFromLeader {
        code: MessageCode::BeginAllreduce,
        group_id: Some([0x5a; 32]),
        suggested_leader: None,
        members: members.iter().map(|&n| peer(n)).collect(),
        gathered,
    }
}

/// Streams of join requests, a leader's answers, declaration records, and a gather and a declaration alone.
fn matchmaking_seeds() -> Seeds {
    let gather = |n: usize| encode_gather(PeerMode::Node, 1.0 + n as f32, Some(10.0 * n as f64));
    let error = frame_bytes(
        FrameKind::Error,
        &ErrorHeader {
            message: "no connection".into(),
        }
        .encode()
        .expect("encodes"),
        b"",
    );
    // The request to peer 1 fails; three followers join peer 0, whose group is then full.
    let followers = [
        error,
        join_request(NOW + 8.0, gather(2)),
        join_request(NOW + 9.0, gather(3)),
        join_request(NOW + 9.5, gather(4)),
    ]
    .concat();
    // Peer 1 accepts peer 0, then begins the all-reduce with peers 1, 0 and 3.
    let accepted = [
        leader_message(&MessageFromLeader::code(MessageCode::Accepted)),
        leader_message(&begin(&[1, 0, 3], vec![gather(1), gather(0), gather(3)])),
    ]
    .concat();
    // Peer 1 is not a leader and suggests peer 4; peer 0 has a follower meanwhile; the group disbands.
    let redirected = [
        leader_message(&MessageFromLeader::redirect(MessageCode::NotALeader, Some(peer(4)))),
        join_request(NOW + 7.0, gather(5)),
        leader_message(&MessageFromLeader::code(MessageCode::Accepted)),
        leader_message(&MessageFromLeader::redirect(MessageCode::GroupDisbanded, Some(peer(6)))),
    ]
    .concat();
    let declaration = |expiration: f64, looking: bool| Declaration { expiration, looking }.encode();
    let declarations = [
        frame_bytes(FrameKind::Message, b"", &declaration(NOW + 1.5, true)),
        frame_bytes(FrameKind::Message, b"", &declaration(NOW + 3.0, true)),
        frame_bytes(FrameKind::Message, b"", &declaration(NOW + 1.0, false)),
    ]
    .concat();
    vec![
        ("followers.bin", followers),
        ("accepted_begin.bin", accepted),
        ("redirected.bin", redirected),
        ("declarations.bin", declarations),
        ("gather.bin", encode_gather(PeerMode::Client, 2.5, None).to_vec()),
        ("declaration.bin", declaration(NOW + 4.0, true).to_vec()),
    ]
}

/// The group of the all-reduce seeds: peer 0 and peer 1 reduce (bandwidths 100 and 90), peer 2 is a client.
fn allreduce_group() -> MessageFromLeader {
    begin(
        &[0, 1, 2],
        vec![
            encode_gather(PeerMode::Node, 1.0, Some(100.0)),
            encode_gather(PeerMode::Node, 2.0, Some(90.0)),
            encode_gather(PeerMode::Client, 1.0, None),
        ],
    )
}

/// A sender's stream to peer 0 (begin, then peer 0's parts in each tensor's codec), a reducer's results for
/// peer 1's parts, and a refusal.
fn allreduce_seeds() -> Seeds {
    let (layout, codecs) = allreduce_layout();
    let group = allreduce_group();
    let plan = group_plan(&group, &layout, &codecs).expect("the seed group plans");
    let values = sample_values(layout.total_values(), 11);
    let part_frames = |owner: usize, result: bool| -> Vec<u8> {
        let mut out = Vec::new();
        for part in plan.partition.parts_of_peer(owner) {
            let info = &plan.partition.parts()[part];
            let codec = codecs[info.tensor];
            let row_len = layout.tensors()[info.tensor].row_len();
            let payload = codec.encode(&values[info.range.clone()], row_len);
            let (index, codec) = (part as u64, codec.id());
            out.extend(if result {
                message_frame(&ToSender::Averaged { index, codec }, &payload)
            } else {
                message_frame(&ToReducer::Part { index, codec }, &payload)
            });
        }
        out
    };
    let plan_frame = leader_message(&group);
    let to_reducer = [
        plan_frame.clone(),
        message_frame(
            &ToReducer::Begin {
                group_id: plan.group_id,
            },
            b"",
        ),
        part_frames(0, false),
    ]
    .concat();
    let results = [plan_frame.clone(), part_frames(1, true)].concat();
    let refused = [
        plan_frame,
        message_frame(
            &ToSender::Refused {
                code: Refusal::Banned.code(),
                detail: "sender dropped after 15 s".into(),
            },
            b"",
        ),
    ]
    .concat();
    vec![
        ("sender_stream.bin", to_reducer),
        ("reducer_results.bin", results),
        ("refused.bin", refused),
    ]
}

/// Requests (one to serve, one with a zero chunk size), a donor's answers (the info and the first chunks),
/// and a refusal.
fn state_seeds() -> Seeds {
    let request = |chunk_values, start_chunk, chunk_count| {
        message_frame(
            &StateRequest {
                chunk_values,
                start_chunk,
                chunk_count,
            },
            b"",
        )
    };
    let values = sample_values(1000, 5);
    let mut answers = message_frame(
        &StateResponse::Info(StateInfo {
            epoch: 12,
            schema_hash: SCHEMA_HASH,
            total_values: 1000,
            chunk_values: 64,
        }),
        b"optimizer metadata",
    );
    for index in 0..3 {
        let range = chunk_range(index, 64, 1000);
        answers.extend(message_frame(
            &StateResponse::Chunk { index },
            &encode_values(&values[range]),
        ));
    }
    let last = chunk_range(15, 64, 1000);
    let tail = [
        message_frame(
            &StateResponse::Info(StateInfo {
                epoch: 3,
                schema_hash: SCHEMA_HASH,
                total_values: 1000,
                chunk_values: 64,
            }),
            b"",
        ),
        message_frame(
            &StateResponse::Chunk { index: 0 },
            &encode_values(&values[chunk_range(0, 64, 1000)]),
        ),
        message_frame(&StateResponse::Chunk { index: 15 }, &encode_values(&values[last])),
    ]
    .concat();
    let refused = message_frame(
        &StateResponse::Refused {
            reason: "this peer does not share its state now".into(),
        },
        b"",
    );
    vec![
        ("requests.bin", [request(64, 0, 16), request(100, 3, 7)].concat()),
        ("request_zero_chunk.bin", request(0, 0, 1)),
        ("info_and_chunks.bin", answers),
        ("info_then_out_of_order.bin", tail),
        ("refused.bin", refused),
    ]
}

/// Each codec's encoding of varied values (`[id][len as u32][bytes]`), and an empty part of each.
fn codec_seeds() -> Seeds {
    let names = [
        ("none.bin", "none_empty.bin"),
        ("float16.bin", "float16_empty.bin"),
        ("scaled16.bin", "scaled16_empty.bin"),
        ("uniform8.bin", "uniform8_empty.bin"),
        ("quantile8.bin", "quantile8_empty.bin"),
        ("blockwise8.bin", "blockwise8_empty.bin"),
    ];
    let mut seeds = Vec::new();
    for (codec, (name, empty)) in Codec::ALL.into_iter().zip(names) {
        let len = match codec {
            Codec::Blockwise8Bit => 4100,
            _ => 300,
        };
        let values = sample_values(len, u64::from(codec.id()) + 1);
        for (name, values) in [(name, &values[..]), (empty, &[][..])] {
            let mut input = vec![codec.id()];
            input.extend_from_slice(&(values.len() as u32).to_le_bytes());
            input.extend_from_slice(&codec.encode(values, 25));
            seeds.push((name, input));
        }
    }
    seeds
}
