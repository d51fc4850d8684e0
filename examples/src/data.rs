//! Deterministic synthetic classification data and a shuffled mini-batch iterator.
//!
//! The task: each class is a mixture of several Gaussian clusters whose centres are scattered at random over a
//! small *latent* space; a sample picks a cluster, draws a latent point around its centre, and the model sees
//! that point mapped into `dim` dimensions by a fixed random matrix, plus a little noise. A class is thus a
//! union of blobs far apart, which no single hyperplane per class can carve out: a linear model stays near
//! 25 % accuracy on the default task while an MLP passes 90 % within a few hundred steps and keeps improving
//! towards the best possible accuracy, about 96 % (neighbouring clusters of different classes overlap a little).
//!
//! Everything is drawn from the crate's own generator ([`SplitMix64`]) with basic IEEE arithmetic only (no
//! platform `ln`/`cos`), so one seed gives the same bytes on every machine, and each peer of a swarm can
//! generate the data set locally instead of downloading it.

/// Dimensions of the latent space (capped at the input dimension).
const LATENT_DIM: usize = 8;
/// Gaussian clusters per class.
const CLUSTERS_PER_CLASS: usize = 12;
/// Standard deviation of a cluster around its centre; centres are drawn from a standard normal.
const CLUSTER_SPREAD: f64 = 0.4;
/// Standard deviation of the noise added to every input coordinate (the signal's is about 1).
const INPUT_NOISE: f64 = 0.05;

/// A labelled data set held in memory: `len()` rows of `dim` inputs each, row-major, and one label per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Row-major `len() × dim` inputs.
    pub inputs: Vec<f32>,
    /// One label per row, each below `classes`.
    pub labels: Vec<u32>,
    /// Values per row.
    pub dim: usize,
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// Number of samples (rows).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set holds no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The inputs (row-major, `indices.len() × dim`) and labels of the rows named by `indices`, in that order.
    ///
    /// # Panics
    /// If an index is not below `len()`.
    pub fn batch(&self, indices: &[usize]) -> (Vec<f32>, Vec<u32>) {
        let mut inputs = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        self.batch_into(indices, &mut inputs, &mut labels);
        (inputs, labels)
    }

    /// [`Dataset::batch`] into caller-owned buffers (cleared first), so a training loop allocates nothing.
    ///
    /// # Panics
    /// If an index is not below `len()`.
    pub fn batch_into(&self, indices: &[usize], inputs: &mut Vec<f32>, labels: &mut Vec<u32>) {
        inputs.clear();
        labels.clear();
        for &index in indices {
            inputs.extend_from_slice(&self.inputs[index * self.dim..(index + 1) * self.dim]);
            labels.push(self.labels[index]);
        }
    }
}

/// What [`generate`] draws. Fields missing from a serialized spec take their [`Default`] values.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DataSpec {
    /// Seed of everything: the task (centres, input map) and both sets.
    pub seed: u64,
    /// Inputs per sample.
    pub dim: usize,
    /// Number of classes.
    pub classes: usize,
    /// Samples in the training set.
    pub train: usize,
    /// Samples in the held-out validation set.
    pub validation: usize,
}

impl Default for DataSpec {
    /// Seed 0, 64 inputs, 10 classes, 65,536 training and 8,192 validation samples.
    fn default() -> Self {
        DataSpec {
            seed: 0,
            dim: 64,
            classes: 10,
            train: 65_536,
            validation: 8_192,
        }
    }
}

/// Draws the training and the validation set of `spec` (in that order).
///
/// The two sets come from the same task but from separate random streams, so no validation sample is a
/// training sample. A `dim` or `classes` of 0 is treated as 1.
pub fn generate(spec: &DataSpec) -> (Dataset, Dataset) {
    let task = Task::new(spec);
    // Separate streams: the validation set does not move when the training set's size changes.
    let train = task.draw(spec.train, &mut SplitMix64::new(derive_seed(spec.seed, 1)));
    let validation = task.draw(spec.validation, &mut SplitMix64::new(derive_seed(spec.seed, 2)));
    (train, validation)
}

/// The fixed part of a data set: where the clusters are and how latent points become inputs.
struct Task {
    dim: usize,
    classes: usize,
    latent: usize,
    /// `clusters × latent`, row-major; cluster `j` belongs to class `j % classes`.
    centres: Vec<f64>,
    /// `dim × latent`, row-major.
    input_map: Vec<f64>,
}

