//! In-process tests of the core: a real redb file in a temp dir, a real software master
//! key, the audit chain, and a clock the test moves. No server, no gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use super::*;
use crate::audit::AuditChain;
use crate::auth::{Grant, Policy, Principal};
use crate::clock::Clock;
use crate::master::software::{PassphraseSource, SoftwareMasterKey};
use crate::store::redb::RedbStore;
use crate::store::{KeyRange, Row, StoreFuture, Table, Visit, WriteGroup};

const DAY: i64 = 86_400;
const T0: i64 = 1_790_000_000;

/// A clock the test moves.
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_millis(&self) -> i64 {
        self.0.load(Ordering::SeqCst) * 1000
    }
}

/// The redb store, made to fail every commit while `fail` is set.
struct Flaky {
    inner: Arc<dyn Store>,
    fail: AtomicBool,
}

#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("disk full (test)")
    }
}

impl std::error::Error for Refused {}

impl Store for Flaky {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn exclusive(&self) -> bool {
        self.inner.exclusive()
    }
    fn commit(&self, group: WriteGroup) -> StoreFuture<'_, ()> {
        if self.fail.load(Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::Backend(Box::new(Refused))) });
        }
        self.inner.commit(group)
    }
    fn commit_blocking(&self, group: WriteGroup) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Backend(Box::new(Refused)));
        }
        self.inner.commit_blocking(group)
    }
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(table, key)
    }
    fn scan(&self, table: Table, range: KeyRange<'_>, visit: &mut Visit<'_>) -> Result<(), StoreError> {
        self.inner.scan(table, range, visit)
    }
    fn last(&self, table: Table) -> Result<Option<Row>, StoreError> {
        self.inner.last(table)
    }
    fn scrub(&self) -> StoreFuture<'_, crate::store::ScrubReport> {
        self.inner.scrub()
    }
}

struct Core {
    keys: KeyManager,
    clock: Arc<TestClock>,
    store: Arc<Flaky>,
    policy: Policy,
    _dir: tempfile::TempDir,
}

impl Core {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master: Arc<dyn MasterKeyProvider> =
            Arc::new(SoftwareMasterKey::create(&dir.path().join("master.key"), &PassphraseSource::None).unwrap());
        let chain = AuditChain::new();
        let redb: Arc<dyn Store> = Arc::new(RedbStore::create(&dir.path().join("kluis.redb"), chain.clone()).unwrap());
        let store = Arc::new(Flaky { inner: redb, fail: AtomicBool::new(false) });
        KeyManager::init_store(store.clone(), master.as_ref()).unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(T0)));
        let keys = KeyManager::open(store.clone(), &chain, 1, master, clock.clone()).unwrap().with_destruction_wait_days(7);
        let all = |p: &str, roles: &[Role]| Grant { principal: p.into(), roles: roles.iter().copied().collect(), keyrings: vec!["*".into()] };
        let policy = Policy::new(vec![
            all("officer", &[Role::Officer, Role::Auditor]),
            all("officer2", &[Role::Officer]),
            all("host", &[Role::Sealer]),
            all("ops", &[Role::Restorer]),
        ]);
        Core { keys, clock, store, policy, _dir: dir }
    }

    fn auth(&self, who: &str, action: Action, keyring: Option<&str>) -> Authorized {
        self.policy.authorize(&Principal::for_test(who), action, keyring).unwrap()
    }

    fn ev(&self, who: &str, action: Action) -> AuditEvent {
        self.keys.event(who, action.name(), None, None, Outcome::ok())
    }

    fn advance_days(&self, days: i64) {
        self.clock.0.fetch_add(days * DAY, Ordering::SeqCst);
    }

    async fn create(&self, name: &str, retention_days: u32, rotation_days: u32) -> KeyringInfo {
        let a = self.auth("officer", Action::CreateKeyring, Some(name));
        self.keys.create_keyring(&a, name, retention_days, rotation_days, self.ev("officer", Action::CreateKeyring)).await.unwrap()
    }

    async fn issue(&self, keyring: &str, backup: &str) -> IssuedDataKey {
        let a = self.auth("host", Action::GenerateDataKey, Some(keyring));
        self.keys.generate_data_key(&a, keyring, backup, [], self.ev("host", Action::GenerateDataKey)).await.unwrap()
    }

    async fn unwrap(&self, k: &IssuedDataKey) -> Result<UnwrappedDataKey, KeyError> {
        let a = self.auth("ops", Action::UnwrapDataKey, Some(&k.keyring));
        self.keys.unwrap_data_key(&a, &k.key_id, &k.keyring, &k.wrapped).await
    }

    fn current_version(&self, keyring: &str) -> u32 {
        let a = self.auth("officer", Action::GetKeyring, Some(keyring));
        self.keys.get_keyring(&a, keyring).unwrap().current_version
    }

    async fn approve(&self, who: &str, id: u64) -> Result<ApprovalRecord, KeyError> {
        let a = self.auth(who, Action::Approve, None);
        self.keys.approve(&a, id, self.ev(who, Action::Approve)).await
    }
}

#[tokio::test]
async fn rotation_is_done_when_its_period_is_reached_and_not_before() {
    let c = Core::new();
    c.create("ehr", 0, 30).await;
    let first = c.issue("ehr", "b1").await;
    assert_eq!(first.version, 1);
    c.advance_days(29);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 0, "nothing is due on day 29");
    assert_eq!(c.current_version("ehr"), 1);
    c.advance_days(1);
    // The next issuance meets the due rotation and rotates first.
    let second = c.issue("ehr", "b2").await;
    assert_eq!(second.version, 2);
    assert_eq!(c.current_version("ehr"), 2);
    // Keys of the old version keep unwrapping.
    assert_eq!(c.unwrap(&first).await.unwrap().data_key.expose(), first.data_key.expose());
    c.advance_days(30);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1, "the sweep rotates too");
    assert_eq!(c.current_version("ehr"), 3);
}

#[tokio::test]
async fn the_expiry_sweep_destroys_keys_at_the_end_of_their_retention() {
    let c = Core::new();
    c.create("short", 10, 0).await;
    let k = c.issue("short", "b1").await;
    c.advance_days(9);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 0);
    assert!(c.unwrap(&k).await.is_ok());
    c.advance_days(1);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    match c.unwrap(&k).await {
        Err(KeyError::Destroyed { key_id, .. }) => assert_eq!(key_id, k.key_id),
        other => panic!("expected destroyed, got {:?}", other.err()),
    }
    let a = c.auth("officer", Action::ListDestructions, None);
    let d = c.keys.destructions(&a, |_| true).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].reason, crate::model::DestructionReason::Expiry);
}

