//! What tokenhub exposes at `/metrics`: a `prometheus-client` registry owned
//! by the `App` (one per `App`, so tests stay independent; nothing global),
//! rendered in the OpenMetrics text format. README.md, "Metrics", lists
//! every metric and its labels.

use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::vault::store::Store;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a count of lineages by state is reused: a flood of scrapes (the
/// endpoint needs no credentials) costs at most one query a second.
const LINEAGE_COUNT_TTL: Duration = Duration::from_secs(1);

/// One label, with its value: every family here has a single label.
type Label = [(&'static str, &'static str); 1];

/// How an upstream refresh (one call of the IdP's token endpoint, with its
/// retries) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// New tokens came back.
    Ok,
    /// The IdP refused the refresh token: the lineage is dead.
    InvalidGrant,
    /// No answer, or a server error: the lineage is kept.
    Unavailable,
    /// An answer that breaks the protocol (or an ID token that fails).
    Error,
    /// A 2xx whose body could not be read or used.
    AnswerLost,
    /// Another OAuth error refusing the refresh (`invalid_request`, ...):
    /// the lineage is dead.
    Refused,
    /// The IdP refused tokenhub's client (`invalid_client`,
    /// `unauthorized_client`): the lineage is kept, the operators must act.
    Misconfigured,
}

impl RefreshOutcome {
    const ALL: [RefreshOutcome; 7] =
        [Self::Ok, Self::InvalidGrant, Self::Unavailable, Self::Error, Self::AnswerLost, Self::Refused, Self::Misconfigured];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::InvalidGrant => "invalid_grant",
            Self::Unavailable => "unavailable",
            Self::Error => "error",
            Self::AnswerLost => "answer_lost",
            Self::Refused => "refused",
            Self::Misconfigured => "misconfigured",
        }
    }
}

/// Why a keep-alive refresh did not renew a lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveFailure {
    /// The IdP's token endpoint could not be reached or answered 5xx (an
    /// outage: the round stops and tries again next interval).
    IdpUnreachable,
    /// The IdP answered with something unusable (another OAuth error, a
    /// broken or lost answer).
    IdpError,
    /// The IdP refused the refresh token (`invalid_grant`): the lineage is dead.
    Refused,
    /// Another replica held the lineage's lease and did not finish in time.
    Busy,
    /// The IdP refused tokenhub's client (the round stops, as for an outage).
    Misconfigured,
    /// The vault failed.
    Vault,
}

impl KeepaliveFailure {
    const ALL: [KeepaliveFailure; 6] =
        [Self::IdpUnreachable, Self::IdpError, Self::Refused, Self::Busy, Self::Misconfigured, Self::Vault];

    /// The `cause` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IdpUnreachable => "idp_unreachable",
            Self::IdpError => "idp_error",
            Self::Refused => "refused",
            Self::Busy => "busy",
            Self::Misconfigured => "misconfigured",
            Self::Vault => "vault",
        }
    }
}

/// What keep-alive did: totals since start, and the last round's figures
/// (also shown on the operator's page).
#[derive(Debug, Default)]
pub struct KeepaliveFigures {
    /// Upstream refreshes keep-alive made.
    pub refreshes: Counter,
    failures: Family<Label, Counter>,
    /// Rounds run (ended early or not).
    pub rounds: Counter,
    /// When the last round ended (unix seconds; 0 before the first).
    pub last_round_at: Gauge,
    /// Lineages due in the last round.
    pub last_round_due: Gauge,
    /// Lineages the last round refreshed.
    pub last_round_refreshed: Gauge,
    /// The least time a lineage had left before its refresh token's end
    /// when the last round tried it (seconds; -1 when none was tried).
    pub last_round_closest: Gauge,
}

impl KeepaliveFigures {
    /// Counts a failed keep-alive refresh.
    pub fn failed(&self, cause: KeepaliveFailure) {
        self.failures.get_or_create(&[("cause", cause.as_str())]).inc();
    }

    /// Failed keep-alive refreshes since start, by cause.
    pub fn failures(&self) -> Vec<(&'static str, u64)> {
        KeepaliveFailure::ALL.iter().map(|c| (c.as_str(), self.failures.get_or_create(&[("cause", c.as_str())]).get())).collect()
    }

