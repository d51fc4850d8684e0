//! The transport abstraction: what every transport (mem, tcp, quic, and wrappers such as link emulation)
//! provides, as object-safe traits so that the runtime picks one from configuration.
//!
//! A [`Transport`] listens and dials. Both give a [`Connection`] whose remote [`PeerId`] has been *proven*
//! (by a signed handshake or TLS), never merely claimed. A connection opens and accepts bidirectional
//! streams ([`SendStream`], [`RecvStream`]) and carries best-effort datagrams of bounded size. Closing is
//! explicit and observable: both sides learn the [`CloseReason`], and pending stream operations fail with it
//! instead of hanging.
//!
//! Streams move [`Bytes`] chunks so that bulk tensor payloads are never copied on the way through;
//! `write_all`, `read_exact` and friends are conveniences over those chunks.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::address::{Address, Scheme};
use crate::error::{CloseReason, StreamError, TransportError};
use crate::identity::PeerId;

/// A way to reach peers. Implementations: [`crate::mem::MemTransport`], [`crate::tcp::TcpTransport`],
/// [`crate::quic::QuicTransport`], and [`crate::emulation::LinkEmulator::wrap`] around any of them.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The address scheme this transport serves.
    fn scheme(&self) -> Scheme;
    /// The identity this transport authenticates as.
    fn local_peer(&self) -> PeerId;
    /// Starts listening at `address`. A port of 0 (or a fresh `mem` name) is allowed; the listener reports
    /// the address it actually bound, with this peer's id.
    async fn listen(&self, address: &Address) -> Result<Listener, TransportError>;
    /// Connects to `address`. When the address names a peer (`/p/<id>`), any other peer is refused with
    /// [`TransportError::UnexpectedPeer`].
    async fn dial(&self, address: &Address) -> Result<Connection, TransportError>;
}

/// The implementation side of a [`Listener`].
#[async_trait]
pub trait ListenerImpl: Send {
    /// The bound address, including this peer's id.
    fn local_address(&self) -> Address;
    /// The next authenticated incoming connection. Handshake failures of individual incoming connections
    /// are logged and counted, not returned: one bad dialer must not stop the listener.
    async fn accept(&mut self) -> Result<Connection, TransportError>;
    /// How many incoming connections were refused during authentication so far.
    fn refused_handshakes(&self) -> u64;
}

/// A bound listener. Dropping it stops accepting; established connections stay up.
pub struct Listener(Box<dyn ListenerImpl>);

impl Listener {
    /// Wraps an implementation.
    pub fn new(inner: Box<dyn ListenerImpl>) -> Self {
        Self(inner)
    }

    /// The bound address, including this peer's id: what other peers dial.
    pub fn local_address(&self) -> Address {
        self.0.local_address()
    }

    /// Waits for the next authenticated incoming connection.
    pub async fn accept(&mut self) -> Result<Connection, TransportError> {
        self.0.accept().await
    }

    /// How many incoming connections failed authentication so far.
    pub fn refused_handshakes(&self) -> u64 {
        self.0.refused_handshakes()
    }
}

/// The implementation side of a [`Connection`]. Dropping the last reference (including those held by
/// streams) closes the connection.
#[async_trait]
pub trait ConnectionImpl: Send + Sync {
    /// This side's identity.
    fn local_peer(&self) -> PeerId;
    /// The proven identity of the other side.
    fn remote_peer(&self) -> PeerId;
    /// The other side's address as this side sees it.
    fn remote_address(&self) -> Address;
    /// Opens a new bidirectional stream. The remote side sees it, at the latest, with its first bytes.
    async fn open_stream(&self) -> Result<(SendStream, RecvStream), StreamError>;
    /// Waits for the next stream opened by the remote side.
    async fn accept_stream(&self) -> Result<(SendStream, RecvStream), StreamError>;
    /// Sends a best-effort datagram (it may be lost, or dropped when queues are full).
    fn send_datagram(&self, data: Bytes) -> Result<(), StreamError>;
    /// Waits for the next datagram.
    async fn recv_datagram(&self) -> Result<Bytes, StreamError>;
    /// The largest datagram this connection carries now.
    fn max_datagram_size(&self) -> Option<usize>;
    /// Closes the connection; the remote side learns `reason`.
    fn close(&self, reason: &str);
    /// Waits until the connection is closed, for whatever reason.
    async fn closed(&self) -> CloseReason;
    /// Why the connection closed, if it has.
    fn close_reason(&self) -> Option<CloseReason>;
}

