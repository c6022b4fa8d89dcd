//! `/herald.js` on the public listener, over a real socket: the file
//! itself, `HEAD`, the CORS preflight, and `Access-Control-Allow-Origin`
//! following `--allowed-origin` (any origin without it; the allowed ones,
//! echoed with `Vary: Origin`, with it).

mod common;

use common::*;
use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HERALD_JS: &str = include_str!("../clients/js/herald.js");

struct Answer {
    status: u16,
    /// Lower-case names; a repeated header's values joined with ", ".
    headers: HashMap<String, String>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One HTTP/1.1 request to the node's public listener, `Connection: close`.
async fn request(node: &TestNode, method: &str, headers: &[(&str, &str)]) -> Answer {
    let mut s = TcpStream::connect(node.ws).await.unwrap();
    let mut head = format!("{method} /herald.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut map: HashMap<String, String> = HashMap::new();
    for l in lines {
        let (k, v) = l.split_once(':').unwrap();
        map.entry(k.trim().to_ascii_lowercase())
            .and_modify(|e| *e = format!("{e}, {}", v.trim()))
            .or_insert_with(|| v.trim().to_string());
    }
    Answer {
        status,
        headers: map,
        body: body.to_string(),
    }
}

#[tokio::test]
async fn without_allowed_origin_any_page_may_load_it() {
    let node = TestNode::start(Backend::Memory).await;
    let page = ("origin", "https://app.example.com");

    let get = request(&node, "GET", &[page]).await;
    assert_eq!(get.status, 200);
    assert_eq!(get.body, HERALD_JS, "the node serves clients/js/herald.js");
    assert_eq!(
        get.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(get.header("access-control-allow-origin"), Some("*"));
    assert_eq!(get.header("vary"), None, "the answer is the same for all");

    // HEAD: GET's headers, no body.
    let head = request(&node, "HEAD", &[page]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");
    assert_eq!(
        head.header("content-length"),
        Some(HERALD_JS.len().to_string().as_str())
    );
    for h in [
        "content-type",
        "cache-control",
        "access-control-allow-origin",
    ] {
        assert_eq!(head.header(h), get.header(h), "{h}");
    }

    // A preflight (a fetch() with extra headers sends one).
    let pre = request(
        &node,
        "OPTIONS",
        &[
            page,
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "x-requested-with"),
        ],
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        pre.header("access-control-allow-methods"),
        Some("GET, HEAD")
    );
    assert_eq!(pre.header("access-control-allow-headers"), Some("*"));

    // Not a browser: no Origin, same answer.
    let bare = request(&node, "GET", &[]).await;
    assert_eq!(bare.status, 200);
    assert_eq!(bare.header("access-control-allow-origin"), Some("*"));

    let post = request(&node, "POST", &[("content-length", "0")]).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD, OPTIONS"));
    node.stop().await;
}

#[tokio::test]
async fn with_allowed_origin_only_allowed_pages_may_load_it() {
    let mut a = args();
    a.allowed_origin = vec![
        "https://app.example.com".into(),
        "https://*.example.org".into(),
    ];
    let node = TestNode::start_on(Backend::Memory, a).await;
    for method in ["GET", "HEAD", "OPTIONS"] {
        let preflight = [("access-control-request-method", "GET")];
        let extra: &[(&str, &str)] = if method == "OPTIONS" { &preflight } else { &[] };
        for (origin, allowed) in [
            ("https://app.example.com", true),
            ("https://a.example.org", true),
            ("https://evil.example.net", false),
            ("http://app.example.com", false),
            ("null", false),
        ] {
            let mut headers = vec![("origin", origin)];
            headers.extend_from_slice(extra);
            let r = request(&node, method, &headers).await;
            let what = format!("{method} from {origin}");
            // The file is public: served either way; the browser decides.
            assert_eq!(
                r.status,
                if method == "OPTIONS" { 204 } else { 200 },
                "{what}"
            );
            assert_eq!(
                r.header("access-control-allow-origin"),
                allowed.then_some(origin),
                "{what}"
            );
            assert_eq!(r.header("vary"), Some("Origin"), "{what}");
            assert_eq!(r.header("access-control-allow-credentials"), None, "{what}");
        }
    }
    let bare = request(&node, "GET", &[]).await;
    assert_eq!(bare.status, 200);
    assert_eq!(bare.body, HERALD_JS);
    assert_eq!(bare.header("access-control-allow-origin"), None);
    assert_eq!(bare.header("vary"), Some("Origin"));
    node.stop().await;
}
