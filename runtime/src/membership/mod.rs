//! Membership: the peers of a run find each other through any one known address, notice within seconds who
//! died, and share the run's signed records.
//!
//! - **SWIM** (the `foca` crate) over transport datagrams: probes, suspicion, graceful leave, and rejoin
//!   under a new generation after being declared dead. The [`actor::MembershipActor`] owns it.
//! - **Join** ([`join`]): one request to any initial peer checks the run and the clock skew and brings back
//!   every member that peer knows; the joiner retries the initial peers with backoff until
//!   `bootstrap_timeout`, then fails naming every address and why.
//! - **Records** reach every member twice over: piggybacked on SWIM packets ([`broadcast`]) for speed, and
//!   by a periodic anti-entropy exchange with a random member ([`crate::records::sync`]) for certainty.
//!   A newcomer catches up in its first exchange, with its bootstrap peer, right after joining.
//! - **Reads are local**: [`Membership::get`], [`Membership::members`] and [`Membership::subscribe`] never
//!   touch the network.
//! - **Access control** ([`access`]): the run's [`AccessPolicy`] (open, an allowlist, or membership
//!   certificates of an authority) is checked on every connection, dialed or accepted, before anything else
//!   crosses it, and on the owner of every record, however it arrived. A refused joiner fails at once with
//!   the reason ([`MembershipError::Refused`]); [`Membership::access`] counts the refusals.
//! - **Other protocols share the connections**: [`Membership::start_with`] serves them on the same router,
//!   and [`Membership::connector`] gives a connection to a member by peer id (client-mode members over the
//!   connection they opened), so matchmaking and all-reduce need no connections of their own.

pub mod access;
pub mod actor;
pub mod broadcast;
pub mod identity;
pub mod join;
pub mod pool;

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, ArbiterHandle};
use bytes::Bytes;
use colony_transports::access::{AccessControl, AccessError, AccessPolicy, Certificate};
use colony_transports::rpc::{Router, StreamConfig};
use colony_transports::{Address, Connection, Keypair, PeerId, Scheme, Transport, TransportError};
use tokio::sync::broadcast as channel;
use tokio::task::JoinSet;

pub use identity::{MemberId, Role};
pub use pool::PoolLimits;

use self::actor::MembershipActor;
use crate::records::replica::{PublishLimits, Refused, Replica, Subscription};
use crate::records::sync::{self, Clock};
use crate::records::{Record, RecordLimits, RecordStore, Schemas, Stored, Subkey, Time, View};

/// SWIM's timing and sizes.
#[derive(Debug, Clone)]
pub struct SwimConfig {
    /// How often each member probes a random other member.
    pub probe_period: Duration,
    /// How long a probe waits for a direct answer before asking others to probe indirectly.
    pub probe_rtt: Duration,
    /// How many members are asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspected member has to refute before it is declared dead.
    pub suspect_to_down_after: Duration,
    /// How often each member gossips updates to `gossip_fanout` random members.
    pub gossip_interval: Duration,
    /// Members gossiped to per interval.
    pub gossip_fanout: usize,
    /// How many times each update is piggybacked (more reaches larger swarms more surely).
    pub max_transmissions: u8,
    /// Largest SWIM packet, bytes; `None` picks by transport: 1,100 for QUIC (whose datagrams must fit a
    /// network packet), 8,192 for TCP and in-process connections (where datagrams are frames).
    pub max_packet_size: Option<usize>,
    /// How often a member contacts two members it believes dead, so that the two sides of a healed
    /// partition (or a revived peer) find each other again.
    pub down_announce_interval: Duration,
    /// How often a member asks a random member for members it may not know (one packet of them). Gossip
    /// spreads each join a bounded number of times, so peers that joined at about the same time can miss
    /// each other; these requests fill such gaps within seconds.
    pub announce_interval: Duration,
    /// Highest local health score (after Lifeguard's local health multiplier; 0 turns it off). A peer
    /// whose membership timers fire more than half a `probe_rtt` late is overloaded: each such timer
    /// raises its score by one, each probe period of timers on time lowers it by one, and the timers of
    /// failure detection it sets (probe period, probe RTT, suspicion) are stretched by `1 + score`. An
    /// overloaded peer then waits longer for acks that sit behind its own backlog before it suspects their
    /// senders, gives suspected members longer to refute, and probes less while it is behind; gossip and
    /// announcements keep their pace. A peer on time is unaffected.
    pub max_local_health: u32,
}

impl Default for SwimConfig {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_millis(1000),
            probe_rtt: Duration::from_millis(400),
            indirect_probes: 3,
            suspect_to_down_after: Duration::from_secs(3),
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            max_transmissions: 10,
            max_packet_size: None,
            down_announce_interval: Duration::from_secs(5),
            announce_interval: Duration::from_secs(1),
            max_local_health: 4,
        }
    }
}

impl SwimConfig {
    /// How long a dead member stays listed at most. When its connections break (a crashed process on TCP),
    /// it is suspected at once and dropped after the suspicion time. When it falls silent without breaking
    /// them (QUIC, a cut cable), some member's probe must fail first: up to two probe periods until it is
    /// picked, one until the failure is counted; then the suspicion time; plus one probe period for
    /// dissemination and scheduling delays.
    pub fn failure_detection_time(&self) -> Duration {
        self.probe_period * 4 + self.suspect_to_down_after
    }

