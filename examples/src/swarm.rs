//! A training peer of the example task: the flags every Colony option maps to, and the training loop that
//! a peer (in the demo's threads or the trainer's process) runs with a [`CollaborativeOptimizer`].
//!
//! [`CollaborativeOptimizer`]: colony::optimizer::CollaborativeOptimizer

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use colony::optimizer::{CollaborativeOptions, RoundKind, RoundResult};
use colony::peer::TrainingPeer;
use colony_averaging::codec::{Codec, CodecPolicy};
use colony_averaging::tensor::TensorInfo;
use colony_offload::{LrSchedule, OptimizerConfig, OptimizerKind, ParamGroup};

use crate::data::{Batches, DataSpec, Dataset};
use crate::model::{Evaluation, Mlp, MlpSpec};

/// The optimizer rule of the example trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rule {
    /// SGD with momentum 0.9.
    Sgd,
    /// Adam.
    Adam,
    /// AdamW with weight decay 0.01.
    Adamw,
    /// LAMB with weight decay 0.01.
    Lamb,
}

/// A codec by name, for the compression flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CodecFlag {
    /// Exact `f32`.
    None,
    /// IEEE half precision.
    Float16,
    /// Per-row scaled half precision.
    ScaledFloat16,
    /// Uniform 8-bit.
    Uniform8bit,
    /// Quantile 8-bit.
    Quantile8bit,
    /// Blockwise 8-bit.
    Blockwise8bit,
}

impl CodecFlag {
    fn codec(self) -> Codec {
        match self {
            Self::None => Codec::None,
            Self::Float16 => Codec::Float16,
            Self::ScaledFloat16 => Codec::ScaledFloat16,
            Self::Uniform8bit => Codec::Uniform8Bit,
            Self::Quantile8bit => Codec::Quantile8Bit,
            Self::Blockwise8bit => Codec::Blockwise8Bit,
        }
    }
}

