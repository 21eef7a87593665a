//! Command-line options shared by the miner and the validator, with Bittensor's names.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::devnet::{DEFAULT_BLOCK_TIME, Devnet};
use crate::wallet::{WalletRef, default_wallets_dir, expand_tilde};
use crate::{Chain, ChainError, Result};

/// Known Bittensor networks and their endpoints.
pub const NETWORKS: [(&str, &str); 4] = [
    ("devnet", "the embedded local devnet (no accounts, no network)"),
    ("finney", "wss://entrypoint-finney.opentensor.ai:443"),
    ("test", "wss://test.finney.opentensor.ai:443"),
    ("local", "ws://127.0.0.1:9944"),
];

/// Chain and wallet options (`--subtensor.network`, `--netuid`, `--wallet.name`, `--wallet.hotkey`).
#[derive(Clone, Debug, clap::Args)]
pub struct ChainArgs {
    /// Network: devnet (embedded default), finney, test, local, or a ws:// / wss:// endpoint.
    #[arg(long = "subtensor.network", default_value = "devnet", env = "BT_SUBTENSOR_NETWORK")]
    pub network: String,

    /// Explicit chain endpoint (overrides the network's default endpoint).
    #[arg(long = "subtensor.chain_endpoint", env = "BT_SUBTENSOR_CHAIN_ENDPOINT")]
    pub chain_endpoint: Option<String>,

    /// Subnet id: required off the devnet (a wrong subnet would register, commit and set
    /// weights on someone else's) [default on the devnet: 1]
    #[arg(long = "netuid", env = "BT_NETUID")]
    pub netuid: Option<u16>,

    /// Wallet (coldkey) name.
    #[arg(long = "wallet.name", default_value = "default", env = "BT_WALLET_NAME")]
    pub wallet_name: String,

    /// Hotkey name inside the wallet (default: `miner` for the miner, `validator` for the validator).
    #[arg(long = "wallet.hotkey", env = "BT_WALLET_HOTKEY")]
    pub wallet_hotkey: Option<String>,

    /// Directory of Bittensor wallets (`~` is expanded) [default: ~/.bittensor/wallets]
    #[arg(long = "wallet.path", env = "BT_WALLET_PATH")]
    pub wallet_path: Option<PathBuf>,

    /// Directory of the local devnet's state (shared by every process on this machine).
    #[arg(long = "devnet.dir", default_value = ".bistro/devnet", env = "BISTRO_DEVNET_DIR", help_heading = "Devnet")]
    pub devnet_dir: PathBuf,

    /// Block time of a newly created devnet, in milliseconds.
    #[arg(long = "devnet.block-ms", default_value_t = DEFAULT_BLOCK_TIME.as_millis() as u64, env = "BISTRO_DEVNET_BLOCK_MS", help_heading = "Devnet")]
    pub devnet_block_ms: u64,

    /// Create the devnet with commit-reveal weights, as new Bittensor subnets have: weights
    /// are committed timelocked to the devnet's beacon and revealed this many blocks later.
    #[arg(
        long = "devnet.commit-reveal",
        value_name = "BLOCKS",
        env = "BISTRO_DEVNET_COMMIT_REVEAL",
        help_heading = "Devnet"
    )]
    pub devnet_commit_reveal: Option<u64>,
}

impl ChainArgs {
    /// The subnet: `--netuid`, else 1 on the devnet; off the devnet it must be given.
    pub fn netuid(&self) -> Result<u16> {
        match (self.netuid, self.is_devnet()) {
            (Some(n), _) => Ok(n),
            (None, true) => Ok(1),
            (None, false) => Err(ChainError::Config(format!(
                "--netuid (or BT_NETUID) is required on {}: name the subnet you registered on",
                self.network
            ))),
        }
    }

    /// True for the embedded devnet.
    pub fn is_devnet(&self) -> bool {
        self.network == "devnet"
    }

    /// The wallet these options name, with `default_hotkey` when `--wallet.hotkey` is absent.
    pub fn wallet(&self, default_hotkey: &str) -> WalletRef {
        WalletRef {
            root: self.wallet_path.as_deref().map(expand_tilde).unwrap_or_else(default_wallets_dir),
            name: self.wallet_name.clone(),
            hotkey: self.wallet_hotkey.clone().unwrap_or_else(|| default_hotkey.to_string()),
        }
    }

