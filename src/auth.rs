//! Authentication: HS256 JWTs for WebSocket clients, and the optional API
//! key interceptor for gRPC callers.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tonic::{Request, Status};

/// Clock skew tolerated on `exp`, in seconds (the protocol allows at most 60).
const LEEWAY_SECS: u64 = 30;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// Verifies client tokens. Built once per node; verification allocates only
/// the decoded claims.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    max_user_id_bytes: usize,
}

impl TokenVerifier {
    pub fn new(secret: &str, max_user_id_bytes: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        // A token that is not valid yet is refused like an expired one.
        validation.validate_nbf = true;
        TokenVerifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            max_user_id_bytes,
        }
    }

    /// The user id (`sub`) of a valid token; the error says what is wrong
    /// in words fit for an HTTP 401 body.
    pub fn verify(&self, token: &str) -> Result<String, String> {
        if token.len() > 8192 {
            return Err("token too long".into());
        }
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            match e.kind() {
                ExpiredSignature => "token expired".to_string(),
                ImmatureSignature => "token not valid yet (nbf is in the future)".to_string(),
                InvalidSignature => {
                    "token signature does not match this cluster's secret".to_string()
                }
                MissingRequiredClaim(c) => format!("token lacks the required claim {c:?}"),
                InvalidAlgorithm => "token must be signed with HS256".to_string(),
                _ => format!("invalid token: {e}"),
            }
        })?;
        let sub = data.claims.sub;
        if sub.is_empty() || sub.len() > self.max_user_id_bytes {
            return Err(format!(
                "token subject must be 1 to {} bytes",
                self.max_user_id_bytes
            ));
        }
        Ok(sub)
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
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

/// gRPC interceptor: with an API key configured, every PushService call must
/// carry `authorization: Bearer <key>`. Health and reflection stay open so
/// probes and grpcurl's service listing work without it.
#[derive(Clone)]
pub struct ApiKey(pub Option<std::sync::Arc<str>>);

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(key) = &self.0 else { return Ok(req) };
        match req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(v)
                if bearer(v).is_some_and(|t| constant_time_eq(t.as_bytes(), key.as_bytes())) =>
            {
                Ok(req)
            }
            Some(_) => Err(Status::unauthenticated(
                "the API key in `authorization: Bearer <key>` is wrong",
            )),
            None => Err(Status::unauthenticated(
                "this node requires `authorization: Bearer <api key>` metadata",
            )),
        }
    }
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let v = TokenVerifier::new("secret-one", 256);
        assert_eq!(
            v.verify(&mint("secret-one", "alice", Duration::from_secs(60)))
                .unwrap(),
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
            },
            &EncodingKey::from_secret(b"secret-one"),
        )
        .unwrap();
        assert!(v.verify(&early).unwrap_err().contains("not valid yet"));
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
