//! Fuzzes frame decoding: arbitrary bytes go through `parse_preamble` and `decode_frame` (with the default
//! limits and with tiny ones), every decoded frame's header is validated as an `OpenHeader` and an
//! `ErrorHeader`, and an open header's text is parsed as a `ProtocolId`. Nothing may panic, and the
//! invariants below must hold for every input.

#![no_main]

use colony_transports::wire::{
    ErrorHeader, Frame, FrameKind, FrameLimits, OpenHeader, PREAMBLE_LEN, ProtocolId, WireError, WireMessage,
    decode_frame, encode_frame_head, encode_preamble, parse_preamble,
};
use libfuzzer_sys::fuzz_target;

/// Limits small enough that the fuzzer reaches the "too large" paths with short inputs.
const TINY: FrameLimits = FrameLimits {
    max_header_bytes: 64,
    max_payload_bytes: 256,
};

/// At most this many frames are decoded back to back from one input.
const MAX_FRAMES: usize = 64;

fuzz_target!(|data: &[u8]| {
    check_preamble(data);

    let default = FrameLimits::default();
    let big = decode_frame(data, &default);
    let tiny = decode_frame(data, &TINY);
    if let Ok(Some((frame, used))) = &big {
        check_frame(data, frame, *used, &default);
    }
    if let Ok(Some((frame, used))) = &tiny {
        check_frame(data, frame, *used, &TINY);
    }
    // The tiny limits are inside the default ones, so whatever they accept the default limits accept too,
    // with the same result.
    match (&tiny, &big) {
        (Ok(None), Ok(None)) | (Err(_), _) => {}
        (Ok(Some((a, a_used))), Ok(Some((b, b_used)))) => {
            assert_eq!(a_used, b_used);
            assert_eq!(a.kind, b.kind);
            assert_eq!(a.header.as_slice(), b.header.as_slice());
            assert_eq!(a.payload, b.payload);
        }
        (tiny, big) => panic!("tiny limits gave {tiny:?} but default limits gave {big:?}"),
    }

    // Read the input as a stream: frames back to back, as `read_frame` would see them.
    let mut rest = data;
    for _ in 0..MAX_FRAMES {
        match decode_frame(rest, &default) {
            Ok(Some((frame, used))) => {
                check_frame(rest, &frame, used, &default);
                rest = &rest[used..];
            }
            Ok(None) | Err(_) => break,
        }
    }
});

/// `parse_preamble` on the first 16 bytes agrees with `decode_frame`, and an accepted preamble re-encodes
/// to the same bytes.
fn check_preamble(data: &[u8]) {
    let Some(bytes) = data.first_chunk::<PREAMBLE_LEN>() else {
        assert!(matches!(decode_frame(data, &FrameLimits::default()), Ok(None)));
        return;
    };
    for limits in [FrameLimits::default(), TINY] {
        let parsed = parse_preamble(bytes, &limits);
        match &parsed {
            Ok(p) => {
                assert!(p.header_len <= limits.max_header_bytes);
                assert!(p.payload_len <= limits.max_payload_bytes);
                assert_eq!(&encode_preamble(p.kind, p.header_len, p.payload_len), bytes);
                assert!(decode_frame(data, &limits).is_ok());
            }
            Err(err) => assert_eq!(decode_frame(data, &limits).as_ref().err(), Some(err)),
        }
    }
}

/// Invariants of one decoded frame taken from the front of `data`.
fn check_frame(data: &[u8], frame: &Frame, used: usize, limits: &FrameLimits) {
    let header_len = frame.header.len();
    let payload_len = frame.payload.len();
    assert_eq!(used, PREAMBLE_LEN + header_len + payload_len);
    assert!(used <= data.len());
    assert!(header_len as u64 <= u64::from(limits.max_header_bytes));
    assert!(payload_len as u64 <= limits.max_payload_bytes);
    if header_len > 0 {
        // An empty AlignedVec holds a dangling pointer, so only a non-empty header has an address to check.
        assert_eq!(
            frame.header.as_ptr() as usize % 16,
            0,
            "headers are read into 16-byte aligned buffers"
        );
    }
    assert_eq!(&data[PREAMBLE_LEN..PREAMBLE_LEN + header_len], frame.header.as_slice());
    assert_eq!(&data[PREAMBLE_LEN + header_len..used], &frame.payload[..]);

    // Writing the frame back gives the bytes it was read from (the payload only when it is coalesced).
    let head = encode_frame_head(frame.kind, &frame.header, &frame.payload).expect("a decoded frame re-encodes");
    assert!(head.len() == used || head.len() == PREAMBLE_LEN + header_len);
    assert_eq!(&head[..], &data[..head.len()]);

    // Both header types are a single string, so they validate (and decode) alike.
    let open = frame.decode::<OpenHeader>();
    let error = frame.decode::<ErrorHeader>();
    assert_eq!(
        frame.access::<OpenHeader>().is_ok(),
        open.is_ok(),
        "validated but did not deserialize"
    );
    assert_eq!(
        frame.access::<ErrorHeader>().is_ok(),
        error.is_ok(),
        "validated but did not deserialize"
    );
    match (&open, &error) {
        (Ok(open), Ok(error)) => assert_eq!(open.protocol, error.message),
        (Err(_), Err(_)) => {}
        _ => panic!("OpenHeader gave {open:?} but ErrorHeader gave {error:?}"),
    }

    if let Ok(open) = &open {
        // A decoded header encodes and decodes back to itself.
        let again = OpenHeader::access_archived(&open.encode().expect("encode")).and_then(OpenHeader::decode_archived);
        assert_eq!(again.as_ref(), Ok(open));
        check_protocol_id(&open.protocol);
    }

    match frame.clone().into_result() {
        Ok(same) => assert_ne!(same.kind, FrameKind::Error),
        Err(WireError::Remote(message)) => {
            assert_eq!(frame.kind, FrameKind::Error);
            assert_eq!(Ok(message), error.map(|e| e.message));
        }
        Err(err) => {
            assert_eq!(frame.kind, FrameKind::Error);
            assert!(matches!(err, WireError::InvalidHeader { .. }), "{err}");
        }
    }
}

/// A protocol id that parses prints in canonical form, and that form parses back to the same id.
fn check_protocol_id(text: &str) {
    let Ok(id) = text.parse::<ProtocolId>() else {
        return;
    };
    let name = id.name();
    assert!((1..=64).contains(&name.len()));
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    );
    let printed = id.to_string();
    assert_eq!(printed.parse::<ProtocolId>().as_ref(), Ok(&id));
    assert_eq!(ProtocolId::new(name, id.version()).as_ref(), Ok(&id));
}
