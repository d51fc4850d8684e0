//! How the averaging engine reaches other peers.
//!
//! The engine never dials by itself: it asks a [`Connector`] for a connection to a peer and serves its
//! protocols through a [`Router`] that its host runs on every connection. The runtime's connector is its
//! membership pool (one connection per peer, shared with gossip); [`Endpoint`] is a small stand-alone one for
//! tests, benchmarks and tools: it listens, serves a router on every connection it accepts or dials, and
//! keeps one connection per peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use colony_transports::rpc::Router;
use colony_transports::{Address, Connection, Listener, PeerId, Transport, TransportError};
use thiserror::Error;
use tokio::task::JoinHandle;

/// A peer could not be reached.
#[derive(Debug, Error, Clone)]
#[error("cannot reach peer {peer}: {reason}")]
pub struct ConnectError {
    /// The peer.
    pub peer: PeerId,
    /// Why (no known address, the dial failed, the connection closed).
    pub reason: String,
}

/// Gives connections to peers by id.
#[async_trait::async_trait]
pub trait Connector: Send + Sync + 'static {
    /// A live connection to `peer`, dialing one when none is open.
    async fn connect(&self, peer: &PeerId) -> Result<Connection, ConnectError>;

    /// Whether `peer` is known to be gone (its connections broke and it cannot be dialed): a reducer stops
    /// waiting for its parts at once instead of after `sender_timeout`. The default knows nothing.
    fn is_gone(&self, _peer: &PeerId) -> bool {
        false
    }
}

/// A listening peer that keeps one connection per remote peer and serves one [`Router`] on all of them.
/// Dropping the endpoint (or calling [`Endpoint::shutdown`]) stops its accept loop and the routers it runs.
pub struct Endpoint {
    inner: Arc<EndpointInner>,
    accept_task: JoinHandle<()>,
    local_address: Address,
}

struct EndpointInner {
    transport: Arc<dyn Transport>,
    router: Arc<Router>,
    addresses: Mutex<HashMap<PeerId, Address>>,
    connections: Mutex<HashMap<PeerId, (Connection, JoinHandle<()>)>>,
}

impl Endpoint {
    /// Listens on `address` with `transport` and serves `router` on every connection.
    pub async fn listen(
        transport: Arc<dyn Transport>,
        address: &Address,
        router: Router,
    ) -> Result<Self, TransportError> {
        let listener = transport.listen(address).await?;
        let local_address = listener.local_address().with_peer(transport.local_peer());
        let inner = Arc::new(EndpointInner {
            transport,
            router: Arc::new(router),
            addresses: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::downgrade(&inner)));
        Ok(Self {
            inner,
            accept_task,
            local_address,
        })
    }

    /// The address others dial, with this peer's id.
    pub fn local_address(&self) -> &Address {
        &self.local_address
    }

    /// This peer's id.
    pub fn local_peer(&self) -> PeerId {
        self.inner.transport.local_peer()
    }

    /// Remembers where `address`'s peer (which the address must name) listens.
    pub fn add_address(&self, address: Address) {
        if let Some(peer) = address.peer() {
            lock(&self.inner.addresses).insert(peer, address);
        }
    }

    /// A connector backed by this endpoint.
    pub fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(EndpointConnector(self.inner.clone()))
    }

    /// Closes every connection and stops serving.
    pub fn shutdown(&self) {
        self.accept_task.abort();
        for (_, (conn, task)) in lock(&self.inner.connections).drain() {
            task.abort();
            conn.close("endpoint shut down");
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps leaves them consistent (single inserts and removals).
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(mut listener: Listener, inner: std::sync::Weak<EndpointInner>) {
    while let Ok(conn) = listener.accept().await {
        let Some(inner) = inner.upgrade() else { return };
        inner.adopt(conn);
    }
}

impl EndpointInner {
    /// Serves the router on `conn` and makes it the connection to its peer (replacing a closed one).
    fn adopt(&self, conn: Connection) -> Connection {
        let peer = conn.remote_peer();
        let mut connections = lock(&self.connections);
        if let Some((existing, _)) = connections.get(&peer)
            && existing.close_reason().is_none()
        {
            // Keep serving the newcomer's streams, but prefer the connection we already use.
            tokio::spawn(self.router.clone().serve(conn));
            return existing.clone();
        }
        let task = tokio::spawn(self.router.clone().serve(conn.clone()));
        if let Some((_, old_task)) = connections.insert(peer, (conn.clone(), task)) {
            old_task.abort();
        }
        conn
    }
}

struct EndpointConnector(Arc<EndpointInner>);

#[async_trait::async_trait]
impl Connector for EndpointConnector {
    async fn connect(&self, peer: &PeerId) -> Result<Connection, ConnectError> {
        if let Some((conn, _)) = lock(&self.0.connections).get(peer)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let address = lock(&self.0.addresses).get(peer).cloned().ok_or_else(|| ConnectError {
            peer: *peer,
            reason: "no known address".into(),
        })?;
        let conn = self.0.transport.dial(&address).await.map_err(|error| ConnectError {
            peer: *peer,
            reason: error.to_string(),
        })?;
        Ok(self.0.adopt(conn))
    }
}
