//! The codecs' error bounds, edge cases, refusals of bad buffers, policies and the parallel path.

use std::collections::HashMap;

use proptest::prelude::*;

use super::support::{CHUNK, Exec};
use super::*;
use crate::tensor::{TensorInfo, TensorRole};

/// A deterministic standard normal generator: splitmix64 for uniform bits, Box–Muller for the normals.
struct Normal {
    state: u64,
    spare: Option<f64>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f64 {
        if let Some(spare) = self.spare.take() {
            return spare;
        }
        let radius = (-2.0 * self.uniform().ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}

fn randn(len: usize, seed: u64) -> Vec<f32> {
    let mut normal = Normal::new(seed);
    (0..len).map(|_| normal.sample() as f32).collect()
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let total: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    total / a.len().max(1) as f64
}

fn round_trip(codec: Codec, values: &[f32], row_len: usize) -> Vec<f32> {
    let bytes = codec.encode(values, row_len);
    assert_eq!(
        bytes.len(),
        codec.encoded_len(values.len(), row_len),
        "{codec}: encoded_len"
    );
    codec
        .decode(&bytes, values.len())
        .unwrap_or_else(|e| panic!("{codec} must decode its own encoding: {e}"))
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn randn_errors_are_within_the_bounds_of_each_codec() {
    // randn(128, 128, 64): rows of the last axis for the scaled codec.
    let values = randn(128 * 128 * 64, 0);
    for codec in Codec::ALL {
        let decoded = round_trip(codec, &values, 64);
        let error = mse(&values, &decoded);
        match codec {
            Codec::None => assert_eq!(bits(&decoded), bits(&values), "none is exact"),
            Codec::Float16 | Codec::ScaledFloat16 => assert!(error < 5e-8, "{codec}: mse {error}"),
            Codec::Uniform8Bit | Codec::Quantile8Bit | Codec::Blockwise8Bit => {
                assert!(error < 8e-4, "{codec}: mse {error}")
            }
        }
        if codec != Codec::None {
            assert!(error > 0.0, "{codec} is lossy on random data");
        }
    }
}

#[test]
fn zeros_constants_empty_and_single_values_decode_exactly() {
    let cases: Vec<(&str, Vec<f32>)> = vec![
        ("empty", vec![]),
        ("zeros", vec![0.0; 25]),
        ("constant", vec![3.5; 1000]),
        ("long constant", vec![-3.5; 3 * BLOCK_SIZE + 17]),
        ("one value", vec![0.75]),
        ("one negative value", vec![-1.5]),
        ("one zero", vec![0.0]),
    ];
    for (name, values) in &cases {
        for codec in Codec::ALL {
            for row_len in [0, 1, 7] {
                let decoded = round_trip(codec, values, row_len);
                assert_eq!(decoded, *values, "{codec} on {name} with rows of {row_len}");
            }
        }
    }
    // An arbitrary single value: exact for None, finite and close for the others.
    for codec in Codec::ALL {
        let decoded = round_trip(codec, &[-1.2345678], 0);
        assert!(decoded[0].is_finite(), "{codec}");
        assert!((decoded[0] + 1.2345678).abs() < 1e-3, "{codec}: {}", decoded[0]);
        if codec == Codec::None {
            assert_eq!(decoded[0], -1.2345678);
        }
    }
}

#[test]
fn float16_clamps_values_beyond_its_range() {
    let values = [
        1e5,
        -1e6,
        65504.0,
        70000.0,
        f32::MAX,
        f32::INFINITY,
        -f32::INFINITY,
        1.0,
    ];
    let decoded = round_trip(Codec::Float16, &values, 0);
    assert_eq!(
        decoded,
        vec![65504.0, -65504.0, 65504.0, 65504.0, 65504.0, 65504.0, -65504.0, 1.0]
    );
}

#[test]
fn reference_encodings() {
    assert_eq!(Codec::Float16.encode(&[1.0, -2.0], 0), vec![0x00, 0x3c, 0x00, 0xc0]);
    assert_eq!(Codec::None.encode(&[1.0], 0), vec![0x00, 0x00, 0x80, 0x3f]);
    // absmax 1: 0.5 is nearest 0.25 · (1 + 3 · 21 / 64) (code 64 + 20), 0.25 is exact (code 63).
    let blockwise = Codec::Blockwise8Bit.encode(&[0.5, -1.0, 0.0, 0.25], 0);
    assert_eq!(blockwise[..4], 4096u32.to_le_bytes());
    assert_eq!(blockwise[4..8], 1.0f32.to_le_bytes());
    assert_eq!(blockwise[8..], [84, 255, 0, 63]);
    assert_eq!(
        Codec::Blockwise8Bit.decode(&blockwise, 4).unwrap(),
        vec![0.49609375, -1.0, 0.0, 0.25]
    );
    // Mean 0, unbiased std 1: index 128 + round(x / (6/256)), i.e. ±43 for ±1.
    let uniform = Codec::Uniform8Bit.encode(&[-1.0, 1.0, 0.0], 0);
    assert_eq!(uniform[..4], 256u32.to_le_bytes());
    assert_eq!(uniform[4 + 4 * 256..], [128 - 43, 128 + 43, 128]);
    let scaled = Codec::ScaledFloat16.encode(&[1.0, 3.0, 10.0, 10.0], 2);
    assert_eq!(scaled[..8], 2u64.to_le_bytes());
    assert_eq!(scaled[8..12], 2.0f32.to_le_bytes());
    assert_eq!(scaled[12..16], 10.0f32.to_le_bytes());
    assert_eq!(scaled[16..20], 1.0f32.to_le_bytes());
    assert_eq!(scaled[20..24], f32::EPSILON.to_le_bytes());
    assert_eq!(scaled[24..], [0x00, 0xbc, 0x00, 0x3c, 0, 0, 0, 0]);
}

#[test]
fn non_finite_values_are_refused_when_decoding() {
    let non_finite = |codec: Codec, bytes: &[u8], len: usize| match codec.decode(bytes, len) {
        Err(CodecError::NonFinite { codec: c, index }) if c == codec => index,
        other => panic!("{codec}: expected NonFinite, got {other:?}"),
    };
    // None: a NaN value.
    let bytes = Codec::None.encode(&[1.0, f32::NAN, 2.0], 0);
    assert_eq!(non_finite(Codec::None, &bytes, 3), 4);
    let bytes = Codec::None.encode(&[1.0, 2.0, f32::NEG_INFINITY], 0);
    assert_eq!(non_finite(Codec::None, &bytes, 3), 8);
    // Float16: an infinite and a NaN half.
    let mut bytes = Codec::Float16.encode(&[1.0, 2.0, 3.0], 0);
    bytes[2..4].copy_from_slice(&0x7c00u16.to_le_bytes());
    assert_eq!(non_finite(Codec::Float16, &bytes, 3), 2);
    bytes[2..4].copy_from_slice(&0x7e01u16.to_le_bytes());
    assert_eq!(non_finite(Codec::Float16, &bytes, 3), 2);
    // ScaledFloat16: a NaN mean, an infinite std, an infinite half, and finite fields whose product overflows.
    let good = Codec::ScaledFloat16.encode(&[1.0, 2.0, 3.0, 4.0], 2);
    let mut bytes = good.clone();
    bytes[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(non_finite(Codec::ScaledFloat16, &bytes, 4), 12);
    let mut bytes = good.clone();
    bytes[16..20].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_eq!(non_finite(Codec::ScaledFloat16, &bytes, 4), 16);
    let mut bytes = good.clone();
    bytes[28..30].copy_from_slice(&0xfc00u16.to_le_bytes());
    assert_eq!(non_finite(Codec::ScaledFloat16, &bytes, 4), 28);
    let mut bytes = good.clone();
    bytes[16..20].copy_from_slice(&f32::MAX.to_le_bytes());
    bytes[26..28].copy_from_slice(&half::f16::from_f32(60000.0).to_le_bytes());
    assert_eq!(non_finite(Codec::ScaledFloat16, &bytes, 4), 26);
    // The 8-bit codebook codecs: a NaN codebook entry, even one no value uses.
    for codec in [Codec::Uniform8Bit, Codec::Quantile8Bit] {
        let mut bytes = codec.encode(&[1.0, 2.0], 0);
        bytes[4 + 4 * 200..4 + 4 * 201].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(non_finite(codec, &bytes, 2), 4 + 4 * 200);
    }
    // Blockwise: an infinite absmax.
    let mut bytes = Codec::Blockwise8Bit.encode(&randn(5000, 1), 0);
    bytes[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_eq!(non_finite(Codec::Blockwise8Bit, &bytes, 5000), 8);
    // Non-finite inputs encode without panicking and are refused at the receiver.
    for codec in Codec::ALL {
        let bytes = codec.encode(&[1.0, f32::NAN, -2.0], 0);
        assert!(
            matches!(codec.decode(&bytes, 3), Err(CodecError::NonFinite { .. })),
            "{codec}"
        );
    }
}

#[test]
fn malformed_headers_are_refused() {
    let malformed = |codec: Codec, bytes: &[u8], len: usize| {
        assert!(
            matches!(codec.decode(bytes, len), Err(CodecError::Malformed { codec: c, .. }) if c == codec),
            "{codec}: {:?}",
            codec.decode(bytes, len)
        )
    };
    for codec in [Codec::Uniform8Bit, Codec::Quantile8Bit] {
        for codebook_len in [0u32, 257, u32::MAX] {
            let mut bytes = codebook_len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&[0; 4 * 256 + 3]);
            malformed(codec, &bytes, 3);
        }
        // A codebook of 2 entries and an index 5.
        let mut bytes = 2u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&1.0f32.to_le_bytes());
        bytes.extend_from_slice(&2.0f32.to_le_bytes());
        bytes.extend_from_slice(&[0, 1, 5]);
        malformed(codec, &bytes, 3);
        bytes[14] = 1;
        assert_eq!(codec.decode(&bytes, 3).unwrap(), vec![1.0, 2.0, 2.0]);
    }
    // Blockwise: block size 0, a negative absmax.
    let mut bytes = Codec::Blockwise8Bit.encode(&[1.0, 2.0], 0);
    bytes[..4].copy_from_slice(&0u32.to_le_bytes());
    malformed(Codec::Blockwise8Bit, &bytes, 2);
    let mut bytes = Codec::Blockwise8Bit.encode(&[1.0, 2.0], 0);
    bytes[4..8].copy_from_slice(&(-2.0f32).to_le_bytes());
    malformed(Codec::Blockwise8Bit, &bytes, 2);
    // Another block size is understood: two blocks of 1.
    let mut bytes = 1u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&2.0f32.to_le_bytes());
    bytes.extend_from_slice(&4.0f32.to_le_bytes());
    bytes.extend_from_slice(&[127, 255]);
    assert_eq!(Codec::Blockwise8Bit.decode(&bytes, 2).unwrap(), vec![2.0, -4.0]);
    // Scaled: a row length of 0 or past the values, a negative std.
    let good = Codec::ScaledFloat16.encode(&[1.0, 2.0, 3.0, 4.0], 2);
    for row_len in [0u64, 5, u64::MAX] {
        let mut bytes = good.clone();
        bytes[..8].copy_from_slice(&row_len.to_le_bytes());
        malformed(Codec::ScaledFloat16, &bytes, 4);
    }
    let mut bytes = good.clone();
    bytes[16..20].copy_from_slice(&(-1.0f32).to_le_bytes());
    malformed(Codec::ScaledFloat16, &bytes, 4);
    let empty = Codec::ScaledFloat16.encode(&[], 3);
    assert_eq!(empty, 0u64.to_le_bytes());
    malformed(Codec::ScaledFloat16, &1u64.to_le_bytes(), 0);
}

#[test]
fn wrong_sizes_are_length_errors() {
    let values = randn(100, 2);
    for codec in Codec::ALL {
        let bytes = codec.encode(&values, 10);
        for len in [99, 101] {
            assert!(codec.decode(&bytes, len).is_err(), "{codec} with {len} values");
        }
        let mut out = vec![0.0; 100];
        codec.decode_into(&bytes, &mut out).unwrap();
        assert_eq!(out, codec.decode(&bytes, 100).unwrap());
        assert!(matches!(
            codec.decode_into(&bytes[..bytes.len() - 1], &mut out),
            Err(CodecError::Length { .. })
        ));
        // A length whose size overflows is refused before anything is allocated.
        assert!(codec.decode(&bytes, usize::MAX).is_err(), "{codec}");
        assert!(codec.decode(&[], usize::MAX / 2).is_err(), "{codec}");
    }
    let error = Codec::None.decode(&[0; 7], 2).unwrap_err();
    assert_eq!(
        error,
        CodecError::Length {
            codec: Codec::None,
            expected: 8,
            actual: 7
        }
    );
    assert_eq!(
        error.to_string(),
        "none buffer holds 7 bytes but its header and the number of values call for 8"
    );
}

#[test]
fn ids_names_and_sizes() {
    for (id, codec) in Codec::ALL.into_iter().enumerate() {
        assert_eq!(codec.id() as usize, id);
        assert_eq!(Codec::from_id(id as u8), Ok(codec));
        assert_eq!(Codec::from_name(codec.name()), Some(codec));
        assert_eq!(codec.to_string(), codec.name());
    }
    assert_eq!(Codec::from_id(6), Err(CodecError::UnknownCodec(6)));
    assert_eq!(Codec::from_name("int8"), None);
    let names: Vec<_> = Codec::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "none",
            "float16",
            "scaled-float16",
            "uniform-8bit",
            "quantile-8bit",
            "blockwise-8bit"
        ]
    );
    let sizes: Vec<_> = Codec::ALL.iter().map(|c| c.bytes_per_value()).collect();
    assert_eq!(sizes, [4.0, 2.0, 2.0, 1.0, 1.0, 1.0]);
    for codec in Codec::ALL {
        assert_eq!(codec.encoded_len(usize::MAX, 7), usize::MAX, "{codec} saturates");
    }
}

