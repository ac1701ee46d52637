//! The `moongate` command: `run` serves, `check` validates, `test` runs plugin tests.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use moongate::config::{self, ConfigErrors, NodeConfig};
use moongate::proxy;
use moongate::reload::{self, Reloader};
use moongate::snapshot::Gateway;
use moongate::startup;
use moongate::supervisor;

const DEFAULT_CONFIG: &str = "conf/config.yaml";

/// mimalloc instead of glibc's malloc: a proxied request makes dozens of small, short-lived
/// allocations, and glibc's malloc/free were about a tenth of a worker's CPU (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's own API (libmimalloc-sys links it; its `extended` feature would declare the same).
extern "C" {
    fn mi_collect(force: bool);
}

/// Has mimalloc return the memory this thread's heap holds free to the OS now, empty pages it
/// would keep for reuse included (it returns memory only when called, and a worker whose
/// connections are all parked does not call it).
fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) }
}

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
        /// Serve in this process, without the supervisor that restarts a crashed serving
        /// process on the same sockets (for debuggers and process managers that want one pid).
        #[arg(long)]
        single_process: bool,
    },
    /// Validate a config (and the plugins it uses) and exit: 0 when it is good, 1 with one
    /// line per problem otherwise.
    Check {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run plugin test files (`*.test.yaml`) against the gateway in this process: one line
    /// per case, `N passed, M failed`, exit 1 on a failure (docs/plugin-guide.md).
    Test {
        /// Test files, or folders holding them (default: tests/ and plugins/tests/).
        paths: Vec<PathBuf>,
        /// Also write the results as JUnit XML to this file.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Re-run the affected test files whenever a plugin or test file is saved.
        #[arg(long)]
        watch: bool,
    },
    /// Work with plugin files.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Copy APISIX's plugin files (and the apisix/plugins and apisix/utils modules they
    /// require) from an APISIX release or checkout into a plugin folder, and say what each
    /// one needs that neither moongate nor the checkout provides.
    Import {
        /// The APISIX tree (the folder that holds apisix/plugins).
        apisix: PathBuf,
        /// Plugins to import (default: all of them).
        names: Vec<String>,
        /// The plugin folder to write into (one of the config's plugin_dirs).
        #[arg(long, default_value = "plugins")]
        to: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run {
        config: PathBuf::from(DEFAULT_CONFIG),
        single_process: false,
    }) {
        Command::Check { config } => check(&config),
        Command::Test {
            paths,
            junit,
            watch,
        } => moongate::testrunner::main(moongate::testrunner::Options {
            paths,
            junit,
            watch,
        }),
        Command::Plugins {
            command: PluginsCommand::Import { apisix, names, to },
        } => import_plugins(&apisix, &names, &to),
        Command::Run {
            config,
            single_process,
        } => {
            // Before any thread starts: this reads (and clears) the supervisor's variables.
            let inherited = match supervisor::Inherited::take() {
                Ok(i) => i,
                Err(e) => {
                    init_logging(None);
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            if inherited.supervised() || single_process {
                serve(&config, inherited)
            } else {
                supervise(&config)
            }
        }
    }
}

/// The number of workers a node config asks for (default: one per core).
fn worker_count(node: &NodeConfig) -> usize {
    node.workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1)
}

/// `moongate run`: binds every listener, then keeps a serving process running on them
/// (`src/supervisor/`).
fn supervise(path: &std::path::Path) -> ExitCode {
    let partial = match startup::read(path) {
        Ok(p) => p,
        Err(errors) => return refuse(&errors),
    };
    if !init_logging(Some(&partial.doc.node)) {
        return ExitCode::FAILURE;
    }
    if !partial.errors.is_empty() || !startup::node_problems(&partial.doc.node).is_empty() {
        // Before anything binds: the same full report the serving process (and `check`)
        // would give.
        return match startup::build(partial) {
            Ok(_) => ExitCode::FAILURE,
            Err(errors) => refuse(&errors),
        };
    }
    let node = &partial.doc.node;
    let mut listeners = supervisor::ListenerSet::new();
    let workers = worker_count(node);
    let admin = node.admin.iter().flat_map(|a| a.listen.0.iter());
    let wanted = proxy::listener_specs(node)
        .into_iter()
        .map(|l| (l.role, l.addr, supervisor::Sharing::PerWorker(workers)))
        .chain(admin.map(|a| (moongate::admin::ROLE, *a, supervisor::Sharing::Single)));
    for (role, addr, sharing) in wanted {
        if let Err(e) = listeners.bind(role, addr, sharing) {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    supervisor::run(
        listeners,
        vec!["run".into(), "-c".into(), path.as_os_str().to_owned()],
    )
}

/// `moongate check`: the start-up of `run` up to the first snapshot ([`startup::prepare`]).
fn check(path: &std::path::Path) -> ExitCode {
    init_check_logging();
    match startup::prepare(path) {
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

/// `moongate run` refusing a config: the problems as `check` prints them, one per line, on
/// stderr.
fn refuse(errors: &ConfigErrors) -> ExitCode {
    use std::io::Write;
    // One write per line: the serving process shares stderr with the supervisor, and
    // `eprintln!` of a multi-part Display writes each part on its own, so lines interleaved.
    let mut err = std::io::stderr().lock();
    for e in &errors.0 {
        let _ = err.write_all(format!("{e}\n").as_bytes());
    }
    ExitCode::FAILURE
}

/// `check`'s log: warnings only (unless `RUST_LOG` says otherwise), as plain `warning: ...`
/// lines beside its report.
fn init_check_logging() {
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    struct Plain;
    impl<S, N> FormatEvent<S, N> for Plain
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut w: Writer<'_>,
            event: &tracing::Event<'_>,
        ) -> std::fmt::Result {
            let level = match *event.metadata().level() {
                tracing::Level::ERROR => "error",
                tracing::Level::WARN => "warning",
                _ => "note",
            };
            write!(w, "{level}: ")?;
            ctx.field_format().format_fields(w.by_ref(), event)?;
            writeln!(w)
        }
    }
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new("warn"),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(Plain)
        .try_init();
}

/// The error log as the node's settings say (`src/errorlog/`); before a config is read, or
/// when its settings are bad (the start-up refuses them next), stderr at `info`. False, logged
/// on stderr, when the configured file cannot be opened.
fn init_logging(node: Option<&NodeConfig>) -> bool {
    let settings = node
        .and_then(|n| moongate::errorlog::Settings::from_node(n).ok())
        .unwrap_or_else(|| moongate::errorlog::Settings {
            destination: moongate::errorlog::Destination::Stderr,
            format: Default::default(),
            filter: node
                .and_then(|n| n.log_level.clone())
                .unwrap_or_else(|| "info".into()),
        });
    match moongate::errorlog::init(&settings) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("{e}");
            false
        }
    }
}

/// The serving process: workers, the control runtime, the Admin API, on the listeners the
/// supervisor handed over (or its own).
fn serve(path: &std::path::Path, mut inherited: supervisor::Inherited) -> ExitCode {
    let partial = match startup::read(path) {
        Ok(p) => p,
        Err(errors) => return refuse(&errors),
    };
    if !init_logging(Some(&partial.doc.node)) {
        return ExitCode::FAILURE;
    }
    proxy::set_allocator_release(release_free_memory);
    // Before the first build: its upstream nodes' names are looked up from here on.
    moongate::dns::start(moongate::dns::Settings::from_node(&partial.doc.node));
    let snap = match startup::build(partial) {
        Ok(s) => s,
        Err(errors) => return refuse(&errors),
    };
    let mut served = snap.doc.node.clone();
    // Checked by the start-up already (`startup::node_problems`).
    match moongate::accesslog::Mode::from_node(&served) {
        Ok(moongate::accesslog::Mode::Formatted(settings)) => {
            if let Err(e) = moongate::accesslog::start(settings) {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        }
        Ok(moongate::accesslog::Mode::Off) => served.access_log = false,
        _ => {}
    }
    let node: Arc<NodeConfig> = Arc::new(served);
    // The metrics settings were set by the start-up (`startup::build`).
    // Checked by the start-up already (`startup::node_problems`).
    let _ = moongate::otel::set_node_attr(node.plugin_attr.get("opentelemetry"));
    let routes = snap.routes.len();
    let snap_node = snap.doc.node.clone();
    let gw = Arc::new(Gateway::new(snap));
    let reloader = Arc::new(Reloader::new(gw.clone(), path.to_path_buf(), snap_node));
    if let Err(e) = reload::watch_files(reloader.clone()) {
        tracing::warn!("file watching is off, changes need a restart: {e}");
    }
    let (listeners, bound) = match proxy::bind_all(
        &mut inherited.listeners,
        &proxy::listener_specs(&node),
        worker_count(&node),
    ) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let workers = listeners.len();
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
    // Health checkers run on the control runtime (one per upstream with `checks`).
    moongate::health::registry().start(rt.handle().clone());
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
    // APISIX's status API. As the control API: an address in use is logged and leaves it off.
    moongate::status::init_workers(workers);
    if let Some(status) = &node.status {
        match inherited.listeners.take_or_bind(
            moongate::status::ROLE,
            status.addr(),
            supervisor::Sharing::Single,
        ) {
            Ok(l) => {
                if let Err(e) =
                    moongate::status::start(l, gw.clone(), etcd_store.clone(), rt.handle())
                {
                    tracing::error!("status API: {e}; it is off");
                }
            }
            Err(e) => tracing::error!("status API: {e}; it is off"),
        }
    }
    // Before the workers start, so the stored resources serve from the first request on.
    let _admin = match &node.admin {
        Some(conf) => {
            let mut admin_listeners = Vec::new();
            for addr in &conf.listen.0 {
                match inherited.listeners.take_or_bind(
                    moongate::admin::ROLE,
                    *addr,
                    supervisor::Sharing::Single,
                ) {
                    Ok(l) => admin_listeners.push(l),
                    Err(e) => {
                        tracing::error!("admin API: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            match moongate::admin::start(
                conf,
                &node,
                reloader.clone(),
                rt.handle(),
                etcd_store.clone(),
                admin_listeners,
            ) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    // APISIX's control API. An address in use is logged and leaves it off: it is an
    // operator's window, not worth refusing to serve traffic for.
    if node.enable_control {
        let addr = node.control.addr();
        match inherited.listeners.take_or_bind(
            moongate::control::ROLE,
            addr,
            supervisor::Sharing::Single,
        ) {
            Ok(l) => {
                if let Err(e) = moongate::control::start(l, gw.clone(), rt.handle()) {
                    tracing::error!("control API: {e}; it is off");
                }
            }
            Err(e) => tracing::error!("control API: {e}; it is off"),
        }
    }
    // Before anything says it serves: a SIGHUP or SIGTERM from then on (a `systemctl reload`
    // right after start) must find its handler, not end the process.
    let signals = {
        let _rt = rt.enter();
        Signals::install()
    };
    let mut metric_sources: Vec<Arc<dyn moongate::metrics::expose::Source>> = vec![
        Arc::new(moongate::metrics::sources::ConfigSource(reloader.clone())),
        Arc::new(moongate::accesslog::DroppedSource),
        Arc::new(moongate::metrics::runtime::RuntimeSource),
        Arc::new(moongate::metrics::sources::UpstreamStatusSource(gw.clone())),
    ];
    if let Some(store) = &etcd_store {
        metric_sources.push(Arc::new(moongate::metrics::sources::EtcdSource(
            store.clone(),
        )));
    }
    if let Err(e) = moongate::metrics::start_export(rt.handle(), metric_sources) {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let handles = match proxy::start_workers(node.clone(), gw.clone(), listeners, shutdown_rx) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot start workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (spec, addr) in &bound {
        let scheme = if spec.tls { "https" } else { "http" };
        tracing::info!("listening on {scheme}://{addr}");
    }
    for rest in std::mem::take(&mut inherited.listeners).into_rest() {
        tracing::warn!(
            "{} is no longer in the config file; it closes when moongate restarts",
            rest.local
        );
    }
    inherited.ready();
    tracing::info!(
        workers,
        routes,
        generation = gw.load().generation,
        "moongate {} serving {}",
        env!("CARGO_PKG_VERSION"),
        path.display()
    );
    rt.block_on(async {
        wait_for_signal(signals, &reloader).await;
        tracing::info!(
            "shutting down: no new connections; in-flight requests get up to {}s",
            node.proxy.graceful_shutdown_timeout
        );
        let _ = shutdown_tx.send(true);
    });
    for h in handles {
        let _ = h.join();
    }
    if let Some(log) = moongate::accesslog::get() {
        log.flush(std::time::Duration::from_secs(5));
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// The signals the serving process takes: SIGTERM and SIGINT stop it, SIGHUP reloads,
/// SIGUSR1 reopens the access and error logs.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime context); None, logged, if that fails.
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let installed = (|| {
            Ok::<_, std::io::Error>(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
                usr1: signal(SignalKind::user_defined1())?,
            })
        })();
        match installed {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM/SIGINT/SIGHUP/SIGUSR1: {e}");
                None
            }
        }
    }
}

/// Waits for SIGTERM or SIGINT (the caller then shuts down). SIGHUP rebuilds from the files
/// meanwhile, as `PUT /apisix/admin/plugins/reload` does (nginx reloads its config on SIGHUP).
async fn wait_for_signal(signals: Option<Signals>, reloader: &Arc<Reloader>) {
    let Some(mut s) = signals else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = s.term.recv() => return,
            _ = s.int.recv() => return,
            _ = s.hup.recv() => {
                let reloader = reloader.clone();
                // A failed build is logged and kept by the reloader.
                let _ = tokio::task::spawn_blocking(move || reloader.rebuild("SIGHUP", true)).await;
            }
            _ = s.usr1.recv() => {
                // nginx's USR1: reopen the log files (logrotate has renamed them).
                if let Some(log) = moongate::accesslog::get() {
                    log.reopen();
                }
                moongate::errorlog::reopen();
            }
        }
    }
}

/// `moongate plugins import`: one line per plugin imported or skipped, then what each needs.
fn import_plugins(apisix: &Path, names: &[String], to: &Path) -> ExitCode {
    use moongate::plugin::import;
    let provided = match moongate::plugin::lua::provided_modules() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot start a Lua VM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let natives: Vec<String> = moongate::plugins::native()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let report = match import::import(apisix, names, to, &|m| provided.contains(m), &|n| {
        natives.iter().any(|x| x == n)
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, files) in &report.imported {
        match report.missing.get(name) {
            None => println!("{name}: {} file(s)", files.len()),
            Some(m) => println!(
                "{name}: {} file(s); needs modules moongate does not provide: {}",
                files.len(),
                m.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
    for (name, why) in &report.skipped {
        println!("{name}: skipped: {why}");
    }
    println!(
        "imported {} plugin(s) into {}; third-party Lua libraries (resty.session, resty.openidc, ...) are installed with luarocks, as for APISIX (docs/compatibility.md)",
        report.imported.len(),
        to.display()
    );
    ExitCode::SUCCESS
}