/// The model, the data and every option of the collaborative optimizer, as command-line flags (the names
/// are the options' names with dashes).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainFlags {
    /// Samples the swarm accumulates per epoch.
    #[arg(long, default_value_t = 1024)]
    pub target_batch_size: u64,
    /// Samples per local step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: u32,
    /// Optimizer rule.
    #[arg(long, value_enum, default_value = "adam")]
    pub optimizer: Rule,
    /// Learning rate.
    #[arg(long, default_value_t = 0.002)]
    pub lr: f32,
    /// Learning-rate warm-up epochs (then constant).
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: u64,
    /// Hidden layer widths, comma-separated (avoid powers of two: they run slower in candle's matmul).
    #[arg(long, value_delimiter = ',', default_value = "300,300")]
    pub hidden: Vec<usize>,
    /// Seed of the model's initial weights (the same on every peer).
    #[arg(long, default_value_t = 1)]
    pub model_seed: u64,
    /// Seed of the data set (the same on every peer).
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Training samples of the data set.
    #[arg(long, default_value_t = 65536)]
    pub train_samples: usize,
    /// Stop after this many epochs.
    #[arg(long, default_value_t = 200)]
    pub max_epochs: u64,
    /// Stop once the validation accuracy reaches this (0 disables).
    #[arg(long, default_value_t = 0.9)]
    pub target_accuracy: f32,
    /// Evaluate on the validation set every this many epochs.
    #[arg(long, default_value_t = 5)]
    pub eval_every: u64,
    /// Validation samples used by the periodic evaluations (the final one uses all).
    #[arg(long, default_value_t = 2048)]
    pub eval_samples: usize,
    /// Seconds before the epoch's estimated end that matchmaking starts (an upper bound of its wait).
    #[arg(long, default_value_t = 15.0)]
    pub matchmaking_time: f64,
    /// Seconds a round may take before the peer goes on with local values.
    #[arg(long, default_value_t = 60.0)]
    pub averaging_timeout: f64,
    /// Seconds one all-reduce may take (default: averaging_timeout).
    #[arg(long)]
    pub allreduce_timeout: Option<f64>,
    /// Seconds to wait for a peer's next part or chunk (default: matchmaking_time).
    #[arg(long)]
    pub next_chunk_timeout: Option<f64>,
    /// Seconds one state download may take.
    #[arg(long, default_value_t = 600.0)]
    pub load_state_timeout: f64,
    /// Accumulate in the trainer's gradient buffer.
    #[arg(long)]
    pub reuse_grad_buffers: bool,
    /// Step the optimizer on Colony's host copy (default: unless use_local_updates).
    #[arg(long)]
    pub offload_optimizer: Option<bool>,
    /// Run the optimizer step in the background (default: delay_grad_averaging).
    #[arg(long)]
    pub delay_optimizer_step: Option<bool>,
    /// Run the gradient round in the background.
    #[arg(long)]
    pub delay_grad_averaging: bool,
    /// Run state rounds in the background.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub delay_state_averaging: bool,
    /// Average the state every this many epochs.
    #[arg(long, default_value_t = 1)]
    pub average_state_every: u64,
    /// Step on local gradients at every step; average only the state.
    #[arg(long)]
    pub use_local_updates: bool,
    /// Never accept connections (behind NAT).
    #[arg(long)]
    pub client_mode: bool,
    /// Gradient codec.
    #[arg(long, value_enum, default_value = "none")]
    pub grad_compression: CodecFlag,
    /// State codec.
    #[arg(long, value_enum, default_value = "none")]
    pub state_averaging_compression: CodecFlag,
    /// Optimizer statistics averaged with the parameters (e.g. exp_avg_sq).
    #[arg(long, value_delimiter = ',')]
    pub average_opt_statistics: Vec<String>,
    /// Smallest group.
    #[arg(long, default_value_t = 2)]
    pub min_group_size: usize,
    /// Group size that assembles at once.
    #[arg(long)]
    pub target_group_size: Option<usize>,
    /// Seconds a follower waits for a leader.
    #[arg(long, default_value_t = 3.0)]
    pub request_timeout: f64,
    /// Declared bandwidth for load balancing (Mbit/s).
    #[arg(long)]
    pub bandwidth: Option<f64>,
}

impl TrainFlags {
    /// The data set's specification.
    pub fn data_spec(&self) -> DataSpec {
        DataSpec {
            seed: self.data_seed,
            train: self.train_samples,
            ..DataSpec::default()
        }
    }

    /// The model's specification for `data`.
    pub fn model_spec(&self, data: &DataSpec) -> MlpSpec {
        MlpSpec {
            input: data.dim,
            hidden: self.hidden.clone(),
            classes: data.classes,
            seed: self.model_seed,
        }
    }

