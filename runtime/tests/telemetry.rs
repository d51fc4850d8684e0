//! The Prometheus exporter: errors for a taken address and a second recorder, and the text format with
//! histogram buckets over HTTP. The recorder is process-global, so this binary holds one test that does it
//! all in order.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use colony::telemetry::{TelemetryError, serve_prometheus};

/// `GET /metrics` over plain HTTP/1.1; the body.
fn scrape(address: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "the exporter answered: {head}");
    Ok(body.to_owned())
}

/// The value of the sample `series` (name and labels, exactly as rendered).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn exporter_serves_histograms_with_buckets_and_refuses_misuse() {
    // A taken address is refused and installs nothing, so the next call can succeed.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap();
    match serve_prometheus(taken_address) {
        Err(TelemetryError::Bind { address, .. }) => assert_eq!(address, taken_address),
        other => panic!("serving on a taken address gave {other:?}"),
    }
    drop(taken);

    let bound = serve_prometheus("127.0.0.1:0".parse().unwrap()).expect("the exporter starts on a free port");
    assert_ne!(bound.port(), 0, "the bound port is reported");
    let second = serve_prometheus("127.0.0.1:0".parse().unwrap());
    assert!(
        matches!(second, Err(TelemetryError::RecorderAlreadyInstalled)),
        "a second exporter gave {second:?}"
    );

    metrics::histogram!("colony_allreduce_seconds").record(0.3);
    metrics::histogram!("colony_allreduce_seconds").record(7.0);
    metrics::histogram!("colony_round_seconds", "kind" => "gradient", "outcome" => "averaged").record(0.004);
    metrics::counter!("colony_records_refused_total", "reason" => "expired").increment(2);
    metrics::histogram!("an_application_histogram").record(0.02);

    // The exporter's thread may still be getting ready: poll until it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        match scrape(bound) {
            Ok(body) if body.contains("colony_allreduce_seconds") => break body,
            result if Instant::now() > deadline => panic!("no metrics from {bound} within 30 s: {result:?}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };

    assert!(body.contains("# TYPE colony_allreduce_seconds histogram"), "{body}");
    assert!(body.contains("# HELP colony_allreduce_seconds "), "{body}");
    // Cumulative buckets from LONG_SECONDS_BUCKETS: 0.3 s falls in le=0.5, 7 s in le=10.
    assert_eq!(
        sample(&body, r#"colony_allreduce_seconds_bucket{le="0.25"}"#),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"colony_allreduce_seconds_bucket{le="0.5"}"#),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"colony_allreduce_seconds_bucket{le="5"}"#),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"colony_allreduce_seconds_bucket{le="10"}"#),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"colony_allreduce_seconds_bucket{le="+Inf"}"#),
        Some(2.0),
        "{body}"
    );
    assert_eq!(sample(&body, "colony_allreduce_seconds_count"), Some(2.0), "{body}");
    assert_eq!(sample(&body, "colony_allreduce_seconds_sum"), Some(7.3), "{body}");
    // Labels are kept, and a short-duration bucket exists for the optimizer's rounds.
    assert_eq!(
        sample(
            &body,
            r#"colony_round_seconds_bucket{kind="gradient",outcome="averaged",le="0.01"}"#
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"colony_records_refused_total{reason="expired"}"#),
        Some(2.0),
        "{body}"
    );
    // A histogram Colony does not know still gets buckets (not quantiles).
    assert!(body.contains("# TYPE an_application_histogram histogram"), "{body}");
    assert!(!body.contains("quantile="), "every histogram has buckets: {body}");
}

/// The `## Metrics` section of docs/operations.md.
fn metrics_docs() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("reading {path}: {error}"));
    let start = text
        .find("\n## Metrics\n")
        .expect("docs/operations.md has a ## Metrics section");
    let section = &text[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |end| end + 3);
    section[..end].to_owned()
}

#[test]
fn the_metrics_docs_name_every_histogram_bucket_and_refusal_reason() {
    let docs = metrics_docs();
    for (name, buckets) in colony::telemetry::HISTOGRAMS {
        assert!(
            docs.contains(&format!("`{name}`")),
            "docs/operations.md does not document {name}"
        );
        let set = if *buckets == colony::telemetry::SHORT_SECONDS_BUCKETS {
            "short"
        } else {
            "long"
        };
        assert!(
            docs.lines()
                .any(|line| line.starts_with(&format!("| `{name}` | histogram ({set})"))),
            "docs/operations.md does not give {name} the {set} buckets"
        );
    }
    for (set, buckets) in [
        ("short", colony::telemetry::SHORT_SECONDS_BUCKETS),
        ("long", colony::telemetry::LONG_SECONDS_BUCKETS),
    ] {
        let listed: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
        let line = format!("- **{set}**: {}", listed.join(", "));
        assert!(
            docs.contains(&line),
            "docs/operations.md does not list the {set} buckets as: {line}"
        );
    }
    for reason in colony::records::replica::REFUSAL_REASONS {
        assert!(
            docs.contains(&format!("`{reason}`")),
            "docs/operations.md does not name the refusal reason {reason}"
        );
    }
}
