//! Training progress: how many samples the swarm has accumulated towards the next epoch, how fast, and when
//! the epoch is due. The pure core of the [`ProgressTracker`](crate::actors::progress_tracker) actor,
//! following Hivemind's `ProgressTracker`: no I/O, no clock; time is passed in as seconds on the run's clock.
//!
//! - Every peer that trains publishes its [`LocalProgress`] (epoch, samples accumulated in it, its measured
//!   rate, when it measured) as the record `progress` under its own [`Subkey::Peer`], signed, with an
//!   expiration [`ProgressConfig::metadata_expiration`] ahead. [`LocalProgress::encode`] is a 74-byte
//!   versioned layout; [`register_schema`] makes every peer refuse anything else. The record also carries
//!   the peer's `target_batch_size`, so that an observer (`colony status`) can show samples against the
//!   target without being configured with it.
//! - [`estimate`] turns the records into a [`GlobalProgress`]: the swarm's epoch, the samples at it, an ETA
//!   extrapolated from each peer's rate, and when to look again (sooner as the epoch nears).
//! - [`PerformanceEma`] measures the local rate (samples per second), bias-corrected.
//! - [`ProgressState`] is one peer's whole tracker as a state machine: reports and epoch changes come in,
//!   estimates are refreshed from records, and it says when to publish (within the record store's rate
//!   limits) and what.
//!
//! Where Colony differs from Hivemind: reads of the records are local (each peer holds a replica), so the
//! refresh periods are shorter by default (see [`ProgressConfig`]) and the local peer's own contribution is
//! always taken from its fresh local progress, never from a replica copy that may be a publish behind.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use colony_transports::PeerId;
use colony_transports::identity::PEER_ID_LEN;

use crate::records::replica::PublishLimits;
use crate::records::{Schemas, Subkey, Time, View};

/// The kind (and the key) of progress records.
pub const PROGRESS_KIND: &str = "progress";

/// The record key the progress of a run's peers is published under (one subkey per peer).
pub const PROGRESS_KEY: &str = PROGRESS_KIND;

/// The smallest total rate the swarm is credited with (Hivemind's `eps`), so that an ETA stays finite
/// (and huge) when nobody has measured a rate yet.
pub const RATE_EPSILON: f64 = 1e-20;

/// Why a progress value, configuration or tracker was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProgressError {
    /// A configuration field is out of range.
    #[error("invalid progress configuration: {field} {reason}")]
    Config {
        /// The field, as named in [`ProgressConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A progress record's value cannot be read.
    #[error("invalid progress record: {0}")]
    InvalidRecord(String),
    /// The tracker was started outside a tokio runtime.
    #[error("the progress tracker must be started inside a tokio runtime")]
    NoRuntime,
}

/// The version byte that opens an encoded [`LocalProgress`].
const ENCODING_VERSION: u8 = 2;
/// version, peer, epoch, samples, rate, time, target, flags.
const ENCODED_LEN: usize = 1 + PEER_ID_LEN + 8 + 8 + 8 + 8 + 8 + 1;
const FLAG_CLIENT_MODE: u8 = 1;

/// One peer's progress, as it publishes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalProgress {
    /// The peer (must equal the record's subkey).
    pub peer: PeerId,
    /// The epoch it accumulates samples for.
    pub epoch: u64,
    /// Samples accumulated towards the end of `epoch`.
    pub samples_accumulated: u64,
    /// Its measured rate, samples per second (finite, `>= 0`).
    pub samples_per_second: f64,
    /// When it measured `samples_accumulated`, on the run's clock.
    pub time: Time,
    /// Whether it is a client-mode peer: its epoch does not move the swarm's epoch.
    pub client_mode: bool,
    /// The samples per epoch this peer is configured with (`>= 1`; every peer of a healthy run has the
    /// same). Carried for observers: the estimate uses the local configuration's.
    pub target_batch_size: u64,
}

impl LocalProgress {
    /// The record value: version 2, the peer id, epoch, samples, rate, time and target batch size,
    /// little-endian, then a flags byte (bit 0: client mode). 74 bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(ENCODED_LEN);
        out.put_u8(ENCODING_VERSION);
        out.put_slice(self.peer.as_bytes());
        out.put_u64_le(self.epoch);
        out.put_u64_le(self.samples_accumulated);
        out.put_f64_le(self.samples_per_second);
        out.put_f64_le(self.time);
        out.put_u64_le(self.target_batch_size);
        out.put_u8(if self.client_mode { FLAG_CLIENT_MODE } else { 0 });
        out.freeze()
    }

    /// Reads a record value (network bytes): exactly the layout of [`LocalProgress::encode`], with a finite,
    /// non-negative rate, a finite time, a target of at least 1, and no unknown flag.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProgressError> {
        let invalid = |reason: String| Err(ProgressError::InvalidRecord(reason));
        if bytes.len() != ENCODED_LEN {
            return invalid(format!("{} bytes, expected {ENCODED_LEN}", bytes.len()));
        }
        if bytes[0] != ENCODING_VERSION {
            return invalid(format!("version {}, expected {ENCODING_VERSION}", bytes[0]));
        }
        let (peer, rest) = bytes[1..].split_at(PEER_ID_LEN);
        let word = |i: usize| -> [u8; 8] {
            let mut word = [0u8; 8];
            word.copy_from_slice(&rest[i * 8..i * 8 + 8]);
            word
        };
        let mut peer_bytes = [0u8; PEER_ID_LEN];
        peer_bytes.copy_from_slice(peer);
        let progress = LocalProgress {
            peer: PeerId::from_bytes(peer_bytes),
            epoch: u64::from_le_bytes(word(0)),
            samples_accumulated: u64::from_le_bytes(word(1)),
            samples_per_second: f64::from_le_bytes(word(2)),
            time: f64::from_le_bytes(word(3)),
            target_batch_size: u64::from_le_bytes(word(4)),
            client_mode: rest[40] & FLAG_CLIENT_MODE != 0,
        };
        if rest[40] & !FLAG_CLIENT_MODE != 0 {
            return invalid(format!("unknown flags {:#04x}", rest[40]));
        }
        if progress.target_batch_size == 0 {
            return invalid("target_batch_size 0, expected at least 1".into());
        }
        if !progress.samples_per_second.is_finite() || progress.samples_per_second < 0.0 {
            return invalid(format!(
                "samples_per_second {} is not a finite number >= 0",
                progress.samples_per_second
            ));
        }
        if !progress.time.is_finite() {
            return invalid(format!("time {} is not finite", progress.time));
        }
        Ok(progress)
    }
}

/// Registers the progress records' schema ([`LocalProgress::decode`]), so that every peer of the run
/// refuses invalid ones on receipt. Call it on the [`Schemas`] given to membership.
pub fn register_schema(schemas: &mut Schemas) -> &mut Schemas {
    schemas.register_with(PROGRESS_KIND, |bytes| {
        LocalProgress::decode(bytes).map(|_| ()).map_err(|e| e.to_string())
    })
}

