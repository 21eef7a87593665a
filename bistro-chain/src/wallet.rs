//! Bittensor wallets: where hotkey files live and what they hold.
//!
//! A hotkey file is `~/.bittensor/wallets/<name>/hotkeys/<hotkey>`, JSON with
//! `secretPhrase`, `secretSeed`, `publicKey`, `accountId` and `ss58Address`. This module
//! reads the public part (the ss58 address) and checks the file's permissions; it never
//! prints or logs a secret. Signing with the key (sr25519) is the subtensor client's job.

use std::path::{Path, PathBuf};

use crate::{ChainError, Result};

/// A wallet name and hotkey name, resolved against a wallets directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalletRef {
    /// Directory holding wallets (default `~/.bittensor/wallets`).
    pub root: PathBuf,
    /// Wallet (coldkey) name.
    pub name: String,
    /// Hotkey name.
    pub hotkey: String,
}

/// The public part of a hotkey file.
#[derive(Clone, PartialEq, Eq)]
pub struct HotkeyFile {
    /// The path it was read from.
    pub path: PathBuf,
    /// Its ss58 address.
    pub ss58_address: String,
    secret_seed: Option<String>,
}

impl std::fmt::Debug for HotkeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotkeyFile")
            .field("path", &self.path)
            .field("ss58_address", &self.ss58_address)
            .field("secret_seed", &self.secret_seed.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HotkeyFile {
    /// The `secretSeed` (hex) for signing; never log it.
    pub fn secret_seed(&self) -> Option<&str> {
        self.secret_seed.as_deref()
    }
}

/// The default wallets directory: `$BT_WALLET_PATH` (with `~` expanded, as the Bittensor
/// SDK does), else `~/.bittensor/wallets`.
pub fn default_wallets_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("BT_WALLET_PATH").filter(|p| !p.is_empty()) {
        return expand_tilde(Path::new(&p));
    }
    home_dir().join(".bittensor").join("wallets")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

/// `path` with a leading `~` (alone or followed by `/`) replaced by `$HOME`; other paths
/// unchanged (`~user` is not expanded).
pub fn expand_tilde(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => home_dir().join(rest),
        Err(_) => path.to_path_buf(),
    }
}

impl WalletRef {
    /// A wallet in the default directory.
    pub fn new(name: &str, hotkey: &str) -> Self {
        WalletRef { root: default_wallets_dir(), name: name.into(), hotkey: hotkey.into() }
    }

    /// Path of the hotkey file.
    pub fn hotkey_path(&self) -> PathBuf {
        self.root.join(&self.name).join("hotkeys").join(&self.hotkey)
    }

    /// The devnet identity of this wallet when no hotkey file exists: `<name>-<hotkey>`.
    pub fn devnet_hotkey(&self) -> String {
        format!("{}-{}", self.name, self.hotkey)
    }

    /// Read the hotkey file. A file readable by group or others is refused (it holds a secret).
    pub fn read_hotkey(&self) -> Result<HotkeyFile> {
        read_hotkey_file(&self.hotkey_path())
    }
}

