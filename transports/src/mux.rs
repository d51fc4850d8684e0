//! Stream multiplexing over one ordered byte stream (TCP, or TLS over TCP).
//!
//! Many bidirectional streams share one socket without a small control message waiting behind a bulk
//! transfer: data travels in frames of at most [`MAX_DATA_FRAME`] bytes, and credit-based flow control per
//! stream and per connection keeps one slow reader from stalling the others (the reader task never blocks
//! on a stream; it can only receive what it granted).
//!
//! Frame header, 12 bytes little-endian: `stream id: u32`, `type: u8`, `flags: u8 (0)`, `reserved: u16 (0)`,
//! `length: u32`. Types: DATA (payload follows), WINDOW (credit increment in `length`; stream 0 = the
//! connection), OPEN, FIN, RESET (code in `length`), STOP (code in `length`), DATAGRAM (payload follows),
//! PING, GOAWAY (reason text follows). Dialers use odd stream ids, listeners even ones. Any violation —
//! oversized frame, data beyond credit, unknown type — closes the connection with a reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Buf;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use crate::address::Address;
use crate::error::{CloseReason, StreamError};
use crate::identity::PeerId;
use crate::transport::{ConnectionImpl, RecvStream, RecvStreamImpl, SendStream, SendStreamImpl};

/// Largest DATA frame; larger writes are split.
pub const MAX_DATA_FRAME: usize = 1 << 20;
/// Credit every new stream starts with in each direction, before any WINDOW frame.
pub const INITIAL_STREAM_WINDOW: u64 = 256 * 1024;
/// Credit a new connection starts with in each direction.
pub const INITIAL_CONNECTION_WINDOW: u64 = 16 * 1024 * 1024;
/// Longest GOAWAY reason.
const MAX_GOAWAY_REASON: usize = 1024;
/// RESET/STOP code sent when a stream is refused for exceeding the stream limit.
pub const REFUSED_CODE: u32 = u32::MAX;

const HEADER_LEN: usize = 12;
const DATA: u8 = 0;
const WINDOW: u8 = 1;
const OPEN: u8 = 2;
const FIN: u8 = 3;
const RESET: u8 = 4;
const STOP: u8 = 5;
const DATAGRAM: u8 = 6;
const PING: u8 = 7;
const GOAWAY: u8 = 8;

/// Settings of a multiplexed connection.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Credit granted to the remote per stream (bytes it may send ahead of our reading).
    pub stream_receive_window: u64,
    /// Credit granted to the remote for the whole connection.
    pub connection_receive_window: u64,
    /// Streams the remote may have open at once; more are refused (RESET and STOP with [`REFUSED_CODE`])
    /// and counted in `colony_streams_refused_total{reason="connection_limit"}`.
    pub max_incoming_streams: usize,
    /// Largest datagram carried.
    pub max_datagram_size: usize,
    /// Datagrams queued for the application before new ones are dropped.
    pub datagram_queue: usize,
    /// A PING is sent after this long without sending anything.
    pub keep_alive_interval: Duration,
    /// The connection closes after this long without receiving anything.
    pub idle_timeout: Duration,
}

fn header(stream: u32, kind: u8, len: u32) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&stream.to_le_bytes());
    out[4] = kind;
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out
}

enum Out {
    Frame([u8; HEADER_LEN], Bytes),
    Shutdown,
}

enum Incoming {
    Data(Bytes),
    Fin,
    Reset(u32),
}

struct SendSide {
    credit: u64,
    stopped: Option<u32>,
}

struct RecvSide {
    /// Credit the remote still has on this stream.
    window: u64,
    /// Bytes read by the application and not yet given back as credit.
    unreported: u64,
    closed: bool,
}

struct StreamState {
    id: u32,
    remote_opened: bool,
    send: Mutex<SendSide>,
    recv: Mutex<RecvSide>,
    recv_tx: mpsc::UnboundedSender<Incoming>,
    send_closed: AtomicBool,
}

struct ConnFlow {
    send_credit: u64,
    recv_window: u64,
    recv_unreported: u64,
}

struct Shared {
    config: MuxConfig,
    streams: Mutex<HashMap<u32, Arc<StreamState>>>,
    flow: Mutex<ConnFlow>,
    credit: Notify,
    out: mpsc::UnboundedSender<Out>,
    close: watch::Sender<Option<CloseReason>>,
    next_stream_id: AtomicU32,
    incoming_open: AtomicUsize,
    guard: Mutex<Weak<CloseGuard>>,
    accept_tx: mpsc::Sender<(SendStream, RecvStream)>,
    datagram_tx: mpsc::Sender<Bytes>,
}

impl Shared {
    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<StreamState>>> {
        self.streams.lock().expect("mux stream table poisoned")
    }

