//! Accepting connections: HTTP/1.1 from hyper, with the timeouts `axum::serve` does not set, and
//! a graceful stop. A client that opens a connection and sends its request's head slowly (or
//! never), or stops sending its body half way, would otherwise hold a connection, a task and,
//! for a body, the handler's place for as long as it likes.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt as _;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets every open
/// connection finish the request it is answering (idle ones close at once) and returns when all
/// are closed. A request's head must arrive within `read_timeout` (else the connection closes),
/// and its body may not go `read_timeout` without a byte (else 408, `super::lens`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = app.layer(RequestBodyTimeoutLayer::new(read_timeout));
    // Each connection holds a receiver of `stop`: `send` asks them to finish, and `closed`
    // returns once the last one has dropped its receiver.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin (axum::serve
                    // does the same); a connection's own error concerns that connection only.
                    if !is_connection_error(&e) {
                        eprintln!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: Request<Incoming>| req.map(Body::new)),
        );
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // The value changes once, to true (or the sender goes, which also means stop).
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(stopping);
    stop.closed().await;
    Ok(())
}

/// Errors of one accepted connection (it was reset before we took it), not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
