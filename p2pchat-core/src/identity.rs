//! Long-term identity keys: generation, storage (file mode 0600, refused when other users
//! can read or write it) and fingerprints.
//!
//! An [`Identity`] is one Ed25519 signing key. The X25519 key used for the pairwise
//! agreement is derived from it (the standard Ed25519 → X25519 birational map, as
//! libsodium's `crypto_sign_ed25519_sk_to_curve25519`), so a user has exactly one public key
//! to pin, publish and compare: [`PublicKey`].

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The first line of an identity file; anything else is refused on load.
const IDENTITY_FILE_HEADER: &str = "p2pchat identity v1";

/// Errors loading, saving or parsing identity keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the identity file failed.
    #[error("identity file {path}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The identity file exists but is not a p2pchat identity.
    #[error(
        "identity file {path} is not a p2pchat identity (expected a '{IDENTITY_FILE_HEADER}' header and 64 hex digits)"
    )]
    Malformed {
        /// The file involved.
        path: String,
    },
    /// 32 bytes that are not a valid Ed25519 public key.
    #[error("not a valid Ed25519 public key")]
    InvalidPublicKey,
    /// The identity file can be read or written by users other than its owner (Unix: its
    /// mode has group or other bits), so the secret key may be known to them. Refused on
    /// load, not repaired: the user decides whether the key is still theirs alone.
    #[error(
        "the key file {path} is {} by other users (mode {mode:04o}); run `chmod 600 {path}`",
        exposure(*.mode)
    )]
    Exposed {
        /// The file involved.
        path: String,
        /// Its permission bits (`mode & 0o7777`).
        mode: u32,
    },
}

/// What the group and other bits of `mode` let other users do with a key file.
fn exposure(mode: u32) -> &'static str {
    match (mode & 0o044 != 0, mode & 0o022 != 0) {
        (true, true) => "readable and writable",
        (false, true) => "writable",
        // Execute bits only: still not the owner's alone.
        (true, false) | (false, false) => "readable",
    }
}

/// A user's long-term identity: an Ed25519 key pair, from which the X25519 agreement key
/// is derived.
///
/// `Clone` copies the secret; `Debug` shows only the public key.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl Identity {
    /// A fresh random identity from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut rand::rng()),
        }
    }

    /// Rebuilds an identity from its 32-byte secret seed.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(secret),
        }
    }

    /// Loads the identity stored at `path`, or generates one and saves it there (as
    /// [`Identity::save`] does: mode 0600, creating parent directories 0700) when the file
    /// does not exist. A file that exists but cannot be used (malformed, or open to other
    /// users: [`IdentityError::Exposed`]) is an error, never replaced.
    pub fn load_or_generate(path: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let path = path.as_ref();
        match Self::load(path) {
            Ok(identity) => Ok(identity),
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let identity = Self::generate();
                identity.save(path)?;
                Ok(identity)
            }
            Err(e) => Err(e),
        }
    }

    /// Loads an identity saved by [`Identity::save`].
    ///
    /// On Unix, a file that users other than its owner may read or write (mode
    /// `& 0o077 != 0`, e.g. 0644) is refused with [`IdentityError::Exposed`], whose message
    /// says how to fix it. The mode checked is that of the file opened (a symlink's target).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let path = path.as_ref();
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = file.metadata().map_err(io)?;
            let mode = meta.permissions().mode() & 0o7777;
            // A directory is left to the read below, which reports it as one.
            if mode & 0o077 != 0 && !meta.is_dir() {
                return Err(IdentityError::Exposed {
                    path: path.display().to_string(),
                    mode,
                });
            }
        }
        let mut text = Zeroizing::new(String::new());
        file.read_to_string(&mut text).map_err(io)?;
        let malformed = || IdentityError::Malformed {
            path: path.display().to_string(),
        };
        let mut lines = text.lines();
        if lines.next() != Some(IDENTITY_FILE_HEADER) {
            return Err(malformed());
        }
        let hex = lines.next().ok_or_else(malformed)?.trim();
        let mut secret = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex, &mut secret[..]).map_err(|_| malformed())?;
        Ok(Self::from_secret_bytes(&secret))
    }

    /// Saves the secret key to `path` with file mode 0600 (on Unix), atomically: a partial
    /// write never replaces a good file.
    ///
    /// The key is written to a new file of a random name in the same directory
    /// (`.<file name>.<16 hex digits>.tmp`), created exclusively with mode 0600, synced, and
    /// renamed over `path`; then the directory is synced (best effort). Nothing already at
    /// the temporary name is reused or followed, so neither a leftover file's mode nor a
    /// planted symlink carries over to the key. Missing parent directories are created, mode
    /// 0700 on Unix; existing ones are left as they are.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), IdentityError> {
        let path = path.as_ref();
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(io)?;
        }
        let name = path.file_name().ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file name",
            ))
        })?;
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let contents = Zeroizing::new(format!(
            "{IDENTITY_FILE_HEADER}\n{}\n",
            hex::encode(self.signing.to_bytes())
        ));
        let mut options = std::fs::OpenOptions::new();
        // `create_new` is O_CREAT | O_EXCL: it fails on anything already at `tmp`, a symlink
        // (even a dangling one) included, so no O_NOFOLLOW is needed (and `libc` is not a
        // dependency of this crate).
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(io)?;
        let written = file
            .write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                drop(file);
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        // Make the rename itself durable. Best effort: the key is in place either way, and
        // some file systems refuse to sync a directory.
        #[cfg(unix)]
        if let Ok(dir) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// The public half, safe to publish.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    /// Signs `message` with the identity key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The X25519 secret derived from the identity key.
    pub(crate) fn agreement_secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.signing.to_scalar_bytes())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// A user's public identity key (Ed25519). Serializes as 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses 32 bytes as a public key, refusing points that are not valid keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| IdentityError::InvalidPublicKey)?;
        if key.is_weak() {
            return Err(IdentityError::InvalidPublicKey);
        }
        Ok(Self(key))
    }

    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Checks `signature` over `message` (strict verification: no malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &signature).is_ok()
    }

    /// The short safety code two people compare out of band to know they hold the same key:
    /// 30 decimal digits in six groups of five, taken from SHA-256 of the key.
    pub fn fingerprint(&self) -> Fingerprint {
        let digest = Sha256::new()
            .chain_update(b"p2pchat fingerprint v1")
            .chain_update(self.to_bytes())
            .finalize();
        let mut groups = [0u32; 6];
        for (group, chunk) in groups.iter_mut().zip(digest.chunks_exact(5)) {
            let mut n = 0u64;
            for &b in chunk {
                n = (n << 8) | u64::from(b);
            }
            *group = (n % 100_000) as u32;
        }
        Fingerprint(groups)
    }

    /// The X25519 public key derived from this identity key.
    pub(crate) fn agreement_key(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0.to_montgomery().to_bytes())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Lower-case hex of the 32 key bytes.
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.to_bytes()))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| IdentityError::InvalidPublicKey)?;
        Self::from_bytes(&bytes)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            serde_bytes::Bytes::new(&self.to_bytes()).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(D::Error::custom)
        } else {
            let bytes: serde_bytes::ByteArray<32> = Deserialize::deserialize(d)?;
            Self::from_bytes(&bytes).map_err(D::Error::custom)
        }
    }
}