    fn lock_flow(&self) -> std::sync::MutexGuard<'_, ConnFlow> {
        self.flow.lock().expect("mux flow state poisoned")
    }

    fn send_frame(&self, stream: u32, kind: u8, len: u32, payload: Bytes) {
        // The writer may be gone after a close; then there is nothing left to tell the remote.
        let _ = self.out.send(Out::Frame(header(stream, kind, len), payload));
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.close.borrow().clone()
    }

    async fn wait_closed(&self) -> CloseReason {
        let mut rx = self.close.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().expect("wait_for returns only once a reason is set"),
            Err(_) => CloseReason::Lost("connection state dropped".into()),
        }
    }

    /// Closes the connection once; later calls do nothing. A local close tells the remote why.
    fn close(&self, reason: CloseReason) {
        let first = self.close.send_if_modified(|state| {
            if state.is_none() {
                *state = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if !first {
            return;
        }
        if let CloseReason::Local(text) = &reason {
            let text: String = text.chars().take(MAX_GOAWAY_REASON / 4).collect();
            let payload = Bytes::from(text.into_bytes());
            self.send_frame(0, GOAWAY, payload.len() as u32, payload);
        }
        let _ = self.out.send(Out::Shutdown);
        // Dropping the stream states closes every stream's queue; readers then see the close reason.
        self.lock_streams().clear();
        self.credit.notify_waiters();
    }

    fn maybe_remove(&self, state: &StreamState) {
        let recv_closed = state.recv.lock().expect("stream lock poisoned").closed;
        if recv_closed && state.send_closed.load(Ordering::Acquire) {
            let removed = self.lock_streams().remove(&state.id);
            if removed.is_some() && state.remote_opened {
                self.incoming_open.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Gives back connection credit for `len` bytes that were received and consumed or discarded.
    fn return_connection_credit(&self, len: u64) {
        let mut flow = self.lock_flow();
        flow.recv_unreported += len;
        if flow.recv_unreported >= self.config.connection_receive_window / 4 {
            let grant = flow.recv_unreported;
            flow.recv_unreported = 0;
            flow.recv_window += grant;
            drop(flow);
            self.send_frame(0, WINDOW, grant_u32(grant), Bytes::new());
        }
    }

    fn new_stream(&self, id: u32, remote_opened: bool) -> (Arc<StreamState>, mpsc::UnboundedReceiver<Incoming>) {
        let (recv_tx, recv_rx) = mpsc::unbounded_channel();
        let state = Arc::new(StreamState {
            id,
            remote_opened,
            send: Mutex::new(SendSide {
                credit: INITIAL_STREAM_WINDOW,
                stopped: None,
            }),
            recv: Mutex::new(RecvSide {
                window: self.config.stream_receive_window,
                unreported: 0,
                closed: false,
            }),
            recv_tx,
            send_closed: AtomicBool::new(false),
        });
        (state, recv_rx)
    }

    fn halves(
        self: &Arc<Self>,
        state: Arc<StreamState>,
        rx: mpsc::UnboundedReceiver<Incoming>,
        guard: Arc<CloseGuard>,
    ) -> (SendStream, RecvStream) {
        let send = MuxSend {
            shared: self.clone(),
            state: state.clone(),
            done: false,
            _guard: guard.clone(),
        };
        let recv = MuxRecv {
            shared: self.clone(),
            state,
            rx,
            done: false,
            _guard: guard,
        };
        (SendStream::new(Box::new(send)), RecvStream::new(Box::new(recv)))
    }

    /// Grants the configured stream window beyond the initial one.
    fn grant_initial_stream_credit(&self, id: u32) {
        if self.config.stream_receive_window > INITIAL_STREAM_WINDOW {
            let extra = self.config.stream_receive_window - INITIAL_STREAM_WINDOW;
            self.send_frame(id, WINDOW, grant_u32(extra), Bytes::new());
        }
    }
}

fn grant_u32(grant: u64) -> u32 {
    u32::try_from(grant).unwrap_or(u32::MAX)
}

/// Closes the connection when the last application handle (connection or stream) is dropped.
struct CloseGuard {
    shared: Arc<Shared>,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.shared.close(CloseReason::Local("connection dropped".into()));
    }
}

/// A multiplexed connection over a byte stream, already authenticated by the caller.
pub struct MuxConnection {
    shared: Arc<Shared>,
    guard: Arc<CloseGuard>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<(SendStream, RecvStream)>>,
    datagram_rx: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    local: PeerId,
    remote: PeerId,
    remote_address: Address,
}

impl MuxConnection {
    /// Starts multiplexing over `reader`/`writer`. `dialer` picks the stream id parity.
    pub fn start<R, W>(
        reader: R,
        writer: W,
        dialer: bool,
        config: MuxConfig,
        local: PeerId,
        remote: PeerId,
        remote_address: Address,
    ) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (accept_tx, accept_rx) = mpsc::channel(config.max_incoming_streams.max(1));
        let (datagram_tx, datagram_rx) = mpsc::channel(config.datagram_queue.max(1));
        let shared = Arc::new(Shared {
            flow: Mutex::new(ConnFlow {
                send_credit: INITIAL_CONNECTION_WINDOW,
                recv_window: config.connection_receive_window,
                recv_unreported: 0,
            }),
            config,
            streams: Mutex::new(HashMap::new()),
            credit: Notify::new(),
            out,
            close: watch::channel(None).0,
            next_stream_id: AtomicU32::new(if dialer { 1 } else { 2 }),
            incoming_open: AtomicUsize::new(0),
            guard: Mutex::new(Weak::new()),
            accept_tx,
            datagram_tx,
        });
        let guard = Arc::new(CloseGuard { shared: shared.clone() });
        *shared.guard.lock().expect("guard slot poisoned") = Arc::downgrade(&guard);
        if shared.config.connection_receive_window > INITIAL_CONNECTION_WINDOW {
            let extra = shared.config.connection_receive_window - INITIAL_CONNECTION_WINDOW;
            shared.send_frame(0, WINDOW, grant_u32(extra), Bytes::new());
        }
        // Both tasks end when the connection closes (the writer after a short grace period to flush GOAWAY).
        tokio::spawn(run_writer(shared.clone(), out_rx, writer));
        tokio::spawn(run_reader(shared.clone(), reader, !dialer));
        Self {
            shared,
            guard,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            datagram_rx: tokio::sync::Mutex::new(datagram_rx),
            local,
            remote,
            remote_address,
        }
    }

    fn closed_error(&self) -> StreamError {
        StreamError::ConnectionClosed(
            self.shared
                .close_reason()
                .unwrap_or(CloseReason::Lost("unknown".into())),
        )
    }
}

#[async_trait]
impl ConnectionImpl for MuxConnection {
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
        if self.shared.close_reason().is_some() {
            return Err(self.closed_error());
        }
        let (id, state, rx) = {
            // The id is taken and the OPEN frame queued under the table lock, so that concurrent opens put
            // their OPEN frames on the wire in id order (the remote refuses an id lower than one it saw).
            let mut streams = self.shared.lock_streams();
            let id = self.shared.next_stream_id.fetch_add(2, Ordering::Relaxed);
            if id >= u32::MAX - 2 {
                return Err(StreamError::Refused("stream ids of this connection are used up".into()));
            }
            let (state, rx) = self.shared.new_stream(id, false);
            streams.insert(id, state.clone());
            self.shared.send_frame(id, OPEN, 0, Bytes::new());
            (id, state, rx)
        };
        self.shared.grant_initial_stream_credit(id);
        Ok(self.shared.halves(state, rx, self.guard.clone()))
    }

    async fn accept_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        let mut incoming = self.accept_rx.lock().await;
        tokio::select! {
            biased;
            pair = incoming.recv() => pair.ok_or_else(|| self.closed_error()),
            reason = self.shared.wait_closed() => Err(StreamError::ConnectionClosed(reason)),
        }
    }

    fn send_datagram(&self, data: Bytes) -> Result<(), StreamError> {
        if self.shared.close_reason().is_some() {
            return Err(self.closed_error());
        }
        if data.len() > self.shared.config.max_datagram_size {
            return Err(StreamError::DatagramTooLarge {
                len: data.len(),
                limit: self.shared.config.max_datagram_size,
            });
        }
        self.shared.send_frame(0, DATAGRAM, data.len() as u32, data);
        Ok(())
    }

    async fn recv_datagram(&self) -> Result<Bytes, StreamError> {
        let mut incoming = self.datagram_rx.lock().await;
        tokio::select! {
            biased;
            datagram = incoming.recv() => datagram.ok_or_else(|| self.closed_error()),
            reason = self.shared.wait_closed() => Err(StreamError::ConnectionClosed(reason)),
        }
    }

    fn max_datagram_size(&self) -> Option<usize> {
        Some(self.shared.config.max_datagram_size)
    }

    fn close(&self, reason: &str) {
        self.shared.close(CloseReason::Local(reason.to_owned()));
    }

    async fn closed(&self) -> CloseReason {
        self.shared.wait_closed().await
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.shared.close_reason()
    }
}

/// How long the writer may keep flushing after the connection closed (to deliver GOAWAY) before it gives up.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

async fn run_writer<W: AsyncWrite + Unpin>(shared: Arc<Shared>, out: mpsc::UnboundedReceiver<Out>, writer: W) {
    let grace = async {
        let reason = shared.wait_closed().await;
        tokio::time::sleep(CLOSE_GRACE).await;
        reason
    };
    tokio::select! {
        () = write_loop(&shared, out, writer) => {}
        _ = grace => {}
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: &Arc<Shared>, mut out: mpsc::UnboundedReceiver<Out>, mut writer: W) {
    // Small frames gather in `pending` and go out in one write; a large payload goes out with the pending
    // bytes in one vectored write, straight from the application's buffer.
    let mut pending = BytesMut::with_capacity(64 * 1024);
    let keep_alive = shared.config.keep_alive_interval;
    let result: std::io::Result<()> = async {
        loop {
            let first = match tokio::time::timeout(keep_alive, out.recv()).await {
                Ok(Some(item)) => item,
                Ok(None) => return Ok(()),
                Err(_) => Out::Frame(header(0, PING, 0), Bytes::new()),
            };
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Out::Frame(head, payload) => {
                        pending.extend_from_slice(&head);
                        if payload.len() <= SMALL_PAYLOAD {
                            pending.extend_from_slice(&payload);
                        } else {
                            write_all_vectored(&mut writer, &pending, &payload).await?;
                            pending.clear();
                        }
                    }
                    Out::Shutdown => {
                        writer.write_all(&pending).await?;
                        writer.flush().await?;
                        return writer.shutdown().await;
                    }
                }
                if pending.len() >= 64 * 1024 {
                    writer.write_all(&pending).await?;
                    pending.clear();
                }
                next = out.try_recv().ok();
            }
            if !pending.is_empty() {
                writer.write_all(&pending).await?;
                pending.clear();
            }
            writer.flush().await?;
        }
    }
    .await;
    if let Err(error) = result {
        shared.close(CloseReason::Lost(format!("write failed: {error}")));
    }
}

