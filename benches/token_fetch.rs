//! Load generator for the token-fetch benchmark (`scripts/bench.sh` starts
//! the stack and runs this). For each target and concurrency level it sends
//! GET requests for a fixed time and prints requests per second, p50 and p99.
//!
//! Targets come from the environment, `BENCH_TARGETS` = JSON list of
//! `{"name": …, "url": …, "auth": "token …", "pid": …}`; the url `builtin` is
//! the ceiling: a minimal axum handler returning a body of
//! `BENCH_CEILING_BYTES` bytes, run as a process of its own like tokenhub, so
//! both compete with the load generator for the CPU in the same way;
//! `builtin-loop` is the same handler in tokenhub's own server loop.
//!
//! The targets take turns, `BENCH_ROUNDS` times (default 3), and each row
//! is the round with the median requests per second: a machine whose speed
//! drifts during the run then affects every target alike. Where the
//! server's pid is known (the ceiling's, and `pid` in a target), the row
//! also gives the server's CPU time per request (user + system, from
//! /proc), which the load generator's share of the CPU does not blur, and
//! its threads' context switches per request (threads woken and put to
//! sleep, the cost beyond the instructions).

use std::time::{Duration, Instant};

use axum::routing::get;
use serde::Deserialize;

#[derive(Deserialize)]
struct Target {
    name: String,
    url: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
}

#[derive(Clone, Copy)]
struct Result {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

async fn run(url: &str, auth: Option<&str>, concurrency: usize, duration: Duration) -> Result {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap();
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, auth) = (client.clone(), url.to_string(), auth.map(str::to_string));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0;
                while Instant::now() < deadline {
                    let start = Instant::now();
                    let mut request = client.get(&url);
                    if let Some(auth) = &auth {
                        request = request.header("authorization", auth);
                    }
                    match request.send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            latencies.push(start.elapsed().as_micros() as u32);
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64 / 1000.0
    };
    Result { rps: all.len() as f64 / duration.as_secs_f64(), p50_ms: pct(0.50), p99_ms: pct(0.99), errors }
}

/// The process's CPU time so far (user + system, all threads), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): utime and
    // stime are the 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    static PER_SECOND: std::sync::LazyLock<f64> = std::sync::LazyLock::new(|| {
        let out = std::process::Command::new("getconf").arg("CLK_TCK").output().ok();
        out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
    });
    Some(ticks / *PER_SECOND)
}

/// Context switches of all the process's threads so far (voluntary and
/// not): each is a thread put to sleep or woken, which costs the CPU time
/// beyond the instructions.
fn switches(pid: u32) -> Option<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        for line in status.lines().filter(|l| l.contains("ctxt_switches:")) {
            total += line.split_whitespace().nth(1)?.parse::<f64>().ok()?;
        }
    }
    Some(total)
}

fn rss_mb(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The ceiling server: `token_fetch --serve-ceiling <bytes> [loop]` prints
/// its port. With `loop`, the same handler is served by tokenhub's own
/// server loop (its connection limits and timeouts, [`tokenhub::server`])
/// rather than `axum::serve`: the difference between the two rows is what
/// the loop costs, the rest of tokenhub's is its handler's and middleware's.
fn serve_ceiling(bytes: usize, tokenhubs_loop: bool) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let body: &'static str = Box::leak("x".repeat(bytes).into_boxed_str());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        println!("{}", address.port());
        let app =
            axum::Router::new().route("/tokens", get(move || async move { ([("content-type", "application/json")], body) }));
        if tokenhubs_loop {
            let http = tokenhub::config::HttpConfig {
                bind: address,
                public_url: format!("http://{address}").parse().unwrap(),
                base_path: String::new(),
                secure_cookies: false,
                limits: Default::default(),
                trusted_proxies: Default::default(),
            };
            tokenhub::server::serve(listener, app, &http, std::future::pending()).await.unwrap();
        } else {
            axum::serve(listener, app).await.unwrap();
        }
    });
}

