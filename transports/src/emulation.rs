//! Link emulation: wraps any [`Transport`] so that WAN behaviour and faults can be tested on one machine.
//!
//! A [`LinkEmulator`] is shared by every peer of a test. Each peer's transport is wrapped with
//! [`LinkEmulator::wrap`] (a [`crate::mem::MemHub`] made with an emulator does that itself). Emulation
//! applies to what a wrapped peer *sends*: per link (pair of peers) it adds latency, caps bandwidth (shared by
//! all streams and datagrams of that direction), drops datagrams with a probability, blocks traffic across
//! a partition until it heals, and kills peers: all their connections drop at once and new ones are refused
//! until the peer is revived.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::address::{Address, Scheme};
use crate::error::{CloseReason, StreamError, TransportError};
use crate::identity::PeerId;
use crate::transport::{
    Connection, ConnectionImpl, Listener, ListenerImpl, RecvStream, SendStream, SendStreamImpl, Transport,
};

/// Properties of one link (both directions).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// One-way delay added to everything sent.
    pub latency: Duration,
    /// Cap on bytes per second in each direction; `None` for no cap.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Probability in `[0, 1]` that a datagram is lost.
    pub datagram_loss: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            bandwidth_bytes_per_sec: None,
            datagram_loss: 0.0,
        }
    }
}

/// Pieces larger than this are split so that a bandwidth cap paces smoothly.
const PACING_PIECE_BYTES: usize = 64 * 1024;
/// Pieces queued per emulated stream before the writer waits.
const STREAM_QUEUE_PIECES: usize = 256;
/// Datagrams queued per emulated connection before new ones are dropped.
const DATAGRAM_QUEUE: usize = 1024;

/// What the emulator did to datagrams so far.
#[derive(Debug, Default)]
pub struct EmulatorStats {
    /// Datagrams handed on to the inner transport.
    pub datagrams_forwarded: AtomicU64,
    /// Datagrams dropped by the configured loss.
    pub datagrams_lost: AtomicU64,
    /// Datagrams dropped because of a partition, a killed peer or a full queue.
    pub datagrams_blocked: AtomicU64,
}

/// The shared control of emulated links. Cheap to clone.
#[derive(Clone)]
pub struct LinkEmulator {
    inner: Arc<EmulatorInner>,
}

struct EmulatorInner {
    state: Mutex<EmulatorState>,
    stats: EmulatorStats,
    /// Bumped on every partition, heal, kill or revive, to wake blocked forwarders.
    topology: watch::Sender<u64>,
}

struct EmulatorState {
    default_link: LinkConfig,
    links: HashMap<(PeerId, PeerId), LinkConfig>,
    partitions: Vec<(HashSet<PeerId>, HashSet<PeerId>)>,
    killed: HashSet<PeerId>,
    /// Per directed link: when its bandwidth is next free.
    next_free: HashMap<(PeerId, PeerId), Instant>,
    connections: Vec<Weak<EmulatedShared>>,
    rng: u64,
}

impl Default for LinkEmulator {
    fn default() -> Self {
        Self::with_seed(0x5eed_c010_4e11)
    }
}

impl LinkEmulator {
    /// An emulator with perfect links.
    pub fn new() -> Self {
        Self::default()
    }

