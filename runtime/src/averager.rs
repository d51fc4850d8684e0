//! The averager: one call averages this peer's tensors with a group of peers.
//!
//! [`Averager::step`] looks for a group with the [`Matchmaker`] (under the averager's group key, with the
//! tensors' schema hash), learns every member's role, weight and bandwidth from the bytes each one
//! gathered, splits the vector with load balancing, and runs the butterfly all-reduce
//! ([`colony_averaging::allreduce`]) over membership's connections. It is what Hivemind's
//! `DecentralizedAverager.step` does, without a background process.
//!
//! The protocols it serves must be on membership's router from the start: create [`AveragerServices`],
//! pass [`AveragerServices::register`] to [`Membership::start_with`], then start the averager.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony_averaging::allreduce::{
    self, AllReduceConfig, AllReduceError, AllReduceService, GroupId, GroupMember, GroupPlan, Outcome, PeerMode,
    ServiceConfig,
};
use colony_averaging::balance::{BalanceError, load_balance_peers};
use colony_averaging::matchmaking::{GroupInfo, MatchmakingConfig, MatchmakingError};
use colony_averaging::tensor::{FlatTensors, TensorLayout};
use colony_transports::rpc::Router;
use thiserror::Error;

use crate::actors::matchmaker::{GroupRequest, Matchmaker, MatchmakingService};
use crate::membership::{Membership, Role};

/// The protocols of an averager, to register on membership's router before membership starts.
#[derive(Clone)]
pub struct AveragerServices {
    /// `/colony/matchmaking/1`.
    pub matchmaking: MatchmakingService,
    /// `/colony/allreduce/1`.
    pub allreduce: AllReduceService,
}

impl AveragerServices {
    /// Services whose all-reduce side waits `config.registration_timeout` for a round that starts late.
    pub fn new(config: ServiceConfig) -> Self {
        Self {
            matchmaking: MatchmakingService::new(),
            allreduce: AllReduceService::new(config),
        }
    }

    /// Serves both protocols on `router`.
    pub fn register(&self, router: &mut Router) {
        self.matchmaking.register(router);
        self.allreduce.serve(router);
    }
}

impl Default for AveragerServices {
    fn default() -> Self {
        Self::new(ServiceConfig::default())
    }
}

/// Settings of an [`Averager`].
#[derive(Debug, Clone)]
pub struct AveragerConfig {
    /// Group key prefix, sizes and timings of matchmaking.
    pub matchmaking: MatchmakingConfig,
    /// Part size, timeouts and codecs of the all-reduce.
    pub allreduce: AllReduceConfig,
    /// Reduce for others but send nothing and receive no result (Hivemind's `auxiliary`).
    pub auxiliary: bool,
    /// Send and receive results but never lead a group or reduce, even on a peer that listens (a
    /// non-listening peer is always in client mode).
    pub client_mode: bool,
    /// This peer's bandwidth for load balancing, in any unit shared by the run (Mbit/s is usual); `None`
    /// counts as the group's mean, 0 reduces nothing.
    pub bandwidth: Option<f64>,
    /// A peer's share below this many values is dropped and given to the others.
    pub min_vector_size: usize,
}

impl AveragerConfig {
    /// Defaults with the group key prefix `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            matchmaking: MatchmakingConfig::new(prefix),
            allreduce: AllReduceConfig::default(),
            auxiliary: false,
            client_mode: false,
            bandwidth: None,
            min_vector_size: 0,
        }
    }
}

/// Why a step did not average.
#[derive(Debug, Error)]
pub enum AveragerError {
    /// No group formed (too few peers, timeout, cancellation).
    #[error(transparent)]
    Matchmaking(#[from] MatchmakingError),
    /// A member gathered bytes that are not an averager's (names the member).
    #[error("member {member} of the group sent an invalid gather: {reason}")]
    BadGather {
        /// Its index in the group.
        member: usize,
        /// What was wrong.
        reason: String,
    },
    /// Nobody in the group can reduce (every member is a client or declared bandwidth 0).
    #[error(transparent)]
    Balance(#[from] BalanceError),
    /// The all-reduce could not run.
    #[error(transparent)]
    AllReduce(#[from] AllReduceError),
    /// The tensors do not fit the averager.
    #[error("{0}")]
    BadInput(String),
}

/// How [`Averager::find_group`] looks for a group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupOptions {
    /// How long to look before failing.
    pub timeout: Duration,
    /// When this peer intends to start averaging, on the run's clock (`None`: after the matchmaking
    /// window); a group that reaches its expected size starts earlier.
    pub scheduled_start: Option<f64>,
    /// How many peers are expected in the group, this one included, when the caller knows.
    pub expected_group_size: Option<usize>,
    /// Groups only with peers that pass the same round (the collaborative optimizer passes the epoch);
    /// `None` matches any peer of the same tensors.
    pub round: Option<u64>,
}

impl GroupOptions {
    /// Look for at most `timeout`, with no schedule and no expected size.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            scheduled_start: None,
            expected_group_size: None,
            round: None,
        }
    }
}

