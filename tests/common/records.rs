//! The async record and dead-letter admin routes as a client sees them, shared by the tests of
//! both async stores (tests/async.rs: redb, tests/jetstream.rs: NATS JetStream).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Request;
use serde_json::Value;

use super::{body, empty, Gw, Resp};

/// The admin token the tests of these routes configure.
pub const TOKEN: &str = "s3cret";

/// `[gateway]` keys: the admin token.
pub fn admin_keys() -> String {
    format!("admin_token = \"{TOKEN}\"")
}

/// `method path` with the admin token.
pub async fn admin(gw: &Gw, method: &str, path: &str) -> Resp {
    let req = Request::builder()
        .method(method)
        .uri(gw.url(path))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(empty())
        .unwrap();
    gw.send(req).await
}

/// The JSON body of a response.
pub fn json(r: &Resp) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

/// `GET /system/async/{call_id}`: the status and the record (`Null` when not 200).
pub async fn record(gw: &Gw, call_id: &str) -> (u16, Value) {
    let r = admin(gw, "GET", &format!("/system/async/{call_id}")).await;
    let value = if r.status == 200 {
        json(&r)
    } else {
        Value::Null
    };
    (r.status.as_u16(), value)
}

/// Polls the record of `call_id` until `check` holds (every 20 ms, at most `limit`); returns it.
pub async fn until_record(
    gw: &Gw,
    call_id: &str,
    what: &str,
    limit: Duration,
    check: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (status, value) = record(gw, call_id).await;
        if check(status, &value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: last {status} {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until the record of `call_id` is in `state`.
pub async fn until_state(gw: &Gw, call_id: &str, state: &str) -> Value {
    until_record(
        gw,
        call_id,
        &format!("{call_id} is {state}"),
        Duration::from_secs(20),
        |_, v| v["state"] == state,
    )
    .await
}

/// `GET /system/async-dead-letters[?query]`.
pub async fn dead_letters(gw: &Gw, query: &str) -> Value {
    let r = admin(gw, "GET", &format!("/system/async-dead-letters{query}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    json(&r)
}

/// Posts an async invocation of `function` with call id `id`.
pub async fn post(gw: &Gw, function: &str, id: &str) {
    let req = Request::post(gw.url(&format!("/async-function/{function}/job")))
        .header("x-call-id", id)
        .body(body("payload"))
        .unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.status, 202, "{}", r.body);
}

/// The whole dead-letter story on function `flaky` (async_max_attempts = 2), whose replica
/// answers 503 while `up` is false: two invocations dead-lettered and listed, one replayed once
/// the replica is up (it succeeds), the other discarded.
pub async fn dead_letter_replay_and_discard(gw: &Gw, up: &AtomicBool) {
    post(gw, "flaky", "dl-a").await;
    post(gw, "flaky", "dl-b").await;
    let a = until_state(gw, "dl-a", "dead_lettered").await;
    let b = until_state(gw, "dl-b", "dead_lettered").await;
    assert_eq!(a["attempts"], 2, "{a}");
    assert_eq!(a["status"], 503, "{a}");
    assert!(a["reason"].as_str().unwrap().contains("503"), "{a}");
    assert_eq!(a["deadLetter"]["function"], "flaky", "{a}");
    let a_id = a["deadLetter"]["id"].as_u64().unwrap();
    let b_id = b["deadLetter"]["id"].as_u64().unwrap();

    // Listed (in the order they died), with or without the function filter; limit respected.
    let all = dead_letters(gw, "").await;
    assert_eq!(all["total"], 2, "{all}");
    let mut listed: Vec<&str> = all["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["callId"].as_str().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, ["dl-a", "dl-b"]);
    let first = all["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["callId"] == "dl-a")
        .unwrap();
    assert_eq!(first["id"].as_u64(), Some(a_id));
    assert_eq!(
        (&first["function"], &first["status"]),
        (&"flaky".into(), &503.into())
    );
    assert_eq!(
        (&first["path"], &first["bodyBytes"]),
        (&"/job".into(), &7.into())
    );
    let one = dead_letters(gw, "?function=flaky&limit=1").await;
    assert_eq!(
        (&one["total"], one["deadLetters"].as_array().unwrap().len()),
        (&2.into(), 1)
    );
    assert_eq!(dead_letters(gw, "?function=other").await["total"], 0);
    let r = admin(gw, "GET", "/system/async-dead-letters?limit=0").await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Replayed once the replica is up: 202, queued again, then it succeeds.
    up.store(true, Ordering::SeqCst);
    let r = admin(
        gw,
        "POST",
        &format!("/system/async-dead-letters/flaky/{a_id}/replay"),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.header("x-call-id"), Some("dl-a"));
    let replayed = json(&r);
    assert_eq!(
        (&replayed["callId"], &replayed["replays"]),
        (&"dl-a".into(), &1.into())
    );
    let done = until_state(gw, "dl-a", "succeeded").await;
    assert_eq!(
        (&done["status"], &done["attempts"]),
        (&200.into(), &1.into()),
        "{done}"
    );
    assert_eq!(done["replays"], 1, "{done}");
    assert!(done["expiresAt"].is_string(), "{done}");
    assert!(done.get("deadLetter").is_none(), "{done}");
    // The replayed dead letter is gone: replaying it again is a 404.
    let r = admin(
        gw,
        "POST",
        &format!("/system/async-dead-letters/flaky/{a_id}/replay"),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.header("x-sluicegate-reason"), Some("unknown_dead_letter"));

    // Discarded: gone for good, its record says so.
    let r = admin(
        gw,
        "DELETE",
        &format!("/system/async-dead-letters/flaky/{b_id}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json(&r)["state"], "discarded");
    let r = admin(
        gw,
        "DELETE",
        &format!("/system/async-dead-letters/flaky/{b_id}"),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(dead_letters(gw, "").await["total"], 0);
    let (status, b) = record(gw, "dl-b").await;
    assert_eq!((status, &b["state"]), (200, &"discarded".into()), "{b}");
    assert_eq!(b["attempts"], 2, "{b}");
}
