//! Commit-reveal weights as subtensor runs them (timelocked, "CRv4").
//!
//! On a subnet with `CommitRevealWeightsEnabled`, `set_weights` is refused; a validator
//! instead commits its weights encrypted to a future drand round
//! (`SubtensorModule.commit_timelocked_weights(netuid, commit, reveal_round, version)`), and
//! the chain decrypts and applies them by itself once the beacon's signature of that round
//! is stored on chain. The encryption is the chain's own (`timelock` 0.0.1, the source the
//! chain builds from): Boneh-Franklin identity-based encryption on BLS12-381 with the
//! signature in G1 (`TinyBLS381`, drand quicknet's scheme) around an AES-GCM stream cipher,
//! to the identity `sha256(reveal_round as big-endian u64)`, serialised with ark-serialize
//! in compressed form. The payload is the SCALE encoding of [`WeightsTlockPayload`].
//!
//! The local devnet runs the same scheme with a beacon key of its own ([`DevnetBeacon`]), so
//! the whole path, down to the real decryption, runs on one machine.

use ark_serialize::{CanonicalDeserialize, CanonicalSerialize};
use parity_scale_codec::{Decode, Encode};
use sha2::{Digest, Sha256};
use timelock::curves::drand::TinyBLS381;
use timelock::ibe::fullident::Identity;
use timelock::stream_ciphers::AESGCMStreamCipherProvider;
use timelock::tlock::{EngineBLS, TLECiphertext, tld, tle};

/// drand quicknet's public key (G2, compressed), as the chain's drand pallet configures it.
pub const QUICKNET_PUBLIC_KEY: &str = "83cf0f2896adee7eb8b5f01fcad3912212c437e0073e911fb90022d3e760183c8c4b450b6a0a6c3ac6a5776a2d1064510d1fec758c921cc22b0e17e63aaf4bcb5ed66304de9cf809bd274ca73bab4af5a6e9c76a4bc09e76eae8991ef5ece45a";
/// Unix time of quicknet's round 1.
pub const QUICKNET_GENESIS_SECS: u64 = 1_692_803_367;
/// Seconds between quicknet rounds.
pub const QUICKNET_PERIOD_SECS: u64 = 3;
/// The commit-reveal version subtensor expects by default (`CommitRevealWeightsVersion`).
pub const COMMIT_REVEAL_VERSION: u16 = 4;
/// Largest commit the chain accepts (`BoundedVec<u8, 5000>`).
pub const MAX_COMMIT_BYTES: usize = 5000;
/// Blocks after the reveal epoch's start that the reveal round is aimed at, so that the
/// round's pulse is surely on chain when the chain tries to reveal (it retries every block
/// of the reveal epoch); the same margin Bittensor's own client uses.
pub const SECURITY_BLOCKS: u64 = 3;

/// What a validator commits, encrypted: SCALE `{ hotkey, uids, values, version_key }`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WeightsTlockPayload {
    /// The committing hotkey's account bytes (must be the signer).
    pub hotkey: Vec<u8>,
    /// Target uids.
    pub uids: Vec<u16>,
    /// Weights per uid.
    pub values: Vec<u16>,
    /// The validator's version key.
    pub version_key: u64,
}

/// Errors of timelock encryption and decryption.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitRevealError {
    /// A key or signature does not decode.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Encryption failed.
    #[error("timelock encryption failed: {0}")]
    Encrypt(String),
    /// Decryption failed (wrong round, tampered commit, wrong key).
    #[error("timelock decryption failed: {0}")]
    Decrypt(String),
    /// The commit is larger than the chain accepts.
    #[error("commit of {0} bytes exceeds the chain's {MAX_COMMIT_BYTES}")]
    TooLarge(usize),
}

/// The identity a round's beacon signature unlocks: `sha256(round as big-endian u64)`.
pub fn round_identity(round: u64) -> Identity {
    Identity::new(b"", vec![Sha256::digest(round.to_be_bytes()).to_vec()])
}

fn public_key(bytes: &[u8]) -> Result<<TinyBLS381 as EngineBLS>::PublicKeyGroup, CommitRevealError> {
    <TinyBLS381 as EngineBLS>::PublicKeyGroup::deserialize_compressed(bytes)
        .map_err(|_| CommitRevealError::Invalid("beacon public key"))
}