/// Starts a ceiling server process (see [`serve_ceiling`]); its URL.
fn start_ceiling(bytes: usize, mode: &str) -> (std::process::Child, String) {
    let mut server = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--serve-ceiling", &bytes.to_string(), mode])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut port).unwrap();
    (server, format!("http://127.0.0.1:{}/tokens", port.trim()))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-ceiling") {
        return serve_ceiling(args[2].parse().unwrap(), args.get(3).map(String::as_str) == Some("loop"));
    }
    let targets: Vec<Target> = serde_json::from_str(&std::env::var("BENCH_TARGETS").expect("BENCH_TARGETS")).unwrap();
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,16,64".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let body_bytes: usize = std::env::var("BENCH_CEILING_BYTES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let pid = std::env::var("TOKENHUB_PID").ok();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The ceilings: `builtin` (axum::serve) and `builtin-loop` (tokenhub's server loop).
    let mut ceilings: Vec<(String, std::process::Child, String)> = Vec::new();
    for (url, mode) in [("builtin", "plain"), ("builtin-loop", "loop")] {
        if targets.iter().any(|t| t.url == url) {
            let (child, address) = start_ceiling(body_bytes, mode);
            ceilings.push((url.to_string(), child, address));
        }
    }
    let ceiling_of = |target: &Target| ceilings.iter().find(|(url, _, _)| *url == target.url);
    runtime.block_on(async {
        if let Some(pid) = &pid {
            println!("tokenhub resident memory before load: {:.1} MB", rss_mb(pid).unwrap_or(f64::NAN));
        }
        println!("\n| target | connections | requests/s | p50 ms | p99 ms | server CPU µs/request | server context switches/request | errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
        let url_of = |target: &Target| ceiling_of(target).map_or(target.url.clone(), |(_, _, address)| address.clone());
        let pid_of = |target: &Target| ceiling_of(target).map_or(target.pid, |(_, child, _)| Some(child.id()));
        for target in &targets {
            // Warm up (connections, caches) before measuring.
            run(&url_of(target), target.auth.as_deref(), 4, Duration::from_millis(500)).await;
        }
        for &c in &levels {
            // Per target, per round: the result, CPU µs and context switches per request.
            type Round = (Result, Option<f64>, Option<f64>);
            let mut seen: Vec<Vec<Round>> = vec![Vec::new(); targets.len()];
            for _ in 0..rounds {
                for (i, target) in targets.iter().enumerate() {
                    let pid = pid_of(target);
                    let before = (pid.and_then(cpu_seconds), pid.and_then(switches));
                    let r = run(&url_of(target), target.auth.as_deref(), c, Duration::from_secs(seconds)).await;
                    let after = (pid.and_then(cpu_seconds), pid.and_then(switches));
                    let served = r.rps * seconds as f64;
                    let per_request =
                        |b: Option<f64>, a: Option<f64>| b.zip(a).filter(|_| served > 0.0).map(|(b, a)| (a - b) / served);
                    seen[i].push((r, per_request(before.0, after.0).map(|s| s * 1e6), per_request(before.1, after.1)));
                }
            }
            for (target, mut rows) in targets.iter().zip(seen) {
                rows.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
                let (r, cpu, switched) = rows[rows.len() / 2];
                let cpu = cpu.map_or("".to_string(), |c| format!("{c:.1}"));
                let switched = switched.map_or("".to_string(), |s| format!("{s:.2}"));
                println!(
                    "| {} | {c} | {:.0} | {:.2} | {:.2} | {cpu} | {switched} | {} |",
                    target.name, r.rps, r.p50_ms, r.p99_ms, r.errors
                );
            }
        }
        if let Some(pid) = &pid {
            println!("\ntokenhub resident memory after load: {:.1} MB", rss_mb(pid).unwrap_or(f64::NAN));
        }
    });
    for (_, mut child, _) in ceilings {
        let _ = child.kill();
        let _ = child.wait();
    }
}
