//! The compliance report, computed from the registry, the audit trail, the restore
//! tests, destructions and approvals. One pass over each; memory is bounded by the
//! number of keyrings, tested backups and the capped list of untested backups.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use kluis_proto::report::{
    ApprovalEntry, BackupEntry, DestructionEntry, DeviationEntry, EscrowEntry, HoldEntry, KeyringReport, KmipCreator, KmipEntry,
    KmipGet, MasterEntry, REPORT_FORMAT, Report, RestoreTestEntry, RotationEntry, UNTESTED_CAP, VersionEntry,
};

use super::{KeyError, KeyManager, format_date, next_rotation};
use crate::auth::{Action, Authorized};
use crate::model::{Outcome, DestructionReason, DestructionRecord, DestructionState, DestructionTarget, KeyState, PendingAction, VersionState};
use kluis_proto::states as wire;

#[derive(Default)]
struct Tally {
    issued: u64,
    total: u64,
    active: u64,
    destroyed: u64,
    without_escrow: u64,
    per_version: BTreeMap<u32, u64>,
    /// Oldest untested active keys (max-heap on created, capped).
    untested: BinaryHeap<(i64, String, String)>,
    untested_total: u64,
}

fn parse_since(since: Option<&str>) -> Result<Option<(i64, String)>, KeyError> {
    let Some(s) = since.filter(|s| !s.is_empty()) else { return Ok(None) };
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| KeyError::InvalidArgument { field: "since", reason: "must be an RFC 3339 time, e.g. 2026-01-01T00:00:00Z" })?;
    Ok(Some((t.unix_timestamp(), format_date(t.unix_timestamp()))))
}

/// A destruction as the wire and the report name it: what it destroys (kind and key id
/// or keyring name), where it stands (`held`: scheduled, its keyring under a legal hold)
/// and why.
pub struct WireDestruction {
    pub kind: wire::DestructionKind,
    pub target: String,
    pub state: wire::DestructionState,
    pub reason: wire::DestructionReason,
}

impl WireDestruction {
    pub fn of(d: &DestructionRecord, held: bool) -> Self {
        let (kind, target) = match &d.target {
            DestructionTarget::Key { id, .. } => (wire::DestructionKind::Key, hex::encode(id)),
            DestructionTarget::Keyring { name } => (wire::DestructionKind::Keyring, name.clone()),
        };
        let state = match d.state {
            DestructionState::Scheduled if held => wire::DestructionState::Held,
            DestructionState::Scheduled => wire::DestructionState::Scheduled,
            DestructionState::Cancelled { .. } => wire::DestructionState::Cancelled,
            DestructionState::Done { .. } => wire::DestructionState::Destroyed,
        };
        let reason = match d.reason {
            DestructionReason::Request => wire::DestructionReason::Request,
            DestructionReason::Expiry => wire::DestructionReason::Expiry,
        };
        WireDestruction { kind, target, state, reason }
    }
}

/// A keyring version's state as the wire names it.
pub fn wire_version_state(s: VersionState) -> wire::VersionState {
    match s {
        VersionState::Active => wire::VersionState::Active,
        VersionState::Retired => wire::VersionState::Retired,
    }
}

fn destruction_entry(d: &DestructionRecord, held: bool) -> DestructionEntry {
    let w = WireDestruction::of(d, held);
    DestructionEntry {
        id: d.id,
        target_kind: w.kind.as_str().into(),
        target: w.target,
        requested_by: d.requested_by.clone(),
        requested: format_date(d.requested),
        due: format_date(d.due),
        state: w.state.as_str().into(),
        reason: w.reason.as_str().into(),
        done: match d.state {
            DestructionState::Done { at } => Some(format_date(at)),
            _ => None,
        },
    }
}

