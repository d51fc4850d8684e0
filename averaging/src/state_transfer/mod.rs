//! State transfer: a peer that is behind (or new) downloads the parameters, the optimizer's metadata and
//! the epoch from peers that have them (donors).
//!
//! **Protocol `/colony/state/1`.** The receiver opens a stream and sends one [`StateRequest`]: a chunk size
//! in values and a range of chunks (first chunk, count) of the donor's flat `f32` buffer. A donor that does
//! not share its state now answers [`StateResponse::Refused`] with its reason and finishes. Otherwise it
//! takes one snapshot and answers [`StateResponse::Info`] (epoch, schema hash, total values, chunk size),
//! whose frame payload is the optimizer's opaque metadata, then one [`StateResponse::Chunk`] per chunk of
//! the range, in order, whose frame payload is the chunk's values as raw little-endian `f32` (`4 × chunk
//! size` bytes; the buffer's last chunk may be shorter), then finishes the stream. A request it cannot serve
//! ends with an error frame saying why: a chunk size above [`MAX_CHUNK_VALUES`] before the info, a range
//! beyond its state after it (so that the receiver still learns the state does not match its own). Values
//! are never re-encoded: a payload is the bytes the receiver copies into its buffer.
//!
//! **Receiver ([`download`]).** Donors are tried by priority (their epoch), highest first, ties in random
//! order; donors below the receiver's own epoch are refused unasked. The first donor whose info matches
//! the receiver's layout (schema hash, total values) and epoch sets the epoch and metadata of the result.
//! Other donors of the same priority then join it, up to [`DownloadConfig::max_parallel_donors`], each
//! taking half of the largest range still to come; a donor announcing another epoch is not mixed in. Every
//! chunk has its own timeout and is checked (length, finite values); a donor that fails, stalls or lies is
//! dropped with the reason kept, and its remaining chunks go to the donors still serving, or to the next
//! donor in line. When every donor of the chosen epoch is gone, a lone donor of another epoch restarts the
//! assembly rather than leave the receiver with nothing.
//!
//! Chunks are 64 KiB by default ([`DEFAULT_CHUNK_BYTES`]) because they measured faster than 1 MiB:
//! downloading 32 MiB (8 M values) over the in-process transport, release build, best of 9 interleaved
//! runs on a shared 2-core VM, took 48 ms with 64 KiB chunks and 54 ms with 1 MiB from one donor, and
//! 61 ms against 113 ms from three donors in parallel. Small chunks stay in the CPU caches between the
//! donor's encoding, the receiver's checks and its copy, and give parallel donors a finer split; per-chunk
//! costs (a frame header, an event) are negligible at that size. (In process the CPU is the bottleneck, so
//! parallel donors do not beat one; they pay off when each donor's uplink is.)

mod donor;
mod download;
mod plan;
mod wire;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use colony_transports::PeerId;
use colony_transports::rpc::StreamConfig;
use colony_transports::wire::ProtocolId;

use crate::tensor::{FlatTensors, SchemaHash};

pub use donor::serve;
pub use download::download;
/// The chunk arithmetic and payload checks, reachable for the fuzz targets (`fuzz/`); not a public API.
#[doc(hidden)]
pub use wire::{ChunkFault, check_chunk, chunk_count, chunk_range, decode_values, encode_values};
pub use wire::{StateInfo, StateRequest, StateResponse};

/// The protocol's name in `/colony/<name>/<version>`.
pub const PROTOCOL_NAME: &str = "state";
/// The protocol's version; a change of the messages or of their order bumps it.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest chunk a donor serves, in values (64 MiB of `f32`, the default frame payload limit): a bound on
/// what one request makes a donor allocate at once.
pub const MAX_CHUNK_VALUES: u64 = 16 * 1024 * 1024;
/// Default chunk size in bytes (see the module documentation for why 64 KiB).
pub const DEFAULT_CHUNK_BYTES: usize = 64 * 1024;
/// Default bound on the optimizer metadata a receiver accepts.
pub const DEFAULT_MAX_METADATA_BYTES: usize = 1024 * 1024;

/// `/colony/state/1`, the id both sides use.
pub fn protocol() -> ProtocolId {
    ProtocolId::new(PROTOCOL_NAME, PROTOCOL_VERSION).expect("\"state\" is a valid protocol name")
}

