//! Wire frames: how every Colony protocol puts messages on a stream.
//!
//! A frame is a fixed 16-byte preamble, an rkyv-encoded header, and an optional raw payload:
//!
//! ```text
//! offset  size  field
//! 0       8     body length, u64 little-endian: header length + payload length
//! 8       1     wire version (currently 1)
//! 9       1     frame kind (1 open, 2 message, 3 error)
//! 10      2     reserved, must be zero
//! 12      4     header length, u32 little-endian
//! 16      ...   header: rkyv archive, validated before use
//! ...     ...   payload: raw bytes (tensor data), handed to the caller without re-encoding
//! ```
//!
//! Lengths are checked against [`FrameLimits`] *before* anything is allocated, so a hostile length prefix
//! costs nothing. Headers are read into 16-byte aligned buffers and validated with `rkyv::access`; network
//! bytes are never accessed unchecked. The pure functions [`parse_preamble`] and [`decode_frame`] are what
//! the fuzz target exercises; [`read_frame`] and [`write_frame`] move frames over a stream.

use std::fmt;
use std::str::FromStr;

use bytes::{Bytes, BytesMut};
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

use crate::error::StreamError;
use crate::transport::{RecvStream, SendStream};

/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Length of the fixed frame preamble.
pub const PREAMBLE_LEN: usize = 16;
/// Payloads up to this size are sent in the same chunk as the header; larger ones travel as their own
/// chunk, uncopied.
const COALESCE_PAYLOAD_BYTES: usize = 16 * 1024;

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// First frame of every stream; its header is an [`OpenHeader`] naming the protocol.
    Open = 1,
    /// A protocol message: the protocol's own header type, plus an optional payload.
    Message = 2,
    /// The sender refuses or aborts; its header is an [`ErrorHeader`].
    Error = 3,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Result<Self, WireError> {
        match byte {
            1 => Ok(FrameKind::Open),
            2 => Ok(FrameKind::Message),
            3 => Ok(FrameKind::Error),
            other => Err(WireError::UnknownFrameKind(other)),
        }
    }
}

/// Size limits for frames received. Both are checked before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest rkyv header accepted.
    pub max_header_bytes: u32,
    /// Largest raw payload accepted.
    pub max_payload_bytes: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_payload_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The decoded preamble of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Frame kind.
    pub kind: FrameKind,
    /// Length of the rkyv header.
    pub header_len: u32,
    /// Length of the raw payload.
    pub payload_len: u64,
}

/// Encodes a preamble.
pub fn encode_preamble(kind: FrameKind, header_len: u32, payload_len: u64) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[0..8].copy_from_slice(&(u64::from(header_len) + payload_len).to_le_bytes());
    out[8] = WIRE_VERSION;
    out[9] = kind as u8;
    out[12..16].copy_from_slice(&header_len.to_le_bytes());
    out
}

/// Decodes and checks a preamble against `limits`. Pure; allocates nothing.
pub fn parse_preamble(bytes: &[u8; PREAMBLE_LEN], limits: &FrameLimits) -> Result<Preamble, WireError> {
    let body_len = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
    let version = bytes[8];
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedWireVersion {
            got: version,
            supported: WIRE_VERSION,
        });
    }
    let kind = FrameKind::from_byte(bytes[9])?;
    if bytes[10] != 0 || bytes[11] != 0 {
        return Err(WireError::Malformed("reserved preamble bytes are not zero".into()));
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if header_len > limits.max_header_bytes {
        return Err(WireError::FrameTooLarge {
            part: "header",
            len: u64::from(header_len),
            limit: u64::from(limits.max_header_bytes),
        });
    }
    let payload_len = body_len.checked_sub(u64::from(header_len)).ok_or_else(|| {
        WireError::Malformed(format!(
            "header length {header_len} exceeds the frame's body length {body_len}"
        ))
    })?;
    if payload_len > limits.max_payload_bytes {
        return Err(WireError::FrameTooLarge {
            part: "payload",
            len: payload_len,
            limit: limits.max_payload_bytes,
        });
    }
    Ok(Preamble {
        kind,
        header_len,
        payload_len,
    })
}

