//! Whether the gateway's HTTP/1 connection may carry another request after a response: only when
//! the request's body was read to its end before the response started; otherwise the response
//! says `Connection: close` (the rest of the body cannot be told from a next request), so that a
//! client never sends a request on a connection the gateway is closing. Found by the chaos soak
//! (loadtests/soak): keep-alive clients saw "closed without response" on their next request.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one response head (and a body of its `content-length`) from `sock`.
async fn read_response(sock: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut byte))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&out).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).await.unwrap();
    head
}

#[tokio::test]
async fn a_response_after_the_whole_body_keeps_the_connection_for_the_next_request() {
    let backend = Backend::ok().await;
    let gw = Gw::start_static("f", &backend.url(), "").await;
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    for i in 0..50 {
        let req =
            format!("POST /function/f/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
        sock.write_all(req.as_bytes()).await.unwrap();
        let head = read_response(&mut sock).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "request {i}: {head}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_response_before_the_body_was_read_says_connection_close() {
    let backend = Backend::ok().await;
    let gw = Gw::start_static("f", &backend.url(), "").await;
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    // An unknown function is answered at once, without reading the body.
    sock.write_all(
        b"POST /function/nope/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nhello",
    )
    .await
    .unwrap();
    let head = read_response(&mut sock).await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    gw.shutdown().await;
}