#[tokio::test]
async fn a_destruction_waits_its_period_and_can_be_cancelled() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let k = c.issue("ehr", "b1").await;
    let a = c.auth("officer", Action::DestroyKey, Some("ehr"));
    let DestroyOutcome::Pending(req) = c.keys.request_destroy_key(&a, &k.key_id, c.ev("officer", Action::DestroyKey)).await.unwrap() else {
        panic!("a key before its expiry needs a second officer");
    };
    c.approve("officer2", req.id).await.unwrap();
    c.advance_days(6);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 0, "the waiting period is 7 days");
    assert!(c.unwrap(&k).await.is_ok());
    let a = c.auth("officer", Action::ListDestructions, None);
    let d = c.keys.destructions(&a, |_| true).unwrap().remove(0);
    let a = c.auth("officer", Action::CancelDestruction, Some("ehr"));
    c.keys.cancel_destruction(&a, d.id, c.ev("officer", Action::CancelDestruction)).await.unwrap();
    c.advance_days(30);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 0, "a cancelled destruction is not carried out");
    assert!(c.unwrap(&k).await.is_ok());
}

#[tokio::test]
async fn a_legal_hold_blocks_destruction_until_released() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let k = c.issue("ehr", "b1").await;
    let a = c.auth("officer", Action::DestroyKey, Some("ehr"));
    let DestroyOutcome::Pending(req) = c.keys.request_destroy_key(&a, &k.key_id, c.ev("officer", Action::DestroyKey)).await.unwrap() else {
        panic!("pending expected");
    };
    c.approve("officer2", req.id).await.unwrap();
    let hold = c.auth("officer", Action::SetLegalHold, Some("ehr"));
    c.keys.set_legal_hold(&hold, "ehr", true, "litigation 2026-17", c.ev("officer", Action::SetLegalHold)).await.unwrap();
    c.advance_days(8);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 0, "held");
    assert!(c.unwrap(&k).await.is_ok(), "a held key still unwraps after its due date");
    // Releasing is a request: the hold stays until a second officer approves.
    let Requested::Pending { approval, .. } =
        c.keys.set_legal_hold(&hold, "ehr", false, "", c.ev("officer", Action::SetLegalHold)).await.unwrap()
    else {
        panic!("a release needs a second officer");
    };
    assert_eq!(c.keys.maintain(None).await.unwrap(), 0, "still held while the release waits");
    assert!(matches!(c.approve("officer", approval.id).await, Err(KeyError::SelfApproval { .. })));
    c.approve("officer2", approval.id).await.unwrap();
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    assert!(matches!(c.unwrap(&k).await, Err(KeyError::Destroyed { .. })));
}

#[tokio::test]
async fn dual_control_refuses_the_same_officer_and_expired_requests() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let rot = c.auth("officer", Action::RotateKeyring, Some("ehr"));
    c.keys.rotate_keyring(&rot, "ehr", c.ev("officer", Action::RotateKeyring)).await.unwrap();
    let a = c.auth("officer", Action::RetireVersions, Some("ehr"));
    let req = c.keys.request_retire(&a, "ehr", 2, false, c.ev("officer", Action::RetireVersions)).await.unwrap();
    assert!(matches!(c.approve("officer", req.id).await, Err(KeyError::SelfApproval { .. })));
    let late = c.keys.request_retire(&a, "ehr", 2, false, c.ev("officer", Action::RetireVersions)).await.unwrap();
    c.advance_days(2);
    assert!(matches!(c.approve("officer2", late.id).await, Err(KeyError::ApprovalExpired { .. })));
    // The first one expired too; a fresh one is approved by a second officer.
    let fresh = c.keys.request_retire(&a, "ehr", 2, false, c.ev("officer", Action::RetireVersions)).await.unwrap();
    c.approve("officer2", fresh.id).await.unwrap();
    assert!(matches!(c.approve("officer2", fresh.id).await, Err(KeyError::ApprovalDone { .. })));
    let info = c.keys.get_keyring(&c.auth("officer", Action::GetKeyring, Some("ehr")), "ehr").unwrap();
    assert_eq!(info.versions.iter().map(|v| v.2).collect::<Vec<_>>(), [VersionState::Retired, VersionState::Active]);
}

#[tokio::test]
async fn master_rotation_rewraps_keyrings_and_keys_keep_unwrapping() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let k = c.issue("ehr", "b1").await;
    let a = c.auth("officer", Action::RotateMaster, None);
    let r = c.keys.rotate_master(&a, c.ev("officer", Action::RotateMaster)).await.unwrap();
    assert_eq!((r.generation, r.keyrings, r.versions), (2, 1, 1));
    assert_eq!(c.keys.master_generation(), 2);
    assert_eq!(c.unwrap(&k).await.unwrap().data_key.expose(), k.data_key.expose());
    let stored = c.keys.store.keyrings().unwrap().remove(0);
    let raw = c.keys.master().unwrap(&krk_aad("ehr", 1), &stored.versions[0].wrapped_key);
    assert!(raw.is_ok(), "the stored keyring key opens with generation 2");
}

#[tokio::test]
async fn a_failed_store_write_leaves_memory_as_it_was() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let rot = c.auth("officer", Action::RotateKeyring, Some("ehr"));
    c.store.fail.store(true, Ordering::SeqCst);
    assert!(matches!(c.keys.rotate_keyring(&rot, "ehr", c.ev("officer", Action::RotateKeyring)).await, Err(KeyError::Store(_))));
    let a = c.auth("officer", Action::RotateMaster, None);
    assert!(matches!(c.keys.rotate_master(&a, c.ev("officer", Action::RotateMaster)).await, Err(KeyError::Store(_))));
    let hold = c.auth("officer", Action::SetLegalHold, Some("ehr"));
    assert!(c.keys.set_legal_hold(&hold, "ehr", true, "x", c.ev("officer", Action::SetLegalHold)).await.is_err());
    assert_eq!(c.current_version("ehr"), 1, "memory did not move ahead of the store");
    assert_eq!(c.keys.master_generation(), 1);
    assert!(c.keys.get_keyring(&c.auth("officer", Action::GetKeyring, Some("ehr")), "ehr").unwrap().hold.is_none());
    let issue = c.auth("host", Action::GenerateDataKey, Some("ehr"));
    assert!(c.keys.generate_data_key(&issue, "ehr", "b", [], c.ev("host", Action::GenerateDataKey)).await.is_err());
    c.store.fail.store(false, Ordering::SeqCst);
    c.keys.rotate_keyring(&rot, "ehr", c.ev("officer", Action::RotateKeyring)).await.unwrap();
    assert_eq!(c.current_version("ehr"), 2, "the failed rotation left no trace");
    assert_eq!(c.issue("ehr", "b").await.version, 2);
}

