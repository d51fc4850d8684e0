//! Dispatches incoming all-reduce streams to the local run of their group.
//!
//! A sender may open its stream before this peer's run of the same group has started (the leader's
//! announcement reaches members at slightly different times), so a stream whose group is unknown waits up
//! to [`ServiceConfig::registration_timeout`] for it. Groups that ended are remembered for a while, so a late
//! stream gets "cancelled" or "finished" at once instead of waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colony_transports::rpc::{FramedRecv, FramedSend, IncomingStream, Router};
use colony_transports::wire::{ProtocolId, WireError};
use colony_transports::{PeerId, RecvStream};
use tokio::sync::{Notify, mpsc};

use super::GroupId;
use super::messages::{Refusal, ToReducer, ToSender};
use crate::reducer::SumPool;

/// The protocol id of the all-reduce streams.
pub fn protocol() -> ProtocolId {
    ProtocolId::new("allreduce", 1).expect("a valid protocol name")
}

/// Settings of an [`AllReduceService`].
#[derive(Debug, Clone, Copy)]
pub struct ServiceConfig {
    /// How long an incoming stream waits for the local run of its group to start.
    pub registration_timeout: Duration,
    /// How many ended groups are remembered to refuse late streams at once.
    pub remembered_groups: usize,
    /// Spare part-sized buffers kept between parts and rounds for the sums this peer reduces (16 by
    /// default: 8 MiB with 512 KiB parts). A round reuses them instead of faulting in fresh memory for
    /// every part; 0 allocates every sum afresh.
    pub spare_sum_buffers: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            registration_timeout: Duration::from_secs(5),
            remembered_groups: 256,
            spare_sum_buffers: 16,
        }
    }
}

/// A sender's stream handed to the run of its group.
pub(crate) struct IncomingPart {
    pub peer: PeerId,
    pub send: FramedSend,
    pub recv: RecvStream,
}

enum Entry {
    Active(mpsc::UnboundedSender<IncomingPart>),
    Ended(Refusal),
}

struct Inner {
    config: ServiceConfig,
    groups: Mutex<HashMap<GroupId, Entry>>,
    ended: Mutex<VecDeque<GroupId>>,
    registered: Notify,
    sums: Arc<SumPool>,
}

/// Serves `/colony/allreduce/1` on a [`Router`] and routes each stream to its group's run. One per peer;
/// clones share it.
#[derive(Clone)]
pub struct AllReduceService {
    inner: Arc<Inner>,
}

impl AllReduceService {
    /// A service with `config`.
    pub fn new(config: ServiceConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                groups: Mutex::new(HashMap::new()),
                ended: Mutex::new(VecDeque::new()),
                registered: Notify::new(),
                sums: Arc::new(SumPool::new(config.spare_sum_buffers)),
            }),
        }
    }

    /// Serves the all-reduce protocol on `router`.
    pub fn serve(&self, router: &mut Router) {
        let inner = self.inner.clone();
        router.stream(protocol(), move |incoming| {
            let inner = inner.clone();
            async move { inner.dispatch(incoming).await }
        });
    }

    /// Registers the local run of `group`; its senders' streams arrive on the returned channel until the
    /// registration is dropped.
    pub(crate) fn register(&self, group: GroupId) -> Registration {
        let (sender, receiver) = mpsc::unbounded_channel();
        lock(&self.inner.groups).insert(group, Entry::Active(sender));
        self.inner.registered.notify_waiters();
        Registration {
            inner: self.inner.clone(),
            group,
            receiver,
            outcome: Refusal::Finished,
        }
    }

    /// Marks `group` as cancelled here without a run: its senders are refused at once.
    pub fn refuse_group(&self, group: GroupId) {
        self.inner.end(group, Refusal::Cancelled);
    }

    /// The spare buffers of this peer's part sums, shared by its runs.
    pub(crate) fn sum_pool(&self) -> Arc<SumPool> {
        self.inner.sums.clone()
    }

    /// Spare buffers held for the sums of later parts (at most [`ServiceConfig::spare_sum_buffers`]).
    pub fn spare_sum_buffers(&self) -> usize {
        self.inner.sums.spare()
    }

    /// Number of groups with a live run here.
    pub fn active_groups(&self) -> usize {
        lock(&self.inner.groups)
            .values()
            .filter(|e| matches!(e, Entry::Active(_)))
            .count()
    }
}