    /// An emulator whose datagram losses follow the given seed.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            inner: Arc::new(EmulatorInner {
                state: Mutex::new(EmulatorState {
                    default_link: LinkConfig::default(),
                    links: HashMap::new(),
                    partitions: Vec::new(),
                    killed: HashSet::new(),
                    next_free: HashMap::new(),
                    connections: Vec::new(),
                    rng: seed | 1,
                }),
                topology: watch::channel(0).0,
                stats: EmulatorStats::default(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EmulatorState> {
        self.inner.state.lock().expect("link emulator lock poisoned")
    }

    fn bump_topology(&self) {
        self.inner.topology.send_modify(|generation| *generation += 1);
    }

    /// Counters of what happened to datagrams.
    pub fn stats(&self) -> &EmulatorStats {
        &self.inner.stats
    }

    /// Sets the link used between peers that have no link of their own.
    pub fn set_default_link(&self, link: LinkConfig) {
        self.state().default_link = link;
    }

    /// Sets the link between `a` and `b` (both directions).
    pub fn set_link(&self, a: PeerId, b: PeerId, link: LinkConfig) {
        self.state().links.insert(ordered(a, b), link);
    }

    /// Stops all traffic between the peers of `side_a` and those of `side_b` until [`LinkEmulator::heal`].
    /// Stream data waits; datagrams are dropped; new connections across are refused.
    pub fn partition(&self, side_a: &[PeerId], side_b: &[PeerId]) {
        self.state()
            .partitions
            .push((side_a.iter().copied().collect(), side_b.iter().copied().collect()));
        self.bump_topology();
    }

    /// Removes every partition; waiting stream data flows again.
    pub fn heal(&self) {
        self.state().partitions.clear();
        self.bump_topology();
    }

    /// Kills `peer`: every connection it has drops at once (both sides observe it) and new ones are refused
    /// until [`LinkEmulator::revive`].
    pub fn kill(&self, peer: PeerId) {
        let victims: Vec<Arc<EmulatedShared>> = {
            let mut state = self.state();
            state.killed.insert(peer);
            state.connections.retain(|weak| weak.strong_count() > 0);
            state
                .connections
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|conn| conn.local == peer || conn.remote == peer)
                .collect()
        };
        for conn in victims {
            conn.killed.store(true, Ordering::Release);
            conn.inner.close("peer killed by link emulation");
        }
        self.bump_topology();
    }

    /// Lets a killed peer connect again.
    pub fn revive(&self, peer: PeerId) {
        self.state().killed.remove(&peer);
        self.bump_topology();
    }

    /// Wraps `transport` so that its traffic follows this emulator.
    pub fn wrap(&self, transport: Arc<dyn Transport>) -> Arc<dyn Transport> {
        Arc::new(EmulatedTransport {
            inner: transport,
            emulator: self.clone(),
        })
    }

    /// Why traffic between `a` and `b` cannot flow now, if it cannot.
    fn blocked(&self, a: PeerId, b: PeerId) -> Option<&'static str> {
        let state = self.state();
        if state.killed.contains(&a) || state.killed.contains(&b) {
            return Some("peer killed by link emulation");
        }
        let across = |(x, y): &(HashSet<PeerId>, HashSet<PeerId>)| {
            (x.contains(&a) && y.contains(&b)) || (x.contains(&b) && y.contains(&a))
        };
        state
            .partitions
            .iter()
            .any(across)
            .then_some("partitioned by link emulation")
    }

    /// Waits until traffic may flow between `a` and `b`.
    async fn wait_unblocked(&self, a: PeerId, b: PeerId) {
        let mut topology = self.inner.topology.subscribe();
        while self.blocked(a, b).is_some() {
            if topology.changed().await.is_err() {
                return;
            }
        }
    }

    /// Books `len` bytes on the directed link `from → to`: returns when sending may start (bandwidth
    /// pacing) and when the data arrives.
    fn reserve(&self, from: PeerId, to: PeerId, len: usize) -> (Instant, Instant) {
        let mut state = self.state();
        let link = state
            .links
            .get(&ordered(from, to))
            .unwrap_or(&state.default_link)
            .clone();
        let now = Instant::now();
        match link.bandwidth_bytes_per_sec {
            Some(rate) if rate > 0 => {
                let free = state.next_free.entry((from, to)).or_insert(now);
                let start = (*free).max(now);
                let done = start + Duration::from_secs_f64(len as f64 / rate as f64);
                *free = done;
                (start, done + link.latency)
            }
            _ => (now, now + link.latency),
        }
    }

    /// Whether the next datagram on `from → to` is lost.
    fn datagram_lost(&self, from: PeerId, to: PeerId) -> bool {
        let mut state = self.state();
        let loss = state
            .links
            .get(&ordered(from, to))
            .unwrap_or(&state.default_link)
            .datagram_loss;
        if loss <= 0.0 {
            return false;
        }
        // xorshift64*: deterministic for a given seed and order of sends.
        let mut x = state.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.rng = x;
        let sample = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        sample < loss
    }

    fn register(&self, conn: &Arc<EmulatedShared>) {
        let mut state = self.state();
        state.connections.retain(|weak| weak.strong_count() > 0);
        state.connections.push(Arc::downgrade(conn));
    }
}

