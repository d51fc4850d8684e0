//! Joining a swarm: `/colony/join/1`, one request and one response on a stream.
//!
//! The joiner sends its run id, its member identity and its clock. The bootstrap peer checks the run, that
//! the identity names the peer the connection proved, and the clock skew; it then admits the joiner into
//! SWIM and answers with its own identity, its clock and every member it knows (in the payload), so the
//! joiner knows the whole swarm after one round trip instead of discovering it gossip by gossip.

use bytes::{Bytes, BytesMut};
use colony_transports::rpc::{self, Router};
use colony_transports::wire::{ProtocolId, WireError};
use colony_transports::{Connection, PeerId};
use foca::{Codec, Member};

use super::identity::{CodecError, MemberCodec, MemberId};
use crate::records::Time;

/// Members sent in one join response at most.
pub const MAX_JOIN_MEMBERS: usize = 100_000;

/// The protocol id.
pub fn protocol() -> ProtocolId {
    ProtocolId::new("join", 1).expect("a valid protocol name")
}

/// Outcomes of a join request.
pub mod outcome {
    /// Admitted.
    pub const ADMITTED: u8 = 0;
    /// Refused: the clocks differ too much.
    pub const CLOCK_SKEW: u8 = 1;
    /// Refused: another run.
    pub const WRONG_RUN: u8 = 2;
    /// Refused: the identity does not match the connection, or is malformed.
    pub const BAD_IDENTITY: u8 = 3;
    /// Refused: the bootstrap peer is shutting down.
    pub const UNAVAILABLE: u8 = 4;
}

/// The joiner's request.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinRequest {
    /// The run the joiner wants to join.
    pub run_id: String,
    /// The joiner's member identity, encoded.
    pub member: Vec<u8>,
    /// The joiner's clock when it sent the request.
    pub time: Time,
}

/// The bootstrap peer's response; the members travel in the payload.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinResponse {
    /// One of [`outcome`].
    pub outcome: u8,
    /// Why a request was refused.
    pub message: String,
    /// The bootstrap peer's clock when it answered.
    pub time: Time,
    /// The bootstrap peer's member identity, encoded.
    pub member: Vec<u8>,
}

/// Encodes a member identity for a join message.
pub fn encode_id(id: &MemberId) -> Vec<u8> {
    let header = foca::Header {
        src: id.clone(),
        src_incarnation: 0,
        dst: id.clone(),
        message: foca::Message::Announce,
    };
    let mut buf = Vec::new();
    // Encoding into a Vec cannot run out of space.
    let _ = MemberCodec.encode_header(&header, &mut buf);
    buf
}

/// Decodes a member identity from a join message.
pub fn decode_id(bytes: &[u8]) -> Result<MemberId, CodecError> {
    let mut slice = bytes;
    let header = MemberCodec.decode_header(&mut slice)?;
    Ok(header.src)
}

/// Encodes members as a join response payload.
pub fn encode_members(members: &[Member<MemberId>]) -> Bytes {
    let mut out = BytesMut::new();
    for member in members.iter().take(MAX_JOIN_MEMBERS) {
        let mut buf = Vec::new();
        let _ = MemberCodec.encode_member(member, &mut buf);
        out.extend_from_slice(&buf);
    }
    out.freeze()
}

/// Decodes a join response payload.
pub fn decode_members(mut payload: &[u8]) -> Result<Vec<Member<MemberId>>, CodecError> {
    let mut members = Vec::new();
    while !payload.is_empty() {
        if members.len() >= MAX_JOIN_MEMBERS {
            return Err(CodecError(format!("more than {MAX_JOIN_MEMBERS} members")));
        }
        members.push(MemberCodec.decode_member(&mut payload)?);
    }
    Ok(members)
}

/// What the bootstrap side needs: its clock and run, and a way to admit a joiner.
pub struct Admission<F> {
    /// The run served.
    pub run_id: String,
    /// Largest accepted clock difference, in seconds.
    pub max_skew: f64,
    /// The longest a request can have been in transit, in seconds (the joiner's attempt timeout).
    pub max_transit: f64,
    /// The clock.
    pub clock: crate::records::sync::Clock,
    /// Admits a member; `None` when this peer is shutting down.
    pub admit: F,
}

