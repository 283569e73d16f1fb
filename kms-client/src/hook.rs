//! The operations behind `backup-hook`: a synchronous facade over the async
//! client, so the byte pipe stays a plain blocking loop.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use kluis_age::sealed::{self, KluisIdentity, KluisStanza, Moved, NoServer, SealError, UnsealError};
use kluis_age::secret::DataKey;

use crate::client::{ClientError, KmsClient, RestoreTest, UnwrappedKey};
use crate::config::{ClientConfig, ConfigError};

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
    Unseal(#[from] UnsealError<ClientError>),
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
    /// Connects to the server named in `cfg` (within its connect deadline, retrying while
    /// it is unreachable as `cfg.retry` says).
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

    /// Asks the server to unwrap the data key of a Kluis stanza.
    pub(crate) fn unwrap_data_key(&self, st: &KluisStanza) -> Result<UnwrappedKey, ClientError> {
        self.rt.block_on(self.client.unwrap_data_key(&st.key_id, &st.keyring, &st.wrapped))
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
            self.unwrap_data_key(st).map(|u| u.data_key)
        });
        Ok(sealed::unseal(input, Some(&ident), recovery, output)?)
    }
}

/// What `verify` found (also recorded at the server).
pub struct VerifyReport {
    pub keyring: Option<String>,
    pub key_id: Option<String>,
    pub bytes: u64,
    pub duration: std::time::Duration,
    /// `None` when every chunk authenticated.
    pub failure: Option<HookError>,
    /// Set when the result could not be recorded at the server.
    pub record_error: Option<ClientError>,
}

impl Hook {
    /// A restore test: unwraps the key, authenticates every chunk to the end, writes
    /// no plaintext, and records the outcome (success or failure) at the server.
    pub fn verify<R: Read>(&self, input: R, host: &str) -> VerifyReport {
        let started = std::time::Instant::now();
        let seen: std::cell::RefCell<Option<(String, String)>> = std::cell::RefCell::new(None);
        let ident = KluisIdentity::new(|st: &KluisStanza| -> Result<DataKey, ClientError> {
            *seen.borrow_mut() = Some((st.keyring.clone(), st.key_id.clone()));
            self.unwrap_data_key(st).map(|u| u.data_key)
        });
        let result = sealed::unseal(input, Some(&ident), &[], std::io::sink());
        let duration = started.elapsed();
        let (bytes, failure) = match result {
            Ok((_, moved)) => (moved.plaintext_bytes, None),
            Err(e) => (0, Some(HookError::Unseal(e))),
        };
        let (keyring, key_id) = match seen.into_inner() {
            Some((k, i)) => (Some(k), Some(i)),
            None => (None, None),
        };
        let mut report = VerifyReport { keyring, key_id, bytes, duration, failure, record_error: None };
        // A file too damaged to name its keyring cannot be attributed; it still fails.
        if let Some(keyring) = report.keyring.clone() {
            let t = RestoreTest {
                keyring,
                key_id: report.key_id.clone().unwrap_or_default(),
                backup_id: String::new(),
                ok: report.failure.is_none(),
                detail: report.failure.as_ref().map(ToString::to_string).unwrap_or_default(),
                bytes: report.bytes,
                duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                host: host.to_owned(),
            };
            if let Err(e) = self.rt.block_on(self.client.record_restore_test(&t)) {
                report.record_error = Some(e);
            }
        }
        report
    }
}

/// Unseals with recovery identities only: no server, no network.
pub fn unseal_offline<R: Read, W: Write>(
    input: R,
    recovery: &[&dyn age::Identity],
    output: W,
) -> Result<(W, Moved), HookError> {
    Ok(sealed::unseal(input, None::<&KluisIdentity<NoServer<ClientError>, ClientError>>, recovery, output)?)
}
