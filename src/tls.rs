//! TLS for the three listeners (rustls, ring): one certificate and key from
//! PEM files, served by a resolver that swaps an `Arc` when the files change
//! (polled every second, and on SIGHUP), so a renewed certificate is used by
//! the next handshake without a restart and without touching live
//! connections. The gRPC listener can also require client certificates
//! signed by `--grpc-tls-client-ca` (mutual TLS).
//!
//! Handshakes run in each connection's own task, bounded by
//! [`HANDSHAKE_TIMEOUT`], so a client that stalls mid-handshake holds one
//! connection slot for at most that long and never blocks accepting.

use parking_lot::RwLock;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// The certificate files of the node.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

type Stamp = Option<(SystemTime, u64)>;

fn stamp(p: &Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The certificate in force, re-read when its files change. Handshakes read
/// it under a short `parking_lot` read lock (never held across an
/// `.await`); a reload replaces the `Arc` whole.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<((Stamp, Stamp), Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    pub fn open(files: TlsFiles) -> Result<Arc<ReloadingCert>, String> {
        let stamps = (stamp(&files.cert), stamp(&files.key));
        let key = Self::load(&files)?;
        Ok(Arc::new(ReloadingCert {
            files,
            current: RwLock::new((stamps, key)),
        }))
    }

    fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("TLS certificate {}: {e}", files.cert.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "TLS certificate {}: no CERTIFICATE in the file",
                files.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
        let ck = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
            format!(
                "TLS certificate {} and key {}: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
        Ok(Arc::new(ck))
    }

    /// Re-reads the files if either changed (or unconditionally with
    /// `force`, as on SIGHUP). A pair that does not load (a certificate
    /// written before its key, say) keeps the old one and says why.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let stamps = (stamp(&self.files.cert), stamp(&self.files.key));
        if !force && stamps == self.current.read().0 {
            return Ok(false);
        }
        match Self::load(&self.files) {
            Ok(key) => {
                *self.current.write() = (stamps, key);
                Ok(true)
            }
            Err(e) => {
                // Do not retry the same broken files every second.
                self.current.write().0 = stamps;
                Err(e)
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().1.clone())
    }
}

/// An acceptor for one listener: `alpn` names the protocols it speaks
/// (`h2` for gRPC, `http/1.1` for the others); with `client_ca`, clients
/// must present a certificate signed by one of its CAs.
pub fn acceptor(
    cert: Arc<ReloadingCert>,
    alpn: &[&[u8]],
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("client CA {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(format!(
                    "client CA {}: no usable certificate",
                    path.display()
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|e| format!("client CA {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(cert);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
