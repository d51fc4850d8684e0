//! The WAN transport: QUIC (quinn) over UDP, authenticated with TLS 1.3 certificates bound to the peers'
//! ed25519 keys ([`crate::tls`]).
//!
//! - **Addresses**: `quic://host:port`, optionally `/p/<peer-id>`. A listener reports `quic://ip:port/p/<id>`
//!   with the port it actually bound (port 0 picks a free one).
//! - **Authentication** is mutual: both sides present a self-signed certificate for their key and sign the
//!   handshake with it. A dial that names a peer fails with [`TransportError::UnexpectedPeer`] when another
//!   peer answers. A listener counts refused handshakes ([`Listener::refused_handshakes`]); a failed or slow
//!   handshake never blocks the others, because each runs in its own task under
//!   [`QuicConfig::handshake_timeout`].
//! - **Endpoints**: a transport that listens dials from its listening socket, so that NAT mappings made by
//!   outgoing connections also let the remote reach the listener; otherwise it dials from a client socket
//!   created on first use (`0.0.0.0:0` or `[::]:0`).
//! - **Flow control** is sized for long fat pipes (see [`QuicConfig`]): quinn's defaults cap one stream at
//!   about 100 Mbit/s at 100 ms RTT.
//! - **Streams** are QUIC bidirectional streams. A stream opened here is announced to the remote with its
//!   first bytes (QUIC sends nothing for a stream with no data), so the remote's `accept_stream` returns
//!   only once something was written. Dropping a [`SendStream`] without finishing it resets the stream (quinn
//!   alone would finish it). `finish` returns once the end of the stream is queued; the connection must stay
//!   open until the remote has read it, because closing a QUIC connection discards unsent data.
//! - **Datagrams** are QUIC datagrams (RFC 9221), bounded by the path MTU ([`Connection::max_datagram_size`]).
//! - **Closing**: [`Connection::close`] sends the reason to the remote, which sees
//!   [`CloseReason::Remote`]; the closing side sees [`CloseReason::Local`]. Dropping every handle of a
//!   connection (the connection and all its streams) closes it with the reason "connection dropped".
//!   quinn's background tasks end once the transport, its listeners and all connections are gone.
//!   Known limitation of quinn-proto 0.11.19: a close made while this side's congestion window is full
//!   (in the middle of a bulk send) is never put on the wire (quinn-rs/quinn#2785, fixed upstream, not yet
//!   released), so the remote learns of it only from its [`QuicConfig::idle_timeout`].
//!
//! ```no_run
//! use colony_transports::quic::{QuicConfig, QuicTransport};
//! use colony_transports::{Keypair, Transport};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let server = QuicTransport::new(Keypair::generate(), QuicConfig::default());
//! let mut listener = server.listen(&"quic://127.0.0.1:0".parse()?).await?;
//! let client = QuicTransport::new(Keypair::generate(), QuicConfig::default());
//! let conn = client.dial(&listener.local_address()).await?;
//! let incoming = listener.accept().await?;
//! assert_eq!(incoming.remote_peer(), conn.local_peer());
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, EndpointConfig, TransportErrorCode, VarInt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::address::{Address, Scheme};
use crate::error::{CloseReason, StreamError, TransportError};
use crate::identity::{Keypair, PeerId};
use crate::tls;
use crate::transport::{
    Connection, ConnectionImpl, Listener, ListenerImpl, RecvStream, RecvStreamImpl, SendStream, SendStreamImpl,
    Transport,
};

/// The ALPN protocol id Colony's QUIC connections negotiate.
pub const ALPN: &[u8] = b"colony/1";

/// Longest close reason sent to the remote; longer ones are cut (at a character boundary).
const MAX_CLOSE_REASON_BYTES: usize = 512;

