//! Scoped API keys for gRPC callers.
//!
//! Each key has a name (logged and used as the `key` label of
//! `herald_rpc_total`; the key itself is never logged) and a scope: `send`
//! (SendToUser, SendBatch, Broadcast, MarkRead, MarkUnread, DeleteMessages,
//! ListMessages, DisconnectUser: what a backend does for its users, message
//! contents included), `read` (IsOnline, UnreadCount, Stats: presence and
//! counts, never a message's contents) or `admin` (everything). Keys are held as SHA-256
//! digests and a presented key is compared with every configured digest
//! without an early exit, so neither the length nor the content of a key
//! shows in response times.
//!
//! The interceptor only authenticates (UNAUTHENTICATED for a missing or
//! unknown key) and puts the [`Caller`] into the request's extensions; each
//! RPC checks its scope in `grpc::PushApi::observed` (PERMISSION_DENIED),
//! because a tonic interceptor does not see which method is called.

use sha2::{Digest, Sha256};
use std::sync::Arc;
use tonic::{Request, Status};

/// What a key may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub const SEND: Scopes = Scopes(1);
    pub const READ: Scopes = Scopes(2);
    pub const ALL: Scopes = Scopes(3);

    pub fn allows(self, needed: Scopes) -> bool {
        self.0 & needed.0 == needed.0
    }

    /// `send`, `read`, `admin`, or several joined by `+` (`send+read`).
    pub fn parse(s: &str) -> Option<Scopes> {
        let mut bits = 0;
        for part in s.split('+') {
            bits |= match part {
                "send" => 1,
                "read" => 2,
                "admin" => 3,
                _ => return None,
            };
        }
        Some(Scopes(bits))
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "send",
            2 => "read",
            _ => "admin",
        }
    }
}

/// The shortest key accepted in the `name:scope:key` form.
pub const MIN_SCOPED_KEY_BYTES: usize = 16;

/// One configured key, as parsed from `--api-key`. Its `Debug` shows the
/// name and scope only.
#[derive(Clone)]
pub struct KeySpec {
    pub name: String,
    pub scopes: Scopes,
    digest: [u8; 32],
    /// Written without `:` (the single-key form).
    bare: bool,
}

impl std::fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:<redacted>", self.name, self.scopes.name())
    }
}

/// The valid scopes, as error messages list them.
pub const VALID_SCOPES: &str = "send, read, admin (or several joined by +, as in send+read)";

impl KeySpec {
    /// `name:scope:key` (name of 1 to 64 letters, digits, `-`, `_`, `.`;
    /// scope as in [`Scopes::parse`]; key of at least
    /// [`MIN_SCOPED_KEY_BYTES`], and may itself contain `:`), or a bare key
    /// without `:`, which is named `default` and may call everything (the
    /// form of a single shared key from before scopes existed).
    ///
    /// The rule is exact: a value with a `:` is always read as
    /// `name:scope:key` and refused if it is not one, so a mistyped scope
    /// (`ops:reads:...`) can never become an admin key. A bare key that
    /// contains `:` is written `default:admin:<key>`. Errors never show the
    /// key; they show the name and the scope only when those are short
    /// words (what a typo looks like), never a part that may be a secret.
    pub fn parse(s: &str) -> Result<KeySpec, String> {
        if s.is_empty() {
            return Err("an API key cannot be empty".into());
        }
        let Some((name, rest)) = s.split_once(':') else {
            return Ok(KeySpec {
                name: "default".into(),
                scopes: Scopes::ALL,
                digest: digest(s.as_bytes()),
                bare: true,
            });
        };
        let form = "a value with ':' is read as name:scope:key (a bare key, with every scope, \
                    has no ':'; write one that contains ':' as default:admin:<key>)";
        let Some((scope, key)) = rest.split_once(':') else {
            return Err(format!(
                "the value has one ':' where name:scope:key needs two; {form}"
            ));
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(format!(
                "the name (before the first ':') must be 1 to 64 letters, digits, '-', '_' or \
                 '.'; {form}"
            ));
        }
        let Some(scopes) = Scopes::parse(scope) else {
            let shown = if scope.is_empty() {
                "an empty scope".to_string()
            } else if scope.len() <= 32
                && scope.chars().all(|c| c.is_ascii_alphanumeric() || c == '+')
            {
                format!("the unknown scope {scope:?}")
            } else {
                format!("an unknown scope of {} bytes (not shown)", scope.len())
            };
            return Err(format!(
                "key {name:?} has {shown}: the valid scopes are {VALID_SCOPES}; {form}"
            ));
        };
        if key.len() < MIN_SCOPED_KEY_BYTES {
            return Err(format!(
                "key {name:?}: the key must be at least {MIN_SCOPED_KEY_BYTES} bytes"
            ));
        }
        Ok(KeySpec {
            name: name.to_string(),
            scopes,
            digest: digest(key.as_bytes()),
            bare: false,
        })
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Who made a gRPC call: the name and scope of the key it presented. With
/// no keys configured every call is `anonymous` with every scope.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: Arc<str>,
    pub scopes: Scopes,
}

impl Caller {
    /// The caller the interceptor recorded on a request (anonymous when the
    /// service runs without the interceptor, as in unit tests).
    pub fn of<T>(req: &Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller {
                name: "anonymous".into(),
                scopes: Scopes::ALL,
            })
    }

