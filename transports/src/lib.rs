//! `colony-transports` is Colony's lowest layer: everything that crosses a process boundary goes through it.
//!
//! - [`identity`]: a peer's ed25519 [`Keypair`] and its [`PeerId`] (the public key), key files, signatures.
//! - [`address`]: `mem://name`, `tcp://host:port`, `quic://host:port`, optionally with `/p/<peer-id>`.
//! - [`transport`]: the object-safe [`Transport`] trait and what it yields: authenticated [`Connection`]s
//!   carrying bidirectional streams and best-effort datagrams, with observable closing.
//! - Transports: [`mem`] (in-process hub), [`tcp`] (LAN: signed handshake, optional TLS, multiplexed
//!   streams), [`quic`] (WAN: quinn with TLS 1.3 and certificates bound to the peer key).
//! - [`access`]: who may take part in a run (open, an allowlist, or membership certificates of an authority),
//!   checked on every connection by a wrapper around any transport.
//! - [`emulation`]: latency, bandwidth, loss, partitions and kills around any transport.
//! - [`wire`]: length-prefixed frames with validated rkyv headers and raw payloads; protocol ids.
//! - [`rpc`]: typed message streams, request/response calls and the [`rpc::Router`] that serves protocols.
//!
//! Above it, `colony-averaging` moves tensors and the `colony` runtime runs membership and the optimizer;
//! neither knows which transport is in use.

pub mod access;
pub mod address;
pub mod emulation;
pub mod error;
pub mod handshake;
pub mod identity;
pub mod mem;
pub mod mux;
pub mod quic;
pub mod rpc;
pub mod tcp;
pub mod tls;
pub mod transport;
pub mod wire;

pub use address::{Address, AddressError, Scheme};
pub use error::{CloseReason, StreamError, TransportError};
pub use identity::{IdentityError, Keypair, PeerId};
pub use transport::{Connection, Listener, RecvStream, SendStream, Transport};
