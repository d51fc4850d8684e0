//! The access exchange, `/colony/access/1`: the first stream of every connection of a peer that applies
//! access control, opened by the dialer as soon as the transport has proven both keys.
//!
//! 1. dialer → listener: [`AccessOffer`], its credential (a certificate's binary form, or nothing);
//! 2. listener → dialer: [`AccessAnswer`], either a refusal (the reason in words, and its short name) or
//!    the listener's own credential;
//! 3. dialer → listener: [`AccessVerdict`], the dialer's refusal of the listener, or none.
//!
//! The dialer uses the connection once it has checked the answer (one round trip); the listener hands the
//! connection out as soon as it has admitted the dialer and sent its answer, so both sides have it at about
//! the same moment, and reads the verdict in the background: a dialer that refuses the listener closes the
//! connection, and the listener logs why. Nothing crosses the connection from the dialer before it admitted
//! the listener, and the listener serves nothing before it admitted the dialer.
//!
//! The stream is framed like every protocol stream (an open frame naming the protocol, then one message
//! per frame; [`crate::wire`]), with small limits: headers of at most 4 KiB and no payloads. A side that
//! refuses sends its reason, waits briefly for the other side to close (so the message is read), then
//! closes the connection with the reason prefixed by [`CLOSE_PREFIX`] (which reaches the other side even
//! when the stream did not). A listener whose remote opens anything else first, or does not finish within
//! the exchange timeout, refuses it (`exchange_failed`). Only connections both sides admitted leave
//! [`AccessControlled`]; handshakes run concurrently, so one slow dialer does not hold up the others.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::task::JoinSet;

use super::{AccessControl, Refusal};
use crate::address::{Address, Scheme};
use crate::error::{CloseReason, TransportError};
use crate::identity::PeerId;
use crate::rpc::{self, FramedRecv, FramedSend, StreamConfig};
use crate::transport::{Connection, Listener, ListenerImpl, RecvStream, Transport};
use crate::wire::{FrameKind, FrameLimits, OpenHeader, ProtocolId, WireError, read_frame};

/// The protocol id of the exchange.
pub fn protocol() -> ProtocolId {
    ProtocolId::new("access", 1).expect("a valid protocol name")
}

/// Close reasons of connections closed by a refusal start with this.
pub const CLOSE_PREFIX: &str = "access refused: ";

/// Longest refusal message sent, in characters.
const MAX_MESSAGE_CHARS: usize = 1024;
/// How long a refusing side waits for the refused side to read the refusal and close.
const LINGER: Duration = Duration::from_secs(2);
/// Incoming connections in the access exchange at once per listener; more wait in the transport's backlog.
const MAX_PENDING_ADMISSIONS: usize = 256;

/// Step 1: the dialer's credential.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AccessOffer {
    /// A certificate's binary form, or empty.
    pub credential: Vec<u8>,
}

/// A refusal as it travels.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireRefusal {
    /// The short name ([`Refusal::reason`]).
    pub reason: String,
    /// The reason in words.
    pub message: String,
}

impl From<&Refusal> for WireRefusal {
    fn from(refusal: &Refusal) -> Self {
        Self {
            reason: refusal.reason().to_owned(),
            message: refusal.to_string().chars().take(MAX_MESSAGE_CHARS).collect(),
        }
    }
}

/// Step 2: the listener's refusal, or its credential.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AccessAnswer {
    /// Why the dialer is refused; `None` when admitted.
    pub refusal: Option<WireRefusal>,
    /// The listener's certificate (binary form), or empty.
    pub credential: Vec<u8>,
}

/// Step 3: the dialer's refusal of the listener, or none.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AccessVerdict {
    /// Why the listener is refused; `None` when admitted.
    pub refusal: Option<WireRefusal>,
}

fn stream_config(timeout: Duration) -> StreamConfig {
    StreamConfig {
        limits: FrameLimits {
            max_header_bytes: 4096,
            max_payload_bytes: 0,
        },
        open_timeout: timeout,
        message_timeout: timeout,
        ..StreamConfig::default()
    }
}

