//! Certificates for TLS tests against real brokers, made with the `openssl` command: a CA of
//! the test's own and a server certificate for `localhost` / `127.0.0.1` signed by it, so that
//! a test can start a broker with TLS and check that a client trusting that CA connects (and
//! one that does not is refused), and a TLS-terminating proxy for brokers without TLS of
//! their own.

use std::path::Path;
use std::process::Command;

/// Writes into `dir`: `ca.pem` and `ca.key` (the CA), `server.pem` and `server.key` (the
/// server's certificate, valid for `localhost` and `127.0.0.1`, and its key), all valid for
/// two days. Panics, naming the `openssl` call and its error, if one fails.
pub fn make_test_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=herald-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write the certificate's extensions file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.pem",
            "-extfile",
            "san.ext",
        ],
    );
}

/// Writes into `dir` (a folder [`make_test_certs`] filled) `client.pem` and `client.key`: a
/// client certificate for `name`, signed by the same CA and made for client authentication,
/// for mutual-TLS tests. Panics as [`make_test_certs`] does.
pub fn make_client_cert(dir: &Path, name: &str) {
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            &subject,
        ],
    );
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write the client certificate's extensions file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "client.pem",
            "-extfile",
            "client.ext",
        ],
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (TLS tests make their own certificates with it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TLS-terminating proxy: takes TLS connections on `127.0.0.1:0` with a certificate made
/// by [`make_test_certs`], and forwards the plain bytes to a target. For brokers that cannot
/// listen with TLS themselves (Tansu 0.6 takes `--cert` and `--key` but does not use them):
/// the broker advertises the proxy's address, so that every connection a client makes goes
/// through TLS.
pub struct TlsProxy {
    addr: std::net::SocketAddr,
    handshakes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    /// Starts the proxy in front of `target`, presenting `server.pem` with `server.key` from
    /// `certs` (a folder [`make_test_certs`] filled).
    pub async fn start(target: &str, certs: &Path) -> std::io::Result<Self> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;

        let invalid = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let chain = CertificateDer::pem_file_iter(certs.join("server.pem"))
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| invalid(&e))?;
        let key =
            PrivateKeyDer::from_pem_file(certs.join("server.key")).map_err(|e| invalid(&e))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&e))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handshakes = Arc::new(AtomicU64::new(0));
        let counted = handshakes.clone();
        let target = target.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, target, counted) =
                    (acceptor.clone(), target.clone(), counted.clone());
                tokio::spawn(async move {
                    // A handshake the client gives up on (a CA it does not trust) just ends.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ended = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            handshakes,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
