//! The command line: `tokenhub serve`, and the operator's commands
//! `keygen`, `migrate`, `keys` and `rekey` (docs/operations.md).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrecy::SecretString;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat, Settings};
use crate::state::App;
use crate::vault::crypto::KeyRing;
use crate::vault::rekey;
use crate::vault::store::Store;

/// OpenID Connect login, token vault and token service for JupyterHub.
///
/// Every setting of `serve` can be given as a flag, as the environment
/// variable shown, or in the TOML file named by --config.
#[derive(Debug, Parser)]
#[command(name = "tokenhub", version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("TOKENHUB_COMMIT"), ")"))]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve(Box<Settings>),
    /// Print a new random encryption key for TOKENHUB_CRYPT_KEY.
    Keygen,
    /// Bring the database's schema up to this tokenhub's, then exit (safe
    /// while older replicas serve: see docs/operations.md).
    Migrate(VaultArgs),
    /// Count the stored values each key of TOKENHUB_CRYPT_KEY sealed (and
    /// any key not in the list), changing nothing.
    Keys(VaultArgs),
    /// Seal every stored value again under the first key of TOKENHUB_CRYPT_KEY
    /// (safe while replicas serve), then count as `keys` does.
    Rekey(VaultArgs),
    /// Copy a SQLite vault into the database of TOKENHUB_DATABASE_URL
    /// (PostgreSQL, for a hub that outgrows one replica); rows already
    /// there are kept.
    ImportSqlite(ImportArgs),
}

/// `import-sqlite`: where from.
#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// The SQLite vault to copy, e.g. sqlite:///data/tokenhub.sqlite (its
    /// schema must be this tokenhub's: `tokenhub migrate` it first).
    #[arg(long)]
    from: String,
    #[command(flatten)]
    vault: VaultArgs,
}

/// The vault's settings, for the commands that need only the database (the
/// same variables `serve` reads).
#[derive(Debug, clap::Args)]
struct VaultArgs {
    /// The vault's database (default sqlite://tokenhub.sqlite?mode=rwc).
    #[arg(long, env = "TOKENHUB_DATABASE_URL")]
    database_url: Option<String>,
    /// The encryption keys, `;`-separated; falls back to JUPYTERHUB_CRYPT_KEY.
    #[arg(long, env = "TOKENHUB_CRYPT_KEY", hide_env_values = true)]
    crypt_key: Option<SecretString>,
}

/// JupyterHub's own key list, which every command falls back to.
fn jupyterhub_crypt_key() -> Option<SecretString> {
    std::env::var("JUPYTERHUB_CRYPT_KEY").ok().map(SecretString::from)
}

impl VaultArgs {
    fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| crate::config::DEFAULT_DATABASE_URL.to_string())
    }

    fn keys(&self) -> Result<KeyRing, String> {
        use secrecy::ExposeSecret as _;
        let list = self
            .crypt_key
            .clone()
            .or_else(jupyterhub_crypt_key)
            .ok_or("TOKENHUB_CRYPT_KEY (or JUPYTERHUB_CRYPT_KEY) is not set")?;
        KeyRing::parse(list.expose_secret()).map_err(|e| e.to_string())
    }
}

