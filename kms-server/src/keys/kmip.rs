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

use super::registry::WriteOp;
use super::{KeyError, KeyManager};
use crate::audit::AuditEvent;
use crate::auth::{Action, Authorized};
use crate::secret::{aes_gcm_open, aes_gcm_seal};

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
            check_text("Application Namespace", ns)?;
            // Application Data may be empty (the tape library profile asks the server to fill it).
            if !data.is_empty() {
                check_text("Application Data", data)?;
            }
        }
        Ok(())
    }
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
        mut audit: AuditEvent,
    ) -> Result<String, KeyError> {
        Self::check(auth, Action::GenerateDataKey, Some(keyring))?;
        new.validate()?;
        if material.expose().is_empty() || material.expose().len() > MAX_MATERIAL {
            return Err(KeyError::InvalidArgument { field: "Key Material", reason: "1 to 8192 bytes" });
        }
        let mut labels = vec![("kmip.object_type".to_owned(), new.object_type.to_string())];
        if let Some(n) = new.names.first() {
            labels.push(("kmip.name".to_owned(), n.clone()));
        }
        labels.sort();
        let mut issue = self.issue(auth, keyring, "kmip", labels).await?;
        // An escrow bundle of KMIP objects is another matter than a backup's escrow stanza:
        // the object is not counted as escrowed by the stanza's rules.
        issue.record.escrowed = false;
        let id = issue.id;
        let sealed = aes_gcm_seal(&issue.data_key, &self.rng, &material_aad(&id), material.expose()).map_err(|_| KeyError::Rng)?;
        let object = KmipObject {
            object_type: new.object_type,
            keyring: keyring.to_owned(),
            algorithm: new.algorithm,
            length: new.length,
            usage_mask: new.usage_mask,
            names: new.names,
            app_info: new.app_info,
            state: state::PRE_ACTIVE,
            initial_date: issue.record.created,
            activation_date: None,
            deactivation_date: None,
            compromise_date: None,
            destroy_date: None,
            revocation: None,
            created_by: auth.principal().name().to_owned(),
            key_format: new.key_format,
            wrapped: issue.wrapped,
            sealed,
            links: Vec::new(),
            secret_data_type: None,
        };
        audit.key_id = Some(uid_of(&id));
        self.store
            .write(WriteOp::Atomic(vec![
                WriteOp::IssueDataKey { id, record: issue.record, secret: Some(issue.secret) },
                WriteOp::PutKmipObject { id, object: Box::new(object), previous: None },
                WriteOp::Audit(audit),
            ]))
            .await?;
        Ok(uid_of(&id))
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
        let (id, object) = self.kmip_object(uid)?;
        Self::check(auth, Action::UnwrapDataKey, Some(&object.keyring))?;
        if matches!(object.state, state::DESTROYED | state::DESTROYED_COMPROMISED) {
            return Err(KeyError::KmipState { uid: uid_of(&id), state: state::name(object.state), operation: "Get" });
        }
        let k = self.unwrap_data_key(auth, &uid_of(&id), &object.keyring, &object.wrapped).await?;
        let material = aes_gcm_open(&k.data_key, &material_aad(&id), &object.sealed)
            .map_err(|_| KeyError::UnwrapFailed { key_id: uid_of(&id) })?;
        Ok((object, Material(material)))
    }

    /// Activate: Pre-Active to Active, dated now. Needs `sealer` on the object's keyring.
    pub async fn kmip_activate(&self, auth: &Authorized, uid: &str, audit: AuditEvent) -> Result<(), KeyError> {
        self.kmip_change(auth, uid, "Activate", audit, |o, now| {
            if o.state != state::PRE_ACTIVE {
                return Err(o.state);
            }
            o.state = state::ACTIVE;
            o.activation_date = Some(now);
            Ok(())
        })
        .await
    }

    /// A state change of an object and its audit entry, in one transaction that fails if
    /// the object changed meanwhile (another replica). `change` says no with the state it saw.
    async fn kmip_change(
        &self,
        auth: &Authorized,
        uid: &str,
        operation: &'static str,
        mut audit: AuditEvent,
        change: impl FnOnce(&mut KmipObject, i64) -> Result<(), u32>,
    ) -> Result<(), KeyError> {
        let (id, before) = self.kmip_object(uid)?;
        Self::check(auth, Action::GenerateDataKey, Some(&before.keyring))?;
        let mut after = before.clone();
        change(&mut after, self.now())
            .map_err(|s| KeyError::KmipState { uid: uid_of(&id), state: state::name(s), operation })?;
        audit.key_id = Some(uid_of(&id));
        self.store
            .write(WriteOp::Atomic(vec![
                WriteOp::PutKmipObject { id, object: Box::new(after), previous: Some(Box::new(before)) },
                WriteOp::Audit(audit),
            ]))
            .await?;
        Ok(())
    }

    /// The objects `matches` accepts, in id order, at most `max`, after skipping `offset`.
    /// Reads the table once; the caller's `matches` also decides what the client may see.
    pub fn kmip_locate(&self, offset: usize, max: usize, mut matches: impl FnMut(&KmipObject) -> bool) -> Result<Vec<String>, KeyError> {
        let mut found = Vec::new();
        let mut skipped = 0;
        self.store.for_each_kmip_object(|id, o| {
            if matches(&o) {
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
