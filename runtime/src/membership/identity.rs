//! Who a member is, as SWIM sees it, and how SWIM messages are encoded.
//!
//! A [`MemberId`] is a peer's proven [`PeerId`] plus what others need to reach and use it: a *generation*
//! (a new one each time the peer starts or renews itself after being declared dead, so a restarted peer
//! with the same identity file rejoins at once), its [`Role`], its dialable address (none for client-mode
//! peers, which nobody dials) and its declared bandwidth.
//!
//! The codec is a small hand-written binary format: every read is bounds-checked, every length is capped,
//! and anything malformed is an error, never a panic.

use std::fmt;

use bytes::{Buf, BufMut};
use colony_transports::identity::PEER_ID_LEN;
use colony_transports::{Address, PeerId};
use foca::{Header, Incarnation, Member, Message, State};

/// Longest address a member may declare, in bytes.
pub const MAX_ADDRESS_BYTES: usize = 512;

/// What a peer does in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Computes gradients and takes part in averaging.
    Trainer,
    /// A trainer that nobody can dial (behind NAT): it reaches others over connections it opens.
    Client,
    /// Helps average for others without training (a CPU-only helper).
    Auxiliary,
}

impl Role {
    fn to_byte(self) -> u8 {
        match self {
            Role::Trainer => 0,
            Role::Client => 1,
            Role::Auxiliary => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, CodecError> {
        match byte {
            0 => Ok(Role::Trainer),
            1 => Ok(Role::Client),
            2 => Ok(Role::Auxiliary),
            other => Err(CodecError(format!("unknown role {other}"))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Trainer => "trainer",
            Role::Client => "client",
            Role::Auxiliary => "auxiliary",
        })
    }
}

/// A member's identity in SWIM.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberId {
    /// The peer, proven by every connection to it.
    pub peer: PeerId,
    /// Larger for a later start (or renewal) of the same peer.
    pub generation: u64,
    /// What the peer does.
    pub role: Role,
    /// Where to dial it; `None` for client-mode peers.
    pub address: Option<Address>,
    /// Declared bandwidth in megabits per second; 0 when not declared.
    pub bandwidth_mbps: f32,
}

// Bandwidth is finite (checked on decode and at construction), so equality is total.
impl Eq for MemberId {}

impl std::hash::Hash for MemberId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.peer.hash(state);
        self.generation.hash(state);
        self.role.hash(state);
        self.address.hash(state);
        self.bandwidth_mbps.to_bits().hash(state);
    }
}

