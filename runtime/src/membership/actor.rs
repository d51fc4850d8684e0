//! The membership actor: owns the SWIM state machine (foca) and turns its outputs into effects: datagrams
//! through the connection pool, timers on the actor's context, and changes of the member table.
//!
//! Everything that waits (dials, anti-entropy exchanges) runs as tokio tasks on the data-plane runtime and
//! reports back with a message, so the actor never blocks and its state changes only inside handlers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use colony_transports::PeerId;
use colony_transports::access::AccessPolicy;
use colony_transports::identity::PEER_ID_LEN;
use foca::{AccumulatingRuntime, Foca, Member, OwnedNotification, Timer};
use rand::RngExt;
use rand::rngs::StdRng;

use super::broadcast::RecordBroadcasts;
use super::identity::{CachingCodec, MemberId, Role};
use super::{MemberInfo, MembershipEvent, Shared};
use crate::records::sync;

type Swim = Foca<MemberId, CachingCodec, StdRng, RecordBroadcasts>;

/// Up to this many members, each peer runs an anti-entropy exchange every sync interval.
const SYNC_SWARM_SIZE: usize = 100;

/// Datagrams queued for a peer while it is being dialed.
const MAX_PENDING_PER_PEER: usize = 16;

/// foca's timers, kept in one heap with a single actor timer armed for the earliest: actix polls every
/// pending `run_later` of an actor on each wake-up, so one per foca timer would cost O(timers) per message.
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Timer<MemberId>>,
    next: u64,
    armed: Option<Instant>,
}

/// How far behind its timers this peer runs (see [`super::SwimConfig::max_local_health`]).
struct LocalHealth {
    score: u32,
    max: u32,
    /// A timer at least this late raises the score.
    late: Duration,
    /// The score falls by one per this much time of timers on time.
    recovery: Duration,
    last_change: Instant,
    gauge: metrics::Gauge,
}

impl LocalHealth {
    fn new(swim: &super::SwimConfig) -> Self {
        let gauge = metrics::gauge!("colony_membership_local_health");
        gauge.set(0.0);
        Self {
            score: 0,
            max: swim.max_local_health,
            late: swim.probe_rtt / 2,
            recovery: swim.probe_period,
            last_change: Instant::now(),
            gauge,
        }
    }

    /// Takes note of a timer that fired `lateness` after its deadline.
    fn observe(&mut self, lateness: Duration, now: Instant) {
        let before = self.score;
        if lateness >= self.late {
            self.score = (self.score + 1).min(self.max);
            self.last_change = now;
        } else if self.score > 0 && now.duration_since(self.last_change) >= self.recovery {
            self.score -= 1;
            self.last_change = now;
        }
        if self.score != before {
            self.gauge.set(f64::from(self.score));
            tracing::debug!(score = self.score, ?lateness, "membership: local health changed");
        }
    }

    /// `after`, stretched by the score.
    fn stretch(&self, after: Duration) -> Duration {
        after * (1 + self.score)
    }
}

pub(crate) struct MembershipActor {
    swim: Swim,
    health: LocalHealth,
    /// Raised by the record broadcast handler when a received record was new.
    fresh_records: Arc<AtomicBool>,
    runtime: AccumulatingRuntime<MemberId>,
    timers: Timers,
    shared: Arc<Shared>,
    rng: StdRng,
    dialing: HashMap<PeerId, Vec<Bytes>>,
    sync_in_flight: bool,
    sync_ticks: u64,
    left: bool,
    /// `colony_peers{role}`, one gauge per role, taken when the actor starts.
    peer_gauges: PeerGauges,
}

/// The `colony_peers{role}` gauges: the other members this peer sees alive, by role.
struct PeerGauges([(Role, metrics::Gauge); 3]);

impl PeerGauges {
    fn new() -> Self {
        Self([Role::Trainer, Role::Client, Role::Auxiliary].map(|role| {
            let gauge = metrics::gauge!("colony_peers", "role" => role.to_string());
            gauge.set(0.0);
            (role, gauge)
        }))
    }

