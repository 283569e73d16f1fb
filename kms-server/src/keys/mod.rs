//! The key hierarchy: keyrings of versioned keyring keys (wrapped by the master
//! key), and per-backup data keys wrapped by a keyring key with AAD binding the
//! key id, keyring, version and backup context.
//!
//! Every function takes the auth layer's [`Authorized`] proof and checks that it
//! covers the operation; nothing here trusts a caller-supplied principal.

pub mod kmip;
pub mod lease;
mod lifecycle;
pub mod master_rewrap;
pub mod registry;
mod report;

pub use lifecycle::{DestroyOutcome, MasterRotation};
pub use report::{WireDestruction, describe_action, wire_version_state};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;

use ring::rand::SystemRandom;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::auth::{Action, Authorized, Role, RuntimeGrant};
use crate::clock::Clock;
use crate::master::{MasterError, MasterKeyProvider};
use crate::secret::{Key256, aes_gcm_open, aes_gcm_seal, random_array};
use crate::audit::{AuditChain, AuditError, AuditEvent};
use kluis_escrow::Manifest;
use crate::model::{
    Outcome, ApprovalRecord, DataKeyRecord, DestructionRecord, EscrowInfo, Hold, KeyState, KeyringRecord, PendingAction,
    RestoreTestRecord, VersionRecord, VersionState,
};
use crate::store::{Store, StoreError};
use registry::{Registry, RegistryError, WriteOp};

/// Default time a destructive request waits for a second officer.
pub const DEFAULT_APPROVAL_TTL_SECS: u64 = 86_400;
/// Default least time between two scrubs of the store.
pub const DEFAULT_SCRUB_INTERVAL_SECS: u64 = 86_400;
/// META key: when the store was last scrubbed (i64 big-endian, lifecycle clock).
const SCRUB_LAST_META: &str = "scrub_last";
/// Default waiting period between a destruction request and the destruction.
pub const DEFAULT_DESTRUCTION_WAIT_DAYS: u32 = 7;

/// Format byte of a wrapped data key blob issued before format 2: the data key itself is
/// wrapped, so the file's header plus the store and the master key open it even after the
/// key is destroyed (the tombstone alone refuses it). Still read.
const WRAPPED_DK_V1: u8 = 1;
/// Format byte of a wrapped data key blob since format 2: a base key is wrapped, and the
/// data key is derived from it and a per-key secret that only the registry holds
/// ([`derive_data_key`]); destroying the key deletes the secret, so nothing the server
/// keeps opens the file any more.
const WRAPPED_DK_V2: u8 = 2;
/// What a format 2 blob's AAD starts with: a blob relabelled as the other format fails.
const DK_V2_AAD: &[u8] = b"kluis/v2/wrapped-data-key";
/// HKDF salt of the format 2 derivation (a fixed domain label).
const DK_V2_SALT: &[u8] = b"kluis/v2/data-key";
/// Both formats: `format(1) || version(4) || nonce(12) || ciphertext(32) || tag(16)`.
pub const WRAPPED_DK_LEN: usize = 1 + 4 + 12 + 32 + 16;
pub(crate) const MASTER_CHECK_META: &str = "master_check";
/// Which generation of the configured master key wraps the store (u32 big-endian;
/// absent = 1, the configured key itself). `kmsctl master rotate` increments it.
pub(crate) const MASTER_GENERATION_META: &str = "master_generation";
const ESCROW_META: &str = "escrow";
const GRANTS_META: &str = "runtime_grants";
/// The server's Ed25519 audit key (PKCS#8), wrapped by the master key.
pub(crate) const AUDIT_KEY_META: &str = "audit_key";
pub(crate) const AUDIT_KEY_AAD: &[u8] = b"kluis/v1/audit-signing-key";
pub(crate) const MASTER_CHECK_AAD: &[u8] = b"kluis/v1/master-check";