#[tokio::test]
async fn a_poisoned_audit_signer_fails_the_write_closed() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    // The audit chain's signing-key lock, poisoned by a thread that panicked holding it.
    let chain = AuditChain::new();
    let poison = chain.clone();
    let _ = std::thread::spawn(move || {
        let _g = poison.signer_lock_for_test().write();
        panic!("poison the lock");
    })
    .join();
    use crate::store::Chain;
    let ev = c.ev("host", Action::GenerateDataKey).encode().unwrap();
    assert!(chain.link(256, &chain.genesis(), &ev, Some(&chain.genesis())).is_err(), "a checkpoint that cannot be signed fails the commit");
}

/// The issue's finding: retention set to 1 day by one officer destroyed keys the next
/// day. Lowering is now a request; keys issued meanwhile keep the retention in force.
#[tokio::test]
async fn lowering_retention_waits_for_a_second_officer_and_raising_does_not() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let pol = c.auth("officer", Action::SetKeyringPolicy, Some("ehr"));
    let ev = || c.ev("officer", Action::SetKeyringPolicy);
    let Requested::Pending { approval, current } = c.keys.set_keyring_policy(&pol, "ehr", Some(1), None, ev()).await.unwrap() else {
        panic!("lowering needs a second officer");
    };
    assert_eq!(current.retention_days, 0, "unchanged while pending");
    // Lowering together with a rotation change is refused, nothing half-applied.
    assert!(matches!(
        c.keys.set_keyring_policy(&pol, "ehr", Some(1), Some(30), ev()).await,
        Err(KeyError::InvalidArgument { field: "rotation_period_days", .. })
    ));
    assert!(matches!(c.approve("officer", approval.id).await, Err(KeyError::SelfApproval { .. })));
    let early = c.issue("ehr", "before-approval").await;
    c.advance_days(2);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 0, "nothing expires under the retention in force");
    assert!(c.unwrap(&early).await.is_ok());
    // The request expired unapproved: it never applies.
    assert!(matches!(c.approve("officer2", approval.id).await, Err(KeyError::ApprovalExpired { .. })));
    let Requested::Pending { approval, .. } = c.keys.set_keyring_policy(&pol, "ehr", Some(1), None, ev()).await.unwrap() else {
        panic!("pending expected");
    };
    c.approve("officer2", approval.id).await.unwrap();
    assert_eq!(c.keys.get_keyring(&c.auth("officer", Action::GetKeyring, Some("ehr")), "ehr").unwrap().retention_days, 1);
    let late = c.issue("ehr", "after-approval").await;
    c.advance_days(2);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1, "the approved retention applies to keys issued after it");
    assert!(matches!(c.unwrap(&late).await, Err(KeyError::Destroyed { .. })));
    assert!(c.unwrap(&early).await.is_ok());
    // Raising (1 -> 30, then 30 -> keep forever) and the rotation period apply at once.
    for (ret, rot) in [(Some(30), None), (Some(0), Some(90)), (None, Some(7))] {
        assert!(matches!(c.keys.set_keyring_policy(&pol, "ehr", ret, rot, ev()).await.unwrap(), Requested::Done(_)));
    }
    // A request made against a retention that has changed since is not carried out.
    let Requested::Pending { approval: stale, .. } = c.keys.set_keyring_policy(&pol, "ehr", Some(10), None, ev()).await.unwrap() else {
        panic!("pending expected");
    };
    let Requested::Pending { approval: first, .. } = c.keys.set_keyring_policy(&pol, "ehr", Some(20), None, ev()).await.unwrap() else {
        panic!("pending expected");
    };
    c.approve("officer2", first.id).await.unwrap();
    assert!(matches!(c.approve("officer2", stale.id).await, Err(KeyError::ApprovalOutdated { .. })));
    assert_eq!(c.keys.get_keyring(&c.auth("officer", Action::GetKeyring, Some("ehr")), "ehr").unwrap().retention_days, 20);
}

#[tokio::test]
async fn a_release_approved_after_a_new_hold_does_not_release_it() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let hold = c.auth("officer", Action::SetLegalHold, Some("ehr"));
    let ev = || c.ev("officer", Action::SetLegalHold);
    c.keys.set_legal_hold(&hold, "ehr", true, "case 1", ev()).await.unwrap();
    let Requested::Pending { approval, .. } = c.keys.set_legal_hold(&hold, "ehr", false, "", ev()).await.unwrap() else {
        panic!("pending expected");
    };
    // Replaced in the same second by the same officer: still another hold.
    c.keys.set_legal_hold(&hold, "ehr", true, "case 2", ev()).await.unwrap();
    assert!(matches!(c.approve("officer2", approval.id).await, Err(KeyError::ApprovalOutdated { .. })));
    let info = c.keys.get_keyring(&c.auth("officer", Action::GetKeyring, Some("ehr")), "ehr").unwrap();
    assert_eq!(info.hold.map(|h| h.reason), Some("case 2".to_owned()));
}

