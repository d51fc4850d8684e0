//! The in-process transport: a [`MemHub`] connects any number of peers in one process through channels, for
//! tests and for simulating hundreds of peers on one machine. Chunks move between peers without copies.
//!
//! Identity is taken from each peer's [`Keypair`] as registered with the hub: inside one process there is no
//! one to lie to, so no handshake runs. A hub made with [`MemHub::with_emulator`] wraps every transport it
//! hands out in link emulation (latency, bandwidth, loss, partitions, kills).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::address::{Address, Scheme};
use crate::emulation::LinkEmulator;
use crate::error::{CloseReason, StreamError, TransportError};
use crate::identity::{Keypair, PeerId};
use crate::transport::{
    Connection, ConnectionImpl, Listener, ListenerImpl, RecvStream, RecvStreamImpl, SendStream, SendStreamImpl,
    Transport,
};

/// Limits of in-process connections.
#[derive(Debug, Clone)]
pub struct MemConfig {
    /// Chunks buffered per stream direction before the writer waits.
    pub stream_buffer_chunks: usize,
    /// Streams opened by the remote and not yet accepted before new ones are refused.
    pub max_pending_streams: usize,
    /// Connections waiting in a listener's backlog before dials are refused.
    pub accept_backlog: usize,
    /// Datagrams queued before new ones are dropped.
    pub datagram_queue: usize,
    /// Largest datagram.
    pub max_datagram_size: usize,
}

impl Default for MemConfig {
    fn default() -> Self {
        Self {
            stream_buffer_chunks: 64,
            max_pending_streams: 4096,
            accept_backlog: 1024,
            datagram_queue: 1024,
            max_datagram_size: 64 * 1024,
        }
    }
}

/// An in-process network. Clone it to share it; every [`MemTransport`] made from it can reach the others.
#[derive(Clone, Default)]
pub struct MemHub {
    inner: Arc<HubInner>,
}

#[derive(Default)]
struct HubInner {
    listeners: Mutex<HashMap<String, (PeerId, mpsc::Sender<Connection>)>>,
    config: MemConfig,
    emulator: Option<LinkEmulator>,
}

impl MemHub {
    /// A hub with default limits and no link emulation.
    pub fn new() -> Self {
        Self::default()
    }

    /// A hub with the given limits.
    pub fn with_config(config: MemConfig) -> Self {
        Self {
            inner: Arc::new(HubInner {
                config,
                ..Default::default()
            }),
        }
    }

    /// A hub whose transports all go through `emulator`.
    pub fn with_emulator(emulator: LinkEmulator) -> Self {
        Self {
            inner: Arc::new(HubInner {
                emulator: Some(emulator),
                ..Default::default()
            }),
        }
    }

    /// The link emulator of this hub, if it has one.
    pub fn emulator(&self) -> Option<&LinkEmulator> {
        self.inner.emulator.as_ref()
    }

    /// A transport for the peer `keypair` on this hub (wrapped in the hub's link emulation, if any).
    pub fn transport(&self, keypair: &Keypair) -> Arc<dyn Transport> {
        let transport: Arc<dyn Transport> = Arc::new(MemTransport {
            hub: self.inner.clone(),
            peer: keypair.peer_id(),
        });
        match &self.inner.emulator {
            Some(emulator) => emulator.wrap(transport),
            None => transport,
        }
    }
}

/// A peer's view of a [`MemHub`]. Made by [`MemHub::transport`].
pub struct MemTransport {
    hub: Arc<HubInner>,
    peer: PeerId,
}

#[async_trait]
impl Transport for MemTransport {
    fn scheme(&self) -> Scheme {
        Scheme::Mem
    }

    fn local_peer(&self) -> PeerId {
        self.peer
    }

    async fn listen(&self, address: &Address) -> Result<Listener, TransportError> {
        check_scheme(address)?;
        let name = address.location().to_owned();
        let (tx, rx) = mpsc::channel(self.hub.config.accept_backlog.max(1));
        {
            let mut listeners = self.hub.listeners.lock().expect("hub lock poisoned");
            if listeners.contains_key(&name) {
                return Err(TransportError::AddressInUse {
                    address: address.to_string(),
                });
            }
            listeners.insert(name.clone(), (self.peer, tx));
        }
        let local = Address::new(Scheme::Mem, name.clone(), Some(self.peer))?;
        Ok(Listener::new(Box::new(MemListener {
            hub: self.hub.clone(),
            name,
            local,
            rx,
        })))
    }

