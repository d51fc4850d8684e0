//! The host side of training (Offload and Optimizer in DESIGN.md §6): the master copy of the parameters,
//! the optimizer's state and the extra tensors in aligned host buffers, the optimizer step with the
//! learning rate of the epoch, and the layouts of what is averaged and what is served to peers.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use colony_averaging::state_transfer::{StateProvider, StateSnapshot};
use colony_averaging::tensor::{FlatTensors, TensorInfo, TensorLayout, TensorRole};
use colony_offload::{CpuOptimizer, HostBuffer, LrSchedule, OptimizerKind, kernels};

use super::OptimizerError;

/// The name of the one-value tensor that carries a peer's sample count in gradient rounds.
pub const SAMPLES_TENSOR: &str = "colony.samples";

/// The statistics an optimizer keeps, by name.
pub fn statistic_names(kind: &OptimizerKind) -> &'static [&'static str] {
    match kind {
        OptimizerKind::Sgd { momentum, .. } if *momentum > 0.0 => &["momentum_buffer"],
        OptimizerKind::Sgd { .. } => &[],
        OptimizerKind::Adam { .. } | OptimizerKind::AdamW { .. } | OptimizerKind::Lamb { .. } => {
            &["exp_avg", "exp_avg_sq"]
        }
    }
}

/// The layouts of one training run, derived identically on every peer from the same tensors and options.
#[derive(Debug)]
pub struct Layouts {
    /// The model's parameters.
    pub params: Arc<TensorLayout>,
    /// Gradient rounds: the gradients, then [`SAMPLES_TENSOR`].
    pub grads: Arc<TensorLayout>,
    /// State rounds: parameters, the averaged statistics (`{stat}/{tensor}`), extras (`extra/{name}`).
    pub averaged_state: Arc<TensorLayout>,
    /// State downloads: parameters, every statistic, extras.
    pub full_state: Arc<TensorLayout>,
    /// The statistics of state rounds, in layout order.
    pub averaged_statistics: Vec<&'static str>,
    /// Every statistic of the optimizer, in layout order.
    pub statistics: Vec<&'static str>,
}

impl Layouts {
    /// Layouts for `params` (the model's tensors, flat-buffer order), the statistics `averaged` of
    /// `kind`, and `extras`.
    pub fn new(
        params: &[TensorInfo],
        kind: &OptimizerKind,
        averaged: &[String],
        extras: &[TensorInfo],
    ) -> Result<Self, OptimizerError> {
        let layout = |tensors: Vec<TensorInfo>| {
            TensorLayout::new(tensors)
                .map(Arc::new)
                .map_err(|e| OptimizerError::InvalidOptions(format!("tensors: {e}")))
        };
        let as_params: Vec<TensorInfo> = params
            .iter()
            .map(|t| t.clone().with_role(TensorRole::Parameter))
            .collect();
        let mut grads: Vec<TensorInfo> = params
            .iter()
            .map(|t| t.clone().with_role(TensorRole::Gradient))
            .collect();
        grads.push(TensorInfo::new(SAMPLES_TENSOR, [1]));
        let statistics: Vec<&'static str> = statistic_names(kind).to_vec();
        let averaged_statistics: Vec<&'static str> = statistics
            .iter()
            .copied()
            .filter(|name| averaged.iter().any(|a| a == name))
            .collect();
        let with_statistics = |names: &[&'static str]| {
            let mut tensors = as_params.clone();
            for name in names {
                tensors.extend(params.iter().map(|t| {
                    TensorInfo::new(format!("{name}/{}", t.name), t.shape.clone())
                        .with_role(TensorRole::OptimizerStatistic)
                }));
            }
            tensors.extend(extras.iter().map(|t| {
                TensorInfo::new(format!("extra/{}", t.name), t.shape.clone()).with_role(TensorRole::Unspecified)
            }));
            tensors
        };
        Ok(Self {
            params: layout(as_params.clone())?,
            grads: layout(grads)?,
            averaged_state: layout(with_statistics(&averaged_statistics))?,
            full_state: layout(with_statistics(&statistics))?,
            averaged_statistics,
            statistics,
        })
    }
}

