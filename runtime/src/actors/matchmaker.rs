//! The matchmaker: one peer's shell around the matchmaking core ([`colony_averaging::matchmaking::Search`]).
//!
//! The actor feeds the core everything it must know, with the run's clock: declarations from the record
//! replica (a subscription, so a newly declared leader is known within the milliseconds gossip takes, with
//! no polling), join requests from followers, the answers of the leader it asked, and a timer at the core's
//! next timeout. It carries out the core's actions: declarations become signed records of [`Membership`]
//! (key `matchmaking/{group key}`, subkey this peer), join requests become streams of
//! `/colony/matchmaking/1` over the membership pool's connections, and the result goes back to the caller of
//! [`Matchmaker::look_for_group`]. Streams and the subscription run as tokio tasks owned by the matchmaker;
//! [`Matchmaker::shutdown`] (or dropping it) stops them all.
//!
//! The protocol is served on membership's router, which exists before the matchmaker does: start
//! membership with [`MatchmakingService::register`] in [`Membership::start_with`], then start the
//! matchmaker with the same service.
//!
//! ```no_run
//! # use std::{sync::Arc, time::Duration};
//! # use colony::actors::matchmaker::{self, GroupRequest, Matchmaker, MatchmakingService};
//! # use colony::membership::{Membership, MembershipConfig};
//! # use colony::records::Schemas;
//! # use colony_averaging::matchmaking::MatchmakingConfig;
//! # use colony_averaging::tensor::SchemaHash;
//! # use colony_transports::{Keypair, mem::MemHub};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let keypair = Arc::new(Keypair::generate());
//! let transport = MemHub::new().transport(&keypair);
//! let mut schemas = Schemas::default();
//! matchmaker::register_schema(&mut schemas);
//! let service = MatchmakingService::new();
//! let config = MembershipConfig::new("run", Some("mem://a".parse()?));
//! let membership =
//!     Membership::start_with(config, keypair, transport, schemas, |router| service.register(router)).await?;
//! let matchmaker = Matchmaker::start(&membership, &service, MatchmakingConfig::new("grads"))?;
//! let group = matchmaker.look_for_group(GroupRequest::new(SchemaHash([0; 32]), Duration::from_secs(30))).await?;
//! println!("averaging with {} peers", group.len());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use colony_averaging::matchmaking::messages::{JoinRequestHeader, LeaderMessageHeader, protocol};
use colony_averaging::matchmaking::{
    Action, Declaration, GroupInfo, GroupKeyManager, JoinRequest, MatchmakingConfig, MatchmakingError, MessageCode,
    MessageFromLeader, Search, SearchRequest, SearchStatus, Time,
};
use colony_averaging::net::Connector;
use colony_averaging::tensor::SchemaHash;
use colony_transports::PeerId;
use colony_transports::rpc::{self, IncomingStream, Router, StreamConfig};
use colony_transports::wire::WireError;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};

use crate::membership::{Membership, Role};
use crate::records::replica::{Change, SubscriptionError};
use crate::records::{Schemas, Subkey, View};

/// The kind of the records that hold declarations: their keys are `matchmaking/{group key}`.
pub const DECLARATION_KIND: &str = "matchmaking";

/// How long a request to the matchmaker actor may wait (it answers in microseconds unless it is gone).
const ACTOR_TIMEOUT: Duration = Duration::from_secs(10);

/// Registers the declaration records' schema, so that every peer of the run validates them on receipt.
/// Call it on the [`Schemas`] given to membership.
pub fn register_schema(schemas: &mut Schemas) -> &mut Schemas {
    schemas.register_with(DECLARATION_KIND, |bytes| {
        Declaration::decode(bytes).map(|_| ()).map_err(|e| e.to_string())
    })
}

/// The record key of the declarations under `group_key`.
pub fn declaration_key(group_key: &str) -> String {
    format!("{DECLARATION_KIND}/{group_key}")
}

