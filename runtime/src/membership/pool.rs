//! The connections of one peer, by remote peer: dialed on demand, shared by membership datagrams and every
//! stream protocol, bounded in number, and closed when idle.
//!
//! Each connection (dialed or accepted) gets one task that serves the remote's streams with the peer's
//! router and forwards its datagrams to the membership actor. Connections to client-mode peers are
//! *pinned*: nobody can dial those peers back, so they are never evicted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony_transports::rpc::Router;
use colony_transports::{Address, CloseReason, Connection, PeerId, Transport, TransportError};
use tokio::task::JoinSet;

/// Called with each datagram a connection receives: (sender, bytes).
pub type DatagramSink = Arc<dyn Fn(PeerId, Bytes) + Send + Sync>;
/// Called when a connection breaks (lost, reset, killed or idle; not when either side closed it on
/// purpose): a hint that the remote may have died.
pub type LossSink = Arc<dyn Fn(PeerId, CloseReason) + Send + Sync>;

struct Entry {
    conn: Connection,
    last_used: Instant,
    pinned: bool,
}

struct Inner {
    conns: HashMap<PeerId, Entry>,
    /// Connections replaced by a newer one to the same peer (both sides dialed at once): still served, as
    /// the remote may be using them, and closed after the idle timeout.
    retired: Vec<(Connection, Instant)>,
    tasks: JoinSet<()>,
    closed: bool,
}

/// Bounds of a pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Connections kept open at most; the least recently used unpinned one is closed beyond this.
    pub max_connections: usize,
    /// An unpinned connection unused for this long is closed.
    pub idle_timeout: Duration,
    /// How long a dial may take.
    pub dial_timeout: Duration,
}

/// One peer's connections.
pub struct Pool {
    transport: Arc<dyn Transport>,
    router: Arc<Router>,
    datagrams: DatagramSink,
    losses: LossSink,
    limits: PoolLimits,
    runtime: tokio::runtime::Handle,
    inner: Mutex<Inner>,
    /// `colony_bytes_sent_total` / `colony_bytes_received_total` for membership datagrams (`protocol="swim"`):
    /// taken once, as a datagram is too small to look a metric up for.
    datagram_bytes_sent: metrics::Counter,
    datagram_bytes_received: metrics::Counter,
}

