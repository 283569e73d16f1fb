//! KMIP managed objects on the core.
//!
//! A KMIP object is a data key of the registry with a row of its own
//! ([`Table::KmipObjects`](crate::store::Table::KmipObjects)): the registry record makes the
//! keyring's rules apply to it as to any data key (retention, destruction with its waiting
//! period, legal holds, the report, rotation: the object stays under the version it was made
//! under until rewrapped), and the row holds what KMIP knows of it: its type, attributes, state
//! and dates, the data key wrapped under the keyring's version (the same wrapped form a backup
//! carries, opened by the same checks), and the object's key material sealed (AES-256-GCM)
//! under the data key. So the material is readable only through the keyring's key and the
//! data key's secret; destroying the data key (its secret erased) erases the material.
//!
//! Roles are the gRPC ones: making an object, changing its state and reading its attributes
//! need `sealer` on its keyring (the actions of issuing a data key); reading its material
//! needs `restorer` (unwrapping one). The KMIP front end authorizes; these
//! methods check the proof covers the object's keyring.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub mod escrow;

use super::registry::WriteOp;
use super::{KeyError, KeyManager};
use crate::audit::AuditEvent;
use crate::auth::{Action, Authorized};
use crate::model::{DestructionRecord, DestructionTarget, PendingAction};
use crate::secret::aes_gcm_open;

pub mod pair;

/// KMIP Object Type values (KMIP 1.4 section 9.1.3.2.12) Kluis keeps.
pub mod object_type {
    pub const SYMMETRIC_KEY: u32 = 0x02;
    pub const PUBLIC_KEY: u32 = 0x03;
    pub const PRIVATE_KEY: u32 = 0x04;
    pub const SECRET_DATA: u32 = 0x07;
}

/// KMIP State values (section 9.1.3.2.17).
pub mod state {
    pub const PRE_ACTIVE: u32 = 1;
    pub const ACTIVE: u32 = 2;
    pub const DEACTIVATED: u32 = 3;
    pub const COMPROMISED: u32 = 4;
    pub const DESTROYED: u32 = 5;
    pub const DESTROYED_COMPROMISED: u32 = 6;

    pub fn name(s: u32) -> &'static str {
        match s {
            PRE_ACTIVE => "Pre-Active",
            ACTIVE => "Active",
            DEACTIVATED => "Deactivated",
            COMPROMISED => "Compromised",
            DESTROYED => "Destroyed",
            DESTROYED_COMPROMISED => "Destroyed Compromised",
            _ => "unknown",
        }
    }
}

/// Revocation Reason Code values (section 9.1.3.2.19) that mean a compromise.
pub mod revocation {
    pub const KEY_COMPROMISE: u32 = 2;
    pub const CA_COMPROMISE: u32 = 3;
}

/// An attribute a client may set after the object is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    Name(String),
    /// Application Specific Information: namespace, data.
    AppInfo(String, String),
    UsageMask(i32),
}

impl Attribute {
    /// Its KMIP name.
    pub fn name(&self) -> &'static str {
        match self {
            Attribute::Name(_) => "Name",
            Attribute::AppInfo(..) => "Application Specific Information",
            Attribute::UsageMask(_) => "Cryptographic Usage Mask",
        }
    }
}

/// Add, Modify or Delete Attribute. The index is the Attribute Index (0 when not given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttributeEdit {
    Add(Attribute),
    Modify(Attribute, usize),
    /// The attribute's name and index.
    Delete(&'static str, usize),
}

/// The prefix of the registry labels of a KMIP object's data key (`kmip.object_type`,
/// `kmip.name`); reserved: a backup's data key cannot carry it.
pub const LABEL_PREFIX: &str = "kmip.";

/// Whether a registry record is a KMIP object's data key.
pub fn is_kmip_key(labels: &[(String, String)]) -> bool {
    labels.iter().any(|(k, _)| k.starts_with(LABEL_PREFIX))
}

/// Most names and Application Specific Information entries an object keeps, and their size.
pub const MAX_NAMES: usize = 16;
pub const MAX_APP_INFO: usize = 16;
pub const MAX_TEXT: usize = 256;
/// The largest key material kept (an RSA-4096 private key in PKCS#8 is about 2.4 KiB).
pub const MAX_MATERIAL: usize = 8192;