impl Default for AllReduceService {
    fn default() -> Self {
        Self::new(ServiceConfig::default())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single insert, lookup or removal: a poisoned map is still consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn end(&self, group: GroupId, why: Refusal) {
        lock(&self.groups).insert(group, Entry::Ended(why));
        let mut ended = lock(&self.ended);
        ended.push_back(group);
        while ended.len() > self.config.remembered_groups {
            if let Some(old) = ended.pop_front() {
                let mut groups = lock(&self.groups);
                if matches!(groups.get(&old), Some(Entry::Ended(_))) {
                    groups.remove(&old);
                }
            }
        }
    }

    async fn dispatch(&self, mut incoming: IncomingStream) -> Result<(), WireError> {
        let timeout = self.config.registration_timeout;
        let recv = std::mem::replace(&mut incoming.recv, RecvStream::new(Box::new(NoStream)));
        let mut framed = FramedRecv::<ToReducer>::new(recv, incoming.config.limits, timeout);
        let (begin, _) = framed.recv_required("the begin message").await?;
        let ToReducer::Begin { group_id } = begin else {
            return refuse(
                incoming.send,
                Refusal::ProtocolViolation,
                "the first message must be Begin",
            )
            .await;
        };
        let group = GroupId(group_id);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.registered.notified();
            tokio::pin!(notified);
            // Register interest before looking, so a registration between the lookup and the wait is seen.
            notified.as_mut().enable();
            let found = match lock(&self.groups).get(&group) {
                Some(Entry::Active(runs)) => Some(Ok(runs.clone())),
                Some(Entry::Ended(why)) => Some(Err(*why)),
                None => None,
            };
            match found {
                Some(Ok(runs)) => {
                    let part = IncomingPart {
                        peer: incoming.peer,
                        send: incoming.send,
                        recv: framed.into_inner(),
                    };
                    if let Err(mpsc::error::SendError(part)) = runs.send(part) {
                        return refuse(part.send, Refusal::Finished, "the run ended").await;
                    }
                    return Ok(());
                }
                Some(Err(why)) => return refuse(incoming.send, why, "the run ended").await,
                None => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let detail = format!("no run of this group started here within {timeout:?}");
                        return refuse(incoming.send, Refusal::UnknownGroup, &detail).await;
                    }
                }
            }
        }
    }
}

/// Sends a refusal and closes the stream.
pub(crate) async fn refuse(mut send: FramedSend, why: Refusal, detail: &str) -> Result<(), WireError> {
    let message = ToSender::Refused {
        code: why.code(),
        detail: detail.to_owned(),
    };
    send.send(&message, bytes::Bytes::new()).await?;
    send.finish().await
}

/// The local run's end of the service: streams of its group, and the group's removal when dropped.
pub(crate) struct Registration {
    inner: Arc<Inner>,
    group: GroupId,
    pub receiver: mpsc::UnboundedReceiver<IncomingPart>,
    /// How late streams are answered after the run ends.
    pub outcome: Refusal,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.end(self.group, self.outcome);
    }
}

struct NoStream;

#[async_trait::async_trait]
impl colony_transports::transport::RecvStreamImpl for NoStream {
    async fn read_chunk(&mut self, _max_len: usize) -> Result<Option<bytes::Bytes>, colony_transports::StreamError> {
        Ok(None)
    }

    fn stop(&mut self, _code: u32) {}
}
