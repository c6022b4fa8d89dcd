//! A minimal HTTP/1.1 client with a keep-alive connection pool, enough to
//! drive the bench protocol's `POST /send` and `POST /broadcast` of the
//! comparison servers (and to read a `/metrics` page). Responses must carry
//! a Content-Length (both comparison servers send one).

use std::io;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// One base URL `http://host:port` and its idle connections.
pub struct HttpPool {
    host: String,
    idle: Mutex<Vec<HttpConn>>,
    /// Connections in use at once (requests beyond wait).
    slots: Arc<Semaphore>,
}

pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// `http://host:port[/...]` -> `host:port`.
pub fn host_port(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: expected http://host:port"))?;
    let hp = rest.split('/').next().unwrap_or("");
    if hp.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:80")
    })
}

impl HttpPool {
    pub fn new(url: &str, max_conns: usize) -> Result<HttpPool, String> {
        Ok(HttpPool {
            host: host_port(url)?,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max_conns.max(1))),
        })
    }

    /// Sends one request and returns (status, body). A reused connection that
    /// the server closed meanwhile is replaced once.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> io::Result<(u16, Vec<u8>)> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        head.extend_from_slice(body);
        let pooled = self.idle.lock().unwrap().pop();
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => HttpConn::open(&self.host).await?,
        };
        let result = match conn.round_trip(&head).await {
            Err(_) if reused => {
                conn = HttpConn::open(&self.host).await?;
                conn.round_trip(&head).await
            }
            r => r,
        };
        if let Ok((_, _, keep)) = &result {
            if *keep {
                self.idle.lock().unwrap().push(conn);
            }
        }
        result.map(|(s, b, _)| (s, b))
    }
}

impl HttpConn {
    async fn open(host: &str) -> io::Result<HttpConn> {
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Writes a request, reads one response: (status, body, keep-alive).
    async fn round_trip(&mut self, req: &[u8]) -> io::Result<(u16, Vec<u8>, bool)> {
        self.stream.write_all(req).await?;
        self.buf.clear();
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(bad("response head too long"));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| bad("non-UTF-8 response head"))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut len = None;
        let mut keep = true;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    keep = false;
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(bad(
                        "chunked responses are not supported by the bench client",
                    ));
                }
            }
        }
        let len = len.ok_or_else(|| bad("response without Content-Length"))?;
        let mut body = self.buf[head_end..].to_vec();
        while body.len() < len {
            let mut chunk = vec![0u8; (len - body.len()).min(64 * 1024)];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-body",
                ));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
        Ok((status, body, keep))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One GET on a fresh connection (for /metrics); returns the body as text.
pub async fn get(url: &str) -> io::Result<String> {
    let host = host_port(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let path = url
        .strip_prefix("http://")
        .and_then(|r| r.find('/').map(|i| &r[i..]))
        .unwrap_or("/");
    let mut c = HttpConn::open(&host).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (status, body, _) = c.round_trip(req.as_bytes()).await?;
    if status != 200 {
        return Err(io::Error::other(format!("GET {url}: HTTP {status}")));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_of_urls() {
        assert_eq!(
            host_port("http://127.0.0.1:3000").unwrap(),
            "127.0.0.1:3000"
        );
        assert_eq!(host_port("http://localhost/x").unwrap(), "localhost:80");
        assert!(host_port("ws://a:1").is_err());
    }
}
