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

/// A rustls client configuration on ring, trusting the system's roots and the CA certificates
/// of `ca_file` (PEM), if given: for clients that take one, so that no process-wide crypto
/// provider is needed (nor chosen for the application). `hint` names the setting of the CA
/// file, for the error when there is nothing to trust. Errors name the file and the problem.
pub fn client_config(
    ca_file: Option<&std::path::Path>,
    hint: &str,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
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
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
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
