//! The redb store behind the `Store` trait, with the key layer's records and the audit
//! chain on top: durability of concurrent writes, the store formats, the chain head
//! across restarts. A real redb file in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use kms_server::audit::{AuditChain, AuditEvent};
use kms_server::keys::registry::{Registry, WriteOp};
use kms_server::model::{DataKeyRecord, KeyState};
use kms_server::store::redb::{FORMAT, FORMAT_META, RedbStore};
use kms_server::store::{StoreError, Table};
use redb::{Database, TableDefinition};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

fn rec(ring: &str) -> DataKeyRecord {
    DataKeyRecord {
        keyring: ring.into(),
        version: 1,
        backup_id: "b".into(),
        labels: vec![("host".into(), "h1".into())],
        created: 1,
        expires: None,
        state: KeyState::Active,
        issued_to: "sealer".into(),
        escrowed: false,
    }
}

fn create(path: &Path) -> Registry {
    Registry::new(Arc::new(RedbStore::create(path, AuditChain::new()).unwrap()))
}

fn open(path: &Path) -> Result<Registry, StoreError> {
    Ok(Registry::new(Arc::new(RedbStore::open(path, AuditChain::new())?)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_all_durable_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = create(&path);
    let mut tasks = Vec::new();
    for i in 0..200u8 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut id = [0u8; 16];
            id[0] = i;
            s.write(WriteOp::IssueDataKey { id, record: rec("r"), secret: None }).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    drop(store);
    let store = open(&path).unwrap();
    assert_eq!(store.issued_count("r").unwrap(), 200);
    let mut id = [0u8; 16];
    id[0] = 199;
    assert_eq!(store.data_key(&id).unwrap().unwrap().backup_id, "b");
    drop(store);
    assert!(matches!(RedbStore::create(&path, AuditChain::new()), Err(StoreError::AlreadyExists { .. })));
}

fn event(principal: &str) -> AuditEvent {
    AuditEvent {
        time: "2026-11-23T03:08:05.123Z".into(),
        principal: principal.into(),
        action: "GenerateDataKey".into(),
        keyring: Some("default".into()),
        key_id: Some("00112233445566778899aabbccddeeff".into()),
        backup_id: Some("b".into()),
        outcome: kms_server::model::Outcome::ok(),
    }
}

/// Makes `path` a format 1 store: no format marker, `n` JSON audit records.
fn make_format_1(path: &Path, n: u64) -> Vec<kluis_proto::audit::AuditRecord> {
    drop(RedbStore::create(path, AuditChain::new()).unwrap());
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    let mut recs = Vec::new();
    {
        txn.open_table(META).unwrap().remove(FORMAT_META).unwrap();
        let mut t = txn.open_table(AUDIT).unwrap();
        let mut prev = kluis_proto::audit::GENESIS.to_owned();
        for seq in 1..=n {
            let e = event("old-host");
            let mut r = kluis_proto::audit::AuditRecord {
                seq,
                time: e.time,
                principal: e.principal,
                action: e.action,
                keyring: e.keyring,
                key_id: e.key_id,
                backup_id: e.backup_id,
                outcome: e.outcome.to_string(),
                prev: prev.clone(),
                hash: String::new(),
            };
            r.hash = r.compute_hash();
            prev.clone_from(&r.hash);
            t.insert(seq, serde_json::to_vec(&r).unwrap().as_slice()).unwrap();
            recs.push(r);
        }
    }
    txn.commit().unwrap();
    recs
}

#[test]
fn a_format_1_store_keeps_its_json_records_and_the_chain_continues_compactly() {
    use kluis_proto::audit::{ExportLine, verify_export};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let old = make_format_1(&path, 3);
    let store = open(&path).unwrap();
    assert_eq!(store.get_meta(FORMAT_META).unwrap(), Some(FORMAT.to_be_bytes().to_vec()));
    for _ in 0..3 {
        store.write_blocking(WriteOp::Audit(event("new-host"))).unwrap();
    }
    let page: Vec<_> = kms_server::audit::page(store.store(), 1, 100).unwrap().into_iter().map(|(r, _)| r).collect();
    assert_eq!(page.len(), 6);
    assert_eq!(page[..3], old[..]);
    assert_eq!(page[3].prev, old[2].hash, "the first compact record chains to the last JSON one");
    // Stored: JSON before, compact after.
    {
        let s = store.store();
        assert_eq!(s.get(Table::Audit, &3u64.to_be_bytes()).unwrap().unwrap()[0], b'{');
        let fourth = s.get(Table::Audit, &4u64.to_be_bytes()).unwrap().unwrap();
        assert_eq!(fourth[0], 0x02);
        assert!(fourth.len() < 120);
    }
    // Pages that start inside either part rebuild the same records.
    assert_eq!(kms_server::audit::page(store.store(), 4, 100).unwrap()[0].0, page[3]);
    assert_eq!(kms_server::audit::page(store.store(), 5, 1).unwrap()[0].0, page[4]);
    // The whole trail verifies as one export, with a head signed as the server does.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let mut text = String::new();
    for r in &page {
        text += &serde_json::to_string(&ExportLine::Record(r.clone())).unwrap();
        text.push('\n');
    }
    let head = kluis_proto::audit::sign(&key, kluis_proto::audit::SigKind::Head, 6, &page[5].hash, kluis_proto::audit::GENESIS);
    let head = ExportLine::Head { head };
    text += &serde_json::to_string(&head).unwrap();
    use ring::signature::KeyPair;
    let v = verify_export(&text, key.public_key().as_ref()).unwrap();
    assert_eq!((v.first_seq, v.last_seq, v.records), (1, 6, 6));
    // After a restart the chain head is read from a compact record.
    drop(store);
    let store = open(&path).unwrap();
    store.write_blocking(WriteOp::Audit(event("new-host"))).unwrap();
    let seventh = kms_server::audit::page(store.store(), 7, 1).unwrap().remove(0).0;
    assert_eq!(seventh.prev, page[5].hash);
    assert_eq!(seventh.hash, seventh.compute_hash());
}

#[test]
fn a_store_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(RedbStore::create(&path, AuditChain::new()).unwrap());
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert(FORMAT_META, 3u32.to_be_bytes().as_slice()).unwrap();
        txn.commit().unwrap();
    }
    match RedbStore::open(&path, AuditChain::new()) {
        Err(e @ StoreError::NewerFormat { found: 3, supported: 2, .. }) => {
            assert!(e.to_string().contains("has format 3, newer than this kms-server reads"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a format 3 store was opened"),
    }
}

#[test]
fn registry_record_is_small() {
    let bytes = postcard::to_allocvec(&rec("ehr-db")).unwrap();
    assert!(bytes.len() < 64, "{}", bytes.len());
}

#[test]
fn a_second_open_of_the_same_file_is_named_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _first = create(&path);
    match RedbStore::open(&path, AuditChain::new()) {
        Err(StoreError::Locked { store }) => assert!(store.ends_with("s.redb")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened twice"),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// 32 bytes no other key shares (a SHA-256 of the index).
fn secret_of(i: u32) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("secret {i}").as_bytes());
    d.as_ref().try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_removes_a_destroyed_keys_secret_from_the_file_and_keeps_every_live_row() {
    use kms_server::secret::Key256;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = create(&path);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let id = |i: u32| {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        id
    };
    for i in 0..300u32 {
        let secret = Some(Key256::from_slice(&secret_of(i)).unwrap());
        store
            .write(WriteOp::Atomic(vec![
                WriteOp::IssueDataKey { id: id(i), record: rec("r"), secret },
                WriteOp::Audit(event("sealer")),
            ]))
            .await
            .unwrap();
    }
    assert!(!store.scrub_pending().unwrap(), "nothing erased yet");
    let mut destroyed = rec("r");
    destroyed.state = KeyState::Destroyed { at: 2 };
    store.write(WriteOp::PutDataKey { id: id(7), record: destroyed }).await.unwrap();
    assert!(store.key_secret(&id(7)).unwrap().is_none(), "destroying deletes the secret");
    assert!(store.scrub_pending().unwrap(), "the erasure marks a scrub as due");
    // The premise: redb frees the page that held the secret but leaves its bytes.
    assert!(contains(&std::fs::read(&path).unwrap(), &secret_of(7)), "deleted, the secret is still in the file");

    let report = store.scrub().await.unwrap();
    assert!(report.bytes_before > 0 && report.bytes_after > 0);
    let file = std::fs::read(&path).unwrap();
    assert!(!contains(&file, &secret_of(7)), "after the scrub the destroyed key's secret is not in the file");
    assert!(!store.scrub_pending().unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "the copy keeps the store's mode");
    assert!(!dir.path().join("s.redb.scrub").exists());
    for i in (0..300u32).filter(|&i| i != 7) {
        assert!(contains(&file, &secret_of(i)), "live secret {i} is in the copy");
        assert_eq!(store.key_secret(&id(i)).unwrap().unwrap().expose(), &secret_of(i));
    }
    // Writes go on in the new file, the audit chain continues without a gap.
    store.write(WriteOp::Audit(event("officer"))).await.unwrap();
    drop(store);
    let store = open(&path).unwrap();
    assert_eq!(store.issued_count("r").unwrap(), 300);
    assert!(store.key_secret(&id(7)).unwrap().is_none());
    assert_eq!(store.key_secret(&id(299)).unwrap().unwrap().expose(), &secret_of(299));
    let mut seqs = Vec::new();
    kms_server::store::Store::scan(store.store(), Table::Audit, (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded), &mut |k, _| {
        seqs.push(u64::from_be_bytes(k.try_into().unwrap()));
        Ok(true)
    })
    .unwrap();
    assert_eq!(seqs, (1..=301).collect::<Vec<_>>(), "300 entries before the scrub, one after, numbered on");
}

#[test]
fn a_copy_left_by_a_scrub_cut_off_is_removed_at_open_and_is_never_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(create(&path));
    let tmp = dir.path().join("s.redb.scrub");
    std::fs::write(&tmp, b"half a copy").unwrap();
    let store = open(&path).unwrap();
    assert!(!tmp.exists(), "the stale copy is removed once the store is open");
    assert_eq!(store.issued_count("r").unwrap(), 0);
}
