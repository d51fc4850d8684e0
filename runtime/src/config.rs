//! Colony's configuration: one TOML file, the command line's flags and the builders share one set of names.
//!
//! A file has two sections, `[node]` ([`NodeSettings`]: how the peer joins the run) and `[optimizer]`
//! ([`OptimizerSettings`]: the collaborative optimizer's options). Each key is the name of the builder's field
//! it sets ([`MembershipConfig`] for the node, [`CollaborativeOptions`] for the optimizer) and the flag that
//! sets it is the same name with dashes: `matchmaking_time = 5` in the file, `--matchmaking-time 5` on the
//! command line, `options.matchmaking_time` in code. Durations are seconds.
//!
//! Every key of a section is optional, so one struct serves as a layer of the file and as a layer of the
//! flags: a flag the user did not give is `None` and leaves the file's value alone. The layers merge as
//! **defaults < file < flags** ([`OptimizerSettings::overlay`]); the defaults themselves are not repeated
//! here but are the builders' own ([`CollaborativeOptions::new`], [`MembershipConfig::new`]), applied when
//! the settings are turned into them ([`OptimizerSettings::options`], [`NodeSettings::membership`]).
//!
//! A key that is unknown, misspelt or in the wrong section is an error that names it, its section and file,
//! and the nearest valid key; a value of the wrong type names the key and the type expected.
//!
//! ```
//! use colony::config::Config;
//!
//! let config = Config::from_toml(
//!     "[node]\nrun_id = \"my-run\"\n\n[optimizer]\ntarget_batch_size = 4096\nmatchmaking_tme = 5\n",
//!     "peer.toml",
//! );
//! let message = config.unwrap_err().to_string();
//! assert!(message.contains("did you mean `matchmaking_time`?"), "{message}");
//! ```

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use colony_averaging::aggregation::{Aggregation, DEFAULT_CENTERED_CLIP_ITERATIONS};
use colony_averaging::codec::{Codec, CodecPolicy};
use colony_averaging::tensor::TensorInfo;
use colony_offload::optim::{DEFAULT_ADAM_EPS, DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_LAMB_CLAMP, DEFAULT_LAMB_EPS};
use colony_offload::{LrSchedule, OptimizerConfig, OptimizerKind, ParamGroup};
use colony_transports::access::{AccessPolicy, Certificate};
use colony_transports::{Address, PeerId};
use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Serialize};

use crate::membership::{MembershipConfig, Role};
use crate::optimizer::{CollaborativeOptions, OptimizerError};

/// The run id of a node whose settings give none.
pub const DEFAULT_RUN_ID: &str = "colony";

/// The largest configuration file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("the configuration file {path} is larger than {limit} bytes; is it the right file?")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// [`MAX_FILE_BYTES`].
        limit: u64,
    },
    /// The text is not TOML.
    #[error("{origin} is not valid TOML: {message}")]
    Syntax {
        /// The file (or where the text came from).
        origin: String,
        /// The parser's message, with the line and column.
        message: String,
    },
    /// A key that no section has, or that belongs to another section.
    #[error("unknown key `{key}` {} of {origin}; {advice}", place(section))]
    UnknownKey {
        /// The key as written.
        key: String,
        /// `[node]`, `[optimizer]` or `the top level`.
        section: String,
        /// The file.
        origin: String,
        /// The nearest valid key, if one is close.
        suggestion: Option<String>,
        /// What to do: the suggestion, the right section, or the valid keys.
        advice: String,
    },
    /// A key whose value has the wrong type or is out of range.
    #[error("`{key}` {} of {origin}: {message}", place(section))]
    InvalidValue {
        /// The key.
        key: String,
        /// `[node]`, `[optimizer]` or `the top level`.
        section: String,
        /// The file, or `the command line` for merged settings.
        origin: String,
        /// What was wrong, with the type or range expected.
        message: String,
    },
    /// A key without a default was given nowhere.
    #[error("`{key}` is required: set it in [{section}] of the configuration file or pass --{flag}")]
    Missing {
        /// The key.
        key: String,
        /// The section it belongs in.
        section: String,
        /// Its flag, without the dashes.
        flag: String,
    },
    /// A combination of keys that cannot go together.
    #[error("[{section}] {message}")]
    Conflict {
        /// The section.
        section: String,
        /// Which keys, and the fix.
        message: String,
    },
    /// Options the code holds that no file can express (for [`OptimizerSettings::from_options`]).
    #[error("`{key}` cannot be written to a configuration file: {reason}")]
    NotExpressible {
        /// The option.
        key: String,
        /// Why, and what the file would need.
        reason: String,
    },
    /// The optimizer's own checks refused the merged options.
    #[error(transparent)]
    Options(#[from] OptimizerError),
}

/// "in [node]", or "at the top level".
fn place(section: &str) -> String {
    if section.starts_with('[') {
        format!("in {section}")
    } else {
        format!("at {section}")
    }
}

/// The whole configuration file: `[node]` and `[optimizer]`, both optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How the peer joins the run.
    pub node: NodeSettings,
    /// The collaborative optimizer's options.
    pub optimizer: OptimizerSettings,
}

