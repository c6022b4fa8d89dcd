//! Security settings on real nodes: scoped API keys, JWT algorithms (HMAC,
//! RSA, EC, Ed25519 from PEM; JWKS with rotation), `aud`/`iss`/lifetime,
//! token expiry on a live socket (4401), the Origin allow-list and the
//! token in `Sec-WebSocket-Protocol`.

mod common;

use common::*;
use herald::apikey::KeySpec;
use herald::proto::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tonic::Code;

const OPS_KEY: &str = "ops-key-0123456789abcdef";
const BACKEND_KEY: &str = "backend-key-0123456789abcdef";
const ADMIN_KEY: &str = "admin-key-0123456789abcdef";

fn keyed(key: &str) -> Option<String> {
    Some(key.to_string())
}

#[tokio::test]
async fn scoped_keys_unauthenticated_vs_permission_denied() {
    let mut a = args();
    a.api_keys = vec![
        KeySpec::parse(&format!("ops:read:{OPS_KEY}")).unwrap(),
        KeySpec::parse(&format!("backend:send:{BACKEND_KEY}")).unwrap(),
        KeySpec::parse(&format!("root:admin:{ADMIN_KEY}")).unwrap(),
    ];
    let node = TestNode::start_on(Backend::Memory, a).await;
    let mut c = node.client().await;
    let user = uid("scoped");
    let send = |key: Option<String>| {
        herald::cli::with_key(
            &key,
            SendToUserRequest {
                user_ids: vec![user.clone()],
                payload_json: "{}".into(),
                ..Default::default()
            },
        )
    };
    // No key, a wrong key, a key one byte short: UNAUTHENTICATED.
    for key in [None, keyed("nope"), keyed(&OPS_KEY[..OPS_KEY.len() - 1])] {
        let e = c.send_to_user(send(key)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // The read-only key may read but not send.
    let e = c.send_to_user(send(keyed(OPS_KEY))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("ops") && e.message().contains("send"),
        "{}",
        e.message()
    );
    let online = c
        .is_online(herald::cli::with_key(
            &keyed(OPS_KEY),
            IsOnlineRequest {
                user_ids: vec![user.clone()],
            },
        ))
        .await
        .unwrap();
    assert!(!online.into_inner().users[0].online);
    // A read key sees presence and counts, never a message's contents, and
    // changes nothing.
    for rpc in [
        "MarkRead",
        "DisconnectUser",
        "Broadcast",
        "ListMessages",
        "MarkUnread",
        "DeleteMessages",
    ] {
        let e = match rpc {
            "ListMessages" => c
                .list_messages(herald::cli::with_key(
                    &keyed(OPS_KEY),
                    ListMessagesRequest {
                        user_id: user.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            "MarkUnread" => c
                .mark_unread(herald::cli::with_key(
                    &keyed(OPS_KEY),
                    MarkUnreadRequest {
                        user_id: user.clone(),
                        message_ids: vec!["1-0".into()],
                    },
                ))
                .await
                .map(|_| ()),
            "DeleteMessages" => c
                .delete_messages(herald::cli::with_key(
                    &keyed(OPS_KEY),
                    DeleteMessagesRequest {
                        user_id: user.clone(),
                        all: true,
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            "MarkRead" => c
                .mark_read(herald::cli::with_key(
                    &keyed(OPS_KEY),
                    MarkReadRequest {
                        user_id: user.clone(),
                        up_to_message_id: "1-0".into(),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            "DisconnectUser" => c
                .disconnect_user(herald::cli::with_key(
                    &keyed(OPS_KEY),
                    DisconnectUserRequest {
                        user_id: user.clone(),
                        reason: String::new(),
                    },
                ))
                .await
                .map(|_| ()),
            _ => c
                .broadcast(herald::cli::with_key(
                    &keyed(OPS_KEY),
                    BroadcastRequest {
                        payload_json: "{}".into(),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{rpc}: {e:?}");
    }
    // The send key may send but not read.
    c.send_to_user(send(keyed(BACKEND_KEY))).await.unwrap();
    let e = c
        .stats(herald::cli::with_key(&keyed(BACKEND_KEY), StatsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Admin does both.
    c.send_to_user(send(keyed(ADMIN_KEY))).await.unwrap();
    c.stats(herald::cli::with_key(&keyed(ADMIN_KEY), StatsRequest {}))
        .await
        .unwrap();
    // Health stays open.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    // Key names label the RPC counter; keys never appear.
    let metrics = node.get("/metrics").await;
    assert!(
        metrics.contains(r#"code="PermissionDenied",key="ops""#)
            || metrics.contains(r#"key="ops""#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"key="backend""#));
    assert!(!metrics.contains(OPS_KEY) && !metrics.contains(BACKEND_KEY));
    node.stop().await;
}

#[tokio::test]
async fn discovery_can_require_a_key() {
    let mut a = args();
    a.api_keys = vec![KeySpec::parse(&format!("ops:read:{OPS_KEY}")).unwrap()];
    a.grpc_auth_discovery = true;
    let node = TestNode::start_on(Backend::Memory, a).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let e = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    health
        .check(herald::cli::with_key(
            &keyed(OPS_KEY),
            tonic_health::pb::HealthCheckRequest::default(),
        ))
        .await
        .unwrap();
    node.stop().await;
}

/// A private key (PKCS#8 PEM) made by openssl, and its public key.
struct KeyPair {
    private: Vec<u8>,
    public: PathBuf,
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("herald-sec-{tag}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn openssl_key(dir: &Path, name: &str, genpkey: &[&str]) -> KeyPair {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let ok = Command::new("openssl")
        .arg("genpkey")
        .args(genpkey)
        .arg("-out")
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs")
        .success();
    assert!(ok, "openssl genpkey {genpkey:?}");
    let ok = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    KeyPair {
        private: std::fs::read(&private).unwrap(),
        public,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, &claims, key).unwrap()
}

/// The HTTP status of a refused handshake, or 101.
async fn handshake_status(node: &TestNode, token: &str) -> u16 {
    match tokio_tungstenite::connect_async(node.ws_url(token, None)).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn rs256_es256_eddsa_tokens_with_audience_issuer_and_lifetime() {
    let dir = temp_dir("pem");
    let rsa = openssl_key(
        &dir,
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let ec = openssl_key(
        &dir,
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let ed = openssl_key(&dir, "ed", &["-algorithm", "ed25519"]);
    let other_rsa = openssl_key(
        &dir,
        "rsa2",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let mut a = args();
    a.jwt_secret = None;
    a.jwt_public_key = vec![rsa.public.clone(), ec.public.clone(), ed.public.clone()];
    a.jwt_audience = vec!["herald".into()];
    a.jwt_issuer = vec!["https://id.example.com".into()];
    a.jwt_max_lifetime = Some(Duration::from_secs(3600));
    let node = TestNode::start_on(Backend::Memory, a).await;
    let claims = |sub: &str| json!({"sub": sub, "exp": now() + 600, "aud": "herald", "iss": "https://id.example.com"});
    let rsa_key = EncodingKey::from_rsa_pem(&rsa.private).unwrap();
    let ec_key = EncodingKey::from_ec_pem(&ec.private).unwrap();
    let ed_key = EncodingKey::from_ed_pem(&ed.private).unwrap();
    for (alg, key) in [
        (Algorithm::RS256, &rsa_key),
        (Algorithm::PS256, &rsa_key),
        (Algorithm::ES256, &ec_key),
        (Algorithm::EdDSA, &ed_key),
    ] {
        let user = uid("pem");
        let t = sign(alg, key, None, claims(&user));
        let mut ws = Ws {
            stream: tokio_tungstenite::connect_async(node.ws_url(&t, None))
                .await
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"))
                .0,
        };
        assert_eq!(ws.next_json().await["user"], user.as_str(), "{alg:?}");
    }
    // Refusals: another RSA key, wrong aud, wrong iss, missing aud, too
    // long a lifetime, an HS256 token (no secret configured), expired.
    let other = EncodingKey::from_rsa_pem(&other_rsa.private).unwrap();
    let mut wrong_aud = claims("u");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("u");
    wrong_iss["iss"] = json!("https://evil.example.com");
    let mut no_aud = claims("u");
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut long = claims("u");
    long["exp"] = json!(now() + 7200);
    let mut expired = claims("u");
    expired["exp"] = json!(now() - 1);
    for (what, t) in [
        (
            "other key",
            sign(Algorithm::RS256, &other, None, claims("u")),
        ),
        ("aud", sign(Algorithm::RS256, &rsa_key, None, wrong_aud)),
        ("iss", sign(Algorithm::ES256, &ec_key, None, wrong_iss)),
        ("no aud", sign(Algorithm::EdDSA, &ed_key, None, no_aud)),
        ("lifetime", sign(Algorithm::RS256, &rsa_key, None, long)),
        (
            "hs256",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(SECRET.as_bytes()),
                None,
                claims("u"),
            ),
        ),
        ("expired", sign(Algorithm::RS256, &rsa_key, None, expired)),
    ] {
        assert_eq!(handshake_status(&node, &t).await, 401, "{what}");
    }
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

fn write_jwks(path: &Path, keys: &[(&str, &EncodingKey, Algorithm)]) {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(kid, k, alg)| {
            let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(k, *alg).unwrap();
            jwk.common.key_id = Some(kid.to_string());
            serde_json::to_value(jwk).unwrap()
        })
        .collect();
    // Write and rename, as a provider's sync job would.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn jwks_selects_by_kid_and_follows_rotation() {
    let dir = temp_dir("jwks");
    let k1 = openssl_key(
        &dir,
        "k1",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let k2 = openssl_key(
        &dir,
        "k2",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let k1 = EncodingKey::from_rsa_pem(&k1.private).unwrap();
    let k2 = EncodingKey::from_ec_pem(&k2.private).unwrap();
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[("k1", &k1, Algorithm::RS256)]);
    let mut a = args();
    a.jwt_secret = None;
    a.jwt_jwks = Some(jwks.clone());
    let node = TestNode::start_on(Backend::Memory, a).await;
    let claims = || json!({"sub": "jwks-user", "exp": now() + 600});
    let t1 = sign(Algorithm::RS256, &k1, Some("k1"), claims());
    let t2 = sign(Algorithm::ES256, &k2, Some("k2"), claims());
    assert_eq!(handshake_status(&node, &t1).await, 101);
    assert_eq!(
        handshake_status(&node, &t2).await,
        401,
        "k2 is not published yet"
    );
    // A token whose kid names k1 but signed by k2 is refused.
    let forged = sign(Algorithm::ES256, &k2, Some("k1"), claims());
    assert_eq!(handshake_status(&node, &forged).await, 401);
    // Rotation: publish k2, retire k1; the node picks it up without restart.
    write_jwks(&jwks, &[("k2", &k2, Algorithm::ES256)]);
    eventually("the rotated JWKS is in force", || async {
        handshake_status(&node, &t2).await == 101
    })
    .await;
    assert_eq!(handshake_status(&node, &t1).await, 401, "k1 is retired");
    // A broken file keeps the last good keys.
    std::fs::write(&jwks, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(handshake_status(&node, &t2).await, 101);
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_token_expiring_on_a_live_socket_closes_it_with_4401() {
    let node = TestNode::start_on(Backend::Memory, args()).await;
    let user = uid("exp");
    let exp = now() + 2;
    let t = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        None,
        json!({"sub": user, "exp": exp}),
    );
    let mut ws = Ws {
        stream: tokio_tungstenite::connect_async(node.ws_url(&t, None))
            .await
            .unwrap()
            .0,
    };
    assert_eq!(ws.next_json().await["type"], "welcome");
    // A second connection with a long-lived token stays.
    let (mut long, _) = node.connect(&user).await;
    let (code, reason, _) = ws.expect_close().await;
    let closed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.contains("fresh token"), "{reason}");
    assert!(
        closed_at >= exp as f64 && closed_at < exp as f64 + 1.5,
        "closed at {closed_at}, exp {exp}"
    );
    long.send_json(json!({"type": "ping"})).await;
    assert_eq!(long.next_json().await["type"], "pong");
    let mut c = node.client().await;
    send(&mut c, &[&user], "{\"after\":1}").await;
    assert_eq!(long.next_of("message").await["data"]["after"], 1);
    node.stop().await;
}

async fn handshake(
    node: &TestNode,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    u16,
> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let _ = node;
    match tokio_tungstenite::connect_async(req).await {
        Ok((stream, resp)) => Ok((Ws { stream }, resp)),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn origin_allow_list_refuses_other_sites_with_403() {
    let mut a = args();
    a.allowed_origin = vec![
        "https://app.example.com".into(),
        "https://*.example.org".into(),
    ];
    let node = TestNode::start_on(Backend::Memory, a).await;
    let url = node.ws_url(&token("origin"), None);
    for (origin, want) in [
        ("https://app.example.com", 101),
        ("https://a.example.org", 101),
        ("https://evil.example.net", 403),
        ("http://app.example.com", 403),
        ("https://example.org", 403),
        ("null", 403),
    ] {
        let got = match handshake(&node, &url, &[("origin", origin)]).await {
            Ok(_) => 101,
            Err(s) => s,
        };
        assert_eq!(got, want, "{origin}");
    }
    // No Origin: not a browser; passes.
    assert!(handshake(&node, &url, &[]).await.is_ok());
    let metrics = node.get("/metrics").await;
    assert!(
        metrics.contains(r#"herald_ws_rejected_total{reason="origin"}"#),
        "{metrics}"
    );
    node.stop().await;
}

#[tokio::test]
async fn token_in_sec_websocket_protocol_and_the_echoed_protocol() {
    let node = TestNode::start_on(Backend::Memory, args()).await;
    let user = uid("proto");
    let url = format!("ws://{}/ws", node.ws);
    let offer = format!("herald.v1, herald.token.{}", token(&user));
    let (mut ws, resp) = handshake(&node, &url, &[("sec-websocket-protocol", &offer)])
        .await
        .expect("accepted");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "herald.v1",
        "only herald.v1 is echoed, never the token"
    );
    assert_eq!(ws.next_json().await["user"], user.as_str());
    // The token without herald.v1: 400 (a browser would fail the echo).
    let only_token = format!("herald.token.{}", token(&user));
    assert_eq!(
        handshake(&node, &url, &[("sec-websocket-protocol", &only_token)])
            .await
            .err(),
        Some(400)
    );
    // A bad token in the protocol header: 401.
    assert_eq!(
        handshake(
            &node,
            &url,
            &[("sec-websocket-protocol", "herald.v1, herald.token.x.y.z")]
        )
        .await
        .err(),
        Some(401)
    );
    // herald.v1 offered with a query token: echoed as well.
    let (_, resp) = handshake(
        &node,
        &node.ws_url(&token(&user), None),
        &[("sec-websocket-protocol", "herald.v1")],
    )
    .await
    .expect("accepted");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "herald.v1"
    );
    node.stop().await;
}

/// Found by the frame parser's property test: an unknown frame type of
/// multi-byte characters made the error message cut panic, which killed
/// the connection task before it could detach.
#[tokio::test]
async fn a_long_unicode_frame_type_is_an_error_frame_not_a_crash() {
    let node = TestNode::start_on(Backend::Memory, args()).await;
    let user = uid("uni");
    let (mut ws, _) = node.connect(&user).await;
    let t = format!("{{\"type\":\"{}\"}}", "é".repeat(150));
    ws.send_text(&t).await;
    let e = ws.next_of("error").await;
    assert_eq!(e["code"], "bad_frame");
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_of("pong").await["type"], "pong");
    node.stop().await;
}

/// The status and body of a refused handshake (101 and "" when accepted).
async fn refusal(node: &TestNode, token: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(node.ws_url(token, None)).await {
        Ok(_) => (101, String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => (
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("{e}"),
    }
}

/// User ids that no backend could address or that would split a log line.
const BAD_USER_IDS: [&str; 4] = ["a\nb", "a\0b", "a\r\nINFO forged line", "\u{1b}[31mred"];

#[tokio::test]
async fn a_token_whose_sub_is_not_a_valid_user_id_is_refused_at_the_handshake() {
    let node = TestNode::start_on(Backend::Memory, args()).await;
    let hs = |sub: &str| {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            None,
            json!({"sub": sub, "exp": now() + 600}),
        )
    };
    for sub in BAD_USER_IDS {
        let (status, body) = refusal(&node, &hs(sub)).await;
        assert_eq!(status, 401, "{sub:?}: {body}");
        assert!(
            body.contains("sub") && body.contains("not a valid user id"),
            "{sub:?}: {body}"
        );
        assert!(body.contains("control character"), "{sub:?}: {body}");
    }
    assert_eq!(refusal(&node, &hs("fine user")).await.0, 101);
    let metrics = node.get("/metrics").await;
    assert!(
        metrics.contains(r#"herald_ws_rejected_total{reason="unauthorized"}"#),
        "{metrics}"
    );
    node.stop().await;
}

#[tokio::test]
async fn grpc_refuses_user_ids_with_control_characters() {
    let node = TestNode::start_on(Backend::Memory, args()).await;
    let mut c = node.client().await;
    for id in BAD_USER_IDS {
        let u = || id.to_string();
        let results = [
            (
                "SendToUser",
                c.send_to_user(SendToUserRequest {
                    user_ids: vec!["ok".into(), u()],
                    payload_json: "{}".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "IsOnline",
                c.is_online(IsOnlineRequest {
                    user_ids: vec![u()],
                })
                .await
                .map(|_| ()),
            ),
            (
                "UnreadCount",
                c.unread_count(UnreadCountRequest {
                    user_id: u(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "ListMessages",
                c.list_messages(ListMessagesRequest {
                    user_id: u(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "DisconnectUser",
                c.disconnect_user(DisconnectUserRequest {
                    user_id: u(),
                    reason: String::new(),
                })
                .await
                .map(|_| ()),
            ),
        ];
        for (rpc, r) in results {
            let e = r.expect_err(rpc);
            assert_eq!(e.code(), Code::InvalidArgument, "{rpc} {id:?}: {e:?}");
            assert!(
                e.message().contains("control character"),
                "{rpc} {id:?}: {}",
                e.message()
            );
        }
    }
    node.stop().await;
}

#[test]
fn herald_token_refuses_a_user_id_with_a_control_character() {
    let token = |user: &str| {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["token", user, "--jwt-secret", SECRET])
            .env_remove("HERALD_JWT_SECRET")
            .output()
            .unwrap()
    };
    // NUL cannot travel in an argument; the rest can.
    for user in ["a\nb", "a\r\nINFO forged line", "\u{1b}[31mred", "a\tb"] {
        let out = token(user);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{user:?} minted a token");
        assert!(out.stdout.is_empty(), "{user:?}");
        assert!(stderr.contains("control character"), "{user:?}: {stderr}");
    }
    let out = token("alice");
    assert!(out.status.success());
    let t = String::from_utf8(out.stdout).unwrap();
    assert_eq!(t.trim().split('.').count(), 3, "{t}");
}

/// Runs `herald serve` (embedded backend, ephemeral ports) with `extra`
/// flags and `env`: its exit status (None if it was still running after
/// 10 s: it started, and was killed) and its standard error.
fn serve_briefly(
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Option<std::process::ExitStatus>, String) {
    let dir = temp_dir("serve");
    let err_path = dir.join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["serve", "--jwt-secret", SECRET])
        .args(["--ws-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("HERALD_API_KEYS")
        .env_remove("HERALD_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (status, stderr)
}

/// `ops:reads:<key>` is a typo of a read key, not a bare admin key named
/// "default"; from a flag, the environment or the config file, the start
/// stops with a message naming the setting, the bad scope and the valid
/// ones, and never the key.
#[test]
fn a_mistyped_api_key_scope_stops_the_start_without_printing_the_key() {
    const KEY: &str = "SECRET-0123456789abcdef";
    let spec = format!("ops:reads:{KEY}");
    let dir = temp_dir("apikey");
    let config = dir.join("herald.toml");
    std::fs::write(&config, format!("api_keys = [\"{spec}\"]\n")).unwrap();
    let cases: [(&str, Vec<&str>, Vec<(&str, &str)>); 3] = [
        ("flag", vec!["--api-keys", &spec], vec![]),
        ("env", vec![], vec![("HERALD_API_KEYS", &spec)]),
        ("config", vec!["--config", config.to_str().unwrap()], vec![]),
    ];
    for (how, flags, env) in cases {
        let (status, stderr) = serve_briefly(&flags, &env);
        let status = status.unwrap_or_else(|| panic!("{how}: started with {spec:?}: {stderr}"));
        assert!(!status.success(), "{how}: {stderr}");
        for want in [
            "--api-keys",
            "HERALD_API_KEYS",
            "api_keys",
            "\"reads\"",
            "send, read, admin",
        ] {
            assert!(stderr.contains(want), "{how}: no {want:?} in: {stderr}");
        }
        assert!(
            !stderr.contains("SECRET"),
            "{how}: the key leaked: {stderr}"
        );
    }
    // A key too short for the scoped form is refused without being shown.
    let (status, stderr) = serve_briefly(&["--api-keys", "ops:read:SECRETshort"], &[]);
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(stderr.contains("at least 16 bytes"), "{stderr}");
    assert!(!stderr.contains("SECRET"), "the key leaked: {stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A JWKS as `write_jwks` makes it, with `edit` applied to each key.
fn write_jwks_edited(
    path: &Path,
    keys: &[(&str, &EncodingKey, Algorithm)],
    edit: impl Fn(&mut serde_json::Value),
) {
    write_jwks(path, keys);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for k in v["keys"].as_array_mut().unwrap() {
        edit(k);
    }
    std::fs::write(path, v.to_string()).unwrap();
}

fn rsa_encoding_key(dir: &Path, name: &str) -> EncodingKey {
    let k = openssl_key(
        dir,
        name,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    EncodingKey::from_rsa_pem(&k.private).unwrap()
}

#[tokio::test]
async fn a_jwks_without_a_usable_key_stops_the_start() {
    let dir = temp_dir("jwks-empty");
    let k1 = rsa_encoding_key(&dir, "k1");
    let jwks = dir.join("jwks.json");
    let start = |path: &Path| {
        let mut a = args();
        a.jwt_secret = None;
        a.jwt_jwks = Some(path.to_path_buf());
        TestNode::try_start_with(a)
    };
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    let err = start(&jwks).await.err().expect("an empty JWKS is refused");
    assert!(
        err.contains("--jwt-jwks") && err.contains("no keys"),
        "{err}"
    );
    // Keys that cannot verify a token: one for encryption, one pinned to
    // an encryption algorithm.
    write_jwks_edited(&jwks, &[("enc", &k1, Algorithm::RS256)], |k| {
        k["use"] = json!("enc")
    });
    let err = start(&jwks)
        .await
        .err()
        .expect("an encryption key is refused");
    assert!(
        err.contains("--jwt-jwks") && err.contains("no key usable") && err.contains("\"enc\""),
        "{err}"
    );
    write_jwks_edited(&jwks, &[("oaep", &k1, Algorithm::RS256)], |k| {
        k["alg"] = json!("RSA-OAEP")
    });
    let err = start(&jwks)
        .await
        .err()
        .expect("an RSA-OAEP key is refused");
    assert!(
        err.contains("no key usable") && err.contains("RSA-OAEP"),
        "{err}"
    );
    // One usable key among unusable ones is enough.
    let k2 = rsa_encoding_key(&dir, "k2");
    write_jwks(&jwks, &[("k2", &k2, Algorithm::RS256)]);
    let node = start(&jwks).await.expect("a usable key starts");
    let t = sign(
        Algorithm::RS256,
        &k2,
        Some("k2"),
        json!({"sub": "u", "exp": now() + 600}),
    );
    assert_eq!(handshake_status(&node, &t).await, 101);
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A JWKS file rewritten empty or broken keeps the last good keys in force;
/// the log says why and `herald_jwks_reloads_total{result="rejected"}`
/// counts it. A good file after that is taken.
#[tokio::test]
async fn a_jwks_reloaded_empty_or_broken_keeps_the_last_good_keys() {
    use std::io::{BufRead, BufReader};
    let dir = temp_dir("jwks-reload");
    let k1 = rsa_encoding_key(&dir, "k1");
    let k2 = rsa_encoding_key(&dir, "k2");
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[("k1", &k1, Algorithm::RS256)]);
    let log_path = dir.join("node.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--node-id", "jwks-reload"])
        .args(["--ws-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .arg("--jwt-jwks")
        .arg(&jwks)
        .env_remove("HERALD_JWT_SECRET")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    while !ready.starts_with("herald ready:") {
        ready.clear();
        assert!(out.read_line(&mut ready).unwrap() > 0, "the node exited");
    }
    std::thread::spawn(move || for _ in out.lines() {});
    let field = |k: &str| -> std::net::SocketAddr {
        let v = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap();
        let v = v.split("://").nth(1).unwrap().trim_end_matches("/ws");
        v.parse().unwrap()
    };
    let (ws, admin) = (field("ws="), field("admin="));
    let status = |t: String| async move {
        match tokio_tungstenite::connect_async(format!("ws://{ws}/ws?token={t}")).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    };
    let claims = || json!({"sub": "jwks-reload", "exp": now() + 600});
    let t1 = || sign(Algorithm::RS256, &k1, Some("k1"), claims());
    let t2 = || sign(Algorithm::RS256, &k2, Some("k2"), claims());
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let rejected = |n: u32| async move {
        http_get(admin, "/metrics").await.contains(&format!(
            "herald_jwks_reloads_total{{result=\"rejected\"}} {n}"
        ))
    };
    assert_eq!(status(t1()).await, 101);
    // Emptied (as a sync job that got an empty answer would): refused.
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    eventually("the empty JWKS is rejected", || async { rejected(1).await }).await;
    let l = log();
    assert!(
        l.contains("JWKS") && l.contains("no keys") && l.contains("last good keys kept"),
        "{l}"
    );
    assert_eq!(status(t1()).await, 101, "k1 is still in force");
    // Broken: refused too, once.
    std::fs::write(&jwks, "{ not json").unwrap();
    eventually("the broken JWKS is rejected", || async {
        rejected(2).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rejected(2).await,
        "a broken file is reported once, not every second"
    );
    assert_eq!(status(t1()).await, 101, "k1 is still in force");
    // A good file again: in force.
    write_jwks(&jwks, &[("k2", &k2, Algorithm::RS256)]);
    eventually("the rotated JWKS is in force", || async {
        status(t2()).await == 101
    })
    .await;
    assert_eq!(status(t1()).await, 401, "k1 is retired");
    assert!(http_get(admin, "/metrics")
        .await
        .contains("herald_jwks_reloads_total{result=\"loaded\"} 1"));
    signal(child.id(), "-TERM");
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A PS256 token for a JWKS key published for RS256 is refused with a body
/// that says so (not that the node has no RSA key); an algorithm Herald
/// does not verify is named as not supported.
#[tokio::test]
async fn a_refused_algorithm_is_named_in_the_401() {
    let dir = temp_dir("alg");
    let k1 = rsa_encoding_key(&dir, "k1");
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[("k1", &k1, Algorithm::RS256)]);
    let mut a = args();
    a.jwt_jwks = Some(jwks);
    let node = TestNode::start_on(Backend::Memory, a).await;
    let claims = || json!({"sub": "alg-user", "exp": now() + 600});
    assert_eq!(
        refusal(&node, &sign(Algorithm::RS256, &k1, Some("k1"), claims()))
            .await
            .0,
        101
    );
    for kid in [Some("k1"), None] {
        let (status, body) = refusal(&node, &sign(Algorithm::PS256, &k1, kid, claims())).await;
        assert_eq!(status, 401, "{kid:?}: {body}");
        assert!(
            body.contains("PS256") && body.contains("RS256") && body.contains("not allowed"),
            "{kid:?}: {body}"
        );
        assert!(!body.contains("has none"), "{kid:?}: {body}");
    }
    // Algorithms outside what Herald verifies.
    for alg in ["ES512", "none", "RSA-OAEP"] {
        let header = base64url(json!({"alg": alg, "kid": "k1"}).to_string().as_bytes());
        let payload = base64url(claims().to_string().as_bytes());
        let (status, body) = refusal(&node, &format!("{header}.{payload}.c2ln")).await;
        assert_eq!(status, 401, "{alg}: {body}");
        assert!(
            body.contains(alg) && body.contains("not supported"),
            "{alg}: {body}"
        );
    }
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