    fn validate(&self) -> Result<(), String> {
        if self.probe_rtt.is_zero() || self.probe_rtt >= self.probe_period {
            return Err(format!(
                "swim.probe_rtt ({:?}) must be above zero and below swim.probe_period ({:?})",
                self.probe_rtt, self.probe_period
            ));
        }
        if self.suspect_to_down_after.is_zero()
            || self.gossip_interval.is_zero()
            || self.down_announce_interval.is_zero()
            || self.announce_interval.is_zero()
        {
            return Err("swim's intervals and swim.suspect_to_down_after must be above zero".into());
        }
        if self.indirect_probes == 0 || self.gossip_fanout == 0 || self.max_transmissions == 0 {
            return Err(
                "swim.indirect_probes, swim.gossip_fanout and swim.max_transmissions must be at least 1".into(),
            );
        }
        if let Some(size) = self.max_packet_size
            && !(400..=16_000).contains(&size)
        {
            return Err(format!("swim.max_packet_size {size} is outside 400..=16000 bytes"));
        }
        Ok(())
    }

    /// The packet size in force on `scheme`.
    pub fn packet_size(&self, scheme: Scheme) -> usize {
        self.max_packet_size.unwrap_or(match scheme {
            Scheme::Quic => 1100,
            Scheme::Tcp | Scheme::Mem => 8192,
        })
    }

    fn to_foca(&self, scheme: Scheme) -> foca::Config {
        let nonzero = |n: usize| NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN);
        let mut config = foca::Config::new_lan(NonZeroU32::MIN);
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.num_indirect_probes = nonzero(self.indirect_probes);
        config.suspect_to_down_after = self.suspect_to_down_after;
        config.max_transmissions = NonZeroU8::new(self.max_transmissions).unwrap_or(NonZeroU8::MIN);
        config.max_packet_size = nonzero(self.packet_size(scheme));
        config.notify_down_members = true;
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_interval,
            num_members: nonzero(self.gossip_fanout),
        });
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.announce_interval,
            num_members: NonZeroUsize::MIN,
        });
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.down_announce_interval,
            num_members: nonzero(2),
        });
        config
    }
}

/// Everything about how a peer takes part in membership.
#[derive(Clone)]
pub struct MembershipConfig {
    /// The run: records of other runs are refused, peers of other runs are not admitted.
    pub run_id: String,
    /// Where to listen; `None` makes this peer a client-mode member that nobody dials.
    pub listen: Option<Address>,
    /// The address others dial, when it is not the bound one: listening on `0.0.0.0`, behind a NAT's port
    /// forward or a proxy. Same scheme as `listen`; a port of 0 keeps the bound port. `None`: the bound
    /// address.
    pub advertise: Option<Address>,
    /// Peers to join through; empty for the first (bootstrap) peer.
    pub initial_peers: Vec<Address>,
    /// This peer's role when it listens ([`Role::Trainer`] or [`Role::Auxiliary`]).
    pub role: Role,
    /// Declared bandwidth, megabits per second (0: not declared).
    pub bandwidth_mbps: f32,
    /// How long to keep trying the initial peers before giving up.
    pub bootstrap_timeout: Duration,
    /// How long one join attempt may take.
    pub join_attempt_timeout: Duration,
    /// Largest accepted clock difference with the bootstrap peer.
    pub max_clock_skew: Duration,
    /// SWIM's timing.
    pub swim: SwimConfig,
    /// How often an anti-entropy exchange runs with a random member, in swarms of up to 100 members;
    /// larger swarms stretch it in proportion (every 10 intervals with 1,000 members), so the swarm runs
    /// about 100 exchanges per interval whatever its size.
    pub sync_interval: Duration,
    /// Connection limits.
    pub pool: PoolLimits,
    /// Record size and count limits.
    pub record_limits: RecordLimits,
    /// Publishing rate limits.
    pub publish_limits: PublishLimits,
    /// Frame limits and timeouts of the stream protocols.
    pub stream: StreamConfig,
    /// Messages the membership actor queues at most (datagrams beyond are dropped, as a network would).
    pub mailbox_capacity: usize,
    /// The clock records expire by, in seconds since the Unix epoch (injectable for tests); certificates
    /// are checked against it too.
    pub clock: Clock,
    /// Who may take part: [`AccessPolicy::Open`] (the default), an allowlist, or certificates from an
    /// authority (whose `run_id` must be this run's). Checked on every connection and on the owner of every
    /// record.
    pub access: AccessPolicy,
    /// This peer's membership certificate, presented on every connection (and published as its access
    /// record, see [`access`]); required when `access` admits by certificate.
    pub certificate: Option<Certificate>,
}

impl std::fmt::Debug for MembershipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MembershipConfig")
            .field("run_id", &self.run_id)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("initial_peers", &self.initial_peers)
            .field("role", &self.role)
            .field("access", &self.access)
            .field("certificate", &self.certificate)
            .field("swim", &self.swim)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch by the system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    })
}