/// A transport whose connections pass the access exchange. Made by [`AccessControl::wrap`].
pub struct AccessControlled {
    inner: Arc<dyn Transport>,
    control: Arc<AccessControl>,
}

impl AccessControlled {
    /// `inner` with `control` applied.
    pub fn new(inner: Arc<dyn Transport>, control: Arc<AccessControl>) -> Self {
        Self { inner, control }
    }
}

#[async_trait]
impl Transport for AccessControlled {
    fn scheme(&self) -> Scheme {
        self.inner.scheme()
    }

    fn local_peer(&self) -> PeerId {
        self.inner.local_peer()
    }

    async fn listen(&self, address: &Address) -> Result<Listener, TransportError> {
        let inner = self.inner.listen(address).await?;
        Ok(Listener::new(Box::new(AccessListener {
            inner,
            control: self.control.clone(),
            admissions: JoinSet::new(),
            verdicts: JoinSet::new(),
            refused: 0,
        })))
    }

    async fn dial(&self, address: &Address) -> Result<Connection, TransportError> {
        let conn = self.inner.dial(address).await?;
        let timeout = self.control.exchange_timeout();
        match tokio::time::timeout(timeout, dialer_side(&conn, &self.control, address)).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(error)) => {
                conn.close(&error.to_string());
                Err(error)
            }
            Err(_) => {
                conn.close("the access check timed out");
                Err(TransportError::HandshakeTimeout {
                    address: address.to_string(),
                    timeout,
                })
            }
        }
    }
}

/// The error of a dialer whose exchange broke off: the remote's refusal when it closed the connection
/// with one, else a failed authentication.
fn broken_off(conn: &Connection, address: &Address, error: impl std::fmt::Display) -> TransportError {
    if let Some(CloseReason::Remote(reason)) = conn.close_reason()
        && let Some(refusal) = reason.strip_prefix(CLOSE_PREFIX)
    {
        return TransportError::AccessRefused {
            address: address.to_string(),
            reason: refusal.to_owned(),
        };
    }
    TransportError::Authentication {
        address: address.to_string(),
        reason: format!("the access check failed: {error}"),
    }
}

async fn dialer_side(conn: &Connection, control: &AccessControl, address: &Address) -> Result<(), TransportError> {
    let remote = conn.remote_peer();
    let config = stream_config(control.exchange_timeout());
    let broken = |error: WireError| broken_off(conn, address, error);
    let (mut send, mut recv) = rpc::open::<AccessAnswer>(conn, &protocol(), &config)
        .await
        .map_err(broken)?;
    let offer = AccessOffer {
        credential: control.credential().to_vec(),
    };
    send.send(&offer, Bytes::new()).await.map_err(broken)?;
    let (answer, _) = recv.recv_required("the access answer").await.map_err(broken)?;
    if let Some(refusal) = answer.refusal {
        return Err(TransportError::AccessRefused {
            address: address.to_string(),
            reason: refusal.message,
        });
    }
    match control.check_presented(remote, &answer.credential) {
        Ok(()) => {
            send.send(&AccessVerdict { refusal: None }, Bytes::new())
                .await
                .map_err(broken)?;
            send.finish().await.map_err(broken)?;
            Ok(())
        }
        Err(refusal) => {
            control.count_refusal(&refusal);
            tracing::warn!(%address, %refusal, "refused the peer this peer dialed");
            let verdict = AccessVerdict {
                refusal: Some(WireRefusal::from(&refusal)),
            };
            if send.send(&verdict, Bytes::new()).await.is_ok() {
                let _ = send.finish().await;
            }
            linger_and_close(conn, &refusal).await;
            Err(TransportError::NotAdmitted {
                address: address.to_string(),
                reason: refusal.to_string(),
            })
        }
    }
}

/// Gives the refused side a moment to read the refusal and close, then closes with the reason.
async fn linger_and_close(conn: &Connection, refusal: &Refusal) {
    let _ = tokio::time::timeout(LINGER, conn.closed()).await;
    conn.close(&format!("{CLOSE_PREFIX}{refusal}"));
}