/// A safety code: six groups of five digits, shown as `12345 67890 …`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u32; 6]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, group) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{group:05}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let a = Identity::load_or_generate(&path).unwrap();
        let b = Identity::load_or_generate(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn malformed_identity_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        std::fs::write(&path, "hello").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let err = Identity::load_or_generate(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello");
    }

    #[test]
    fn save_replaces_the_key_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        for _ in 0..3 {
            let identity = Identity::generate();
            identity.save(&path).unwrap();
            assert_eq!(
                Identity::load(&path).unwrap().public_key(),
                identity.public_key()
            );
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["identity.key"]);
    }

    #[test]
    fn save_to_a_path_without_a_file_name_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::generate()
            .save(dir.path().join(".."))
            .unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }), "{err:?}");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_open_to_other_users_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        Identity::generate().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_or_generate(&path).unwrap_err();
        assert!(
            matches!(err, IdentityError::Exposed { mode: 0o644, .. }),
            "{err:?}"
        );
        let shown = path.display();
        assert_eq!(
            err.to_string(),
            format!(
                "the key file {shown} is readable by other users (mode 0644); \
                 run `chmod 600 {shown}`"
            )
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Identity::load(&path).unwrap();
    }

    #[test]
    fn exposure_names_what_other_users_can_do() {
        assert_eq!(exposure(0o644), "readable");
        assert_eq!(exposure(0o620), "writable");
        assert_eq!(exposure(0o666), "readable and writable");
        assert_eq!(exposure(0o601), "readable");
    }

    #[test]
    fn fingerprints_differ_between_keys_and_are_stable() {
        let a = Identity::generate().public_key();
        let b = Identity::generate().public_key();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.fingerprint());
        let shown = a.fingerprint().to_string();
        assert_eq!(shown.len(), 6 * 5 + 5);
        assert!(shown.split(' ').all(|g| g.len() == 5));
    }

    #[test]
    fn public_key_parses_from_its_display() {
        let key = Identity::generate().public_key();
        assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
        assert!("zz".parse::<PublicKey>().is_err());
    }

    #[test]
    fn signatures_verify_only_under_the_signing_key() {
        let a = Identity::generate();
        let sig = a.sign(b"msg");
        assert!(a.public_key().verify(b"msg", &sig));
        assert!(!a.public_key().verify(b"msh", &sig));
        assert!(!Identity::generate().public_key().verify(b"msg", &sig));
    }
}
