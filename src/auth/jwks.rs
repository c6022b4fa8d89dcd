//! The JWKS file: its keys, which of them can verify what, and its reload
//! (the last good keys stay when a new file cannot be used).

use super::*;

/// One verification key, with the algorithm it is pinned to (JWKS keys
/// may name theirs) and its `kid`.
#[derive(Clone)]
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) alg: Option<Algorithm>,
    pub(super) key: DecodingKey,
}

/// A JWKS file and the keys last read from it. Read under a short
/// `parking_lot` read lock (never held across an `.await`); replaced whole
/// when the file changes.
pub(super) struct Jwks {
    pub(super) path: PathBuf,
    pub(super) state: RwLock<(Stamp, Arc<[Key]>)>,
}

/// A file's modification time and length, to notice a change cheaply.
pub(super) type Stamp = Option<(SystemTime, u64)>;

pub(super) fn file_stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// How a key or a JWKS entry is named in messages: its `kid`, quoted and
/// cut to 64 bytes.
pub(super) fn kid_name(kid: Option<&str>) -> String {
    match kid {
        Some(k) => format!("{:?}", crate::protocol::truncate_utf8(k, 64)),
        None => "without a kid".into(),
    }
}

/// Why a well-formed JWKS entry cannot verify a token, if it cannot: it
/// is for encryption (`use`, `key_ops`), or names an algorithm that is
/// not a signature algorithm Herald verifies or does not fit the key.
pub(super) fn unusable(jwk: &Jwk, key: &DecodingKey) -> Option<String> {
    let c = &jwk.common;
    match &c.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(PublicKeyUse::Encryption) => return Some("its use is \"enc\" (encryption)".into()),
        Some(PublicKeyUse::Other(u)) => {
            return Some(format!(
                "its use is {:?}, not \"sig\"",
                crate::protocol::truncate_utf8(u, 32)
            ))
        }
    }
    if let Some(ops) = &c.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Some("its key_ops do not include \"verify\"".into());
        }
    }
    let named = c.key_algorithm?;
    match named.to_string().parse::<Algorithm>() {
        Err(_) => Some(format!(
            "its alg {} is not a signature algorithm Herald verifies ({SUPPORTED_ALGORITHMS})",
            // The name as the file spells it (RSA-OAEP, not RSA_OAEP).
            serde_json::to_value(named)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| named.to_string())
        )),
        Ok(alg) if alg.family() != key.family() => Some(format!(
            "its alg {alg:?} does not fit its {} key",
            family_short(key.family())
        )),
        Ok(_) => None,
    }
}

impl Jwks {
    /// Reads the file. A file that is missing, too large or not a JWKS,
    /// has a malformed key, or has no key that can verify a token is an
    /// error naming the setting and saying why; entries that cannot verify
    /// (encryption keys) are left out with a warning when others can.
    pub(super) fn load(path: &Path) -> Result<Vec<Key>, String> {
        let shown = format!("--jwt-jwks file {}", path.display());
        let len = std::fs::metadata(path)
            .map_err(|e| format!("{shown}: {e}"))?
            .len();
        if len > MAX_JWKS_BYTES {
            return Err(format!(
                "{shown} is {len} bytes; at most {MAX_JWKS_BYTES} are read"
            ));
        }
        let text = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        let set: JwkSet = serde_json::from_slice(&text)
            .map_err(|e| format!("{shown} is not a JWKS ({{\"keys\": [...]}}): {e}"))?;
        if set.keys.is_empty() {
            return Err(format!("{shown} has no keys: no token could be verified"));
        }
        let mut keys = Vec::with_capacity(set.keys.len());
        let mut left_out = Vec::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("{shown}: key {}: {e}", kid_name(kid.as_deref())))?;
            if let Some(why) = unusable(jwk, &key) {
                left_out.push(format!("key {}: {why}", kid_name(kid.as_deref())));
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            keys.push(Key { kid, alg, key });
        }
        if keys.is_empty() {
            return Err(format!(
                "{shown} has no key usable for verifying tokens: {}",
                left_out.join("; ")
            ));
        }
        for why in &left_out {
            tracing::warn!("{shown}: {why}; left out");
        }
        Ok(keys)
    }

    pub(super) fn open(path: &Path) -> Result<Jwks, String> {
        let stamp = file_stamp(path);
        let keys = Self::load(path)?;
        Ok(Jwks {
            path: path.to_path_buf(),
            state: RwLock::new((stamp, keys.into())),
        })
    }

    /// Re-reads the file if its modification time or size changed (or
    /// with `force`). A file that cannot be used (gone, broken, empty, no
    /// usable key) keeps the last good keys and is an error saying why,
    /// once: the same file is not read again until it changes.
    pub(super) fn reload_if_changed(&self, force: bool) -> Result<bool, String> {
        let stamp = file_stamp(&self.path);
        if !force && stamp == self.state.read().0 {
            return Ok(false);
        }
        match Self::load(&self.path) {
            Ok(keys) => {
                *self.state.write() = (stamp, keys.into());
                Ok(true)
            }
            Err(e) => {
                self.state.write().0 = stamp;
                Err(e)
            }
        }
    }

    pub(super) fn keys(&self) -> Arc<[Key]> {
        self.state.read().1.clone()
    }
}
