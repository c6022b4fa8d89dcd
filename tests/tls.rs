//! TLS on real listeners with certificates generated here (rcgen): wss://
//! with a real rustls client, gRPC over TLS with a tonic client, https on
//! the admin listener, a certificate swapped on disk and picked up without
//! a restart (by polling and by SIGHUP), and mutual TLS on gRPC.

mod common;

use common::*;
use herald::proto::push_service_client::PushServiceClient;
use herald::proto::*;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::transport::{Endpoint, Uri};

/// A CA that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("herald test CA {name}"));
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `localhost` and 127.0.0.1: (cert PEM, key PEM, cert DER, key DER).
    fn leaf(
        &self,
        cn: &str,
    ) -> (
        String,
        String,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let der_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.pem(), key.serialize_pem(), cert.der().clone(), der_key)
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.issuer.der().clone()).unwrap();
        r
    }
}

fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

fn client_config(
    ca: &Ca,
    alpn: &[u8],
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca.roots());
    let mut cfg = match client_cert {
        None => b.with_no_client_auth(),
        Some((c, k)) => b.with_client_auth_cert(vec![c], k).unwrap(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// A wss:// connection as `user`; returns the welcome frame's user.
async fn wss_welcome(node: &TestNode, ca: &Ca, user: &str) -> Result<String, String> {
    let tls = tls_connect(node.ws, client_config(ca, b"http/1.1", None))
        .await
        .map_err(|e| e.to_string())?;
    let url = format!(
        "wss://localhost:{}/ws?token={}",
        node.ws.port(),
        token(user)
    );
    let (stream, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut ws = WsTls { stream };
    Ok(ws.welcome_user().await)
}

struct WsTls {
    stream: tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
}

impl WsTls {
    async fn welcome_user(&mut self) -> String {
        use futures_util::StreamExt;
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["type"], "welcome");
                return v["user"].as_str().unwrap().to_string();
            }
        }
    }
}