/// How the listener's side of one exchange ended.
enum Outcome {
    /// The dialer is admitted; its verdict on this side is still to come on this stream.
    Admitted(RecvStream),
    /// This side refused the dialer (counted and logged already).
    Refused(Refusal),
    /// The dialer did not complete the exchange.
    Failed(String),
}

/// An admitted connection and the stream its dialer's verdict arrives on.
type Admitted = (Connection, RecvStream);

async fn listener_side(conn: Connection, control: Arc<AccessControl>) -> Option<Admitted> {
    let peer = conn.remote_peer();
    let timeout = control.exchange_timeout();
    let outcome = match tokio::time::timeout(timeout, listener_exchange(&conn, &control)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed(format!("it did not finish within {timeout:?}")),
    };
    match outcome {
        Outcome::Admitted(verdict) => return Some((conn, verdict)),
        Outcome::Refused(refusal) => linger_and_close(&conn, &refusal).await,
        Outcome::Failed(detail) => {
            let refusal = Refusal::ExchangeFailed { peer, detail };
            control.count_refusal(&refusal);
            tracing::warn!(%refusal, "refused an incoming connection");
            conn.close(&format!("{CLOSE_PREFIX}{refusal}"));
        }
    }
    None
}

/// Reads the dialer's verdict on an admitted connection; a refusal is logged (the dialer closes the
/// connection itself).
async fn read_verdict(conn: Connection, recv: RecvStream, timeout: Duration) {
    let config = stream_config(timeout);
    let mut verdicts = FramedRecv::<AccessVerdict>::new(recv, config.limits, config.message_timeout);
    match verdicts.recv_required("the dialer's verdict").await {
        Ok((AccessVerdict { refusal: None }, _)) => {}
        Ok((AccessVerdict { refusal: Some(refusal) }, _)) => {
            tracing::warn!(peer = %conn.remote_peer(), reason = %refusal.message, "a peer that dialed this one refused it");
            conn.close(&format!("closing after the dialer's refusal: {}", refusal.message));
        }
        Err(error) => {
            tracing::debug!(peer = %conn.remote_peer().short(), %error, "no verdict from a dialer");
        }
    }
}

