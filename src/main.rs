//! The `moongate` command: `run` serves, `check` validates.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use moongate::config::{self, NodeConfig};
use moongate::proxy;
use moongate::reload::{self, Reloader};
use moongate::snapshot::Gateway;

const DEFAULT_CONFIG: &str = "conf/config.yaml";

/// mimalloc instead of glibc's malloc: a proxied request makes dozens of small, short-lived
/// allocations, and glibc's malloc/free were about a tenth of a worker's CPU (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "moongate",
    version,
    about = "An API gateway with APISIX's plugin API"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the given config.
    Run {
        /// Config file (YAML or JSON).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config (and the plugins it uses) and exit: 0 when it is good, 1 with one
    /// line per problem otherwise.
    Check {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run {
        config: PathBuf::from(DEFAULT_CONFIG),
    }) {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    init_logging(None);
    match reload::build_from_file(path, 1) {
        Ok(snap) => {
            println!(
                "{}: ok ({} routes, {} plugins available)",
                path.display(),
                snap.routes.len(),
                snap.registry.names().count()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: Option<&str>) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(level.unwrap_or("info")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn run(path: &std::path::Path) -> ExitCode {
    let doc = match config::load_file(path) {
        Ok(d) => d,
        Err(errors) => {
            init_logging(None);
            for e in &errors.0 {
                eprintln!("{}: {e}", path.display());
            }
            return ExitCode::FAILURE;
        }
    };
    init_logging(doc.node.log_level.as_deref());
    let node: Arc<NodeConfig> = Arc::new(doc.node.clone());
    let snap = match reload::build_from_document(doc, 1) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("{}: {e}", path.display());
            }
            return ExitCode::FAILURE;
        }
    };
    let routes = snap.routes.len();
    let gw = Arc::new(Gateway::new(snap));
    let reloader = Arc::new(Reloader::new(
        gw.clone(),
        path.to_path_buf(),
        (*node).clone(),
    ));
    if let Err(e) = reload::watch_files(reloader.clone()) {
        tracing::warn!("file watching is off, changes need a restart: {e}");
    }
    let workers = node.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let workers = workers.max(1);
    let (listeners, bound) = match proxy::bind_all(&node.listen.0, workers) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("moongate-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the control runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // etcd: a full read and the first build with it, then the watch; before the workers
    // start, like the embedded store below.
    let etcd_store: Option<Arc<dyn moongate::store::ResourceStore>> = match node.config_provider {
        config::ConfigProvider::Etcd => {
            match moongate::store::etcd::start(&node, reloader.clone(), rt.handle()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        config::ConfigProvider::Embedded => None,
    };
    // Before the workers start, so the stored resources serve from the first request on.
    let _admin = match &node.admin {
        Some(conf) => {
            match moongate::admin::start(conf, &node, reloader.clone(), rt.handle(), etcd_store) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let handles = match proxy::start_workers(node.clone(), gw.clone(), listeners, shutdown_rx) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot start workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    for addr in &bound {
        tracing::info!("listening on http://{addr}");
    }
    tracing::info!(
        workers,
        routes,
        generation = gw.load().generation,
        "moongate {} serving {}",
        env!("CARGO_PKG_VERSION"),
        path.display()
    );
    rt.block_on(async {
        wait_for_signal().await;
        tracing::info!(
            "shutting down: no new connections; in-flight requests get up to {}s",
            node.proxy.graceful_shutdown_timeout
        );
        let _ = shutdown_tx.send(true);
    });
    for h in handles {
        let _ = h.join();
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
