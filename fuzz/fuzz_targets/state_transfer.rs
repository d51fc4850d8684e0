//! Fuzzes `/colony/state/1` from both ends. The input is read as a stream of frames (see
//! `colony_fuzz::frames`); each frame is taken as a donor would take a request and as a receiver would take
//! the donor's answers:
//!
//! - as a `StateRequest` to a donor holding 1,000 values (and one holding none): the chunk size is checked
//!   against `MAX_CHUNK_VALUES`, the range against the state's chunks (`chunk_count`), and every chunk of
//!   an accepted range is cut with `chunk_range` and encoded with `encode_values`;
//! - as a `StateResponse` to a receiver that asked for chunks of 64 values of a 1,000-value state: the
//!   first must be the info, then the chunks in order, each payload checked with `check_chunk` and copied
//!   with `decode_values`.
//!
//! Invariants: headers re-encode and decode to themselves; an accepted range lies inside the state, its
//! chunks are contiguous, non-empty and at most a chunk long, and their payloads are 4 bytes per value;
//! `check_chunk` accepts exactly the payloads of 4 × expected values that are all finite, and otherwise
//! names the right fault (the first non-finite value, or the length); an accepted chunk decodes to finite
//! values equal to its little-endian bytes.

#![no_main]

use colony_averaging::state_transfer::{
    ChunkFault, MAX_CHUNK_VALUES, StateRequest, StateResponse, check_chunk, chunk_count, chunk_range, decode_values,
    encode_values,
};
use colony_fuzz::{assert_round_trip, frames};
use colony_transports::wire::FrameKind;
use libfuzzer_sys::fuzz_target;

/// Values in the receiver's (and the donor's) state.
const TOTAL_VALUES: u64 = 1000;
/// The receiver's chunk size.
const CHUNK_VALUES: u64 = 64;

fuzz_target!(|data: &[u8]| {
    // The raw input as one chunk payload too: the check must not depend on framing.
    let _ = check_payload(data, data.len() / 4);
    let _ = check_payload(data, data.len().div_ceil(4));

    let donor_values: Vec<f32> = (0..TOTAL_VALUES).map(|i| i as f32 * 0.25 - 100.0).collect();
    let mut receiver = Receiver::default();
    for frame in frames(data) {
        if frame.kind != FrameKind::Message {
            receiver.failed = true;
            continue;
        }
        if let Ok(request) = frame.decode::<StateRequest>() {
            assert_round_trip(&request);
            serve(&request, &donor_values);
            serve(&request, &[]);
        }
        if let Ok(response) = frame.decode::<StateResponse>() {
            assert_round_trip(&response);
            receiver.on_response(response, &frame.payload);
        }
    }
});

/// What a donor holding `values` does with `request`: the checks of `serve_stream`, then the chunks it
/// would send (their ranges and payloads; at most the whole state, so a request cannot make it loop).
fn serve(request: &StateRequest, values: &[f32]) {
    if request.chunk_values == 0 || request.chunk_values > MAX_CHUNK_VALUES {
        return;
    }
    let total = values.len() as u64;
    let chunks = chunk_count(total, request.chunk_values);
    assert!(chunks <= total, "more chunks than values");
    assert!(
        chunks.saturating_mul(request.chunk_values) >= total,
        "the chunks do not cover the state"
    );
    let Some(end) = request
        .start_chunk
        .checked_add(request.chunk_count)
        .filter(|&end| end <= chunks)
    else {
        return;
    };
    let mut next_value = chunk_range(request.start_chunk, request.chunk_values, total).start;
    for index in request.start_chunk..end {
        let range = chunk_range(index, request.chunk_values, total);
        assert_eq!(
            range.start, next_value,
            "chunk {index} does not follow the previous one"
        );
        assert!(!range.is_empty() && range.len() as u64 <= request.chunk_values);
        assert!(range.end <= values.len());
        let payload = encode_values(&values[range.clone()]);
        assert_eq!(payload.len(), 4 * range.len());
        assert_eq!(check_chunk(&payload, range.len()), Ok(()));
        next_value = range.end;
    }
    if end == chunks && end > request.start_chunk {
        assert_eq!(next_value, values.len(), "the last chunk does not end the state");
    }
}

/// The receiver's side of one donor stream: the info first, then chunks in order.
#[derive(Default)]
struct Receiver {
    got_info: bool,
    next: u64,
    failed: bool,
    values: Vec<f32>,
}

impl Receiver {
    fn on_response(&mut self, response: StateResponse, payload: &[u8]) {
        if self.failed {
            return;
        }
        match response {
            StateResponse::Info(info) if !self.got_info => {
                // The receiver's expectation: its own layout and chunk size, metadata of at most 1 MiB.
                if info.total_values != TOTAL_VALUES || info.chunk_values != CHUNK_VALUES || payload.len() > 1 << 20 {
                    self.failed = true;
                    return;
                }
                self.got_info = true;
                self.values = vec![f32::NAN; TOTAL_VALUES as usize];
            }
            StateResponse::Chunk { index } if self.got_info && index == self.next => {
                if index >= chunk_count(TOTAL_VALUES, CHUNK_VALUES) {
                    self.failed = true;
                    return;
                }
                let range = chunk_range(index, CHUNK_VALUES, TOTAL_VALUES);
                if check_payload(payload, range.len()).is_err() {
                    self.failed = true;
                    return;
                }
                decode_values(payload, &mut self.values[range.clone()]);
                assert!(self.values[range].iter().all(|v| v.is_finite()));
                self.next += 1;
            }
            _ => self.failed = true,
        }
    }
}

/// `check_chunk` on `payload` for `expected` values, checked against a value-by-value reading.
fn check_payload(payload: &[u8], expected: usize) -> Result<(), ChunkFault> {
    let result = check_chunk(payload, expected);
    let first_bad = payload
        .chunks_exact(4)
        .position(|word| !f32::from_le_bytes(word.try_into().expect("4 bytes")).is_finite());
    if payload.len() != expected * 4 {
        assert_eq!(
            result,
            Err(ChunkFault::Length {
                bytes: payload.len(),
                expected_bytes: expected * 4
            })
        );
        return result;
    }
    match first_bad {
        Some(position) => assert_eq!(result, Err(ChunkFault::NonFinite { position })),
        None => {
            assert_eq!(result, Ok(()));
            let mut out = vec![f32::NAN; expected];
            decode_values(payload, &mut out);
            for (value, word) in out.iter().zip(payload.chunks_exact(4)) {
                assert!(value.is_finite());
                assert_eq!(value.to_le_bytes(), word);
            }
        }
    }
    result
}
