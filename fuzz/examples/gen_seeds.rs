//! Writes the seed corpus for the `frame_decode` fuzz target: a few real frames, encoded by Colony's own
//! wire code. Run from `fuzz/` with `cargo run --example gen_seeds` (stable is enough); it rewrites
//! `seeds/*.bin`.

use std::path::Path;

use colony_transports::wire::{ErrorHeader, FrameKind, OpenHeader, WireMessage, encode_preamble};

/// Preamble, header, payload: the bytes `write_frame` puts on a stream.
fn frame(kind: FrameKind, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = encode_preamble(kind, header.len() as u32, payload.len() as u64).to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
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

    // A message of 8 bytes or fewer is stored inline in the archive, the other string layout.
    let short_error = ErrorHeader { message: "busy".into() }.encode()?;
    let short_error_frame = frame(FrameKind::Error, &short_error, b"");

    let stream: Vec<u8> = [open_frame.as_slice(), message_frame.as_slice()].concat();

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in [
        ("open.bin", &open_frame),
        ("message.bin", &message_frame),
        ("error.bin", &error_frame),
        ("error_short.bin", &short_error_frame),
        ("open_then_message.bin", &stream),
    ] {
        std::fs::write(dir.join(name), bytes)?;
        println!("{name}: {} bytes", bytes.len());
    }
    Ok(())
}
