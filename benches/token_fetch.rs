//! Load generator for the token-fetch benchmark (`scripts/bench.sh` starts
//! the stack and runs this). For each target and concurrency level it sends
//! GET requests for a fixed time and prints requests per second, p50 and p99.
//!
//! Targets come from the environment, `BENCH_TARGETS` = JSON list of
//! `{"name": …, "url": …, "auth": "token …"}`; the url `builtin` is the
//! ceiling: a minimal axum handler returning a body of `BENCH_CEILING_BYTES`
//! bytes, run as a process of its own like tokenhub, so both compete with the
//! load generator for the CPU in the same way.

use std::time::{Duration, Instant};

use axum::routing::get;
use serde::Deserialize;

#[derive(Deserialize)]
struct Target {
    name: String,
    url: String,
    #[serde(default)]
    auth: Option<String>,
}

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

fn rss_mb(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The ceiling server: `token_fetch --serve-ceiling <bytes>` prints its port.
fn serve_ceiling(bytes: usize) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let body: &'static str = Box::leak("x".repeat(bytes).into_boxed_str());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        let app =
            axum::Router::new().route("/tokens", get(move || async move { ([("content-type", "application/json")], body) }));
        axum::serve(listener, app).await.unwrap();
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-ceiling") {
        return serve_ceiling(args[2].parse().unwrap());
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
    let mut server = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--serve-ceiling", &body_bytes.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut port).unwrap();
    let ceiling = format!("http://127.0.0.1:{}/tokens", port.trim());
    runtime.block_on(async {
        if let Some(pid) = &pid {
            println!("tokenhub resident memory before load: {:.1} MB", rss_mb(pid).unwrap_or(f64::NAN));
        }
        println!("\n| target | connections | requests/s | p50 ms | p99 ms | errors |");
        println!("|---|---:|---:|---:|---:|---:|");
        for target in &targets {
            let url = if target.url == "builtin" { ceiling.clone() } else { target.url.clone() };
            // Warm up (connections, caches) before measuring.
            run(&url, target.auth.as_deref(), 4, Duration::from_millis(500)).await;
            for &c in &levels {
                let r = run(&url, target.auth.as_deref(), c, Duration::from_secs(seconds)).await;
                println!("| {} | {c} | {:.0} | {:.2} | {:.2} | {} |", target.name, r.rps, r.p50_ms, r.p99_ms, r.errors);
            }
        }
        if let Some(pid) = &pid {
            println!("\ntokenhub resident memory after load: {:.1} MB", rss_mb(pid).unwrap_or(f64::NAN));
        }
    });
    let _ = server.kill();
}
