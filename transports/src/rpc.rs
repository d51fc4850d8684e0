//! Protocols over streams: typed message streams, request/response calls, and the [`Router`] that serves
//! them on a connection.
//!
//! Every stream opens with an [`FrameKind::Open`] frame naming a [`ProtocolId`]. The acceptor checks the
//! name and the version; a mismatch, an unknown protocol, or any malformed frame ends *that stream* with an
//! error frame that says what was wrong, while the connection and its other streams carry on.
//!
//! The router also bounds what each remote peer may make it do ([`InboundLimits`], part of
//! [`StreamConfig`]): connections served at once, streams in progress at once (over all the peer's
//! connections) and streams opened per second per protocol. A peer past a limit gets an error frame that
//! names the limit, and the refusal is counted ([`RouterStats`], `colony_streams_refused_total{reason}`,
//! `colony_connections_closed_total{reason}`); other peers are not affected.
//!
//! ```no_run
//! # use colony_transports::{rpc::{Router, call}, wire::ProtocolId, Connection};
//! # use std::time::Duration;
//! # async fn demo(server_conn: Connection, client_conn: Connection) -> Result<(), Box<dyn std::error::Error>> {
//! let echo = ProtocolId::new("echo", 1)?;
//! let mut router = Router::default();
//! router.rpc(echo.clone(), |_peer, request: String, payload| async move { Ok((request, payload)) });
//! let router = std::sync::Arc::new(router);
//! tokio::spawn(router.serve(server_conn));
//! let (reply, _payload): (String, _) =
//!     call(&client_conn, &echo, &"hi".to_string(), bytes::Bytes::new(), Duration::from_secs(5), &Default::default()).await?;
//! assert_eq!(reply, "hi");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::address::Scheme;
use crate::error::StreamError;
use crate::identity::PeerId;
use crate::transport::{Connection, RecvStream, SendStream};
use crate::wire::{
    ErrorHeader, FrameKind, FrameLimits, OpenHeader, PREAMBLE_LEN, ProtocolId, WireError, WireMessage, read_frame,
    write_frame,
};

mod limits;

pub use limits::InboundLimits;
use limits::{StreamRefusal, StreamSlot, Tracker};

/// Longest error message put into an error frame.
const MAX_ERROR_MESSAGE: usize = 1024;
/// How long a refusal may take to write before the stream is dropped unanswered.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// The sending half of a protocol stream: typed messages in frames.
pub struct FramedSend {
    send: SendStream,
}

impl FramedSend {
    /// Wraps a raw stream half.
    pub fn new(send: SendStream) -> Self {
        Self { send }
    }

    /// Sends `message` with `payload` (which may be empty) as one frame.
    pub async fn send<T: WireMessage>(&mut self, message: &T, payload: Bytes) -> Result<(), WireError> {
        let header = message.encode()?;
        write_frame(&mut self.send, FrameKind::Message, &header, payload).await
    }

    /// Sends an error frame; the other side's next receive fails with [`WireError::Remote`].
    pub async fn send_error(&mut self, message: &str) -> Result<(), WireError> {
        let message: String = message.chars().take(MAX_ERROR_MESSAGE).collect();
        let header = ErrorHeader { message }.encode()?;
        write_frame(&mut self.send, FrameKind::Error, &header, Bytes::new()).await
    }

    /// Ends the stream gracefully.
    pub async fn finish(&mut self) -> Result<(), WireError> {
        Ok(self.send.finish().await?)
    }

    /// Aborts the stream.
    pub fn reset(&mut self, code: u32) {
        self.send.reset(code)
    }

    /// The raw stream half, for bulk data after the protocol's messages.
    pub fn into_inner(self) -> SendStream {
        self.send
    }
}

/// The receiving half of a protocol stream: typed messages with a timeout each.
pub struct FramedRecv<T> {
    recv: RecvStream,
    limits: FrameLimits,
    message_timeout: Duration,
    _message: PhantomData<fn() -> T>,
}

impl<T: WireMessage> FramedRecv<T> {
    /// Wraps a raw stream half. Each message must arrive within `message_timeout`.
    pub fn new(recv: RecvStream, limits: FrameLimits, message_timeout: Duration) -> Self {
        Self {
            recv,
            limits,
            message_timeout,
            _message: PhantomData,
        }
    }

