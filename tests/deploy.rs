//! The Kubernetes manifests in `deploy/kubernetes/` and the image in `deploy/Dockerfile`: every
//! object is what the API server would accept (no field that its type lacks), the gateway's config
//! passes the gateway's own parser, the Role grants exactly the provider's calls, and the files
//! agree with each other (ports, paths, namespaces, the one owner of each replica count).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::{HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sluicegate::config::{Config, ProviderConfig, ScaleMode};
use sluicegate::provider::kubernetes::{API_RULES, LEASE_RULES};

/// Where the ConfigMap is mounted, as the image's ENTRYPOINT expects it.
const CONFIG_PATH: &str = "/etc/sluicegate/sluicegate.toml";
/// The label that makes a Deployment a discovered function.
const FUNCTION_LABEL: &str = "sluicegate.io/function";
/// The prefix of the annotations that hold a discovered function's keys.
const KEY_ANNOTATION: &str = "sluicegate.io/";

/// One YAML document of a manifest file.
struct Doc {
    /// `gateway.yaml`, or `rbac.yaml (commented variant)`.
    file: String,
    /// Whether it comes from a commented-out alternative (not applied as the file stands).
    variant: bool,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"].as_str().unwrap_or("")
    }

    fn what(&self) -> String {
        format!("{}: {} {}", self.file, self.kind(), self.name())
    }

    fn typed<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", self.what()))
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of `deploy/kubernetes/*.yaml`, and of the blocks commented out between
/// `# >>>` and `# <<<` (from their first `# ---` on, with the leading `# ` removed).
fn manifests() -> Vec<Doc> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = read(&path);
        docs.extend(parse_yaml(&name, &text, false));
        if let Some(block) = commented_variant(&text) {
            docs.extend(parse_yaml(
                &format!("{name} (commented variant)"),
                &block,
                true,
            ));
        }
    }
    docs
}

fn parse_yaml(file: &str, text: &str, variant: bool) -> Vec<Doc> {
    let values: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{file}: not YAML: {e}"));
    values
        .into_iter()
        .map(|value| Doc {
            file: file.to_owned(),
            variant,
            value,
        })
        .collect()
}

