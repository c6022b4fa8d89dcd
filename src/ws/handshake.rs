//! What a handshake request carries: the token (from
//! `Sec-WebSocket-Protocol`, `Authorization` or `?token=`), `since`, and the
//! subprotocol offer. All of it is untrusted input, read before any upgrade.

use super::*;

/// The protocol a client names in `Sec-WebSocket-Protocol`, and the one the
/// server echoes.
pub const SUBPROTOCOL: &str = "herald.v1";
/// The prefix of the protocol entry that carries a token:
/// `Sec-WebSocket-Protocol: herald.v1, herald.token.<JWT>`. A JWT is made
/// of base64url and dots, which are valid in a protocol token, so browsers
/// can send it without putting it in the URL.
pub const TOKEN_PROTOCOL_PREFIX: &str = "herald.token.";

/// What a handshake request carries: the token (from
/// `Sec-WebSocket-Protocol`, `Authorization` or `?token=`, in that order),
/// `since`, and whether `herald.v1` was offered (then it is echoed).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Credentials<'a> {
    pub token: Option<std::borrow::Cow<'a, str>>,
    pub since: Option<String>,
    pub subprotocol: bool,
}

/// Reads the token, `since` and the subprotocol offer of a handshake
/// request. Errors are fit for a 400 body. The query string is never
/// logged (it may hold a token).
pub(crate) fn credentials<T>(req: &Request<T>) -> Result<Credentials<'_>, String> {
    let mut c = Credentials::default();
    let mut offered_token = None;
    for value in req.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| "Sec-WebSocket-Protocol is not ASCII".to_string())?;
        for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if p == SUBPROTOCOL {
                c.subprotocol = true;
            } else if let Some(t) = p.strip_prefix(TOKEN_PROTOCOL_PREFIX) {
                if offered_token.replace(t).is_some() {
                    return Err("Sec-WebSocket-Protocol carries two tokens".into());
                }
            }
        }
    }
    if offered_token.is_some() && !c.subprotocol {
        return Err(format!(
            "Sec-WebSocket-Protocol: offer {SUBPROTOCOL} along with {TOKEN_PROTOCOL_PREFIX}<JWT> \
             (the server must echo a protocol, and never echoes the token)"
        ));
    }
    let mut query_token = None;
    if let Some(q) = req.uri().query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "token" => query_token = Some(v),
                "since" if !v.is_empty() => c.since = Some(v.into_owned()),
                _ => {}
            }
        }
    }
    c.token = offered_token
        .map(std::borrow::Cow::Borrowed)
        .or_else(|| {
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer)
                .map(std::borrow::Cow::Borrowed)
        })
        .or(query_token);
    Ok(c)
}

#[cfg(test)]
mod tests {
    //! Property tests of the handshake's untrusted inputs: the
    //! `Sec-WebSocket-Protocol` list, `Authorization` and the query string.
    //! Failing inputs are kept in `proptest-regressions/ws/handshake.txt`.
    use super::*;
    use proptest::prelude::*;

    fn request(protocol: Option<&str>, auth: Option<&str>, query: &str) -> Option<Request<()>> {
        let mut b = Request::builder().uri(format!("/ws?{query}"));
        if let Some(p) = protocol {
            b = b.header(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).ok()
    }

    #[test]
    fn token_sources_in_order() {
        let r = request(
            Some("herald.v1, herald.token.AAA.BBB.CCC"),
            Some("Bearer hdr"),
            "token=q&since=1-0",
        )
        .unwrap();
        let c = credentials(&r).unwrap();
        assert_eq!(c.token.as_deref(), Some("AAA.BBB.CCC"));
        assert!(c.subprotocol);
        assert_eq!(c.since.as_deref(), Some("1-0"));
        let r = request(None, Some("bearer hdr"), "token=q").unwrap();
        assert_eq!(credentials(&r).unwrap().token.as_deref(), Some("hdr"));
        let r = request(None, None, "token=q%2Bx").unwrap();
        assert_eq!(credentials(&r).unwrap().token.as_deref(), Some("q+x"));
        let r = request(Some("herald.token.x"), None, "").unwrap();
        assert!(credentials(&r).unwrap_err().contains("herald.v1"));
        let r = request(Some("herald.v1,herald.token.a,herald.token.b"), None, "").unwrap();
        assert!(credentials(&r).unwrap_err().contains("two tokens"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Whatever the headers and query say, reading credentials never
        /// panics, a protocol-borne token needs herald.v1, and a token
        /// found is a substring of what was sent.
        #[test]
        fn credentials_never_panic(
            protocol in proptest::option::of("[ -~]{0,120}"),
            auth in proptest::option::of("[ -~]{0,80}"),
            query in "[ -~&=%]{0,120}",
        ) {
            let Some(req) = request(protocol.as_deref(), auth.as_deref(), &query) else {
                return Ok(()); // not a valid request head: hyper would refuse it
            };
            match credentials(&req) {
                Ok(c) => {
                    if let Some(t) = &c.token {
                        let from_header = protocol.as_deref().is_some_and(|p| p.contains(&**t))
                            || auth.as_deref().is_some_and(|a| a.contains(&**t));
                        prop_assert!(from_header || !query.is_empty());
                        prop_assert!(t.len() <= 240);
                    }
                    if protocol.as_deref().is_some_and(|p| p.split(',').any(|x| x.trim().starts_with(TOKEN_PROTOCOL_PREFIX))) {
                        prop_assert!(c.subprotocol);
                    }
                }
                Err(m) => prop_assert!(m.len() < 300),
            }
        }

        /// Any token text is refused or accepted without panicking, and the
        /// refusal never echoes the token.
        #[test]
        fn token_verification_never_panics(token in "[A-Za-z0-9_\\-.=]{0,400}|\\PC{0,100}") {
            let v = TokenVerifier::new("proptest-secret", 256);
            if let Err(why) = v.verify(&token) {
                prop_assert!(why.len() < 300);
                if token.len() > 8 {
                    prop_assert!(!why.contains(&token));
                }
            }
        }

        /// A minted token verifies exactly when its subject is a valid
        /// user id (`protocol::check_user_id`, the rule gRPC applies too),
        /// and then names that user.
        #[test]
        fn minted_tokens_verify_exactly_when_the_subject_is_a_valid_user_id(
            user in "\\PC{1,64}|[a-z]{0,4}[\\x00-\\x1f\\x7f\\u{85}\\u{2028}\\u{2029}][a-z]{0,4}",
        ) {
            let v = TokenVerifier::new("proptest-secret", 256);
            let t = crate::auth::mint("proptest-secret", &user, Duration::from_secs(60));
            match protocol::check_user_id(&user, 256) {
                Ok(()) => prop_assert_eq!(v.verify(&t).unwrap().user, user),
                Err(_) => prop_assert!(v.verify(&t).unwrap_err().contains("not a valid user id")),
            }
        }
    }
}