    /// Failed keep-alive refreshes since start, all causes.
    pub fn failures_total(&self) -> u64 {
        self.failures().iter().map(|(_, n)| n).sum()
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "keepalive_refreshes",
            "Refreshes made by keep-alive for users with running servers.",
            self.refreshes.clone(),
        );
        registry.register(
            "keepalive_failures",
            "Keep-alive refreshes that failed, by cause (idp_unreachable, idp_error, refused, busy, misconfigured, vault); \
             the lineage is kept unless the IdP refused it.",
            self.failures.clone(),
        );
        for cause in KeepaliveFailure::ALL {
            let _ = self.failures.get_or_create(&[("cause", cause.as_str())]);
        }
        registry.register("keepalive_rounds", "Keep-alive rounds run.", self.rounds.clone());
        registry.register(
            "keepalive_last_round_timestamp",
            "When the last keep-alive round ended (unix seconds).",
            self.last_round_at.clone(),
        );
        registry.register("keepalive_last_round_due", "Lineages due in the last keep-alive round.", self.last_round_due.clone());
        registry.register(
            "keepalive_last_round_refreshed",
            "Lineages the last keep-alive round refreshed.",
            self.last_round_refreshed.clone(),
        );
        registry.register_with_unit(
            "keepalive_last_round_closest",
            "The least time a lineage had left before its refresh token's end when the last keep-alive round tried it \
             (-1 when it tried none).",
            Unit::Seconds,
            self.last_round_closest.clone(),
        );
        self.last_round_closest.set(-1);
    }
}

/// A call tokenhub makes to JupyterHub or to a user's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubCall {
    /// Who owns a token (`GET /hub/api/user`, on a cache miss).
    Identify,
    /// A user's servers (`GET /hub/api/users/<name>`).
    Servers,
    /// The token file, through a server's Contents API.
    WriteTokenFile,
    /// Whether a user is a hub admin (`GET /hub/api/users/<name>`, for the
    /// operator's view).
    IsAdmin,
    /// Whose a server's own token is (`GET /hub/api/user` with that token,
    /// before it is presented to the server; on a cache miss).
    ServerToken,
    /// A server's shares (`GET /hub/api/shares/<name>/<server>`).
    Shares,
    /// A user's hub groups (`GET /hub/api/users/<name>`, for the rules of
    /// narrower tokens; on a cache miss).
    Groups,
}

impl HubCall {
    const ALL: [HubCall; 7] =
        [Self::Identify, Self::Servers, Self::WriteTokenFile, Self::IsAdmin, Self::ServerToken, Self::Shares, Self::Groups];

    fn as_str(self) -> &'static str {
        match self {
            Self::Identify => "identify",
            Self::Servers => "servers",
            Self::WriteTokenFile => "write_token_file",
            Self::IsAdmin => "is_admin",
            Self::ServerToken => "server_token",
            Self::Shares => "shares",
            Self::Groups => "groups",
        }
    }
}

/// Latencies of hub calls by call. A clone shares the series, so `HubApi`
/// holds one while the registry renders another.
#[derive(Debug, Clone)]
pub struct HubTimings(Family<Label, Histogram, fn() -> Histogram>);

impl Default for HubTimings {
    fn default() -> Self {
        Self(Family::new_with_constructor(latency_histogram))
    }
}

impl HubTimings {
    /// Starts timing a call; the time is recorded when the guard drops, on
    /// every way out of the call.
    pub fn start(&self, call: HubCall) -> Timer {
        Timer { histogram: self.0.get_or_create_owned(&[("call", call.as_str())]), started: Instant::now() }
    }
}

/// Observes the seconds since it was made when dropped.
#[derive(Debug)]
pub struct Timer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Buckets from 5 ms to about 20 s: IdP and hub calls, retries included.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// How the FABRIC broker answered a refresh (`tokenhub_fabric_broker_refreshes`).
pub const BROKER_OUTCOMES: [&str; 8] =
    ["vault", "refreshed", "grace", "retired", "refused", "passed_on", "unknown_refused", "unavailable"];

