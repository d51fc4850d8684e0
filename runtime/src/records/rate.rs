//! Per-key publishing limits: how often one peer may update one key. A peer that publishes faster is
//! throttled (its updates are dropped) and counted, not obeyed. Pure: time is passed in.

use std::collections::HashMap;

use colony_transports::PeerId;

use super::Time;

/// A token bucket per (peer, key).
#[derive(Debug)]
pub struct PublishLimiter {
    rate_per_sec: f64,
    burst: f64,
    max_tracked: usize,
    buckets: HashMap<(PeerId, String), Bucket>,
    throttled: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Time,
}

impl PublishLimiter {
    /// Allows `burst` updates at once per (peer, key), refilled at `rate_per_sec`; tracks at most
    /// `max_tracked` pairs (idle ones are forgotten first).
    pub fn new(rate_per_sec: f64, burst: u32, max_tracked: usize) -> Self {
        Self {
            rate_per_sec: rate_per_sec.max(0.0),
            burst: f64::from(burst.max(1)),
            max_tracked: max_tracked.max(1),
            buckets: HashMap::new(),
            throttled: 0,
        }
    }

    /// Whether `peer` may publish an update of `key` at `now`; a refusal is counted.
    pub fn allow(&mut self, peer: PeerId, key: &str, now: Time) -> bool {
        let (rate, burst) = (self.rate_per_sec, self.burst);
        let refill = |bucket: &mut Bucket| {
            let elapsed = (now - bucket.updated).max(0.0);
            bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
            bucket.updated = now;
        };
        if !self.buckets.contains_key(&(peer, key.to_owned())) && self.buckets.len() >= self.max_tracked {
            // A bucket that has refilled completely holds no information: forget those first.
            self.buckets.retain(|_, bucket| {
                refill(bucket);
                bucket.tokens < burst
            });
            if self.buckets.len() >= self.max_tracked {
                self.throttled += 1;
                return false;
            }
        }
        let bucket = self.buckets.entry((peer, key.to_owned())).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        refill(bucket);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            self.throttled += 1;
            false
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

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let peer = Keypair::from_seed([1; 32]).peer_id();
        let mut limiter = PublishLimiter::new(2.0, 3, 16);
        assert!((0..3).all(|_| limiter.allow(peer, "progress", 0.0)));
        assert!(!limiter.allow(peer, "progress", 0.0));
        assert!(!limiter.allow(peer, "progress", 0.25), "half a token");
        assert!(limiter.allow(peer, "progress", 0.5), "one token after 0.5 s at 2/s");
        assert!(!limiter.allow(peer, "progress", 0.5));
        assert_eq!(limiter.throttled(), 3);
        // The bucket never holds more than the burst.
        assert!((0..3).all(|_| limiter.allow(peer, "progress", 100.0)));
        assert!(!limiter.allow(peer, "progress", 100.0));
    }

    #[test]
    fn keys_and_peers_are_limited_separately() {
        let (a, b) = (
            Keypair::from_seed([1; 32]).peer_id(),
            Keypair::from_seed([2; 32]).peer_id(),
        );
        let mut limiter = PublishLimiter::new(1.0, 1, 16);
        assert!(limiter.allow(a, "x", 0.0));
        assert!(!limiter.allow(a, "x", 0.0));
        assert!(limiter.allow(a, "y", 0.0));
        assert!(limiter.allow(b, "x", 0.0));
    }

    #[test]
    fn tracked_pairs_are_bounded() {
        let mut limiter = PublishLimiter::new(1.0, 1, 4);
        let peers: Vec<PeerId> = (0..8u8).map(|i| Keypair::from_seed([i; 32]).peer_id()).collect();
        for peer in &peers[..4] {
            assert!(limiter.allow(*peer, "k", 0.0));
        }
        // The table is full of busy buckets: a fifth pair is refused rather than growing memory.
        assert!(!limiter.allow(peers[4], "k", 0.0));
        // Once the others have refilled, they are forgotten and new pairs fit.
        assert!(limiter.allow(peers[5], "k", 10.0));
        assert!(limiter.buckets.len() <= 4);
    }
}
