//! Certificates for TLS tests against real brokers, made with the `openssl` command: a CA of
//! the test's own and a server certificate for `localhost` / `127.0.0.1` signed by it, so that
//! a test can start a broker with TLS and check that a client trusting that CA connects (and
//! one that does not is refused).

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
