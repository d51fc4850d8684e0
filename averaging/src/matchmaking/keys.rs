//! Group keys, the declarations peers make under them, and the Moshpit rotation of their bits.
//!
//! A peer looks for a group under the key `"{prefix}.0b{bits}"`: only peers with the same key meet. With
//! empty bits every peer of a run meets every other; with `d` bits the peers are spread over `2^d` buckets.
//! After each group assembles, every member shifts new bits into its key, chosen so that the members of one
//! group land in *different* buckets ([`rotate_bits`]). That is Moshpit averaging: peers on a virtual grid
//! average along one axis per round, and `N = M^d` peers in groups of `M` reach the exact global average in
//! `d` rounds (8 peers, groups of 2, 2-bit keys: 3 rounds).
//!
//! The rotation is seeded by the group id with Colony's own generator ([`SplitMix64`] over a SHA-256 of the
//! id), so every member computes the same draw without talking, on every platform.
//!
//! A peer that looks for a group *declares* itself under its key: a [`Declaration`] holds the time it
//! intends to start (its expiration as a leader) and whether it is still looking. The runtime stores
//! declarations as signed records; a [`DeclarationBoard`] is one peer's view of them, fed from those
//! records, with the same rule as the record store (a later record wins).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use colony_transports::PeerId;

use super::Time;

/// Longest prefix of a group key, bytes.
pub const MAX_PREFIX_BYTES: usize = 128;
/// Most bits in a group key.
pub const MAX_GROUP_BITS: usize = 64;

/// Why a prefix or a bit string cannot make a group key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The prefix is empty, too long, or contains a `.`, `/`, whitespace or a control character.
    #[error(
        "group key prefix {prefix:?} is invalid: it must be 1 to {MAX_PREFIX_BYTES} bytes without '.', '/', \
         whitespace or control characters"
    )]
    BadPrefix {
        /// The prefix given.
        prefix: String,
    },
    /// The bits contain something other than `0` and `1`, or are too many.
    #[error("group bits {bits:?} are invalid: at most {MAX_GROUP_BITS} characters, each '0' or '1'")]
    BadBits {
        /// The bits given.
        bits: String,
    },
}

/// Checks a group key prefix: the `.` separates prefix and bits, and `/` separates a record key's kind.
pub fn validate_prefix(prefix: &str) -> Result<(), KeyError> {
    let bad = prefix.is_empty()
        || prefix.len() > MAX_PREFIX_BYTES
        || prefix
            .chars()
            .any(|c| c == '.' || c == '/' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(KeyError::BadPrefix {
            prefix: prefix.to_owned(),
        });
    }
    Ok(())
}

/// Checks group bits: only `0` and `1`, at most [`MAX_GROUP_BITS`].
pub fn validate_bits(bits: &str) -> Result<(), KeyError> {
    if bits.len() > MAX_GROUP_BITS || !bits.bytes().all(|b| b == b'0' || b == b'1') {
        return Err(KeyError::BadBits { bits: bits.to_owned() });
    }
    Ok(())
}

/// The group key of `prefix` and `bits`: `"{prefix}.0b{bits}"`, as Hivemind writes it.
pub fn group_key(prefix: &str, bits: &str) -> String {
    format!("{prefix}.0b{bits}")
}

