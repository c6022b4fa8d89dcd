//! Authentication of WebSocket clients: JWTs signed with an HMAC secret
//! (HS256/384/512), with RSA, ECDSA or Ed25519 public keys from PEM files
//! (RS*/PS*, ES256/ES384, EdDSA), or with the keys of a JWKS file chosen by
//! the token's `kid` (the file is re-read when it changes, so an identity
//! provider's key rotation needs no restart). `aud`, `iss`, `nbf` and a
//! maximum lifetime are checked when configured.
//!
//! A verified token yields its user and its `exp`; the WebSocket gateway
//! closes the connection with 4401 at `exp` (see `expiry`).

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyOperations, PublicKeyUse};
use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header,
    Validation,
};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod jwks;
use jwks::*;

/// Clock skew tolerated on `nbf`, in seconds. `exp` gets none: a token is
/// refused from the second the node would close its connection, so a client
/// never connects only to be closed again.
const NBF_LEEWAY_SECS: u64 = 30;
/// The longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// The largest JWKS file read, in bytes.
const MAX_JWKS_BYTES: u64 = 1024 * 1024;
/// The algorithms Herald verifies (all that `jsonwebtoken` implements).
const SUPPORTED_ALGORITHMS: &str = "HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Where WebSocket tokens' keys come from and what their claims must say.
#[derive(Clone, Debug, Default)]
pub struct JwtConfig {
    /// HMAC secret (HS256, HS384, HS512).
    pub secret: Option<String>,
    /// PEM public keys (RSA, EC or Ed25519; the kind is read from the file).
    pub public_keys: Vec<PathBuf>,
    /// A JWKS file (`{"keys": [...]}`), keys chosen by `kid`.
    pub jwks: Option<PathBuf>,
    /// Accepted `aud` values; empty: `aud` is not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty: `iss` is not checked.
    pub issuer: Vec<String>,
    /// Longest `exp - iat` (or `exp - now` without `iat`) accepted.
    pub max_lifetime: Option<Duration>,
}

/// Why a token was refused: a stable word for the log (`token_expired`,
/// `token_bad_signature`, `token_audience`, `token_issuer`, ...) and words
/// fit for an HTTP 401 body. Neither ever holds the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: String) -> Refusal {
        Refusal { reason, message }
    }
}

/// A valid token's user and expiry (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub user: String,
    pub exp: u64,
}

/// Verifies client tokens. Built once per node and shared; verification
/// allocates only the decoded header and claims.
#[derive(Clone)]
pub struct TokenVerifier {
    /// The HMAC secret and the PEM public keys.
    fixed: Arc<[Key]>,
    jwks: Option<Arc<Jwks>>,
    audience: Arc<[String]>,
    issuer: Arc<[String]>,
    max_lifetime: Option<Duration>,
    max_user_id_bytes: usize,
}

/// Reads a PEM public key of any supported kind.
fn pem_key(path: &Path) -> Result<DecodingKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("JWT public key {}: {e}", path.display()))?;
    DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .or_else(|_| DecodingKey::from_ed_pem(&pem))
        .map_err(|_| {
            format!(
                "JWT public key {}: not a PEM RSA, EC (P-256/P-384) or Ed25519 public key",
                path.display()
            )
        })
}

fn family_name(f: AlgorithmFamily) -> &'static str {
    match f {
        AlgorithmFamily::Hmac => "an HMAC secret (--jwt-secret)",
        AlgorithmFamily::Rsa => "an RSA public key",
        AlgorithmFamily::Ec => "an EC public key",
        AlgorithmFamily::Ed => "an Ed25519 public key",
    }
}

/// A key family in a word.
fn family_short(f: AlgorithmFamily) -> &'static str {
    match f {
        AlgorithmFamily::Hmac => "HMAC",
        AlgorithmFamily::Rsa => "RSA",
        AlgorithmFamily::Ec => "EC",
        AlgorithmFamily::Ed => "Ed25519",
    }
}

/// The `alg` a token's header names when it is not one Herald verifies
/// (`none`, `ES512`, an encryption algorithm), cut to 32 bytes; None when
/// the header is unreadable for another reason.
fn unsupported_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let head = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let named = value.get("alg")?.as_str()?;
    named
        .parse::<Algorithm>()
        .is_err()
        .then(|| crate::protocol::truncate_utf8(named, 32).to_string())
}