/// What a caller asks for when it looks for a group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRequest {
    /// The tensor schema: only peers with the same hash group together.
    pub schema_hash: SchemaHash,
    /// Opaque bytes every member receives, aligned with the member list (the averager puts its bandwidth,
    /// role and weight here). At most `max_gather_bytes`.
    pub gather: Bytes,
    /// When to start averaging, on the run's clock ([`Matchmaker::now`]); `None`: after
    /// `min_matchmaking_time`. A group that fills up starts earlier.
    pub scheduled_start: Option<Time>,
    /// How long to look before failing with [`MatchmakingError::NoGroup`].
    pub timeout: Duration,
    /// Join leaders only, never lead (for peers others cannot dial). Always on for a client-mode member.
    pub client_mode: bool,
    /// How many peers the caller expects in its group, itself included, when it knows: a group that
    /// reaches it assembles at once (see `SearchRequest::expected_group_size`).
    pub expected_group_size: Option<usize>,
}

impl GroupRequest {
    /// A request with empty gather, no scheduled start, not in client mode.
    pub fn new(schema_hash: SchemaHash, timeout: Duration) -> Self {
        Self {
            schema_hash,
            gather: Bytes::new(),
            scheduled_start: None,
            timeout,
            client_mode: false,
            expected_group_size: None,
        }
    }
}

/// The matchmakers bound to a service, by group key prefix.
type Slot = Arc<RwLock<HashMap<String, Addr<MatchmakerActor>>>>;

/// The protocol side of the [`Matchmaker`]s of a peer: registered on membership's router at start, and
/// bound to each matchmaker once it exists. One service serves every matchmaker of the peer (gradients,
/// state...): a join request goes to the matchmaker whose prefix starts its group key. Until one is bound
/// (and after it shuts down) requests for its prefix are answered `NotLookingForGroup`.
#[derive(Clone, Default)]
pub struct MatchmakingService {
    slot: Slot,
    tokens: Arc<AtomicU64>,
}

impl MatchmakingService {
    /// An unbound service.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `/colony/matchmaking/1` on `router` (pass it to [`Membership::start_with`]).
    pub fn register(&self, router: &mut Router) {
        let service = self.clone();
        router.stream(protocol(), move |incoming| serve_join(service.clone(), incoming));
    }

    fn bound(&self, group_key: &str) -> Option<Addr<MatchmakerActor>> {
        let prefix = group_key.split('.').next().unwrap_or_default();
        self.slot.read().unwrap_or_else(|p| p.into_inner()).get(prefix).cloned()
    }

    fn bind(&self, prefix: &str, actor: Option<Addr<MatchmakerActor>>) {
        let mut slot = self.slot.write().unwrap_or_else(|p| p.into_inner());
        match actor {
            Some(actor) => slot.insert(prefix.to_owned(), actor),
            None => slot.remove(prefix),
        };
    }
}

/// One peer's matchmaker: looks for groups under its group key, one search at a time.
pub struct Matchmaker {
    actor: Addr<MatchmakerActor>,
    service: MatchmakingService,
    keys: Arc<Mutex<GroupKeyManager>>,
    subscription: JoinHandle<()>,
    membership: Membership,
    request_timeout: Duration,
    prefix: String,
}