/// The metrics of one `App`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Completed upstream logins.
    pub logins: Counter,
    /// Logins that failed at the callback.
    pub login_failures: Counter,
    /// Token responses sent to the hub.
    pub hub_tokens_issued: Counter,
    /// Token-endpoint requests refused.
    pub hub_token_errors: Counter,
    /// What keep-alive did.
    pub keepalive: KeepaliveFigures,
    /// Callers that waited for another caller's (or replica's) refresh and
    /// took its result instead of asking the IdP themselves.
    pub refresh_waits: Counter,
    /// Seconds of upstream refreshes.
    refresh_seconds: Histogram,
    refresh_outcomes: Family<Label, Counter>,
    token_file_writes: Family<Label, Counter>,
    fabric_refreshes: Family<Label, Counter>,
    /// Hub call latencies (shared with `HubApi`).
    pub hub_calls: HubTimings,
    lineages: Family<Label, Gauge>,
    /// When lineages were last counted (held across the query, so
    /// concurrent scrapes share one).
    lineages_counted: tokio::sync::Mutex<Option<Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, with each label value present from the
    /// start (at zero): alert rules see a series before its first event.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tokenhub");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let logins = counter(&mut registry, "logins", "Completed upstream logins.");
        let login_failures = counter(&mut registry, "login_failures", "Logins that failed at the callback.");
        let hub_tokens_issued = counter(&mut registry, "hub_tokens_issued", "Token responses sent to JupyterHub.");
        let hub_token_errors = counter(&mut registry, "hub_token_errors", "Token requests from JupyterHub refused.");
        let keepalive = KeepaliveFigures::default();
        keepalive.register(&mut registry);
        let refresh_waits = counter(
            &mut registry,
            "refresh_waits",
            "Callers that waited for another caller's or replica's refresh and shared its result.",
        );

        let refresh_seconds = latency_histogram();
        registry.register_with_unit(
            "upstream_refresh_duration",
            "Time of an upstream refresh at the IdP's token endpoint, retries included.",
            Unit::Seconds,
            refresh_seconds.clone(),
        );
        let refresh_outcomes = Family::<Label, Counter>::default();
        registry.register(
            "upstream_refreshes",
            "Upstream refreshes by outcome (ok, invalid_grant, refused, unavailable, misconfigured, error, answer_lost).",
            refresh_outcomes.clone(),
        );
        for outcome in RefreshOutcome::ALL {
            let _ = refresh_outcomes.get_or_create(&[("outcome", outcome.as_str())]);
        }
        let token_file_writes = Family::<Label, Counter>::default();
        registry.register(
            "token_file_writes",
            "Token files written to servers, by outcome (ok, failed).",
            token_file_writes.clone(),
        );
        for outcome in ["ok", "failed"] {
            let _ = token_file_writes.get_or_create(&[("outcome", outcome)]);
        }
        let fabric_refreshes = Family::<Label, Counter>::default();
        registry.register(
            "fabric_broker_refreshes",
            "FABlib's refreshes the FABRIC broker answered, by outcome (vault: from the vault; refreshed: after a \
             refresh through the CM, made or shared; grace: a replaced refresh token; refused: the CM refused the \
             lineage; passed_on, unknown_refused: a refresh token tokenhub does not hold; unavailable).",
            fabric_refreshes.clone(),
        );
        for outcome in BROKER_OUTCOMES {
            let _ = fabric_refreshes.get_or_create(&[("outcome", outcome)]);
        }
        let hub_calls = HubTimings::default();
        registry.register_with_unit(
            "hub_call_duration",
            "Time of calls to JupyterHub's API and to servers' Contents API, by call.",
            Unit::Seconds,
            hub_calls.0.clone(),
        );
        for call in HubCall::ALL {
            let _ = hub_calls.0.get_or_create(&[("call", call.as_str())]);
        }
        let lineages = Family::<Label, Gauge>::default();
        registry.register(
            "lineages",
            "Token lineages in the vault by state (active, dead), counted at scrape time.",
            lineages.clone(),
        );
        for state in ["active", "dead"] {
            let _ = lineages.get_or_create(&[("state", state)]);
        }

        Self {
            registry,
            logins,
            login_failures,
            hub_tokens_issued,
            hub_token_errors,
            keepalive,
            refresh_waits,
            refresh_seconds,
            refresh_outcomes,
            token_file_writes,
            fabric_refreshes,
            hub_calls,
            lineages,
            lineages_counted: Default::default(),
        }
    }

    /// Records an upstream refresh that took `elapsed` and ended `outcome`.
    pub fn upstream_refresh(&self, elapsed: Duration, outcome: RefreshOutcome) {
        self.refresh_seconds.observe(elapsed.as_secs_f64());
        self.refresh_outcomes.get_or_create(&[("outcome", outcome.as_str())]).inc();
    }

    /// Records a token file write.
    pub fn token_file_write(&self, ok: bool) {
        self.token_file_writes.get_or_create(&[("outcome", if ok { "ok" } else { "failed" })]).inc();
    }

    /// Counts a refresh the FABRIC broker answered (one of [`BROKER_OUTCOMES`]).
    pub fn fabric_refresh(&self, outcome: &'static str) {
        debug_assert!(BROKER_OUTCOMES.contains(&outcome));
        self.fabric_refreshes.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Counts lineages by state, unless counted within the last second. A
    /// database that does not answer leaves the last counts (and is logged):
    /// the other metrics still render.
    async fn count_lineages(&self, store: &Store) {
        let mut counted = self.lineages_counted.lock().await;
        if counted.is_some_and(|at| at.elapsed() < LINEAGE_COUNT_TTL) {
            return;
        }
        match store.count_lineages_by_status().await {
            Ok(counts) => {
                for state in ["active", "dead"] {
                    let n = counts.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
                    self.lineages.get_or_create(&[("state", state)]).set(n);
                }
                *counted = Some(Instant::now());
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot count lineages"),
        }
    }

    /// The OpenMetrics text exposition, with lineages counted now.
    pub async fn render(&self, store: &Store) -> String {
        self.count_lineages(store).await;
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}
