//! Publishing limits: how often one peer may update one key, and how many records it may publish per
//! second over all its keys. A peer that publishes faster is throttled (its updates are dropped) and
//! counted, not obeyed. Pure: time is passed in.
//!
//! The budget over all keys is checked first, so a peer that writes many distinct keys is stopped before it
//! gets a bucket per key: the table of buckets, shared by every peer, cannot be filled by one of them.
//! Records signed by their owner are charged to the owner; the others (unsigned, so owned by nobody) are
//! charged to the peer that sent them, in a budget of their own, so relaying them never eats into a peer's
//! budget for its own records.

use std::collections::HashMap;

use colony_transports::PeerId;

use super::Time;

/// Whom a record is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Payer {
    /// The owner whose signature the record carries.
    Owner(PeerId),
    /// The peer that sent a record that names no owner.
    Sender(PeerId),
}

impl Payer {
    /// The peer charged.
    pub fn peer(&self) -> PeerId {
        match self {
            Payer::Owner(peer) | Payer::Sender(peer) => *peer,
        }
    }
}

/// Which budget a refused update exceeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Throttle {
    /// The (peer, key) budget: `rate_per_sec` updates a second of one key.
    Key { rate_per_sec: f64 },
    /// The peer's budget over all its keys: `rate_per_sec` records a second.
    Peer { rate_per_sec: f64 },
    /// Every bucket is busy: the table is full.
    Table { max_tracked: usize },
}

/// A token bucket per (peer, key), and one per peer over all its keys.
#[derive(Debug)]
pub struct PublishLimiter {
    rate_per_sec: f64,
    burst: f64,
    peer_rate_per_sec: f64,
    peer_burst: f64,
    max_tracked: usize,
    buckets: HashMap<(PeerId, String), Bucket>,
    peers: HashMap<Payer, Bucket>,
    throttled: u64,
    last_sweep: Time,
}

/// Seconds between sweeps of the buckets that refilled: a slot written once (a declaration of one round)
/// must not stay in the tables until they are full.
const SWEEP_INTERVAL: Time = 10.0;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Time,
}

impl Bucket {
    fn refill(&mut self, rate: f64, burst: f64, now: Time) {
        let elapsed = (now - self.updated).max(0.0);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = self.updated.max(now);
    }

    fn take(&mut self, rate: f64, burst: f64, now: Time) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn sanitize_rate(rate: f64) -> f64 {
    if rate.is_finite() { rate.max(0.0) } else { 0.0 }
}

/// Drops the buckets that refilled completely: they hold no information.
fn drop_refilled<K: Eq + std::hash::Hash>(table: &mut HashMap<K, Bucket>, rate: f64, burst: f64, now: Time) {
    table.retain(|_, bucket| {
        bucket.refill(rate, burst, now);
        bucket.tokens < burst
    });
}

/// Drops the refilled buckets when `table` is at `max`. Returns whether there is room for one more.
fn make_room<K: Eq + std::hash::Hash>(
    table: &mut HashMap<K, Bucket>,
    max: usize,
    rate: f64,
    burst: f64,
    now: Time,
) -> bool {
    if table.len() >= max {
        drop_refilled(table, rate, burst, now);
    }
    table.len() < max
}

impl PublishLimiter {
    /// Allows `burst` updates at once per (peer, key), refilled at `rate_per_sec`; tracks at most
    /// `max_tracked` pairs (idle ones are forgotten first). No budget over all keys until
    /// [`PublishLimiter::with_peer_budget`] sets one.
    pub fn new(rate_per_sec: f64, burst: u32, max_tracked: usize) -> Self {
        Self {
            rate_per_sec: sanitize_rate(rate_per_sec),
            burst: f64::from(burst.max(1)),
            peer_rate_per_sec: f64::INFINITY,
            peer_burst: f64::INFINITY,
            max_tracked: max_tracked.max(1),
            buckets: HashMap::new(),
            peers: HashMap::new(),
            throttled: 0,
            last_sweep: Time::NEG_INFINITY,
        }
    }

