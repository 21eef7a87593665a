//! Test support: real S3 servers for the storage suite and the multi-process tests (also
//! included by `examples/tests`, so there is one copy).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};

/// Access key and secret of the in-process S3 server.
pub(crate) const ACCESS_KEY: &str = "bistro-test";
/// Secret of the in-process S3 server.
pub(crate) const SECRET_KEY: &str = "bistro-test-secret";
/// A second key of the server, published by nodes for peers' reads (`read_key` in the
/// committed bucket URL).
pub(crate) const READ_KEY: &str = "bistro-reader";
/// Its secret (public by design: it is committed on chain).
pub(crate) const READ_SECRET: &str = "bistro-reader-public";

fn auth() -> s3s::auth::SimpleAuth {
    let mut a = s3s::auth::SimpleAuth::new();
    a.register(ACCESS_KEY.into(), SECRET_KEY.into());
    a.register(READ_KEY.into(), READ_SECRET.into());
    a
}

/// The query suffix that publishes the read key in a bucket URL.
pub(crate) fn read_params() -> String {
    format!("&read_key={READ_KEY}&read_secret={READ_SECRET}")
}

/// An `s3s-fs` server (a real S3 implementation that checks SigV4 signatures) serving the
/// directory `root` on a free loopback port; a bucket is a directory under `root`.
pub(crate) async fn start_s3s_fs(root: &Path) -> SocketAddr {
    start_s3s_fs_at(root, "127.0.0.1:0".parse().expect("addr")).await
}

/// Like [`start_s3s_fs`] on a given address (to bring a server back on a known port).
pub(crate) async fn start_s3s_fs_at(root: &Path, at: SocketAddr) -> SocketAddr {
    start_s3s_fs_stoppable(root, at).await.0
}

/// Like [`start_s3s_fs_at`], stoppable: aborting the returned task closes the listener and
/// every open connection (an S3 outage).
pub(crate) async fn start_s3s_fs_stoppable(root: &Path, at: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs root");
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(auth());
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(at).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((sock, _)) = listener.accept().await else { break };
            let service = service.clone();
            conns.spawn(async move {
                let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = conn.serve_connection(TokioIo::new(sock), service).await;
            });
        }
    });
    (addr, task)
}

/// A fake S3 endpoint that answers every request with headers for a 1 MB object and then
/// closes the connection after a few bytes: a server dying mid-download.
pub(crate) async fn start_dying_server() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { break };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let _ = sock.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nLast-Modified: Thu, 26 Nov 2026 00:00:00 GMT\r\nETag: \"abc\"\r\nContent-Type: application/octet-stream\r\n\r\n";
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&[7u8; 1000]).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP proxy in front of `upstream` that sends responses to the client at no more than
/// `bytes_per_sec` (a slow link), and once, after `cut_after` response bytes in all, drops
/// the connection in the middle of a body (an interruption). Returns its address, the
/// number of connections cut and the response bytes sent in all.
pub(crate) async fn throttled_proxy(
    upstream: SocketAddr,
    bytes_per_sec: u64,
    cut_after: Option<u64>,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU32>, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    slow_link(upstream, std::time::Duration::ZERO, bytes_per_sec, cut_after).await
}

/// [`throttled_proxy`] that also delays every new connection by `latency` before it
/// reaches the server (a distant peer: each request on a fresh connection pays it).
pub(crate) async fn slow_link(
    upstream: SocketAddr,
    latency: std::time::Duration,
    bytes_per_sec: u64,
    cut_after: Option<u64>,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU32>, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cuts = Arc::new(AtomicU32::new(0));
    let (sent_total, cut_done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let (counter, all_sent) = (cuts.clone(), sent_total.clone());
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { break };
            let (sent_total, cut_done, counter) = (sent_total.clone(), cut_done.clone(), counter.clone());
            tokio::spawn(async move {
                tokio::time::sleep(latency).await;
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                tokio::spawn(async move {
                    let start = std::time::Instant::now();
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        sent += n as u64;
                        let total = sent_total.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                        if cut_after.is_some_and(|c| total >= c) && !cut_done.swap(true, Ordering::Relaxed) {
                            counter.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        let due = std::time::Duration::from_secs_f64(sent as f64 / bytes_per_sec as f64);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    up.abort();
                });
            });
        }
    });
    (addr, cuts, all_sent)
}
