//! NKey authentication: a user's NKey seed alone (`nkey` users in the server's config) or a
//! `.creds` file (a user JWT and its seed: decentralised JWT authentication, as NGS / Synadia
//! Cloud and `nsc` set up). The client proves who it is by signing the nonce the server sends
//! in its INFO with the seed.
//!
//! The files are read when the transport is built (so a missing or malformed one is an error
//! then, naming the file) and again for every new connection (so a rotated `.creds` file is
//! picked up without a restart). The seed stays in memory as the `nkeys::KeyPair` of each
//! connection's client, for as long as that client lives (its auth callback signs with it);
//! it never appears in an error, a log or `Debug`.
//!
//! async-nats can read `.creds` files itself, but only through its own JWT callback, which the
//! auth callback herald needs (to refuse the client's own reconnect, see `connection.rs`)
//! overrides. So herald parses the file's two blocks itself, as every NATS client does: the
//! first block whose header names a `JWT`, and the one whose header names a `SEED`.

use std::path::{Path, PathBuf};

/// Which file proves the client's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyFile {
    /// A `.creds` file: `-----BEGIN NATS USER JWT-----` and `-----BEGIN USER NKEY SEED-----`
    /// blocks.
    Creds(PathBuf),
    /// A file holding a user's NKey seed (`SU…`), alone or in a decorated block.
    Nkey(PathBuf),
}

impl KeyFile {
    pub(crate) fn path(&self) -> &Path {
        match self {
            Self::Creds(p) | Self::Nkey(p) => p,
        }
    }

    /// The setting that names it, for errors.
    pub(crate) fn setting(&self) -> &'static str {
        match self {
            Self::Creds(_) => "credentials_file",
            Self::Nkey(_) => "nkey_seed_file",
        }
    }

    /// Reads and checks the file. The error names the file and what is wrong with it, never
    /// its contents.
    pub(crate) fn load(&self) -> Result<Signer, String> {
        let path = self.path();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (jwt, seed) = match self {
            Self::Creds(_) => {
                let jwt = block(&text, "JWT").ok_or_else(|| {
                    format!(
                        "{} holds no `-----BEGIN NATS USER JWT-----` block: is it a .creds file?",
                        path.display()
                    )
                })?;
                let seed = block(&text, "SEED").ok_or_else(|| {
                    format!(
                        "{} holds no `-----BEGIN USER NKEY SEED-----` block: is it a .creds file?",
                        path.display()
                    )
                })?;
                (Some(jwt.to_owned()), seed)
            }
            // A bare seed, or one in a decorated block (as `nsc` writes them).
            Self::Nkey(_) => {
                let seed = block(&text, "SEED").unwrap_or_else(|| text.trim());
                (None, seed)
            }
        };
        let key = nkeys::KeyPair::from_seed(seed).map_err(|_| {
            format!(
                "{} holds no valid NKey seed (a seed starts with `S`, a user's with `SU`)",
                path.display()
            )
        })?;
        let kind = match key.key_pair_type() {
            nkeys::KeyPairType::User => {
                if let Some(jwt) = &jwt {
                    check_subject(path, jwt, &key)?;
                }
                return Ok(Signer { jwt, key });
            }
            nkeys::KeyPairType::Account => "an account's",
            nkeys::KeyPairType::Operator => "an operator's",
            nkeys::KeyPairType::Server => "a server's",
            nkeys::KeyPairType::Cluster => "a cluster's",
            _ => "another kind of key's",
        };
        Err(format!(
            "{} holds {kind} seed, not a user's (`SU…`): a client signs in as a user",
            path.display(),
        ))
    }
}

/// Checks that a `.creds` file's JWT names the user of its seed: the server would refuse the
/// pair ("authorization violation") on every connection, and say less. A user's public key is
/// not secret; the error names both.
fn check_subject(path: &Path, jwt: &str, key: &nkeys::KeyPair) -> Result<(), String> {
    use base64::engine::{general_purpose::URL_SAFE_NO_PAD, Engine as _};
    let subject = jwt
        .split('.')
        .nth(1)
        .and_then(|claims| URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok())
        .and_then(|claims| serde_json::from_slice::<serde_json::Value>(&claims).ok())
        .and_then(|claims| claims.get("sub")?.as_str().map(str::to_owned))
        .ok_or_else(|| {
            format!(
                "{}: its JWT cannot be read (no claims with a `sub`): is it a user's JWT?",
                path.display()
            )
        })?;
    let public = key.public_key();
    if subject != public {
        return Err(format!(
            "{}: its JWT is for the user {subject}, its seed is the user {public}'s: a .creds \
             file holds one user's JWT and seed",
            path.display()
        ));
    }
    Ok(())
}

/// The content line of the first `-----BEGIN …-----` block whose header names `what`.
fn block<'a>(text: &'a str, what: &str) -> Option<&'a str> {
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with("---") && line.contains("BEGIN") && line.contains(what) {
            return lines
                .find(|l| !l.is_empty())
                .filter(|l| !l.starts_with("---"));
        }
    }
    None
}

/// Loads the configured key file, if any, for a new connection. It was good when the transport
/// was built: one missing or bad now is most likely being rotated (written in place, not
/// renamed into place), so the attempt fails transiently (`CREDENTIALS_FILE`) and is retried
/// with the reconnect backoff until the delivery timeout.
pub(crate) fn signer_for(
    config: &crate::NatsConfig,
) -> Result<Option<std::sync::Arc<Signer>>, herald_core::TransportError> {
    config
        .url
        .key_file
        .as_ref()
        .map(|f| f.load().map(std::sync::Arc::new))
        .transpose()
        .map_err(|e| herald_core::TransportError::transient(e).with_code("CREDENTIALS_FILE"))
}

