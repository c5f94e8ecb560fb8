//! With no system roots (a scratch or distroless image), a CA given as PEM text
//! ([`AmqpConfig::tls_ca_pem`]) is what the client trusts: the build-time check of a client
//! certificate must count it, where it used to refuse the certificate ("no CA certificate to
//! trust"). One test in a binary of its own: it empties the system's roots for the whole
//! process (`SSL_CERT_FILE` naming an empty file).

use herald_amqp::{AmqpConfig, AmqpTransport, ConfigError};

/// A CA and a client certificate it signed (P-256, valid for a hundred years), made with
/// `openssl` for this test only: nothing here is secret.
const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBiTCCAS+gAwIBAgIUfz70yf+MUH8gKcnpZTxZ8xybLDQwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOaGVyYWxkLXRlc3QtY2EwIBcNMjYxMjA1MTU0OTA5WhgPMjEy
NjExMTExNTQ5MDlaMBkxFzAVBgNVBAMMDmhlcmFsZC10ZXN0LWNhMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEOb3Y/bUHUTNz8irqztgEQa29YB/rF0ORl/mamVIJ
Rsc6rOBo/lGXU1oU/YAYneRO2dHGXRle9MflZ18p+Ln4N6NTMFEwHQYDVR0OBBYE
FNe8vamYeHAWBhtOM77jjVUJfW2RMB8GA1UdIwQYMBaAFNe8vamYeHAWBhtOM77j
jVUJfW2RMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgX5XdVeeY
NQKfuJMIp3I7MmWEaCCWL7Wc8SDdduMrk2YCIQD41bCo2Sz3LJDx5YRXK87mEllO
u6aVVJQpArZqHJ5h4w==
-----END CERTIFICATE-----
";
const CLIENT_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBnDCCAUKgAwIBAgIUYfqDh7TjWLflJX3Z8AloLU2SOSAwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOaGVyYWxkLXRlc3QtY2EwIBcNMjYxMjA1MTU0OTA5WhgPMjEy
NjExMTExNTQ5MDlaMB0xGzAZBgNVBAMMEmhlcmFsZC10ZXN0LWNsaWVudDBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABAs4YpjM9OAu3CXmNG6PHJBh0/SZJoFGcEY4
EekM18o+shbDN9Mr6pDqk8b7WYTZuM4US5FcL6/1udyQygO9HeCjYjBgMBMGA1Ud
JQQMMAoGCCsGAQUFBwMCMAkGA1UdEwQCMAAwHQYDVR0OBBYEFB7C5IIWnEjlSGjL
Oyt/VLftbZGOMB8GA1UdIwQYMBaAFNe8vamYeHAWBhtOM77jjVUJfW2RMAoGCCqG
SM49BAMCA0gAMEUCIQCeWB27TAtF5kfE4DVnCAHH6u0tjauh0jLYE8ORTZGYQwIg
UeHNsfcX2jtRzlVBDEFTFA1Cbmgb7fxlj5gKh3t8yzs=
-----END CERTIFICATE-----
";
const CLIENT_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg9ETeptcDfdIsrS1B
5vhkYjs1vqwtFB7BgbPjdmW9e3ShRANCAAQLOGKYzPTgLtwl5jRujxyQYdP0mSaB
RnBGOBHpDNfKPrIWwzfTK+qQ6pPG+1mE2bjOFEuRXC+v9bnckMoDvR3g
-----END PRIVATE KEY-----
";

#[test]
fn a_ca_given_as_pem_counts_when_the_system_has_no_roots() {
    let dir = std::env::temp_dir().join(format!("herald-amqp-no-roots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key, none) = (
        dir.join("client.pem"),
        dir.join("client.key"),
        dir.join("no-roots.pem"),
    );
    std::fs::write(&cert, CLIENT_CERT).expect("write");
    std::fs::write(&key, CLIENT_KEY).expect("write");
    std::fs::write(&none, "").expect("write");
    std::env::set_var("SSL_CERT_FILE", &none);
    std::env::remove_var("SSL_CERT_DIR");
    let config = AmqpConfig::from_url("amqps://guest:guest@127.0.0.1:5671/%2f")
        .expect("valid URL")
        .tls_client_cert(&cert, &key);
    // Nothing to trust at all: refused, saying where a CA goes.
    match AmqpTransport::new(config.clone()) {
        Err(ConfigError::Invalid { field, reason }) => {
            assert_eq!(field, "tls_client_cert");
            assert!(reason.contains("no CA certificate to trust"), "{reason}");
        }
        other => panic!("no roots and no CA: {other:?}"),
    }
    // The CA as PEM text is trusted.
    AmqpTransport::new(config.tls_ca_pem(CA)).expect("the PEM's CA is trusted");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