/// What the store keeps of a KMIP object. The wrapped data key and the sealed material are
/// ciphertext; the material itself is never kept in the clear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmipObject {
    pub object_type: u32,
    pub keyring: String,
    /// Cryptographic Algorithm (AES 3, RSA 4, ...), Length in bits, Usage Mask.
    pub algorithm: Option<u32>,
    pub length: Option<i32>,
    pub usage_mask: Option<i32>,
    pub names: Vec<String>,
    /// Application Specific Information: (namespace, data).
    pub app_info: Vec<(String, String)>,
    pub state: u32,
    pub initial_date: i64,
    pub activation_date: Option<i64>,
    pub deactivation_date: Option<i64>,
    pub compromise_date: Option<i64>,
    /// When the client said the compromise happened (Compromise Occurrence Date).
    pub compromise_occurrence: Option<i64>,
    /// When a KMIP client asked to destroy it (see [`KeyManager::kmip_state`]).
    pub destroy_date: Option<i64>,
    /// Revocation Reason: (code, message).
    pub revocation: Option<(u32, Option<String>)>,
    /// The principal that made it.
    pub created_by: String,
    /// The Key Format Type the material is kept in (Raw 1, PKCS#1 3, PKCS#8 4, ...). For an
    /// RSA key, the format a Get that names none is given (the one it was registered in): its
    /// material is kept as PKCS#1 whatever this says, and converted on Get ([`pair`]).
    pub key_format: u32,
    /// The data key, wrapped under the keyring version (format 2, as issued).
    pub wrapped: Vec<u8>,
    /// The material, sealed under the data key.
    pub sealed: Vec<u8>,
    /// Links to other objects: (Link Type, Unique Identifier), e.g. a pair's Private Key
    /// Link and Public Key Link ([`pair::link_type`]).
    pub links: Vec<(u32, String)>,
    /// Secret Data Type of a Secret Data object (Password 1, Seed 2).
    pub secret_data_type: Option<u32>,
}

/// What a client asks for in a new object (the attributes it may set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewObject {
    pub object_type: u32,
    pub algorithm: Option<u32>,
    pub length: Option<i32>,
    pub usage_mask: Option<i32>,
    pub names: Vec<String>,
    pub app_info: Vec<(String, String)>,
    pub key_format: u32,
}

/// Key material: zeroized on drop, no `Debug`.
pub struct Material(Zeroizing<Vec<u8>>);

impl Material {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// The Unique Identifier of an object: its data key id, in hex.
pub fn uid_of(id: &[u8; 16]) -> String {
    hex::encode(id)
}

fn parse_uid(uid: &str) -> Result<[u8; 16], KeyError> {
    let mut id = [0u8; 16];
    match hex::decode_to_slice(uid, &mut id) {
        Ok(()) if uid.len() == 32 && uid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => Ok(id),
        _ => Err(KeyError::KmipObjectNotFound { uid: shown(uid) }),
    }
}

/// A client-given identifier as shown in errors: cut and escaped, so it can forge no log line.
fn shown(uid: &str) -> String {
    uid.escape_debug().take(80).collect()
}

/// The additional data the material is sealed with: it belongs to this object only.
fn material_aad(id: &[u8; 16]) -> Vec<u8> {
    let mut aad = b"kluis/v1/kmip-material/".to_vec();
    aad.extend_from_slice(id);
    aad
}

fn check_text(field: &'static str, s: &str) -> Result<(), KeyError> {
    if s.is_empty() || s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(KeyError::InvalidArgument { field, reason: "1 to 256 bytes of text without control characters" });
    }
    Ok(())
}

impl NewObject {
    fn validate(&self) -> Result<(), KeyError> {
        if self.names.len() > MAX_NAMES {
            return Err(KeyError::InvalidArgument { field: "Name", reason: "at most 16 names" });
        }
        if self.app_info.len() > MAX_APP_INFO {
            return Err(KeyError::InvalidArgument { field: "Application Specific Information", reason: "at most 16 entries" });
        }
        for n in &self.names {
            check_text("Name", n)?;
        }
        for (ns, data) in &self.app_info {
            check_app_info(ns, data)?;
        }
        Ok(())
    }
}