fn ordered(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    if a <= b { (a, b) } else { (b, a) }
}

struct EmulatedTransport {
    inner: Arc<dyn Transport>,
    emulator: LinkEmulator,
}

impl EmulatedTransport {
    fn unreachable(address: &Address, reason: &str) -> TransportError {
        TransportError::Unreachable {
            address: address.to_string(),
            reason: reason.to_owned(),
        }
    }
}

#[async_trait]
impl Transport for EmulatedTransport {
    fn scheme(&self) -> Scheme {
        self.inner.scheme()
    }

    fn local_peer(&self) -> PeerId {
        self.inner.local_peer()
    }

    async fn listen(&self, address: &Address) -> Result<Listener, TransportError> {
        let inner = self.inner.listen(address).await?;
        Ok(Listener::new(Box::new(EmulatedListener {
            inner,
            emulator: self.emulator.clone(),
            refused: 0,
        })))
    }

    async fn dial(&self, address: &Address) -> Result<Connection, TransportError> {
        let local = self.local_peer();
        if let Some(reason) = address.peer().and_then(|remote| self.emulator.blocked(local, remote)) {
            return Err(Self::unreachable(address, reason));
        }
        let conn = self.inner.dial(address).await?;
        if let Some(reason) = self.emulator.blocked(local, conn.remote_peer()) {
            conn.close(reason);
            return Err(Self::unreachable(address, reason));
        }
        // A connection costs at least one round trip.
        let (_, arrival) = self.emulator.reserve(local, conn.remote_peer(), 0);
        tokio::time::sleep_until(arrival + (arrival - Instant::now())).await;
        Ok(wrap_connection(conn, &self.emulator))
    }
}

struct EmulatedListener {
    inner: Listener,
    emulator: LinkEmulator,
    refused: u64,
}

#[async_trait]
impl ListenerImpl for EmulatedListener {
    fn local_address(&self) -> Address {
        self.inner.local_address()
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        loop {
            let conn = self.inner.accept().await?;
            match self.emulator.blocked(conn.local_peer(), conn.remote_peer()) {
                Some(reason) => {
                    self.refused += 1;
                    conn.close(reason);
                }
                None => return Ok(wrap_connection(conn, &self.emulator)),
            }
        }
    }

    fn refused_handshakes(&self) -> u64 {
        self.inner.refused_handshakes() + self.refused
    }
}

/// What the emulator needs to reach a wrapped connection.
struct EmulatedShared {
    inner: Connection,
    local: PeerId,
    remote: PeerId,
    killed: AtomicBool,
}

struct EmulatedConnection {
    shared: Arc<EmulatedShared>,
    emulator: LinkEmulator,
    datagrams: mpsc::Sender<(Instant, Bytes)>,
    datagram_task: JoinHandle<()>,
}

