//! What one remote peer may make a [`Router`](super::Router) do: how many of its connections are served at
//! once, how many of its streams are in progress at once (over all its connections), and how fast it may
//! open streams of each protocol. A peer past a limit is refused, told why, and counted; the others are
//! served as before.
//!
//! The bookkeeping is one table per router, keyed by the proven remote peer, so a peer gains nothing by
//! spreading its streams over several connections. The token buckets are pure: time is passed in.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::identity::PeerId;
use crate::transport::Connection;

/// Limits on what one remote peer may make a router do. The defaults leave an honest peer far below every
/// limit (it opens a few streams per averaging round and keeps a handful in progress) while a flooding
/// peer gets a few hundred streams a second served at most, whatever it sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InboundLimits {
    /// Connections of one remote peer served at once. A newer connection beyond the limit closes the
    /// oldest (a peer that restarted leaves stale ones behind). Default 8; 0 is taken as 1.
    pub max_connections_per_peer: usize,
    /// Streams of one remote peer in progress at once, over all its connections; further streams are
    /// refused at once until some end. Default 64; 0 is taken as 1.
    pub max_streams_per_peer: usize,
    /// Streams one remote peer may open per second, per protocol, sustained. Default 100.
    pub streams_per_sec: f64,
    /// Streams one remote peer may open at once, per protocol, before `streams_per_sec` applies.
    /// Default 200; 0 is taken as 1.
    pub stream_burst: u32,
    /// Remote peers remembered while they hold no connection and no stream (their rate state is kept so
    /// that reconnecting does not refill it); beyond this, such peers are forgotten. Default 4096.
    pub max_tracked_peers: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        Self {
            max_connections_per_peer: 8,
            max_streams_per_peer: 64,
            streams_per_sec: 100.0,
            stream_burst: 200,
            max_tracked_peers: 4096,
        }
    }
}

impl InboundLimits {
    /// Checks the limits; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections_per_peer == 0 {
            return Err("inbound.max_connections_per_peer must be at least 1".into());
        }
        if self.max_streams_per_peer == 0 {
            return Err("inbound.max_streams_per_peer must be at least 1".into());
        }
        if !self.streams_per_sec.is_finite() || self.streams_per_sec <= 0.0 {
            return Err(format!(
                "inbound.streams_per_sec must be a finite number above 0, not {}",
                self.streams_per_sec
            ));
        }
        if self.stream_burst == 0 {
            return Err("inbound.stream_burst must be at least 1".into());
        }
        Ok(())
    }

    /// The limits with zero counts raised to one and an invalid rate taken as zero (only the burst, once).
    fn sanitized(self) -> Self {
        Self {
            max_connections_per_peer: self.max_connections_per_peer.max(1),
            max_streams_per_peer: self.max_streams_per_peer.max(1),
            streams_per_sec: if self.streams_per_sec.is_finite() {
                self.streams_per_sec.max(0.0)
            } else {
                0.0
            },
            stream_burst: self.stream_burst.max(1),
            max_tracked_peers: self.max_tracked_peers,
        }
    }
}

/// A token bucket: `burst` tokens at most, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = self.updated.max(now);
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= burst
    }
}

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamRefusal {
    /// The peer has `limit` streams in progress.
    TooManyStreams { limit: usize },
    /// The peer opens streams of `protocol` faster than the rate.
    RateLimited {
        protocol: String,
        streams_per_sec: f64,
        burst: u32,
    },
}

impl StreamRefusal {
    /// The metric label of the refusal.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            StreamRefusal::TooManyStreams { .. } => "too_many_streams",
            StreamRefusal::RateLimited { .. } => "rate_limited",
        }
    }

    /// What the opener is told.
    pub(crate) fn message(&self, peer: &PeerId) -> String {
        match self {
            StreamRefusal::TooManyStreams { limit } => format!(
                "refused: peer {} already has {limit} streams in progress here, the most one peer may have \
                 (max_streams_per_peer); open more once some have ended",
                peer.short()
            ),
            StreamRefusal::RateLimited {
                protocol,
                streams_per_sec,
                burst,
            } => format!(
                "rate limited: peer {} opens {protocol} streams faster than {streams_per_sec} per second \
                 (bursts of {burst}) (streams_per_sec, stream_burst); retry later",
                peer.short()
            ),
        }
    }
}

