//! Hostile storage endpoints that adversarial miners commit instead of an honest bucket.
//! They speak just enough of S3's path-style `GET /{bucket}/{key}` for an S3 client, and
//! behave as an attacker's own server may:
//!
//! * [`Endpoint::stall`]: accepts every connection and never answers;
//! * [`Endpoint::split_view`]: serves the files of a directory, each object to its **first**
//!   reader only (later readers get `404 NoSuchKey`), so different nodes see different
//!   bucket contents;
//! * [`Endpoint::tamper`]: serves the files of a directory to everyone, but every
//!   `aggregate-*` object with one value changed: a validator whose published aggregate is
//!   well-formed, passes the cheap checks, and is wrong.
//!
//! All run on loopback and stop when the [`Endpoint`] is dropped.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running hostile endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    /// The `s3://` bucket URL that points a node at this endpoint.
    pub fn bucket_url(&self, bucket: &str) -> String {
        format!("s3://{bucket}?endpoint={}", self.url)
    }

    /// An endpoint that accepts connections and never sends a byte.
    pub async fn stall() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        Ok(Endpoint { url, task })
    }

    /// An endpoint that serves `dir`'s files, each to its first reader only.
    pub async fn split_view(dir: PathBuf) -> std::io::Result<Self> {
        let served = Mutex::new(HashSet::<String>::new());
        Self::serving(move |key| {
            let first = served.lock().map(|mut s| s.insert(key.to_string())).unwrap_or(false);
            if first { std::fs::read(dir.join(key)).ok() } else { None }
        })
        .await
    }

    /// An endpoint that serves `dir`'s files to every reader, with each aggregate tampered
    /// by [`tamper_aggregate`].
    pub async fn tamper(dir: PathBuf) -> std::io::Result<Self> {
        Self::serving(move |key| {
            let bytes = std::fs::read(dir.join(key)).ok()?;
            if key.starts_with("aggregate-") { tamper_aggregate(bytes) } else { Some(bytes) }
        })
        .await
    }

    async fn serving(body: impl Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let body = Arc::new(body);
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, |method, key| if method == "GET" { body(key) } else { None }).await;
                });
            }
        });
        Ok(Endpoint { url, task })
    }
}

/// A safetensors file with the first f32 of its data raised by 1% (plus 1e-4, so a zero
/// changes too): still well-formed and finite, no longer what its publisher computed.
/// `None` when `bytes` is not a safetensors file with data.
pub fn tamper_aggregate(mut bytes: Vec<u8>) -> Option<Vec<u8>> {
    let header = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let at = usize::try_from(header).ok()?.checked_add(8)?;
    let v = f32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
    let t = v + 0.01 * v.abs() + 1e-4;
    bytes[at..at + 4].copy_from_slice(&t.to_le_bytes());
    Some(bytes)
}

async fn read_head(sock: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut byte).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&byte[..n]);
        if buf.len() > 64 * 1024 {
            return Ok(None);
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Answer path-style `{method} /{bucket}/{key}` requests on `sock` with `body(method, key)`,
/// or `404 NoSuchKey` when it gives nothing.
async fn serve(mut sock: TcpStream, body: impl Fn(&str, &str) -> Option<Vec<u8>>) -> std::io::Result<()> {
    while let Some(head) = read_head(&mut sock).await? {
        let line = head.lines().next().unwrap_or_default().to_string();
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let path = path.split('?').next().unwrap_or_default();
        // Path style: /{bucket}/{key}
        let key = path.trim_start_matches('/').split_once('/').map(|(_, k)| k.to_string()).unwrap_or_default();
        let response = match body(method, &key) {
            Some(b) => {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
                     Last-Modified: Mon, 30 Nov 2026 00:00:00 GMT\r\nETag: \"{}\"\r\n\r\n",
                    b.len(),
                    b.len()
                )
                .into_bytes();
                r.extend_from_slice(&b);
                r
            }
            None => {
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code>\
                           <Message>The specified key does not exist.</Message></Error>";
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                    xml.len()
                )
                .into_bytes()
            }
        };
        sock.write_all(&response).await?;
    }
    Ok(())
}
