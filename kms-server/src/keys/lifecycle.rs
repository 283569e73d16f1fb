//! Key lifecycle: rotation periods, retention and expiry, scheduled destruction
//! with a waiting period, legal holds, escrow removal and master-key rotation.
//!
//! Every time-based decision reads the injected [`Clock`](crate::clock::Clock), so
//! tests move time instead of sleeping. Decisions do not depend on when the
//! background sweep runs: a request that meets a key whose destruction is due
//! destroys it first (and is refused as destroyed), and a request that meets a
//! keyring whose rotation is due rotates it first.

use std::sync::Arc;

use super::{
    AUDIT_KEY_META, ESCROW_META, KeyError, KeyManager, MASTER_CHECK_META, format_date, next_rotation, parse_key_id,
    validate_keyring_name, validate_text,
};
use super::Requested;
use crate::auth::{Action, Authorized, RuntimeGrant};
use crate::master::MasterKeyProvider;
use super::registry::WriteOp;
use super::lease::Fence;
use super::{Admin, LiveKeyring, master_rewrap};
use crate::audit::AuditEvent;
use crate::model::{
    Outcome, ApprovalRecord, DataKeyRecord, DestructionReason, DestructionRecord, DestructionState, DestructionTarget, Hold,
    KeyState, KeyringRecord, PendingAction, VersionState,
};
use crate::store::StoreError;

/// Whether retention `to` days is shorter than `from` days (0 = keep until destroyed,
/// the longest).
pub(super) fn retention_lowered(from: u32, to: u32) -> bool {
    let days = |d: u32| if d == 0 { u64::MAX } else { u64::from(d) };
    days(to) < days(from)
}

/// The principal named in audit entries of the server's own scheduled actions.
const SERVER_PRINCIPAL: &str = "kms-server";

/// Most expired keys destroyed in one sweep step (one transaction).
const SWEEP_BATCH: usize = 1000;

/// What a destroy request led to.
pub enum DestroyOutcome {
    /// Dual control: a second officer must approve.
    Pending(ApprovalRecord),
    /// Scheduled after the waiting period.
    Scheduled(DestructionRecord),
}

/// Most data keys one [`KeyManager::find_data_keys`] answer carries.
pub const FIND_LIMIT: usize = 100;

/// The data keys issued for one backup id, newest first.
pub struct FoundKeys {
    /// Key id (hex), registry record, the destruction scheduled for it (if any).
    pub keys: Vec<(String, DataKeyRecord, Option<u64>)>,
    /// More keys matched than [`FIND_LIMIT`].
    pub truncated: bool,
}

/// The result of a master-key rotation.
pub struct MasterRotation {
    pub generation: u32,
    pub description: String,
    pub keyrings: u32,
    pub versions: u32,
}

impl KeyManager {
    /// An audit event of the server's own scheduled work, stamped by the clock.
    fn server_event(&self, action: &str, keyring: Option<&str>, key_id: Option<String>, done: String) -> AuditEvent {
        let mut e = self.event(SERVER_PRINCIPAL, action, keyring, None, Outcome::ok_with(done));
        e.key_id = key_id;
        e
    }

    pub(super) fn hold_error(keyring: &str, h: &Hold) -> KeyError {
        KeyError::LegalHold {
            keyring: keyring.to_owned(),
            by: h.by.clone(),
            since: format_date(h.since),
            reason: h.reason.clone(),
        }
    }

    /// The keyring's hold, if any (and whether it exists / was destroyed).
    pub(super) fn ring_state(&self, keyring: &str) -> Result<(Option<Hold>, Option<i64>), KeyError> {
        let live = self.ring(keyring)?;
        Ok((live.record.hold.clone(), live.record.destroyed))
    }

