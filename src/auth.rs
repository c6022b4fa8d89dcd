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
            return Err(self.no_key(alg, header.kid.as_deref(), by_kid, &of_family));
        }
        let claims = decode_claims(token, &candidates, &self.validation(alg))?;
        self.check_claims(claims, now)
    }

    /// Why no configured key may verify a token signed with `alg` (naming
    /// `kid`; `by_kid` is the JWKS key it names, `of_family` the keys of
    /// the algorithm's kind, each pinned to another algorithm).
    fn no_key(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        by_kid: Option<&Key>,
        of_family: &[&Key],
    ) -> Refusal {
        let family = alg.family();
        let reason = if by_kid.is_none() && kid.is_some() && self.jwks.is_some() {
            "token_unknown_key"
        } else {
            "token_algorithm"
        };
        Refusal::new(
            reason,
            match (by_kid, kid, &self.jwks) {
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
        )
    }

    /// What jsonwebtoken checks for this node: the signature, `exp` and
    /// `sub` always, `aud` and `iss` when configured; no leeway (`nbf` is
    /// checked in [`Self::check_claims`], with leeway).
    fn validation(&self, alg: Algorithm) -> Validation {
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
        validation
    }

    /// The checks of the claims that jsonwebtoken does not make (`exp` at
    /// `now`, `nbf` with leeway, the lifetime, the subject as a user id).
    fn check_claims(&self, claims: Claims, now: u64) -> Result<Verified, Refusal> {
        let refuse = Refusal::new;
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

/// Decodes `token` with the first candidate key that verifies it; the
/// refusal says why the last one did not.
fn decode_claims(
    token: &str,
    candidates: &[&Key],
    validation: &Validation,
) -> Result<Claims, Refusal> {
    let refuse = Refusal::new;
    let mut last = None;
    let mut claims = None;
    for k in candidates.iter() {
        match decode::<Claims>(token, &k.key, validation) {
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
    Ok(claims)
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
mod tests;
