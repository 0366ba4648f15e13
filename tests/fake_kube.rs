//! The fake Kubernetes API server (`tests/common/fake_kube.rs`) against the real kube 5 client:
//! lists and watches through `kube::runtime::watcher`, resumed and expired watches, the scale
//! subresource, simulated replicas, selectors, injected failures, an outage and the kubeconfig.

mod common;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

use common::fake_kube::{
    crash_loop_status, unschedulable_status, FakeEndpoint, FakeKube, Resource, SERVICE_NAME_LABEL,
};
use futures::StreamExt;
use http::Request;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const NS: &str = "fns";
/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(5);

/// A watcher polled on its own task, so it re-lists and re-watches while the test does something
/// else; its items arrive on a channel.
struct Watched<K> {
    events: mpsc::UnboundedReceiver<watcher::Result<Event<K>>>,
    task: JoinHandle<()>,
}

impl<K> Watched<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    fn start(api: Api<K>, config: watcher::Config) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(watcher(api, config));
            while let Some(event) = stream.next().await {
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Watched { events, task }
    }

    async fn next_result(&mut self) -> watcher::Result<Event<K>> {
        timeout(WAIT, self.events.recv())
            .await
            .expect("a watcher item within 5 s")
            .expect("the watcher is running")
    }

    async fn next(&mut self) -> Event<K> {
        self.next_result().await.expect("no watcher error")
    }

    /// One (re)list: `Init`, `InitApply`…, `InitDone`; the objects listed.
    async fn listed(&mut self) -> Vec<K> {
        match self.next().await {
            Event::Init => {}
            other => panic!("expected Init, got {other:?}"),
        }
        let mut objects = Vec::new();
        loop {
            match self.next().await {
                Event::InitApply(object) => objects.push(object),
                Event::InitDone => return objects,
                other => panic!("expected InitApply or InitDone, got {other:?}"),
            }
        }
    }

    async fn applied(&mut self) -> K {
        match self.next().await {
            Event::Apply(object) => object,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    async fn deleted(&mut self) -> K {
        match self.next().await {
            Event::Delete(object) => object,
            other => panic!("expected Delete, got {other:?}"),
        }
    }
}

impl<K> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn names<K: kube::Resource>(objects: &[K]) -> Vec<String> {
    objects.iter().map(|o| o.name_any()).collect()
}

fn replicas(deployment: &Deployment) -> Option<i32> {
    deployment.spec.as_ref()?.replicas
}

fn api_error(error: kube::Error) -> Box<kube::core::Status> {
    match error {
        kube::Error::Api(status) => status,
        other => panic!("expected a Status from the API server, got {other:?}"),
    }
}

/// Listeners on fresh loopback ports, standing for pods (kept open so the ports stay ours).
async fn pod_sockets(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    (listeners, addrs)
}

/// Every endpoint of a Service's slices as (address with its slice's port, ready, terminating),
/// sorted.
fn endpoints(slices: &BTreeMap<String, EndpointSlice>) -> Vec<(SocketAddr, bool, bool)> {
    let mut all = Vec::new();
    for slice in slices.values() {
        let port = slice.ports.iter().flatten().find_map(|p| p.port);
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let addr = format!("{}:{}", endpoint.addresses[0], port.expect("a port"));
            all.push((
                addr.parse().unwrap(),
                conditions.ready.unwrap_or(true),
                conditions.terminating.unwrap_or(false),
            ));
        }
    }
    all.sort();
    all
}

