//! Access control: who may take part in a run. Every peer of a run holds the same [`AccessPolicy`]:
//!
//! - [`AccessPolicy::Open`] (the default): any peer that proves its key is admitted;
//! - [`AccessPolicy::Allowlist`]: only the listed peers;
//! - [`AccessPolicy::Certificates`]: only peers that present a [`Certificate`] for the run signed by the
//!   run's authority key and valid at the time of the check.
//!
//! An [`AccessControl`] applies one peer's policy. [`AccessControl::wrap`] puts it around any [`Transport`]
//! (mem, tcp, quic, emulated): right after the transport has proven the remote's key, both sides exchange
//! their credentials on a first stream (`/colony/access/1`, see [`exchange`]) and each checks the other's.
//! A refused peer is told why in words ("peer X is not on the run's allowlist", "certificate of peer X
//! expired at ...") before the connection closes, so its dial fails with [`crate::TransportError::AccessRefused`]
//! naming the reason; the refusing side counts the refusal ([`AccessControl::refused`] and the metric
//! `colony_access_refused_total{reason}`). Only admitted connections leave the wrapper.
//!
//! The same [`AccessControl`] answers whether a peer that is not on the other end of a connection is
//! admitted ([`AccessControl::admits`]): the record store asks it for the owner of every record, including
//! records relayed by a third peer. Under a certificate policy it remembers every certificate it verified
//! (at a handshake, or carried by a record) until the certificate expires.
//!
//! Time comes from an injectable clock in Unix seconds ([`UnixClock`]).

pub mod certificate;
pub mod exchange;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use certificate::{Certificate, CertificateError, format_unix_time};

use crate::identity::PeerId;
use crate::transport::Transport;

/// Seconds since the Unix epoch, as a peer's clock reads them.
pub type UnixClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock in Unix seconds.
pub fn system_clock() -> UnixClock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

/// Who may take part in a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessPolicy {
    /// Any peer that proves its key.
    #[default]
    Open,
    /// Only these peers.
    Allowlist(BTreeSet<PeerId>),
    /// Only peers with a certificate for `run_id` signed by `authority` (the authority key's public half,
    /// written like a peer id), valid at the time of each check.
    Certificates {
        /// The run's authority.
        authority: PeerId,
        /// The run the certificates must name.
        run_id: String,
    },
}

impl fmt::Display for AccessPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessPolicy::Open => f.write_str("open"),
            AccessPolicy::Allowlist(peers) => write!(f, "allowlist of {} peers", peers.len()),
            AccessPolicy::Certificates { authority, run_id } => {
                write!(f, "certificates for run '{run_id}' from authority {authority}")
            }
        }
    }
}

/// Why a peer was refused. The message says it in words; [`Refusal::reason`] is a short stable name for
/// counters and metric labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The run admits listed peers only.
    #[error("peer {peer} is not on the run's allowlist")]
    NotAllowlisted { peer: PeerId },
    /// The run admits peers with certificates only, and this one presented none.
    #[error(
        "peer {peer} presented no membership certificate; this run admits only peers with a certificate from \
         authority {authority}"
    )]
    NoCertificate { peer: PeerId, authority: PeerId },
    /// The certificate is no longer valid.
    #[error("certificate of peer {peer} expired at {} (it is now {})", format_unix_time(*.at), format_unix_time(*.now))]
    Expired { peer: PeerId, at: u64, now: u64 },
    /// The certificate is not valid yet.
    #[error("certificate of peer {peer} is not valid before {} (it is now {})", format_unix_time(*.from), format_unix_time(*.now))]
    NotYetValid { peer: PeerId, from: u64, now: u64 },
    /// The certificate is for another run.
    #[error("certificate of peer {peer} is for run '{run_id}', not '{expected}'")]
    WrongRun {
        peer: PeerId,
        run_id: String,
        expected: String,
    },
    /// The certificate is signed by another authority.
    #[error("certificate of peer {peer} is signed by authority {authority}, this run's authority is {expected}")]
    WrongAuthority {
        peer: PeerId,
        authority: PeerId,
        expected: PeerId,
    },
    /// The certificate admits another peer.
    #[error("the certificate presented by peer {peer} admits peer {named}, not it")]
    WrongPeer { peer: PeerId, named: PeerId },
    /// The certificate's signature is not the authority's.
    #[error("certificate of peer {peer} does not carry a valid signature of authority {authority}")]
    BadSignature { peer: PeerId, authority: PeerId },
    /// The certificate does not decode.
    #[error("certificate of peer {peer} is malformed: {reason}")]
    Malformed { peer: PeerId, reason: String },
    /// No certificate of the peer is known (for records of a peer this one never checked).
    #[error("no valid certificate of peer {peer} is known")]
    Unknown { peer: PeerId },
    /// The peer did not complete the access exchange (timed out, closed, or sent something else).
    #[error("peer {peer} did not complete the access check: {detail}")]
    ExchangeFailed { peer: PeerId, detail: String },
}

