//! loadgen: an open-loop (fixed-rate) or closed-loop HTTP load generator that reports latency
//! percentiles per status code and counts requests that hang or fail.
//!
//! wrk and oha report one latency distribution for all responses; the overload scenario needs the
//! 503s and the admitted 200s apart, and needs to prove that no request hung. Every request is
//! bounded by `--timeout`; the run is bounded by `--duration` and `--max-requests`.
//!
//! ```sh
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080/function/slow/ \
//!     --rate 200 --duration 30s --timeout 60s --json out.json
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sluicegate::config::parse_duration;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Open- or closed-loop HTTP load with per-status latency percentiles")]
struct Args {
    /// Target URL.
    #[arg(long)]
    url: String,
    /// Request method (e.g. POST for /async-function/...).
    #[arg(long, default_value = "GET")]
    method: http::Method,
    /// Request body size in bytes (0: no body).
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Requests per second, open loop (arrivals do not wait for responses). 0: closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Closed loop: requests kept in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to send requests.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many requests.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// A request without a complete response by then counts as hung.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    timeout: Duration,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// A label for the summary.
    #[arg(long, default_value = "run")]
    label: String,
}

#[derive(Default)]
struct Record {
    by_status: BTreeMap<u16, Vec<f64>>,
    errors: BTreeMap<String, u64>,
    hung: u64,
}

#[derive(Serialize)]
struct StatusSummary {
    count: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Summary {
    label: String,
    url: String,
    offered_rate: f64,
    seconds: f64,
    sent: u64,
    completed: u64,
    achieved_rate: f64,
    hung: u64,
    errors: BTreeMap<String, u64>,
    by_status: BTreeMap<u16, StatusSummary>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What each request sends.
#[derive(Clone)]
struct Spec {
    method: http::Method,
    body: Bytes,
}

async fn one(
    client: Client<HttpConnector, Full<Bytes>>,
    url: hyper::Uri,
    spec: Spec,
    timeout: Duration,
    record: Arc<Mutex<Record>>,
) {
    let started = Instant::now();
    let request = http::Request::builder()
        .method(spec.method)
        .uri(url)
        .body(Full::new(spec.body))
        .unwrap();
    let outcome = tokio::time::timeout(timeout, async {
        let resp = client.request(request).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok::<u16, Box<dyn std::error::Error + Send + Sync>>(status)
    })
    .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut r = record.lock().unwrap();
    match outcome {
        Err(_) => r.hung += 1,
        Ok(Err(e)) => *r.errors.entry(e.to_string()).or_default() += 1,
        Ok(Ok(status)) => r.by_status.entry(status).or_default().push(ms),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let url: hyper::Uri = args.url.parse().expect("a valid URL");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let spec = Spec {
        method: args.method.clone(),
        body: Bytes::from(vec![b'x'; args.body_bytes]),
    };
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(10_000)
        .build(connector);
    let record = Arc::new(Mutex::new(Record::default()));
    let started = Instant::now();
    let end = started + args.duration;
    let mut sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    if args.rate > 0.0 {
        let gap = Duration::from_secs_f64(1.0 / args.rate);
        let mut next = started;
        while next < end && sent < args.max_requests {
            tokio::time::sleep_until(next).await;
            tasks.spawn(one(
                client.clone(),
                url.clone(),
                spec.clone(),
                args.timeout,
                record.clone(),
            ));
            sent += 1;
            next += gap;
            while tasks.try_join_next().is_some() {}
        }
    } else {
        let sent_counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..args.concurrency {
            let client = client.clone();
            let url = url.clone();
            let spec = spec.clone();
            let record = record.clone();
            let sent_counter = sent_counter.clone();
            let (timeout, max) = (args.timeout, args.max_requests);
            tasks.spawn(async move {
                while Instant::now() < end
                    && sent_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < max
                {
                    one(
                        client.clone(),
                        url.clone(),
                        spec.clone(),
                        timeout,
                        record.clone(),
                    )
                    .await;
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    let record = Arc::try_unwrap(record).ok().unwrap().into_inner().unwrap();
    let completed: u64 = record.by_status.values().map(|v| v.len() as u64).sum();
    if args.rate == 0.0 {
        sent = completed + record.hung + record.errors.values().sum::<u64>();
    }
    let by_status = record
        .by_status
        .into_iter()
        .map(|(status, mut v)| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let s = StatusSummary {
                count: v.len(),
                p50_ms: percentile(&v, 50.0),
                p90_ms: percentile(&v, 90.0),
                p99_ms: percentile(&v, 99.0),
                max_ms: v.last().copied().unwrap_or(0.0),
            };
            (status, s)
        })
        .collect::<BTreeMap<_, _>>();
    let summary = Summary {
        label: args.label,
        url: args.url,
        offered_rate: args.rate,
        seconds,
        sent,
        completed,
        achieved_rate: completed as f64 / seconds,
        hung: record.hung,
        errors: record.errors,
        by_status,
    };
    println!(
        "{}: sent {} completed {} in {:.1}s ({:.0}/s), hung {}, errors {}",
        summary.label,
        summary.sent,
        summary.completed,
        summary.seconds,
        summary.achieved_rate,
        summary.hung,
        summary.errors.values().sum::<u64>()
    );
    println!("| status | count | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (status, s) in &summary.by_status {
        println!(
            "| {status} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
        );
    }
    for (e, n) in &summary.errors {
        println!("error x{n}: {e}");
    }
    if let Some(path) = args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary).unwrap()).unwrap();
    }
}
