//! How the client subcommands reach a node, and what to do when they
//! cannot: each failure a new user meets (a TLS node reached in plaintext,
//! a CA that did not sign the node's certificate, a node that wants a
//! client certificate, a wrong or missing key, nothing listening) becomes
//! one sentence naming the flag and the variable that fix it.

use crate::config::ClientTls;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::error::Error;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// The rustls client configuration of `tls`, or `None` without `--tls-ca`
/// (plaintext). `alpn` is what the protocol on top needs (`h2` for gRPC).
pub(crate) fn client_config(
    tls: &ClientTls,
    alpn: &[&[u8]],
) -> Result<Option<Arc<ClientConfig>>, String> {
    let Some(ca) = &tls.tls_ca else {
        return Ok(None);
    };
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
    if cas.is_empty() {
        return Err(format!(
            "--tls-ca {}: no PEM certificate in it",
            ca.display()
        ));
    }
    roots.add_parsable_certificates(cas);
    let builder = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut cfg = match (&tls.tls_client_cert, &tls.tls_client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--tls-client-cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--tls-client-key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--tls-client-cert/--tls-client-key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Some(Arc::new(cfg)))
}

/// Every message of an error and its sources, for matching.
fn chain(err: &(dyn Error + 'static)) -> String {
    let mut text = format!("{err} {err:?}");
    let mut cur = err.source();
    while let Some(e) = cur {
        text.push_str(&format!(" | {e} {e:?}"));
        cur = e.source();
    }
    text
}

/// What went wrong reaching `addr` (host:port), in words that say what to
/// do. `tls` is how the client tried.
pub(crate) async fn explain(addr: &str, tls: &ClientTls, err: &(dyn Error + 'static)) -> String {
    let mut text = chain(err);
    if tls.tls_ca.is_some() {
        // A TLS 1.3 server refuses a client certificate after the client's
        // side of the handshake is done, and the channel sees only a broken
        // pipe: a handshake of its own, then a read, shows the alert.
        text.push_str(&tls_probe(addr, tls).await);
    }
    let has = |s: &str| text.contains(s);
    let advice = if has("Connection refused") || has("ConnectionRefused") {
        format!(
            "nothing listens at {addr}: is the node running, and is this its gRPC address \
             (--grpc-addr, HERALD_GRPC_ADDR)?"
        )
    } else if has("failed to lookup address") || has("Name or service not known") {
        format!("cannot resolve the host of {addr}: check --grpc-addr (HERALD_GRPC_ADDR)")
    } else if has("UnknownIssuer") || has("BadSignature") {
        format!(
            "the node's certificate is not signed by the CA in --tls-ca (HERALD_TLS_CA): give \
             the CA that signed the certificate of {addr}"
        )
    } else if has("NotValidForName") {
        format!(
            "the node's certificate does not carry the name in {addr}: connect with a name from \
             its subjectAltName, give one with --tls-server-name (HERALD_TLS_SERVER_NAME), or issue \
             it for this one"
        )
    } else if has("Expired") && has("InvalidCertificate") {
        "the node's certificate has expired (or is not valid yet)".to_string()
    } else if has("CertificateRequired")
        || (tls.tls_client_cert.is_none() && tls.tls_ca.is_some() && has("HandshakeFailure"))
    {
        "the node requires a client certificate (its --grpc-tls-client-ca): give \
         --tls-client-cert and --tls-client-key (HERALD_TLS_CLIENT_CERT, HERALD_TLS_CLIENT_KEY)"
            .to_string()
    } else if has("BadCertificate")
        || has("CertificateUnknown")
        || has("UnknownCA")
        || has("DecryptError")
    {
        "the node refused the client certificate: it must be signed by a CA of the node's \
         --grpc-tls-client-ca"
            .to_string()
    } else if tls.tls_ca.is_some() && (has("InvalidContentType") || has("CorruptMessage")) {
        format!("{addr} does not speak TLS (a node without --tls-cert): leave out --tls-ca (HERALD_TLS_CA)")
    } else if tls.tls_ca.is_none() && speaks_tls(addr).await {
        format!(
            "the node at {addr} speaks TLS: give --tls-ca (HERALD_TLS_CA), the CA that signed its \
             certificate"
        )
    } else if has("timed out") || has("Timeout") || has("deadline") {
        format!("{addr} did not answer in time: is it the node's gRPC address, and reachable?")
    } else {
        format!("cannot reach the node at {addr}")
    };
    let mut deepest: &(dyn Error + 'static) = err;
    while let Some(e) = deepest.source() {
        deepest = e;
    }
    format!("{advice} ({deepest})")
}

/// The TLS error a fresh connection to `addr` meets in its handshake or
/// its first read, if any.
async fn tls_probe(addr: &str, tls: &ClientTls) -> String {
    let Ok(Some(cfg)) = client_config(tls, &[b"h2"]) else {
        return String::new();
    };
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = tls.tls_server_name.as_deref().unwrap_or(host);
    let Ok(name) =
        rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
    else {
        return String::new();
    };
    let probe = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let mut stream = match tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
        {
            Ok(s) => s,
            Err(e) => return Some(format!(" | probe: {e} {e:?}")),
        };
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Err(e) => Some(format!(" | probe: {e} {e:?}")),
            Ok(_) => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Whether `addr` answers a plaintext HTTP/2 preface the way a TLS server
/// answers garbage: with a TLS alert record (content type 21).
async fn speaks_tls(addr: &str) -> bool {
    let probe = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut first = [0u8; 1];
        tcp.read_exact(&mut first).await.ok()?;
        Some(first[0] == 21)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

/// Advice for a status the node returned, after its own message.
pub(crate) fn status_advice(status: &tonic::Status, key_given: bool) -> Option<&'static str> {
    match status.code() {
        tonic::Code::Unauthenticated if !key_given => Some(
            "this node requires an API key: give --api-key (HERALD_API_KEY), the key part of one \
             of the node's name:scope:key",
        ),
        tonic::Code::Unauthenticated => Some(
            "the node does not know this key: HERALD_API_KEY (--api-key) is the key part only, \
             after name:scope: in the node's --api-keys",
        ),
        tonic::Code::PermissionDenied => {
            Some("use a key whose scope covers the call (the node's message names the scope)")
        }
        _ => None,
    }
}
