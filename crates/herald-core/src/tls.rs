//! Which TLS failures of a connection attempt are a setup mistake, the same for every adapter
//! on rustls: a server certificate the client does not trust, or made out to another name, or
//! a server refusing the client's certificate or every protocol version and cipher it offers.
//! Retrying cannot mend those, so an adapter fails them at once (permanent `TLS_ERROR`).
//!
//! Everything else stays transient: a peer closing mid-handshake (an I/O error, not a rustls
//! one), an internal error or a `close_notify` alert from a node that is stopping (TLS 1.3
//! turns that warning into a fatal alert), a corrupt record.

use rustls::{AlertDescription as Alert, Error};

/// Makes sure rustls has a process-wide crypto provider, for clients that build their TLS
/// settings with it (lapin's rustls-connector, async-nats, redis-rs): when the application has
/// chosen none, ring's (the provider herald's adapters use) becomes the default. Without it,
/// rustls panics in a process whose dependencies bring two providers (ring and aws-lc-rs) and
/// choose none. An application that wants another installs it before building a transport
/// (`CryptoProvider::install_default`), and it is kept.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err: another thread installed one meanwhile, which is as good.
        drop(rustls::crypto::ring::default_provider().install_default());
    }
}

/// A client certificate (mutual TLS): a PEM file with the certificate chain, leaf first, and
/// one with its private key (PKCS#8, PKCS#1 or SEC1). Only the paths: the key is read when a
/// configuration is built, and never shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    /// The certificate chain's PEM file.
    pub cert_file: std::path::PathBuf,
    /// The private key's PEM file.
    pub key_file: std::path::PathBuf,
}

/// The names of the query parameters of [`TlsFiles`]: a CA file, a client certificate and
/// its key, each with the URL part its errors name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsParameterNames {
    names: [&'static str; 3],
    parts: [&'static str; 3],
}

impl TlsParameterNames {
    /// `tlsca`, `tlscert`, `tlskey`: as the `nats` command's options are named (NATS, Redis,
    /// MQTT).
    pub const SHORT: Self = Self {
        names: ["tlsca", "tlscert", "tlskey"],
        parts: ["query tlsca", "query tlscert", "query tlskey"],
    };
    /// `cacertfile`, `certfile`, `keyfile`: RabbitMQ's URI query parameters (AMQP).
    pub const RABBITMQ: Self = Self {
        names: ["cacertfile", "certfile", "keyfile"],
        parts: ["query cacertfile", "query certfile", "query keyfile"],
    };

    /// The three names: CA file, certificate, key.
    pub fn names(&self) -> [&'static str; 3] {
        self.names
    }
}

/// The TLS files a broker URL may name in its query (see [`TlsParameterNames`]): a CA file to
/// trust, and a client certificate with its key, together. Collected while an adapter reads
/// its URL's query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    names: TlsParameterNames,
    ca_file: Option<std::path::PathBuf>,
    cert_file: Option<std::path::PathBuf>,
    key_file: Option<std::path::PathBuf>,
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self::named(TlsParameterNames::SHORT)
    }
}