    async fn dial(&self, address: &Address) -> Result<Connection, TransportError> {
        check_scheme(address)?;
        let (listener_peer, backlog) = self
            .hub
            .listeners
            .lock()
            .expect("hub lock poisoned")
            .get(address.location())
            .cloned()
            .ok_or_else(|| TransportError::NoListener {
                address: address.to_string(),
            })?;
        if let Some(expected) = address.peer()
            && expected != listener_peer
        {
            return Err(TransportError::UnexpectedPeer {
                address: address.to_string(),
                expected,
                actual: listener_peer,
            });
        }
        let listener_address = Address::new(Scheme::Mem, address.location(), Some(listener_peer))?;
        let dialer_address = Address::new(Scheme::Mem, format!("dialer-{}", self.peer.short()), Some(self.peer))?;
        let (dialer_end, listener_end) = MemEnd::pair(
            &self.hub.config,
            (self.peer, listener_address),
            (listener_peer, dialer_address),
        );
        backlog.try_send(Connection::new(listener_end)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransportError::Io {
                context: format!("dialing {address}"),
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "listener backlog is full"),
            },
            mpsc::error::TrySendError::Closed(_) => TransportError::NoListener {
                address: address.to_string(),
            },
        })?;
        Ok(Connection::new(dialer_end))
    }
}

fn check_scheme(address: &Address) -> Result<(), TransportError> {
    if address.scheme() == Scheme::Mem {
        Ok(())
    } else {
        Err(TransportError::WrongScheme {
            transport: "mem",
            address: address.to_string(),
        })
    }
}

struct MemListener {
    hub: Arc<HubInner>,
    name: String,
    local: Address,
    rx: mpsc::Receiver<Connection>,
}

#[async_trait]
impl ListenerImpl for MemListener {
    fn local_address(&self) -> Address {
        self.local.clone()
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        self.rx.recv().await.ok_or(TransportError::ListenerClosed)
    }

    fn refused_handshakes(&self) -> u64 {
        0
    }
}

impl Drop for MemListener {
    fn drop(&mut self) {
        // A name is registered by one listener at a time, so the entry is this listener's.
        self.hub.listeners.lock().expect("hub lock poisoned").remove(&self.name);
    }
}

/// State shared by both ends of one in-process connection.
struct MemLink {
    /// `(side that closed, reason)` once closed.
    closed: watch::Sender<Option<(usize, String)>>,
}

impl MemLink {
    fn close(&self, side: usize, reason: &str) {
        self.closed.send_if_modified(|state| {
            if state.is_none() {
                *state = Some((side, reason.to_owned()));
                true
            } else {
                false
            }
        });
    }

    fn reason_for(&self, side: usize) -> Option<CloseReason> {
        self.closed.borrow().as_ref().map(|(closer, reason)| {
            if *closer == side {
                CloseReason::Local(reason.clone())
            } else {
                CloseReason::Remote(reason.clone())
            }
        })
    }

    async fn wait_closed(&self, side: usize) -> CloseReason {
        let mut rx = self.closed.subscribe();
        // The sender lives as long as `self`, so `wait_for` only returns once the state is set.
        let _ = rx.wait_for(Option::is_some).await;
        self.reason_for(side)
            .unwrap_or_else(|| CloseReason::Lost("connection state dropped".into()))
    }
}

/// Closes the link when the last handle of one side (connection or stream) is dropped.
struct EndGuard {
    link: Arc<MemLink>,
    side: usize,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.link.close(self.side, "connection dropped");
    }
}

type StreamPair = (SendStream, RecvStream);

struct MemEnd {
    link: Arc<MemLink>,
    side: usize,
    local: PeerId,
    remote: PeerId,
    remote_address: Address,
    guard: Arc<EndGuard>,
    other_guard: Weak<EndGuard>,
    to_other_streams: mpsc::Sender<StreamPair>,
    incoming_streams: tokio::sync::Mutex<mpsc::Receiver<StreamPair>>,
    to_other_datagrams: mpsc::Sender<Bytes>,
    incoming_datagrams: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    config: MemConfig,
}

