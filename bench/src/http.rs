//! The HTTP side of the bench protocol (`POST /send`, `POST /broadcast` on
//! the comparison servers) and one-off `GET`s of a node's `/metrics` page,
//! over hyper's pooled HTTP/1.1 client.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::io;
use tokio::sync::Semaphore;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client(max_idle: usize) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle)
        .build(conn)
}

/// One node's base URL `http://host:port` and its keep-alive connections.
pub struct HttpPool {
    base: String,
    client: HttpClient,
    /// Requests in flight at once, and so connections open at most (requests
    /// beyond wait).
    slots: Semaphore,
}

/// `http://host:port[/...]` -> `http://host:port`.
pub fn base_url(url: &str) -> Result<String, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: expected http://host:port"));
    }
    let auth = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
    Ok(format!("http://{auth}"))
}

impl HttpPool {
    pub fn new(url: &str, max_conns: usize) -> Result<HttpPool, String> {
        let max_conns = max_conns.max(1);
        Ok(HttpPool {
            base: base_url(url)?,
            client: client(max_conns),
            slots: Semaphore::new(max_conns),
        })
    }

    /// Sends one request with a JSON body and returns (status, body).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> io::Result<(u16, Bytes)> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(io::Error::other)?;
        round_trip(&self.client, req).await
    }
}

async fn round_trip(client: &HttpClient, req: Request<Full<Bytes>>) -> io::Result<(u16, Bytes)> {
    let resp = client.request(req).await.map_err(io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    Ok((status, body))
}

/// One GET (for /metrics); returns the body as text.
pub async fn get(url: &str) -> io::Result<String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{url:?}: {e}")))?;
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(io::Error::other)?;
    let (status, body) = round_trip(&client(0), req).await?;
    if status != 200 {
        return Err(io::Error::other(format!("GET {url}: HTTP {status}")));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::base_url;

    #[test]
    fn base_url_of_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:3000").unwrap(),
            "http://127.0.0.1:3000"
        );
        assert_eq!(base_url("http://localhost/x").unwrap(), "http://localhost");
        assert!(base_url("ws://a:1").is_err());
        assert!(base_url("/just/a/path").is_err());
    }
}