    /// Refuses a destroyed key; destroys it first if its destruction is due now.
    pub(super) async fn refuse_destroyed(&self, id: &[u8; 16], key_id: &str, record: &DataKeyRecord) -> Result<(), KeyError> {
        if let KeyState::Destroyed { at } = record.state {
            return Err(KeyError::Destroyed { key_id: key_id.to_owned(), date: format_date(at) });
        }
        let now = self.now();
        let scheduled = self.scheduled_for(id, &record.keyring);
        let expired = record.expires.is_some_and(|e| e <= now);
        let due = scheduled.as_ref().is_some_and(|d| d.due <= now);
        // The common case (nothing due) needs no look at the keyring's hold.
        if !(expired || due) {
            return Ok(());
        }
        let (hold, _) = self.ring_state(&record.keyring)?;
        if hold.is_some() {
            return Ok(());
        }
        let admin = self.lock_admin().await?;
        match scheduled.filter(|d| d.due <= now) {
            Some(d) => self.execute(&admin, d).await?,
            None => self.destroy_expired(&admin, vec![(*id, record.clone())]).await?,
        }
        let at = match self.store.data_key(id)?.map(|r| r.state) {
            Some(KeyState::Destroyed { at }) => at,
            _ => now,
        };
        match self.ring_state(&record.keyring)? {
            (_, Some(at)) => Err(KeyError::KeyringDestroyed { keyring: record.keyring.clone(), date: format_date(at) }),
            _ => Err(KeyError::Destroyed { key_id: key_id.to_owned(), date: format_date(at) }),
        }
    }

    /// The scheduled destruction that covers this key (of the key or its keyring).
    pub(super) fn scheduled_for(&self, id: &[u8; 16], keyring: &str) -> Option<DestructionRecord> {
        self.state()
            .scheduled
            .iter()
            .filter(|d| match &d.target {
                DestructionTarget::Key { id: k, .. } => k == id,
                DestructionTarget::Keyring { name } => name == keyring,
            })
            .min_by_key(|d| d.due)
            .cloned()
    }

    /// Whether the keyring's rotation period has passed.
    fn rotation_due(&self, keyring: &str) -> Result<bool, KeyError> {
        Ok(self.state().rings.get(keyring).and_then(|l| next_rotation(&l.record)).is_some_and(|d| d <= self.now()))
    }