/// A finished step: the group and the all-reduce's outcome.
#[derive(Debug)]
pub struct Averaged {
    /// Who averaged together.
    pub group: GroupInfo,
    /// The averaged tensors (none for an auxiliary) and what failed.
    pub outcome: Outcome,
}

/// Averages one set of tensors (one [`TensorLayout`]) with the swarm, step by step.
pub struct Averager {
    membership: Membership,
    matchmaker: Matchmaker,
    services: AveragerServices,
    layout: Arc<TensorLayout>,
    config: AveragerConfig,
    mode: PeerMode,
}

/// What every member tells the group about itself: version, mode, weight, bandwidth (NaN = not given).
const GATHER_LEN: usize = 1 + 1 + 4 + 8;
const GATHER_VERSION: u8 = 1;

/// The gather bytes a member shares with its group (public for the fuzz targets' seeds only).
#[doc(hidden)]
pub fn encode_gather(mode: PeerMode, weight: f32, bandwidth: Option<f64>) -> Bytes {
    let mut bytes = Vec::with_capacity(GATHER_LEN);
    bytes.push(GATHER_VERSION);
    bytes.push(match mode {
        PeerMode::Node => 0,
        PeerMode::Client => 1,
        PeerMode::Auxiliary => 2,
    });
    bytes.extend_from_slice(&weight.to_le_bytes());
    bytes.extend_from_slice(&bandwidth.unwrap_or(f64::NAN).to_le_bytes());
    Bytes::from(bytes)
}

/// Reads a member's gather bytes, as received from the group's leader (public for the fuzz targets only).
#[doc(hidden)]
pub fn decode_gather(bytes: &[u8]) -> Result<(PeerMode, f32, Option<f64>), String> {
    if bytes.len() != GATHER_LEN {
        return Err(format!("{} bytes, expected {GATHER_LEN}", bytes.len()));
    }
    if bytes[0] != GATHER_VERSION {
        return Err(format!("version {}, expected {GATHER_VERSION}", bytes[0]));
    }
    let mode = match bytes[1] {
        0 => PeerMode::Node,
        1 => PeerMode::Client,
        2 => PeerMode::Auxiliary,
        other => return Err(format!("unknown mode {other}")),
    };
    let weight = f32::from_le_bytes(bytes[2..6].try_into().expect("4 bytes"));
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(format!("weight {weight}; weights are finite and non-negative"));
    }
    let bandwidth = f64::from_le_bytes(bytes[6..14].try_into().expect("8 bytes"));
    let bandwidth = if bandwidth.is_nan() {
        None
    } else if bandwidth.is_finite() && bandwidth >= 0.0 {
        Some(bandwidth)
    } else {
        return Err(format!("bandwidth {bandwidth}; bandwidths are finite and non-negative"));
    };
    Ok((mode, weight, bandwidth))
}

impl Averager {
    /// Starts an averager for `layout` on `membership`, whose router serves `services`.
    pub fn start(
        membership: &Membership,
        services: &AveragerServices,
        layout: Arc<TensorLayout>,
        config: AveragerConfig,
    ) -> Result<Self, AveragerError> {
        let matchmaker = Matchmaker::start(membership, &services.matchmaking, config.matchmaking.clone())?;
        let mode = match membership.role() {
            Role::Client => PeerMode::Client,
            Role::Auxiliary => PeerMode::Auxiliary,
            Role::Trainer if config.auxiliary => PeerMode::Auxiliary,
            Role::Trainer if config.client_mode => PeerMode::Client,
            Role::Trainer => PeerMode::Node,
        };
        Ok(Self {
            membership: membership.clone(),
            matchmaker,
            services: services.clone(),
            layout,
            config,
            mode,
        })
    }

    /// How this peer takes part in rounds.
    pub fn mode(&self) -> PeerMode {
        self.mode
    }

    /// The matchmaker (group bits, status, cancel).
    pub fn matchmaker(&self) -> &Matchmaker {
        &self.matchmaker
    }

    /// Finds a group within `timeout` and averages `tensors` (`None` for an auxiliary) with it, weighted by
    /// `weight`. Dropping the future cancels the step.
    pub async fn step(
        &self,
        tensors: Option<FlatTensors>,
        weight: f32,
        timeout: Duration,
    ) -> Result<Averaged, AveragerError> {
        self.check_tensors(tensors.as_ref())?;
        let group = self.find_group(weight, GroupOptions::new(timeout)).await?;
        let outcome = self.average_in(&group, tensors).await?;
        Ok(Averaged { group, outcome })
    }

