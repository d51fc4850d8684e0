//! Streams count their bytes into `colony_bytes_sent_total` / `colony_bytes_received_total`, labelled with the
//! transport and the protocol, on both the opening and the serving side.

mod support;

use bytes::Bytes;
use colony_transports::Keypair;
use colony_transports::mem::MemHub;
use colony_transports::rpc::{StreamConfig, call};
use colony_transports::wire::PREAMBLE_LEN;
use metrics_exporter_prometheus::PrometheusBuilder;
use support::{Setup, bounded, echo_protocol, link, test_router, wait_until};

/// The value of the sample line `name{labels}` in a Prometheus text rendering.
fn sample(rendered: &str, series: &str) -> Option<u64> {
    rendered
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn rpc_streams_count_their_bytes_by_transport_and_protocol() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // The recorder is local to this thread; a current-thread runtime keeps every task on it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let hub = MemHub::new();
            let setup = Setup {
                server: hub.transport(&Keypair::generate()),
                client: hub.transport(&Keypair::generate()),
                listen: "mem://server".parse().unwrap(),
            };
            let linked = link(&setup).await;
            let serving = tokio::spawn(test_router().serve(linked.server.clone()));
            let payload = Bytes::from(vec![7u8; 100_000]);
            let (reply, echoed): (String, Bytes) = bounded(
                "the echo call",
                call(
                    &linked.client,
                    &echo_protocol(),
                    &"hello".to_string(),
                    payload.clone(),
                    support::WAIT,
                    &StreamConfig::default(),
                ),
            )
            .await
            .unwrap();
            assert_eq!((reply.as_str(), echoed.len()), ("hello", payload.len()));

            let sent = r#"colony_bytes_sent_total{transport="mem",protocol="echo"}"#;
            let received = r#"colony_bytes_received_total{transport="mem",protocol="echo"}"#;
            // Both sides live in this process: what one sent, the other received, open frame included.
            wait_until("every sent byte is counted as received", || {
                let rendered = handle.render();
                sample(&rendered, sent).is_some() && sample(&rendered, sent) == sample(&rendered, received)
            })
            .await;
            let total = sample(&handle.render(), sent).unwrap();
            // Three frames (open, request, response) with small headers, and the payload both ways.
            let payloads = 2 * payload.len() as u64;
            let frames = 3 * PREAMBLE_LEN as u64;
            assert!(
                total >= payloads + frames && total < payloads + frames + 1024,
                "{total} bytes counted for {payloads} payload bytes"
            );
            serving.abort();
        })
    });
}