#[derive(Default)]
struct PeerUsage {
    /// Connections being served, oldest first, with their registration ids.
    connections: VecDeque<(u64, Connection)>,
    /// Streams in progress.
    streams: usize,
    /// Rate state per protocol name (only protocols the router serves).
    buckets: HashMap<String, TokenBucket>,
}

#[derive(Default)]
struct Table {
    peers: HashMap<PeerId, PeerUsage>,
    next_connection: u64,
}

/// The usage of every remote peer of one router.
pub(crate) struct Tracker {
    limits: InboundLimits,
    table: Mutex<Table>,
}

impl Tracker {
    pub(crate) fn new(limits: InboundLimits) -> Self {
        Self {
            limits: limits.sanitized(),
            table: Mutex::default(),
        }
    }

    pub(crate) fn limits(&self) -> &InboundLimits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent (counts change by one, entries are whole).
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The entry of `peer`, forgetting idle peers first when the table is over its bound.
    fn entry<'a>(&self, table: &'a mut Table, peer: PeerId) -> &'a mut PeerUsage {
        if !table.peers.contains_key(&peer) && table.peers.len() >= self.limits.max_tracked_peers {
            table
                .peers
                .retain(|_, usage| !usage.connections.is_empty() || usage.streams > 0);
        }
        table.peers.entry(peer).or_default()
    }

    /// Registers a connection being served. Returns its registration and, when the peer now has more
    /// connections than allowed, the oldest one, to be closed by the caller.
    pub(crate) fn connection_opened(self: &Arc<Self>, conn: &Connection) -> (ConnectionSlot, Option<Connection>) {
        let peer = conn.remote_peer();
        let mut table = self.lock();
        let id = table.next_connection;
        table.next_connection += 1;
        let limit = self.limits.max_connections_per_peer;
        let usage = self.entry(&mut table, peer);
        usage.connections.push_back((id, conn.clone()));
        let oldest = if usage.connections.len() > limit {
            usage.connections.pop_front().map(|(_, conn)| conn)
        } else {
            None
        };
        let slot = ConnectionSlot {
            tracker: self.clone(),
            peer,
            id,
        };
        (slot, oldest)
    }

    /// Counts a stream of `peer` in progress, or refuses it when the peer has too many.
    pub(crate) fn stream_started(self: &Arc<Self>, peer: PeerId) -> Result<StreamSlot, StreamRefusal> {
        let limit = self.limits.max_streams_per_peer;
        let mut table = self.lock();
        let usage = self.entry(&mut table, peer);
        if usage.streams >= limit {
            return Err(StreamRefusal::TooManyStreams { limit });
        }
        usage.streams += 1;
        Ok(StreamSlot {
            tracker: self.clone(),
            peer,
        })
    }

    /// Charges one stream of `protocol` (a name the router serves) to `peer` at `now`.
    pub(crate) fn allow_open(&self, peer: PeerId, protocol: &str, now: Instant) -> Result<(), StreamRefusal> {
        let (rate, burst) = (self.limits.streams_per_sec, f64::from(self.limits.stream_burst));
        let mut table = self.lock();
        let usage = self.entry(&mut table, peer);
        let bucket = match usage.buckets.get_mut(protocol) {
            Some(bucket) => bucket,
            None => usage
                .buckets
                .entry(protocol.to_owned())
                .or_insert(TokenBucket::full(burst, now)),
        };
        if bucket.take(rate, burst, now) {
            Ok(())
        } else {
            Err(StreamRefusal::RateLimited {
                protocol: protocol.to_owned(),
                streams_per_sec: rate,
                burst: self.limits.stream_burst,
            })
        }
    }

    /// Forgets `peer` once it holds nothing and its buckets have refilled (nothing left to remember).
    fn forget_if_idle(&self, table: &mut Table, peer: &PeerId, now: Instant) {
        let (rate, burst) = (self.limits.streams_per_sec, f64::from(self.limits.stream_burst));
        if let Some(usage) = table.peers.get_mut(peer)
            && usage.connections.is_empty()
            && usage.streams == 0
            && usage
                .buckets
                .values_mut()
                .all(|bucket| bucket.is_full(rate, burst, now))
        {
            table.peers.remove(peer);
        }
    }

    /// Streams of `peer` in progress now.
    #[cfg(test)]
    pub(crate) fn streams_of(&self, peer: &PeerId) -> usize {
        self.lock().peers.get(peer).map_or(0, |usage| usage.streams)
    }

    /// Connections of `peer` registered now.
    pub(crate) fn connections_of(&self, peer: &PeerId) -> usize {
        self.lock().peers.get(peer).map_or(0, |usage| usage.connections.len())
    }

    /// Remote peers in the table.
    #[cfg(test)]
    pub(crate) fn tracked_peers(&self) -> usize {
        self.lock().peers.len()
    }
}

