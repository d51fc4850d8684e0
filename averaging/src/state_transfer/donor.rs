//! The donor's side of `/colony/state/1`: answer each request from one snapshot of the state.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use colony_transports::StreamError;
use colony_transports::rpc::{IncomingStream, Router};
use colony_transports::wire::WireError;

use super::wire::{StateInfo, StateRequest, StateResponse, chunk_count, chunk_range, encode_values};
use super::{MAX_CHUNK_VALUES, StateProvider, protocol};

/// The refusal a donor sends while its provider shares nothing.
pub(super) const NOT_SHARING: &str = "this peer does not share its state now";

/// Serves `/colony/state/1` on `router` from `provider`'s snapshots.
///
/// Each stream takes one snapshot when its request arrives and serves the whole range from it, so a
/// receiver never sees values of two epochs in one stream even while the trainer moves on. Every send waits
/// at most the router's message timeout, so a receiver that stops reading cannot hold the snapshot forever.
pub fn serve(router: &mut Router, provider: Arc<dyn StateProvider>) {
    router.stream(protocol(), move |incoming| serve_stream(incoming, provider.clone()));
}

async fn serve_stream(mut incoming: IncomingStream, provider: Arc<dyn StateProvider>) -> Result<(), WireError> {
    let timeout = incoming.config.message_timeout;
    let (request, _) = incoming
        .framed::<StateRequest>()
        .recv_required("the state request")
        .await?;
    let send = &mut incoming.send;
    let Some(snapshot) = provider.snapshot() else {
        let refusal = StateResponse::Refused {
            reason: NOT_SHARING.to_owned(),
        };
        within(timeout, send.send(&refusal, Bytes::new())).await?;
        return within(timeout, send.finish()).await;
    };
    if request.chunk_values == 0 || request.chunk_values > MAX_CHUNK_VALUES {
        let message = format!(
            "chunks of {} values are not served (1 to {MAX_CHUNK_VALUES} values)",
            request.chunk_values
        );
        within(timeout, send.send_error(&message)).await?;
        return within(timeout, send.finish()).await;
    }
    let values = snapshot.tensors.as_slice();
    let total_values = values.len() as u64;
    let info = StateInfo {
        epoch: snapshot.epoch,
        schema_hash: snapshot.tensors.layout().schema_hash().0,
        total_values,
        chunk_values: request.chunk_values,
    };
    within(
        timeout,
        send.send(&StateResponse::Info(info), snapshot.metadata.clone()),
    )
    .await?;
    let chunks = chunk_count(total_values, request.chunk_values);
    let end = request
        .start_chunk
        .checked_add(request.chunk_count)
        .filter(|&end| end <= chunks);
    let Some(end) = end else {
        let message = format!(
            "chunks {}+{} requested, but the state has {chunks} chunks of {} values",
            request.start_chunk, request.chunk_count, request.chunk_values
        );
        within(timeout, send.send_error(&message)).await?;
        return within(timeout, send.finish()).await;
    };
    for index in request.start_chunk..end {
        let payload = encode_values(&values[chunk_range(index, request.chunk_values, total_values)]);
        within(timeout, send.send(&StateResponse::Chunk { index }, payload)).await?;
    }
    within(timeout, send.finish()).await
}

/// Bounds one send: a receiver that stops reading must not hold the donor's task and snapshot forever.
async fn within<T>(after: Duration, send: impl Future<Output = Result<T, WireError>>) -> Result<T, WireError> {
    tokio::time::timeout(after, send).await.map_err(|_| {
        WireError::Stream(StreamError::Timeout {
            what: "sending state to the receiver",
            after,
        })
    })?
}
