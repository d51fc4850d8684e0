//! [`Codec::ScaledFloat16`]: per row, `f16((x − mean) / std)` with the row's `f32` mean and standard
//! deviation, so that a row with a large offset or a tiny or huge scale keeps `f16`'s relative precision.
//!
//! Layout: `u64 row_len ‖ rows × f32 mean ‖ rows × f32 std ‖ n × f16`. The deviation is the population one,
//! `‖x − mean‖ / √row_len`, clamped to at least `f32::EPSILON` (so constant rows divide by something) and at
//! most `f32::MAX`.

use super::float16::{self, BATCH, first_found};
use super::support::{self, CHUNK, Exec, ShiftedSums};
use super::{Codec, CodecError};

const CODEC: Codec = Codec::ScaledFloat16;
const HEADER: usize = 8;

/// The row length actually used: 0 or at least `len` means one row of `len`.
fn effective_row_len(row_len: usize, len: usize) -> usize {
    if row_len == 0 || row_len >= len { len } else { row_len }
}

fn rows(len: usize, row_len: usize) -> usize {
    if len == 0 { 0 } else { len.div_ceil(row_len) }
}

pub(crate) fn encoded_len(len: usize, row_len: usize) -> usize {
    let rows = rows(len, effective_row_len(row_len, len));
    rows.saturating_mul(8)
        .saturating_add(len.saturating_mul(2))
        .saturating_add(HEADER)
}

/// The mean and clamped standard deviation of one row.
fn row_stats(row: &[f32], exec: Exec) -> (f32, f32) {
    let pivot = row.first().map_or(0.0, |&x| f64::from(x));
    let (mean, deviance) = ShiftedSums::of(row, pivot, exec).mean_and_deviance(pivot, row.len());
    let std = (deviance / row.len().max(1) as f64).sqrt() as f32;
    (mean as f32, std.clamp(f32::EPSILON, f32::MAX))
}

pub(crate) fn encode(values: &[f32], row_len: usize, out: &mut Vec<u8>, exec: Exec) {
    let len = values.len();
    let row_len = effective_row_len(row_len, len);
    if len == 0 {
        out.extend_from_slice(&0u64.to_le_bytes());
        return;
    }
    let rows = rows(len, row_len);
    let stats: Vec<(f32, f32)> = if row_len >= CHUNK {
        // Few long rows: each row's sums are spread over the pool.
        values.chunks(row_len).map(|row| row_stats(row, exec)).collect()
    } else {
        // Many short rows: whole rows are spread over the pool, each summed on one thread. Either way a row's
        // sums are the same chunk sums added in the same order.
        let rows_per_task = (CHUNK / row_len).max(1);
        exec.map_chunks(values, row_len * rows_per_task, |task| {
            task.chunks(row_len)
                .map(|row| row_stats(row, Exec::Sequential))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    };
    let means: Vec<f32> = stats.iter().map(|s| s.0).collect();
    let inverse_stds: Vec<f32> = stats.iter().map(|s| 1.0 / s.1).collect();

    let tail = support::grow(out, encoded_len(len, row_len), exec);
    let (header, rest) = tail.split_at_mut(HEADER);
    header.copy_from_slice(&(row_len as u64).to_le_bytes());
    let (mean_fields, rest) = rest.split_at_mut(4 * rows);
    let (std_fields, data) = rest.split_at_mut(4 * rows);
    support::write_f32s(&means, mean_fields);
    for (field, s) in std_fields.chunks_exact_mut(4).zip(&stats) {
        field.copy_from_slice(&s.1.to_le_bytes());
    }
    exec.zip_chunks(values, CHUNK, data, CHUNK * 2, |c, values, data| {
        let mut scratch = [0.0f32; BATCH];
        for (b, (values, data)) in values.chunks(BATCH).zip(data.chunks_mut(BATCH * 2)).enumerate() {
            let first = c * CHUNK + b * BATCH;
            let scratch = &mut scratch[..values.len()];
            for_each_row_segment(first, values.len(), row_len, |row, range| {
                let (mean, inverse_std) = (means[row], inverse_stds[row]);
                let (from, to) = (range.start - first, range.end - first);
                for (z, &x) in scratch[from..to].iter_mut().zip(&values[from..to]) {
                    *z = (x - mean) * inverse_std;
                }
            });
            float16::write_halves(scratch, data);
        }
    });
}

/// Calls `f(row, range)` for each part of the value range `first..first + count` that lies in one row.
fn for_each_row_segment(first: usize, count: usize, row_len: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
    let end = first + count;
    let mut position = first;
    while position < end {
        let row = position / row_len;
        let segment_end = ((row + 1) * row_len).min(end);
        f(row, position..segment_end);
        position = segment_end;
    }
}

/// Checks the header and the size against `len` values; returns the row length and the number of rows.
pub(crate) fn parse_header(bytes: &[u8], len: usize) -> Result<(usize, usize), CodecError> {
    if bytes.len() < HEADER {
        return support::check_size(CODEC, bytes, Some(HEADER)).map(|_| (0, 0));
    }
    let field = support::read_u64(bytes, 0);
    let row_len = usize::try_from(field).unwrap_or(usize::MAX);
    let valid = if len == 0 {
        row_len == 0
    } else {
        (1..=len).contains(&row_len)
    };
    if !valid {
        let allowed = if len == 0 { "0".to_owned() } else { format!("1..={len}") };
        return Err(CodecError::Malformed {
            codec: CODEC,
            reason: format!("row_len is {field}, must be in {allowed} for {len} values"),
        });
    }
    let rows = rows(len, row_len);
    let expected = rows
        .checked_mul(8)
        .and_then(|stats| len.checked_mul(2)?.checked_add(stats)?.checked_add(HEADER));
    support::check_size(CODEC, bytes, expected)?;
    Ok((row_len, rows))
}

pub(crate) fn decode(bytes: &[u8], out: &mut [f32], exec: Exec) -> Result<(), CodecError> {
    let (row_len, rows) = parse_header(bytes, out.len())?;
    let means = support::read_finite_f32s(CODEC, bytes, HEADER, rows)?;
    let stds_offset = HEADER + 4 * rows;
    let stds = support::read_finite_f32s(CODEC, bytes, stds_offset, rows)?;
    if let Some(row) = stds.iter().position(|&s| s < 0.0) {
        return Err(CodecError::Malformed {
            codec: CODEC,
            reason: format!("std of row {row} is {}, must not be negative", stds[row]),
        });
    }
    let data_offset = stds_offset + 4 * rows;
    let data = &bytes[data_offset..];
    let found = exec.zip_chunks_map(data, CHUNK * 2, out, CHUNK, |c, data, out| {
        if let Some(i) = float16::decode_halves(data, out) {
            return Some(i);
        }
        for_each_row_segment(c * CHUNK, out.len(), row_len, |row, range| {
            let (mean, std) = (means[row], stds[row]);
            for x in &mut out[range.start - c * CHUNK..range.end - c * CHUNK] {
                *x = *x * std + mean;
            }
        });
        // Finite fields can still overflow: a huge std times a large half.
        support::first_non_finite(out)
    });
    match first_found(found) {
        Some(i) => Err(CodecError::NonFinite {
            codec: CODEC,
            index: data_offset + 2 * i,
        }),
        None => Ok(()),
    }
}
