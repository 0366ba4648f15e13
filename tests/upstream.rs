//! The hop to replicas, against scripted replicas on raw sockets: every way HTTP/1.1 frames a
//! response, interim responses, malformed and truncated responses, early answers to uploads,
//! full-duplex streaming, and which connections are reused.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted replica does with one request.
struct Reply {
    bytes: Vec<u8>,
    /// Close the connection after writing (else wait for the next request on it).
    close: bool,
}

fn reply(bytes: &[u8]) -> Reply {
    Reply {
        bytes: bytes.to_vec(),
        close: false,
    }
}

fn reply_and_close(bytes: &[u8]) -> Reply {
    Reply {
        bytes: bytes.to_vec(),
        close: true,
    }
}

/// A replica on a raw socket: reads each request head (and a `Content-Length` body), then writes
/// whatever `script(method, path)` returns. Counts connections.
struct Scripted {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicU64>,
}

impl Scripted {
    async fn start(script: fn(&str, &str) -> Reply) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_scripted(s, script));
            }
        });
        Scripted { addr, connections }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve_scripted(mut s: TcpStream, script: fn(&str, &str) -> Reply) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < end + length {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + length);
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let r = script(method, path);
        if s.write_all(&r.bytes).await.is_err() || r.close {
            return;
        }
    }
}

/// GETs `path` and reads the whole response, which must start `200`; `Err` when the request or
/// the body fails. Panics if that takes longer than `limit` (the client was left waiting).
async fn get_whole(
    gw: &Gw,
    path: &str,
    limit: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::get(gw.url(path)).body(empty()).unwrap();
    let client = gw.client.clone();
    tokio::time::timeout(limit, async move {
        let resp = client.request(req).await?;
        assert_eq!(resp.status(), 200, "{path}");
        resp.into_body().collect().await?;
        Ok(())
    })
    .await
    .expect("the client is not left waiting")
}

