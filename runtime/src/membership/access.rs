//! Access control in membership: the run's [`AccessControl`] checks every connection (it wraps the
//! transport) and the owner of every record (through [`RecordAdmission`]).
//!
//! A record is owned by the peer its [`Subkey::Peer`] names (proven by its signature), or else by the peer
//! that sent it. Under an allowlist the owner must be listed. Under certificates the owner must have
//! shown a valid certificate: at a connection with this peer, or in its *access record*: key
//! [`ACCESS_KEY`], subkey the owner, value its certificate's binary form, which every peer with a
//! certificate publishes (and refreshes while it runs). The access record is admitted on its own merit,
//! so the certificate of a peer this one never connected to arrives with that peer's other records, by
//! gossip or anti-entropy, from any member. A record of a peer whose certificate is not known yet is
//! refused (`not_admitted`) and arrives again with the next anti-entropy exchange.

use std::sync::Arc;
use std::time::Duration;

use colony_transports::PeerId;
use colony_transports::access::{AccessControl, Certificate};

use crate::records::replica::Admission;
use crate::records::{Record, Schemas, Subkey, Time};

/// The key of the access records.
pub const ACCESS_KEY: &str = "access";
/// How long an access record lives at most; it is published again every [`ACCESS_RECORD_REFRESH`], so a
/// peer that left is forgotten soon after.
pub const ACCESS_RECORD_TTL: Duration = Duration::from_secs(300);
/// How often a peer publishes its access record again.
pub const ACCESS_RECORD_REFRESH: Duration = Duration::from_secs(60);

/// Values of access records must be certificates in their binary form.
pub(crate) fn register_schema(schemas: &mut Schemas) {
    schemas.register_with(ACCESS_KEY, |bytes| {
        Certificate::decode(bytes).map(drop).map_err(|e| e.to_string())
    });
}

/// The expiration of an access record published at `now` for `certificate`: the record's lifetime, cut at
/// the certificate's end; `None` once the certificate has expired.
pub(crate) fn access_record_expiration(certificate: &Certificate, now: Time) -> Option<Time> {
    let end = certificate.not_after() as Time;
    (now < end).then(|| end.min(now + ACCESS_RECORD_TTL.as_secs_f64()))
}

/// The record store's question "is this record's owner admitted?", answered by the run's access control.
pub(crate) struct RecordAdmission {
    control: Arc<AccessControl>,
}

impl RecordAdmission {
    pub(crate) fn new(control: Arc<AccessControl>) -> Self {
        Self { control }
    }
}

impl Admission for RecordAdmission {
    fn admit(&self, owner: &PeerId, record: &Record) -> Result<(), String> {
        if record.key == ACCESS_KEY
            && record.subkey == Some(Subkey::Peer(*owner))
            && let Some(value) = &record.value
        {
            // An access record admits its owner when the certificate it carries does.
            let certificate = Certificate::decode(value).map_err(|e| e.to_string())?;
            return self
                .control
                .check_certificate(*owner, &certificate)
                .map_err(|refusal| refusal.to_string());
        }
        self.control.admits(owner).map_err(|refusal| refusal.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::replica::{PublishLimits, Replica};
    use crate::records::{RecordLimits, RecordStore, Stored};
    use bytes::Bytes;
    use colony_transports::Keypair;
    use colony_transports::access::AccessPolicy;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn records_count_only_from_owners_with_a_known_valid_certificate() {
        let (authority, local, owner, relay) = (
            Keypair::from_seed([1; 32]),
            Keypair::from_seed([2; 32]),
            Keypair::from_seed([3; 32]),
            Keypair::from_seed([4; 32]),
        );
        let certificate = |peer: &Keypair, until: u64| {
            Certificate::issue(&authority, peer.peer_id(), "run", NOW - 10, until).unwrap()
        };
        let policy = AccessPolicy::Certificates {
            authority: authority.peer_id(),
            run_id: "run".into(),
        };
        let control = Arc::new(
            AccessControl::new(
                local.peer_id(),
                policy,
                Some(certificate(&local, NOW + 1000)),
                Arc::new(|| NOW),
            )
            .unwrap(),
        );
        let mut schemas = Schemas::default();
        schemas.register_with("p", |_| Ok(()));
        register_schema(&mut schemas);
        let replica = Replica::new(
            RecordStore::new("run", RecordLimits::default(), schemas),
            Arc::new(|| NOW as f64),
            PublishLimits::default(),
        )
        .with_admission(Arc::new(RecordAdmission::new(control)));
        let record = |keypair: &Keypair, key: &str, value: Vec<u8>, expiration: f64| {
            let subkey = Some(Subkey::Peer(keypair.peer_id()));
            Record::signed("run", keypair, key, subkey, Some(Bytes::from(value)), expiration)
        };
        let progress = record(&owner, "p", b"v".to_vec(), NOW as f64 + 10.0);

        // Relayed by a third peer before the owner's certificate is known: refused and counted.
        let refused = replica.apply(progress.clone(), relay.peer_id()).unwrap_err();
        assert_eq!(refused.reason(), "not_admitted");
        assert!(
            refused.to_string().contains("no valid certificate of peer"),
            "{refused}"
        );
        // An access record with an expired certificate admits nobody.
        let stale = record(&owner, ACCESS_KEY, certificate(&owner, NOW).encode(), NOW as f64 + 10.0);
        assert!(
            replica
                .apply(stale, relay.peer_id())
                .unwrap_err()
                .to_string()
                .contains("expired at")
        );
        // The owner's access record, from anyone, admits it; its records follow.
        let access = record(
            &owner,
            ACCESS_KEY,
            certificate(&owner, NOW + 100).encode(),
            NOW as f64 + 10.0,
        );
        assert_eq!(replica.apply(access, relay.peer_id()), Ok(Stored::Visible));
        assert_eq!(replica.apply(progress, relay.peer_id()), Ok(Stored::Visible));
        // Another peer's access record cannot carry someone else's certificate.
        let borrowed = record(
            &relay,
            ACCESS_KEY,
            certificate(&owner, NOW + 100).encode(),
            NOW as f64 + 10.0,
        );
        assert!(
            replica
                .apply(borrowed, relay.peer_id())
                .unwrap_err()
                .to_string()
                .contains("admits peer")
        );
        assert_eq!(replica.counters().refused("not_admitted"), 3);
        // Records written by the local peer itself are always its own business.
        let own = record(&local, "p", b"mine".to_vec(), NOW as f64 + 10.0);
        assert_eq!(replica.apply(own, local.peer_id()), Ok(Stored::Visible));
    }

    #[test]
    fn access_records_live_shortly_and_never_beyond_the_certificate() {
        let authority = Keypair::from_seed([1; 32]);
        let peer = Keypair::from_seed([2; 32]).peer_id();
        let certificate = Certificate::issue(&authority, peer, "run", 0, 1_000).unwrap();
        assert_eq!(access_record_expiration(&certificate, 100.0), Some(400.0));
        assert_eq!(access_record_expiration(&certificate, 900.0), Some(1_000.0));
        assert_eq!(access_record_expiration(&certificate, 1_000.0), None);
    }
}