    /// The next message and its payload, `Ok(None)` at a clean end of stream, or an error (including the
    /// remote's error frames and a message that does not arrive in time).
    pub async fn recv(&mut self) -> Result<Option<(T, Bytes)>, WireError> {
        let frame = tokio::time::timeout(self.message_timeout, read_frame(&mut self.recv, &self.limits))
            .await
            .map_err(|_| StreamError::Timeout {
                what: "waiting for a message",
                after: self.message_timeout,
            })??;
        let Some(frame) = frame else { return Ok(None) };
        let frame = frame.into_result()?;
        if frame.kind != FrameKind::Message {
            return Err(WireError::UnexpectedFrame {
                expected: "a message",
                got: frame.kind,
            });
        }
        Ok(Some((frame.decode::<T>()?, frame.payload)))
    }

    /// Like [`FramedRecv::recv`], but the end of the stream is an error.
    pub async fn recv_required(&mut self, what: &'static str) -> Result<(T, Bytes), WireError> {
        self.recv().await?.ok_or(WireError::EndOfStream(what))
    }

    /// Tells the sender to stop.
    pub fn stop(&mut self, code: u32) {
        self.recv.stop(code)
    }

    /// The raw stream half, for bulk data after the protocol's messages.
    pub fn into_inner(self) -> RecvStream {
        self.recv
    }
}

/// Timeouts and limits of a protocol stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamConfig {
    /// Frame size limits.
    pub limits: FrameLimits,
    /// How long the acceptor waits for the open frame.
    pub open_timeout: Duration,
    /// How long any side waits for each message.
    pub message_timeout: Duration,
    /// What one remote peer may make a [`Router`] do (used by routers only; a caller's copy is ignored).
    pub inbound: InboundLimits,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            limits: FrameLimits::default(),
            open_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(30),
            inbound: InboundLimits::default(),
        }
    }
}

/// The `colony_bytes_sent_total` and `colony_bytes_received_total` counters of one transport and protocol.
///
/// Looked up once per stream (a stream costs far more than the registry's hash lookup), and kept in the
/// stream halves, so that frames and bulk chunks only add to an atomic. Not cached across streams: a handle
/// taken before the process installs its recorder would stay a no-op.
fn stream_meters(transport: Scheme, protocol: &ProtocolId) -> (metrics::Counter, metrics::Counter) {
    let labels = [
        ("transport", transport.as_str().to_owned()),
        ("protocol", protocol.name().to_owned()),
    ];
    (
        metrics::counter!("colony_bytes_sent_total", &labels),
        metrics::counter!("colony_bytes_received_total", &labels),
    )
}

/// Opens a stream on `conn` speaking `protocol`. The open frame is sent at once; if the acceptor refuses the
/// protocol, the first receive fails with its reason (or, when the acceptor refused the stream before the
/// open frame was written, this call does).
pub async fn open<Resp: WireMessage>(
    conn: &Connection,
    protocol: &ProtocolId,
    config: &StreamConfig,
) -> Result<(FramedSend, FramedRecv<Resp>), WireError> {
    let (mut send, mut recv) = conn.open_stream().await?;
    let (sent, received) = stream_meters(conn.remote_address().scheme(), protocol);
    send.set_meter(sent);
    recv.set_meter(received);
    let header = OpenHeader {
        protocol: protocol.to_string(),
    }
    .encode()?;
    let mut recv = FramedRecv::new(recv, config.limits, config.message_timeout);
    if let Err(error) = write_frame(&mut send, FrameKind::Open, &header, Bytes::new()).await {
        // The acceptor may have refused the stream at once (too many streams of this peer in progress) and
        // stopped it: its error frame says why, which is worth more than the failed write.
        return Err(match recv.recv().await {
            Err(remote @ WireError::Remote(_)) => remote,
            _ => error,
        });
    }
    Ok((FramedSend::new(send), recv))
}

/// Sends one request and waits for one response (both with payloads) within `timeout`.
pub async fn call<Req: WireMessage, Resp: WireMessage>(
    conn: &Connection,
    protocol: &ProtocolId,
    request: &Req,
    payload: Bytes,
    timeout: Duration,
    config: &StreamConfig,
) -> Result<(Resp, Bytes), WireError> {
    let exchange = async {
        let (mut send, mut recv) = open::<Resp>(conn, protocol, config).await?;
        let sent = async {
            send.send(request, payload).await?;
            send.finish().await
        };
        if let Err(error) = sent.await {
            // The acceptor may have refused the stream before reading the request (a limit, an unknown
            // protocol): its error frame says why, which is worth more than the failed write.
            return match recv.recv().await {
                Err(remote @ WireError::Remote(_)) => Err(remote),
                _ => Err(error),
            };
        }
        recv.recv_required("the response").await
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        WireError::Stream(StreamError::Timeout {
            what: "request",
            after: timeout,
        })
    })?
}