#[tokio::test]
async fn a_destroyed_key_stays_unopenable_when_an_attacker_rewrites_its_tombstone() {
    let c = Core::new();
    c.create("short", 10, 0).await;
    let k = c.issue("short", "b1").await;
    let other = c.issue("short", "b2").await;
    assert_eq!(k.wrapped[0], WRAPPED_DK_V2, "new keys are format 2");
    c.advance_days(10);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 2);
    assert!(c.keys.scrub_if_due(None).await.unwrap().is_some(), "the destruction made a scrub due");
    assert!(!c.keys.store.scrub_pending().unwrap());
    let id = parse_key_id(&k.key_id).unwrap();
    assert!(c.keys.store.key_secret(&id).unwrap().is_none());
    // Someone with write access to the store (and the master key) puts the record back
    // to active: the tombstone is gone, but the secret is too.
    let mut rec = c.keys.store.data_key(&id).unwrap().unwrap();
    rec.state = KeyState::Active;
    rec.expires = None;
    c.keys.store.write(WriteOp::PutDataKey { id, record: rec }).await.unwrap();
    match c.unwrap(&k).await {
        Err(KeyError::KeyMaterialErased { key_id }) => assert_eq!(key_id, k.key_id),
        other => panic!("expected the key material to be gone, got {:?}", other.err()),
    }
    let a = c.auth("ops", Action::RewrapDataKey, Some("short"));
    let r = c.keys.rewrap_data_key(&a, &k.key_id, "short", &k.wrapped, c.ev("ops", Action::RewrapDataKey)).await;
    assert!(matches!(r, Err(KeyError::KeyMaterialErased { .. })), "rewrap cannot revive it either");
    // The other key was destroyed the same way; nothing else was touched.
    assert!(matches!(c.unwrap(&other).await, Err(KeyError::Destroyed { .. })));
}

#[tokio::test]
async fn a_format_2_data_key_needs_its_secret_and_its_format_byte() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let k = c.issue("ehr", "b1").await;
    assert_eq!(c.unwrap(&k).await.unwrap().data_key.expose(), k.data_key.expose());
    // Relabelled as format 1, the blob does not authenticate (the AAD binds the format):
    // the base key is never handed out as if it were the data key.
    let mut relabelled = IssuedDataKey { wrapped: k.wrapped.clone(), data_key: Key256::from_slice(k.data_key.expose()).unwrap(), key_id: k.key_id.clone(), keyring: k.keyring.clone(), version: k.version, recovery_recipient: None };
    relabelled.wrapped[0] = WRAPPED_DK_V1;
    assert!(matches!(c.unwrap(&relabelled).await, Err(KeyError::UnwrapFailed { .. })));
    // The derivation binds the secret and the key id.
    let (base, s1, s2) = (Key256::from_slice(&[1; 32]).unwrap(), Key256::from_slice(&[2; 32]).unwrap(), Key256::from_slice(&[3; 32]).unwrap());
    let d = derive_data_key(&base, &s1, &[0; 16]).unwrap();
    assert_ne!(d.expose(), base.expose());
    assert_ne!(d.expose(), derive_data_key(&base, &s2, &[0; 16]).unwrap().expose());
    assert_ne!(d.expose(), derive_data_key(&base, &s1, &[1; 16]).unwrap().expose());
    // A rewrap keeps format 2 and the same data key.
    c.keys.rotate_keyring(&c.auth("officer", Action::RotateKeyring, Some("ehr")), "ehr", c.ev("officer", Action::RotateKeyring)).await.unwrap();
    let a = c.auth("ops", Action::RewrapDataKey, Some("ehr"));
    let RewrapOutcome { wrapped: blob, version: v, .. } = c.keys.rewrap_data_key(&a, &k.key_id, "ehr", &k.wrapped, c.ev("ops", Action::RewrapDataKey)).await.unwrap();
    assert_eq!((blob[0], v), (WRAPPED_DK_V2, 2));
    relabelled.wrapped = blob;
    assert_eq!(c.unwrap(&relabelled).await.unwrap().data_key.expose(), k.data_key.expose());
}

#[tokio::test]
async fn a_format_1_key_from_before_still_unwraps_and_rewraps_as_format_1() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    // A key issued by an older server: a registry record without a secret, and a blob
    // that wraps the data key itself.
    let id = [9u8; 16];
    let (version, krk) = c.keys.ring("ehr").unwrap().current().unwrap();
    let rec = DataKeyRecord {
        keyring: "ehr".into(),
        version,
        backup_id: "old".into(),
        labels: vec![],
        created: T0,
        expires: None,
        state: KeyState::Active,
        issued_to: "host".into(),
        escrowed: false,
    };
    c.keys.store.write(WriteOp::IssueDataKey { id, record: rec, secret: None }).await.unwrap();
    let data_key = Key256::from_slice(&[7; 32]).unwrap();
    let wrapped = c.keys.wrap_data_key(WRAPPED_DK_V1, &krk, &id, "ehr", version, "old", &[], &data_key).unwrap();
    let old = IssuedDataKey { key_id: hex::encode(id), data_key, wrapped, keyring: "ehr".into(), version, recovery_recipient: None };
    assert_eq!(c.unwrap(&old).await.unwrap().data_key.expose(), &[7; 32]);
    c.keys.rotate_keyring(&c.auth("officer", Action::RotateKeyring, Some("ehr")), "ehr", c.ev("officer", Action::RotateKeyring)).await.unwrap();
    let a = c.auth("ops", Action::RewrapDataKey, Some("ehr"));
    let RewrapOutcome { wrapped: blob, .. } = c.keys.rewrap_data_key(&a, &old.key_id, "ehr", &old.wrapped, c.ev("ops", Action::RewrapDataKey)).await.unwrap();
    assert_eq!(blob[0], WRAPPED_DK_V1, "its data key is fixed by the file's payload");
    let rewrapped = IssuedDataKey { wrapped: blob, ..old };
    assert_eq!(c.unwrap(&rewrapped).await.unwrap().data_key.expose(), &[7; 32]);
}

#[tokio::test]
async fn the_store_is_scrubbed_at_most_once_per_interval_and_a_due_scrub_is_not_forgotten() {
    let c = Core::new();
    c.create("short", 1, 0).await;
    let _ = c.issue("short", "b1").await;
    assert!(c.keys.scrub_if_due(None).await.unwrap().is_none(), "nothing was erased");
    c.clock.0.fetch_add(DAY / 2, Ordering::SeqCst);
    let _ = c.issue("short", "b2").await;
    c.clock.0.fetch_add(DAY / 2, Ordering::SeqCst);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    assert!(c.keys.scrub_if_due(None).await.unwrap().is_some(), "the first erasure is scrubbed at once");
    assert!(!c.keys.store.scrub_pending().unwrap());
    c.clock.0.fetch_add(DAY / 2, Ordering::SeqCst);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    assert!(c.keys.scrub_if_due(None).await.unwrap().is_none());
    assert!(c.keys.store.scrub_pending().unwrap(), "half a day after the last scrub: pending");
    c.clock.0.fetch_add(DAY / 2 - 1, Ordering::SeqCst);
    assert!(c.keys.scrub_if_due(None).await.unwrap().is_none(), "a second short of a day: still pending");
    c.clock.0.fetch_add(1, Ordering::SeqCst);
    assert!(c.keys.scrub_if_due(None).await.unwrap().is_some(), "a day after the last scrub it runs");
    assert!(!c.keys.store.scrub_pending().unwrap());
}