#[test]
fn size_policy_compares_the_whole_tensor_with_the_threshold() {
    let policy = CodecPolicy::BySize {
        threshold: 1000,
        small: Box::new(CodecPolicy::Fixed(Codec::Float16)),
        large: Box::new(CodecPolicy::Fixed(Codec::Uniform8Bit)),
    };
    assert_eq!(policy.codec_for(&TensorInfo::new("a", [10, 100])), Codec::Uniform8Bit);
    assert_eq!(policy.codec_for(&TensorInfo::new("b", [999])), Codec::Float16);
    assert_eq!(policy.codec_for(&TensorInfo::new("c", [])), Codec::Float16);
    assert_eq!(policy.codec_for(&TensorInfo::new("d", [0, 5000])), Codec::Float16);
    assert_eq!(
        policy.codec_for(&TensorInfo::new("e", [usize::MAX, 2])),
        Codec::Uniform8Bit
    );
}

#[test]
fn role_policy_chooses_by_role() {
    let policy = CodecPolicy::ByRole {
        gradient: Codec::Uniform8Bit,
        parameter: Codec::Float16,
        optimizer_statistic: Codec::None,
        other: Codec::Blockwise8Bit,
    };
    let with = |role| TensorInfo::new("w", [4]).with_role(role);
    assert_eq!(policy.codec_for(&with(TensorRole::Gradient)), Codec::Uniform8Bit);
    assert_eq!(policy.codec_for(&with(TensorRole::Parameter)), Codec::Float16);
    assert_eq!(policy.codec_for(&with(TensorRole::OptimizerStatistic)), Codec::None);
    assert_eq!(policy.codec_for(&with(TensorRole::Unspecified)), Codec::Blockwise8Bit);
}