impl KmipObject {
    /// Applies an attribute edit; returns the attribute as it now is (or was, deleted)
    /// and its index.
    fn edit(&mut self, edit: AttributeEdit) -> Result<(Attribute, usize), KeyError> {
        let missing = |name: &'static str, index: usize| KeyError::KmipAttributeMissing { name, index };
        match edit {
            AttributeEdit::Add(a) => {
                let index = match &a {
                    Attribute::Name(n) => {
                        check_text("Name", n)?;
                        if self.names.contains(n) {
                            return Err(KeyError::InvalidArgument { field: "Name", reason: "the object already has this name" });
                        }
                        if self.names.len() >= MAX_NAMES {
                            return Err(KeyError::InvalidArgument { field: "Name", reason: "at most 16 names" });
                        }
                        self.names.push(n.clone());
                        self.names.len() - 1
                    }
                    Attribute::AppInfo(ns, data) => {
                        check_app_info(ns, data)?;
                        if self.app_info.len() >= MAX_APP_INFO {
                            return Err(KeyError::InvalidArgument { field: "Application Specific Information", reason: "at most 16 entries" });
                        }
                        self.app_info.push((ns.clone(), data.clone()));
                        self.app_info.len() - 1
                    }
                    Attribute::UsageMask(m) => {
                        if self.usage_mask.is_some() {
                            return Err(KeyError::KmipAttributeFixed { name: a.name(), reason: "it is set already and has one instance; use Modify Attribute" });
                        }
                        self.usage_mask = Some(*m);
                        0
                    }
                };
                Ok((a, index))
            }
            AttributeEdit::Modify(a, index) => {
                match &a {
                    Attribute::Name(n) => {
                        check_text("Name", n)?;
                        if self.names.iter().enumerate().any(|(i, x)| i != index && x == n) {
                            return Err(KeyError::InvalidArgument { field: "Name", reason: "the object already has this name" });
                        }
                        *self.names.get_mut(index).ok_or(missing(a.name(), index))? = n.clone();
                    }
                    Attribute::AppInfo(ns, data) => {
                        check_app_info(ns, data)?;
                        *self.app_info.get_mut(index).ok_or(missing(a.name(), index))? = (ns.clone(), data.clone());
                    }
                    Attribute::UsageMask(m) => {
                        if index != 0 || self.usage_mask.is_none() {
                            return Err(missing(a.name(), index));
                        }
                        self.usage_mask = Some(*m);
                    }
                }
                Ok((a, index))
            }
            AttributeEdit::Delete(name, index) => {
                let was = match name {
                    "Name" if index < self.names.len() => Attribute::Name(self.names.remove(index)),
                    "Application Specific Information" if index < self.app_info.len() => {
                        let (ns, data) = self.app_info.remove(index);
                        Attribute::AppInfo(ns, data)
                    }
                    "Name" | "Application Specific Information" => return Err(missing(name, index)),
                    _ => return Err(KeyError::KmipAttributeFixed { name, reason: "it cannot be deleted" }),
                };
                Ok((was, index))
            }
        }
    }
}

fn check_app_info(ns: &str, data: &str) -> Result<(), KeyError> {
    check_text("Application Namespace", ns)?;
    // Application Data may be empty (the tape library profile asks the server to fill it).
    if !data.is_empty() {
        check_text("Application Data", data)?;
    }
    Ok(())
}

impl KeyManager {
    /// Makes a KMIP object in `keyring` holding `material`: a data key issued under the
    /// keyring's current version, the material sealed under it, the registry record, the
    /// object's row and the audit entry in one transaction. Needs `sealer` on the keyring.
    /// The object starts Pre-Active; returns its Unique Identifier.
    pub async fn kmip_create(
        &self,
        auth: &Authorized,
        keyring: &str,
        new: NewObject,
        material: Material,
        audit: AuditEvent,
    ) -> Result<String, KeyError> {
        // A created object is a registered one whose material the server chose.
        self.kmip_register(auth, keyring, pair::Made { new, material, secret_data_type: None, audit }).await
    }