    fn publish(&self, members: &HashMap<PeerId, MemberInfo>) {
        for (role, gauge) in &self.0 {
            gauge.set(members.values().filter(|member| member.role == *role).count() as f64);
        }
    }

    fn clear(&self) {
        for (_, gauge) in &self.0 {
            gauge.set(0.0);
        }
    }
}

impl MembershipActor {
    pub(crate) fn new(swim: Swim, fresh_records: Arc<AtomicBool>, shared: Arc<Shared>) -> Self {
        Self {
            health: LocalHealth::new(&shared.config.swim),
            swim,
            fresh_records,
            runtime: AccumulatingRuntime::new(),
            timers: Timers::default(),
            shared,
            rng: rand::make_rng(),
            dialing: HashMap::new(),
            sync_in_flight: false,
            sync_ticks: 0,
            left: false,
            peer_gauges: PeerGauges::new(),
        }
    }

    /// Carries out what foca asked for.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        while let Some((to, data)) = self.runtime.to_send() {
            self.send(to, data, ctx);
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.schedule(after, timer, ctx);
        }
        while let Some(notification) = self.runtime.to_notify() {
            self.on_notification(notification);
        }
    }

    fn schedule(&mut self, after: Duration, timer: Timer<MemberId>, ctx: &mut Context<Self>) {
        // Failure detection slows down with local health; gossip and announcements keep their pace, as
        // they are what fills the gaps in a swarm that is still converging.
        let after = match timer {
            Timer::ProbeRandomMember(_) | Timer::SendIndirectProbe { .. } | Timer::ChangeSuspectToDown { .. } => {
                self.health.stretch(after)
            }
            _ => after,
        };
        let deadline = Instant::now() + after;
        let timers = &mut self.timers;
        let seq = timers.next;
        timers.next += 1;
        timers.heap.push(Reverse((deadline, seq)));
        timers.pending.insert(seq, timer);
        self.arm(ctx);
    }

    /// Makes sure an actor timer is pending for the earliest foca timer.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        let Some(Reverse((earliest, _))) = self.timers.heap.peek().copied() else {
            return;
        };
        if self.timers.armed.is_none_or(|armed| earliest < armed) {
            self.timers.armed = Some(earliest);
            let after = earliest.saturating_duration_since(Instant::now());
            ctx.run_later(after, |actor, ctx| actor.fire_timers(ctx));
        }
    }

    fn fire_timers(&mut self, ctx: &mut Context<Self>) {
        // Actor timers may fire a hair before the instant they were armed for.
        let now = Instant::now() + Duration::from_millis(1);
        if self.timers.armed.is_some_and(|armed| armed <= now) {
            self.timers.armed = None;
        }
        if let Some(Reverse((earliest, _))) = self.timers.heap.peek().copied()
            && earliest <= now
        {
            self.health.observe(now.saturating_duration_since(earliest), now);
        }
        while let Some(Reverse((deadline, seq))) = self.timers.heap.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.heap.pop();
            if let Some(timer) = self.timers.pending.remove(&seq)
                && let Err(error) = self.swim.handle_timer(timer, &mut self.runtime)
            {
                tracing::debug!(%error, "membership timer");
            }
        }
        self.drain(ctx);
        self.arm(ctx);
    }

    fn send(&mut self, to: MemberId, data: Bytes, ctx: &mut Context<Self>) {
        let counters = &self.shared.counters;
        if self.shared.pool.send_datagram(&to.peer, data.clone()) {
            counters.datagrams_sent.inc();
            return;
        }
        if let Some(queue) = self.dialing.get_mut(&to.peer) {
            if queue.len() < MAX_PENDING_PER_PEER {
                queue.push(data);
            }
            return;
        }
        let Some(address) = to.address.clone() else {
            // A client-mode peer that is not connected to us: only its own connections reach it.
            counters.datagrams_unreachable.inc();
            return;
        };
        self.dialing.insert(to.peer, vec![data]);
        let (pool, peer, actor) = (self.shared.pool.clone(), to.peer, ctx.address());
        self.shared.spawn(async move {
            let result = pool.connect(peer, Some(&address)).await;
            if let Err(error) = &result {
                tracing::debug!(peer = %peer.short(), %error, "could not reach member");
            }
            actor.do_send(Dialed {
                peer,
                ok: result.is_ok(),
            });
        });
    }

    fn on_notification(&mut self, notification: OwnedNotification<MemberId>) {
        if self.left {
            // Leaving marks this peer down and empties its view; that is not news for anyone.
            return;
        }
        let shared = &self.shared;
        match notification {
            OwnedNotification::MemberUp(id) => {
                shared.suspected_mut().remove(&id.peer);
                if id.role == Role::Client {
                    shared.pool.pin(&id.peer);
                }
                let info = MemberInfo::from(&id);
                tracing::info!(peer = %id.peer, role = %id.role, address = ?id.address.as_ref().map(ToString::to_string), "member joined");
                shared.members_mut().insert(id.peer, info.clone());
                let _ = shared.events.send(MembershipEvent::Joined(info));
            }
            OwnedNotification::MemberDown(id) => {
                let removed = {
                    let mut members = shared.members_mut();
                    match members.get(&id.peer) {
                        Some(info) if info.generation <= id.generation => members.remove(&id.peer),
                        _ => None,
                    }
                };
                if removed.is_some() {
                    shared.suspected_mut().remove(&id.peer);
                    tracing::info!(peer = %id.peer, "member left or failed");
                    let _ = shared.events.send(MembershipEvent::Left(id.peer));
                }
            }
            OwnedNotification::Rename(old, new) => {
                shared.suspected_mut().remove(&old.peer);
                let info = MemberInfo::from(&new);
                let mut members = shared.members_mut();
                members.remove(&old.peer);
                members.insert(new.peer, info);
            }
            OwnedNotification::Rejoin(id) => {
                tracing::warn!(
                    generation = id.generation,
                    "this peer was declared down; rejoined as a new generation"
                );
                let _ = shared.events.send(MembershipEvent::Rejoined(id.generation));
            }
            OwnedNotification::Defunct => {
                tracing::warn!("this peer was declared down by the swarm");
            }
            OwnedNotification::Idle => {
                tracing::info!("no other member is reachable");
            }
            OwnedNotification::Active => {}
            #[allow(unreachable_patterns)]
            _ => {}
        }
        self.peer_gauges
            .publish(&shared.members.read().unwrap_or_else(|p| p.into_inner()));
    }

    /// Sends the records backlog to random members now. Two rounds of foca's fan-out (three members each):
    /// a push epidemic in which every peer passes news to f others misses about e^-f of the swarm, 5 % at
    /// f = 3 and 0.25 % at f = 6; the few it misses get the news from the next gossip round.
    fn push_records(&mut self) {
        for _ in 0..2 {
            if let Err(error) = self.swim.broadcast(&mut self.runtime) {
                tracing::debug!(%error, "passing on records");
            }
        }
    }

    /// Starts an anti-entropy exchange with a random member, unless one is running.
    fn anti_entropy(&mut self, ctx: &mut Context<Self>) {
        self.shared.pool.sweep();
        let access = &self.shared.access;
        if matches!(access.policy(), AccessPolicy::Certificates { .. }) {
            // A peer admitted with a certificate that has expired since loses its connections; it is refused
            // when it dials again.
            self.shared.pool.close_where(|peer| {
                access.expired(peer).map(|refusal| {
                    access.count_refusal(&refusal);
                    tracing::warn!(%refusal, "closing the connections of a peer whose certificate expired");
                    format!("{}{refusal}", colony_transports::access::exchange::CLOSE_PREFIX)
                })
            });
        }
        // Gossip carries records fast; these exchanges are the safety net. In swarms above
        // SYNC_SWARM_SIZE members each peer runs them proportionally less often, so the swarm as a whole
        // runs about SYNC_SWARM_SIZE per interval whatever its size.
        self.sync_ticks += 1;
        let every = (self.swim.num_members() / SYNC_SWARM_SIZE).max(1) as u64;
        if self.sync_in_flight || self.left || !self.sync_ticks.is_multiple_of(every) {
            return;
        }
        let pool = &self.shared.pool;
        let candidates: Vec<&MemberId> = self
            .swim
            .iter_members()
            .map(Member::id)
            .filter(|id| id.address.is_some() || pool.is_connected(&id.peer))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let target = candidates[self.rng.random_range(0..candidates.len())].clone();
        self.sync_in_flight = true;
        let (shared, actor) = (self.shared.clone(), ctx.address());
        self.shared.spawn(async move {
            let exchange = async {
                let conn = shared.pool.connect(target.peer, target.address.as_ref()).await?;
                sync::sync_with(&conn, &shared.replica, &shared.config.stream)
                    .await
                    .map_err(|e| e.to_string())
            };
            let timeout = shared.config.stream.message_timeout;
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(applied)) if applied.received > 0 => {
                    tracing::debug!(peer = %target.peer.short(), ?applied, "anti-entropy exchange");
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::debug!(peer = %target.peer.short(), %error, "anti-entropy exchange failed"),
                Err(_) => tracing::debug!(peer = %target.peer.short(), "anti-entropy exchange timed out"),
            }
            actor.do_send(SyncDone);
        });
    }
}