impl Task {
    fn new(spec: &DataSpec) -> Self {
        let dim = spec.dim.max(1);
        let classes = spec.classes.max(1);
        let latent = LATENT_DIM.min(dim);
        let mut rng = SplitMix64::new(derive_seed(spec.seed, 0));
        let centres = (0..classes * CLUSTERS_PER_CLASS * latent)
            .map(|_| rng.normal())
            .collect();
        // Entries of variance 1/latent keep each input coordinate's variance near |z|²/latent ≈ 1.
        let scale = 1.0 / (latent as f64).sqrt();
        let input_map = (0..dim * latent).map(|_| rng.normal() * scale).collect();
        Task {
            dim,
            classes,
            latent,
            centres,
            input_map,
        }
    }

    fn draw(&self, n: usize, rng: &mut SplitMix64) -> Dataset {
        let mut inputs = Vec::with_capacity(n * self.dim);
        let mut labels = Vec::with_capacity(n);
        let clusters = (self.centres.len() / self.latent) as u64;
        let mut z = vec![0.0; self.latent];
        for _ in 0..n {
            let cluster = rng.below(clusters) as usize;
            let centre = &self.centres[cluster * self.latent..(cluster + 1) * self.latent];
            z.iter_mut()
                .zip(centre)
                .for_each(|(v, c)| *v = c + CLUSTER_SPREAD * rng.normal());
            labels.push((cluster % self.classes) as u32);
            for row in self.input_map.chunks_exact(self.latent) {
                let signal: f64 = row.iter().zip(&z).map(|(m, v)| m * v).sum();
                inputs.push((signal + INPUT_NOISE * rng.normal()) as f32);
            }
        }
        Dataset {
            inputs,
            labels,
            dim: self.dim,
            classes: self.classes,
        }
    }
}

/// An endless sequence of shuffled mini-batches of indices into a data set of `len` samples.
///
/// Each pass over the data is a fresh permutation (Fisher–Yates from the crate's own generator), cut into
/// `batch_size` indices per batch; the last `len % batch_size` indices of a pass are skipped so every batch
/// is full. The order depends only on `(len, batch_size, seed)`: peers of a swarm give different seeds so
/// they visit the data in different orders.
///
/// ```
/// use colony_examples::data::Batches;
/// let mut batches = Batches::new(10, 4, 7);
/// let first = batches.next().unwrap();
/// assert_eq!(first.len(), 4);
/// assert!(first.iter().all(|&i| i < 10));
/// ```
#[derive(Clone, Debug)]
pub struct Batches {
    order: Vec<usize>,
    batch_size: usize,
    position: usize,
    pass: u64,
    rng: SplitMix64,
}

impl Batches {
    /// Batches of `batch_size` indices below `len`, shuffled from `seed`. `batch_size` is clamped to
    /// `1..=len`; with `len == 0` the iterator is empty.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Self {
        let mut batches = Batches {
            order: (0..len).collect(),
            batch_size: batch_size.clamp(1, len.max(1)),
            position: 0,
            pass: 0,
            rng: SplitMix64::new(derive_seed(seed, 3)),
        };
        batches.shuffle();
        batches
    }

    /// How many full passes over the data have been started before the current one (0 during the first).
    pub fn pass(&self) -> u64 {
        self.pass
    }

    /// Indices per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn shuffle(&mut self) {
        for i in (1..self.order.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            self.order.swap(i, j);
        }
    }
}

impl Iterator for Batches {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.order.is_empty() {
            return None;
        }
        if self.position + self.batch_size > self.order.len() {
            self.shuffle();
            self.position = 0;
            self.pass += 1;
        }
        let batch = self.order[self.position..self.position + self.batch_size].to_vec();
        self.position += self.batch_size;
        Some(batch)
    }
}

/// Mixes a seed with a stream number, so the streams drawn from one user seed are unrelated.
pub(crate) fn derive_seed(seed: u64, stream: u64) -> u64 {
    SplitMix64::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F)).next_u64()
}

/// Steele, Lea and Flood's SplitMix64: tiny, fast, statistically sound for simulation, and fully specified,
/// so every platform and every version of this crate draws the same numbers from the same seed (unlike
/// `rand`'s unspecified streams).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, 1)` with 24 random bits (every value exactly representable).
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// A standard normal sample (Marsaglia's polar form of Box–Muller; the second value of each pair is
    /// dropped to keep the generator's state the only state).
    pub fn normal(&mut self) -> f64 {
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                return u * (-2.0 * portable_ln(s) / s).sqrt();
            }
        }
    }
}