/// Read a Bittensor hotkey file; refuse one that others can read.
pub fn read_hotkey_file(path: &Path) -> Result<HotkeyFile> {
    let meta = std::fs::metadata(path).map_err(|e| {
        ChainError::Wallet(format!(
            "cannot read hotkey file {}: {e} (create it with `btcli wallet new_hotkey`)",
            path.display()
        ))
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(ChainError::Wallet(format!(
                "hotkey file {} is readable by other users (mode {:o}); run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ChainError::Wallet(format!("cannot read {}: {e}", path.display())))?;
    if let Some(kind) = encryption_of(&text) {
        return Err(ChainError::Wallet(format!(
            "hotkey file {} is encrypted ({kind}): a node signs every window without a person to type \
             a password, so it needs an unencrypted hotkey. Create one with `btcli wallet new_hotkey` \
             (hotkeys are unencrypted by default) or regenerate this one unencrypted with \
             `btcli wallet regen_hotkey`; the coldkey stays encrypted",
            path.display()
        )));
    }
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ChainError::Wallet(format!("{} is not a Bittensor hotkey file (JSON): {e}", path.display())))?;
    let ss58 = v
        .get("ss58Address")
        .and_then(|s| s.as_str())
        .ok_or_else(|| ChainError::Wallet(format!("{} has no `ss58Address`", path.display())))?;
    Ok(HotkeyFile {
        path: path.to_path_buf(),
        ss58_address: ss58.to_string(),
        secret_seed: v.get("secretSeed").and_then(|s| s.as_str()).map(str::to_string),
    })
}

/// How a keyfile's text is encrypted, if it is: btwallet's NaCl secretbox (`$NACL`), an
/// Ansible vault, or the legacy Fernet format (`gAAAAA`).
fn encryption_of(text: &str) -> Option<&'static str> {
    let t = text.trim_start();
    if t.starts_with("$NACL") {
        Some("NaCl secretbox, password-protected")
    } else if t.starts_with("$ANSIBLE_VAULT") {
        Some("Ansible vault")
    } else if t.starts_with("gAAAAA") {
        Some("legacy Fernet, password-protected")
    } else {
        None
    }
}

/// Write a Bittensor-format hotkey file for the sr25519 key with mini-secret `seed`
/// (`secretSeed`, `publicKey`, `accountId`, `ss58Address`; no mnemonic), readable by the
/// owner only. Returns the ss58 address. Refuses to overwrite an existing file.
pub fn create_hotkey_file(path: &Path, seed: [u8; 32]) -> Result<String> {
    use std::io::Write;
    let key = subxt_signer::sr25519::Keypair::from_secret_key(seed).map_err(|e| ChainError::Wallet(e.to_string()))?;
    let public = key.public_key().0;
    let ss58 = subxt::utils::AccountId32::from(public).to_string();
    let json = serde_json::json!({
        "secretSeed": format!("0x{}", hex::encode(seed)),
        "publicKey": format!("0x{}", hex::encode(public)),
        "accountId": format!("0x{}", hex::encode(public)),
        "ss58Address": ss58,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ChainError::Wallet(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| ChainError::Wallet(format!("cannot create hotkey file {}: {e}", path.display())))?;
    f.write_all(json.to_string().as_bytes())
        .map_err(|e| ChainError::Wallet(format!("cannot write {}: {e}", path.display())))?;
    Ok(ss58)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_public_part_and_refuses_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let w = WalletRef { root: dir.path().into(), name: "default".into(), hotkey: "miner".into() };
        let e = w.read_hotkey().unwrap_err().to_string();
        assert!(e.contains("hotkeys/miner") && e.contains("btcli"), "{e}");
        std::fs::create_dir_all(w.hotkey_path().parent().unwrap()).unwrap();
        std::fs::write(
            w.hotkey_path(),
            r#"{"secretSeed":"0x1234","ss58Address":"5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"}"#,
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(w.hotkey_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(w.read_hotkey().unwrap_err().to_string().contains("chmod 600"));
            std::fs::set_permissions(w.hotkey_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let h = w.read_hotkey().unwrap();
        assert_eq!(h.ss58_address, "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY");
        assert!(!format!("{h:?}").contains("0x1234"), "secrets never appear in Debug");
        assert_eq!(h.secret_seed(), Some("0x1234"));
    }

    #[test]
    fn an_encrypted_hotkey_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let w = WalletRef { root: dir.path().into(), name: "default".into(), hotkey: "miner".into() };
        std::fs::create_dir_all(w.hotkey_path().parent().unwrap()).unwrap();
        std::fs::write(w.hotkey_path(), "$NACL\x01\x02 ciphertext").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(w.hotkey_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let e = w.read_hotkey().unwrap_err().to_string();
        assert!(e.contains("is encrypted") && e.contains("regen_hotkey"), "{e}");
    }

    #[test]
    fn a_leading_tilde_is_the_home_directory() {
        let home = home_dir();
        assert_eq!(expand_tilde(Path::new("~/.bittensor/wallets")), home.join(".bittensor/wallets"));
        assert_eq!(expand_tilde(Path::new("~")), home);
        assert_eq!(expand_tilde(Path::new("/srv/wallets")), PathBuf::from("/srv/wallets"));
        assert_eq!(expand_tilde(Path::new("~bob/w")), PathBuf::from("~bob/w"));
    }

    #[test]
    fn created_files_read_back_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w/hotkeys/h");
        // Alice's development mini-secret gives Alice's well-known address.
        let seed: [u8; 32] = hex::decode("e5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a")
            .unwrap()
            .try_into()
            .unwrap();
        let ss58 = create_hotkey_file(&p, seed).unwrap();
        assert_eq!(ss58, "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY");
        assert_eq!(read_hotkey_file(&p).unwrap().ss58_address, ss58);
        assert!(create_hotkey_file(&p, seed).is_err(), "never overwrites a key");
    }
}
