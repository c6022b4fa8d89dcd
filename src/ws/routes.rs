//! The public listener's plain HTTP routes, beside the WebSocket on `/ws`:
//! `/healthz`, the browser client `/herald.js` ([`super::client_js`]) and
//! the demo page, all embedded in the binary so a node serves them with no
//! files beside it.

use super::*;

/// The demo page: (path, content type, body).
const DEMO: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../clients/js/demo/index.html"),
    ),
    (
        "/demo/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/js/demo/app.js"),
    ),
    (
        "/demo/style.css",
        "text/css; charset=utf-8",
        include_str!("../../clients/js/demo/style.css"),
    ),
];

/// Answers every request of the public listener but the WebSocket
/// handshake.
pub(super) fn serve<B>(req: &Request<B>, origins: &Origins) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (_, "/herald.js") => client_js::serve(req, origins),
        (&hyper::Method::GET, path) => match DEMO.iter().find(|(p, _, _)| *p == path) {
            Some((_, ctype, body)) => {
                let mut r = respond(StatusCode::OK, ctype, Bytes::from_static(body.as_bytes()));
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                r
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}

/// A plain-text response (also the body of a refused handshake).
pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.into()),
    )
}