impl Matchmaker {
    /// Starts the matchmaker of `membership`'s peer and binds `service` (registered on that membership's
    /// router) to it. Fails on an invalid configuration. Must be called inside a tokio runtime, which
    /// carries its streams. The matchmaker holds a handle to `membership`, so the peer stays up until the
    /// matchmaker shuts down.
    pub fn start(
        membership: &Membership,
        service: &MatchmakingService,
        config: MatchmakingConfig,
    ) -> Result<Self, MatchmakingError> {
        config.validate()?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let keys = GroupKeyManager::new(&config.prefix, &config.initial_group_bits, config.target_group_size)
            .map_err(|e| MatchmakingError::InvalidConfig(e.to_string()))?;
        let keys = Arc::new(Mutex::new(keys));
        let prefix = config.prefix.clone();
        if service.bound(&prefix).is_some_and(|running| running.connected()) {
            return Err(MatchmakingError::InvalidConfig(format!(
                "another matchmaker of this peer already uses the prefix {prefix:?}; give each averager its own"
            )));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| MatchmakingError::InvalidConfig("Matchmaker::start must run inside a tokio runtime".into()))?;
        // Subscribed before anything is read, so that no declaration falls between a read and the
        // subscription.
        let mut changes = membership.subscribe(format!("{DECLARATION_KIND}/"));
        let request_timeout = config.request_timeout;
        let actor = MatchmakerActor {
            membership: membership.clone(),
            connector: membership.connector(),
            stream: membership.config().stream,
            config,
            keys: keys.clone(),
            runtime: runtime.clone(),
            search: None,
            next_search: 0,
            published: HashMap::new(),
            followers: HashMap::new(),
            requests: HashMap::new(),
            timer: None,
        };
        let actor = MatchmakerActor::start_in_arbiter(&crate::membership::arbiter(), move |_| actor);
        let forward = actor.clone();
        let subscription = runtime.spawn(async move {
            loop {
                match changes.next().await {
                    Ok(change) => forward.do_send(DeclarationChanged(change)),
                    Err(SubscriptionError::Lagged(_)) => forward.do_send(Resync),
                    Err(SubscriptionError::Closed) => return,
                }
            }
        });
        service.bind(&prefix, Some(actor.clone()));
        Ok(Self {
            actor,
            service: service.clone(),
            keys,
            subscription,
            membership: membership.clone(),
            request_timeout,
            prefix,
        })
    }

    /// Looks for a group until one assembles or `request.timeout` passes. Dropping the returned future
    /// cancels the search: followers of this peer are told, and its declaration is withdrawn.
    pub async fn look_for_group(&self, request: GroupRequest) -> Result<GroupInfo, MatchmakingError> {
        // The core answers by the deadline; this bound only guards against an actor that is gone.
        let limit = request.timeout + self.request_timeout * 2 + ACTOR_TIMEOUT;
        let (search_id, result) = ask(&self.actor, Look(request)).await??;
        let mut guard = CancelOnDrop {
            actor: self.actor.clone(),
            search_id: Some(search_id),
        };
        let outcome = tokio::time::timeout(limit, result).await;
        guard.search_id = None;
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(MatchmakingError::Shutdown),
            Err(_) => {
                tracing::error!(?limit, "the matchmaker did not finish a search in time; cancelling it");
                self.actor.do_send(Cancel(Some(search_id)));
                Err(MatchmakingError::Shutdown)
            }
        }
    }

    /// Cancels the running search, if any: its caller gets [`MatchmakingError::Cancelled`].
    pub fn cancel(&self) {
        self.actor.do_send(Cancel(None));
    }

    /// Where the running search stands (`None` when none runs).
    pub async fn status(&self) -> Option<SearchStatus> {
        ask(&self.actor, CurrentStatus).await.ok().flatten()
    }

    /// The group key's current bits (they rotate after each group).
    pub fn group_bits(&self) -> String {
        lock(&self.keys).bits().to_owned()
    }

    /// Sets the group key's bits; a running search keeps its key, the next one uses these.
    pub fn set_group_bits(&self, bits: &str) -> Result<(), MatchmakingError> {
        lock(&self.keys)
            .set_bits(bits)
            .map_err(|e| MatchmakingError::InvalidRequest(e.to_string()))
    }

    /// The key the next search looks under.
    pub fn group_key(&self) -> String {
        lock(&self.keys).key()
    }

    /// The run's clock, seconds since the Unix epoch: the clock of [`GroupRequest::scheduled_start`].
    pub fn now(&self) -> Time {
        self.membership.replica().now()
    }

    /// Stops the matchmaker: a running search ends with [`MatchmakingError::Shutdown`] (its followers are
    /// told it was cancelled), every stream and task of the matchmaker stops, and join requests are answered
    /// `NotLookingForGroup` from now on.
    pub fn shutdown(&self) {
        self.service.bind(&self.prefix, None);
        self.subscription.abort();
        self.actor.do_send(Stop);
    }

    /// Whether the actor still runs (false shortly after [`Matchmaker::shutdown`]).
    pub fn is_running(&self) -> bool {
        self.actor.connected()
    }
}