/// Encrypt `message` so that the beacon's signature of `round` (public key `public_key`,
/// compressed G2) decrypts it; the bytes the chain expects as `commit`.
pub fn encrypt(message: &[u8], round: u64, public_key_bytes: &[u8]) -> Result<Vec<u8>, CommitRevealError> {
    use rand_core_06::RngCore;
    let pk = public_key(public_key_bytes)?;
    let mut esk = [0u8; 32];
    rand_core_06::OsRng.fill_bytes(&mut esk);
    let ct =
        tle::<TinyBLS381, AESGCMStreamCipherProvider, _>(pk, esk, message, round_identity(round), rand_core_06::OsRng)
            .map_err(|e| CommitRevealError::Encrypt(format!("{e:?}")))?;
    let mut out = Vec::new();
    ct.serialize_compressed(&mut out).map_err(|e| CommitRevealError::Encrypt(e.to_string()))?;
    if out.len() > MAX_COMMIT_BYTES {
        return Err(CommitRevealError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decrypt a commit with a beacon signature (compressed G1, 48 bytes), as the chain does
/// at reveal time.
pub fn decrypt(commit: &[u8], signature: &[u8]) -> Result<Vec<u8>, CommitRevealError> {
    let ct = TLECiphertext::<TinyBLS381>::deserialize_compressed(commit)
        .map_err(|e| CommitRevealError::Decrypt(format!("commit does not deserialise: {e}")))?;
    let sig = <TinyBLS381 as EngineBLS>::SignatureGroup::deserialize_compressed(signature)
        .map_err(|_| CommitRevealError::Invalid("beacon signature"))?;
    tld::<TinyBLS381, AESGCMStreamCipherProvider>(ct, sig).map_err(|e| CommitRevealError::Decrypt(format!("{e:?}")))
}

/// The encrypted commit of `payload` to `round`.
pub fn commit_payload(
    payload: &WeightsTlockPayload,
    round: u64,
    public_key_bytes: &[u8],
) -> Result<Vec<u8>, CommitRevealError> {
    encrypt(&payload.encode(), round, public_key_bytes)
}

/// The drand round to encrypt to: the round due when the chain will reveal. `last_round`
/// is the newest pulse stored on chain (`Drand.LastStoredRound`), `blocks_to_reveal` the
/// blocks until the reveal epoch starts; [`SECURITY_BLOCKS`] more are added as a margin.
pub fn reveal_round(last_round: u64, blocks_to_reveal: u64, block_time_secs: u64, period_secs: u64) -> u64 {
    let secs = (blocks_to_reveal + SECURITY_BLOCKS) * block_time_secs;
    last_round + secs.div_ceil(period_secs.max(1))
}

/// Blocks from `block` until the start of the epoch `reveal_period` epochs after the one
/// `block` is in, with subtensor's epoch rule: an epoch ends at the blocks where
/// `(block + netuid + 1) % (tempo + 1) == 0`.
pub fn blocks_until_reveal(block: u64, netuid: u16, tempo: u16, reveal_period: u64) -> u64 {
    let len = tempo as u64 + 1;
    let phase = (block + netuid as u64 + 1) % len;
    let to_epoch_end = if phase == 0 { len } else { len - phase };
    to_epoch_end + len * reveal_period.saturating_sub(1)
}

/// The local devnet's beacon: a BLS12-381 key that "signs" round `r` (the IBE extraction
/// for `r`'s identity, which is what a drand signature is), with the chain's scheme.
#[derive(Clone)]
pub struct DevnetBeacon {
    secret: <TinyBLS381 as EngineBLS>::Scalar,
}

impl std::fmt::Debug for DevnetBeacon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevnetBeacon(<secret>)")
    }
}

impl DevnetBeacon {
    /// The beacon for a 32-byte seed (the devnet keeps it in its state).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        use ark_ff::PrimeField;
        DevnetBeacon { secret: <TinyBLS381 as EngineBLS>::Scalar::from_le_bytes_mod_order(seed) }
    }

    /// Its public key, compressed (what validators encrypt to).
    pub fn public_key(&self) -> Vec<u8> {
        use ark_ec::Group;
        let pk = <TinyBLS381 as EngineBLS>::PublicKeyGroup::generator() * self.secret;
        let mut out = Vec::new();
        pk.serialize_compressed(&mut out).expect("a group element serialises");
        out
    }

    /// Its signature of `round`, compressed.
    pub fn sign(&self, round: u64) -> Vec<u8> {
        let sig = round_identity(round).extract::<TinyBLS381>(self.secret).0;
        let mut out = Vec::new();
        sig.serialize_compressed(&mut out).expect("a group element serialises");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_and_rounds() {
        // tempo 360, netuid 1: epochs end where (block + 2) % 361 == 0.
        assert_eq!(blocks_until_reveal(359, 1, 360, 1), 361);
        assert_eq!(blocks_until_reveal(358, 1, 360, 1), 1);
        assert_eq!(blocks_until_reveal(0, 1, 360, 1), 359);
        assert_eq!(blocks_until_reveal(0, 1, 360, 2), 359 + 361);
        assert_eq!(reveal_round(1000, 10, 12, 3), 1000 + (13 * 12) / 3);
    }

    #[test]
    fn devnet_beacon_round_trip_and_wrong_round() {
        let b = DevnetBeacon::from_seed(&[7; 32]);
        let payload =
            WeightsTlockPayload { hotkey: b"v".to_vec(), uids: vec![0, 1], values: vec![65535, 3], version_key: 2 };
        let commit = commit_payload(&payload, 42, &b.public_key()).unwrap();
        let plain = decrypt(&commit, &b.sign(42)).unwrap();
        assert_eq!(WeightsTlockPayload::decode(&mut &plain[..]).unwrap(), payload);
        assert!(decrypt(&commit, &b.sign(43)).is_err(), "another round's signature must not decrypt");
        // Flip a byte of the encrypted body (the trailing cipher-suite tag is not authenticated,
        // and the chain does not read it).
        let mut tampered = commit.clone();
        let n = tampered.len();
        tampered[n / 2] ^= 0x55;
        assert!(decrypt(&tampered, &b.sign(42)).is_err(), "a tampered commit must not decrypt");
    }
}