impl foca::Identity for MemberId {
    type Addr = PeerId;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> PeerId {
        self.peer
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// A malformed membership message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed membership message: {0}")]
pub struct CodecError(pub String);

fn need(buf: &impl Buf, len: usize, what: &str) -> Result<(), CodecError> {
    if buf.remaining() < len {
        Err(CodecError(format!(
            "{what} needs {len} bytes, {} left",
            buf.remaining()
        )))
    } else {
        Ok(())
    }
}

fn get_u8(buf: &mut impl Buf, what: &str) -> Result<u8, CodecError> {
    need(buf, 1, what)?;
    Ok(buf.get_u8())
}

fn get_u16(buf: &mut impl Buf, what: &str) -> Result<u16, CodecError> {
    need(buf, 2, what)?;
    Ok(buf.get_u16_le())
}

fn put_member_id(out: &mut Vec<u8>, id: &MemberId) {
    out.extend_from_slice(id.peer.as_bytes());
    out.extend_from_slice(&id.generation.to_le_bytes());
    out.push(id.role.to_byte());
    out.extend_from_slice(&id.bandwidth_mbps.to_bits().to_le_bytes());
    let address = id.address.as_ref().map(Address::to_string).unwrap_or_default();
    out.extend_from_slice(&(address.len() as u16).to_le_bytes());
    out.extend_from_slice(address.as_bytes());
}

/// Decodes one member identity.
pub fn get_member_id(buf: &mut impl Buf) -> Result<MemberId, CodecError> {
    need(buf, PEER_ID_LEN + 8 + 1 + 4 + 2, "a member identity")?;
    let mut peer = [0u8; PEER_ID_LEN];
    buf.copy_to_slice(&mut peer);
    let peer = PeerId::try_from_slice(&peer).map_err(|e| CodecError(e.to_string()))?;
    let generation = buf.get_u64_le();
    let role = Role::from_byte(buf.get_u8())?;
    let bandwidth_mbps = f32::from_bits(buf.get_u32_le());
    if !bandwidth_mbps.is_finite() || bandwidth_mbps < 0.0 {
        return Err(CodecError(format!(
            "bandwidth {bandwidth_mbps} is not a finite, non-negative number"
        )));
    }
    let len = usize::from(buf.get_u16_le());
    if len > MAX_ADDRESS_BYTES {
        return Err(CodecError(format!(
            "address of {len} bytes exceeds {MAX_ADDRESS_BYTES}"
        )));
    }
    need(buf, len, "the member's address")?;
    let address = if len == 0 {
        None
    } else {
        let mut bytes = vec![0u8; len];
        buf.copy_to_slice(&mut bytes);
        let text = String::from_utf8(bytes).map_err(|_| CodecError("address is not UTF-8".into()))?;
        let address: Address = text.parse().map_err(|e| CodecError(format!("{e}")))?;
        if address.peer() != Some(peer) {
            return Err(CodecError(format!(
                "address {address} does not name the member's peer {peer}"
            )));
        }
        Some(address)
    };
    Ok(MemberId {
        peer,
        generation,
        role,
        address,
        bandwidth_mbps,
    })
}

fn put_or_refuse(buf: &mut impl BufMut, bytes: &[u8]) -> Result<(), CodecError> {
    // foca requires that nothing is written when the item does not fit.
    if buf.remaining_mut() < bytes.len() {
        return Err(CodecError(format!(
            "{} bytes do not fit in the {} left in the packet",
            bytes.len(),
            buf.remaining_mut()
        )));
    }
    buf.put_slice(bytes);
    Ok(())
}

const PING: u8 = 1;
const ACK: u8 = 2;
const PING_REQ: u8 = 3;
const INDIRECT_PING: u8 = 4;
const INDIRECT_ACK: u8 = 5;
const FORWARDED_ACK: u8 = 6;
const ANNOUNCE: u8 = 7;
const FEED: u8 = 8;
const GOSSIP: u8 = 9;
const BROADCAST: u8 = 10;
const TURN_UNDEAD: u8 = 11;

/// The SWIM codec.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemberCodec;

/// Identities remembered by a [`CachingCodec`] in each direction before it starts over.
const CODEC_CACHE_ENTRIES: usize = 4096;

/// [`MemberCodec`] with memory: every packet repeats the same few hundred identities, so their encodings
/// and decodings (address formatting and parsing, base58) are computed once and reused. Bounded.
#[derive(Debug, Default)]
pub struct CachingCodec {
    encoded: std::collections::HashMap<MemberId, std::sync::Arc<[u8]>>,
    decoded: std::collections::HashMap<Box<[u8]>, MemberId>,
}

/// The bytes of a member identity before its address.
const FIXED_ID_BYTES: usize = PEER_ID_LEN + 8 + 1 + 4 + 2;

impl CachingCodec {
    fn put_id(&mut self, out: &mut Vec<u8>, id: &MemberId) {
        if let Some(bytes) = self.encoded.get(id) {
            out.extend_from_slice(bytes);
            return;
        }
        let start = out.len();
        put_member_id(out, id);
        if self.encoded.len() >= CODEC_CACHE_ENTRIES {
            self.encoded.clear();
        }
        self.encoded.insert(id.clone(), out[start..].into());
    }

    fn get_id(&mut self, buf: &mut impl Buf) -> Result<MemberId, CodecError> {
        let chunk = buf.chunk();
        if chunk.len() >= FIXED_ID_BYTES {
            let len = usize::from(u16::from_le_bytes([
                chunk[FIXED_ID_BYTES - 2],
                chunk[FIXED_ID_BYTES - 1],
            ]));
            let total = FIXED_ID_BYTES + len;
            if len <= MAX_ADDRESS_BYTES && chunk.len() >= total {
                if let Some(id) = self.decoded.get(&chunk[..total]) {
                    let id = id.clone();
                    buf.advance(total);
                    return Ok(id);
                }
                let key: Box<[u8]> = chunk[..total].into();
                let id = get_member_id(buf)?;
                if self.decoded.len() >= CODEC_CACHE_ENTRIES {
                    self.decoded.clear();
                }
                self.decoded.insert(key, id.clone());
                return Ok(id);
            }
        }
        get_member_id(buf)
    }
}

fn header_bytes(header: &Header<MemberId>, put_id: &mut dyn FnMut(&mut Vec<u8>, &MemberId)) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    put_id(&mut out, &header.src);
    out.extend_from_slice(&header.src_incarnation.to_le_bytes());
    put_id(&mut out, &header.dst);
    {
        let mut with = |out: &mut Vec<u8>, tag: u8, id: &MemberId, probe: u8| {
            out.push(tag);
            put_id(out, id);
            out.push(probe);
        };
        match &header.message {
            Message::Ping(probe) => out.extend_from_slice(&[PING, *probe]),
            Message::Ack(probe) => out.extend_from_slice(&[ACK, *probe]),
            Message::PingReq { target, probe_number } => with(&mut out, PING_REQ, target, *probe_number),
            Message::IndirectPing { origin, probe_number } => with(&mut out, INDIRECT_PING, origin, *probe_number),
            Message::IndirectAck { target, probe_number } => with(&mut out, INDIRECT_ACK, target, *probe_number),
            Message::ForwardedAck { origin, probe_number } => with(&mut out, FORWARDED_ACK, origin, *probe_number),
            Message::Announce => out.push(ANNOUNCE),
            Message::Feed => out.push(FEED),
            Message::Gossip => out.push(GOSSIP),
            Message::Broadcast => out.push(BROADCAST),
            Message::TurnUndead => out.push(TURN_UNDEAD),
        }
    }
    out
}

fn decode_header_with(
    buf: &mut impl Buf,
    get_id: &mut dyn FnMut(&mut dyn Buf) -> Result<MemberId, CodecError>,
) -> Result<Header<MemberId>, CodecError> {
    let src = get_id(buf)?;
    let src_incarnation = get_u16(buf, "the sender's incarnation")?;
    let dst = get_id(buf)?;
    let tag = get_u8(buf, "the message kind")?;
    let message = match tag {
        PING => Message::Ping(get_u8(buf, "the probe number")?),
        ACK => Message::Ack(get_u8(buf, "the probe number")?),
        PING_REQ | INDIRECT_PING | INDIRECT_ACK | FORWARDED_ACK => {
            let id = get_id(buf)?;
            let probe_number = get_u8(buf, "the probe number")?;
            match tag {
                PING_REQ => Message::PingReq {
                    target: id,
                    probe_number,
                },
                INDIRECT_PING => Message::IndirectPing {
                    origin: id,
                    probe_number,
                },
                INDIRECT_ACK => Message::IndirectAck {
                    target: id,
                    probe_number,
                },
                _ => Message::ForwardedAck {
                    origin: id,
                    probe_number,
                },
            }
        }
        ANNOUNCE => Message::Announce,
        FEED => Message::Feed,
        GOSSIP => Message::Gossip,
        BROADCAST => Message::Broadcast,
        TURN_UNDEAD => Message::TurnUndead,
        other => return Err(CodecError(format!("unknown message kind {other}"))),
    };
    Ok(Header {
        src,
        src_incarnation,
        dst,
        message,
    })
}

fn member_bytes(id_bytes: Vec<u8>, member: &Member<MemberId>) -> Vec<u8> {
    let mut out = id_bytes;
    out.extend_from_slice(&member.incarnation().to_le_bytes());
    out.push(match member.state() {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    });
    out
}

fn member_from(id: MemberId, buf: &mut impl Buf) -> Result<Member<MemberId>, CodecError> {
    let incarnation: Incarnation = get_u16(buf, "the member's incarnation")?;
    let state = match get_u8(buf, "the member's state")? {
        0 => State::Alive,
        1 => State::Suspect,
        2 => State::Down,
        other => return Err(CodecError(format!("unknown member state {other}"))),
    };
    Ok(Member::new(id, incarnation, state))
}

impl foca::Codec<MemberId> for MemberCodec {
    type Error = CodecError;

