//! HTTP/2 abuse from clients, in frames written by hand over a socket (a well-behaved client
//! library would refuse to send them): rapid reset (CVE-2023-44487), a CONTINUATION flood, PING
//! and SETTINGS floods from a client that never reads, more streams than
//! `max_concurrent_streams`, and an oversized header block. Each attack is bounded in frames and
//! time; each test then checks that the abusive connection was closed or its abuse bounded (the
//! gateway's memory, here the test process's, did not grow with it), and that another client is
//! still served. What each costs in RSS and in a well-behaved client's latency is measured by
//! `loadtests/h2abuse.py`, not here.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::h2raw::*;
use common::*;
use http::Request;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The tests measure the process's memory: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The same, for a client that never reads: the socket stays whole and unread.
async fn connect_deaf(gw: SocketAddr) -> TcpStream {
    let mut sock = TcpStream::connect(gw).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    sock.write_all(&hello).await.unwrap();
    sock
}

/// Writes `batch` up to `times` times within `limit`; how many went out before the gateway
/// stopped reading (the time ran out), ended the connection, or all did.
async fn flood(write: &mut (impl AsyncWriteExt + Unpin), batch: &[u8], times: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    while sent < times {
        match tokio::time::timeout_at(deadline, write.write_all(batch)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    sent
}

/// Resident memory of this process (the in-process gateway's and the test's), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Waits (bounded) until `cond` holds.
async fn eventually(cond: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

async fn gateway(backend: &Backend, keys: &str) -> Gw {
    Gw::start_static("f", &backend.url(), keys).await
}

/// Another client, over HTTP/2 and over HTTP/1.1, still gets its answer from `function`.
async fn others_are_served_by(gw: &Gw, function: &str) {
    let path = format!("/function/{function}/");
    let h2 = send_with(
        &h2c_client(),
        Request::get(gw.url(&path)).body(empty()).unwrap(),
    )
    .await;
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(gw.get(&path).await.status, 200);
}

async fn others_are_served(gw: &Gw) {
    others_are_served_by(gw, "f").await;
}

#[tokio::test]
async fn rapid_reset_gets_the_connection_closed_and_others_served() {
    let _serial = SERIAL.lock().await;
    let backend = Backend::ok().await;
    let gw = gateway(&backend, "").await;
    let (mut write, seen) = connect(gw.addr).await;
    let block = get_block("/function/f/");
    let before = rss_kib();
    // 100,000 streams at most, each opened and cancelled at once, 100 to a write.
    let mut sent = 0u32;
    let mut stream = 1u32;
    while sent < 100_000 && !seen.ended() {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
            batch.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
            stream += 2;
        }
        if write.write_all(&batch).await.is_err() {
            break;
        }
        sent += 100;
    }
    assert!(
        eventually(|| seen.ended()).await,
        "still open after {sent} resets"
    );
    let grown = rss_kib().saturating_sub(before);
    println!(
        "rapid reset: closed after {sent} HEADERS+RST_STREAM pairs, GOAWAY {:?}, {} requests reached the replica, RSS +{grown} KiB",
        seen.goaway.lock().unwrap(),
        backend.stats.requests.load(Ordering::SeqCst)
    );
    assert!(sent < 100_000, "all 100,000 resets were read");
    others_are_served(&gw).await;
    drop(write);
    gw.shutdown().await;
}

#[tokio::test]
async fn continuation_flood_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let backend = Backend::ok().await;
    let gw = gateway(&backend, "").await;
    let (mut write, seen) = connect(gw.addr).await;
    let before = rss_kib();
    // A HEADERS frame without END_HEADERS, then up to 64 MiB of CONTINUATION frames (16 KiB
    // each, the default frame size) that never end the block.
    let mut fields = Vec::new();
    while fields.len() < 16 * 1024 - 64 {
        literal(&mut fields, b"x-flood", b"0123456789abcdef0123456789abcdef");
    }
    let mut first = frame(HEADERS, 0, 1, &get_block("/function/f/"));
    first.extend(frame(CONTINUATION, 0, 1, &fields));
    write.write_all(&first).await.unwrap();
    let batch = frame(CONTINUATION, 0, 1, &fields);
    let mut sent = 0;
    while sent < 4096 && !seen.ended() {
        if write.write_all(&batch).await.is_err() {
            break;
        }
        sent += 1;
    }
    assert!(
        eventually(|| seen.ended()).await,
        "still open after {sent} CONTINUATION frames"
    );
    let grown = rss_kib().saturating_sub(before);
    println!(
        "CONTINUATION flood: closed after {sent} frames of 16 KiB, GOAWAY {:?}, RSS +{grown} KiB",
        seen.goaway.lock().unwrap()
    );
    assert!(sent < 4096, "all 64 MiB of CONTINUATION frames were read");
    assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 0);
    others_are_served(&gw).await;
    drop(write);
    gw.shutdown().await;
}