    /// The optimizer's options for a model of `tensors`.
    pub fn options(&self, tensors: &[TensorInfo]) -> anyhow::Result<CollaborativeOptions> {
        let mut ranges = Vec::with_capacity(tensors.len());
        let mut at = 0;
        for tensor in tensors {
            let len: usize = tensor.shape.iter().product();
            ranges.push(at..at + len);
            at += len;
        }
        let (kind, weight_decay) = match self.optimizer {
            Rule::Sgd => (
                OptimizerKind::Sgd {
                    momentum: 0.9,
                    dampening: 0.0,
                    nesterov: false,
                },
                0.0,
            ),
            Rule::Adam => (OptimizerConfig::adam(self.lr, at).kind, 0.0),
            Rule::Adamw => (OptimizerConfig::adamw(self.lr, 0.01, at).kind, 0.01),
            Rule::Lamb => (OptimizerConfig::lamb(self.lr, 0.01, at).kind, 0.01),
        };
        let optimizer = OptimizerConfig::new(kind, vec![ParamGroup::new(ranges, self.lr, weight_decay)]);
        let seconds = |s: f64, name: &str| {
            anyhow::ensure!(
                s.is_finite() && s > 0.0,
                "--{name} must be a positive number of seconds"
            );
            Ok(Duration::from_secs_f64(s))
        };
        let mut options = CollaborativeOptions::new(self.target_batch_size, optimizer);
        options.batch_size_per_step = Some(self.batch_size);
        if self.warmup_epochs > 0 {
            let warmup = self.warmup_epochs;
            options.scheduler =
                LrSchedule::Custom(Arc::new(move |epoch| ((epoch + 1) as f64 / warmup as f64).min(1.0)));
        }
        options.matchmaking_time = seconds(self.matchmaking_time, "matchmaking-time")?;
        options.averaging_timeout = seconds(self.averaging_timeout, "averaging-timeout")?;
        options.allreduce_timeout = self
            .allreduce_timeout
            .map(|s| seconds(s, "allreduce-timeout"))
            .transpose()?;
        options.next_chunk_timeout = self
            .next_chunk_timeout
            .map(|s| seconds(s, "next-chunk-timeout"))
            .transpose()?;
        options.load_state_timeout = seconds(self.load_state_timeout, "load-state-timeout")?;
        options.request_timeout = seconds(self.request_timeout, "request-timeout")?;
        options.reuse_grad_buffers = self.reuse_grad_buffers;
        options.offload_optimizer = self.offload_optimizer;
        options.delay_optimizer_step = self.delay_optimizer_step;
        options.delay_grad_averaging = self.delay_grad_averaging;
        options.delay_state_averaging = self.delay_state_averaging;
        options.average_state_every = self.average_state_every;
        options.use_local_updates = self.use_local_updates;
        options.client_mode = self.client_mode.then_some(true);
        options.grad_compression = CodecPolicy::Fixed(self.grad_compression.codec());
        options.state_averaging_compression = CodecPolicy::Fixed(self.state_averaging_compression.codec());
        options.average_opt_statistics = self.average_opt_statistics.clone();
        options.min_group_size = self.min_group_size;
        options.target_group_size = self.target_group_size;
        options.bandwidth = self.bandwidth;
        options.validate().context("the optimizer flags")?;
        Ok(options)
    }
}

/// The model's tensors as Colony describes them.
pub fn tensor_infos(model: &Mlp) -> Vec<TensorInfo> {
    model
        .tensor_infos()
        .into_iter()
        .map(|(name, shape)| TensorInfo::new(name, shape))
        .collect()
}

/// What a training loop tells its watcher.
#[derive(Debug, Clone)]
pub enum Event {
    /// After each step: the local epoch, the swarm's samples towards the target, the training loss (EMA).
    Step {
        /// Local epoch.
        epoch: u64,
        /// The swarm's samples in this epoch, as estimated.
        samples: u64,
        /// Smoothed training loss.
        loss: f32,
    },
    /// An epoch ended; `validation` when it was evaluated.
    Epoch {
        /// The epoch that starts.
        epoch: u64,
        /// Smoothed training loss.
        loss: f32,
        /// Validation loss and accuracy, when evaluated.
        validation: Option<Evaluation>,
    },
    /// The peer loaded the state of this epoch from the others.
    Loaded(u64),
}

/// What a peer did, at the end.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Epochs reached.
    pub epochs: u64,
    /// Samples this peer computed gradients for.
    pub samples: u64,
    /// Wall time of the training loop.
    pub seconds: f64,
    /// The final validation loss and accuracy (whole validation set).
    pub validation: Option<Evaluation>,
    /// Gradient rounds averaged.
    pub gradient_rounds: u64,
    /// State rounds averaged.
    pub state_rounds: u64,
    /// Rounds that failed (local values used).
    pub failures: u64,
    /// States loaded from peers.
    pub loads: u64,
    /// Time spent computing gradients.
    pub compute_seconds: f64,
}

