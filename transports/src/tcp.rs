//! The TCP transport, for LANs: TCP sockets (optionally wrapped in TLS 1.3), a signed challenge–response
//! handshake that proves both peers' keys ([`crate::handshake`]), and many concurrent streams per
//! connection with per-stream flow control ([`crate::mux`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::address::{Address, Scheme};
use crate::error::TransportError;
use crate::handshake::{self, BINDING_LEN, HandshakeError, Role};
use crate::identity::{Keypair, PeerId};
use crate::mux::{MuxConfig, MuxConnection};
use crate::transport::{Connection, Listener, ListenerImpl, Transport};

/// ALPN protocol name of TCP connections with TLS.
const TLS_ALPN: &[u8] = b"colony-tcp/1";
/// TLS exporter label for the handshake's channel binding.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-colony-tcp-handshake";

/// Settings of the TCP transport. The defaults suit a LAN; every limit is explicit.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Wrap connections in TLS 1.3 (confidentiality; authentication is the signed handshake either way).
    pub tls: bool,
    /// Time allowed to open the socket.
    pub connect_timeout: Duration,
    /// Time allowed for TLS and the signed handshake.
    pub handshake_timeout: Duration,
    /// A keep-alive is sent after this long without sending anything.
    pub keep_alive_interval: Duration,
    /// The connection closes after this long without receiving anything.
    pub idle_timeout: Duration,
    /// Bytes the remote may send on one stream ahead of our reading.
    pub stream_receive_window: u64,
    /// Bytes the remote may send on the whole connection ahead of our reading.
    pub connection_receive_window: u64,
    /// Streams the remote may have open at once.
    pub max_incoming_streams: usize,
    /// Largest datagram.
    pub max_datagram_size: usize,
    /// Datagrams queued for the application before new ones are dropped.
    pub datagram_queue: usize,
    /// Authenticated connections waiting for `accept` before new ones are dropped (counted in
    /// `colony_connections_refused_total{reason="accept_backlog"}`).
    pub accept_backlog: usize,
    /// Handshakes in progress at once; more incoming sockets are dropped (counted in
    /// `colony_connections_refused_total{reason="handshake_limit"}`).
    pub max_pending_handshakes: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            tls: false,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            stream_receive_window: 16 * 1024 * 1024,
            connection_receive_window: 64 * 1024 * 1024,
            max_incoming_streams: 4096,
            max_datagram_size: 16 * 1024,
            datagram_queue: 1024,
            accept_backlog: 128,
            max_pending_handshakes: 256,
        }
    }
}

impl TcpConfig {
    fn mux(&self) -> MuxConfig {
        MuxConfig {
            stream_receive_window: self.stream_receive_window,
            connection_receive_window: self.connection_receive_window,
            max_incoming_streams: self.max_incoming_streams,
            max_datagram_size: self.max_datagram_size,
            datagram_queue: self.datagram_queue,
            keep_alive_interval: self.keep_alive_interval,
            idle_timeout: self.idle_timeout,
        }
    }
}

/// The TCP transport of one peer.
pub struct TcpTransport {
    keypair: Arc<Keypair>,
    config: TcpConfig,
}

impl TcpTransport {
    /// A TCP transport authenticating as `keypair`.
    pub fn new(keypair: Keypair, config: TcpConfig) -> Self {
        Self {
            keypair: Arc::new(keypair),
            config,
        }
    }
}

fn tcp_address(socket: SocketAddr, peer: Option<PeerId>) -> Address {
    Address::new(Scheme::Tcp, socket.to_string(), peer).expect("a socket address is a valid tcp location")
}

#[async_trait]
impl Transport for TcpTransport {
    fn scheme(&self) -> Scheme {
        Scheme::Tcp
    }

    fn local_peer(&self) -> PeerId {
        self.keypair.peer_id()
    }