    fn encode_header(&mut self, header: &Header<MemberId>, mut buf: impl BufMut) -> Result<(), CodecError> {
        put_or_refuse(&mut buf, &header_bytes(header, &mut put_member_id))
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<MemberId>, CodecError> {
        decode_header_with(&mut buf, &mut |mut buf| get_member_id(&mut buf))
    }

    fn encode_member(&mut self, member: &Member<MemberId>, mut buf: impl BufMut) -> Result<(), CodecError> {
        let mut id = Vec::with_capacity(128);
        put_member_id(&mut id, member.id());
        put_or_refuse(&mut buf, &member_bytes(id, member))
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<Member<MemberId>, CodecError> {
        let id = get_member_id(&mut buf)?;
        member_from(id, &mut buf)
    }
}

impl foca::Codec<MemberId> for CachingCodec {
    type Error = CodecError;

    fn encode_header(&mut self, header: &Header<MemberId>, mut buf: impl BufMut) -> Result<(), CodecError> {
        let bytes = header_bytes(header, &mut |out, id| self.put_id(out, id));
        put_or_refuse(&mut buf, &bytes)
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<MemberId>, CodecError> {
        decode_header_with(&mut buf, &mut |mut buf| self.get_id(&mut buf))
    }

    fn encode_member(&mut self, member: &Member<MemberId>, mut buf: impl BufMut) -> Result<(), CodecError> {
        let mut id = Vec::with_capacity(128);
        self.put_id(&mut id, member.id());
        put_or_refuse(&mut buf, &member_bytes(id, member))
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<Member<MemberId>, CodecError> {
        let id = self.get_id(&mut buf)?;
        member_from(id, &mut buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_transports::Keypair;
    use foca::Codec;

    fn member(seed: u8, address: bool) -> MemberId {
        let peer = Keypair::from_seed([seed; 32]).peer_id();
        MemberId {
            peer,
            generation: 7,
            role: if address { Role::Trainer } else { Role::Client },
            address: address.then(|| format!("tcp://127.0.0.1:4000/p/{peer}").parse().unwrap()),
            bandwidth_mbps: 100.0,
        }
    }

    #[test]
    fn every_message_kind_round_trips() {
        let (a, b, c) = (member(1, true), member(2, false), member(3, true));
        let mut caching = CachingCodec::default();
        let messages = [
            Message::Ping(1),
            Message::Ack(2),
            Message::PingReq {
                target: c.clone(),
                probe_number: 3,
            },
            Message::IndirectPing {
                origin: c.clone(),
                probe_number: 4,
            },
            Message::IndirectAck {
                target: c.clone(),
                probe_number: 5,
            },
            Message::ForwardedAck {
                origin: c.clone(),
                probe_number: 6,
            },
            Message::Announce,
            Message::Feed,
            Message::Gossip,
            Message::Broadcast,
            Message::TurnUndead,
        ];
        for message in messages {
            let header = Header {
                src: a.clone(),
                src_incarnation: 9,
                dst: b.clone(),
                message,
            };
            let mut buf = Vec::new();
            MemberCodec.encode_header(&header, &mut buf).unwrap();
            let mut slice = &buf[..];
            assert_eq!(MemberCodec.decode_header(&mut slice).unwrap(), header);
            assert!(slice.is_empty());
            // The caching codec writes the same bytes and reads them the same, from its caches too.
            for _ in 0..2 {
                let mut cached = Vec::new();
                caching.encode_header(&header, &mut cached).unwrap();
                assert_eq!(cached, buf);
                let mut slice = &buf[..];
                assert_eq!(caching.decode_header(&mut slice).unwrap(), header);
                assert!(slice.is_empty());
            }
            // Every truncation is an error, never a panic.
            for cut in 0..buf.len() {
                assert!(MemberCodec.decode_header(&buf[..cut]).is_err(), "cut at {cut}");
            }
        }
        let m = Member::new(c, 3, State::Suspect);
        let mut buf = Vec::new();
        MemberCodec.encode_member(&m, &mut buf).unwrap();
        assert_eq!(MemberCodec.decode_member(&buf[..]).unwrap(), m);
    }

    #[test]
    fn an_item_that_does_not_fit_writes_nothing() {
        let m = Member::new(member(1, true), 0, State::Alive);
        let mut storage = [0u8; 20];
        let mut buf = &mut storage[..];
        assert!(MemberCodec.encode_member(&m, &mut buf).is_err());
        assert_eq!(storage, [0u8; 20]);
    }

    #[test]
    fn malformed_members_are_refused() {
        let good = member(1, true);
        let mut bytes = Vec::new();
        put_member_id(&mut bytes, &good);
        // An address naming another peer.
        let mut other = good.clone();
        other.address = member(2, true).address;
        let mut forged = Vec::new();
        put_member_id(&mut forged, &other);
        assert!(get_member_id(&mut &forged[..]).unwrap_err().0.contains("does not name"));
        // Unknown role, non-finite bandwidth, oversized address length.
        let mut bad_role = bytes.clone();
        bad_role[PEER_ID_LEN + 8] = 9;
        assert!(get_member_id(&mut &bad_role[..]).is_err());
        let mut bad_bandwidth = bytes.clone();
        bad_bandwidth[PEER_ID_LEN + 9..PEER_ID_LEN + 13].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
        assert!(get_member_id(&mut &bad_bandwidth[..]).is_err());
        let mut long = bytes.clone();
        long[PEER_ID_LEN + 13..PEER_ID_LEN + 15].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(get_member_id(&mut &long[..]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = MemberCodec.decode_header(&bytes[..]);
            let _ = MemberCodec.decode_member(&bytes[..]);
            let _ = CachingCodec::default().decode_header(&bytes[..]);
            let _ = crate::membership::join::decode_members(&bytes);
        }

        #[test]
        fn mutated_headers_never_panic_the_decoder(index in 0usize..400, byte in proptest::prelude::any::<u8>()) {
            let header = Header {
                src: member(1, true),
                src_incarnation: 1,
                dst: member(2, false),
                message: Message::PingReq { target: member(3, true), probe_number: 4 },
            };
            let mut buf = Vec::new();
            MemberCodec.encode_header(&header, &mut buf).unwrap();
            let index = index % buf.len();
            buf[index] = byte;
            let _ = MemberCodec.decode_header(&buf[..]);
        }
    }
}