/// Runs one of the operator's database commands; its report goes to
/// stdout, a failure to stderr (exit 2 for missing or bad settings, 1 for
/// the rest).
fn vault_command(
    name: &str,
    args: &VaultArgs,
    run: impl AsyncFnOnce(Store, Option<KeyRing>) -> Result<String, String>,
) -> ExitCode {
    let migrate = matches!(name, "migrate" | "import-sqlite");
    let keys = if migrate {
        None
    } else {
        match args.keys() {
            Ok(keys) => Some(keys),
            Err(e) => {
                eprintln!("tokenhub {name}: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    let result = runtime.block_on(async {
        let options = crate::vault::store::DatabaseOptions::default();
        let store = Store::open(&args.database_url(), migrate, &options).await.map_err(|e| e.to_string())?;
        run(store, keys).await
    });
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tokenhub {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(store: Store, _: Option<KeyRing>) -> Result<String, String> {
    let (database, binary) = store.schema_versions().await.map_err(|e| e.to_string())?;
    Ok(format!("the schema is at migration {} (this tokenhub's newest: {binary})", database.unwrap_or(0)))
}

async fn import(target: Store, from: &str) -> Result<String, String> {
    if !from.starts_with("sqlite:") {
        return Err(format!("--from must be a sqlite:// URL, not {from:?}"));
    }
    let options = crate::vault::store::DatabaseOptions::default();
    let source = Store::open(from, false, &options).await.map_err(|e| format!("{from}: {e}"))?;
    let copied = target.import_from(&source).await.map_err(|e| e.to_string())?;
    let counts: Vec<String> = copied.iter().map(|(table, n)| format!("{n} {table}")).collect();
    Ok(format!("copied {}", counts.join(", ")))
}

async fn keys(store: Store, keys: Option<KeyRing>) -> Result<String, String> {
    let keys = keys.expect("keys are read for this command");
    Ok(rekey::usage(&store).await.map_err(|e| e.to_string())?.report(&keys))
}

async fn reseal(store: Store, keys: Option<KeyRing>) -> Result<String, String> {
    let keys = keys.expect("keys are read for this command");
    let done = rekey::rekey(&store, &keys).await.map_err(|e| e.to_string())?;
    Ok(format!("{} rows sealed again under key #1\n{}", done.rows_changed, done.usage.report(&keys)))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen => {
            println!("{}", KeyRing::generate_key());
            ExitCode::SUCCESS
        }
        Command::Migrate(args) => vault_command("migrate", &args, migrate),
        Command::Keys(args) => vault_command("keys", &args, keys),
        Command::Rekey(args) => vault_command("rekey", &args, reseal),
        Command::ImportSqlite(args) => {
            let from = args.from.clone();
            vault_command("import-sqlite", &args.vault, async move |store, _| import(store, &from).await)
        }
        Command::Serve(settings) => {
            let config = match settings.with_file().and_then(|s| s.into_config(jupyterhub_crypt_key())) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("tokenhub: {e}");
                    return ExitCode::from(2);
                }
            };
            // Held to the end: dropping it writes out the lines still queued.
            let (_log_writer, log) = init_logging(&config);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            match runtime.block_on(serve(config, log)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "tokenhub stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Logs (and audit lines in the log) go to stderr through a writer thread
/// of their own (tracing-appender): a request formats its line and queues
/// it, the write to stderr happens off the request's path. The queue never
/// drops a line: when it is full, the request waits (an audit line is never
/// lost). Returns the writer's guard, which flushes the queue when dropped,
/// and the writer for the audit's lines (written into the log directly;
/// none on a terminal, where tracing colours the lines).
fn init_logging(config: &Config) -> (tracing_appender::non_blocking::WorkerGuard, Option<crate::audit::LogWriter>) {
    let filter = EnvFilter::try_new(&config.log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The queue's memory is taken at start; its default (128,000 lines)
        // would be about 3 MB.
        .buffered_lines_limit(8192)
        .thread_name("tokenhub-log")
        .finish(std::io::stderr());
    let terminal = std::io::stderr().is_terminal();
    let audit_lines = (!terminal).then(|| crate::audit::LogWriter::new(Box::new(writer.clone()), config.log.format));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(terminal).with_writer(writer);
    match config.log.format {
        LogFormat::Json => builder.json().map_event_format(crate::request_frame::RequestEvents).init(),
        LogFormat::Text => builder.map_event_format(crate::request_frame::RequestEvents).init(),
    }
    (guard, audit_lines)
}

/// Runs the service until SIGINT or SIGTERM, then drains requests in flight.
/// `log`: the log's writer, for the audit's lines.
pub async fn serve(config: Config, log: Option<crate::audit::LogWriter>) -> anyhow::Result<()> {
    let bind = config.http.bind;
    let state = App::with_log(config, log).await?;
    state.upstream.warm_up().await;
    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(
        address = %listener.local_addr()?,
        public_url = %state.config.http.public_url,
        database = ?state.vault.store().backend(),
        trusted_proxies = %state.config.http.trusted_proxies,
        "tokenhub listening"
    );
    let purge_state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(300));
        loop {
            tick.tick().await;
            let now = crate::time::now();
            if let Err(e) = purge_state.vault.store().purge_expired(now).await {
                tracing::warn!(error = %e, "purging expired codes and tokens failed");
            }
            if let Some(fabric) = &purge_state.config.fabric
                && let Err(e) = purge_state.vault.store().purge_predecessors(now - fabric.grace, now).await
            {
                tracing::warn!(error = %e, "purging replaced refresh tokens' digests failed");
            }
        }
    });
    let keepalive = crate::tokens::keepalive::KeepAlive::start(state.clone());
    if let Some(interval) = state.config.hub.share_check_interval.filter(|_| state.hub.configured()) {
        crate::tokens::sharing::watch(&state, interval);
    }
    let http = state.config.http.clone();
    if state.credmgr.is_some() {
        // Lineages stored before the broker: their refresh tokens are found by digest too.
        let filled = state.vault.backfill_refresh_hashes().await?;
        if filled > 0 {
            tracing::info!(lineages = filled, "refresh-token digests filled in for the FABRIC broker");
        }
    }
    if let Some(broker) = state.config.fabric.as_ref().and_then(|f| f.listener.clone()) {
        let acceptor = crate::tls::acceptor(&broker.cert, &broker.key)?;
        let listener = tokio::net::TcpListener::bind(broker.bind).await?;
        tracing::info!(address = %listener.local_addr()?, "FABRIC broker listening (TLS)");
        let (router, http) = (crate::fabric::broker::app(state.clone()), http.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::server::serve_with(listener, Some(acceptor), router, &http, shutdown_signal()).await {
                tracing::error!(error = %e, "the FABRIC broker's listener failed");
            }
        });
    }
    let app = state.clone();
    crate::server::serve(listener, crate::app(state), &http, shutdown_signal()).await?;
    if let Some(keepalive) = keepalive {
        keepalive.stop().await;
    }
    // Every fetch's audit line is written before the process ends.
    app.audit.flush();
    tracing::info!("tokenhub stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