fn wrap_connection(inner: Connection, emulator: &LinkEmulator) -> Connection {
    let shared = Arc::new(EmulatedShared {
        local: inner.local_peer(),
        remote: inner.remote_peer(),
        inner,
        killed: AtomicBool::new(false),
    });
    emulator.register(&shared);
    let (datagrams, mut queue) = mpsc::channel::<(Instant, Bytes)>(DATAGRAM_QUEUE);
    let forward_to = shared.inner.clone();
    let forward_emulator = emulator.clone();
    let (local, remote) = (shared.local, shared.remote);
    let datagram_task = tokio::spawn(async move {
        while let Some((arrival, datagram)) = queue.recv().await {
            tokio::time::sleep_until(arrival).await;
            let stats = forward_emulator.stats();
            if forward_emulator.blocked(local, remote).is_some() {
                stats.datagrams_blocked.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if forward_to.send_datagram(datagram).is_err() {
                break;
            }
            stats.datagrams_forwarded.fetch_add(1, Ordering::Relaxed);
        }
    });
    Connection::new(Arc::new(EmulatedConnection {
        shared,
        emulator: emulator.clone(),
        datagrams,
        datagram_task,
    }))
}

impl Drop for EmulatedConnection {
    fn drop(&mut self) {
        self.datagram_task.abort();
    }
}

impl EmulatedConnection {
    fn wrap_pair(&self, (send, recv): (SendStream, RecvStream)) -> (SendStream, RecvStream) {
        let send = EmulatedSend::new(send, self.emulator.clone(), self.shared.local, self.shared.remote);
        (SendStream::new(Box::new(send)), recv)
    }

    fn killed_or(&self, error: StreamError) -> StreamError {
        if self.shared.killed.load(Ordering::Acquire) {
            StreamError::ConnectionClosed(CloseReason::Killed)
        } else {
            error
        }
    }
}

#[async_trait]
impl ConnectionImpl for EmulatedConnection {
    fn local_peer(&self) -> PeerId {
        self.shared.local
    }

    fn remote_peer(&self) -> PeerId {
        self.shared.remote
    }

    fn remote_address(&self) -> Address {
        self.shared.inner.remote_address()
    }

    async fn open_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let pair = self.shared.inner.open_stream().await.map_err(|e| self.killed_or(e))?;
        Ok(self.wrap_pair(pair))
    }

    async fn accept_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let pair = self.shared.inner.accept_stream().await.map_err(|e| self.killed_or(e))?;
        Ok(self.wrap_pair(pair))
    }

    fn send_datagram(&self, data: Bytes) -> Result<(), StreamError> {
        if let Some(limit) = self.shared.inner.max_datagram_size()
            && data.len() > limit
        {
            return Err(StreamError::DatagramTooLarge { len: data.len(), limit });
        }
        if let Some(reason) = self.close_reason() {
            return Err(StreamError::ConnectionClosed(reason));
        }
        let (local, remote) = (self.shared.local, self.shared.remote);
        let stats = self.emulator.stats();
        if self.emulator.blocked(local, remote).is_some() {
            stats.datagrams_blocked.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if self.emulator.datagram_lost(local, remote) {
            stats.datagrams_lost.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let (_, arrival) = self.emulator.reserve(local, remote, data.len());
        // A full queue drops the datagram, like a congested network.
        if self.datagrams.try_send((arrival, data)).is_err() {
            stats.datagrams_blocked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn recv_datagram(&self) -> Result<Bytes, StreamError> {
        self.shared.inner.recv_datagram().await.map_err(|e| self.killed_or(e))
    }

    fn max_datagram_size(&self) -> Option<usize> {
        self.shared.inner.max_datagram_size()
    }

    fn close(&self, reason: &str) {
        self.shared.inner.close(reason)
    }

    async fn closed(&self) -> CloseReason {
        let reason = self.shared.inner.closed().await;
        if self.shared.killed.load(Ordering::Acquire) {
            CloseReason::Killed
        } else {
            reason
        }
    }

    fn close_reason(&self) -> Option<CloseReason> {
        let reason = self.shared.inner.close_reason()?;
        Some(if self.shared.killed.load(Ordering::Acquire) {
            CloseReason::Killed
        } else {
            reason
        })
    }
}

enum Piece {
    Data { arrival: Instant, bytes: Bytes },
    Finish(oneshot::Sender<Result<(), StreamError>>),
}

/// The inner send half of an emulated stream: when the forwarder ends without finishing (the stream was
/// reset, or dropped), it resets the inner stream with the code the application gave.
struct ResetOnDrop {
    inner: SendStream,
    code: Arc<AtomicU32>,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        // A no-op after a successful finish.
        self.inner.reset(self.code.load(Ordering::Acquire));
    }
}

/// A send half whose data a forwarder task delivers after the link's latency, paced by its bandwidth.
struct EmulatedSend {
    queue: Option<mpsc::Sender<Piece>>,
    forwarder: Option<JoinHandle<()>>,
    reset_code: Arc<AtomicU32>,
    error: Arc<Mutex<Option<StreamError>>>,
    emulator: LinkEmulator,
    local: PeerId,
    remote: PeerId,
    finished: bool,
}

impl EmulatedSend {
    fn new(inner: SendStream, emulator: LinkEmulator, local: PeerId, remote: PeerId) -> Self {
        let (queue, mut pieces) = mpsc::channel::<Piece>(STREAM_QUEUE_PIECES);
        let error = Arc::new(Mutex::new(None));
        let task_error = error.clone();
        let task_emulator = emulator.clone();
        let reset_code = Arc::new(AtomicU32::new(0));
        let mut inner = ResetOnDrop {
            inner,
            code: reset_code.clone(),
        };
        let forwarder = tokio::spawn(async move {
            let inner = &mut inner.inner;
            while let Some(piece) = pieces.recv().await {
                match piece {
                    Piece::Data { arrival, bytes } => {
                        tokio::time::sleep_until(arrival).await;
                        task_emulator.wait_unblocked(local, remote).await;
                        if let Err(e) = inner.write_chunk(bytes).await {
                            *task_error.lock().expect("lock poisoned") = Some(e);
                            return;
                        }
                    }
                    Piece::Finish(done) => {
                        let _ = done.send(inner.finish().await);
                        return;
                    }
                }
            }
            // The queue closed without a finish: the stream is reset when `inner` drops here.
        });
        Self {
            queue: Some(queue),
            forwarder: Some(forwarder),
            reset_code,
            error,
            emulator,
            local,
            remote,
            finished: false,
        }
    }

    fn check(&self) -> Result<&mpsc::Sender<Piece>, StreamError> {
        if let Some(error) = self.error.lock().expect("lock poisoned").clone() {
            return Err(error);
        }
        self.queue
            .as_ref()
            .filter(|_| !self.finished)
            .ok_or(StreamError::ClosedLocally)
    }
}

#[async_trait]
impl SendStreamImpl for EmulatedSend {
    async fn write_chunk(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        let paced = {
            let state = self.emulator.state();
            state
                .links
                .get(&ordered(self.local, self.remote))
                .unwrap_or(&state.default_link)
                .bandwidth_bytes_per_sec
                .is_some()
        };
        while !data.is_empty() {
            let take = if paced {
                data.len().min(PACING_PIECE_BYTES)
            } else {
                data.len()
            };
            let bytes = data.split_to(take);
            let (start, arrival) = self.emulator.reserve(self.local, self.remote, bytes.len());
            tokio::time::sleep_until(start).await;
            let queue = self.check()?.clone();
            if queue.send(Piece::Data { arrival, bytes }).await.is_err() {
                return Err(self.check().err().unwrap_or(StreamError::ClosedLocally));
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        let queue = self.check()?.clone();
        self.finished = true;
        let (done, result) = oneshot::channel();
        let answer = match queue.send(Piece::Finish(done)).await {
            Ok(()) => result.await.ok(),
            Err(_) => None,
        };
        // No answer means the forwarder stopped on a write error, which it stored.
        answer.unwrap_or_else(|| {
            Err(self
                .error
                .lock()
                .expect("lock poisoned")
                .clone()
                .unwrap_or(StreamError::ClosedLocally))
        })
    }

    fn reset(&mut self, code: u32) {
        self.reset_code.store(code, Ordering::Release);
        self.finished = true;
        self.queue = None;
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.abort();
        }
    }
}

impl Drop for EmulatedSend {
    fn drop(&mut self) {
        if !self.finished {
            self.reset(0);
        }
    }
}
