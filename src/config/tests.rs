//! Unit tests of the config: parsing, defaults, `[defaults]` merging, messages, `check-config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("config/test.toml"), text, None)
}

#[test]
fn durations_accept_seconds_and_strings() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
    assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
    assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
    assert!(parse_duration("10 parsecs").is_err());
    assert!(parse_duration("fast").is_err());
}

#[test]
fn the_design_example_parses_with_defaults_applied() {
    let cfg = parse(
        r#"
        [gateway]
        listen = "127.0.0.1:8080"
        cold_start_timeout = "30s"
        max_body_bytes = 10485760

        [defaults]
        max_ongoing_requests = 5
        max_queued_requests = 100
        timeout = "60s"

        [functions.echo]
        provider = "process"
        command = ["python3", "fn/echo.py"]
        readiness_path = "/healthz"
        max_ongoing_requests = 2
        max_queued_requests = 2

        [functions.echo.autoscaler]
        type = "rps"
        min_replicas = 0
        max_replicas = 5
        threshold = 100
        rate_seconds = 30
        polling_interval = 10
        cooldown_period = 300

        [functions.legacy]
        provider = "static"
        upstreams = ["http://127.0.0.1:9000"]
        "#,
    )
    .unwrap();
    let echo = &cfg.functions["echo"];
    assert_eq!(echo.max_ongoing_requests, 2);
    assert_eq!(echo.max_queued_requests, Some(2));
    assert_eq!(echo.timeout, Duration::from_secs(60));
    assert_eq!(echo.cold_start_timeout, Duration::from_secs(30));
    assert_eq!(echo.autoscaler.min_replicas, 0);
    assert_eq!(echo.autoscaler.polling_interval, Duration::from_secs(10));
    assert_eq!(echo.autoscaler.mode, ScaleMode::Rps { threshold: 100.0 });
    match &echo.provider {
        ProviderConfig::Process(p) => {
            assert_eq!(p.working_dir, PathBuf::from("config"));
            assert_eq!(p.readiness_path, "/healthz");
        }
        other => panic!("unexpected provider {other:?}"),
    }
    let legacy = &cfg.functions["legacy"];
    assert_eq!(legacy.max_ongoing_requests, 5, "[defaults] applies");
    assert_eq!(legacy.autoscaler.mode, ScaleMode::None);
    assert_eq!(
        legacy.response_idle_timeout,
        Some(DEFAULT_RESPONSE_IDLE_TIMEOUT)
    );
}

