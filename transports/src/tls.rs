//! TLS 1.3 between Colony peers: self-signed certificates bound to the peer's ed25519 key, and verifiers that
//! authenticate the *key*, not a certificate authority.
//!
//! Every peer presents a self-signed X.509 certificate whose subject public key is its own ed25519 key, so
//! the certificate names the [`PeerId`]. Both sides require a certificate (mutual authentication) and check
//! that the TLS handshake is signed by the certificate's key, using rustls' own TLS 1.3 signature check
//! with the ring provider's algorithms and only the `ed25519` scheme. A peer that holds a certificate but
//! not its key therefore cannot finish the handshake, and the remote [`PeerId`] read from the certificate
//! afterwards (see [`remote_peer_id`]) is proven, not claimed.
//!
//! What is deliberately *not* checked: certificate authorities, names and validity dates. The identity is
//! the key, and the handshake signature proves possession of it at connection time; peers' clocks may be
//! wrong by hours. Session resumption is disabled so that every connection proves the key again.
//!
//! The QUIC transport ([`crate::quic`]) and TCP's optional TLS use these configurations; only the ring
//! crypto provider is ever used (two providers in one process make rustls panic).
//!
//! ```
//! use colony_transports::{Keypair, tls};
//! let keypair = Keypair::generate();
//! let (cert, _key) = tls::certificate(&keypair).unwrap();
//! assert_eq!(tls::peer_id_from_certificate(&cert).unwrap(), keypair.peer_id());
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, PeerMisbehaved, SignatureScheme};

use crate::error::TransportError;
use crate::identity::{Keypair, PEER_ID_LEN, PeerId};

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410 §4): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (0 unused bits) }, followed by the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The name a dialer puts in its ClientHello and that certificates carry. Nobody checks it: peers are
/// identified by key.
pub(crate) const SERVER_NAME: &str = "colony";

/// What the `address` field of a [`TransportError::Tls`] says when building a configuration fails.
const LOCAL_CONFIGURATION: &str = "local TLS configuration";

