//! What Colony's fuzz targets and their seed generator share: the peers the targets play, reading an input
//! as the frames a stream would carry, the record schemas and limits of the records target, and the group
//! and layout of the all-reduce target. The seed generator (`examples/gen_seeds.rs`) writes its seeds with
//! these same values, so that a seed reaches the deep paths of its target instead of failing an early check.

use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use colony::averager::decode_gather;
use colony::membership::{MemberId, Role};
use colony::records::{RecordLimits, Schemas, Time};
use colony_averaging::allreduce::PeerMode;
use colony_averaging::balance::load_balance_peers;
use colony_averaging::codec::Codec;
use colony_averaging::matchmaking::MessageFromLeader;
use colony_averaging::partition::{PartitionPlan, values_per_part};
use colony_averaging::tensor::{TensorInfo, TensorLayout};
use colony_transports::wire::{Frame, FrameKind, FrameLimits, WireMessage, decode_frame, encode_preamble};
use colony_transports::{Keypair, PeerId};

/// The run id of every record and join message the targets read.
pub const RUN_ID: &str = "fuzz-run";

/// The clock of the handlers, seconds (a fixed time, so that runs are reproducible). Seeds expire later.
pub const NOW: Time = 1_000_000.0;

/// Peers 0 to 15, each with a fixed key, so that seeds can carry valid signatures.
static KEYPAIRS: LazyLock<Vec<Keypair>> =
    LazyLock::new(|| (0..16u8).map(|n| Keypair::from_seed([n + 1; 32])).collect());

/// The key of peer `n` (modulo 16).
pub fn keypair(n: usize) -> &'static Keypair {
    &KEYPAIRS[n % KEYPAIRS.len()]
}

/// The id of peer `n` (modulo 16). Peer 0 is the peer the handlers run as.
pub fn peer(n: usize) -> PeerId {
    keypair(n).peer_id()
}

/// At most this many frames are read from one input.
pub const MAX_FRAMES: usize = 64;

/// The input read as a stream of frames, back to back, as `read_frame` would see them: up to the first
/// incomplete or invalid frame, and at most [`MAX_FRAMES`].
pub fn frames(mut data: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while out.len() < MAX_FRAMES {
        match decode_frame(data, &FrameLimits::default()) {
            Ok(Some((frame, used))) => {
                out.push(frame);
                data = &data[used..];
            }
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// The bytes of one frame: preamble, header, payload.
pub fn frame_bytes(kind: FrameKind, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = encode_preamble(kind, header.len() as u32, payload.len() as u64).to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out
}

/// The bytes of a message frame with `header` encoded by Colony's wire code.
pub fn message_frame<T: WireMessage>(header: &T, payload: &[u8]) -> Vec<u8> {
    let header = header.encode().expect("the seed's header encodes");
    frame_bytes(FrameKind::Message, &header, payload)
}

/// Copies `bytes` into a 16-byte aligned buffer (rkyv validates only aligned input).
pub fn aligned(bytes: &[u8]) -> rkyv::util::AlignedVec<16> {
    let mut out = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    out.extend_from_slice(bytes);
    out
}

/// The record kind with no schema of its own (any value), besides `progress` and `matchmaking`.
pub const FREE_KIND: &str = "free";

/// The schemas of a peer's records: progress and matchmaking declarations, as a trainer registers them, and
/// a kind that accepts any value.
pub fn schemas() -> Schemas {
    let mut schemas = Schemas::default();
    colony::progress::register_schema(&mut schemas);
    colony::actors::matchmaker::register_schema(&mut schemas);
    schemas.register_with(FREE_KIND, |_| Ok(()));
    schemas
}

/// Record limits small enough that inputs of a few KiB reach every limit.
pub fn tight_record_limits() -> RecordLimits {
    RecordLimits {
        max_key_bytes: 24,
        max_subkey_bytes: 8,
        max_value_bytes: 80,
        max_records_per_peer: 2,
        max_records: 4,
    }
}

/// The matchmaking prefix and the group key the matchmaking target searches under.
pub const GROUP_PREFIX: &str = "grads";

/// The group key the matchmaking target searches under.
pub fn group_key() -> String {
    colony_averaging::matchmaking::keys::group_key(GROUP_PREFIX, "")
}

/// The schema hash of the matchmaking target's search (and of its seeds' join requests).
pub const SCHEMA_HASH: [u8; 32] = [7; 32];

/// The all-reduce target's tensors: one per codec, sized so that parts of [`PART_SIZE_BYTES`] split some of
/// them and leave others whole; the scaled tensor has rows of 25.
pub fn allreduce_layout() -> (Arc<TensorLayout>, Vec<Codec>) {
    let tensors = vec![
        (TensorInfo::new("none", [300]), Codec::None),
        (TensorInfo::new("half", [200]), Codec::Float16),
        (TensorInfo::new("scaled", [10, 25]), Codec::ScaledFloat16),
        (TensorInfo::new("uniform", [300]), Codec::Uniform8Bit),
        (TensorInfo::new("quantile", [300]), Codec::Quantile8Bit),
        (TensorInfo::new("blockwise", [1200]), Codec::Blockwise8Bit),
    ];
    let codecs = tensors.iter().map(|(_, codec)| *codec).collect();
    let layout = TensorLayout::new(tensors.into_iter().map(|(info, _)| info).collect()).expect("a valid layout");
    (Arc::new(layout), codecs)
}

/// The all-reduce target's part size: 128 uncompressed values, 512 one-byte values.
pub const PART_SIZE_BYTES: usize = 512;

/// Shares below this many values are given to the other peers (the averager's `min_vector_size`).
pub const MIN_VECTOR_SIZE: usize = 16;

/// One member of a group, as the averager derives it from the leader's message.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedMember {
    /// Its id.
    pub peer: PeerId,
    /// How it takes part.
    pub mode: PeerMode,
    /// Its weight.
    pub weight: f32,
}

/// A group's all-reduce plan as every member derives it: the members read from the gathered bytes, their
/// shares balanced from the bandwidths, and the partition of the layout among them.
#[derive(Debug)]
pub struct GroupPlan {
    /// The group id.
    pub group_id: [u8; 32],
    /// The members in the leader's order.
    pub members: Vec<PlannedMember>,
    /// Values each member reduces.
    pub shares: Vec<usize>,
    /// Which parts each member reduces.
    pub partition: PartitionPlan,
}

/// The plan a member derives from a leader's `BeginAllreduce`, as the averager and the all-reduce do it:
/// every gather entry must decode, the bandwidths are balanced (clients reduce nothing), and members must be
/// distinct with finite, non-negative weights. `Err` says which step refused the group.
pub fn group_plan(message: &MessageFromLeader, layout: &TensorLayout, codecs: &[Codec]) -> Result<GroupPlan, String> {
    let group_id = message.group_id.ok_or("no group id")?;
    if message.gathered.len() != message.members.len() {
        return Err("gathered entries do not match the members".into());
    }
    let mut members = Vec::with_capacity(message.members.len());
    let mut bandwidths = Vec::with_capacity(message.members.len());
    for (peer, gathered) in message.members.iter().zip(&message.gathered) {
        let (mode, weight, bandwidth) = decode_gather(gathered)?;
        bandwidths.push(if mode == PeerMode::Client { Some(0.0) } else { bandwidth });
        members.push(PlannedMember {
            peer: *peer,
            mode,
            weight,
        });
    }
    let shares = load_balance_peers(layout.total_values(), &bandwidths, MIN_VECTOR_SIZE).map_err(|e| e.to_string())?;
    let mut seen = std::collections::HashSet::new();
    if members.iter().any(|m| !seen.insert(m.peer)) {
        return Err("a member appears twice".into());
    }
    let effective: Vec<f64> = members
        .iter()
        .zip(&shares)
        .map(|(m, share)| if m.mode == PeerMode::Client { 0.0 } else { *share as f64 })
        .collect();
    let partition = PartitionPlan::new(
        layout,
        |tensor, _| values_per_part(PART_SIZE_BYTES, codecs[tensor].bytes_per_value()),
        &effective,
    )
    .map_err(|e| e.to_string())?;
    Ok(GroupPlan {
        group_id,
        members,
        shares,
        partition,
    })
}

/// The uncompressed values the seeds encode: deterministic, varied, finite.
pub fn sample_values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * (1.0 + (i % 7) as f32)
        })
        .collect()
}