/// The peers' progress in a read of [`PROGRESS_KEY`]: entries under a [`Subkey::Peer`] whose value decodes
/// and names that same peer (the signature proves who wrote the subkey; a value claiming another peer is
/// ignored). A plain value under the key holds no progress.
pub fn parse_records(view: Option<&View>) -> Vec<LocalProgress> {
    let Some(View::Dictionary { entries, .. }) = view else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|(subkey, (value, _expiration))| {
            let Subkey::Peer(owner) = subkey else {
                return None;
            };
            LocalProgress::decode(value)
                .ok()
                .filter(|progress| progress.peer == *owner)
        })
        .collect()
}

/// What a peer believes about the swarm's progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalProgress {
    /// The swarm's epoch: the largest epoch of this peer and of every peer not in client mode.
    pub epoch: u64,
    /// Samples reported at that epoch, by the peers counted.
    pub samples_accumulated: u64,
    /// Samples an epoch needs.
    pub target_batch_size: u64,
    /// Peers with a progress record (0: none seen).
    pub num_peers: usize,
    /// Of those, peers in client mode.
    pub num_clients: usize,
    /// When the swarm is expected to reach the target, on the run's clock (`+inf` right after this peer
    /// started a new epoch, until the next refresh).
    pub eta_next_epoch: Time,
    /// When to refresh this estimate.
    pub next_fetch_time: Time,
}

impl GlobalProgress {
    /// Whether a peer at `local_epoch` should end its epoch now: the swarm is at a later epoch, or has
    /// accumulated the target, or is expected to have by `now` (Hivemind's `ready_to_update_epoch`).
    pub fn ready_to_update_epoch(&self, local_epoch: u64, now: Time) -> bool {
        self.epoch > local_epoch || self.samples_accumulated >= self.target_batch_size || now >= self.eta_next_epoch
    }
}

/// How a peer tracks progress. Names and meanings follow Hivemind's `ProgressTracker`; the refresh periods
/// are shorter (see each).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressConfig {
    /// Samples the swarm accumulates per epoch (Hivemind's `target_batch_size`; no default).
    pub target_batch_size: u64,
    /// Shortest time between two refreshes of the estimate. Default 50 ms (Hivemind: 0.5 s, because each
    /// of its refreshes is a DHT query over the network; here it is a read of the local replica, and a short
    /// period keeps the end of an epoch close to the moment the target is reached).
    pub min_refresh_period: Duration,
    /// Longest time between two refreshes. Default 1 s (Hivemind: 10 s): a local read costs microseconds,
    /// and a peer that joins or speeds up is noticed within a second.
    pub max_refresh_period: Duration,
    /// Time between refreshes while no peer has a progress record. Default 0.5 s (Hivemind: 3 s).
    pub default_refresh_period: Duration,
    /// Peers that may join before the next refresh: refreshes come sooner the more peers may arrive.
    /// Default 3.
    pub expected_drift_peers: f64,
    /// The same as a fraction of the peers. Default 0.2.
    pub expected_drift_rate: f64,
    /// Smoothing of the local rate estimate, in `(0, 1]`. Default 0.1.
    pub performance_ema_alpha: f64,
    /// How long a published progress record lives; it is republished every half of it. Default 60 s.
    pub metadata_expiration: Duration,
    /// Shortest time between two publishes caused by reports (epoch changes do not wait for it, but still
    /// stay within the record store's publishing limits). Default 0.25 s: each publish is gossiped to every
    /// peer, and the record store throttles a peer that updates one record more than 5 times a second.
    pub min_publish_interval: Duration,
    /// A client-mode peer: its epoch does not move the swarm's. Always on for a client-mode member.
    pub client_mode: bool,
}