/// Settings of the QUIC transport. The defaults suit a WAN path of 1 Gbit/s with 100 ms RTT.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// Bytes one stream may have in flight towards this peer (per-stream flow-control window). One stream
    /// moves at most `window / RTT`: 1 Gbit/s × 100 ms is 12.5 MB, so the default is 16 MiB.
    pub stream_receive_window: u64,
    /// Bytes all streams of one connection may have in flight towards this peer. Default 64 MiB.
    pub receive_window: u64,
    /// Bytes this peer may have sent but not yet acknowledged, over all streams of a connection. Default
    /// 64 MiB.
    pub send_window: u64,
    /// Streams the remote may have open at once on a connection; it waits for more. Default 4096.
    pub max_concurrent_streams: u64,
    /// How often an idle connection sends a keep-alive, so that NAT mappings and the idle timeout do not
    /// expire while the peer is alive. Default 5 s.
    pub keep_alive_interval: Duration,
    /// A connection from which nothing arrives for this long is closed with [`CloseReason::IdleTimeout`]
    /// (the smaller of both sides' values applies). Default 30 s.
    pub idle_timeout: Duration,
    /// Longest a handshake (dialing or accepting) may take. Default 10 s.
    pub handshake_timeout: Duration,
    /// Bytes of received datagrams buffered per connection before old ones are dropped; 0 disables
    /// datagrams. Default 1 MiB.
    pub datagram_receive_buffer: usize,
    /// Authenticated incoming connections waiting for [`Listener::accept`]; further handshakes wait until
    /// there is room. Default 1024.
    pub accept_backlog: usize,
    /// Incoming handshakes in progress at once per listener; further connection attempts are refused (and
    /// counted, in `colony_connections_refused_total{reason="handshake_limit"}`). Default 1024.
    pub max_concurrent_handshakes: usize,
    /// Requested size in bytes of each UDP socket's send and receive buffers, so that bursts at full
    /// window are not dropped by the kernel before QUIC reads them. The operating system may cap it (on
    /// Linux at `net.core.rmem_max` / `wmem_max`); 0 keeps the system default. Default 4 MiB.
    pub socket_buffer_size: usize,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            stream_receive_window: 16 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            max_concurrent_streams: 4096,
            keep_alive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            datagram_receive_buffer: 1 << 20,
            accept_backlog: 1024,
            max_concurrent_handshakes: 1024,
            socket_buffer_size: 4 << 20,
        }
    }
}