#[tokio::test]
async fn retiring_is_refused_while_keys_are_wrapped_under_the_versions_or_the_keyring_is_held() {
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let k = c.issue("ehr", "b1").await;
    let _destroyed_later = c.issue("ehr", "b0").await;
    let rot = c.auth("officer", Action::RotateKeyring, Some("ehr"));
    c.keys.rotate_keyring(&rot, "ehr", c.ev("officer", Action::RotateKeyring)).await.unwrap();
    let a = c.auth("officer", Action::RetireVersions, Some("ehr"));
    match c.keys.request_retire(&a, "ehr", 2, false, c.ev("officer", Action::RetireVersions)).await {
        Err(KeyError::RetireStrands { count, below, .. }) => assert_eq!((count, below), (2, 2)),
        other => panic!("expected a refusal naming the stranded keys, got {:?}", other.map(|r| r.action)),
    }
    // Rewrapped (the registry records the new version), a key no longer counts.
    let rw = c.auth("ops", Action::RewrapDataKey, Some("ehr"));
    let RewrapOutcome { wrapped: blob, .. } = c.keys.rewrap_data_key(&rw, &k.key_id, "ehr", &k.wrapped, c.ev("ops", Action::RewrapDataKey)).await.unwrap();
    match c.keys.request_retire(&a, "ehr", 2, false, c.ev("officer", Action::RetireVersions)).await {
        Err(KeyError::RetireStrands { count, .. }) => assert_eq!(count, 1, "one key left under version 1"),
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.action)),
    }
    // Forced: the request carries the count; approved, it is carried out.
    let forced = c.keys.request_retire(&a, "ehr", 2, true, c.ev("officer", Action::RetireVersions)).await.unwrap();
    assert_eq!(forced.action, PendingAction::RetireVersionsForced { keyring: "ehr".into(), below: 2, stranded: 1 });
    // A legal hold placed meanwhile blocks the approval, and any new request.
    let hold = c.auth("officer", Action::SetLegalHold, Some("ehr"));
    c.keys.set_legal_hold(&hold, "ehr", true, "litigation 2026-17", c.ev("officer", Action::SetLegalHold)).await.unwrap();
    assert!(matches!(c.approve("officer2", forced.id).await, Err(KeyError::LegalHold { .. })));
    assert!(matches!(
        c.keys.request_retire(&a, "ehr", 2, true, c.ev("officer", Action::RetireVersions)).await,
        Err(KeyError::LegalHold { .. })
    ));
    let release = match c.keys.set_legal_hold(&hold, "ehr", false, "", c.ev("officer", Action::SetLegalHold)).await.unwrap() {
        Requested::Pending { approval, .. } => approval,
        Requested::Done(_) => panic!("releasing a hold needs a second officer"),
    };
    c.approve("officer2", release.id).await.unwrap();
    c.approve("officer2", forced.id).await.unwrap();
    let rewrapped = IssuedDataKey { wrapped: blob, ..k };
    assert!(c.unwrap(&rewrapped).await.is_ok(), "the rewrapped key opens under version 2");
    assert!(matches!(c.unwrap(&_destroyed_later).await, Err(KeyError::VersionRetired { version: 1, .. })));
}

#[tokio::test]
async fn the_start_check_reads_the_checkpoints_page_by_page_and_misses_none() {
    use crate::audit::integrity::{IntegrityError, check_at_start};
    use crate::store::id_key;
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    // Five checkpoints (every 256 entries): three pages of two in unit tests.
    for i in 0..5 * 256 {
        c.issue("ehr", &format!("b{i}")).await;
    }
    let public = c.keys.audit_public_key(&c.auth("officer", Action::GetAuditPublicKey, None)).unwrap();
    let checked = check_at_start(c.store.as_ref(), &public).unwrap().unwrap();
    assert!(checked.head_seq > 5 * 256, "{}", checked.head_seq);
    assert_eq!(checked.checkpoint_hashes.last().unwrap().0, 5 * 256);
    // The store as an attacker left it: a checkpoint gone from the middle of the second page
    // (the store itself refuses to delete one).
    let cut = Without { inner: c.store.clone(), table: Table::Checkpoints, key: id_key(3 * 256).to_vec() };
    match check_at_start(&cut, &public).unwrap() {
        Err(IntegrityError::MissingCheckpoint { seq }) => assert_eq!(seq, 3 * 256),
        other => panic!("expected the missing checkpoint 768, got {:?}", other.map(|c| c.head_seq)),
    }
}

/// A store with one row gone, as if removed behind the server's back.
struct Without {
    inner: Arc<Flaky>,
    table: Table,
    key: Vec<u8>,
}

impl Store for Without {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn exclusive(&self) -> bool {
        self.inner.exclusive()
    }
    fn commit(&self, group: WriteGroup) -> StoreFuture<'_, ()> {
        self.inner.commit(group)
    }
    fn commit_blocking(&self, group: WriteGroup) -> Result<(), StoreError> {
        self.inner.commit_blocking(group)
    }
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if table == self.table && key == self.key.as_slice() { Ok(None) } else { self.inner.get(table, key) }
    }
    fn scan(&self, table: Table, range: KeyRange<'_>, visit: &mut Visit<'_>) -> Result<(), StoreError> {
        self.inner.scan(table, range, &mut |k, v| if table == self.table && k == self.key.as_slice() { Ok(true) } else { visit(k, v) })
    }
    fn last(&self, table: Table) -> Result<Option<Row>, StoreError> {
        self.inner.last(table)
    }
    fn scrub(&self) -> StoreFuture<'_, crate::store::ScrubReport> {
        self.inner.scrub()
    }
}