    /// Also allows each payer `burst` records at once over all its keys, refilled at `rate_per_sec`.
    pub fn with_peer_budget(mut self, rate_per_sec: f64, burst: u32) -> Self {
        self.peer_rate_per_sec = sanitize_rate(rate_per_sec);
        self.peer_burst = f64::from(burst.max(1));
        self
    }

    /// Whether `payer` may publish an update of `key` at `now`; a refusal is counted and says which
    /// budget it exceeded.
    pub fn charge(&mut self, payer: Payer, key: &str, now: Time) -> Result<(), Throttle> {
        let result = self.check(payer, key, now);
        if result.is_err() {
            self.throttled += 1;
        }
        result
    }

    /// Drops the buckets that refilled completely, in both tables.
    fn sweep(&mut self, now: Time) {
        self.last_sweep = now;
        drop_refilled(&mut self.buckets, self.rate_per_sec, self.burst, now);
        drop_refilled(&mut self.peers, self.peer_rate_per_sec, self.peer_burst, now);
    }

    /// Buckets held now, per (peer, key) and per payer.
    pub fn tracked(&self) -> (usize, usize) {
        (self.buckets.len(), self.peers.len())
    }

    fn check(&mut self, payer: Payer, key: &str, now: Time) -> Result<(), Throttle> {
        if now - self.last_sweep >= SWEEP_INTERVAL {
            self.sweep(now);
        }
        if self.peer_burst.is_finite() {
            let (rate, burst) = (self.peer_rate_per_sec, self.peer_burst);
            if !self.peers.contains_key(&payer) && !make_room(&mut self.peers, self.max_tracked, rate, burst, now) {
                return Err(Throttle::Table {
                    max_tracked: self.max_tracked,
                });
            }
            let bucket = self.peers.entry(payer).or_insert(Bucket {
                tokens: burst,
                updated: now,
            });
            if !bucket.take(rate, burst, now) {
                return Err(Throttle::Peer { rate_per_sec: rate });
            }
        }
        let (rate, burst) = (self.rate_per_sec, self.burst);
        let slot = (payer.peer(), key.to_owned());
        if !self.buckets.contains_key(&slot) && !make_room(&mut self.buckets, self.max_tracked, rate, burst, now) {
            return Err(Throttle::Table {
                max_tracked: self.max_tracked,
            });
        }
        let bucket = self.buckets.entry(slot).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        if bucket.take(rate, burst, now) {
            Ok(())
        } else {
            Err(Throttle::Key { rate_per_sec: rate })
        }
    }

    /// How many updates were refused so far.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_transports::Keypair;

    fn owner(seed: u8) -> Payer {
        Payer::Owner(Keypair::from_seed([seed; 32]).peer_id())
    }

    #[test]
    fn slots_written_once_are_forgotten_once_they_refill() {
        let mut limiter = PublishLimiter::new(20.0, 40, 100_000).with_peer_budget(100.0, 200);
        let peer = owner(1);
        // One declaration slot per round, as a long run writes them: a new key every 0.1 s for 100 s.
        let mut most = 0;
        for round in 0..1000 {
            let now = f64::from(round) * 0.1;
            assert!(limiter.charge(peer, &format!("round-{round}"), now).is_ok());
            most = most.max(limiter.tracked().0);
        }
        assert!(
            most <= 2 + (SWEEP_INTERVAL / 0.1) as usize,
            "{most} buckets held at most"
        );
        // A peer's budget that refilled is dropped too, and a bucket in use is kept.
        assert!(limiter.charge(peer, "busy", 200.0).is_ok());
        assert!(limiter.charge(owner(2), "busy", 200.5).is_ok());
        limiter.charge(owner(2), "other", 211.0).unwrap();
        assert_eq!(limiter.tracked().1, 1, "only owner 2's budget is still in use");
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let peer = owner(1);
        let mut limiter = PublishLimiter::new(2.0, 3, 16);
        assert!((0..3).all(|_| limiter.charge(peer, "progress", 0.0).is_ok()));
        assert_eq!(
            limiter.charge(peer, "progress", 0.0),
            Err(Throttle::Key { rate_per_sec: 2.0 })
        );
        assert!(limiter.charge(peer, "progress", 0.25).is_err(), "half a token");
        assert!(
            limiter.charge(peer, "progress", 0.5).is_ok(),
            "one token after 0.5 s at 2/s"
        );
        assert!(limiter.charge(peer, "progress", 0.5).is_err());
        assert_eq!(limiter.throttled(), 3);
        // The bucket never holds more than the burst.
        assert!((0..3).all(|_| limiter.charge(peer, "progress", 100.0).is_ok()));
        assert!(limiter.charge(peer, "progress", 100.0).is_err());
    }

