//! The `sluicegate` binary: parse the command line, load the config, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use sluicegate::config::{parse_duration, Config};
use sluicegate::simulate::{self, Shape, ShapeParams};
use tracing_subscriber::EnvFilter;

/// mimalloc: measurably cheaper than glibc malloc for the many small per-request allocations
/// (see loadtests/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration error (EX_USAGE... EX_DATAERR is 65; 64 is what we document).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "sluicegate",
    version,
    about = "An HTTP gateway for serverless functions",
    long_about = "An HTTP gateway for serverless functions.\n\n\
        Routes /function/NAME/... to a replica of NAME, counts requests in sliding windows, holds \
        requests while it scales an idle function up from zero, sheds load beyond \
        max_ongoing_requests per replica and max_queued_requests per function with 503 + \
        Retry-After, exports Prometheus metrics on /metrics, and runs a built-in autoscaler.\n\n\
        Run the bundled demo:   sluicegate --config config/demo.toml\n\
        Check a config file:    sluicegate check-config config/demo.toml\n\
        Try a config offline:   sluicegate simulate --config config/demo.toml --shape spike",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Config file (TOML). Also SLUICEGATE_CONFIG.
    #[arg(long, short, env = "SLUICEGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log format.
    #[arg(
        long,
        value_enum,
        env = "SLUICEGATE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Run {
        /// Config file (TOML). Also SLUICEGATE_CONFIG.
        #[arg(long, short, env = "SLUICEGATE_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective per-function settings.
    CheckConfig {
        /// Config file (TOML).
        file: PathBuf,
    },
    /// Serve the bundled demo function on $PORT (what config/demo.toml runs).
    DemoFunction {
        /// Address to listen on; default 127.0.0.1:$PORT.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Wait this long before listening (e.g. "500ms"), like a runtime warming up.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        startup_delay: std::time::Duration,
        /// Add up to this much more startup time, spread by process id.
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        startup_jitter: std::time::Duration,
        /// A label that only shows in the process list (tests use it to count replicas).
        #[arg(long)]
        tag: Option<String>,
        /// Print MESSAGE to stderr and exit 1 at once (a function that cannot start).
        #[arg(long, value_name = "MESSAGE")]
        fail_start: Option<String>,
        /// Listen but never report ready.
        #[arg(long)]
        never_ready: bool,
    },
    /// Replay a request trace through the autoscaler on virtual time and report, per function,
    /// replica-seconds, requests held and shed, and peak replicas (see docs/simulate.md).
    Simulate(SimulateArgs),
}