/// Payloads up to this size are copied into the pending buffer; larger ones are written from where they are.
const SMALL_PAYLOAD: usize = 16 * 1024;

/// Writes `first` then `second` completely, with vectored writes where the writer supports them.
async fn write_all_vectored<W: AsyncWrite + Unpin>(writer: &mut W, first: &[u8], second: &[u8]) -> std::io::Result<()> {
    let (mut first, mut second) = (first, second);
    while !first.is_empty() || !second.is_empty() {
        let slices = [std::io::IoSlice::new(first), std::io::IoSlice::new(second)];
        let written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_first = written.min(first.len());
        first = &first[from_first..];
        second = &second[written - from_first..];
    }
    Ok(())
}

async fn run_reader<R: AsyncRead + Unpin>(shared: Arc<Shared>, reader: R, remote_is_dialer: bool) {
    let mut reader = FrameReader {
        reader,
        staging: BytesMut::new(),
        pool: Arc::new(BufferPool::default()),
        idle: shared.config.idle_timeout,
        after_bulk: false,
    };
    let closed = async {
        let _ = shared.close.subscribe().wait_for(Option::is_some).await;
    };
    let reason = tokio::select! {
        reason = read_loop(&shared, &mut reader, remote_is_dialer) => Some(reason),
        () = closed => None,
    };
    match reason {
        Some(reason) => shared.close(reason),
        None => {
            // Closed locally: keep reading (and discarding) until the remote hangs up or the grace period
            // ends. Closing a socket with unread data makes the kernel send a reset, which would destroy
            // the GOAWAY still on its way to the remote.
            let mut sink = [0u8; 16 * 1024];
            let drain = async { while matches!(reader.reader.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
        }
    }
}

/// Reads and dispatches frames until the connection must close; returns why.
async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<R>,
    remote_is_dialer: bool,
) -> CloseReason {
    // A violation closes with a local reason so that the remote learns it in GOAWAY.
    let violation = |what: String| CloseReason::Local(format!("protocol violation by the remote peer: {what}"));
    let mut last_remote_id = 0u32;
    loop {
        if let Err(reason) = reader.fill_to(HEADER_LEN).await {
            return reason;
        }
        let head: [u8; HEADER_LEN] = reader.staging[..HEADER_LEN]
            .try_into()
            .expect("HEADER_LEN bytes are staged");
        reader.staging.advance(HEADER_LEN);
        let id = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let kind = head[4];
        let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if head[5] != 0 || head[6] != 0 || head[7] != 0 {
            return violation("non-zero flags or reserved bytes".into());
        }
        let payload_limit = match kind {
            DATA | DATAGRAM => MAX_DATA_FRAME,
            GOAWAY => MAX_GOAWAY_REASON,
            _ => 0,
        };
        let payload = if payload_limit > 0 {
            if len as usize > payload_limit {
                return violation(format!(
                    "frame type {kind} of {len} bytes exceeds the limit of {payload_limit}"
                ));
            }
            match reader.payload(len as usize).await {
                Ok(payload) => payload,
                Err(reason) => return reason,
            }
        } else {
            Bytes::new()
        };
        match kind {
            DATA => {
                let len = u64::from(len);
                {
                    let mut flow = shared.lock_flow();
                    if len > flow.recv_window {
                        return violation(format!("{len} bytes sent beyond the connection's credit"));
                    }
                    flow.recv_window -= len;
                }
                let state = shared.lock_streams().get(&id).cloned();
                let delivered = match state {
                    Some(state) => {
                        let mut recv = state.recv.lock().expect("stream lock poisoned");
                        if recv.closed {
                            false
                        } else if len > recv.window {
                            return violation(format!("{len} bytes sent beyond stream {id}'s credit"));
                        } else {
                            recv.window -= len;
                            state.recv_tx.send(Incoming::Data(payload)).is_ok()
                        }
                    }
                    None => false,
                };
                if !delivered {
                    // Nobody will read it: give the connection credit back at once.
                    shared.return_connection_credit(len);
                }
            }
            WINDOW => {
                let grant = u64::from(len);
                if id == 0 {
                    let mut flow = shared.lock_flow();
                    flow.send_credit = flow.send_credit.saturating_add(grant);
                } else {
                    let state = shared.lock_streams().get(&id).cloned();
                    if let Some(state) = state {
                        let mut send = state.send.lock().expect("stream lock poisoned");
                        send.credit = send.credit.saturating_add(grant);
                    }
                }
                shared.credit.notify_waiters();
            }
            OPEN => {
                let remote_parity_ok = (id % 2 == 1) == remote_is_dialer;
                if id == 0 || !remote_parity_ok || id <= last_remote_id {
                    return violation(format!("invalid new stream id {id}"));
                }
                last_remote_id = id;
                let guard = shared.guard.lock().expect("guard slot poisoned").upgrade();
                let Some(guard) = guard else { continue };
                if shared.incoming_open.load(Ordering::Acquire) >= shared.config.max_incoming_streams {
                    shared.send_frame(id, RESET, REFUSED_CODE, Bytes::new());
                    shared.send_frame(id, STOP, REFUSED_CODE, Bytes::new());
                    metrics::counter!("colony_streams_refused_total", "reason" => "connection_limit").increment(1);
                    continue;
                }
                shared.incoming_open.fetch_add(1, Ordering::AcqRel);
                let (state, rx) = shared.new_stream(id, true);
                shared.lock_streams().insert(id, state.clone());
                shared.grant_initial_stream_credit(id);
                let pair = shared.halves(state, rx, guard);
                // A full accept queue drops the pair, which resets and stops the stream.
                let _ = shared.accept_tx.try_send(pair);
            }
            FIN | RESET => {
                let state = shared.lock_streams().get(&id).cloned();
                if let Some(state) = state {
                    let item = if kind == FIN {
                        Incoming::Fin
                    } else {
                        Incoming::Reset(len)
                    };
                    let _ = state.recv_tx.send(item);
                }
            }
            STOP => {
                let state = shared.lock_streams().get(&id).cloned();
                if let Some(state) = state {
                    state.send.lock().expect("stream lock poisoned").stopped = Some(len);
                    shared.credit.notify_waiters();
                }
            }
            DATAGRAM => {
                // Best effort: a full queue, or a datagram above our own limit, drops it.
                if payload.len() <= shared.config.max_datagram_size {
                    let _ = shared.datagram_tx.try_send(payload);
                }
            }
            PING => {}
            GOAWAY => return CloseReason::Remote(String::from_utf8_lossy(&payload).into_owned()),
            other => return violation(format!("unknown frame type {other}")),
        }
    }
}

/// Size of the staging buffer that headers and small payloads are read into.
const STAGING: usize = 64 * 1024;
/// Payloads above this size are read into pooled buffers; smaller ones are split off the staging buffer.
const POOLED_PAYLOAD: usize = 16 * 1024;
/// Free buffers kept per connection for reuse: enough for a stream's payloads in flight, so a bulk
/// transfer reuses warm memory, and few enough that a long-lived connection does not hoard memory that a
/// rare burst of payloads once needed.
const MAX_POOLED_BUFFERS: usize = 4;
/// The most bytes (capacities) the free buffers of one connection may hold together.
const MAX_POOLED_BYTES: usize = 4 * MAX_DATA_FRAME;
/// Pooled buffers are allocated in multiples of this, so payloads of similar sizes share buffers.
const POOL_GRANULE: usize = 64 * 1024;

/// Reads frames with one copy from the socket. Large payloads land in buffers that return to a pool when
/// the application drops them, so a bulk transfer reuses warm memory instead of faulting in new pages.
struct FrameReader<R> {
    reader: R,
    staging: BytesMut,
    pool: Arc<BufferPool>,
    idle: Duration,
    /// After a large payload, read only the next header, so that a following large payload goes straight
    /// into its own buffer instead of through the staging buffer (one copy fewer).
    after_bulk: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads until at least `needed` (at most `STAGING`) bytes are staged.
    async fn fill_to(&mut self, needed: usize) -> Result<(), CloseReason> {
        if self.staging.len() >= needed {
            return Ok(());
        }
        self.staging.reserve(STAGING - self.staging.len().min(STAGING / 2));
        while self.staging.len() < needed {
            let limit = if self.after_bulk {
                (needed - self.staging.len()) as u64
            } else {
                u64::MAX
            };
            let mut limited = (&mut self.reader).take(limit);
            let read = limited.read_buf(&mut self.staging);
            check_read(tokio::time::timeout(self.idle, read).await)?;
        }
        Ok(())
    }

    /// Reads a payload of `len` bytes whose header was just consumed.
    async fn payload(&mut self, len: usize) -> Result<Bytes, CloseReason> {
        if len <= POOLED_PAYLOAD {
            self.after_bulk = false;
            self.fill_to(len).await?;
            return Ok(self.staging.split_to(len).freeze());
        }
        self.after_bulk = true;
        let mut buf = self.pool.take(len);
        let staged = len.min(self.staging.len());
        buf.extend_from_slice(&self.staging[..staged]);
        self.staging.advance(staged);
        while buf.len() < len {
            let mut limited = (&mut self.reader).take((len - buf.len()) as u64);
            let read = limited.read_buf(&mut buf);
            check_read(tokio::time::timeout(self.idle, read).await)?;
        }
        Ok(Bytes::from_owner(Pooled {
            buf,
            pool: self.pool.clone(),
        }))
    }
}

fn check_read(result: Result<std::io::Result<usize>, tokio::time::error::Elapsed>) -> Result<(), CloseReason> {
    match result {
        Err(_) => Err(CloseReason::IdleTimeout),
        Ok(Err(error)) => Err(CloseReason::Lost(format!("read failed: {error}"))),
        Ok(Ok(0)) => Err(CloseReason::Lost("the remote peer closed the socket".into())),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Receive buffers of one connection, reused once the application drops the payload they hold. Bounded by
/// [`MAX_POOLED_BUFFERS`] and [`MAX_POOLED_BYTES`]: a buffer returned beyond either is freed.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// The smallest free buffer that holds `len` bytes, or a new one of `len` rounded up to
    /// [`POOL_GRANULE`].
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().expect("buffer pool poisoned");
            free.iter()
                .enumerate()
                .filter(|(_, buf)| buf.capacity() >= len)
                .min_by_key(|(_, buf)| buf.capacity())
                .map(|(index, _)| index)
                .map(|index| free.swap_remove(index))
        };
        reused.unwrap_or_else(|| Vec::with_capacity(len.next_multiple_of(POOL_GRANULE)))
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.lock().expect("buffer pool poisoned");
        if free.len() < MAX_POOLED_BUFFERS && capacity_of(&free) + buf.capacity() <= MAX_POOLED_BYTES {
            free.push(buf);
        }
    }

    #[cfg(test)]
    fn pooled(&self) -> (usize, usize) {
        let free = self.free.lock().expect("buffer pool poisoned");
        (free.len(), capacity_of(&free))
    }
}