    /// The first half of [`Averager::step`]: finds a group, telling it this peer's `weight`. Lets a caller
    /// match ahead of time (while its tensors are still being computed) and average later with
    /// [`Averager::average_in`]; the other members' all-reduce waits for this peer's parts up to their
    /// sender timeout. Dropping the future cancels the search.
    pub async fn find_group(&self, weight: f32, options: GroupOptions) -> Result<GroupInfo, AveragerError> {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(AveragerError::BadInput(format!(
                "weight {weight}; weights are finite and non-negative"
            )));
        }
        let weight = if self.mode == PeerMode::Auxiliary { 0.0 } else { weight };
        let hash = match options.round {
            Some(round) => self.layout.round_hash(round),
            None => self.layout.schema_hash(),
        };
        let mut request = GroupRequest::new(hash, options.timeout);
        request.gather = encode_gather(self.mode, weight, self.config.bandwidth);
        request.client_mode = self.mode == PeerMode::Client;
        request.scheduled_start = options.scheduled_start;
        request.expected_group_size = options.expected_group_size;
        let timer = MetricsTimer::new(record_matchmaking);
        let result = self.matchmaker.look_for_group(request).await;
        timer.finish(match &result {
            Ok(_) => Ok(()),
            Err(error) => Err(matchmaking_failure_reason(error)),
        });
        Ok(result?)
    }

    /// The second half of [`Averager::step`]: averages `tensors` (`None` for an auxiliary) with `group`,
    /// found by [`Averager::find_group`]. Dropping the future cancels the all-reduce.
    pub async fn average_in(&self, group: &GroupInfo, tensors: Option<FlatTensors>) -> Result<Outcome, AveragerError> {
        self.check_tensors(tensors.as_ref())?;
        let timer = MetricsTimer::new(record_allreduce);
        let result = self.run_allreduce(group, tensors).await;
        timer.finish(match &result {
            Ok(outcome) => Ok(outcome),
            Err(error) => Err(allreduce_failure_reason(error)),
        });
        result
    }

    async fn run_allreduce(&self, group: &GroupInfo, tensors: Option<FlatTensors>) -> Result<Outcome, AveragerError> {
        let plan = self.plan(group)?;
        let run = allreduce::start(
            &self.services.allreduce,
            self.membership.connector(),
            plan,
            self.membership.local_peer(),
            self.layout.clone(),
            tensors,
            self.config.allreduce.clone(),
        )?;
        Ok(run.finish().await?)
    }

    fn check_tensors(&self, tensors: Option<&FlatTensors>) -> Result<(), AveragerError> {
        if let Some(tensors) = tensors
            && **tensors.layout() != *self.layout
        {
            return Err(AveragerError::BadInput(
                "the tensors are not of this averager's layout".into(),
            ));
        }
        if tensors.is_none() && self.mode != PeerMode::Auxiliary {
            return Err(AveragerError::BadInput(
                "only an auxiliary peer averages without tensors".into(),
            ));
        }
        Ok(())
    }

    /// The tensors' layout.
    pub fn layout(&self) -> &Arc<TensorLayout> {
        &self.layout
    }

    /// The all-reduce plan every member derives identically from the group.
    fn plan(&self, group: &GroupInfo) -> Result<GroupPlan, AveragerError> {
        if group.gathered.len() != group.members.len() {
            return Err(AveragerError::BadGather {
                member: group.gathered.len().min(group.members.len()),
                reason: "the group's gather list does not match its members".into(),
            });
        }
        let mut members = Vec::with_capacity(group.members.len());
        let mut bandwidths = Vec::with_capacity(group.members.len());
        for (index, (peer, gathered)) in group.members.iter().zip(&group.gathered).enumerate() {
            let (mode, weight, bandwidth) =
                decode_gather(gathered).map_err(|reason| AveragerError::BadGather { member: index, reason })?;
            bandwidths.push(if mode == PeerMode::Client { Some(0.0) } else { bandwidth });
            members.push(GroupMember {
                peer: *peer,
                mode,
                weight,
                share: 0.0,
            });
        }
        let shares = load_balance_peers(self.layout.total_values(), &bandwidths, self.config.min_vector_size)?;
        for (member, share) in members.iter_mut().zip(shares) {
            member.share = share as f64;
        }
        Ok(GroupPlan {
            group_id: GroupId(group.group_id),
            members,
        })
    }

    /// Stops the matchmaker; a step in progress fails.
    pub fn shutdown(&self) {
        self.matchmaker.shutdown();
    }
}