impl MembershipConfig {
    /// Defaults for `run_id`, listening at `listen` (`None`: client mode).
    pub fn new(run_id: impl Into<String>, listen: Option<Address>) -> Self {
        Self {
            run_id: run_id.into(),
            listen,
            advertise: None,
            initial_peers: Vec::new(),
            role: Role::Trainer,
            bandwidth_mbps: 0.0,
            bootstrap_timeout: Duration::from_secs(30),
            join_attempt_timeout: Duration::from_secs(5),
            max_clock_skew: Duration::from_secs(3),
            swim: SwimConfig::default(),
            sync_interval: Duration::from_secs(1),
            pool: PoolLimits {
                max_connections: 256,
                idle_timeout: Duration::from_secs(120),
                dial_timeout: Duration::from_secs(5),
            },
            record_limits: RecordLimits::default(),
            publish_limits: PublishLimits::default(),
            stream: StreamConfig::default(),
            mailbox_capacity: 4096,
            clock: system_clock(),
            access: AccessPolicy::Open,
            certificate: None,
        }
    }

    fn validate(&self) -> Result<(), MembershipError> {
        let bad = |message: String| Err(MembershipError::Config(message));
        if self.run_id.is_empty() || self.run_id.len() > 128 {
            return bad(format!("run_id must be 1 to 128 bytes, not {}", self.run_id.len()));
        }
        if self.listen.is_none() && self.role == Role::Auxiliary {
            return bad("an auxiliary peer reduces for others, so it must listen (set listen)".into());
        }
        if let Some(advertise) = &self.advertise {
            let Some(listen) = &self.listen else {
                return bad(format!(
                    "advertise {advertise} needs listen: a client-mode peer is dialled by nobody"
                ));
            };
            if advertise.scheme() != listen.scheme() {
                return bad(format!(
                    "advertise {advertise} must have the scheme of listen {listen}: others reach this peer \
                     over the transport it listens with"
                ));
            }
        }
        if !self.bandwidth_mbps.is_finite() || self.bandwidth_mbps < 0.0 {
            return bad(format!(
                "bandwidth_mbps {} must be a finite number >= 0",
                self.bandwidth_mbps
            ));
        }
        if self.sync_interval.is_zero() || self.bootstrap_timeout.is_zero() || self.join_attempt_timeout.is_zero() {
            return bad("sync_interval, bootstrap_timeout and join_attempt_timeout must be above zero".into());
        }
        if let AccessPolicy::Certificates { run_id, .. } = &self.access
            && *run_id != self.run_id
        {
            return bad(format!(
                "the access policy admits certificates for run '{run_id}', but this peer joins run '{}'",
                self.run_id
            ));
        }
        if self.pool.max_connections == 0 {
            return bad("pool.max_connections must be at least 1".into());
        }
        self.swim.validate().map_err(MembershipError::Config)
    }
}

/// The address others dial: `advertise` when set (its port 0 replaced by the bound port), else `bound`.
fn advertised(bound: Address, advertise: Option<&Address>) -> Address {
    let Some(advertise) = advertise else {
        return bound;
    };
    let bound_port = bound.location().rsplit_once(':').map(|(_, port)| port);
    match (advertise.location().rsplit_once(':'), bound_port) {
        (Some((host, "0")), Some(port)) => {
            Address::new(advertise.scheme(), format!("{host}:{port}"), None).unwrap_or_else(|_| advertise.clone())
        }
        _ => advertise.clone(),
    }
}

/// A member as others see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberInfo {
    /// The peer.
    pub peer: PeerId,
    /// Its role.
    pub role: Role,
    /// Where to dial it (`None` for client-mode peers).
    pub address: Option<Address>,
    /// Declared bandwidth, megabits per second.
    pub bandwidth_mbps: f32,
    /// Which start of the peer this is.
    pub generation: u64,
}

impl From<&MemberId> for MemberInfo {
    fn from(id: &MemberId) -> Self {
        Self {
            peer: id.peer,
            role: id.role,
            address: id.address.clone(),
            bandwidth_mbps: id.bandwidth_mbps,
            generation: id.generation,
        }
    }
}