/// A connection counted against its peer; dropping it (when serving ends) uncounts it.
pub(crate) struct ConnectionSlot {
    tracker: Arc<Tracker>,
    peer: PeerId,
    id: u64,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut table = self.tracker.lock();
        if let Some(usage) = table.peers.get_mut(&self.peer) {
            usage.connections.retain(|(id, _)| *id != self.id);
        }
        self.tracker.forget_if_idle(&mut table, &self.peer, Instant::now());
    }
}

/// A stream counted against its peer; dropping it (when its handler ends) uncounts it.
pub(crate) struct StreamSlot {
    tracker: Arc<Tracker>,
    peer: PeerId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut table = self.tracker.lock();
        if let Some(usage) = table.peers.get_mut(&self.peer) {
            usage.streams = usage.streams.saturating_sub(1);
        }
        self.tracker.forget_if_idle(&mut table, &self.peer, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::Keypair;

    fn peer(seed: u8) -> PeerId {
        Keypair::from_seed([seed; 32]).peer_id()
    }

    fn tracker(limits: InboundLimits) -> Arc<Tracker> {
        Arc::new(Tracker::new(limits))
    }

    #[test]
    fn a_bucket_passes_its_burst_then_holds_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(3.0, start);
        assert!((0..3).all(|_| bucket.take(2.0, 3.0, start)));
        assert!(!bucket.take(2.0, 3.0, start));
        assert!(
            !bucket.take(2.0, 3.0, start + Duration::from_millis(250)),
            "half a token"
        );
        assert!(
            bucket.take(2.0, 3.0, start + Duration::from_millis(500)),
            "one token after 0.5 s at 2/s"
        );
        assert!(!bucket.take(2.0, 3.0, start + Duration::from_millis(500)));
        // Never more than the burst, however long it rested.
        let later = start + Duration::from_secs(100);
        assert!((0..3).all(|_| bucket.take(2.0, 3.0, later)));
        assert!(!bucket.take(2.0, 3.0, later));
        // A clock that goes backwards (two callers' `now`s out of order) gives nothing and takes nothing.
        assert!(!bucket.take(2.0, 3.0, start));
    }