/// An authenticated connection to one remote peer. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct Connection(Arc<dyn ConnectionImpl>);

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("local", &self.local_peer())
            .field("remote", &self.remote_peer())
            .field("remote_address", &self.remote_address().to_string())
            .finish()
    }
}

impl Connection {
    /// Wraps an implementation.
    pub fn new(inner: Arc<dyn ConnectionImpl>) -> Self {
        Self(inner)
    }

    /// This side's identity.
    pub fn local_peer(&self) -> PeerId {
        self.0.local_peer()
    }

    /// The proven identity of the other side.
    pub fn remote_peer(&self) -> PeerId {
        self.0.remote_peer()
    }

    /// The other side's address as seen from here.
    pub fn remote_address(&self) -> Address {
        self.0.remote_address()
    }

    /// Opens a bidirectional stream.
    pub async fn open_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        self.0.open_stream().await
    }

    /// Waits for a stream opened by the remote side.
    pub async fn accept_stream(&self) -> Result<(SendStream, RecvStream), StreamError> {
        self.0.accept_stream().await
    }

    /// Sends a best-effort datagram of at most [`Connection::max_datagram_size`] bytes.
    pub fn send_datagram(&self, data: Bytes) -> Result<(), StreamError> {
        self.0.send_datagram(data)
    }

    /// Waits for the next datagram.
    pub async fn recv_datagram(&self) -> Result<Bytes, StreamError> {
        self.0.recv_datagram().await
    }

    /// The largest datagram the connection carries now, or `None` if it carries none.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.0.max_datagram_size()
    }

    /// Closes the connection. Both sides' pending operations fail; the remote learns `reason`.
    pub fn close(&self, reason: &str) {
        self.0.close(reason)
    }

    /// Waits until the connection closes and says why.
    pub async fn closed(&self) -> CloseReason {
        self.0.closed().await
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.0.close_reason()
    }

    /// Whether both handles refer to the same connection.
    pub fn same_as(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The implementation side of a [`SendStream`].
#[async_trait]
pub trait SendStreamImpl: Send {
    /// Queues `data` for sending, waiting for flow-control credit as needed.
    async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError>;
    /// Ends the stream gracefully once everything written has been sent.
    async fn finish(&mut self) -> Result<(), StreamError>;
    /// Aborts the stream; the remote reader gets [`StreamError::Reset`] with `code`.
    fn reset(&mut self, code: u32);
}

/// The implementation side of a [`RecvStream`].
#[async_trait]
pub trait RecvStreamImpl: Send {
    /// The next chunk of at most `max_len` bytes, or `None` at the end of the stream.
    async fn read_chunk(&mut self, max_len: usize) -> Result<Option<Bytes>, StreamError>;
    /// Tells the remote writer to stop; its writes fail with [`StreamError::Stopped`].
    fn stop(&mut self, code: u32);
}

/// The sending half of a stream. Dropping it without [`SendStream::finish`] resets the stream, so that a
/// reader never mistakes an interrupted writer for a complete message.
pub struct SendStream {
    inner: Box<dyn SendStreamImpl>,
    /// `colony_bytes_sent_total` for this stream's transport and protocol, set by [`crate::rpc`] once the
    /// protocol is known; a no-op counter until then (and when no metrics recorder is installed).
    sent: metrics::Counter,
}

impl SendStream {
    /// Wraps an implementation.
    pub fn new(inner: Box<dyn SendStreamImpl>) -> Self {
        Self {
            inner,
            sent: metrics::Counter::noop(),
        }
    }

    /// Counts the bytes written from now on into `sent`.
    pub(crate) fn set_meter(&mut self, sent: metrics::Counter) {
        self.sent = sent;
    }

    /// Sends `data` without copying it.
    pub async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        self.inner.write_chunk(data).await?;
        self.sent.increment(len);
        Ok(())
    }

    /// Sends a copy of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.write_chunk(Bytes::copy_from_slice(data)).await
    }

    /// Ends the stream gracefully.
    pub async fn finish(&mut self) -> Result<(), StreamError> {
        self.inner.finish().await
    }

    /// Aborts the stream.
    pub fn reset(&mut self, code: u32) {
        self.inner.reset(code)
    }
}