/// One received frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Frame kind.
    pub kind: FrameKind,
    /// The rkyv header, 16-byte aligned, not yet validated.
    pub header: AlignedVec,
    /// The raw payload.
    pub payload: Bytes,
}

impl Frame {
    /// Validates the header as a `T` and returns the archived view.
    pub fn access<T: WireMessage>(&self) -> Result<&T::Archived, WireError> {
        T::access_archived(&self.header)
    }

    /// Validates and deserializes the header as a `T`.
    pub fn decode<T: WireMessage>(&self) -> Result<T, WireError> {
        T::decode_archived(self.access::<T>()?)
    }

    /// If this is an error frame, the error it carries; otherwise the frame itself.
    pub fn into_result(self) -> Result<Frame, WireError> {
        if self.kind == FrameKind::Error {
            let header = self.decode::<ErrorHeader>()?;
            Err(WireError::Remote(header.message))
        } else {
            Ok(self)
        }
    }
}

/// Decodes one frame from the front of `bytes` (pure, for tests and fuzzing). Returns `Ok(None)` when
/// `bytes` holds only part of a frame, else the frame and how many bytes it used.
pub fn decode_frame(bytes: &[u8], limits: &FrameLimits) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(preamble_bytes) = bytes.first_chunk::<PREAMBLE_LEN>() else {
        return Ok(None);
    };
    let preamble = parse_preamble(preamble_bytes, limits)?;
    let header_end = PREAMBLE_LEN + preamble.header_len as usize;
    // Checked by parse_preamble: payload_len <= limits.max_payload_bytes, which fits memory we agreed to use.
    let Ok(payload_len) = usize::try_from(preamble.payload_len) else {
        return Err(WireError::FrameTooLarge {
            part: "payload",
            len: preamble.payload_len,
            limit: usize::MAX as u64,
        });
    };
    let total = header_end + payload_len;
    if bytes.len() < total {
        return Ok(None);
    }
    let mut header = AlignedVec::with_capacity(preamble.header_len as usize);
    header.extend_from_slice(&bytes[PREAMBLE_LEN..header_end]);
    let payload = Bytes::copy_from_slice(&bytes[header_end..total]);
    Ok(Some((
        Frame {
            kind: preamble.kind,
            header,
            payload,
        },
        total,
    )))
}

/// Reads one frame. Returns `Ok(None)` when the stream ends cleanly before a frame starts.
pub async fn read_frame(recv: &mut RecvStream, limits: &FrameLimits) -> Result<Option<Frame>, WireError> {
    let mut preamble_bytes = [0u8; PREAMBLE_LEN];
    if !recv.read_exact_or_end(&mut preamble_bytes).await? {
        return Ok(None);
    }
    let preamble = parse_preamble(&preamble_bytes, limits)?;
    let mut header = AlignedVec::with_capacity(preamble.header_len as usize);
    header.resize(preamble.header_len as usize, 0);
    recv.read_exact(&mut header).await?;
    let payload_len = usize::try_from(preamble.payload_len).map_err(|_| WireError::FrameTooLarge {
        part: "payload",
        len: preamble.payload_len,
        limit: usize::MAX as u64,
    })?;
    let payload = recv.read_bytes(payload_len).await?;
    Ok(Some(Frame {
        kind: preamble.kind,
        header,
        payload,
    }))
}

/// Encodes the preamble and header of a frame into one buffer, followed by the payload when it is small.
pub fn encode_frame_head(kind: FrameKind, header: &[u8], payload: &Bytes) -> Result<Bytes, WireError> {
    let header_len = u32::try_from(header.len()).map_err(|_| WireError::FrameTooLarge {
        part: "header",
        len: header.len() as u64,
        limit: u64::from(u32::MAX),
    })?;
    let coalesce = payload.len() <= COALESCE_PAYLOAD_BYTES;
    let mut out = BytesMut::with_capacity(PREAMBLE_LEN + header.len() + if coalesce { payload.len() } else { 0 });
    out.extend_from_slice(&encode_preamble(kind, header_len, payload.len() as u64));
    out.extend_from_slice(header);
    if coalesce {
        out.extend_from_slice(payload);
    }
    Ok(out.freeze())
}