    /// The object `uid` names, as stored (no check of who asks: the caller authorizes on its
    /// keyring before acting on it).
    pub fn kmip_object(&self, uid: &str) -> Result<([u8; 16], KmipObject), KeyError> {
        let id = parse_uid(uid)?;
        let object = self.store.kmip_object(&id)?.ok_or_else(|| KeyError::KmipObjectNotFound { uid: shown(uid) })?;
        Ok((id, object))
    }

    /// The object and its material. Needs `restorer` on its keyring; the data key is opened
    /// with every check of an unwrap (destroyed, retired version, keyring destroyed).
    pub async fn kmip_get(&self, auth: &Authorized, uid: &str) -> Result<(KmipObject, Material), KeyError> {
        // A Destroy made on another replica is seen.
        self.sync().await?;
        let (id, object) = self.kmip_object(uid)?;
        Self::check(auth, Action::UnwrapDataKey, Some(&object.keyring))?;
        self.refuse_destroyed_object(&id, &object).await?;
        let k = self.unwrap_data_key(auth, &uid_of(&id), &object.keyring, &object.wrapped).await?;
        let material = aes_gcm_open(&k.data_key, &material_aad(&id), &object.sealed)
            .map_err(|_| KeyError::UnwrapFailed { key_id: uid_of(&id) })?;
        Ok((object, Material(material)))
    }

    /// The state a KMIP client sees, and the Destroy Date: the row's state, or Destroyed
    /// (Destroyed Compromised if it was Compromised) while a KMIP Destroy waits out its
    /// destruction (the row's `destroy_date`, which an officer's cancel clears) or once the
    /// keyring is destroyed. The erasure of the data key writes Destroyed into the row
    /// ([`kmip_erased`](Self::kmip_erased)). Reads no store: Locate and the report call it
    /// inside a scan.
    pub fn kmip_state(&self, _id: &[u8; 16], o: &KmipObject) -> Result<(u32, Option<i64>), KeyError> {
        let destroyed = |at: i64| {
            let s = if o.state == state::COMPROMISED { state::DESTROYED_COMPROMISED } else { state::DESTROYED };
            (s, Some(at))
        };
        if matches!(o.state, state::DESTROYED | state::DESTROYED_COMPROMISED) {
            return Ok((o.state, o.destroy_date));
        }
        if let (_, Some(at)) = self.ring_state(&o.keyring)? {
            return Ok(destroyed(o.destroy_date.unwrap_or(at)));
        }
        Ok(match o.destroy_date {
            Some(at) => destroyed(at),
            None => (o.state, None),
        })
    }

    /// The row change that goes with erasing data key `id` (`record`) at `at`, if it is a
    /// KMIP object's: Destroyed (Destroyed Compromised), dated when a client asked or else
    /// now. Compare-and-set on the row, like every change of it.
    pub(super) fn kmip_erased(&self, id: &[u8; 16], record: &crate::model::DataKeyRecord, at: i64) -> Result<Option<WriteOp>, KeyError> {
        if !is_kmip_key(&record.labels) {
            return Ok(None);
        }
        let Some(before) = self.store.kmip_object(id)? else { return Ok(None) };
        let mut after = before.clone();
        after.state = if before.state == state::COMPROMISED { state::DESTROYED_COMPROMISED } else { state::DESTROYED };
        after.destroy_date = Some(before.destroy_date.unwrap_or(at));
        Ok(Some(WriteOp::PutKmipObject { id: *id, object: Box::new(after), previous: Some(Box::new(before)) }))
    }

    /// The row change that goes with an officer cancelling the destruction of data key
    /// `id`, if a KMIP client's Destroy asked for it: the object is back in its state.
    pub(super) fn kmip_destroy_cancelled(&self, id: &[u8; 16]) -> Result<Option<WriteOp>, KeyError> {
        let Some(before) = self.store.kmip_object(id)? else { return Ok(None) };
        if before.destroy_date.is_none() || matches!(before.state, state::DESTROYED | state::DESTROYED_COMPROMISED) {
            return Ok(None);
        }
        let mut after = before.clone();
        after.destroy_date = None;
        Ok(Some(WriteOp::PutKmipObject { id: *id, object: Box::new(after), previous: Some(Box::new(before)) }))
    }

