//! Secrets (job tokens, member secrets, group keys) from the kernel's random source. A source
//! that cannot be read is an error, never a weak or all-zero secret.

use crate::error::RuntimeError;
use std::io::Read;
use std::path::Path;

const SOURCE: &str = "/dev/urandom";

/// `N` random bytes for `what` (named in the error).
pub fn bytes<const N: usize>(what: &str) -> Result<[u8; N], RuntimeError> {
    bytes_from(Path::new(SOURCE), what)
}

/// 128 random bits as hex.
pub fn hex_secret(what: &str) -> Result<String, RuntimeError> {
    Ok(bytes::<16>(what)?
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

fn bytes_from<const N: usize>(source: &Path, what: &str) -> Result<[u8; N], RuntimeError> {
    let mut b = [0u8; N];
    std::fs::File::open(source)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| RuntimeError::NoRandomSource {
            what: what.to_string(),
            reason: format!("{}: {e}", source.display()),
        })?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A random source that is missing or runs dry is an error that names the secret, never
    // zeros (a token of zeros would be a well-known one).
    #[test]
    fn a_source_that_fails_is_an_error_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-device");
        let e = bytes_from::<16>(&missing, "a job token").unwrap_err();
        assert!(e.to_string().contains("a job token"), "{e}");
        let short = dir.path().join("short");
        std::fs::write(&short, [7u8; 5]).unwrap();
        assert!(bytes_from::<16>(&short, "a group key").is_err());
        let a = hex_secret("a test").unwrap();
        let b = hex_secret("a test").unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_ne!(bytes::<32>("a key").unwrap(), [0u8; 32]);
    }
}
