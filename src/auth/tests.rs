//! Unit tests of token verification: keys, algorithms, claims, the
//! JWKS, and the reasons a token is refused.

use super::*;

#[test]
fn round_trip_and_rejections() {
    let v = TokenVerifier::new("secret-one", 256);
    assert_eq!(
        v.verify(&mint("secret-one", "alice", Duration::from_secs(60)))
            .unwrap()
            .user,
        "alice"
    );
    assert!(v
        .verify(&mint("secret-two", "alice", Duration::from_secs(60)))
        .unwrap_err()
        .contains("signature"));
    assert!(v.verify("garbage").is_err());
    // Expired beyond the leeway.
    let exp = crate::protocol::now_ms() / 1000 - 120;
    let old = encode(
        &Header::default(),
        &Claims {
            sub: "a".into(),
            exp,
            nbf: None,
            iat: None,
        },
        &EncodingKey::from_secret(b"secret-one"),
    )
    .unwrap();
    assert_eq!(v.verify(&old).unwrap_err(), "token expired");
    // Not valid before a time beyond the leeway.
    let now = crate::protocol::now_ms() / 1000;
    let early = encode(
        &Header::default(),
        &Claims {
            sub: "a".into(),
            exp: now + 3600,
            nbf: Some(now + 600),
            iat: None,
        },
        &EncodingKey::from_secret(b"secret-one"),
    )
    .unwrap();
    assert!(v.verify(&early).unwrap_err().contains("not valid yet"));
}

#[test]
fn hs384_hs512_lifetime_and_unknown_algorithms() {
    let cfg = JwtConfig {
        secret: Some("secret-one".into()),
        max_lifetime: Some(Duration::from_secs(3600)),
        ..Default::default()
    };
    let v = TokenVerifier::from_config(&cfg, 256).unwrap();
    let now = crate::protocol::now_ms() / 1000;
    let key = EncodingKey::from_secret(b"secret-one");
    let claims = |exp, iat| Claims {
        sub: "a".into(),
        exp,
        nbf: None,
        iat,
    };
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let t = encode(&Header::new(alg), &claims(now + 60, Some(now)), &key).unwrap();
        assert_eq!(v.verify_at(&t, now).unwrap().exp, now + 60, "{alg:?}");
    }
    // Too long a life, with or without iat; a future iat does not help.
    for c in [
        claims(now + 7200, Some(now)),
        claims(now + 7200, None),
        claims(now + 7200, Some(now + 5000)),
    ] {
        let t = encode(&Header::default(), &c, &key).unwrap();
        assert!(v.verify_at(&t, now).unwrap_err().contains("lifetime"));
    }
    // Expiry is exact: no leeway at exp.
    let t = encode(&Header::default(), &claims(now, None), &key).unwrap();
    assert_eq!(v.verify_at(&t, now).unwrap_err(), "token expired");
    // An RS256 header with no RSA key configured.
    let rs = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.c2ln";
    assert!(v.verify(rs).unwrap_err().contains("RSA"));
    assert!(TokenVerifier::from_config(&JwtConfig::default(), 256).is_err());
}

#[test]
fn a_subject_that_is_not_a_valid_user_id_is_refused() {
    let v = TokenVerifier::new("secret-one", 256);
    for sub in ["a\nb", "a\0b", "\u{1b}[2J", "", &"x".repeat(257)] {
        let t = mint("secret-one", sub, Duration::from_secs(60));
        let e = v.verify(&t).unwrap_err();
        assert!(e.contains("not a valid user id"), "{sub:?}: {e}");
    }
    assert_eq!(
        v.verify(&mint("secret-one", "a b", Duration::from_secs(60)))
            .unwrap()
            .user,
        "a b"
    );
}

fn temp_jwks(text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("herald-jwks-{:08x}.json", rand::random::<u32>()));
    std::fs::write(&p, text).unwrap();
    p
}