    /// The hotkey identity: the wallet file's ss58 address when the file exists; on the
    /// devnet without a file, `<wallet.name>-<wallet.hotkey>`.
    pub fn hotkey(&self, default_hotkey: &str) -> Result<String> {
        if !self.is_devnet() {
            self.endpoint()?;
        }
        let w = self.wallet(default_hotkey);
        if w.hotkey_path().exists() || !self.is_devnet() {
            return Ok(w.read_hotkey()?.ss58_address);
        }
        Ok(w.devnet_hotkey())
    }

    /// The endpoint of a non-devnet network.
    pub fn endpoint(&self) -> Result<String> {
        if let Some(e) = &self.chain_endpoint {
            return Ok(e.clone());
        }
        if self.network.starts_with("ws://") || self.network.starts_with("wss://") {
            return Ok(self.network.clone());
        }
        NETWORKS.iter().find(|(n, _)| *n == self.network && *n != "devnet").map(|(_, e)| e.to_string()).ok_or_else(
            || {
                ChainError::Config(format!(
                    "unknown network `{}` (use one of {}, or a ws:// or wss:// URL)",
                    self.network,
                    NETWORKS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ))
            },
        )
    }

    /// Connect to the chain these options name; on a real network the hotkey file of the
    /// wallet (with `default_hotkey` when `--wallet.hotkey` is absent) signs extrinsics.
    pub async fn connect(&self, default_hotkey: &str) -> Result<Arc<dyn Chain>> {
        if self.is_devnet() {
            let block_time = Duration::from_millis(self.devnet_block_ms.max(1));
            let d = match self.devnet_commit_reveal {
                Some(blocks) => Devnet::open_with_commit_reveal(&self.devnet_dir, block_time, blocks)?,
                None => Devnet::open(&self.devnet_dir, block_time)?,
            };
            return Ok(Arc::new(d));
        }
        let endpoint = self.endpoint()?;
        let file = self.wallet(default_hotkey).read_hotkey()?;
        let seed = file
            .secret_seed()
            .ok_or_else(|| ChainError::Wallet(format!("{} has no `secretSeed`", file.path.display())))?;
        let signer = crate::subtensor::keypair_from_seed_hex(seed)?;
        let chain = crate::subtensor::Subtensor::connect(&endpoint, Some(signer), Duration::from_secs(30)).await?;
        Ok(Arc::new(chain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        chain: ChainArgs,
    }

    #[test]
    fn bittensor_style_flags_parse() {
        let c = Cli::parse_from([
            "x",
            "--wallet.name",
            "w",
            "--wallet.hotkey",
            "h",
            "--netuid",
            "3",
            "--subtensor.network",
            "test",
        ]);
        assert_eq!(c.chain.netuid().unwrap(), 3);
        assert_eq!(c.chain.wallet("d").hotkey, "h");
        assert_eq!(c.chain.endpoint().unwrap(), "wss://test.finney.opentensor.ai:443");
        let c = Cli::parse_from(["x", "--subtensor.network", "mainnet"]);
        let e = c.chain.endpoint().unwrap_err().to_string();
        assert!(e.contains("unknown network `mainnet`"), "{e}");
        let c = Cli::parse_from(["x", "--subtensor.network", "test"]);
        assert!(c.chain.netuid().unwrap_err().to_string().contains("--netuid (or BT_NETUID) is required on test"));
        let c = Cli::parse_from(["x"]);
        assert!(c.chain.is_devnet());
        assert_eq!(c.chain.netuid().unwrap(), 1);
        assert_eq!(c.chain.hotkey("miner").unwrap(), "default-miner");
    }

    #[test]
    fn missing_wallet_on_a_real_network_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cli::parse_from(["x", "--subtensor.network", "finney", "--wallet.path", dir.path().to_str().unwrap()]);
        let e = c.chain.hotkey("miner").unwrap_err().to_string();
        assert!(e.contains("hotkeys/miner"), "{e}");
    }
}