impl MemEnd {
    /// Builds both ends: `a` is `(local peer, address of the other side as seen from a)`, likewise `b`.
    fn pair(config: &MemConfig, a: (PeerId, Address), b: (PeerId, Address)) -> (Arc<MemEnd>, Arc<MemEnd>) {
        let link = Arc::new(MemLink {
            closed: watch::channel(None).0,
        });
        let guards = [0, 1].map(|side| {
            Arc::new(EndGuard {
                link: link.clone(),
                side,
            })
        });
        // Each side reads its own inboxes; the other side holds the senders.
        let (stream_senders, stream_inboxes): (Vec<_>, Vec<_>) =
            (0..2).map(|_| mpsc::channel(config.max_pending_streams.max(1))).unzip();
        let (datagram_senders, datagram_inboxes): (Vec<_>, Vec<_>) =
            (0..2).map(|_| mpsc::channel(config.datagram_queue.max(1))).unzip();
        let peers = [a, b];
        let mut ends =
            stream_inboxes
                .into_iter()
                .zip(datagram_inboxes)
                .enumerate()
                .map(|(side, (streams, datagrams))| {
                    let other = 1 - side;
                    Arc::new(MemEnd {
                        link: link.clone(),
                        side,
                        local: peers[side].0,
                        remote: peers[other].0,
                        remote_address: peers[side].1.clone(),
                        guard: guards[side].clone(),
                        other_guard: Arc::downgrade(&guards[other]),
                        to_other_streams: stream_senders[other].clone(),
                        incoming_streams: tokio::sync::Mutex::new(streams),
                        to_other_datagrams: datagram_senders[other].clone(),
                        incoming_datagrams: tokio::sync::Mutex::new(datagrams),
                        config: config.clone(),
                    })
                });
        (ends.next().expect("two ends"), ends.next().expect("two ends"))
    }

    fn check_open(&self) -> Result<(), StreamError> {
        match self.link.reason_for(self.side) {
            Some(reason) => Err(StreamError::ConnectionClosed(reason)),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ConnectionImpl for MemEnd {
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
        self.check_open()?;
        let other_guard = self.other_guard.upgrade().ok_or_else(|| {
            StreamError::ConnectionClosed(
                self.link
                    .reason_for(self.side)
                    .unwrap_or(CloseReason::Remote("gone".into())),
            )
        })?;
        let capacity = self.config.stream_buffer_chunks.max(1);
        let (to_remote, at_remote) = mpsc::channel(capacity);
        let (to_local, at_local) = mpsc::channel(capacity);
        let forward = Arc::new(StopFlag::default());
        let backward = Arc::new(StopFlag::default());
        let local_pair = half_pair(
            &self.link,
            self.side,
            &self.guard,
            to_remote,
            forward.clone(),
            at_local,
            backward.clone(),
        );
        let remote_pair = half_pair(
            &self.link,
            1 - self.side,
            &other_guard,
            to_local,
            backward,
            at_remote,
            forward,
        );
        self.to_other_streams.try_send(remote_pair).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StreamError::Refused(format!(
                "{} streams wait to be accepted",
                self.config.max_pending_streams
            )),
            mpsc::error::TrySendError::Closed(_) => StreamError::ConnectionClosed(
                self.link
                    .reason_for(self.side)
                    .unwrap_or(CloseReason::Remote("gone".into())),
            ),
        })?;
        Ok(local_pair)
    }

    async fn accept_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        self.check_open()?;
        let mut incoming = self.incoming_streams.lock().await;
        tokio::select! {
            pair = incoming.recv() => pair.ok_or_else(|| StreamError::ConnectionClosed(
                self.link.reason_for(self.side).unwrap_or(CloseReason::Remote("gone".into())))),
            reason = self.link.wait_closed(self.side) => Err(StreamError::ConnectionClosed(reason)),
        }
    }

    fn send_datagram(&self, data: Bytes) -> Result<(), StreamError> {
        self.check_open()?;
        if data.len() > self.config.max_datagram_size {
            return Err(StreamError::DatagramTooLarge {
                len: data.len(),
                limit: self.config.max_datagram_size,
            });
        }
        // Best effort: a full queue drops the datagram, as a congested network would.
        let _ = self.to_other_datagrams.try_send(data);
        Ok(())
    }

    async fn recv_datagram(&self) -> Result<Bytes, StreamError> {
        self.check_open()?;
        let mut incoming = self.incoming_datagrams.lock().await;
        tokio::select! {
            datagram = incoming.recv() => datagram.ok_or_else(|| StreamError::ConnectionClosed(
                self.link.reason_for(self.side).unwrap_or(CloseReason::Remote("gone".into())))),
            reason = self.link.wait_closed(self.side) => Err(StreamError::ConnectionClosed(reason)),
        }
    }

    fn max_datagram_size(&self) -> Option<usize> {
        Some(self.config.max_datagram_size)
    }

    fn close(&self, reason: &str) {
        self.link.close(self.side, reason);
    }

    async fn closed(&self) -> CloseReason {
        self.link.wait_closed(self.side).await
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.link.reason_for(self.side)
    }
}