/// Scheduled work done under a maintenance lease that another process has since taken
/// over (a restart on the same store here: the second lease takes it at once) writes
/// nothing: not the expiry sweep, not a due rotation, not a due destruction, not the
/// scrub mark; the work is left to the holder of the newer fence, which does all of it.
#[tokio::test]
async fn scheduled_work_under_a_lease_taken_over_since_writes_nothing() {
    let c = Core::new();
    c.create("short", 1, 0).await;
    c.create("rotating", 0, 30).await;
    c.create("ehr", 0, 0).await;
    let expiring = c.issue("short", "b1").await;
    let doomed = c.issue("ehr", "b2").await;
    let a = c.auth("officer", Action::DestroyKey, Some("ehr"));
    let DestroyOutcome::Pending(req) = c.keys.request_destroy_key(&a, &doomed.key_id, c.ev("officer", Action::DestroyKey)).await.unwrap() else {
        panic!("a key before its expiry needs a second officer");
    };
    c.approve("officer2", req.id).await.unwrap();
    let now = std::time::Instant::now();
    let old = lease::Lease::new("old".into(), std::time::Duration::from_secs(10));
    c.keys.tick_lease(&old, now).await.unwrap();
    let stale = old.fence(now).unwrap();
    let new = lease::Lease::new("new".into(), std::time::Duration::from_secs(10));
    assert!(matches!(c.keys.tick_lease(&new, now).await.unwrap(), lease::Tick::Took { token: 2, .. }));
    c.advance_days(31);
    let audit_before = c.keys.store.store().last(Table::Audit).unwrap().map(|r| r.0);
    let err = c.keys.maintain(Some(stale)).await.unwrap_err();
    assert!(matches!(err, KeyError::Store(StoreError::Conflict { .. })), "{err}");
    assert_eq!(c.keys.store.store().last(Table::Audit).unwrap().map(|r| r.0), audit_before, "no audit entry written");
    assert_eq!(c.current_version("rotating"), 1, "no rotation");
    let id = |k: &IssuedDataKey| parse_key_id(&k.key_id).unwrap();
    for k in [&expiring, &doomed] {
        assert!(matches!(c.keys.store.data_key(&id(k)).unwrap().unwrap().state, KeyState::Active), "{} still active", k.keyring);
    }
    assert_eq!(c.keys.maintain(Some(new.fence(now).unwrap())).await.unwrap(), 3, "rotation, destruction, expiry: all done by the new holder");
    assert_eq!(c.current_version("rotating"), 2);
    for k in [&expiring, &doomed] {
        assert!(matches!(c.keys.store.data_key(&id(k)).unwrap().unwrap().state, KeyState::Destroyed { .. }), "{} destroyed", k.keyring);
    }
    // The scrub mark, too: the stale holder's scrub leaves it pending, the holder's clears it.
    assert!(c.keys.scrub_if_due(Some(stale)).await.is_err());
    assert!(c.keys.store.scrub_pending().unwrap());
    assert!(c.keys.scrub_if_due(Some(new.fence(now).unwrap())).await.unwrap().is_some());
}

/// A KMIP object is a data key of its keyring: its material is kept only sealed (never in the
/// clear in its row), a sealer's proof does not open it, and the keyring's destruction of the
/// data key (requested, approved, waited out) erases it.
#[tokio::test]
async fn a_kmip_object_is_a_data_key_and_destroying_that_key_erases_its_material() {
    use super::kmip::{Material, NewObject};
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let sealer = c.auth("host", Action::GenerateDataKey, Some("ehr"));
    let new = NewObject { object_type: 2, algorithm: Some(3), length: Some(256), names: vec!["k1".into()], key_format: 1, ..NewObject::default() };
    let material = [0x5Au8; 32];
    let uid = c.keys.kmip_create(&sealer, "ehr", new, Material::new(Zeroizing::new(material.to_vec())), c.ev("host", Action::GenerateDataKey)).await.unwrap();
    assert!(matches!(c.keys.kmip_get(&sealer, &uid).await, Err(KeyError::NotCovered)));
    let restorer = c.auth("ops", Action::UnwrapDataKey, Some("ehr"));
    let (object, got) = c.keys.kmip_get(&restorer, &uid).await.unwrap();
    assert_eq!(got.expose(), &material);
    assert_eq!(object.names, vec!["k1".to_owned()]);
    let id: [u8; 16] = hex::decode(&uid).unwrap().try_into().unwrap();
    let row = c.store.get(Table::KmipObjects, &id).unwrap().unwrap();
    assert!(!row.windows(32).any(|w| w == material), "the row holds the material in the clear");
    // The registry has it as a data key of the keyring.
    assert_eq!(c.keys.store.data_key(&id).unwrap().unwrap().keyring, "ehr");
    let a = c.auth("officer", Action::DestroyKey, Some("ehr"));
    let DestroyOutcome::Pending(req) = c.keys.request_destroy_key(&a, &uid, c.ev("officer", Action::DestroyKey)).await.unwrap() else {
        panic!("a key before its expiry needs a second officer");
    };
    c.approve("officer2", req.id).await.unwrap();
    assert!(c.keys.kmip_get(&restorer, &uid).await.is_ok(), "served until the destruction is carried out");
    c.advance_days(8);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    assert!(c.keys.store.key_secret(&id).unwrap().is_none(), "the secret is erased");
    let gone = c.keys.kmip_get(&restorer, &uid).await;
    assert!(matches!(gone, Err(KeyError::Destroyed { .. }) | Err(KeyError::KeyMaterialErased { .. })), "{:?}", gone.err());
}

