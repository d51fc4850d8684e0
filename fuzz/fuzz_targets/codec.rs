//! Fuzzes the part codecs' decoders (`Codec::decode`, `Codec::decode_into`) with what a peer may send: a
//! codec id, a number of values and the encoded bytes. Input layout: byte 0 is the codec id (any byte, so
//! unknown ids are tried too), bytes 1..5 the number of values the receiver expects (`u32`, little-endian,
//! any size: a wrong one must be refused before anything is allocated), the rest the buffer. The buffer is
//! also decoded with the number of values its own header implies, so that mutated buffers reach the value
//! checks and not only the size check.
//!
//! Invariants: an accepted buffer yields exactly the expected number of values, all finite, and
//! `decode_into` agrees bit for bit with `decode`; the `none` and `float16` codecs re-encode an accepted
//! buffer to the same bytes; every codec re-encodes the decoded values to `encoded_len` bytes that decode
//! again to values of the same length.

#![no_main]

use colony_averaging::codec::{BLOCK_SIZE, Codec, CodecError};
use libfuzzer_sys::fuzz_target;

/// Values decoded at most per call (the implied lengths of 64 KiB inputs stay below it).
const MAX_VALUES: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&id, rest)) = data.split_first() else { return };
    let Some((len_bytes, bytes)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let expected_len = u32::from_le_bytes(*len_bytes) as usize;

    let codec = match Codec::from_id(id) {
        Ok(codec) => {
            assert_eq!(codec.id(), id);
            codec
        }
        Err(err) => {
            assert_eq!(err, CodecError::UnknownCodec(id));
            assert!(usize::from(id) >= Codec::ALL.len());
            // A peer naming an unknown codec still gets its buffer checked by the codec of the same id
            // modulo the known ones: the bytes are worth fuzzing either way.
            Codec::ALL[usize::from(id) % Codec::ALL.len()]
        }
    };

    check_decode(codec, bytes, expected_len);
    for len in implied_lens(codec, bytes) {
        if len != expected_len {
            check_decode(codec, bytes, len);
        }
    }
});

/// The numbers of values `bytes` would hold for `codec`, judging by its size and header.
fn implied_lens(codec: Codec, bytes: &[u8]) -> Vec<usize> {
    let field_u32 = || bytes.first_chunk::<4>().map(|b| u32::from_le_bytes(*b) as usize);
    let mut lens = Vec::new();
    match codec {
        Codec::None => lens.push(bytes.len() / 4),
        Codec::Float16 => lens.push(bytes.len() / 2),
        Codec::ScaledFloat16 => {
            // 8 + 8·rows + 2·n bytes with rows = ⌈n / row_len⌉.
            if let Some(field) = bytes.first_chunk::<8>().map(|b| u64::from_le_bytes(*b)) {
                let body = bytes.len().saturating_sub(8);
                let row_len = usize::try_from(field).unwrap_or(usize::MAX).max(1);
                // n values take 2n + 8⌈n/row_len⌉ ≈ n(2 + 8/row_len) bytes; try the neighbours of the estimate.
                let estimate = (body as f64 / (2.0 + 8.0 / row_len as f64)) as usize;
                lens.extend(estimate.saturating_sub(2)..=estimate + 2);
            }
        }
        Codec::Uniform8Bit | Codec::Quantile8Bit => {
            if let Some(codebook_len) = field_u32() {
                lens.push(bytes.len().saturating_sub(4 + 4 * codebook_len.min(1 << 20)));
            }
        }
        Codec::Blockwise8Bit => {
            if let Some(block_size) = field_u32() {
                let block_size = block_size.max(1);
                let body = bytes.len().saturating_sub(4);
                // n + 4⌈n/block_size⌉ bytes.
                let estimate = (body as f64 / (1.0 + 4.0 / block_size as f64)) as usize;
                lens.extend(estimate.saturating_sub(2)..=estimate + 2);
            }
        }
    }
    lens.retain(|&len| len <= MAX_VALUES);
    lens
}

/// Decodes `bytes` as `len` values of `codec` and checks the invariants of the result.
fn check_decode(codec: Codec, bytes: &[u8], len: usize) {
    let decoded = codec.decode(bytes, len);
    // No codec stores a value in less than a byte, so a longer `out` can only be refused: it is worth
    // allocating only up to the buffer's size.
    if len <= bytes.len() {
        // decode_into must agree with decode, whatever `out` held before.
        let mut out = vec![f32::NAN; len];
        let into = codec.decode_into(bytes, &mut out);
        match (&decoded, &into) {
            (Ok(values), Ok(())) => assert_eq!(bits(values), bits(&out), "{codec}: decode_into differs"),
            (Err(a), Err(b)) => assert_eq!(a, b, "{codec}: decode and decode_into fail differently"),
            _ => panic!("{codec}: decode gave {decoded:?} but decode_into {into:?}"),
        }
    }
    let Ok(values) = decoded else { return };
    assert!(len <= bytes.len(), "{codec}: {len} values from {} bytes", bytes.len());
    assert_eq!(values.len(), len, "{codec}: wrong number of values");
    assert!(
        values.iter().all(|v| v.is_finite()),
        "{codec}: accepted a non-finite value"
    );

    match codec {
        Codec::None | Codec::Float16 => {
            assert_eq!(bytes.len(), codec.encoded_len(len, 0));
            // Every accepted value is exactly representable, so the bytes come back unchanged.
            assert_eq!(
                codec.encode(&values, 0),
                bytes,
                "{codec}: re-encoding changed the bytes"
            );
        }
        Codec::ScaledFloat16 => {}
        Codec::Uniform8Bit | Codec::Quantile8Bit => {
            assert!(
                bytes.len() <= codec.encoded_len(len, 0),
                "{codec}: more than 256 codebook entries"
            );
        }
        Codec::Blockwise8Bit => {
            let block_size = u32::from_le_bytes(bytes[..4].try_into().expect("an accepted buffer has a header"));
            if block_size as usize == BLOCK_SIZE {
                assert_eq!(bytes.len(), codec.encoded_len(len, 0));
            }
        }
    }

    // Whatever came in, what this peer sends back from it (the averaged part, a delta) must be decodable.
    let row_len = match codec {
        Codec::ScaledFloat16 => u64::from_le_bytes(bytes[..8].try_into().expect("an accepted buffer has a header")),
        _ => 0,
    };
    let row_len = usize::try_from(row_len).unwrap_or(usize::MAX);
    let again = codec.encode(&values, row_len);
    assert_eq!(
        again.len(),
        codec.encoded_len(len, row_len),
        "{codec}: encoded_len is wrong"
    );
    match codec.decode(&again, len) {
        Ok(round_trip) => assert_eq!(round_trip.len(), len),
        // Finite values near f32::MAX may not survive the codec's arithmetic (a standard deviation or a
        // codebook mean that overflows); smaller ones must.
        Err(err) => assert!(
            values.iter().any(|v| v.abs() > 1e30),
            "{codec}: its own encoding of {len} finite values does not decode: {err}"
        ),
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}
