//! A training peer of the example task: its flags (the model's and the data's, a configuration file, and
//! Colony's own optimizer flags), and the training loop that a peer (in the demo's threads or the trainer's
//! process) runs with a [`CollaborativeOptimizer`].
//!
//! [`CollaborativeOptimizer`]: colony::optimizer::CollaborativeOptimizer

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use colony::config::{Config, OptimizerRule, OptimizerSettings};
use colony::optimizer::{CollaborativeOptions, RoundKind, RoundResult};
use colony::peer::TrainingPeer;
use colony_averaging::tensor::TensorInfo;
use colony_offload::LrSchedule;

use crate::data::{Batches, DataSpec, Dataset};
use crate::model::{Evaluation, Mlp, MlpSpec};

/// The example trainer's values for the optimizer keys that Colony leaves to the application (the three
/// arguments of `CollaborativeOptions::new` and the batch size of a step); a file or a flag overrides them.
pub fn trainer_defaults() -> OptimizerSettings {
    OptimizerSettings {
        target_batch_size: Some(1024),
        batch_size_per_step: Some(64),
        optimizer: Some(OptimizerRule::Adam),
        lr: Some(0.002),
        ..OptimizerSettings::default()
    }
}

/// The model, the data and the training loop's flags, a configuration file, and every option of the
/// collaborative optimizer as Colony's own flags ([`OptimizerSettings`]: the options' names with dashes,
/// durations in seconds). Values merge as the trainer's defaults ([`trainer_defaults`], then
/// `CollaborativeOptions::new`'s) < `--config FILE` < flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainFlags {
    /// A configuration file (TOML, see docs/configuration.md): its `[optimizer]` keys are the optimizer flags'
    /// names with underscores (its `[node]` keys those of the trainer's peer flags); a flag overrides the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Learning-rate warm-up epochs, then constant (a schedule of its own; leave `scheduler` unset).
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
    /// The collaborative optimizer's options given as flags (unset: the file's value, then the default).
    #[command(flatten)]
    pub optimizer: OptimizerSettings,
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

    /// The whole configuration: the trainer's defaults < `--config` < the flags (the `[node]` section is the
    /// file's; the trainer's own peer flags override it).
    pub fn config(&self) -> anyhow::Result<Config> {
        let file = Config::load_optional(self.config.as_deref())?;
        let defaults = Config {
            optimizer: trainer_defaults(),
            ..Config::default()
        };
        let flags = Config {
            optimizer: self.optimizer.clone(),
            ..Config::default()
        };
        Ok(defaults.overlay(&file).overlay(&flags))
    }

    /// The merged optimizer settings (every key the trainer needs is set).
    pub fn settings(&self) -> anyhow::Result<OptimizerSettings> {
        Ok(self.config()?.optimizer)
    }

    /// The optimizer's options for a model of `tensors`, checked.
    pub fn options(&self, tensors: &[TensorInfo]) -> anyhow::Result<CollaborativeOptions> {
        let config = self.config()?;
        anyhow::ensure!(
            config.node.auxiliary != Some(true),
            "the example trainer trains: an auxiliary peer is `colony node --auxiliary`; remove [node] auxiliary"
        );
        let mut options = config.optimizer.options(tensors)?;
        if self.warmup_epochs > 0 {
            anyhow::ensure!(
                config.optimizer.scheduler.is_none(),
                "--warmup-epochs and scheduler are two schedules: give one"
            );
            let warmup = self.warmup_epochs;
            options.scheduler =
                LrSchedule::Custom(Arc::new(move |epoch| ((epoch + 1) as f64 / warmup as f64).min(1.0)));
        }
        options.validate().context("the optimizer options")?;
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
    /// A state round ended.
    StateRound {
        /// The epoch whose state was averaged.
        epoch: u64,
        /// The group's size when averaged; `None` when the round failed (the peer kept its own state).
        peers: Option<usize>,
        /// The first bytes of the group's id, as hex, when a group formed (the same for all its members).
        group: Option<String>,
        /// A digest of the parameters right after the round ([`parameter_digest`]), when the round ran in the
        /// step call (`delay_state_averaging = false`): the members of one group then hold the same values.
        digest: Option<u64>,
    },
}

/// A 64-bit digest of parameter values (FNV-1a over their bit patterns): equal values give equal digests,
/// so peers can compare their parameters by printing it. Not a cryptographic hash.
pub fn parameter_digest(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325, |hash: u64, value| {
        value.to_bits().to_le_bytes().iter().fold(hash, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    })
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
    let reuse_grad_buffers = peer.optimizer.options().reuse_grad_buffers;
    let state_rounds_in_call = !peer.optimizer.options().delay_state_averaging;
    let batch_size = peer
        .optimizer
        .options()
        .batch_size_per_step
        .context("the training loop needs batch_size_per_step")?;
    let mut scratch = vec![0.0f32; if reuse_grad_buffers { params.len() } else { 0 }];
    let mut batches = Batches::new(train_set.len(), batch_size as usize, seed);
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    let eval_subset = subset(validation, flags.eval_samples);
    let mut summary = Summary::default();
    let mut loss_ema: Option<f32> = None;
    while !stop.load(Ordering::Relaxed) && peer.optimizer.local_epoch() < flags.max_epochs {
        let indices = batches.next().context("the data set is empty")?;
        train_set.batch_into(&indices, &mut inputs, &mut labels);
        let computing = Instant::now();
        let loss = if reuse_grad_buffers {
            // The trainer's buffer is the accumulator: add this batch's gradient into it.
            let loss = model.loss_and_grads(&inputs, &labels, &mut scratch)?;
            grads.iter_mut().zip(&scratch).for_each(|(g, s)| *g += s);
            loss
        } else {
            model.loss_and_grads(&inputs, &labels, &mut grads)?
        };
        summary.compute_seconds += computing.elapsed().as_secs_f64();
        summary.samples += u64::from(batch_size);
        let ema = loss_ema.map_or(loss, |ema| 0.9 * ema + 0.1 * loss);
        loss_ema = Some(ema);
        let outcome = peer
            .optimizer
            .step_blocking(&mut params, &mut grads, Some(batch_size))?;
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
            if round.kind == RoundKind::State {
                let peers = match round.result {
                    RoundResult::Averaged { peers } => Some(peers),
                    RoundResult::Failed { .. } => None,
                };
                on_event(Event::StateRound {
                    epoch: round.epoch,
                    peers,
                    group: round
                        .group_id
                        .map(|id| id[..6].iter().map(|b| format!("{b:02x}")).collect()),
                    digest: (state_rounds_in_call && peers.is_some()).then(|| parameter_digest(&params)),
                });
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