    /// Rotates the keyring now if its rotation period has passed; true if it did.
    pub(super) async fn rotate_if_due(&self, keyring: &str, fence: Option<Fence>) -> Result<bool, KeyError> {
        if !self.rotation_due(keyring)? {
            return Ok(false);
        }
        let admin = self.lock_admin_as(fence).await?;
        // Another request (or replica) may have rotated it while this one waited for the lock.
        if !self.rotation_due(keyring)? {
            return Ok(false);
        }
        let ev = self.server_event("RotateKeyring", Some(keyring), None, "rotation period reached".into());
        let info = match self.rotate_locked(&admin, keyring, ev).await {
            Ok(info) => info,
            // Another replica changed the state at the same moment (likely the same
            // rotation): take its state; a rotation still due is made by the next request.
            Err(KeyError::Store(StoreError::Conflict { .. })) => {
                self.sync_locked(&admin).await?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        tracing::info!(keyring, version = info.current_version, "keyring rotated by its rotation period");
        Ok(true)
    }

    /// Changes retention and/or rotation period. A new retention applies to keys issued
    /// from now on. Lowering the retention shortens how long backups stay restorable: it
    /// becomes a request that a second officer approves (nothing changes until then);
    /// raising it, and the rotation period, apply at once.
    pub async fn set_keyring_policy(
        &self,
        auth: &Authorized,
        name: &str,
        retention_days: Option<u32>,
        rotation_period_days: Option<u32>,
        audit: AuditEvent,
    ) -> Result<Requested<super::KeyringInfo>, KeyError> {
        Self::check(auth, Action::SetKeyringPolicy, Some(name))?;
        validate_keyring_name(name)?;
        if retention_days.is_none() && rotation_period_days.is_none() {
            return Err(KeyError::InvalidArgument { field: "retention_days", reason: "give a retention or a rotation period to change" });
        }
        let admin = self.lock_admin().await?;
        let live = self.ring(name)?;
        if let Some(d) = live.record.destroyed {
            return Err(KeyError::KeyringDestroyed { keyring: name.to_owned(), date: format_date(d) });
        }
        let from_days = live.record.retention_days;
        if let Some(to_days) = retention_days.filter(|&to| retention_lowered(from_days, to)) {
            if rotation_period_days.is_some() {
                return Err(KeyError::InvalidArgument {
                    field: "rotation_period_days",
                    reason: "lowering the retention needs a second officer: change the rotation period in its own request",
                });
            }
            let action = PendingAction::LowerRetention { keyring: name.to_owned(), from_days, to_days };
            let approval = self.new_approval(auth, action, audit).await?;
            return Ok(Requested::Pending { approval, current: self.info_of(&live)? });
        }
        self.update_ring(&admin, name, None, audit, |r| {
            if let Some(d) = retention_days {
                r.retention_days = d;
            }
            if let Some(d) = rotation_period_days {
                r.rotation_period_days = d;
            }
            Ok(())
        })
        .await
        .map(Requested::Done)
    }

    /// Places or releases a legal hold. Placing one only protects and is done at once;
    /// releasing one lets destructions go ahead: it becomes a request that a second
    /// officer approves (the hold stays until then).
    pub async fn set_legal_hold(
        &self,
        auth: &Authorized,
        keyring: &str,
        hold: bool,
        reason: &str,
        audit: AuditEvent,
    ) -> Result<Requested<super::KeyringInfo>, KeyError> {
        Self::check(auth, Action::SetLegalHold, Some(keyring))?;
        validate_keyring_name(keyring)?;
        if hold {
            validate_text("reason", reason, 512, false)?;
        }
        let now = self.now();
        let by = auth.principal().name().to_owned();
        let admin = self.lock_admin().await?;
        if !hold {
            let live = self.ring(keyring)?;
            let h = live.record.hold.clone().ok_or_else(|| KeyError::NoHold { keyring: keyring.to_owned() })?;
            let action = PendingAction::ReleaseHold { keyring: keyring.to_owned(), hold: h };
            let approval = self.new_approval(auth, action, audit).await?;
            return Ok(Requested::Pending { approval, current: self.info_of(&live)? });
        }
        self.update_ring(&admin, keyring, None, audit, |r| {
            r.hold = Some(Hold { by, since: now, reason: reason.to_owned() });
            Ok(())
        })
        .await
        .map(Requested::Done)
    }

    /// Applies `f` to a keyring record and stores it with the audit entry (and the
    /// approval that led to it), admin lock held.
    async fn update_ring(
        &self,
        admin: &Admin<'_>,
        name: &str,
        approval: Option<&ApprovalRecord>,
        audit: AuditEvent,
        f: impl FnOnce(&mut KeyringRecord) -> Result<(), KeyError>,
    ) -> Result<super::KeyringInfo, KeyError> {
        let old = self.ring(name)?;
        let mut record = old.record.clone();
        f(&mut record)?;
        let mut ops = vec![WriteOp::PutKeyring(record.clone())];
        ops.extend(approval.map(|a| WriteOp::PutApproval(a.clone())));
        ops.push(WriteOp::Audit(audit));
        self.store.write(WriteOp::Atomic(ops)).await?;
        let live = Arc::new(LiveKeyring { record, keys: old.keys.clone() });
        self.publish(admin, |s| {
            s.rings.insert(name.to_owned(), live.clone());
        });
        self.info_of(&live)
    }

    /// The keyring of a registered key, for authorization (no check: the caller authorizes on it).
    pub fn keyring_of(&self, key_id: &str) -> Result<Option<String>, KeyError> {
        let id = parse_key_id(key_id)?;
        Ok(self.store.data_key(&id)?.map(|r| r.keyring))
    }

    /// Registry facts of a key, with the destruction scheduled for it.
    pub fn get_data_key(&self, auth: &Authorized, key_id: &str) -> Result<(DataKeyRecord, Option<u64>), KeyError> {
        let id = parse_key_id(key_id)?;
        let rec = self.store.data_key(&id)?.ok_or_else(|| KeyError::UnknownKeyId { key_id: key_id.to_owned() })?;
        Self::check(auth, Action::GetDataKey, Some(&rec.keyring))?;
        let sched = self.scheduled_for(&id, &rec.keyring).map(|d| d.id);
        Ok((rec, sched))
    }

    /// The data keys issued for `backup_id` (exact match), newest first (ties by key id),
    /// at most [`FIND_LIMIT`] (`truncated` when more matched): in `keyring` if given (the
    /// caller is authorized on it), else in every keyring `visible` says the caller may
    /// see. Reads the whole registry (every data key record): there is no index by backup
    /// id, so it costs as much as the registry is large (an officer's question, not a hot
    /// path); memory stays bounded by a few times [`FIND_LIMIT`] records.
    pub fn find_data_keys(
        &self,
        auth: &Authorized,
        backup_id: &str,
        keyring: Option<&str>,
        visible: impl Fn(&str) -> bool,
    ) -> Result<FoundKeys, KeyError> {
        Self::check(auth, Action::FindDataKeys, keyring)?;
        let newest_first = |a: &([u8; 16], DataKeyRecord), b: &([u8; 16], DataKeyRecord)| b.1.created.cmp(&a.1.created).then(b.0.cmp(&a.0));
        let mut found: Vec<([u8; 16], DataKeyRecord)> = Vec::new();
        let mut matched = 0usize;
        self.store.for_each_data_key(|id, rec| {
            let wanted = rec.backup_id == backup_id && keyring.map_or_else(|| visible(&rec.keyring), |k| rec.keyring == k);
            if !wanted {
                return;
            }
            matched += 1;
            found.push((*id, rec.clone()));
            if found.len() >= 4 * FIND_LIMIT {
                found.sort_by(newest_first);
                found.truncate(FIND_LIMIT);
            }
        })?;
        found.sort_by(newest_first);
        found.truncate(FIND_LIMIT);
        let keys = found
            .into_iter()
            .map(|(id, rec)| {
                let sched = self.scheduled_for(&id, &rec.keyring).map(|d| d.id);
                (hex::encode(id), rec, sched)
            })
            .collect();
        Ok(FoundKeys { keys, truncated: matched > FIND_LIMIT })
    }

    /// Asks to destroy one key: before its expiry this needs a second officer.
    pub async fn request_destroy_key(&self, auth: &Authorized, key_id: &str, audit: AuditEvent) -> Result<DestroyOutcome, KeyError> {
        let id = parse_key_id(key_id)?;
        let rec = self.store.data_key(&id)?.ok_or_else(|| KeyError::UnknownKeyId { key_id: key_id.to_owned() })?;
        Self::check(auth, Action::DestroyKey, Some(&rec.keyring))?;
        let admin = self.lock_admin().await?;
        self.check_destroyable(&DestructionTarget::Key { id, keyring: rec.keyring.clone() }, key_id)?;
        if let KeyState::Destroyed { at } = rec.state {
            return Err(KeyError::Destroyed { key_id: key_id.to_owned(), date: format_date(at) });
        }
        let action = PendingAction::DestroyKey { id, keyring: rec.keyring.clone() };
        if rec.expires.is_some_and(|e| e <= self.now()) {
            let d = self.schedule_with(&admin, &action, auth.principal().name(), None, audit).await?;
            return Ok(DestroyOutcome::Scheduled(d));
        }
        Ok(DestroyOutcome::Pending(self.new_approval(auth, action, audit).await?))
    }

    /// Asks to destroy a keyring: always dual control (a keyring does not expire).
    pub async fn request_destroy_keyring(&self, auth: &Authorized, name: &str, audit: AuditEvent) -> Result<DestroyOutcome, KeyError> {
        Self::check(auth, Action::DestroyKeyring, Some(name))?;
        validate_keyring_name(name)?;
        let _guard = self.lock_admin().await?;
        self.check_destroyable(&DestructionTarget::Keyring { name: name.to_owned() }, name)?;
        let action = PendingAction::DestroyKeyring { keyring: name.to_owned() };
        Ok(DestroyOutcome::Pending(self.new_approval(auth, action, audit).await?))
    }

    /// Refuses a destruction of a held or destroyed keyring, or a double schedule.
    pub(super) fn check_destroyable(&self, target: &DestructionTarget, label: &str) -> Result<(), KeyError> {
        let keyring = target.keyring();
        match self.ring_state(keyring)? {
            (_, Some(at)) => return Err(KeyError::KeyringDestroyed { keyring: keyring.to_owned(), date: format_date(at) }),
            (Some(h), _) => return Err(Self::hold_error(keyring, &h)),
            _ => {}
        }
        if let Some(d) = self.state().scheduled.iter().find(|d| d.target == *target) {
            return Err(KeyError::AlreadyScheduled { target: label.to_owned(), id: d.id, due: format_date(d.due) });
        }
        Ok(())
    }

    /// Asks to remove the escrow manifest in force (dual control).
    pub async fn request_remove_escrow(&self, auth: &Authorized, audit: AuditEvent) -> Result<ApprovalRecord, KeyError> {
        Self::check(auth, Action::RemoveEscrow, None)?;
        let _admin = self.lock_admin().await?;
        let in_force = self.state().escrow.as_ref().is_some_and(|e| e.removed.is_none());
        if !in_force {
            return Err(KeyError::NoEscrow);
        }
        self.new_approval(auth, PendingAction::RemoveEscrow, audit).await
    }

    /// Carries out an approved action other than retiring versions (admin lock held).
    pub(super) async fn carry_out(
        &self,
        admin: &Admin<'_>,
        action: &PendingAction,
        approval: &ApprovalRecord,
        audit: AuditEvent,
    ) -> Result<(), KeyError> {
        match action {
            PendingAction::RetireVersions { .. } | PendingAction::RetireVersionsForced { .. } => {
                Err(KeyError::Internal { what: "retirement is carried out by approve" })
            }
            PendingAction::DestroyKey { keyring, .. } | PendingAction::DestroyKeyring { keyring } => {
                let label = match action {
                    PendingAction::DestroyKey { id, .. } => hex::encode(id),
                    _ => keyring.clone(),
                };
                let target = match action {
                    PendingAction::DestroyKey { id, keyring } => DestructionTarget::Key { id: *id, keyring: keyring.clone() },
                    _ => DestructionTarget::Keyring { name: keyring.clone() },
                };
                self.check_destroyable(&target, &label)?;
                self.schedule_with(admin, action, &approval.requested_by, Some(approval), audit).await.map(|_| ())
            }
            PendingAction::InstallEscrow { manifest_json, replaces, .. } => {
                self.approved_escrow(admin, manifest_json, replaces.as_deref(), approval, audit).await
            }
            PendingAction::Grant { principal, role, keyring } => {
                let g = RuntimeGrant { principal: principal.clone(), role: *role, keyring: keyring.clone() };
                self.approved_grant(g, approval, audit).await
            }
            PendingAction::ReleaseHold { keyring, hold } => {
                let id = approval.id;
                self.update_ring(admin, keyring, Some(approval), audit, |r| match &r.hold {
                    None => Err(KeyError::NoHold { keyring: r.name.clone() }),
                    Some(h) if h != hold => {
                        Err(KeyError::ApprovalOutdated { id, reason: "the legal hold was replaced since the request" })
                    }
                    Some(_) => {
                        r.hold = None;
                        Ok(())
                    }
                })
                .await
                .map(|_| ())
            }
            PendingAction::LowerRetention { keyring, from_days, to_days } => {
                let id = approval.id;
                self.update_ring(admin, keyring, Some(approval), audit, |r| {
                    if let Some(d) = r.destroyed {
                        return Err(KeyError::KeyringDestroyed { keyring: r.name.clone(), date: format_date(d) });
                    }
                    if r.retention_days != *from_days {
                        return Err(KeyError::ApprovalOutdated { id, reason: "the keyring's retention changed since the request" });
                    }
                    r.retention_days = *to_days;
                    Ok(())
                })
                .await
                .map(|_| ())
            }
            PendingAction::RemoveEscrow => {
                let mut info = self.state().escrow.clone().ok_or(KeyError::NoEscrow)?;
                if info.removed.is_some() {
                    return Err(KeyError::NoEscrow);
                }
                info.previous_recipients.push(info.recovery_recipient.clone());
                info.removed = Some(self.now());
                let bytes = postcard::to_allocvec(&info).map_err(|e| StoreError::Encode { what: "escrow", source: e })?;
                self.store
                    .write(WriteOp::Atomic(vec![
                        WriteOp::PutMeta { key: ESCROW_META, value: bytes },
                        WriteOp::PutApproval(approval.clone()),
                        WriteOp::Audit(audit),
                    ]))
                    .await?;
                self.publish(admin, |s| s.escrow = Some(info));
                Ok(())
            }
        }
    }

    /// Records a scheduled destruction (and the approval that led to it) with its audit entry.
    pub(super) async fn schedule_with(
        &self,
        admin: &Admin<'_>,
        action: &PendingAction,
        requested_by: &str,
        approval: Option<&ApprovalRecord>,
        audit: AuditEvent,
    ) -> Result<DestructionRecord, KeyError> {
        self.schedule_with_ops(admin, action, requested_by, approval, audit, Vec::new()).await
    }

    /// [`schedule_with`](Self::schedule_with), with more writes in the same transaction.
    pub(super) async fn schedule_with_ops(
        &self,
        admin: &Admin<'_>,
        action: &PendingAction,
        requested_by: &str,
        approval: Option<&ApprovalRecord>,
        audit: AuditEvent,
        extra: Vec<WriteOp>,
    ) -> Result<DestructionRecord, KeyError> {
        let target = match action {
            PendingAction::DestroyKey { id, keyring } => DestructionTarget::Key { id: *id, keyring: keyring.clone() },
            PendingAction::DestroyKeyring { keyring } => DestructionTarget::Keyring { name: keyring.clone() },
            _ => return Err(KeyError::Internal { what: "only destructions are scheduled" }),
        };
        let now = self.now();
        let rec = DestructionRecord {
            id: self.store.next_destruction_id()?,
            target,
            requested_by: requested_by.to_owned(),
            requested: approval.map(|a| a.requested).unwrap_or(now),
            due: now.saturating_add(self.destruction_wait_secs),
            state: DestructionState::Scheduled,
            approval: approval.map(|a| a.id),
            reason: DestructionReason::Request,
        };
        let mut ops = vec![WriteOp::NewDestruction(rec.clone())];
        if let Some(a) = approval {
            ops.push(WriteOp::PutApproval(a.clone()));
        }
        ops.extend(extra);
        ops.push(WriteOp::Audit(audit));
        self.store.write(WriteOp::Atomic(ops)).await?;
        self.publish(admin, |s| s.scheduled.push(rec.clone()));
        Ok(rec)
    }

    /// Cancels a scheduled destruction.
    pub async fn cancel_destruction(&self, auth: &Authorized, id: u64, audit: AuditEvent) -> Result<DestructionRecord, KeyError> {
        let admin = self.lock_admin().await?;
        let mut rec = self.store.destruction(id)?.ok_or(KeyError::DestructionNotFound { id })?;
        Self::check(auth, Action::CancelDestruction, Some(rec.target.keyring()))?;
        match rec.state {
            DestructionState::Scheduled => {}
            DestructionState::Cancelled { .. } => return Err(KeyError::DestructionNotPending { id, state: "cancelled" }),
            DestructionState::Done { .. } => return Err(KeyError::DestructionNotPending { id, state: "already carried out" }),
        }
        rec.state = DestructionState::Cancelled { by: auth.principal().name().to_owned(), at: self.now() };
        let mut ops = vec![WriteOp::PutDestruction(rec.clone())];
        if let DestructionTarget::Key { id, .. } = &rec.target {
            ops.extend(self.kmip_destroy_cancelled(id)?);
        }
        ops.push(WriteOp::Audit(audit));
        self.store.write(WriteOp::Atomic(ops)).await?;
        self.publish(&admin, |s| s.scheduled.retain(|d| d.id != id));
        if let DestructionTarget::Key { id, .. } = &rec.target {
            self.kmip_escrow_resync(id).await;
        }
        Ok(rec)
    }

    /// The keyring a destruction concerns (for authorization), if it exists.
    pub fn destruction_keyring(&self, id: u64) -> Option<String> {
        self.store.destruction(id).ok()?.map(|d| d.target.keyring().to_owned())
    }

    /// Every destruction record the caller may see.
    pub fn destructions(&self, auth: &Authorized, visible: impl Fn(&str) -> bool) -> Result<Vec<DestructionRecord>, KeyError> {
        Self::check(auth, Action::ListDestructions, None)?;
        Ok(self.store.destructions()?.into_iter().filter(|d| visible(d.target.keyring())).collect())
    }

    /// Whether a scheduled destruction is blocked by its keyring's hold now.
    pub fn is_held(&self, keyring: &str) -> bool {
        self.ring_state(keyring).map(|(h, _)| h.is_some()).unwrap_or(false)
    }

    /// Carries out a due destruction (admin lock held; the caller checked the hold).
    async fn execute(&self, admin: &Admin<'_>, mut d: DestructionRecord) -> Result<(), KeyError> {
        let now = self.now();
        d.state = DestructionState::Done { at: now };
        let mut ops = Vec::new();
        match &d.target {
            DestructionTarget::Key { id, keyring } => {
                if let Some(mut rec) = self.store.data_key(id)?
                    && matches!(rec.state, KeyState::Active)
                {
                    ops.extend(self.kmip_erased(id, &rec, now)?);
                    rec.state = KeyState::Destroyed { at: now };
                    ops.push(WriteOp::PutDataKey { id: *id, record: rec });
                }
                ops.push(WriteOp::PutDestruction(d.clone()));
                ops.push(WriteOp::Audit(self.server_event(
                    "DestroyKey",
                    Some(keyring),
                    Some(hex::encode(id)),
                    format!("destroyed (destruction {}, requested by {})", d.id, d.requested_by),
                )));
                self.write_as(admin, WriteOp::Atomic(ops)).await?;
                self.kmip_escrow_erase(&[*id]).await;
            }
            DestructionTarget::Keyring { name } => {
                let mut record = self.ring(name)?.record.clone();
                record.destroyed = Some(now);
                for v in &mut record.versions {
                    // Erasing the keyring keys destroys every data key under them.
                    v.wrapped_key.clear();
                    v.state = VersionState::Retired;
                }
                ops.push(WriteOp::PutKeyring(record.clone()));
                ops.push(WriteOp::PutDestruction(d.clone()));
                ops.push(WriteOp::Audit(self.server_event(
                    "DestroyKeyring",
                    Some(name),
                    None,
                    format!("keyring keys erased (destruction {}, requested by {})", d.id, d.requested_by),
                )));
                self.write_as(admin, WriteOp::Atomic(ops)).await?;
                let live = Arc::new(LiveKeyring { record, keys: Default::default() });
                self.publish(admin, |s| {
                    s.rings.insert(name.clone(), live);
                });
                self.kmip_escrow_erase_keyring(name).await;
            }
        }
        self.publish(admin, |s| s.scheduled.retain(|x| x.id != d.id));
        tracing::warn!(destruction = d.id, keyring = d.target.keyring(), "destruction carried out");
        Ok(())
    }

    /// Destroys keys at the end of their retention (admin lock held): one transaction
    /// for the batch, destruction ids numbered on from the table's last one.
    async fn destroy_expired(&self, admin: &Admin<'_>, keys: Vec<([u8; 16], DataKeyRecord)>) -> Result<(), KeyError> {
        let now = self.now();
        let first_id = self.store.next_destruction_id()?;
        let mut ops = Vec::with_capacity(keys.len() * 3);
        let ids: Vec<[u8; 16]> = keys.iter().map(|(id, _)| *id).collect();
        for (next_id, (id, mut rec)) in (first_id..).zip(keys) {
            let expired = rec.expires.unwrap_or(now);
            ops.extend(self.kmip_erased(&id, &rec, now)?);
            rec.state = KeyState::Destroyed { at: now };
            let d = DestructionRecord {
                id: next_id,
                target: DestructionTarget::Key { id, keyring: rec.keyring.clone() },
                requested_by: SERVER_PRINCIPAL.to_owned(),
                requested: expired,
                due: expired,
                state: DestructionState::Done { at: now },
                approval: None,
                reason: DestructionReason::Expiry,
            };
            let ev = self.server_event(
                "DestroyKey",
                Some(&rec.keyring),
                Some(hex::encode(id)),
                format!("destroyed at the end of its retention (expired {})", format_date(expired)),
            );
            ops.extend([WriteOp::PutDataKey { id, record: rec }, WriteOp::NewDestruction(d), WriteOp::Audit(ev)]);
        }
        self.write_as(admin, WriteOp::Atomic(ops)).await?;
        self.kmip_escrow_erase(&ids).await;
        Ok(())
    }

    /// One pass of the scheduled work: due rotations, due destructions (not held),
    /// expired keys (not held). Returns how many things it did.
    ///
    /// `fence`: the maintenance lease's (see [`super::lease`]), which every write of the
    /// pass then expects; None where no other process can write the store.
    pub async fn maintain(&self, fence: Option<Fence>) -> Result<u64, KeyError> {
        let mut done = 0u64;
        let names: Vec<String> = self.state().rings.keys().cloned().collect();
        for name in &names {
            if self.rotate_if_due(name, fence).await? {
                done += 1;
            }
        }
        let now = self.now();
        let due: Vec<DestructionRecord> = self.state().scheduled.iter().filter(|d| d.due <= now).cloned().collect();
        for d in due {
            if self.is_held(d.target.keyring()) {
                continue;
            }
            let admin = self.lock_admin_as(fence).await?;
            self.execute(&admin, d).await?;
            done += 1;
        }
        // Resumes after the last index entry looked at, so keys passed over (held or
        // destroyed keyrings) are read once per sweep, not once per batch.
        let mut after = None;
        loop {
            let skip = |k: &str| self.ring_state(k).map(|(h, dst)| h.is_some() || dst.is_some()).unwrap_or(true);
            let (batch, last) = self.store.expired_keys(now, after, SWEEP_BATCH, &skip)?;
            if !batch.is_empty() {
                let admin = self.lock_admin_as(fence).await?;
                done += batch.len() as u64;
                self.destroy_expired(&admin, batch).await?;
            }
            match last {
                Some(l) => after = Some(l),
                None => break,
            }
        }
        done += self.kmip_escrow_sweep().await?;
        Ok(done)
    }

    /// Makes the next master-key generation and rewraps every keyring key, the store's
    /// check value and the audit key under it, in one transaction.
    pub async fn rotate_master(&self, auth: &Authorized, audit: AuditEvent) -> Result<MasterRotation, KeyError> {
        Self::check(auth, Action::RotateMaster, None)?;
        let admin = self.lock_admin().await?;
        let state = self.state();
        let (generation, old) = state.master.clone();
        let next = generation + 1;
        let configured = self.configured.clone();
        let records: Vec<KeyringRecord> = state.rings.values().map(|l| l.record.clone()).collect();
        let audit_blob = self.store.get_meta(AUDIT_KEY_META)?;
        let check = self.store.get_meta(MASTER_CHECK_META)?.ok_or(KeyError::Internal { what: "the store has no master check value" })?;
        let (new, rewrapped) = tokio::task::spawn_blocking(move || -> Result<_, KeyError> {
            // Everything the old key wraps is opened before the next generation is made.
            let opened = master_rewrap::open_all(old.as_ref(), records, &check, audit_blob.as_deref())?;
            // A key of the next generation left by an interrupted rotation is used as it is.
            let new: Arc<dyn MasterKeyProvider> = match configured.generation(next, true) {
                Ok(k) => k,
                Err(first) if first.is_key_exists() => configured
                    .generation(next, false)
                    .map_err(|_| KeyError::MasterGeneration { generation: next, source: first })?,
                Err(e) => return Err(KeyError::MasterGeneration { generation: next, source: e }),
            };
            let rewrapped = master_rewrap::wrap_all(opened, new.as_ref(), next)?;
            Ok((new, rewrapped))
        })
        .await??;
        let master_rewrap::Rewrapped { records, mut ops, keyrings, versions } = rewrapped;
        let mut audit = audit;
        audit.outcome = Outcome::ok_with(format!(
            "master key generation {generation} -> {next} ({}); {keyrings} keyrings, {versions} versions rewrapped",
            new.describe()
        ));
        ops.push(WriteOp::Audit(audit));
        self.store.write(WriteOp::Atomic(ops)).await?;
        let description = new.describe();
        self.publish(&admin, |s| {
            for r in records {
                if let Some(live) = s.rings.get_mut(&r.name) {
                    *live = Arc::new(LiveKeyring { record: r, keys: live.keys.clone() });
                }
            }
            s.master = (next, new);
        });
        tracing::warn!(generation = next, "master key rotated");
        Ok(MasterRotation { generation: next, description, keyrings, versions })
    }
}