/// Times one matchmaking search or all-reduce and records it when finished, or as `cancelled` when the
/// caller drops the future first (the optimizer does so when a round is abandoned).
struct MetricsTimer<T> {
    started: Instant,
    record: fn(Duration, Result<T, &'static str>),
    finished: bool,
}

impl<T> MetricsTimer<T> {
    fn new(record: fn(Duration, Result<T, &'static str>)) -> Self {
        Self {
            started: Instant::now(),
            record,
            finished: false,
        }
    }

    fn finish(mut self, result: Result<T, &'static str>) {
        self.finished = true;
        (self.record)(self.started.elapsed(), result);
    }
}

impl<T> Drop for MetricsTimer<T> {
    fn drop(&mut self) {
        if !self.finished {
            (self.record)(self.started.elapsed(), Err("cancelled"));
        }
    }
}

/// `colony_matchmaking_seconds{outcome}` (`found` or the failure's reason) and
/// `colony_matchmaking_failures_total{reason}`.
fn record_matchmaking(elapsed: Duration, result: Result<(), &'static str>) {
    let outcome = match result {
        Ok(()) => "found",
        Err(reason) => {
            metrics::counter!("colony_matchmaking_failures_total", "reason" => reason).increment(1);
            reason
        }
    };
    metrics::histogram!("colony_matchmaking_seconds", "outcome" => outcome).record(elapsed.as_secs_f64());
}

fn matchmaking_failure_reason(error: &MatchmakingError) -> &'static str {
    match error {
        MatchmakingError::NoGroup { .. } => "no_group",
        MatchmakingError::Cancelled => "cancelled",
        MatchmakingError::AlreadyLooking => "already_looking",
        MatchmakingError::InvalidRequest(_) => "invalid_request",
        MatchmakingError::InvalidConfig(_) => "invalid_config",
        MatchmakingError::Shutdown => "shutdown",
    }
}

/// `colony_allreduce_seconds` for a round that finished (even with parts kept local), and
/// `colony_allreduce_failures_total{reason}` for a round that did not, or for each peer that failed this one
/// within a finished round.
fn record_allreduce(elapsed: Duration, result: Result<&Outcome, &'static str>) {
    let failures = |reason: &'static str, count: usize| {
        if count > 0 {
            metrics::counter!("colony_allreduce_failures_total", "reason" => reason).increment(count as u64);
        }
    };
    match result {
        Ok(outcome) => {
            metrics::histogram!("colony_allreduce_seconds").record(elapsed.as_secs_f64());
            let report = &outcome.report;
            failures("reducer_failed", report.failed_reducers.len());
            failures("sender_dropped", report.dropped_senders.len());
            failures("partial_timeout", usize::from(report.timed_out));
        }
        Err(reason) => failures(reason, 1),
    }
}

fn allreduce_failure_reason(error: &AveragerError) -> &'static str {
    match error {
        AveragerError::Matchmaking(_) => "matchmaking",
        AveragerError::BadGather { .. } => "bad_gather",
        AveragerError::Balance(_) => "balance",
        AveragerError::BadInput(_) => "bad_input",
        AveragerError::AllReduce(error) => match error {
            AllReduceError::InvalidPlan(_) => "invalid_plan",
            AllReduceError::InvalidConfig(_) => "invalid_config",
            AllReduceError::NotAMember(..) => "not_a_member",
            AllReduceError::BadInput(_) => "bad_input",
            AllReduceError::Partition(_) => "partition",
            AllReduceError::Timeout(_) => "timeout",
            AllReduceError::Cancelled => "cancelled",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_round_trips_and_refuses_garbage() {
        for (mode, weight, bandwidth) in [
            (PeerMode::Node, 1.0, None),
            (PeerMode::Client, 0.5, Some(0.0)),
            (PeerMode::Auxiliary, 0.0, Some(100.0)),
        ] {
            assert_eq!(
                decode_gather(&encode_gather(mode, weight, bandwidth)),
                Ok((mode, weight, bandwidth))
            );
        }
        assert!(decode_gather(&[]).is_err());
        let mut bad = encode_gather(PeerMode::Node, 1.0, None).to_vec();
        bad[1] = 9;
        assert!(decode_gather(&bad).unwrap_err().contains("mode"));
        let bad = encode_gather(PeerMode::Node, f32::NAN, None);
        assert!(decode_gather(&bad).unwrap_err().contains("weight"));
        let bad = encode_gather(PeerMode::Node, 1.0, Some(-1.0));
        assert!(decode_gather(&bad).unwrap_err().contains("bandwidth"));
        let bad = encode_gather(PeerMode::Node, 1.0, Some(f64::INFINITY));
        assert!(decode_gather(&bad).unwrap_err().contains("bandwidth"));
    }
}
