//! Every option of the collaborative optimizer, with Hivemind's names and defaults, and the rules that
//! refuse invalid combinations before anything starts.

use std::time::Duration;

use colony_averaging::aggregation::Aggregation;
use colony_averaging::codec::{Codec, CodecPolicy};
use colony_averaging::tensor::TensorInfo;
use colony_offload::{LrSchedule, OptimizerConfig};

use super::OptimizerError;

/// The options of a [`CollaborativeOptimizer`](super::CollaborativeOptimizer). The names and defaults are
/// `hivemind.Optimizer`'s where they apply; where Colony differs, the field says so.
#[derive(Debug, Clone)]
pub struct CollaborativeOptions {
    /// Samples the whole swarm accumulates per epoch (one global optimizer step). Required.
    pub target_batch_size: u64,
    /// Samples per local [`step`](super::CollaborativeOptimizer::step) when the call does not say;
    /// `None` makes the batch size a required argument of every call. Must be `None` for an auxiliary peer.
    pub batch_size_per_step: Option<u32>,
    /// The optimizer and its parameter groups over the flat parameter buffer. Required.
    pub optimizer: OptimizerConfig,
    /// The learning rate as a function of the epoch (Hivemind's per-epoch scheduler, Lightning's
    /// `scheduler_fn`): the rate of a group is its `lr` times `scheduler.factor(epoch)`, so a peer that
    /// loads state at epoch `t` uses the rate of epoch `t`. Default constant.
    pub scheduler: LrSchedule,
    /// How long before the epoch's estimated end matchmaking for the gradient round starts, and the longest
    /// a group waits for members that are expected but late. Default 15 s, as in Hivemind; unlike
    /// Hivemind it is an upper bound, not a fixed wait: a group assembles as soon as every peer at the
    /// epoch has joined.
    pub matchmaking_time: Duration,
    /// The longest a round (matchmaking, then all-reduce) may take before the peer goes on with its local
    /// values. Default 60 s.
    pub averaging_timeout: Duration,
    /// The longest one all-reduce may take; `None`: `averaging_timeout`.
    pub allreduce_timeout: Option<Duration>,
    /// The longest wait for a peer's next part in an all-reduce (its sender timeout; the reducer timeout is
    /// twice it) and for each chunk of a state download; `None`: `matchmaking_time`.
    pub next_chunk_timeout: Option<Duration>,
    /// The longest one download of the state from peers may take. Default 600 s.
    pub load_state_timeout: Duration,
    /// The trainer's own gradient buffer is the accumulator: the trainer adds every micro-batch's gradient
    /// into it and never zeroes it; Colony zeroes it at each epoch boundary. Saves one buffer and one pass.
    /// Default false.
    pub reuse_grad_buffers: bool,
    /// The optimizer steps Colony's host copy of the parameters, which may then run off the trainer's call
    /// (required by the delayed modes); `None`: `!use_local_updates`. Colony always keeps a host copy (the
    /// state it serves to peers); without offload the step runs within the trainer's call.
    pub offload_optimizer: Option<bool>,
    /// The optimizer step runs in the background and its parameters are applied at a later `step()` (one
    /// epoch of staleness at most); `None`: `delay_grad_averaging`.
    pub delay_optimizer_step: Option<bool>,
    /// The gradient round runs in the background while the trainer accumulates the next epoch. Default
    /// false. Requires `delay_optimizer_step`.
    pub delay_grad_averaging: bool,
    /// The state round runs in the background. Default true.
    pub delay_state_averaging: bool,
    /// Average parameters (and the chosen statistics and extra tensors) every this many epochs. Default 1.
    pub average_state_every: u64,
    /// Step the optimizer on local gradients at every `step()` and only average the state each epoch (no
    /// gradient rounds). Default false.
    pub use_local_updates: bool,
    /// Take part without accepting connections (behind NAT): `None` follows membership (a peer that does
    /// not listen is a client). `Some(true)` on a listening peer makes it send and never reduce;
    /// `Some(false)` on a non-listening peer is refused.
    pub client_mode: Option<bool>,
    /// A helper with no gradients of its own: reduces parts for others and serves the state. Default false.
    pub auxiliary: bool,
    /// Codecs of the gradient round. Default none (exact).
    pub grad_compression: CodecPolicy,
    /// How this peer, when it reduces parts of a gradient round, combines the group's copies: the mean, or
    /// CenteredClip, which bounds how far one peer's gradient can pull the average (a Colony addition;
    /// Hivemind always takes the mean). State rounds always take the mean. Default `Aggregation::Mean`.
    pub gradient_aggregation: Aggregation,
    /// Codecs of the state round. Default none.
    pub state_averaging_compression: CodecPolicy,
    /// Codec of state downloads. Only `Codec::None` is supported: state transfer sends exact `f32` (see
    /// `docs/protocol.md`); another codec is refused at build time.
    pub load_state_compression: Codec,
    /// Optimizer statistics averaged with the parameters in state rounds, e.g. `["exp_avg_sq"]`.
    pub average_opt_statistics: Vec<String>,
    /// Tensors outside the optimizer (e.g. normalisation statistics) that are averaged in state rounds and
    /// served with the state; set and read with [`extra_tensors`](super::CollaborativeOptimizer::extra_tensors).
    pub extra_tensors: Vec<TensorInfo>,
    /// The smallest group worth averaging in. Default 2.
    pub min_group_size: usize,
    /// The group size at which a group assembles at once; `None`: every peer at the epoch. Default `None`.
    pub target_group_size: Option<usize>,
    /// How long a follower waits for a leader's answer. Default 3 s; must be below `matchmaking_time`.
    pub request_timeout: Duration,
    /// This peer's bandwidth for load balancing (any unit shared by the run, usually Mbit/s); `None`: the
    /// group's mean; 0: reduce nothing.
    pub bandwidth: Option<f64>,
    /// Target size of one all-reduce part, bytes. Default 512 KiB.
    pub part_size_bytes: usize,
    /// Progress records: smoothing of the samples-per-second estimate. Default 0.1.
    pub performance_ema_alpha: f64,
    /// Shortest time between two refreshes of the swarm's progress estimate (Hivemind's tracker option of
    /// the same name). Default 50 ms: a refresh reads the local replica of the records, not the network.
    pub min_refresh_period: Duration,
    /// Longest time between two refreshes of the estimate. Default 1 s.
    pub max_refresh_period: Duration,
    /// The longest [`shutdown`](super::CollaborativeOptimizer::shutdown) waits for background work. Default
    /// 5 s.
    pub shutdown_timeout: Duration,
}