impl TokenVerifier {
    /// An HS256/384/512 verifier for `secret` (tests and simple setups).
    pub fn new(secret: &str, max_user_id_bytes: usize) -> Self {
        Self::from_config(
            &JwtConfig {
                secret: Some(secret.into()),
                ..Default::default()
            },
            max_user_id_bytes,
        )
        .expect("a secret alone is always valid")
    }

    /// Reads the configured key files; an unreadable or unparsable file is
    /// an error naming it.
    pub fn from_config(cfg: &JwtConfig, max_user_id_bytes: usize) -> Result<Self, String> {
        let mut fixed = Vec::new();
        if let Some(s) = &cfg.secret {
            fixed.push(Key {
                kid: None,
                alg: None,
                key: DecodingKey::from_secret(s.as_bytes()),
            });
        }
        for p in &cfg.public_keys {
            fixed.push(Key {
                kid: None,
                alg: None,
                key: pem_key(p)?,
            });
        }
        let jwks = cfg.jwks.as_deref().map(Jwks::open).transpose()?;
        if fixed.is_empty() && jwks.is_none() {
            return Err("no key to verify WebSocket tokens: give --jwt-secret, --jwt-public-key or --jwt-jwks".into());
        }
        Ok(TokenVerifier {
            fixed: fixed.into(),
            jwks: jwks.map(Arc::new),
            audience: cfg.audience.clone().into(),
            issuer: cfg.issuer.clone().into(),
            max_lifetime: cfg.max_lifetime,
            max_user_id_bytes,
        })
    }

    /// Re-reads the JWKS file if it changed (or with `force`, as on
    /// SIGHUP); `Ok(true)` when new keys are in force. An error means the
    /// file changed but cannot be used: the last good keys stay. The node
    /// calls this every second and on SIGHUP.
    pub fn reload_jwks(&self, force: bool) -> Result<bool, String> {
        match &self.jwks {
            Some(j) => j.reload_if_changed(force),
            None => Ok(false),
        }
    }