/// The master copy: parameters, optimizer, extras and the epoch they belong to.
#[derive(Debug)]
pub struct HostState {
    /// The parameters.
    pub params: HostBuffer,
    /// The optimizer and its statistics.
    pub optimizer: CpuOptimizer,
    /// Extra tensors, flat.
    pub extras: HostBuffer,
    /// The epoch whose parameters these are.
    pub epoch: u64,
    /// Bumped by every change of the values, so that cached snapshots and in-flight rounds notice.
    pub version: u64,
}

impl HostState {
    /// One optimizer step on `grads` with the learning rate of the current epoch; the epoch becomes
    /// `next_epoch`.
    pub fn step(&mut self, grads: &[f32], schedule: &LrSchedule, next_epoch: u64) -> Result<(), OptimizerError> {
        let factor = schedule.factor(self.epoch);
        self.optimizer.step(&mut self.params, grads, factor)?;
        self.epoch = next_epoch;
        self.version += 1;
        Ok(())
    }

    /// Writes the values `layout` holds (parameters, then `statistics`, then extras) into `out`.
    pub fn write_into(&self, out: &mut [f32], statistics: &[&'static str]) {
        let mut at = 0;
        let mut put = |values: &[f32]| {
            kernels::copy(&mut out[at..at + values.len()], values);
            at += values.len();
        };
        put(&self.params);
        for name in statistics {
            put(self.optimizer.state(name).unwrap_or(&[]));
        }
        put(&self.extras);
    }

    /// Reads values laid out as by [`HostState::write_into`]. `sent`, when given, holds what this peer
    /// contributed to the round: values changed since (local steps) keep their change on top of the average
    /// (the delta rule), values unchanged take the average exactly.
    pub fn read_from(&mut self, values: &[f32], statistics: &[&'static str], sent: Option<&[f32]>) {
        let mut at = 0;
        let mut take = |dst: &mut [f32]| {
            let src = &values[at..at + dst.len()];
            match sent {
                Some(sent) => {
                    let sent = &sent[at..at + dst.len()];
                    for ((d, s), v) in dst.iter_mut().zip(sent).zip(src) {
                        *d += v - s;
                    }
                }
                None => kernels::copy(dst, src),
            }
            at += dst.len();
        };
        take(&mut self.params);
        for name in statistics {
            if let Some(state) = self.optimizer.state_mut(name) {
                take(state);
            }
        }
        take(&mut self.extras);
        self.version += 1;
    }
}

/// The host state shared by the trainer's calls, the background epochs and the state donor.
#[derive(Debug)]
pub struct SharedState {
    state: Mutex<HostState>,
    /// [`HostState::version`] as of the last unlock: read without taking the lock.
    version: AtomicU64,
    layouts: Arc<Layouts>,
    /// Whether peers may download the state now (not while this peer is behind or loading).
    sharing: AtomicBool,
    cache: Mutex<Option<(u64, Arc<StateSnapshot>)>>,
}

/// The locked host state; unlocking publishes its version.
pub struct StateGuard<'a> {
    guard: MutexGuard<'a, HostState>,
    published: &'a AtomicU64,
}

impl Deref for StateGuard<'_> {
    type Target = HostState;

    fn deref(&self) -> &HostState {
        &self.guard
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut HostState {
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.published.store(self.guard.version, Ordering::Release);
    }
}

impl SharedState {
    /// Shares `state`.
    pub fn new(state: HostState, layouts: Arc<Layouts>) -> Self {
        Self {
            version: AtomicU64::new(state.version),
            state: Mutex::new(state),
            layouts,
            sharing: AtomicBool::new(true),
            cache: Mutex::new(None),
        }
    }

    /// The state, locked. Held for an optimizer step or a copy, never across an await.
    pub fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            guard: self.state.lock().unwrap_or_else(|p| p.into_inner()),
            published: &self.version,
        }
    }

    /// The version of the values as of the last unlock, without locking.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The layouts.
    pub fn layouts(&self) -> &Arc<Layouts> {
        &self.layouts
    }

    /// Allows or refuses downloads of this peer's state.
    pub fn set_sharing(&self, sharing: bool) {
        self.sharing.store(sharing, Ordering::SeqCst);
    }

    /// The values of a state round, copied out.
    pub fn averaged_state(&self) -> (FlatTensors, u64) {
        let layout = self.layouts.averaged_state.clone();
        let mut values = vec![0.0; layout.total_values()];
        let state = self.lock();
        state.write_into(&mut values, &self.layouts.averaged_statistics);
        let version = state.version;
        drop(state);
        let tensors = FlatTensors::new(layout, values).expect("the buffer was sized from the layout");
        (tensors, version)
    }
}