impl QuicConfig {
    /// quinn's transport parameters for these settings (values beyond QUIC's limits are clamped).
    fn transport_config(&self) -> quinn::TransportConfig {
        let varint = |value: u64| VarInt::from_u64(value).unwrap_or(VarInt::MAX);
        let mut config = quinn::TransportConfig::default();
        config
            .stream_receive_window(varint(self.stream_receive_window))
            .receive_window(varint(self.receive_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(varint(self.max_concurrent_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .keep_alive_interval(Some(self.keep_alive_interval).filter(|interval| !interval.is_zero()))
            .max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok())
            .datagram_receive_buffer_size(Some(self.datagram_receive_buffer).filter(|&bytes| bytes > 0));
        config
    }
}

/// QUIC as a [`Transport`]. Cheap to share behind an `Arc`; every listener and connection it makes is
/// independent of it afterwards.
pub struct QuicTransport {
    inner: Arc<TransportInner>,
}

struct TransportInner {
    keypair: Keypair,
    config: QuicConfig,
    transport_config: Arc<quinn::TransportConfig>,
    /// Endpoints of live listeners, used for dialing too.
    listening: Mutex<Vec<ListeningEndpoint>>,
    /// Dial-only endpoints, created on first use: `[IPv4, IPv6]`.
    client_endpoints: Mutex<[Option<Endpoint>; 2]>,
    next_listener_id: AtomicU64,
}

struct ListeningEndpoint {
    id: u64,
    local: SocketAddr,
    endpoint: Endpoint,
}

impl QuicTransport {
    /// A transport that authenticates as `keypair`.
    pub fn new(keypair: Keypair, config: QuicConfig) -> Self {
        let transport_config = Arc::new(config.transport_config());
        Self {
            inner: Arc::new(TransportInner {
                keypair,
                config,
                transport_config,
                listening: Mutex::new(Vec::new()),
                client_endpoints: Mutex::new([None, None]),
                next_listener_id: AtomicU64::new(0),
            }),
        }
    }

    /// The transport's settings.
    pub fn config(&self) -> &QuicConfig {
        &self.inner.config
    }
}

fn check_scheme(address: &Address) -> Result<(), TransportError> {
    if address.scheme() == Scheme::Quic {
        Ok(())
    } else {
        Err(TransportError::WrongScheme {
            transport: "quic",
            address: address.to_string(),
        })
    }
}

/// Binds a UDP socket at `address` and asks for `buffer_size` bytes of kernel buffers (best effort: the
/// system may cap or refuse it, which only costs throughput).
fn bind_udp(address: SocketAddr, buffer_size: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    if buffer_size > 0 {
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        let sizes = state
            .set_recv_buffer_size((&socket).into(), buffer_size)
            .and_then(|()| state.set_send_buffer_size((&socket).into(), buffer_size));
        if let Err(error) = sizes {
            tracing::debug!(%address, buffer_size, %error, "could not resize the UDP socket buffers");
        }
    }
    Ok(socket)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded data stays consistent across a panic (plain pushes and removals), so poisoning is ignored.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TransportInner {
    /// The endpoint to dial `target` from: a listening endpoint that can reach it, else the client endpoint
    /// of its address family.
    fn endpoint_for(&self, target: SocketAddr) -> Result<Endpoint, TransportError> {
        let usable = |local: &SocketAddr| {
            local.is_ipv4() == target.is_ipv4()
                && (local.ip().is_unspecified() || local.ip().is_loopback() == target.ip().is_loopback())
        };
        if let Some(listening) = lock(&self.listening).iter().find(|l| usable(&l.local)) {
            return Ok(listening.endpoint.clone());
        }
        let mut clients = lock(&self.client_endpoints);
        let slot = &mut clients[usize::from(target.is_ipv6())];
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let bind: SocketAddr = if target.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = bind_udp(bind, self.config.socket_buffer_size)
            .map_err(|e| TransportError::io(format!("binding a UDP socket at {bind} for dialing"), e))?;
        let endpoint = Endpoint::new(EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(|e| TransportError::io(format!("starting a QUIC endpoint at {bind}"), e))?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    async fn dial_one(&self, address: &Address, target: SocketAddr) -> Result<Connection, TransportError> {
        let expected = address.peer();
        let endpoint = self.endpoint_for(target)?;
        let (tls, observed) = tls::client_config_with_observer(&self.keypair, expected, ALPN)?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls {
            address: address.to_string(),
            reason: e.to_string(),
        })?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.transport_config.clone());
        let connecting = endpoint.connect_with(client, target, tls::SERVER_NAME).map_err(|e| {
            TransportError::io(
                format!("dialing {address}"),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            )
        })?;
        let timeout = self.config.handshake_timeout;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => {
                return Err(TransportError::HandshakeTimeout {
                    address: address.to_string(),
                    timeout,
                });
            }
            Ok(Err(error)) => return Err(dial_error(address, &observed, error, timeout)),
            Ok(Ok(conn)) => conn,
        };
        let remote = peer_of(&conn).map_err(|reason| {
            conn.close(VarInt::from_u32(0), b"no valid certificate");
            TransportError::Authentication {
                address: address.to_string(),
                reason,
            }
        })?;
        if let Some(expected) = expected
            && expected != remote
        {
            // The verifier refuses this already; checked again so that no other path can skip it.
            conn.close(VarInt::from_u32(0), b"unexpected peer");
            return Err(TransportError::UnexpectedPeer {
                address: address.to_string(),
                expected,
                actual: remote,
            });
        }
        tracing::debug!(peer = %remote.short(), %address, "QUIC connection dialed");
        QuicConnection::connection(conn, self.keypair.peer_id(), remote).map_err(|reason| {
            TransportError::Authentication {
                address: address.to_string(),
                reason,
            }
        })
    }
}

/// Whether a QUIC error code is a TLS alert (the handshake's authentication failed).
fn is_tls_alert(code: TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Turns a failed client handshake into the error the [`Transport`] contract promises.
fn dial_error(
    address: &Address,
    observed: &tls::ObservedPeer,
    error: ConnectionError,
    timeout: Duration,
) -> TransportError {
    if let (Some(expected), Some(actual)) = (address.peer(), observed.get())
        && expected != actual
    {
        return TransportError::UnexpectedPeer {
            address: address.to_string(),
            expected,
            actual,
        };
    }
    let address = address.to_string();
    match error {
        ConnectionError::TransportError(error) if is_tls_alert(error.code) => TransportError::Authentication {
            address,
            reason: error.to_string(),
        },
        ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => TransportError::Authentication {
            address,
            reason: format!("the remote peer refused the handshake: {close}"),
        },
        ConnectionError::ConnectionClosed(close) if close.error_code == TransportErrorCode::CONNECTION_REFUSED => {
            TransportError::NoListener { address }
        }
        ConnectionError::TimedOut => TransportError::HandshakeTimeout { address, timeout },
        other => TransportError::io(
            format!("QUIC handshake with {address}"),
            std::io::Error::new(std::io::ErrorKind::ConnectionAborted, other),
        ),
    }
}

/// The proven peer of an established connection, from the certificate TLS verified.
fn peer_of(conn: &quinn::Connection) -> Result<PeerId, String> {
    let certs = conn.peer_identity().and_then(|identity| {
        identity
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    tls::remote_peer_id(certs.as_deref().map(Vec::as_slice))
}

#[async_trait]
impl Transport for QuicTransport {
    fn scheme(&self) -> Scheme {
        Scheme::Quic
    }

    fn local_peer(&self) -> PeerId {
        self.inner.keypair.peer_id()
    }

    async fn listen(&self, address: &Address) -> Result<Listener, TransportError> {
        check_scheme(address)?;
        let bind = address.resolve().await?[0];
        let socket = bind_udp(bind, self.inner.config.socket_buffer_size).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => TransportError::AddressInUse {
                address: address.to_string(),
            },
            _ => TransportError::io(format!("binding UDP socket {bind} for {address}"), e),
        })?;
        let tls = tls::server_config(&self.inner.keypair, ALPN)?;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls {
            address: address.to_string(),
            reason: e.to_string(),
        })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(self.inner.transport_config.clone());
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| TransportError::io(format!("starting a QUIC endpoint at {bind}"), e))?;
        let local_socket = endpoint
            .local_addr()
            .map_err(|e| TransportError::io("reading the bound address", e))?;
        let peer = self.inner.keypair.peer_id();
        let local = Address::new(Scheme::Quic, local_socket.to_string(), Some(peer))?;

        let id = self.inner.next_listener_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.listening).push(ListeningEndpoint {
            id,
            local: local_socket,
            endpoint: endpoint.clone(),
        });
        let refused = Arc::new(AtomicU64::new(0));
        let (ready, incoming) = mpsc::channel(self.inner.config.accept_backlog.max(1));
        let context = Arc::new(AcceptContext {
            local_peer: peer,
            listen_address: local.clone(),
            handshake_timeout: self.inner.config.handshake_timeout,
            max_concurrent_handshakes: self.inner.config.max_concurrent_handshakes.max(1),
            refused: refused.clone(),
        });
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), context, ready));
        tracing::debug!(address = %local, "QUIC listener bound");
        Ok(Listener::new(Box::new(QuicListener {
            transport: self.inner.clone(),
            id,
            endpoint,
            local,
            incoming,
            refused,
            accept_task,
        })))
    }

    async fn dial(&self, address: &Address) -> Result<Connection, TransportError> {
        check_scheme(address)?;
        let mut last_error = None;
        for target in address.resolve().await? {
            match self.inner.dial_one(address, target).await {
                Ok(conn) => return Ok(conn),
                // A name may resolve to several addresses; only try the next one if this one did not answer.
                Err(error @ (TransportError::HandshakeTimeout { .. } | TransportError::Io { .. })) => {
                    tracing::debug!(%address, %target, %error, "QUIC dial attempt failed");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| TransportError::NoListener {
            address: address.to_string(),
        }))
    }
}