/// Writes one frame. A large payload is handed to the stream as its own chunk, without copying.
pub async fn write_frame(
    send: &mut SendStream,
    kind: FrameKind,
    header: &[u8],
    payload: Bytes,
) -> Result<(), WireError> {
    let head = encode_frame_head(kind, header, &payload)?;
    send.write_chunk(head).await?;
    if payload.len() > COALESCE_PAYLOAD_BYTES {
        send.write_chunk(payload).await?;
    }
    Ok(())
}

/// A type that travels as a frame header: anything rkyv can archive, validate and deserialize. Implemented
/// for every such type; derive `rkyv::Archive`, `rkyv::Serialize` and `rkyv::Deserialize` to get it.
pub trait WireMessage:
    rkyv::Archive
    + Sized
    + Send
    + Sync
    + 'static
    + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
{
    /// Encodes `self` as an rkyv archive.
    fn encode(&self) -> Result<AlignedVec, WireError> {
        rkyv::to_bytes::<rancor::Error>(self).map_err(|e| WireError::Encode(e.to_string()))
    }

    /// Validates `bytes` (which must be 16-byte aligned) as an archived `Self`.
    fn access_archived(bytes: &[u8]) -> Result<&Self::Archived, WireError>;

    /// Deserializes a validated archive.
    fn decode_archived(archived: &Self::Archived) -> Result<Self, WireError>;
}

impl<T> WireMessage for T
where
    T: rkyv::Archive
        + Send
        + Sync
        + 'static
        + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
    T::Archived:
        for<'a> CheckBytes<HighValidator<'a, rancor::Error>> + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    fn access_archived(bytes: &[u8]) -> Result<&T::Archived, WireError> {
        rkyv::access::<T::Archived, rancor::Error>(bytes).map_err(|e| WireError::InvalidHeader {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }

    fn decode_archived(archived: &T::Archived) -> Result<T, WireError> {
        rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| WireError::InvalidHeader {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }
}

/// Header of an [`FrameKind::Open`] frame: the protocol the stream speaks.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OpenHeader {
    /// A protocol id, `/colony/<name>/<version>`.
    pub protocol: String,
}

/// Header of an [`FrameKind::Error`] frame.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ErrorHeader {
    /// What went wrong, for the other side's logs and errors.
    pub message: String,
}

/// Longest protocol name.
const MAX_PROTOCOL_NAME: usize = 64;

/// A protocol id, written `/colony/<name>/<version>`. Every stream opens with one; the acceptor checks both
/// the name and the version.
///
/// ```
/// use colony_transports::wire::ProtocolId;
/// let id: ProtocolId = "/colony/records/2".parse().unwrap();
/// assert_eq!((id.name(), id.version()), ("records", 2));
/// assert_eq!(id.to_string(), "/colony/records/2");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProtocolId {
    name: String,
    version: u32,
}

impl ProtocolId {
    /// A protocol id. The name must be 1–64 characters of `a-z`, `0-9`, `-`, `_` or `.`.
    pub fn new(name: &str, version: u32) -> Result<Self, WireError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_PROTOCOL_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !valid {
            return Err(WireError::InvalidProtocolId {
                text: format!("/colony/{name}/{version}"),
                reason: format!("the name must be 1 to {MAX_PROTOCOL_NAME} characters of a-z, 0-9, '-', '_', '.'"),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            version,
        })
    }

    /// The protocol's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The protocol's version.
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl fmt::Display for ProtocolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/colony/{}/{}", self.name, self.version)
    }
}