/// One peer's training loop over `data` (training set, validation set): steps through its shuffled batches (`seed` picks the order) with the
/// optimizer until `max_epochs`, the target accuracy, or `stop`. Runs on the calling thread, which must not
/// be a thread of the async runtime (it blocks on the optimizer's calls).
pub fn train(
    peer: &mut TrainingPeer,
    model: &mut Mlp,
    data: (&Dataset, &Dataset),
    flags: &TrainFlags,
    seed: u64,
    stop: &AtomicBool,
    mut on_event: impl FnMut(Event),
) -> anyhow::Result<Summary> {
    let (train_set, validation) = data;
    let started = Instant::now();
    let mut params = model.params();
    let mut grads = vec![0.0f32; params.len()];
    let mut scratch = vec![0.0f32; if flags.reuse_grad_buffers { params.len() } else { 0 }];
    let mut batches = Batches::new(train_set.len(), flags.batch_size as usize, seed);
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    let eval_subset = subset(validation, flags.eval_samples);
    let mut summary = Summary::default();
    let mut loss_ema: Option<f32> = None;
    while !stop.load(Ordering::Relaxed) && peer.optimizer.local_epoch() < flags.max_epochs {
        let indices = batches.next().context("the data set is empty")?;
        train_set.batch_into(&indices, &mut inputs, &mut labels);
        let computing = Instant::now();
        let loss = if flags.reuse_grad_buffers {
            // The trainer's buffer is the accumulator: add this batch's gradient into it.
            let loss = model.loss_and_grads(&inputs, &labels, &mut scratch)?;
            grads.iter_mut().zip(&scratch).for_each(|(g, s)| *g += s);
            loss
        } else {
            model.loss_and_grads(&inputs, &labels, &mut grads)?
        };
        summary.compute_seconds += computing.elapsed().as_secs_f64();
        summary.samples += u64::from(flags.batch_size);
        let ema = loss_ema.map_or(loss, |ema| 0.9 * ema + 0.1 * loss);
        loss_ema = Some(ema);
        let outcome = peer
            .optimizer
            .step_blocking(&mut params, &mut grads, Some(flags.batch_size))?;
        if outcome.parameters_updated {
            model.set_params(&params)?;
        }
        for round in &outcome.rounds {
            if std::env::var_os("COLONY_TRACE_ROUNDS").is_some() {
                eprintln!(
                    "{:>8.3} seed {seed} epoch {} {:?} {:?} in {:?}",
                    started.elapsed().as_secs_f64(),
                    round.epoch,
                    round.kind,
                    round.result,
                    round.duration
                );
            }
            match (&round.kind, &round.result) {
                (RoundKind::Gradients, RoundResult::Averaged { .. }) => summary.gradient_rounds += 1,
                (RoundKind::State, RoundResult::Averaged { .. }) => summary.state_rounds += 1,
                (_, RoundResult::Failed { .. }) => summary.failures += 1,
            }
        }
        if let Some(epoch) = outcome.loaded_state {
            summary.loads += 1;
            on_event(Event::Loaded(epoch));
        }
        if outcome.epoch_finished {
            let validation = (flags.eval_every > 0 && outcome.epoch.is_multiple_of(flags.eval_every))
                .then(|| model.evaluate(&eval_subset))
                .transpose()?;
            if let Some(evaluation) = validation
                && flags.target_accuracy > 0.0
                && evaluation.accuracy >= flags.target_accuracy
            {
                stop.store(true, Ordering::Relaxed);
            }
            on_event(Event::Epoch {
                epoch: outcome.epoch,
                loss: ema,
                validation,
            });
        }
        let state = peer.optimizer.state();
        on_event(Event::Step {
            epoch: state.epoch,
            samples: state.global_samples,
            loss: ema,
        });
    }
    summary.epochs = peer.optimizer.local_epoch();
    summary.seconds = started.elapsed().as_secs_f64();
    // The host copy may be ahead of the trainer's buffer while a delayed step finishes.
    model.set_params(&peer.optimizer.parameters())?;
    summary.validation = Some(model.evaluate(validation)?);
    Ok(summary)
}

/// The first `n` samples of `data`.
fn subset(data: &Dataset, n: usize) -> Dataset {
    let n = n.min(data.len());
    Dataset {
        inputs: data.inputs[..n * data.dim].to_vec(),
        labels: data.labels[..n].to_vec(),
        dim: data.dim,
        classes: data.classes,
    }
}