/// A KMIP Destroy is Destroyed to clients at once and a scheduled destruction of the data
/// key, which the scheduled work carries out after the waiting period (the secret erased);
/// a backup's data key cannot wear the labels that mark a KMIP object's.
#[tokio::test]
async fn a_kmip_destroy_is_a_scheduled_destruction_of_the_data_key() {
    use super::kmip::{Material, NewObject, state};
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let sealer = c.auth("host", Action::GenerateDataKey, Some("ehr"));
    let new = NewObject { object_type: 2, algorithm: Some(3), length: Some(256), key_format: 1, ..NewObject::default() };
    let uid = c.keys.kmip_create(&sealer, "ehr", new, Material::new(Zeroizing::new(vec![7u8; 32])), c.ev("host", Action::GenerateDataKey)).await.unwrap();
    let id: [u8; 16] = hex::decode(&uid).unwrap().try_into().unwrap();
    let other = c.auth("host", Action::GenerateDataKey, Some("other"));
    assert!(matches!(c.keys.kmip_destroy(&other, &uid, c.ev("host", Action::GenerateDataKey)).await, Err(KeyError::NotCovered)));
    let d = c.keys.kmip_destroy(&sealer, &uid, c.ev("host", Action::GenerateDataKey)).await.unwrap();
    assert_eq!(d.requested_by, "host");
    let (_, o) = c.keys.kmip_object(&uid).unwrap();
    assert_eq!(c.keys.kmip_state(&id, &o).unwrap().0, state::DESTROYED);
    assert!(c.keys.store.key_secret(&id).unwrap().is_some(), "not erased inside the waiting period");
    c.advance_days(8);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    assert!(c.keys.store.key_secret(&id).unwrap().is_none(), "the secret is erased");
    let (_, erased) = c.keys.kmip_object(&uid).unwrap();
    assert_eq!((erased.state, erased.destroy_date), (state::DESTROYED, o.destroy_date), "the erasure is written into the row, dated when asked");
    let labelled = c
        .keys
        .generate_data_key(&sealer, "ehr", "b1", [("kmip.object_type".to_owned(), "2".to_owned())], c.ev("host", Action::GenerateDataKey))
        .await;
    assert!(matches!(labelled, Err(KeyError::InvalidArgument { field: "labels", .. })), "{:?}", labelled.err());
}

/// Create Key Pair on the core: two data keys and two rows in one write, linked to each
/// other, neither row holding its material in the clear; a sealer's proof opens the public
/// key but not the private one; destroying the public key's data key erases it.
#[tokio::test]
async fn a_kmip_key_pair_is_two_linked_data_keys_and_a_sealer_reads_only_the_public_one() {
    use super::kmip::pair::{self, Made, link_type};
    use super::kmip::{NewObject, object_type};
    let c = Core::new();
    c.create("ehr", 0, 0).await;
    let sealer = c.auth("host", Action::GenerateDataKey, Some("ehr"));
    let (private_key, public_key) = pair::generate_rsa(2048).unwrap();
    let private_der = private_key.expose().to_vec();
    let made = |kind, material| Made {
        new: NewObject { object_type: kind, algorithm: Some(pair::RSA), length: Some(2048), key_format: pair::key_format::PKCS_1, ..NewObject::default() },
        material,
        secret_data_type: None,
        audit: c.ev("host", Action::GenerateDataKey),
    };
    let private = made(object_type::PRIVATE_KEY, private_key);
    let public = made(object_type::PUBLIC_KEY, super::kmip::Material::new(Zeroizing::new(public_key.clone())));
    let (private_uid, public_uid) = c.keys.kmip_create_pair(&sealer, "ehr", private, public).await.unwrap();
    let (_, private_row) = c.keys.kmip_object(&private_uid).unwrap();
    let (_, public_row) = c.keys.kmip_object(&public_uid).unwrap();
    assert_eq!(private_row.links, vec![(link_type::PUBLIC_KEY_LINK, public_uid.clone())]);
    assert_eq!(public_row.links, vec![(link_type::PRIVATE_KEY_LINK, private_uid.clone())]);
    for (uid, secret) in [(&private_uid, &private_der), (&public_uid, &public_key)] {
        let id: [u8; 16] = hex::decode(uid).unwrap().try_into().unwrap();
        let row = c.store.get(Table::KmipObjects, &id).unwrap().unwrap();
        let head = &secret[..64];
        assert!(!row.windows(64).any(|w| w == head), "a row holds its key in the clear");
        assert_eq!(c.keys.store.data_key(&id).unwrap().unwrap().keyring, "ehr");
    }
    assert_eq!(c.keys.kmip_get_public(&sealer, &public_uid).await.unwrap().1, public_key);
    assert!(matches!(c.keys.kmip_get(&sealer, &private_uid).await, Err(KeyError::NotCovered)));
    assert!(c.keys.kmip_get_public(&sealer, &private_uid).await.is_err(), "the private key is no public key");
    let restorer = c.auth("ops", Action::UnwrapDataKey, Some("ehr"));
    assert_eq!(c.keys.kmip_get(&restorer, &private_uid).await.unwrap().1.expose(), &private_der[..]);
    let a = c.auth("officer", Action::DestroyKey, Some("ehr"));
    let DestroyOutcome::Pending(req) = c.keys.request_destroy_key(&a, &public_uid, c.ev("officer", Action::DestroyKey)).await.unwrap() else {
        panic!("a key before its expiry needs a second officer");
    };
    c.approve("officer2", req.id).await.unwrap();
    c.advance_days(8);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    assert!(c.keys.kmip_get_public(&sealer, &public_uid).await.is_err(), "the public key outlived its data key");
    assert!(c.keys.kmip_get(&restorer, &private_uid).await.is_ok(), "the private key is a data key of its own");
}

