//! Hotkeys as signing keys: sr25519 signatures over protocol statements (a validator's
//! attestation of an aggregate), checked by every node against the signer's hotkey.
//!
//! On subtensor a hotkey is an ss58 address and only the holder of its secret can sign for
//! it. On the devnet, where a hotkey is a name that anyone may register, the key of a name
//! is derived from the name ([`devnet_keypair`]): signatures there exercise the same code
//! path but authenticate nothing a devnet does not already trust.

use sha2::{Digest, Sha256};
use subxt::utils::AccountId32;
use subxt_signer::sr25519::{Keypair, PublicKey, Signature};

use crate::{ChainError, Result};

/// Domain-separation tag of a devnet name's key derivation.
const DEVNET_KEY_TAG: &[u8] = b"bistro/devnet-key/v1";

/// Bytes of an sr25519 signature.
pub const SIGNATURE_BYTES: usize = 64;

/// The sr25519 key of a devnet hotkey name: mini-secret `sha256(tag || name)`.
pub fn devnet_keypair(name: &str) -> Keypair {
    let seed: [u8; 32] = Sha256::new().chain_update(DEVNET_KEY_TAG).chain_update(name.as_bytes()).finalize().into();
    // Every 32-byte string is a valid sr25519 mini-secret.
    Keypair::from_secret_key(seed).expect("32-byte mini-secret")
}

/// The public key that signs for `hotkey`: the ss58 address itself, or, for a name that is
/// not an ss58 address (devnet), the public half of [`devnet_keypair`].
pub fn public_key(hotkey: &str) -> PublicKey {
    match hotkey.parse::<AccountId32>() {
        Ok(id) => PublicKey(id.0),
        Err(_) => devnet_keypair(hotkey).public_key(),
    }
}

/// The ss58 address (or devnet name) a keypair signs for, as [`public_key`] reads it back.
pub fn ss58_of(pair: &Keypair) -> String {
    AccountId32::from(pair.public_key().0).to_string()
}

/// Sign `message` with `pair`.
pub fn sign(pair: &Keypair, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
    pair.sign(message).0
}

/// Whether `signature` (64 bytes) is `hotkey`'s signature of `message`. Any malformed
/// signature is simply not valid.
pub fn verify(hotkey: &str, message: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = <[u8; SIGNATURE_BYTES]>::try_from(signature) else { return false };
    subxt_signer::sr25519::verify(&Signature(sig), message, &public_key(hotkey))
}

/// Check that `pair` signs for `hotkey` (a loaded key that is not the node's hotkey would
/// produce signatures nobody accepts).
pub fn check_signs_for(pair: &Keypair, hotkey: &str) -> Result<()> {
    if public_key(hotkey).0 == pair.public_key().0 {
        Ok(())
    } else {
        Err(ChainError::Wallet(format!("the loaded hotkey is {}, not {hotkey}", ss58_of(pair))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_for_their_signer_only() {
        let a = devnet_keypair("validator-0");
        let msg = b"bistro/attestation";
        let sig = sign(&a, msg);
        assert!(verify("validator-0", msg, &sig));
        assert!(!verify("validator-1", msg, &sig), "another name's key");
        assert!(!verify("validator-0", b"other", &sig), "another message");
        assert!(!verify("validator-0", msg, &sig[..63]), "a truncated signature");
        let mut flipped = sig;
        flipped[5] ^= 1;
        assert!(!verify("validator-0", msg, &flipped));
    }

    #[test]
    fn ss58_hotkeys_verify_with_their_own_key() {
        // Alice's development mini-secret and her well-known address.
        let seed: [u8; 32] = hex::decode("e5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a")
            .unwrap()
            .try_into()
            .unwrap();
        let alice = Keypair::from_secret_key(seed).unwrap();
        let addr = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
        assert_eq!(ss58_of(&alice), addr);
        let sig = sign(&alice, b"m");
        assert!(verify(addr, b"m", &sig));
        assert!(check_signs_for(&alice, addr).is_ok());
        assert!(check_signs_for(&alice, "validator-0").is_err());
        // A devnet name's derived key never signs for an ss58 address.
        assert!(!verify(addr, b"m", &sign(&devnet_keypair(addr), b"m")));
    }
}