#[test]
fn response_idle_timeout_zero_means_never() {
    let cfg = parse(
        "[defaults]\nresponse_idle_timeout = \"2s\"\n[functions.a]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:1\"]\n[functions.b]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:1\"]\nresponse_idle_timeout = 0\n",
    )
    .unwrap();
    assert_eq!(
        cfg.functions["a"].response_idle_timeout,
        Some(Duration::from_secs(2))
    );
    assert_eq!(cfg.functions["b"].response_idle_timeout, None);
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let err = parse(
        "[functions.echo]\nprovider = \"static\"\nupstreams = [\"http://127.0.0.1:1\"]\nmax_ongoing_request = 3\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("config/test.toml"), "{err}");
    assert!(err.contains("max_ongoing_request"), "{err}");
}

#[test]
fn invalid_values_name_the_key_and_reason() {
    let err = parse(
        "[functions.echo]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.echo.autoscaler]\nmin_replicas = 3\nmax_replicas = 2\n",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "config/test.toml: functions.echo.autoscaler.max_replicas: 2 is less than min_replicas (3)"
    );
    let err = parse("[functions.Echo]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("functions.Echo"), "{err}");
    let err = parse("[functions.x]\nprovider = \"static\"\nupstreams = [\"https://a:1\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("functions.x.upstreams") && err.contains("https"),
        "{err}"
    );
    let err = parse(
        "[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\ntimeout = \"soon\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("timeout") && err.contains("soon"), "{err}");
    let err = parse("[functions.x]\ncommand = [\"a\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("functions.x.provider: missing"), "{err}");
}

#[test]
fn minus_one_means_unlimited_queue() {
    let cfg = parse("[defaults]\nmax_queued_requests = -1\n[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n").unwrap();
    assert_eq!(cfg.functions["x"].max_queued_requests, None);
    assert!(parse("[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\nmax_queued_requests = -2\n").is_err());
}

#[test]
fn env_token_overrides_file_token() {
    let cfg = Config::parse(
        Path::new("x.toml"),
        "[gateway]\nadmin_token = \"file\"\n",
        Some("env".into()),
    )
    .unwrap();
    assert_eq!(
        cfg.gateway.admin_token.as_ref().map(Secret::expose),
        Some("env")
    );
}

#[test]
fn the_admin_token_never_shows_in_check_config_or_debug_output() {
    let cfg =
        parse("[gateway]\nlisten = \"0.0.0.0:8080\"\nadmin_token = \"hunter2-token\"\n").unwrap();
    assert!(!cfg.describe().contains("hunter2"), "{}", cfg.describe());
    assert!(!format!("{cfg:?}").contains("hunter2"));
    assert!(!format!("{:?}", cfg.gateway).contains("hunter2"));
    assert!(cfg.describe().contains("admin = bearer token"));
}

#[test]
fn system_is_closed_without_a_token_on_a_listener_that_is_not_loopback() {
    let closed = parse("[gateway]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let reason = closed.gateway.admin_refusal().expect("refused");
    assert!(reason.contains("admin_token") && reason.contains("admin_open"));
    assert!(closed.describe().contains("admin = closed"));
    let open = parse("[gateway]\nlisten = \"0.0.0.0:8080\"\nadmin_open = true\n").unwrap();
    assert_eq!(open.gateway.admin_refusal(), None);
    let token = parse("[gateway]\nlisten = \"0.0.0.0:8080\"\nadmin_token = \"t\"\n").unwrap();
    assert_eq!(token.gateway.admin_refusal(), None);
    for loopback in ["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080"] {
        let cfg = parse(&format!("[gateway]\nlisten = \"{loopback}\"\n")).unwrap();
        assert_eq!(cfg.gateway.admin_refusal(), None, "{loopback}");
    }
}

#[test]
fn async_keys_have_defaults_merge_from_defaults_and_are_validated() {
    let cfg = parse(
        "[defaults]\nasync_max_attempts = 7\n[functions.x]\nprovider = \"process\"\ncommand = [\"x\"]\nmax_ongoing_requests = 3\n[functions.x.autoscaler]\nmax_replicas = 4\n",
    )
    .unwrap();
    let x = &cfg.functions["x"];
    assert_eq!(x.async_max_backlog, DEFAULT_ASYNC_MAX_BACKLOG);
    assert_eq!(
        x.async_concurrency, 12,
        "max_ongoing_requests x max_replicas"
    );
    assert_eq!(x.async_max_attempts, 7, "[defaults] applies");
    assert_eq!(x.async_initial_retry_wait, Duration::from_secs(1));
    assert_eq!(x.async_max_retry_wait, Duration::from_secs(60));
    assert_eq!(x.async_max_body_bytes(), DEFAULT_MAX_BODY_BYTES);
    assert_eq!(
        cfg.gateway.async_store,
        AsyncStoreLocation::File(PathBuf::from("config/test.async.redb"))
    );

    let f = "[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n";
    let err = parse(&format!("{f}async_max_backlog = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("functions.x.async_max_backlog: 0 is outside"),
        "{err}"
    );
    let err = parse(&format!("{f}async_concurrency = -1\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("functions.x.async_concurrency"), "{err}");
    let err = parse(&format!(
        "{f}async_initial_retry_wait = \"10s\"\nasync_max_retry_wait = \"1s\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("async_max_retry_wait: 1s is shorter"), "{err}");
    let cfg = parse(&format!(
        "[gateway]\nasync_store = \"state/q.redb\"\n{f}max_body_bytes = 0\n"
    ))
    .unwrap();
    assert_eq!(
        cfg.gateway.async_store,
        AsyncStoreLocation::File(PathBuf::from("config/state/q.redb"))
    );
    assert_eq!(
        cfg.functions["x"].async_max_body_bytes(),
        ASYNC_BODY_CEILING
    );
    assert!(parse("[gateway]\nasync_store = \"\"\n").is_err());
}

#[test]
fn a_nats_url_selects_the_jetstream_store() {
    let cfg =
        parse("[gateway]\nasync_store = \"nats://127.0.0.1:4222\"\nasync_ack_wait = \"10s\"\n")
            .unwrap();
    assert_eq!(
        cfg.gateway.async_store,
        AsyncStoreLocation::Nats("nats://127.0.0.1:4222".into())
    );
    assert_eq!(cfg.gateway.async_store.file(), None);
    assert_eq!(cfg.gateway.async_ack_wait, Duration::from_secs(10));
    let default = parse("").unwrap();
    assert_eq!(default.gateway.async_ack_wait, DEFAULT_ASYNC_ACK_WAIT);
    let err = parse("[gateway]\nasync_store = \"nats://\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("gateway.async_store"), "{err}");
    let err = parse("[gateway]\nasync_ack_wait = 0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("gateway.async_ack_wait"), "{err}");
}

#[test]
fn queue_mode_is_accepted_with_its_queue_length() {
    let cfg = parse(
        "[functions.x]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.x.autoscaler]\ntype = \"queue\"\nqueue_length = 4\n",
    )
    .unwrap();
    assert_eq!(
        cfg.functions["x"].autoscaler.mode,
        ScaleMode::Queue { queue_length: 4.0 }
    );
    assert!(cfg.describe().contains("type = queue, queue_length = 4"));
}

#[test]
fn function_names_follow_dns_labels() {
    assert!(is_valid_function_name("echo"));
    assert!(is_valid_function_name("a-1"));
    assert!(!is_valid_function_name("-a"));
    assert!(!is_valid_function_name("a-"));
    assert!(!is_valid_function_name("A"));
    assert!(!is_valid_function_name(""));
    assert!(!is_valid_function_name(&"a".repeat(64)));
}

#[test]
fn check_config_prints_every_effective_setting() {
    let cfg = parse(
        r#"
        [gateway]
        admin_token = "t"
        worker_threads = 2
        max_body_bytes = 0

        [functions.echo]
        provider = "process"
        command = ["python3", "fn/echo.py"]
        env = { GREETING = "hi" }
        max_queued_requests = -1
        response_idle_timeout = 0

        [functions.echo.autoscaler]
        type = "concurrency"
        min_replicas = 0

        [functions.legacy]
        provider = "static"
        upstreams = ["http://127.0.0.1:9000"]
        "#,
    )
    .unwrap();
    let expected = r#"config/test.toml: ok
[gateway] listen = 127.0.0.1:8080, worker_threads = 2, header_read_timeout = 10s, max_header_bytes = 65536, idle_timeout = 75s, drain_timeout = 30s, admin_token = set, admin = bearer token, async_store = config/test.async.redb, async_record_retention = 86400s
[gateway] callback_allow = (any but link-local, metadata, the gateway), callback_ports = (any), callback_allow_loopback = true

[functions.echo]
  provider             = process
  command              = ["python3", "fn/echo.py"]
  working_dir          = config
  env                  = {"GREETING": "hi"}
  readiness_path       = /
  startup_timeout      = 30s
  termination_grace    = 10s
  max_ongoing_requests = 5 per replica
  max_queued_requests  = unlimited
  timeout              = 60s
  response_idle_timeout = none
  cold_start_timeout   = 30s
  queue_timeout        = 30s
  slow_start           = 2s
  max_body_bytes       = unlimited
  async                = max_backlog = 10000, concurrency = 25, max_attempts = 5, retry wait 1s doubling to 60s, max body 67108864 bytes
  when_paused          = refuse
  auth                 = none
  autoscaler           = type = concurrency, target_ongoing_requests = 2, replicas 0..=5, rate_seconds = 30s, polling_interval = 1s, cooldown_period = 300s

[functions.legacy]
  provider             = static
  upstreams            = ["http://127.0.0.1:9000"]
  max_ongoing_requests = 5 per replica
  max_queued_requests  = 100
  timeout              = 60s
  response_idle_timeout = 300s
  cold_start_timeout   = 30s
  queue_timeout        = 30s
  slow_start           = 2s
  max_body_bytes       = unlimited
  async                = max_backlog = 10000, concurrency = 5, max_attempts = 5, retry wait 1s doubling to 60s, max body 67108864 bytes
  when_paused          = refuse
  auth                 = none
  autoscaler           = type = none, replicas 1..=1, rate_seconds = 30s, polling_interval = 1s, cooldown_period = 300s
"#;
    assert_eq!(cfg.describe(), expected);
}

#[test]
fn an_unknown_key_is_reported_at_its_line_with_the_keys_in_file_order() {
    let err =
        parse("[functions.x]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\ntimeot = 3\n")
            .unwrap_err()
            .to_string();
    assert!(
        err.starts_with("config/test.toml: TOML parse error at line 4, column 1\n"),
        "{err}"
    );
    assert!(
        err.ends_with(
            "unknown field `timeot`, expected one of `provider`, `command`, `env`, `env_from_file`, \
             `env_from_env`, `working_dir`, \
             `readiness_path`, `startup_timeout`, `termination_grace`, `upstreams`, `deployment`, \
             `service`, `namespace`, `port`, `max_ongoing_requests`, `max_queued_requests`, `timeout`, `response_idle_timeout`, \
             `cold_start_timeout`, `queue_timeout`, `slow_start`, `max_body_bytes`, `async_max_backlog`, \
             `async_concurrency`, `async_max_attempts`, `async_initial_retry_wait`, \
             `async_max_retry_wait`, `when_paused`, `auth`, `token_query_param`, `autoscaler`"
        ),
        "{err}"
    );
    let err = parse("[functions.x]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.x.autoscaler]\nkind = \"rps\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 5, column 1"), "{err}");
    assert!(
        err.contains("unknown field `kind`, expected one of `type`, `min_replicas`"),
        "{err}"
    );
    let err = parse("[gateway]\nlisten = 8080\n").unwrap_err().to_string();
    assert!(
        err.ends_with("line 2, column 10\n  |\n2 | listen = 8080\n  |          ^^^^\ninvalid type: integer `8080`, expected a string"),
        "{err}"
    );
}

#[test]
fn gateway_defaults_under_defaults_under_the_function_key_by_key() {
    let cfg = parse(
        r#"
        [gateway]
        cold_start_timeout = "7s"
        queue_timeout = "8s"

        [defaults]
        queue_timeout = "9s"
        env = { A = "defaults", B = "defaults" }

        [defaults.autoscaler]
        min_replicas = 2
        threshold = 7

        [functions.x]
        provider = "process"
        command = ["x"]
        env = { B = "x" }

        [functions.x.autoscaler]
        max_replicas = 9
        "#,
    )
    .unwrap();
    let x = &cfg.functions["x"];
    assert_eq!(x.cold_start_timeout, Duration::from_secs(7));
    assert_eq!(x.queue_timeout, Duration::from_secs(9));
    match &x.provider {
        ProviderConfig::Process(p) => {
            assert_eq!(p.env["A"], "defaults");
            assert_eq!(p.env["B"], "x");
            assert_eq!(p.startup_timeout, Duration::from_secs(7));
        }
        other => panic!("unexpected provider {other:?}"),
    }
    assert_eq!(x.autoscaler.min_replicas, 2);
    assert_eq!(x.autoscaler.max_replicas, 9);
    assert_eq!(x.autoscaler.mode, ScaleMode::Rps { threshold: 7.0 });
}

#[test]
fn provider_kinds_say_whether_they_scale_and_how_many_replicas_start() {
    let cfg = parse(
        "[functions.p]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.p.autoscaler]\nmin_replicas = 2\n\
         [functions.s]\nprovider = \"static\"\nupstreams = [\"http://a:1\", \"http://b:1\", \"http://c:1\"]\n",
    )
    .unwrap();
    let (p, s) = (&cfg.functions["p"], &cfg.functions["s"]);
    assert!(p.provider.scalable());
    assert_eq!(p.provider.initial_replicas(&p.autoscaler), 2);
    assert!(!s.provider.scalable());
    assert_eq!(s.provider.initial_replicas(&s.autoscaler), 3);
    assert_eq!(s.autoscaler.mode, ScaleMode::None);
    assert_eq!(
        (s.autoscaler.min_replicas, s.autoscaler.max_replicas),
        (3, 3)
    );
}

#[test]
fn a_kubernetes_function_defaults_its_objects_to_its_name_and_refuses_other_providers_keys() {
    let cfg = parse(
        "[functions.resize]\nprovider = \"kubernetes\"\n[functions.thumb]\nprovider = \"kubernetes\"\ndeployment = \"thumb-v2\"\nservice = \"thumb-svc\"\nnamespace = \"fns\"\nport = \"http\"\n",
    )
    .unwrap();
    let ProviderConfig::Kubernetes(k) = &cfg.functions["resize"].provider else {
        panic!("kubernetes provider");
    };
    assert_eq!(
        (k.deployment.as_str(), k.service.as_str()),
        ("resize", "resize")
    );
    assert_eq!((k.namespace.as_deref(), k.port.as_deref()), (None, None));
    assert!(cfg.functions["resize"].provider.scalable());
    let ProviderConfig::Kubernetes(k) = &cfg.functions["thumb"].provider else {
        panic!("kubernetes provider");
    };
    assert_eq!(k.deployment, "thumb-v2");
    assert_eq!(k.service, "thumb-svc");
    assert_eq!(k.namespace.as_deref(), Some("fns"));
    assert_eq!(k.port.as_deref(), Some("http"));

    let err = parse("[functions.f]\nprovider = \"kubernetes\"\ncommand = [\"x\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("functions.f.command"), "{err}");
    assert!(
        err.contains("only provider \"process\" takes command"),
        "{err}"
    );
    let err = parse("[functions.f]\nprovider = \"kubernetes\"\ndeployment = \"Bad_Name\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("functions.f.deployment"), "{err}");
    assert!(err.contains("not a Kubernetes object name"), "{err}");
}

#[test]
fn discovered_functions_read_annotations_over_defaults_and_name_a_bad_key() {
    let cfg = parse(
        "[gateway]\nkubernetes_discovery = true\n[defaults]\nmax_ongoing_requests = 7\ntimeout = \"20s\"\n",
    )
    .unwrap();
    assert!(cfg.gateway.kubernetes_discovery);
    let annotations: BTreeMap<String, String> = [
        ("max_queued_requests", "50"),
        ("timeout", "45s"),
        ("autoscaler.type", "none"),
        ("service", "echo-svc"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let f = cfg
        .discovered("echo", "fns", "echo-v1", &annotations)
        .unwrap();
    assert_eq!(f.max_ongoing_requests, 7, "[defaults] apply");
    assert_eq!(f.max_queued_requests, Some(50));
    assert_eq!(f.timeout, Duration::from_secs(45));
    assert_eq!(f.autoscaler.mode, ScaleMode::None);
    let ProviderConfig::Kubernetes(k) = &f.provider else {
        panic!("kubernetes provider");
    };
    assert_eq!(k.deployment, "echo-v1");
    assert_eq!(k.service, "echo-svc");
    assert_eq!(k.namespace.as_deref(), Some("fns"));

    let bad = |key: &str, value: &str| {
        let one: BTreeMap<String, String> = [(key.to_owned(), value.to_owned())].into();
        cfg.discovered("echo", "fns", "echo-v1", &one)
            .unwrap_err()
            .to_string()
    };
    let err = bad("max_ongoing_requests", "lots");
    assert!(err.contains("deployment fns/echo-v1"), "{err}");
    assert!(err.contains("max_ongoing_requests"), "{err}");
    let err = bad("max_ongoing_request", "3");
    assert!(err.contains("unknown field `max_ongoing_request`"), "{err}");
    let err = bad("provider", "process");
    assert!(err.contains("set by discovery"), "{err}");
}

#[test]
fn a_duration_beyond_ten_years_is_an_error_not_a_panic() {
    // Found by the callback_url fuzz target: a huge number of seconds made
    // `Duration::from_secs_f64` panic; a huge whole number would overflow `Instant + timeout`.
    assert!(parse_duration(&"3".repeat(400)).is_err());
    assert!(parse_duration(&format!("{}h", "3".repeat(300)))
        .unwrap_err()
        .contains("longer than the longest duration accepted"));
    assert!(parse_duration("9999999999999999999999m")
        .unwrap_err()
        .contains("longer than the longest duration accepted"));
    assert!(parse_duration("87600h").is_ok(), "ten years is accepted");
    assert!(parse_duration("87601h").is_err());
    let err = parse("[functions.f]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\ntimeout = 18446744073709551615\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("ten years"), "{err}");
}

#[test]
fn async_record_retention_defaults_to_a_day_and_is_at_least_a_second() {
    let cfg = parse("").unwrap();
    assert_eq!(
        cfg.gateway.async_record_retention,
        DEFAULT_ASYNC_RECORD_RETENTION
    );
    let cfg = parse("[gateway]\nasync_record_retention = \"90m\"\n").unwrap();
    assert_eq!(
        cfg.gateway.async_record_retention,
        Duration::from_secs(5400)
    );
    let err = parse("[gateway]\nasync_record_retention = \"500ms\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gateway.async_record_retention: 500ms is less than one second"),
        "{err}"
    );
}

#[test]
fn cpu_mode_has_a_target_and_needs_process_replicas() {
    let cfg = parse(
        "[functions.f]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.f.autoscaler]\ntype = \"cpu\"\n",
    )
    .unwrap();
    assert_eq!(
        cfg.functions["f"].autoscaler.mode,
        ScaleMode::Cpu {
            target_cpu_percent: DEFAULT_TARGET_CPU_PERCENT
        }
    );
    assert!(cfg
        .describe()
        .contains("type = cpu, target_cpu_percent = 75"));
    let cfg = parse(
        "[functions.f]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.f.autoscaler]\ntype = \"cpu\"\ntarget_cpu_percent = 150\n",
    )
    .unwrap();
    assert_eq!(
        cfg.functions["f"].autoscaler.mode,
        ScaleMode::Cpu {
            target_cpu_percent: 150.0
        }
    );
    let err = parse(
        "[functions.f]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.f.autoscaler]\ntype = \"cpu\"\ntarget_cpu_percent = 0\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("functions.f.autoscaler.target_cpu_percent"),
        "{err}"
    );
    let err = parse(
        "[functions.k]\nprovider = \"kubernetes\"\n[functions.k.autoscaler]\ntype = \"cpu\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("needs provider = \"process\""), "{err}");
}

#[test]
fn cooldown_period_takes_a_duration_or_adaptive_with_its_bounds() {
    let f = |autoscaler: &str| {
        parse(&format!(
            "[functions.f]\nprovider = \"process\"\ncommand = [\"x\"]\n[functions.f.autoscaler]\nmin_replicas = 0\n{autoscaler}"
        ))
    };
    let fixed = f("cooldown_period = \"90s\"").unwrap();
    let a = &fixed.functions["f"].autoscaler;
    assert_eq!(
        (a.cooldown_period, a.adaptive),
        (Duration::from_secs(90), None)
    );
    let adaptive = f(
        "cooldown_period = \"adaptive\"\nadaptive_min_keep_alive = \"30s\"\nadaptive_max_keep_alive = \"2h\"",
    )
    .unwrap();
    let a = &adaptive.functions["f"].autoscaler;
    assert_eq!(a.cooldown_period, DEFAULT_COOLDOWN_PERIOD);
    assert_eq!(
        a.adaptive,
        Some(AdaptiveConfig {
            bin_width: Duration::from_secs(60),
            min_keep_alive: Some(Duration::from_secs(30)),
            max_keep_alive: Some(Duration::from_secs(7200)),
            cold_start_cost: Duration::from_secs(900),
        })
    );
    assert!(adaptive
        .describe()
        .contains("cooldown_period = adaptive (bin 60s, cold start worth 900s, keep-alive at least 30s, at most 7200s"));
    let err = |text: &str| f(text).unwrap_err().to_string();
    assert!(
        err("adaptive_max_keep_alive = \"1h\"")
            .contains("apply only with cooldown_period = \"adaptive\""),
        "{}",
        err("adaptive_max_keep_alive = \"1h\"")
    );
    assert!(err("cooldown_period = \"adaptive\"\nadaptive_min_keep_alive = \"2h\"\nadaptive_max_keep_alive = \"1h\"")
        .contains("is less than adaptive_min_keep_alive"));
    assert!(err("cooldown_period = \"often\"").contains("or \"adaptive\""));
    // Between non-zero counts the adaptive mode waits adaptive_scale_down_delay (300 s unless
    // set); with a fixed cooldown_period that key has no place.
    let quick = f("cooldown_period = \"adaptive\"\nadaptive_scale_down_delay = \"60s\"").unwrap();
    let a = &quick.functions["f"].autoscaler;
    assert_eq!(
        (a.cooldown_period, a.adaptive.is_some()),
        (Duration::from_secs(60), true)
    );
    assert!(quick
        .describe()
        .contains("; scale-downs above zero after 60s)"));
    assert!(
        err("cooldown_period = \"5m\"\nadaptive_scale_down_delay = \"60s\"")
            .contains("adaptive_scale_down_delay applies only with cooldown_period = \"adaptive\"")
    );
}

#[test]
fn secret_environment_is_read_at_load_and_shown_only_by_its_source() {
    let dir =
        std::env::temp_dir().join(format!("sluicegate-config-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("api_key");
    std::fs::write(&file, "s3cr3t-value\r\n").unwrap();
    let text = |key_file: &str| {
        format!(
            "[functions.fx]\nprovider = \"process\"\ncommand = [\"x\"]\n\
             env_from_file = {{ API_KEY = \"{key_file}\" }}\n\
             env_from_env = {{ PATH_COPY = \"PATH\" }}\n"
        )
    };
    let cfg = parse(&text(&file.display().to_string())).unwrap();
    let ProviderConfig::Process(p) = &cfg.functions["fx"].provider else {
        panic!("a process function");
    };
    let env: Vec<(&str, &str)> = p.environment().collect();
    let path = std::env::var("PATH").unwrap_or_default();
    assert_eq!(
        env,
        [("API_KEY", "s3cr3t-value"), ("PATH_COPY", path.as_str())]
    );
    let described = cfg.describe();
    assert!(
        described.contains(&format!(
            "{{\"API_KEY\": <secret from {}>}}",
            file.display()
        )),
        "{described}"
    );
    assert!(
        described.contains("{\"PATH_COPY\": <secret from $PATH>}"),
        "{described}"
    );
    assert!(!described.contains("s3cr3t"));
    assert!(!format!("{cfg:?}").contains("s3cr3t"), "Debug redacts too");

    // A changed file is a changed function (a reload replaces it).
    let before = cfg.functions["fx"].clone();
    std::fs::write(&file, "rotated").unwrap();
    let after = parse(&text(&file.display().to_string())).unwrap();
    assert_ne!(before, after.functions["fx"]);

    // A missing file: one line naming the function, the key and the path.
    let missing = dir.join("absent");
    let err = parse(&text(&missing.display().to_string()))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "config/test.toml: functions.fx.env_from_file: API_KEY: cannot read {}: ",
            missing.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    let err = parse(
        "[functions.fx]\nprovider = \"process\"\ncommand = [\"x\"]\n\
         env_from_env = { DB = \"SLUICEGATE_TEST_SURELY_UNSET_VARIABLE\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("functions.fx.env_from_env: DB: the gateway's environment variable SLUICEGATE_TEST_SURELY_UNSET_VARIABLE"),
        "{err}"
    );
    // Secrets are the process provider's; a key set twice is refused.
    let err = parse(
        "[functions.fx]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n\
         env_from_env = { DB = \"PATH\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("only provider \"process\" takes env_from_env"),
        "{err}"
    );
    let err = parse(
        "[functions.fx]\nprovider = \"process\"\ncommand = [\"x\"]\nenv = { DB = \"x\" }\n\
         env_from_env = { DB = \"PATH\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("DB is also set in env"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn pause_and_auth_keys_are_checked() {
    let base = "[functions.fx]\nprovider = \"static\"\nupstreams = [\"http://a:1\"]\n";
    let cfg = parse(&format!(
        "{base}when_paused = \"hold\"\nauth = \"token\"\ntoken_query_param = \"access_token\"\n"
    ))
    .unwrap();
    let f = &cfg.functions["fx"];
    assert_eq!(f.when_paused, WhenPaused::Hold);
    assert_eq!(f.auth, Auth::Token);
    assert_eq!(f.token_query_param.as_deref(), Some("access_token"));
    let defaults = &parse(base).unwrap().functions["fx"];
    assert_eq!(
        (defaults.when_paused, defaults.auth),
        (WhenPaused::Refuse, Auth::None)
    );
    for (bad, key) in [
        ("when_paused = \"wait\"", "when_paused"),
        ("auth = \"basic\"", "auth"),
        ("token_query_param = \"a b\"", "token_query_param"),
    ] {
        let err = parse(&format!("{base}{bad}\n")).unwrap_err().to_string();
        assert!(err.contains(&format!("functions.fx.{key}: ")), "{err}");
    }
}