/// The bytes the buffers of a pool hold (their capacities).
fn capacity_of(buffers: &[Vec<u8>]) -> usize {
    buffers.iter().map(Vec::capacity).sum()
}

/// A payload buffer on loan from a [`BufferPool`].
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

struct MuxSend {
    shared: Arc<Shared>,
    state: Arc<StreamState>,
    done: bool,
    _guard: Arc<CloseGuard>,
}

impl MuxSend {
    /// Waits for credit and takes up to `want` bytes of it.
    async fn acquire(&self, want: usize) -> Result<usize, StreamError> {
        loop {
            let notified = self.shared.credit.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.shared.close_reason() {
                return Err(StreamError::ConnectionClosed(reason));
            }
            {
                let mut flow = self.shared.lock_flow();
                let mut send = self.state.send.lock().expect("stream lock poisoned");
                if let Some(code) = send.stopped {
                    return Err(StreamError::Stopped(code));
                }
                let available = (want as u64)
                    .min(send.credit)
                    .min(flow.send_credit)
                    .min(MAX_DATA_FRAME as u64);
                if available > 0 {
                    send.credit -= available;
                    flow.send_credit -= available;
                    return Ok(available as usize);
                }
            }
            notified.await;
        }
    }

    fn end(&mut self, kind: u8, code: u32) {
        if self.done {
            return;
        }
        self.done = true;
        self.shared.send_frame(self.state.id, kind, code, Bytes::new());
        self.state.send_closed.store(true, Ordering::Release);
        self.shared.maybe_remove(&self.state);
    }
}