/// A change of the member list.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    /// A member joined (or came back).
    Joined(MemberInfo),
    /// A member left or was declared dead.
    Left(PeerId),
    /// This peer was declared dead by the others and rejoined under a new generation.
    Rejoined(u64),
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// A configuration value is invalid.
    #[error("invalid membership configuration: {0}")]
    Config(String),
    /// Listening failed.
    #[error("cannot listen: {0}")]
    Listen(#[source] TransportError),
    /// No initial peer admitted this peer in time.
    #[error("could not join the swarm within {timeout:?}; tried {}", describe_attempts(.attempts))]
    Bootstrap {
        /// The bootstrap timeout.
        timeout: Duration,
        /// Each address tried, with the last reason it failed.
        attempts: Vec<(Address, String)>,
    },
    /// The bootstrap peer's clock is too far from this peer's.
    #[error(
        "the clock of the peer at {address} differs from this peer's by {skew_secs:+.3} s, more than the bound of \
         {bound:?}; synchronise the clocks (NTP) or raise max_clock_skew"
    )]
    ClockSkew {
        /// The bootstrap peer.
        address: Address,
        /// Its clock minus this peer's, seconds.
        skew_secs: f64,
        /// The configured bound.
        bound: Duration,
    },
    /// This peer's access settings cannot be used (its own certificate is missing, expired or for another
    /// run or authority; an empty allowlist).
    #[error("access control: {0}")]
    Access(#[source] Box<AccessError>),
    /// This peer's access policy refused the bootstrap peer.
    #[error("this peer refuses the peer at {address}: {reason}")]
    NotAdmitted {
        /// The bootstrap peer.
        address: Address,
        /// Why.
        reason: String,
    },
    /// The bootstrap peer refused for another reason (another run, a bad identity, its access policy).
    #[error("the peer at {address} refused to admit this peer: {reason}")]
    Refused {
        /// The bootstrap peer.
        address: Address,
        /// Its reason.
        reason: String,
    },
}

