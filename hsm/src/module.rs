//! Process-wide registry of loaded PKCS#11 modules.
//!
//! `C_Initialize` / `C_Finalize` act on the whole process, per module: a second `C_Initialize`
//! returns `CKR_CRYPTOKI_ALREADY_INITIALIZED`, and `C_Finalize` invalidates every session any
//! part of the process holds. So each module path is loaded and initialized once, here, and
//! shared by every [`crate::Hsm`] that uses it. Modules stay loaded until the process exits.
//!
//! Re-initialization (the only way SoftHSM2 notices a token that came back, see the crate docs)
//! is coordinated with an *epoch* behind a `RwLock`: every PKCS#11 call on a session holds the
//! read lock and first checks that the session was opened in the current epoch; re-initializing
//! takes the write lock (so no call is in flight, as PKCS#11 requires for `C_Finalize`) and bumps
//! the epoch. Sessions from an older epoch are never used or closed again: after
//! `C_Initialize` the module hands out session handles from 1 again, so an old handle may name
//! somebody else's new session.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use crate::HsmError;

/// A loaded, initialized PKCS#11 module shared by all `Hsm` values using the same path.
pub(crate) struct Module {
    pub(crate) path: PathBuf,
    pub(crate) ctx: Pkcs11,
    /// True if we performed `C_Initialize` ourselves. If somebody else in the process (outside
    /// this crate) initialized the module first, we never finalize it behind their back.
    owned: bool,
    epoch: RwLock<u64>,
}

static REGISTRY: Mutex<Vec<Arc<Module>>> = Mutex::new(Vec::new());

fn init_args() -> CInitializeArgs {
    // Native OS locking: the pool uses sessions from several threads at once.
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

impl Module {
    /// The shared module for `path`, loading and initializing it on first use.
    pub(crate) fn get(path: &Path) -> Result<Arc<Self>, HsmError> {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut registry = REGISTRY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(module) = registry.iter().find(|m| m.path == key) {
            return Ok(Arc::clone(module));
        }
        let ctx = Pkcs11::new(&key).map_err(|source| HsmError::ModuleLoad {
            path: path.to_path_buf(),
            source,
        })?;
        let owned = match ctx.initialize(init_args()) {
            Ok(()) => true,
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::warn!(
                    module = %key.display(),
                    "PKCS#11 module already initialized by other code in this process; \
                     will not re-initialize it to recover from token loss"
                );
                false
            }
            Err(source) => {
                return Err(HsmError::ModuleInit {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let module = Arc::new(Self {
            path: key,
            ctx,
            owned,
            epoch: RwLock::new(0),
        });
        registry.push(Arc::clone(&module));
        Ok(module)
    }

    /// Hold this while making PKCS#11 calls on a session; compare it with the session's epoch.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, u64> {
        self.epoch
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `C_Finalize` + `C_Initialize`, unless another caller already did so since `seen`.
    ///
    /// Waits for all in-flight PKCS#11 calls on this module to finish first. Must not be called
    /// while holding [`Module::read`].
    pub(crate) fn reinitialize(&self, seen: u64) -> Result<(), CkError> {
        let mut epoch = self
            .epoch
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *epoch != seen || !self.owned {
            return Ok(());
        }
        // Whatever happens next, every session handle from before is dead.
        *epoch += 1;
        match self.ctx.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(err) => {
                tracing::warn!(module = %self.path.display(), error = %err, "C_Finalize failed")
            }
        }
        match self.ctx.initialize(init_args()) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(err) => Err(err),
        }
    }
}