#[test]
fn name_policy_chooses_by_name_then_falls_back() {
    let policy = CodecPolicy::ByName {
        codecs: HashMap::from([("embedding".to_owned(), Codec::Quantile8Bit)]),
        default: Box::new(CodecPolicy::BySize {
            threshold: 100,
            small: Box::new(CodecPolicy::default()),
            large: Box::new(CodecPolicy::Fixed(Codec::ScaledFloat16)),
        }),
    };
    assert_eq!(
        policy.codec_for(&TensorInfo::new("embedding", [1])),
        Codec::Quantile8Bit
    );
    assert_eq!(policy.codec_for(&TensorInfo::new("head", [1])), Codec::None);
    assert_eq!(policy.codec_for(&TensorInfo::new("head", [100])), Codec::ScaledFloat16);
    assert_eq!(CodecPolicy::default(), CodecPolicy::Fixed(Codec::None));
}

#[test]
fn parallel_path_is_bit_identical_to_the_sequential_one() {
    let len = 2 * PARALLEL_MIN_VALUES + 12_345;
    assert_eq!(Exec::for_len(len), Exec::Parallel);
    assert_eq!(Exec::for_len(PARALLEL_MIN_VALUES - 1), Exec::Sequential);
    // An offset and a spread that differ along the vector, so that chunk order matters for the sums.
    let values: Vec<f32> = randn(len, 3)
        .iter()
        .enumerate()
        .map(|(i, &x)| x * (1.0 + (i % 977) as f32 / 100.0) + (i / 50_000) as f32)
        .collect();
    for codec in Codec::ALL {
        for row_len in [0, 100, 3 * CHUNK + 7] {
            if codec != Codec::ScaledFloat16 && row_len != 0 {
                continue;
            }
            let mut sequential = vec![1, 2, 3];
            codec.encode_with(&values, row_len, &mut sequential, Exec::Sequential);
            let mut parallel = vec![1, 2, 3];
            codec.encode_with(&values, row_len, &mut parallel, Exec::Parallel);
            assert!(
                sequential == parallel,
                "{codec} with rows of {row_len}: encodings differ"
            );
            assert_eq!(&sequential[..3], &[1, 2, 3], "encode_into appends");
            assert_eq!(
                codec.encode(&values, row_len),
                parallel[3..],
                "{codec}: encode is encode_with"
            );
            let mut decoded_sequential = vec![0.0; len];
            codec
                .decode_with(&parallel[3..], &mut decoded_sequential, Exec::Sequential)
                .unwrap();
            let mut decoded_parallel = vec![0.0; len];
            codec
                .decode_with(&parallel[3..], &mut decoded_parallel, Exec::Parallel)
                .unwrap();
            assert!(
                bits(&decoded_sequential) == bits(&decoded_parallel),
                "{codec} with rows of {row_len}: decodings differ"
            );
        }
    }
}