impl StateProvider for SharedState {
    fn snapshot(&self) -> Option<Arc<StateSnapshot>> {
        if !self.sharing.load(Ordering::SeqCst) {
            return None;
        }
        let state = self.lock();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((version, snapshot)) = cache.as_ref()
            && *version == state.version
        {
            return Some(snapshot.clone());
        }
        let layout = self.layouts.full_state.clone();
        let mut values = vec![0.0; layout.total_values()];
        state.write_into(&mut values, &self.layouts.statistics);
        let snapshot = Arc::new(StateSnapshot {
            epoch: state.epoch,
            metadata: Bytes::from(state.optimizer.metadata()),
            tensors: FlatTensors::new(layout, values).expect("the buffer was sized from the layout"),
        });
        *cache = Some((state.version, snapshot.clone()));
        Some(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_offload::OptimizerConfig;

    fn tensors() -> Vec<TensorInfo> {
        vec![TensorInfo::new("w", [2, 2]), TensorInfo::new("b", [2])]
    }

    #[test]
    fn layouts_name_statistics_and_extras_and_differ_by_role_only_where_they_should() {
        let kind = OptimizerConfig::adam(0.1, 6).kind;
        let extras = vec![TensorInfo::new("running_mean", [3])];
        let layouts = Layouts::new(&tensors(), &kind, &["exp_avg_sq".into()], &extras).unwrap();
        assert_eq!(layouts.params.total_values(), 6);
        assert_eq!(layouts.grads.total_values(), 7);
        assert_eq!(layouts.averaged_state.total_values(), 6 + 6 + 3);
        assert_eq!(layouts.full_state.total_values(), 6 + 12 + 3);
        let names: Vec<&str> = layouts
            .averaged_state
            .tensors()
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(names, ["w", "b", "exp_avg_sq/w", "exp_avg_sq/b", "extra/running_mean"]);
        assert_eq!(layouts.statistics, ["exp_avg", "exp_avg_sq"]);
    }

    #[test]
    fn state_round_values_round_trip_and_the_delta_rule_keeps_local_steps() {
        let kind = OptimizerConfig::sgd(0.1, 0.9, 6).kind;
        let layouts = Arc::new(Layouts::new(&tensors(), &kind, &["momentum_buffer".into()], &[]).unwrap());
        let mut optimizer = CpuOptimizer::new(OptimizerConfig::sgd(0.1, 0.9, 6), 6).unwrap();
        optimizer.state_mut("momentum_buffer").unwrap().fill(2.0);
        let shared = SharedState::new(
            HostState {
                params: HostBuffer::from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                optimizer,
                extras: HostBuffer::zeroed(0),
                epoch: 3,
                version: 0,
            },
            layouts,
        );
        let (sent, _) = shared.averaged_state();
        assert_eq!(
            sent.as_slice(),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
        );
        let averaged: Vec<f32> = sent.as_slice().iter().map(|v| v + 1.0).collect();
        shared.lock().read_from(&averaged, &["momentum_buffer"], None);
        assert_eq!(shared.lock().params.as_slice(), [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        // A local step moved a parameter meanwhile: it keeps its move on top of the average.
        shared.lock().params[0] += 10.0;
        let (sent, _) = shared.averaged_state();
        let mut later = sent.as_slice().to_vec();
        later[0] -= 10.0;
        let averaged: Vec<f32> = later.iter().map(|v| v - 1.0).collect();
        shared.lock().read_from(&averaged, &["momentum_buffer"], Some(&later));
        assert_eq!(shared.lock().params[0], 2.0 + 10.0 - 1.0);
        let snapshot = shared.snapshot().unwrap();
        assert_eq!(snapshot.epoch, 3);
        assert!(
            Arc::ptr_eq(&snapshot, &shared.snapshot().unwrap()),
            "cached until the state changes"
        );
        shared.set_sharing(false);
        assert!(shared.snapshot().is_none());
    }
}