/// What a donor serves: one consistent view of its state. Shared behind an `Arc` so that serving many
/// receivers costs no copy of the tensors.
#[derive(Debug, Clone)]
pub struct StateSnapshot {
    /// The epoch the state belongs to; receivers refuse epochs below their own.
    pub epoch: u64,
    /// The optimizer's own state (step counters, hyper-parameters…), opaque to Colony; receivers accept
    /// up to [`DownloadConfig::max_metadata_bytes`].
    pub metadata: Bytes,
    /// Parameters and optimizer statistics, in the layout every peer of the run shares.
    pub tensors: FlatTensors,
}

/// Where a donor gets its state from: the trainer decides when its state may be shared (not in the middle
/// of a step, not when it knows it is behind).
pub trait StateProvider: Send + Sync + 'static {
    /// The state to serve now, or `None` to refuse requests (receivers then move on to other donors).
    fn snapshot(&self) -> Option<Arc<StateSnapshot>>;
}

/// Any closure can be a provider, which keeps simple hosts and tests free of wrapper types.
impl<F> StateProvider for F
where
    F: Fn() -> Option<Arc<StateSnapshot>> + Send + Sync + 'static,
{
    fn snapshot(&self) -> Option<Arc<StateSnapshot>> {
        self()
    }
}

/// A peer that may serve the state, as the receiver learnt of it (from the shared records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Donor {
    /// Who to ask.
    pub peer: PeerId,
    /// The epoch it announced: higher is asked first. The donor's info must confirm it is not behind.
    pub priority: u64,
}

/// How a download behaves. The defaults suit a WAN; tests shorten the timeouts.
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// Longest wait for each step of a stream: connecting, the info, and every single chunk. A donor past
    /// it is dropped and its chunks go to others. Default 15 s.
    pub chunk_timeout: Duration,
    /// Longest the whole download may take. Default 600 s.
    pub total_timeout: Duration,
    /// How many donors of the best priority serve chunks at the same time. Default 4.
    pub max_parallel_donors: usize,
    /// Largest metadata accepted; a donor sending more is dropped. Default 1 MiB.
    pub max_metadata_bytes: usize,
    /// Chunk size in bytes (rounded down to whole 4-byte values). Default 64 KiB.
    pub chunk_bytes: usize,
    /// Seed of the random order among donors of equal priority; `None` draws one. Tests set it.
    pub tie_break_seed: Option<u64>,
    /// Frame limits of the download streams. Payloads are further bounded by the larger of
    /// `chunk_bytes` and `max_metadata_bytes`, and each message waits `chunk_timeout`, not
    /// `stream.message_timeout`.
    pub stream: StreamConfig,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            chunk_timeout: Duration::from_secs(15),
            total_timeout: Duration::from_secs(600),
            max_parallel_donors: 4,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            tie_break_seed: None,
            stream: StreamConfig::default(),
        }
    }
}

/// A downloaded state, ready to load into the trainer.
#[derive(Debug, Clone)]
pub struct DownloadedState {
    /// The epoch of the state (announced by every donor whose chunks it holds).
    pub epoch: u64,
    /// The optimizer metadata of the first donor of that epoch.
    pub metadata: Bytes,
    /// The values, in the receiver's layout.
    pub tensors: FlatTensors,
    /// The donors whose data the state holds: the one that gave the epoch and metadata, and every donor
    /// that served chunks, in the order they were tried.
    pub donors: Vec<PeerId>,
    /// Donors refused or dropped on the way, with why: worth logging, and a hint of misbehaving peers.
    pub issues: Vec<DonorReport>,
}

