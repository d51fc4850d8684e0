//! One peer's search for a group: the leader and follower state machine, sans I/O.
//!
//! A [`Search`] lives from the call that starts looking until a group assembles, the deadline passes or
//! the caller cancels. The shell feeds it every input with the current time: declarations seen under its
//! key, join requests from followers (answered at once with a [`MessageFromLeader`]), the answers of the
//! leader it asked, failures, and a tick at [`Search::next_timeout`]. It collects [`Action`]s for the shell:
//! publish a declaration, open a join request, abandon one, send a follower its final message, and the
//! result.
//!
//! The rules, in the order they are checked after every input ([`Search`]'s `step`):
//!
//! 1. A leader whose group reached `target_group_size` (or the caller's expected group size, if smaller)
//!    assembles at once. It does not while it waits for the answer of a better leader (at most
//!    `request_timeout`): if that leader accepts it, its own followers are sent there instead; so no peer
//!    ends up in two groups.
//! 2. At its declared time a leader assembles with at least `min_group_size`, else disbands its followers
//!    and declares again with a later time.
//! 3. At the deadline a leader with enough followers assembles; otherwise the search fails with
//!    [`MatchmakingError::NoGroup`]. A follower already accepted by a leader waits for that leader's
//!    answer past the deadline, up to its request's expiry (its declared time plus `request_timeout`).
//! 4. A peer with no request open asks the best leader it knows of: the one with the smallest (declared
//!    time, peer id) below its own, that it has not asked under that declaration yet; or the leader it was
//!    just sent to by a `NotALeader`, `GroupDisbanded` or `Cancelled` answer.
//!
//! A leader checks a join request in Hivemind's order: `NotLookingForGroup`, `ProtocolViolation`,
//! `BadSchemaHash`, `BadGroupKey`, `NotDeclared`, `BadExpirationTime`, `NotALeader`, `DuplicatePeerId`,
//! `GroupIsFull`; else `Accepted`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use colony_transports::PeerId;

use super::keys::{Declaration, DeclarationBoard, SplitMix64};
use super::messages::{JoinRequest, MessageCode, MessageFromLeader};
use super::{GroupInfo, MAX_GROUP_SIZE, MatchmakingConfig, MatchmakingError, Time};
use crate::tensor::SchemaHash;

/// Redirections followed in a row (suggested leaders pointing at further suggested leaders) before the
/// peer goes back to the leaders it knows of.
const MAX_REDIRECTS: u32 = 8;

/// What a peer asks for when it starts looking.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    /// The tensor schema: only peers with the same hash group together.
    pub schema_hash: SchemaHash,
    /// Opaque bytes shared with the group (bandwidth, role, weight...).
    pub gather: Bytes,
    /// When the peer wants to start averaging; it declares `max(scheduled_start, now +
    /// min_matchmaking_time)`, capped at the deadline. `None`: as soon as the matchmaking window allows.
    pub scheduled_start: Option<Time>,
    /// When to give up.
    pub deadline: Time,
    /// Client mode: the peer never declares or leads; it only joins leaders.
    pub client_mode: bool,
    /// How many peers the caller expects to average with now (itself included), when it knows (the
    /// collaborative optimizer counts the peers at its epoch): a leader assembles as soon as its group
    /// reaches this size, below `target_group_size`, instead of waiting for its declared time. `None`:
    /// only `target_group_size` counts.
    pub expected_group_size: Option<usize>,
}

/// What the shell must do for the search.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish this declaration under the search's key (signed by this peer); a later one replaces it.
    Declare(Declaration),
    /// Open a stream to `leader` and send `request`. Report its answers with
    /// [`Search::on_leader_message`] and any failure with [`Search::on_request_failed`]. The search abandons
    /// the request itself when it times out; `keep_until` bounds how long the shell keeps the stream.
    RequestJoin {
        /// Names this request in later inputs and actions.
        request_id: u64,
        /// Whom to ask.
        leader: PeerId,
        /// What to send.
        request: JoinRequest,
        /// The latest time the search still waits for this leader.
        keep_until: Time,
    },
    /// Close the stream of this request (the leader drops this peer from its group).
    AbandonRequest {
        /// The request.
        request_id: u64,
    },
    /// Send this follower its final message and close its stream.
    SendToFollower {
        /// The follower.
        follower: PeerId,
        /// `BeginAllreduce`, `GroupDisbanded` or `Cancelled`.
        message: MessageFromLeader,
    },
    /// The search is over. Always the last action.
    Finished(Result<GroupInfo, MatchmakingError>),
}