/// A human description of a pending action.
pub fn describe_action(a: &PendingAction) -> String {
    match a {
        PendingAction::RetireVersions { keyring, below } => format!("retire keyring {keyring} versions below {below}"),
        PendingAction::RetireVersionsForced { keyring, below, stranded } => format!(
            "retire keyring {keyring} versions below {below}, forced: {stranded} key(s) still wrapped under them stop opening through the server (rewrap them first to keep them)"
        ),
        PendingAction::DestroyKey { id, keyring } => format!("destroy data key {} of keyring {keyring}", hex::encode(id)),
        PendingAction::DestroyKeyring { keyring } => format!("destroy keyring {keyring} and every key in it"),
        PendingAction::RemoveEscrow => "remove the escrow manifest in force".into(),
        PendingAction::InstallEscrow { ceremony_id, recovery_recipient, replaces, .. } => match replaces {
            Some(old) => format!(
                "install escrow ceremony {ceremony_id}: recovery recipient {recovery_recipient} replaces {old} (later backups open only with the new ceremony's shares)"
            ),
            None => format!("install escrow ceremony {ceremony_id}: recovery recipient {recovery_recipient} (none in force)"),
        },
        PendingAction::Grant { principal, role, keyring } => format!("grant {role} on keyring {keyring} to {principal}"),
        PendingAction::ReleaseHold { keyring, hold } => format!(
            "release the legal hold on keyring {keyring} (placed by {} on {}: {})",
            hold.by,
            format_date(hold.since),
            hold.reason
        ),
        PendingAction::LowerRetention { keyring, from_days, to_days } => {
            let days = |d: &u32| if *d == 0 { "keep until destroyed".to_owned() } else { format!("{d} days") };
            format!("lower the retention of keyring {keyring} from {} to {} (for keys issued from then on)", days(from_days), days(to_days))
        }
    }
}

