//! The matchmaking protocol's messages, `/colony/matchmaking/1`.
//!
//! A follower opens a stream to a leader and sends a [`JoinRequest`]; the leader answers with one
//! [`MessageFromLeader`]: [`MessageCode::Accepted`] or a rejection (some with a suggested leader). After
//! `Accepted` the stream stays open until the leader sends a second and last message:
//! [`MessageCode::BeginAllreduce`] with the group, or [`MessageCode::GroupDisbanded`] /
//! [`MessageCode::Cancelled`], possibly with a suggested leader. A follower that gives up closes the
//! stream, and the leader drops it from its group.
//!
//! The codes keep the numbers of Hivemind's `MessageCode`, so logs read alike. Opaque bytes (the
//! follower's gather, the group's gathered list) travel as the frame's raw payload, not inside the rkyv
//! header: [`JoinRequest::to_wire`] and [`MessageFromLeader::to_wire`] split a message into the two, and the
//! `from_wire` functions check every field that came from the network.

use bytes::Bytes;
use colony_transports::PeerId;
use colony_transports::identity::PEER_ID_LEN;
use colony_transports::wire::ProtocolId;

use super::{MAX_GROUP_SIZE, Time};

/// The protocol id, `/colony/matchmaking/1`.
pub fn protocol() -> ProtocolId {
    ProtocolId::new("matchmaking", 1).expect("a valid protocol name")
}

/// Longest group key accepted in a request, bytes.
pub const MAX_GROUP_KEY_BYTES: usize = 256;

/// What a leader's message says. Numbers as in Hivemind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum MessageCode {
    /// The follower is in the leader's group; a second message follows.
    Accepted = 2,
    /// The group is assembled: members and gathered bytes follow.
    BeginAllreduce = 3,
    /// The leader has not declared itself (it is in client mode or its declaration lapsed).
    NotDeclared = 6,
    /// The leader follows another leader (suggested).
    NotALeader = 7,
    /// The leader intends to start later than the follower, so the follower should lead.
    BadExpirationTime = 8,
    /// The tensor schemas differ.
    BadSchemaHash = 9,
    /// The follower is already in the group.
    DuplicatePeerId = 11,
    /// The group has reached its target size.
    GroupIsFull = 12,
    /// The leader is not looking for a group now.
    NotLookingForGroup = 13,
    /// The request is malformed or the leader cannot lead (client mode).
    ProtocolViolation = 14,
    /// The leader failed internally.
    InternalError = 15,
    /// The leader was cancelled; look elsewhere (or at the suggested leader).
    Cancelled = 16,
    /// The leader gave up its group (too small by its time, or it now follows the suggested leader).
    GroupDisbanded = 17,
    /// The leader looks under another group key.
    BadGroupKey = 18,
}

impl MessageCode {
    /// Every code, for decoding and for reports.
    pub const ALL: [MessageCode; 14] = [
        MessageCode::Accepted,
        MessageCode::BeginAllreduce,
        MessageCode::NotDeclared,
        MessageCode::NotALeader,
        MessageCode::BadExpirationTime,
        MessageCode::BadSchemaHash,
        MessageCode::DuplicatePeerId,
        MessageCode::GroupIsFull,
        MessageCode::NotLookingForGroup,
        MessageCode::ProtocolViolation,
        MessageCode::InternalError,
        MessageCode::Cancelled,
        MessageCode::GroupDisbanded,
        MessageCode::BadGroupKey,
    ];

    /// The code of a wire byte.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|code| *code as u8 == byte)
    }

    /// A short name for logs and error messages.
    pub fn name(self) -> &'static str {
        match self {
            MessageCode::Accepted => "accepted",
            MessageCode::BeginAllreduce => "begin_allreduce",
            MessageCode::NotDeclared => "not_declared",
            MessageCode::NotALeader => "not_a_leader",
            MessageCode::BadExpirationTime => "bad_expiration_time",
            MessageCode::BadSchemaHash => "bad_schema_hash",
            MessageCode::DuplicatePeerId => "duplicate_peer_id",
            MessageCode::GroupIsFull => "group_is_full",
            MessageCode::NotLookingForGroup => "not_looking_for_group",
            MessageCode::ProtocolViolation => "protocol_violation",
            MessageCode::InternalError => "internal_error",
            MessageCode::Cancelled => "cancelled",
            MessageCode::GroupDisbanded => "group_disbanded",
            MessageCode::BadGroupKey => "bad_group_key",
        }
    }
}

impl std::fmt::Display for MessageCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A message that came from the network and does not hold together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed matchmaking message: {0}")]
pub struct MessageError(pub String);

/// A follower's request to join a leader's group.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRequest {
    /// The follower's tensor schema hash (32 bytes; anything else is a protocol violation).
    pub schema_hash: Vec<u8>,
    /// The follower's declared expiration (a client-mode follower: the time it would have declared).
    pub expiration: Time,
    /// Opaque bytes the follower shares with its group (the averager puts bandwidth, role and weight here).
    pub gather: Bytes,
    /// Whether the follower is in client mode (it reduces nothing and cannot be dialed).
    pub client_mode: bool,
    /// The key the follower looks under.
    pub group_key: String,
}