    async fn listen(&self, address: &Address) -> Result<Listener, TransportError> {
        check_scheme(address)?;
        let socket_address = address.resolve().await?[0];
        let listener = TcpListener::bind(socket_address).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                TransportError::AddressInUse {
                    address: address.to_string(),
                }
            } else {
                TransportError::io(format!("binding {address}"), e)
            }
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| TransportError::io("reading the bound address", e))?;
        let local = tcp_address(bound, Some(self.keypair.peer_id()));
        let tls = if self.config.tls {
            Some(crate::tls::server_config(&self.keypair, TLS_ALPN)?)
        } else {
            None
        };
        let (backlog_tx, backlog_rx) = mpsc::channel(self.config.accept_backlog.max(1));
        let refused = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            self.keypair.clone(),
            self.config.clone(),
            tls,
            backlog_tx,
            refused.clone(),
        ));
        Ok(Listener::new(Box::new(TcpListenerHandle {
            local,
            backlog: backlog_rx,
            refused,
            task,
        })))
    }

    async fn dial(&self, address: &Address) -> Result<Connection, TransportError> {
        check_scheme(address)?;
        let remote = address.resolve().await?[0];
        let socket = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(remote))
            .await
            .map_err(|_| TransportError::io(format!("connecting to {address}"), std::io::ErrorKind::TimedOut.into()))?
            .map_err(|e| TransportError::io(format!("connecting to {address}"), e))?;
        let tls = if self.config.tls {
            Tls::Client(crate::tls::client_config(&self.keypair, None, TLS_ALPN)?)
        } else {
            Tls::None
        };
        let setup = establish(socket, tls, Role::Dialer, &self.keypair, &self.config, remote, address);
        tokio::time::timeout(self.config.handshake_timeout, setup)
            .await
            .map_err(|_| TransportError::HandshakeTimeout {
                address: address.to_string(),
                timeout: self.config.handshake_timeout,
            })?
    }
}

fn check_scheme(address: &Address) -> Result<(), TransportError> {
    if address.scheme() == Scheme::Tcp {
        Ok(())
    } else {
        Err(TransportError::WrongScheme {
            transport: "tcp",
            address: address.to_string(),
        })
    }
}

/// The TLS side a connection plays, if it uses TLS.
enum Tls<'a> {
    None,
    Client(Arc<rustls::ClientConfig>),
    Server(&'a Arc<rustls::ServerConfig>),
}

/// Sets up TLS if configured, runs the signed handshake, and starts multiplexing.
async fn establish(
    socket: TcpStream,
    tls: Tls<'_>,
    role: Role,
    keypair: &Keypair,
    config: &TcpConfig,
    remote: SocketAddr,
    address: &Address,
) -> Result<Connection, TransportError> {
    socket
        .set_nodelay(true)
        .map_err(|e| TransportError::io("setting TCP_NODELAY", e))?;
    let tls_error = |e: std::io::Error| TransportError::Tls {
        address: address.to_string(),
        reason: e.to_string(),
    };
    let expected = address.peer();
    let stream: tokio_rustls::TlsStream<TcpStream> = match tls {
        Tls::None => {
            let mut socket = socket;
            let peer = authenticate(&mut socket, keypair, role, expected, [0; BINDING_LEN], None, address).await?;
            // Plain TCP splits without a lock between the halves.
            let (reader, writer) = socket.into_split();
            return Ok(start_mux(reader, writer, role, config, keypair, peer, remote));
        }
        Tls::Client(tls) => {
            let server_name = rustls::pki_types::ServerName::try_from("colony.invalid").expect("a valid DNS name");
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, socket)
                .await
                .map_err(tls_error)?;
            stream.into()
        }
        Tls::Server(tls) => tokio_rustls::TlsAcceptor::from(tls.clone())
            .accept(socket)
            .await
            .map_err(tls_error)?
            .into(),
    };
    let mut stream = stream;
    let (binding, cert_peer) = match &stream {
        tokio_rustls::TlsStream::Client(client) => tls_identity(client.get_ref().1, address)?,
        tokio_rustls::TlsStream::Server(server) => tls_identity(server.get_ref().1, address)?,
    };
    let peer = authenticate(&mut stream, keypair, role, expected, binding, Some(cert_peer), address).await?;
    let (reader, writer) = tokio::io::split(stream);
    Ok(start_mux(reader, writer, role, config, keypair, peer, remote))
}