#[test]
fn blockwise_map_is_sorted_symmetric_and_spans_minus_one_to_one() {
    let map = dynamic_map();
    assert_eq!(map[0], 0.0);
    assert_eq!(map[127], 1.0);
    assert_eq!(map[255], -1.0);
    for code in 0..127 {
        assert!(map[code] < map[code + 1], "magnitudes increase at {code}");
        assert_eq!(map[code + 128], -map[code]);
    }
    // Finer near zero: each factor of 4 towards zero halves the step (and the number of codes).
    let step = |code: usize| map[code + 1] - map[code];
    assert_eq!(step(126), 3.0 / 256.0);
    for (code, finer) in [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2)] {
        assert_eq!(step(code), step(finer) * 2.0, "step at code {code} vs {finer}");
    }
}

/// The nearest magnitude code by brute force (ties to the smaller code).
fn nearest_by_scan(a: f32) -> u8 {
    let map = dynamic_map();
    let mut best = 0;
    for code in 1..128 {
        if (map[code] - a).abs() < (map[best] - a).abs() {
            best = code;
        }
    }
    best as u8
}

#[test]
fn blockwise_lookup_finds_the_nearest_map_entry() {
    let map = dynamic_map();
    let mut probes: Vec<f32> = Vec::new();
    for code in 0..127 {
        let middle = (map[code] + map[code + 1]) / 2.0;
        probes.extend([map[code], middle, middle.next_up(), middle.next_down()]);
    }
    // The edges of every look-up bin.
    for bin in 0..=(1.0f32.to_bits() >> 16) {
        probes.extend([f32::from_bits(bin << 16), f32::from_bits((bin << 16) | 0xffff)]);
    }
    let mut normal = Normal::new(9);
    probes.extend((0..100_000).map(|_| normal.uniform() as f32));
    for a in probes.into_iter().filter(|a| (0.0..=1.0).contains(a)) {
        assert_eq!(
            super::blockwise8::nearest_magnitude_code(a),
            nearest_by_scan(a),
            "nearest code of {a}"
        );
    }
}