/// Errors of the key layer.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: &'static str },
    #[error("KMIP object {uid} does not exist")]
    KmipObjectNotFound { uid: String },
    #[error("KMIP object {uid} already exists on this server; it was left as it is")]
    KmipObjectExists { uid: String },
    #[error("kmip_escrow_dir is set ({}) but no escrow manifest is in force, so KMIP objects cannot be escrowed and none is made or changed: install one with `kmsctl escrow install`", .dir.display())]
    KmipEscrowNoRecipient { dir: std::path::PathBuf },
    #[error("the KMIP escrow bundle could not be written in {}, so nothing was done: {source}", .dir.display())]
    KmipEscrow { dir: std::path::PathBuf, source: kluis_escrow::kmip_bundle::BundleError },
    #[error("KMIP object {uid} is {state}: {operation} is not possible in that state")]
    KmipState { uid: String, state: &'static str, operation: &'static str },
    #[error("the object has no {name} at index {index}")]
    KmipAttributeMissing { name: &'static str, index: usize },
    #[error("{name} cannot be changed that way: {reason}")]
    KmipAttributeFixed { name: &'static str, reason: &'static str },
    #[error("keyring {name:?} does not exist")]
    KeyringNotFound { name: String },
    #[error("keyring {name:?} already exists")]
    KeyringExists { name: String },
    #[error("data key {key_id} is not known to this server (sealed by another Kluis server, or never issued)")]
    UnknownKeyId { key_id: String },
    #[error("data key {key_id} belongs to keyring {actual:?}, not {claimed:?}")]
    KeyringMismatch { key_id: String, claimed: String, actual: String },
    #[error("data key {key_id} was destroyed on {date}")]
    Destroyed { key_id: String, date: String },
    #[error("keyring {keyring:?} version {version} is retired: the server no longer unwraps its keys (the escrow recovery key still opens backups that carry an escrow stanza)")]
    VersionRetired { keyring: String, version: u32 },
    #[error("the wrapped data key {key_id} does not authenticate: it was altered, or its context does not match")]
    UnwrapFailed { key_id: String },
    #[error("retiring keyring {keyring:?} versions below {below} would strand {count} active key(s) still wrapped under them: their backups would no longer open through the server. Rewrap them first (`backup-hook rewrap`), or retire with --force")]
    RetireStrands { keyring: String, below: u32, count: u64 },
    #[error("the secret of data key {key_id} is gone from the registry (the key was destroyed): nothing the server keeps opens it; the escrow recovery key still opens a backup that carries an escrow stanza")]
    KeyMaterialErased { key_id: String },
    #[error("the master key does not open this store ({master}); wrong key file or token key")]
    MasterMismatch { master: String },
    #[error("keyring {keyring:?} version {version} could not be unwrapped by the master key")]
    KeyringUnwrap { keyring: String, version: u32, source: MasterError },
    #[error(transparent)]
    Master(#[from] MasterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("the escrow manifest is not valid: {0}")]
    EscrowManifest(#[source] kluis_escrow::ManifestError),
    #[error("the manifest's recovery recipient {new} differs from the one in force ({current}, ceremony {ceremony}); backups sealed so far stay recoverable only with that ceremony's shares, so keep them. Install with --new-recipient to switch anyway")]
    EscrowRecipientChange { current: String, new: String, ceremony: String },
    #[error("the authorization does not cover this operation")]
    NotCovered,
    #[error(transparent)]
    Rewrap(#[from] master_rewrap::RewrapError),
    /// A state the code does not expect (a bug): fails the request, never as a refusal.
    #[error("internal error: {what}")]
    Internal { what: &'static str },
    #[error("the system random number generator failed")]
    Rng,
    #[error("the data key could not be derived (HKDF)")]
    Derivation,
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("principal {principal:?} has no runtime grant of {role} on keyring {keyring:?} (grants from the config file are changed there)")]
    GrantNotFound { principal: String, role: String, keyring: String },
    #[error("no approval request {id}")]
    ApprovalNotFound { id: u64 },
    #[error("approval request {id} expired on {date}; ask again")]
    ApprovalExpired { id: u64, date: String },
    #[error("approval request {id} was made by {principal:?}; a second, different officer must approve it")]
    SelfApproval { id: u64, principal: String },
    #[error("approval request {id} was already approved by {by:?}")]
    ApprovalDone { id: u64, by: String },
    #[error("cannot retire versions below {below} of keyring {keyring:?}: {reason}")]
    BadRetire { keyring: String, below: u32, reason: &'static str },
    #[error("the audit key could not be opened: {reason}")]
    AuditKey { reason: &'static str },
    #[error("keyring {keyring:?} was destroyed on {date}: its keys are gone and nothing under it unwraps again")]
    KeyringDestroyed { keyring: String, date: String },
    #[error("keyring {keyring:?} is under legal hold since {since} (by {by:?}: {reason}); nothing of it is destroyed until the hold is released")]
    LegalHold { keyring: String, by: String, since: String, reason: String },
    #[error("keyring {keyring:?} has no legal hold to release")]
    NoHold { keyring: String },
    #[error("{target} already has destruction {id} scheduled for {due}")]
    AlreadyScheduled { target: String, id: u64, due: String },
    #[error("no destruction {id}")]
    DestructionNotFound { id: u64 },
    #[error("destruction {id} cannot be cancelled: it is {state}")]
    DestructionNotPending { id: u64, state: &'static str },
    #[error("no escrow manifest is in force")]
    NoEscrow,
    #[error("the recovery recipient {requested} is not the one in force ({in_force}): the escrow was replaced since; run rewrap again to add a stanza to the recipient in force")]
    EscrowRecipientNotInForce { requested: String, in_force: String },
    #[error("approval request {id} no longer applies: {reason}; ask again")]
    ApprovalOutdated { id: u64, reason: &'static str },
    #[error("the new master key (generation {generation}) could not be made or opened: {source}")]
    MasterGeneration { generation: u32, source: MasterError },
}

impl From<RegistryError> for KeyError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(e) => KeyError::Store(e),
            RegistryError::Audit(e) => KeyError::Audit(e),
            RegistryError::Rng => KeyError::Rng,
        }
    }
}

/// A keyring in memory: metadata plus the unwrapped version keys.
#[derive(Clone)]
struct LiveKeyring {
    record: KeyringRecord,
    keys: BTreeMap<u32, Arc<Key256>>,
}

impl LiveKeyring {
    fn current(&self) -> Option<(u32, Arc<Key256>)> {
        self.record
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Active)
            .map(|v| v.version)
            .max()
            .and_then(|v| self.keys.get(&v).map(|k| (v, k.clone())))
    }
}


/// A freshly issued data key. Holds the plaintext key: no `Debug`.
pub struct IssuedDataKey {
    pub key_id: String,
    pub data_key: Key256,
    pub wrapped: Vec<u8>,
    pub keyring: String,
    pub version: u32,
    pub recovery_recipient: Option<String>,
}

/// A data key issued but not yet written ([`KeyManager::issue`]).
struct Issue {
    id: [u8; 16],
    data_key: Key256,
    wrapped: Vec<u8>,
    version: u32,
    recovery_recipient: Option<String>,
    record: DataKeyRecord,
    secret: Key256,
}

/// What [`KeyManager::rewrap_data_key`] answers.
#[derive(Debug)]
pub struct RewrapOutcome {
    /// The same data key wrapped under `version` (the request's blob when unchanged).
    pub wrapped: Vec<u8>,
    pub version: u32,
    pub previous_version: u32,
    /// The escrow recovery recipient in force, if any.
    pub recovery_recipient: Option<String>,
    /// The registry counts the key as escrowed.
    pub escrowed: bool,
    /// The key was issued after the manifest in force was installed, so its file carries
    /// a stanza to `recovery_recipient` from sealing.
    pub sealed_with_recipient: bool,
}

/// A wrapped data key blob opened by its keyring key: the data key (format 1) or the
/// base key it is derived from (format 2). No `Debug`.
struct Opened {
    format: u8,
    key: Key256,
    version: u32,
}

/// An unwrapped data key. Holds the plaintext key: no `Debug`.
pub struct UnwrappedDataKey {
    pub data_key: Key256,
    pub keyring: String,
    pub version: u32,
    pub backup_id: String,
}

/// What a request that may need a second officer led to: done at once, or a pending
/// approval (dual control) with the state in force, which the request left unchanged.
pub enum Requested<T> {
    Done(T),
    Pending { approval: ApprovalRecord, current: T },
}

/// Keyring metadata for listings.
#[derive(Clone, Debug)]
pub struct KeyringInfo {
    pub name: String,
    pub created: i64,
    pub retention_days: u32,
    pub current_version: u32,
    pub versions: Vec<(u32, i64, VersionState)>,
    pub issued_keys: u64,
    pub rotation_period_days: u32,
    /// When the next automatic rotation is due.
    pub next_rotation: Option<i64>,
    pub hold: Option<Hold>,
    pub destroyed: Option<i64>,
}

/// What the key manager keeps in memory besides the store: one immutable snapshot.
/// Requests read the snapshot they loaded; a change builds the next snapshot and
/// publishes it as a whole after its commit is durable, so memory is never half-updated
/// and never ahead of the store.
#[derive(Clone)]
struct State {
    /// The master key generation in force and its provider.
    master: (u32, Arc<dyn MasterKeyProvider>),
    rings: HashMap<String, Arc<LiveKeyring>>,
    escrow: Option<EscrowInfo>,
    /// Destructions scheduled and not yet carried out or cancelled (a short list).
    scheduled: Vec<DestructionRecord>,
}

/// Proof that the caller holds the admin lock: every change of [`State`] is made under
/// it, one at a time, so no change is lost between loading a snapshot and publishing
/// the next. Taken for scheduled work, it carries the maintenance lease's fence, which
/// every write made through [`KeyManager::write_as`] then expects.
pub(crate) struct Admin<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    fence: Option<lease::Fence>,
}

/// The key manager: the service layer behind the gRPC handlers.
pub struct KeyManager {
    store: Registry,
    /// The configured master key as opened at start (its store generation); rotations
    /// make its siblings.
    configured: Arc<dyn MasterKeyProvider>,
    clock: Arc<dyn Clock>,
    destruction_wait_secs: i64,
    scrub_interval_secs: i64,
    audit_key: Arc<ring::signature::Ed25519KeyPair>,
    chain: Arc<AuditChain>,
    state: ArcSwap<State>,
    admin: Mutex<()>,
    rng: SystemRandom,
    approval_ttl_secs: u64,
    /// `kmip_escrow_dir`: where KMIP objects are escrowed (None: they are not).
    kmip_escrow: Option<kmip::escrow::EscrowDir>,
}

/// Reads the [`State`] from the store: the master generation it records (`master` if that
/// is the generation given, else `configured`'s sibling of it), every keyring with its
/// version keys unwrapped (those `prev` holds under the same wrapped bytes are reused, not
/// unwrapped again), the escrow in force, the scheduled destructions. Blocking (master-key
/// operations).
fn load_state(
    store: &Registry,
    configured: &Arc<dyn MasterKeyProvider>,
    master: (u32, Arc<dyn MasterKeyProvider>),
    prev: Option<&State>,
) -> Result<State, KeyError> {
    let master = match prev {
        None => master,
        Some(_) => {
            let g = crate::master::decode_generation(store.get_meta(MASTER_GENERATION_META)?.as_deref())
                .map_err(|e| KeyError::MasterGeneration { generation: 0, source: e })?;
            if g == master.0 {
                master
            } else {
                let m = configured.generation(g, false).map_err(|e| KeyError::MasterGeneration { generation: g, source: e })?;
                (g, m)
            }
        }
    };
    let mut rings = HashMap::new();
    for record in store.keyrings()? {
        let before = prev.and_then(|p| p.rings.get(&record.name));
        let mut keys = BTreeMap::new();
        for v in record.versions.iter().filter(|_| record.destroyed.is_none()) {
            let same = before.and_then(|b| {
                let old = b.record.versions.iter().find(|o| o.version == v.version)?;
                if old.wrapped_key == v.wrapped_key { b.keys.get(&v.version).cloned() } else { None }
            });
            if let Some(k) = same {
                keys.insert(v.version, k);
                continue;
            }
            let raw = master
                .1
                .unwrap(&krk_aad(&record.name, v.version), &v.wrapped_key)
                .map_err(|e| KeyError::KeyringUnwrap { keyring: record.name.clone(), version: v.version, source: e })?;
            let key = Key256::from_slice(&raw).ok_or(KeyError::KeyringUnwrap {
                keyring: record.name.clone(),
                version: v.version,
                source: MasterError::UnwrapFailed,
            })?;
            keys.insert(v.version, Arc::new(key));
        }
        rings.insert(record.name.clone(), Arc::new(LiveKeyring { record, keys }));
    }
    let escrow = match store.get_meta(ESCROW_META)? {
        Some(bytes) => Some(postcard::from_bytes(&bytes).map_err(|e| StoreError::Decode { what: "escrow", source: e })?),
        None => None,
    };
    let scheduled = store
        .destructions()?
        .into_iter()
        .filter(|d| d.state == crate::model::DestructionState::Scheduled)
        .collect();
    Ok(State { master, rings, escrow, scheduled })
}

pub(crate) fn format_date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// Validates a keyring name: 1 to 64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_keyring_name(name: &str) -> Result<(), KeyError> {
    let bad = |reason| Err(KeyError::InvalidArgument { field: "keyring", reason });
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > 64 {
        return bad("must be at most 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return bad("may contain only letters, digits, '.', '_' and '-'");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    Ok(())
}

fn validate_text(field: &'static str, s: &str, max: usize, allow_empty: bool) -> Result<(), KeyError> {
    if s.is_empty() && !allow_empty {
        return Err(KeyError::InvalidArgument { field, reason: "must not be empty" });
    }
    if s.len() > max {
        return Err(KeyError::InvalidArgument { field, reason: "is too long" });
    }
    if s.chars().any(char::is_control) {
        return Err(KeyError::InvalidArgument { field, reason: "must not contain control characters" });
    }
    Ok(())
}

fn parse_key_id(s: &str) -> Result<[u8; 16], KeyError> {
    let bad = KeyError::InvalidArgument { field: "key_id", reason: "must be 32 lowercase hex characters" };
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(bad);
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id).map_err(|_| bad)?;
    Ok(id)
}

fn lp(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// AAD of a keyring key under the master key.
pub(crate) fn krk_aad(keyring: &str, version: u32) -> Vec<u8> {
    let mut a = b"kluis/v1/krk\0".to_vec();
    lp(&mut a, keyring.as_bytes());
    a.extend_from_slice(&version.to_be_bytes());
    a
}

/// AAD of a data key under a keyring key: binds key id, keyring, version and backup context.
/// The data key of a format 2 blob: HKDF-SHA256 over the unwrapped base key and the
/// registry's secret for the key, bound to the key id.
fn derive_data_key(base: &Key256, secret: &Key256, id: &[u8; 16]) -> Result<Key256, KeyError> {
    use ring::hkdf::{HKDF_SHA256, Salt};
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(base.expose());
    ikm[32..].copy_from_slice(secret.expose());
    let info: [&[u8]; 2] = [b"data key", id];
    let mut out = Zeroizing::new([0u8; 32]);
    Salt::new(HKDF_SHA256, DK_V2_SALT)
        .extract(ikm.as_slice())
        .expand(&info, HKDF_SHA256)
        .and_then(|okm| okm.fill(out.as_mut_slice()))
        .map_err(|_| KeyError::Derivation)?;
    Key256::from_slice(out.as_slice()).ok_or(KeyError::Derivation)
}

/// The AAD of a wrapped data key blob of `format`.
fn blob_aad(format: u8, key_id: &[u8; 16], keyring: &str, version: u32, backup_id: &str, labels: &[(String, String)]) -> Vec<u8> {
    let aad = dk_aad(key_id, keyring, version, backup_id, labels);
    if format == WRAPPED_DK_V1 {
        return aad;
    }
    let mut out = Vec::with_capacity(DK_V2_AAD.len() + aad.len());
    out.extend_from_slice(DK_V2_AAD);
    out.extend_from_slice(&aad);
    out
}

fn dk_aad(key_id: &[u8; 16], keyring: &str, version: u32, backup_id: &str, labels: &[(String, String)]) -> Vec<u8> {
    let mut a = b"kluis/v1/dk\0".to_vec();
    a.extend_from_slice(key_id);
    lp(&mut a, keyring.as_bytes());
    a.extend_from_slice(&version.to_be_bytes());
    lp(&mut a, backup_id.as_bytes());
    a.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    for (k, v) in labels {
        lp(&mut a, k.as_bytes());
        lp(&mut a, v.as_bytes());
    }
    a
}

impl KeyManager {
    /// Initialises a fresh store for `master`: records a check value so that a
    /// later start with the wrong master key is refused.
    pub fn init_store(store: Arc<dyn Store>, master: &dyn MasterKeyProvider) -> Result<(), KeyError> {
        let store = Registry::new(store);
        if store.get_meta(MASTER_CHECK_META)?.is_some() {
            return Err(KeyError::Store(StoreError::AlreadyExists { store: store.describe() }));
        }
        let rng = SystemRandom::new();
        let probe: Zeroizing<[u8; 32]> = Zeroizing::new(random_array(&rng).map_err(|_| KeyError::Rng)?);
        let blob = master.wrap(MASTER_CHECK_AAD, probe.as_ref())?;
        store.write_blocking(WriteOp::PutMeta { key: MASTER_CHECK_META, value: blob })?;
        Ok(())
    }

    /// Opens the key manager: checks the master key against the store and
    /// unwraps every keyring key into memory. `master` is generation `generation` of
    /// the configured key, the one the store records (see [`MASTER_GENERATION_META`]);
    /// rotations derive the next generation from it.
    pub fn open(
        store: Arc<dyn Store>,
        chain: &Arc<AuditChain>,
        generation: u32,
        master: Arc<dyn MasterKeyProvider>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, KeyError> {
        let store = Registry::new(store);
        let check = store
            .get_meta(MASTER_CHECK_META)?
            .ok_or_else(|| KeyError::Store(StoreError::NotInitialised { store: store.describe() }))?;
        master
            .unwrap(MASTER_CHECK_AAD, &check)
            .map_err(|e| match e {
                MasterError::UnwrapFailed => KeyError::MasterMismatch { master: master.describe() },
                other => KeyError::Master(other),
            })?;
        // The epoch first: a change committed while the state is read is seen by the next sync.
        let epoch = store.get_meta(registry::STATE_EPOCH_META)?;
        let loaded = load_state(&store, &master, (generation, master.clone()), None)?;
        let audit_key = Arc::new(Self::audit_key(&store, master.as_ref())?);
        let checked = {
            use ring::signature::KeyPair;
            crate::audit::integrity::check_at_start(store.store(), audit_key.public_key().as_ref())?
        };
        chain.set_signer(audit_key.clone(), checked)?;
        Ok(Self {
            store: store.tracking_epoch(epoch),
            configured: master.clone(),
            clock,
            destruction_wait_secs: i64::from(DEFAULT_DESTRUCTION_WAIT_DAYS) * 86_400,
            scrub_interval_secs: DEFAULT_SCRUB_INTERVAL_SECS as i64,
            audit_key,
            chain: chain.clone(),
            state: ArcSwap::from_pointee(loaded),
            admin: Mutex::new(()),
            rng: SystemRandom::new(),
            approval_ttl_secs: DEFAULT_APPROVAL_TTL_SECS,
            kmip_escrow: None,
        })
    }

    /// The master key in force (after rotations, a sibling of the configured one).
    pub fn master(&self) -> Arc<dyn MasterKeyProvider> {
        self.state.load().master.1.clone()
    }

    /// The store (for the health probe).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.shared()
    }

    /// The master key generation in force (1 = the configured key).
    pub fn master_generation(&self) -> u32 {
        self.state.load().master.0
    }

    /// The snapshot in force.
    fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// Publishes the next snapshot: `change` applied to the one in force. Called after the
    /// change is durable, with the admin lock held.
    fn publish(&self, _admin: &Admin<'_>, change: impl FnOnce(&mut State)) {
        let mut next = State::clone(&self.state.load());
        change(&mut next);
        self.state.store(Arc::new(next));
    }

    /// Brings the state in force up to the store's, if another process (a replica on the
    /// same database) changed it since it was loaded: compares the stored state epoch to
    /// the one loaded (one read by key) and reloads when they differ. Returns whether it
    /// reloaded. Called before an unwrap, after taking the admin lock, and by the server's
    /// poll; a failure keeps the state in force.
    pub async fn sync(&self) -> Result<bool, KeyError> {
        let stored = self.store.get_meta(registry::STATE_EPOCH_META)?;
        if self.store.loaded_epoch() == stored {
            return Ok(false);
        }
        let admin = Admin { _guard: self.admin.lock().await, fence: None };
        self.sync_locked(&admin).await
    }

    /// The state epoch the state in force was loaded at (None: none was stored).
    pub fn loaded_epoch(&self) -> Option<Vec<u8>> {
        self.store.loaded_epoch()
    }

    /// [`sync`](Self::sync) with the admin lock held.
    async fn sync_locked(&self, admin: &Admin<'_>) -> Result<bool, KeyError> {
        let stored = self.store.get_meta(registry::STATE_EPOCH_META)?;
        if self.store.loaded_epoch() == stored {
            return Ok(false);
        }
        let (store, configured, prev) = (self.store.clone(), self.configured.clone(), self.state());
        let next = tokio::task::spawn_blocking(move || load_state(&store, &configured, prev.master.clone(), Some(&prev))).await??;
        self.publish(admin, |s| *s = next);
        self.store.set_loaded_epoch(stored.clone());
        tracing::info!(epoch = %stored.as_deref().map(hex::encode).unwrap_or_default(), "state reloaded");
        Ok(true)
    }

    /// What the audit history check found wrong, if anything (at start, or since).
    pub fn audit_alarm(&self) -> Option<crate::audit::integrity::IntegrityError> {
        self.chain.alarmed()
    }

    /// One tick of the maintenance lease on this key manager's store (see [`lease`]).
    pub async fn tick_lease(&self, lease: &lease::Lease, now: std::time::Instant) -> Result<lease::Tick, lease::LeaseError> {
        lease.tick(&self.store, now).await
    }

    /// Gives the maintenance lease up, if this process holds it (at shutdown).
    pub async fn release_lease(&self, lease: &lease::Lease) -> Result<bool, lease::LeaseError> {
        lease.release(&self.store).await
    }

    /// Takes the admin lock and brings the state up to the store's first, so that a
    /// change is made on what every replica last committed.
    async fn lock_admin(&self) -> Result<Admin<'_>, KeyError> {
        self.lock_admin_as(None).await
    }

    /// [`lock_admin`](Self::lock_admin) for scheduled work done under the maintenance
    /// lease's `fence` (None: the store is this process's alone, or a request does it).
    async fn lock_admin_as(&self, fence: Option<lease::Fence>) -> Result<Admin<'_>, KeyError> {
        let admin = Admin { _guard: self.admin.lock().await, fence };
        self.sync_locked(&admin).await?;
        Ok(admin)
    }

    /// Writes `op`, fenced if `admin` carries a fence: if another process took the
    /// maintenance lease over meanwhile, nothing is written ([`StoreError::Conflict`]).
    async fn write_as(&self, admin: &Admin<'_>, op: WriteOp) -> Result<(), RegistryError> {
        match admin.fence {
            Some(fence) => self.store.write(WriteOp::Atomic(vec![fence.expect(), op])).await,
            None => self.store.write(op).await,
        }
    }

    /// A keyring of the snapshot in force.
    fn ring(&self, name: &str) -> Result<Arc<LiveKeyring>, KeyError> {
        self.state.load().rings.get(name).cloned().ok_or_else(|| KeyError::KeyringNotFound { name: name.to_owned() })
    }

    /// The waiting period between a destruction request and the destruction.
    pub fn with_destruction_wait_days(mut self, days: u32) -> Self {
        self.destruction_wait_secs = i64::from(days) * 86_400;
        self
    }

    /// Escrows KMIP objects into `dir` (docs/kmip-escrow.md); None: no bundle is written.
    pub fn with_kmip_escrow_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.kmip_escrow = dir.map(kmip::escrow::EscrowDir::new);
        self
    }

    /// The least time between two scrubs of the store.
    pub fn with_scrub_interval_secs(mut self, secs: u64) -> Self {
        self.scrub_interval_secs = i64::try_from(secs).unwrap_or(i64::MAX);
        self
    }

    /// Scrubs the store if key material was erased since the last scrub and the last one
    /// is at least the scrub interval ago. Returns what the scrub did, if it ran.
    pub async fn scrub_if_due(&self, fence: Option<lease::Fence>) -> Result<Option<crate::store::ScrubReport>, KeyError> {
        if !self.store.scrub_pending()? {
            return Ok(None);
        }
        let now = self.now();
        let last = self
            .store
            .get_meta(SCRUB_LAST_META)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(i64::from_be_bytes);
        if last.is_some_and(|l| now.saturating_sub(l) < self.scrub_interval_secs) {
            return Ok(None);
        }
        self.scrub_as(fence).await.map(Some)
    }

    /// Scrubs the store now (whether or not anything was erased) and clears the pending mark.
    pub async fn scrub_now(&self) -> Result<crate::store::ScrubReport, KeyError> {
        self.scrub_as(None).await
    }

    async fn scrub_as(&self, fence: Option<lease::Fence>) -> Result<crate::store::ScrubReport, KeyError> {
        let now = self.now();
        // Under the admin lock: nothing is erased between the copy and clearing the mark.
        let admin = Admin { _guard: self.admin.lock().await, fence };
        // Not fenced itself (it rewrites the store, it does not write rows): a process that
        // lost the lease does not start one.
        if let Some(f) = fence
            && self.store.get_meta(lease::FENCE_META)?.as_deref() != Some(&f.token().to_be_bytes()[..])
        {
            return Err(StoreError::Conflict { what: crate::store::expect_what(crate::store::Table::Meta, lease::FENCE_META.as_bytes()) }.into());
        }
        let report = self.store.scrub().await?;
        self.write_as(&admin, WriteOp::PutMeta { key: SCRUB_LAST_META, value: now.to_be_bytes().to_vec() }).await?;
        tracing::info!(
            bytes_before = report.bytes_before,
            bytes_after = report.bytes_after,
            millis = report.millis,
            "store scrubbed: destroyed key material is gone from the store file"
        );
        Ok(report)
    }

    /// Now, by the lifecycle clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// An audit event stamped now by the clock (RFC 3339 UTC, milliseconds).
    pub fn event(&self, principal: &str, action: &str, keyring: Option<&str>, backup_id: Option<&str>, outcome: Outcome) -> AuditEvent {
        AuditEvent::at(self.clock.now_millis(), principal, action, keyring, backup_id, outcome)
    }

    /// Opens the audit signing key (wrapped by the master key), creating it on first use.
    fn audit_key(store: &Registry, master: &dyn MasterKeyProvider) -> Result<ring::signature::Ed25519KeyPair, KeyError> {
        let bad = |reason| KeyError::AuditKey { reason };
        let pkcs8: Zeroizing<Vec<u8>> = match store.get_meta(AUDIT_KEY_META)? {
            Some(blob) => master.unwrap(AUDIT_KEY_AAD, &blob)?,
            None => {
                let rng = SystemRandom::new();
                let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Rng)?;
                let blob = master.wrap(AUDIT_KEY_AAD, doc.as_ref())?;
                store.write_blocking(WriteOp::PutMeta { key: AUDIT_KEY_META, value: blob })?;
                Zeroizing::new(doc.as_ref().to_vec())
            }
        };
        ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| bad("not an Ed25519 PKCS#8 key"))
    }

    /// The audit public key (32 bytes), for `kmsctl audit verify`.
    pub fn audit_public_key(&self, auth: &Authorized) -> Result<Vec<u8>, KeyError> {
        Self::check(auth, Action::GetAuditPublicKey, None)?;
        use ring::signature::KeyPair;
        Ok(self.audit_key.public_key().as_ref().to_vec())
    }

    /// Writes one audit entry durably (fail closed: an error means the request must fail).
    pub async fn audit(&self, ev: AuditEvent) -> Result<(), KeyError> {
        Ok(self.store.write(WriteOp::Audit(ev)).await?)
    }

    /// The audit trail as export lines (records and checkpoints), ending with a signed
    /// head, handed one at a time to `sink` (which returns false to stop: the reader went
    /// away). Reads the store a page at a time, so memory stays bounded whatever the
    /// trail's length. Every entry and checkpoint from entry 1 is checked as it is read
    /// (also those not exported, with `since` or `tail`); the head is signed only if all
    /// of it verifies, else an integrity alarm is raised and nothing is signed.
    pub fn audit_export(
        &self,
        auth: &Authorized,
        since: Option<&str>,
        tail: u64,
        mut sink: impl FnMut(String) -> bool,
    ) -> Result<(), KeyError> {
        Self::check(auth, Action::ExportAudit, None)?;
        if let Some(e) = self.chain.alarmed() {
            return Err(AuditError::Tampered(e).into());
        }
        use kluis_proto::audit::{ExportLine, SigKind};
        use ring::signature::KeyPair;
        let enc = |l: &ExportLine| serde_json::to_string(l).map_err(|e| KeyError::Audit(AuditError::CheckpointEncode(e)));
        let last = match self.store.store().last(crate::store::Table::Audit)? {
            Some((k, _)) => crate::store::key_id(crate::store::Table::Audit, &k)?,
            None => 0,
        };
        let first = if tail > 0 { last.saturating_sub(tail - 1).max(1) } else { 1 };
        let mut check = crate::audit::integrity::ExportCheck::new(self.audit_key.public_key().as_ref());
        let mut failure: Option<KeyError> = None;
        let mut open = true;
        // RFC 3339 UTC strings of one format sort as times.
        crate::audit::for_each(self.store.store(), 1, |r, cp| {
            let checked = check.record(&r).and_then(|()| cp.as_ref().map_or(Ok(()), |c| check.checkpoint(c)));
            if let Err(e) = checked {
                failure = Some(self.integrity_alarm(e));
                return false;
            }
            if r.seq >= first && since.is_none_or(|t| r.time.as_str() >= t) {
                let lines = [Some(ExportLine::Record(r)), cp.map(|checkpoint| ExportLine::Checkpoint { checkpoint })];
                for l in lines.iter().flatten() {
                    match enc(l) {
                        Ok(json) => open = sink(json),
                        Err(e) => failure = Some(e),
                    }
                    if !open || failure.is_some() {
                        return false;
                    }
                }
            }
            true
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if !open {
            return Ok(());
        }
        let head = match check.head() {
            Ok(h) => h,
            Err(e) => return Err(self.integrity_alarm(e)),
        };
        if let Some((seq, hash, prev)) = head {
            let head = enc(&ExportLine::Head { head: kluis_proto::audit::sign(&self.audit_key, SigKind::Head, seq, &hash, &prev) })?;
            // Anchored before it is handed out.
            self.chain.anchor(&head);
            sink(head);
        }
        Ok(())
    }

    /// Whether `auth` may export the audit trail now: authorized, and no integrity alarm.
    pub fn audit_export_allowed(&self, auth: &Authorized) -> Result<(), KeyError> {
        Self::check(auth, Action::ExportAudit, None)?;
        match self.chain.alarmed() {
            Some(e) => Err(AuditError::Tampered(e).into()),
            None => Ok(()),
        }
    }

    fn integrity_alarm(&self, e: crate::audit::integrity::IntegrityError) -> KeyError {
        self.chain.alarm(e.clone());
        AuditError::Tampered(e).into()
    }

    /// The counts behind `kluis_audit_integrity_alarms_total` and
    /// `kluis_audit_anchor_failures_total`.
    pub fn audit_counters(&self) -> (Arc<std::sync::atomic::AtomicU64>, Arc<std::sync::atomic::AtomicU64>) {
        (self.chain.alarm_counter(), self.chain.anchor_failure_counter())
    }

    /// A new keyring key for `version` of `name`, and that key wrapped by the master key
    /// (on a blocking thread: the master may be an HSM).
    async fn mint_version_key(&self, name: &str, version: u32) -> Result<(Key256, Vec<u8>), KeyError> {
        let key = Key256::generate(&self.rng).map_err(|_| KeyError::Rng)?;
        let master = self.master();
        let aad = krk_aad(name, version);
        let (key, wrapped) = tokio::task::spawn_blocking(move || {
            let w = master.wrap(&aad, key.expose());
            (key, w)
        })
        .await?;
        Ok((key, wrapped?))
    }

    /// The wrapped form of a key (format 2: the base key; format 1: the data key) under
    /// keyring key `krk` (version `version`): format byte, version, AES-256-GCM with the
    /// AAD binding format, id, keyring, version, backup and labels. `unwrap_inner` reads it.
    #[allow(clippy::too_many_arguments)]
    fn wrap_data_key(
        &self,
        format: u8,
        krk: &Key256,
        id: &[u8; 16],
        keyring: &str,
        version: u32,
        backup_id: &str,
        labels: &[(String, String)],
        data_key: &Key256,
    ) -> Result<Vec<u8>, KeyError> {
        let aad = blob_aad(format, id, keyring, version, backup_id, labels);
        let sealed = aes_gcm_seal(krk, &self.rng, &aad, data_key.expose()).map_err(|_| KeyError::Rng)?;
        let mut out = Vec::with_capacity(WRAPPED_DK_LEN);
        out.push(format);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn check(auth: &Authorized, action: Action, keyring: Option<&str>) -> Result<(), KeyError> {
        if auth.covers(action, keyring) { Ok(()) } else { Err(KeyError::NotCovered) }
    }

    fn has_keyring(&self, name: &str) -> bool {
        self.state.load().rings.contains_key(name)
    }

    /// Creates a keyring with version 1. Used by the officer API and by `kms-server dev`.
    pub async fn create_keyring(
        &self,
        auth: &Authorized,
        name: &str,
        retention_days: u32,
        rotation_period_days: u32,
        audit: AuditEvent,
    ) -> Result<KeyringInfo, KeyError> {
        Self::check(auth, Action::CreateKeyring, Some(name))?;
        self.create_keyring_unchecked(name, retention_days, rotation_period_days, audit).await
    }

    /// Keyring creation for the server's own bootstrap (`kms-server dev`): no caller to
    /// authorize, so it is not public outside the crate.
    pub(crate) async fn create_keyring_unchecked(
        &self,
        name: &str,
        retention_days: u32,
        rotation_period_days: u32,
        audit: AuditEvent,
    ) -> Result<KeyringInfo, KeyError> {
        validate_keyring_name(name)?;
        let admin = self.lock_admin().await?;
        if self.has_keyring(name) {
            return Err(KeyError::KeyringExists { name: name.to_owned() });
        }
        let (key, wrapped) = self.mint_version_key(name, 1).await?;
        let now = self.now();
        let record = KeyringRecord {
            name: name.to_owned(),
            created: now,
            retention_days,
            versions: vec![VersionRecord { version: 1, created: now, state: VersionState::Active, wrapped_key: wrapped }],
            rotation_period_days,
            hold: None,
            destroyed: None,
        };
        self.store.write(WriteOp::Atomic(vec![WriteOp::PutKeyring(record.clone()), WriteOp::Audit(audit)])).await?;
        let mut keys = BTreeMap::new();
        keys.insert(1, Arc::new(key));
        let live = LiveKeyring { record, keys };
        let info = self.info_of(&live)?;
        self.publish(&admin, |s| {
            s.rings.insert(name.to_owned(), Arc::new(live));
        });
        Ok(info)
    }

    /// Adds a version to a keyring: new data keys use it, older versions keep unwrapping.
    pub async fn rotate_keyring(&self, auth: &Authorized, name: &str, audit: AuditEvent) -> Result<KeyringInfo, KeyError> {
        Self::check(auth, Action::RotateKeyring, Some(name))?;
        validate_keyring_name(name)?;
        let admin = self.lock_admin().await?;
        self.rotate_locked(&admin, name, audit).await
    }

    /// Rotation with the admin lock held (officer request or rotation period).
    async fn rotate_locked(&self, admin: &Admin<'_>, name: &str, audit: AuditEvent) -> Result<KeyringInfo, KeyError> {
        let old = self.ring(name)?;
        let mut record = old.record.clone();
        if let Some(at) = record.destroyed {
            return Err(KeyError::KeyringDestroyed { keyring: name.to_owned(), date: format_date(at) });
        }
        let version = record.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let (key, wrapped) = self.mint_version_key(name, version).await?;
        record.versions.push(VersionRecord { version, created: self.now(), state: VersionState::Active, wrapped_key: wrapped });
        self.write_as(admin, WriteOp::Atomic(vec![WriteOp::PutKeyring(record.clone()), WriteOp::Audit(audit)])).await?;
        let mut keys = old.keys.clone();
        keys.insert(version, Arc::new(key));
        let live = Arc::new(LiveKeyring { record, keys });
        self.publish(admin, |s| {
            s.rings.insert(name.to_owned(), live.clone());
        });
        self.info_of(&live)
    }

    /// Records a restore test. The backup id comes from the registry when the key is known.
    pub async fn record_restore_test(
        &self,
        auth: &Authorized,
        mut rec: RestoreTestRecord,
        mut audit: AuditEvent,
    ) -> Result<(), KeyError> {
        Self::check(auth, Action::RecordRestoreTest, Some(&rec.keyring))?;
        validate_keyring_name(&rec.keyring)?;
        validate_text("detail", &rec.detail, 1024, true)?;
        validate_text("host", &rec.host, 256, true)?;
        if !rec.key_id.is_empty() {
            let id = parse_key_id(&rec.key_id)?;
            if let Some(k) = self.store.data_key(&id)? {
                if k.keyring != rec.keyring {
                    return Err(KeyError::KeyringMismatch { key_id: rec.key_id, claimed: rec.keyring, actual: k.keyring });
                }
                rec.backup_id = k.backup_id;
            }
        }
        rec.principal = auth.principal().name().to_owned();
        rec.time = self.now();
        audit.backup_id = Some(rec.backup_id.clone()).filter(|b| !b.is_empty());
        self.store.write(WriteOp::Atomic(vec![WriteOp::RestoreTest(rec), WriteOp::Audit(audit)])).await?;
        Ok(())
    }

    /// How long destructive requests wait for a second officer.
    pub fn with_approval_ttl(mut self, secs: u64) -> Self {
        self.approval_ttl_secs = secs;
        self
    }

    /// A request to retire versions below `below`: destructive, so it only creates a
    /// pending approval that another officer must approve.
    pub async fn request_retire(
        &self,
        auth: &Authorized,
        keyring: &str,
        below: u32,
        force: bool,
        mut audit: AuditEvent,
    ) -> Result<ApprovalRecord, KeyError> {
        Self::check(auth, Action::RetireVersions, Some(keyring))?;
        validate_keyring_name(keyring)?;
        let current = self.ring(keyring)?.current().map(|(v, _)| v).unwrap_or(0);
        if below < 2 {
            return Err(KeyError::BadRetire { keyring: keyring.to_owned(), below, reason: "there is no version below 1" });
        }
        if below > current {
            return Err(KeyError::BadRetire {
                keyring: keyring.to_owned(),
                below,
                reason: "the current version must stay active (rotate first)",
            });
        }
        if let (Some(h), _) = self.ring_state(keyring)? {
            return Err(Self::hold_error(keyring, &h));
        }
        let stranded = self.wrapped_below(keyring, below)?;
        let action = match (stranded, force) {
            (0, _) => PendingAction::RetireVersions { keyring: keyring.to_owned(), below },
            (count, false) => return Err(KeyError::RetireStrands { keyring: keyring.to_owned(), below, count }),
            (stranded, true) => {
                audit.outcome = Outcome::ok_with(format!(
                    "pending approval to retire versions below {below}, forced: {stranded} active key(s) still wrapped under them"
                ));
                PendingAction::RetireVersionsForced { keyring: keyring.to_owned(), below, stranded }
            }
        };
        let _guard = self.lock_admin().await?;
        self.new_approval(auth, action, audit).await
    }

    /// How many active (not destroyed) keys of `keyring` are wrapped under a version
    /// below `below`, by the registry (a rewrap records the new version). Reads the whole
    /// registry: an officer's request, not a hot path.
    fn wrapped_below(&self, keyring: &str, below: u32) -> Result<u64, KeyError> {
        let mut n = 0u64;
        self.store.for_each_data_key(|_, r| {
            if r.keyring == keyring && r.version < below && matches!(r.state, KeyState::Active) {
                n += 1;
            }
        })?;
        Ok(n)
    }

    /// Records a pending approval (admin lock held by the caller).
    /// The audit entry names the request's id and what it would do.
    async fn new_approval(&self, auth: &Authorized, action: PendingAction, mut audit: AuditEvent) -> Result<ApprovalRecord, KeyError> {
        let id = self.store.next_approval_id()?;
        let now = self.now();
        audit.outcome = Outcome::ok_with(format!("pending approval {id}: {}", describe_action(&action)));
        let rec = ApprovalRecord {
            id,
            action,
            requested_by: auth.principal().name().to_owned(),
            requested: now,
            expires: now.saturating_add(i64::try_from(self.approval_ttl_secs).unwrap_or(i64::MAX)),
            approved_by: None,
            approved: None,
        };
        self.store.write(WriteOp::Atomic(vec![WriteOp::PutApproval(rec.clone()), WriteOp::Audit(audit)])).await?;
        Ok(rec)
    }

    /// Approves and carries out a pending request of another officer.
    pub async fn approve(&self, auth: &Authorized, id: u64, mut audit: AuditEvent) -> Result<ApprovalRecord, KeyError> {
        Self::check(auth, Action::Approve, None)?;
        let admin = self.lock_admin().await?;
        let mut rec = self.store.approval(id)?.ok_or(KeyError::ApprovalNotFound { id })?;
        if let Some(by) = &rec.approved_by {
            return Err(KeyError::ApprovalDone { id, by: by.clone() });
        }
        let now = self.now();
        if now >= rec.expires {
            return Err(KeyError::ApprovalExpired { id, date: format_date(rec.expires) });
        }
        if rec.requested_by == auth.principal().name() {
            return Err(KeyError::SelfApproval { id, principal: rec.requested_by });
        }
        rec.approved_by = Some(auth.principal().name().to_owned());
        rec.approved = Some(now);
        audit.outcome = Outcome::ok_with(format!(
            "approved and carried out request {id} of {}: {}",
            rec.requested_by,
            describe_action(&rec.action)
        ));
        match rec.action.clone() {
            PendingAction::RetireVersions { keyring, below } | PendingAction::RetireVersionsForced { keyring, below, .. } => {
                // A hold placed since the request blocks it; so does a key wrapped under
                // those versions since (none can be: new keys use the current version).
                if let (Some(h), _) = self.ring_state(&keyring)? {
                    return Err(Self::hold_error(&keyring, &h));
                }
                let old = self.ring(&keyring)?;
                let mut record = old.record.clone();
                for v in record.versions.iter_mut().filter(|v| v.version < below) {
                    v.state = VersionState::Retired;
                }
                self.store
                    .write(WriteOp::Atomic(vec![
                        WriteOp::PutKeyring(record.clone()),
                        WriteOp::PutApproval(rec.clone()),
                        WriteOp::Audit(audit),
                    ]))
                    .await?;
                let live = Arc::new(LiveKeyring { record, keys: old.keys.clone() });
                self.publish(&admin, |s| {
                    s.rings.insert(keyring, live);
                });
            }
            other => self.carry_out(&admin, &other, &rec, audit).await?,
        }
        Ok(rec)
    }

    /// All approvals, oldest first.
    pub fn approvals(&self, auth: &Authorized) -> Result<Vec<ApprovalRecord>, KeyError> {
        Self::check(auth, Action::ListApprovals, None)?;
        Ok(self.store.approvals()?)
    }

    /// The runtime grants (officer-made), as stored.
    pub fn runtime_grants(&self) -> Result<Vec<RuntimeGrant>, KeyError> {
        match self.store.get_meta(GRANTS_META)? {
            Some(b) => Ok(postcard::from_bytes(&b).map_err(|e| StoreError::Decode { what: "grants", source: e })?),
            None => Ok(Vec::new()),
        }
    }

    /// Grants (or revokes) `role` on `keyring` to `principal`. A revocation only
    /// protects: done at once, the new runtime set returned. A grant widens access: it
    /// becomes a request that a second officer approves (the set is then unchanged).
    pub async fn change_grant(
        &self,
        auth: &Authorized,
        keyring: &str,
        principal: &str,
        role: &str,
        grant: bool,
        audit: AuditEvent,
    ) -> Result<Requested<Vec<RuntimeGrant>>, KeyError> {
        Self::check(auth, Action::ChangeGrant, Some(keyring))?;
        validate_keyring_name(keyring)?;
        validate_text("principal", principal, 256, false)?;
        let role: Role = role
            .parse()
            .map_err(|()| KeyError::InvalidArgument { field: "role", reason: "must be sealer, restorer, officer or auditor" })?;
        if !self.has_keyring(keyring) {
            return Err(KeyError::KeyringNotFound { name: keyring.to_owned() });
        }
        let _guard = self.lock_admin().await?;
        let mut set = self.runtime_grants()?;
        if grant {
            let action = PendingAction::Grant { principal: principal.to_owned(), role, keyring: keyring.to_owned() };
            let approval = self.new_approval(auth, action, audit).await?;
            return Ok(Requested::Pending { approval, current: set });
        }
        let g = RuntimeGrant { principal: principal.to_owned(), role, keyring: keyring.to_owned() };
        let before = set.len();
        set.retain(|x| *x != g);
        if set.len() == before {
            return Err(KeyError::GrantNotFound { principal: principal.to_owned(), role: role.to_string(), keyring: keyring.to_owned() });
        }
        self.store_grants(&set, None, audit).await?;
        Ok(Requested::Done(set))
    }

    /// Stores the runtime grant set with its audit entry (and the approval that led to it).
    async fn store_grants(&self, set: &[RuntimeGrant], approval: Option<&ApprovalRecord>, audit: AuditEvent) -> Result<(), KeyError> {
        let bytes = postcard::to_allocvec(set).map_err(|e| StoreError::Encode { what: "grants", source: e })?;
        let mut ops = vec![WriteOp::PutMeta { key: GRANTS_META, value: bytes }];
        ops.extend(approval.map(|a| WriteOp::PutApproval(a.clone())));
        ops.push(WriteOp::Audit(audit));
        self.store.write(WriteOp::Atomic(ops)).await?;
        Ok(())
    }

    /// Carries out an approved grant (admin lock held): adds it to the runtime set.
    pub(super) async fn approved_grant(&self, g: RuntimeGrant, approval: &ApprovalRecord, audit: AuditEvent) -> Result<(), KeyError> {
        if !self.has_keyring(&g.keyring) {
            return Err(KeyError::KeyringNotFound { name: g.keyring });
        }
        let mut set = self.runtime_grants()?;
        if !set.contains(&g) {
            set.push(g);
            set.sort();
        }
        self.store_grants(&set, Some(approval), audit).await
    }

    /// Checks that `auth` may list the grants of `keyring`.
    pub fn check_list_grants(&self, auth: &Authorized, keyring: &str) -> Result<(), KeyError> {
        Self::check(auth, Action::ListGrants, Some(keyring))?;
        validate_keyring_name(keyring)
    }

    fn info_of(&self, live: &LiveKeyring) -> Result<KeyringInfo, KeyError> {
        Ok(KeyringInfo {
            name: live.record.name.clone(),
            created: live.record.created,
            retention_days: live.record.retention_days,
            current_version: live.current().map(|(v, _)| v).unwrap_or(0),
            versions: live.record.versions.iter().map(|v| (v.version, v.created, v.state)).collect(),
            issued_keys: self.store.issued_count(&live.record.name)?,
            rotation_period_days: live.record.rotation_period_days,
            next_rotation: next_rotation(&live.record),
            hold: live.record.hold.clone(),
            destroyed: live.record.destroyed,
        })
    }

    pub fn get_keyring(&self, auth: &Authorized, name: &str) -> Result<KeyringInfo, KeyError> {
        Self::check(auth, Action::GetKeyring, Some(name))?;
        validate_keyring_name(name)?;
        self.info_of(self.ring(name)?.as_ref())
    }

    /// All keyrings, sorted by name; `visible` filters by the caller's scope.
    pub fn list_keyrings(
        &self,
        auth: &Authorized,
        visible: impl Fn(&str) -> bool,
    ) -> Result<Vec<KeyringInfo>, KeyError> {
        Self::check(auth, Action::ListKeyrings, None)?;
        let state = self.state();
        let mut out = Vec::new();
        for (name, live) in &state.rings {
            if visible(name) {
                out.push(self.info_of(live)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Issues a fresh data key for one backup object, durably recorded before it returns.
    pub async fn generate_data_key(
        &self,
        auth: &Authorized,
        keyring: &str,
        backup_id: &str,
        labels: impl IntoIterator<Item = (String, String)>,
        mut audit: AuditEvent,
    ) -> Result<IssuedDataKey, KeyError> {
        Self::check(auth, Action::GenerateDataKey, Some(keyring))?;
        validate_keyring_name(keyring)?;
        validate_text("backup_id", backup_id, 256, false)?;
        let mut labels: Vec<(String, String)> = labels.into_iter().collect();
        if labels.len() > 32 {
            return Err(KeyError::InvalidArgument { field: "labels", reason: "at most 32 labels" });
        }
        for (k, v) in &labels {
            validate_text("labels", k, 64, false)?;
            validate_text("labels", v, 256, true)?;
            // The registry tells KMIP objects' data keys from backups' by this prefix (the
            // report counts them apart), so a backup's key may not wear it.
            if k.starts_with(kmip::LABEL_PREFIX) {
                return Err(KeyError::InvalidArgument { field: "labels", reason: "the label prefix \"kmip.\" is reserved for KMIP objects" });
            }
        }
        labels.sort();
        let issue = self.issue(auth, keyring, backup_id, labels).await?;
        // The registry record and its audit entry land in one transaction.
        audit.key_id = Some(hex::encode(issue.id));
        let Issue { id, data_key, wrapped, version, recovery_recipient, record, secret } = issue;
        self.store
            .write(WriteOp::Atomic(vec![WriteOp::IssueDataKey { id, record, secret: Some(secret) }, WriteOp::Audit(audit)]))
            .await?;
        Ok(IssuedDataKey {
            key_id: hex::encode(id),
            data_key,
            wrapped,
            keyring: keyring.to_owned(),
            version,
            recovery_recipient,
        })
    }

    /// A new data key under `keyring`'s current version, not yet written: its id, the key,
    /// its wrapped form, and the registry record and secret to write with it (the caller
    /// writes them, with its audit entry, in one transaction).
    async fn issue(&self, auth: &Authorized, keyring: &str, backup_id: &str, labels: Vec<(String, String)>) -> Result<Issue, KeyError> {
        self.issue_as(auth, keyring, backup_id, labels, None).await
    }

    /// [`issue`](Self::issue), with the id and creation date given (`(id, created)`: a
    /// KMIP import keeps the object's identifier, and its expiry counts from its Initial
    /// Date) instead of fresh ones.
    async fn issue_as(
        &self,
        auth: &Authorized,
        keyring: &str,
        backup_id: &str,
        labels: Vec<(String, String)>,
        given: Option<([u8; 16], i64)>,
    ) -> Result<Issue, KeyError> {
        // A request meeting a due rotation makes it (on any replica: the state epoch keeps two
        // from both landing), so no key is issued under an overdue version.
        self.rotate_if_due(keyring, None).await?;
        let state = self.state();
        let (version, krk, retention_days) = {
            let live = state
                .rings
                .get(keyring)
                .ok_or_else(|| KeyError::KeyringNotFound { name: keyring.to_owned() })?;
            if let Some(at) = live.record.destroyed {
                return Err(KeyError::KeyringDestroyed { keyring: keyring.to_owned(), date: format_date(at) });
            }
            let (v, k) = live
                .current()
                .ok_or(KeyError::VersionRetired { keyring: keyring.to_owned(), version: 0 })?;
            (v, k, live.record.retention_days)
        };
        let id: [u8; 16] = match given {
            Some((id, _)) => id,
            None => random_array(&self.rng).map_err(|_| KeyError::Rng)?,
        };
        // Format 2: the file's header carries the base key; the data key also needs the
        // secret that stays in the registry until the key is destroyed.
        let base = Key256::generate(&self.rng).map_err(|_| KeyError::Rng)?;
        let secret = Key256::generate(&self.rng).map_err(|_| KeyError::Rng)?;
        let data_key = derive_data_key(&base, &secret, &id)?;
        let wrapped = self.wrap_data_key(WRAPPED_DK_V2, &krk, &id, keyring, version, backup_id, &labels, &base)?;
        let recovery_recipient = state.escrow.as_ref().and_then(|e| e.in_force().map(str::to_owned));
        let created = given.map_or_else(|| self.now(), |(_, at)| at);
        let record = DataKeyRecord {
            keyring: keyring.to_owned(),
            version,
            backup_id: backup_id.to_owned(),
            labels,
            created,
            expires: (retention_days > 0).then(|| created + i64::from(retention_days) * 86_400),
            state: KeyState::Active,
            issued_to: auth.principal().name().to_owned(),
            escrowed: recovery_recipient.is_some(),
        };
        Ok(Issue { id, data_key, wrapped, version, recovery_recipient, record, secret })
    }

    /// Unwraps a data key: key known and not destroyed, keyring matches, version
    /// not retired, AAD (from the registry record) authenticates.
    pub async fn unwrap_data_key(
        &self,
        auth: &Authorized,
        key_id: &str,
        keyring: &str,
        wrapped: &[u8],
    ) -> Result<UnwrappedDataKey, KeyError> {
        Self::check(auth, Action::UnwrapDataKey, Some(keyring))?;
        let (id, record, opened) = self.unwrap_inner(key_id, keyring, wrapped).await?;
        let data_key = match opened.format {
            WRAPPED_DK_V1 => opened.key,
            _ => {
                let secret = self
                    .store
                    .key_secret(&id)?
                    .ok_or_else(|| KeyError::KeyMaterialErased { key_id: key_id.to_owned() })?;
                derive_data_key(&opened.key, &secret, &id)?
            }
        };
        Ok(UnwrappedDataKey { data_key, keyring: record.keyring, version: opened.version, backup_id: record.backup_id })
    }

    /// The checks and the unwrap, for unwrap and rewrap. A key whose destruction is
    /// due (retention over, or a scheduled destruction reached) is destroyed first.
    async fn unwrap_inner(
        &self,
        key_id: &str,
        keyring: &str,
        wrapped: &[u8],
    ) -> Result<([u8; 16], DataKeyRecord, Opened), KeyError> {
        validate_keyring_name(keyring)?;
        let id = parse_key_id(key_id)?;
        let format = wrapped.first().copied().unwrap_or(0);
        if wrapped.len() != WRAPPED_DK_LEN || !matches!(format, WRAPPED_DK_V1 | WRAPPED_DK_V2) {
            return Err(KeyError::InvalidArgument { field: "wrapped_key", reason: "not a Kluis wrapped data key (format 1 or 2)" });
        }
        // Exact across replicas: a keyring destroyed or a version retired on another one is
        // refused here at once (one read by key when nothing changed).
        self.sync().await?;
        let record = self
            .store
            .data_key(&id)?
            .ok_or_else(|| KeyError::UnknownKeyId { key_id: key_id.to_owned() })?;
        if record.keyring != keyring {
            return Err(KeyError::KeyringMismatch {
                key_id: key_id.to_owned(),
                claimed: keyring.to_owned(),
                actual: record.keyring,
            });
        }
        self.refuse_destroyed(&id, key_id, &record).await?;
        let mut vbytes = [0u8; 4];
        vbytes.copy_from_slice(&wrapped[1..5]);
        // Any version the blob authenticates under is genuine (the AAD binds it): a copy
        // of a file that was not rewrapped keeps opening until its version is retired.
        let version = u32::from_be_bytes(vbytes);
        let krk = {
            let live = self.ring(keyring)?;
            if let Some(at) = live.record.destroyed {
                return Err(KeyError::KeyringDestroyed { keyring: keyring.to_owned(), date: format_date(at) });
            }
            let state = live.record.versions.iter().find(|v| v.version == version).map(|v| v.state);
            if state != Some(VersionState::Active) {
                return Err(KeyError::VersionRetired { keyring: keyring.to_owned(), version });
            }
            live.keys.get(&version).cloned().ok_or(KeyError::UnwrapFailed { key_id: key_id.to_owned() })?
        };
        let aad = blob_aad(format, &id, keyring, version, &record.backup_id, &record.labels);
        let raw = aes_gcm_open(&krk, &aad, &wrapped[5..]).map_err(|_| KeyError::UnwrapFailed { key_id: key_id.to_owned() })?;
        let key = Key256::from_slice(&raw).ok_or(KeyError::UnwrapFailed { key_id: key_id.to_owned() })?;
        Ok((id, record, Opened { format, key, version }))
    }

    /// Re-wraps a data key under the keyring's current version and records the new
    /// version in the registry (with the audit entry, in one transaction). Returns
    /// the new blob, its version and the previous version; nothing is written if the
    /// key is already under the current version (the audit entry still is).
    pub async fn rewrap_data_key(
        &self,
        auth: &Authorized,
        key_id: &str,
        keyring: &str,
        wrapped: &[u8],
        mut audit: AuditEvent,
    ) -> Result<RewrapOutcome, KeyError> {
        Self::check(auth, Action::RewrapDataKey, Some(keyring))?;
        let (id, mut record, key) = self.unwrap_inner(key_id, keyring, wrapped).await?;
        if key.format == WRAPPED_DK_V2 && self.store.key_secret(&id)?.is_none() {
            return Err(KeyError::KeyMaterialErased { key_id: key_id.to_owned() });
        }
        let (current, krk) =
            self.ring(keyring)?.current().ok_or(KeyError::VersionRetired { keyring: keyring.to_owned(), version: key.version })?;
        audit.backup_id = Some(record.backup_id.clone());
        // The escrow in force, for the client to add its stanza to a file sealed before it.
        // Issued strictly after the install: a key of the install's own second may have
        // gone out with the recipient before it, so it is not assumed to carry this one.
        let (recovery_recipient, installed) = match self.state().escrow.as_ref() {
            Some(e) => (e.in_force().map(str::to_owned), e.installed),
            None => (None, i64::MAX),
        };
        let sealed_with_recipient = recovery_recipient.is_some() && record.escrowed && record.created > installed;
        let answer = |wrapped: Vec<u8>, version: u32, escrowed: bool| RewrapOutcome {
            wrapped,
            version,
            previous_version: key.version,
            recovery_recipient: recovery_recipient.clone(),
            escrowed,
            sealed_with_recipient,
        };
        if current == key.version {
            audit.outcome = Outcome::ok_with(format!("already under version {current}"));
            self.audit(audit).await?;
            return Ok(answer(wrapped.to_vec(), current, record.escrowed));
        }
        // The same key under the current version, in the blob's own format: a format 1
        // file stays format 1 (its data key is fixed by its payload).
        let out = self.wrap_data_key(key.format, &krk, &id, keyring, current, &record.backup_id, &record.labels, &key.key)?;
        record.version = current;
        let escrowed = record.escrowed;
        audit.outcome = Outcome::ok_with(format!("version {} -> {current}", key.version));
        self.store.write(WriteOp::Atomic(vec![WriteOp::PutDataKey { id, record }, WriteOp::Audit(audit)])).await?;
        Ok(answer(out, current, escrowed))
    }

    /// Records that a sealed file of this key now carries a stanza to the recovery
    /// recipient in force (the client added it and its new header is durable): the
    /// registry marks the key escrowed, in one transaction with the audit entry. The
    /// wrapped key must open as for an unwrap (so the caller holds the file's header),
    /// and `recipient` must be the one in force. Returns whether the key was not
    /// counted as escrowed before (it may have had a stanza to an earlier recipient).
    pub async fn mark_data_key_escrowed(
        &self,
        auth: &Authorized,
        key_id: &str,
        keyring: &str,
        wrapped: &[u8],
        recipient: &str,
        mut audit: AuditEvent,
    ) -> Result<bool, KeyError> {
        Self::check(auth, Action::MarkDataKeyEscrowed, Some(keyring))?;
        let (id, _, _) = self.unwrap_inner(key_id, keyring, wrapped).await?;
        // Under the admin lock: the escrow in force cannot change between this check and
        // the write, nor can a destruction rewrite the record in between.
        let _admin = self.lock_admin().await?;
        match self.state().escrow.as_ref().and_then(|e| e.in_force()) {
            None => return Err(KeyError::NoEscrow),
            Some(r) if r != recipient => {
                return Err(KeyError::EscrowRecipientNotInForce { requested: recipient.to_owned(), in_force: r.to_owned() });
            }
            Some(_) => {}
        }
        let mut record = self.store.data_key(&id)?.ok_or_else(|| KeyError::UnknownKeyId { key_id: key_id.to_owned() })?;
        // Destroyed since the unwrap above (which destroyed a key that was due).
        if let KeyState::Destroyed { at } = record.state {
            return Err(KeyError::Destroyed { key_id: key_id.to_owned(), date: format_date(at) });
        }
        let newly = !record.escrowed;
        audit.backup_id = Some(record.backup_id.clone());
        audit.outcome = Outcome::ok_with(if newly {
            format!("escrow stanza to {recipient} added to the sealed file; the key counts as escrowed")
        } else {
            format!("escrow stanza to {recipient} added to the sealed file (the registry counted the key as escrowed already)")
        });
        let mut ops = Vec::with_capacity(2);
        if newly {
            record.escrowed = true;
            ops.push(WriteOp::PutDataKey { id, record });
        }
        ops.push(WriteOp::Audit(audit));
        self.store.write(WriteOp::Atomic(ops)).await?;
        Ok(newly)
    }

    /// Installs an escrow manifest. A manifest with the recovery recipient in force (a
    /// new custodian list, say) is installed at once. One with another recipient, or the
    /// first one (none in force), decides who can open every later backup without the
    /// server: it becomes a request that a second officer approves.
    pub async fn install_escrow(
        &self,
        auth: &Authorized,
        manifest_json: &str,
        allow_new_recipient: bool,
        audit: AuditEvent,
    ) -> Result<Requested<()>, KeyError> {
        Self::check(auth, Action::InstallEscrow, None)?;
        // The same manifest type and checks as `kmsctl escrow` (kluis-escrow).
        let m = Manifest::parse(manifest_json.as_bytes()).map_err(KeyError::EscrowManifest)?;
        let admin = self.lock_admin().await?;
        let current = self.state().escrow.clone();
        let in_force = current.as_ref().and_then(|c| c.in_force().map(str::to_owned));
        match &in_force {
            Some(r) if *r == m.recovery_recipient => {
                self.write_escrow(&admin, m, manifest_json, None, audit).await?;
                return Ok(Requested::Done(()));
            }
            Some(r) if !allow_new_recipient => {
                let ceremony = current.map(|c| c.ceremony_id).unwrap_or_default();
                return Err(KeyError::EscrowRecipientChange { current: r.clone(), new: m.recovery_recipient, ceremony });
            }
            _ => {}
        }
        let action = PendingAction::InstallEscrow {
            manifest_json: manifest_json.to_owned(),
            ceremony_id: m.ceremony_id,
            recovery_recipient: m.recovery_recipient,
            replaces: in_force,
        };
        let approval = self.new_approval(auth, action, audit).await?;
        Ok(Requested::Pending { approval, current: () })
    }

    /// Carries out an approved escrow install (admin lock held): the recipient in force
    /// must still be the one the request replaces.
    pub(super) async fn approved_escrow(
        &self,
        admin: &Admin<'_>,
        manifest_json: &str,
        replaces: Option<&str>,
        approval: &ApprovalRecord,
        audit: AuditEvent,
    ) -> Result<(), KeyError> {
        let m = Manifest::parse(manifest_json.as_bytes()).map_err(KeyError::EscrowManifest)?;
        let in_force = self.state().escrow.as_ref().and_then(|c| c.in_force().map(str::to_owned));
        if in_force.as_deref() != replaces {
            return Err(KeyError::ApprovalOutdated {
                id: approval.id,
                reason: "the recovery recipient in force changed since the request",
            });
        }
        self.write_escrow(admin, m, manifest_json, Some(approval), audit).await
    }

    /// Stores `m` as the manifest in force (admin lock held), keeping the recipient it
    /// replaces in the list of earlier ones.
    async fn write_escrow(
        &self,
        admin: &Admin<'_>,
        m: Manifest,
        manifest_json: &str,
        approval: Option<&ApprovalRecord>,
        audit: AuditEvent,
    ) -> Result<(), KeyError> {
        let current = self.state().escrow.clone();
        let mut previous_recipients = current.as_ref().map(|c| c.previous_recipients.clone()).unwrap_or_default();
        if let Some(cur) = current.as_ref().filter(|c| c.removed.is_none() && c.recovery_recipient != m.recovery_recipient) {
            previous_recipients.push(cur.recovery_recipient.clone());
        }
        let info = EscrowInfo {
            ceremony_id: m.ceremony_id,
            recovery_recipient: m.recovery_recipient,
            threshold: u32::from(m.threshold),
            shares: u32::from(m.shares),
            custodians: m.custodians.into_iter().map(|c| c.name).collect(),
            installed: self.now(),
            manifest_json: manifest_json.to_owned(),
            previous_recipients,
            removed: None,
        };
        let bytes = postcard::to_allocvec(&info).map_err(|e| StoreError::Encode { what: "escrow", source: e })?;
        let mut ops = vec![WriteOp::PutMeta { key: ESCROW_META, value: bytes }];
        ops.extend(approval.map(|a| WriteOp::PutApproval(a.clone())));
        ops.push(WriteOp::Audit(audit));
        self.store.write(WriteOp::Atomic(ops)).await?;
        self.publish(admin, |s| s.escrow = Some(info));
        Ok(())
    }

    /// The escrow manifest in force, and how many live keys have no recovery stanza.
    pub fn escrow_status(&self, auth: &Authorized) -> Result<(Option<EscrowInfo>, u64), KeyError> {
        Self::check(auth, Action::GetEscrowStatus, None)?;
        let state = self.state();
        let info = state.escrow.clone();
        let mut without = 0u64;
        let destroyed_rings: Vec<String> =
            state.rings.values().filter(|l| l.record.destroyed.is_some()).map(|l| l.record.name.clone()).collect();
        self.store.for_each_data_key(|_, rec| {
            if !rec.escrowed && matches!(rec.state, KeyState::Active) && !destroyed_rings.contains(&rec.keyring) {
                without += 1;
            }
        })?;
        Ok((info, without))
    }
}

/// When the keyring's rotation period next rotates it.
fn next_rotation(record: &KeyringRecord) -> Option<i64> {
    if record.rotation_period_days == 0 || record.destroyed.is_some() {
        return None;
    }
    let current = record.versions.iter().filter(|v| v.state == VersionState::Active).map(|v| v.created).max()?;
    Some(current.saturating_add(i64::from(record.rotation_period_days) * 86_400))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn keyring_names() {
        assert!(validate_keyring_name("ehr-db").is_ok());
        assert!(validate_keyring_name("pacs.images_2").is_ok());
        for bad in ["", "-x", "a b", "é", &"x".repeat(65)] {
            assert!(validate_keyring_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_ids() {
        assert!(parse_key_id(&"ab".repeat(16)).is_ok());
        assert!(parse_key_id(&"AB".repeat(16)).is_err());
        assert!(parse_key_id("abc").is_err());
    }

    #[test]
    fn aad_binds_every_field() {
        let id = [1u8; 16];
        let base = dk_aad(&id, "r", 1, "b", &[("k".into(), "v".into())]);
        assert_ne!(base, dk_aad(&[2u8; 16], "r", 1, "b", &[("k".into(), "v".into())]));
        assert_ne!(base, dk_aad(&id, "s", 1, "b", &[("k".into(), "v".into())]));
        assert_ne!(base, dk_aad(&id, "r", 2, "b", &[("k".into(), "v".into())]));
        assert_ne!(base, dk_aad(&id, "r", 1, "c", &[("k".into(), "v".into())]));
        assert_ne!(base, dk_aad(&id, "r", 1, "b", &[("k".into(), "w".into())]));
        // Length prefixes: moving a byte between fields changes the AAD.
        assert_ne!(dk_aad(&id, "ab", 1, "c", &[]), dk_aad(&id, "a", 1, "bc", &[]));
    }
}
