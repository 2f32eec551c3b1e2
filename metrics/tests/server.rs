//! The metrics endpoint over real TCP connections, with hand-written HTTP requests.

use std::net::SocketAddr;
use std::time::Duration;

use keel_metrics::server::DRAIN_TIMEOUT;
use keel_metrics::{names, serve, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// Sends `raw` and reads the reply until the server closes the connection.
async fn request(addr: SocketAddr, raw: &[u8]) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(raw).await.expect("write request");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("read reply");
        bytes
    };
    let bytes = tokio::time::timeout(WAIT, exchange).await.expect("the server replies within 10 s");
    let text = String::from_utf8(bytes).expect("utf-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Reply { status, headers: head.to_string(), body: body.to_string() }
}

async fn start(registry: &Registry) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let (addr, task) = serve("127.0.0.1:0", registry.clone(), shutdown.clone()).await.expect("bind port 0");
    (addr, shutdown, task)
}

async fn stop(shutdown: CancellationToken, task: tokio::task::JoinHandle<()>) {
    shutdown.cancel();
    tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(3), task)
        .await
        .expect("the server stops soon after shutdown")
        .expect("the server task does not panic");
}

/// A scrape returns 200 with the 0.0.4 content type and the registered series.
#[tokio::test]
async fn get_metrics_returns_the_exposition() {
    let registry = Registry::new();
    let task = registry.group(&[("job", "orders"), ("subtask", "0")]);
    task.counter(names::NUM_RECORDS_IN).add(42);
    let (addr, shutdown, server) = start(&registry).await;
    assert_ne!(addr.port(), 0);

    let reply = request(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").await;
    assert_eq!(reply.status, 200, "{}", reply.headers);
    assert!(reply.headers.contains("Content-Type: text/plain; version=0.0.4"), "{}", reply.headers);
    assert!(reply.headers.contains(&format!("Content-Length: {}", reply.body.len())), "{}", reply.headers);
    assert!(
        reply.body.contains("keel_num_records_in_total{job=\"orders\",subtask=\"0\"} 42\n"),
        "{}",
        reply.body
    );

    // The series leaves the scrape with its group.
    drop(task);
    let reply = request(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.status, 200);
    assert!(!reply.body.contains("keel_num_records_in_total"), "{}", reply.body);
    stop(shutdown, server).await;
}

/// Other paths are 404, other methods 405, garbage 400, an oversized head 431: the server
/// answers and keeps serving.
#[tokio::test]
async fn bad_requests_get_error_statuses_and_the_server_keeps_serving() {
    let registry = Registry::new();
    let (addr, shutdown, server) = start(&registry).await;
    assert_eq!(request(addr, b"GET / HTTP/1.1\r\n\r\n").await.status, 404);
    assert_eq!(request(addr, b"GET /metrics/../x HTTP/1.1\r\n\r\n").await.status, 404);
    assert_eq!(request(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await.status, 405);
    assert_eq!(request(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").await.status, 400);
    assert_eq!(request(addr, b"hello\n\n").await.status, 400);
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    huge.extend_from_slice(b"\r\n\r\n");
    assert_eq!(request(addr, &huge).await.status, 431);
    // A client that connects and leaves without a word.
    drop(TcpStream::connect(addr).await.expect("connect"));
    assert_eq!(request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await.status, 200);
    stop(shutdown, server).await;
}

/// Fifty clients at once all get complete answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_scrapes_are_all_served() {
    let registry = Registry::new();
    let groups: Vec<_> = (0..20)
        .map(|i| {
            let g = registry.group(&[("subtask", &i.to_string())]);
            g.gauge(names::PENDING_RECORDS).set(f64::from(i));
            g
        })
        .collect();
    let (addr, shutdown, server) = start(&registry).await;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..50 {
        clients.spawn(async move { request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await });
    }
    let mut served = 0;
    while let Some(reply) = clients.join_next().await {
        let reply = reply.expect("client task");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body.lines().filter(|l| l.starts_with("keel_pending_records{")).count(), 20);
        served += 1;
    }
    assert_eq!(served, 50);
    drop(groups);
    stop(shutdown, server).await;
}

/// A client that connects and never sends anything neither blocks other clients nor delays
/// shutdown beyond the drain timeout; after shutdown the port no longer accepts connections.
#[tokio::test]
async fn a_silent_client_blocks_neither_scrapes_nor_shutdown() {
    let registry = Registry::new();
    let (addr, shutdown, server) = start(&registry).await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await.status, 200);
    stop(shutdown, server).await;
    // The silent connection was dropped by the server.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf)).await.expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed after shutdown");
}