    /// Refuses an object whose material is not served: Destroyed to clients, or its data
    /// key destroyed. A destruction that is due (and not held) is carried out first, as an
    /// unwrap would.
    async fn refuse_destroyed_object(&self, id: &[u8; 16], object: &KmipObject) -> Result<(), KeyError> {
        let record = self.store.data_key(id)?.ok_or_else(|| KeyError::KmipObjectNotFound { uid: uid_of(id) })?;
        self.refuse_destroyed(id, &uid_of(id), &record).await?;
        if let (_, Some(at)) = self.kmip_state(id, object)? {
            return Err(KeyError::Destroyed { key_id: uid_of(id), date: super::format_date(at) });
        }
        Ok(())
    }

    /// Activate: Pre-Active to Active, dated now. Needs `sealer` on the object's keyring.
    pub async fn kmip_activate(&self, auth: &Authorized, uid: &str, audit: AuditEvent) -> Result<(), KeyError> {
        self.kmip_change(auth, uid, "Activate", audit, |o, seen, now| {
            if seen != state::PRE_ACTIVE {
                return Err(seen);
            }
            o.state = state::ACTIVE;
            o.activation_date = Some(now);
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Revoke (KMIP 1.4 section 4.20): a compromise (reason Key Compromise 2 or CA
    /// Compromise 3) makes the object Compromised (Destroyed Compromised if destroyed),
    /// dated now, its Compromise Occurrence Date the one given or else its Initial Date;
    /// any other reason makes a Pre-Active or Active object Deactivated, dated now.
    /// Needs `sealer` on the object's keyring.
    pub async fn kmip_revoke(
        &self,
        auth: &Authorized,
        uid: &str,
        reason: u32,
        message: Option<String>,
        occurred: Option<i64>,
        audit: AuditEvent,
    ) -> Result<(), KeyError> {
        if let Some(m) = &message {
            check_text("Revocation Message", m)?;
        }
        let compromise = matches!(reason, revocation::KEY_COMPROMISE | revocation::CA_COMPROMISE);
        self.kmip_change(auth, uid, "Revoke", audit, |o, seen, now| {
            if compromise {
                if matches!(seen, state::COMPROMISED | state::DESTROYED_COMPROMISED) {
                    return Err(seen);
                }
                o.state = state::COMPROMISED;
                o.compromise_date = Some(now);
                o.compromise_occurrence = Some(occurred.unwrap_or(o.initial_date));
            } else {
                if !matches!(seen, state::PRE_ACTIVE | state::ACTIVE) {
                    return Err(seen);
                }
                o.state = state::DEACTIVATED;
                o.deactivation_date = Some(now);
            }
            o.revocation = Some((reason, message));
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Destroy from a KMIP client, under the keyring's rules: the object is Destroyed to
    /// KMIP clients at once (Get refused), and a destruction of its data key is scheduled
    /// for after the waiting period, which erases the material; a legal hold on the
    /// keyring refuses it; an officer sees it in the destructions and can cancel it. An
    /// Active object must be revoked first (KMIP 1.4 section 4.21). Needs `sealer`.
    pub async fn kmip_destroy(&self, auth: &Authorized, uid: &str, mut audit: AuditEvent) -> Result<DestructionRecord, KeyError> {
        let admin = self.lock_admin().await?;
        let (id, before) = self.kmip_object(uid)?;
        Self::check(auth, Action::GenerateDataKey, Some(&before.keyring))?;
        let (seen, _) = self.kmip_state(&id, &before)?;
        if !matches!(seen, state::PRE_ACTIVE | state::DEACTIVATED | state::COMPROMISED) {
            return Err(KeyError::KmipState { uid: uid_of(&id), state: state::name(seen), operation: "Destroy" });
        }
        let target = DestructionTarget::Key { id, keyring: before.keyring.clone() };
        self.check_destroyable(&target, &uid_of(&id))?;
        let mut after = before.clone();
        after.destroy_date = Some(self.now());
        audit.key_id = Some(uid_of(&id));
        let action = PendingAction::DestroyKey { id, keyring: before.keyring.clone() };
        let put = WriteOp::PutKmipObject { id, object: Box::new(after), previous: Some(Box::new(before)) };
        // The bundle learns of the Destroy only once it is committed: a state file that said
        // Destroyed for a Destroy that never committed would make an import skip a live key,
        // while one a step behind only brings back a key a client meant to destroy.
        self.kmip_escrow_recipient_ready()?;
        let done = self.schedule_with_ops(&admin, &action, auth.principal().name(), None, audit, vec![put]).await?;
        self.kmip_escrow_resync(&id).await;
        Ok(done)
    }

    /// Adds, changes or deletes one attribute a client may set (Name, Application
    /// Specific Information, Cryptographic Usage Mask); returns the attribute as it now
    /// is (or was, deleted) and its index. Not on a destroyed object. Needs `sealer` on
    /// the object's keyring.
    pub async fn kmip_edit(&self, auth: &Authorized, uid: &str, edit: AttributeEdit, audit: AuditEvent) -> Result<(Attribute, usize), KeyError> {
        let mut out = None;
        self.kmip_write(auth, uid, audit, |o, seen, _| {
            if matches!(seen, state::DESTROYED | state::DESTROYED_COMPROMISED) {
                return Err(KeyError::KmipState { uid: shown(uid), state: state::name(seen), operation: "changing attributes" });
            }
            out = Some(o.edit(edit)?);
            Ok(())
        })
        .await?;
        out.ok_or(KeyError::Internal { what: "an attribute edit returned nothing" })
    }

    /// A state change of an object: `change` sees the state a client sees
    /// ([`kmip_state`](Self::kmip_state)) and says no with it.
    async fn kmip_change(
        &self,
        auth: &Authorized,
        uid: &str,
        operation: &'static str,
        audit: AuditEvent,
        change: impl FnOnce(&mut KmipObject, u32, i64) -> Result<(), u32>,
    ) -> Result<(), KeyError> {
        self.kmip_write(auth, uid, audit, |o, seen, now| {
            change(o, seen, now).map_err(|s| KeyError::KmipState { uid: shown(uid), state: state::name(s), operation })
        })
        .await
    }

    /// A change of an object's row and its audit entry, in one transaction that fails if
    /// the row changed meanwhile (another replica). Reads the replicas' state first, so a
    /// Destroy made on another replica is seen.
    async fn kmip_write(
        &self,
        auth: &Authorized,
        uid: &str,
        mut audit: AuditEvent,
        change: impl FnOnce(&mut KmipObject, u32, i64) -> Result<(), KeyError>,
    ) -> Result<(), KeyError> {
        self.sync().await?;
        let (id, before) = self.kmip_object(uid)?;
        Self::check(auth, Action::GenerateDataKey, Some(&before.keyring))?;
        let (seen, _) = self.kmip_state(&id, &before)?;
        let mut after = before.clone();
        change(&mut after, seen, self.now())?;
        audit.key_id = Some(uid_of(&id));
        let op = WriteOp::Atomic(vec![WriteOp::PutKmipObject { id, object: Box::new(after), previous: Some(Box::new(before)) }, WriteOp::Audit(audit)]);
        let escrowed = self.kmip_escrow_before(&op, None).await?;
        self.kmip_escrow_after(escrowed, self.store.write(op).await.map_err(KeyError::from)).await
    }

    /// The objects `matches` accepts, in id order, at most `max`, after skipping `offset`.
    /// Reads the table once; the caller's `matches` also decides what the client may see.
    pub fn kmip_locate(&self, offset: usize, max: usize, mut matches: impl FnMut(&[u8; 16], &KmipObject) -> bool) -> Result<Vec<String>, KeyError> {
        let mut found = Vec::new();
        let mut skipped = 0;
        self.store.for_each_kmip_object(|id, o| {
            if matches(id, &o) {
                if skipped < offset {
                    skipped += 1;
                } else {
                    found.push(uid_of(id));
                }
            }
            found.len() < max
        })?;
        Ok(found)
    }
}
