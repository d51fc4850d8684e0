//! Matchmaking: peers that want to average find a group, without a coordinator.
//!
//! Every looking peer is at once a potential *leader* (it accepts followers) and a *follower* (it asks
//! better leaders to take it). Peers declare themselves under a group key with the time they intend to
//! start; a peer asks only leaders that intend to start earlier (ties broken by peer id), so requests never
//! go round in a circle and the swarm converges on the earliest leader. A leader assembles its group the
//! moment it reaches `target_group_size`, or at its declared time with at least `min_group_size`; below
//! that it disbands and looks again, until the caller's deadline. Then each member rotates its group key's
//! bits (Moshpit), so that the next round mixes different peers.
//!
//! This module is the pure core, in the style of `quinn-proto`: no sockets, clocks or threads. Time
//! ([`Time`], seconds on the run's clock) and randomness (a seed) are passed in; the runtime's
//! `Matchmaker` actor feeds it declarations, messages and timer ticks and carries out its [`search::Action`]s.
//!
//! - [`keys`]: group keys, [`keys::Declaration`]s and the board of them, the Moshpit rotation and its
//!   generator.
//! - [`messages`]: the `/colony/matchmaking/1` messages.
//! - [`search`]: [`search::Search`], one peer's search for a group: the leader and follower state machine.
//!
//! Colony differs from Hivemind where it makes groups form faster and failures clearer: a leader assembles
//! as soon as the group is full rather than at its declared time; followers learn of leaders from pushed
//! record changes instead of polling; a follower also follows the leader suggested with `NotALeader`; a
//! leader refuses a follower that should lead it (the order is checked on both sides); and a search that
//! fails says which key it looked under and what it saw ([`MatchmakingError::NoGroup`]).

pub mod keys;
pub mod messages;
pub mod search;

#[cfg(test)]
mod tests;

use std::time::Duration;

use bytes::Bytes;
use colony_transports::PeerId;

pub use keys::{Declaration, DeclarationBoard, GroupKeyManager, SplitMix64};
pub use messages::{JoinRequest, MessageCode, MessageFromLeader};
pub use search::{Action, Search, SearchRequest, SearchStatus};

/// Seconds since the Unix epoch on the run's clock (the clock records expire by).
pub type Time = f64;

/// The largest group a leader assembles, whatever its target (a bound on message sizes and memory).
pub const MAX_GROUP_SIZE: usize = 1024;

/// How peers find groups. Names and defaults follow Hivemind's `DecentralizedAverager`.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchmakingConfig {
    /// The group key prefix (`{prefix}.0b{bits}`): peers average only with peers of the same prefix, so it
    /// names what is averaged (`"grads"`, `"state"`). No `.` or `/`. Required.
    pub prefix: String,
    /// The smallest group worth averaging in. Default 2.
    pub min_group_size: usize,
    /// The group size at which a leader assembles at once; `None`: no target, a leader gathers followers
    /// until its declared time. Default `None`. For Moshpit averaging use a power of two.
    pub target_group_size: Option<usize>,
    /// The least time a peer looks before starting, the window in which others can join it. Default 5 s.
    pub min_matchmaking_time: Duration,
    /// How long a follower waits for a leader's answer. Default 3 s. Must be below `min_matchmaking_time`:
    /// Hivemind only warns, but a follower that may wait longer than its leader's whole window can miss
    /// every group, so Colony refuses the configuration.
    pub request_timeout: Duration,
    /// The group key's bits at start (Moshpit grid coordinates), e.g. `"0110"`. Default `""`: one key for
    /// the whole run.
    pub initial_group_bits: String,
    /// Largest gather payload a follower may send, bytes. Default 16 KiB.
    pub max_gather_bytes: usize,
}