/// The rkyv header of a [`JoinRequest`]; the gather bytes are the frame's payload.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinRequestHeader {
    schema_hash: Vec<u8>,
    expiration: f64,
    client_mode: bool,
    group_key: String,
}

impl JoinRequest {
    /// The header and payload to send.
    pub fn to_wire(&self) -> (JoinRequestHeader, Bytes) {
        (
            JoinRequestHeader {
                schema_hash: self.schema_hash.clone(),
                expiration: self.expiration,
                client_mode: self.client_mode,
                group_key: self.group_key.clone(),
            },
            self.gather.clone(),
        )
    }

    /// A request from what arrived. The leader judges the values (schema hash length, finite expiration);
    /// only what cannot be represented is refused here.
    pub fn from_wire(header: JoinRequestHeader, payload: Bytes) -> Result<Self, MessageError> {
        if header.group_key.len() > MAX_GROUP_KEY_BYTES {
            return Err(MessageError(format!(
                "group key of {} bytes, more than {MAX_GROUP_KEY_BYTES}",
                header.group_key.len()
            )));
        }
        Ok(Self {
            schema_hash: header.schema_hash,
            expiration: header.expiration,
            gather: payload,
            client_mode: header.client_mode,
            group_key: header.group_key,
        })
    }
}

/// A leader's message to a follower.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageFromLeader {
    /// What it says.
    pub code: MessageCode,
    /// The group id ([`MessageCode::BeginAllreduce`] only).
    pub group_id: Option<[u8; 32]>,
    /// Where to look instead ([`MessageCode::NotALeader`], [`MessageCode::GroupDisbanded`],
    /// [`MessageCode::Cancelled`]).
    pub suggested_leader: Option<PeerId>,
    /// The ordered members ([`MessageCode::BeginAllreduce`] only).
    pub members: Vec<PeerId>,
    /// Each member's gather bytes, aligned with `members`.
    pub gathered: Vec<Bytes>,
}

/// The rkyv header of a [`MessageFromLeader`]; the gathered bytes, concatenated, are the frame's payload.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LeaderMessageHeader {
    code: u8,
    group_id: Option<[u8; 32]>,
    suggested_leader: Option<[u8; PEER_ID_LEN]>,
    members: Vec<[u8; PEER_ID_LEN]>,
    gathered_lengths: Vec<u64>,
}

impl MessageFromLeader {
    /// A message with only a code.
    pub fn code(code: MessageCode) -> Self {
        Self {
            code,
            group_id: None,
            suggested_leader: None,
            members: Vec::new(),
            gathered: Vec::new(),
        }
    }

    /// A message with a code and a suggested leader.
    pub fn redirect(code: MessageCode, suggested_leader: Option<PeerId>) -> Self {
        Self {
            suggested_leader,
            ..Self::code(code)
        }
    }

    /// The header and payload to send.
    pub fn to_wire(&self) -> (LeaderMessageHeader, Bytes) {
        let total: usize = self.gathered.iter().map(Bytes::len).sum();
        let mut payload = Vec::with_capacity(total);
        for bytes in &self.gathered {
            payload.extend_from_slice(bytes);
        }
        (
            LeaderMessageHeader {
                code: self.code as u8,
                group_id: self.group_id,
                suggested_leader: self.suggested_leader.map(|peer| *peer.as_bytes()),
                members: self.members.iter().map(|peer| *peer.as_bytes()).collect(),
                gathered_lengths: self.gathered.iter().map(|b| b.len() as u64).collect(),
            },
            Bytes::from(payload),
        )
    }

    /// A message from what arrived: a known code, at most [`MAX_GROUP_SIZE`] members, gathered lengths
    /// aligned with the members and adding up to the payload. (Whether the group makes sense for the
    /// follower is the follower's judgement.)
    pub fn from_wire(header: LeaderMessageHeader, payload: Bytes) -> Result<Self, MessageError> {
        let code = MessageCode::from_u8(header.code)
            .ok_or_else(|| MessageError(format!("unknown message code {}", header.code)))?;
        if header.members.len() > MAX_GROUP_SIZE {
            return Err(MessageError(format!(
                "{} members, more than {MAX_GROUP_SIZE}",
                header.members.len()
            )));
        }
        if header.gathered_lengths.len() != header.members.len() {
            return Err(MessageError(format!(
                "{} gathered entries for {} members",
                header.gathered_lengths.len(),
                header.members.len()
            )));
        }
        let total = header
            .gathered_lengths
            .iter()
            .try_fold(0u64, |sum, len| sum.checked_add(*len))
            .filter(|total| *total == payload.len() as u64)
            .ok_or_else(|| {
                MessageError(format!(
                    "gathered lengths do not add up to the payload's {} bytes",
                    payload.len()
                ))
            })?;
        debug_assert_eq!(total, payload.len() as u64);
        let mut gathered = Vec::with_capacity(header.members.len());
        let mut offset = 0usize;
        for len in &header.gathered_lengths {
            // Each length is at most the payload's, which fits in memory: checked by the sum above.
            let len = *len as usize;
            gathered.push(payload.slice(offset..offset + len));
            offset += len;
        }
        Ok(Self {
            code,
            group_id: header.group_id,
            suggested_leader: header.suggested_leader.map(PeerId::from_bytes),
            members: header.members.into_iter().map(PeerId::from_bytes).collect(),
            gathered,
        })
    }
}