#[async_trait]
impl SendStreamImpl for MuxSend {
    async fn write_chunk(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::ClosedLocally);
        }
        while !data.is_empty() {
            let take = self.acquire(data.len()).await?;
            let piece = data.split_to(take);
            self.shared.send_frame(self.state.id, DATA, take as u32, piece);
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::ClosedLocally);
        }
        if let Some(reason) = self.shared.close_reason() {
            return Err(StreamError::ConnectionClosed(reason));
        }
        // A reader that stopped has taken what it wanted; finishing towards it is not an error.
        self.end(FIN, 0);
        Ok(())
    }

    fn reset(&mut self, code: u32) {
        self.end(RESET, code);
    }
}

impl Drop for MuxSend {
    fn drop(&mut self) {
        self.end(RESET, 0);
    }
}

struct MuxRecv {
    shared: Arc<Shared>,
    state: Arc<StreamState>,
    rx: mpsc::UnboundedReceiver<Incoming>,
    done: bool,
    _guard: Arc<CloseGuard>,
}

impl MuxRecv {
    fn consumed(&self, len: u64) {
        let grant = {
            let mut recv = self.state.recv.lock().expect("stream lock poisoned");
            recv.unreported += len;
            if !recv.closed && recv.unreported >= self.shared.config.stream_receive_window / 4 {
                let grant = recv.unreported;
                recv.unreported = 0;
                recv.window += grant;
                Some(grant)
            } else {
                None
            }
        };
        if let Some(grant) = grant {
            self.shared
                .send_frame(self.state.id, WINDOW, grant_u32(grant), Bytes::new());
        }
        self.shared.return_connection_credit(len);
    }