impl ProgressConfig {
    /// The defaults, with `target_batch_size` samples per epoch.
    pub fn new(target_batch_size: u64) -> Self {
        Self {
            target_batch_size,
            min_refresh_period: Duration::from_millis(50),
            max_refresh_period: Duration::from_secs(1),
            default_refresh_period: Duration::from_millis(500),
            expected_drift_peers: 3.0,
            expected_drift_rate: 0.2,
            performance_ema_alpha: 0.1,
            metadata_expiration: Duration::from_secs(60),
            min_publish_interval: Duration::from_millis(250),
            client_mode: false,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ProgressError> {
        let bad = |field: &'static str, reason: String| Err(ProgressError::Config { field, reason });
        if self.target_batch_size == 0 {
            return bad("target_batch_size", "must be at least 1".into());
        }
        if self.min_refresh_period.is_zero() {
            return bad("min_refresh_period", "must be above zero".into());
        }
        if self.max_refresh_period < self.min_refresh_period {
            return bad(
                "max_refresh_period",
                format!(
                    "({:?}) must not be below min_refresh_period ({:?})",
                    self.max_refresh_period, self.min_refresh_period
                ),
            );
        }
        if self.default_refresh_period.is_zero() {
            return bad("default_refresh_period", "must be above zero".into());
        }
        if !self.expected_drift_peers.is_finite() || self.expected_drift_peers < 0.0 {
            return bad(
                "expected_drift_peers",
                format!("({}) must be a finite number >= 0", self.expected_drift_peers),
            );
        }
        if !self.expected_drift_rate.is_finite() || self.expected_drift_rate < 0.0 {
            return bad(
                "expected_drift_rate",
                format!("({}) must be a finite number >= 0", self.expected_drift_rate),
            );
        }
        if !(self.performance_ema_alpha > 0.0 && self.performance_ema_alpha <= 1.0) {
            return bad(
                "performance_ema_alpha",
                format!("({}) must be in (0, 1]", self.performance_ema_alpha),
            );
        }
        if self.metadata_expiration < Duration::from_secs(1) {
            return bad(
                "metadata_expiration",
                format!("({:?}) must be at least 1 s", self.metadata_expiration),
            );
        }
        if self.min_publish_interval.is_zero() || self.min_publish_interval > self.metadata_expiration / 2 {
            return bad(
                "min_publish_interval",
                format!(
                    "({:?}) must be above zero and at most half of metadata_expiration ({:?})",
                    self.min_publish_interval, self.metadata_expiration
                ),
            );
        }
        Ok(())
    }
}

/// Estimates the swarm's progress at `now` from the peers' `records` (as read from the records; any entry
/// of the local peer is replaced by `local`, which is fresher), exactly as Hivemind's
/// `_parse_swarm_progress_data`:
///
/// - no records: this peer alone, at its epoch and samples, ETA from its own rate, next refresh after
///   `default_refresh_period`, `num_peers = 0`;
/// - otherwise: epoch = max of `local.epoch` and the epochs of peers not in client mode; samples = the sum
///   at that epoch; the swarm's rate = the sum of every peer's (stale ones too: they will catch up and
///   contribute) + [`RATE_EPSILON`]; the samples now are extrapolated for peers at the epoch as
///   `samples + max(0, now - time) * rate`; the ETA is what remains of the target over the swarm's rate;
///   the next refresh comes after `eta * peers / expected_max_peers` clipped to the refresh periods, where
///   `expected_max_peers = max(peers + expected_drift_peers, peers * (1 + expected_drift_rate))`.
pub fn estimate(
    records: &[LocalProgress],
    local: &LocalProgress,
    now: Time,
    config: &ProgressConfig,
) -> GlobalProgress {
    let target = config.target_batch_size;
    if records.is_empty() {
        let remaining = target.saturating_sub(local.samples_accumulated) as f64;
        return GlobalProgress {
            epoch: local.epoch,
            samples_accumulated: local.samples_accumulated,
            target_batch_size: target,
            num_peers: 0,
            num_clients: 0,
            eta_next_epoch: now + remaining / local.samples_per_second.max(RATE_EPSILON),
            next_fetch_time: now + config.default_refresh_period.as_secs_f64(),
        };
    }
    let peers = || records.iter().map(|r| if r.peer == local.peer { local } else { r });
    let num_peers = records.len();
    let num_clients = peers().filter(|p| p.client_mode).count();
    let epoch = peers()
        .filter(|p| !p.client_mode)
        .map(|p| p.epoch)
        .fold(local.epoch, u64::max);
    let mut samples_accumulated = 0u64;
    let mut estimated_samples = 0.0f64;
    let mut total_rate = RATE_EPSILON;
    for peer in peers() {
        total_rate += peer.samples_per_second;
        if peer.epoch == epoch {
            samples_accumulated = samples_accumulated.saturating_add(peer.samples_accumulated);
            estimated_samples += peer.samples_accumulated as f64 + (now - peer.time).max(0.0) * peer.samples_per_second;
        }
    }
    let eta_seconds = (target as f64 - estimated_samples).max(0.0) / total_rate;
    let peers_now = num_peers as f64;
    let expected_max_peers =
        (peers_now + config.expected_drift_peers).max(peers_now * (1.0 + config.expected_drift_rate));
    let time_to_next_fetch = (eta_seconds * peers_now / expected_max_peers).clamp(
        config.min_refresh_period.as_secs_f64(),
        config.max_refresh_period.as_secs_f64(),
    );
    GlobalProgress {
        epoch,
        samples_accumulated,
        target_batch_size: target,
        num_peers,
        num_clients,
        eta_next_epoch: now + eta_seconds,
        next_fetch_time: now + time_to_next_fetch,
    }
}

/// An exponential moving average of the time per sample, bias-corrected, read as samples per second
/// (Hivemind's `PerformanceEMA`).
///
/// `ema = alpha * interval / task_size + (1 - alpha) * ema`; after `n` updates the rate is
/// `1 / max(ema / (1 - (1 - alpha)^n), 1e-20)`. Before any update it is [`RATE_EPSILON`].
#[derive(Debug, Clone, PartialEq)]
pub struct PerformanceEma {
    alpha: f64,
    ema_seconds_per_sample: f64,
    num_updates: u64,
    samples_per_second: f64,
    timestamp: Time,
    paused: bool,
}

impl PerformanceEma {
    /// An average with smoothing `alpha` (in `(0, 1]`), its timer started at `now`.
    pub fn new(alpha: f64, now: Time) -> Self {
        Self {
            alpha,
            ema_seconds_per_sample: 0.0,
            num_updates: 0,
            samples_per_second: RATE_EPSILON,
            timestamp: now,
            paused: false,
        }
    }

    /// Counts `task_size` samples done in `interval` seconds; returns the new rate. A task that is not a
    /// positive number, or an interval that is not finite, changes nothing; a negative interval counts as 0.
    pub fn update(&mut self, task_size: f64, interval: f64) -> f64 {
        if !(task_size > 0.0 && task_size.is_finite() && interval.is_finite()) {
            return self.samples_per_second;
        }
        let interval = interval.max(0.0);
        self.ema_seconds_per_sample =
            self.alpha * interval / task_size + (1.0 - self.alpha) * self.ema_seconds_per_sample;
        self.num_updates += 1;
        let correction = 1.0 - (1.0 - self.alpha).powf(self.num_updates as f64);
        let adjusted = self.ema_seconds_per_sample / correction;
        self.samples_per_second = 1.0 / adjusted.max(RATE_EPSILON);
        self.samples_per_second
    }

    /// Counts `task_size` samples done since the timer (the previous update or reset), and restarts the
    /// timer at `now`. While paused, changes nothing (a paused average only takes explicit intervals).
    pub fn update_at(&mut self, task_size: f64, now: Time) -> f64 {
        if self.paused {
            return self.samples_per_second;
        }
        let interval = (now - self.timestamp).max(0.0);
        self.timestamp = now;
        self.update(task_size, interval)
    }

    /// Restarts the timer at `now`: the time since the last update is not counted.
    pub fn reset_timer(&mut self, now: Time) {
        self.timestamp = now;
    }

    /// Stops counting time: [`PerformanceEma::update_at`] does nothing until [`PerformanceEma::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Counts time again from `now`.
    pub fn resume(&mut self, now: Time) {
        self.paused = false;
        self.reset_timer(now);
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The bias-corrected rate, samples per second ([`RATE_EPSILON`] before any update).
    pub fn samples_per_second(&self) -> f64 {
        self.samples_per_second
    }

    /// Updates so far.
    pub fn num_updates(&self) -> u64 {
        self.num_updates
    }
}

/// How fast this peer may publish its progress record: a token bucket kept within the record store's
/// [`PublishLimits`], so that no replica ever throttles it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PublishBudget {
    /// Publishes per second, sustained.
    pub rate_per_sec: f64,
    /// Publishes at once.
    pub burst: u32,
}

impl PublishBudget {
    /// 80 % of the limits' rate and half their burst: every replica applies the limits by its own clock, as
    /// records arrive, and gossip can bunch a peer's updates up; the margin absorbs that.
    pub fn within(limits: &PublishLimits) -> Self {
        Self {
            rate_per_sec: limits.rate_per_sec.max(0.0) * 0.8,
            burst: (limits.burst / 2).max(1),
        }
    }
}

/// How soon a publish is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Urgency {
    /// A report: after `min_publish_interval` since the last publish.
    Report,
    /// An epoch change: as soon as the budget allows.
    Epoch,
}

/// What to do about publishing now.
#[derive(Debug, Clone, PartialEq)]
pub enum PublishDecision {
    /// Publish `progress` with this expiration now.
    Publish {
        /// The value to publish.
        progress: LocalProgress,
        /// The record's expiration (later than any this peer published before).
        expiration: Time,
    },
    /// Nothing now; ask again at this time.
    Wait(Time),
    /// Nothing, ever: the tracker stopped.
    Idle,
}

/// One peer's progress tracker as a state machine (the actor and its handle share it behind a mutex).
///
/// Inputs: [`ProgressState::report_local_progress`], [`ProgressState::update_epoch`] (from the trainer),
/// [`ProgressState::refresh`] (records read by the actor). Outputs: the estimate ([`ProgressState::global`]),
/// and what to publish when ([`ProgressState::poll_publish`]).
///
/// Publishing follows Hivemind's reporter: a peer publishes only once it has reported samples, and keeps
/// publishing while it last reported samples at most one epoch behind the swarm (so a peer that only
/// watches, or an auxiliary one, is not counted as a peer); each report asks for a publish, throttled by
/// `min_publish_interval`; an epoch change asks for one at once; the record is republished every
/// `metadata_expiration / 2`; and no publish exceeds the [`PublishBudget`].
#[derive(Debug, Clone)]
pub struct ProgressState {
    config: ProgressConfig,
    local: LocalProgress,
    ema: PerformanceEma,
    global: GlobalProgress,
    fetched_this_epoch: bool,
    /// The last refresh counted this peer and no other: its own samples decide the end of its epoch.
    alone: bool,
    /// Bumped at each epoch change: a refresh that read the records before one does not count as a fetch of
    /// the new epoch.
    epoch_changes: u64,
    stopped: bool,
    // Publishing.
    budget: PublishBudget,
    tokens: f64,
    tokens_at: Time,
    wanted: Option<Urgency>,
    last_publish: Time,
    last_expiration: Time,
    last_report_epoch: Option<u64>,
    published: bool,
    /// A poll is on its way (the actor has been asked and has not polled yet).
    poll_requested: bool,
    /// When the actor's publish timer fires, if armed.
    armed_at: Option<Time>,
}

impl ProgressState {
    /// The state of a new tracker of `peer` at `now`: epoch 0, no samples, no records seen yet.
    pub fn new(peer: PeerId, config: ProgressConfig, budget: PublishBudget, now: Time) -> Self {
        let ema = PerformanceEma::new(config.performance_ema_alpha, now);
        let local = LocalProgress {
            peer,
            epoch: 0,
            samples_accumulated: 0,
            samples_per_second: ema.samples_per_second(),
            time: now,
            client_mode: config.client_mode,
            target_batch_size: config.target_batch_size,
        };
        let global = estimate(&[], &local, now, &config);
        Self {
            config,
            local,
            ema,
            global,
            fetched_this_epoch: false,
            alone: false,
            epoch_changes: 0,
            stopped: false,
            budget,
            tokens: f64::from(budget.burst),
            tokens_at: now,
            wanted: None,
            last_publish: Time::NEG_INFINITY,
            last_expiration: Time::NEG_INFINITY,
            last_report_epoch: None,
            published: false,
            poll_requested: false,
            armed_at: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ProgressConfig {
        &self.config
    }

    /// This peer's progress as last reported.
    pub fn local(&self) -> &LocalProgress {
        &self.local
    }

    /// The estimate of the last refresh, with this peer's samples reported since added (Hivemind does the
    /// same, so that a peer's own work shows at once).
    pub fn global(&self) -> &GlobalProgress {
        &self.global
    }

    /// The local rate estimate.
    pub fn performance(&self) -> &PerformanceEma {
        &self.ema
    }

    /// Whether a refresh has read the records since the last epoch change.
    pub fn fetched_this_epoch(&self) -> bool {
        self.fetched_this_epoch
    }

    /// Whether [`ProgressState::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Whether this peer has published its progress at least once.
    pub fn has_published(&self) -> bool {
        self.published
    }

    /// Whether this peer should end its epoch at `now` ([`GlobalProgress::ready_to_update_epoch`]).
    ///
    /// A peer that is the only one counted (no other peer has published progress) decides on its own
    /// samples, which it knows exactly: the ETA extrapolates a rate, and a trainer thread paused after a
    /// refresh (a loaded machine) would end its epoch short of the target.
    pub fn ready_to_update_epoch(&self, now: Time) -> bool {
        if self.alone && self.global.epoch <= self.local.epoch {
            return self.local.samples_accumulated >= self.config.target_batch_size;
        }
        self.global.ready_to_update_epoch(self.local.epoch, now)
    }

    /// `now` if the epoch is due, else the swarm's ETA.
    pub fn estimated_next_update_time(&self, now: Time) -> Time {
        if self.ready_to_update_epoch(now) {
            now
        } else {
            self.global.eta_next_epoch
        }
    }

    /// This peer has accumulated `samples_accumulated` samples at `epoch` by `now`. Samples added at the
    /// swarm's epoch are added to the estimate at once; the rate estimate counts them over the time since
    /// the previous report (a report of fewer samples than before only restarts its timer). Returns whether
    /// the actor must be asked to poll (it is not already due to).
    pub fn report_local_progress(&mut self, epoch: u64, samples_accumulated: u64, now: Time) -> bool {
        if self.stopped {
            return false;
        }
        let extra = i128::from(samples_accumulated) - i128::from(self.local.samples_accumulated);
        if epoch == self.local.epoch && self.local.epoch == self.global.epoch {
            let samples = i128::from(self.global.samples_accumulated) + extra;
            self.global.samples_accumulated = samples.clamp(0, i128::from(u64::MAX)) as u64;
        }
        if samples_accumulated > 0 {
            self.last_report_epoch = Some(self.global.epoch);
        }
        if extra > 0 {
            self.ema.update_at(extra as f64, now);
        } else {
            self.ema.reset_timer(now);
        }
        self.local = LocalProgress {
            epoch,
            samples_accumulated,
            samples_per_second: self.ema.samples_per_second(),
            time: now,
            ..self.local
        };
        self.want(Urgency::Report, now)
    }

    /// This peer starts `new_epoch` (Hivemind's `update_epoch`): if it is past the swarm's epoch, the
    /// estimate moves to it with no samples and no ETA (`+inf`) until the next refresh; this peer reports 0
    /// samples at it, published as soon as the budget allows; and the next refresh counts as this epoch's
    /// first fetch. Returns whether the actor must be asked to poll.
    pub fn update_epoch(&mut self, new_epoch: u64, now: Time) -> bool {
        if self.stopped {
            return false;
        }
        if new_epoch > self.global.epoch {
            self.global.epoch = new_epoch;
            self.global.samples_accumulated = 0;
            self.global.eta_next_epoch = Time::INFINITY;
        }
        self.report_local_progress(new_epoch, 0, now);
        self.fetched_this_epoch = false;
        self.epoch_changes += 1;
        self.want(Urgency::Epoch, now)
    }

    /// A token to pass to [`ProgressState::refresh`], taken before reading the records.
    pub fn refresh_token(&self) -> u64 {
        self.epoch_changes
    }

    /// Recomputes the estimate at `now` from `records` read after [`ProgressState::refresh_token`] gave
    /// `token`. This peer counts as a peer, with its fresh local progress, when the records hold its entry,
    /// once it has published, or while it holds samples (its first publish may still be on its way); a peer
    /// that only watches is not counted. Returns the time of the next refresh.
    pub fn refresh(&mut self, records: &[LocalProgress], token: u64, now: Time) -> Time {
        let own = self.local.peer;
        let listed = records.iter().any(|r| r.peer == own);
        let mut peers: Vec<LocalProgress> = records.iter().filter(|r| r.peer != own).copied().collect();
        self.alone = peers.is_empty();
        if listed || self.published || self.local.samples_accumulated > 0 {
            peers.push(self.local);
        } else {
            self.alone = false;
        }
        self.global = estimate(&peers, &self.local, now, &self.config);
        if token == self.epoch_changes {
            self.fetched_this_epoch = true;
        }
        self.global.next_fetch_time
    }

    /// Marks that a publish is wanted; returns whether the actor must be asked to poll: no request is on
    /// its way and its timer (if armed) fires later than the publish is due.
    fn want(&mut self, urgency: Urgency, now: Time) -> bool {
        self.wanted = self.wanted.max(Some(urgency));
        let due = self.publish_due(now);
        if self.poll_requested || self.armed_at.is_some_and(|armed| armed <= due) {
            return false;
        }
        self.poll_requested = true;
        true
    }

    fn refill(&mut self, now: Time) {
        let elapsed = (now - self.tokens_at).max(0.0);
        self.tokens = (self.tokens + elapsed * self.budget.rate_per_sec).min(f64::from(self.budget.burst));
        self.tokens_at = self.tokens_at.max(now);
    }

    /// When the budget has a token, from `now`.
    fn token_ready(&self, now: Time) -> Time {
        let elapsed = (now - self.tokens_at).max(0.0);
        let tokens = (self.tokens + elapsed * self.budget.rate_per_sec).min(f64::from(self.budget.burst));
        if tokens >= 1.0 {
            now
        } else if self.budget.rate_per_sec > 0.0 {
            now + (1.0 - tokens) / self.budget.rate_per_sec
        } else {
            Time::INFINITY
        }
    }

    fn publish_due(&self, now: Time) -> Time {
        let wanted_at = match self.wanted {
            Some(Urgency::Epoch) => now,
            Some(Urgency::Report) => self.last_publish + self.config.min_publish_interval.as_secs_f64(),
            None => self.last_publish + self.config.metadata_expiration.as_secs_f64() / 2.0,
        };
        wanted_at.max(self.token_ready(now)).max(now)
    }

    fn next_expiration(&self, now: Time) -> Time {
        // A record replaces the previous one only with a strictly later expiration.
        (now + self.config.metadata_expiration.as_secs_f64()).max(self.last_expiration.next_up())
    }

    /// What to publish at `now`, if anything; otherwise when to ask again (the actor arms a timer then).
    pub fn poll_publish(&mut self, now: Time) -> PublishDecision {
        self.poll_requested = false;
        if self.stopped {
            self.armed_at = None;
            return PublishDecision::Idle;
        }
        let due = self.publish_due(now);
        if due > now {
            self.armed_at = due.is_finite().then_some(due);
            return match self.armed_at {
                Some(at) => PublishDecision::Wait(at),
                None => PublishDecision::Idle,
            };
        }
        self.wanted = None;
        self.last_publish = now;
        let synchronized = self
            .last_report_epoch
            .is_some_and(|epoch| epoch.saturating_add(1) >= self.global.epoch);
        if !synchronized {
            let at = self.publish_due(now);
            self.armed_at = Some(at);
            return PublishDecision::Wait(at);
        }
        self.refill(now);
        self.tokens -= 1.0;
        let expiration = self.next_expiration(now);
        self.last_expiration = expiration;
        self.published = true;
        self.armed_at = None;
        PublishDecision::Publish {
            progress: self.local,
            expiration,
        }
    }

    /// The replica refused the last publish (it should not: the budget is within its limits); ask again
    /// after the minimum interval.
    pub fn publish_refused(&mut self) {
        self.wanted = self.wanted.max(Some(Urgency::Report));
    }

    /// Stops the tracker: reports are ignored and nothing more is published except the deletion.
    pub fn stop(&mut self) {
        self.stopped = true;
        self.wanted = None;
    }

    /// The deletion of this peer's record at shutdown: `None` if it never published; else `Ok(expiration)`
    /// to publish now (a token is taken), or `Err(time)` when the budget has a token.
    pub fn deletion(&mut self, now: Time) -> Option<Result<Time, Time>> {
        if !self.published {
            return None;
        }
        let ready = self.token_ready(now);
        if ready > now {
            return Some(Err(ready));
        }
        self.refill(now);
        self.tokens -= 1.0;
        let expiration = self.next_expiration(now);
        self.last_expiration = expiration;
        self.published = false;
        Some(Ok(expiration))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_transports::Keypair;

    fn peer(seed: u8) -> PeerId {
        Keypair::from_seed([seed; 32]).peer_id()
    }

    fn progress(seed: u8, epoch: u64, samples: u64, rate: f64, time: Time, client_mode: bool) -> LocalProgress {
        LocalProgress {
            peer: peer(seed),
            epoch,
            samples_accumulated: samples,
            samples_per_second: rate,
            time,
            client_mode,
            target_batch_size: 4096,
        }
    }

    fn config(target: u64) -> ProgressConfig {
        ProgressConfig {
            min_refresh_period: Duration::from_millis(500),
            max_refresh_period: Duration::from_secs(10),
            default_refresh_period: Duration::from_secs(3),
            ..ProgressConfig::new(target)
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn the_estimate_follows_hiveminds_formula() {
        let now = 1000.0;
        let local = progress(0, 3, 10, 5.0, 999.0, false);
        let records = [
            // At the global epoch 4 (set by this peer, not in client mode), 1 s and 2 s ago.
            progress(1, 4, 40, 10.0, 999.0, false),
            progress(2, 4, 30, 20.0, 998.0, false),
            // A client at epoch 7 does not move the epoch; its rate counts.
            progress(3, 7, 500, 1.0, 1000.0, true),
            // A stale peer (epoch 2): rate counts, samples do not; its time is in the future (clock skew).
            progress(4, 2, 99, 4.0, 1005.0, false),
        ];
        let global = estimate(&records, &local, now, &config(256));
        assert_eq!(global.epoch, 4);
        assert_eq!(global.samples_accumulated, 70);
        assert_eq!(global.num_peers, 4);
        assert_eq!(global.num_clients, 1);
        assert_eq!(global.target_batch_size, 256);
        // estimated = 40 + 1*10 + 30 + 2*20 = 120; rate = 10 + 20 + 1 + 4 = 35 (the local peer has no entry).
        let eta = (256.0 - 120.0) / (35.0 + RATE_EPSILON);
        assert!(close(global.eta_next_epoch, now + eta), "{}", global.eta_next_epoch);
        // expected_max_peers = max(4 + 3, 4 * 1.2) = 7; 3.886 * 4 / 7 = 2.22 within [0.5, 10].
        assert!(close(global.next_fetch_time, now + eta * 4.0 / 7.0));
    }

    #[test]
    fn the_local_entry_is_replaced_by_the_fresh_local_progress() {
        let now = 50.0;
        let local = progress(0, 1, 100, 10.0, 50.0, false);
        let stale_copy = progress(0, 1, 20, 10.0, 40.0, false);
        let other = progress(1, 1, 100, 10.0, 50.0, false);
        let global = estimate(&[stale_copy, other], &local, now, &config(256));
        assert_eq!(
            global.samples_accumulated, 200,
            "the local copy from 10 s ago is not counted"
        );
        assert_eq!(global.num_peers, 2);
        // 56 samples remain at 20 samples/s; 2.8 * 2 / 5 = 1.12 s to the next fetch.
        assert!(close(global.eta_next_epoch, now + 56.0 / (20.0 + RATE_EPSILON)));
        assert!(close(global.next_fetch_time, now + 2.8 * 2.0 / 5.0));
    }

    #[test]
    fn refreshes_are_clipped_to_the_refresh_periods() {
        let local = progress(0, 0, 0, 0.0, 0.0, false);
        let config = config(100);
        // Target reached: ETA now, refresh after the minimum.
        let done = [progress(1, 0, 150, 1.0, 0.0, false)];
        let global = estimate(&done, &local, 10.0, &config);
        assert_eq!(global.eta_next_epoch, 10.0);
        assert_eq!(global.next_fetch_time, 10.5);
        // Nobody measured a rate: the ETA is astronomically far, refresh after the maximum.
        let idle = [progress(1, 0, 0, 0.0, 0.0, false)];
        let global = estimate(&idle, &local, 10.0, &config);
        assert!(global.eta_next_epoch > 1e20 && global.eta_next_epoch.is_finite());
        assert_eq!(global.next_fetch_time, 20.0);
        // Many peers: expected_max_peers = 100 * 1.2 = 120 > 103.
        let many: Vec<_> = (1..=100).map(|i| progress(i, 0, 0, 0.5, 10.0, false)).collect();
        let global = estimate(&many, &local, 10.0, &config);
        assert!(close(global.eta_next_epoch, 10.0 + 100.0 / (50.0 + RATE_EPSILON)));
        assert!(close(global.next_fetch_time, 10.0 + 2.0 * 100.0 / 120.0));
    }

    #[test]
    fn with_no_records_the_local_rate_gives_the_eta() {
        let local = progress(0, 5, 56, 20.0, 1.0, false);
        let global = estimate(&[], &local, 2.0, &config(256));
        assert_eq!(
            global,
            GlobalProgress {
                epoch: 5,
                samples_accumulated: 56,
                target_batch_size: 256,
                num_peers: 0,
                num_clients: 0,
                eta_next_epoch: 2.0 + 10.0,
                next_fetch_time: 5.0,
            }
        );
        // A peer that never measured a rate: finite, huge.
        let idle = progress(0, 0, 0, 0.0, 1.0, false);
        assert!(estimate(&[], &idle, 2.0, &config(256)).eta_next_epoch > 1e20);
    }

    #[test]
    fn a_peer_is_ready_by_epoch_samples_or_eta() {
        let global = GlobalProgress {
            epoch: 3,
            samples_accumulated: 100,
            target_batch_size: 256,
            num_peers: 2,
            num_clients: 0,
            eta_next_epoch: 10.0,
            next_fetch_time: 5.0,
        };
        assert!(global.ready_to_update_epoch(2, 0.0), "behind the swarm");
        assert!(!global.ready_to_update_epoch(3, 9.9));
        assert!(global.ready_to_update_epoch(3, 10.0), "ETA reached");
        let full = GlobalProgress {
            samples_accumulated: 256,
            ..global
        };
        assert!(full.ready_to_update_epoch(3, 0.0), "target reached");
    }

    #[test]
    fn the_ema_is_bias_corrected() {
        let mut ema = PerformanceEma::new(0.1, 0.0);
        assert_eq!(ema.samples_per_second(), RATE_EPSILON);
        // ema = 0.1 * 1/10 = 0.01; corrected by 1 - 0.9 = 0.1 → 0.1 s/sample.
        assert!(close(ema.update(10.0, 1.0), 10.0));
        // ema = 0.1 * 1/20 + 0.9 * 0.01 = 0.014; corrected by 1 - 0.81 = 0.19.
        assert!(close(ema.update(20.0, 1.0), 0.19 / 0.014));
        assert_eq!(ema.num_updates(), 2);
        // A constant rate is measured exactly whatever the number of updates.
        let mut steady = PerformanceEma::new(0.3, 0.0);
        for i in 1..=50 {
            steady.update_at(8.0, f64::from(i) * 0.4);
        }
        assert!(close(steady.samples_per_second(), 20.0));
        // Worthless input changes nothing.
        let before = ema.clone();
        ema.update(0.0, 1.0);
        ema.update(-3.0, 1.0);
        ema.update(f64::NAN, 1.0);
        ema.update(5.0, f64::INFINITY);
        assert_eq!(ema, before);
        // A zero interval is an (absurdly) fast task, not a division by zero.
        assert!(PerformanceEma::new(0.1, 0.0).update(1.0, 0.0) >= 1e19);
    }

    #[test]
    fn the_ema_timer_resets_and_pauses() {
        let mut ema = PerformanceEma::new(0.5, 0.0);
        // 100 s idle before the first task: not counted after a reset.
        ema.reset_timer(100.0);
        assert!(close(ema.update_at(10.0, 101.0), 10.0));
        ema.pause();
        assert!(ema.is_paused());
        assert!(close(ema.update_at(10.0, 500.0), 10.0), "paused: ignored");
        // Explicit intervals still count while paused.
        ema.update(10.0, 1.0);
        assert_eq!(ema.num_updates(), 2);
        ema.resume(600.0);
        assert!(close(ema.update_at(10.0, 601.0), 10.0), "the pause is not counted");
    }

    #[test]
    fn progress_round_trips_and_garbage_is_refused() {
        let original = progress(9, u64::MAX, 12345, 17.5, 1.7e9, true);
        let bytes = original.encode();
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(LocalProgress::decode(&bytes), Ok(original));
        let other = progress(9, 0, 0, 0.0, -5.0, false);
        assert_eq!(LocalProgress::decode(&other.encode()), Ok(other));

        let with = |offset: usize, value: &[u8]| {
            let mut bytes = original.encode().to_vec();
            bytes[offset..offset + value.len()].copy_from_slice(value);
            LocalProgress::decode(&bytes)
        };
        let rate_at = 1 + PEER_ID_LEN + 16;
        let time_at = rate_at + 8;
        for bad_rate in [f64::NAN, f64::INFINITY, -1.0, f64::NEG_INFINITY] {
            assert!(with(rate_at, &bad_rate.to_le_bytes()).is_err(), "rate {bad_rate}");
        }
        for bad_time in [f64::NAN, f64::INFINITY] {
            assert!(with(time_at, &bad_time.to_le_bytes()).is_err(), "time {bad_time}");
        }
        assert!(with(0, &[1]).is_err(), "the version without a target");
        assert!(with(0, &[3]).is_err(), "unknown version");
        let target_at = time_at + 8;
        assert!(with(target_at, &0u64.to_le_bytes()).is_err(), "target 0");
        assert!(with(ENCODED_LEN - 1, &[3]).is_err(), "unknown flag");
        let error = LocalProgress::decode(&bytes[..ENCODED_LEN - 1]).unwrap_err();
        assert!(error.to_string().contains("73 bytes"), "{error}");
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(LocalProgress::decode(&longer).is_err());
        // Every truncation and arbitrary bytes: an error, never a panic.
        for len in 0..ENCODED_LEN {
            assert!(LocalProgress::decode(&bytes[..len]).is_err());
        }
        let mut noise = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            let garbage: Vec<u8> = (0..ENCODED_LEN)
                .map(|_| {
                    noise ^= noise << 13;
                    noise ^= noise >> 7;
                    noise ^= noise << 17;
                    noise as u8
                })
                .collect();
            let _ = LocalProgress::decode(&garbage);
        }
    }

    #[test]
    fn records_are_parsed_only_under_their_own_peer() {
        use std::collections::BTreeMap;
        let honest = progress(1, 2, 30, 3.0, 10.0, false);
        let liar = progress(2, 9, 999, 3.0, 10.0, false);
        let mut entries = BTreeMap::new();
        entries.insert(Subkey::Peer(peer(1)), (honest.encode(), 70.0));
        // Peer 3 publishes a value claiming to be peer 2.
        entries.insert(Subkey::Peer(peer(3)), (liar.encode(), 70.0));
        entries.insert(Subkey::Peer(peer(4)), (Bytes::from_static(b"junk"), 70.0));
        entries.insert(Subkey::Name("free".into()), (honest.encode(), 70.0));
        let view = View::Dictionary {
            entries,
            expiration: 70.0,
        };
        assert_eq!(parse_records(Some(&view)), vec![honest]);
        assert!(parse_records(None).is_empty());
        let plain = View::Value {
            value: honest.encode(),
            expiration: 70.0,
        };
        assert!(parse_records(Some(&plain)).is_empty());
    }

    #[test]
    fn the_schema_refuses_values_that_do_not_decode() {
        use crate::records::{Record, RecordLimits, RecordStore};
        let mut schemas = Schemas::default();
        register_schema(&mut schemas);
        let store = RecordStore::new("run", RecordLimits::default(), schemas);
        let record = |value: Bytes| Record {
            key: PROGRESS_KEY.into(),
            subkey: Some(Subkey::Name("unsigned".into())),
            value: Some(value),
            expiration: 100.0,
            signature: None,
        };
        assert_eq!(
            store.validate(&record(progress(1, 0, 1, 1.0, 0.0, false).encode()), 0.0),
            Ok(())
        );
        let mut nan_rate = progress(1, 0, 1, 1.0, 0.0, false).encode().to_vec();
        nan_rate[1 + PEER_ID_LEN + 16..1 + PEER_ID_LEN + 24].copy_from_slice(&f64::NAN.to_le_bytes());
        for bad in [Bytes::from_static(b"junk"), Bytes::from(nan_rate)] {
            let error = store.validate(&record(bad), 0.0).unwrap_err();
            assert_eq!(error.reason(), "invalid_value", "{error}");
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        assert_eq!(ProgressConfig::new(256).validate(), Ok(()));
        type Break = fn(&mut ProgressConfig);
        let cases: [(&str, Break); 9] = [
            ("target_batch_size", |c| c.target_batch_size = 0),
            ("min_refresh_period", |c| c.min_refresh_period = Duration::ZERO),
            ("max_refresh_period", |c| {
                c.max_refresh_period = Duration::from_millis(10)
            }),
            ("default_refresh_period", |c| c.default_refresh_period = Duration::ZERO),
            ("expected_drift_peers", |c| c.expected_drift_peers = f64::NAN),
            ("expected_drift_rate", |c| c.expected_drift_rate = -0.1),
            ("performance_ema_alpha", |c| c.performance_ema_alpha = 0.0),
            ("metadata_expiration", |c| {
                c.metadata_expiration = Duration::from_millis(10)
            }),
            ("min_publish_interval", |c| c.min_publish_interval = Duration::ZERO),
        ];
        for (field, break_it) in cases {
            let mut config = ProgressConfig::new(256);
            break_it(&mut config);
            match config.validate() {
                Err(ProgressError::Config { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    fn state(budget: PublishBudget) -> ProgressState {
        ProgressState::new(peer(0), ProgressConfig::new(100), budget, 0.0)
    }

    const BUDGET: PublishBudget = PublishBudget {
        rate_per_sec: 4.0,
        burst: 5,
    };

    fn published(decision: PublishDecision) -> LocalProgress {
        match decision {
            PublishDecision::Publish { progress, .. } => progress,
            other => panic!("expected a publish, got {other:?}"),
        }
    }

    #[test]
    fn reports_update_the_estimate_and_the_rate_at_once() {
        let mut state = state(BUDGET);
        assert_eq!(state.global().samples_accumulated, 0);
        state.report_local_progress(0, 0, 1.0);
        state.report_local_progress(0, 10, 2.0);
        state.report_local_progress(0, 30, 3.0);
        assert_eq!(
            state.global().samples_accumulated,
            30,
            "own samples show before any refresh"
        );
        assert_eq!(state.local().samples_accumulated, 30);
        assert!(state.performance().samples_per_second() > 10.0);
        assert_eq!(
            state.local().samples_per_second,
            state.performance().samples_per_second()
        );
        // A report at another epoch than the swarm's does not touch its samples.
        state.report_local_progress(1, 5, 4.0);
        assert_eq!(state.global().samples_accumulated, 30);
    }

    #[test]
    fn an_epoch_change_resets_the_estimate_until_the_next_refresh() {
        let mut state = state(BUDGET);
        state.report_local_progress(0, 60, 1.0);
        let token = state.refresh_token();
        state.refresh(&[progress(1, 0, 50, 10.0, 1.0, false)], token, 1.0);
        assert!(state.fetched_this_epoch());
        assert!(state.ready_to_update_epoch(1.0), "110 of 100 samples");
        let token = state.refresh_token();
        state.update_epoch(1, 2.0);
        assert_eq!(state.global().epoch, 1);
        assert_eq!(state.global().samples_accumulated, 0);
        assert_eq!(state.global().eta_next_epoch, Time::INFINITY);
        assert_eq!(state.estimated_next_update_time(2.0), Time::INFINITY);
        assert!(!state.ready_to_update_epoch(2.0));
        assert!(!state.fetched_this_epoch());
        // A refresh that read the records before the change does not count as this epoch's fetch.
        state.refresh(&[], token, 2.1);
        assert!(!state.fetched_this_epoch());
        state.refresh(&[], state.refresh_token(), 2.2);
        assert!(state.fetched_this_epoch());
        // Catching up to the swarm's epoch keeps its estimate.
        let mut behind = self::state(BUDGET);
        behind.refresh(&[progress(1, 5, 50, 10.0, 1.0, false)], 0, 1.0);
        assert!(behind.ready_to_update_epoch(1.0), "the swarm is at epoch 5");
        behind.update_epoch(5, 1.5);
        assert_eq!(behind.global().epoch, 5);
        assert_eq!(behind.global().samples_accumulated, 50);
    }

    #[test]
    fn a_watcher_is_not_a_peer_of_its_own_estimate_but_a_worker_is() {
        let other = progress(1, 0, 50, 10.0, 1.0, false);
        let mut watcher = state(BUDGET);
        watcher.refresh(&[other], 0, 1.0);
        assert_eq!(watcher.global().num_peers, 1);
        let mut worker = state(BUDGET);
        // Samples reported, not published yet: counted with its fresh progress.
        worker.report_local_progress(0, 20, 1.0);
        worker.refresh(&[other], 0, 1.0);
        assert_eq!(
            (worker.global().num_peers, worker.global().samples_accumulated),
            (2, 70)
        );
        // Its replica copy is a publish behind: the fresh progress counts instead.
        let stale = LocalProgress {
            samples_accumulated: 5,
            ..*worker.local()
        };
        worker.report_local_progress(0, 30, 1.5);
        worker.refresh(&[other, stale], 0, 1.5);
        assert_eq!(
            (worker.global().num_peers, worker.global().samples_accumulated),
            (2, 80)
        );
    }

    #[test]
    fn publishing_is_throttled_and_follows_hiveminds_reporter() {
        let mut state = state(BUDGET);
        // Nothing reported: a periodic tick publishes nothing (a watcher is not a peer).
        assert_eq!(state.poll_publish(0.0), PublishDecision::Wait(30.0));
        assert!(state.report_local_progress(0, 0, 1.0), "the actor is asked");
        assert_eq!(state.poll_publish(1.0), PublishDecision::Wait(31.0), "no samples yet");
        assert!(!state.has_published());

        assert!(state.report_local_progress(0, 10, 2.0));
        let first = state.poll_publish(2.0);
        assert_eq!(published(first.clone()).samples_accumulated, 10);
        let PublishDecision::Publish { expiration, .. } = first else {
            unreachable!()
        };
        assert_eq!(expiration, 62.0);
        // The next report waits for the minimum interval; once the actor's timer is armed, it is not asked.
        assert!(state.report_local_progress(0, 20, 2.1));
        assert_eq!(state.poll_publish(2.1), PublishDecision::Wait(2.25));
        assert!(!state.report_local_progress(0, 30, 2.2), "the timer will publish it");
        assert_eq!(published(state.poll_publish(2.25)).samples_accumulated, 30);
        // An epoch change is published at once, and asks the actor even with a timer armed.
        assert!(state.report_local_progress(0, 40, 2.3));
        assert_eq!(state.poll_publish(2.3), PublishDecision::Wait(2.5));
        assert!(state.update_epoch(1, 2.31));
        let progress = published(state.poll_publish(2.31));
        assert_eq!((progress.epoch, progress.samples_accumulated), (1, 0));
        // Idle: republished every half of the expiration.
        let PublishDecision::Wait(at) = state.poll_publish(2.4) else {
            panic!("a wait")
        };
        assert!(close(at, 32.31), "{at}");
        assert_eq!(published(state.poll_publish(at)).epoch, 1);
    }

    #[test]
    fn epoch_changes_never_exceed_the_budget() {
        let mut state = state(PublishBudget {
            rate_per_sec: 2.0,
            burst: 2,
        });
        state.report_local_progress(0, 10, 0.0);
        let mut publishes = Vec::new();
        let mut expirations = Vec::new();
        // 100 epochs (a change and a report each) in one second of polling every millisecond.
        for i in 0..1000u32 {
            let now = f64::from(i) / 1000.0;
            if i % 10 == 0 {
                let epoch = u64::from(i / 10) + 1;
                state.update_epoch(epoch, now);
                state.report_local_progress(epoch, 5, now);
            }
            if let PublishDecision::Publish { expiration, .. } = state.poll_publish(now) {
                publishes.push(now);
                expirations.push(expiration);
            }
        }
        // burst 2 + 2/s over (almost) one second.
        assert!(publishes.len() <= 4, "{publishes:?}");
        assert!(publishes.len() >= 3, "{publishes:?}");
        assert!(
            expirations.windows(2).all(|w| w[1] > w[0]),
            "each publish replaces the previous"
        );
    }

    #[test]
    fn a_peer_that_fell_behind_stops_publishing_and_a_stopped_one_deletes() {
        let mut state = state(BUDGET);
        state.report_local_progress(0, 10, 0.0);
        assert_eq!(published(state.poll_publish(0.0)).epoch, 0);
        // The swarm moves two epochs ahead while this peer reports nothing new.
        state.refresh(&[progress(1, 2, 0, 10.0, 0.0, false)], 0, 1.0);
        state.report_local_progress(0, 0, 1.0);
        assert!(matches!(state.poll_publish(1.0), PublishDecision::Wait(_)));
        state.stop();
        assert_eq!(state.poll_publish(2.0), PublishDecision::Idle);
        assert!(
            !state.report_local_progress(0, 50, 2.0),
            "reports after stop are ignored"
        );
        let Some(Ok(expiration)) = state.deletion(2.0) else {
            panic!("a deletion")
        };
        assert!(expiration > 60.0);
        assert_eq!(state.deletion(2.0), None, "deleted once");
        // A peer that never published has nothing to delete.
        assert_eq!(self::state(BUDGET).deletion(0.0), None);
    }
}