/// Why a donor was not used, or stopped being used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DonorIssue {
    /// Its announced priority is below the receiver's epoch: it cannot help, so it was not asked.
    #[error("its priority {priority} is below our epoch {own_epoch}")]
    PriorityBelowOwnEpoch {
        /// The donor's priority.
        priority: u64,
        /// The receiver's epoch.
        own_epoch: u64,
    },
    /// Its state turned out older than the receiver's.
    #[error("it serves epoch {epoch}, below our epoch {own_epoch}")]
    EpochBelowOwn {
        /// The epoch it announced.
        epoch: u64,
        /// The receiver's epoch.
        own_epoch: u64,
    },
    /// It does not share its state now.
    #[error("it refused: {0}")]
    NotSharing(String),
    /// Its tensors are not the receiver's (another model or version).
    #[error("its schema hash {announced:?} differs from ours {expected:?}")]
    SchemaMismatch {
        /// The donor's schema hash.
        announced: SchemaHash,
        /// The receiver's.
        expected: SchemaHash,
    },
    /// Its buffer has another number of values than the receiver's layout.
    #[error("its state holds {announced} values, ours {expected}")]
    SizeMismatch {
        /// Values it announced.
        announced: u64,
        /// Values of the receiver's layout.
        expected: u64,
    },
    /// It serves another epoch than the donors whose chunks are already taken, so it is not mixed in.
    #[error("it serves epoch {announced} while the state is assembled from epoch {assembled}")]
    EpochDiffers {
        /// The epoch it announced.
        announced: u64,
        /// The epoch of the state being assembled.
        assembled: u64,
    },
    /// Its metadata is larger than [`DownloadConfig::max_metadata_bytes`].
    #[error("its metadata of {len} bytes exceeds the limit of {limit} bytes")]
    MetadataTooLarge {
        /// Bytes it sent.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A chunk payload has the wrong length.
    #[error("chunk {index} has {bytes} bytes instead of {expected_bytes}")]
    ChunkLength {
        /// The chunk.
        index: u64,
        /// Bytes received.
        bytes: usize,
        /// Bytes its values need.
        expected_bytes: usize,
    },
    /// A chunk holds NaN or an infinity.
    #[error("chunk {index} holds a non-finite value at position {position}")]
    NonFinite {
        /// The chunk.
        index: u64,
        /// The value's position within the chunk.
        position: usize,
    },
    /// It broke the protocol (messages out of order, wrong chunk numbers, undecodable frames).
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// No connection could be opened to it.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// A step of its stream took longer than [`DownloadConfig::chunk_timeout`].
    #[error("timed out: {0}")]
    TimedOut(String),
    /// It ended the stream with an error of its own.
    #[error("it reported an error: {0}")]
    DonorError(String),
    /// The stream or the connection failed (the donor left, was killed, or reset the stream).
    #[error("stream failed: {0}")]
    StreamFailed(String),
}

impl DonorIssue {
    /// Whether the donor declined or did not fit (as opposed to failing or misbehaving while serving).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            DonorIssue::PriorityBelowOwnEpoch { .. }
                | DonorIssue::EpochBelowOwn { .. }
                | DonorIssue::NotSharing(_)
                | DonorIssue::SchemaMismatch { .. }
                | DonorIssue::SizeMismatch { .. }
                | DonorIssue::EpochDiffers { .. }
        )
    }
}

/// A donor and what went wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DonorReport {
    /// The donor.
    pub peer: PeerId,
    /// The priority it was tried at.
    pub priority: u64,
    /// Why it was refused or dropped.
    pub issue: DonorIssue,
}

impl fmt::Display for DonorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (priority {}): {}", self.peer, self.priority, self.issue)
    }
}

/// Why no state could be downloaded. Every variant that tried donors lists each one and why it failed, so
/// an operator can tell "everyone is behind" from "the network is broken".
#[derive(Debug, Clone, thiserror::Error)]
pub enum DownloadError {
    /// The donor list was empty (no peer has announced a state yet).
    #[error("no donors to download the state from")]
    NoDonors,
    /// The configuration cannot work (e.g. chunks smaller than one value); fix the caller.
    #[error("invalid download configuration: {0}")]
    InvalidConfig(String),
    /// Every donor was refused or failed before the state was complete.
    #[error("no donor could provide the state: {}", list(.donors))]
    Exhausted {
        /// Each donor and why it was not used.
        donors: Vec<DonorReport>,
    },
    /// The download ran past [`DownloadConfig::total_timeout`].
    #[error("the state download did not finish within {after:?}: {}", list(.donors))]
    TimedOut {
        /// The total timeout.
        after: Duration,
        /// Donors refused or failed until then.
        donors: Vec<DonorReport>,
    },
}

impl DownloadError {
    /// The donors tried and why each failed (empty when none was tried).
    pub fn donors(&self) -> &[DonorReport] {
        match self {
            DownloadError::Exhausted { donors } | DownloadError::TimedOut { donors, .. } => donors,
            DownloadError::NoDonors | DownloadError::InvalidConfig(_) => &[],
        }
    }
}

fn list(donors: &[DonorReport]) -> String {
    if donors.is_empty() {
        return "no donor answered".to_owned();
    }
    donors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}
