//! The progress tracker: one peer's shell around the progress core ([`crate::progress::ProgressState`]).
//!
//! The trainer's side ([`ProgressTracker`], a cheap handle) touches only shared memory: a report updates the
//! local progress and rate estimate under a short mutex, and at most pokes the actor (a message, no await)
//! when a publish falls due sooner than the actor's timer. Reads ([`ProgressTracker::global`],
//! [`ProgressTracker::ready_to_update_epoch`]) never wait for the actor.
//!
//! The actor, on membership's actor threads, does the record work:
//!
//! - **Refreshes** the estimate from the local replica of the `progress` records at the time the estimate
//!   asks for (sooner as the epoch nears, between `min_refresh_period` and `max_refresh_period`), at once
//!   (at most every `min_refresh_period`) when a peer appears, leaves or moves to a later epoch (a
//!   subscription to the records, so no polling), soon after this peer changes epoch, and on
//!   [`ProgressTracker::refresh_now`].
//! - **Publishes** this peer's progress, signed, under its own subkey, with an expiration
//!   `metadata_expiration` ahead: after reports (at most every `min_publish_interval`), at once after an
//!   epoch change, every `metadata_expiration / 2` otherwise; never faster than the record store's
//!   publishing limits allow ([`PublishBudget::within`]).
//! - At [`ProgressTracker::shutdown`], deletes the record (publishes `None`), so that the others stop
//!   counting this peer at once instead of when the record expires.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use colony::actors::progress_tracker::{self, ProgressTracker};
//! # use colony::membership::{Membership, MembershipConfig};
//! # use colony::progress::ProgressConfig;
//! # use colony::records::Schemas;
//! # use colony_transports::{Keypair, mem::MemHub};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let keypair = Arc::new(Keypair::generate());
//! let transport = MemHub::new().transport(&keypair);
//! let mut schemas = Schemas::default();
//! progress_tracker::register_schema(&mut schemas);
//! let config = MembershipConfig::new("run", Some("mem://a".parse()?));
//! let membership = Membership::start(config, keypair, transport, schemas).await?;
//! let tracker = ProgressTracker::start(&membership, ProgressConfig::new(4096))?;
//! let (mut epoch, mut samples) = (0, 0);
//! loop {
//!     samples += 32; // one batch
//!     tracker.report_local_progress(epoch, samples);
//!     if tracker.ready_to_update_epoch() {
//!         epoch = tracker.global().epoch.max(epoch + 1);
//!         samples = 0;
//!         tracker.update_epoch(epoch);
//!     }
//! #   break;
//! }
//! tracker.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::prelude::*;
use colony_transports::PeerId;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::membership::{Membership, Role};
pub use crate::progress::register_schema;
use crate::progress::{
    GlobalProgress, LocalProgress, PROGRESS_KEY, ProgressConfig, ProgressError, ProgressState, PublishBudget,
    PublishDecision, parse_records,
};
use crate::records::replica::SubscriptionError;
use crate::records::{Subkey, Time};

/// How long shutdown waits for the actor (it answers in microseconds unless it is gone).
const ACTOR_TIMEOUT: Duration = Duration::from_secs(10);

/// Peers whose epochs the subscription remembers at most (the records of peers that crashed expire
/// silently).
const MAX_TRACKED_PEERS: usize = 100_000;

/// How long shutdown waits for the publishing budget to allow the deletion; past it, the record is left to
/// expire.
const DELETION_WAIT: Duration = Duration::from_secs(2);

/// One peer's progress tracker. Cheap to clone; the tracker stops when [`ProgressTracker::shutdown`] is
/// called or the last clone is dropped (dropping does not delete the record: it expires after
/// `metadata_expiration`).
#[derive(Clone)]
pub struct ProgressTracker {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<Mutex<ProgressState>>,
    actor: Addr<ProgressActor>,
    /// False once the actor is dropped.
    actor_alive: Arc<AtomicBool>,
    membership: Membership,
    subscription: Mutex<Option<JoinHandle<()>>>,
    actor_gone: Mutex<Option<oneshot::Receiver<()>>>,
    shut_down: tokio::sync::Mutex<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        lock(&self.state).stop();
        if let Some(task) = lock(&self.subscription).take() {
            task.abort();
        }
        self.actor.do_send(Stop);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of the state is a few assignments that cannot panic half-way in a way that matters.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ProgressTracker {
    /// Starts the tracker of `membership`'s peer: reads the records once (the first estimate is ready on
    /// return), then refreshes and publishes in the background. Fails on an invalid configuration, or
    /// outside a tokio runtime (which carries its subscription task). A client-mode member always tracks in
    /// client mode. The tracker holds a handle to `membership`, so the peer stays up until it shuts down.
    pub fn start(membership: &Membership, mut config: ProgressConfig) -> Result<Self, ProgressError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ProgressError::NoRuntime)?;
        if membership.role() == Role::Client {
            config.client_mode = true;
        }
        let local_peer = membership.local_peer();
        let min_refresh = config.min_refresh_period.as_secs_f64();
        // Subscribed before the first read, so that no change falls between the two.
        let mut changes = membership.subscribe(PROGRESS_KEY);
        let now = membership.replica().now();
        let budget = PublishBudget::within(&membership.config().publish_limits);
        let mut state = ProgressState::new(local_peer, config, budget, now);
        let records = live_records(membership);
        state.refresh(&records, state.refresh_token(), now);
        let mut epochs: HashMap<PeerId, u64> = records.iter().map(|r| (r.peer, r.epoch)).collect();
        let state = Arc::new(Mutex::new(state));