impl MatchmakingConfig {
    /// The defaults, with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            min_group_size: 2,
            target_group_size: None,
            min_matchmaking_time: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            initial_group_bits: String::new(),
            max_gather_bytes: 16 * 1024,
        }
    }

    /// Checks every value; the error names the field, the value and the rule.
    pub fn validate(&self) -> Result<(), MatchmakingError> {
        let bad = |message: String| Err(MatchmakingError::InvalidConfig(message));
        if let Err(error) = keys::validate_prefix(&self.prefix) {
            return bad(format!("prefix: {error}"));
        }
        if let Err(error) = keys::validate_bits(&self.initial_group_bits) {
            return bad(format!("initial_group_bits: {error}"));
        }
        if self.min_group_size == 0 || self.min_group_size > MAX_GROUP_SIZE {
            return bad(format!(
                "min_group_size {} must be between 1 and {MAX_GROUP_SIZE}",
                self.min_group_size
            ));
        }
        if let Some(target) = self.target_group_size
            && !(self.min_group_size..=MAX_GROUP_SIZE).contains(&target)
        {
            return bad(format!(
                "target_group_size {target} must be between min_group_size ({}) and {MAX_GROUP_SIZE}",
                self.min_group_size
            ));
        }
        if self.request_timeout.is_zero() || self.min_matchmaking_time.is_zero() {
            return bad("request_timeout and min_matchmaking_time must be above zero".into());
        }
        if self.request_timeout >= self.min_matchmaking_time {
            return bad(format!(
                "request_timeout ({:?}) must be below min_matchmaking_time ({:?}): a follower that waits \
                 for a leader longer than the leader's matchmaking window can miss every group",
                self.request_timeout, self.min_matchmaking_time
            ));
        }
        if self.max_gather_bytes > 1 << 20 {
            return bad(format!(
                "max_gather_bytes {} is above 1 MiB; gather is for small metadata",
                self.max_gather_bytes
            ));
        }
        Ok(())
    }

    /// Settings that work but probably not as meant (the runtime logs them).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(target) = self.target_group_size
            && !self.initial_group_bits.is_empty()
            && !target.is_power_of_two()
        {
            warnings.push(format!(
                "target_group_size {target} is not a power of two: Moshpit rotation of the group bits spreads \
                 members over {target} buckets written in whole bits, so some keys get fewer peers"
            ));
        }
        warnings
    }
}

/// A group that assembled: the same on every member.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupInfo {
    /// Random, chosen by the leader; names the all-reduce round.
    pub group_id: [u8; 32],
    /// The members in the leader's (random) order; the all-reduce assigns parts in this order.
    pub members: Vec<PeerId>,
    /// Each member's gather bytes, aligned with `members`.
    pub gathered: Vec<Bytes>,
    /// The key the group formed under.
    pub group_key: String,
}

impl GroupInfo {
    /// Where `peer` stands in the order.
    pub fn index_of(&self, peer: &PeerId) -> Option<usize> {
        self.members.iter().position(|m| m == peer)
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group has no member (never, for a group that assembled).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Why no group came out of a search.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MatchmakingError {
    /// The deadline passed without a group of at least `min_group_size`. More peers must look under the
    /// same key at about the same time, or the timeout must be longer (or `min_group_size` smaller).
    #[error(
        "no group formed under key '{key}' within {waited:?}: saw {seen} other peer(s) looking under this key, \
         sent {requests} join request(s) (answers: {}), and gathered at most {largest_group} of the \
         min_group_size {min_group_size} as a leader; more peers must look under this key at the same time, \
         or raise the timeout",
        describe_answers(.answers)
    )]
    NoGroup {
        /// The group key searched under.
        key: String,
        /// How long the search ran.
        waited: Duration,
        /// Distinct other peers seen looking under the key.
        seen: usize,
        /// Join requests sent.
        requests: usize,
        /// How those requests were answered: (code name, or `failed` / `timed_out`, count).
        answers: Vec<(&'static str, usize)>,
        /// The largest group this peer held as a leader, itself included.
        largest_group: usize,
        /// The configured minimum.
        min_group_size: usize,
    },
    /// The search was cancelled by its caller.
    #[error("the search for a group was cancelled")]
    Cancelled,
    /// Another search of this peer is running; a peer looks for one group at a time.
    #[error("this peer is already looking for a group; wait for that search or cancel it")]
    AlreadyLooking,
    /// The request cannot be served (the error says which field and why).
    #[error("invalid group request: {0}")]
    InvalidRequest(String),
    /// The configuration is invalid (the error says which field and why).
    #[error("invalid matchmaking configuration: {0}")]
    InvalidConfig(String),
    /// The matchmaker was shut down.
    #[error("the matchmaker was shut down")]
    Shutdown,
}

fn describe_answers(answers: &[(&'static str, usize)]) -> String {
    if answers.is_empty() {
        return "none".into();
    }
    answers
        .iter()
        .map(|(name, count)| format!("{name} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
