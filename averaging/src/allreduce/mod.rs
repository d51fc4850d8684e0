//! The fault-tolerant butterfly all-reduce: reduce-scatter then all-gather among one group.
//!
//! Every member computes the same [`PartitionPlan`] from the group's shares: each *reducer* owns a
//! contiguous run of parts. Every *sender* (trainers and clients; auxiliaries send nothing) opens one stream
//! per other reducer and streams it the parts it owns, encoded with the codec its [`CodecPolicy`] picks for
//! the tensor; the reducer accumulates `Σ w·part / Σ w` part by part ([`crate::reducer::PartReducer`]) and
//! streams back `average − the sender's decoded part` in the same codec, so a sender's own compression
//! error cancels for its own contribution (an uncompressed part has no such error: its senders all get the
//! average itself, the same bytes). A peer's own parts are reduced locally, without encoding.
//! Sending and receiving overlap; a sender that reduces nothing (a client) reads its results only after it
//! has sent everything, so a slow uplink is not also asked to carry acknowledgements.
//!
//! Failures (DESIGN.md §5):
//! - a sender that does not open its stream, or stalls between parts longer than `sender_timeout`, is
//!   dropped from every later part of that reducer (earlier parts keep its contribution);
//! - a reducer that fails, refuses, or stalls between results longer than `reducer_timeout` leaves its parts
//!   with the sender's local values;
//! - the round fails as a whole only when this peer's own run cannot continue (bad plan, cancellation, the
//!   overall `allreduce_timeout`).
//!
//! A part that holds NaN or infinity (a sender's part, or a reducer's result) is refused: its sender is
//! dropped (or the reducer counts as failed) and the refusal is counted in [`Report::non_finite_parts`] and
//! the `colony_allreduce_parts_refused_total{reason="non_finite"}` metric. A reducer combines the copies it
//! receives with the config's [`Aggregation`]: the weighted mean, or CenteredClip, which bounds how far one
//! sender's copy can pull the result (see [`crate::aggregation`]).
//!
//! Results are delivered tensor by tensor, in order, as soon as all parts of a tensor are in
//! ([`AllReduceRun::next_tensor`]); [`AllReduceRun::finish`] returns the whole averaged buffer and a
//! [`Report`] of what failed. The round averages in place: each part's result is written over the part in
//! the buffer the caller gave to [`start`], and that same buffer comes back (a copy only when a payload of
//! it is still queued on a broken connection when the round ends). The sums of the parts this peer reduces
//! reuse the [`AllReduceService`]'s spare buffers ([`ServiceConfig::spare_sum_buffers`]), so a round does
//! not fault in fresh memory of the vector's size.

mod buffer;
mod messages;
mod run;
mod service;

use std::time::Duration;

use colony_transports::PeerId;
use colony_transports::rpc::StreamConfig;
use thiserror::Error;

pub use messages::{Refusal, ToReducer, ToSender};
pub use run::{AllReduceRun, TensorReady, start};
pub use service::{AllReduceService, ServiceConfig, protocol};

use crate::aggregation::Aggregation;
use crate::codec::CodecPolicy;
use crate::partition::PartitionError;
use crate::tensor::FlatTensors;

/// A group's id, chosen at random by its leader.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupId(pub [u8; 32]);

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupId(")?;
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// How a member takes part in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerMode {
    /// Sends its tensors and reduces parts for others.
    Node,
    /// Sends its tensors, reduces nothing and is never dialed (behind NAT).
    Client,
    /// Sends nothing, reduces parts for others, receives no result.
    Auxiliary,
}

/// One member of a group, as every member sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupMember {
    /// Its id.
    pub peer: PeerId,
    /// How it takes part.
    pub mode: PeerMode,
    /// Its weight in the average (ignored for auxiliaries).
    pub weight: f32,
    /// Its share of the vector to reduce, from load balancing (forced to 0 for clients).
    pub share: f64,
}

/// What every member of a group agrees on before the all-reduce: the group id and the ordered members.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPlan {
    /// The group id.
    pub group_id: GroupId,
    /// The members, in the leader's order (identical on every member).
    pub members: Vec<GroupMember>,
}

