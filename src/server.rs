//! The HTTP/1 server loop: accepts connections and serves the router on
//! each with hyper's connection builder, so that no client can hold a
//! connection, or memory, for as long as it likes:
//!
//! - the request head must arrive within `TOKENHUB_HEADER_READ_TIMEOUT`
//!   of the connection's start or of the previous response (hyper's
//!   `header_read_timeout`, which so also closes idle kept-alive
//!   connections);
//! - a head over `TOKENHUB_MAX_HEADER_BYTES` gets 431 and the connection is
//!   closed, and hyper's buffer is bounded to match (its default is ~400 KB
//!   per connection);
//! - a request body that pauses longer than `TOKENHUB_BODY_READ_TIMEOUT`
//!   fails (tower-http's body timeout), which ends the connection;
//! - at most `TOKENHUB_MAX_CONNECTIONS` connections are served at once:
//!   above that, `accept` waits until one closes (the kernel's backlog holds
//!   the rest).
//!
//! Every request carries its client ([`Client`]), told from the peer
//! address and the trusted proxies (`TOKENHUB_TRUSTED_PROXIES`): the
//! address the failure limiter and the audit log count by. SIGINT/SIGTERM (or
//! whatever `shutdown` is) stops accepting, closes idle connections at once
//! and lets requests in flight finish (a head still arriving has until its
//! header timeout).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::config::{ConnectionLimits, HttpConfig};
use crate::security::{Client, client_of};

/// The smallest read buffer hyper accepts.
const MIN_BUF_SIZE: usize = 8192;

/// hyper's HTTP/1 connection settings for these limits.
fn http1_builder(limits: &ConnectionLimits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(MIN_BUF_SIZE))
        .keep_alive(true);
    builder
}

/// Serves `router` on `listener` within `http.limits` until `shutdown`
/// completes, then waits for the requests in flight. `cli::serve` and the
/// tests both run tokenhub through here.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    http: &HttpConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_with(listener, None, router, http, shutdown).await
}

/// [`serve`] with TLS on every connection when `tls` is given (the FABRIC
/// broker's own listener): the handshake must end within the header read
/// timeout, as a request head must.
pub async fn serve_with(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    http: &HttpConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let limits = &http.limits;
    let builder = http1_builder(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let body_timeout = limits.body_read_timeout;
    let mut saturated = false;
    tokio::pin!(shutdown);
    loop {
        // A free slot first: above the limit, connections wait in the backlog.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                saturated = false;
                permit
            }
            Err(_) => {
                if !saturated {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait until one closes"
                    );
                    saturated = true;
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                }
            }
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let trusted = http.trusted_proxies.clone();
        let service = ServiceBuilder::new()
            .map_request(move |mut request: axum::http::Request<Incoming>| {
                if let Some(client) = client_of(request.headers(), Some(peer), &trusted) {
                    request.extensions_mut().insert(Client(client));
                }
                request
            })
            .layer(RequestBodyTimeoutLayer::new(body_timeout))
            .service(router.clone());
        let service = TowerToHyperService::new(service);
        match &tls {
            None => {
                let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let (acceptor, builder, watcher) = (acceptor.clone(), builder.clone(), graceful.watcher());
                let handshake_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            if let Err(e) = watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await {
                                tracing::debug!(%peer, error = %e, "connection ended with an error");
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "no longer accepting connections; finishing requests in flight");
    graceful.shutdown().await;
    Ok(())
}

/// A failed `accept`: a connection reset before it was accepted is nothing;
/// anything else (out of file descriptors) is logged and waited out a
/// little, as hyper's and axum's own loops do.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
