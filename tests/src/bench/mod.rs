//! The benchmark suites behind `cargo run --release -p colony-tests --bin bench -- <suite> [--json]`.
//!
//! Every result is reported against a bound measured in the same run on the same machine (raw loopback TCP,
//! memory bandwidth, a single-peer baseline), never as a bare timing: `ratio = value / bound`. Where nothing to
//! compare with can run on one machine (a 1,000-peer swarm), the bound is the goal the issue set, named
//! `issue goal`.

pub mod allreduce;
pub mod codecs;
pub mod efficiency;
pub mod matchmaking;
pub mod membership;
pub mod optimizer;
pub mod transport;

use serde::Serialize;

/// One benchmark result.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// The suite, e.g. `transport`.
    pub suite: &'static str,
    /// What was measured, e.g. `tcp`.
    pub case: String,
    /// The measured figure.
    pub value: f64,
    /// Its unit, e.g. `MB/s`.
    pub unit: &'static str,
    /// The bound measured in the same run, in the same unit.
    pub bound: f64,
    /// `value / bound`.
    pub ratio: f64,
    /// What the bound is.
    pub bound_case: String,
    /// Free-form detail (sizes, repetitions, the best and worst runs).
    pub note: String,
}

impl Measurement {
    /// A measurement against `bound`.
    pub fn new(suite: &'static str, case: impl Into<String>, value: f64, unit: &'static str, bound: f64) -> Self {
        Self {
            suite,
            case: case.into(),
            value,
            unit,
            bound,
            ratio: if bound > 0.0 { value / bound } else { 0.0 },
            bound_case: String::new(),
            note: String::new(),
        }
    }

    /// Names the bound.
    pub fn bound_case(mut self, bound_case: impl Into<String>) -> Self {
        self.bound_case = bound_case.into();
        self
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// Prints results as a table, or as one JSON object per line.
pub fn print(results: &[Measurement], json: bool) {
    if json {
        for result in results {
            println!("{}", serde_json::to_string(result).expect("a measurement serializes"));
        }
        return;
    }
    println!(
        "{:<10} {:<14} {:>12} {:<6} {:>12} {:>7}  {:<14} note",
        "suite", "case", "value", "unit", "bound", "ratio", "bound is"
    );
    for r in results {
        println!(
            "{:<10} {:<14} {:>12.1} {:<6} {:>12.1} {:>7.3}  {:<14} {}",
            r.suite, r.case, r.value, r.unit, r.bound, r.ratio, r.bound_case, r.note
        );
    }
}

/// A one-line description of this machine, for the record.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs, {model}")
}

/// `len` standard normal values from `seed`: splitmix64 for uniform bits, Box–Muller for the normals.
pub fn randn(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // In (0, 1], so that the logarithm is finite.
        (((z ^ (z >> 31)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut values = Vec::with_capacity(len);
    while values.len() < len {
        let radius = (-2.0 * uniform().ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * uniform();
        values.push((radius * angle.cos()) as f32);
        if values.len() < len {
            values.push((radius * angle.sin()) as f32);
        }
    }
    values
}