/// Serves join requests on `router`.
pub fn serve<F, Fut>(router: &mut Router, admission: Admission<F>)
where
    F: Fn(MemberId) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<(MemberId, Vec<Member<MemberId>>)>> + Send + 'static,
{
    let admission = std::sync::Arc::new(admission);
    router.rpc(protocol(), move |peer: PeerId, request: JoinRequest, _payload| {
        let admission = admission.clone();
        async move {
            let now = (admission.clock)();
            let refuse = |outcome: u8, message: String| {
                Ok((
                    JoinResponse {
                        outcome,
                        message,
                        time: now,
                        member: Vec::new(),
                    },
                    Bytes::new(),
                ))
            };
            if request.run_id != admission.run_id {
                return refuse(
                    outcome::WRONG_RUN,
                    format!("this peer serves run '{}', not '{}'", admission.run_id, request.run_id),
                );
            }
            let joiner = match decode_id(&request.member) {
                Ok(id) if id.peer == peer => id,
                Ok(id) => {
                    return refuse(
                        outcome::BAD_IDENTITY,
                        format!("the identity names peer {} but the connection is from {peer}", id.peer),
                    );
                }
                Err(error) => return refuse(outcome::BAD_IDENTITY, error.to_string()),
            };
            // The request spent an unknown time d in transit (0 <= d <= max_transit): the joiner's clock minus
            // ours is `request.time - now + d`. Refuse only what is out of bounds for every possible d; the
            // joiner measures the skew precisely from the round trip and refuses the rest itself.
            let skew = request.time - now;
            if !skew.is_finite() || skew > admission.max_skew || skew < -(admission.max_skew + admission.max_transit) {
                return refuse(
                    outcome::CLOCK_SKEW,
                    format!(
                        "your clock differs from this peer's by at least {:.3} s, more than the bound of {} s",
                        (skew.abs() - if skew < 0.0 { admission.max_transit } else { 0.0 }).max(0.0),
                        admission.max_skew
                    ),
                );
            }
            match (admission.admit)(joiner).await {
                Some((me, members)) => Ok((
                    JoinResponse {
                        outcome: outcome::ADMITTED,
                        message: String::new(),
                        time: (admission.clock)(),
                        member: encode_id(&me),
                    },
                    encode_members(&members),
                )),
                None => refuse(outcome::UNAVAILABLE, "this peer is shutting down".into()),
            }
        }
    });
}

/// What a successful join brought back.
pub struct Joined {
    /// The bootstrap peer's identity.
    pub bootstrap: MemberId,
    /// The members it knows.
    pub members: Vec<Member<MemberId>>,
    /// Its clock minus ours, estimated at the middle of the round trip, in seconds.
    pub skew: f64,
    /// The round trip, in seconds: the estimate is off by at most half of it.
    pub round_trip: f64,
}

/// Why one join attempt failed.
pub enum AttemptError {
    /// The peer refused, with one of [`outcome`] and its reason; `skew` is this side's estimate, off by at
    /// most half the `round_trip`.
    Refused {
        outcome: u8,
        message: String,
        skew: f64,
        round_trip: f64,
    },
    /// Anything else (no answer, a broken stream, a malformed response).
    Failed(String),
}

/// Sends a join request on `conn`.
pub async fn request(
    conn: &Connection,
    run_id: &str,
    me: &MemberId,
    clock: &crate::records::sync::Clock,
    timeout: std::time::Duration,
    config: &rpc::StreamConfig,
) -> Result<Joined, AttemptError> {
    let sent = clock();
    let request = JoinRequest {
        run_id: run_id.to_owned(),
        member: encode_id(me),
        time: sent,
    };
    let (response, payload): (JoinResponse, Bytes) =
        rpc::call(conn, &protocol(), &request, Bytes::new(), timeout, config)
            .await
            .map_err(|e: WireError| AttemptError::Failed(e.to_string()))?;
    let received = clock();
    let skew = response.time - (sent + received) / 2.0;
    let round_trip = (received - sent).max(0.0);
    if response.outcome != outcome::ADMITTED {
        return Err(AttemptError::Refused {
            outcome: response.outcome,
            message: response.message,
            skew,
            round_trip,
        });
    }
    let malformed = |e: CodecError| AttemptError::Failed(e.to_string());
    let bootstrap = decode_id(&response.member).map_err(malformed)?;
    if bootstrap.peer != conn.remote_peer() {
        return Err(AttemptError::Failed(format!(
            "the response names peer {} but the connection is to {}",
            bootstrap.peer,
            conn.remote_peer()
        )));
    }
    let members = decode_members(&payload).map_err(malformed)?;
    Ok(Joined {
        bootstrap,
        members,
        skew,
        round_trip,
    })
}
