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
