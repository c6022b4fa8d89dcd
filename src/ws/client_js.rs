//! `/herald.js`: the browser client, for pages on other origins too.
//!
//! A page on `https://app.example.com` that imports the client from its
//! node (`import { connect } from 'https://push.example.com/herald.js'`)
//! fetches it in CORS mode, so the browser runs it only when the response
//! carries `Access-Control-Allow-Origin` for that page. The header follows
//! `--allowed-origin`, the same list that gates the WebSocket handshake:
//!
//! - no list: `Access-Control-Allow-Origin: *` (any page may load it, as any
//!   page may open a socket);
//! - a list: `Vary: Origin` always, and the request's `Origin` echoed when
//!   the list allows it; other origins get no ACAO header (their browsers
//!   refuse the script, as the node would refuse their sockets).
//!
//! `GET` and `HEAD` (same headers, no body) serve the file; `OPTIONS`
//! answers a CORS preflight (an `import` or `<script type="module">` never
//! sends one, a `fetch()` with extra headers does). Credentials are never
//! allowed: the file is public.

use super::*;
use hyper::Method;

/// The client, embedded in the binary.
const HERALD_JS: &str = include_str!("../../clients/js/herald.js");

/// The methods `/herald.js` answers.
const ALLOW: &str = "GET, HEAD, OPTIONS";

/// Answers any request for `/herald.js`.
pub(super) fn serve<B>(req: &Request<B>, origins: &Origins) -> Response<Full<Bytes>> {
    let method = req.method();
    let mut r = if method == Method::GET || method == Method::HEAD {
        // hyper sends a HEAD response's headers (Content-Length included)
        // and drops the body.
        let mut r = respond(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            Bytes::from_static(HERALD_JS.as_bytes()),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else if method == Method::OPTIONS {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD"),
        );
        // Any request header (not `Authorization`, which `*` never covers;
        // no credentials are allowed anyway).
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        r
    } else {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
        r
    };
    cors(req.headers(), origins, r.headers_mut());
    r
}

/// Sets `Access-Control-Allow-Origin` (and `Vary`) as the module doc says.
fn cors(request: &header::HeaderMap, origins: &Origins, out: &mut header::HeaderMap) {
    if origins.is_empty() {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return;
    }
    // The answer depends on Origin: caches must keep one per Origin.
    out.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = request.get(header::ORIGIN) {
        if origin.to_str().is_ok_and(|o| origins.allows(Some(o))) {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(method: Method, origin: Option<&str>, origins: &Origins) -> Response<Full<Bytes>> {
        let mut b = Request::builder().method(method).uri("/herald.js");
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        serve(&b.body(()).unwrap(), origins)
    }

    fn acao(r: &Response<Full<Bytes>>) -> Option<&str> {
        r.headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|v| v.to_str().unwrap())
    }

    #[test]
    fn any_origin_without_a_list_only_allowed_ones_with_it() {
        let none = Origins::default();
        let r = get(Method::GET, Some("https://a.example"), &none);
        assert_eq!(acao(&r), Some("*"));
        assert!(r.headers().get(header::VARY).is_none());

        let list = Origins::parse(&["https://*.example.com".to_string()]).unwrap();
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let r = get(m.clone(), Some("https://app.example.com"), &list);
            assert_eq!(acao(&r), Some("https://app.example.com"), "{m}");
            assert_eq!(r.headers()[header::VARY], "Origin", "{m}");
            let r = get(m.clone(), Some("https://evil.example.org"), &list);
            assert_eq!(acao(&r), None, "{m}");
            assert_eq!(r.headers()[header::VARY], "Origin", "{m}");
        }
        let r = get(Method::GET, None, &list);
        assert_eq!((r.status(), acao(&r)), (StatusCode::OK, None));
    }

    #[test]
    fn other_methods_get_405_with_allow() {
        let r = get(Method::POST, None, &Origins::default());
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], ALLOW);
    }
}