/// A client that sends frames each owing an answer (PING, SETTINGS) and never reads the
/// answers: the gateway stops reading once its answers cannot be written, so what it holds for
/// that connection stays bounded.
async fn deaf_flood(frame_bytes: Vec<u8>, what: &str) {
    let _serial = SERIAL.lock().await;
    let backend = Backend::ok().await;
    let gw = gateway(&backend, "").await;
    let mut sock = connect_deaf(gw.addr).await;
    let batch = frame_bytes.repeat(1000);
    let before = rss_kib();
    // Up to 4,000,000 frames (~70 MiB), 10 s at most.
    let sent = flood(&mut sock, &batch, 4000).await;
    let grown = rss_kib().saturating_sub(before);
    println!(
        "{what} flood, never reading: {} of 4,000,000 frames written ({} KiB) before the gateway stopped reading or the time ran out, RSS +{grown} KiB",
        sent * 1000,
        sent * batch.len() / 1024
    );
    assert!(
        sent < 4000,
        "the gateway read 4,000,000 {what} frames it could not answer"
    );
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB");
    others_are_served(&gw).await;
    drop(sock);
    gw.shutdown().await;
}

#[tokio::test]
async fn ping_flood_from_a_client_that_never_reads_is_bounded() {
    deaf_flood(frame(PING, 0, 0, b"abcdefgh"), "PING").await;
}

#[tokio::test]
async fn settings_flood_from_a_client_that_never_reads_is_bounded() {
    // SETTINGS_INITIAL_WINDOW_SIZE = 65535, each owing an ACK.
    deaf_flood(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]), "SETTINGS").await;
}

#[tokio::test]
async fn streams_past_max_concurrent_streams_are_refused() {
    let _serial = SERIAL.lock().await;
    // The replica holds every request until the test lets them go.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let backend = Backend::start(move |_, _| {
        let gate = held.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            http::Response::new(body("ok\n"))
        }
    })
    .await;
    let other = Backend::ok().await;
    let gw = Gw::start(&format!(
        "{}{}",
        static_fn(
            "f",
            &backend.url(),
            "max_ongoing_requests = 4000\nmax_queued_requests = 4000"
        ),
        static_fn("g", &other.url(), "")
    ))
    .await;
    let (mut write, seen) = connect(gw.addr).await;
    let block = get_block("/function/f/");
    let limit = sluicegate::server::H2_MAX_CONCURRENT_STREAMS;
    let extra = 100;
    let mut batch = Vec::new();
    for i in 0..limit + extra {
        batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, &block));
    }
    write.write_all(&batch).await.unwrap();
    let refused = eventually(|| seen.resets_with(REFUSED_STREAM) >= extra as usize).await;
    backend.until_inflight(limit).await;
    println!(
        "{} streams opened at once with max_concurrent_streams = {limit}: {} refused (REFUSED_STREAM), {} reached the replica, GOAWAY {:?}",
        limit + extra,
        seen.resets_with(REFUSED_STREAM),
        backend.stats.requests.load(Ordering::SeqCst),
        seen.goaway.lock().unwrap()
    );
    assert!(refused, "{} refused", seen.resets_with(REFUSED_STREAM));
    others_are_served_by(&gw, "g").await;
    // Let the held requests go: the streams that were accepted get their answers.
    gate.add_permits((limit + extra) as usize + 10);
    let answered = eventually(|| seen.heads.lock().unwrap().len() >= limit as usize).await;
    assert!(answered, "{} answered", seen.heads.lock().unwrap().len());
    drop(write);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_oversized_header_block_is_refused_and_the_connection_goes_on() {
    let _serial = SERIAL.lock().await;
    let backend = Backend::ok().await;
    // The header list may not exceed max_header_bytes (64 KiB by default).
    let gw = gateway(&backend, "").await;
    let gw_limit = 64 * 1024;
    let (mut write, seen) = connect(gw.addr).await;
    // One header block of ~80 KiB (in 16 KiB frames): over the limit, not a flood.
    let mut block = get_block("/function/f/");
    while block.len() < gw_limit + 16 * 1024 {
        literal(&mut block, b"x-big", &[b'a'; 1000]);
    }
    let mut out = Vec::new();
    let mut pieces = block.chunks(16 * 1024).peekable();
    let mut kind = HEADERS;
    while let Some(piece) = pieces.next() {
        let flags = if pieces.peek().is_none() {
            END_HEADERS | END_STREAM
        } else {
            0
        };
        out.extend(frame(kind, flags, 1, piece));
        kind = CONTINUATION;
    }
    // Then a normal request on the same connection.
    out.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &get_block("/function/f/"),
    ));
    write.write_all(&out).await.unwrap();
    let second = eventually(|| {
        seen.data
            .lock()
            .unwrap()
            .iter()
            .any(|(s, d)| *s == 3 && d == b"ok\n")
    })
    .await;
    let first = seen
        .heads
        .lock()
        .unwrap()
        .iter()
        .find(|(s, _)| *s == 1)
        .map(|(_, status)| *status);
    let first_reset = seen.resets.lock().unwrap().iter().any(|(s, _)| *s == 1);
    println!(
        "oversized header block: stream 1 answered {first:?}, reset {first_reset}; stream 3 served: {second}; GOAWAY {:?}; {} request(s) reached the replica",
        seen.goaway.lock().unwrap(),
        backend.stats.requests.load(Ordering::SeqCst)
    );
    let first_refused = first == Some(431) || (first.is_none() && first_reset);
    assert!(first_refused && second);
    assert!(seen.goaway.lock().unwrap().is_none());
    assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 1);
    drop(write);
    gw.shutdown().await;
}

