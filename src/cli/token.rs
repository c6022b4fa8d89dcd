//! `herald token` and `herald jwks`: development tokens, HS256 with the
//! nodes' secret or signed with a private key whose public half a node
//! trusts through `--jwt-jwks`. In production the login service or the
//! identity provider mints tokens; these let one machine play that part.

use crate::config::{PrivateKeyArgs, TokenArgs};
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

/// A private key with the algorithm it signs with and its public JWK.
struct SigningKey {
    key: EncodingKey,
    alg: Algorithm,
    jwk: Jwk,
}

/// Reads `--jwt-private-key`: EC P-256 (ES256), P-384 (ES384), Ed25519
/// (EdDSA) or RSA (RS256), found by trying each; a kind that does not fit
/// fails to yield a public key, so the first that does is the key's kind.
fn signing_key(args: &PrivateKeyArgs) -> Result<SigningKey, String> {
    let path = args
        .jwt_private_key
        .as_ref()
        .ok_or("give --jwt-private-key <PEM file> (or HERALD_JWT_PRIVATE_KEY)")?;
    let pem =
        std::fs::read(path).map_err(|e| format!("--jwt-private-key {}: {e}", path.display()))?;
    let tries: [(
        fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>,
        Algorithm,
    ); 4] = [
        (EncodingKey::from_ec_pem, Algorithm::ES256),
        (EncodingKey::from_ec_pem, Algorithm::ES384),
        (EncodingKey::from_ed_pem, Algorithm::EdDSA),
        (EncodingKey::from_rsa_pem, Algorithm::RS256),
    ];
    for (load, alg) in tries {
        let Ok(key) = load(&pem) else { continue };
        let Ok(mut jwk) = Jwk::from_encoding_key(&key, alg) else {
            continue;
        };
        let kid = match &args.jwt_kid {
            Some(k) => k.clone(),
            None => jwk
                .thumbprint(ThumbprintHash::SHA256)
                .map_err(|e| format!("the key's thumbprint: {e}"))?,
        };
        jwk.common.key_id = Some(kid);
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        return Ok(SigningKey { key, alg, jwk });
    }
    Err(format!(
        "--jwt-private-key {}: not a PKCS#8 PEM private key of EC P-256/P-384, Ed25519 or RSA \
         (make one with: openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out idp.key)",
        path.display()
    ))
}

/// The token `herald token` prints: HS256 with `--jwt-secret`, or signed
/// with `--jwt-private-key` and its `kid` in the header.
pub fn token(args: &TokenArgs) -> Result<String, String> {
    if args.key.jwt_private_key.is_none() {
        let secret = args
            .jwt_secret
            .as_deref()
            .ok_or("give --jwt-secret (HERALD_JWT_SECRET) or --jwt-private-key")?;
        let header = Header::new(Algorithm::HS256);
        return sign(&header, args, &EncodingKey::from_secret(secret.as_bytes()));
    }
    let key = signing_key(&args.key)?;
    let mut header = Header::new(key.alg);
    header.kid = key.jwk.common.key_id.clone();
    sign(&header, args, &key.key)
}

fn sign(header: &Header, args: &TokenArgs, key: &EncodingKey) -> Result<String, String> {
    let now = crate::protocol::now_ms() / 1000;
    let mut claims = serde_json::json!({
        "sub": args.user,
        "iat": now,
        "exp": now + args.ttl.as_secs(),
    });
    if let Some(aud) = &args.jwt_audience {
        claims["aud"] = aud.clone().into();
    }
    if let Some(iss) = &args.jwt_issuer {
        claims["iss"] = iss.clone().into();
    }
    encode(header, &claims, key).map_err(|e| e.to_string())
}

/// The JWKS `herald jwks` prints: the public half of `--jwt-private-key`.
pub fn jwks(args: &PrivateKeyArgs) -> Result<String, String> {
    let key = signing_key(args)?;
    serde_json::to_string_pretty(&JwkSet {
        keys: vec![key.jwk],
    })
    .map_err(|e| e.to_string())
}