    #[test]
    fn opens_are_limited_per_peer_and_per_protocol() {
        let limits = InboundLimits {
            streams_per_sec: 1.0,
            stream_burst: 2,
            ..InboundLimits::default()
        };
        let tracker = tracker(limits);
        let now = Instant::now();
        let (a, b) = (peer(1), peer(2));
        assert!(tracker.allow_open(a, "join", now).is_ok());
        assert!(tracker.allow_open(a, "join", now).is_ok());
        let refusal = tracker.allow_open(a, "join", now).unwrap_err();
        assert_eq!(refusal.reason(), "rate_limited");
        let message = refusal.message(&a);
        assert!(
            message.starts_with("rate limited: ") && message.contains("join") && message.contains("1 per second"),
            "{message}"
        );
        // Another protocol of the same peer, and the same protocol of another peer, have their own budget.
        assert!(tracker.allow_open(a, "records", now).is_ok());
        assert!(tracker.allow_open(b, "join", now).is_ok());
        // The rate refills the budget.
        assert!(tracker.allow_open(a, "join", now + Duration::from_secs(1)).is_ok());
        assert!(tracker.allow_open(a, "join", now + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn streams_in_progress_are_capped_per_peer_and_released_on_drop() {
        let tracker = tracker(InboundLimits {
            max_streams_per_peer: 2,
            ..InboundLimits::default()
        });
        let (a, b) = (peer(1), peer(2));
        let first = tracker.stream_started(a).unwrap();
        let _second = tracker.stream_started(a).unwrap();
        let refusal = tracker.stream_started(a).err().expect("a third stream is refused");
        assert_eq!(refusal, StreamRefusal::TooManyStreams { limit: 2 });
        assert!(refusal.message(&a).contains("2 streams in progress"));
        assert!(tracker.stream_started(b).is_ok(), "another peer is not affected");
        drop(first);
        assert_eq!(tracker.streams_of(&a), 1);
        assert!(tracker.stream_started(a).is_ok(), "a slot came free");
    }

    #[test]
    fn idle_peers_are_forgotten_only_once_their_budget_has_refilled() {
        let tracker = tracker(InboundLimits {
            stream_burst: 1,
            streams_per_sec: 1000.0,
            ..InboundLimits::default()
        });
        let a = peer(1);
        let slot = tracker.stream_started(a).unwrap();
        tracker.allow_open(a, "join", Instant::now()).unwrap();
        drop(slot);
        // The bucket was just emptied: the peer is remembered, so a reconnect does not refill it.
        assert_eq!(tracker.tracked_peers(), 1);
        std::thread::sleep(Duration::from_millis(5));
        let slot = tracker.stream_started(a).unwrap();
        drop(slot);
        assert_eq!(tracker.tracked_peers(), 0, "refilled and idle: forgotten");
    }

    #[test]
    fn the_table_forgets_idle_peers_beyond_its_bound() {
        let tracker = tracker(InboundLimits {
            max_tracked_peers: 4,
            stream_burst: 1,
            streams_per_sec: 0.001,
            ..InboundLimits::default()
        });
        let now = Instant::now();
        let held = tracker.stream_started(peer(0)).unwrap();
        for seed in 1..4 {
            // Emptied buckets: these peers stay remembered while the table has room.
            tracker.allow_open(peer(seed), "join", now).unwrap();
        }
        assert_eq!(tracker.tracked_peers(), 4);
        tracker.allow_open(peer(9), "join", now).unwrap();
        // The idle ones made room; the peer with a stream in progress was kept.
        assert_eq!(tracker.tracked_peers(), 2);
        assert_eq!(tracker.streams_of(&peer(0)), 1);
        drop(held);
    }

    #[test]
    fn validation_names_the_field() {
        assert!(InboundLimits::default().validate().is_ok());
        let bad = InboundLimits {
            streams_per_sec: f64::NAN,
            ..InboundLimits::default()
        };
        assert!(bad.validate().unwrap_err().contains("inbound.streams_per_sec"));
        let bad = InboundLimits {
            max_streams_per_peer: 0,
            ..InboundLimits::default()
        };
        assert!(bad.validate().unwrap_err().contains("inbound.max_streams_per_peer"));
        // The router takes zero counts as one rather than refusing everything.
        let sanitized = InboundLimits {
            max_connections_per_peer: 0,
            stream_burst: 0,
            streams_per_sec: -1.0,
            ..InboundLimits::default()
        }
        .sanitized();
        assert_eq!(
            (
                sanitized.max_connections_per_peer,
                sanitized.stream_burst,
                sanitized.streams_per_sec
            ),
            (1, 1, 0.0)
        );
    }
}
