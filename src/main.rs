//! The `sluicegate` binary: parse the command line, load the config, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use sluicegate::config::{parse_duration, Config};
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
        Check a config file:    sluicegate check-config config/demo.toml",
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
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
    match runtime.block_on(sluicegate::run(config, shutdown_signal())) {
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