/// How the peer joins the run: the `[node]` section and the flags of `colony node`. Every key is optional;
/// what is left unset takes [`MembershipConfig::new`]'s default (or the one named on the key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Node settings (the [node] keys of --config)")]
pub struct NodeSettings {
    /// Where to listen: `HOST:PORT` (port 0 picks a free one; the scheme comes from `transport`) or a full
    /// address such as `tcp://0.0.0.0:4000`. Unset: no listening (client mode).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The address others dial when it is not the one listened on (listening on `0.0.0.0`, a NAT's port
    /// forward, a proxy): `HOST:PORT` or a full address, same transport as `listen`; port 0 keeps the bound
    /// port. Default: the bound address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Peers to join through, as full addresses (`tcp://HOST:PORT/p/PEER_ID`); the flag repeats.
    #[arg(long = "initial-peer", visible_alias = "initial-peers", value_name = "ADDRESS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_peers: Option<Vec<String>>,
    /// The identity file (an ed25519 key; created if missing, so a restarted peer keeps its id).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    /// Admit only these peers (peer ids; the flag repeats): the run's allowlist. Every peer of the run
    /// should list the same peers. Default: anyone (an open run), unless `authority` is set.
    #[arg(long = "allow-peer", value_name = "PEER_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_peers: Option<Vec<String>>,
    /// Admit only peers with a membership certificate for this run signed by this authority (the id that
    /// `colony authority keygen` printed). Needs `certificate`. Default: none.
    #[arg(long, value_name = "AUTHORITY_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// This peer's membership certificate (a file from `colony authority issue`), presented to every peer it
    /// connects to. Default: none.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    /// The transport when `listen` gives no scheme. Default tcp.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportKind>,
    /// The run to join. Default `colony` (the example trainer: `colony-example`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Join as an auxiliary peer (reduces for others, trains nothing); needs `listen`. Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auxiliary: Option<bool>,
    /// How often each member probes another, in milliseconds. Default 1000.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_period_ms: Option<u64>,
    /// How long a suspected member has to refute before it is dropped, in milliseconds. Default 3000.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspect_timeout_ms: Option<u64>,
    /// How long to keep trying the initial peers, in seconds. Default 30.
    #[arg(long, visible_alias = "bootstrap-timeout")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_timeout_s: Option<u64>,
    /// Bandwidth announced with the member identity, Mbit/s. Default 0 (not declared).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<f32>,
    /// Serve Prometheus metrics over HTTP on this address (e.g. `127.0.0.1:9464`). Default off.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<SocketAddr>,
}

/// A transport by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TCP (LAN): Colony's signed handshake and stream multiplexer.
    Tcp,
    /// QUIC (WAN): TLS 1.3 over UDP.
    Quic,
}

impl TransportKind {
    /// The address scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Quic => "quic",
        }
    }
}

/// The collaborative optimizer's options: the `[optimizer]` section and the flags of the example trainer.
/// Every key is optional; what is left unset takes [`CollaborativeOptions::new`]'s default, except the three
/// that `new` takes as arguments (`target_batch_size`, `optimizer`, `lr`), which are required.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Optimizer options (the [optimizer] keys of --config)")]
pub struct OptimizerSettings {
    /// Samples the whole swarm accumulates per epoch. Required.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_batch_size: Option<u64>,
    /// Samples per local step when the call does not say.
    #[arg(long, visible_alias = "batch-size")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size_per_step: Option<u32>,
    /// The optimizer's rule. Required.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerRule>,
    /// Learning rate (one parameter group over the whole model). Required.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f32>,
    /// Weight decay. Default 0.01 for adamw, 0 for the others.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f32>,
    /// SGD's momentum. Default 0.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f32>,
    /// SGD's dampening. Default 0.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dampening: Option<f32>,
    /// SGD's Nesterov momentum. Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
    /// Adam's, AdamW's and LAMB's first-moment decay. Default 0.9.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f32>,
    /// Adam's, AdamW's and LAMB's second-moment decay. Default 0.999.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f32>,
    /// Adam's, AdamW's and LAMB's epsilon. Default 1e-8 (LAMB: 1e-6).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f32>,
    /// LAMB's bound of the weight norm in the trust ratio. Default 10.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clamp_value: Option<f32>,
    /// Learning-rate schedule over epochs, a TOML inline table: `{ kind = "warmup_cosine", warmup = 10, total
    /// = 1000, min_factor = 0.0 }`. Default constant.
    #[arg(long, value_parser = parse_schedule, value_name = "TABLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Schedule>,
    /// Seconds before the epoch's estimated end that matchmaking starts (an upper bound of its wait). Default 15.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matchmaking_time: Option<f64>,
    /// Seconds a round may take before the peer goes on with its local values. Default 60.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub averaging_timeout: Option<f64>,
    /// Seconds one all-reduce may take. Default: averaging_timeout.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_timeout: Option<f64>,
    /// Seconds to wait for a peer's next part or chunk. Default: matchmaking_time.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_chunk_timeout: Option<f64>,
    /// Seconds one download of the state may take. Default 600.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_state_timeout: Option<f64>,
    /// Accumulate in the trainer's gradient buffer. Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_grad_buffers: Option<bool>,
    /// Step the optimizer on Colony's host copy. Default: !use_local_updates.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offload_optimizer: Option<bool>,
    /// Run the optimizer step in the background. Default: delay_grad_averaging.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_optimizer_step: Option<bool>,
    /// Run the gradient round in the background. Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_grad_averaging: Option<bool>,
    /// Run state rounds in the background. Default true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_state_averaging: Option<bool>,
    /// Average the state every this many epochs. Default 1.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub average_state_every: Option<u64>,
    /// Step on local gradients at every step; average only the state. Default false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_local_updates: Option<bool>,
    /// Take part without reducing for others (behind NAT). Default: follows membership.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_mode: Option<bool>,
    /// Codec of the gradient round. Default none (exact).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_compression: Option<CodecName>,
    /// How a reducer combines the peers' gradients, a TOML inline table: `{ kind = "mean" }` or `{ kind =
    /// "centered_clip", tau = 0.01, iterations = 5 }` (tau required, iterations default 5). Default mean.
    #[arg(long, value_parser = parse_gradient_aggregation, value_name = "TABLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_aggregation: Option<GradientAggregation>,
    /// Codec of the state round. Default none (exact).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_averaging_compression: Option<CodecName>,
    /// Codec of state downloads; only none is supported.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_state_compression: Option<CodecName>,
    /// Optimizer statistics averaged with the parameters (e.g. exp_avg_sq), comma-separated. Default none.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub average_opt_statistics: Option<Vec<String>>,
    /// The smallest group worth averaging in. Default 2.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_group_size: Option<usize>,
    /// The group size that assembles at once. Default: every peer at the epoch.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_group_size: Option<usize>,
    /// Seconds a follower waits for a leader's answer. Default 3.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<f64>,
    /// This peer's bandwidth for load balancing (Mbit/s). Default: the group's mean.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<f64>,
    /// Target size of one all-reduce part, bytes. Default 524288.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_size_bytes: Option<usize>,
    /// Smoothing of the samples-per-second estimate, in (0, 1]. Default 0.1.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub performance_ema_alpha: Option<f64>,
    /// Shortest seconds between two refreshes of the progress estimate. Default 0.05.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_refresh_period: Option<f64>,
    /// Longest seconds between two refreshes of the progress estimate. Default 1.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_refresh_period: Option<f64>,
    /// Seconds shutdown waits for background work. Default 5.
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<f64>,
}