/// Every [`Refusal::reason`], in the order [`AccessControl::refused`] counts them.
pub const REFUSAL_REASONS: [&str; 11] = [
    "not_allowlisted",
    "no_certificate",
    "expired",
    "not_yet_valid",
    "wrong_run",
    "wrong_authority",
    "wrong_peer",
    "bad_signature",
    "malformed",
    "unknown",
    "exchange_failed",
];

impl Refusal {
    /// A short, stable name of the reason (one of [`REFUSAL_REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAllowlisted { .. } => "not_allowlisted",
            Refusal::NoCertificate { .. } => "no_certificate",
            Refusal::Expired { .. } => "expired",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::WrongRun { .. } => "wrong_run",
            Refusal::WrongAuthority { .. } => "wrong_authority",
            Refusal::WrongPeer { .. } => "wrong_peer",
            Refusal::BadSignature { .. } => "bad_signature",
            Refusal::Malformed { .. } => "malformed",
            Refusal::Unknown { .. } => "unknown",
            Refusal::ExchangeFailed { .. } => "exchange_failed",
        }
    }
}

/// Why an [`AccessControl`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The policy admits by certificate, and this peer has none to present.
    #[error(
        "this run admits peers by certificate from authority {authority}, but this peer ({peer}) has none; get one \
         with `colony authority issue --key AUTHORITY_KEY --peer {peer} --run {run_id} --valid-for 30d` and pass \
         it as `certificate`"
    )]
    MissingCertificate {
        peer: PeerId,
        authority: PeerId,
        run_id: String,
    },
    /// This peer's own certificate would be refused by the run.
    #[error("this peer's own certificate cannot be used: {0}")]
    OwnCertificate(Refusal),
    /// The allowlist is empty: it would admit nobody.
    #[error("the allowlist is empty, so it would admit no peer; list peers, or use an open run")]
    EmptyAllowlist,
}

/// Certificates remembered at most by one [`AccessControl`]; expired ones are dropped first when full.
pub const MAX_REMEMBERED_CERTIFICATES: usize = 100_000;
/// How long the access exchange may take by default.
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// One peer's access control: its policy, its own certificate, the certificates it verified, and counters
/// of what it refused. Share it behind an `Arc`.
pub struct AccessControl {
    local: PeerId,
    policy: AccessPolicy,
    certificate: Option<Certificate>,
    encoded_certificate: Vec<u8>,
    clock: UnixClock,
    exchange_timeout: Duration,
    /// Verified certificates: peer → (not before, not after).
    verified: Mutex<HashMap<PeerId, (u64, u64)>>,
    refused: [AtomicU64; REFUSAL_REASONS.len()],
}