impl Actor for MembershipActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.shared.config.mailbox_capacity);
        let interval = self.shared.config.sync_interval;
        ctx.run_interval(interval, |actor, ctx| actor.anti_entropy(ctx));
    }
}

/// A datagram from a connected peer.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Datagram {
    pub from: PeerId,
    pub data: Bytes,
}

impl Handler<Datagram> for MembershipActor {
    type Result = ();

    fn handle(&mut self, msg: Datagram, ctx: &mut Context<Self>) {
        let counters = &self.shared.counters;
        counters.datagrams_received.inc();
        // The sender named in the packet (its first bytes) must be the peer the connection proved; anything
        // else is spoofing. foca decodes the rest.
        match msg.data.get(..PEER_ID_LEN).map(PeerId::try_from_slice) {
            Some(Ok(claimed)) if claimed == msg.from => {}
            Some(Ok(claimed)) => {
                counters.datagrams_spoofed.inc();
                tracing::debug!(from = %msg.from.short(), claimed = %claimed.short(), "dropped a membership packet claiming another sender");
                return;
            }
            _ => {
                counters.datagrams_malformed.inc();
                tracing::debug!(from = %msg.from.short(), "dropped a membership packet too short to name its sender");
                return;
            }
        }
        if let Err(error) = self.swim.handle_data(&msg.data, &mut self.runtime) {
            counters.datagrams_malformed.inc();
            tracing::debug!(from = %msg.from.short(), %error, "membership packet refused");
        }
        // A record seen for the first time is passed on at once (push gossip): each hop then costs one
        // network latency instead of a gossip interval.
        if self.fresh_records.swap(false, Ordering::Relaxed) {
            self.push_records();
        }
        self.drain(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Dialed {
    peer: PeerId,
    ok: bool,
}

impl Handler<Dialed> for MembershipActor {
    type Result = ();

    fn handle(&mut self, msg: Dialed, _ctx: &mut Context<Self>) {
        let queued = self.dialing.remove(&msg.peer).unwrap_or_default();
        let counters = &self.shared.counters;
        for data in queued {
            if msg.ok && self.shared.pool.send_datagram(&msg.peer, data) {
                counters.datagrams_sent.inc();
            } else {
                counters.datagrams_unreachable.inc();
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct SyncDone;

impl Handler<SyncDone> for MembershipActor {
    type Result = ();

    fn handle(&mut self, _: SyncDone, _ctx: &mut Context<Self>) {
        self.sync_in_flight = false;
    }
}

/// A connection to `peer` broke: if no other connection to it is open and it cannot be dialed again at
/// once, it is suspected (and disseminated as such, so it can refute if it is alive); unless it refutes within
/// the suspicion time, it is declared dead. A crashed process is thus dropped after the suspicion time
/// instead of waiting for some member's probe to pick it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ConnectionLost {
    pub peer: PeerId,
    pub reason: colony_transports::CloseReason,
}

impl Handler<ConnectionLost> for MembershipActor {
    type Result = ();

    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Context<Self>) {
        if self.left || self.shared.pool.is_connected(&msg.peer) {
            return;
        }
        let Some(member) = self.active_member(&msg.peer) else {
            return;
        };
        tracing::debug!(peer = %msg.peer.short(), reason = %msg.reason, "connection to a member broke");
        let Some(address) = member.id().address.clone() else {
            self.suspect(member, ctx);
            return;
        };
        let (pool, peer, actor) = (self.shared.pool.clone(), msg.peer, ctx.address());
        self.shared.spawn(async move {
            let ok = pool.connect(peer, Some(&address)).await.is_ok();
            actor.do_send(Redialed { peer, ok });
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Redialed {
    peer: PeerId,
    ok: bool,
}

impl Handler<Redialed> for MembershipActor {
    type Result = ();

    fn handle(&mut self, msg: Redialed, ctx: &mut Context<Self>) {
        if msg.ok || self.left {
            return;
        }
        if let Some(member) = self.active_member(&msg.peer) {
            self.suspect(member, ctx);
        }
    }
}

impl MembershipActor {
    fn active_member(&self, peer: &PeerId) -> Option<Member<MemberId>> {
        self.swim
            .iter_membership_state()
            .find(|m| m.id().peer == *peer && m.state() != foca::State::Down)
            .cloned()
    }

    fn suspect(&mut self, member: Member<MemberId>, ctx: &mut Context<Self>) {
        let (id, incarnation) = (member.id().clone(), member.incarnation());
        self.shared.suspected_mut().insert(id.peer);
        let suspect = Member::new(id.clone(), incarnation, foca::State::Suspect);
        if let Err(error) = self.swim.apply_many(std::iter::once(suspect), true, &mut self.runtime) {
            tracing::debug!(%error, "suspecting a member");
        }
        self.drain(ctx);
        let after = self.shared.config.swim.suspect_to_down_after;
        ctx.run_later(after, move |actor, ctx| {
            let unrefuted = actor
                .swim
                .iter_membership_state()
                .any(|m| m.id() == &id && m.incarnation() == incarnation && m.state() == foca::State::Suspect);
            if !unrefuted {
                actor.shared.suspected_mut().remove(&id.peer);
            } else {
                let down = Member::new(id, incarnation, foca::State::Down);
                if let Err(error) = actor.swim.apply_many(std::iter::once(down), true, &mut actor.runtime) {
                    tracing::debug!(%error, "declaring a member dead");
                }
                actor.drain(ctx);
            }
        });
    }
}

/// Piggyback an encoded record on SWIM packets.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct AddBroadcast(pub Bytes);

impl Handler<AddBroadcast> for MembershipActor {
    type Result = ();

    fn handle(&mut self, msg: AddBroadcast, ctx: &mut Context<Self>) {
        if let Err(error) = self.swim.add_broadcast(&msg.0) {
            tracing::debug!(%error, "record not piggybacked; anti-entropy will carry it");
        }
        // Send it now rather than at the next gossip tick.
        self.push_records();
        self.drain(ctx);
    }
}

/// A bootstrap peer admits a joiner: learns it, and answers with its own identity and the active members.
#[derive(Message)]
#[rtype(result = "(MemberId, Vec<Member<MemberId>>)")]
pub(crate) struct Admit(pub MemberId);

impl Handler<Admit> for MembershipActor {
    type Result = MessageResult<Admit>;

    fn handle(&mut self, msg: Admit, ctx: &mut Context<Self>) -> Self::Result {
        let joiner = Member::alive(msg.0);
        if let Err(error) = self.swim.apply_many(std::iter::once(joiner), true, &mut self.runtime) {
            tracing::debug!(%error, "admitting a joiner");
        }
        self.drain(ctx);
        let members = self.swim.iter_members().cloned().collect();
        MessageResult((self.swim.identity().clone(), members))
    }
}

/// A joiner learns the members its bootstrap peer knows, and announces itself to that peer.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Learn {
    pub bootstrap: MemberId,
    pub members: Vec<Member<MemberId>>,
}

impl Handler<Learn> for MembershipActor {
    type Result = ();

    fn handle(&mut self, msg: Learn, ctx: &mut Context<Self>) {
        let me = self.swim.identity().peer;
        let members = msg.members.into_iter().filter(|m| m.id().peer != me);
        if let Err(error) = self.swim.apply_many(members, false, &mut self.runtime) {
            tracing::debug!(%error, "applying the bootstrap peer's members");
        }
        if let Err(error) = self.swim.announce(msg.bootstrap, &mut self.runtime) {
            tracing::debug!(%error, "announcing to the bootstrap peer");
        }
        self.drain(ctx);
    }
}

/// This peer's current identity.
#[derive(Message)]
#[rtype(result = "MemberId")]
pub(crate) struct CurrentIdentity;

impl Handler<CurrentIdentity> for MembershipActor {
    type Result = MessageResult<CurrentIdentity>;

    fn handle(&mut self, _: CurrentIdentity, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.swim.identity().clone())
    }
}

/// Leave the swarm gracefully: tell the members, then stop.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Leave;

impl Handler<Leave> for MembershipActor {
    type Result = ();

    fn handle(&mut self, _: Leave, ctx: &mut Context<Self>) {
        if !self.left {
            self.left = true;
            self.peer_gauges.clear();
            if let Err(error) = self.swim.leave_cluster(&mut self.runtime) {
                tracing::debug!(%error, "leaving the swarm");
            }
            // Only the goodbye datagrams: no timer may run after leaving.
            while let Some((to, data)) = self.runtime.to_send() {
                self.send(to, data, ctx);
            }
        }
    }
}

/// Stop the actor (after [`Leave`], or at once for a crash-like shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stop;

impl Handler<Stop> for MembershipActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// How long a graceful leave waits for its datagrams to go out before connections close.
pub(crate) const LEAVE_FLUSH: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_timers_raise_local_health_up_to_its_bound_and_timers_on_time_lower_it_one_period_at_a_time() {
        let swim = super::super::SwimConfig::default();
        let mut health = LocalHealth::new(&swim);
        let start = Instant::now();
        let (late, on_time) = (swim.probe_rtt / 2, swim.probe_rtt / 10);
        health.observe(on_time, start);
        assert_eq!(
            health.stretch(Duration::from_millis(400)),
            Duration::from_millis(400),
            "a peer on time"
        );
        for step in 1..=10u32 {
            health.observe(late, start + Duration::from_millis(u64::from(step)));
        }
        assert_eq!(health.score, swim.max_local_health, "bounded by max_local_health");
        let max = swim.max_local_health;
        assert_eq!(
            health.stretch(Duration::from_secs(1)),
            Duration::from_secs(u64::from(1 + max))
        );
        let last_late = start + Duration::from_millis(10);
        health.observe(on_time, last_late + swim.probe_period / 2);
        assert_eq!(health.score, max, "recovers only after a probe period on time");
        health.observe(on_time, last_late + swim.probe_period);
        assert_eq!(health.score, max - 1);
        health.observe(on_time, last_late + swim.probe_period + Duration::from_millis(1));
        assert_eq!(health.score, max - 1, "one step per probe period");
        let off = super::super::SwimConfig {
            max_local_health: 0,
            ..swim.clone()
        };
        let mut health = LocalHealth::new(&off);
        health.observe(Duration::from_secs(5), start);
        assert_eq!(
            health.stretch(Duration::from_secs(1)),
            Duration::from_secs(1),
            "turned off"
        );
    }
}
