//! The escrow bundle of KMIP objects (`kmip_escrow_dir`; the format is
//! [`kluis_escrow::kmip_bundle`], described for custodians in docs/kmip-escrow.md).
//!
//! In a disaster the server is gone and the appliances' keys with it; the bundle, kept
//! beside the backups, brings them back (`kmsctl kmip import`). Per object, encrypted to
//! the recovery recipient in force (writing needs no secret):
//!
//! - `<uid>.key.age`, the material and the fixed attributes: written durably before the
//!   Create (or import) commits, so no object exists that the bundle lacks (fail closed);
//!   removed again if the commit did not happen. Deleted when the object's data key is
//!   destroyed (a destruction carried out, retention expiry, its keyring destroyed), so the
//!   bundle never keeps what the keyring's rules erased.
//! - `<uid>.state.age`, the state and the attributes that change: written before each
//!   change commits (a change that cannot be escrowed is not made), then rewritten from
//!   the store after the commit, under one lock, so concurrent changes and failed commits
//!   converge on what the store holds.
//!
//! With `kmip_escrow_dir` set and no recipient in force, objects are neither made nor
//! changed ([`KeyError::KmipEscrowNoRecipient`]).

use std::path::PathBuf;

use kluis_escrow::kmip_bundle::{self as bundle, AppInfo, BundleError, KeyRecord, Revocation, StateRecord};
use zeroize::Zeroizing;

use super::{KmipObject, LABEL_PREFIX, MAX_MATERIAL, Material, NewObject, check_text, material_aad, object_type, state, uid_of};
use crate::audit::AuditEvent;
use crate::auth::{Action, Authorized};
use crate::keys::registry::WriteOp;
use crate::keys::{KeyError, KeyManager};
use crate::model::KeyState;
use crate::secret::aes_gcm_seal;

/// The bundle directory, and the lock that orders the writes of state files.
pub struct EscrowDir {
    dir: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl EscrowDir {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, lock: tokio::sync::Mutex::new(()) }
    }

    fn error(&self, source: BundleError) -> KeyError {
        KeyError::KmipEscrow { dir: self.dir.clone(), source }
    }

    /// Writes each `(name, bytes)` durably, in order, the directory synced once after (a
    /// blocking task).
    async fn write(&self, files: Vec<(String, Vec<u8>)>) -> Result<(), KeyError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || bundle::write_files(&dir, &files))
            .await?
            .map_err(|e| self.error(e))
    }

    /// Deletes each of `names` durably (a blocking task).
    async fn remove(&self, names: Vec<String>) -> Result<(), KeyError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || names.iter().try_for_each(|name| bundle::remove_file(&dir, name).map(|_| ())))
            .await?
            .map_err(|e| self.error(e))
    }
}

/// What [`KeyManager::kmip_escrow_before`] wrote, for [`KeyManager::kmip_escrow_after`].
pub(in crate::keys) struct Written {
    id: [u8; 16],
    /// A key file was written (a new object).
    created: bool,
}

/// The KMIP object a write puts, and its id.
fn put_of(op: &WriteOp) -> Option<(&[u8; 16], &KmipObject)> {
    match op {
        WriteOp::PutKmipObject { id, object, .. } => Some((id, object)),
        WriteOp::Atomic(ops) => ops.iter().find_map(put_of),
        _ => None,
    }
}

fn state_record(id: &[u8; 16], o: &KmipObject, destroyed: Option<i64>) -> StateRecord {
    StateRecord {
        uid: uid_of(id),
        state: o.state,
        usage_mask: o.usage_mask,
        names: o.names.clone(),
        app_info: o.app_info.iter().map(|(namespace, data)| AppInfo { namespace: namespace.clone(), data: data.clone() }).collect(),
        activation_date: o.activation_date,
        deactivation_date: o.deactivation_date,
        compromise_date: o.compromise_date,
        compromise_occurrence: o.compromise_occurrence,
        revocation: o.revocation.as_ref().map(|(code, message)| Revocation { code: *code, message: message.clone() }),
        destroyed,
    }
}

fn key_record(id: &[u8; 16], o: &KmipObject, material: &Material) -> KeyRecord {
    KeyRecord {
        uid: uid_of(id),
        keyring: o.keyring.clone(),
        object_type: o.object_type,
        algorithm: o.algorithm,
        length: o.length,
        key_format: o.key_format,
        initial_date: o.initial_date,
        created_by: o.created_by.clone(),
        material: Zeroizing::new(material.expose().to_vec()),
        links: o.links.clone(),
        secret_data_type: o.secret_data_type,
    }
}