impl fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessControl")
            .field("local", &self.local)
            .field("policy", &self.policy)
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl AccessControl {
    /// Access control for the peer `local` under `policy`, presenting `certificate` (required by a
    /// certificate policy; optional otherwise, e.g. for a peer that only joins a certificate run). The own
    /// certificate is checked now, against the policy and `clock`, so that a wrong or expired file is
    /// reported at start rather than by every peer that refuses it.
    pub fn new(
        local: PeerId,
        policy: AccessPolicy,
        certificate: Option<Certificate>,
        clock: UnixClock,
    ) -> Result<Self, AccessError> {
        if matches!(&policy, AccessPolicy::Allowlist(peers) if peers.is_empty()) {
            return Err(AccessError::EmptyAllowlist);
        }
        let control = Self {
            local,
            encoded_certificate: certificate.as_ref().map(Certificate::encode).unwrap_or_default(),
            policy,
            certificate,
            clock,
            exchange_timeout: DEFAULT_EXCHANGE_TIMEOUT,
            verified: Mutex::new(HashMap::new()),
            refused: Default::default(),
        };
        match (&control.policy, &control.certificate) {
            (AccessPolicy::Certificates { authority, run_id }, None) => {
                return Err(AccessError::MissingCertificate {
                    peer: local,
                    authority: *authority,
                    run_id: run_id.clone(),
                });
            }
            (AccessPolicy::Certificates { .. }, Some(own)) => {
                control
                    .check_certificate(local, own)
                    .map_err(AccessError::OwnCertificate)?;
            }
            (_, Some(own)) => {
                // Whoever checks it holds the run's policy; here only what makes it unusable anywhere.
                let now = control.now();
                if own.peer() != local {
                    return Err(AccessError::OwnCertificate(Refusal::WrongPeer {
                        peer: local,
                        named: own.peer(),
                    }));
                }
                if own.verify_signature().is_err() {
                    return Err(AccessError::OwnCertificate(Refusal::BadSignature {
                        peer: local,
                        authority: own.authority(),
                    }));
                }
                if now >= own.not_after() {
                    return Err(AccessError::OwnCertificate(Refusal::Expired {
                        peer: local,
                        at: own.not_after(),
                        now,
                    }));
                }
            }
            (_, None) => {}
        }
        Ok(control)
    }

    /// An open policy for `local` without a certificate.
    pub fn open(local: PeerId) -> Self {
        Self::new(local, AccessPolicy::Open, None, system_clock())
            .expect("an open policy without a certificate is valid")
    }

    /// Sets how long the access exchange of one connection may take.
    pub fn with_exchange_timeout(mut self, timeout: Duration) -> Self {
        self.exchange_timeout = timeout;
        self
    }

    /// The peer this access control belongs to.
    pub fn local_peer(&self) -> PeerId {
        self.local
    }

    /// The policy applied.
    pub fn policy(&self) -> &AccessPolicy {
        &self.policy
    }

    /// The certificate this peer presents.
    pub fn certificate(&self) -> Option<&Certificate> {
        self.certificate.as_ref()
    }

    /// The time now, Unix seconds.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// How long the access exchange of one connection may take.
    pub fn exchange_timeout(&self) -> Duration {
        self.exchange_timeout
    }

    /// Checks `certificate` as presented by `peer`, under the policy: whether it names `peer`, is signed by
    /// the run's authority, is for the run, and is valid now. A certificate that passes is remembered, so
    /// that [`AccessControl::admits`] admits the peer until it expires. Under an allowlist the certificate
    /// is not looked at; an open policy admits everyone.
    pub fn check_certificate(&self, peer: PeerId, certificate: &Certificate) -> Result<(), Refusal> {
        let AccessPolicy::Certificates { authority, run_id } = &self.policy else {
            return self.check_without_certificate(peer);
        };
        if certificate.peer() != peer {
            return Err(Refusal::WrongPeer {
                peer,
                named: certificate.peer(),
            });
        }
        let signed = certificate.verify_signature().is_ok();
        if certificate.authority() != *authority {
            // Name the other authority only when the certificate really is its.
            return Err(if signed {
                Refusal::WrongAuthority {
                    peer,
                    authority: certificate.authority(),
                    expected: *authority,
                }
            } else {
                Refusal::BadSignature {
                    peer,
                    authority: *authority,
                }
            });
        }
        if !signed {
            return Err(Refusal::BadSignature {
                peer,
                authority: *authority,
            });
        }
        if certificate.run_id() != run_id {
            return Err(Refusal::WrongRun {
                peer,
                run_id: certificate.run_id().to_owned(),
                expected: run_id.clone(),
            });
        }
        let now = self.now();
        check_time(peer, certificate.not_before(), certificate.not_after(), now)?;
        self.remember(peer, certificate.not_before(), certificate.not_after(), now);
        Ok(())
    }

    /// [`AccessControl::check_certificate`] for a credential as it travels: empty for none, else the binary
    /// form of a certificate.
    pub fn check_presented(&self, peer: PeerId, credential: &[u8]) -> Result<(), Refusal> {
        if credential.is_empty() {
            return self.check_without_certificate(peer);
        }
        match Certificate::decode(credential) {
            Ok(certificate) => self.check_certificate(peer, &certificate),
            // Under the other policies a credential is not looked at, so a bad one does not matter.
            Err(error) if matches!(self.policy, AccessPolicy::Certificates { .. }) => Err(Refusal::Malformed {
                peer,
                reason: error.to_string(),
            }),
            Err(_) => self.check_without_certificate(peer),
        }
    }

    fn check_without_certificate(&self, peer: PeerId) -> Result<(), Refusal> {
        match &self.policy {
            AccessPolicy::Open => Ok(()),
            AccessPolicy::Allowlist(peers) if peers.contains(&peer) => Ok(()),
            AccessPolicy::Allowlist(_) => Err(Refusal::NotAllowlisted { peer }),
            AccessPolicy::Certificates { authority, .. } => Err(Refusal::NoCertificate {
                peer,
                authority: *authority,
            }),
        }
    }

    /// Whether `peer` is admitted now without presenting anything: always this peer itself; under an
    /// allowlist, a listed peer; under certificates, a peer whose certificate this access control verified
    /// and that is still valid.
    pub fn admits(&self, peer: &PeerId) -> Result<(), Refusal> {
        if *peer == self.local {
            return Ok(());
        }
        if !matches!(self.policy, AccessPolicy::Certificates { .. }) {
            return self.check_without_certificate(*peer);
        }
        let validity = self.lock_verified().get(peer).copied();
        match validity {
            Some((not_before, not_after)) => check_time(*peer, not_before, not_after, self.now()),
            None => Err(Refusal::Unknown { peer: *peer }),
        }
    }

    /// The refusal of a peer admitted earlier whose certificate has expired since (the connections of such a
    /// peer are closed); `None` for any other peer.
    pub fn expired(&self, peer: &PeerId) -> Option<Refusal> {
        match self.admits(peer) {
            Err(refusal @ Refusal::Expired { .. }) => Some(refusal),
            _ => None,
        }
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, (u64, u64)>> {
        // The map holds plain validity windows; one left half-updated by a panic is still consistent.
        self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remember(&self, peer: PeerId, not_before: u64, not_after: u64, now: u64) {
        let mut verified = self.lock_verified();
        if verified.len() >= MAX_REMEMBERED_CERTIFICATES && !verified.contains_key(&peer) {
            verified.retain(|_, (_, not_after)| *not_after > now);
            if verified.len() >= MAX_REMEMBERED_CERTIFICATES {
                tracing::warn!(
                    peer = %peer.short(),
                    "{MAX_REMEMBERED_CERTIFICATES} valid certificates remembered; this one is checked again when needed"
                );
                return;
            }
        }
        // Of two valid certificates of one peer, the one valid longer counts.
        let entry = verified.entry(peer).or_insert((not_before, not_after));
        if not_after > entry.1 {
            *entry = (not_before, not_after);
        }
    }

    /// Counts a refusal made at a connection: [`AccessControl::refused`] and
    /// `colony_access_refused_total{reason}`.
    pub fn count_refusal(&self, refusal: &Refusal) {
        let reason = refusal.reason();
        if let Some(index) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.refused[index].fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("colony_access_refused_total", "reason" => reason).increment(1);
    }

    /// Connections refused for `reason` (one of [`REFUSAL_REASONS`]) so far.
    pub fn refused(&self, reason: &str) -> u64 {
        REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |index| self.refused[index].load(Ordering::Relaxed))
    }

    /// Connections refused for any reason so far.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|count| count.load(Ordering::Relaxed)).sum()
    }

    /// `transport` with this access control applied to every connection it dials or accepts.
    pub fn wrap(self: &Arc<Self>, transport: Arc<dyn Transport>) -> Arc<dyn Transport> {
        Arc::new(exchange::AccessControlled::new(transport, self.clone()))
    }

    /// What this peer presents in the access exchange: its certificate's binary form, or nothing.
    pub(crate) fn credential(&self) -> &[u8] {
        &self.encoded_certificate
    }
}