enum Piece {
    Data(Bytes),
    Fin,
    Reset(u32),
}

/// Set by a reader that stops reading; the writer then fails with [`StreamError::Stopped`].
#[derive(Default)]
struct StopFlag(AtomicU32);

impl StopFlag {
    const NOT_STOPPED: u32 = 0;

    fn stop(&self, code: u32) {
        // Codes are stored plus one so that zero means "not stopped".
        self.0.store(code.saturating_add(1), Ordering::Release);
    }

    fn stopped(&self) -> Option<u32> {
        match self.0.load(Ordering::Acquire) {
            Self::NOT_STOPPED => None,
            code => Some(code - 1),
        }
    }
}

fn half_pair(
    link: &Arc<MemLink>,
    side: usize,
    guard: &Arc<EndGuard>,
    tx: mpsc::Sender<Piece>,
    tx_flag: Arc<StopFlag>,
    rx: mpsc::Receiver<Piece>,
    rx_flag: Arc<StopFlag>,
) -> StreamPair {
    let send = MemSend {
        tx,
        stop: tx_flag,
        link: link.clone(),
        side,
        done: false,
        _guard: guard.clone(),
    };
    let recv = MemRecv {
        rx,
        stop: rx_flag,
        link: link.clone(),
        side,
        done: false,
        _guard: guard.clone(),
    };
    (SendStream::new(Box::new(send)), RecvStream::new(Box::new(recv)))
}

struct MemSend {
    tx: mpsc::Sender<Piece>,
    stop: Arc<StopFlag>,
    link: Arc<MemLink>,
    side: usize,
    done: bool,
    _guard: Arc<EndGuard>,
}

impl MemSend {
    async fn send(&mut self, piece: Piece) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::ClosedLocally);
        }
        if let Some(reason) = self.link.reason_for(self.side) {
            return Err(StreamError::ConnectionClosed(reason));
        }
        if let Some(code) = self.stop.stopped() {
            return Err(StreamError::Stopped(code));
        }
        tokio::select! {
            sent = self.tx.send(piece) => sent.map_err(|_| StreamError::Stopped(self.stop.stopped().unwrap_or(0))),
            reason = self.link.wait_closed(self.side) => Err(StreamError::ConnectionClosed(reason)),
        }
    }
}

#[async_trait]
impl SendStreamImpl for MemSend {
    async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError> {
        self.send(Piece::Data(data)).await
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        // A reader that stopped has taken what it wanted; finishing towards it is not an error.
        if !self.done && self.stop.stopped().is_some() {
            self.done = true;
            return Ok(());
        }
        let result = match self.send(Piece::Fin).await {
            Err(StreamError::Stopped(_)) => Ok(()),
            other => other,
        };
        self.done = true;
        result
    }

    fn reset(&mut self, code: u32) {
        if !self.done {
            self.done = true;
            // If the queue is full the reader sees the channel close instead, which it also reads as a reset.
            let _ = self.tx.try_send(Piece::Reset(code));
        }
    }
}

impl Drop for MemSend {
    fn drop(&mut self) {
        self.reset(0);
    }
}

struct MemRecv {
    rx: mpsc::Receiver<Piece>,
    stop: Arc<StopFlag>,
    link: Arc<MemLink>,
    side: usize,
    done: bool,
    _guard: Arc<EndGuard>,
}

#[async_trait]
impl RecvStreamImpl for MemRecv {
    async fn read_chunk(&mut self, _max_len: usize) -> Result<Option<Bytes>, StreamError> {
        if self.done {
            return Ok(None);
        }
        if let Some(reason) = self.link.reason_for(self.side) {
            return Err(StreamError::ConnectionClosed(reason));
        }
        let piece = tokio::select! {
            piece = self.rx.recv() => piece,
            reason = self.link.wait_closed(self.side) => return Err(StreamError::ConnectionClosed(reason)),
        };
        match piece {
            Some(Piece::Data(data)) => Ok(Some(data)),
            Some(Piece::Fin) => {
                self.done = true;
                Ok(None)
            }
            Some(Piece::Reset(code)) => Err(StreamError::Reset(code)),
            None => match self.link.reason_for(self.side) {
                Some(reason) => Err(StreamError::ConnectionClosed(reason)),
                None => Err(StreamError::Reset(0)),
            },
        }
    }

    fn stop(&mut self, code: u32) {
        self.stop.stop(code);
        self.rx.close();
    }
}