fn framing_script(method: &str, path: &str) -> Reply {
    match (method, path) {
        (_, "/chunked") => reply(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
        ),
        (_, "/both") => reply(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        (_, "/interim") => reply(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        (_, "/eof") => reply_and_close(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
        (_, "/http10") => reply_and_close(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        ("HEAD", "/head") => reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"),
        (_, "/no-content") => reply(b"HTTP/1.1 204 No Content\r\n\r\n"),
        _ => reply(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"),
    }
}

#[tokio::test]
async fn every_response_framing_reaches_the_client_intact() {
    let replica = Scripted::start(framing_script).await;
    let gw = Gw::start_static("f", &replica.url(), "").await;
    for (path, status, want) in [
        ("/chunked", 200, "hello world"),
        ("/both", 200, "ok"),
        ("/interim", 200, "ok"),
        ("/eof", 200, "until the end"),
        ("/http10", 200, "ok"),
        ("/no-content", 204, ""),
        ("/", 200, "ok\n"),
    ] {
        let r = gw.get(&format!("/function/f{path}")).await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (status, want),
            "{path}"
        );
        assert!(
            r.header("transfer-encoding").is_none() || r.header("content-length").is_none(),
            "{path}: both framings"
        );
        if let Some(len) = r.header("content-length") {
            assert_eq!(
                len,
                want.len().to_string(),
                "{path}: content-length describes the body"
            );
        }
        assert!(r.header("x-trailer").is_none());
    }
    // HEAD: the declared length is passed on, no body is waited for, and the connection stays
    // usable for the next request.
    let head = Request::head(gw.url("/function/f/head"))
        .body(empty())
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), gw.send(head))
        .await
        .expect("a HEAD response does not wait for a body");
    assert_eq!(
        (r.status.as_u16(), r.header("content-length")),
        (200, Some("1000"))
    );
    assert_eq!(gw.get("/function/f/").await.body, "ok\n");
    gw.shutdown().await;
}

#[tokio::test]
async fn connections_are_reused_only_after_clean_delimited_exchanges() {
    let replica = Scripted::start(framing_script).await;
    let gw = Gw::start_static("f", &replica.url(), "").await;
    // Delimited, keep-alive responses (including chunked and interim ones): one connection.
    for path in ["/chunked", "/interim", "/", "/no-content", "/"] {
        assert!(gw
            .get(&format!("/function/f{path}"))
            .await
            .status
            .is_success());
    }
    assert_eq!(replica.connections.load(Ordering::SeqCst), 1);
    // A body delimited by the end of the connection, an HTTP/1.0 response, a response with
    // both Content-Length and Transfer-Encoding (RFC 9112 §6.3): never reused.
    for path in ["/eof", "/http10", "/both", "/"] {
        assert!(gw
            .get(&format!("/function/f{path}"))
            .await
            .status
            .is_success());
    }
    assert_eq!(replica.connections.load(Ordering::SeqCst), 4);
    gw.shutdown().await;
}

fn broken_script(_: &str, path: &str) -> Reply {
    match path {
        "/not-http" => reply_and_close(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        "/bad-length" => reply(b"HTTP/1.1 200 OK\r\ncontent-length: twelve\r\n\r\n"),
        "/two-lengths" => {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok")
        }
        "/huge-head" => {
            let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..2000 {
                r.extend_from_slice(
                    format!("x-h{i}: 0123456789012345678901234567890123456789\r\n").as_bytes(),
                );
            }
            reply_and_close(&r)
        }
        "/silent" => reply_and_close(b""),
        _ => reply(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"),
    }
}

#[tokio::test]
async fn malformed_responses_are_502_with_the_reason_and_others_are_served() {
    let replica = Scripted::start(broken_script).await;
    let gw = Gw::start_static("f", &replica.url(), "").await;
    for (path, reason, says) in [
        ("/not-http", "upstream_invalid", "malformed response head"),
        ("/bad-length", "upstream_invalid", "Content-Length"),
        ("/two-lengths", "upstream_invalid", "Content-Length"),
        ("/huge-head", "upstream_invalid", "larger than"),
        ("/silent", "upstream_reset", "closed the connection"),
    ] {
        let r = gw.get(&format!("/function/f{path}")).await;
        assert_eq!(r.status, 502, "{path}");
        assert_eq!(r.header("x-sluicegate-reason"), Some(reason), "{path}");
        assert!(r.body.contains(says), "{path}: {}", r.body);
        assert_eq!(gw.get("/function/f/").await.body, "ok\n", "after {path}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_body_cut_short_aborts_the_client_response_and_frees_the_slot() {
    let replica = Scripted::start(|_, path| match path {
        "/cut" => reply_and_close(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b"),
        "/cut-chunked" => {
            reply_and_close(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        }
        _ => reply(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"),
    })
    .await;
    let limits = "max_ongoing_requests = 1\nmax_queued_requests = 0";
    let gw = Gw::start_static("f", &replica.url(), limits).await;
    for path in ["/cut", "/cut-chunked"] {
        // The head may or may not have left the gateway before the body broke.
        let outcome = get_whole(&gw, &format!("/function/f{path}"), Duration::from_secs(5)).await;
        assert!(
            outcome.is_err(),
            "{path}: the client sees the response fail, not a short success"
        );
        // The only slot is free again.
        assert_eq!(gw.get("/function/f/").await.body, "ok\n", "after {path}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_replica_answering_before_reading_an_upload_is_heard() {
    let replica = Scripted::start(|_, _| {
        reply_and_close(b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 9\r\n\r\ntoo large")
    })
    .await;
    let gw = Gw::start_static("f", &replica.url(), "").await;
    // A chunked upload that never ends on its own: the replica answers after the head.
    let (tx, pending) = gw.spawn_upload("/function/f/");
    tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 1000]))))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the replica's early answer reaches the client")
        .unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (413, "too large"));
    drop(tx);
    gw.shutdown().await;
}

#[tokio::test]
async fn full_duplex_streaming_echoes_while_the_upload_continues() {
    // The replica streams the request body back as it reads it.
    let backend = Backend::start(|req, _| async move {
        Response::new(req.into_body().map_err(|e| e.into()).boxed())
    })
    .await;
    let gw = Gw::start_static("echo", &backend.url(), "").await;
    let (tx, streamed) = channel_body(1);
    let req = Request::post(gw.url("/function/echo/"))
        .body(streamed)
        .unwrap();
    let resp_fut = gw.client.request(req);
    tx.send(Ok(Frame::data(Bytes::from_static(b"one "))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp_fut)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut echoed = Vec::new();
    for next in [&b"two "[..], b"three", b""] {
        // Each piece comes back before the next one is sent.
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("echo arrives while the upload is still open")
            .unwrap()
            .unwrap();
        echoed.extend_from_slice(frame.data_ref().unwrap());
        if next.is_empty() {
            drop(tx);
            break;
        }
        tx.send(Ok(Frame::data(Bytes::from_static(next))))
            .await
            .unwrap();
    }
    while let Some(frame) = body.frame().await {
        echoed.extend_from_slice(frame.unwrap().data_ref().unwrap());
    }
    assert_eq!(echoed, b"one two three");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_response_timeout_holds_on_reused_connections() {
    // Each connection keeps one timer and moves its deadline per request: a request on a reused
    // connection must still time out, and a timed-out exchange leaves the others unaffected.
    let backend = Backend::ok().await;
    let gw = Gw::start_static("echo", &backend.url(), "timeout = \"300ms\"").await;
    for round in 0..3 {
        for _ in 0..3 {
            assert_eq!(gw.get("/function/echo/").await.status, 200, "round {round}");
        }
        let started = tokio::time::Instant::now();
        let r = gw.get("/function/echo/?sleep=3000").await;
        assert_eq!(r.status, 504, "round {round}: {}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "round {round}: timed out after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(gw.get("/function/echo/").await.status, 200);
    gw.shutdown().await;
}

/// A replica that answers with how the request body was framed and how long it was.
async fn framing_reporter() -> Backend {
    Backend::start(|req, _| async move {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned())
        };
        let framing = format!("cl={} te={}", h("content-length"), h("transfer-encoding"));
        let got = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(body(format!("{framing} len={}", got.len())))
    })
    .await
}

#[tokio::test]
async fn request_bodies_are_framed_as_their_clients_sent_them() {
    let replica = framing_reporter().await;
    let gw = Gw::start_static("f", &replica.url(), "").await;
    // A declared length is kept.
    let r = gw.post("/function/f/", vec![b'x'; 1234]).await;
    assert_eq!(r.body, "cl=1234 te=- len=1234");
    // An empty POST declares it.
    let r = gw.post("/function/f/", Vec::new()).await;
    assert_eq!(r.body, "cl=0 te=- len=0");
    // A GET without a body declares nothing.
    assert_eq!(gw.get("/function/f/").await.body, "cl=- te=- len=0");
    // A streamed HTTP/1.1 upload without a length goes chunked.
    let (tx, pending) = gw.spawn_upload("/function/f/");
    for piece in [&b"abc"[..], b"defgh", b"i"] {
        tx.send(Ok(Frame::data(Bytes::from_static(piece))))
            .await
            .unwrap();
    }
    drop(tx);
    assert_eq!(pending.await.unwrap().body, "cl=- te=chunked len=9");
    // So does an h2c upload without content-length.
    let (tx, streamed) = channel_body(4);
    let req = Request::post(gw.url("/function/f/"))
        .body(streamed)
        .unwrap();
    let pending = spawn_send_with(&h2c_client(), req);
    tx.send(Ok(Frame::data(Bytes::from(vec![7u8; 70_000]))))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(pending.await.unwrap().body, "cl=- te=chunked len=70000");
    gw.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue_uploads_go_through() {
    // The client waits for `100 Continue` before sending its body; the replica (hyper) sends its
    // own `100 Continue` to the gateway, which the gateway drops.
    let replica = framing_reporter().await;
    let gw = Gw::start_static("f", &replica.url(), "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /function/f/ HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = tokio::time::timeout(Duration::from_secs(5), read_head(&mut s))
        .await
        .expect("the gateway asks for the body");
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut s))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&rest[..n], b"cl=5 te=- len=5");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_replica_stalling_mid_body_is_cut_off_and_its_slot_freed() {
    let replica = Scripted::start(|_, path| match path {
        // Sends part of the body, then nothing, keeping the connection open.
        "/stall" => reply(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial"),
        _ => reply(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"),
    })
    .await;
    let keys =
        "max_ongoing_requests = 1\nmax_queued_requests = 0\nresponse_idle_timeout = \"300ms\"";
    let gw = Gw::start_static("f", &replica.url(), keys).await;
    let started = tokio::time::Instant::now();
    let outcome = get_whole(&gw, "/function/f/stall", Duration::from_secs(10)).await;
    assert!(outcome.is_err(), "a cut-off body is not a success");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut off after {:?}",
        started.elapsed()
    );
    // The only slot is free again.
    assert_eq!(gw.get("/function/f/").await.body, "ok\n");
    gw.shutdown().await;
}