impl FromStr for ProtocolId {
    type Err = WireError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| WireError::InvalidProtocolId {
            text: text.chars().take(120).collect(),
            reason: reason.to_owned(),
        };
        let rest = text
            .strip_prefix("/colony/")
            .ok_or_else(|| invalid("must start with /colony/"))?;
        let (name, version) = rest
            .rsplit_once('/')
            .ok_or_else(|| invalid("must be /colony/<name>/<version>"))?;
        let version = version
            .parse::<u32>()
            .map_err(|_| invalid("the version must be a whole number"))?;
        Self::new(name, version).map_err(|_| invalid("the name must be a-z, 0-9, '-', '_', '.' (1 to 64 characters)"))
    }
}

/// Errors of frames and protocols on a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The stream below failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A length in the preamble is above the configured limit; nothing was allocated for it.
    #[error("frame {part} of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { part: &'static str, len: u64, limit: u64 },
    /// The frame was written by an incompatible wire version.
    #[error("wire version {got} is not supported (this peer speaks wire version {supported})")]
    UnsupportedWireVersion { got: u8, supported: u8 },
    /// The frame kind byte is not one we know.
    #[error("unknown frame kind {0}")]
    UnknownFrameKind(u8),
    /// The frame's structure is inconsistent.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The header failed rkyv validation as the expected type.
    #[error("invalid {type_name} header: {reason}")]
    InvalidHeader { type_name: &'static str, reason: String },
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The protocol id text is not valid.
    #[error("invalid protocol id '{text}': {reason}")]
    InvalidProtocolId { text: String, reason: String },
    /// The acceptor serves no protocol of that name.
    #[error("unknown protocol {requested} (this peer serves: {supported})")]
    UnknownProtocol { requested: String, supported: String },
    /// The acceptor serves the protocol in another version.
    #[error("protocol '{name}' version mismatch: offered version {offered}, this peer supports version {supported}")]
    VersionMismatch { name: String, offered: u32, supported: u32 },
    /// The other side sent an error frame.
    #[error("remote error: {0}")]
    Remote(String),
    /// A frame of another kind than the protocol allows arrived.
    #[error("unexpected {got:?} frame, expected {expected}")]
    UnexpectedFrame { expected: &'static str, got: FrameKind },
    /// The stream ended where a message was required.
    #[error("the stream ended before {0}")]
    EndOfStream(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(kind: FrameKind, header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = encode_preamble(kind, header.len() as u32, payload.len() as u64).to_vec();
        out.extend_from_slice(header);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn preamble_layout_is_fixed() {
        // A reference vector: if this changes, the wire version must change too.
        let bytes = encode_preamble(FrameKind::Message, 0x10, 0x0102);
        assert_eq!(bytes, [0x12, 0x01, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0x10, 0, 0, 0]);
        let parsed = parse_preamble(&bytes, &FrameLimits::default()).unwrap();
        assert_eq!(
            parsed,
            Preamble {
                kind: FrameKind::Message,
                header_len: 0x10,
                payload_len: 0x0102
            }
        );
    }

    #[test]
    fn rkyv_format_is_pinned() {
        // Reference vector of the archived bytes (little endian, aligned, 32-bit relative pointers). If a
        // feature change alters it, peers built before and after cannot talk: bump WIRE_VERSION.
        let bytes = OpenHeader {
            protocol: "/colony/x/1".into(),
        }
        .encode()
        .unwrap();
        let mut expected = b"/colony/x/1\0".to_vec();
        expected.extend_from_slice(&[0x8b, 0, 0, 0, 0xf4, 0xff, 0xff, 0xff]);
        assert_eq!(bytes.as_slice(), expected.as_slice());
        let frame = Frame {
            kind: FrameKind::Open,
            header: bytes,
            payload: Bytes::new(),
        };
        assert_eq!(frame.decode::<OpenHeader>().unwrap().protocol, "/colony/x/1");
    }

    #[test]
    fn decode_round_trip_and_partial_input() {
        let header = OpenHeader {
            protocol: "/colony/echo/1".into(),
        }
        .encode()
        .unwrap();
        let bytes = frame_bytes(FrameKind::Open, &header, b"payload");
        for cut in 0..bytes.len() {
            assert!(
                decode_frame(&bytes[..cut], &FrameLimits::default()).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let (frame, used) = decode_frame(&bytes, &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame.kind, FrameKind::Open);
        assert_eq!(&frame.payload[..], b"payload");
        assert_eq!(frame.decode::<OpenHeader>().unwrap().protocol, "/colony/echo/1");
    }

    #[test]
    fn hostile_preambles_are_refused_before_allocation() {
        let limits = FrameLimits::default();
        let mut bytes = encode_preamble(FrameKind::Message, 0, 0);
        bytes[0..8].copy_from_slice(&(4u64 << 30).to_le_bytes());
        let err = parse_preamble(&bytes, &limits).unwrap_err();
        assert!(
            matches!(err, WireError::FrameTooLarge { part: "payload", len, .. } if len == 4 << 30),
            "{err}"
        );
        assert!(err.to_string().contains("exceeds the limit"));

        let bytes = encode_preamble(FrameKind::Message, 1 << 20, 0);
        assert!(matches!(
            parse_preamble(&bytes, &limits),
            Err(WireError::FrameTooLarge { part: "header", .. })
        ));

        let mut bytes = encode_preamble(FrameKind::Message, 8, 0);
        bytes[0..8].copy_from_slice(&4u64.to_le_bytes());
        assert!(
            parse_preamble(&bytes, &limits)
                .unwrap_err()
                .to_string()
                .contains("exceeds the frame's body")
        );

        let mut bytes = encode_preamble(FrameKind::Message, 0, 0);
        bytes[8] = 9;
        let err = parse_preamble(&bytes, &limits).unwrap_err().to_string();
        assert!(
            err.contains("wire version 9") && err.contains("speaks wire version 1"),
            "{err}"
        );

        let mut bytes = encode_preamble(FrameKind::Message, 0, 0);
        bytes[9] = 77;
        assert_eq!(
            parse_preamble(&bytes, &limits).unwrap_err(),
            WireError::UnknownFrameKind(77)
        );

        let mut bytes = encode_preamble(FrameKind::Message, 0, 0);
        bytes[11] = 1;
        assert!(matches!(parse_preamble(&bytes, &limits), Err(WireError::Malformed(_))));
    }

    #[test]
    fn invalid_rkyv_is_an_error() {
        // An inline string whose bytes are not UTF-8.
        let bytes = frame_bytes(FrameKind::Open, &[0xc3, 0x28, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], b"");
        let (frame, _) = decode_frame(&bytes, &FrameLimits::default()).unwrap().unwrap();
        let err = frame.decode::<OpenHeader>().unwrap_err();
        assert!(matches!(err, WireError::InvalidHeader { .. }), "{err}");
        let empty = Frame {
            kind: FrameKind::Open,
            header: AlignedVec::new(),
            payload: Bytes::new(),
        };
        assert!(empty.decode::<OpenHeader>().is_err());
        // A valid archive with its string pointer aimed outside the buffer.
        let mut header = OpenHeader {
            protocol: "/colony/echo/1".into(),
        }
        .encode()
        .unwrap();
        let len = header.len();
        header[len - 4..].copy_from_slice(&(-1000i32).to_le_bytes());
        let bad = Frame {
            kind: FrameKind::Open,
            header,
            payload: Bytes::new(),
        };
        assert!(bad.decode::<OpenHeader>().is_err());
    }

    #[test]
    fn protocol_ids() {
        let id: ProtocolId = "/colony/all-reduce/3".parse().unwrap();
        assert_eq!(id, ProtocolId::new("all-reduce", 3).unwrap());
        for bad in [
            "/colony/Echo/1",
            "/colony//1",
            "/colony/echo/x",
            "/other/echo/1",
            "/colony/echo",
            "/colony/a/b/1",
        ] {
            assert!(bad.parse::<ProtocolId>().is_err(), "{bad}");
        }
        assert!(ProtocolId::new(&"a".repeat(65), 1).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Ok(Some((frame, _))) = decode_frame(&bytes, &FrameLimits::default()) {
                let _ = frame.decode::<OpenHeader>();
                let _ = frame.decode::<ErrorHeader>();
            }
        }
    }
}
