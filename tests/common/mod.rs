//! Test vocabulary: an in-process gateway on 127.0.0.1:0, in-process backends, raw sockets.
#![allow(dead_code)]

pub mod fake_kube;
pub mod h2raw;
pub mod nats;
pub mod records;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluicegate::config::Config;
use sluicegate::function::Function;
use sluicegate::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;

/// Path of the built `sluicegate` binary (for process-provider tests).
pub const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn body(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn read_whole(resp: Response<Incoming>) -> Resp {
    let (parts, b) = resp.into_parts();
    let bytes = b.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A client that speaks HTTP/2 without TLS (h2c, prior knowledge).
pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// An in-process gateway.
pub struct Gw {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub client: Client<HttpConnector, TestBody>,
    /// The async store file this harness chose (deleted at shutdown), if the config named none.
    pub temp_store: Option<PathBuf>,
}

/// A fresh async store path under the system temp directory, unique in this test run.
pub fn temp_store_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("sluicegate-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}.redb", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// The `[gateway]` key that puts the async store at `path`.
pub fn async_store(path: &Path) -> String {
    format!("async_store = \"{}\"", path.display())
}

/// Sends `req` with `client` and reads the whole response.
pub async fn send_with(client: &Client<HttpConnector, TestBody>, req: Request<TestBody>) -> Resp {
    let resp = client
        .request(req)
        .await
        .expect("request reaches the gateway");
    read_whole(resp).await
}

/// [`send_with`] in the background; the handle yields the whole response.
pub fn spawn_send_with(
    client: &Client<HttpConnector, TestBody>,
    req: Request<TestBody>,
) -> JoinHandle<Resp> {
    let client = client.clone();
    tokio::spawn(async move { send_with(&client, req).await })
}

impl Gw {
    /// Starts a gateway serving the functions in `functions` (TOML tables), listening on
    /// 127.0.0.1:0, with its async store in a fresh temporary file (tests run in parallel; each
    /// gateway needs its own store).
    pub async fn start(functions: &str) -> Gw {
        Gw::start_with("", functions).await
    }

    /// Starts a gateway with one function of the static provider, `name`, in front of `url`;
    /// `keys` go in the function's table.
    pub async fn start_static(name: &str, url: &str, keys: &str) -> Gw {
        Gw::start(&static_fn(name, url, keys)).await
    }

    /// [`Gw::start`] with `gateway_keys` added to the `[gateway]` table. The async store is a
    /// fresh temporary file unless the keys name one (see [`async_store`]).
    pub async fn start_with(gateway_keys: &str, functions: &str) -> Gw {
        let temp_store = (!gateway_keys.contains("async_store")).then(temp_store_path);
        let store_line = temp_store
            .as_ref()
            .map(|p| format!("{}\n", async_store(p)))
            .unwrap_or_default();
        let text =
            format!("[gateway]\nlisten = \"127.0.0.1:0\"\n{store_line}{gateway_keys}\n{functions}");
        let config = Config::parse(Path::new("tests/inline.toml"), &text, None)
            .unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let mut gw = Gw::start_config(config).await;
        gw.temp_store = temp_store;
        gw
    }

    pub async fn start_config(config: Config) -> Gw {
        let running = sluicegate::start(config).await.expect("gateway starts");
        let addr = running.local_addr();
        Gw {
            running: Some(running),
            addr,
            client: client(),
            temp_store: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn function(&self, name: &str) -> Arc<Function> {
        self.running
            .as_ref()
            .unwrap()
            .gateway()
            .function(name)
            .expect("function configured")
    }

    pub async fn send(&self, req: Request<TestBody>) -> Resp {
        send_with(&self.client, req).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Request::get(self.url(path)).body(empty()).unwrap())
            .await
    }

    pub async fn post(&self, path: &str, data: impl Into<Bytes>) -> Resp {
        self.send(Request::post(self.url(path)).body(body(data)).unwrap())
            .await
    }

    /// Starts a GET in the background; the handle yields the whole response.
    pub fn spawn_get(&self, path: &str) -> JoinHandle<Resp> {
        self.spawn_send(Request::get(self.url(path)).body(empty()).unwrap())
    }

    /// Sends `req` in the background (its body may still be streaming); the handle yields the
    /// whole response.
    pub fn spawn_send(&self, req: Request<TestBody>) -> JoinHandle<Resp> {
        spawn_send_with(&self.client, req)
    }

    /// Starts a POST to `path` whose body streams from the returned sender (a channel of four
    /// frames; dropping the sender ends the body); the handle yields the whole response.
    pub fn spawn_upload(&self, path: &str) -> (Sender<FrameResult>, JoinHandle<Resp>) {
        let (tx, streamed) = channel_body(4);
        let req = Request::post(self.url(path)).body(streamed).unwrap();
        (tx, self.spawn_send(req))
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.body
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        if let Some(path) = self.temp_store.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts the built binary as its own process on 127.0.0.1:`port`, from a config file written
/// in `dir` (`gateway_keys` in its `[gateway]` table, then `functions`); its output is discarded.
pub fn spawn_binary(dir: &Path, port: u16, gateway_keys: &str, functions: &str) -> Child {
    let config = dir.join("gw.toml");
    let text = format!("[gateway]\nlisten = \"127.0.0.1:{port}\"\n{gateway_keys}\n{functions}");
    std::fs::write(&config, text).unwrap();
    Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The value of one sample line `name{labels} value` in a scrape, or `None`.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// What a test backend saw.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub inflight: AtomicU32,
    pub max_inflight: AtomicU32,
    pub order: Mutex<Vec<String>>,
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub last_uri: Mutex<Option<String>>,
}

type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
            Arc<Stats>,
        ) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// An in-process HTTP backend on 127.0.0.1:0.
pub struct Backend {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A backend with a custom handler; stats count requests and concurrency around it.
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>, Arc<Stats>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Backend::start_on("127.0.0.1:0".parse().unwrap(), handler).await
    }

    /// [`Backend::start`] on a given address (e.g. a port a gateway was told about earlier).
    pub async fn start_on<F, Fut>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>, Arc<Stats>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req, stats| Box::pin(handler(req, stats)));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let stats = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let stats = stats.clone();
                        async move {
                            stats.requests.fetch_add(1, Ordering::SeqCst);
                            let now = stats.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                            stats.max_inflight.fetch_max(now, Ordering::SeqCst);
                            *stats.last_headers.lock().unwrap() = Some(req.headers().clone());
                            *stats.last_uri.lock().unwrap() = Some(req.uri().to_string());
                            if let Some(tag) = req.headers().get("x-seq") {
                                stats
                                    .order
                                    .lock()
                                    .unwrap()
                                    .push(tag.to_str().unwrap().to_owned());
                            }
                            let resp = handler(req, stats.clone()).await;
                            stats.inflight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend { addr, stats, task }
    }

    /// Waits until this backend is serving `n` requests at once, failing the test after 5 s.
    pub async fn until_inflight(&self, n: u32) {
        let what = format!("{n} requests in flight at the backend");
        until(&what, Duration::from_secs(5), || {
            self.stats.inflight.load(Ordering::SeqCst) == n
        })
        .await;
    }

    /// Answers `ok` after `?sleep=MS` milliseconds (if given), with `?status=N` (if given).
    pub async fn ok() -> Backend {
        Backend::start(|req, _| async move {
            let q = req.uri().query().unwrap_or("").to_owned();
            if let Some(ms) = param(&q, "sleep").and_then(|v| v.parse::<u64>().ok()) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let status = param(&q, "status")
                .and_then(|v| v.parse::<u16>().ok())
                .unwrap_or(200);
            Response::builder()
                .status(status)
                .body(body("ok\n"))
                .unwrap()
        })
        .await
    }

    /// Sleeps a fixed time per request, then answers `ok`.
    pub async fn sleeping(delay: Duration) -> Backend {
        Backend::start(move |_, _| async move {
            tokio::time::sleep(delay).await;
            Response::new(body("ok\n"))
        })
        .await
    }
}

pub fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// A port with nothing listening (bound, then closed).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Sends raw bytes on a fresh connection and reads until the peer closes or `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 response head from a raw stream (up to the blank line).
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.unwrap();
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Whether the peer closed the connection within `limit` (EOF or reset).
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A config snippet for a static function `name` in front of `url`, with `keys` in its table.
pub fn static_fn(name: &str, url: &str, keys: &str) -> String {
    format!("[functions.{name}]\nprovider = \"static\"\nupstreams = [\"{url}\"]\n{keys}\n")
}

/// A config snippet for a function `name` of the process provider running the bundled demo
/// function with `args` (each `, "arg"`), tagged `tag` so that its processes can be counted;
/// `keys` go in the function's table, `autoscaler` in its autoscaler table.
pub fn demo_fn(name: &str, tag: &str, args: &str, keys: &str, autoscaler: &str) -> String {
    format!(
        "[functions.{name}]\nprovider = \"process\"\ncommand = [\"{BIN}\", \"demo-function\", \"--tag\", \"{tag}\"{args}]\n\
         readiness_path = \"/healthz\"\n{keys}\n[functions.{name}.autoscaler]\n{autoscaler}\n"
    )
}

/// A process tag unique to this test run, for [`demo_fn`] and [`count_processes`].
pub fn unique_tag(test: &str) -> String {
    format!("sgtest-{test}-{}", std::process::id())
}

/// Number of live processes whose command line contains `needle`.
pub fn count_processes(needle: &str) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                // Zombies have an empty cmdline; only live processes count here.
                n += 1;
            }
        }
    }
    n
}

/// Waits until `check` holds, polling every 5 ms, failing the test after `limit`.
pub async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One frame of a [`channel_body`].
pub type FrameResult = Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;

/// A body streamed from a channel: what is sent on the returned sender arrives frame by frame,
/// and dropping the sender ends the body.
pub fn channel_body(capacity: usize) -> (tokio::sync::mpsc::Sender<FrameResult>, TestBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (tx, ChannelBody(rx).boxed())
}

struct ChannelBody(tokio::sync::mpsc::Receiver<FrameResult>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<FrameResult>> {
        self.0.poll_recv(cx)
    }
}