/// Settings of one all-reduce.
#[derive(Debug, Clone)]
pub struct AllReduceConfig {
    /// Target size of one encoded part (512 KiB); parts of a tensor hold `part_size_bytes /
    /// codec.bytes_per_value()` values.
    pub part_size_bytes: usize,
    /// A reducer drops a sender that has not opened its stream, or sent its next part, within this time.
    pub sender_timeout: Duration,
    /// A sender gives up on a reducer whose next result does not arrive within this time; keep it above
    /// `sender_timeout`, since a reducer waits for its slowest sender before it answers.
    pub reducer_timeout: Duration,
    /// The whole round's limit.
    pub allreduce_timeout: Duration,
    /// Codec per tensor. Every member must use the same policy: part boundaries depend on it.
    pub codecs: CodecPolicy,
    /// How this peer, as a reducer, combines the senders' copies of its parts. Each reducer applies its own
    /// setting to the parts it owns, so a group is robust only where every reducer clips. Default the mean.
    pub aggregation: Aggregation,
    /// Frame limits and stream settings.
    pub stream: StreamConfig,
    /// Deliberate faults, for tests of the failure rules only.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl Default for AllReduceConfig {
    fn default() -> Self {
        Self {
            part_size_bytes: 512 * 1024,
            sender_timeout: Duration::from_secs(15),
            reducer_timeout: Duration::from_secs(30),
            allreduce_timeout: Duration::from_secs(60),
            codecs: CodecPolicy::default(),
            aggregation: Aggregation::Mean,
            stream: StreamConfig::default(),
            fault: None,
        }
    }
}

/// Deliberate misbehaviour of one peer, for fault-tolerance tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After its first part to the last reducer, stall that stream for 10 s.
    SlowSending,
    /// After its first part to the last reducer, reset that stream.
    FailSending,
    /// After three results sent as a reducer, stall every result stream for 10 s.
    SlowReducing,
    /// After three results sent as a reducer, reset every stream of its reducer side.
    FailReducing,
    /// Refuse every sender with "cancelled" and send nothing.
    Cancel,
}

/// Why a round could not run or failed as a whole.
#[derive(Debug, Error)]
pub enum AllReduceError {
    /// The plan is unusable (names what).
    #[error("invalid group plan: {0}")]
    InvalidPlan(String),
    /// The configuration is unusable (names the setting).
    #[error("invalid all-reduce configuration: {0}")]
    InvalidConfig(String),
    /// This peer is not a member of the plan.
    #[error("peer {0} is not a member of group {1:?}")]
    NotAMember(PeerId, GroupId),
    /// A sender gave no tensors, or tensors of another layout.
    #[error("this peer sends tensors but {0}")]
    BadInput(String),
    /// The parts could not be planned.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// The run did not finish within `allreduce_timeout`.
    #[error("the all-reduce did not finish within {0:?}")]
    Timeout(Duration),
    /// The run was cancelled.
    #[error("the all-reduce was cancelled")]
    Cancelled,
}

/// What a finished round did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Parts of the vector.
    pub parts: usize,
    /// Parts whose averaged value this peer holds (the others kept local values).
    pub parts_averaged: usize,
    /// Reducers that failed this peer (their parts kept local values).
    pub failed_reducers: Vec<PeerId>,
    /// Senders this peer's reducer dropped (they count only for parts they delivered before).
    pub dropped_senders: Vec<PeerId>,
    /// The round hit `allreduce_timeout`: parts without a result kept local values.
    pub timed_out: bool,
    /// Parts refused because they held NaN or infinity: senders' parts this peer was to reduce (the sender
    /// was dropped) and results from reducers (the reducer counts as failed).
    pub non_finite_parts: usize,
    /// Copies of parts this peer reduced that CenteredClip clipped (0 with the mean). Many clipped copies in
    /// every round, from every sender, mean τ is below the honest senders' spread.
    pub clipped_copies: usize,
}

/// The result of a round: the averaged tensors (none for an auxiliary peer) and the report.
#[derive(Debug)]
pub struct Outcome {
    /// Averaged values (local values where a reducer failed), in the buffer the caller gave to [`start`];
    /// `None` for an auxiliary peer.
    pub tensors: Option<FlatTensors>,
    /// What happened.
    pub report: Report,
}

impl GroupPlan {
    /// Checks the plan and returns the index of `me`.
    pub(crate) fn validate(&self, me: PeerId) -> Result<usize, AllReduceError> {
        if self.members.is_empty() {
            return Err(AllReduceError::InvalidPlan("the group has no members".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for (index, member) in self.members.iter().enumerate() {
            if !seen.insert(member.peer) {
                return Err(AllReduceError::InvalidPlan(format!(
                    "peer {} appears twice",
                    member.peer
                )));
            }
            if !(member.weight.is_finite() && member.weight >= 0.0) {
                return Err(AllReduceError::InvalidPlan(format!(
                    "member {index} has weight {}; weights must be finite and non-negative",
                    member.weight
                )));
            }
            if !(member.share.is_finite() && member.share >= 0.0) {
                return Err(AllReduceError::InvalidPlan(format!(
                    "member {index} has share {}; shares must be finite and non-negative",
                    member.share
                )));
            }
        }
        self.members
            .iter()
            .position(|m| m.peer == me)
            .ok_or(AllReduceError::NotAMember(me, self.group_id))
    }

    /// Shares as the partition uses them: clients reduce nothing.
    pub(crate) fn effective_shares(&self) -> Vec<f64> {
        self.members
            .iter()
            .map(|m| if m.mode == PeerMode::Client { 0.0 } else { m.share })
            .collect()
    }
}