/// Where a search stands, for callers that wait on it and for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchStatus {
    /// The key searched under.
    pub group_key: String,
    /// This peer's declared time, if it declared (never in client mode).
    pub declared: Option<Time>,
    /// Followers that joined this peer, in joining order.
    pub followers: Vec<PeerId>,
    /// The leader asked and not yet answering.
    pub requesting: Option<PeerId>,
    /// The leader that accepted this peer.
    pub leader: Option<PeerId>,
    /// Whether the search is over.
    pub finished: bool,
}

#[derive(Debug, Clone)]
struct Outgoing {
    id: u64,
    leader: PeerId,
    accepted: bool,
    /// When the search stops waiting for this leader.
    expires: Time,
    /// The expiration sent in the request.
    request_expiration: Time,
    redirects: u32,
}

#[derive(Debug, Clone)]
struct Follower {
    peer: PeerId,
    gather: Bytes,
}

/// One peer's search for a group. See the module documentation for the rules.
#[derive(Debug)]
pub struct Search {
    config: MatchmakingConfig,
    local: PeerId,
    request: SearchRequest,
    group_key: String,
    started: Time,
    declared: Option<Time>,
    /// False when the shell could not publish the current declaration: the peer still follows, but cannot
    /// lead until it declares again.
    published: bool,
    board: DeclarationBoard,
    /// Leaders asked, with the declared time (its bits) they were asked under; `u64::MAX` when unknown.
    tried: HashSet<(PeerId, u64)>,
    outgoing: Option<Outgoing>,
    redirect: Option<(PeerId, u32)>,
    followers: Vec<Follower>,
    finished: bool,
    actions: VecDeque<Action>,
    next_request_id: u64,
    seed: [u8; 32],
    groups_made: u64,
    seen: HashSet<PeerId>,
    requests: usize,
    answers: BTreeMap<&'static str, usize>,
    largest_group: usize,
}

impl Search {
    /// Starts looking under `group_key` at `now`: declares (unless in client mode), learns the
    /// declarations already known (`known`: peer, declaration, expiration of the record carrying it), and
    /// asks the best leader among them. `seed` makes the group ids this peer draws as a leader: pass 32
    /// random bytes.
    pub fn new(
        config: &MatchmakingConfig,
        local: PeerId,
        group_key: String,
        request: SearchRequest,
        seed: [u8; 32],
        known: impl IntoIterator<Item = (PeerId, Declaration, Time)>,
        now: Time,
    ) -> Self {
        let mut search = Self {
            config: config.clone(),
            local,
            request,
            group_key,
            started: now,
            declared: None,
            published: false,
            board: DeclarationBoard::new(),
            tried: HashSet::new(),
            outgoing: None,
            redirect: None,
            followers: Vec::new(),
            finished: false,
            actions: VecDeque::new(),
            next_request_id: 0,
            seed,
            groups_made: 0,
            seen: HashSet::new(),
            requests: 0,
            answers: BTreeMap::new(),
            largest_group: 1,
        };
        if !search.request.client_mode {
            search.declare(now);
        }
        for (peer, declaration, valid_until) in known {
            search.observe(peer, declaration, valid_until);
        }
        search.step(now);
        search
    }