/// A payload as the frames carry it (for building messages in seeds and targets).
pub fn payload(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

/// The packet size of TCP and in-process connections (`SwimConfig::packet_size`).
pub const PACKET_SIZE: usize = 8192;

/// The member identity of peer `n` in the SWIM target: trainers 0 and 1 listen on tcp, 2 is a client.
pub fn swim_id(n: usize) -> MemberId {
    let peer = peer(n);
    let address = (n != 2).then(|| {
        format!("tcp://127.0.0.1:{}/p/{peer}", 4000 + n)
            .parse()
            .expect("a valid address")
    });
    MemberId {
        peer,
        generation: 1,
        role: if n == 2 { Role::Client } else { Role::Trainer },
        address,
        bandwidth_mbps: 100.0,
    }
}

/// The SWIM configuration of `SwimConfig::default()` on tcp, as `SwimConfig::to_foca` builds it.
pub fn swim_config() -> foca::Config {
    let mut config = foca::Config::new_lan(NonZeroU32::MIN);
    config.probe_period = Duration::from_millis(1000);
    config.probe_rtt = Duration::from_millis(400);
    config.num_indirect_probes = NonZeroUsize::new(3).expect("3");
    config.suspect_to_down_after = Duration::from_secs(3);
    config.max_transmissions = NonZeroU8::new(10).expect("10");
    config.max_packet_size = NonZeroUsize::new(PACKET_SIZE).expect("8192");
    config.notify_down_members = true;
    config.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(200),
        num_members: NonZeroUsize::new(3).expect("3"),
    });
    config.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(1),
        num_members: NonZeroUsize::MIN,
    });
    config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::new(2).expect("2"),
    });
    config
}

/// Checks that a decoded header survives a round trip: its encoding decodes, and encodes again to the same
/// bytes. Bytes are compared, not values, since a NaN field never equals itself. Returns the decoded copy.
pub fn assert_round_trip<T: WireMessage>(value: &T) -> T {
    let bytes = value.encode().expect("a decoded header re-encodes");
    let again = T::access_archived(&bytes)
        .and_then(T::decode_archived)
        .expect("a re-encoded header decodes");
    let bytes_again = again.encode().expect("re-encodes");
    assert_eq!(
        bytes.as_slice(),
        bytes_again.as_slice(),
        "a header changed on a round trip"
    );
    again
}