/// `sluicegate simulate`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true).args(["trace", "minute_trace", "shape"])))]
struct SimulateArgs {
    /// Config file (TOML) whose functions to simulate.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// CSV trace with header `time,duration[,function]` (seconds as decimals).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Per-minute invocation counts (Azure Functions 2019 format): a `function` (or
    /// `HashFunction`) column, minute columns `1`, `2`, …, optionally `duration` (seconds). With a
    /// one-function config every row is simulated with that function's settings.
    #[arg(long, value_name = "FILE")]
    minute_trace: Option<PathBuf>,
    /// Run the input through several configurations and print their totals side by side: preset
    /// names (keda-http, knative-kpa, openfaas-ce-idler, ray-serve, fixed-1m, fixed-5m,
    /// fixed-10m, fixed-20m, adaptive, or `all`) and config files, comma-separated. --svg then
    /// draws cold starts against replica-hours.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    compare: Vec<String>,
    /// A built-in load shape instead of a trace: steady, spike, onoff or diurnal.
    #[arg(long, value_name = "SHAPE")]
    shape: Option<Shape>,
    /// Shape: length of the run [default: 1h].
    #[arg(long, value_parser = parse_duration, conflicts_with = "trace")]
    duration: Option<Duration>,
    /// Shape: base arrival rate, requests per second (the mean, for diurnal) [default: 10].
    #[arg(long, conflicts_with = "trace")]
    rps: Option<f64>,
    /// Shape: mean service time; each request's is uniform in ±50% of it [default: 200ms].
    /// Minute trace: the service time of rows without a `duration` [default: 1s].
    #[arg(long, value_parser = parse_duration, conflicts_with = "trace")]
    service_time: Option<Duration>,
    /// Shape onoff: one busy+idle cycle, busy first [default: a third of --duration].
    #[arg(long, value_parser = parse_duration, conflicts_with = "trace")]
    period: Option<Duration>,
    /// Shape: seed of the random arrivals and service times; minute trace: of the spread of each
    /// minute's arrivals [default: 1].
    #[arg(long, conflicts_with = "trace")]
    seed: Option<u64>,
    /// Time from asking for a replica to its being ready.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    cold_start: Duration,
    /// Cores a request keeps busy while it is served, for functions in the `cpu` autoscaler
    /// mode (1: CPU-bound; 0.1: mostly waiting on I/O).
    #[arg(long, value_name = "CORES", default_value_t = simulate::DEFAULT_REQUEST_CPU)]
    request_cpu: f64,
    /// Print the per-function figures as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw load and replicas over time into this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SLUICEGATE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("sluicegate: invalid configuration: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Installs the SIGTERM and SIGINT handlers now (before the listener is bound: a signal that
/// arrived between bind and installation would kill the process without a drain) and returns
/// the future that completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = match cli.command {
        Some(Command::CheckConfig { file }) => {
            return match load(&file) {
                Ok(config) => {
                    print!("{}", config.describe());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            };
        }
        Some(Command::DemoFunction {
            listen,
            startup_delay,
            startup_jitter,
            tag: _,
            fail_start,
            never_ready,
        }) => {
            let options = sluicegate::demo::DemoOptions {
                startup_delay,
                startup_jitter,
                fail_start,
                never_ready,
            };
            return match demo(listen, options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo-function: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Simulate(args)) => {
            let config = match load(&args.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            return match simulate_command(&config, &args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluicegate simulate: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Run { config }) => config,
        None => match cli.config {
            Some(path) => path,
            None => {
                eprintln!(
                    "sluicegate: no config file: pass --config FILE (or set SLUICEGATE_CONFIG); \
                     try `sluicegate --config config/demo.toml`, or --help"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let config = match load(&config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(cli.log_format);
    let threads = match config.gateway.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    tracing::debug!(threads, "runtime");
    let served = runtime.block_on(async {
        // Installed before the listener is bound, as the shutdown signals are: a SIGHUP must
        // never kill the gateway (its default action).
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("SIGHUP handler");
        sluicegate::run_with_reload(config, shutdown_signal(), hangups).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sluicegate failed");
            eprintln!("sluicegate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(listen: Option<SocketAddr>, options: sluicegate::demo::DemoOptions) -> anyhow::Result<()> {
    let addr = match listen {
        Some(a) => a,
        None => {
            let port: u16 = std::env::var("PORT")
                .context("PORT is not set (the process provider sets it; or pass --listen)")?
                .parse()
                .context("PORT is not a port number")?;
            SocketAddr::from(([127, 0, 0, 1], port))
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(sluicegate::demo::serve(addr, options))?;
    Ok(())
}

/// `simulate --compare`: the same trace through each configuration, totalled.
fn compare(
    config: &Config,
    args: &SimulateArgs,
    trace: &simulate::Trace,
    source: &str,
    options: &simulate::Options,
) -> anyhow::Result<()> {
    use simulate::compare::{preset, Totals, PRESETS};
    let mut configs: Vec<(String, Config)> = Vec::new();
    for item in &args.compare {
        let item = item.trim();
        if item == "all" {
            configs.extend(PRESETS.iter().map(|p| (p.name.to_owned(), p.apply(config))));
        } else if let Some(p) = preset(item) {
            configs.push((p.name.to_owned(), p.apply(config)));
        } else if std::path::Path::new(item).is_file() {
            let other = Config::load(std::path::Path::new(item))
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            configs.push((item.to_owned(), other));
        } else {
            anyhow::bail!(
                "--compare: `{item}` is neither a preset ({}, all) nor a config file",
                PRESETS.map(|p| p.name).join(", ")
            );
        }
    }
    let started = tokio::time::Instant::now();
    let mut rows = Vec::new();
    for (name, config) in &configs {
        let t = tokio::time::Instant::now();
        let report = simulate::run(config, trace, options);
        rows.push(Totals::of(name, &report));
        eprintln!("{name}: simulated in {:.2}s", t.elapsed().as_secs_f64());
    }
    eprintln!("all: {:.2}s", started.elapsed().as_secs_f64());
    let run = format!(
        "{source}; cold start {}s",
        simulate::trace::format_seconds(options.cold_start)
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{}: {run}", config.path.display());
        print!("{}", simulate::compare::table(&rows));
    }
    if let Some(path) = &args.svg {
        let title = format!("{}\n{run}", config.path.display());
        std::fs::write(path, simulate::compare::svg(&rows, &title))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn simulate_command(config: &Config, args: &SimulateArgs) -> anyhow::Result<()> {
    let names: Vec<&str> = config.functions.keys().map(String::as_str).collect();
    anyhow::ensure!(
        !names.is_empty(),
        "{} configures no function",
        config.path.display()
    );
    let (trace, source) = match (&args.trace, args.shape) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let trace = simulate::trace::parse_csv(&text, &names)
                .with_context(|| path.display().to_string())?;
            (trace, format!("trace {}", path.display()))
        }
        (None, _) if args.minute_trace.is_some() => {
            let path = args.minute_trace.as_ref().expect("checked");
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let options = simulate::MinuteOptions {
                seed: args.seed.unwrap_or(simulate::trace::DEFAULT_SEED),
                service_time: args.service_time.unwrap_or(Duration::from_secs(1)),
            };
            let trace = simulate::trace::parse_minutes(&text, &names, &options)
                .with_context(|| path.display().to_string())?;
            let count: usize = trace.requests.values().map(Vec::len).sum();
            let source = format!(
                "minute trace {}: {} functions, {count} requests, seed {}",
                path.display(),
                trace.requests.len(),
                options.seed
            );
            (trace, source)
        }
        (None, Some(shape)) => {
            let mut params = ShapeParams::new(shape);
            params.duration = args.duration.unwrap_or(params.duration);
            params.rps = args.rps.unwrap_or(params.rps);
            params.service_time = args.service_time.unwrap_or(params.service_time);
            params.period = args.period;
            params.seed = args.seed.unwrap_or(params.seed);
            anyhow::ensure!(
                params.rps.is_finite() && params.rps >= 0.0,
                "--rps must be a non-negative number"
            );
            anyhow::ensure!(
                shape != Shape::OnOff || !params.period().is_zero(),
                "--period must be greater than zero"
            );
            let trace = simulate::trace::shape_trace(&params, &names);
            (trace, params.describe())
        }
        (None, None) => unreachable!("clap requires --trace, --minute-trace or --shape"),
    };
    anyhow::ensure!(
        args.request_cpu.is_finite() && args.request_cpu >= 0.0,
        "--request-cpu must be a non-negative number"
    );
    let options = simulate::Options {
        cold_start: args.cold_start,
        request_cpu: args.request_cpu,
    };
    if !args.compare.is_empty() {
        return compare(config, args, &trace, &source, &options);
    }
    let report = simulate::run(config, &trace, &options);
    let run = format!(
        "{source}; cold start {}s",
        simulate::trace::format_seconds(options.cold_start)
    );
    if args.json {
        println!("{}", report.json());
    } else {
        println!("{}: {run}", config.path.display());
        print!("{}", report.table());
    }
    if let Some(path) = &args.svg {
        let title = format!("{}\n{run}", config.path.display());
        std::fs::write(path, simulate::svg::render(&report, &title))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