fn check_time(peer: PeerId, not_before: u64, not_after: u64, now: u64) -> Result<(), Refusal> {
    if now >= not_after {
        return Err(Refusal::Expired {
            peer,
            at: not_after,
            now,
        });
    }
    if now < not_before {
        return Err(Refusal::NotYetValid {
            peer,
            from: not_before,
            now,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;

    const NOW: u64 = 1_800_000_000;

    fn clock_at(now: Arc<AtomicU64>) -> UnixClock {
        Arc::new(move || now.load(Ordering::Relaxed))
    }

    fn policy(authority: &Keypair) -> AccessPolicy {
        AccessPolicy::Certificates {
            authority: authority.peer_id(),
            run_id: "run".into(),
        }
    }

    fn control(authority: &Keypair, local: &Keypair, now: Arc<AtomicU64>) -> AccessControl {
        let own = Certificate::issue(authority, local.peer_id(), "run", NOW - 10, NOW + 100).unwrap();
        AccessControl::new(local.peer_id(), policy(authority), Some(own), clock_at(now)).unwrap()
    }

    #[test]
    fn each_certificate_problem_has_its_own_refusal() {
        let (authority, other_authority) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let (local, peer, stranger) = (
            Keypair::from_seed([3; 32]),
            Keypair::from_seed([4; 32]),
            Keypair::from_seed([5; 32]),
        );
        let now = Arc::new(AtomicU64::new(NOW));
        let control = control(&authority, &local, now.clone());
        let id = peer.peer_id();
        let issue = |by: &Keypair, for_peer: PeerId, run: &str, from: u64, until: u64| {
            Certificate::issue(by, for_peer, run, from, until).unwrap()
        };
        let good = issue(&authority, id, "run", NOW - 1, NOW + 50);
        let cases = [
            (issue(&authority, id, "run", NOW - 100, NOW), "expired", "expired at"),
            (
                issue(&authority, id, "run", NOW + 5, NOW + 50),
                "not_yet_valid",
                "not valid before",
            ),
            (
                issue(&authority, id, "other", NOW - 1, NOW + 50),
                "wrong_run",
                "is for run 'other', not 'run'",
            ),
            (
                issue(&other_authority, id, "run", NOW - 1, NOW + 50),
                "wrong_authority",
                "this run's authority is",
            ),
            (
                issue(&authority, stranger.peer_id(), "run", NOW - 1, NOW + 50),
                "wrong_peer",
                "admits peer",
            ),
        ];
        for (certificate, reason, words) in cases {
            let refusal = control.check_certificate(id, &certificate).unwrap_err();
            assert_eq!(refusal.reason(), reason, "{refusal}");
            assert!(refusal.to_string().contains(words), "{refusal}");
            assert!(control.admits(&id).is_err(), "a refused certificate admits nobody");
        }
        // A certificate that claims the run's authority but is signed by another key.
        let forged_other = issue(&other_authority, id, "run", NOW - 1, NOW + 50).encode();
        let mut claimed = forged_other.clone();
        claimed[9..41].copy_from_slice(authority.peer_id().as_bytes());
        let refusal = control.check_presented(id, &claimed).unwrap_err();
        assert_eq!(refusal.reason(), "bad_signature", "{refusal}");
        assert_eq!(
            control.check_presented(id, &[1, 2, 3]).unwrap_err().reason(),
            "malformed"
        );
        assert_eq!(control.check_presented(id, &[]).unwrap_err().reason(), "no_certificate");
        assert_eq!(control.admits(&id).unwrap_err().reason(), "unknown");

        // A good certificate admits its peer until it expires, by the injected clock.
        control.check_presented(id, &good.encode()).unwrap();
        control.admits(&id).unwrap();
        assert!(control.expired(&id).is_none());
        now.store(NOW + 50, Ordering::Relaxed);
        let refusal = control.admits(&id).unwrap_err();
        assert_eq!(refusal.reason(), "expired");
        assert!(control.expired(&id).is_some());
        control.admits(&local.peer_id()).expect("a peer admits itself");
    }

    #[test]
    fn allowlists_and_open_runs_ignore_certificates() {
        let (a, b) = (
            Keypair::from_seed([1; 32]).peer_id(),
            Keypair::from_seed([2; 32]).peer_id(),
        );
        let list = AccessControl::new(a, AccessPolicy::Allowlist([a].into()), None, system_clock()).unwrap();
        let refusal = list.check_presented(b, &[]).unwrap_err();
        assert_eq!(refusal.to_string(), format!("peer {b} is not on the run's allowlist"));
        assert_eq!(
            list.check_presented(b, &[7; 20]).unwrap_err().reason(),
            "not_allowlisted"
        );
        list.check_presented(a, &[]).unwrap();
        assert!(list.admits(&b).is_err());
        let open = AccessControl::open(a);
        open.check_presented(b, &[7; 20]).unwrap();
        open.admits(&b).unwrap();
        assert!(matches!(
            AccessControl::new(a, AccessPolicy::Allowlist(BTreeSet::new()), None, system_clock()),
            Err(AccessError::EmptyAllowlist)
        ));
    }

    #[test]
    fn the_own_certificate_is_checked_at_start() {
        let (authority, local) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let now = Arc::new(AtomicU64::new(NOW));
        let missing = AccessControl::new(local.peer_id(), policy(&authority), None, clock_at(now.clone()));
        let message = missing.unwrap_err().to_string();
        assert!(message.contains("colony authority issue") && message.contains(&local.peer_id().to_string()));
        let expired = Certificate::issue(&authority, local.peer_id(), "run", NOW - 100, NOW - 1).unwrap();
        let error = AccessControl::new(
            local.peer_id(),
            policy(&authority),
            Some(expired.clone()),
            clock_at(now.clone()),
        );
        assert!(error.unwrap_err().to_string().contains("expired at"));
        // An expired certificate is refused even where the policy would not look at it.
        let error = AccessControl::new(
            local.peer_id(),
            AccessPolicy::Open,
            Some(expired),
            clock_at(now.clone()),
        );
        assert!(error.unwrap_err().to_string().contains("expired at"));
        let others = Certificate::issue(&authority, authority.peer_id(), "run", NOW - 1, NOW + 1).unwrap();
        let error = AccessControl::new(local.peer_id(), AccessPolicy::Open, Some(others), clock_at(now));
        assert!(error.unwrap_err().to_string().contains("admits peer"));
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let control = AccessControl::open(Keypair::from_seed([1; 32]).peer_id());
        let peer = Keypair::from_seed([2; 32]).peer_id();
        control.count_refusal(&Refusal::NotAllowlisted { peer });
        control.count_refusal(&Refusal::NotAllowlisted { peer });
        control.count_refusal(&Refusal::Unknown { peer });
        assert_eq!(control.refused("not_allowlisted"), 2);
        assert_eq!(control.refused("unknown"), 1);
        assert_eq!(control.refused_total(), 3);
        for refusal in [
            Refusal::NotAllowlisted { peer },
            Refusal::ExchangeFailed {
                peer,
                detail: String::new(),
            },
        ] {
            assert!(REFUSAL_REASONS.contains(&refusal.reason()));
        }
    }
}