        let (alive, gone) = oneshot::channel();
        let actor_alive = Arc::new(AtomicBool::new(true));
        let actor = ProgressActor {
            membership: membership.clone(),
            state: state.clone(),
            local_peer,
            min_refresh,
            refresh_timer: None,
            refresh_at: Time::INFINITY,
            last_refresh: now,
            publish_timer: None,
            _alive: Alive {
                flag: actor_alive.clone(),
                _gone: alive,
            },
        };
        let actor = ProgressActor::start_in_arbiter(&crate::membership::arbiter(), move |_| actor);
        let forward = actor.clone();
        let subscription = runtime.spawn(async move {
            loop {
                let change = match changes.next().await {
                    Ok(change) => change,
                    Err(SubscriptionError::Lagged(_)) => {
                        forward.do_send(PeersChanged);
                        continue;
                    }
                    Err(SubscriptionError::Closed) => return,
                };
                let Some(Subkey::Peer(peer)) = change.subkey else {
                    continue;
                };
                if change.key != PROGRESS_KEY || peer == local_peer {
                    continue;
                }
                // Only what changes the estimate's shape is worth a refresh at once: a peer that appears,
                // leaves, or moves on. New samples are extrapolated from the rates until the next refresh.
                if epochs.len() >= MAX_TRACKED_PEERS {
                    // Peers whose records expired are never announced; forgetting everyone costs one refresh.
                    epochs.clear();
                }
                let moved = match &change.value {
                    Some(value) => match LocalProgress::decode(value) {
                        Ok(progress) if progress.peer == peer => epochs
                            .insert(peer, progress.epoch)
                            .is_none_or(|known| progress.epoch > known),
                        _ => false,
                    },
                    None => epochs.remove(&peer).is_some(),
                };
                if moved {
                    forward.do_send(PeersChanged);
                }
            }
        });
        Ok(Self {
            inner: Arc::new(Inner {
                state,
                actor,
                actor_alive,
                membership: membership.clone(),
                subscription: Mutex::new(Some(subscription)),
                actor_gone: Mutex::new(Some(gone)),
                shut_down: tokio::sync::Mutex::new(false),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, ProgressState> {
        lock(&self.inner.state)
    }

    /// The run's clock, seconds since the Unix epoch (the clock of every [`Time`] here).
    pub fn now(&self) -> Time {
        self.inner.membership.replica().now()
    }

    /// This peer has accumulated `samples_accumulated` samples at `epoch`. The hot path: a short mutex and
    /// arithmetic, no await, no record I/O; the publish it causes is throttled and done by the actor.
    pub fn report_local_progress(&self, epoch: u64, samples_accumulated: u64) {
        let now = self.now();
        if self.state().report_local_progress(epoch, samples_accumulated, now) {
            self.inner.actor.do_send(Poll);
        }
    }

    /// The latest estimate of the swarm's progress, with this peer's samples reported since the last refresh
    /// added. From shared memory: no actor round trip.
    pub fn global(&self) -> GlobalProgress {
        *self.state().global()
    }

    /// This peer's progress as last reported.
    pub fn local(&self) -> LocalProgress {
        *self.state().local()
    }

    /// Whether this peer should end its epoch now: the swarm is at a later epoch, has accumulated the target,
    /// or is expected to have by now.
    pub fn ready_to_update_epoch(&self) -> bool {
        let now = self.now();
        self.state().ready_to_update_epoch(now)
    }

    /// Now if the epoch is due, else the swarm's ETA (when to start matchmaking ahead of time).
    pub fn estimated_next_update_time(&self) -> Time {
        let now = self.now();
        self.state().estimated_next_update_time(now)
    }

    /// This peer starts `new_epoch` (Hivemind's `update_epoch`): the estimate moves to it if it is past the
    /// swarm's epoch (no samples, ETA `+inf` until the next refresh, which comes within
    /// `min_refresh_period`), this peer reports 0 samples, and its progress is published as soon as the
    /// record store's limits allow, without waiting for `min_publish_interval`.
    pub fn update_epoch(&self, new_epoch: u64) {
        let now = self.now();
        let mut state = self.state();
        if state.is_stopped() {
            return;
        }
        state.update_epoch(new_epoch, now);
        drop(state);
        self.inner.actor.do_send(EpochChanged);
    }

    /// This peer's measured rate, samples per second (about 0 before it reports samples).
    pub fn samples_per_second(&self) -> f64 {
        self.state().performance().samples_per_second()
    }

    /// Whether a refresh has read the records since the last [`ProgressTracker::update_epoch`] (the
    /// optimizer checks for falling behind only then).
    pub fn fetched_this_epoch(&self) -> bool {
        self.state().fetched_this_epoch()
    }

    /// Asks for a refresh of the estimate now.
    pub fn refresh_now(&self) {
        self.inner.actor.do_send(Refresh);
    }

    /// Whether the actor or its subscription task still runs (false once [`ProgressTracker::shutdown`]
    /// returned).
    pub fn is_running(&self) -> bool {
        let subscription = lock(&self.inner.subscription)
            .as_ref()
            .is_some_and(|task| !task.is_finished());
        self.inner.actor_alive.load(Ordering::SeqCst) || subscription
    }

    /// Stops the tracker: reports are ignored from now on, the actor and the subscription task stop (both are
    /// gone when this returns), and this peer's progress record is deleted, so that the other peers stop
    /// counting it at their next refresh. Idempotent.
    pub async fn shutdown(&self) {
        let mut shut_down = self.inner.shut_down.lock().await;
        if *shut_down {
            return;
        }
        *shut_down = true;
        self.state().stop();
        let subscription = lock(&self.inner.subscription).take();
        if let Some(task) = subscription {
            task.abort();
            let _ = task.await;
        }
        if tokio::time::timeout(ACTOR_TIMEOUT, self.inner.actor.send(Stop))
            .await
            .is_err()
        {
            tracing::warn!("the progress tracker's actor did not stop within {ACTOR_TIMEOUT:?}");
        }
        let gone = lock(&self.inner.actor_gone).take();
        if let Some(gone) = gone {
            let _ = tokio::time::timeout(ACTOR_TIMEOUT, gone).await;
        }
        self.delete_record().await;
    }

    async fn delete_record(&self) {
        let membership = &self.inner.membership;
        let deadline = self.now() + DELETION_WAIT.as_secs_f64();
        loop {
            let now = self.now();
            let deletion = self.state().deletion(now);
            match deletion {
                None => return,
                Some(Ok(expiration)) => {
                    let subkey = Some(Subkey::Peer(membership.local_peer()));
                    if let Err(error) = membership.publish(PROGRESS_KEY, subkey, None, expiration) {
                        tracing::debug!(%error, "progress record not deleted; it will expire");
                    }
                    return;
                }
                Some(Err(ready)) if ready <= deadline => {
                    tokio::time::sleep(Duration::from_secs_f64((ready - now).max(0.0) + 0.001)).await;
                }
                Some(Err(_)) => {
                    tracing::debug!("no publishing budget left to delete the progress record; it will expire");
                    return;
                }
            }
        }
    }
}

struct ProgressActor {
    membership: Membership,
    state: Arc<Mutex<ProgressState>>,
    local_peer: PeerId,
    min_refresh: f64,
    refresh_timer: Option<SpawnHandle>,
    /// When the refresh timer fires (`+inf`: not armed).
    refresh_at: Time,
    last_refresh: Time,
    publish_timer: Option<SpawnHandle>,
    /// Dropped with the actor: tells the handle it is gone.
    _alive: Alive,
}

/// Marks the actor gone when dropped with it.
struct Alive {
    flag: Arc<AtomicBool>,
    /// Its receiver, in shutdown, wakes when this is dropped.
    _gone: oneshot::Sender<()>,
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::SeqCst);
    }
}

impl Actor for ProgressActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let next = lock(&self.state).global().next_fetch_time;
        self.arm_refresh(next, ctx);
        self.poll_publish(ctx);
    }
}