fn describe_attempts(attempts: &[(Address, String)]) -> String {
    if attempts.is_empty() {
        return "no address".into();
    }
    attempts
        .iter()
        .map(|(address, error)| format!("{address} ({error})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A monotonic counter, also exported as a metric.
#[derive(Debug)]
pub struct Counter {
    name: &'static str,
    value: AtomicU64,
}

impl Counter {
    const fn new(name: &'static str) -> Self {
        Self {
            name,
            value: AtomicU64::new(0),
        }
    }

    pub(crate) fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(self.name).increment(1);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// What the membership layer counted.
#[derive(Debug)]
pub struct MembershipCounters {
    /// SWIM packets sent.
    pub datagrams_sent: Counter,
    /// SWIM packets received.
    pub datagrams_received: Counter,
    /// SWIM packets that did not decode or that SWIM refused.
    pub datagrams_malformed: Counter,
    /// SWIM packets whose claimed sender was not the connection's proven peer.
    pub datagrams_spoofed: Counter,
    /// SWIM packets dropped because the member could not be reached.
    pub datagrams_unreachable: Counter,
}

impl Default for MembershipCounters {
    fn default() -> Self {
        Self {
            datagrams_sent: Counter::new("colony_membership_datagrams_sent_total"),
            datagrams_received: Counter::new("colony_membership_datagrams_received_total"),
            datagrams_malformed: Counter::new("colony_membership_datagrams_malformed_total"),
            datagrams_spoofed: Counter::new("colony_membership_datagrams_spoofed_total"),
            datagrams_unreachable: Counter::new("colony_membership_datagrams_unreachable_total"),
        }
    }
}

/// State shared by the actor, the handle and the data-plane tasks.
pub(crate) struct Shared {
    pub(crate) config: MembershipConfig,
    pub(crate) pool: Arc<pool::Pool>,
    pub(crate) replica: Arc<Replica>,
    pub(crate) members: RwLock<HashMap<PeerId, MemberInfo>>,
    /// Members suspected since their connections broke and could not be dialed again: still listed until
    /// the suspicion time runs out (or they refute), but most likely gone.
    pub(crate) suspected: RwLock<HashSet<PeerId>>,
    pub(crate) events: channel::Sender<MembershipEvent>,
    pub(crate) counters: MembershipCounters,
    /// The run's access control, applied to every connection and every record.
    pub(crate) access: Arc<AccessControl>,
    /// The SWIM packet size in force on this peer's transport.
    packet_size: usize,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<JoinSet<()>>,
}

impl Shared {
    /// Spawns a data-plane task that shutdown cancels.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(task, &self.runtime);
    }

    pub(crate) fn members_mut(&self) -> RwLockWriteGuard<'_, HashMap<PeerId, MemberInfo>> {
        self.members.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_suspected(&self, peer: &PeerId) -> bool {
        self.suspected.read().unwrap_or_else(|p| p.into_inner()).contains(peer)
    }

    pub(crate) fn suspected_mut(&self) -> RwLockWriteGuard<'_, HashSet<PeerId>> {
        self.suspected.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The actor threads of this process: actix runs actors on arbiter threads of its own, beside whatever
/// tokio runtime the embedding program uses. Started on first use; membership actors are spread over them.
pub(crate) fn arbiter() -> ArbiterHandle {
    static ARBITERS: OnceLock<Vec<ArbiterHandle>> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let arbiters = ARBITERS.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("colony-actors".into()).spawn(move || {
            let system = actix::System::new();
            let handles: Vec<ArbiterHandle> = system.block_on(async move {
                let mut handles = vec![actix::Arbiter::current()];
                for _ in 1..threads {
                    let arbiter = actix::Arbiter::new();
                    handles.push(arbiter.handle());
                }
                handles
            });
            let _ = tx.send(handles);
            let _ = system.run();
        });
        match spawned.ok().and_then(|_| rx.recv().ok()) {
            Some(handles) => handles,
            None => panic!("cannot start the actor thread: the process is out of threads"),
        }
    });
    let index = NEXT.fetch_add(1, Ordering::Relaxed) as usize % arbiters.len();
    arbiters[index].clone()
}

struct Inner {
    shared: Arc<Shared>,
    actor: Addr<MembershipActor>,
    keypair: Arc<Keypair>,
    local: MemberId,
    stopped: AtomicBool,
}

impl Inner {
    fn stop(&self) {
        if !self.stopped.swap(true, Ordering::SeqCst) {
            self.actor.do_send(actor::Stop);
            self.shared.pool.close("peer shut down");
            self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner()).abort_all();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One peer's membership in a run: a handle to the membership actor and the local record replica.
/// Cheap to clone; the peer stops when the last clone is dropped (without telling the others: call
/// [`Membership::leave`] for a graceful exit).
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

impl Membership {
    /// Starts membership: listens (unless client mode), then joins through the initial peers (unless there
    /// are none: then this is the first peer of the run). Must be called inside a tokio runtime, which then
    /// carries the data plane (connections, exchanges).
    pub async fn start(
        config: MembershipConfig,
        keypair: Arc<Keypair>,
        transport: Arc<dyn Transport>,
        schemas: Schemas,
    ) -> Result<Self, MembershipError> {
        Self::start_with(config, keypair, transport, schemas, |_| {}).await
    }

    /// [`Membership::start`], also serving the stream protocols that `protocols` registers on the router.
    ///
    /// Every connection of the peer (dialed or accepted, gossip's included) is served by one router, so the
    /// other protocols of a peer (matchmaking, all-reduce, state transfer) must be on it before the first
    /// connection opens: they are registered here, at start. Handlers that need a component created later
    /// (an actor that needs this `Membership`) reach it through a slot they fill once it exists.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use colony::membership::{Membership, MembershipConfig};
    /// # use colony::records::Schemas;
    /// # use colony_transports::{Keypair, mem::MemHub, wire::ProtocolId};
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let keypair = Arc::new(Keypair::generate());
    /// let transport = MemHub::new().transport(&keypair);
    /// let config = MembershipConfig::new("run", Some("mem://a".parse()?));
    /// let echo = ProtocolId::new("echo", 1)?;
    /// let membership = Membership::start_with(config, keypair, transport, Schemas::default(), |router| {
    ///     router.rpc(echo, |_peer, text: String, payload| async move { Ok((text, payload)) });
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_with(
        config: MembershipConfig,
        keypair: Arc<Keypair>,
        transport: Arc<dyn Transport>,
        schemas: Schemas,
        protocols: impl FnOnce(&mut Router),
    ) -> Result<Self, MembershipError> {
        config.validate()?;
        let local_peer = keypair.peer_id();
        let records_clock = config.clock.clone();
        let unix_clock: colony_transports::access::UnixClock = Arc::new(move || records_clock().max(0.0) as u64);
        let access = AccessControl::new(
            local_peer,
            config.access.clone(),
            config.certificate.clone(),
            unix_clock,
        )
        .map_err(|error| MembershipError::Access(Box::new(error)))?;
        let access = Arc::new(access);
        // Every connection, dialed or accepted, passes the access exchange before anything else uses it.
        let transport = access.wrap(transport);
        let mut schemas = schemas;
        access::register_schema(&mut schemas);
        let listener = match &config.listen {
            Some(address) => Some(transport.listen(address).await.map_err(MembershipError::Listen)?),
            None => None,
        };
        let address = listener
            .as_ref()
            .map(|l| advertised(l.local_address(), config.advertise.as_ref()).with_peer(local_peer));
        let role = if address.is_none() { Role::Client } else { config.role };
        let local = MemberId {
            peer: local_peer,
            generation: ((config.clock)() * 1000.0).max(0.0) as u64,
            role,
            address,
            bandwidth_mbps: config.bandwidth_mbps,
        };

        let store = RecordStore::new(config.run_id.clone(), config.record_limits.clone(), schemas);
        let admission = Arc::new(access::RecordAdmission::new(access.clone()));
        let replica =
            Arc::new(Replica::new(store, config.clock.clone(), config.publish_limits).with_admission(admission));
        let actor_cell: Arc<OnceLock<Addr<MembershipActor>>> = Arc::new(OnceLock::new());

        let mut router = Router::with_config(config.stream);
        protocols(&mut router);
        // Membership's own protocols are registered last, so that they cannot be replaced by mistake.
        sync::serve(&mut router, replica.clone());
        let admit_cell = actor_cell.clone();
        join::serve(
            &mut router,
            join::Admission {
                run_id: config.run_id.clone(),
                max_skew: config.max_clock_skew.as_secs_f64(),
                max_transit: config.join_attempt_timeout.as_secs_f64(),
                clock: config.clock.clone(),
                admit: move |joiner: MemberId| {
                    let actor = admit_cell.get().cloned();
                    async move { ask(&actor?, actor::Admit(joiner)).await.ok() }
                },
            },
        );
        let sink_cell = actor_cell.clone();
        let datagrams: pool::DatagramSink = Arc::new(move |from, data| {
            if let Some(actor) = sink_cell.get() {
                // A full mailbox drops the packet, as a congested network would.
                let _ = actor.try_send(actor::Datagram { from, data });
            }
        });
        let loss_cell = actor_cell.clone();
        let losses: pool::LossSink = Arc::new(move |peer, reason| {
            if let Some(actor) = loss_cell.get() {
                let _ = actor.try_send(actor::ConnectionLost { peer, reason });
            }
        });
        let runtime = tokio::runtime::Handle::current();
        let scheme = transport.scheme();
        let pool = pool::Pool::new(
            transport,
            Arc::new(router),
            datagrams,
            losses,
            config.pool,
            runtime.clone(),
        );
        let shared = Arc::new(Shared {
            config: config.clone(),
            pool: pool.clone(),
            replica: replica.clone(),
            members: RwLock::new(HashMap::new()),
            suspected: RwLock::new(HashSet::new()),
            events: channel::channel(1024).0,
            counters: MembershipCounters::default(),
            access,
            packet_size: config.swim.packet_size(scheme),
            runtime,
            tasks: Mutex::new(JoinSet::new()),
        });

        let fresh_records = Arc::new(AtomicBool::new(false));
        let swim = foca::Foca::with_custom_broadcast(
            local.clone(),
            config.swim.to_foca(scheme),
            rand::make_rng(),
            identity::CachingCodec::default(),
            broadcast::RecordBroadcasts::new(replica, fresh_records.clone()),
        );
        let actor_shared = shared.clone();
        let actor = MembershipActor::start_in_arbiter(&arbiter(), move |_| {
            MembershipActor::new(swim, fresh_records, actor_shared)
        });
        let _ = actor_cell.set(actor.clone());

        if let Some(mut listener) = listener {
            let pool = pool.clone();
            shared.spawn(async move {
                while let Ok(conn) = listener.accept().await {
                    pool.add(conn, false);
                }
            });
        }
        let membership = Self {
            inner: Arc::new(Inner {
                shared,
                actor,
                keypair,
                local,
                stopped: AtomicBool::new(false),
            }),
        };
        if membership.publish_access_record() {
            let weak = Arc::downgrade(&membership.inner);
            membership.inner.shared.spawn(async move {
                loop {
                    tokio::time::sleep(access::ACCESS_RECORD_REFRESH).await;
                    // A weak handle: this task must not keep the peer alive; shutdown aborts it.
                    let Some(inner) = weak.upgrade() else { return };
                    if !(Membership { inner }).publish_access_record() {
                        return;
                    }
                }
            });
        }
        if !config.initial_peers.is_empty() {
            membership.join().await?;
        }
        Ok(membership)
    }

    /// Publishes (again) this peer's access record, when it has a certificate that has not expired.
    /// Returns whether it did.
    fn publish_access_record(&self) -> bool {
        let shared = &self.inner.shared;
        let Some(certificate) = shared.access.certificate() else {
            return false;
        };
        let Some(expiration) = access::access_record_expiration(certificate, shared.replica.now()) else {
            tracing::warn!(
                "this peer's membership certificate expired at {}; peers of the run will refuse it",
                colony_transports::access::format_unix_time(certificate.not_after())
            );
            return false;
        };
        let value = Bytes::from(certificate.encode());
        let subkey = Some(Subkey::Peer(self.local_peer()));
        match self.publish(access::ACCESS_KEY, subkey, Some(value), expiration) {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, "could not publish this peer's access record");
                true
            }
        }
    }

    async fn join(&self) -> Result<(), MembershipError> {
        let shared = &self.inner.shared;
        let config = &shared.config;
        let deadline = Instant::now() + config.bootstrap_timeout;
        let mut last_error: Vec<(Address, String)> = config
            .initial_peers
            .iter()
            .map(|a| (a.clone(), "not tried".to_owned()))
            .collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            for (index, address) in config.initial_peers.iter().enumerate() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let attempt = tokio::time::timeout(left.min(config.join_attempt_timeout), self.join_via(address));
                let error = match attempt.await {
                    Ok(Ok(conn)) => {
                        // Catch up on the records in one exchange (each step bounded by the stream's message
                        // timeout); the periodic exchanges and gossip do the rest.
                        match sync::sync_with(&conn, &shared.replica, &config.stream).await {
                            Ok(applied) => tracing::debug!(?applied, "caught up on records"),
                            Err(error) => {
                                tracing::warn!(%error, "first records exchange failed; later exchanges will catch up")
                            }
                        }
                        return Ok(());
                    }
                    Ok(Err(Attempt::Fatal(error))) => return Err(error),
                    Ok(Err(Attempt::Retry(error))) => error,
                    Err(_) => format!("no answer within {:?}", left.min(config.join_attempt_timeout)),
                };
                tracing::debug!(%address, %error, "join attempt failed");
                last_error[index].1 = error;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MembershipError::Bootstrap {
                    timeout: config.bootstrap_timeout,
                    attempts: last_error,
                });
            }
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn join_via(&self, address: &Address) -> Result<Connection, Attempt> {
        let shared = &self.inner.shared;
        let config = &shared.config;
        if address.peer() == Some(self.local_peer()) {
            return Err(Attempt::Retry("that address is this peer".into()));
        }
        let conn = shared.pool.dial(address).await.map_err(|error| match error {
            // Access refusals are final: the run's policy will not change between attempts.
            TransportError::AccessRefused { reason, .. } => Attempt::Fatal(MembershipError::Refused {
                address: address.clone(),
                reason,
            }),
            TransportError::NotAdmitted { reason, .. } => Attempt::Fatal(MembershipError::NotAdmitted {
                address: address.clone(),
                reason,
            }),
            other => Attempt::Retry(other.to_string()),
        })?;
        if conn.remote_peer() == self.local_peer() {
            return Err(Attempt::Retry("that address is this peer".into()));
        }
        let me = self.identity().await.map_err(Attempt::Retry)?;
        let joined = join::request(
            &conn,
            &config.run_id,
            &me,
            &config.clock,
            config.join_attempt_timeout,
            &config.stream,
        )
        .await;
        let bound = config.max_clock_skew;
        let joined = match joined {
            Ok(joined) => joined,
            Err(join::AttemptError::Refused {
                outcome,
                skew,
                round_trip,
                ..
            }) if outcome == join::outcome::CLOCK_SKEW && beyond(skew, round_trip, bound) => {
                return Err(Attempt::Fatal(MembershipError::ClockSkew {
                    address: address.clone(),
                    skew_secs: skew,
                    bound,
                }));
            }
            Err(join::AttemptError::Refused { outcome, message, .. }) if outcome != join::outcome::UNAVAILABLE => {
                return Err(Attempt::Fatal(MembershipError::Refused {
                    address: address.clone(),
                    reason: message,
                }));
            }
            Err(join::AttemptError::Refused { message, .. }) | Err(join::AttemptError::Failed(message)) => {
                return Err(Attempt::Retry(message));
            }
        };
        if beyond(joined.skew, joined.round_trip, bound) {
            return Err(Attempt::Fatal(MembershipError::ClockSkew {
                address: address.clone(),
                skew_secs: joined.skew,
                bound,
            }));
        }
        tracing::info!(%address, members = joined.members.len(), skew_secs = joined.skew, "joined the swarm");
        let learn = actor::Learn {
            bootstrap: joined.bootstrap,
            members: joined.members,
        };
        ask(&self.inner.actor, learn).await.map_err(Attempt::Retry)?;
        Ok(conn)
    }

    /// This peer's id.
    pub fn local_peer(&self) -> PeerId {
        self.inner.local.peer
    }

    /// The full dialable address of this peer (with its id), `None` in client mode.
    pub fn address(&self) -> Option<Address> {
        self.inner.local.address.clone()
    }

    /// This peer's role.
    pub fn role(&self) -> Role {
        self.inner.local.role
    }

    /// This peer's current member identity (its generation changes when it rejoins).
    pub async fn identity(&self) -> Result<MemberId, String> {
        ask(&self.inner.actor, actor::CurrentIdentity).await
    }

    /// Whether `peer` is another active member (not this peer). Local: no network round trip.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        let members = self.inner.shared.members.read().unwrap_or_else(|p| p.into_inner());
        members.contains_key(peer)
    }

    /// Whether this peer suspects member `peer`: its own connections to it broke and a new dial failed, so
    /// it has most likely crashed (suspicion that other members gossip is not reflected here). It stays a member until the suspicion time (`swim.suspect_to_down_after`) runs out
    /// without a refutation; meanwhile whoever counts the peers expected in a round should not wait for it.
    pub fn is_suspected(&self, peer: &PeerId) -> bool {
        self.inner.shared.is_suspected(peer)
    }

    /// The other active members, sorted by peer id. Local: no network round trip.
    pub fn members(&self) -> Vec<MemberInfo> {
        let members = self.inner.shared.members.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<MemberInfo> = members.values().cloned().collect();
        list.sort_by_key(|m| m.peer);
        list
    }

    /// Member changes from now on.
    pub fn events(&self) -> channel::Receiver<MembershipEvent> {
        self.inner.shared.events.subscribe()
    }

    /// Publishes a record signed by this peer: `subkey` is usually [`Subkey::Peer`] of this peer (only this
    /// peer can write it); `value: None` deletes. Applied locally at once, then gossiped.
    pub fn publish(
        &self,
        key: impl Into<String>,
        subkey: Option<Subkey>,
        value: Option<Bytes>,
        expiration: Time,
    ) -> Result<Stored, Refused> {
        let shared = &self.inner.shared;
        let record = Record::signed(
            &shared.config.run_id,
            &self.inner.keypair,
            key,
            subkey,
            value,
            expiration,
        );
        let encoded = broadcast::encode(&record);
        let stored = shared.replica.apply(record, self.local_peer())?;
        if stored != Stored::Outdated
            && let Some(encoded) = encoded
            && encoded.len() + 64 < shared.packet_size
        {
            // A full mailbox leaves it to the anti-entropy exchanges.
            let _ = self.inner.actor.try_send(actor::AddBroadcast(encoded));
        }
        Ok(stored)
    }

    /// What a read of `key` sees now. Local: no network round trip.
    pub fn get(&self, key: &str) -> Option<View> {
        self.inner.shared.replica.get(key)
    }

    /// Changes of keys starting with `prefix`, from now on.
    pub fn subscribe(&self, prefix: impl Into<String>) -> Subscription {
        self.inner.shared.replica.subscribe(prefix)
    }

    /// The local replica of the run's records (counters of stored and refused records).
    pub fn replica(&self) -> &Arc<Replica> {
        &self.inner.shared.replica
    }

    /// What the membership layer counted.
    pub fn counters(&self) -> &MembershipCounters {
        &self.inner.shared.counters
    }

    /// The run's access control as this peer applies it: its policy, and the connections it refused by
    /// reason ([`AccessControl::refused`]). Records refused because their owner is not admitted are counted
    /// by the replica ([`Replica::counters`], reason `not_admitted`).
    pub fn access(&self) -> &Arc<AccessControl> {
        &self.inner.shared.access
    }

    /// Connections to members by peer id, for protocols other than membership's (all-reduce, state
    /// transfer, matchmaking): the pool's open connection when there is one (the only way to reach a
    /// client-mode member, over the connection it opened), else a dial of the member's listed address.
    /// A peer that is neither connected nor a member cannot be reached.
    pub fn connector(&self) -> Arc<dyn colony_averaging::net::Connector> {
        Arc::new(MemberConnector {
            shared: self.inner.shared.clone(),
            local: self.local_peer(),
        })
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.inner.shared.pool.len()
    }

    /// The configuration in force.
    pub fn config(&self) -> &MembershipConfig {
        &self.inner.shared.config
    }

    /// Leaves the swarm gracefully (the others drop this peer at once instead of after the failure detection
    /// time), then stops.
    pub async fn leave(&self) {
        if !self.inner.stopped.load(Ordering::SeqCst) {
            let _ = ask(&self.inner.actor, actor::Leave).await;
            // Let the goodbye packets leave before the connections close.
            tokio::time::sleep(actor::LEAVE_FLUSH).await;
        }
        self.inner.stop();
    }

    /// Stops at once without telling the others (they notice within the failure detection time).
    pub fn shutdown(&self) {
        self.inner.stop();
    }
}