/// What a stream handler gets: who opened the stream and both halves.
pub struct IncomingStream {
    /// The proven identity of the peer that opened the stream.
    pub peer: PeerId,
    /// The protocol id the opener sent.
    pub protocol: ProtocolId,
    /// Sending half.
    pub send: FramedSend,
    /// Receiving half (raw; wrap it with [`FramedRecv::new`] for the protocol's message type).
    pub recv: RecvStream,
    /// The router's stream settings.
    pub config: StreamConfig,
}

impl IncomingStream {
    /// The receiving half as typed messages.
    pub fn framed<T: WireMessage>(&mut self) -> FramedRecv<T> {
        let recv = std::mem::replace(&mut self.recv, RecvStream::new(Box::new(EmptyRecv)));
        FramedRecv::new(recv, self.config.limits, self.config.message_timeout)
    }
}

struct EmptyRecv;

#[async_trait::async_trait]
impl crate::transport::RecvStreamImpl for EmptyRecv {
    async fn read_chunk(&mut self, _max_len: usize) -> Result<Option<Bytes>, StreamError> {
        Ok(None)
    }

    fn stop(&mut self, _code: u32) {}
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<(), WireError>> + Send>>;
type Handler = Arc<dyn Fn(IncomingStream) -> BoxFuture + Send + Sync>;

/// Counters of a [`Router`].
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Streams whose open frame named a protocol that was served.
    pub streams_served: AtomicU64,
    /// Streams that ended with an error (refused protocol, malformed frame, handler error, a limit).
    pub streams_failed: AtomicU64,
    /// Streams refused because their peer had [`InboundLimits::max_streams_per_peer`] in progress
    /// (`colony_streams_refused_total{reason="too_many_streams"}`).
    pub streams_over_peer_limit: AtomicU64,
    /// Streams refused because their peer opened that protocol faster than
    /// [`InboundLimits::streams_per_sec`] (`colony_streams_refused_total{reason="rate_limited"}`).
    pub streams_rate_limited: AtomicU64,
    /// Connections closed because their peer had more than [`InboundLimits::max_connections_per_peer`]
    /// (`colony_connections_closed_total{reason="per_peer_limit"}`).
    pub connections_over_peer_limit: AtomicU64,
}

impl RouterStats {
    fn count_refusal(&self, refusal: &StreamRefusal) {
        let counter = match refusal {
            StreamRefusal::TooManyStreams { .. } => &self.streams_over_peer_limit,
            StreamRefusal::RateLimited { .. } => &self.streams_rate_limited,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.streams_failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("colony_streams_refused_total", "reason" => refusal.reason()).increment(1);
    }
}

/// Serves protocols on connections: reads each incoming stream's open frame, checks the protocol id, and
/// runs the matching handler. Build it, wrap it in an `Arc`, then call [`Router::serve`] per connection
/// (one router serves all of a peer's connections, so that its [`InboundLimits`] hold per remote peer).
pub struct Router {
    handlers: HashMap<String, (u32, Handler)>,
    config: StreamConfig,
    stats: Arc<RouterStats>,
    tracker: Arc<Tracker>,
}

impl Default for Router {
    fn default() -> Self {
        Self::with_config(StreamConfig::default())
    }
}

impl Router {
    /// A router with the given stream settings.
    pub fn with_config(config: StreamConfig) -> Self {
        Self {
            handlers: HashMap::new(),
            config,
            stats: Arc::default(),
            tracker: Arc::new(Tracker::new(config.inbound)),
        }
    }

    /// The router's counters.
    pub fn stats(&self) -> Arc<RouterStats> {
        self.stats.clone()
    }

