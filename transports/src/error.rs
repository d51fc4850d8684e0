//! Error types of the transport layer.

use std::fmt;
use std::time::Duration;

use crate::address::AddressError;
use crate::identity::{IdentityError, PeerId};

/// Why a connection ended. Both sides learn it; operations pending on the connection fail with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This side called `close`, or dropped every handle.
    Local(String),
    /// The remote side closed the connection, with its reason.
    Remote(String),
    /// The connection broke: reset, end of file, I/O error or a protocol violation.
    Lost(String),
    /// Nothing arrived for longer than the idle timeout.
    IdleTimeout,
    /// Link emulation killed one of the two peers.
    Killed,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local(reason) => write!(f, "closed locally: {reason}"),
            CloseReason::Remote(reason) => write!(f, "closed by the remote peer: {reason}"),
            CloseReason::Lost(reason) => write!(f, "connection lost: {reason}"),
            CloseReason::IdleTimeout => write!(f, "connection idle for longer than the idle timeout"),
            CloseReason::Killed => write!(f, "peer killed by link emulation"),
        }
    }
}

/// Errors of dialing, listening and accepting.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address does not parse or does not fit this transport.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The address is for another transport.
    #[error("transport '{transport}' cannot use address {address}")]
    WrongScheme { transport: &'static str, address: String },
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// Nothing listens at the address.
    #[error("nothing listens at {address}")]
    NoListener { address: String },
    /// The address is already taken by another listener.
    #[error("address {address} is already in use")]
    AddressInUse { address: String },
    /// The remote peer could not prove the identity it claims, or the local peer refused it.
    #[error("authentication with {address} failed: {reason}")]
    Authentication { address: String, reason: String },
    /// The remote peer's access policy refused this peer (not on the run's allowlist, no valid membership
    /// certificate); `reason` is the remote's, in words.
    #[error("the peer at {address} refused this peer: {reason}")]
    AccessRefused { address: String, reason: String },
    /// This peer's access policy refused the remote peer it reached.
    #[error("refused the peer at {address}: {reason}")]
    NotAdmitted { address: String, reason: String },
    /// The dialer required another peer than the one that answered.
    #[error("dialed {address} expecting peer {expected}, but peer {actual} answered")]
    UnexpectedPeer {
        address: String,
        expected: PeerId,
        actual: PeerId,
    },
    /// The handshake did not finish in time.
    #[error("handshake with {address} did not finish within {timeout:?}")]
    HandshakeTimeout { address: String, timeout: Duration },
    /// TLS could not be set up or failed.
    #[error("TLS with {address}: {reason}")]
    Tls { address: String, reason: String },
    /// Link emulation makes the remote unreachable (a partition, or a killed peer).
    #[error("{address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    /// The listener was closed.
    #[error("listener closed")]
    ListenerClosed,
    /// The key material could not be used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl TransportError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TransportError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Errors of streams and datagrams on an established connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The connection ended; the reason says how.
    #[error("{0}")]
    ConnectionClosed(CloseReason),
    /// The remote side aborted the stream.
    #[error("stream reset by the remote peer (code {0})")]
    Reset(u32),
    /// The remote side no longer reads this stream.
    #[error("the remote peer stopped reading the stream (code {0})")]
    Stopped(u32),
    /// Writing after `finish` or `reset`.
    #[error("the stream was already finished or reset locally")]
    ClosedLocally,
    /// The remote peer refused a new stream (too many open).
    #[error("the remote peer refused the stream: {0}")]
    Refused(String),
    /// A datagram was larger than the connection allows.
    #[error("datagram of {len} bytes exceeds the connection's limit of {limit} bytes")]
    DatagramTooLarge { len: usize, limit: usize },
    /// The connection does not carry datagrams.
    #[error("the connection does not carry datagrams")]
    DatagramsUnsupported,
    /// The stream ended before the expected number of bytes.
    #[error("the stream ended after {got} of {expected} expected bytes")]
    UnexpectedEnd { expected: usize, got: usize },
    /// The stream carried more than the reader accepts; it was stopped.
    #[error("the stream carries more than the limit of {limit} bytes")]
    TooLong { limit: usize },
    /// A wait ran past its deadline.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// An I/O error below the transport.
    #[error("I/O error: {0}")]
    Io(String),
}