fn commented_variant(text: &str) -> Option<String> {
    let start = text.find("\n# >>>")?;
    let end = start + text[start..].find("\n# <<<")?;
    let block = &text[start..end];
    let yaml = &block[block.find("\n# ---")?..];
    Some(
        yaml.lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .or_else(|| l.strip_prefix('#'))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

fn one<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| !d.variant && d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

// ---------------------------------------------------------------------------------------------
// Every object parses as its type, with nothing dropped.

/// Deserializes `value` as `T` and serializes it back: whatever did not come back is a field `T`
/// does not have (k8s-openapi ignores unknown fields, the API server's strict mode does not).
fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut dropped = Vec::new();
    lost(value, &back, String::new(), &mut dropped);
    if dropped.is_empty() {
        Ok(())
    } else {
        Err(format!("not fields of its type: {}", dropped.join(", ")))
    }
}

/// Paths of `before` that are missing or changed in `after`.
fn lost(before: &Value, after: &Value, at: String, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (key, value) in b {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match a.get(key) {
                    Some(kept) => lost(value, kept, path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if b.len() == a.len() => {
            for (i, (value, kept)) in b.iter().zip(a).enumerate() {
                lost(value, kept, format!("{at}[{i}]"), out);
            }
        }
        _ if before == after => {}
        _ => out.push(format!("{at} (was {before}, came back as {after})")),
    }
}

/// Checks a document against its type, chosen by `apiVersion` and `kind`.
fn check_document(doc: &Doc) -> Result<(), String> {
    let v = &doc.value;
    match (v["apiVersion"].as_str().unwrap_or(""), doc.kind()) {
        ("v1", "Namespace") => round_trip::<Namespace>(v),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(v),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(v),
        ("v1", "Service") => round_trip::<Service>(v),
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(v),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(v),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(v),
        ("apps/v1", "StatefulSet") => round_trip::<StatefulSet>(v),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(v),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => round_trip::<HorizontalPodAutoscaler>(v),
        ("keda.sh/v1alpha1", "ScaledObject") => check_scaled_object(v),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => check_service_monitor(v),
        (api, kind) => Err(format!("no check for apiVersion {api:?} kind {kind:?}")),
    }
}

/// Problems are collected as `path: what`.
struct Shape(Vec<String>);

impl Shape {
    /// `v` at `path` is an object with no key outside `allowed` and every key of `required`
    /// (both lists of names separated by spaces).
    fn keys(&mut self, v: &Value, path: &str, allowed: &str, required: &str) {
        let Some(map) = v.as_object() else {
            self.0.push(format!("{path}: not a mapping"));
            return;
        };
        let allowed: Vec<&str> = allowed.split_whitespace().collect();
        for key in map.keys().filter(|k| !allowed.contains(&k.as_str())) {
            self.0.push(format!("{path}.{key}: unknown field"));
        }
        for key in required
            .split_whitespace()
            .filter(|k| !map.contains_key(*k))
        {
            self.0.push(format!("{path}.{key}: required"));
        }
    }

    fn typed<T: DeserializeOwned + Serialize>(&mut self, v: &Value, path: &str) {
        if let Err(e) = round_trip::<T>(v) {
            self.0.push(format!("{path}: {e}"));
        }
    }

    fn count(&mut self, v: &Value, path: &str) -> Option<u64> {
        if v.is_null() {
            return None;
        }
        let n = v.as_u64();
        if n.is_none() {
            self.0.push(format!("{path}: {v} is not a whole number"));
        }
        n
    }

    fn done(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0.join("; "))
        }
    }
}

/// KEDA's ScaledObject (keda.sh/v1alpha1), field by field as its CRD defines them.
fn check_scaled_object(v: &Value) -> Result<(), String> {
    let mut s = Shape(Vec::new());
    s.keys(v, "", "apiVersion kind metadata spec", "metadata spec");
    s.typed::<ObjectMeta>(&v["metadata"], "metadata");
    let spec = &v["spec"];
    s.keys(
        spec,
        "spec",
        "scaleTargetRef pollingInterval cooldownPeriod initialCooldownPeriod idleReplicaCount \
         minReplicaCount maxReplicaCount fallback advanced triggers",
        "scaleTargetRef triggers",
    );
    s.keys(
        &spec["scaleTargetRef"],
        "spec.scaleTargetRef",
        "apiVersion kind name envSourceContainerName",
        "name",
    );
    for key in ["pollingInterval", "cooldownPeriod", "initialCooldownPeriod"] {
        s.count(&spec[key], &format!("spec.{key}"));
    }
    let min = s.count(&spec["minReplicaCount"], "spec.minReplicaCount");
    let max = s.count(&spec["maxReplicaCount"], "spec.maxReplicaCount");
    if let (Some(min), Some(max)) = (min, max) {
        if min > max {
            s.0.push(format!(
                "spec: minReplicaCount {min} > maxReplicaCount {max}"
            ));
        }
    }
    if let Some(idle) = s.count(&spec["idleReplicaCount"], "spec.idleReplicaCount") {
        if idle != 0 || min.unwrap_or(0) == 0 {
            s.0.push("spec.idleReplicaCount: only 0, and below minReplicaCount".into());
        }
    }
    if !spec["advanced"].is_null() {
        let advanced = &spec["advanced"];
        s.keys(
            advanced,
            "spec.advanced",
            "horizontalPodAutoscalerConfig restoreToOriginalReplicaCount scalingModifiers",
            "",
        );
        let hpa = &advanced["horizontalPodAutoscalerConfig"];
        if !hpa.is_null() {
            s.keys(
                hpa,
                "spec.advanced.horizontalPodAutoscalerConfig",
                "name behavior",
                "",
            );
            s.typed::<HorizontalPodAutoscalerBehavior>(
                &hpa["behavior"],
                "spec.advanced.horizontalPodAutoscalerConfig.behavior",
            );
        }
    }
    let triggers = spec["triggers"].as_array().cloned().unwrap_or_default();
    if triggers.is_empty() {
        s.0.push("spec.triggers: empty".into());
    }
    for (i, trigger) in triggers.iter().enumerate() {
        let at = format!("spec.triggers[{i}]");
        s.keys(
            trigger,
            &at,
            "type name metadata metricType useCachedMetrics authenticationRef",
            "type metadata",
        );
        if let Some(t) = trigger["metricType"].as_str() {
            if !["AverageValue", "Value", "Utilization"].contains(&t) {
                s.0.push(format!("{at}.metricType: unknown {t}"));
            }
        }
        // KEDA reads trigger metadata as map[string]string: an unquoted number is rejected.
        let metadata = trigger["metadata"].as_object().cloned().unwrap_or_default();
        for (key, value) in &metadata {
            if !value.is_string() {
                s.0.push(format!("{at}.metadata.{key}: {value} must be a string"));
            }
        }
        if trigger["type"] == "prometheus" {
            s.keys(
                &trigger["metadata"],
                &format!("{at}.metadata"),
                "serverAddress query threshold activationThreshold namespace customHeaders \
                 ignoreNullValues queryParameters unsafeSsl timeout",
                "serverAddress query threshold",
            );
            for key in ["threshold", "activationThreshold"] {
                if let Some(text) = metadata.get(key).and_then(Value::as_str) {
                    if text.parse::<f64>().is_err() {
                        s.0.push(format!("{at}.metadata.{key}: {text:?} is not a number"));
                    }
                }
            }
        }
    }
    s.done()
}

/// The Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1), the fields used here.
fn check_service_monitor(v: &Value) -> Result<(), String> {
    let mut s = Shape(Vec::new());
    s.keys(v, "", "apiVersion kind metadata spec", "metadata spec");
    s.typed::<ObjectMeta>(&v["metadata"], "metadata");
    let spec = &v["spec"];
    s.keys(
        spec,
        "spec",
        "selector namespaceSelector endpoints jobLabel targetLabels podTargetLabels sampleLimit",
        "selector endpoints",
    );
    s.typed::<LabelSelector>(&spec["selector"], "spec.selector");
    if !spec["namespaceSelector"].is_null() {
        s.keys(
            &spec["namespaceSelector"],
            "spec.namespaceSelector",
            "any matchNames",
            "",
        );
    }
    let endpoints = spec["endpoints"].as_array().cloned().unwrap_or_default();
    if endpoints.is_empty() {
        s.0.push("spec.endpoints: empty".into());
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        let at = format!("spec.endpoints[{i}]");
        s.keys(
            endpoint,
            &at,
            "port targetPort path scheme params interval scrapeTimeout honorLabels \
             honorTimestamps relabelings metricRelabelings",
            "",
        );
        let interval = endpoint["interval"].as_str().map(seconds);
        let timeout = endpoint["scrapeTimeout"].as_str().map(seconds);
        if let (Some(interval), Some(timeout)) = (interval, timeout) {
            if timeout > interval {
                s.0.push(format!("{at}: scrapeTimeout is longer than interval"));
            }
        }
    }
    s.done()
}

/// A Prometheus duration of one unit, like `5s` or `1m`, in seconds.
fn seconds(text: &str) -> f64 {
    sluicegate::config::parse_duration(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .as_secs_f64()
}

#[test]
fn every_manifest_parses_as_its_kubernetes_type_with_no_unknown_field() {
    let docs = manifests();
    let problems: Vec<String> = docs
        .iter()
        .filter_map(|d| {
            check_document(d)
                .err()
                .map(|e| format!("{}: {e}", d.what()))
        })
        .collect();
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/kubernetes/");
    }
}

#[test]
fn a_misspelt_field_is_named_not_silently_dropped() {
    let docs = manifests();
    let mut gateway = one(&docs, "Deployment", "sluicegate").value.clone();
    gateway["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = serde_json::json!({});
    let err = round_trip::<Deployment>(&gateway).unwrap_err();
    assert!(
        err.contains("spec.template.spec.containers[0].readinesProbe"),
        "{err}"
    );

    let mut scaled = one(&docs, "ScaledObject", "hello").value.clone();
    scaled["spec"]["minReplicas"] = 1.into();
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 5.into();
    let err = check_scaled_object(&scaled).unwrap_err();
    assert!(err.contains("spec.minReplicas: unknown field"), "{err}");
    assert!(err.contains("threshold: 5 must be a string"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// RBAC: exactly the provider's calls.

/// The (group, resource, verb) triples `rules` grant, or why a rule is not a plain one.
fn grants(rules: &[PolicyRule]) -> Result<BTreeSet<(String, String, String)>, String> {
    let mut out = BTreeSet::new();
    for rule in rules {
        if rule.resource_names.is_some() || rule.non_resource_urls.is_some() {
            return Err(format!(
                "unexpected resourceNames or nonResourceURLs in {rule:?}"
            ));
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    Ok(out)
}

/// `Ok` when `rules` grant exactly `API_RULES` and `LEASE_RULES`; else every difference, one per
/// line.
fn compare_with_api_rules(rules: &[PolicyRule]) -> Result<(), String> {
    let granted = grants(rules)?;
    let needed: BTreeSet<(String, String, String)> = API_RULES
        .iter()
        .chain(LEASE_RULES)
        .flat_map(|r| {
            r.verbs
                .iter()
                .map(|v| (r.group.to_owned(), r.resource.to_owned(), v.to_string()))
        })
        .collect();
    let show = |(g, r, v): &(String, String, String)| {
        let group = if g.is_empty() { "core" } else { g };
        format!("{group} {r} {v}")
    };
    let mut diff: Vec<String> = needed
        .difference(&granted)
        .map(|t| format!("missing: {} (the provider makes this call)", show(t)))
        .collect();
    diff.extend(
        granted
            .difference(&needed)
            .map(|t| format!("extra: {} (not in API_RULES)", show(t))),
    );
    if diff.is_empty() {
        Ok(())
    } else {
        Err(diff.join("\n"))
    }
}

#[test]
fn the_role_grants_exactly_the_calls_of_the_kubernetes_provider() {
    let docs = manifests();
    let mut checked = 0;
    for doc in docs
        .iter()
        .filter(|d| matches!(d.kind(), "Role" | "ClusterRole"))
    {
        let rules = match doc.kind() {
            "Role" => doc.typed::<Role>().rules,
            _ => doc.typed::<ClusterRole>().rules,
        };
        if let Err(diff) = compare_with_api_rules(&rules.unwrap_or_default()) {
            panic!("{} differs from API_RULES:\n{diff}", doc.what());
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected the Role and its ClusterRole variant"
    );
}

#[test]
fn a_role_differing_from_api_rules_is_reported_verb_by_verb() {
    let docs = manifests();
    let mut rules = one(&docs, "Role", "sluicegate")
        .typed::<Role>()
        .rules
        .unwrap();
    rules[1].verbs = vec!["get".into(), "patch".into()];
    let diff = compare_with_api_rules(&rules).unwrap_err();
    assert_eq!(
        diff,
        "missing: apps deployments/scale update (the provider makes this call)\n\
         extra: apps deployments/scale patch (not in API_RULES)"
    );
}

#[test]
fn the_bindings_give_the_gateway_account_its_role_where_the_functions_live() {
    let docs = manifests();
    let config = gateway_config(&docs);
    let functions_ns = config.gateway.kubernetes_namespace.clone().unwrap();
    let gateway = one(&docs, "Deployment", "sluicegate");
    let account = gateway
        .typed::<Deployment>()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let account = account.service_account_name.unwrap();
    one(&docs, "ServiceAccount", &account);
    let role = one(&docs, "Role", "sluicegate");
    assert_eq!(
        role.namespace(),
        functions_ns,
        "the Role is not where the functions are"
    );
    for doc in docs.iter().filter(|d| d.kind() == "RoleBinding") {
        let binding: RoleBinding = doc.typed();
        let want_kind = if doc.variant { "ClusterRole" } else { "Role" };
        assert_eq!(binding.role_ref.kind, want_kind, "{}", doc.what());
        if !doc.variant {
            assert_eq!(binding.role_ref.name, role.name(), "{}", doc.what());
            assert_eq!(doc.namespace(), functions_ns, "{}", doc.what());
        }
        let subjects = binding.subjects.unwrap_or_default();
        assert!(
            subjects.iter().any(|s| s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(gateway.namespace())),
            "{} does not bind {}/{account}",
            doc.what(),
            gateway.namespace()
        );
    }
    assert!(
        !docs.iter().any(|d| d.kind() == "ClusterRoleBinding"),
        "a ClusterRoleBinding would grant the rules in every namespace"
    );
}

// ---------------------------------------------------------------------------------------------
// The gateway's config and its pod.

fn gateway_config_text(docs: &[Doc]) -> String {
    let map: ConfigMap = one(docs, "ConfigMap", "sluicegate-config").typed();
    let key = Path::new(CONFIG_PATH)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    map.data
        .and_then(|mut d| d.remove(key))
        .unwrap_or_else(|| panic!("the ConfigMap has no {key}"))
}

fn parse(text: &str) -> Config {
    Config::parse(Path::new(CONFIG_PATH), text, None).unwrap_or_else(|e| panic!("{e}"))
}

fn gateway_config(docs: &[Doc]) -> Config {
    parse(&gateway_config_text(docs))
}

fn gateway_container(docs: &[Doc]) -> (Container, k8s_openapi::api::core::v1::PodSpec) {
    let pod = one(docs, "Deployment", "sluicegate")
        .typed::<Deployment>()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    (pod.containers[0].clone(), pod)
}

fn probe_path(probe: &Option<k8s_openapi::api::core::v1::Probe>) -> Option<String> {
    probe.as_ref()?.http_get.as_ref()?.path.clone()
}

#[test]
fn the_gateway_config_parses_and_fits_its_pod() {
    let docs = manifests();
    let config = gateway_config(&docs);
    let (container, pod) = gateway_container(&docs);

    let port = container.ports.as_ref().unwrap()[0].container_port;
    assert_eq!(config.gateway.listen.port() as i32, port);
    assert!(
        config.gateway.listen.ip().is_unspecified(),
        "listen on every address in a pod"
    );
    assert_eq!(
        probe_path(&container.readiness_probe).as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        probe_path(&container.liveness_probe).as_deref(),
        Some("/healthz")
    );

    // The config is where the image's ENTRYPOINT looks, on a volume made from the ConfigMap.
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let config_dir = Path::new(CONFIG_PATH).parent().unwrap();
    let config_mount = mounts
        .iter()
        .find(|m| Path::new(&m.mount_path) == config_dir)
        .expect("the config directory is mounted");
    let config_volume = volumes
        .iter()
        .find(|v| v.name == config_mount.name)
        .unwrap();
    assert_eq!(
        config_volume.config_map.as_ref().unwrap().name,
        "sluicegate-config"
    );

    // An embedded async store must be on a writable volume (the root filesystem is read-only);
    // the three gateways of the example share theirs in JetStream (checked below).
    if let Some(store) = config.gateway.async_store.file() {
        let state = mounts
            .iter()
            .find(|m| store.starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("{} is on no volume", store.display()));
        assert_ne!(state.read_only, Some(true));
        let volume = volumes.iter().find(|v| v.name == state.name).unwrap();
        assert!(volume.config_map.is_none() && volume.secret.is_none());
    }
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));

    // preStop and the drain both end before the kubelet's SIGKILL.
    let pre_stop = container
        .lifecycle
        .and_then(|l| l.pre_stop)
        .and_then(|p| p.sleep)
        .map_or(0, |s| s.seconds);
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let drain = config.gateway.drain_timeout.as_secs() as i64;
    assert!(
        pre_stop > 0 && pre_stop + drain < grace,
        "preStop {pre_stop}s + drain_timeout {drain}s must end before \
         terminationGracePeriodSeconds {grace}s"
    );

    // The admin token comes from a Secret, never from the file.
    assert!(
        config.gateway.admin_token.is_none(),
        "a token in a ConfigMap is readable by all"
    );
    let env = container.env.unwrap_or_default();
    let token = env
        .iter()
        .find(|e| e.name == sluicegate::config::ADMIN_TOKEN_ENV)
        .expect("SLUICEGATE_ADMIN_TOKEN is set");
    assert!(token.value_from.as_ref().unwrap().secret_key_ref.is_some());
    assert_eq!(pod.service_account_name.as_deref(), Some("sluicegate"));
}

#[test]
fn the_service_monitor_and_scrape_annotations_reach_the_gateway_port() {
    let docs = manifests();
    let (container, _) = gateway_container(&docs);
    let service: Service = one(&docs, "Service", "sluicegate").typed();
    let ports = service.spec.unwrap().ports.unwrap();
    let monitor = one(&docs, "ServiceMonitor", "sluicegate");
    let port = monitor.value["spec"]["endpoints"][0]["port"]
        .as_str()
        .unwrap();
    let service_port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(port))
        .unwrap_or_else(|| panic!("the Service has no port {port}"));
    let container_port = container.ports.unwrap()[0].clone();
    assert_eq!(
        service_port.target_port,
        Some(IntOrString::String(container_port.name.unwrap()))
    );
    let template = one(&docs, "Deployment", "sluicegate").typed::<Deployment>();
    let annotations = template
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations;
    let annotations = annotations.unwrap();
    assert_eq!(
        annotations["prometheus.io/port"],
        container_port.container_port.to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

// ---------------------------------------------------------------------------------------------
// Functions: named in the file or discovered, each with its Deployment and Service.

/// The gateway's config with the discovered functions added as tables, as discovery would serve
/// them: `sluicegate.io/<key>` → `<key>`, `sluicegate.io/autoscaler.<key>` → the autoscaler's
/// `<key>`; a value that is a TOML integer, float or boolean is one, anything else a string. A
/// discovered function also named in the file is a duplicate table, so an error.
fn config_with_discovered(docs: &[Doc]) -> Config {
    let text = gateway_config_text(docs);
    let mut config = Config::parse(Path::new(CONFIG_PATH), &text, None)
        .unwrap_or_else(|e| panic!("the gateway's config: {e}\n{text}"));
    for (name, doc) in discovered(docs) {
        let deployment = doc.typed::<Deployment>();
        let annotations: BTreeMap<String, String> = deployment
            .metadata
            .annotations
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(KEY_ANNOTATION)?.to_owned(), v)))
            .collect();
        // Read exactly as the gateway's discovery reads them.
        let function = config
            .discovered(
                &name,
                &deployment.metadata.namespace.unwrap_or_default(),
                &deployment.metadata.name.unwrap_or_default(),
                &annotations,
            )
            .unwrap_or_else(|e| panic!("discovered function {name}: {e}"));
        config.functions.insert(name, function);
    }
    config
}

/// Deployments labelled for discovery, by function name.
fn discovered(docs: &[Doc]) -> BTreeMap<String, &Doc> {
    docs.iter()
        .filter(|d| !d.variant && d.kind() == "Deployment")
        .filter_map(|d| {
            let name = d.value["metadata"]["labels"][FUNCTION_LABEL].as_str()?;
            Some((name.to_owned(), d))
        })
        .collect()
}

/// Where each `kubernetes` function's objects are: (namespace, deployment, service, port).
fn function_objects(config: &Config) -> BTreeMap<String, (String, String, String, Option<String>)> {
    config
        .functions
        .iter()
        .filter_map(|(name, f)| match &f.provider {
            ProviderConfig::Kubernetes(k) => {
                let ns = k
                    .namespace
                    .clone()
                    .or_else(|| config.gateway.kubernetes_namespace.clone())
                    .expect("a namespace");
                Some((
                    name.clone(),
                    (ns, k.deployment.clone(), k.service.clone(), k.port.clone()),
                ))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn discovery_annotations_are_function_keys_the_gateway_accepts() {
    let docs = manifests();
    let found = discovered(&docs);
    assert!(
        !found.is_empty(),
        "no Deployment is labelled {FUNCTION_LABEL}"
    );
    let config = config_with_discovered(&docs);
    for name in found.keys() {
        let f = &config.functions[name];
        assert_eq!(f.provider.kind(), "kubernetes");
    }
    let hello = &config.functions["hello"];
    assert_eq!(hello.max_ongoing_requests, 10);
    assert_eq!(hello.autoscaler.mode, ScaleMode::None);
}

#[test]
fn every_function_has_a_deployment_at_zero_a_readiness_probe_and_its_service_port() {
    let docs = manifests();
    let config = config_with_discovered(&docs);
    let functions = function_objects(&config);
    assert!(functions.len() >= 2, "{functions:?}");
    for (name, (ns, deployment, service, port)) in functions {
        let find = |kind: &str, object: &str| {
            docs.iter()
                .find(|d| {
                    !d.variant && d.kind() == kind && d.name() == object && d.namespace() == ns
                })
                .unwrap_or_else(|| panic!("function {name}: no {kind} {ns}/{object}"))
        };
        let deployment: Deployment = find("Deployment", &deployment).typed();
        let spec = deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(0), "function {name} starts at zero");
        let pod = spec.template.spec.unwrap();
        assert!(
            pod.containers.iter().all(|c| c.readiness_probe.is_some()),
            "function {name}: without a readiness probe a starting replica gets requests"
        );
        let labels = spec.template.metadata.unwrap().labels.unwrap_or_default();

        let service: Service = find("Service", &service).typed();
        let service = service.spec.unwrap();
        let selector = service.selector.unwrap_or_default();
        assert!(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "function {name}: the Service does not select the Deployment's pods"
        );
        let ports = service.ports.unwrap_or_default();
        if let Some(port) = port {
            assert!(
                ports
                    .iter()
                    .any(|p| p.name.as_deref() == Some(&port) || p.port.to_string() == port),
                "function {name}: the Service has no port {port}"
            );
        }
    }
}

#[test]
fn each_scaled_function_has_one_owner_of_its_replica_count() {
    let docs = manifests();
    let config = config_with_discovered(&docs);
    let functions = function_objects(&config);
    let targets: Vec<(&Doc, &str)> = docs
        .iter()
        .filter(|d| matches!(d.kind(), "ScaledObject" | "HorizontalPodAutoscaler"))
        .map(|d| {
            (
                d,
                d.value["spec"]["scaleTargetRef"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(targets.len() >= 2);
    for (doc, target) in targets {
        let (name, _) = functions
            .iter()
            .find(|(_, (ns, deployment, _, _))| ns == doc.namespace() && deployment == target)
            .unwrap_or_else(|| panic!("{} scales {target}, which no function uses", doc.what()));
        assert_eq!(
            config.functions[name].autoscaler.mode,
            ScaleMode::None,
            "{} owns the count of {name}: its autoscaler type must be \"none\" \
             (the gateway only wakes it from zero)",
            doc.what()
        );
    }
    // And a function the gateway scales is left to it.
    for (name, f) in &config.functions {
        if f.autoscaler.mode != ScaleMode::None {
            let (ns, deployment, _, _) = &functions[name];
            assert!(
                !docs.iter().any(|d| matches!(
                    d.kind(),
                    "ScaledObject" | "HorizontalPodAutoscaler"
                ) && d.namespace() == ns
                    && d.value["spec"]["scaleTargetRef"]["name"] == deployment.as_str()),
                "{name} is scaled by the gateway and by KEDA or an HPA"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Queries name only series the gateway exports.

/// Every exported series name, with its label names (for one function with one observation).
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let metrics = sluicegate::metrics::Metrics::new();
    let f = metrics.function("hello");
    f.observe(200, 0.01);
    let text = String::from_utf8(metrics.encode()).unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split_once('}').unwrap().0),
            None => (line.split_whitespace().next().unwrap(), ""),
        };
        let labels = labels
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()));
        out.entry(name.to_owned()).or_default().extend(labels);
    }
    out
}

/// `gateway_…` and `sluicegate_…` words of `text`, each with the label names of its `{…}`.
fn series_in(text: &str) -> Vec<(String, Vec<String>)> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic()) {
        let start = &rest[i..];
        let end = start.find(|c: char| !is_word(c)).unwrap_or(start.len());
        let word = &start[..end];
        let after = &start[end..];
        let preceded = i > 0 && (rest[..i].ends_with('.') || rest[..i].ends_with('/'));
        if !preceded && (word.starts_with("gateway_") || word.starts_with("sluicegate_")) {
            let mut labels = Vec::new();
            if let Some(inner) = after.strip_prefix('{') {
                let inner = &inner[..inner.find('}').unwrap_or(0)];
                for matcher in inner.split(',') {
                    let label = matcher.trim().split(['=', '!']).next().unwrap().trim();
                    if !label.is_empty() && !label.starts_with("<<") {
                        labels.push(label.to_owned());
                    }
                }
            }
            out.push((word.to_owned(), labels));
        }
        rest = after;
    }
    out
}

#[test]
fn autoscaling_queries_use_only_series_and_labels_the_gateway_exports() {
    let exported = exported();
    let dir = repo().join("deploy/kubernetes");
    let mut seen = 0;
    for file in ["keda-scaledobject.yaml", "hpa.yaml"] {
        // Comments included: the adapter rule and the alternative queries live there.
        let text = read(&dir.join(file));
        // Names the adapter makes up (`as: NAME`) are not exported by the gateway.
        let renamed: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.trim_start_matches(['#', ' ']).strip_prefix("as: "))
            .map(str::trim)
            .collect();
        for (name, labels) in series_in(&text) {
            if renamed.contains(name.as_str()) {
                continue;
            }
            let have = exported
                .get(&name)
                .unwrap_or_else(|| panic!("{file}: the gateway exports no series {name}"));
            for label in labels {
                assert!(have.contains(&label), "{file}: {name} has no label {label}");
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 4,
        "expected queries in keda-scaledobject.yaml and hpa.yaml"
    );
}

// ---------------------------------------------------------------------------------------------
// The image.

#[test]
fn the_dockerfile_runs_the_config_the_manifests_mount() {
    let docker = read(&repo().join("deploy/Dockerfile"));
    let docs = manifests();
    let (container, pod) = gateway_container(&docs);
    let line = |prefix: &str| {
        docker
            .lines()
            .rfind(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("the Dockerfile has no {prefix}"))
            .to_owned()
    };

    let entrypoint: Vec<String> =
        serde_json::from_str(line("ENTRYPOINT").trim_start_matches("ENTRYPOINT")).unwrap();
    assert_eq!(
        entrypoint[1..],
        ["--config".to_owned(), CONFIG_PATH.to_owned()]
    );
    let port = container.ports.unwrap()[0].container_port;
    assert_eq!(line("EXPOSE"), format!("EXPOSE {port}"));
    let user = pod.security_context.unwrap().run_as_user.unwrap();
    assert!(line("USER").starts_with(&format!("USER {user}")));
    assert!(docker.contains("cargo build --release --locked"));

    // The builder's toolchain is at least the crate's rust-version.
    let manifest = read(&repo().join("Cargo.toml"));
    let want = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let from = line("FROM rust:");
    let have = from
        .trim_start_matches("FROM rust:")
        .split('-')
        .next()
        .unwrap();
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(
        version(have) >= version(want),
        "{from}: rust-version is {want}"
    );

    let ignore = read(&repo().join(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == "target"));
    // Every container running the image replaces the gateway's entrypoint or keeps it.
    for doc in docs
        .iter()
        .filter(|d| d.kind() == "Deployment" && d.name() != "sluicegate")
    {
        let pod = doc
            .typed::<Deployment>()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        for c in pod.containers {
            if c.image.as_deref().is_some_and(|i| i.contains("sluicegate")) {
                let command = c.command.unwrap_or_default();
                assert_eq!(
                    command.first().map(String::as_str),
                    Some(entrypoint[0].as_str()),
                    "{}: a function running the image replaces its ENTRYPOINT",
                    doc.what()
                );
            }
        }
    }
}

#[test]
fn the_gateways_share_jetstream_and_the_cluster_through_the_nats_service_on_a_volume_claim() {
    let docs = manifests();
    // The three gateways keep their async invocations in JetStream and act as one through the
    // same NATS Service.
    let config = parse(&gateway_config_text(&docs));
    let url = match &config.gateway.async_store {
        sluicegate::config::AsyncStoreLocation::Nats(url) => url.clone(),
        other => panic!("gateway.yaml's async_store is not JetStream: {other:?}"),
    };
    assert_eq!(config.gateway.cluster.as_deref(), Some(url.as_str()));
    let service: Service = one(&docs, "Service", "nats").typed();
    let namespace = service.metadata.namespace.clone().unwrap();
    assert_eq!(
        url,
        format!("nats://nats.{namespace}.svc.cluster.local:4222")
    );
    let spec = service.spec.unwrap();
    assert!(spec
        .ports
        .unwrap()
        .iter()
        .any(|p| p.port == 4222 && p.target_port == Some(IntOrString::String("client".into()))));

    // The server: selected by the Service, its store on a PersistentVolumeClaim, fsync always.
    let set: StatefulSet = one(&docs, "StatefulSet", "nats").typed();
    let set = set.spec.unwrap();
    let labels = set.template.metadata.unwrap().labels.unwrap();
    for (k, v) in spec.selector.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "the Service selects the NATS pod");
    }
    let claims = set.volume_claim_templates.unwrap();
    let pod = set.template.spec.unwrap();
    let container = &pod.containers[0];
    let data = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| {
            claims
                .iter()
                .any(|c| c.metadata.name.as_deref() == Some(&m.name))
        })
        .expect("a volume claim is mounted");
    let map: ConfigMap = one(&docs, "ConfigMap", "nats-config").typed();
    let conf = map.data.unwrap().remove("nats.conf").unwrap();
    assert!(
        conf.contains(&format!("store_dir: \"{}\"", data.mount_path)),
        "{conf}"
    );
    assert!(conf.contains("sync_interval: always"), "{conf}");
    assert!(container
        .args
        .as_ref()
        .unwrap()
        .iter()
        .any(|a| a.starts_with("/etc/nats/")));
}