/// A gRPC client over TLS (ALPN h2), optionally with a client certificate.
async fn grpc_tls(
    node: &TestNode,
    ca: &Ca,
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<PushServiceClient<tonic::transport::Channel>, String> {
    let cfg = client_config(ca, b"h2", client_cert);
    let addr = node.grpc;
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let cfg = cfg.clone();
            async move { tls_connect(addr, cfg).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(PushServiceClient::new(ch))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("herald-tls-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn wss_grpc_and_admin_over_tls_and_a_certificate_reload() {
    let dir = temp_dir();
    let ca1 = Ca::new("one");
    let (cert, key, _, _) = ca1.leaf("herald one");
    let mut a = args();
    a.tls_cert = Some(write(&dir, "cert.pem", &cert));
    a.tls_key = Some(write(&dir, "key.pem", &key));
    let node = TestNode::start_with(a).await;

    // wss:// with a real TLS client.
    assert_eq!(
        wss_welcome(&node, &ca1, "tls-user").await.unwrap(),
        "tls-user"
    );
    // Plain ws:// to the TLS listener fails.
    assert!(
        tokio_tungstenite::connect_async(node.ws_url(&token("x"), None))
            .await
            .is_err()
    );
    // gRPC over TLS.
    let mut c = grpc_tls(&node, &ca1, None).await.unwrap();
    let stats = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.node.unwrap().node_id, node.node_id);
    // Admin over https.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tls_connect(node.admin, client_config(&ca1, b"http/1.1", None))
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    // A new certificate from another CA: clients trusting only the new CA
    // get in once the node has re-read the files, without a restart; the
    // live gRPC channel keeps working.
    let ca2 = Ca::new("two");
    assert!(wss_welcome(&node, &ca2, "u").await.is_err(), "not yet");
    let (cert2, key2, _, _) = ca2.leaf("herald two");
    write(&dir, "key.pem", &key2);
    write(&dir, "cert.pem", &cert2);
    eventually("the new certificate is served", || async {
        wss_welcome(&node, &ca2, "after-reload").await.is_ok()
    })
    .await;
    assert!(
        wss_welcome(&node, &ca1, "u").await.is_err(),
        "old CA no longer matches"
    );
    assert!(grpc_tls(&node, &ca2, None)
        .await
        .unwrap()
        .stats(StatsRequest {})
        .await
        .is_ok());
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn grpc_mutual_tls_needs_a_client_certificate_from_the_ca() {
    let dir = temp_dir();
    let ca = Ca::new("mtls");
    let client_ca = Ca::new("clients");
    let other = Ca::new("other");
    let (cert, key, _, _) = ca.leaf("herald");
    let mut a = args();
    a.tls_cert = Some(write(&dir, "cert.pem", &cert));
    a.tls_key = Some(write(&dir, "key.pem", &key));
    a.grpc_tls_client_ca = Some(write(&dir, "clients.pem", &client_ca.pem()));
    let node = TestNode::start_with(a).await;
    let call = |c: Result<PushServiceClient<tonic::transport::Channel>, String>| async move {
        match c {
            Ok(mut c) => c
                .stats(StatsRequest {})
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        }
    };
    let (_, _, good_cert, good_key) = client_ca.leaf("backend");
    let (_, _, bad_cert, bad_key) = other.leaf("intruder");
    assert!(
        call(grpc_tls(&node, &ca, None).await).await.is_err(),
        "no client cert"
    );
    assert!(
        call(grpc_tls(&node, &ca, Some((bad_cert, bad_key))).await)
            .await
            .is_err(),
        "a client cert from another CA"
    );
    call(grpc_tls(&node, &ca, Some((good_cert, good_key))).await)
        .await
        .unwrap();
    // The public listener does not ask for client certificates.
    assert_eq!(wss_welcome(&node, &ca, "browser").await.unwrap(), "browser");
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_broken_certificate_file_keeps_the_old_one() {
    let dir = temp_dir();
    let ca = Ca::new("keep");
    let (cert, key, _, _) = ca.leaf("herald");
    let mut a = args();
    a.tls_cert = Some(write(&dir, "cert.pem", &cert));
    a.tls_key = Some(write(&dir, "key.pem", &key));
    let node = TestNode::start_with(a).await;
    write(&dir, "cert.pem", "not a certificate");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(wss_welcome(&node, &ca, "still").await.unwrap(), "still");
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_missing_certificate_stops_the_start_with_a_clear_error() {
    let mut a = args();
    a.tls_cert = Some("/nonexistent/cert.pem".into());
    a.tls_key = Some("/nonexistent/key.pem".into());
    let err = TestNode::try_start_with(a).await.err().expect("refused");
    assert!(err.contains("cert.pem"), "{err}");
}

/// SIGHUP re-reads the certificate at once (and does not stop the node,
/// which is the default action of SIGHUP without a handler).
#[tokio::test]
async fn sighup_reloads_the_certificate_in_a_running_process() {
    use std::io::{BufRead, BufReader};
    let dir = temp_dir();
    let ca = Ca::new("hup");
    let (cert, key, _, _) = ca.leaf("herald");
    let cert_path = write(&dir, "cert.pem", &cert);
    let key_path = write(&dir, "key.pem", &key);
    let log_path = dir.join("node.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--jwt-secret", SECRET, "--node-id", "hup"])
        .args(["--ws-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("herald ready: ws=wss://"), "{ready}");
    signal(pid, "-HUP");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    eventually("the SIGHUP reload is logged", || async {
        let l = log();
        l.contains("SIGHUP") && l.contains("TLS certificate reloaded")
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the node"
    );
    signal(pid, "-TERM");
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `herald send --tls-ca` reaches a TLS node; without it, it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_send_over_tls() {
    let dir = temp_dir();
    let ca = Ca::new("send");
    let (cert, key, _, _) = ca.leaf("herald");
    let ca_path = write(&dir, "ca.pem", &ca.pem());
    let mut a = args();
    a.tls_cert = Some(write(&dir, "cert.pem", &cert));
    a.tls_key = Some(write(&dir, "key.pem", &key));
    let node = TestNode::start_with(a).await;
    let send = |tls: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        c.args([
            "send",
            "--grpc-addr",
            &format!("localhost:{}", node.grpc.port()),
        ]);
        c.args(["--user", "cli-tls", "{\"n\":1}"]);
        if tls {
            c.arg("--tls-ca").arg(&ca_path);
        }
        c.env_remove("HERALD_API_KEY").env_remove("HERALD_TLS_CA");
        c.env_remove("HERALD_GRPC_ADDR");
        c.output().unwrap()
    };
    let ok = tokio::task::block_in_place(|| send(true));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("cli-tls\t"));
    let plain = tokio::task::block_in_place(|| send(false));
    assert!(!plain.status.success());
    // Not protocol noise: the error says the node speaks TLS and names the flag.
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(
        said.contains("speaks TLS") && said.contains("--tls-ca"),
        "{said}"
    );
    node.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