/// An oversized header block, `n` times on streams 1, 3, 5, …, in 16 KiB frames.
fn oversized_blocks(n: u32) -> Vec<u8> {
    let mut block = get_block("/function/f/");
    while block.len() < 80 * 1024 {
        literal(&mut block, b"x-big", &[b'a'; 1000]);
    }
    let mut out = Vec::new();
    for i in 0..n {
        let mut pieces = block.chunks(16 * 1024).peekable();
        let mut kind = HEADERS;
        while let Some(piece) = pieces.next() {
            let last = pieces.peek().is_none();
            let flags = if last { END_HEADERS | END_STREAM } else { 0 };
            out.extend(frame(kind, flags, 1 + 2 * i, piece));
            kind = CONTINUATION;
        }
    }
    out
}

/// Writes `batch` until the connection ends, `times` at most; how many went out.
async fn until_closed(
    write: &mut (impl AsyncWriteExt + Unpin),
    seen: &Seen,
    batch: &[u8],
    times: usize,
) -> usize {
    let mut sent = 0;
    while sent < times && !seen.ended() {
        if write.write_all(batch).await.is_err() {
            break;
        }
        sent += 1;
    }
    sent
}

#[tokio::test]
async fn endless_oversized_header_blocks_get_the_connection_closed() {
    let _serial = SERIAL.lock().await;
    let backend = Backend::ok().await;
    let gw = gateway(&backend, "").await;
    let (mut write, seen) = connect(gw.addr).await;
    // Each refused by the codec (431 or a reset) before the gateway sees a request: the
    // connection's free allowance (1 MiB) runs out after about a dozen.
    let batch = oversized_blocks(10);
    let sent = until_closed(&mut write, &seen, &batch, 100).await;
    assert!(
        eventually(|| seen.ended()).await,
        "still open after {} oversized header blocks",
        sent * 10
    );
    println!(
        "oversized header blocks: connection closed after {} blocks written (~{} KiB), {} answered or reset, GOAWAY {:?}",
        sent * 10,
        sent * batch.len() / 1024,
        seen.heads.lock().unwrap().len() + seen.resets.lock().unwrap().len(),
        seen.goaway.lock().unwrap()
    );
    assert!(
        sent < 100,
        "1,000 refused header blocks (80 MiB) were all read"
    );
    assert_eq!(backend.stats.requests.load(Ordering::SeqCst), 0);
    others_are_served(&gw).await;
    drop(write);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_reads_gets_the_connection_closed() {
    let _serial = SERIAL.lock().await;
    let backend = Backend::ok().await;
    let gw = gateway(&backend, "").await;
    let (mut write, seen) = connect(gw.addr).await;
    // A well-behaved use first: requests on the connection earn it more allowance, not less.
    let mut ok = Vec::new();
    for i in 0..10u32 {
        ok.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1 + 2 * i,
            &get_block("/function/f/"),
        ));
    }
    write.write_all(&ok).await.unwrap();
    assert!(eventually(|| seen.ended_streams.lock().unwrap().len() >= 10).await);
    assert!(!seen.ended());
    // Then PINGs, 1,000 to a write, up to 4,000,000 (68 MiB), read and answered as they come.
    let batch = frame(PING, 0, 0, b"abcdefgh").repeat(1000);
    let sent = until_closed(&mut write, &seen, &batch, 4000).await;
    assert!(
        eventually(|| seen.ended()).await,
        "still open after {} PINGs",
        sent * 1000
    );
    println!(
        "PING flood from a reading client: closed after {} PINGs written, {} bytes of answers read",
        sent * 1000,
        seen.bytes.load(Ordering::SeqCst)
    );
    assert!(sent < 4000, "4,000,000 PINGs were all answered");
    others_are_served(&gw).await;
    drop(write);
    gw.shutdown().await;
}