    fn mark_closed(&mut self) {
        self.done = true;
        self.state.recv.lock().expect("stream lock poisoned").closed = true;
        self.shared.maybe_remove(&self.state);
    }
}

#[async_trait]
impl RecvStreamImpl for MuxRecv {
    async fn read_chunk(&mut self, _max_len: usize) -> Result<Option<Bytes>, StreamError> {
        if self.done {
            return Ok(None);
        }
        let item = tokio::select! {
            biased;
            item = self.rx.recv() => item,
            reason = self.shared.wait_closed() => return Err(StreamError::ConnectionClosed(reason)),
        };
        match item {
            Some(Incoming::Data(data)) => {
                self.consumed(data.len() as u64);
                Ok(Some(data))
            }
            Some(Incoming::Fin) => {
                self.mark_closed();
                Ok(None)
            }
            Some(Incoming::Reset(code)) => {
                self.mark_closed();
                if code == REFUSED_CODE {
                    Err(StreamError::Refused("the remote peer has too many open streams".into()))
                } else {
                    Err(StreamError::Reset(code))
                }
            }
            None => Err(StreamError::ConnectionClosed(
                self.shared
                    .close_reason()
                    .unwrap_or(CloseReason::Lost("stream state dropped".into())),
            )),
        }
    }

    fn stop(&mut self, code: u32) {
        if self.done {
            return;
        }
        self.shared.send_frame(self.state.id, STOP, code, Bytes::new());
        self.rx.close();
        // Data already queued will never be read: return its connection credit.
        let mut discarded = 0u64;
        while let Ok(item) = self.rx.try_recv() {
            if let Incoming::Data(data) = item {
                discarded += data.len() as u64;
            }
        }
        if discarded > 0 {
            self.shared.return_connection_credit(discarded);
        }
        self.mark_closed();
    }
}