#[test]
fn quantile_buckets_hold_equal_shares_of_the_values() {
    let n = 1 << 20;
    let values = randn(n, 4);
    let bytes = Codec::Quantile8Bit.encode(&values, 0);
    let mut counts = [0usize; 256];
    for &q in &bytes[4 + 4 * 256..] {
        counts[usize::from(q)] += 1;
    }
    // n / 255 per inner bucket, half that at the ends; borders on bins of 2⁻⁷ relative width blur the shares.
    let share = n as f64 / 255.0;
    for (bucket, &count) in counts.iter().enumerate() {
        let expected = if bucket == 0 || bucket == 255 {
            share / 2.0
        } else {
            share
        };
        let count = count as f64;
        assert!(
            count > expected * 0.6 && count < expected * 1.4,
            "bucket {bucket} holds {count} values, about {expected:.0} expected"
        );
    }
    // Buckets are ordered: every value of a bucket is below every value of the next.
    let mut largest = [f32::NEG_INFINITY; 256];
    let mut smallest = [f32::INFINITY; 256];
    for (&x, &q) in values.iter().zip(&bytes[4 + 4 * 256..]) {
        largest[usize::from(q)] = largest[usize::from(q)].max(x);
        smallest[usize::from(q)] = smallest[usize::from(q)].min(x);
    }
    assert!((0..255).all(|k| largest[k] < smallest[k + 1]));
}

