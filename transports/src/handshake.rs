//! The signed handshake that authenticates both sides of a TCP connection (challenge–response).
//!
//! Each side sends a hello: an 8-byte magic, its public key (the claimed [`PeerId`]) and a fresh 32-byte random
//! nonce. Each side then signs the transcript — a domain string, its role, both keys, both nonces and the
//! channel binding — and sends the 64-byte signature. Each side verifies the other's signature against the
//! key the other claimed. Because every signature covers the *other* side's fresh nonce, a recorded
//! signature is useless in another session (no replay). With TLS, the channel binding is a TLS exporter
//! value, so a man in the middle who terminates two TLS sessions cannot forward the signatures either.
//!
//! The pure parts ([`Hello`], [`transcript`]) are public so that tests can play a misbehaving peer.

use ring::rand::SecureRandom;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::identity::{Keypair, PEER_ID_LEN, PeerId, SIGNATURE_LEN};

/// First bytes of every hello; a different value means the other side does not speak this handshake.
pub const HELLO_MAGIC: [u8; 8] = *b"CLNYHS01";
/// Length of the random nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an encoded hello.
pub const HELLO_LEN: usize = HELLO_MAGIC.len() + PEER_ID_LEN + NONCE_LEN;
/// Length of the channel binding mixed into the transcript (zeros without TLS).
pub const BINDING_LEN: usize = 32;
const DOMAIN: &[u8] = b"colony/tcp-handshake/1";

/// Which side of the connection is signing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that dialed.
    Dialer = 0,
    /// The side that accepted.
    Listener = 1,
}

/// The first message of each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The identity the sender claims.
    pub peer: PeerId,
    /// A fresh random challenge.
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// A hello for `peer` with a fresh random nonce.
    pub fn new(peer: PeerId) -> Self {
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .expect("the operating system random source must be available for handshake nonces");
        Self { peer, nonce }
    }

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..8].copy_from_slice(&HELLO_MAGIC);
        out[8..8 + PEER_ID_LEN].copy_from_slice(self.peer.as_bytes());
        out[8 + PEER_ID_LEN..].copy_from_slice(&self.nonce);
        out
    }

    /// Decodes a hello, checking the magic.
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Self, HandshakeError> {
        if bytes[..8] != HELLO_MAGIC {
            return Err(HandshakeError::NotColony);
        }
        let peer = PeerId::try_from_slice(&bytes[8..8 + PEER_ID_LEN]).expect("slice is PEER_ID_LEN bytes");
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[8 + PEER_ID_LEN..]);
        Ok(Self { peer, nonce })
    }
}

/// The bytes that the side playing `role` signs.
pub fn transcript(role: Role, dialer: &Hello, listener: &Hello, binding: &[u8; BINDING_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + 1 + 2 * (PEER_ID_LEN + NONCE_LEN) + BINDING_LEN);
    out.extend_from_slice(DOMAIN);
    out.push(role as u8);
    out.extend_from_slice(dialer.peer.as_bytes());
    out.extend_from_slice(listener.peer.as_bytes());
    out.extend_from_slice(&dialer.nonce);
    out.extend_from_slice(&listener.nonce);
    out.extend_from_slice(binding);
    out
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other side's first bytes are not a Colony hello.
    #[error("the remote does not speak Colony's handshake (bad magic)")]
    NotColony,
    /// The other side claims our own identity.
    #[error("the remote claims this peer's own identity")]
    SelfConnection,
    /// The dialer expected another peer.
    #[error("expected peer {expected}, but peer {actual} answered")]
    UnexpectedPeer { expected: PeerId, actual: PeerId },
    /// The other side's signature does not verify against the key it claims.
    #[error("peer {peer}'s handshake signature does not match the key it claims")]
    BadSignature { peer: PeerId },
    /// The socket failed.
    #[error("handshake I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the handshake on `io` and returns the proven identity of the other side.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    keypair: &Keypair,
    role: Role,
    expected: Option<PeerId>,
    binding: [u8; BINDING_LEN],
) -> Result<PeerId, HandshakeError> {
    let ours = Hello::new(keypair.peer_id());
    io.write_all(&ours.encode()).await?;
    io.flush().await?;
    let mut theirs = [0u8; HELLO_LEN];
    io.read_exact(&mut theirs).await?;
    let theirs = Hello::decode(&theirs)?;
    if theirs.peer == keypair.peer_id() {
        return Err(HandshakeError::SelfConnection);
    }
    if let Some(expected) = expected
        && expected != theirs.peer
    {
        return Err(HandshakeError::UnexpectedPeer {
            expected,
            actual: theirs.peer,
        });
    }
    let (dialer, listener, their_role) = match role {
        Role::Dialer => (&ours, &theirs, Role::Listener),
        Role::Listener => (&theirs, &ours, Role::Dialer),
    };
    let signature = keypair.sign(&transcript(role, dialer, listener, &binding));
    io.write_all(&signature).await?;
    io.flush().await?;
    let mut their_signature = [0u8; SIGNATURE_LEN];
    io.read_exact(&mut their_signature).await?;
    theirs
        .peer
        .verify(&transcript(their_role, dialer, listener, &binding), &their_signature)
        .map_err(|_| HandshakeError::BadSignature { peer: theirs.peer })?;
    Ok(theirs.peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_sides_learn_each_other() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let (ka, kb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let (ra, rb) = tokio::join!(
            run(&mut a, &ka, Role::Dialer, Some(kb.peer_id()), [0; 32]),
            run(&mut b, &kb, Role::Listener, None, [0; 32]),
        );
        assert_eq!(ra.unwrap(), kb.peer_id());
        assert_eq!(rb.unwrap(), ka.peer_id());
    }

    #[tokio::test]
    async fn different_channel_bindings_fail() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let (ka, kb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let (ra, rb) = tokio::join!(
            run(&mut a, &ka, Role::Dialer, None, [1; 32]),
            run(&mut b, &kb, Role::Listener, None, [2; 32])
        );
        assert!(matches!(ra, Err(HandshakeError::BadSignature { .. })));
        assert!(matches!(rb, Err(HandshakeError::BadSignature { .. })));
    }

    #[test]
    fn hello_round_trip_and_magic() {
        let hello = Hello::new(Keypair::from_seed([5; 32]).peer_id());
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let mut bad = hello.encode();
        bad[0] = b'X';
        assert!(matches!(Hello::decode(&bad), Err(HandshakeError::NotColony)));
        assert_ne!(Hello::new(hello.peer).nonce, hello.nonce, "nonces are fresh");
    }
}