impl TlsFiles {
    /// None yet, read under these names.
    pub fn named(names: TlsParameterNames) -> Self {
        Self {
            names,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    /// Takes one query parameter: `Ok(true)` if it is one of the three names, `Ok(false)` if
    /// not (the adapter's own, or unknown). An empty path or a parameter given twice is an
    /// error naming it (`query tlsca`, …).
    pub fn take(&mut self, key: &str, value: &str) -> Result<bool, crate::url::UrlError> {
        let TlsParameterNames { names, parts } = self.names;
        let (slot, part) = match names.iter().position(|n| *n == key) {
            Some(0) => (&mut self.ca_file, parts[0]),
            Some(1) => (&mut self.cert_file, parts[1]),
            Some(_) => (&mut self.key_file, parts[2]),
            None => return Ok(false),
        };
        if slot.is_some() {
            return Err(crate::url::UrlError::new(part, "is given twice"));
        }
        if value.is_empty() {
            return Err(crate::url::UrlError::new(
                part,
                "is empty: give the file's path",
            ));
        }
        *slot = Some(value.into());
        Ok(true)
    }

    /// Checks the client certificate once the whole query is read: a certificate without its
    /// key (or the other way round) is an error.
    pub fn check_client_cert(&self) -> Result<Option<ClientCert>, crate::url::UrlError> {
        let TlsParameterNames { names, parts } = self.names;
        match (&self.cert_file, &self.key_file) {
            (None, None) => Ok(None),
            (Some(cert_file), Some(key_file)) => Ok(Some(ClientCert {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            })),
            (Some(_), None) => Err(crate::url::UrlError::new(
                parts[1],
                format!("needs `{}`, the file of its private key", names[2]),
            )),
            (None, Some(_)) => Err(crate::url::UrlError::new(
                parts[2],
                format!("needs `{}`, the file of its certificate", names[1]),
            )),
        }
    }

    /// The CA file to trust.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca_file.as_deref()
    }

    /// The client certificate to present: both of its files, or none (a URL naming only one is
    /// refused when read, see [`TlsFiles::check_client_cert`]).
    pub fn client_cert(&self) -> Option<ClientCert> {
        Some(ClientCert {
            cert_file: self.cert_file.clone()?,
            key_file: self.key_file.clone()?,
        })
    }

    /// Whether any of the three files is named.
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Sets the CA file (a config's setter: the URL, whose printout says what is used, is
    /// where a config keeps its TLS files).
    pub fn set_ca_file(&mut self, path: std::path::PathBuf) {
        self.ca_file = Some(path);
    }

    /// Sets the client certificate (a config's setter, as [`TlsFiles::set_ca_file`]).
    pub fn set_client_cert(&mut self, cert: ClientCert) {
        self.cert_file = Some(cert.cert_file);
        self.key_file = Some(cert.key_file);
    }

    /// Checks the files when a config's transport is built. On a plain-text URL (`tls` false)
    /// they are refused, as `plain_text` says (the URL's TLS scheme and parameters), unless
    /// `plain_text` is `None` (a scheme whose server may ask for TLS, as NATS's). Then the CA
    /// file alone, and the client certificate with it, are read as [`client_config`] reads
    /// them, also trusting `ca_pem` (PEM text given otherwise) if any. The error names the
    /// setting at fault (`tls_ca_file` or `tls_client_cert`) and the problem.
    pub fn check(
        &self,
        tls: bool,
        plain_text: Option<&str>,
        hint: &str,
        ca_pem: Option<&str>,
    ) -> Result<(), (&'static str, String)> {
        let (ca_file, client_cert) = (self.ca_file(), self.client_cert());
        if let (false, Some(why)) = (tls, plain_text) {
            for (field, given) in [
                ("tls_ca_file", ca_file.is_some()),
                ("tls_client_cert", client_cert.is_some()),
            ] {
                if given {
                    return Err((field, why.to_owned()));
                }
            }
        }
        if ca_file.is_some() {
            client_config_trusting(ca_file, ca_pem, None, hint).map_err(|e| ("tls_ca_file", e))?;
        }
        if client_cert.is_some() {
            client_config_trusting(ca_file, ca_pem, client_cert.as_ref(), hint)
                .map_err(|e| ("tls_client_cert", e))?;
        }
        Ok(())
    }

    /// The parameters as the URL gave them, for its printout: `name=PATH` each, the path
    /// percent-encoded but for its `/`.
    pub fn query(&self) -> Vec<String> {
        let mut out = Vec::new();
        let [ca, cert, key] = self.names.names;
        for (name, path) in [
            (ca, &self.ca_file),
            (cert, &self.cert_file),
            (key, &self.key_file),
        ] {
            if let Some(p) = path {
                out.push(format!(
                    "{name}={}",
                    crate::url::percent_encode_keeping_slashes(&p.to_string_lossy())
                ));
            }
        }
        out
    }
}

/// A rustls client configuration on ring, trusting the system's roots and the CA certificates
/// of `ca_file` (PEM), if given, and presenting `client_cert`, if given: for clients that take
/// one, so that no process-wide crypto provider is needed (nor chosen for the application).
/// `hint` names the setting of the CA file, for the error when there is nothing to trust.
/// Errors name the file and the problem, never a key's contents.
pub fn client_config(
    ca_file: Option<&std::path::Path>,
    client_cert: Option<&ClientCert>,
    hint: &str,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    client_config_trusting(ca_file, None, client_cert, hint)
}

/// [`client_config`], also trusting the certificates of `ca_pem` (PEM text; one rustls cannot
/// use is skipped, as the system's are).
fn client_config_trusting(
    ca_file: Option<&std::path::Path>,
    ca_pem: Option<&str>,
    client_cert: Option<&ClientCert>,
    hint: &str,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
        let _skipped = roots.add(cert);
    }
    for cert in CertificateDer::pem_slice_iter(ca_pem.unwrap_or_default().as_bytes()).flatten() {
        let _skipped = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in certs {
            let cert =
                cert.map_err(|e| format!("the CA file {} is not PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("a certificate of {} is unusable: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "the CA file {} holds no certificate",
                path.display()
            ));
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "no CA certificate to trust: the system has none; give one with {hint}"
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(ClientCert {
            cert_file,
            key_file,
        }) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .map_err(|e| {
                    format!(
                        "cannot read the client certificate file {}: {e}",
                        cert_file.display()
                    )
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    format!(
                        "the client certificate file {} is not PEM: {e}",
                        cert_file.display()
                    )
                })?;
            if chain.is_empty() {
                return Err(format!(
                    "the client certificate file {} holds no certificate",
                    cert_file.display()
                ));
            }
            // The error of a key that does not parse says which file, not what is in it.
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
                rustls_pki_types::pem::Error::Io(e) => format!(
                    "cannot read the client key file {}: {e}",
                    key_file.display()
                ),
                _ => format!(
                    "the client key file {} holds no private key in PEM (PKCS#8, PKCS#1 or SEC1; \
                     an encrypted key is not supported)",
                    key_file.display()
                ),
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "the client certificate {} and key {} cannot be used together: {e}",
                    cert_file.display(),
                    key_file.display()
                )
            })?
        }
    };
    Ok(std::sync::Arc::new(config))
}