/// Vectors for the property tests: scaled and shifted uniform noise, or a few repeated values.
fn finite_vectors() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        (
            prop::collection::vec(-1.0f32..1.0, 0..5000),
            -20i32..20,
            -100.0f32..100.0
        )
            .prop_map(|(v, exponent, offset)| {
                let scale = 10f32.powi(exponent);
                v.into_iter().map(|x| (x + offset) * scale).collect()
            }),
        prop::collection::vec(prop::sample::select(vec![0.0f32, -0.0, 1.0, -2.5, 3.5, 1e-30]), 0..5000),
    ]
}

/// The error bounds of the round-trip property, per codec.
fn check_round_trip(codec: Codec, values: &[f32], row_len: usize, decoded: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(decoded.len(), values.len());
    prop_assert!(decoded.iter().all(|x| x.is_finite()));
    let n = values.len();
    if n == 0 {
        return Ok(());
    }
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match codec {
        Codec::None => prop_assert_eq!(bits(decoded), bits(values)),
        Codec::Float16 => {
            for (&x, &d) in values.iter().zip(decoded) {
                let clamped = x.clamp(-65504.0, 65504.0);
                let bound = (clamped.abs() / 2048.0).max(2f32.powi(-25));
                prop_assert!((d - clamped).abs() <= bound, "{} decoded as {}", x, d);
            }
        }
        Codec::ScaledFloat16 => {
            let row_len = if row_len == 0 || row_len >= n { n } else { row_len };
            for (row, decoded) in values.chunks(row_len).zip(decoded.chunks(row_len)) {
                let mean = row.iter().map(|&x| f64::from(x)).sum::<f64>() / row.len() as f64;
                let deviance: f64 = row.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum();
                let std = (deviance / row.len() as f64).sqrt().max(f64::from(f32::EPSILON));
                for (&x, &d) in row.iter().zip(decoded) {
                    let x64 = f64::from(x);
                    let bound = (x64 - mean).abs() / 1024.0 + std * 1e-7 + (x64.abs() + mean.abs()) * 5e-7;
                    prop_assert!((f64::from(d) - x64).abs() <= bound, "{} decoded as {}", x, d);
                }
            }
        }
        Codec::Uniform8Bit | Codec::Quantile8Bit => {
            // Every codebook entry is a mean of values: within [min, max].
            let slack = (max.abs().max(min.abs())) * 1e-6;
            prop_assert!(decoded.iter().all(|&d| d >= min - slack && d <= max + slack));
            // Buckets are ordered and decode to their means: the order of values is kept...
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
            prop_assert!(order.windows(2).all(|w| decoded[w[0]] <= decoded[w[1]]));
            // ...and bucket means cannot err more than the values vary (law of total variance).
            let mean = values.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
            let variance = values.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n as f64;
            let error = mse(values, decoded);
            prop_assert!(
                error <= variance * 1.001 + f64::from(slack).powi(2),
                "mse {} above variance {}",
                error,
                variance
            );
            if codec == Codec::Uniform8Bit && n > 1 {
                // Values well inside ± 3σ share a bucket only with values less than one step away.
                let std = (variance * n as f64 / (n - 1) as f64).sqrt();
                let step = 6.0 * std / 256.0;
                for (&x, &d) in values.iter().zip(decoded) {
                    if (f64::from(x) - mean).abs() <= 126.0 * step {
                        let error = (f64::from(d) - f64::from(x)).abs();
                        prop_assert!(error <= step * 1.01 + f64::from(slack), "{} decoded as {}", x, d);
                    }
                }
            }
        }
        Codec::Blockwise8Bit => {
            let map = dynamic_map();
            let half_gap = (0..127).map(|c| (map[c + 1] - map[c]) / 2.0).fold(0.0f32, f32::max);
            for (block, decoded) in values.chunks(BLOCK_SIZE).zip(decoded.chunks(BLOCK_SIZE)) {
                let absmax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                for (&x, &d) in block.iter().zip(decoded) {
                    let bound = absmax * (half_gap + 1e-6);
                    prop_assert!((d - x).abs() <= bound, "{} decoded as {} (absmax {})", x, d, absmax);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..3000),
        small_len in 0usize..3000,
        huge_len in any::<usize>(),
        header in any::<u32>(),
    ) {
        for codec in Codec::ALL {
            for len in [small_len, huge_len, bytes.len(), bytes.len() / 2, bytes.len().saturating_sub(8)] {
                let _ = codec.decode(&bytes, len);
            }
            // With a plausible header, so that the later checks are reached too.
            let mut with_header = bytes.clone();
            if with_header.len() >= 8 {
                with_header[..4].copy_from_slice(&(header % 300).to_le_bytes());
                with_header[4..8].copy_from_slice(&[0; 4]);
            }
            for len in [small_len, with_header.len().saturating_sub(4 + 4 * (header % 300) as usize)] {
                let _ = codec.decode(&with_header, len);
                if len <= 3000 {
                    let mut out = vec![0.0; len];
                    let _ = codec.decode_into(&with_header, &mut out);
                }
            }
        }
    }

    #[test]
    fn truncated_or_extended_encodings_are_refused(
        values in prop::collection::vec(-1e3f32..1e3, 0..2000),
        row_len in 0usize..300,
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..3000),
    ) {
        for codec in Codec::ALL {
            let bytes = codec.encode(&values, row_len);
            prop_assert!(codec.decode(&bytes, values.len()).is_ok());
            if !bytes.is_empty() {
                let keep = cut.index(bytes.len());
                prop_assert!(codec.decode(&bytes[..keep], values.len()).is_err(), "{} cut to {}", codec, keep);
            }
            let mut extended = bytes.clone();
            extended.extend_from_slice(&extra);
            prop_assert!(codec.decode(&extended, values.len()).is_err(), "{} extended", codec);
        }
    }

    #[test]
    fn round_trips_stay_within_each_codecs_bounds(values in finite_vectors(), row_len in 0usize..6000) {
        for codec in Codec::ALL {
            let decoded = codec.decode(&codec.encode(&values, row_len), values.len()).unwrap();
            check_round_trip(codec, &values, row_len, &decoded)?;
        }
    }
}