/// An optimizer rule by name (`OptimizerKind::name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerRule {
    /// `torch.optim.SGD`.
    Sgd,
    /// `torch.optim.Adam`.
    Adam,
    /// `torch.optim.AdamW`.
    Adamw,
    /// LAMB, as in torch-optimizer.
    Lamb,
}

/// A codec by name (the same names in the file and on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CodecName {
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

impl CodecName {
    /// The codec.
    pub fn codec(self) -> Codec {
        match self {
            Self::None => Codec::None,
            Self::Float16 => Codec::Float16,
            Self::ScaledFloat16 => Codec::ScaledFloat16,
            Self::Uniform8bit => Codec::Uniform8Bit,
            Self::Quantile8bit => Codec::Quantile8Bit,
            Self::Blockwise8bit => Codec::Blockwise8Bit,
        }
    }

    /// The name of `codec`.
    pub fn of(codec: Codec) -> Self {
        match codec {
            Codec::None => Self::None,
            Codec::Float16 => Self::Float16,
            Codec::ScaledFloat16 => Self::ScaledFloat16,
            Codec::Uniform8Bit => Self::Uniform8bit,
            Codec::Quantile8Bit => Self::Quantile8bit,
            Codec::Blockwise8Bit => Self::Blockwise8bit,
        }
    }
}

/// A learning-rate schedule as data ([`LrSchedule`] without its `Custom` function), tagged by `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The factor is always 1.
    Constant,
    /// Multiply by `gamma` every `step_size` epochs.
    Step {
        /// Epochs between two decays.
        step_size: u64,
        /// Factor per decay.
        gamma: f64,
    },
    /// `gamma ^ epoch`.
    Exponential {
        /// Factor per epoch.
        gamma: f64,
    },
    /// Linear warm-up, then a half cosine down to `min_factor` at `total`.
    WarmupCosine {
        /// Warm-up epochs.
        warmup: u64,
        /// The epoch at which the factor reaches `min_factor`.
        total: u64,
        /// The factor from `total` on.
        min_factor: f64,
    },
    /// Linear warm-up, then a linear decay to 0 at `total`.
    WarmupLinear {
        /// Warm-up epochs.
        warmup: u64,
        /// The epoch at which the factor reaches 0.
        total: u64,
    },
}

impl Schedule {
    /// The library's schedule.
    pub fn schedule(self) -> LrSchedule {
        match self {
            Self::Constant => LrSchedule::Constant,
            Self::Step { step_size, gamma } => LrSchedule::Step { step_size, gamma },
            Self::Exponential { gamma } => LrSchedule::Exponential { gamma },
            Self::WarmupCosine {
                warmup,
                total,
                min_factor,
            } => LrSchedule::WarmupCosine {
                warmup,
                total,
                min_factor,
            },
            Self::WarmupLinear { warmup, total } => LrSchedule::WarmupLinear { warmup, total },
        }
    }

    /// The data of `schedule`; `None` for a `Custom` function.
    pub fn of(schedule: &LrSchedule) -> Option<Self> {
        Some(match *schedule {
            LrSchedule::Constant => Self::Constant,
            LrSchedule::Step { step_size, gamma } => Self::Step { step_size, gamma },
            LrSchedule::Exponential { gamma } => Self::Exponential { gamma },
            LrSchedule::WarmupCosine {
                warmup,
                total,
                min_factor,
            } => Self::WarmupCosine {
                warmup,
                total,
                min_factor,
            },
            LrSchedule::WarmupLinear { warmup, total } => Self::WarmupLinear { warmup, total },
            LrSchedule::Custom(_) => return None,
        })
    }
}

/// A gradient aggregation as data ([`Aggregation`]), tagged by `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GradientAggregation {
    /// The weighted mean.
    Mean,
    /// CenteredClip: iterative clipping around the running centre.
    CenteredClip {
        /// Clipping radius, as a root-mean-square deviation per gradient value.
        tau: f32,
        /// Clipping iterations. Default [`DEFAULT_CENTERED_CLIP_ITERATIONS`].
        #[serde(default = "default_centered_clip_iterations")]
        iterations: u32,
    },
}