/// What the accept loop and its handshake tasks share.
struct AcceptContext {
    local_peer: PeerId,
    listen_address: Address,
    handshake_timeout: Duration,
    max_concurrent_handshakes: usize,
    refused: Arc<AtomicU64>,
}

impl AcceptContext {
    fn refuse(&self, remote: SocketAddr, reason: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(listener = %self.listen_address, %remote, reason, "refused an incoming QUIC connection");
    }
}

/// Takes connection attempts off the endpoint and runs each handshake in its own task. Owned by the listener,
/// which aborts it (and with it every handshake in progress) when dropped.
async fn accept_loop(endpoint: Endpoint, context: Arc<AcceptContext>, ready: mpsc::Sender<Connection>) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if handshakes.len() >= context.max_concurrent_handshakes {
                    metrics::counter!("colony_connections_refused_total", "reason" => "handshake_limit").increment(1);
                    context.refuse(incoming.remote_address(), "too many handshakes in progress");
                    incoming.refuse();
                    continue;
                }
                handshakes.spawn(handshake(incoming, context.clone(), ready.clone()));
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            () = ready.closed() => break,
        }
    }
}

async fn handshake(incoming: quinn::Incoming, context: Arc<AcceptContext>, ready: mpsc::Sender<Connection>) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(error) => return context.refuse(remote, &error.to_string()),
    };
    let conn = match tokio::time::timeout(context.handshake_timeout, connecting).await {
        Err(_) => {
            // Dropping the handshake closes the connection.
            let reason = format!("the handshake did not finish within {:?}", context.handshake_timeout);
            return context.refuse(remote, &reason);
        }
        Ok(Err(error)) => return context.refuse(remote, &error.to_string()),
        Ok(Ok(conn)) => conn,
    };
    let peer = match peer_of(&conn) {
        Ok(peer) => peer,
        Err(reason) => {
            conn.close(VarInt::from_u32(0), b"no valid certificate");
            return context.refuse(remote, &reason);
        }
    };
    match QuicConnection::connection(conn, context.local_peer, peer) {
        Ok(conn) => {
            tracing::debug!(peer = %peer.short(), %remote, "QUIC connection accepted");
            // Waits while the backlog is full; fails only when the listener is gone, which drops the connection.
            let _ = ready.send(conn).await;
        }
        Err(reason) => context.refuse(remote, &reason),
    }
}