impl KeyManager {
    /// The recipient KMIP objects are escrowed to: the one in force.
    fn kmip_escrow_recipient(&self, esc: &EscrowDir) -> Result<age::x25519::Recipient, KeyError> {
        let state = self.state();
        let recipient = state
            .escrow
            .as_ref()
            .and_then(|e| e.in_force())
            .ok_or_else(|| KeyError::KmipEscrowNoRecipient { dir: esc.dir.clone() })?;
        bundle::parse_recipient(recipient).map_err(|e| esc.error(e))
    }

    /// Refuses a change that could not be escrowed: a bundle is configured but no recipient
    /// is in force (the check `kmip_escrow_before` makes, for a change escrowed after it
    /// commits).
    pub(in crate::keys) fn kmip_escrow_recipient_ready(&self) -> Result<(), KeyError> {
        match &self.kmip_escrow {
            Some(esc) => self.kmip_escrow_recipient(esc).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Before `op` (a write that puts a KMIP object) commits: writes the object's state
    /// file, and its key file when `material` is given (a new object), durably. An error
    /// means nothing may be committed. Does nothing (None) when no bundle is configured.
    /// (A Destroy is escrowed after it commits: see `kmip_destroy`.)
    pub(in crate::keys) async fn kmip_escrow_before(&self, op: &WriteOp, material: Option<&Material>) -> Result<Option<Written>, KeyError> {
        let Some(esc) = &self.kmip_escrow else { return Ok(None) };
        let (id, o) = put_of(op).ok_or(KeyError::Internal { what: "an escrowed write puts no KMIP object" })?;
        let recipient = self.kmip_escrow_recipient(esc)?;
        let destroyed = self.kmip_state(id, o)?.1;
        let uid = uid_of(id);
        let mut files = Vec::with_capacity(2);
        if let Some(m) = material {
            files.push((bundle::key_file_name(&uid), key_record(id, o, m).seal(&recipient).map_err(|e| esc.error(e))?));
        }
        files.push((bundle::state_file_name(&uid), state_record(id, o, destroyed).seal(&recipient).map_err(|e| esc.error(e))?));
        // A new object's id is fresh: no other write of its files can race this one, so
        // Creates do not wait for each other here (their fsyncs overlap).
        let _order = match material {
            None => Some(esc.lock.lock().await),
            Some(_) => None,
        };
        esc.write(files).await?;
        Ok(Some(Written { id: *id, created: material.is_some() }))
    }

    /// After the commit [`kmip_escrow_before`](Self::kmip_escrow_before) prepared, with its
    /// result `r` (returned as it is): the state file is rewritten from the store; a new
    /// object that the store does not hold has its files removed again. Best effort: a
    /// failure is logged (the next change or the maintenance sweep writes again).
    pub(in crate::keys) async fn kmip_escrow_after<T>(&self, written: Option<Written>, r: Result<T, KeyError>) -> Result<T, KeyError> {
        let (Some(w), Some(esc)) = (written, &self.kmip_escrow) else { return r };
        // A new object committed: its state file was written from the row just committed.
        if r.is_ok() && w.created {
            return r;
        }
        // A failed commit may still have landed (a store that went away at the end):
        // the store decides.
        let absent = r.is_err() && w.created && matches!(self.store.kmip_object(&w.id), Ok(None));
        if absent {
            let uid = uid_of(&w.id);
            let _order = esc.lock.lock().await;
            if let Err(e) = esc.remove(vec![bundle::key_file_name(&uid), bundle::state_file_name(&uid)]).await {
                tracing::error!(uid = %uid, error = %e, "the escrow files of a KMIP object that was not made could not be removed");
            }
        } else {
            self.kmip_escrow_resync(&w.id).await;
        }
        r
    }

    /// Rewrites the state file of object `id` from the store (best effort: logged).
    pub(in crate::keys) async fn kmip_escrow_resync(&self, id: &[u8; 16]) {
        let Some(esc) = &self.kmip_escrow else { return };
        let _order = esc.lock.lock().await;
        let written = async {
            let Some(o) = self.store.kmip_object(id)? else { return Ok(()) };
            let recipient = self.kmip_escrow_recipient(esc)?;
            let destroyed = self.kmip_state(id, &o)?.1;
            let bytes = state_record(id, &o, destroyed).seal(&recipient).map_err(|e| esc.error(e))?;
            esc.write(vec![(bundle::state_file_name(&uid_of(id)), bytes)]).await
        };
        if let Err(e) = written.await {
            tracing::error!(uid = %uid_of(id), error = %e, "the escrow state file of a KMIP object could not be rewritten");
        }
    }

    /// After data keys were destroyed: the key files of those that are KMIP objects are
    /// deleted (durably) and their state files say Destroyed. Best effort: logged, and the
    /// maintenance sweep ([`kmip_escrow_sweep`](Self::kmip_escrow_sweep)) deletes what is left.
    pub(in crate::keys) async fn kmip_escrow_erase(&self, ids: &[[u8; 16]]) {
        let Some(esc) = &self.kmip_escrow else { return };
        for id in ids {
            if !matches!(self.store.kmip_object(id), Ok(Some(_))) {
                continue;
            }
            let uid = uid_of(id);
            let removed = {
                let _order = esc.lock.lock().await;
                esc.remove(vec![bundle::key_file_name(&uid)]).await
            };
            match removed {
                Ok(()) => tracing::info!(uid = %uid, "KMIP object's escrowed material deleted with its data key"),
                Err(e) => tracing::error!(uid = %uid, error = %e, "the escrowed material of a destroyed KMIP object could not be deleted"),
            }
            self.kmip_escrow_resync(id).await;
        }
    }

    /// [`kmip_escrow_erase`](Self::kmip_escrow_erase) for every KMIP object of a destroyed keyring.
    pub(in crate::keys) async fn kmip_escrow_erase_keyring(&self, keyring: &str) {
        if self.kmip_escrow.is_none() {
            return;
        }
        let mut ids = Vec::new();
        let listed = self.store.for_each_kmip_object(|id, o| {
            if o.keyring == keyring {
                ids.push(*id);
            }
            true
        });
        if let Err(e) = listed {
            tracing::error!(keyring, error = %e, "the KMIP objects of a destroyed keyring could not be listed for their escrow files");
        }
        self.kmip_escrow_erase(&ids).await;
    }

    /// Deletes the key files whose data key is destroyed (or its keyring): what an erase
    /// interrupted by a crash or a failing disk left. A key file of an object the store
    /// does not hold (a Create under way, an imported bundle) is left alone. Returns how
    /// many it deleted.
    pub async fn kmip_escrow_sweep(&self) -> Result<u64, KeyError> {
        let Some(esc) = &self.kmip_escrow else { return Ok(0) };
        let dir = esc.dir.clone();
        let listed = tokio::task::spawn_blocking(move || bundle::list(&dir)).await?.map_err(|e| esc.error(e))?;
        let mut gone = Vec::new();
        for (uid, has_key, _) in listed {
            let mut id = [0u8; 16];
            if !has_key || hex::decode_to_slice(&uid, &mut id).is_err() || !matches!(self.store.kmip_object(&id), Ok(Some(_))) {
                continue;
            }
            let Some(record) = self.store.data_key(&id)? else { continue };
            let ring_destroyed = self.ring_state(&record.keyring).map(|(_, d)| d.is_some()).unwrap_or(false);
            if matches!(record.state, KeyState::Destroyed { .. }) || ring_destroyed {
                gone.push(id);
            }
        }
        self.kmip_escrow_erase(&gone).await;
        Ok(gone.len() as u64)
    }

    /// Recreates a KMIP object from an escrow bundle (`kmsctl kmip import`) with its
    /// Unique Identifier: a data key issued with that id under `key.keyring`'s current
    /// version (its expiry counted from the object's Initial Date), the material sealed
    /// under it, the row with the state and attributes of `st`, the audit entry, in one
    /// transaction that fails if the id exists. Needs `officer` on the keyring. Escrowed
    /// again here like a Create, when a bundle is configured.
    pub async fn kmip_import(&self, auth: &Authorized, mut key: KeyRecord, st: StateRecord, mut audit: AuditEvent) -> Result<(), KeyError> {
        Self::check(auth, Action::KmipImport, Some(&key.keyring))?;
        let invalid = |field, reason| Err(KeyError::InvalidArgument { field, reason });
        if !bundle::is_uid(&key.uid) {
            return invalid("uid", "32 lowercase hex digits");
        }
        if st.uid != key.uid {
            return invalid("uid", "the state and the key are of different objects");
        }
        if st.destroyed.is_some() {
            return invalid("state", "the object was destroyed; a destroyed object is not imported");
        }
        if !(state::PRE_ACTIVE..=state::COMPROMISED).contains(&st.state) {
            return invalid("state", "Pre-Active, Active, Deactivated or Compromised");
        }
        if ![object_type::SYMMETRIC_KEY, object_type::PUBLIC_KEY, object_type::PRIVATE_KEY, object_type::SECRET_DATA].contains(&key.object_type) {
            return invalid("object_type", "Symmetric Key, Public Key, Private Key or Secret Data");
        }
        if key.material.is_empty() || key.material.len() > MAX_MATERIAL {
            return invalid("material", "1 to 8192 bytes");
        }
        check_text("created_by", &key.created_by)?;
        let new = NewObject {
            object_type: key.object_type,
            algorithm: key.algorithm,
            length: key.length,
            usage_mask: st.usage_mask,
            names: st.names.clone(),
            app_info: st.app_info.iter().map(|a| (a.namespace.clone(), a.data.clone())).collect(),
            key_format: key.key_format,
        };
        new.validate()?;
        if let Some(m) = &st.revocation.as_ref().and_then(|r| r.message.clone()) {
            check_text("Revocation Message", m)?;
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(&key.uid, &mut id).map_err(|_| KeyError::InvalidArgument { field: "uid", reason: "32 lowercase hex digits" })?;
        self.sync().await?;
        let exists = || -> Result<bool, KeyError> { Ok(self.store.data_key(&id)?.is_some() || self.store.kmip_object(&id)?.is_some()) };
        if exists()? {
            return Err(KeyError::KmipObjectExists { uid: key.uid.clone() });
        }
        let mut labels = vec![(format!("{LABEL_PREFIX}object_type"), new.object_type.to_string())];
        if let Some(n) = new.names.first() {
            labels.push((format!("{LABEL_PREFIX}name"), n.clone()));
        }
        labels.sort();
        let mut issue = self.issue_as(auth, &key.keyring, "kmip", labels, Some((id, key.initial_date))).await?;
        // As for a Create: the bundle is not the stanza escrow the registry counts.
        issue.record.escrowed = false;
        let material = Material::new(std::mem::take(&mut key.material));
        let sealed = aes_gcm_seal(&issue.data_key, &self.rng, &material_aad(&id), material.expose()).map_err(|_| KeyError::Rng)?;
        // NB: a field added to KmipObject is added here too (as in kmip_create).
        let object = KmipObject {
            object_type: new.object_type,
            keyring: key.keyring.clone(),
            algorithm: new.algorithm,
            length: new.length,
            usage_mask: new.usage_mask,
            names: new.names,
            app_info: new.app_info,
            state: st.state,
            initial_date: key.initial_date,
            activation_date: st.activation_date,
            deactivation_date: st.deactivation_date,
            compromise_date: st.compromise_date,
            compromise_occurrence: st.compromise_occurrence,
            destroy_date: None,
            revocation: st.revocation.map(|r| (r.code, r.message)),
            created_by: std::mem::take(&mut key.created_by),
            key_format: new.key_format,
            wrapped: issue.wrapped,
            sealed,
            links: std::mem::take(&mut key.links),
            secret_data_type: key.secret_data_type,
        };
        audit.key_id = Some(key.uid.clone());
        let op = WriteOp::Atomic(vec![
            WriteOp::ExpectNoKey { id },
            WriteOp::IssueDataKey { id, record: issue.record, secret: Some(issue.secret) },
            WriteOp::PutKmipObject { id, object: Box::new(object), previous: None },
            WriteOp::Audit(audit),
        ]);
        let written = self.kmip_escrow_before(&op, Some(&material)).await?;
        let r = self.store.write(op).await.map_err(KeyError::from);
        // Made meanwhile (another import, on another replica): said as such.
        let r = match r {
            Err(KeyError::Store(crate::store::StoreError::Conflict { .. })) if exists()? => Err(KeyError::KmipObjectExists { uid: key.uid.clone() }),
            r => r,
        };
        self.kmip_escrow_after(written, r).await
    }
}