    /// Serves `protocol` with a handler that owns the whole stream.
    pub fn stream<F, Fut>(&mut self, protocol: ProtocolId, handler: F)
    where
        F: Fn(IncomingStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), WireError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |incoming| Box::pin(handler(incoming)));
        self.handlers
            .insert(protocol.name().to_owned(), (protocol.version(), handler));
    }

    /// Serves `protocol` as request/response: one request message in, one response (or an error frame with
    /// the handler's message) out.
    pub fn rpc<Req, Resp, F, Fut>(&mut self, protocol: ProtocolId, handler: F)
    where
        Req: WireMessage,
        Resp: WireMessage,
        F: Fn(PeerId, Req, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(Resp, Bytes), String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.stream(protocol, move |mut incoming| {
            let handler = handler.clone();
            async move {
                let (request, payload) = incoming.framed::<Req>().recv_required("the request").await?;
                match handler(incoming.peer, request, payload).await {
                    Ok((response, payload)) => incoming.send.send(&response, payload).await?,
                    Err(message) => incoming.send.send_error(&message).await?,
                }
                incoming.send.finish().await
            }
        });
    }

    /// Serves every stream the remote opens on `conn` until the connection closes. Handler tasks belong to
    /// this future: dropping it cancels them. When the remote peer now has more connections served than
    /// [`InboundLimits::max_connections_per_peer`], its oldest one is closed.
    pub async fn serve(self: Arc<Self>, conn: Connection) {
        let peer = conn.remote_peer();
        let (_registration, oldest) = self.tracker.connection_opened(&conn);
        if let Some(oldest) = oldest {
            self.stats.connections_over_peer_limit.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("colony_connections_closed_total", "reason" => "per_peer_limit").increment(1);
            let limit = self.tracker.limits().max_connections_per_peer;
            tracing::warn!(peer = %peer.short(), limit, "a peer has too many connections; closing its oldest");
            oldest.close(&format!(
                "too many connections from peer {}: {limit} is the most one peer may have \
                 (max_connections_per_peer); closing the oldest",
                peer.short()
            ));
        }
        let mut tasks = JoinSet::new();
        let transport = conn.remote_address().scheme();
        loop {
            tokio::select! {
                accepted = conn.accept_stream() => match accepted {
                    Ok((send, recv)) => match self.tracker.stream_started(peer) {
                        Ok(slot) => {
                            let router = self.clone();
                            tasks.spawn(async move { router.handle_stream(peer, transport, send, recv, slot).await });
                        }
                        // Answered here, without a task: a peer that floods streams waits for its own refusals.
                        Err(refusal) => self.refuse(peer, FramedSend::new(send), recv, refusal).await,
                    },
                    Err(_) => break,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tasks.shutdown().await;
    }

    /// Refuses a stream for a limit: counts it, tells the opener which limit, and closes the stream.
    async fn refuse(&self, peer: PeerId, mut send: FramedSend, mut recv: RecvStream, refusal: StreamRefusal) {
        self.stats.count_refusal(&refusal);
        tracing::debug!(peer = %peer.short(), reason = refusal.reason(), "refused an incoming stream");
        // A fresh stream has flow-control credit for the error frame; the timeout only guards a peer that
        // grants none. The answer goes out before the stream is stopped, so the opener reads why its writes
        // failed.
        let answer = async {
            if send.send_error(&refusal.message(&peer)).await.is_ok() {
                let _ = send.finish().await;
            }
        };
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answer).await;
        recv.stop(1);
    }

    async fn handle_stream(
        &self,
        peer: PeerId,
        transport: Scheme,
        send: SendStream,
        mut recv: RecvStream,
        _slot: StreamSlot,
    ) {
        let mut send = FramedSend::new(send);
        let result = match self.route(&mut recv).await {
            Ok((protocol, handler, open_frame_len)) => {
                if let Err(refusal) = self.tracker.allow_open(peer, protocol.name(), Instant::now()) {
                    return self.refuse(peer, send, recv, refusal).await;
                }
                self.stats.streams_served.fetch_add(1, Ordering::Relaxed);
                // Only served protocols get counters, so a remote cannot create label values at will.
                let (sent, received) = stream_meters(transport, &protocol);
                received.increment(open_frame_len);
                send.send.set_meter(sent);
                recv.set_meter(received);
                let incoming = IncomingStream {
                    peer,
                    protocol,
                    send,
                    recv,
                    config: self.config,
                };
                // The handler owns the stream now; it reports its own errors to the opener.
                if let Err(error) = handler(incoming).await {
                    self.stats.streams_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %peer.short(), %error, "protocol handler failed");
                }
                return;
            }
            Err(error) => error,
        };
        self.stats.streams_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %peer.short(), error = %result, "refused an incoming stream");
        // Tell the opener what was wrong, then close only this stream.
        recv.stop(1);
        if send.send_error(&result.to_string()).await.is_ok() {
            let _ = send.finish().await;
        }
    }

    /// Connections of `peer` this router serves now.
    pub fn connections_of(&self, peer: &PeerId) -> usize {
        self.tracker.connections_of(peer)
    }

    /// Reads and checks the open frame; returns the protocol, its handler and the open frame's length.
    async fn route(&self, recv: &mut RecvStream) -> Result<(ProtocolId, Handler, u64), WireError> {
        let frame = tokio::time::timeout(self.config.open_timeout, read_frame(recv, &self.config.limits))
            .await
            .map_err(|_| StreamError::Timeout {
                what: "waiting for the open frame",
                after: self.config.open_timeout,
            })??
            .ok_or(WireError::EndOfStream("the open frame"))?;
        if frame.kind != FrameKind::Open {
            return Err(WireError::UnexpectedFrame {
                expected: "an open frame",
                got: frame.kind,
            });
        }
        let requested = frame.access::<OpenHeader>()?.protocol.as_str().to_owned();
        let protocol: ProtocolId = requested.parse()?;
        let Some((supported, handler)) = self.handlers.get(protocol.name()) else {
            let mut names: Vec<String> = self
                .handlers
                .iter()
                .map(|(name, (version, _))| format!("/colony/{name}/{version}"))
                .collect();
            names.sort();
            return Err(WireError::UnknownProtocol {
                requested,
                supported: names.join(", "),
            });
        };
        if *supported != protocol.version() {
            return Err(WireError::VersionMismatch {
                name: protocol.name().to_owned(),
                offered: protocol.version(),
                supported: *supported,
            });
        }
        let open_frame_len = (PREAMBLE_LEN + frame.header.len() + frame.payload.len()) as u64;
        Ok((protocol, handler.clone(), open_frame_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;
    use crate::mem::MemHub;
    use crate::transport::Listener;

    const WAIT: Duration = Duration::from_secs(20);

    fn echo() -> ProtocolId {
        ProtocolId::new("echo", 1).unwrap()
    }

    fn hold() -> ProtocolId {
        ProtocolId::new("hold", 1).unwrap()
    }

    /// A router serving `echo` (answers at once) and `hold` (keeps the stream until `release` is notified,
    /// then answers), with `inbound` limits.
    fn router(inbound: InboundLimits, release: Arc<tokio::sync::Notify>) -> Arc<Router> {
        let mut router = Router::with_config(StreamConfig {
            inbound,
            ..StreamConfig::default()
        });
        router.rpc(
            echo(),
            |_peer, text: String, payload| async move { Ok((text, payload)) },
        );
        router.rpc(hold(), move |_peer, text: String, payload| {
            let release = release.clone();
            async move {
                release.notified().await;
                Ok((text, payload))
            }
        });
        Arc::new(router)
    }

    /// Listens at `mem://name` on `hub` and serves every accepted connection with `router`.
    async fn server(hub: &MemHub, name: &str, router: Arc<Router>) -> (Keypair, tokio::task::JoinHandle<()>) {
        let keypair = Keypair::generate();
        let mut listener: Listener = hub
            .transport(&keypair)
            .listen(&format!("mem://{name}").parse().unwrap())
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let mut served = JoinSet::new();
            while let Ok(conn) = listener.accept().await {
                served.spawn(router.clone().serve(conn));
            }
        });
        (keypair, task)
    }

    async fn dial(hub: &MemHub, client: &Keypair, name: &str) -> Connection {
        hub.transport(client)
            .dial(&format!("mem://{name}").parse().unwrap())
            .await
            .unwrap()
    }

    async fn call_text(conn: &Connection, protocol: &ProtocolId, text: &str) -> Result<String, WireError> {
        call::<String, String>(
            conn,
            protocol,
            &text.to_owned(),
            Bytes::new(),
            WAIT,
            &StreamConfig::default(),
        )
        .await
        .map(|(reply, _)| reply)
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_peer_opening_streams_too_fast_is_told_and_counted() {
        let hub = MemHub::new();
        let limits = InboundLimits {
            streams_per_sec: 0.001,
            stream_burst: 3,
            ..InboundLimits::default()
        };
        let router = router(limits, Arc::default());
        let stats = router.stats();
        let (_server, task) = server(&hub, "rate", router).await;
        let (flooder, other) = (Keypair::generate(), Keypair::generate());
        let conn = dial(&hub, &flooder, "rate").await;
        for i in 0..3 {
            assert_eq!(
                call_text(&conn, &echo(), &format!("{i}")).await.unwrap(),
                format!("{i}")
            );
        }
        let refused = call_text(&conn, &echo(), "one more").await.unwrap_err();
        match &refused {
            WireError::Remote(message) => {
                assert!(message.starts_with("rate limited: "), "{message}");
                assert!(
                    message.contains("/colony/echo/1") || message.contains("echo"),
                    "{message}"
                );
            }
            other => panic!("expected a remote rate-limit error, got {other}"),
        }
        // A second connection of the same peer shares its budget; another peer has its own.
        let second = dial(&hub, &flooder, "rate").await;
        assert!(call_text(&second, &echo(), "again").await.is_err());
        let fresh = dial(&hub, &other, "rate").await;
        assert_eq!(call_text(&fresh, &echo(), "hi").await.unwrap(), "hi");
        assert_eq!(stats.streams_rate_limited.load(Ordering::Relaxed), 2);
        assert_eq!(stats.streams_served.load(Ordering::Relaxed), 4);
        task.abort();
    }

    #[tokio::test]
    async fn streams_in_progress_are_capped_per_peer_over_all_its_connections() {
        let hub = MemHub::new();
        let limits = InboundLimits {
            max_streams_per_peer: 3,
            ..InboundLimits::default()
        };
        let release = Arc::new(tokio::sync::Notify::new());
        let router = router(limits, release.clone());
        let stats = router.stats();
        let (_server, task) = server(&hub, "cap", router).await;
        let (flooder, other) = (Keypair::generate(), Keypair::generate());
        let (first, second) = (dial(&hub, &flooder, "cap").await, dial(&hub, &flooder, "cap").await);
        // Three held streams, over two connections, fill the peer's allowance.
        let mut held = JoinSet::new();
        for conn in [&first, &second, &first] {
            let conn = conn.clone();
            held.spawn(async move { call_text(&conn, &hold(), "held").await });
        }
        wait_until("three streams are in progress", || {
            stats.streams_served.load(Ordering::Relaxed) == 3
        })
        .await;
        let refused = call_text(&second, &echo(), "fourth").await.unwrap_err();
        match &refused {
            WireError::Remote(message) => assert!(message.contains("3 streams in progress"), "{message}"),
            other => panic!("expected a remote refusal, got {other}"),
        }
        assert_eq!(stats.streams_over_peer_limit.load(Ordering::Relaxed), 1);
        // Another peer is served meanwhile.
        let fresh = dial(&hub, &other, "cap").await;
        assert_eq!(call_text(&fresh, &echo(), "hi").await.unwrap(), "hi");
        // Once the held streams end, the peer is served again.
        while !held.is_empty() {
            release.notify_waiters();
            if let Ok(Some(result)) = tokio::time::timeout(Duration::from_millis(20), held.join_next()).await {
                assert_eq!(result.unwrap().unwrap(), "held");
            }
        }
        assert_eq!(call_text(&first, &echo(), "later").await.unwrap(), "later");
        task.abort();
    }

    #[tokio::test]
    async fn a_peer_beyond_its_connections_loses_its_oldest() {
        let hub = MemHub::new();
        let limits = InboundLimits {
            max_connections_per_peer: 2,
            ..InboundLimits::default()
        };
        let router = router(limits, Arc::default());
        let stats = router.stats();
        let (_server, task) = server(&hub, "conns", router.clone()).await;
        let (flooder, other) = (Keypair::generate(), Keypair::generate());
        let mut conns = Vec::new();
        for _ in 0..2 {
            conns.push(dial(&hub, &flooder, "conns").await);
        }
        let _other = dial(&hub, &other, "conns").await;
        wait_until("three connections are served", || {
            router.connections_of(&flooder.peer_id()) == 2 && router.connections_of(&other.peer_id()) == 1
        })
        .await;
        conns.push(dial(&hub, &flooder, "conns").await);
        let reason = tokio::time::timeout(WAIT, conns[0].closed())
            .await
            .expect("the oldest closes");
        assert!(reason.to_string().contains("too many connections"), "{reason}");
        assert_eq!(stats.connections_over_peer_limit.load(Ordering::Relaxed), 1);
        wait_until("the closed connection is no longer counted", || {
            router.connections_of(&flooder.peer_id()) == 2
        })
        .await;
        for conn in &conns[1..] {
            assert!(conn.close_reason().is_none());
            assert_eq!(call_text(conn, &echo(), "still").await.unwrap(), "still");
        }
        task.abort();
    }
}