/// The escrow bundle of KMIP objects (`kmip_escrow_dir`): a Create is escrowed before it
/// commits and its files removed when the commit fails; no recipient refuses it; a state
/// change rewrites the state file; the expiry of the data key deletes the key file (and the
/// sweep deletes one an interrupted erase left); an import into another server keeps the
/// uid and the material and refuses a second time.
#[tokio::test]
async fn kmip_objects_are_escrowed_before_they_commit_and_erased_with_their_data_key() {
    use super::kmip::{Material, NewObject, state};
    use kluis_escrow::kmip_bundle::{KeyRecord, StateRecord, key_file_name, state_file_name};
    let escrow = tempfile::tempdir().unwrap();
    let c = Core::new();
    let c = Core { keys: c.keys.with_kmip_escrow_dir(Some(escrow.path().to_owned())), ..c };
    c.create("ehr", 1, 0).await;
    let sealer = c.auth("host", Action::GenerateDataKey, Some("ehr"));
    let new = || NewObject { object_type: 2, algorithm: Some(3), length: Some(256), names: vec!["k1".into()], key_format: 1, ..NewObject::default() };
    let material = || Material::new(Zeroizing::new(vec![0x5Au8; 32]));
    let create = || c.keys.kmip_create(&sealer, "ehr", new(), material(), c.ev("host", Action::GenerateDataKey));
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(escrow.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };

    // No recipient in force: refused, nothing made, nothing written.
    assert!(matches!(create().await, Err(KeyError::KmipEscrowNoRecipient { .. })));
    assert!(listing().is_empty());
    let identity = age::x25519::Identity::generate();
    let info = EscrowInfo {
        ceremony_id: "c".into(),
        recovery_recipient: identity.to_public().to_string(),
        threshold: 2,
        shares: 3,
        custodians: vec![],
        installed: T0,
        manifest_json: String::new(),
        previous_recipients: vec![],
        removed: None,
    };
    let mut s = State::clone(&c.keys.state());
    s.escrow = Some(info);
    c.keys.state.store(Arc::new(s));

    // A commit that fails leaves no escrow files behind.
    c.store.fail.store(true, Ordering::SeqCst);
    assert!(create().await.is_err());
    c.store.fail.store(false, Ordering::SeqCst);
    assert!(listing().is_empty(), "{:?}", listing());

    let uid = create().await.unwrap();
    assert_eq!(listing(), vec![key_file_name(&uid), state_file_name(&uid)]);
    let read_key = |dir: &std::path::Path| {
        let p = dir.join(key_file_name(&uid));
        KeyRecord::open(&identity, &std::fs::read(&p).unwrap(), &p).unwrap()
    };
    let read_state = |dir: &std::path::Path| {
        let p = dir.join(state_file_name(&uid));
        StateRecord::open(&identity, &std::fs::read(&p).unwrap(), &p).unwrap()
    };
    let k = read_key(escrow.path());
    assert_eq!((k.material.as_slice(), k.keyring.as_str(), k.created_by.as_str()), (&[0x5Au8; 32][..], "ehr", "host"));
    assert_eq!(read_state(escrow.path()).state, state::PRE_ACTIVE);
    c.keys.kmip_revoke(&sealer, &uid, 5, Some("retired".into()), None, c.ev("host", Action::GenerateDataKey)).await.unwrap();
    let st = read_state(escrow.path());
    assert_eq!((st.state, st.revocation.as_ref().map(|r| r.code), st.destroyed), (state::DEACTIVATED, Some(5), None));

    // Into another server (its own store and master key), with the same uid.
    let other = Core::new();
    other.create("ehr", 0, 0).await;
    let officer = other.auth("officer", Action::KmipImport, Some("ehr"));
    let ev = || other.ev("officer", Action::KmipImport);
    other.keys.kmip_import(&officer, read_key(escrow.path()), read_state(escrow.path()), ev()).await.unwrap();
    let restorer = other.auth("ops", Action::UnwrapDataKey, Some("ehr"));
    let (o, got) = other.keys.kmip_get(&restorer, &uid).await.unwrap();
    assert_eq!((got.expose(), o.state, o.names.as_slice()), (&[0x5Au8; 32][..], state::DEACTIVATED, &["k1".to_owned()][..]));
    let again = other.keys.kmip_import(&officer, read_key(escrow.path()), read_state(escrow.path()), ev()).await;
    assert!(matches!(again, Err(KeyError::KmipObjectExists { .. })), "{:?}", again.err());
    let sealer_only = other.auth("host", Action::GenerateDataKey, Some("ehr"));
    assert!(matches!(other.keys.kmip_import(&sealer_only, read_key(escrow.path()), read_state(escrow.path()), ev()).await, Err(KeyError::NotCovered)));

    // A KMIP Destroy: Destroyed in the bundle at once; cancelled by an officer: not any
    // more; carried out after its waiting period: the key file is deleted.
    c.create("pacs", 0, 0).await;
    let pacs = c.auth("host", Action::GenerateDataKey, Some("pacs"));
    let uid2 = c.keys.kmip_create(&pacs, "pacs", new(), material(), c.ev("host", Action::GenerateDataKey)).await.unwrap();
    let state2 = || {
        let p = escrow.path().join(state_file_name(&uid2));
        StateRecord::open(&identity, &std::fs::read(&p).unwrap(), &p).unwrap()
    };
    let d = c.keys.kmip_destroy(&pacs, &uid2, c.ev("host", Action::GenerateDataKey)).await.unwrap();
    assert!(state2().destroyed.is_some());
    let officer = c.auth("officer", Action::CancelDestruction, Some("pacs"));
    c.keys.cancel_destruction(&officer, d.id, c.ev("officer", Action::CancelDestruction)).await.unwrap();
    assert_eq!(state2().destroyed, None, "a cancelled Destroy gives the object back");
    c.keys.kmip_destroy(&pacs, &uid2, c.ev("host", Action::GenerateDataKey)).await.unwrap();
    assert!(listing().contains(&key_file_name(&uid2)), "kept during the waiting period");

    // The retention of the first ends, the second's waiting period too: both data keys
    // are destroyed, their key files go with them.
    c.advance_days(8);
    // One expiry, one destruction; nothing left for the sweep (which would count a third).
    assert_eq!(c.keys.maintain(None).await.unwrap(), 2);
    let mut left = vec![state_file_name(&uid), state_file_name(&uid2)];
    left.sort();
    assert_eq!(listing(), left);
    assert!(read_state(escrow.path()).destroyed.is_some());
    assert!(state2().destroyed.is_some());
    // A key file an interrupted erase left is deleted by the next pass.
    std::fs::write(escrow.path().join(key_file_name(&uid)), b"left over").unwrap();
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1);
    assert_eq!(listing(), left);

    // A keyring destroyed: the key files of its objects go with its keys.
    c.create("tape", 0, 0).await;
    let tape = c.auth("host", Action::GenerateDataKey, Some("tape"));
    let uid3 = c.keys.kmip_create(&tape, "tape", new(), material(), c.ev("host", Action::GenerateDataKey)).await.unwrap();
    assert!(listing().contains(&key_file_name(&uid3)));
    let a = c.auth("officer", Action::DestroyKeyring, Some("tape"));
    let DestroyOutcome::Pending(req) = c.keys.request_destroy_keyring(&a, "tape", c.ev("officer", Action::DestroyKeyring)).await.unwrap() else {
        panic!("destroying a keyring needs a second officer");
    };
    c.approve("officer2", req.id).await.unwrap();
    c.advance_days(8);
    assert_eq!(c.keys.maintain(None).await.unwrap(), 1, "the keyring's destruction; nothing left for the sweep");
    assert!(!listing().contains(&key_file_name(&uid3)), "{:?}", listing());
    let p = escrow.path().join(state_file_name(&uid3));
    assert!(StateRecord::open(&identity, &std::fs::read(&p).unwrap(), &p).unwrap().destroyed.is_some());
}