struct QuicListener {
    transport: Arc<TransportInner>,
    id: u64,
    endpoint: Endpoint,
    local: Address,
    incoming: mpsc::Receiver<Connection>,
    refused: Arc<AtomicU64>,
    accept_task: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl ListenerImpl for QuicListener {
    fn local_address(&self) -> Address {
        self.local.clone()
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        self.incoming.recv().await.ok_or(TransportError::ListenerClosed)
    }

    fn refused_handshakes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        self.accept_task.abort();
        // New connection attempts are ignored from now on; established connections carry on, and quinn's
        // endpoint task ends once the last of them is gone.
        self.endpoint.set_server_config(None);
        lock(&self.transport.listening).retain(|listening| listening.id != self.id);
    }
}

/// One side of a QUIC connection, shared by the [`Connection`] handles and every stream: the last one dropped
/// closes the connection.
struct ConnectionState {
    conn: quinn::Connection,
    /// The reason given when this side closed the connection (quinn only records that it did).
    local_reason: Mutex<Option<String>>,
}

impl ConnectionState {
    fn close(&self, reason: &str) {
        // quinn would replace the reason of an already closed connection with "closed locally".
        if self.conn.close_reason().is_some() {
            return;
        }
        lock(&self.local_reason).get_or_insert_with(|| reason.to_owned());
        let mut cut = reason.len().min(MAX_CLOSE_REASON_BYTES);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        self.conn.close(VarInt::from_u32(0), &reason.as_bytes()[..cut]);
    }

