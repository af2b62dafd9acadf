//! Who may speak in a group: a key per generation, handed out by the rendezvous to the members
//! of that generation only (the coordinator checks each member's secret first), and a MAC under
//! it on every message a peer could otherwise forge: the liveness hello, the UCX handshake and
//! the abort. A process that is not a member (another job's rank, a local process that found
//! the port) cannot claim a rank's slot or fail the group (P-9).
//!
//! The MAC proves membership, not secrecy: the data plane is not encrypted, and a member can
//! speak for any rank of its own generation (members are trusted once admitted).

use crate::error::RuntimeError;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a MAC on the wire (HMAC-SHA-256 truncated to 128 bits).
pub const MAC_LEN: usize = 16;
/// Bytes of a group key.
pub const KEY_LEN: usize = 32;

/// What a MAC is for: the same bytes signed for one purpose are not valid for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Liveness,
    Control,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Liveness => b"phalanx liveness hello v1",
            Purpose::Control => b"phalanx control message v1",
        }
    }
}

/// One generation's key. Never logged (its `Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct GroupKey([u8; KEY_LEN]);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

impl GroupKey {
    /// A fresh key from the kernel's random source, or an error (never a weak key).
    pub fn random() -> Result<Self, RuntimeError> {
        Ok(GroupKey(crate::random::bytes("a group key")?))
    }

    /// The key the rendezvous handed out.
    pub fn from_bytes(b: &[u8]) -> Result<Self, RuntimeError> {
        let k: [u8; KEY_LEN] = b.try_into().map_err(|_| RuntimeError::Bootstrap {
            addr: "address exchange".into(),
            reason: format!(
                "a group key of {} bytes, expected {KEY_LEN} (a coordinator older than this rank? \
                 run the same phalanx version everywhere)",
                b.len()
            ),
        })?;
        Ok(GroupKey(k))
    }

    /// The key of a group whose members are threads of one process (nobody else can send).
    pub fn in_process() -> Self {
        GroupKey([0; KEY_LEN])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn hmac(&self, purpose: Purpose, body: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(purpose.label());
        m.update(body);
        m
    }

    pub fn mac(&self, purpose: Purpose, body: &[u8]) -> [u8; MAC_LEN] {
        let full = self.hmac(purpose, body).finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    /// Constant-time check of a MAC made by [`GroupKey::mac`].
    pub fn verify(&self, purpose: Purpose, body: &[u8], mac: &[u8]) -> bool {
        mac.len() == MAC_LEN && self.hmac(purpose, body).verify_truncated_left(mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // P-9: a MAC holds only for its key, its bytes and its purpose.
    #[test]
    fn a_mac_holds_for_its_key_bytes_and_purpose_only() {
        let (a, b) = (GroupKey::random().unwrap(), GroupKey::random().unwrap());
        assert_ne!(a, b);
        let m = a.mac(Purpose::Liveness, b"rank 1");
        assert!(a.verify(Purpose::Liveness, b"rank 1", &m));
        assert!(!b.verify(Purpose::Liveness, b"rank 1", &m));
        assert!(!a.verify(Purpose::Liveness, b"rank 2", &m));
        assert!(!a.verify(Purpose::Control, b"rank 1", &m));
        assert!(!a.verify(Purpose::Liveness, b"rank 1", &m[..8]));
        assert!(GroupKey::from_bytes(&[0; 31]).is_err());
        assert_eq!(format!("{a:?}"), "GroupKey(..)");
    }
}
