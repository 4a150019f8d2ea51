//! The operator's view and keep-alive at scale: a vault of `BENCH_USERS`
//! lineages (default 10,000; one in ten dead, sealed values of realistic
//! size), then the database work behind `GET /api/v1/admin/lineages` (one
//! page, the last page, each filter and sort), the `/metrics` count, and one
//! keep-alive round's scan (every active lineage, 500 at a time, each
//! planned). Prints p50 and p99 per query; not a test, rerun it to compare.
//!
//!     cargo bench --bench operator_view
//!     BENCH_DATABASE_URL=postgres://… cargo bench --bench operator_view
//!
//! Without `BENCH_DATABASE_URL` it uses a new SQLite file. A PostgreSQL URL
//! must name an empty database (the benchmark fills its `lineages` table).

use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use tokenhub::config::KeepaliveConfig;
use tokenhub::tokens::keepalive::plan;
use tokenhub::vault::predecessors::Replaced;
use tokenhub::vault::store::{LineageFilter, LineageRow, LineageSort, Store};

const ISSUER: &str = "https://idp.example.org";
const PAGE: i64 = 50;
const ROUNDS: usize = 40;

fn sealed(rng: &mut impl RngCore, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// A lineage as tokenhub stores it; the sealed values are random bytes of
/// the sizes real ones have (the listing never opens them, but they make the
/// table as large as a real one).
fn lineage(rng: &mut impl Rng, i: usize, now: i64) -> LineageRow {
    let created_at = now - rng.gen_range(0..30 * 86_400);
    let refreshed_at = (!i.is_multiple_of(4)).then(|| now - rng.gen_range(0..86_400));
    LineageRow {
        username: format!("user{i:05}"),
        issuer: ISSUER.into(),
        subject: format!("http://cilogon.org/serverA/users/{i}"),
        access_token: sealed(rng, 1_300),
        id_token: sealed(rng, 1_100),
        refresh_token: (!i.is_multiple_of(50)).then(|| sealed(rng, 160)),
        claims: sealed(rng, 400),
        scope: "openid email profile org.cilogon.userinfo offline_access".into(),
        access_expires_at: Some(now + rng.gen_range(-3_600..3_600)),
        version: 1,
        status: if i.is_multiple_of(10) { "dead" } else { "active" }.into(),
        created_at,
        updated_at: refreshed_at.unwrap_or(created_at),
        refreshed_at,
        previous_refresh_hash: None,
        rotated_at: None,
        pending_id_token: None,
        login_nonce: Some("n".repeat(22)),
        dead_reason: None,
        refresh_hash: None,
        fabric_token: None,
    }
}

/// Runs `f` ROUNDS times; prints p50 and p99 in milliseconds.
async fn measure<F, Fut>(name: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let mut times = Vec::with_capacity(ROUNDS);
    let mut rows = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        rows = f().await;
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{name:<44} {rows:>6} {:>9.2} {:>9.2}", ms(times[ROUNDS / 2]), ms(times[ROUNDS * 99 / 100]));
}

#[tokio::main]
async fn main() {
    let users: usize = std::env::var("BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let scratch = tempfile::tempdir().unwrap();
    let url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}?mode=rwc", scratch.path().join("bench.sqlite").display()));
    let store = Store::connect(&url).await.expect("the database answers");
    let backend = format!("{:?}", store.backend());

    let now = tokenhub::time::now();
    let mut rng = rand::thread_rng();
    let start = Instant::now();
    for i in 0..users {
        store.replace_lineage(&lineage(&mut rng, i, now), Replaced::Keep).await.unwrap();
    }
    println!("{backend}: {users} lineages written in {:.1} s (one login each)\n", start.elapsed().as_secs_f64());
    println!("{:<44} {:>6} {:>9} {:>9}", "query", "rows", "p50 ms", "p99 ms");

    let all = LineageFilter::default();
    let dead = LineageFilter { status: Some("dead".into()), ..Default::default() };
    let prefix = LineageFilter { user_prefix: Some("user042".into()), ..Default::default() };
    let list = |filter: LineageFilter, sort: LineageSort, descending: bool, offset: i64| {
        let store = &store;
        move || {
            let filter = filter.clone();
            async move { store.list_lineages(&filter, sort, descending, PAGE, offset).await.unwrap().0.len() }
        }
    };
    let last = (users as i64 - PAGE).max(0);
    measure("listing: first page, by user", list(all.clone(), LineageSort::User, false, 0)).await;
    measure("listing: last page, by user", list(all.clone(), LineageSort::User, false, last)).await;
    measure("listing: first page, by last refresh desc", list(all.clone(), LineageSort::LastRefresh, true, 0)).await;
    measure("listing: middle page, by access expiry", list(all.clone(), LineageSort::AccessExpires, false, last / 2)).await;
    measure("listing: state=dead, first page", list(dead, LineageSort::User, false, 0)).await;
    measure("listing: user=user042…, first page", list(prefix, LineageSort::User, false, 0)).await;
    measure("metrics: lineages by state", || async { store.count_lineages_by_status().await.unwrap().len() }).await;

    let config = KeepaliveConfig {
        interval: Some(Duration::from_secs(60)),
        idle_timeout: Some(86_400),
        margin: 1_200,
        grace: 0,
        fresh_access: false,
    };
    measure("keep-alive round: scan and plan every lineage", || async {
        let (mut after, mut due) = (String::new(), 0);
        loop {
            let page = store.active_lineages(ISSUER, &after, 500).await.unwrap();
            due += page.iter().filter(|t| plan(&config, t, now).is_some()).count();
            match page.last() {
                Some(t) if page.len() == 500 => after = t.username.clone(),
                _ => break due,
            }
        }
    })
    .await;
}