impl Drop for Matchmaker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the key manager leaves it consistent (its bits change in one assignment).
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct CancelOnDrop {
    actor: Addr<MatchmakerActor>,
    search_id: Option<u64>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(search_id) = self.search_id {
            self.actor.do_send(Cancel(Some(search_id)));
        }
    }
}

async fn ask<M>(actor: &Addr<MatchmakerActor>, message: M) -> Result<M::Result, MatchmakingError>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    MatchmakerActor: Handler<M>,
{
    match tokio::time::timeout(ACTOR_TIMEOUT, actor.send(message)).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(_)) | Err(_) => Err(MatchmakingError::Shutdown),
    }
}

/// The running search.
struct Active {
    id: u64,
    search: Search,
    record_key: String,
    deadline: Time,
    reply: Option<oneshot::Sender<Result<GroupInfo, MatchmakingError>>>,
}

/// A follower waiting for its final message: the stream's token and where to put the message.
struct WaitingFollower {
    token: u64,
    final_message: oneshot::Sender<MessageFromLeader>,
}

struct MatchmakerActor {
    membership: Membership,
    connector: Arc<dyn Connector>,
    stream: StreamConfig,
    config: MatchmakingConfig,
    keys: Arc<Mutex<GroupKeyManager>>,
    runtime: tokio::runtime::Handle,
    search: Option<Active>,
    next_search: u64,
    /// The latest expiration this peer published per record key: a record wins only with a later one.
    published: HashMap<String, Time>,
    followers: HashMap<PeerId, WaitingFollower>,
    /// The streams of this peer's join requests, by request id.
    requests: HashMap<u64, AbortHandle>,
    timer: Option<SpawnHandle>,
}

impl Actor for MatchmakerActor {
    type Context = Context<Self>;
}

impl MatchmakerActor {
    fn now(&self) -> Time {
        self.membership.replica().now()
    }

    fn declarations(&self, record_key: &str) -> Vec<(PeerId, Declaration, Time)> {
        let Some(View::Dictionary { entries, .. }) = self.membership.get(record_key) else {
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|(subkey, (value, expiration))| match subkey {
                Subkey::Peer(peer) => Declaration::decode(&value).ok().map(|d| (peer, d, expiration)),
                Subkey::Name(_) => None,
            })
            .collect()
    }