/// The progress records of this peer and of the live members. Only live peers count: a peer that crashed
/// leaves its record behind until it expires, and its epoch and rate would otherwise keep pulling the
/// estimate (a crashed peer an epoch or two ahead would send every other peer to load the state, and its
/// rate would end epochs before their samples are there).
fn live_records(membership: &Membership) -> Vec<LocalProgress> {
    let local = membership.local_peer();
    let mut records = parse_records(membership.get(PROGRESS_KEY).as_ref());
    records.retain(|r| r.peer == local || membership.is_member(&r.peer));
    records
}

impl ProgressActor {
    fn now(&self) -> Time {
        self.membership.replica().now()
    }

    fn refresh(&mut self, ctx: &mut Context<Self>) {
        let token = lock(&self.state).refresh_token();
        let records = live_records(&self.membership);
        let now = self.now();
        let next = {
            let mut state = lock(&self.state);
            if state.is_stopped() {
                return;
            }
            state.refresh(&records, token, now)
        };
        self.last_refresh = now;
        self.arm_refresh(next, ctx);
    }

    /// A refresh at `at` instead of the one armed.
    fn arm_refresh(&mut self, at: Time, ctx: &mut Context<Self>) {
        if let Some(timer) = self.refresh_timer.take() {
            ctx.cancel_future(timer);
        }
        self.refresh_at = at;
        // A millisecond late rather than early: the estimate asked for this time.
        let delay = Duration::from_secs_f64((at - self.now()).clamp(0.0, 3600.0)) + Duration::from_millis(1);
        self.refresh_timer = Some(ctx.run_later(delay, |actor, ctx| {
            actor.refresh_timer = None;
            actor.refresh(ctx);
        }));
    }