/// Splits a group key into its prefix and bits; `None` when it is not one.
pub fn parse_group_key(key: &str) -> Option<(&str, &str)> {
    let (prefix, bits) = key.rsplit_once(".0b")?;
    (validate_prefix(prefix).is_ok() && validate_bits(bits).is_ok()).then_some((prefix, bits))
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny generator whose output is fixed by its seed on every
/// platform. Colony draws the Moshpit rotation and the leader's member order from it, so that every member
/// of a group derives the same values from the group id.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Seeded by the first 8 bytes (little-endian) of SHA-256(`bytes`).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest.as_ref()[..8]);
        Self::new(u64::from_le_bytes(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform draw from `0..n` (`n > 0`), without modulo bias: draws in the biased tail are redrawn.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below needs a non-empty range");
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let draw = self.next_u64();
            if draw < zone {
                return draw % n;
            }
        }
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `count` distinct values of `0..n` (`count <= n`) in draw order: a partial Fisher–Yates shuffle.
    pub fn sample_distinct(&mut self, n: usize, count: usize) -> Vec<usize> {
        assert!(count <= n, "cannot draw {count} distinct values from {n}");
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..count {
            let j = i + self.below((n - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(count);
        pool
    }
}

/// The buckets a group's members are spread over: `target_group_size`, or the group size rounded up to a
/// power of two when there is no target (or the group is larger than it).
pub fn bucket_count(group_size: usize, target_group_size: Option<usize>) -> usize {
    match target_group_size {
        Some(target) if target >= group_size && target > 0 => target,
        _ => group_size.max(1).next_power_of_two(),
    }
}

/// The group bits of member `my_index` of a group of `group_size` with id `group_id`, after the group
/// assembled: each member gets a distinct bucket, written in `ceil(log2(buckets))` bits, shifted in at the
/// right end of `bits`, keeping its length. Empty bits stay empty.
pub fn rotate_bits(
    bits: &str,
    group_id: &[u8; 32],
    my_index: usize,
    group_size: usize,
    target_group_size: Option<usize>,
) -> String {
    if bits.is_empty() || my_index >= group_size {
        return bits.to_owned();
    }
    let buckets = bucket_count(group_size, target_group_size);
    let mut rng = SplitMix64::from_bytes(group_id);
    let bucket = rng.sample_distinct(buckets, group_size)[my_index];
    let width = (usize::BITS - (buckets - 1).leading_zeros()) as usize;
    if width == 0 {
        return bits.to_owned();
    }
    let combined = format!("{bits}{bucket:0width$b}");
    combined[combined.len() - bits.len()..].to_owned()
}

/// One peer's group key: the prefix it was configured with and its current bits, which rotate after each
/// group (Moshpit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKeyManager {
    prefix: String,
    bits: String,
    target_group_size: Option<usize>,
}

impl GroupKeyManager {
    /// A manager for `prefix` starting at `initial_bits`.
    pub fn new(prefix: &str, initial_bits: &str, target_group_size: Option<usize>) -> Result<Self, KeyError> {
        validate_prefix(prefix)?;
        validate_bits(initial_bits)?;
        Ok(Self {
            prefix: prefix.to_owned(),
            bits: initial_bits.to_owned(),
            target_group_size,
        })
    }

    /// The key to look for a group under now.
    pub fn key(&self) -> String {
        group_key(&self.prefix, &self.bits)
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The current bits.
    pub fn bits(&self) -> &str {
        &self.bits
    }

    /// Replaces the bits (a peer moving to another bucket by hand, or restoring its place on the grid).
    pub fn set_bits(&mut self, bits: &str) -> Result<(), KeyError> {
        validate_bits(bits)?;
        self.bits = bits.to_owned();
        Ok(())
    }

    /// Rotates the bits after `local` took part in a group of `members` with id `group_id`. Returns the new
    /// bits; unchanged when `local` is not a member.
    pub fn on_group_assembled(&mut self, group_id: &[u8; 32], members: &[PeerId], local: &PeerId) -> &str {
        if let Some(index) = members.iter().position(|m| m == local) {
            self.bits = rotate_bits(&self.bits, group_id, index, members.len(), self.target_group_size);
        }
        &self.bits
    }
}

/// What a peer declares under its group key: when it intends to start (leaders are ordered by it) and
/// whether it is still looking. Stored as the value of a record signed by the peer.
#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Declaration {
    /// The time the peer intends to start averaging, seconds on the run's clock; as a leader it assembles
    /// its group then at the latest.
    pub expiration: Time,
    /// False once the peer stopped looking (found a group, gave up or was cancelled).
    pub looking: bool,
}

/// A declaration value that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid matchmaking declaration: {0}")]
pub struct DeclarationError(pub String);

impl Declaration {
    /// The record value.
    pub fn encode(&self) -> Bytes {
        // Serialising a struct of a float and a bool into a growable buffer cannot fail.
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("a declaration always serialises");
        Bytes::copy_from_slice(&bytes)
    }

    /// Reads a record value, validated (network bytes): a well-formed archive with a finite expiration.
    pub fn decode(bytes: &[u8]) -> Result<Self, DeclarationError> {
        // rkyv validates only aligned input, and network bytes may sit at any address.
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        let archived = rkyv::access::<ArchivedDeclaration, rkyv::rancor::Error>(&aligned)
            .map_err(|e| DeclarationError(e.to_string()))?;
        let declaration: Declaration = rkyv::deserialize::<Declaration, rkyv::rancor::Error>(archived)
            .map_err(|e| DeclarationError(e.to_string()))?;
        if !declaration.expiration.is_finite() {
            return Err(DeclarationError(format!(
                "expiration {} is not a finite time",
                declaration.expiration
            )));
        }
        Ok(declaration)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct BoardEntry {
    declaration: Declaration,
    /// When the record carrying it expires: the record store's order (a later record wins).
    valid_until: Time,
}

/// One peer's view of the declarations under each group key, with the record store's rules: per peer, the
/// record with the later expiration wins; an expired record is gone; a declaration with `looking: false`
/// hides the peer from [`DeclarationBoard::averagers`] with `only_looking`.
#[derive(Debug, Clone, Default)]
pub struct DeclarationBoard {
    keys: HashMap<String, BTreeMap<PeerId, BoardEntry>>,
}

impl DeclarationBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes `peer`'s declaration under `key`, carried by a record that expires at `valid_until`. Returns
    /// whether it replaced what the board held (an older record does not).
    pub fn observe(&mut self, key: &str, peer: PeerId, declaration: Declaration, valid_until: Time) -> bool {
        let entries = self.keys.entry(key.to_owned()).or_default();
        match entries.get(&peer) {
            Some(held) if held.valid_until >= valid_until => false,
            _ => {
                entries.insert(
                    peer,
                    BoardEntry {
                        declaration,
                        valid_until,
                    },
                );
                true
            }
        }
    }

    /// Forgets `peer`'s declaration under `key` (its record was deleted by a record expiring at
    /// `valid_until`; an older deletion does not remove a newer declaration).
    pub fn forget(&mut self, key: &str, peer: &PeerId, valid_until: Time) {
        if let Some(entries) = self.keys.get_mut(key) {
            if entries.get(peer).is_some_and(|held| held.valid_until <= valid_until) {
                entries.remove(peer);
            }
            if entries.is_empty() {
                self.keys.remove(key);
            }
        }
    }

    /// The peers declared under `key` whose records are live at `now`, as (peer, declared expiration),
    /// ordered by (expiration, peer): the order in which followers try leaders. With `only_looking`, peers
    /// that stopped looking are left out.
    pub fn averagers(&self, key: &str, now: Time, only_looking: bool) -> Vec<(PeerId, Time)> {
        let Some(entries) = self.keys.get(key) else {
            return Vec::new();
        };
        let mut out: Vec<(PeerId, Time)> = entries
            .iter()
            .filter(|(_, entry)| entry.valid_until > now && (entry.declaration.looking || !only_looking))
            .map(|(peer, entry)| (*peer, entry.declaration.expiration))
            .collect();
        out.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        out
    }

    /// What the board holds for `peer` under `key`, if its record is live at `now`.
    pub fn declaration(&self, key: &str, peer: &PeerId, now: Time) -> Option<Declaration> {
        self.keys
            .get(key)?
            .get(peer)
            .filter(|entry| entry.valid_until > now)
            .map(|entry| entry.declaration)
    }

    /// Drops every record expired at `now`.
    pub fn forget_expired(&mut self, now: Time) {
        self.keys.retain(|_, entries| {
            entries.retain(|_, entry| entry.valid_until > now);
            !entries.is_empty()
        });
    }
}