    fn start_search(
        &mut self,
        request: GroupRequest,
        ctx: &mut Context<Self>,
    ) -> Result<(u64, oneshot::Receiver<Result<GroupInfo, MatchmakingError>>), MatchmakingError> {
        if self.search.is_some() {
            return Err(MatchmakingError::AlreadyLooking);
        }
        if request.timeout.is_zero() {
            return Err(MatchmakingError::InvalidRequest("timeout must be above zero".into()));
        }
        if request.gather.len() > self.config.max_gather_bytes {
            return Err(MatchmakingError::InvalidRequest(format!(
                "gather of {} bytes exceeds max_gather_bytes ({})",
                request.gather.len(),
                self.config.max_gather_bytes
            )));
        }
        if request.scheduled_start.is_some_and(|t| !t.is_finite()) {
            return Err(MatchmakingError::InvalidRequest(
                "scheduled_start must be a finite time".into(),
            ));
        }
        let now = self.now();
        let group_key = lock(&self.keys).key();
        let record_key = declaration_key(&group_key);
        let deadline = now + request.timeout.as_secs_f64();
        let client_mode = request.client_mode || self.membership.role() == Role::Client;
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| MatchmakingError::InvalidRequest("the system's random source failed".into()))?;
        let known = self.declarations(&record_key);
        let search = Search::new(
            &self.config,
            self.membership.local_peer(),
            group_key,
            SearchRequest {
                schema_hash: request.schema_hash,
                gather: request.gather,
                scheduled_start: request.scheduled_start,
                deadline,
                client_mode,
                expected_group_size: request.expected_group_size,
            },
            seed,
            known,
            now,
        );
        let id = self.next_search;
        self.next_search += 1;
        let (reply, result) = oneshot::channel();
        self.search = Some(Active {
            id,
            search,
            record_key,
            deadline,
            reply: Some(reply),
        });
        self.drive(ctx);
        Ok((id, result))
    }

    /// Carries out the core's actions, then arms the timer for its next timeout.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.search.as_mut().and_then(|active| active.search.poll_action()) {
            self.act(action, ctx);
        }
        if self.search.as_ref().is_some_and(|a| a.search.is_finished()) {
            self.end_search();
        }
        self.arm(ctx);
    }

    fn act(&mut self, action: Action, ctx: &mut Context<Self>) {
        match action {
            Action::Declare(declaration) => {
                let Some(record_key) = self.search.as_ref().map(|a| a.record_key.clone()) else {
                    return;
                };
                if let Err(error) = self.publish(&record_key, declaration) {
                    tracing::warn!(key = %record_key, %error, "matchmaking declaration refused");
                    if let Some(active) = self.search.as_mut() {
                        active.search.on_declaration_refused(declaration.expiration);
                    }
                }
            }
            Action::RequestJoin {
                request_id,
                leader,
                request,
                keep_until,
            } => self.open_request(request_id, leader, request, keep_until, ctx),
            Action::AbandonRequest { request_id } => {
                if let Some(task) = self.requests.remove(&request_id) {
                    task.abort();
                }
            }
            Action::SendToFollower { follower, message } => {
                if let Some(waiting) = self.followers.remove(&follower) {
                    // A follower that left in the meantime no longer listens.
                    let _ = waiting.final_message.send(message);
                }
            }
            Action::Finished(result) => {
                if let Ok(group) = &result {
                    let local = self.membership.local_peer();
                    let bits = lock(&self.keys)
                        .on_group_assembled(&group.group_id, &group.members, &local)
                        .to_owned();
                    tracing::debug!(key = %group.group_key, members = group.len(), %bits, "group assembled");
                }
                if let Some(reply) = self.search.as_mut().and_then(|a| a.reply.take()) {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Publishes `declaration` under `record_key`, signed by this peer. Its record lives a request timeout
    /// past the declared time (peers whose clocks run a little ahead still accept it), and each record of
    /// a key expires later than the previous one, so that the newest always wins.
    fn publish(&mut self, record_key: &str, declaration: Declaration) -> Result<(), String> {
        let now = self.now();
        let mut expiration = declaration.expiration + self.config.request_timeout.as_secs_f64();
        if let Some(last) = self.published.get(record_key)
            && expiration <= *last
        {
            expiration = last.next_up();
        }
        self.membership
            .publish(
                record_key,
                Some(Subkey::Peer(self.membership.local_peer())),
                Some(declaration.encode()),
                expiration,
            )
            .map_err(|e| e.to_string())?;
        self.published.retain(|_, last| *last > now);
        self.published.insert(record_key.to_owned(), expiration);
        Ok(())
    }

    fn open_request(
        &mut self,
        request_id: u64,
        leader: PeerId,
        request: JoinRequest,
        keep_until: Time,
        ctx: &mut Context<Self>,
    ) {
        let Some(search_id) = self.search.as_ref().map(|a| a.id) else {
            return;
        };
        let keep_for = Duration::from_secs_f64((keep_until - self.now()).max(0.0));
        let exchange = RequestExchange {
            actor: ctx.address(),
            connector: self.connector.clone(),
            stream: self.stream,
            request_timeout: self.config.request_timeout,
            keep_for,
            search_id,
            request_id,
            leader,
        };
        let task = self.runtime.spawn(exchange.run(request));
        self.requests.insert(request_id, task.abort_handle());
    }

    /// Ends the finished search: its streams close, waiting followers' handlers end.
    fn end_search(&mut self) {
        self.search = None;
        for (_, task) in self.requests.drain() {
            task.abort();
        }
        self.followers.clear();
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        let Some(at) = self.search.as_ref().and_then(|a| a.search.next_timeout()) else {
            return;
        };
        // A millisecond late rather than early: a timer that fires before the core's time would re-arm in a
        // loop.
        let delay = Duration::from_secs_f64((at - self.now()).max(0.0)) + Duration::from_millis(1);
        self.timer = Some(ctx.run_later(delay, |actor, ctx| {
            actor.timer = None;
            let now = actor.now();
            if let Some(active) = actor.search.as_mut() {
                active.search.on_timeout(now);
            }
            actor.drive(ctx);
        }));
    }
}

/// One join request: connect, send, and report the leader's answers (or the failure) to the actor.
struct RequestExchange {
    actor: Addr<MatchmakerActor>,
    connector: Arc<dyn Connector>,
    stream: StreamConfig,
    request_timeout: Duration,
    keep_for: Duration,
    search_id: u64,
    request_id: u64,
    leader: PeerId,
}

impl RequestExchange {
    async fn run(self, request: JoinRequest) {
        let (search_id, request_id) = (self.search_id, self.request_id);
        if let Err(reason) = self.exchange(request).await {
            tracing::debug!(leader = %self.leader.short(), %reason, "join request failed");
            self.actor.do_send(RequestFailed { search_id, request_id });
        }
    }

    async fn exchange(&self, request: JoinRequest) -> Result<(), String> {
        let within = |what: &'static str, limit: Duration| move |_| format!("{what}: no answer within {limit:?}");
        let limit = self.request_timeout;
        let conn = tokio::time::timeout(limit, self.connector.connect(&self.leader))
            .await
            .map_err(within("connecting", limit))?
            .map_err(|e| e.to_string())?;
        let mut config = self.stream;
        config.message_timeout = self.keep_for.max(limit) + Duration::from_secs(1);
        let (mut send, mut recv) =
            tokio::time::timeout(limit, rpc::open::<LeaderMessageHeader>(&conn, &protocol(), &config))
                .await
                .map_err(within("opening a stream", limit))?
                .map_err(|e| e.to_string())?;
        let (header, gather) = request.to_wire();
        tokio::time::timeout(limit, send.send(&header, gather))
            .await
            .map_err(within("sending the request", limit))?
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(limit, recv.recv_required("the leader's answer"))
            .await
            .map_err(within("the leader's answer", limit))?;
        let answer = decode_leader_message(answer)?;
        let accepted = answer.code == MessageCode::Accepted;
        self.report(answer);
        if !accepted {
            return Ok(());
        }
        let last = tokio::time::timeout(self.keep_for, recv.recv_required("the leader's final message"))
            .await
            .map_err(within("the leader's final message", self.keep_for))?;
        self.report(decode_leader_message(last)?);
        let _ = send.finish().await;
        Ok(())
    }

    fn report(&self, message: MessageFromLeader) {
        self.actor.do_send(LeaderReply {
            search_id: self.search_id,
            request_id: self.request_id,
            message,
        });
    }
}

fn decode_leader_message(
    received: Result<(LeaderMessageHeader, Bytes), WireError>,
) -> Result<MessageFromLeader, String> {
    let (header, payload) = received.map_err(|e| e.to_string())?;
    MessageFromLeader::from_wire(header, payload).map_err(|e| e.to_string())
}

/// The leader's side of one join request stream: pass the request to the actor, send its answer and, if it
/// accepted, the final message when it comes; tell the actor when the follower leaves first.
async fn serve_join(service: MatchmakingService, mut incoming: IncomingStream) -> Result<(), WireError> {
    let from = incoming.peer;
    let mut framed = incoming.framed::<JoinRequestHeader>();
    let (header, gather) = framed.recv_required("the join request").await?;
    let Ok(request) = JoinRequest::from_wire(header, gather) else {
        return answer(&mut incoming, &MessageFromLeader::code(MessageCode::ProtocolViolation)).await;
    };
    let Some(actor) = service.bound(&request.group_key) else {
        return answer(&mut incoming, &MessageFromLeader::code(MessageCode::NotLookingForGroup)).await;
    };
    let token = service.tokens.fetch_add(1, Ordering::Relaxed);
    let (final_message, final_received) = oneshot::channel();
    let join = IncomingJoin {
        from,
        request,
        token,
        final_message,
    };
    let (reply, wait) = match ask(&actor, join).await {
        Ok(result) => result,
        Err(_) => (MessageFromLeader::code(MessageCode::NotLookingForGroup), Duration::ZERO),
    };
    let (header, payload) = reply.to_wire();
    incoming.send.send(&header, payload).await?;
    if reply.code != MessageCode::Accepted {
        return incoming.send.finish().await;
    }
    let mut recv = framed.into_inner();
    tokio::select! {
        last = final_received => {
            // A matchmaker that stopped drops the sender: the follower must look elsewhere.
            let last = last.unwrap_or_else(|_| MessageFromLeader::code(MessageCode::Cancelled));
            answer(&mut incoming, &last).await
        }
        // The follower sends nothing more: anything here (its stream's end, a reset, a lost connection)
        // means it left.
        _ = recv.read_chunk(1) => {
            actor.do_send(FollowerGone { peer: from, token });
            Ok(())
        }
        _ = tokio::time::sleep(wait) => {
            actor.do_send(FollowerGone { peer: from, token });
            answer(&mut incoming, &MessageFromLeader::code(MessageCode::Cancelled)).await
        }
    }
}

async fn answer(incoming: &mut IncomingStream, message: &MessageFromLeader) -> Result<(), WireError> {
    let (header, payload) = message.to_wire();
    incoming.send.send(&header, payload).await?;
    incoming.send.finish().await
}

// ---- messages to the actor ----

/// Start a search.
#[derive(Message)]
#[rtype(result = "Result<(u64, oneshot::Receiver<Result<GroupInfo, MatchmakingError>>), MatchmakingError>")]
struct Look(GroupRequest);

impl Handler<Look> for MatchmakerActor {
    type Result = Result<(u64, oneshot::Receiver<Result<GroupInfo, MatchmakingError>>), MatchmakingError>;

    fn handle(&mut self, msg: Look, ctx: &mut Context<Self>) -> Self::Result {
        self.start_search(msg.0, ctx)
    }
}

/// Cancel the search with this id (any search: `None`).
#[derive(Message)]
#[rtype(result = "()")]
struct Cancel(Option<u64>);

impl Handler<Cancel> for MatchmakerActor {
    type Result = ();

    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) {
        if let Some(active) = self.search.as_mut()
            && msg.0.is_none_or(|id| id == active.id)
        {
            active.search.cancel();
            self.drive(ctx);
        }
    }
}

/// A declaration record changed.
#[derive(Message)]
#[rtype(result = "()")]
struct DeclarationChanged(Arc<Change>);

impl Handler<DeclarationChanged> for MatchmakerActor {
    type Result = ();

    fn handle(&mut self, msg: DeclarationChanged, ctx: &mut Context<Self>) {
        let now = self.now();
        let change = &msg.0;
        let Some(active) = self.search.as_mut().filter(|a| a.record_key == change.key) else {
            return;
        };
        let Some(Subkey::Peer(peer)) = change.subkey else {
            return;
        };
        match &change.value {
            Some(value) => match Declaration::decode(value) {
                Ok(declaration) => active.search.on_declaration(peer, declaration, change.expiration, now),
                Err(error) => tracing::debug!(peer = %peer.short(), %error, "ignored a declaration"),
            },
            None => active.search.on_declaration_removed(peer, change.expiration),
        }
        self.drive(ctx);
    }
}

/// Changes were dropped: read the declarations again.
#[derive(Message)]
#[rtype(result = "()")]
struct Resync;

impl Handler<Resync> for MatchmakerActor {
    type Result = ();

    fn handle(&mut self, _: Resync, ctx: &mut Context<Self>) {
        let Some(record_key) = self.search.as_ref().map(|a| a.record_key.clone()) else {
            return;
        };
        let now = self.now();
        for (peer, declaration, valid_until) in self.declarations(&record_key) {
            if let Some(active) = self.search.as_mut() {
                active.search.on_declaration(peer, declaration, valid_until, now);
            }
        }
        self.drive(ctx);
    }
}

/// A follower's join request; answered with the reply to send at once and how long its handler may wait
/// for the final message.
#[derive(Message)]
#[rtype(result = "(MessageFromLeader, Duration)")]
struct IncomingJoin {
    from: PeerId,
    request: JoinRequest,
    token: u64,
    final_message: oneshot::Sender<MessageFromLeader>,
}

impl Handler<IncomingJoin> for MatchmakerActor {
    type Result = MessageResult<IncomingJoin>;

    fn handle(&mut self, msg: IncomingJoin, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let Some(active) = self.search.as_mut() else {
            return MessageResult((MessageFromLeader::code(MessageCode::NotLookingForGroup), Duration::ZERO));
        };
        let wait = Duration::from_secs_f64((active.deadline - now).max(0.0)) + self.config.request_timeout;
        // Registered before the core runs: accepting may fill the group, and the final message must find it.
        let previous = self.followers.insert(
            msg.from,
            WaitingFollower {
                token: msg.token,
                final_message: msg.final_message,
            },
        );
        let reply = active.search.on_join_request(msg.from, &msg.request, now);
        if reply.code != MessageCode::Accepted {
            // Put back the stream this peer already waits on, if any (a duplicate request).
            match previous {
                Some(previous) => {
                    self.followers.insert(msg.from, previous);
                }
                None => {
                    self.followers.remove(&msg.from);
                }
            }
        }
        self.drive(ctx);
        MessageResult((reply, wait))
    }
}

/// A follower's stream ended before its final message.
#[derive(Message)]
#[rtype(result = "()")]
struct FollowerGone {
    peer: PeerId,
    token: u64,
}

impl Handler<FollowerGone> for MatchmakerActor {
    type Result = ();

    fn handle(&mut self, msg: FollowerGone, ctx: &mut Context<Self>) {
        if self.followers.get(&msg.peer).is_some_and(|f| f.token == msg.token) {
            self.followers.remove(&msg.peer);
            if let Some(active) = self.search.as_mut() {
                active.search.on_follower_left(&msg.peer);
            }
            self.drive(ctx);
        }
    }
}

/// The leader asked answered.
#[derive(Message)]
#[rtype(result = "()")]
struct LeaderReply {
    search_id: u64,
    request_id: u64,
    message: MessageFromLeader,
}

impl Handler<LeaderReply> for MatchmakerActor {
    type Result = ();

    fn handle(&mut self, msg: LeaderReply, ctx: &mut Context<Self>) {
        let now = self.now();
        if let Some(active) = self.search.as_mut().filter(|a| a.id == msg.search_id) {
            if msg.message.code != MessageCode::Accepted {
                // Its last message: the stream ends by itself.
                self.requests.remove(&msg.request_id);
            }
            active.search.on_leader_message(msg.request_id, msg.message, now);
            self.drive(ctx);
        }
    }
}

/// A join request failed.
#[derive(Message)]
#[rtype(result = "()")]
struct RequestFailed {
    search_id: u64,
    request_id: u64,
}

impl Handler<RequestFailed> for MatchmakerActor {
    type Result = ();

    fn handle(&mut self, msg: RequestFailed, ctx: &mut Context<Self>) {
        let now = self.now();
        if let Some(active) = self.search.as_mut().filter(|a| a.id == msg.search_id) {
            self.requests.remove(&msg.request_id);
            active.search.on_request_failed(msg.request_id, now);
            self.drive(ctx);
        }
    }
}

/// Where the search stands.
#[derive(Message)]
#[rtype(result = "Option<SearchStatus>")]
struct CurrentStatus;

impl Handler<CurrentStatus> for MatchmakerActor {
    type Result = Option<SearchStatus>;

    fn handle(&mut self, _: CurrentStatus, _ctx: &mut Context<Self>) -> Self::Result {
        self.search.as_ref().map(|a| a.search.status())
    }
}

/// Stop: the running search ends with `Shutdown`, every task of the matchmaker stops.
#[derive(Message)]
#[rtype(result = "()")]
struct Stop;

impl Handler<Stop> for MatchmakerActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        if let Some(active) = self.search.as_mut() {
            let reply = active.reply.take();
            active.search.cancel();
            self.drive(ctx);
            if let Some(reply) = reply {
                let _ = reply.send(Err(MatchmakingError::Shutdown));
            }
        }
        self.end_search();
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        ctx.stop();
    }
}