/// Whether rustls refused the handshake for a reason retrying cannot mend.
pub fn refused_for_good(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidCertificate(_)
            | Error::NoCertificatesPresented
            | Error::UnsupportedNameType
            | Error::PeerIncompatible(_)
            | Error::AlertReceived(
                Alert::HandshakeFailure
                    | Alert::BadCertificate
                    | Alert::UnsupportedCertificate
                    | Alert::CertificateRevoked
                    | Alert::CertificateExpired
                    | Alert::CertificateUnknown
                    | Alert::UnknownCA
                    | Alert::AccessDenied
                    | Alert::ProtocolVersion
                    | Alert::InsufficientSecurity
                    | Alert::CertificateRequired
                    | Alert::UnrecognisedName
            )
    )
}

/// Whether an I/O error carries such a refusal (tokio-rustls and futures-rustls report a
/// failed handshake as an I/O error holding the rustls error).
pub fn io_refused_for_good(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(refused_for_good)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    #[test]
    fn tls_files_are_taken_from_a_query_and_checked_together() {
        let mut files = TlsFiles::default();
        assert_eq!(files.take("stream", "S"), Ok(false));
        assert_eq!(files.take("tlscert", "/c.pem"), Ok(true));
        assert_eq!(
            files.check_client_cert().map_err(|e| e.part),
            Err("query tlscert")
        );
        assert_eq!(files.take("tlskey", "/c.key"), Ok(true));
        assert_eq!(
            files.take("tlskey", "/d.key").map_err(|e| e.part),
            Err("query tlskey")
        );
        assert_eq!(
            files.take("tlsca", "").map_err(|e| e.part),
            Err("query tlsca")
        );
        assert_eq!(
            files.check_client_cert(),
            Ok(Some(ClientCert {
                cert_file: "/c.pem".into(),
                key_file: "/c.key".into()
            }))
        );
        assert_eq!(files.query(), ["tlscert=/c.pem", "tlskey=/c.key"]);
        let mut rabbit = TlsFiles::named(TlsParameterNames::RABBITMQ);
        assert_eq!(rabbit.take("tlsca", "/ca.pem"), Ok(false));
        assert_eq!(rabbit.take("keyfile", "/k.pem"), Ok(true));
        let e = rabbit.check_client_cert().expect_err("no certfile");
        assert_eq!(e.part, "query keyfile");
        assert!(e.reason.contains("`certfile`"), "{}", e.reason);
    }

    #[test]
    fn a_client_certificate_s_files_are_named_in_errors_and_the_key_is_not_shown() {
        let dir = std::env::temp_dir().join(format!("herald-core-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = dir.join("c.key");
        // A "key" whose text would show if an error quoted the file.
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleQ!!\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let cert = dir.join("c.pem");
        std::fs::write(&cert, "no certificate here\n").expect("write");
        let with = |cert_file: &std::path::Path, key_file: &std::path::Path| {
            client_config(
                None,
                Some(&ClientCert {
                    cert_file: cert_file.into(),
                    key_file: key_file.into(),
                }),
                "-",
            )
            .err()
            .unwrap_or_default()
        };
        let e = with(&dir.join("missing.pem"), &key);
        assert!(e.contains("missing.pem"), "{e}");
        let e = with(&cert, &key);
        assert!(e.contains("c.pem") && e.contains("no certificate"), "{e}");
        // A file with a certificate block gets the key read (the block is not parsed yet).
        let bundle = dir.join("chain.pem");
        std::fs::write(
            &bundle,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = with(&bundle, &key);
        assert!(e.contains("c.key") && !e.contains("c2VjcmV0"), "{e}");
        let _removed = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn setup_mistakes_are_for_good_and_the_rest_is_not() {
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        for e in [
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            Error::InvalidCertificate(CertificateError::NotValidForName),
            Error::InvalidCertificate(CertificateError::Expired),
            Error::AlertReceived(Alert::HandshakeFailure),
            Error::AlertReceived(Alert::UnknownCA),
        ] {
            assert!(io_refused_for_good(&io(e.clone())), "{e}");
        }
        for e in [
            Error::AlertReceived(Alert::CloseNotify),
            Error::AlertReceived(Alert::InternalError),
            Error::DecryptError,
            Error::General("invalid peer certificate: UnknownIssuer".into()),
            Error::FailedToGetRandomBytes,
        ] {
            assert!(!io_refused_for_good(&io(e.clone())), "{e}");
        }
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(!io_refused_for_good(&eof));
    }
}