impl Drop for MuxRecv {
    fn drop(&mut self) {
        self.stop(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config() -> MuxConfig {
        MuxConfig {
            stream_receive_window: 64 * 1024,
            connection_receive_window: INITIAL_CONNECTION_WINDOW,
            max_incoming_streams: 8,
            max_datagram_size: 1024,
            datagram_queue: 8,
            keep_alive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }

    fn frame(stream: u32, kind: u8, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = header(stream, kind, len).to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// Starts a dialer-side multiplexer whose remote is played by the test through `theirs`.
    fn start() -> (MuxConnection, tokio::io::DuplexStream) {
        start_with(config())
    }

    fn start_with(config: MuxConfig) -> (MuxConnection, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(4 << 20);
        let (reader, writer) = tokio::io::split(ours);
        let (local, remote) = (
            Keypair::from_seed([1; 32]).peer_id(),
            Keypair::from_seed([2; 32]).peer_id(),
        );
        let address = Address::new(crate::Scheme::Mem, "test", Some(remote)).unwrap();
        (
            MuxConnection::start(reader, writer, true, config, local, remote, address),
            theirs,
        )
    }

    /// Sends `bytes` as the remote and checks that the connection closes, naming `needle`, and that the
    /// remote is told why in a GOAWAY.
    async fn violation(bytes: Vec<u8>, needle: &str) {
        let (conn, mut theirs) = start();
        theirs.write_all(&bytes).await.unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("the connection closes");
        assert!(reason.to_string().contains(needle), "{reason}");
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), theirs.read_to_end(&mut seen)).await;
        assert!(
            String::from_utf8_lossy(&seen).contains(needle),
            "the GOAWAY names the violation"
        );
    }

    fn pair(keep_alive: Duration, idle: Duration) -> (MuxConnection, MuxConnection) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let config = MuxConfig {
            keep_alive_interval: keep_alive,
            idle_timeout: idle,
            ..config()
        };
        let (pa, pb) = (
            Keypair::from_seed([1; 32]).peer_id(),
            Keypair::from_seed([2; 32]).peer_id(),
        );
        let start = |io: tokio::io::DuplexStream, dialer: bool, local: PeerId, remote: PeerId| {
            let (reader, writer) = tokio::io::split(io);
            let address = Address::new(crate::Scheme::Mem, "test", Some(remote)).unwrap();
            MuxConnection::start(reader, writer, dialer, config.clone(), local, remote, address)
        };
        (start(a, true, pa, pb), start(b, false, pb, pa))
    }

    #[tokio::test]
    async fn a_silent_remote_is_dropped_after_the_idle_timeout() {
        let (conn, _silent_remote) = start_with(MuxConfig {
            idle_timeout: Duration::from_millis(200),
            ..config()
        });
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closes");
        assert_eq!(reason, CloseReason::IdleTimeout);
    }

    #[tokio::test]
    async fn keep_alives_hold_an_idle_connection_open() {
        let (a, b) = pair(Duration::from_millis(50), Duration::from_millis(1000));
        // Several idle timeouts pass without application traffic; keep-alives hold both ends open.
        let outcome = tokio::time::timeout(Duration::from_millis(3000), a.closed()).await;
        assert!(outcome.is_err(), "closed despite keep-alives: {outcome:?}");
        assert!(b.close_reason().is_none());
    }

    #[tokio::test]
    async fn data_beyond_stream_credit_closes_the_connection() {
        let mut bytes = frame(2, OPEN, 0, &[]);
        bytes.extend(frame(2, DATA, 64 * 1024 + 1, &vec![0; 64 * 1024 + 1]));
        violation(bytes, "beyond stream 2's credit").await;
    }

    #[tokio::test]
    async fn oversized_frame_closes_the_connection() {
        violation(frame(2, DATA, 2 << 20, &[]), "exceeds the limit").await;
    }

    #[tokio::test]
    async fn unknown_frame_type_closes_the_connection() {
        violation(frame(0, 99, 0, &[]), "unknown frame type 99").await;
    }

    #[tokio::test]
    async fn stream_id_of_the_wrong_side_closes_the_connection() {
        violation(frame(3, OPEN, 0, &[]), "invalid new stream id 3").await;
    }

    #[tokio::test]
    async fn reused_stream_id_closes_the_connection() {
        let mut bytes = frame(4, OPEN, 0, &[]);
        bytes.extend(frame(2, OPEN, 0, &[]));
        violation(bytes, "invalid new stream id 2").await;
    }

    #[tokio::test]
    async fn nonzero_flags_close_the_connection() {
        let mut bytes = frame(0, PING, 0, &[]);
        bytes[5] = 1;
        violation(bytes, "non-zero flags").await;
    }

    #[tokio::test]
    async fn data_for_an_unknown_stream_returns_its_credit() {
        let (conn, mut theirs) = start();
        // Data for a stream nobody opened is dropped, and its connection credit comes back, so a peer
        // cannot shrink our window by aiming at closed streams.
        let chunk = vec![0u8; MAX_DATA_FRAME];
        for _ in 0..(INITIAL_CONNECTION_WINDOW as usize / MAX_DATA_FRAME) + 4 {
            theirs
                .write_all(&frame(40, DATA, MAX_DATA_FRAME as u32, &chunk))
                .await
                .unwrap();
        }
        // Frames are handled in order: once this stream is accepted, all the data before it was handled.
        theirs.write_all(&frame(2, OPEN, 0, &[])).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), conn.accept_stream())
            .await
            .unwrap()
            .unwrap();
        assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_are_refused_without_closing() {
        let (conn, mut theirs) = start();
        for id in (2..=2 * 9).step_by(2) {
            theirs.write_all(&frame(id, OPEN, 0, &[])).await.unwrap();
        }
        for _ in 0..8 {
            tokio::time::timeout(Duration::from_secs(5), conn.accept_stream())
                .await
                .unwrap()
                .unwrap();
        }
        // The ninth was refused with RESET and STOP carrying the refusal code.
        let mut seen = vec![0u8; 4096];
        let mut found = false;
        for _ in 0..50 {
            let n = tokio::time::timeout(Duration::from_secs(5), theirs.read(&mut seen))
                .await
                .unwrap()
                .unwrap();
            if seen[..n]
                .windows(HEADER_LEN)
                .any(|w| w == header(18, RESET, REFUSED_CODE))
            {
                found = true;
                break;
            }
        }
        assert!(found, "the ninth stream was refused");
        assert!(conn.close_reason().is_none());
    }