    /// A refresh at `at` at the latest.
    fn refresh_by(&mut self, at: Time, ctx: &mut Context<Self>) {
        if at <= self.now() {
            self.refresh(ctx);
        } else if at < self.refresh_at {
            self.arm_refresh(at, ctx);
        }
    }

    fn poll_publish(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.publish_timer.take() {
            ctx.cancel_future(timer);
        }
        // A publish is followed by a wait; the bound only guards against a core that keeps publishing.
        for _ in 0..4 {
            let now = self.now();
            let decision = lock(&self.state).poll_publish(now);
            match decision {
                PublishDecision::Publish { progress, expiration } => {
                    let subkey = Some(Subkey::Peer(self.local_peer));
                    let published = self
                        .membership
                        .publish(PROGRESS_KEY, subkey, Some(progress.encode()), expiration);
                    if let Err(error) = published {
                        tracing::warn!(%error, "progress not published");
                        lock(&self.state).publish_refused();
                    }
                }
                PublishDecision::Wait(at) => {
                    let delay = Duration::from_secs_f64((at - now).clamp(0.0, 3600.0)) + Duration::from_millis(1);
                    self.publish_timer = Some(ctx.run_later(delay, |actor, ctx| {
                        actor.publish_timer = None;
                        actor.poll_publish(ctx);
                    }));
                    return;
                }
                PublishDecision::Idle => return,
            }
        }
    }
}

// ---- messages to the actor ----

/// A publish may be due sooner than the timer.
#[derive(Message)]
#[rtype(result = "()")]
struct Poll;

impl Handler<Poll> for ProgressActor {
    type Result = ();

    fn handle(&mut self, _: Poll, ctx: &mut Context<Self>) {
        self.poll_publish(ctx);
    }
}

/// This peer changed epoch: publish, and refresh soon.
#[derive(Message)]
#[rtype(result = "()")]
struct EpochChanged;

impl Handler<EpochChanged> for ProgressActor {
    type Result = ();

    fn handle(&mut self, _: EpochChanged, ctx: &mut Context<Self>) {
        self.poll_publish(ctx);
        let soon = self.now() + self.min_refresh;
        if soon < self.refresh_at {
            self.arm_refresh(soon, ctx);
        }
    }
}

/// A peer appeared, left or moved to a later epoch (or changes were missed).
#[derive(Message)]
#[rtype(result = "()")]
struct PeersChanged;

impl Handler<PeersChanged> for ProgressActor {
    type Result = ();

    fn handle(&mut self, _: PeersChanged, ctx: &mut Context<Self>) {
        // At most one refresh per min_refresh_period, however many peers move at once.
        let at = self.last_refresh + self.min_refresh;
        self.refresh_by(at, ctx);
    }
}

/// Refresh now.
#[derive(Message)]
#[rtype(result = "()")]
struct Refresh;

impl Handler<Refresh> for ProgressActor {
    type Result = ();

    fn handle(&mut self, _: Refresh, ctx: &mut Context<Self>) {
        self.refresh(ctx);
    }
}

/// Stop the actor and its timers.
#[derive(Message)]
#[rtype(result = "()")]
struct Stop;

impl Handler<Stop> for ProgressActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        lock(&self.state).stop();
        for timer in [self.refresh_timer.take(), self.publish_timer.take()]
            .into_iter()
            .flatten()
        {
            ctx.cancel_future(timer);
        }
        ctx.stop();
    }
}
