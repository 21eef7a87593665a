//! The connection policy: connect with backoff within a timeout, run every call under the
//! timeout, and drop the client after a transport error so the next call reconnects; the
//! storage reads and the signed submissions built on it.

use std::sync::Arc;
use std::time::Duration;

use subxt::dynamic::{self, Value};
use subxt::rpcs::RpcClient;
use subxt::utils::AccountId32;
use subxt::{OnlineClient, SubstrateConfig};
use subxt_signer::sr25519::Keypair;

use super::Subtensor;
use crate::{Chain, ChainError, Result};

type ConnectFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<Conn, subxt::Error>> + Send>>;

/// A live connection: the subxt client, and the RPC client under it for the calls subxt
/// does not batch (`state_queryStorageAt`, [`super::bulk`]).
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) client: OnlineClient<SubstrateConfig>,
    pub(super) rpc: RpcClient,
}

impl std::ops::Deref for Conn {
    type Target = OnlineClient<SubstrateConfig>;
    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

/// How to (re)connect: to a URL, or through a ready client (tests).
#[derive(Clone)]
pub(super) enum Connector {
    Url(String),
    Fixed(Conn),
}

impl Connector {
    pub(super) fn connect(&self) -> ConnectFuture {
        match self.clone() {
            Connector::Url(url) => Box::pin(async move {
                let rpc = if url.starts_with("ws://") || url.starts_with("http://") {
                    RpcClient::from_insecure_url(&url).await
                } else {
                    RpcClient::from_url(&url).await
                }?;
                let client = OnlineClient::<SubstrateConfig>::from_rpc_client(rpc.clone()).await?;
                Ok(Conn { client, rpc })
            }),
            Connector::Fixed(c) => Box::pin(async move { Ok(c) }),
        }
    }
}

fn endpoint_err(endpoint: &str, what: String, e: impl std::error::Error + Send + Sync + 'static) -> ChainError {
    ChainError::Endpoint { endpoint: endpoint.to_string(), what, source: Box::new(e) }
}

/// Whether the connection is still good after `e`: the node answered, but what it said did
/// not decode or named a failure. Any other error (transport, RPC, a dropped subscription,
/// one this code does not know) drops the client, so the next call reconnects.
fn connection_survives(e: &subxt::Error) -> bool {
    use subxt::Error as E;
    matches!(
        e,
        E::StorageKeyError(_)
            | E::StorageValueError(_)
            | E::OtherCodecError(_)
            | E::DispatchErrorDecodeError(_)
            | E::ModuleErrorDetailsError(_)
            | E::ModuleErrorDecodeError(_)
            | E::ConstantError(_)
            | E::CustomValueError(_)
            | E::ExtrinsicDecodeErrorAt(_)
    )
}

impl Subtensor {
    /// The current client, connecting (with backoff, within the timeout) when there is none.
    pub(super) async fn client(&self) -> Result<Conn> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(250);
        let mut last: Option<subxt::Error> = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                let what = format!("cannot connect within {:?}", self.timeout);
                return Err(match last {
                    Some(e) => endpoint_err(&self.endpoint, what, e),
                    None => ChainError::Timeout(format!("{what} to {}", self.endpoint)),
                });
            }
            match tokio::time::timeout(left, self.connector.connect()).await {
                Ok(Ok(c)) => {
                    *guard = Some(c.clone());
                    return Ok(c);
                }
                Ok(Err(e)) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "subtensor connection failed; retrying");
                    last = Some(e);
                }
                Err(_) => tracing::warn!(endpoint = %self.endpoint, "subtensor connection timed out; retrying"),
            }
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
            delay = (delay * 2).min(Duration::from_secs(8));
        }
    }

    /// Run `f` against the client with a timeout; a failure drops the connection so the
    /// next call reconnects.
    pub(super) async fn with_client<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, subxt::Error>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if !connection_survives(&e) {
                    *self.client.lock().await = None;
                }
                Err(endpoint_err(&self.endpoint, what.to_string(), e))
            }
            Err(_) => {
                *self.client.lock().await = None;
                Err(ChainError::Timeout(format!("{what} on {}", self.endpoint)))
            }
        }
    }

    pub(super) fn signer(&self, hotkey: &str) -> Result<Arc<Keypair>> {
        let s = self.signer.clone().ok_or_else(|| ChainError::Wallet("no hotkey secret loaded: cannot sign".into()))?;
        let ours = AccountId32::from(s.public_key().0).to_string();
        if ours != hotkey {
            return Err(ChainError::Wallet(format!("the loaded hotkey is {ours}, not {hotkey}")));
        }
        Ok(s)
    }

    /// The value at storage `addr` under `key`, `default` when unset.
    pub(super) async fn value_or<A>(&self, what: &str, addr: A, key: A::KeyParts, default: A::Value) -> Result<A::Value>
    where
        A: subxt::storage::Address,
    {
        let v = self
            .with_client(what, |c| async move {
                let at = c.at_current_block().await.map_err(subxt::Error::from)?;
                match at.storage().try_fetch(addr, key).await.map_err(subxt::Error::from)? {
                    Some(v) => v.decode().map(Some).map_err(subxt::Error::from),
                    None => Ok(None),
                }
            })
            .await?;
        Ok(v.unwrap_or(default))
    }

    /// A per-subnet storage value (`SubtensorModule.<item>[netuid]`), `default` when unset.
    pub(super) async fn subnet_value<T>(&self, what: &str, item: &'static str, netuid: u16, default: T) -> Result<T>
    where
        T: subxt::ext::scale_decode::DecodeAsType,
    {
        self.value_or(what, dynamic::storage::<(u16,), T>("SubtensorModule", item), (netuid,), default).await
    }

    /// Refuse to submit weights before the subnet's rate limit (`WeightsSetRateLimit` blocks
    /// since this uid's `LastUpdate`) has passed: the chain would reject them.
    pub(super) async fn check_rate_limit(&self, netuid: u16, hotkey: &str) -> Result<()> {
        let limit: u64 = self.subnet_value("weights rate limit", "WeightsSetRateLimit", netuid, 0).await?;
        if limit == 0 {
            return Ok(());
        }
        let Some(uid) = self.metagraph(netuid).await?.uid_of(hotkey) else { return Ok(()) };
        let last: Vec<u64> = match self.subnet_value("last update", "LastUpdate", netuid, Vec::new()).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read LastUpdate; not checking the rate limit here");
                return Ok(());
            }
        };
        let block = self.block_number().await?;
        let since = block.saturating_sub(last.get(uid as usize).copied().unwrap_or(0));
        if since < limit {
            return Err(ChainError::Weights(format!(
                "rate limit: netuid {netuid} takes weights every {limit} blocks; {} more to wait",
                limit - since
            )));
        }
        Ok(())
    }

    pub(super) async fn submit(
        &self,
        what: &str,
        hotkey: &str,
        call: subxt::tx::DynamicPayload<Vec<Value>>,
    ) -> Result<()> {
        let signer = self.signer(hotkey)?;
        self.with_client(what, |c| async move {
            let at = c.at_current_block().await.map_err(subxt::Error::from)?;
            let progress = at
                .transactions()
                .sign_and_submit_then_watch_default(&call, signer.as_ref())
                .await
                .map_err(subxt::Error::from)?;
            progress.wait_for_finalized_success().await.map_err(subxt::Error::from)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::connection_survives;

    #[test]
    fn transport_errors_drop_the_connection_and_decode_errors_keep_it() {
        let decode = subxt::Error::OtherCodecError(subxt::ext::codec::Error::from("bad SCALE"));
        assert!(connection_survives(&decode), "a value that did not decode says nothing about the connection");
        let rpc = subxt::Error::OtherRpcClientError(subxt::rpcs::Error::DisconnectedWillReconnect("gone".into()));
        assert!(!connection_survives(&rpc), "a dropped connection must be re-established");
        let unknown = subxt::Error::other_str("something else");
        assert!(!connection_survives(&unknown), "an unknown error reconnects, to be safe");
    }
}