async fn listener_exchange(conn: &Connection, control: &AccessControl) -> Outcome {
    let peer = conn.remote_peer();
    let config = stream_config(control.exchange_timeout());
    let (send, mut recv) = match conn.accept_stream().await {
        Ok(pair) => pair,
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    let mut send = FramedSend::new(send);
    let opened = match read_frame(&mut recv, &config.limits).await {
        Ok(Some(frame)) if frame.kind == FrameKind::Open => frame
            .access::<OpenHeader>()
            .map(|header| header.protocol.as_str().to_owned())
            .map_err(|e| e.to_string()),
        Ok(Some(frame)) => Err(format!("its first frame is {:?}, not an open frame", frame.kind)),
        Ok(None) => Err("its first stream ended at once".into()),
        Err(error) => Err(error.to_string()),
    };
    let expected = protocol().to_string();
    match opened {
        Ok(name) if name == expected => {}
        Ok(name) => {
            let _ = send
                .send_error(&format!("this peer serves nothing before {expected}, not {name}"))
                .await;
            return Outcome::Failed(format!("its first stream speaks {name}, not {expected}"));
        }
        Err(detail) => return Outcome::Failed(detail),
    }
    let mut offers = FramedRecv::<AccessOffer>::new(recv, config.limits, config.message_timeout);
    let offer = match offers.recv_required("the access offer").await {
        Ok((offer, _)) => offer,
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    if let Err(refusal) = control.check_presented(peer, &offer.credential) {
        control.count_refusal(&refusal);
        tracing::warn!(%refusal, "refused an incoming connection");
        let answer = AccessAnswer {
            refusal: Some(WireRefusal::from(&refusal)),
            credential: Vec::new(),
        };
        if send.send(&answer, Bytes::new()).await.is_ok() {
            let _ = send.finish().await;
        }
        return Outcome::Refused(refusal);
    }
    let answer = AccessAnswer {
        refusal: None,
        credential: control.credential().to_vec(),
    };
    if let Err(error) = send.send(&answer, Bytes::new()).await {
        return Outcome::Failed(error.to_string());
    }
    if let Err(error) = send.finish().await {
        return Outcome::Failed(error.to_string());
    }
    Outcome::Admitted(offers.into_inner())
}

struct AccessListener {
    inner: Listener,
    control: Arc<AccessControl>,
    /// Exchanges in progress; dropping the listener aborts them (and drops their connections).
    admissions: JoinSet<Option<Admitted>>,
    /// Readers of admitted dialers' verdicts; dropping the listener aborts them.
    verdicts: JoinSet<()>,
    refused: u64,
}

#[async_trait]
impl ListenerImpl for AccessListener {
    fn local_address(&self) -> Address {
        self.inner.local_address()
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        // Both branches are cancel-safe: a connection taken from the inner listener is in `admissions`
        // before the next await, and a finished admission is returned at once.
        while self.verdicts.try_join_next().is_some() {}
        loop {
            tokio::select! {
                accepted = self.inner.accept(), if self.admissions.len() < MAX_PENDING_ADMISSIONS => {
                    let conn = accepted?;
                    self.admissions.spawn(listener_side(conn, self.control.clone()));
                }
                Some(done) = self.admissions.join_next(), if !self.admissions.is_empty() => match done {
                    Ok(Some((conn, verdict))) => {
                        let timeout = self.control.exchange_timeout();
                        self.verdicts.spawn(read_verdict(conn.clone(), verdict, timeout));
                        return Ok(conn);
                    }
                    Ok(None) => self.refused += 1,
                    Err(error) => {
                        self.refused += 1;
                        tracing::warn!(%error, "an access exchange task ended abnormally");
                    }
                },
            }
        }
    }

    fn refused_handshakes(&self) -> u64 {
        self.inner.refused_handshakes() + self.refused
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::access::{AccessPolicy, Certificate, system_clock};
    use crate::identity::Keypair;
    use crate::mem::MemHub;

    fn allowlist(local: &Keypair, peers: &[&Keypair]) -> Arc<AccessControl> {
        let peers: BTreeSet<PeerId> = peers.iter().map(|k| k.peer_id()).collect();
        Arc::new(AccessControl::new(local.peer_id(), AccessPolicy::Allowlist(peers), None, system_clock()).unwrap())
    }

    #[tokio::test]
    async fn admitted_connections_carry_streams_and_refused_dialers_learn_why() {
        let hub = MemHub::new();
        let (server, friend, stranger) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        let control = allowlist(&server, &[&friend]);
        let mut listener = control
            .wrap(hub.transport(&server))
            .listen(&"mem://gate".parse().unwrap())
            .await
            .unwrap();
        let address = listener.local_address();
        let served = tokio::spawn(async move {
            let conn = listener.accept().await.unwrap();
            let (mut send, _recv) = conn.accept_stream().await.unwrap();
            send.write_all(b"hello").await.unwrap();
            send.finish().await.unwrap();
            let _ = conn.closed().await;
            listener.refused_handshakes()
        });

        // A stranger with an open policy of its own is told why it is refused.
        let open = Arc::new(AccessControl::open(stranger.peer_id()));
        let error = open.wrap(hub.transport(&stranger)).dial(&address).await.unwrap_err();
        let expected = format!("peer {} is not on the run's allowlist", stranger.peer_id());
        assert!(
            matches!(&error, TransportError::AccessRefused { reason, .. } if *reason == expected),
            "{error}"
        );
        assert_eq!(control.refused("not_allowlisted"), 1);

        // A listed peer gets through, and its streams work.
        let friendly = allowlist(&friend, &[&server]);
        let conn = friendly.wrap(hub.transport(&friend)).dial(&address).await.unwrap();
        let (_send, mut recv) = conn.open_stream().await.unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"hello");
        conn.close("done");
        assert_eq!(served.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_dialer_refuses_a_listener_it_does_not_admit() {
        let hub = MemHub::new();
        let (server, client, someone) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        let server_control = Arc::new(AccessControl::open(server.peer_id()));
        let mut listener = server_control
            .wrap(hub.transport(&server))
            .listen(&"mem://open".parse().unwrap())
            .await
            .unwrap();
        let address = listener.local_address();
        // The listener admits the dialer and hands the connection out at once; the dialer's refusal closes it.
        let accepted = tokio::spawn(async move {
            let conn = listener.accept().await.unwrap();
            let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .unwrap();
            (reason, listener)
        });
        let client_control = allowlist(&client, &[&someone]);
        let error = client_control
            .wrap(hub.transport(&client))
            .dial(&address)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, TransportError::NotAdmitted { reason, .. } if reason.contains("not on the run's allowlist")),
            "{error}"
        );
        assert_eq!(client_control.refused("not_allowlisted"), 1);
        let (reason, _listener) = accepted.await.unwrap();
        assert!(reason.to_string().contains("not on the run's allowlist"), "{reason}");
    }

    #[tokio::test]
    async fn a_dialer_that_skips_the_exchange_is_refused() {
        let hub = MemHub::new();
        let (server, rude) = (Keypair::generate(), Keypair::generate());
        let control = Arc::new(AccessControl::open(server.peer_id()).with_exchange_timeout(Duration::from_millis(200)));
        let mut listener = control
            .wrap(hub.transport(&server))
            .listen(&"mem://strict".parse().unwrap())
            .await
            .unwrap();
        let address = listener.local_address();
        let accepting = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(600), listener.accept())
                .await
                .is_err()
        });
        // No access exchange: the raw transport, and a first stream of another protocol.
        let conn = hub.transport(&rude).dial(&address).await.unwrap();
        let join = ProtocolId::new("join", 1).unwrap();
        let _stream = rpc::open::<AccessAnswer>(&conn, &join, &stream_config(Duration::from_secs(1)))
            .await
            .unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .unwrap();
        assert!(
            matches!(&reason, CloseReason::Remote(text) if text.starts_with(CLOSE_PREFIX) && text.contains("did not complete")),
            "{reason}"
        );
        assert!(accepting.await.unwrap());
        assert_eq!(control.refused("exchange_failed"), 1);
    }

    #[tokio::test]
    async fn certificates_are_exchanged_both_ways() {
        let hub = MemHub::new();
        let authority = Keypair::generate();
        let now = system_clock()();
        let policy = AccessPolicy::Certificates {
            authority: authority.peer_id(),
            run_id: "run".into(),
        };
        let control = |keypair: &Keypair| {
            let certificate = Certificate::issue(&authority, keypair.peer_id(), "run", now - 60, now + 3600).unwrap();
            Arc::new(AccessControl::new(keypair.peer_id(), policy.clone(), Some(certificate), system_clock()).unwrap())
        };
        let (a, b) = (Keypair::generate(), Keypair::generate());
        let (control_a, control_b) = (control(&a), control(&b));
        let mut listener = control_a
            .wrap(hub.transport(&a))
            .listen(&"mem://certified".parse().unwrap())
            .await
            .unwrap();
        let address = listener.local_address();
        // The listener (which reads the dialer's verdict) and the accepted connection are kept until the
        // dialer has finished its side of the exchange: dropping them at once would close it under the dialer.
        let accepted = tokio::spawn(async move { listener.accept().await.map(|conn| (conn, listener)) });
        let conn = control_b.wrap(hub.transport(&b)).dial(&address).await.unwrap();
        assert_eq!(conn.remote_peer(), a.peer_id());
        let (accepted, _listener) = accepted.await.unwrap().unwrap();
        assert_eq!(accepted.remote_peer(), b.peer_id());
        // Each side now admits the other's records.
        control_a.admits(&b.peer_id()).unwrap();
        control_b.admits(&a.peer_id()).unwrap();
    }
}
