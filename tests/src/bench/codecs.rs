//! `bench -- codecs`: how fast each compression codec of `colony-averaging` encodes and decodes, in GB/s of
//! `f32` input, against the machine's memory bandwidth measured in the same run.
//!
//! The input is `randn(values)` (16 Mi values, 64 MiB, by default) from a fixed seed; the scaled codec uses rows
//! of 1,024 values. Encoding appends to a buffer whose capacity is kept between runs and decoding writes into
//! a preallocated slice, so that neither allocation nor page faults are timed (one untimed warm-up round
//! touches every buffer first). Large parts run on the rayon pool, as in averaging.
//!
//! The bound is a STREAM-like copy (`b[i] = a[i]`) of a buffer of the same size, split across as many threads
//! as the machine has CPUs, expressed like the codecs: bytes of `a` per second (STREAM itself would count the
//! write too, i.e. twice that). A triad (`a[i] = b[i] + s · c[i]`, again per byte of one array) is reported
//! beside it. An encoder reads its input once or twice and writes at most as much, so a ratio near 1 means it
//! runs at memory speed. Cases take turns in each round; the best of `repeat` rounds is reported.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use colony_averaging::codec::Codec;

use super::{Measurement, randn};

const SUITE: &str = "codecs";
/// Row length for the scaled codec (the last axis of a typical weight matrix).
const ROW_LEN: usize = 1024;
const SEED: u64 = 7348;

/// Runs the suite on `values` values: encode and decode for every codec (or only the codec named `only`),
/// best of `repeat` rounds, with the copy and triad bounds always measured.
pub fn run(values: usize, repeat: usize, only: Option<&str>) -> anyhow::Result<Vec<Measurement>> {
    if values == 0 {
        bail!("the codecs suite needs at least one value");
    }
    let codecs: Vec<Codec> = match only {
        None => Codec::ALL.to_vec(),
        Some(name) => vec![Codec::from_name(name).with_context(|| {
            let names: Vec<&str> = Codec::ALL.iter().map(|c| c.name()).collect();
            format!("the codecs suite has the cases {}, not {name}", names.join(", "))
        })?],
    };
    let input = randn(values, SEED);
    let mut copy_target = vec![1.0f32; values];
    let mut triad_target = vec![1.0f32; values];
    let triad_source = vec![2.0f32; values];
    let mut encoded: Vec<Vec<u8>> = codecs.iter().map(|c| c.encode(&input, ROW_LEN)).collect();
    let mut decoded = vec![1.0f32; values];
    let mut errors = Vec::with_capacity(codecs.len());
    for (codec, bytes) in codecs.iter().zip(&encoded) {
        codec
            .decode_into(bytes, &mut decoded)
            .with_context(|| format!("{codec} decodes its own encoding"))?;
        errors.push(mse(&input, &decoded));
    }

    let mut copy_times = Vec::with_capacity(repeat);
    let mut triad_times = Vec::with_capacity(repeat);
    let mut encode_times = vec![Vec::with_capacity(repeat); codecs.len()];
    let mut decode_times = vec![Vec::with_capacity(repeat); codecs.len()];
    // Round 0 is the warm-up.
    for round in 0..=repeat {
        let (_, copy) = timed(|| parallel_copy(&input, &mut copy_target));
        let (_, triad) = timed(|| parallel_triad(&mut triad_target, &input, &triad_source, 3.0));
        if round > 0 {
            copy_times.push(copy);
            triad_times.push(triad);
        }
        for (c, codec) in codecs.iter().enumerate() {
            let bytes = &mut encoded[c];
            let (_, encode) = timed(|| {
                bytes.clear();
                codec.encode_into(&input, ROW_LEN, bytes);
            });
            let decode = timed(|| codec.decode_into(bytes, &mut decoded));
            let decode = match decode {
                (Ok(()), elapsed) => elapsed,
                (Err(error), _) => return Err(error).context(format!("{codec} decodes")),
            };
            if round > 0 {
                encode_times[c].push(encode);
                decode_times[c].push(decode);
            }
        }
    }
    black_box((&copy_target, &triad_target, &decoded));

    let bytes = values * 4;
    let best = |all: &[Duration]| *all.iter().min().expect("repeat is at least 1");
    let rate = |elapsed: Duration| bytes as f64 / elapsed.as_secs_f64() / 1e9;
    let copy = rate(best(&copy_times));
    let triad = rate(best(&triad_times));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = format!("{} Mi f32", values as f64 / f64::from(1 << 20));
    let mut results = vec![
        Measurement::new(SUITE, "copy", copy, "GB/s", copy)
            .bound_case("copy")
            .note(format!(
                "{size}, {threads} threads, best of {repeat}; STREAM counts {:.1} GB/s",
                2.0 * copy
            )),
        Measurement::new(SUITE, "triad", triad, "GB/s", copy)
            .bound_case("copy")
            .note(format!("{size}, per array; STREAM counts {:.1} GB/s", 3.0 * triad)),
    ];
    for (c, codec) in codecs.iter().enumerate() {
        let ratio = encoded[c].len() as f64 / bytes as f64;
        let detail = format!("{size}, mse {:.1e}, {:.3} of f32 size", errors[c], ratio);
        results.push(
            Measurement::new(
                SUITE,
                format!("{}/enc", codec.name()),
                rate(best(&encode_times[c])),
                "GB/s",
                copy,
            )
            .bound_case("copy")
            .note(detail.clone()),
        );
        results.push(
            Measurement::new(
                SUITE,
                format!("{}/dec", codec.name()),
                rate(best(&decode_times[c])),
                "GB/s",
                copy,
            )
            .bound_case("copy")
            .note(detail),
        );
    }
    Ok(results)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let result = f();
    (result, started.elapsed())
}

/// Splits `len` items into one contiguous range per CPU.
fn thread_ranges(len: usize) -> Vec<std::ops::Range<usize>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = len.div_ceil(threads).max(1);
    (0..len)
        .step_by(per_thread)
        .map(|start| start..(start + per_thread).min(len))
        .collect()
}

/// `target = source`, one contiguous slice per thread.
fn parallel_copy(source: &[f32], target: &mut [f32]) {
    std::thread::scope(|scope| {
        let mut rest = target;
        for range in thread_ranges(source.len()) {
            let (mine, tail) = rest.split_at_mut(range.len());
            rest = tail;
            let source = &source[range];
            scope.spawn(move || mine.copy_from_slice(source));
        }
    });
}

/// `target = b + scalar · c`, one contiguous slice per thread.
fn parallel_triad(target: &mut [f32], b: &[f32], c: &[f32], scalar: f32) {
    std::thread::scope(|scope| {
        let mut rest = target;
        for range in thread_ranges(b.len()) {
            let (mine, tail) = rest.split_at_mut(range.len());
            rest = tail;
            let (b, c) = (&b[range.clone()], &c[range]);
            scope.spawn(move || {
                for ((a, &b), &c) in mine.iter_mut().zip(b).zip(c) {
                    *a = b + scalar * c;
                }
            });
        }
    });
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    let total: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    total / a.len() as f64
}