    /// The user and expiry of a valid token; the error says what is wrong
    /// in words fit for an HTTP 401 body (never echoing the token).
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        self.check(token).map_err(|r| r.message)
    }

    /// [`TokenVerifier::verify`], with a refusal's reason as a stable word
    /// for the log.
    pub fn check(&self, token: &str) -> Result<Verified, Refusal> {
        self.check_at(token, crate::protocol::now_ms() / 1000)
    }

    #[cfg(test)]
    fn verify_at(&self, token: &str, now: u64) -> Result<Verified, String> {
        self.check_at(token, now).map_err(|r| r.message)
    }

    fn check_at(&self, token: &str, now: u64) -> Result<Verified, Refusal> {
        let refuse = Refusal::new;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(refuse(
                "token_malformed",
                format!("token longer than {MAX_TOKEN_BYTES} bytes"),
            ));
        }
        let header = decode_header(token).map_err(|e| match unsupported_alg(token) {
            Some(named) => refuse(
                "token_algorithm",
                format!(
                "token algorithm {named:?} is not supported; Herald verifies {SUPPORTED_ALGORITHMS}"
            ),
            ),
            None => refuse("token_malformed", format!("invalid token: {e}")),
        })?;
        let alg = header.alg;
        let family = alg.family();
        // Candidate keys: the JWKS key named by `kid` if there is one;
        // otherwise every configured key of the algorithm's family. Of
        // those, the keys not pinned to another algorithm.
        let jwks_keys = self.jwks.as_ref().map(|j| j.keys());
        let by_kid: Option<&Key> = match (&header.kid, &jwks_keys) {
            (Some(kid), Some(keys)) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            _ => None,
        };
        let of_family: Vec<&Key> = match by_kid {
            Some(k) => vec![k],
            None => self
                .fixed
                .iter()
                .chain(
                    jwks_keys
                        .iter()
                        .flat_map(|ks| ks.iter())
                        .filter(|k| header.kid.is_none() || k.kid.is_none()),
                )
                .collect(),
        }
        .into_iter()
        .filter(|k| k.key.family() == family)
        .collect();
        let candidates: Vec<&Key> = of_family
            .iter()
            .copied()
            .filter(|k| k.alg.is_none_or(|a| a == alg))
            .collect();
        if candidates.is_empty() {
            let reason = if by_kid.is_none() && header.kid.is_some() && self.jwks.is_some() {
                "token_unknown_key"
            } else {
                "token_algorithm"
            };
            return Err(refuse(
                reason,
                match (by_kid, &header.kid, &self.jwks) {
                    (None, Some(kid), Some(_)) => format!(
                        "token names key id {:?}, which is not in this node's JWKS",
                        crate::protocol::truncate_utf8(kid, 64)
                    ),
                    (Some(k), _, _) if k.key.family() != family => format!(
                        "token is signed with {alg:?}, which needs {}; key {} in this node's JWKS \
                     is an {} key",
                        family_name(family),
                        kid_name(k.kid.as_deref()),
                        family_short(k.key.family())
                    ),
                    _ if !of_family.is_empty() => {
                        // Keys of the right kind, each published for another
                        // algorithm of the family (an RS256 key and a PS256
                        // token): say so, rather than that there is no key.
                        let pins: Vec<String> = of_family
                            .iter()
                            .take(4)
                            .map(|k| {
                                format!(
                                    "key {} allows {:?} only",
                                    kid_name(k.kid.as_deref()),
                                    k.alg.expect("a pinned key")
                                )
                            })
                            .collect();
                        format!(
                        "token is signed with {alg:?}, which is not allowed for this node's {} \
                         keys: {} (the JWKS entry's alg)",
                        family_short(family),
                        pins.join(", ")
                    )
                    }
                    _ => format!(
                        "token is signed with {alg:?}, which needs {}; this node has none for it",
                        family_name(family)
                    ),
                },
            ));
        }
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = false; // checked below, with leeway
        validation.validate_aud = !self.audience.is_empty();
        if !self.audience.is_empty() {
            validation.set_audience(&self.audience);
            validation.required_spec_claims.insert("aud".into());
        }
        if !self.issuer.is_empty() {
            validation.set_issuer(&self.issuer);
            validation.required_spec_claims.insert("iss".into());
        }
        let mut last = None;
        let mut claims = None;
        for k in candidates {
            match decode::<Claims>(token, &k.key, &validation) {
                Ok(d) => {
                    claims = Some(d.claims);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let claims = match (claims, last) {
            (Some(c), _) => c,
            (None, e) => {
                use jsonwebtoken::errors::ErrorKind::*;
                let e = e.expect("at least one candidate was tried");
                return Err(match e.kind() {
                    ExpiredSignature => refuse("token_expired", "token expired".into()),
                    InvalidSignature => refuse(
                        "token_bad_signature",
                        "token signature does not match this node's keys".into(),
                    ),
                    MissingRequiredClaim(c) => refuse(
                        "token_missing_claim",
                        format!("token lacks the required claim {c:?}"),
                    ),
                    InvalidAudience => refuse(
                        "token_audience",
                        "token audience (aud) is not accepted here".into(),
                    ),
                    InvalidIssuer => refuse(
                        "token_issuer",
                        "token issuer (iss) is not accepted here".into(),
                    ),
                    _ => refuse("token_malformed", format!("invalid token: {e}")),
                });
            }
        };
        if claims.exp <= now {
            return Err(refuse("token_expired", "token expired".into()));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + NBF_LEEWAY_SECS) {
            return Err(refuse(
                "token_not_yet_valid",
                "token not valid yet (nbf is in the future)".into(),
            ));
        }
        if let Some(max) = self.max_lifetime {
            // From the earlier of `iat` and now: an `iat` in the future
            // cannot shorten the lifetime on paper.
            let from = claims.iat.map_or(now, |iat| iat.min(now));
            if claims.exp.saturating_sub(from) > max.as_secs() {
                return Err(refuse(
                    "token_lifetime",
                    format!(
                        "token lifetime exceeds this node's maximum of {}",
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        let sub = claims.sub;
        // The same check as a gRPC request's user id: a token cannot make a
        // user that no backend can address.
        crate::protocol::check_user_id(&sub, self.max_user_id_bytes).map_err(|e| {
            refuse(
                "token_bad_subject",
                format!("token subject (sub) is not a valid user id: {e}"),
            )
        })?;
        Ok(Verified {
            user: sub,
            exp: claims.exp,
        })
    }
}

/// Mints a token for `user`, valid for `ttl`.
pub fn mint(secret: &str, user: &str, ttl: Duration) -> String {
    let exp = crate::protocol::now_ms() / 1000 + ttl.as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: user.to_string(),
            exp,
            nbf: None,
            iat: None,
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

/// The credentials of an `authorization: Bearer <credentials>` value; the
/// scheme is case-insensitive (RFC 7235).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
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
        let p =
            std::env::temp_dir().join(format!("herald-jwks-{:08x}.json", rand::random::<u32>()));
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
}
