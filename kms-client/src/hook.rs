//! The operations behind `backup-hook`: a synchronous facade over the async
//! client, so the byte pipe stays a plain blocking loop.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::client::{ClientError, KmsClient};
use crate::config::{ClientConfig, ConfigError};
use crate::sealed::{self, KluisIdentity, KluisStanza, Moved, SealError, UnsealError};
use crate::secret::DataKey;

/// Errors of hook operations.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Unseal(#[from] UnsealError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What `seal` did.
pub struct SealReport {
    pub key_id: String,
    pub keyring: String,
    pub version: u32,
    pub escrowed: bool,
    pub moved: Moved,
}

/// A connected hook: a small runtime and a client.
pub struct Hook {
    rt: tokio::runtime::Runtime,
    client: KmsClient,
}

impl Hook {
    /// Connects to the server named in `cfg` (within its connect deadline).
    pub fn connect(cfg: &ClientConfig) -> Result<Self, HookError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(HookError::Runtime)?;
        let client = rt.block_on(KmsClient::connect(cfg))?;
        Ok(Self { rt, client })
    }

    pub fn client(&self) -> &KmsClient {
        &self.client
    }

    /// Runs a future of the client on this hook's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Gets a fresh data key for `backup_id` and seals `input` into `output`.
    pub fn seal<R: Read, W: Write>(
        &self,
        keyring: &str,
        backup_id: &str,
        labels: &BTreeMap<String, String>,
        input: R,
        output: W,
    ) -> Result<(W, SealReport), HookError> {
        let key = self.rt.block_on(self.client.generate_data_key(keyring, backup_id, labels))?;
        let (out, moved) = sealed::seal(&key, input, output)?;
        Ok((
            out,
            SealReport {
                key_id: key.key_id.clone(),
                keyring: key.keyring.clone(),
                version: key.version,
                escrowed: key.recovery_recipient.is_some(),
                moved,
            },
        ))
    }

    /// Unseals `input` into `output`, asking the server to unwrap the data key.
    /// `recovery` identities are tried as well (they need no server).
    pub fn unseal<R: Read, W: Write>(
        &self,
        input: R,
        recovery: &[&dyn age::Identity],
        output: W,
    ) -> Result<(W, Moved), HookError> {
        let ident = KluisIdentity::new(|st: &KluisStanza| -> Result<DataKey, ClientError> {
            self.rt
                .block_on(self.client.unwrap_data_key(&st.key_id, &st.keyring, &st.wrapped))
                .map(|u| u.data_key)
        });
        Ok(sealed::unseal(input, Some(&ident), recovery, output)?)
    }
}

/// Unseals with recovery identities only: no server, no network.
pub fn unseal_offline<R: Read, W: Write>(
    input: R,
    recovery: &[&dyn age::Identity],
    output: W,
) -> Result<(W, Moved), HookError> {
    Ok(sealed::unseal(input, None::<&KluisIdentity<sealed::NoServer>>, recovery, output)?)
}