    fn reason(&self, error: &ConnectionError) -> CloseReason {
        match error {
            ConnectionError::LocallyClosed => {
                CloseReason::Local(lock(&self.local_reason).clone().unwrap_or_else(|| "closed".into()))
            }
            ConnectionError::ApplicationClosed(close) => {
                CloseReason::Remote(String::from_utf8_lossy(&close.reason).into_owned())
            }
            ConnectionError::TimedOut => CloseReason::IdleTimeout,
            ConnectionError::ConnectionClosed(close) => {
                CloseReason::Lost(format!("the remote QUIC stack closed the connection: {close}"))
            }
            ConnectionError::Reset => CloseReason::Lost("reset by the remote peer (it may have restarted)".into()),
            ConnectionError::TransportError(error) => CloseReason::Lost(format!("QUIC protocol error: {error}")),
            other => CloseReason::Lost(other.to_string()),
        }
    }

    fn closed_error(&self, error: &ConnectionError) -> StreamError {
        StreamError::ConnectionClosed(self.reason(error))
    }
}

impl Drop for ConnectionState {
    fn drop(&mut self) {
        self.close("connection dropped");
    }
}

struct QuicConnection {
    state: Arc<ConnectionState>,
    local: PeerId,
    remote: PeerId,
    remote_address: Address,
}

impl QuicConnection {
    fn connection(conn: quinn::Connection, local: PeerId, remote: PeerId) -> Result<Connection, String> {
        let remote_address = Address::new(Scheme::Quic, conn.remote_address().to_string(), Some(remote))
            .map_err(|e| format!("unusable remote address: {e}"))?;
        let state = Arc::new(ConnectionState {
            conn,
            local_reason: Mutex::new(None),
        });
        Ok(Connection::new(Arc::new(QuicConnection {
            state,
            local,
            remote,
            remote_address,
        })))
    }

    fn streams(&self, (send, recv): (quinn::SendStream, quinn::RecvStream)) -> (SendStream, RecvStream) {
        let send = QuicSend {
            inner: send,
            done: false,
            state: self.state.clone(),
        };
        let recv = QuicRecv {
            inner: recv,
            state: self.state.clone(),
        };
        (SendStream::new(Box::new(send)), RecvStream::new(Box::new(recv)))
    }
}

#[async_trait]
impl ConnectionImpl for QuicConnection {
    fn local_peer(&self) -> PeerId {
        self.local
    }

    fn remote_peer(&self) -> PeerId {
        self.remote
    }

    fn remote_address(&self) -> Address {
        self.remote_address.clone()
    }