    #[test]
    fn keys_and_peers_are_limited_separately() {
        let (a, b) = (owner(1), owner(2));
        let mut limiter = PublishLimiter::new(1.0, 1, 16);
        assert!(limiter.charge(a, "x", 0.0).is_ok());
        assert!(limiter.charge(a, "x", 0.0).is_err());
        assert!(limiter.charge(a, "y", 0.0).is_ok());
        assert!(limiter.charge(b, "x", 0.0).is_ok());
    }

    #[test]
    fn tracked_pairs_are_bounded() {
        let mut limiter = PublishLimiter::new(1.0, 1, 4);
        let peers: Vec<Payer> = (0..8u8).map(owner).collect();
        for peer in &peers[..4] {
            assert!(limiter.charge(*peer, "k", 0.0).is_ok());
        }
        // The table is full of busy buckets: a fifth pair is refused rather than growing memory.
        assert_eq!(
            limiter.charge(peers[4], "k", 0.0),
            Err(Throttle::Table { max_tracked: 4 })
        );
        // Once the others have refilled, they are forgotten and new pairs fit.
        assert!(limiter.charge(peers[5], "k", 10.0).is_ok());
        assert!(limiter.buckets.len() <= 4);
    }

    #[test]
    fn a_peer_writing_many_keys_is_held_to_its_budget_over_all_of_them() {
        let mut limiter = PublishLimiter::new(20.0, 40, 1000).with_peer_budget(10.0, 5);
        let flooder = owner(1);
        let allowed = (0..10_000)
            .filter(|i| limiter.charge(flooder, &format!("key-{i}"), 0.0).is_ok())
            .count();
        assert_eq!(allowed, 5, "the burst over all keys");
        assert_eq!(
            limiter.charge(flooder, "another", 0.0),
            Err(Throttle::Peer { rate_per_sec: 10.0 })
        );
        // Refused writes got no bucket of their own: the shared table still has room for everyone else.
        assert_eq!(limiter.buckets.len(), 5);
        assert!(limiter.charge(owner(2), "key-0", 0.0).is_ok());
        // The budget refills at its rate: 10 a second.
        let later = (0..100)
            .filter(|i| limiter.charge(flooder, &format!("later-{i}"), 0.5).is_ok())
            .count();
        assert_eq!(later, 5);
        assert_eq!(limiter.throttled(), 10_000 - 5 + 1 + 95);
    }

    #[test]
    fn relaying_unowned_records_does_not_spend_the_budget_for_ones_own() {
        let mut limiter = PublishLimiter::new(20.0, 40, 1000).with_peer_budget(1.0, 2);
        let peer = Keypair::from_seed([3; 32]).peer_id();
        for i in 0..2 {
            assert!(
                limiter
                    .charge(Payer::Sender(peer), &format!("unsigned-{i}"), 0.0)
                    .is_ok()
            );
        }
        assert_eq!(
            limiter.charge(Payer::Sender(peer), "unsigned-2", 0.0),
            Err(Throttle::Peer { rate_per_sec: 1.0 })
        );
        assert!(limiter.charge(Payer::Owner(peer), "progress", 0.0).is_ok());
    }

    #[test]
    fn invalid_rates_refill_nothing() {
        let mut limiter = PublishLimiter::new(f64::NAN, 1, 16).with_peer_budget(f64::INFINITY, 1);
        let peer = owner(1);
        assert!(limiter.charge(peer, "k", 0.0).is_ok());
        assert!(limiter.charge(peer, "k", 1e9).is_err(), "a NaN rate refills nothing");
    }
}