/// [`Membership::connector`]: the pool, addressed through the member list.
struct MemberConnector {
    shared: Arc<Shared>,
    local: PeerId,
}

type ConnectFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<Connection, colony_averaging::net::ConnectError>> + Send + 'a>>;

// The trait is declared with `async_trait`; this is the signature that macro expands to, written out so that
// the runtime needs no extra dependency.
impl colony_averaging::net::Connector for MemberConnector {
    fn connect<'a, 'b, 'f>(&'a self, peer: &'b PeerId) -> ConnectFuture<'f>
    where
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        Box::pin(self.connect_to(*peer))
    }

    fn is_gone(&self, peer: &PeerId) -> bool {
        self.shared.is_suspected(peer)
    }
}

impl MemberConnector {
    async fn connect_to(&self, peer: PeerId) -> Result<Connection, colony_averaging::net::ConnectError> {
        let peer = &peer;
        let error = |reason: String| colony_averaging::net::ConnectError { peer: *peer, reason };
        if *peer == self.local {
            return Err(error("that is this peer".into()));
        }
        let (known, address) = {
            let members = self.shared.members.read().unwrap_or_else(|p| p.into_inner());
            let member = members.get(peer);
            (member.is_some(), member.and_then(|member| member.address.clone()))
        };
        if address.is_none() && !self.shared.pool.is_connected(peer) {
            return Err(error(if known {
                "a client-mode member with no open connection to this peer".into()
            } else {
                "not a member of the run".into()
            }));
        }
        let conn = self.shared.pool.connect(*peer, address.as_ref()).await.map_err(error)?;
        match conn.close_reason() {
            // The pool closes what it is given once it has shut down.
            Some(reason) => Err(error(format!("connection closed: {reason}"))),
            None => Ok(conn),
        }
    }
}

/// Whether a skew estimated from a round trip is certainly beyond `bound`: the estimate (taken at the middle
/// of the round trip) is off by at most half the round trip, and a slow, loaded network must not make
/// well-synchronised peers refuse each other.
fn beyond(skew: f64, round_trip: f64, bound: Duration) -> bool {
    !skew.is_finite() || skew.abs() - round_trip / 2.0 > bound.as_secs_f64()
}

/// How long a request to the membership actor may wait (it answers in microseconds unless it is gone).
const ACTOR_TIMEOUT: Duration = Duration::from_secs(10);

async fn ask<M>(actor: &Addr<MembershipActor>, message: M) -> Result<M::Result, String>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    MembershipActor: actix::Handler<M>,
{
    match tokio::time::timeout(ACTOR_TIMEOUT, actor.send(message)).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(error)) => Err(format!("membership actor: {error}")),
        Err(_) => Err(format!("membership actor did not answer within {ACTOR_TIMEOUT:?}")),
    }
}

enum Attempt {
    Fatal(MembershipError),
    Retry(String),
}