fn setup_error(reason: String) -> TransportError {
    TransportError::Tls {
        address: LOCAL_CONFIGURATION.to_owned(),
        reason,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed X.509 certificate whose subject key is `keypair`'s ed25519 key (and whose common name is
/// the peer id), with that key as a PKCS#8 document, ready for rustls.
pub fn certificate(keypair: &Keypair) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TransportError> {
    let pkcs8 = PrivatePkcs8KeyDer::from(keypair.to_pkcs8_der());
    let signing_key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| setup_error(format!("cannot load the peer key for the certificate: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .map_err(|e| setup_error(format!("cannot build certificate parameters: {e}")))?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, keypair.peer_id().to_string());
    params.distinguished_name = name;
    let cert = params
        .self_signed(&signing_key)
        .map_err(|e| setup_error(format!("cannot sign the peer certificate: {e}")))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// The [`PeerId`] a certificate names: its subject public key, which must be ed25519. The certificate is
/// parsed as X.509 (with rustls-webpki); anything that is not well-formed DER, or whose key is of another
/// algorithm, is refused with a message that says which.
pub fn peer_id_from_certificate(cert: &CertificateDer<'_>) -> Result<PeerId, String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("certificate is not a well-formed X.509 certificate: {e}"))?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    match spki.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        Some(key) if key.len() == PEER_ID_LEN => PeerId::try_from_slice(key).map_err(|e| e.to_string()),
        _ => Err(format!(
            "certificate key is not ed25519 (it is {})",
            key_algorithm_name(spki)
        )),
    }
}

/// Names the algorithm of a SubjectPublicKeyInfo that is not ed25519, for error messages only.
fn key_algorithm_name(spki: &[u8]) -> &'static str {
    // The algorithm identifier is the first element of the SPKI, so its OID lies within the first bytes.
    const NAMES: [(&[u8], &str); 4] = [
        (&[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01], "an ECDSA key"),
        (
            &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
            "an RSA key",
        ),
        (&[0x06, 0x03, 0x2b, 0x65, 0x71], "an ed448 key"),
        (&[0x06, 0x03, 0x2b, 0x65, 0x70], "a malformed ed25519 key"),
    ];
    let head = &spki[..spki.len().min(24)];
    NAMES
        .iter()
        .find(|(oid, _)| head.windows(oid.len()).any(|window| window == *oid))
        .map_or("a key of an unsupported algorithm", |(_, name)| name)
}

/// The remote peer after a handshake, from the certificates it presented (`peer_certificates()` of a rustls
/// connection, or quinn's `peer_identity()`): the end-entity certificate must name an ed25519 key.
pub fn remote_peer_id(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerId, String> {
    match certs {
        Some([end_entity, ..]) => peer_id_from_certificate(end_entity),
        _ => Err("the peer presented no certificate".into()),
    }
}

/// The TLS server side of a peer: TLS 1.3 only, ring provider, presents `keypair`'s certificate, offers
/// `alpn` (none when empty), and *requires* a client certificate naming an ed25519 key that signs the
/// handshake. Any such peer is accepted; deciding whom to serve is the caller's business.
pub fn server_config(keypair: &Keypair, alpn: &[u8]) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let provider = provider();
    let verifier = Arc::new(PeerClientVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let (cert, key) = certificate(keypair)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup_error(format!("cannot restrict the server to TLS 1.3: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .map_err(|e| setup_error(format!("cannot use the peer certificate: {e}")))?;
    if !alpn.is_empty() {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    // No resumption: every connection proves possession of the key again.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The TLS client side of a peer: TLS 1.3 only, ring provider, presents `keypair`'s certificate, offers
/// `alpn` (none when empty), and accepts a server whose certificate names an ed25519 key that signs the
/// handshake. With `expected` set, any other peer fails the handshake with an "unexpected peer" error.
pub fn client_config(
    keypair: &Keypair,
    expected: Option<PeerId>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    client_config_with_observer(keypair, expected, alpn).map(|(config, _)| config)
}

/// The peer a client configuration's verifier saw in the server certificate, so that a dialer can report
/// whom it reached when the handshake failed because that peer was not the expected one.
#[derive(Debug, Clone, Default)]
pub(crate) struct ObservedPeer(Arc<Mutex<Option<PeerId>>>);

impl ObservedPeer {
    /// The peer named by the last server certificate this configuration parsed, if any.
    pub(crate) fn get(&self) -> Option<PeerId> {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, peer: PeerId) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(peer);
    }
}

/// [`client_config`], plus the slot where its verifier records the server's peer id. Use a fresh config
/// per dial so that the slot belongs to one handshake.
pub(crate) fn client_config_with_observer(
    keypair: &Keypair,
    expected: Option<PeerId>,
    alpn: &[u8],
) -> Result<(Arc<rustls::ClientConfig>, ObservedPeer), TransportError> {
    let provider = provider();
    let observed = ObservedPeer::default();
    let verifier = Arc::new(PeerServerVerifier {
        expected,
        observed: observed.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let (cert, key) = certificate(keypair)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup_error(format!("cannot restrict the client to TLS 1.3: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| setup_error(format!("cannot use the peer certificate: {e}")))?;
    if !alpn.is_empty() {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok((Arc::new(config), observed))
}

/// A certificate refusal with our own message. Its `Debug` is the message, because rustls prints
/// `CertificateError::Other` with `{:?}`.
struct Refusal(String);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn refuse(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(message)))))
}

/// Checks the certificate chain a peer presented: exactly one certificate, naming an ed25519 key.
fn check_chain(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Result<PeerId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(refuse(format!(
            "expected one self-signed certificate, got a chain of {} certificates",
            intermediates.len() + 1
        )));
    }
    peer_id_from_certificate(end_entity).map_err(refuse)
}

/// Checks a TLS 1.3 handshake signature: only ed25519, verified by rustls against the certificate's key.
fn verify_ed25519_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not allowed between Colony peers".into())
}

/// Client side: authenticates the server by its key, optionally requiring a given peer.
#[derive(Debug)]
struct PeerServerVerifier {
    expected: Option<PeerId>,
    observed: ObservedPeer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = check_chain(end_entity, intermediates)?;
        self.observed.set(peer);
        match self.expected {
            Some(expected) if expected != peer => Err(refuse(format!(
                "unexpected peer: expected {expected}, the certificate belongs to {peer}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: requires a client certificate and authenticates the client by its key.
#[derive(Debug)]
struct PeerClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_chain(end_entity, intermediates).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_round_trips_to_the_peer_id() {
        for seed in [[0u8; 32], [7; 32], [255; 32]] {
            let keypair = Keypair::from_seed(seed);
            let (cert, key) = certificate(&keypair).unwrap();
            assert_eq!(peer_id_from_certificate(&cert).unwrap(), keypair.peer_id());
            assert_eq!(
                remote_peer_id(Some(std::slice::from_ref(&cert))).unwrap(),
                keypair.peer_id()
            );
            assert_eq!(key.secret_der(), keypair.to_pkcs8_der().as_slice());
        }
        let random = Keypair::generate();
        assert_eq!(
            peer_id_from_certificate(&certificate(&random).unwrap().0).unwrap(),
            random.peer_id()
        );
    }

    #[test]
    fn non_ed25519_certificates_are_refused() {
        for algorithm in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let err = peer_id_from_certificate(cert.der()).unwrap_err();
            assert!(
                err.contains("certificate key is not ed25519") && err.contains("ECDSA"),
                "{err}"
            );
        }
    }

    #[test]
    fn garbage_is_refused() {
        let (cert, _) = certificate(&Keypair::from_seed([1; 32])).unwrap();
        let truncated = CertificateDer::from(cert.as_ref()[..cert.as_ref().len() / 2].to_vec());
        let mut flipped = cert.as_ref().to_vec();
        flipped[0] = 0x31;
        let mut trailing = cert.as_ref().to_vec();
        trailing.push(0);
        for bad in [
            CertificateDer::from(Vec::new()),
            CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]),
            truncated,
        ] {
            let err = peer_id_from_certificate(&bad).unwrap_err();
            assert!(err.contains("not a well-formed X.509 certificate"), "{err}");
        }
        for bad in [flipped, trailing] {
            assert!(peer_id_from_certificate(&CertificateDer::from(bad)).is_err());
        }
        assert_eq!(remote_peer_id(None).unwrap_err(), "the peer presented no certificate");
        assert!(remote_peer_id(Some(&[])).is_err());
    }

    #[test]
    fn configs_build_with_ring_and_tls13_only() {
        let keypair = Keypair::from_seed([9; 32]);
        let server = server_config(&keypair, b"colony-test").unwrap();
        assert_eq!(server.alpn_protocols, vec![b"colony-test".to_vec()]);
        assert!(
            server
                .crypto_provider()
                .cipher_suites
                .iter()
                .any(|s| s.version() == &rustls::version::TLS13)
        );
        let client = client_config(&keypair, Some(keypair.peer_id()), b"").unwrap();
        assert!(client.alpn_protocols.is_empty());
        assert!(client.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn server_verifier_enforces_the_expected_peer_and_records_it() {
        let server = Keypair::from_seed([2; 32]);
        let other = Keypair::from_seed([3; 32]).peer_id();
        let (cert, _) = certificate(&server).unwrap();
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let algorithms = provider().signature_verification_algorithms;
        for (expected, ok) in [(None, true), (Some(server.peer_id()), true), (Some(other), false)] {
            let observed = ObservedPeer::default();
            let verifier = PeerServerVerifier {
                expected,
                observed: observed.clone(),
                algorithms,
            };
            let result = verifier.verify_server_cert(&cert, &[], &name, &[], UnixTime::now());
            assert_eq!(result.is_ok(), ok, "{result:?}");
            if !ok {
                let err = result.unwrap_err().to_string();
                assert!(
                    err.contains("unexpected peer") && err.contains(&server.peer_id().to_string()),
                    "{err}"
                );
            }
            assert_eq!(observed.get(), Some(server.peer_id()));
        }
        let verifier = PeerServerVerifier {
            expected: None,
            observed: ObservedPeer::default(),
            algorithms,
        };
        let err = verifier
            .verify_server_cert(&cert, std::slice::from_ref(&cert), &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("chain of 2 certificates"), "{err}");
    }
}