/// Applies slice events to `slices` until `endpoints(slices)` is `want` (in any order); panics
/// after 5 s.
async fn until_endpoints(
    watched: &mut Watched<EndpointSlice>,
    slices: &mut BTreeMap<String, EndpointSlice>,
    want: &[(SocketAddr, bool, bool)],
) {
    let mut want = want.to_vec();
    want.sort();
    let deadline = Instant::now() + WAIT;
    while endpoints(slices) != want {
        assert!(
            Instant::now() < deadline,
            "endpoints {:?}, want {want:?}",
            endpoints(slices)
        );
        match watched.next().await {
            Event::Apply(slice) => {
                slices.insert(slice.name_any(), slice);
            }
            Event::Delete(slice) => {
                slices.remove(&slice.name_any());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn watcher_lists_then_sees_added_modified_and_deleted() {
    let kube = FakeKube::start().await;
    let function = ("sluicegate.io/function", "yes");
    kube.apply_deployment(NS, "a", 1, &[function], &[], &[("app", "a")]);
    kube.apply_deployment(NS, "plain", 1, &[], &[], &[("app", "plain")]);
    kube.apply_deployment("elsewhere", "x", 1, &[function], &[], &[("app", "x")]);
    let api: Api<Deployment> = Api::namespaced(kube.client(NS), NS);
    let mut watched = Watched::start(
        api,
        watcher::Config::default().labels("sluicegate.io/function"),
    );

    assert_eq!(names(&watched.listed().await), ["a"]);
    kube.until_watching(Resource::Deployments).await;

    kube.apply_deployment(NS, "b", 0, &[function], &[], &[("app", "b")]);
    assert_eq!(watched.applied().await.name_any(), "b");
    kube.apply_deployment(NS, "a", 3, &[function], &[], &[("app", "a")]);
    let a = watched.applied().await;
    assert_eq!((a.name_any().as_str(), replicas(&a)), ("a", Some(3)));
    // Changes outside the selection never show; leaving it reads as a deletion.
    kube.apply_deployment(NS, "plain", 2, &[], &[], &[("app", "plain")]);
    kube.apply_deployment(NS, "b", 0, &[], &[], &[("app", "b")]);
    let left = watched.deleted().await;
    assert_eq!(left.name_any(), "b");
    assert!(
        left.labels().contains_key("sluicegate.io/function"),
        "it leaves as it was last seen"
    );
    kube.delete_deployment(NS, "a");
    let gone = watched.deleted().await;
    assert_eq!(gone.name_any(), "a");
    assert_eq!(
        gone.resource_version(),
        Some(kube.resource_version().to_string()),
        "a DELETED object carries the deletion's resourceVersion"
    );
}

#[tokio::test]
async fn a_streaming_list_gets_the_initial_events_then_changes() {
    let kube = FakeKube::start().await;
    kube.apply_pod(NS, "p1", &[("app", "f")], json!({}));
    kube.apply_pod(NS, "p2", &[("app", "f")], json!({}));
    let api: Api<Pod> = Api::namespaced(kube.client(NS), NS);
    let config = watcher::Config::default().labels("app=f").streaming_lists();
    let mut watched = Watched::start(api, config);
    assert_eq!(names(&watched.listed().await), ["p1", "p2"]);
    kube.apply_pod(NS, "p3", &[("app", "f")], json!({}));
    assert_eq!(watched.applied().await.name_any(), "p3");
    let requests = kube.requests();
    assert!(
        !requests.iter().any(|r| r.is_list(Resource::Pods)),
        "{requests:#?}"
    );
    assert_eq!(
        requests[0].param("sendInitialEvents").as_deref(),
        Some("true")
    );
}

#[tokio::test]
async fn dropped_watch_resumes_from_its_resource_version_without_relisting() {
    let kube = FakeKube::start().await;
    let (_pods, addrs) = pod_sockets(2).await;
    kube.set_endpoints(NS, "f", vec![FakeEndpoint::ready(addrs[0])], "http");
    let api: Api<EndpointSlice> = Api::namespaced(kube.client(NS), NS);
    let selector = format!("{SERVICE_NAME_LABEL}=f");
    let mut watched = Watched::start(api, watcher::Config::default().labels(&selector));
    let mut slices: BTreeMap<_, _> = watched
        .listed()
        .await
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    kube.until_watching(Resource::EndpointSlices).await;
    kube.set_endpoints(NS, "f", vec![FakeEndpoint::terminating(addrs[0])], "http");
    let seen = watched.applied().await;
    let seen_rv: u64 = seen.resource_version().unwrap().parse().unwrap();
    slices.insert(seen.name_any(), seen);

    kube.clear_requests();
    kube.drop_watches();
    kube.until_watching(Resource::EndpointSlices).await;
    let want = [(addrs[1], true, false)];
    kube.set_endpoints(NS, "f", vec![FakeEndpoint::ready(addrs[1])], "http");
    until_endpoints(&mut watched, &mut slices, &want).await;

    let requests = kube.requests();
    assert!(
        !requests.iter().any(|r| r.is_list(Resource::EndpointSlices)),
        "a dropped watch must not relist: {requests:#?}"
    );
    let rewatch = requests.iter().find(|r| r.is_watch()).expect("a new watch");
    let from: u64 = rewatch.param("resourceVersion").unwrap().parse().unwrap();
    assert!(from >= seen_rv, "resumed from {from}, had seen {seen_rv}");
    assert_eq!(
        rewatch.param("labelSelector").as_deref(),
        Some(selector.as_str())
    );
}

#[tokio::test]
async fn expired_watch_gets_410_and_the_watcher_relists() {
    let kube = FakeKube::start().await;
    kube.apply_pod(NS, "p1", &[("app", "f")], json!({"phase": "Running"}));
    let api: Api<Pod> = Api::namespaced(kube.client(NS), NS);
    let mut watched = Watched::start(api.clone(), watcher::Config::default().labels("app=f"));
    assert_eq!(names(&watched.listed().await), ["p1"]);
    kube.until_watching(Resource::Pods).await;
    let before = kube.resource_version();
    kube.apply_pod(NS, "p2", &[("app", "f")], json!({"phase": "Pending"}));
    assert_eq!(watched.applied().await.name_any(), "p2");

    kube.clear_requests();
    kube.expire_watches();
    match watched.next_result().await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected the 410 ERROR event, got {other:?}"),
    }
    assert_eq!(names(&watched.listed().await), ["p1", "p2"]);
    assert!(kube.requests().iter().any(|r| r.is_list(Resource::Pods)));

    // Resuming from before the expiry: 200 and an ERROR event, not an HTTP error.
    let stream = api
        .watch(&WatchParams::default().timeout(1), &before.to_string())
        .await
        .expect("the watch request succeeds");
    let mut stream = std::pin::pin!(stream);
    match timeout(WAIT, stream.next()).await.unwrap() {
        Some(Ok(WatchEvent::Error(status))) => assert_eq!(status.code, 410),
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(
        timeout(WAIT, stream.next()).await.unwrap().is_none(),
        "the stream ends after it"
    );
}

#[tokio::test]
async fn scale_round_trips_and_a_stale_put_conflicts() {
    let kube = FakeKube::start().await;
    kube.apply_deployment(NS, "f", 1, &[], &[], &[("app", "f"), ("tier", "fn")]);
    let api: Api<Deployment> = Api::namespaced(kube.client(NS), NS);

    let scale = api.get_scale("f").await.unwrap();
    let deployment = kube.object(Resource::Deployments, NS, "f").unwrap();
    assert_eq!(scale.metadata.name.as_deref(), Some("f"));
    assert_eq!(
        scale.metadata.resource_version.as_deref(),
        deployment["metadata"]["resourceVersion"].as_str()
    );
    assert_eq!(
        scale.metadata.uid.as_deref(),
        deployment["metadata"]["uid"].as_str()
    );
    assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(1));
    let status = scale.status.as_ref().unwrap();
    assert_eq!(
        (status.replicas, status.selector.as_deref()),
        (1, Some("app=f,tier=fn"))
    );

    let mut wanted = scale.clone();
    wanted.spec.as_mut().unwrap().replicas = Some(3);
    let written = api
        .replace_scale("f", &PostParams::default(), &wanted)
        .await
        .unwrap();
    assert_eq!(written.spec.unwrap().replicas, Some(3));
    assert_ne!(
        written.metadata.resource_version,
        scale.metadata.resource_version
    );
    assert_eq!(kube.deployment_replicas(NS, "f"), Some(3));
    let put = kube.requests().pop().unwrap();
    assert_eq!(
        (put.method.as_str(), put.path.as_str()),
        ("PUT", "/apis/apps/v1/namespaces/fns/deployments/f/scale")
    );

    wanted.spec.as_mut().unwrap().replicas = Some(5);
    let status = api_error(
        api.replace_scale("f", &PostParams::default(), &wanted)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(status.is_conflict());
    assert!(
        status.message.contains("the object has been modified"),
        "{}",
        status.message
    );
    assert_eq!(kube.deployment_replicas(NS, "f"), Some(3));

    // Zero is omitted from a Scale's spec, as on the real server.
    let mut zero = api.get_scale("f").await.unwrap();
    zero.spec.as_mut().unwrap().replicas = Some(0);
    api.replace_scale("f", &PostParams::default(), &zero)
        .await
        .unwrap();
    let read = api.get_scale("f").await.unwrap();
    assert_eq!(
        (read.spec.unwrap().replicas, read.status.unwrap().replicas),
        (None, 0)
    );
    assert_eq!(kube.deployment_replicas(NS, "f"), Some(0));
}

#[tokio::test]
async fn merge_patch_of_the_scale_changes_the_deployment_and_emits_an_event() {
    let kube = FakeKube::start().await;
    kube.apply_deployment(NS, "f", 1, &[], &[], &[("app", "f")]);
    kube.apply_deployment(NS, "g", 1, &[], &[], &[("app", "g")]);
    let api: Api<Deployment> = Api::namespaced(kube.client(NS), NS);
    let mut watched = Watched::start(
        api.clone(),
        watcher::Config::default().fields("metadata.name=f"),
    );
    assert_eq!(names(&watched.listed().await), ["f"]);

    let patch = Patch::Merge(json!({"spec": {"replicas": 4}}));
    let scale = api
        .patch_scale("f", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(4));
    let f = watched.applied().await;
    assert_eq!(replicas(&f), Some(4));
    assert_eq!(f.resource_version(), scale.metadata.resource_version);
    assert_eq!(kube.deployment_replicas(NS, "f"), Some(4));
    let request = kube.requests().pop().unwrap();
    assert_eq!(request.method, "PATCH");
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/merge-patch+json")
    );

    // A resourceVersion in the patch makes it conditional.
    let stale =
        Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 5}}));
    let status = api_error(
        api.patch_scale("f", &PatchParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 409);
    assert_eq!(kube.deployment_replicas(NS, "f"), Some(4));

    // Another deployment's scale is not this watch's business.
    api.patch_scale("g", &PatchParams::default(), &patch)
        .await
        .unwrap();
    api.patch_scale(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    assert_eq!(replicas(&watched.applied().await), Some(2));

    let status = api_error(api.get_scale("missing").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "deployments.apps \"missing\" not found");
    let status = api_error(
        api.patch_scale("missing", &PatchParams::default(), &patch)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn bound_replicas_turn_ready_after_the_delay_and_drain_on_scale_down() {
    let kube = FakeKube::start().await;
    let (_pods, addrs) = pod_sockets(2).await;
    let ready_after = Duration::from_millis(200);
    kube.apply_deployment(NS, "f", 0, &[], &[], &[("app", "f")]);
    kube.bind_replicas(NS, "f", "f-svc", addrs.clone(), ready_after);
    let deployments: Api<Deployment> = Api::namespaced(kube.client(NS), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(kube.client(NS), NS);
    let selector = format!("{SERVICE_NAME_LABEL}=f-svc");
    let mut watched = Watched::start(slices, watcher::Config::default().labels(&selector));
    let listed = watched.listed().await;
    assert_eq!(
        listed.len(),
        1,
        "a placeholder slice while there are no replicas"
    );
    let mut current: BTreeMap<_, _> = listed.into_iter().map(|s| (s.name_any(), s)).collect();
    assert!(endpoints(&current).is_empty());

    let asked = Instant::now();
    let two = Patch::Merge(json!({"spec": {"replicas": 2}}));
    deployments
        .patch_scale("f", &PatchParams::default(), &two)
        .await
        .unwrap();
    until_endpoints(
        &mut watched,
        &mut current,
        &[(addrs[0], false, false), (addrs[1], false, false)],
    )
    .await;
    until_endpoints(
        &mut watched,
        &mut current,
        &[(addrs[0], true, false), (addrs[1], true, false)],
    )
    .await;
    assert!(
        asked.elapsed() >= ready_after,
        "ready after {:?}",
        asked.elapsed()
    );

    let one = Patch::Merge(json!({"spec": {"replicas": 1}}));
    deployments
        .patch_scale("f", &PatchParams::default(), &one)
        .await
        .unwrap();
    until_endpoints(
        &mut watched,
        &mut current,
        &[(addrs[0], true, false), (addrs[1], false, true)],
    )
    .await;
    until_endpoints(&mut watched, &mut current, &[(addrs[0], true, false)]).await;
    assert_eq!(current.len(), 1, "the surplus slice is deleted");
}

#[tokio::test]
async fn endpoints_can_be_split_over_two_slices() {
    let kube = FakeKube::start().await;
    let a: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    let api: Api<EndpointSlice> = Api::namespaced(kube.client(NS), NS);
    let of_g = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}=g"));

    kube.set_endpoints(
        NS,
        "g",
        vec![FakeEndpoint::ready(a), FakeEndpoint::not_ready(b)],
        "web",
    );
    let one = api.list(&of_g).await.unwrap();
    assert_eq!(one.items.len(), 1);
    let slice = &one.items[0];
    let name = slice.name_any();
    assert!(name.starts_with("g-") && name.len() == 7, "{name}");
    assert_eq!(slice.address_type, "IPv4");
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("web"), Some(8080)));
    assert_eq!(slice.endpoints.len(), 2);
    let not_ready = slice.endpoints[1].conditions.as_ref().unwrap();
    assert_eq!(
        (not_ready.ready, not_ready.serving, not_ready.terminating),
        (Some(false), Some(false), Some(false))
    );

    kube.set_endpoint_slices(
        NS,
        "g",
        vec![vec![FakeEndpoint::ready(a)], vec![FakeEndpoint::ready(b)]],
        "web",
    );
    let two = api.list(&of_g).await.unwrap();
    assert_eq!(two.items.len(), 2);
    assert!(
        two.items.iter().any(|s| s.name_any() == name),
        "the first slice is reused"
    );
    assert!(two.items.iter().all(|s| s.endpoints.len() == 1));

    kube.set_endpoints(NS, "g", vec![], "web");
    let placeholder = api.list(&of_g).await.unwrap();
    assert_eq!(names(&placeholder.items), [name]);
    assert!(placeholder.items[0].endpoints.is_empty());
    kube.delete_endpoints(NS, "g");
    assert!(api.list(&of_g).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let kube = FakeKube::start().await;
    kube.apply_pod(NS, "p1", &[("app", "f"), ("tier", "web")], json!({}));
    kube.apply_pod(NS, "p2", &[("app", "g")], json!({}));
    kube.apply_pod(NS, "p3", &[], json!({}));
    kube.apply_pod("other", "p4", &[("app", "f")], json!({}));
    let api: Api<Pod> = Api::namespaced(kube.client(NS), NS);
    for (selector, want) in [
        ("app=f", &["p1"][..]),
        ("app==f", &["p1"]),
        ("app", &["p1", "p2"]),
        ("app!=f", &["p2", "p3"]),
        ("!app", &["p3"]),
        ("app in (f,g)", &["p1", "p2"]),
        ("app notin (f)", &["p2", "p3"]),
        ("app,tier=web", &["p1"]),
        ("app in (f, g),!tier", &["p2"]),
        ("", &["p1", "p2", "p3"]),
    ] {
        let list = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        assert_eq!(names(&list.items), want, "labelSelector {selector:?}");
    }
    let list = api
        .list(&ListParams::default().fields("metadata.name=p2"))
        .await
        .unwrap();
    assert_eq!(names(&list.items), ["p2"]);
    let everywhere: Api<Pod> = Api::all(kube.client(NS));
    let list = everywhere
        .list(&ListParams::default().labels("app=f"))
        .await
        .unwrap();
    assert_eq!(
        names(&list.items),
        ["p1", "p4"],
        "sorted by namespace, then name"
    );

    let status = api_error(
        api.list(&ListParams::default().labels("app in (f"))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
    let status = api_error(
        api.list(&ListParams::default().fields("spec.nodeName=n"))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 400);
}

#[tokio::test]
async fn fail_next_answers_with_the_status_then_serves_again() {
    let kube = FakeKube::start().await;
    kube.apply_deployment(NS, "f", 1, &[], &[], &[("app", "f")]);
    let api: Api<Deployment> = Api::namespaced(kube.client(NS), NS);
    kube.clear_requests();
    kube.fail_next(2, 503);
    let status = api_error(api.get_scale("f").await.unwrap_err());
    assert_eq!(
        (status.code, status.reason.as_str()),
        (503, "ServiceUnavailable")
    );
    let status = api_error(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(status.code, 503);
    assert_eq!(
        api.get_scale("f").await.unwrap().spec.unwrap().replicas,
        Some(1)
    );
    assert_eq!(kube.requests().len(), 3, "failed requests are recorded too");
}

#[tokio::test]
async fn a_down_server_refuses_connections_and_comes_back_on_the_same_port() {
    let kube = FakeKube::start().await;
    kube.apply_deployment(NS, "f", 1, &[], &[], &[("app", "f")]);
    let api: Api<Deployment> = Api::namespaced(kube.client(NS), NS);
    api.get("f").await.unwrap();

    kube.set_down(true).await;
    let error = timeout(WAIT, api.get("f")).await.unwrap().unwrap_err();
    assert!(
        !matches!(error, kube::Error::Api(_)),
        "a transport error, got {error:?}"
    );
    let addr = kube.url().trim_start_matches("http://").to_owned();
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "nothing listens"
    );

    kube.set_down(false).await;
    assert_eq!(
        replicas(&timeout(WAIT, api.get("f")).await.unwrap().unwrap()),
        Some(1)
    );
}

#[tokio::test]
async fn the_kubeconfig_it_writes_is_accepted_by_kube() {
    let kube = FakeKube::start().await;
    let dir = std::env::temp_dir().join(format!("sluicegate-fake-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = kube.write_kubeconfig(&dir, "team-a");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(config.default_namespace, "team-a");
    assert_eq!(
        format!("http://{}", config.cluster_url.authority().unwrap()),
        kube.url()
    );

    kube.apply_deployment("team-a", "f", 2, &[], &[], &[("app", "f")]);
    let api: Api<Deployment> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
    assert_eq!(replicas(&api.get("f").await.unwrap()), Some(2));
    assert_eq!(
        kube.requests().pop().unwrap().path,
        "/apis/apps/v1/namespaces/team-a/deployments/f"
    );
}

#[tokio::test]
async fn watch_is_chunked_json_lines_with_bookmarks_and_ends_at_its_timeout() {
    let kube = FakeKube::start().await;
    kube.apply_deployment(NS, "f", 1, &[], &[], &[("app", "f")]);
    let from = kube.resource_version();
    kube.apply_deployment(NS, "f", 2, &[], &[], &[("app", "f")]);
    let client = common::client();

    let list = common::send_with(
        &client,
        Request::get(format!(
            "{}/apis/apps/v1/namespaces/{NS}/deployments",
            kube.url()
        ))
        .body(common::empty())
        .unwrap(),
    )
    .await;
    let list: Value = serde_json::from_str(&list.body).unwrap();
    assert_eq!(
        (list["kind"].as_str(), list["apiVersion"].as_str()),
        (Some("DeploymentList"), Some("apps/v1"))
    );
    assert_eq!(
        list["metadata"]["resourceVersion"],
        json!(from.saturating_add(1).to_string())
    );
    assert!(
        list["items"][0].get("kind").is_none(),
        "list items carry no kind"
    );

    let started = Instant::now();
    let uri = format!(
        "{}/apis/apps/v1/namespaces/{NS}/deployments?watch=true&resourceVersion={from}&timeoutSeconds=1&allowWatchBookmarks=true",
        kube.url()
    );
    let request = Request::get(uri).body(common::empty()).unwrap();
    let watch = timeout(WAIT, common::send_with(&client, request))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "open until timeoutSeconds"
    );
    assert_eq!(watch.status, 200);
    assert_eq!(watch.header("content-type"), Some("application/json"));
    assert_eq!(watch.header("transfer-encoding"), Some("chunked"));
    let lines: Vec<Value> = watch
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "MODIFIED");
    assert_eq!(lines[0]["object"]["kind"], "Deployment");
    assert_eq!(lines[0]["object"]["apiVersion"], "apps/v1");
    assert_eq!(lines[0]["object"]["spec"]["replicas"], 2);
    let bookmark = lines
        .iter()
        .find(|l| l["type"] == "BOOKMARK")
        .expect("a bookmark while idle");
    assert_eq!(
        bookmark["object"],
        json!({"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"resourceVersion": (from + 1).to_string()}})
    );
}

#[tokio::test]
async fn pod_statuses_and_deployment_conditions_read_back_as_kube_types() {
    let kube = FakeKube::start().await;
    kube.apply_pod(
        NS,
        "crash",
        &[("app", "f")],
        crash_loop_status(137, "out of memory"),
    );
    kube.apply_pod(
        NS,
        "pending",
        &[("app", "f")],
        unschedulable_status("0/3 nodes are available"),
    );
    let pods: Api<Pod> = Api::namespaced(kube.client(NS), NS);

    let crash = pods.get("crash").await.unwrap().status.unwrap();
    let container = &crash.container_statuses.unwrap()[0];
    let waiting = container.state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
    let last = container
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(
        (last.exit_code, last.message.as_deref()),
        (137, Some("out of memory"))
    );

    let pending = pods.get("pending").await.unwrap().status.unwrap();
    let scheduled = &pending.conditions.unwrap()[0];
    assert_eq!(
        (
            scheduled.type_.as_str(),
            scheduled.status.as_str(),
            scheduled.reason.as_deref()
        ),
        ("PodScheduled", "False", Some("Unschedulable"))
    );
    assert!(kube.delete_pod(NS, "pending"));
    assert_eq!(
        api_error(pods.get("pending").await.unwrap_err()).message,
        "pods \"pending\" not found"
    );

    kube.apply_deployment(
        NS,
        "f",
        1,
        &[("team", "a")],
        &[("note", "x")],
        &[("app", "f")],
    );
    assert!(kube.set_deployment_condition(
        NS,
        "f",
        "Progressing",
        "False",
        "ProgressDeadlineExceeded",
        "too slow"
    ));
    assert!(!kube.set_deployment_condition(
        NS,
        "nope",
        "Progressing",
        "False",
        "ProgressDeadlineExceeded",
        ""
    ));
    kube.apply_deployment(
        NS,
        "f",
        2,
        &[("team", "a")],
        &[("note", "x")],
        &[("app", "f")],
    );
    let deployments: Api<Deployment> = Api::namespaced(kube.client(NS), NS);
    let f = deployments.get("f").await.unwrap();
    assert_eq!(f.labels().get("team").map(String::as_str), Some("a"));
    assert_eq!(f.annotations().get("note").map(String::as_str), Some("x"));
    assert_eq!(f.metadata.generation, Some(2));
    let status = f.status.unwrap();
    assert_eq!(
        (status.replicas, status.observed_generation),
        (Some(2), Some(2))
    );
    let condition = &status.conditions.unwrap()[0];
    assert_eq!(
        (
            condition.type_.as_str(),
            condition.status.as_str(),
            condition.reason.as_deref()
        ),
        ("Progressing", "False", Some("ProgressDeadlineExceeded")),
        "an apply keeps the conditions"
    );
}