fn default_centered_clip_iterations() -> u32 {
    DEFAULT_CENTERED_CLIP_ITERATIONS
}

impl GradientAggregation {
    /// The library's aggregation.
    pub fn aggregation(self) -> Aggregation {
        match self {
            Self::Mean => Aggregation::Mean,
            Self::CenteredClip { tau, iterations } => Aggregation::CenteredClip { tau, iterations },
        }
    }

    /// The data of `aggregation`.
    pub fn of(aggregation: Aggregation) -> Self {
        match aggregation {
            Aggregation::Mean => Self::Mean,
            Aggregation::CenteredClip { tau, iterations } => Self::CenteredClip { tau, iterations },
        }
    }
}

/// Parses `--gradient-aggregation`'s value: a TOML inline table, as the file writes it.
fn parse_gradient_aggregation(text: &str) -> Result<GradientAggregation, String> {
    #[derive(Deserialize)]
    struct Wrapper {
        gradient_aggregation: GradientAggregation,
    }
    toml::from_str::<Wrapper>(&format!("gradient_aggregation = {text}"))
        .map(|w| w.gradient_aggregation)
        .map_err(|e| {
            format!(
                "{}; expected a table such as '{{ kind = \"centered_clip\", tau = 0.01, iterations = 5 }}' or \
                 '{{ kind = \"mean\" }}'",
                e.message()
            )
        })
}

/// Parses `--scheduler`'s value: a TOML inline table, as the file writes it.
fn parse_schedule(text: &str) -> Result<Schedule, String> {
    #[derive(Deserialize)]
    struct Wrapper {
        scheduler: Schedule,
    }
    toml::from_str::<Wrapper>(&format!("scheduler = {text}"))
        .map(|w| w.scheduler)
        .map_err(|e| {
            format!(
                "{}; expected a table such as '{{ kind = \"step\", step_size = 10, gamma = 0.5 }}'",
                e.message()
            )
        })
}

impl Config {
    /// Reads and checks the file at `path` (at most [`MAX_FILE_BYTES`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                limit: MAX_FILE_BYTES,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Syntax {
            origin: path.display().to_string(),
            message: format!("not UTF-8 text ({e})"),
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// [`load`](Self::load) when `path` is given; the empty configuration otherwise.
    pub fn load_optional(path: Option<&Path>) -> Result<Self, ConfigError> {
        path.map_or_else(|| Ok(Self::default()), Self::load)
    }

    /// Parses and checks `text`; `origin` names it in errors (the file's path).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let sections = [("node", NodeSettings::keys()), ("optimizer", OptimizerSettings::keys())];
        for (key, value) in &table {
            let Some((name, keys)) = sections.iter().find(|(name, _)| name == key) else {
                return Err(unknown_key(key, None, origin, &sections));
            };
            let toml::Value::Table(section) = value else {
                return Err(ConfigError::InvalidValue {
                    key: key.clone(),
                    section: "the top level".into(),
                    origin: origin.to_string(),
                    message: format!("expected a section ([{key}]), found a {}", value.type_str()),
                });
            };
            for (inner, value) in section {
                if !keys.contains(&inner.as_str()) {
                    return Err(unknown_key(inner, Some(name), origin, &sections));
                }
                // One key at a time, so that a type error names its key.
                let single = toml::Table::from_iter([(inner.clone(), value.clone())]);
                let checked = match *name {
                    "node" => toml::Value::Table(single).try_into::<NodeSettings>().map(drop),
                    _ => toml::Value::Table(single).try_into::<OptimizerSettings>().map(drop),
                };
                checked.map_err(|e| ConfigError::InvalidValue {
                    key: inner.clone(),
                    section: format!("[{name}]"),
                    origin: origin.to_string(),
                    message: e.message().to_string(),
                })?;
            }
        }
        toml::Value::Table(table)
            .try_into::<Self>()
            .map_err(|e| ConfigError::Syntax {
                origin: origin.to_string(),
                message: e.message().to_string(),
            })
    }

    /// The configuration as a TOML file (unset keys are left out).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings of plain numbers, strings and tables always serialise to TOML")
    }

    /// `self` with every key that `over` sets replaced by `over`'s value.
    pub fn overlay(&self, over: &Self) -> Self {
        Self {
            node: self.node.overlay(&over.node),
            optimizer: self.optimizer.overlay(&over.optimizer),
        }
    }

    /// The optimizer's options for a model of `tensors`: [`OptimizerSettings::options`] with `[node]
    /// auxiliary`, checked by [`CollaborativeOptions::validate`].
    pub fn options(&self, tensors: &[TensorInfo]) -> Result<CollaborativeOptions, ConfigError> {
        let mut options = self.optimizer.options(tensors)?;
        if let Some(auxiliary) = self.node.auxiliary {
            options.auxiliary = auxiliary;
        }
        options.validate()?;
        Ok(options)
    }
}