/// Natural logarithm of a positive, finite, normal `x` from basic IEEE operations only, so the result is the same
/// bit for bit on every platform (the system `ln` may differ in the last place between libm implementations).
///
/// `x = m · 2^e` with `m ∈ [1/√2, √2)`, then `ln m = 2 atanh(t)`, `t = (m − 1)/(m + 1)`, `|t| < 0.172`, whose odd
/// series reaches double precision in 12 terms.
pub(crate) fn portable_ln(x: f64) -> f64 {
    debug_assert!(
        x.is_normal() && x > 0.0,
        "portable_ln takes positive normal numbers, got {x}"
    );
    const LN_2: f64 = std::f64::consts::LN_2;
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut mantissa = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa *= 0.5;
        exponent += 1;
    }
    let t = (mantissa - 1.0) / (mantissa + 1.0);
    let t2 = t * t;
    let mut term = t;
    let mut series = 0.0;
    for k in 0..12 {
        series += term / (2 * k + 1) as f64;
        term *= t2;
    }
    2.0 * series + exponent as f64 * LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_ln_matches_the_system_ln() {
        let mut rng = SplitMix64::new(5);
        for _ in 0..10_000 {
            let x = rng.uniform().max(1e-300) * 10f64.powi(rng.below(40) as i32 - 20);
            let (ours, system) = (portable_ln(x), x.ln());
            assert!(
                (ours - system).abs() <= 4.0 * f64::EPSILON * system.abs().max(1.0),
                "ln({x}): {ours} vs {system}"
            );
        }
        assert_eq!(portable_ln(1.0), 0.0);
    }

    #[test]
    fn splitmix64_matches_its_reference_stream() {
        // The first outputs for seed 0 of the reference C implementation (Vigna's splitmix64.c).
        let mut rng = SplitMix64::new(0);
        let expected = [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F];
        assert_eq!([rng.next_u64(), rng.next_u64(), rng.next_u64()], expected);
    }

    #[test]
    fn normal_samples_have_unit_moments() {
        let mut rng = SplitMix64::new(9);
        let n = 200_000;
        let samples: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let variance = samples.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.01, "variance {variance}");
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(1);
        let mut seen = [0usize; 7];
        for _ in 0..7_000 {
            seen[rng.below(7) as usize] += 1;
        }
        assert!(seen.iter().all(|&count| (800..1200).contains(&count)), "{seen:?}");
    }

    #[test]
    fn batches_cover_each_pass_once_and_reshuffle() {
        let mut batches = Batches::new(12, 4, 3);
        let first_pass: Vec<usize> = batches.by_ref().take(3).flatten().collect();
        let second_pass: Vec<usize> = batches.by_ref().take(3).flatten().collect();
        for pass in [&first_pass, &second_pass] {
            let mut sorted = pass.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..12).collect::<Vec<_>>());
        }
        assert_ne!(first_pass, second_pass, "each pass is a new permutation");
        assert_eq!(batches.pass(), 1);
    }

    #[test]
    fn batches_skip_the_partial_tail_and_clamp_the_size() {
        let mut batches = Batches::new(10, 4, 0);
        for _ in 0..10 {
            assert_eq!(batches.next().unwrap().len(), 4);
        }
        assert_eq!(Batches::new(3, 100, 0).next().unwrap().len(), 3);
        assert_eq!(Batches::new(3, 0, 0).next().unwrap().len(), 1);
        assert!(Batches::new(0, 4, 0).next().is_none());
    }

    #[test]
    fn batches_depend_on_the_seed() {
        let a: Vec<Vec<usize>> = Batches::new(1000, 10, 1).take(5).collect();
        let b: Vec<Vec<usize>> = Batches::new(1000, 10, 1).take(5).collect();
        let c: Vec<Vec<usize>> = Batches::new(1000, 10, 2).take(5).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn batch_gathers_rows_in_order() {
        let data = Dataset {
            inputs: (0..12).map(|v| v as f32).collect(),
            labels: vec![0, 1, 2, 0],
            dim: 3,
            classes: 3,
        };
        let (inputs, labels) = data.batch(&[2, 0]);
        assert_eq!(inputs, vec![6.0, 7.0, 8.0, 0.0, 1.0, 2.0]);
        assert_eq!(labels, vec![2, 0]);
    }
}