/// The channel binding (a TLS exporter value) and the peer named by the remote's certificate.
fn tls_identity<D>(
    conn: &rustls::ConnectionCommon<D>,
    address: &Address,
) -> Result<([u8; BINDING_LEN], PeerId), TransportError> {
    let binding = conn
        .export_keying_material([0u8; BINDING_LEN], EXPORTER_LABEL, None)
        .map_err(|e| TransportError::Tls {
            address: address.to_string(),
            reason: format!("exporter: {e}"),
        })?;
    let cert_peer =
        crate::tls::remote_peer_id(conn.peer_certificates()).map_err(|reason| TransportError::Authentication {
            address: address.to_string(),
            reason,
        })?;
    Ok((binding, cert_peer))
}

/// Runs the signed handshake; with TLS, the certificate's peer must be the one that signed.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keypair: &Keypair,
    role: Role,
    expected: Option<PeerId>,
    binding: [u8; BINDING_LEN],
    cert_peer: Option<PeerId>,
    address: &Address,
) -> Result<PeerId, TransportError> {
    let peer = handshake::run(stream, keypair, role, expected, binding)
        .await
        .map_err(|error| match error {
            HandshakeError::UnexpectedPeer { expected, actual } => TransportError::UnexpectedPeer {
                address: address.to_string(),
                expected,
                actual,
            },
            other => TransportError::Authentication {
                address: address.to_string(),
                reason: other.to_string(),
            },
        })?;
    match cert_peer {
        Some(cert_peer) if cert_peer != peer => Err(TransportError::Authentication {
            address: address.to_string(),
            reason: format!("TLS certificate of peer {cert_peer} but handshake signed by peer {peer}"),
        }),
        _ => Ok(peer),
    }
}

fn start_mux<R, W>(
    reader: R,
    writer: W,
    role: Role,
    config: &TcpConfig,
    keypair: &Keypair,
    peer: PeerId,
    remote: SocketAddr,
) -> Connection
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let dialer = role == Role::Dialer;
    let local = keypair.peer_id();
    let remote_address = tcp_address(remote, Some(peer));
    Connection::new(Arc::new(MuxConnection::start(
        reader,
        writer,
        dialer,
        config.mux(),
        local,
        peer,
        remote_address,
    )))
}

async fn accept_loop(
    listener: TcpListener,
    keypair: Arc<Keypair>,
    config: TcpConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    backlog: mpsc::Sender<Connection>,
    refused: Arc<AtomicU64>,
) {
    // Handshakes belong to this task: when the listener is dropped, the task is aborted and so are they.
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, remote)) => {
                    if handshakes.len() >= config.max_pending_handshakes {
                        refused.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("colony_connections_refused_total", "reason" => "handshake_limit").increment(1);
                        tracing::warn!(%remote, "dropping an incoming connection: too many handshakes in progress");
                        continue;
                    }
                    let (keypair, config, tls) = (keypair.clone(), config.clone(), tls.clone());
                    let timeout = config.handshake_timeout;
                    handshakes.spawn(async move {
                        let address = tcp_address(remote, None);
                        let tls = tls.as_ref().map_or(Tls::None, Tls::Server);
                        let setup = establish(socket, tls, Role::Listener, &keypair, &config, remote, &address);
                        let result = tokio::time::timeout(timeout, setup).await;
                        (remote, result)
                    });
                }
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                let Ok((remote, result)) = done else { continue };
                match result {
                    Ok(Ok(conn)) => match backlog.try_send(conn) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(conn)) => {
                            metrics::counter!("colony_connections_refused_total", "reason" => "accept_backlog")
                                .increment(1);
                            tracing::warn!(%remote, "dropping an authenticated connection: accept backlog is full");
                            conn.close("accept backlog full");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    },
                    Ok(Err(error)) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%remote, %error, "refused an incoming connection");
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%remote, "refused an incoming connection: handshake timed out");
                    }
                }
            }
        }
    }
}

struct TcpListenerHandle {
    local: Address,
    backlog: mpsc::Receiver<Connection>,
    refused: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for TcpListenerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl ListenerImpl for TcpListenerHandle {
    fn local_address(&self) -> Address {
        self.local.clone()
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        self.backlog.recv().await.ok_or(TransportError::ListenerClosed)
    }

    fn refused_handshakes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}