    /// The key searched under.
    pub fn group_key(&self) -> &str {
        &self.group_key
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Search::on_timeout`] must be called next (`None` once finished).
    pub fn next_timeout(&self) -> Option<Time> {
        if self.finished {
            return None;
        }
        let mut next = self.request.deadline;
        match &self.outgoing {
            // An accepted follower waits for its leader up to the request's expiry, past the deadline too.
            Some(outgoing) if outgoing.accepted => next = outgoing.expires,
            Some(outgoing) => next = next.min(outgoing.expires),
            None => {
                if let Some(declared) = self.declared.filter(|_| !self.request.client_mode) {
                    next = next.min(declared);
                }
            }
        }
        Some(next)
    }

    /// Whether the search is over.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Where the search stands.
    pub fn status(&self) -> SearchStatus {
        SearchStatus {
            group_key: self.group_key.clone(),
            declared: self.declared,
            followers: self.followers.iter().map(|f| f.peer).collect(),
            requesting: self.outgoing.as_ref().filter(|o| !o.accepted).map(|o| o.leader),
            leader: self.outgoing.as_ref().filter(|o| o.accepted).map(|o| o.leader),
            finished: self.finished,
        }
    }

    /// A declaration under the search's key was published (or changed): `valid_until` is its record's
    /// expiration. Declarations under other keys must not be passed in.
    pub fn on_declaration(&mut self, peer: PeerId, declaration: Declaration, valid_until: Time, now: Time) {
        if self.observe(peer, declaration, valid_until) {
            self.step(now);
        }
    }

    /// A peer's declaration record was deleted by a record expiring at `valid_until`.
    pub fn on_declaration_removed(&mut self, peer: PeerId, valid_until: Time) {
        self.board.forget(&self.group_key, &peer, valid_until);
    }

    fn observe(&mut self, peer: PeerId, declaration: Declaration, valid_until: Time) -> bool {
        if peer == self.local {
            return false;
        }
        if declaration.looking {
            self.seen.insert(peer);
        }
        self.board.observe(&self.group_key, peer, declaration, valid_until)
    }

    /// The shell could not publish the declaration for `expiration` (the record store refused it, e.g. the
    /// peer declares faster than the publishing limits allow). Until its next declaration the peer answers
    /// `NotDeclared`: nobody can have seen it, so a request naming it is stale or forged.
    pub fn on_declaration_refused(&mut self, expiration: Time) {
        if self.declared == Some(expiration) {
            self.published = false;
        }
    }

    /// A follower asks to join. Returns the answer to send at once; if it is `Accepted`, the follower's
    /// final message comes later as an [`Action::SendToFollower`] (possibly among the actions this call
    /// queued, when the group is now full).
    pub fn on_join_request(&mut self, from: PeerId, request: &JoinRequest, now: Time) -> MessageFromLeader {
        let answer = self.judge(from, request);
        if answer.code == MessageCode::Accepted {
            self.followers.push(Follower {
                peer: from,
                gather: request.gather.clone(),
            });
            self.seen.insert(from);
            self.largest_group = self.largest_group.max(self.followers.len() + 1);
            self.step(now);
        }
        answer
    }

    fn judge(&self, from: PeerId, request: &JoinRequest) -> MessageFromLeader {
        use MessageCode::*;
        let reject = MessageFromLeader::code;
        if self.finished {
            return reject(NotLookingForGroup);
        }
        if request.schema_hash.len() != self.request.schema_hash.0.len()
            || !request.expiration.is_finite()
            || self.request.client_mode
            || request.gather.len() > self.config.max_gather_bytes
        {
            return reject(ProtocolViolation);
        }
        if request.schema_hash[..] != self.request.schema_hash.0[..] {
            return reject(BadSchemaHash);
        }
        if request.group_key != self.group_key {
            return reject(BadGroupKey);
        }
        let Some(declared) = self.declared.filter(|_| self.published) else {
            return reject(NotDeclared);
        };
        if !precedes((declared, &self.local), (request.expiration, &from)) {
            return reject(BadExpirationTime);
        }
        if let Some(outgoing) = self.outgoing.as_ref().filter(|o| o.accepted) {
            return MessageFromLeader::redirect(NotALeader, Some(outgoing.leader));
        }
        if from == self.local || self.followers.iter().any(|f| f.peer == from) {
            return reject(DuplicatePeerId);
        }
        if self.followers.len() + 1 >= self.target() {
            return reject(GroupIsFull);
        }
        reject(Accepted)
    }

    /// A follower closed its stream before the group assembled: it is no longer in the group.
    pub fn on_follower_left(&mut self, peer: &PeerId) {
        self.followers.retain(|f| f.peer != *peer);
    }

    /// The leader asked by `request_id` answered.
    pub fn on_leader_message(&mut self, request_id: u64, message: MessageFromLeader, now: Time) {
        let Some(outgoing) = self.outgoing.as_mut().filter(|o| o.id == request_id) else {
            return;
        };
        if self.finished {
            return;
        }
        let code = message.code;
        if !outgoing.accepted && code == MessageCode::Accepted {
            outgoing.accepted = true;
            outgoing.expires = outgoing.request_expiration.max(now) + self.config.request_timeout.as_secs_f64();
            let leader = outgoing.leader;
            self.count(code.name());
            // This peer now follows: its own followers go to its leader.
            self.disband(MessageCode::GroupDisbanded, Some(leader));
            return;
        }
        let Some(outgoing) = self.outgoing.take() else { return };
        if outgoing.accepted && code == MessageCode::BeginAllreduce {
            match self.group_from(&message, &outgoing.leader) {
                Ok(group) => {
                    self.count(code.name());
                    self.finish(Ok(group));
                }
                Err(reason) => {
                    tracing::debug!(leader = %outgoing.leader.short(), %reason, "leader sent an invalid group");
                    self.count("invalid_group");
                    self.actions.push_back(Action::AbandonRequest { request_id });
                    self.step(now);
                }
            }
            return;
        }
        let follows_suggestion = match code {
            MessageCode::NotALeader => !outgoing.accepted,
            MessageCode::GroupDisbanded | MessageCode::Cancelled => true,
            _ => false,
        };
        self.count(if outgoing.accepted && !follows_suggestion {
            "protocol_violation"
        } else {
            code.name()
        });
        if outgoing.accepted && !follows_suggestion {
            self.actions.push_back(Action::AbandonRequest { request_id });
        }
        if follows_suggestion
            && let Some(suggested) = message.suggested_leader
            && outgoing.redirects < MAX_REDIRECTS
            && suggested != self.local
            && suggested != outgoing.leader
        {
            self.redirect = Some((suggested, outgoing.redirects + 1));
        }
        self.step(now);
    }

    /// The request `request_id` failed (no connection, a stream error, an answer that did not decode).
    pub fn on_request_failed(&mut self, request_id: u64, now: Time) {
        if self.outgoing.as_ref().is_some_and(|o| o.id == request_id) && !self.finished {
            self.outgoing = None;
            self.count("failed");
            self.step(now);
        }
    }

    /// Time passed: `now` is at or after [`Search::next_timeout`] (earlier calls are harmless).
    pub fn on_timeout(&mut self, now: Time) {
        if self.finished {
            return;
        }
        if let Some(outgoing) = self.outgoing.as_ref().filter(|o| now >= o.expires) {
            let request_id = outgoing.id;
            self.outgoing = None;
            self.count("timed_out");
            self.actions.push_back(Action::AbandonRequest { request_id });
        }
        self.step(now);
    }

    /// The caller gave up: followers are told `Cancelled`, the declaration is withdrawn.
    pub fn cancel(&mut self) {
        if self.finished {
            return;
        }
        self.disband(MessageCode::Cancelled, None);
        self.finish(Err(MatchmakingError::Cancelled));
    }

    fn target(&self) -> usize {
        let configured = self.config.target_group_size.unwrap_or(MAX_GROUP_SIZE);
        let expected = self
            .request
            .expected_group_size
            .map_or(MAX_GROUP_SIZE, |expected| expected.max(self.config.min_group_size));
        configured.min(expected).min(MAX_GROUP_SIZE)
    }

    /// The expiration this peer would declare now.
    fn intended_start(&self, now: Time) -> Time {
        let window = now + self.config.min_matchmaking_time.as_secs_f64();
        self.request
            .scheduled_start
            .map_or(window, |scheduled| scheduled.max(window))
            .min(self.request.deadline)
    }

    fn declare(&mut self, now: Time) {
        let expiration = self.intended_start(now);
        if expiration <= now {
            return;
        }
        self.declared = Some(expiration);
        self.published = true;
        self.actions.push_back(Action::Declare(Declaration {
            expiration,
            looking: true,
        }));
    }

    /// Applies the rules of the module documentation, in order.
    fn step(&mut self, now: Time) {
        if self.finished {
            return;
        }
        let leads = !self.request.client_mode;
        let group_size = self.followers.len() + 1;
        let following = self.outgoing.as_ref().is_some_and(|o| o.accepted);
        if leads && self.outgoing.is_none() && group_size >= self.target() {
            self.assemble();
            return;
        }
        if leads && self.outgoing.is_none() && self.declared.is_some_and(|declared| now >= declared) {
            if group_size >= self.config.min_group_size {
                self.assemble();
                return;
            }
            self.disband(MessageCode::GroupDisbanded, None);
            if now < self.request.deadline {
                self.declare(now);
            }
        }
        if now >= self.request.deadline && !self.awaiting_leader(now) {
            if leads && !following && group_size >= self.config.min_group_size {
                self.assemble();
            } else {
                self.disband(MessageCode::GroupDisbanded, None);
                let report = self.no_group(now);
                self.finish(Err(report));
            }
            return;
        }
        if self.outgoing.is_none() {
            match self.redirect.take() {
                Some((leader, redirects)) if !self.followers.iter().any(|f| f.peer == leader) => {
                    let known = self
                        .board
                        .declaration(&self.group_key, &leader, now)
                        .map(|d| d.expiration);
                    self.send_request(leader, known, redirects, now);
                }
                _ => self.request_next(now),
            }
        }
    }

    /// Whether this peer follows a leader that has not answered yet and may still: until the request's
    /// expiry (this peer's declared time plus `request_timeout`), past the deadline if need be. The leader
    /// declared an earlier time than this peer and assembles or disbands at it, so its answer is on its
    /// way; a follower that gave up at its deadline a moment before the answer arrived would leave the
    /// group waiting for a member that is not coming (a whole sender timeout).
    fn awaiting_leader(&self, now: Time) -> bool {
        self.outgoing.as_ref().is_some_and(|o| o.accepted && now < o.expires)
    }

    /// The (declared time, peer) order this peer's requests carry.
    fn request_expiration(&self, now: Time) -> Time {
        self.declared.unwrap_or_else(|| self.intended_start(now))
    }

    fn request_next(&mut self, now: Time) {
        let own = self.request_expiration(now);
        let best = self
            .board
            .averagers(&self.group_key, now, true)
            .into_iter()
            .find(|(peer, expiration)| {
                *peer != self.local
                    && *expiration > now
                    && precedes((*expiration, peer), (own, &self.local))
                    && !self.tried.contains(&(*peer, expiration.to_bits()))
                    && !self.followers.iter().any(|f| f.peer == *peer)
            });
        if let Some((leader, expiration)) = best {
            self.send_request(leader, Some(expiration), 0, now);
        }
    }

    fn send_request(&mut self, leader: PeerId, known_expiration: Option<Time>, redirects: u32, now: Time) {
        self.tried
            .insert((leader, known_expiration.map_or(u64::MAX, f64::to_bits)));
        let request_expiration = self.request_expiration(now);
        let request_timeout = self.config.request_timeout.as_secs_f64();
        let id = self.next_request_id;
        self.next_request_id += 1;
        self.requests += 1;
        self.outgoing = Some(Outgoing {
            id,
            leader,
            accepted: false,
            expires: now + request_timeout,
            request_expiration,
            redirects,
        });
        self.actions.push_back(Action::RequestJoin {
            request_id: id,
            leader,
            request: JoinRequest {
                schema_hash: self.request.schema_hash.0.to_vec(),
                expiration: request_expiration,
                gather: self.request.gather.clone(),
                client_mode: self.request.client_mode,
                group_key: self.group_key.clone(),
            },
            keep_until: request_expiration.max(now) + request_timeout,
        });
    }

    fn assemble(&mut self) {
        self.groups_made += 1;
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"colony/group-id/1");
        context.update(&self.seed);
        context.update(&self.groups_made.to_le_bytes());
        let mut group_id = [0u8; 32];
        group_id.copy_from_slice(context.finish().as_ref());

        let followers = std::mem::take(&mut self.followers);
        let mut order: Vec<(PeerId, Bytes)> = followers
            .iter()
            .map(|f| (f.peer, f.gather.clone()))
            .chain(std::iter::once((self.local, self.request.gather.clone())))
            .collect();
        SplitMix64::from_bytes(&group_id).shuffle(&mut order);
        let (members, gathered): (Vec<PeerId>, Vec<Bytes>) = order.into_iter().unzip();
        let message = MessageFromLeader {
            code: MessageCode::BeginAllreduce,
            group_id: Some(group_id),
            suggested_leader: None,
            members: members.clone(),
            gathered: gathered.clone(),
        };
        for follower in &followers {
            self.actions.push_back(Action::SendToFollower {
                follower: follower.peer,
                message: message.clone(),
            });
        }
        self.largest_group = self.largest_group.max(members.len());
        self.finish(Ok(GroupInfo {
            group_id,
            members,
            gathered,
            group_key: self.group_key.clone(),
        }));
    }

    fn disband(&mut self, code: MessageCode, suggested_leader: Option<PeerId>) {
        for follower in std::mem::take(&mut self.followers) {
            self.actions.push_back(Action::SendToFollower {
                follower: follower.peer,
                message: MessageFromLeader::redirect(code, suggested_leader),
            });
        }
    }

    fn finish(&mut self, result: Result<GroupInfo, MatchmakingError>) {
        self.finished = true;
        self.redirect = None;
        if let Some(outgoing) = self.outgoing.take() {
            self.actions.push_back(Action::AbandonRequest {
                request_id: outgoing.id,
            });
        }
        self.disband(MessageCode::GroupDisbanded, None);
        if let Some(expiration) = self.declared {
            self.actions.push_back(Action::Declare(Declaration {
                expiration,
                looking: false,
            }));
        }
        self.actions.push_back(Action::Finished(result));
    }

    /// The group a leader announced, if it holds together for this peer.
    fn group_from(&self, message: &MessageFromLeader, leader: &PeerId) -> Result<GroupInfo, String> {
        let group_id = message.group_id.ok_or("no group id")?;
        let members = &message.members;
        if !members.contains(&self.local) {
            return Err("this peer is not among the members".into());
        }
        if !members.contains(leader) {
            return Err("the leader is not among the members".into());
        }
        let distinct: HashSet<&PeerId> = members.iter().collect();
        if distinct.len() != members.len() {
            return Err("a member is listed twice".into());
        }
        if message.gathered.len() != members.len() {
            return Err("gathered entries do not match the members".into());
        }
        Ok(GroupInfo {
            group_id,
            members: members.clone(),
            gathered: message.gathered.clone(),
            group_key: self.group_key.clone(),
        })
    }

    fn count(&mut self, answer: &'static str) {
        *self.answers.entry(answer).or_default() += 1;
    }

    fn no_group(&self, now: Time) -> MatchmakingError {
        MatchmakingError::NoGroup {
            key: self.group_key.clone(),
            waited: Duration::from_secs_f64((now - self.started).max(0.0)),
            seen: self.seen.len(),
            requests: self.requests,
            answers: self.answers.iter().map(|(name, count)| (*name, *count)).collect(),
            largest_group: self.largest_group,
            min_group_size: self.config.min_group_size,
        }
    }
}

/// Whether `a` comes strictly before `b` in the leader order: the earlier declared time, ties broken by the
/// smaller peer id.
fn precedes(a: (Time, &PeerId), b: (Time, &PeerId)) -> bool {
    a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)).is_lt()
}