    #[test]
    fn the_buffer_pool_reuses_the_smallest_fit_and_stays_bounded() {
        let pool = BufferPool::default();
        // New buffers are sized to the payload, rounded up to the granule.
        let small = pool.take(100_000);
        assert_eq!(small.capacity(), 100_000usize.next_multiple_of(POOL_GRANULE));
        let large = pool.take(MAX_DATA_FRAME);
        assert_eq!(large.capacity(), MAX_DATA_FRAME);
        pool.give(large);
        pool.give(small);
        // A small payload takes the small buffer, not the large one.
        let again = pool.take(50_000);
        assert_eq!(again.capacity(), 100_000usize.next_multiple_of(POOL_GRANULE));
        pool.give(again);
        // A burst of many large payloads in flight leaves at most the pool's bounds behind.
        let burst: Vec<Vec<u8>> = (0..20).map(|_| pool.take(MAX_DATA_FRAME)).collect();
        for buf in burst {
            pool.give(buf);
        }
        let (count, bytes) = pool.pooled();
        assert!(count <= MAX_POOLED_BUFFERS, "{count} buffers pooled");
        assert!(bytes <= MAX_POOLED_BYTES, "{bytes} bytes pooled");
        assert!(count > 0, "returned buffers are kept for reuse");
    }
}