/// The keys of the struct `T` derives `Deserialize` for, as serde names them (so the list cannot drift from
/// the struct).
fn struct_keys<T: DeserializeOwned>() -> &'static [&'static str] {
    /// A deserializer that only records the field names a struct asks for.
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("only the field names were wanted"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// `self` with every key `over` sets replaced by `over`'s value, for any settings struct whose unset keys are
/// left out when serialised.
fn overlay<T: Serialize + DeserializeOwned>(base: &T, over: &T) -> T {
    let table = |value: &T| match toml::Value::try_from(value) {
        Ok(toml::Value::Table(table)) => table,
        other => panic!("a settings struct serialises to a TOML table (invariant of Config's types), got {other:?}"),
    };
    let mut merged = table(base);
    merged.extend(table(over));
    toml::Value::Table(merged)
        .try_into()
        .expect("keys taken from two valid settings deserialise again (invariant of Config's types)")
}

/// The error for `key`, which `section` (`None`: the top level) does not have: the nearest key of that
/// section, or the section the key belongs to.
fn unknown_key(
    key: &str,
    section: Option<&str>,
    origin: &str,
    sections: &[(&str, &'static [&'static str])],
) -> ConfigError {
    let section_label = section.map_or_else(|| "the top level".to_string(), |s| format!("[{s}]"));
    let mut suggestion = None;
    let advice = if let Some((home, _)) = sections.iter().find(|(_, keys)| keys.contains(&key)) {
        format!("`{key}` belongs in [{home}]: move it below a `[{home}]` line")
    } else {
        let candidates: Vec<&str> = match section {
            Some(name) => sections
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, keys)| keys.to_vec())
                .unwrap_or_default(),
            None => sections.iter().map(|(name, _)| *name).collect(),
        };
        match nearest(key, &candidates) {
            Some(near) => {
                suggestion = Some(near.to_string());
                format!("did you mean `{near}`?")
            }
            None => format!("the keys here are {}", candidates.join(", ")),
        }
    };
    ConfigError::UnknownKey {
        key: key.to_string(),
        section: section_label,
        origin: origin.to_string(),
        suggestion,
        advice,
    }
}

/// The candidate nearest to `word`, if it is a likely typo: within an edit distance of a third of the word's
/// length (at least one edit), else one that starts with the word, else one that contains it or is contained
/// in it (for words of 4 characters or more); the smaller distance breaks ties.
fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .filter_map(|candidate| {
            let distance = edit_distance(word, candidate);
            let rank = if distance <= limit {
                0
            } else if word.len() >= 4 && candidate.starts_with(word) {
                1
            } else if word.len() >= 4 && (candidate.contains(word) || word.contains(candidate)) {
                2
            } else {
                return None;
            };
            Some(((rank, distance), *candidate))
        })
        .min_by_key(|(score, _)| *score)
        .map(|(_, candidate)| candidate)
}

/// The optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two neighbours,
/// each one edit.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // rows[i][j]: the distance between a[..i] and b[..j]; three rows are enough for the swap rule.
    let mut previous2 = vec![0usize; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0usize; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (previous[j] + 1).min(current[j - 1] + 1).min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(previous2[j - 2] + 1);
            }
            current[j] = best;
        }
        std::mem::swap(&mut previous2, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// A duration of `seconds` for `key`: finite, at least 0 and representable.
fn seconds(section: &str, key: &str, seconds: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(seconds).map_err(|_| ConfigError::InvalidValue {
        key: key.to_string(),
        section: format!("[{section}]"),
        origin: "the merged configuration".into(),
        message: format!("{seconds} is not a number of seconds (finite and at least 0)"),
    })
}

impl NodeSettings {
    /// The keys of `[node]`.
    pub fn keys() -> &'static [&'static str] {
        struct_keys::<Self>()
    }

    /// `self` with every key that `over` sets replaced by `over`'s value (`over`: the flags).
    pub fn overlay(&self, over: &Self) -> Self {
        overlay(self, over)
    }

    /// Where to listen, with `transport`'s scheme when `listen` gives none; `None` when unset.
    pub fn listen_address(&self) -> Result<Option<Address>, ConfigError> {
        self.address_key("listen", self.listen.as_deref())
    }

    /// `value` of `key` as an address, with `transport`'s scheme when it gives none.
    fn address_key(&self, key: &str, value: Option<&str>) -> Result<Option<Address>, ConfigError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let text = if value.contains("://") {
            value.to_owned()
        } else {
            format!("{}://{value}", self.transport.unwrap_or(TransportKind::Tcp).scheme())
        };
        text.parse().map(Some).map_err(|e| ConfigError::InvalidValue {
            key: key.into(),
            section: "[node]".into(),
            origin: "the merged configuration".into(),
            message: format!("{value:?}: {e}"),
        })
    }

    /// The membership configuration: [`MembershipConfig::new`]'s defaults with the keys set here.
    pub fn membership(&self) -> Result<MembershipConfig, ConfigError> {
        let listen = self.listen_address()?;
        let mut config = MembershipConfig::new(self.run_id.as_deref().unwrap_or(DEFAULT_RUN_ID), listen);
        config.advertise = self.address_key("advertise", self.advertise.as_deref())?;
        if config.advertise.is_some() && config.listen.is_none() {
            return Err(ConfigError::Conflict {
                section: "node".into(),
                message: "advertise needs listen: a client-mode peer is dialled by nobody".into(),
            });
        }
        for peer in self.initial_peers.iter().flatten() {
            let address = peer.parse().map_err(|e| ConfigError::InvalidValue {
                key: "initial_peers".into(),
                section: "[node]".into(),
                origin: "the merged configuration".into(),
                message: format!("{peer:?}: {e}"),
            })?;
            config.initial_peers.push(address);
        }
        if self.auxiliary == Some(true) {
            if config.listen.is_none() {
                return Err(ConfigError::Conflict {
                    section: "node".into(),
                    message: "auxiliary = true needs listen: others dial an auxiliary peer to reduce".into(),
                });
            }
            config.role = Role::Auxiliary;
        }
        if let Some(period) = self.probe_period_ms {
            if period == 0 {
                return Err(ConfigError::InvalidValue {
                    key: "probe_period_ms".into(),
                    section: "[node]".into(),
                    origin: "the merged configuration".into(),
                    message: "must be at least 1".into(),
                });
            }
            config.swim.probe_period = Duration::from_millis(period);
            // A direct answer gets two fifths of the period, as with the defaults (400 ms of 1 s).
            config.swim.probe_rtt = Duration::from_millis(period.saturating_mul(2) / 5).max(Duration::from_millis(1));
        }
        if let Some(timeout) = self.suspect_timeout_ms {
            config.swim.suspect_to_down_after = Duration::from_millis(timeout);
        }
        if let Some(timeout) = self.bootstrap_timeout_s {
            config.bootstrap_timeout = Duration::from_secs(timeout);
        }
        if let Some(bandwidth) = self.bandwidth_mbps {
            config.bandwidth_mbps = bandwidth;
        }
        self.access(&mut config)?;
        Ok(config)
    }

    /// Sets `config`'s access policy and certificate from `allow_peers`, `authority` and `certificate`.
    fn access(&self, config: &mut MembershipConfig) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::InvalidValue {
            key: key.into(),
            section: "[node]".into(),
            origin: "the merged configuration".into(),
            message,
        };
        if let Some(path) = &self.certificate {
            config.certificate = Some(Certificate::load(path).map_err(|e| invalid("certificate", e.to_string()))?);
        }
        match (&self.allow_peers, &self.authority) {
            (Some(_), Some(_)) => Err(ConfigError::Conflict {
                section: "node".into(),
                message: "allow_peers and authority cannot both be set: a run admits peers by allowlist or by \
                          certificate"
                    .into(),
            }),
            (Some(peers), None) => {
                let mut allowed = std::collections::BTreeSet::new();
                for peer in peers {
                    let id = peer
                        .parse::<PeerId>()
                        .map_err(|e| invalid("allow_peers", e.to_string()))?;
                    allowed.insert(id);
                }
                if allowed.is_empty() {
                    return Err(invalid(
                        "allow_peers",
                        "an empty allowlist admits no peer; list peer ids, or leave the key out for an open run".into(),
                    ));
                }
                config.access = AccessPolicy::Allowlist(allowed);
                Ok(())
            }
            (None, Some(authority)) => {
                let authority = authority
                    .parse::<PeerId>()
                    .map_err(|e| invalid("authority", format!("not an authority id: {e}")))?;
                if config.certificate.is_none() {
                    return Err(ConfigError::Conflict {
                        section: "node".into(),
                        message:
                            "authority needs certificate: in a run that admits by certificate every peer presents \
                                  its own (`colony authority issue` makes one)"
                                .into(),
                    });
                }
                config.access = AccessPolicy::Certificates {
                    authority,
                    run_id: config.run_id.clone(),
                };
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }
}

