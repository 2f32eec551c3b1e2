//! A small HTTP/1.1 server for Prometheus scrapes.
//!
//! | request | response |
//! | --- | --- |
//! | `GET /metrics` (any query string) | 200, `text/plain; version=0.0.4`, the registry rendered |
//! | `HEAD /metrics` | 200, headers only |
//! | another method on `/metrics` | 405 |
//! | another path | 404 |
//! | a request that does not parse | 400 |
//! | a request head over 8 KiB | 431 |
//!
//! Every response closes the connection. A client gets [`REQUEST_TIMEOUT`] to send its request
//! head; at most [`MAX_CONNECTIONS`] are served at once (more are closed at once). On shutdown
//! the server stops accepting, lets in-flight responses finish for up to [`DRAIN_TIMEOUT`], and
//! then drops what is left.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::prometheus::CONTENT_TYPE;
use crate::registry::Registry;

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head, and the server to write its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long shutdown waits for in-flight responses.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closed response waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and discarded while lingering.
const MAX_LINGER_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept` (out of file descriptors, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The metrics endpoint, bound and ready to [`run`](MetricsServer::run).
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    registry: Registry,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port; see [`MetricsServer::local_addr`]).
    pub async fn bind(addr: impl ToSocketAddrs, registry: Registry) -> io::Result<MetricsServer> {
        Ok(MetricsServer { listener: TcpListener::bind(addr).await?, registry })
    }

    pub fn from_listener(listener: TcpListener, registry: Registry) -> MetricsServer {
        MetricsServer { listener, registry }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains (see the module docs) and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let MetricsServer { listener, registry } = self;
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => match limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            connections.spawn(handle(stream, registry.clone(), permit));
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "metrics endpoint busy; closing connection");
                            drop(stream);
                        }
                    },
                    Err(error) => {
                        tracing::warn!(%error, "metrics endpoint cannot accept a connection");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        let drained =
            tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            tracing::debug!(left = connections.len(), "metrics endpoint dropping slow connections");
        }
        connections.shutdown().await;
    }
}

/// Binds `addr`, serves `registry` there until `shutdown`, and returns the bound address with
/// the server's task (await it after cancelling to know the server has stopped).
pub async fn serve(
    addr: impl ToSocketAddrs,
    registry: Registry,
    shutdown: CancellationToken,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let server = MetricsServer::bind(addr, registry).await?;
    let local = server.local_addr()?;
    Ok((local, tokio::spawn(server.run(shutdown))))
}

async fn handle(mut stream: TcpStream, registry: Registry, _permit: OwnedSemaphorePermit) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => return, // silent client
        Ok(Err(_)) => return,
        Ok(Ok(Head::Closed)) => return,
        Ok(Ok(Head::TooLarge)) => {
            Response::text(431, "Request Header Fields Too Large", "request head too large\n")
        }
        Ok(Ok(Head::Complete(bytes))) => respond(&bytes, &registry),
    };
    let write = async {
        stream.write_all(&response.into_bytes()).await?;
        stream.shutdown().await
    };
    if let Ok(Err(error)) = tokio::time::timeout(REQUEST_TIMEOUT, write).await {
        tracing::debug!(%error, "metrics response not delivered");
        return;
    }
    // Lingering close: read what the client still sends (the rest of an oversized head) until it
    // closes, so that closing with unread input does not reset the connection before the client
    // has read the response.
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < MAX_LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    Closed,
}

/// Reads until the blank line that ends a request head.
async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_end(&buf[from..]) {
            buf.truncate(from + end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// The end of the head (`\r\n\r\n` or a bare `\n\n`), exclusive of the blank line.
fn find_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra: &'static str,
    body: Vec<u8>,
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: body.as_bytes().to_vec(),
            head_only: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.extra
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn respond(head: &[u8], registry: &Registry) -> Response {
    let bad = || Response::text(400, "Bad Request", "bad request\n");
    let Ok(text) = std::str::from_utf8(head) else { return bad() };
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad();
    };
    if method.is_empty() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return bad();
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if path != "/metrics" {
        return Response::text(404, "Not Found", "not found; metrics are at /metrics\n");
    }
    match method {
        "GET" | "HEAD" => Response {
            status: 200,
            reason: "OK",
            content_type: CONTENT_TYPE,
            extra: "",
            body: registry.render().into_bytes(),
            head_only: method == "HEAD",
        },
        _ => Response {
            extra: "Allow: GET, HEAD\r\n",
            ..Response::text(405, "Method Not Allowed", "use GET\n")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names;

    #[test]
    fn request_lines_are_routed_and_malformed_ones_refused() {
        let r = Registry::new();
        let status = |head: &[u8]| respond(head, &r).status;
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\nHost: x"), 200);
        assert_eq!(status(b"GET /metrics?name[]=x HTTP/1.0"), 200);
        assert_eq!(status(b"HEAD /metrics HTTP/1.1"), 200);
        assert_eq!(status(b"POST /metrics HTTP/1.1"), 405);
        assert_eq!(status(b"GET / HTTP/1.1"), 404);
        assert_eq!(status(b"GET /metricsx HTTP/1.1"), 404);
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET /metrics HTTP/2",
            b"GET metrics HTTP/1.1",
            b"\xff\xfe",
            b"GET  /metrics HTTP/1.1",
        ] {
            assert_eq!(status(bad), 400, "{bad:?}");
        }
    }

    #[test]
    fn head_responses_announce_the_length_but_carry_no_body() {
        let r = Registry::new();
        r.group(&[]).counter(names::NUM_RECORDS_IN); // dropped at once: registry empty again
        let g = r.group(&[]);
        g.counter(names::NUM_RECORDS_IN).inc();
        let bytes = respond(b"HEAD /metrics HTTP/1.1", &r).into_bytes();
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        assert!(!text.contains("Content-Length: 0"), "{text}");
    }

    #[test]
    fn the_end_of_a_head_is_found_with_either_line_ending() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(20));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