/// The receiving half of a stream, with a small look-ahead buffer for exact-size reads.
pub struct RecvStream {
    inner: Box<dyn RecvStreamImpl>,
    buffered: Bytes,
    /// `colony_bytes_received_total` for this stream's transport and protocol, counted as bytes are handed
    /// out (so the look-ahead buffer is counted once); set by [`crate::rpc`], a no-op counter until then.
    received: metrics::Counter,
}

/// Upper bound on one chunk handed out by [`RecvStream::read_chunk`] when the caller does not care.
pub const DEFAULT_CHUNK: usize = 1 << 20;

impl RecvStream {
    /// Wraps an implementation.
    pub fn new(inner: Box<dyn RecvStreamImpl>) -> Self {
        Self {
            inner,
            buffered: Bytes::new(),
            received: metrics::Counter::noop(),
        }
    }

    /// Counts the bytes read from now on into `received`.
    pub(crate) fn set_meter(&mut self, received: metrics::Counter) {
        self.received = received;
    }

    /// The next chunk of at most `max_len` bytes, or `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max_len: usize) -> Result<Option<Bytes>, StreamError> {
        let max_len = max_len.max(1);
        if !self.buffered.is_empty() {
            let take = self.buffered.len().min(max_len);
            self.received.increment(take as u64);
            return Ok(Some(self.buffered.split_to(take)));
        }
        loop {
            match self.inner.read_chunk(max_len).await? {
                Some(chunk) if chunk.is_empty() => continue,
                Some(mut chunk) => {
                    if chunk.len() > max_len {
                        self.buffered = chunk.split_off(max_len);
                    }
                    self.received.increment(chunk.len() as u64);
                    return Ok(Some(chunk));
                }
                None => return Ok(None),
            }
        }
    }

    /// Fills `buf` completely. Returns `Ok(false)` if the stream ended before its first byte (a clean end
    /// between messages) and an error if it ended part-way.
    pub async fn read_exact_or_end(&mut self, buf: &mut [u8]) -> Result<bool, StreamError> {
        if buf.is_empty() {
            return Ok(true);
        }
        let mut filled = 0;
        while filled < buf.len() {
            match self.read_chunk(buf.len() - filled).await? {
                Some(chunk) => {
                    buf[filled..filled + chunk.len()].copy_from_slice(&chunk);
                    filled += chunk.len();
                }
                None if filled == 0 => return Ok(false),
                None => {
                    return Err(StreamError::UnexpectedEnd {
                        expected: buf.len(),
                        got: filled,
                    });
                }
            }
        }
        Ok(true)
    }

    /// Fills `buf` completely, or fails if the stream ends first.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        if self.read_exact_or_end(buf).await? {
            Ok(())
        } else {
            Err(StreamError::UnexpectedEnd {
                expected: buf.len(),
                got: 0,
            })
        }
    }

    /// Reads exactly `len` bytes. When one received chunk holds them all, no byte is copied. The caller
    /// must have bounded `len` (this allocates it).
    pub async fn read_bytes(&mut self, len: usize) -> Result<Bytes, StreamError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let first = match self.read_chunk(len).await? {
            Some(chunk) => chunk,
            None => return Err(StreamError::UnexpectedEnd { expected: len, got: 0 }),
        };
        if first.len() == len {
            return Ok(first);
        }
        let mut out = BytesMut::with_capacity(len);
        out.extend_from_slice(&first);
        while out.len() < len {
            match self.read_chunk(len - out.len()).await? {
                Some(chunk) => out.extend_from_slice(&chunk),
                None => {
                    return Err(StreamError::UnexpectedEnd {
                        expected: len,
                        got: out.len(),
                    });
                }
            }
        }
        Ok(out.freeze())
    }

    /// Reads until the end of the stream, refusing more than `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.read_chunk(DEFAULT_CHUNK).await? {
            if out.len() + chunk.len() > limit {
                self.stop(0);
                return Err(StreamError::TooLong { limit });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Tells the remote writer to stop sending.
    pub fn stop(&mut self, code: u32) {
        self.inner.stop(code)
    }
}