impl Pool {
    /// An empty pool. Tasks are spawned on `runtime`.
    pub fn new(
        transport: Arc<dyn Transport>,
        router: Arc<Router>,
        datagrams: DatagramSink,
        losses: LossSink,
        limits: PoolLimits,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        let labels = [
            ("transport", transport.scheme().as_str().to_owned()),
            ("protocol", "swim".to_owned()),
        ];
        let datagram_bytes_sent = metrics::counter!("colony_bytes_sent_total", &labels);
        let datagram_bytes_received = metrics::counter!("colony_bytes_received_total", &labels);
        Arc::new(Self {
            datagram_bytes_sent,
            datagram_bytes_received,
            transport,
            router,
            datagrams,
            losses,
            limits,
            runtime,
            inner: Mutex::new(Inner {
                conns: HashMap::new(),
                retired: Vec::new(),
                tasks: JoinSet::new(),
                closed: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The open connection to `peer`, if any.
    pub fn get(&self, peer: &PeerId) -> Option<Connection> {
        let mut inner = self.lock();
        let entry = inner.conns.get_mut(peer)?;
        if entry.conn.close_reason().is_some() {
            inner.conns.remove(peer);
            return None;
        }
        entry.last_used = Instant::now();
        Some(entry.conn.clone())
    }

    /// Whether a connection to `peer` is open. Unlike [`Pool::get`] it does not count as a use, so asking
    /// about every member does not keep idle connections open.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.lock()
            .conns
            .get(peer)
            .is_some_and(|entry| entry.conn.close_reason().is_none())
    }

    /// The connection to `peer`, dialing `address` when there is none.
    pub async fn connect(self: &Arc<Self>, peer: PeerId, address: Option<&Address>) -> Result<Connection, String> {
        if let Some(conn) = self.get(&peer) {
            return Ok(conn);
        }
        let address = address.ok_or_else(|| format!("peer {} is in client mode and not connected", peer.short()))?;
        let conn = self.dial(address).await.map_err(|e| e.to_string())?;
        if conn.remote_peer() != peer {
            conn.close("not the expected peer");
            return Err(format!("{address} answered as {}, not {}", conn.remote_peer(), peer));
        }
        Ok(self.add(conn, false))
    }

    /// Dials `address` (within the dial timeout) and adds the connection.
    pub async fn dial(self: &Arc<Self>, address: &Address) -> Result<Connection, TransportError> {
        let conn = tokio::time::timeout(self.limits.dial_timeout, self.transport.dial(address))
            .await
            .map_err(|_| TransportError::Unreachable {
                address: address.to_string(),
                reason: format!("no connection within {:?}", self.limits.dial_timeout),
            })??;
        Ok(self.add(conn, false))
    }

    /// Adds a connection (dialed or accepted) and starts serving it. If one to the same peer is already
    /// open, both are served and the newer one is used for sending. Returns the connection.
    pub fn add(self: &Arc<Self>, conn: Connection, pinned: bool) -> Connection {
        let peer = conn.remote_peer();
        let mut inner = self.lock();
        if inner.closed {
            conn.close("shutting down");
            return conn;
        }
        while inner.tasks.try_join_next().is_some() {}
        let pinned = pinned || inner.conns.get(&peer).is_some_and(|e| e.pinned);
        let replaced = inner.conns.insert(
            peer,
            Entry {
                conn: conn.clone(),
                last_used: Instant::now(),
                pinned,
            },
        );
        if let Some(old) = replaced
            && !old.conn.same_as(&conn)
            && old.conn.close_reason().is_none()
        {
            inner.retired.push((old.conn, Instant::now()));
        }
        let (router, sink, losses, served, received) = (
            self.router.clone(),
            self.datagrams.clone(),
            self.losses.clone(),
            conn.clone(),
            self.datagram_bytes_received.clone(),
        );
        inner.tasks.spawn_on(
            async move {
                let streams = router.serve(served.clone());
                let datagrams = async {
                    while let Ok(data) = served.recv_datagram().await {
                        received.increment(data.len() as u64);
                        sink(peer, data);
                    }
                };
                tokio::join!(streams, datagrams);
                match served.closed().await {
                    CloseReason::Local(_) | CloseReason::Remote(_) => {}
                    reason => losses(peer, reason),
                }
            },
            &self.runtime,
        );
        if inner.conns.len() > self.limits.max_connections {
            self.evict_over_limit(&mut inner, Some(peer));
        }
        conn
    }

    /// Closes the least recently used unpinned connections down to 90 % of the limit, so that a peer
    /// talking to more members than the limit sorts its connections once per tenth of the limit rather than
    /// scanning them all on every new one.
    fn evict_over_limit(&self, inner: &mut Inner, keep: Option<PeerId>) {
        let limit = self.limits.max_connections;
        let target = limit - (limit / 10).max(1).min(limit - 1);
        let excess = inner.conns.len().saturating_sub(target);
        if excess == 0 {
            return;
        }
        let mut unpinned: Vec<(Instant, PeerId)> = inner
            .conns
            .iter()
            .filter(|(peer, entry)| !entry.pinned && Some(**peer) != keep)
            .map(|(peer, entry)| (entry.last_used, *peer))
            .collect();
        unpinned.sort_unstable_by_key(|(last_used, _)| *last_used);
        for (_, peer) in unpinned.into_iter().take(excess) {
            if let Some(entry) = inner.conns.remove(&peer) {
                entry.conn.close("connection limit");
            }
        }
    }

    /// Keeps the connection to `peer` open regardless of the limits (for client-mode peers).
    pub fn pin(&self, peer: &PeerId) {
        if let Some(entry) = self.lock().conns.get_mut(peer) {
            entry.pinned = true;
        }
    }

    fn evict(&self, inner: &mut Inner) {
        let now = Instant::now();
        inner.retired.retain(|(conn, since)| {
            let keep = conn.close_reason().is_none() && now.duration_since(*since) <= self.limits.idle_timeout;
            if !keep {
                conn.close("replaced by a newer connection");
            }
            keep
        });
        inner.conns.retain(|_, entry| {
            let idle = !entry.pinned && now.duration_since(entry.last_used) > self.limits.idle_timeout;
            let keep = entry.conn.close_reason().is_none() && !idle;
            if !keep {
                entry.conn.close("idle");
            }
            keep
        });
        if inner.conns.len() > self.limits.max_connections {
            self.evict_over_limit(inner, None);
        }
    }

    /// Closes idle connections (called periodically).
    pub fn sweep(&self) {
        let mut inner = self.lock();
        while inner.tasks.try_join_next().is_some() {}
        self.evict(&mut inner);
    }

    /// Closes every connection (current or retired) whose peer `refusal` gives a reason for, with that
    /// reason: for peers whose admission has ended (an expired certificate).
    pub fn close_where(&self, refusal: impl Fn(&PeerId) -> Option<String>) {
        let mut inner = self.lock();
        inner.conns.retain(|peer, entry| match refusal(peer) {
            Some(reason) => {
                entry.conn.close(&reason);
                false
            }
            None => true,
        });
        inner.retired.retain(|(conn, _)| match refusal(&conn.remote_peer()) {
            Some(reason) => {
                conn.close(&reason);
                false
            }
            None => true,
        });
    }

    /// Sends a datagram to `peer` over its open connection. Returns false when there is none.
    pub fn send_datagram(&self, peer: &PeerId, data: Bytes) -> bool {
        let Some(conn) = self.get(peer) else { return false };
        let len = data.len() as u64;
        let sent = conn.send_datagram(data).is_ok();
        if sent {
            self.datagram_bytes_sent.increment(len);
        }
        sent
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every connection and stops every task; later connections are refused.
    pub fn close(&self, reason: &str) {
        let mut inner = self.lock();
        inner.closed = true;
        for (_, entry) in inner.conns.drain() {
            entry.conn.close(reason);
        }
        for (conn, _) in inner.retired.drain(..) {
            conn.close(reason);
        }
        inner.tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_transports::Keypair;
    use colony_transports::mem::MemHub;

    fn pool(hub: &MemHub, keypair: &Keypair, max_connections: usize, idle_timeout: Duration) -> Arc<Pool> {
        Pool::new(
            hub.transport(keypair),
            Arc::new(Router::default()),
            Arc::new(|_, _| {}),
            Arc::new(|_, _| {}),
            PoolLimits {
                max_connections,
                idle_timeout,
                dial_timeout: Duration::from_secs(5),
            },
            tokio::runtime::Handle::current(),
        )
    }

    /// A listening peer on `hub` at `mem://name`, accepting and keeping connections.
    async fn listener(hub: &MemHub, name: &str) -> (Keypair, tokio::task::JoinHandle<()>) {
        let keypair = Keypair::generate();
        let mut listener = hub
            .transport(&keypair)
            .listen(&format!("mem://{name}").parse().unwrap())
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok(conn) = listener.accept().await {
                held.push(conn);
            }
        });
        (keypair, task)
    }

    #[tokio::test]
    async fn the_least_recently_used_unpinned_connection_goes_first() {
        let hub = MemHub::new();
        let me = Keypair::generate();
        let pool = pool(&hub, &me, 2, Duration::from_secs(60));
        let mut peers = Vec::new();
        for name in ["p0", "p1", "p2"] {
            peers.push(listener(&hub, name).await);
        }
        let c0 = pool.dial(&"mem://p0".parse().unwrap()).await.unwrap();
        pool.pin(&c0.remote_peer());
        let c1 = pool.dial(&"mem://p1".parse().unwrap()).await.unwrap();
        let c2 = pool.dial(&"mem://p2".parse().unwrap()).await.unwrap();
        assert_eq!(pool.len(), 2);
        assert!(c0.close_reason().is_none(), "pinned connections stay");
        assert!(c1.close_reason().is_some(), "the least recently used one is closed");
        assert!(c2.close_reason().is_none());
        assert!(pool.is_connected(&c2.remote_peer()) && !pool.is_connected(&c1.remote_peer()));
        pool.close("test over");
        assert!(c0.close_reason().is_some() && c2.close_reason().is_some());
        for (_, task) in peers {
            task.abort();
        }
    }

    #[tokio::test]
    async fn a_replaced_connection_is_served_then_closed_after_the_idle_timeout() {
        let hub = MemHub::new();
        let me = Keypair::generate();
        let pool = pool(&hub, &me, 8, Duration::from_millis(50));
        let (_peer, task) = listener(&hub, "twice").await;
        let first = pool.dial(&"mem://twice".parse().unwrap()).await.unwrap();
        let second = pool.dial(&"mem://twice".parse().unwrap()).await.unwrap();
        assert_eq!(pool.len(), 1);
        assert!(pool.get(&second.remote_peer()).unwrap().same_as(&second));
        assert!(first.close_reason().is_none(), "the replaced connection is still open");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            pool.is_connected(&second.remote_peer()),
            "the newer connection is the one in use"
        );
        pool.pin(&second.remote_peer());
        pool.sweep();
        assert!(first.close_reason().is_some(), "closed after the idle timeout");
        assert!(second.close_reason().is_none(), "pinned, so not idle-closed");
        pool.close("test over");
        task.abort();
    }
}