impl CollaborativeOptions {
    /// The defaults, with the two required options.
    pub fn new(target_batch_size: u64, optimizer: OptimizerConfig) -> Self {
        Self {
            target_batch_size,
            batch_size_per_step: None,
            optimizer,
            scheduler: LrSchedule::Constant,
            matchmaking_time: Duration::from_secs(15),
            averaging_timeout: Duration::from_secs(60),
            allreduce_timeout: None,
            next_chunk_timeout: None,
            load_state_timeout: Duration::from_secs(600),
            reuse_grad_buffers: false,
            offload_optimizer: None,
            delay_optimizer_step: None,
            delay_grad_averaging: false,
            delay_state_averaging: true,
            average_state_every: 1,
            use_local_updates: false,
            client_mode: None,
            auxiliary: false,
            grad_compression: CodecPolicy::Fixed(Codec::None),
            gradient_aggregation: Aggregation::Mean,
            state_averaging_compression: CodecPolicy::Fixed(Codec::None),
            load_state_compression: Codec::None,
            average_opt_statistics: Vec::new(),
            extra_tensors: Vec::new(),
            min_group_size: 2,
            target_group_size: None,
            request_timeout: Duration::from_secs(3),
            bandwidth: None,
            part_size_bytes: 512 * 1024,
            performance_ema_alpha: 0.1,
            min_refresh_period: Duration::from_millis(50),
            max_refresh_period: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    /// `offload_optimizer` with its default resolved.
    pub fn offload(&self) -> bool {
        self.offload_optimizer.unwrap_or(!self.use_local_updates)
    }

    /// `delay_optimizer_step` with its default resolved.
    pub fn delay_optimizer(&self) -> bool {
        self.delay_optimizer_step.unwrap_or(self.delay_grad_averaging)
    }

    /// `allreduce_timeout` with its default resolved.
    pub fn allreduce_timeout(&self) -> Duration {
        self.allreduce_timeout.unwrap_or(self.averaging_timeout)
    }

    /// `next_chunk_timeout` with its default resolved.
    pub fn next_chunk_timeout(&self) -> Duration {
        self.next_chunk_timeout.unwrap_or(self.matchmaking_time)
    }

    /// Checks every option and every combination; the error names the option and the fix.
    pub fn validate(&self) -> Result<(), OptimizerError> {
        let bad = |message: String| Err(OptimizerError::InvalidOptions(message));
        if self.target_batch_size == 0 {
            return bad("target_batch_size must be at least 1".into());
        }
        if self.batch_size_per_step == Some(0) {
            return bad("batch_size_per_step must be at least 1 (or None to pass it to every step)".into());
        }
        if self.delay_grad_averaging && !self.delay_optimizer() {
            return bad(
                "delay_grad_averaging needs delay_optimizer_step: set delay_optimizer_step = true (or leave it \
                 None, which follows delay_grad_averaging)"
                    .into(),
            );
        }
        if self.delay_optimizer() && !self.offload() {
            return bad(
                "delay_optimizer_step needs offload_optimizer: the background step runs on Colony's host copy; set \
                 offload_optimizer = true"
                    .into(),
            );
        }
        if self.client_mode == Some(true) && self.auxiliary {
            return bad("an auxiliary peer reduces for others, so it cannot be in client mode: drop one".into());
        }
        if self.auxiliary && self.batch_size_per_step.is_some() {
            return bad("an auxiliary peer computes no gradients: leave batch_size_per_step unset".into());
        }
        if self.use_local_updates && self.reuse_grad_buffers {
            return bad(
                "use_local_updates steps on every micro-batch's gradient, so there is no accumulator to reuse: set \
                 reuse_grad_buffers = false"
                    .into(),
            );
        }
        if self.use_local_updates && self.delay_grad_averaging {
            return bad("use_local_updates averages no gradients: set delay_grad_averaging = false".into());
        }
        if self.average_state_every == 0 {
            return bad("average_state_every must be at least 1".into());
        }
        if let Err(error) = self.gradient_aggregation.validate() {
            return bad(format!("gradient_aggregation: {error}"));
        }
        if matches!(self.gradient_aggregation, Aggregation::CenteredClip { .. }) && self.min_group_size < 3 {
            return bad(format!(
                "gradient_aggregation = CenteredClip needs min_group_size >= 3 (it is {}): in a group of two either \
                 peer holds half the weight and no aggregate can tell which one is bad; set min_group_size = 3 or \
                 more",
                self.min_group_size
            ));
        }
        if self.load_state_compression != Codec::None {
            return bad(format!(
                "load_state_compression {:?} is not supported: state downloads are exact f32; use Codec::None",
                self.load_state_compression
            ));
        }
        for (name, value) in [
            ("matchmaking_time", self.matchmaking_time),
            ("averaging_timeout", self.averaging_timeout),
            ("allreduce_timeout", self.allreduce_timeout()),
            ("next_chunk_timeout", self.next_chunk_timeout()),
            ("load_state_timeout", self.load_state_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return bad(format!("{name} must be above zero"));
            }
        }
        if self.request_timeout >= self.matchmaking_time {
            return bad(format!(
                "request_timeout ({:?}) must be below matchmaking_time ({:?}), or a follower may miss every group",
                self.request_timeout, self.matchmaking_time
            ));
        }
        if self.min_group_size < 2 {
            return bad("min_group_size must be at least 2 (a group of one averages nothing)".into());
        }
        if let Some(target) = self.target_group_size
            && target < self.min_group_size
        {
            return bad(format!(
                "target_group_size {target} is below min_group_size {}",
                self.min_group_size
            ));
        }
        if let Some(bandwidth) = self.bandwidth
            && !(bandwidth.is_finite() && bandwidth >= 0.0)
        {
            return bad(format!("bandwidth {bandwidth} must be a finite number >= 0"));
        }
        if !(self.performance_ema_alpha > 0.0 && self.performance_ema_alpha <= 1.0) {
            return bad(format!(
                "performance_ema_alpha {} must be in (0, 1]",
                self.performance_ema_alpha
            ));
        }
        if self.part_size_bytes < 1024 {
            return bad(format!(
                "part_size_bytes {} must be at least 1024",
                self.part_size_bytes
            ));
        }
        self.scheduler
            .validate()
            .map_err(|e| OptimizerError::InvalidOptions(format!("scheduler: {e}")))?;
        if self.min_refresh_period.is_zero() || self.min_refresh_period > self.max_refresh_period {
            return bad(format!(
                "min_refresh_period ({:?}) must be above zero and at most max_refresh_period ({:?})",
                self.min_refresh_period, self.max_refresh_period
            ));
        }
        let statistics = super::offload::statistic_names(&self.optimizer.kind);
        for name in &self.average_opt_statistics {
            if !statistics.contains(&name.as_str()) {
                return bad(format!(
                    "average_opt_statistics names {name:?}, which this optimizer does not keep (it keeps {statistics:?})"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> CollaborativeOptions {
        CollaborativeOptions::new(256, OptimizerConfig::adam(0.001, 10))
    }

    fn refused(options: CollaborativeOptions) -> String {
        match options.validate() {
            Err(OptimizerError::InvalidOptions(message)) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_hivemind_and_are_valid() {
        let options = options();
        options.validate().unwrap();
        assert_eq!(options.matchmaking_time, Duration::from_secs(15));
        assert_eq!(options.averaging_timeout, Duration::from_secs(60));
        assert_eq!(options.allreduce_timeout(), Duration::from_secs(60));
        assert_eq!(options.next_chunk_timeout(), Duration::from_secs(15));
        assert_eq!(options.load_state_timeout, Duration::from_secs(600));
        assert!(options.offload() && !options.delay_optimizer());
        assert!(options.delay_state_averaging);
        assert_eq!(options.average_state_every, 1);
        let local = CollaborativeOptions {
            use_local_updates: true,
            ..options.clone()
        };
        assert!(!local.offload());
        let delayed = CollaborativeOptions {
            delay_grad_averaging: true,
            ..options
        };
        assert!(delayed.delay_optimizer());
        delayed.validate().unwrap();
    }

    #[test]
    fn invalid_combinations_are_refused_with_the_fix() {
        let message = refused(CollaborativeOptions {
            delay_grad_averaging: true,
            delay_optimizer_step: Some(false),
            ..options()
        });
        assert!(message.contains("set delay_optimizer_step = true"), "{message}");
        let message = refused(CollaborativeOptions {
            delay_optimizer_step: Some(true),
            offload_optimizer: Some(false),
            ..options()
        });
        assert!(message.contains("offload_optimizer = true"), "{message}");
        let message = refused(CollaborativeOptions {
            use_local_updates: true,
            reuse_grad_buffers: true,
            ..options()
        });
        assert!(message.contains("reuse_grad_buffers = false"), "{message}");
        let message = refused(CollaborativeOptions {
            auxiliary: true,
            client_mode: Some(true),
            ..options()
        });
        assert!(message.contains("client mode"), "{message}");
        let message = refused(CollaborativeOptions {
            auxiliary: true,
            batch_size_per_step: Some(4),
            ..options()
        });
        assert!(message.contains("batch_size_per_step"), "{message}");
        let message = refused(CollaborativeOptions {
            average_opt_statistics: vec!["momentum_buffer".into()],
            ..options()
        });
        assert!(message.contains("exp_avg_sq"), "{message}");
        let message = refused(CollaborativeOptions {
            request_timeout: Duration::from_secs(20),
            ..options()
        });
        assert!(message.contains("request_timeout"), "{message}");
        let message = refused(CollaborativeOptions {
            load_state_compression: Codec::Float16,
            ..options()
        });
        assert!(message.contains("load_state_compression"), "{message}");
        let message = refused(CollaborativeOptions {
            target_batch_size: 0,
            ..options()
        });
        assert!(message.contains("target_batch_size"), "{message}");
        let message = refused(CollaborativeOptions {
            gradient_aggregation: Aggregation::CenteredClip {
                tau: 0.0,
                iterations: 5,
            },
            ..options()
        });
        assert!(
            message.contains("gradient_aggregation") && message.contains("tau"),
            "{message}"
        );
        let message = refused(CollaborativeOptions {
            gradient_aggregation: Aggregation::CenteredClip {
                tau: 0.1,
                iterations: 0,
            },
            ..options()
        });
        assert!(
            message.contains("gradient_aggregation") && message.contains("iteration"),
            "{message}"
        );
        let clip = Aggregation::CenteredClip {
            tau: 0.1,
            iterations: 5,
        };
        let message = refused(CollaborativeOptions {
            gradient_aggregation: clip,
            ..options()
        });
        assert!(message.contains("set min_group_size = 3"), "{message}");
        CollaborativeOptions {
            gradient_aggregation: clip,
            min_group_size: 3,
            ..options()
        }
        .validate()
        .unwrap();
    }
}