/// An HMAC JWKS entry (`kty: oct`): enough to test selection, pins and
/// reloads without generating key pairs.
fn oct(kid: &str, secret: &[u8], extra: serde_json::Value) -> serde_json::Value {
    use base64::Engine;
    let mut k = serde_json::json!({
        "kty": "oct",
        "kid": kid,
        "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    });
    k.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    k
}

fn jwks_text(keys: &[serde_json::Value]) -> String {
    serde_json::json!({ "keys": keys }).to_string()
}

fn signed(alg: Algorithm, kid: Option<&str>, secret: &[u8]) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    let exp = crate::protocol::now_ms() / 1000 + 60;
    let c = Claims {
        sub: "u".into(),
        exp,
        nbf: None,
        iat: None,
    };
    encode(&h, &c, &EncodingKey::from_secret(secret)).unwrap()
}

fn jwks_verifier(path: &Path) -> Result<TokenVerifier, String> {
    TokenVerifier::from_config(
        &JwtConfig {
            jwks: Some(path.to_path_buf()),
            ..Default::default()
        },
        256,
    )
}

#[test]
fn a_jwks_without_a_usable_key_is_refused() {
    use serde_json::json;
    for (text, says) in [
        (r#"{"keys": []}"#.to_string(), "has no keys"),
        ("{ not json".to_string(), "is not a JWKS"),
        (
            jwks_text(&[oct("e", b"k", json!({"use": "enc"}))]),
            "use is \"enc\"",
        ),
        (
            jwks_text(&[oct("o", b"k", json!({"alg": "RSA-OAEP"}))]),
            "alg RSA-OAEP is not a signature algorithm",
        ),
        (
            jwks_text(&[oct("r", b"k", json!({"alg": "RS256"}))]),
            "does not fit its HMAC key",
        ),
        (
            jwks_text(&[oct("w", b"k", json!({"key_ops": ["encrypt"]}))]),
            "key_ops",
        ),
    ] {
        let path = temp_jwks(&text);
        let e = jwks_verifier(&path).err().expect(says);
        std::fs::remove_file(&path).unwrap();
        assert!(e.starts_with("--jwt-jwks file "), "{e}");
        assert!(e.contains(says), "{says}: {e}");
    }
    // A usable key among unusable ones is enough; the others are left out.
    let path = temp_jwks(&jwks_text(&[
        oct("e", b"enc-secret", json!({"use": "enc"})),
        oct("s", b"sig-secret", json!({"use": "sig", "alg": "HS256"})),
    ]));
    let v = jwks_verifier(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(v
        .verify(&signed(Algorithm::HS256, Some("s"), b"sig-secret"))
        .is_ok());
    assert!(v
        .verify(&signed(Algorithm::HS256, Some("e"), b"enc-secret"))
        .is_err());
}

#[test]
fn a_jwks_reload_that_cannot_be_used_keeps_the_last_good_keys() {
    let path = temp_jwks(&jwks_text(&[oct("a", b"secret-a", serde_json::json!({}))]));
    let v = jwks_verifier(&path).unwrap();
    let ta = signed(Algorithm::HS256, Some("a"), b"secret-a");
    assert!(v.verify(&ta).is_ok());
    for (text, says) in [
        (r#"{"keys": []}"#, "has no keys"),
        ("{ no", "is not a JWKS"),
    ] {
        std::fs::write(&path, text).unwrap();
        let e = v.reload_jwks(false).unwrap_err();
        assert!(e.contains(says), "{e}");
        assert!(v.verify(&ta).is_ok(), "the last good keys stay");
        // Reported once: the same broken file is not read again.
        assert_eq!(v.reload_jwks(false), Ok(false));
        // SIGHUP reads it again.
        assert!(v.reload_jwks(true).is_err());
    }
    std::fs::remove_file(&path).unwrap();
    assert!(v
        .reload_jwks(false)
        .unwrap_err()
        .contains("--jwt-jwks file"));
    assert!(v.verify(&ta).is_ok(), "a deleted file keeps the keys too");
    std::fs::write(
        &path,
        jwks_text(&[oct("b", b"secret-b", serde_json::json!({}))]),
    )
    .unwrap();
    assert_eq!(v.reload_jwks(false), Ok(true));
    assert!(v.verify(&ta).is_err());
    assert!(v
        .verify(&signed(Algorithm::HS256, Some("b"), b"secret-b"))
        .is_ok());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_refused_algorithm_says_why() {
    let path = temp_jwks(&jwks_text(&[oct(
        "h",
        b"secret-h",
        serde_json::json!({"alg": "HS256"}),
    )]));
    let v = jwks_verifier(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(v
        .verify(&signed(Algorithm::HS256, Some("h"), b"secret-h"))
        .is_ok());
    for kid in [Some("h"), None] {
        let e = v
            .verify(&signed(Algorithm::HS384, kid, b"secret-h"))
            .unwrap_err();
        assert!(
            e.contains("HS384")
                && e.contains("not allowed")
                && e.contains("\"h\" allows HS256 only"),
            "{kid:?}: {e}"
        );
    }
    // A kid naming a key of another kind.
    let rs = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImgifQ.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.c2ln";
    let e = v.verify(rs).unwrap_err();
    assert!(e.contains("RS256") && e.contains("HMAC"), "{e}");
    // Algorithms outside what jsonwebtoken implements.
    for (header, alg) in [
        ("eyJhbGciOiJub25lIn0", "none"),
        ("eyJhbGciOiJFUzUxMiJ9", "ES512"),
    ] {
        let e = v.verify(&format!("{header}.e30.c2ln")).unwrap_err();
        assert!(e.contains(&format!("{alg:?} is not supported")), "{e}");
    }
    assert!(v
        .verify("e30.e30.c2ln")
        .unwrap_err()
        .starts_with("invalid token"));
}

/// Each refusal names its reason in a stable word for the log.
#[test]
fn refusals_name_their_reason() {
    let cfg = JwtConfig {
        secret: Some("secret-one".into()),
        audience: vec!["herald".into()],
        issuer: vec!["https://id.example.com".into()],
        ..Default::default()
    };
    let v = TokenVerifier::from_config(&cfg, 256).unwrap();
    let now = crate::protocol::now_ms() / 1000;
    let signed = |secret: &[u8], claims: serde_json::Value| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let good = serde_json::json!({
        "sub": "a", "exp": now + 60, "aud": "herald", "iss": "https://id.example.com"
    });
    assert_eq!(
        v.check(&signed(b"secret-one", good.clone())).unwrap().user,
        "a"
    );
    let with = |k: &str, val: serde_json::Value| {
        let mut c = good.clone();
        c[k] = val;
        signed(b"secret-one", c)
    };
    for (token, reason) in [
        (with("exp", (now - 120).into()), "token_expired"),
        (with("exp", now.into()), "token_expired"),
        (signed(b"secret-two", good.clone()), "token_bad_signature"),
        (with("aud", "other".into()), "token_audience"),
        (
            with("iss", "https://evil.example.com".into()),
            "token_issuer",
        ),
        (with("nbf", (now + 3600).into()), "token_not_yet_valid"),
        (with("sub", "a\nb".into()), "token_bad_subject"),
        ("garbage".to_string(), "token_malformed"),
        ("x".repeat(MAX_TOKEN_BYTES + 1), "token_malformed"),
    ] {
        let r = v.check(&token).unwrap_err();
        assert_eq!(r.reason, reason, "{}", r.message);
        assert_eq!(v.verify(&token).unwrap_err(), r.message);
    }
}

#[test]
fn bearer_scheme_is_case_insensitive() {
    assert_eq!(bearer("Bearer abc"), Some("abc"));
    assert_eq!(bearer("bearer abc"), Some("abc"));
    assert_eq!(bearer("BEARER  abc "), Some("abc"));
    assert_eq!(bearer("Basic abc"), None);
    assert_eq!(bearer("Bearer "), None);
    assert_eq!(bearer("Bearer"), None);
}