    async fn open_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let pair = self
            .state
            .conn
            .open_bi()
            .await
            .map_err(|e| self.state.closed_error(&e))?;
        Ok(self.streams(pair))
    }

    async fn accept_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let pair = self
            .state
            .conn
            .accept_bi()
            .await
            .map_err(|e| self.state.closed_error(&e))?;
        Ok(self.streams(pair))
    }

    fn send_datagram(&self, data: Bytes) -> Result<(), StreamError> {
        let len = data.len();
        self.state.conn.send_datagram(data).map_err(|error| match error {
            quinn::SendDatagramError::TooLarge => StreamError::DatagramTooLarge {
                len,
                limit: self.state.conn.max_datagram_size().unwrap_or(0),
            },
            quinn::SendDatagramError::UnsupportedByPeer | quinn::SendDatagramError::Disabled => {
                StreamError::DatagramsUnsupported
            }
            quinn::SendDatagramError::ConnectionLost(error) => self.state.closed_error(&error),
        })
    }

    async fn recv_datagram(&self) -> Result<Bytes, StreamError> {
        self.state
            .conn
            .read_datagram()
            .await
            .map_err(|e| self.state.closed_error(&e))
    }

    fn max_datagram_size(&self) -> Option<usize> {
        self.state.conn.max_datagram_size()
    }

    fn close(&self, reason: &str) {
        self.state.close(reason);
    }

    async fn closed(&self) -> CloseReason {
        let error = self.state.conn.closed().await;
        self.state.reason(&error)
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.state.conn.close_reason().map(|error| self.state.reason(&error))
    }
}

/// Stream error codes travel as QUIC varints; ours are `u32`, and a larger code from a foreign peer saturates.
fn code_u32(code: VarInt) -> u32 {
    u32::try_from(code.into_inner()).unwrap_or(u32::MAX)
}

struct QuicSend {
    inner: quinn::SendStream,
    /// Finished or reset: nothing more may be written, and dropping must not reset.
    done: bool,
    state: Arc<ConnectionState>,
}

#[async_trait]
impl SendStreamImpl for QuicSend {
    async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::ClosedLocally);
        }
        self.inner.write_chunk(data).await.map_err(|error| match error {
            quinn::WriteError::Stopped(code) => StreamError::Stopped(code_u32(code)),
            quinn::WriteError::ConnectionLost(error) => self.state.closed_error(&error),
            quinn::WriteError::ClosedStream => StreamError::ClosedLocally,
            quinn::WriteError::ZeroRttRejected => StreamError::Io("the peer rejected 0-RTT data".into()),
        })
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::ClosedLocally);
        }
        self.done = true;
        if let Some(error) = self.state.conn.close_reason() {
            return Err(self.state.closed_error(&error));
        }
        self.inner.finish().map_err(|_| StreamError::ClosedLocally)
    }

    fn reset(&mut self, code: u32) {
        if !self.done {
            self.done = true;
            // Fails only if the stream is already closed, in which case there is nothing to abort.
            let _ = self.inner.reset(VarInt::from_u32(code));
        }
    }
}

impl Drop for QuicSend {
    fn drop(&mut self) {
        // quinn finishes a dropped stream; Colony's contract is that an unfinished writer resets it.
        self.reset(0);
    }
}

struct QuicRecv {
    inner: quinn::RecvStream,
    state: Arc<ConnectionState>,
}

#[async_trait]
impl RecvStreamImpl for QuicRecv {
    async fn read_chunk(&mut self, max_len: usize) -> Result<Option<Bytes>, StreamError> {
        match self.inner.read_chunk(max_len, true).await {
            Ok(chunk) => Ok(chunk.map(|chunk| chunk.bytes)),
            Err(quinn::ReadError::Reset(code)) => Err(StreamError::Reset(code_u32(code))),
            Err(quinn::ReadError::ConnectionLost(error)) => Err(self.state.closed_error(&error)),
            Err(quinn::ReadError::ClosedStream) => Err(StreamError::ClosedLocally),
            Err(quinn::ReadError::IllegalOrderedRead) => {
                Err(StreamError::Io("ordered read after an unordered read".into()))
            }
            Err(quinn::ReadError::ZeroRttRejected) => Err(StreamError::Io("the peer rejected 0-RTT data".into())),
        }
    }

    fn stop(&mut self, code: u32) {
        // Fails only if the stream is already stopped or fully read.
        let _ = self.inner.stop(VarInt::from_u32(code));
    }
}