    /// PERMISSION_DENIED unless this caller's key covers `needed`.
    pub fn check(&self, rpc: &str, needed: Scopes) -> Result<(), Status> {
        if self.scopes.allows(needed) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "API key {:?} has scope {:?}; {rpc} needs a key with scope {:?}",
                &*self.name,
                self.scopes.name(),
                needed.name()
            )))
        }
    }
}

/// gRPC interceptor: with keys configured, every PushService call must carry
/// `authorization: Bearer <key>` naming one of them. Health and reflection
/// are served without it (see `--grpc-open-health`).
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<[(Caller, [u8; 32])]>,
}

impl ApiKeys {
    pub fn new(specs: &[KeySpec]) -> Result<ApiKeys, String> {
        // A list is split at ',': a key that contained one would become two
        // values, and a bare half would be an admin key. So a bare key is
        // only ever the one key of a node.
        if specs.len() > 1 && specs.iter().any(|s| s.bare) {
            return Err(format!(
                "{} API keys given and one is a bare key (no ':'): with several keys write each \
                 as name:scope:key (keys cannot contain ',')",
                specs.len()
            ));
        }
        for (i, a) in specs.iter().enumerate() {
            for b in &specs[..i] {
                if a.name == b.name {
                    return Err(format!("two API keys are named {:?}", a.name));
                }
                if a.digest == b.digest {
                    return Err(format!(
                        "API keys {:?} and {:?} are the same key",
                        b.name, a.name
                    ));
                }
            }
        }
        Ok(ApiKeys {
            keys: specs
                .iter()
                .map(|s| {
                    (
                        Caller {
                            name: s.name.as_str().into(),
                            scopes: s.scopes,
                        },
                        s.digest,
                    )
                })
                .collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller owning `key`. Every configured digest is compared in full
    /// (no early exit), so timing tells nothing about which key came close.
    pub fn identify(&self, key: &[u8]) -> Option<Caller> {
        let d = digest(key);
        let mut found = None;
        for (caller, stored) in self.keys.iter() {
            let diff = stored.iter().zip(&d).fold(0u8, |acc, (x, y)| acc | (x ^ y));
            if diff == 0 {
                found = Some(caller);
            }
        }
        found.cloned()
    }
}

impl tonic::service::Interceptor for ApiKeys {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if self.keys.is_empty() {
            return Ok(req);
        }
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::auth::bearer(v).unwrap_or(""));
        match presented {
            None => {
                metrics::counter!("herald_rpc_unauthenticated_total", "reason" => "missing")
                    .increment(1);
                Err(Status::unauthenticated(
                    "this node requires `authorization: Bearer <api key>` metadata",
                ))
            }
            Some(key) => match self.identify(key.as_bytes()) {
                Some(caller) => {
                    req.extensions_mut().insert(caller);
                    Ok(req)
                }
                None => {
                    // Logged as `rpc.refused` by the in-flight layer,
                    // which knows the method and the peer.
                    metrics::counter!("herald_rpc_unauthenticated_total", "reason" => "wrong_key")
                        .increment(1);
                    Err(Status::unauthenticated(
                        "the API key in `authorization: Bearer <key>` is not one this node knows",
                    ))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scoped_and_bare_keys() {
        let k = KeySpec::parse("ops:read:0123456789abcdef0").unwrap();
        assert_eq!((k.name.as_str(), k.scopes), ("ops", Scopes::READ));
        let k = KeySpec::parse("backend:send+read:0123456789abcdef0").unwrap();
        assert_eq!(k.scopes, Scopes::ALL);
        assert!(KeySpec::parse("ops:read:short")
            .unwrap_err()
            .contains("at least 16"));
        // A bare key: no ':'.
        let k = KeySpec::parse("legacy-key").unwrap();
        assert_eq!((k.name.as_str(), k.scopes), ("default", Scopes::ALL));
        assert!(KeySpec::parse("").is_err());
        // A bare key with ':' is written in the scoped form.
        let k = KeySpec::parse("default:admin:legacy-key:with:colons").unwrap();
        assert_eq!((k.name.as_str(), k.scopes), ("default", Scopes::ALL));
        let keys = ApiKeys::new(&[k]).unwrap();
        assert!(keys.identify(b"legacy-key:with:colons").is_some());
    }

    /// A value with ':' is the scoped form or an error; a typo never
    /// makes an all-scope key, and no error shows the key.
    #[test]
    fn a_value_with_a_colon_is_name_scope_key_or_refused() {
        const KEY: &str = "SECRET0123456789abcdef";
        for (spec, says) in [
            (format!("ops:reads:{KEY}"), "the unknown scope \"reads\""),
            (format!("ops:Read:{KEY}"), "the unknown scope \"Read\""),
            (format!("ops:send+:{KEY}"), "the unknown scope \"send+\""),
            (format!("ops::{KEY}"), "an empty scope"),
            (format!("ops:{KEY}"), "one ':'"),
            (format!(":read:{KEY}"), "the name"),
            (format!("ops team:read:{KEY}"), "the name"),
            (format!("ops:{KEY}{KEY}:{KEY}"), "44 bytes (not shown)"),
            (
                format!("legacy-key:with:{KEY}"),
                "the unknown scope \"with\"",
            ),
        ] {
            let e = KeySpec::parse(&spec).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(!e.contains("SECRET"), "{spec}: {e}");
            if says.contains("scope") {
                assert!(e.contains(VALID_SCOPES), "{spec}: {e}");
            }
        }
    }

    #[test]
    fn identifies_by_full_key_only() {
        let keys = ApiKeys::new(&[
            KeySpec::parse("ops:read:0123456789abcdef0").unwrap(),
            KeySpec::parse("backend:send:fedcba98765432100").unwrap(),
        ])
        .unwrap();
        assert_eq!(&*keys.identify(b"0123456789abcdef0").unwrap().name, "ops");
        assert!(keys.identify(b"0123456789abcdef").is_none());
        assert!(keys.identify(b"0123456789abcdef00").is_none());
        assert!(keys.identify(b"").is_none());
        let ops = keys.identify(b"0123456789abcdef0").unwrap();
        assert!(ops.check("IsOnline", Scopes::READ).is_ok());
        let denied = ops.check("SendToUser", Scopes::SEND).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(ApiKeys::new(&[
            KeySpec::parse("a:read:0123456789abcdef0").unwrap(),
            KeySpec::parse("a:send:0123456789abcdef1").unwrap(),
        ])
        .is_err());
    }
}