impl OptimizerRule {
    /// The weight decay of a file or flags that set none: torch's defaults (AdamW 0.01, the others 0).
    pub fn default_weight_decay(self) -> f32 {
        match self {
            Self::Adamw => 0.01,
            Self::Sgd | Self::Adam | Self::Lamb => 0.0,
        }
    }
}

impl OptimizerSettings {
    /// The keys of `[optimizer]`.
    pub fn keys() -> &'static [&'static str] {
        struct_keys::<Self>()
    }

    /// `self` with every key that `over` sets replaced by `over`'s value (`over`: the flags).
    pub fn overlay(&self, over: &Self) -> Self {
        overlay(self, over)
    }

    /// The update rule from `optimizer` and its hyper-parameters; a hyper-parameter of another rule is refused.
    fn kind(&self, rule: OptimizerRule) -> Result<OptimizerKind, ConfigError> {
        let given = |key: &str, set: bool| set.then(|| key.to_string());
        let sgd_only = [
            given("momentum", self.momentum.is_some()),
            given("dampening", self.dampening.is_some()),
            given("nesterov", self.nesterov.is_some()),
        ];
        let moments = [
            given("beta1", self.beta1.is_some()),
            given("beta2", self.beta2.is_some()),
            given("eps", self.eps.is_some()),
        ];
        let lamb_only = [given("clamp_value", self.clamp_value.is_some())];
        let foreign: Vec<String> = match rule {
            OptimizerRule::Sgd => moments.into_iter().chain(lamb_only).flatten().collect(),
            OptimizerRule::Adam | OptimizerRule::Adamw => sgd_only.into_iter().chain(lamb_only).flatten().collect(),
            OptimizerRule::Lamb => sgd_only.into_iter().flatten().collect(),
        };
        if !foreign.is_empty() {
            return Err(ConfigError::Conflict {
                section: "optimizer".into(),
                message: format!(
                    "{} do not apply to optimizer = \"{}\": remove them or choose another optimizer",
                    foreign.join(", "),
                    rule_name(rule)
                ),
            });
        }
        let (beta1, beta2) = (self.beta1.unwrap_or(DEFAULT_BETA1), self.beta2.unwrap_or(DEFAULT_BETA2));
        Ok(match rule {
            OptimizerRule::Sgd => OptimizerKind::Sgd {
                momentum: self.momentum.unwrap_or(0.0),
                dampening: self.dampening.unwrap_or(0.0),
                nesterov: self.nesterov.unwrap_or(false),
            },
            OptimizerRule::Adam => OptimizerKind::Adam {
                beta1,
                beta2,
                eps: self.eps.unwrap_or(DEFAULT_ADAM_EPS),
            },
            OptimizerRule::Adamw => OptimizerKind::AdamW {
                beta1,
                beta2,
                eps: self.eps.unwrap_or(DEFAULT_ADAM_EPS),
            },
            OptimizerRule::Lamb => OptimizerKind::Lamb {
                beta1,
                beta2,
                eps: self.eps.unwrap_or(DEFAULT_LAMB_EPS),
                clamp_value: self.clamp_value.unwrap_or(DEFAULT_LAMB_CLAMP),
            },
        })
    }

    /// The optimizer's options for a model of `tensors` (one parameter group with one range per tensor, in
    /// order): [`CollaborativeOptions::new`]'s defaults with the keys set here. Not yet checked by
    /// [`CollaborativeOptions::validate`] (which [`Config::options`] and `CollaborativeOptimizer::start` call).
    pub fn options(&self, tensors: &[TensorInfo]) -> Result<CollaborativeOptions, ConfigError> {
        let missing = |key: &str| ConfigError::Missing {
            key: key.to_string(),
            section: "optimizer".into(),
            flag: key.replace('_', "-"),
        };
        let target_batch_size = self.target_batch_size.ok_or_else(|| missing("target_batch_size"))?;
        let rule = self.optimizer.ok_or_else(|| missing("optimizer"))?;
        let lr = self.lr.ok_or_else(|| missing("lr"))?;
        let mut ranges = Vec::with_capacity(tensors.len());
        let mut at = 0usize;
        for tensor in tensors {
            let len = tensor
                .shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|len| at.checked_add(len).map(|end| (len, end)));
            let Some((_, end)) = len else {
                return Err(ConfigError::Conflict {
                    section: "optimizer".into(),
                    message: format!("the model's tensor {} is too large to address", tensor.name),
                });
            };
            ranges.push(at..end);
            at = end;
        }
        let weight_decay = self.weight_decay.unwrap_or(rule.default_weight_decay());
        let optimizer = OptimizerConfig::new(self.kind(rule)?, vec![ParamGroup::new(ranges, lr, weight_decay)]);
        let mut options = CollaborativeOptions::new(target_batch_size, optimizer);
        let o = "optimizer";
        if let Some(v) = self.batch_size_per_step {
            options.batch_size_per_step = Some(v);
        }
        if let Some(v) = self.scheduler {
            options.scheduler = v.schedule();
        }
        if let Some(v) = self.matchmaking_time {
            options.matchmaking_time = seconds(o, "matchmaking_time", v)?;
        }
        if let Some(v) = self.averaging_timeout {
            options.averaging_timeout = seconds(o, "averaging_timeout", v)?;
        }
        if let Some(v) = self.allreduce_timeout {
            options.allreduce_timeout = Some(seconds(o, "allreduce_timeout", v)?);
        }
        if let Some(v) = self.next_chunk_timeout {
            options.next_chunk_timeout = Some(seconds(o, "next_chunk_timeout", v)?);
        }
        if let Some(v) = self.load_state_timeout {
            options.load_state_timeout = seconds(o, "load_state_timeout", v)?;
        }
        if let Some(v) = self.reuse_grad_buffers {
            options.reuse_grad_buffers = v;
        }
        if let Some(v) = self.offload_optimizer {
            options.offload_optimizer = Some(v);
        }
        if let Some(v) = self.delay_optimizer_step {
            options.delay_optimizer_step = Some(v);
        }
        if let Some(v) = self.delay_grad_averaging {
            options.delay_grad_averaging = v;
        }
        if let Some(v) = self.delay_state_averaging {
            options.delay_state_averaging = v;
        }
        if let Some(v) = self.average_state_every {
            options.average_state_every = v;
        }
        if let Some(v) = self.use_local_updates {
            options.use_local_updates = v;
        }
        if let Some(v) = self.client_mode {
            options.client_mode = Some(v);
        }
        if let Some(v) = self.grad_compression {
            options.grad_compression = CodecPolicy::Fixed(v.codec());
        }
        if let Some(v) = self.gradient_aggregation {
            options.gradient_aggregation = v.aggregation();
        }
        if let Some(v) = self.state_averaging_compression {
            options.state_averaging_compression = CodecPolicy::Fixed(v.codec());
        }
        if let Some(v) = self.load_state_compression {
            options.load_state_compression = v.codec();
        }
        if let Some(v) = &self.average_opt_statistics {
            options.average_opt_statistics = v.clone();
        }
        if let Some(v) = self.min_group_size {
            options.min_group_size = v;
        }
        if let Some(v) = self.target_group_size {
            options.target_group_size = Some(v);
        }
        if let Some(v) = self.request_timeout {
            options.request_timeout = seconds(o, "request_timeout", v)?;
        }
        if let Some(v) = self.bandwidth {
            options.bandwidth = Some(v);
        }
        if let Some(v) = self.part_size_bytes {
            options.part_size_bytes = v;
        }
        if let Some(v) = self.performance_ema_alpha {
            options.performance_ema_alpha = v;
        }
        if let Some(v) = self.min_refresh_period {
            options.min_refresh_period = seconds(o, "min_refresh_period", v)?;
        }
        if let Some(v) = self.max_refresh_period {
            options.max_refresh_period = seconds(o, "max_refresh_period", v)?;
        }
        if let Some(v) = self.shutdown_timeout {
            options.shutdown_timeout = seconds(o, "shutdown_timeout", v)?;
        }
        Ok(options)
    }

    /// Every key, set to `options`' values (the inverse of [`options`](Self::options)), e.g. to write the
    /// defaults to a file. Refuses what only code can express: several parameter groups with different rates,
    /// a custom schedule, codec policies other than one fixed codec, extra tensors, and `auxiliary` (a
    /// `[node]` key).
    pub fn from_options(options: &CollaborativeOptions) -> Result<Self, ConfigError> {
        let refuse = |key: &str, reason: &str| ConfigError::NotExpressible {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let group = options
            .optimizer
            .groups
            .first()
            .ok_or_else(|| refuse("optimizer", "it has no parameter group"))?;
        if options
            .optimizer
            .groups
            .iter()
            .any(|g| g.lr != group.lr || g.weight_decay != group.weight_decay)
        {
            return Err(refuse(
                "optimizer",
                "its parameter groups have different lr or weight_decay; a file gives one of each",
            ));
        }
        let fixed = |key: &str, policy: &CodecPolicy| match policy {
            CodecPolicy::Fixed(codec) => Ok(CodecName::of(*codec)),
            _ => Err(refuse(
                key,
                "a file names one codec for every tensor (CodecPolicy::Fixed)",
            )),
        };
        if !options.extra_tensors.is_empty() {
            return Err(refuse("extra_tensors", "they depend on the model; set them in code"));
        }
        if options.auxiliary {
            return Err(refuse("auxiliary", "it is the [node] key `auxiliary`"));
        }
        let mut settings = Self {
            target_batch_size: Some(options.target_batch_size),
            batch_size_per_step: options.batch_size_per_step,
            lr: Some(group.lr),
            weight_decay: Some(group.weight_decay),
            scheduler: Some(
                Schedule::of(&options.scheduler).ok_or_else(|| refuse("scheduler", "it is a custom function"))?,
            ),
            matchmaking_time: Some(options.matchmaking_time.as_secs_f64()),
            averaging_timeout: Some(options.averaging_timeout.as_secs_f64()),
            allreduce_timeout: options.allreduce_timeout.map(|d| d.as_secs_f64()),
            next_chunk_timeout: options.next_chunk_timeout.map(|d| d.as_secs_f64()),
            load_state_timeout: Some(options.load_state_timeout.as_secs_f64()),
            reuse_grad_buffers: Some(options.reuse_grad_buffers),
            offload_optimizer: options.offload_optimizer,
            delay_optimizer_step: options.delay_optimizer_step,
            delay_grad_averaging: Some(options.delay_grad_averaging),
            delay_state_averaging: Some(options.delay_state_averaging),
            average_state_every: Some(options.average_state_every),
            use_local_updates: Some(options.use_local_updates),
            client_mode: options.client_mode,
            grad_compression: Some(fixed("grad_compression", &options.grad_compression)?),
            gradient_aggregation: Some(GradientAggregation::of(options.gradient_aggregation)),
            state_averaging_compression: Some(fixed(
                "state_averaging_compression",
                &options.state_averaging_compression,
            )?),
            load_state_compression: Some(CodecName::of(options.load_state_compression)),
            average_opt_statistics: Some(options.average_opt_statistics.clone()),
            min_group_size: Some(options.min_group_size),
            target_group_size: options.target_group_size,
            request_timeout: Some(options.request_timeout.as_secs_f64()),
            bandwidth: options.bandwidth,
            part_size_bytes: Some(options.part_size_bytes),
            performance_ema_alpha: Some(options.performance_ema_alpha),
            min_refresh_period: Some(options.min_refresh_period.as_secs_f64()),
            max_refresh_period: Some(options.max_refresh_period.as_secs_f64()),
            shutdown_timeout: Some(options.shutdown_timeout.as_secs_f64()),
            ..Self::default()
        };
        match options.optimizer.kind {
            OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                settings.optimizer = Some(OptimizerRule::Sgd);
                settings.momentum = Some(momentum);
                settings.dampening = Some(dampening);
                settings.nesterov = Some(nesterov);
            }
            OptimizerKind::Adam { beta1, beta2, eps } | OptimizerKind::AdamW { beta1, beta2, eps } => {
                settings.optimizer = Some(if matches!(options.optimizer.kind, OptimizerKind::Adam { .. }) {
                    OptimizerRule::Adam
                } else {
                    OptimizerRule::Adamw
                });
                (settings.beta1, settings.beta2, settings.eps) = (Some(beta1), Some(beta2), Some(eps));
            }
            OptimizerKind::Lamb {
                beta1,
                beta2,
                eps,
                clamp_value,
            } => {
                settings.optimizer = Some(OptimizerRule::Lamb);
                (settings.beta1, settings.beta2, settings.eps) = (Some(beta1), Some(beta2), Some(eps));
                settings.clamp_value = Some(clamp_value);
            }
        }
        Ok(settings)
    }
}

fn rule_name(rule: OptimizerRule) -> &'static str {
    match rule {
        OptimizerRule::Sgd => "sgd",
        OptimizerRule::Adam => "adam",
        OptimizerRule::Adamw => "adamw",
        OptimizerRule::Lamb => "lamb",
    }
}

/// The keys of every section, by section (for tools and the documentation test).
pub fn sections() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([("node", NodeSettings::keys()), ("optimizer", OptimizerSettings::keys())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_each_edit_once() {
        assert_eq!(edit_distance("matchmaking_tme", "matchmaking_time"), 1);
        assert_eq!(edit_distance("matchmaking_tiem", "matchmaking_time"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn nearest_ignores_far_words() {
        let keys = OptimizerSettings::keys();
        assert_eq!(nearest("target_batchsize", keys), Some("target_batch_size"));
        assert_eq!(nearest("zzzzzzzz", keys), None);
    }

    #[test]
    fn keys_are_read_from_the_structs() {
        assert!(OptimizerSettings::keys().contains(&"matchmaking_time"));
        assert!(NodeSettings::keys().contains(&"metrics_address"));
        assert_eq!(struct_keys::<Config>(), ["node", "optimizer"]);
    }
}