impl KeyManager {
    /// The report over the keyrings `visible` to the caller.
    pub fn report(&self, auth: &Authorized, since: Option<&str>, visible: impl Fn(&str) -> bool) -> Result<Report, KeyError> {
        Self::check(auth, Action::GetReport, None)?;
        let since = parse_since(since)?;
        let since_unix = since.as_ref().map(|s| s.0).unwrap_or(i64::MIN);
        let now = self.now();
        let records: Vec<crate::model::KeyringRecord> = {
            let state = self.state();
            let mut v: Vec<_> = state.rings.values().filter(|l| visible(&l.record.name)).map(|l| l.record.clone()).collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        let names: HashMap<&str, usize> = records.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();

        // Restore tests: last per key, failures in the period.
        let mut last_test: HashMap<String, crate::model::RestoreTestRecord> = HashMap::new();
        let mut deviations: Vec<Vec<DeviationEntry>> = vec![Vec::new(); records.len()];
        for (_, t) in self.store.restore_tests()? {
            let Some(&i) = names.get(t.keyring.as_str()) else { continue };
            if !t.ok && t.time >= since_unix {
                deviations[i].push(DeviationEntry {
                    time: format_date(t.time),
                    kind: "restore-test-failed".into(),
                    principal: t.principal.clone(),
                    key_id: Some(t.key_id.clone()).filter(|k| !k.is_empty()),
                    backup_id: Some(t.backup_id.clone()).filter(|b| !b.is_empty()),
                    detail: format!("{} (host {})", t.detail, t.host),
                    audit_seq: None,
                });
            }
            if !t.key_id.is_empty() {
                last_test.insert(t.key_id.clone(), t);
            }
        }

        // Failed and refused unwraps (and KMIP Gets) from the audit trail; the KMIP Gets.
        let since_text = since.as_ref().map(|s| s.1.clone());
        let mut kmip_gets: Vec<(u64, Option<KmipGet>)> = vec![(0, None); records.len()];
        crate::audit::for_each(self.store.store(), 1, |r, _| {
            let kmip_get = r.action == "KmipGet";
            if !matches!(r.action.as_str(), "UnwrapDataKey" | "RewrapDataKey" | "KmipGet") {
                return true;
            }
            let Some(&i) = r.keyring.as_deref().and_then(|k| names.get(k)) else { return true };
            let outcome = Outcome::parse(&r.outcome);
            let in_period = since_text.as_ref().is_none_or(|s| r.time.as_str() >= s.as_str());
            if outcome.is_ok() {
                if kmip_get {
                    let g = &mut kmip_gets[i];
                    g.0 += u64::from(in_period);
                    g.1 = Some(KmipGet { time: r.time, principal: r.principal, uid: r.key_id.unwrap_or_default() });
                }
                return true;
            }
            if !in_period {
                return true;
            }
            let kind = match (kmip_get, matches!(outcome, Outcome::Denied(_))) {
                (false, true) => "unwrap-refused",
                (false, false) => "unwrap-failed",
                (true, true) => "kmip-get-refused",
                (true, false) => "kmip-get-failed",
            };
            deviations[i].push(DeviationEntry {
                time: r.time,
                kind: kind.into(),
                principal: r.principal,
                key_id: r.key_id,
                backup_id: r.backup_id,
                detail: r.outcome,
                audit_seq: Some(r.seq),
            });
            true
        })?;

        // One pass over the registry.
        let mut tallies: Vec<Tally> = records.iter().map(|_| Tally::default()).collect();
        self.store.for_each_data_key(|id, rec| {
            let Some(&i) = names.get(rec.keyring.as_str()) else { return };
            let t = &mut tallies[i];
            t.total += 1;
            if rec.created >= since_unix {
                t.issued += 1;
            }
            let destroyed = matches!(rec.state, KeyState::Destroyed { .. }) || records[i].destroyed.is_some();
            if destroyed {
                t.destroyed += 1;
                return;
            }
            t.active += 1;
            *t.per_version.entry(rec.version).or_default() += 1;
            // A KMIP object's key is an appliance's, not a backup's (the KMIP part counts it).
            if super::kmip::is_kmip_key(&rec.labels) {
                return;
            }
            if !rec.escrowed {
                t.without_escrow += 1;
            }
            let key_id = hex::encode(id);
            if !last_test.contains_key(&key_id) {
                t.untested_total += 1;
                t.untested.push((rec.created, rec.backup_id.clone(), key_id));
                if t.untested.len() > UNTESTED_CAP {
                    t.untested.pop();
                }
            }
        })?;

        // One pass over the KMIP objects.
        let mut kmip: Vec<Option<(KmipEntry, BTreeMap<String, u64>)>> = vec![None; records.len()];
        let mut failed = None;
        self.store.for_each_kmip_object(|id, o| {
            let Some(&i) = names.get(o.keyring.as_str()) else { return true };
            let state = match self.kmip_state(id, &o) {
                Ok((s, _)) => s,
                Err(e) => {
                    failed = Some(e);
                    return false;
                }
            };
            let (entry, creators) = kmip[i].get_or_insert_with(|| {
                (KmipEntry { objects: 0, by_state: BTreeMap::new(), creators: Vec::new(), gets: 0, last_get: None }, BTreeMap::new())
            });
            entry.objects += 1;
            *entry.by_state.entry(super::kmip::state::name(state).to_owned()).or_default() += 1;
            // Bounded by the grants: an object's creator is an identity that held sealer.
            *creators.entry(o.created_by.clone()).or_default() += 1;
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        let kmip: Vec<Option<KmipEntry>> = kmip
            .into_iter()
            .zip(kmip_gets)
            .map(|(k, (gets, last_get))| {
                k.map(|(mut entry, creators)| {
                    let mut c: Vec<KmipCreator> = creators.into_iter().map(|(principal, objects)| KmipCreator { principal, objects }).collect();
                    c.sort_by(|a, b| b.objects.cmp(&a.objects).then(a.principal.cmp(&b.principal)));
                    entry.creators = c;
                    entry.gets = gets;
                    entry.last_get = last_get;
                    entry
                })
            })
            .collect();

        let destructions = self.store.destructions()?;
        let mut keyrings = Vec::with_capacity(records.len());
        for (((r, tally), mut devs), kmip) in records.iter().zip(tallies).zip(deviations).zip(kmip) {
            let held = r.hold.is_some();
            let mine = |d: &&DestructionRecord| d.target.keyring() == r.name;
            let pending = destructions
                .iter()
                .filter(mine)
                .filter(|d| d.state == DestructionState::Scheduled)
                .map(|d| destruction_entry(d, held))
                .collect();
            let done = destructions
                .iter()
                .filter(mine)
                .filter(|d| matches!(d.state, DestructionState::Done { at } if at >= since_unix))
                .map(|d| destruction_entry(d, held))
                .collect();
            let mut untested: Vec<_> = tally.untested.into_vec();
            untested.sort();
            let mut tests: Vec<RestoreTestEntry> = last_test
                .values()
                .filter(|t| t.keyring == r.name)
                .map(|t| RestoreTestEntry {
                    time: format_date(t.time),
                    backup_id: t.backup_id.clone(),
                    key_id: t.key_id.clone(),
                    ok: t.ok,
                    detail: t.detail.clone(),
                    bytes: t.bytes,
                    duration_ms: t.duration_ms,
                    host: t.host.clone(),
                    principal: t.principal.clone(),
                })
                .collect();
            tests.sort_by(|a, b| b.time.cmp(&a.time).then(a.backup_id.cmp(&b.backup_id)));
            devs.sort_by(|a, b| a.time.cmp(&b.time));
            let next = next_rotation(r);
            keyrings.push(KeyringReport {
                name: r.name.clone(),
                created: format_date(r.created),
                retention_days: r.retention_days,
                rotation_period_days: r.rotation_period_days,
                keys_issued: tally.issued,
                keys_issued_total: tally.total,
                keys_active: tally.active,
                keys_destroyed: tally.destroyed,
                keys_without_escrow: tally.without_escrow,
                versions: r
                    .versions
                    .iter()
                    .map(|v| VersionEntry {
                        version: v.version,
                        created: format_date(v.created),
                        age_days: u64::try_from((now - v.created).max(0) / 86_400).unwrap_or(0),
                        state: wire_version_state(v.state).as_str().into(),
                        keys: tally.per_version.get(&v.version).copied().unwrap_or(0),
                    })
                    .collect(),
                rotations: r
                    .versions
                    .iter()
                    .filter(|v| v.version > 1 && v.created >= since_unix)
                    .map(|v| RotationEntry { version: v.version, time: format_date(v.created) })
                    .collect(),
                next_rotation: next.map(format_date),
                rotation_overdue: next.is_some_and(|n| n <= now),
                untested_backups: untested
                    .into_iter()
                    .map(|(created, backup_id, key_id)| BackupEntry { backup_id, key_id, created: format_date(created) })
                    .collect(),
                untested_backups_total: tally.untested_total,
                last_tests: tests,
                deviations: devs,
                pending_destructions: pending,
                destructions_done: done,
                legal_hold: r.hold.as_ref().map(|h| HoldEntry { by: h.by.clone(), since: format_date(h.since), reason: h.reason.clone() }),
                destroyed: r.destroyed.map(format_date),
                kmip,
            });
        }

        let escrow = self.state().escrow.clone();
        let escrow = match escrow {
            Some(e) if e.removed.is_none() => EscrowEntry {
                installed: true,
                ceremony_id: Some(e.ceremony_id),
                recovery_recipient: Some(e.recovery_recipient),
                threshold: e.threshold,
                shares: e.shares,
                custodians: e.custodians,
                installed_at: Some(format_date(e.installed)),
                previous_recipients: e.previous_recipients,
            },
            other => EscrowEntry {
                installed: false,
                ceremony_id: None,
                recovery_recipient: None,
                threshold: 0,
                shares: 0,
                custodians: Vec::new(),
                installed_at: None,
                previous_recipients: other.map(|e| e.previous_recipients).unwrap_or_default(),
            },
        };
        let pending_approvals = self
            .store
            .approvals()?
            .into_iter()
            .filter(|a| a.approved_by.is_none() && a.expires > now)
            .map(|a| ApprovalEntry {
                id: a.id,
                action: describe_action(&a.action),
                requested_by: a.requested_by,
                requested: format_date(a.requested),
                expires: format_date(a.expires),
            })
            .collect();
        Ok(Report {
            format: REPORT_FORMAT.into(),
            generated: format_date(now),
            since: since.map(|s| s.1),
            master: MasterEntry { description: self.master().describe(), generation: self.master_generation() },
            escrow,
            keyrings,
            pending_approvals,
        })
    }
}