/// What the client sends in its CONNECT for `nonce`: the URL's user and password or token, or
/// the key file's proof.
pub(crate) fn answer(
    credentials: &crate::url::Credentials,
    signer: Option<&Signer>,
    nonce: &[u8],
) -> Result<async_nats::Auth, async_nats::AuthError> {
    let mut auth = credentials.to_auth();
    if let Some(signer) = signer {
        signer.sign(nonce, &mut auth)?;
    }
    Ok(auth)
}

/// What signs a server's nonce.
pub(crate) struct Signer {
    jwt: Option<String>,
    key: nkeys::KeyPair,
}

impl Signer {
    /// Fills in `auth` for a CONNECT answering `nonce`: the user JWT and the signature
    /// (`.creds`), or the public key and the signature (an NKey alone).
    pub(crate) fn sign(
        &self,
        nonce: &[u8],
        auth: &mut async_nats::Auth,
    ) -> Result<(), async_nats::AuthError> {
        let signature = self
            .key
            .sign(nonce)
            .map_err(|_| async_nats::AuthError::new("herald: signing the server's nonce failed"))?;
        auth.signature = Some(signature);
        match &self.jwt {
            Some(jwt) => auth.jwt = Some(jwt.clone()),
            None => auth.nkey = Some(self.key.public_key()),
        }
        Ok(())
    }

    /// The key's public half (`U…`).
    #[cfg(test)]
    pub(crate) fn public_key(&self) -> String {
        self.key.public_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of the test's own, removed when dropped.
    struct Folder(PathBuf);

    impl Folder {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "herald-nats-auth-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&dir).expect("dir");
            Self(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _removed = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A JWT (unsigned: only its claims are read here) for the user `subject`.
    fn jwt_for(subject: &str) -> String {
        use base64::engine::{general_purpose::URL_SAFE_NO_PAD, Engine as _};
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"{subject}","nats":{{}}}}"#));
        format!("eyJhbGciOi.{claims}.c2ln")
    }

    /// A `.creds` file as `nsc` writes it.
    fn creds_text(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }

    #[test]
    fn creds_and_seed_files_are_read_and_sign_the_nonce() {
        let dir = Folder::new();
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().expect("seed");
        let jwt = jwt_for(&user.public_key());
        let creds = creds_text(&jwt, &seed);
        let signer = KeyFile::Creds(dir.file("u.creds", &creds))
            .load()
            .expect("creds");
        assert_eq!(signer.public_key(), user.public_key());
        let mut auth = async_nats::Auth::new();
        signer.sign(b"nonce", &mut auth).expect("signed");
        assert_eq!(auth.jwt.as_deref(), Some(jwt.as_str()));
        assert_eq!(auth.nkey, None, "a JWT names the user");
        user.verify(b"nonce", auth.signature.as_deref().expect("sig"))
            .expect("the seed's signature");

        for text in [format!("{seed}\n"), creds.clone()] {
            let signer = KeyFile::Nkey(dir.file("u.nk", &text)).load().expect("seed");
            let mut auth = async_nats::Auth::new();
            signer.sign(b"nonce", &mut auth).expect("signed");
            assert_eq!(auth.nkey, Some(user.public_key()));
            assert_eq!(auth.jwt, None);
        }
    }

    /// A `.creds` file whose JWT is another user's was taken, and the server refused it on
    /// every connection with "authorization violation".
    #[test]
    fn a_creds_file_whose_jwt_is_another_user_s_is_refused_naming_both() {
        let dir = Folder::new();
        let (user, stranger) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
        let seed = user.seed().expect("seed");
        let mixed = dir.file(
            "mixed.creds",
            &creds_text(&jwt_for(&stranger.public_key()), &seed),
        );
        let e = KeyFile::Creds(mixed)
            .load()
            .err()
            .expect("another user's JWT");
        assert!(
            e.contains("mixed.creds")
                && e.contains(&stranger.public_key())
                && e.contains(&user.public_key())
                && !e.contains(&seed),
            "{e}"
        );
        let unreadable = dir.file("bad.creds", &creds_text("not.a-jwt", &seed));
        let e = KeyFile::Creds(unreadable).load().err().expect("no claims");
        assert!(
            e.contains("bad.creds") && e.contains("cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_file_is_named_and_its_contents_are_not() {
        let dir = Folder::new();
        let seed = nkeys::KeyPair::new_user().seed().expect("seed");
        let missing = KeyFile::Creds("/nonexistent/herald.creds".into())
            .load()
            .err()
            .expect("missing");
        assert!(missing.contains("/nonexistent/herald.creds"), "{missing}");
        let no_jwt = dir.file(
            "s.creds",
            &format!("-----BEGIN USER NKEY SEED-----\n{seed}\n---\n"),
        );
        let e = KeyFile::Creds(no_jwt).load().err().expect("no JWT");
        assert!(e.contains("NATS USER JWT") && !e.contains(&seed), "{e}");
        let account = nkeys::KeyPair::new_account().seed().expect("seed");
        let e = KeyFile::Nkey(dir.file("acc.nk", &account))
            .load()
            .err()
            .expect("an account's seed");
        assert!(
            e.contains("holds an account's seed, not a user's") && !e.contains(&account),
            "{e}"
        );
        let bad = dir.file("bad.nk", "SUNOTASEED\n");
        let e = KeyFile::Nkey(bad).load().err().expect("bad seed");
        assert!(
            e.contains("no valid NKey seed") && !e.contains("SUNOTASEED"),
            "{e}"
        );
    }
}
