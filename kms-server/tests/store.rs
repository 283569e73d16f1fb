//! The stores behind the `Store` trait, with the key layer's records and the audit chain
//! on top. The contract tests (module `contract`) run once per store from one source: on a
//! real redb file in a temp dir, and on a real PostgreSQL cluster that the test starts
//! (`kluis_tests::pg`). The tests after them are of the redb file's own formats.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use kms_server::audit::{AuditChain, AuditEvent};
use kms_server::keys::registry::{Registry, WriteOp};
use kms_server::model::{DataKeyRecord, KeyState};
use kms_server::store::redb::{FORMAT, FORMAT_META, RedbStore};
use kms_server::store::{Op, StoreError, Table, WriteGroup};
use redb::{Database, ReadableDatabase, TableDefinition, TableHandle};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const KMIP_OBJECTS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("kmip_objects");

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

/// A KMIP object's value no other row shares (300 bytes: SHA-256 chained from the index),
/// small enough to stay in a PostgreSQL heap tuple (not TOASTed).
fn kmip_of(i: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut d = ring::digest::digest(&ring::digest::SHA256, format!("kmip object {i}").as_bytes());
    while out.len() < 300 {
        out.extend_from_slice(d.as_ref());
        d = ring::digest::digest(&ring::digest::SHA256, d.as_ref());
    }
    out.truncate(300);
    out
}

/// The 16-byte id `i`, big-endian in its first 4 bytes (so ids sort as numbers).
fn kmip_id(i: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    id
}

fn put_kmip(i: u32, value: Vec<u8>) -> Op {
    Op::Put { table: Table::KmipObjects, key: kmip_id(i).to_vec(), value }
}

fn group(ops: impl IntoIterator<Item = Op>) -> WriteGroup {
    let mut g = WriteGroup::default();
    for op in ops {
        g.push(op);
    }
    g
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

/// KMIP objects hold sealed key material: a scrub leaves a deleted and an overwritten
/// object's bytes out of the file, and keeps the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_removes_deleted_and_overwritten_kmip_objects_from_the_file() {
    use kms_server::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = RedbStore::create(&path, AuditChain::new()).unwrap();
    let id = |i: u32| kmip_id(i).to_vec();
    store.commit(group((0..200).map(|i| put_kmip(i, kmip_of(i))))).await.unwrap();
    // One group, the last before the scrub: the pages it frees are not reused before it.
    store.commit(group([put_kmip(2, kmip_of(1002)), Op::Delete { table: Table::KmipObjects, key: id(1) }])).await.unwrap();
    // The premise: redb frees the pages that held them but leaves their bytes.
    let before = std::fs::read(&path).unwrap();
    assert!(contains(&before, &kmip_of(1)) && contains(&before, &kmip_of(2)), "deleted and overwritten, the objects are still in the file");

    store.scrub().await.unwrap();
    let file = std::fs::read(&path).unwrap();
    assert!(!contains(&file, &kmip_of(1)), "after the scrub the deleted object is not in the file");
    assert!(!contains(&file, &kmip_of(2)), "after the scrub the overwritten object is not in the file");
    assert_eq!(store.get(Table::KmipObjects, &id(1)).unwrap(), None);
    for i in (0..200u32).filter(|&i| i != 1) {
        let value = if i == 2 { kmip_of(1002) } else { kmip_of(i) };
        assert!(contains(&file, &value), "live object {i} is in the copy");
        assert_eq!(store.get(Table::KmipObjects, &id(i)).unwrap(), Some(value));
    }
    drop(store);
    let store = RedbStore::open(&path, AuditChain::new()).unwrap();
    assert_eq!(store.get(Table::KmipObjects, &id(2)).unwrap(), Some(kmip_of(1002)));
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

fn redb_tables(path: &Path) -> Vec<String> {
    let db = Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    txn.list_tables().unwrap().map(|t| t.name().to_owned()).collect()
}

/// A file made before `kmip_objects` existed (here: made now, the table then deleted with
/// redb's own API) opens; the table is made at open, reads of it find nothing, writes work,
/// and a scrub carries it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_made_before_kmip_objects_opens_and_the_table_works() {
    use kms_server::store::Store;
    use std::ops::Bound;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = create(&path);
    store.write(WriteOp::Audit(event("old-host"))).await.unwrap();
    drop(store);
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        assert!(txn.delete_table(KMIP_OBJECTS).unwrap(), "a new file has the table");
        txn.commit().unwrap();
    }
    assert!(!redb_tables(&path).contains(&"kmip_objects".to_owned()));

    let store = RedbStore::open(&path, AuditChain::new()).unwrap();
    let id = [9u8; 16];
    assert_eq!(store.get(Table::KmipObjects, &id).unwrap(), None);
    let mut rows = 0;
    store
        .scan(Table::KmipObjects, (Bound::Unbounded, Bound::Unbounded), &mut |_, _| {
            rows += 1;
            Ok(true)
        })
        .unwrap();
    assert_eq!(rows, 0);
    store.commit(group([Op::Put { table: Table::KmipObjects, key: id.to_vec(), value: b"object".to_vec() }])).await.unwrap();
    assert_eq!(store.get(Table::KmipObjects, &id).unwrap().as_deref(), Some(&b"object"[..]));
    store.scrub().await.unwrap();
    assert_eq!(store.get(Table::KmipObjects, &id).unwrap().as_deref(), Some(&b"object"[..]), "the scrub copied the table");
    drop(store);
    assert!(redb_tables(&path).contains(&"kmip_objects".to_owned()));
    let store = open(&path).unwrap();
    assert_eq!(store.store().get(Table::KmipObjects, &id).unwrap().as_deref(), Some(&b"object"[..]));
    assert_eq!(kms_server::audit::page(store.store(), 1, 10).unwrap().len(), 1, "the rest of the file as it was");
}

/// The store contract, once per store (see `per_store!` at the end).
mod contract {
    use std::ops::Bound;
    use std::path::PathBuf;
    use std::sync::Arc;

    use kluis_tests::pg::Postgres;
    use kms_server::audit::AuditChain;
    use kms_server::keys::registry::{Registry, WriteOp};
    use kms_server::model::KeyState;
    use kms_server::store::postgres::{PgOptions, PostgresStore};
    use kms_server::store::redb::RedbStore;
    use kms_server::store::{Op, Store, StoreError, Table, WriteGroup, id_key};

    use super::{contains, event, group, kmip_of, put_kmip, rec, secret_of};

    #[derive(Clone, Copy, Debug)]
    pub enum Kind {
        Redb,
        Postgres,
    }

    /// One store of a kind, made fresh for a test.
    pub struct Fixture {
        kind: Kind,
        _dir: tempfile::TempDir,
        path: PathBuf,
        pub pg: Option<Postgres>,
    }

    impl Fixture {
        pub fn new(kind: Kind) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.redb");
            let pg = match kind {
                Kind::Redb => None,
                Kind::Postgres => {
                    let pg = Postgres::start();
                    pg.create_db("kluis");
                    Some(pg)
                }
            };
            Self { kind, _dir: dir, path, pg }
        }

        pub fn opts(&self) -> PgOptions {
            PgOptions { url: self.pg.as_ref().unwrap().url("kluis"), password: None, ca_file: None }
        }

        pub fn create_store(&self) -> Result<Arc<dyn Store>, StoreError> {
            Ok(match self.kind {
                Kind::Redb => Arc::new(RedbStore::create(&self.path, AuditChain::new())?),
                Kind::Postgres => Arc::new(PostgresStore::create(&self.opts(), AuditChain::new())?),
            })
        }

        pub fn open_store(&self) -> Result<Arc<dyn Store>, StoreError> {
            Ok(match self.kind {
                Kind::Redb => Arc::new(RedbStore::open(&self.path, AuditChain::new())?),
                Kind::Postgres => Arc::new(PostgresStore::open(&self.opts(), AuditChain::new())?),
            })
        }

        pub fn create(&self) -> Registry {
            Registry::new(self.create_store().unwrap())
        }

        pub fn open(&self) -> Result<Registry, StoreError> {
            Ok(Registry::new(self.open_store()?))
        }

        /// Marks the (closed) store as made by a later kms-server.
        fn set_newer_format(&self) {
            match self.kind {
                Kind::Redb => {
                    let db = ::redb::Database::open(&self.path).unwrap();
                    let txn = db.begin_write().unwrap();
                    txn.open_table(super::META).unwrap().insert(super::FORMAT_META, 3u32.to_be_bytes().as_slice()).unwrap();
                    txn.commit().unwrap();
                }
                Kind::Postgres => {
                    self.pg.as_ref().unwrap().psql("kluis", "UPDATE kluis_schema SET format = 3");
                }
            }
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    fn id(i: u32) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        id
    }

    fn keys(store: &dyn Store, table: Table, range: (Bound<&[u8]>, Bound<&[u8]>), stop_after: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        store
            .scan(table, range, &mut |k, _| {
                out.push(k.to_vec());
                Ok(out.len() < stop_after)
            })
            .unwrap();
        out
    }

    pub fn concurrent_writes_are_all_durable_after_reopen(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create();
        rt().block_on(async {
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
        });
        drop(store);
        let store = f.open().unwrap();
        assert_eq!(store.issued_count("r").unwrap(), 200);
        let mut id = [0u8; 16];
        id[0] = 199;
        assert_eq!(store.data_key(&id).unwrap().unwrap().backup_id, "b");
        drop(store);
        match f.create_store() {
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a second create made a store over the first"),
        }
    }

    /// Appends from many tasks are numbered 1..n without a gap, each linked to the one
    /// before, and the chain goes on from its head after a restart.
    pub fn appends_are_numbered_without_gaps_and_linked_across_a_restart(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create();
        rt().block_on(async {
            let mut tasks = Vec::new();
            for i in 0..60 {
                let s = store.clone();
                tasks.push(tokio::spawn(async move { s.write(WriteOp::Audit(event(&format!("host-{i}")))).await }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        let page: Vec<_> = kms_server::audit::page(store.store(), 1, 1000).unwrap().into_iter().map(|(r, _)| r).collect();
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=60).collect::<Vec<_>>());
        assert_eq!(page[0].prev, kluis_proto::audit::GENESIS);
        for w in page.windows(2) {
            assert_eq!(w[1].prev, w[0].hash, "entry {} links to {}", w[1].seq, w[0].seq);
        }
        for r in &page {
            assert_eq!(r.hash, r.compute_hash());
        }
        drop(store);
        let store = f.open().unwrap();
        store.write_blocking(WriteOp::Audit(event("after-restart"))).unwrap();
        let next = kms_server::audit::page(store.store(), 61, 10).unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].0.prev, page[59].hash);
    }

    /// A group with one op the store cannot take writes nothing of the group.
    pub fn a_group_with_a_bad_op_writes_nothing(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create_store().unwrap();
        let mut g = WriteGroup::default();
        g.push(Op::Put { table: Table::Meta, key: b"half".to_vec(), value: b"written".to_vec() });
        g.push(Op::Put { table: Table::Issued, key: b"r".to_vec(), value: vec![1] });
        assert!(matches!(store.commit_blocking(g), Err(StoreError::WrongTable { table: Table::Issued })));
        let mut g = WriteGroup::default();
        g.push(Op::Put { table: Table::Meta, key: b"half".to_vec(), value: b"written".to_vec() });
        g.push(Op::Put { table: Table::DataKeys, key: vec![1, 2, 3], value: vec![1] });
        assert!(matches!(store.commit_blocking(g), Err(StoreError::BadKey { table: Table::DataKeys })));
        let mut g = WriteGroup::default();
        g.push(Op::Append { entry: b"not an audit event".to_vec() });
        g.push(Op::Put { table: Table::Meta, key: b"half".to_vec(), value: b"written".to_vec() });
        assert!(matches!(store.commit_blocking(g), Err(StoreError::Link { seq: 1, .. })));
        assert_eq!(store.get(Table::Meta, b"half").unwrap(), None, "nothing of a failed group is written");
        assert_eq!(store.last(Table::Audit).unwrap(), None);
        // The store goes on, and the failed append did not use up a number.
        let mut g = WriteGroup::default();
        g.push(Op::Put { table: Table::Meta, key: b"whole".to_vec(), value: b"yes".to_vec() });
        g.push(Op::Append { entry: postcard::to_allocvec(&event("ok")).unwrap() });
        store.commit_blocking(g).unwrap();
        assert_eq!(store.get(Table::Meta, b"whole").unwrap().as_deref(), Some(&b"yes"[..]));
        assert_eq!(store.last(Table::Audit).unwrap().unwrap().0, id_key(1).to_vec());
    }

    /// Compare-and-set: a group whose `Expect` does not hold writes nothing and fails
    /// alone, also when it shares a commit with others; one whose `Expect` holds commits.
    pub fn a_group_whose_expect_fails_writes_nothing_and_fails_alone(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create_store().unwrap();
        let expect = |value: Option<&[u8]>, set: &[u8], also: &[u8]| {
            let mut g = WriteGroup::default();
            g.push(Op::Expect { table: Table::Meta, key: b"epoch".to_vec(), value: value.map(<[u8]>::to_vec) });
            g.push(Op::Put { table: Table::Meta, key: b"epoch".to_vec(), value: set.to_vec() });
            g.push(Op::Put { table: Table::Meta, key: also.to_vec(), value: b"written".to_vec() });
            g.push(Op::Append { entry: postcard::to_allocvec(&event("officer")).unwrap() });
            g
        };
        // Absent, as expected; then the value it now has.
        store.commit_blocking(expect(None, b"e1", b"first")).unwrap();
        store.commit_blocking(expect(Some(b"e1"), b"e2", b"second")).unwrap();
        // Stale: expects what was there before.
        match store.commit_blocking(expect(Some(b"e1"), b"e3", b"stale")) {
            Err(StoreError::Conflict { what }) => assert!(what.contains("epoch"), "{what}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(()) => panic!("a stale compare-and-set committed"),
        }
        match store.commit_blocking(expect(None, b"e3", b"stale2")) {
            Err(StoreError::Conflict { .. }) => {}
            other => panic!("expected a conflict: {:?}", other.err().map(|e| e.to_string())),
        }
        assert_eq!(store.get(Table::Meta, b"epoch").unwrap().as_deref(), Some(&b"e2"[..]));
        assert_eq!(store.get(Table::Meta, b"stale").unwrap(), None);
        assert_eq!(store.get(Table::Meta, b"stale2").unwrap(), None);
        // Many at once, sharing commits: exactly one of those expecting e2 wins; the plain
        // writes beside them all commit; the audit numbers stay gapless.
        let rt = rt();
        let (wins, plain) = rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..20u32 {
                let s = store.clone();
                tasks.push(tokio::spawn(async move {
                    let r = s.commit(expect(Some(b"e2"), format!("w{i}").as_bytes(), format!("cas{i}").as_bytes())).await;
                    let mut g = WriteGroup::default();
                    g.push(Op::Put { table: Table::Meta, key: format!("plain{i}").into_bytes(), value: b"x".to_vec() });
                    g.push(Op::Append { entry: postcard::to_allocvec(&event("host")).unwrap() });
                    (r, s.commit(g).await)
                }));
            }
            let (mut wins, mut plain) = (0, 0);
            for t in tasks {
                let (cas, p) = t.await.unwrap();
                match cas {
                    Ok(()) => wins += 1,
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => panic!("wrong error: {e}"),
                }
                p.unwrap();
                plain += 1;
            }
            (wins, plain)
        });
        assert_eq!((wins, plain), (1, 20));
        let n = (0..20u32).filter(|i| store.get(Table::Meta, format!("cas{i}").as_bytes()).unwrap().is_some()).count();
        assert_eq!(n, 1, "only the winner's write is there");
        let page = kms_server::audit::page(store.as_ref(), 1, 1000).unwrap();
        assert_eq!(page.iter().map(|(r, _)| r.seq).collect::<Vec<_>>(), (1..=23).collect::<Vec<_>>());
    }

    /// Gets, ranges (every kind of bound, early stop, more rows than a page), the largest
    /// key, counters, numbered inserts, deletes; and what a table does not take.
    pub fn reads_by_key_and_by_range(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create_store().unwrap();
        let mut g = WriteGroup::default();
        for i in 0..10u32 {
            g.push(Op::Put { table: Table::DataKeys, key: id(i).to_vec(), value: vec![i as u8] });
        }
        for i in 0..2500u32 {
            g.push(Op::Put { table: Table::Expiry, key: kms_server::store::expiry_key(i64::from(i) - 100, &id(i)).to_vec(), value: vec![] });
        }
        g.push(Op::Increment { table: Table::Issued, key: b"r".to_vec(), by: 2 });
        g.push(Op::Put { table: Table::Meta, key: b"gone".to_vec(), value: b"soon".to_vec() });
        store.commit_blocking(g).unwrap();
        let mut g = WriteGroup::default();
        g.push(Op::Increment { table: Table::Issued, key: b"r".to_vec(), by: 3 });
        g.push(Op::Increment { table: Table::Issued, key: "ring-é".as_bytes().to_vec(), by: 1 });
        g.push(Op::Delete { table: Table::Meta, key: b"gone".to_vec() });
        for _ in 0..3 {
            g.push(Op::Insert { table: Table::RestoreTests, value: b"t".to_vec() });
        }
        store.commit_blocking(g).unwrap();

        assert_eq!(store.get(Table::DataKeys, &id(3)).unwrap(), Some(vec![3]));
        assert_eq!(store.get(Table::DataKeys, &id(99)).unwrap(), None);
        assert_eq!(store.get(Table::Issued, b"r").unwrap(), Some(5u64.to_be_bytes().to_vec()));
        assert_eq!(store.get(Table::Meta, b"gone").unwrap(), None);
        assert_eq!(store.last(Table::RestoreTests).unwrap(), Some((id_key(3).to_vec(), b"t".to_vec())));
        let all = keys(store.as_ref(), Table::DataKeys, (Bound::Unbounded, Bound::Unbounded), usize::MAX);
        assert_eq!(all, (0..10).map(|i| id(i).to_vec()).collect::<Vec<_>>());
        let (lo, hi) = (id(2), id(5));
        let incl = keys(store.as_ref(), Table::DataKeys, (Bound::Included(&lo[..]), Bound::Excluded(&hi[..])), usize::MAX);
        assert_eq!(incl, (2..5).map(|i| id(i).to_vec()).collect::<Vec<_>>());
        let excl = keys(store.as_ref(), Table::DataKeys, (Bound::Excluded(&lo[..]), Bound::Included(&hi[..])), usize::MAX);
        assert_eq!(excl, (3..=5).map(|i| id(i).to_vec()).collect::<Vec<_>>());
        let stopped = keys(store.as_ref(), Table::DataKeys, (Bound::Included(&lo[..]), Bound::Unbounded), 2);
        assert_eq!(stopped, vec![id(2).to_vec(), id(3).to_vec()]);
        let mut counters = Vec::new();
        store
            .scan(Table::Issued, (Bound::Unbounded, Bound::Unbounded), &mut |k, v| {
                counters.push((String::from_utf8(k.to_vec()).unwrap(), u64::from_be_bytes(v.try_into().unwrap())));
                Ok(true)
            })
            .unwrap();
        assert_eq!(counters, vec![("r".to_owned(), 5), ("ring-é".to_owned(), 1)]);
        // Expiry keys sort as times, negative ones first, across pages.
        let times: Vec<i64> = keys(store.as_ref(), Table::Expiry, (Bound::Unbounded, Bound::Unbounded), usize::MAX)
            .iter()
            .map(|k| kms_server::store::parse_expiry_key(k).unwrap().0)
            .collect();
        assert_eq!(times, (0..2500).map(|i| i - 100).collect::<Vec<_>>());
        // A visitor's error ends the scan with that error; the store reads on.
        let err = store.scan(Table::Expiry, (Bound::Unbounded, Bound::Unbounded), &mut |_, _| Err(StoreError::WriterGone));
        assert!(matches!(err, Err(StoreError::WriterGone)));
        assert_eq!(store.get(Table::DataKeys, &id(0)).unwrap(), Some(vec![0]));
        // Secrets are never listed; only id-keyed tables have a last row.
        let refused = store.scan(Table::KeySecrets, (Bound::Unbounded, Bound::Unbounded), &mut |_, _| Ok(true));
        assert!(matches!(refused, Err(StoreError::WrongTable { table: Table::KeySecrets })));
        assert!(matches!(store.last(Table::Meta), Err(StoreError::WrongTable { table: Table::Meta })));
        assert!(matches!(store.get(Table::Audit, b"short"), Err(StoreError::BadKey { table: Table::Audit })));
    }

    pub fn opening_a_store_that_was_never_made_is_refused(kind: Kind) {
        let f = Fixture::new(kind);
        match f.open_store() {
            Err(e @ StoreError::NotInitialised { .. }) => assert!(e.to_string().contains("run `kms-server init` first"), "{e}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a store that was never made"),
        }
    }

    pub fn a_store_of_a_newer_format_is_refused(kind: Kind) {
        let f = Fixture::new(kind);
        drop(f.create());
        f.set_newer_format();
        match f.open_store() {
            Err(e @ StoreError::NewerFormat { found: 3, .. }) => {
                assert!(e.to_string().contains("has format 3, newer than this kms-server reads"), "{e}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a format 3 store was opened"),
        }
    }

    /// A scrub keeps every live row, the erased secret stays gone, and the audit chain
    /// numbers on after it.
    pub fn a_scrub_keeps_every_live_row_and_writes_go_on(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create();
        let rt = rt();
        for i in 0..40u32 {
            let secret = Some(kms_server::secret::Key256::from_slice(&secret_of(i)).unwrap());
            rt.block_on(store.write(WriteOp::Atomic(vec![
                WriteOp::IssueDataKey { id: id(i), record: rec("r"), secret },
                WriteOp::Audit(event("sealer")),
            ])))
            .unwrap();
        }
        let mut destroyed = rec("r");
        destroyed.state = KeyState::Destroyed { at: 2 };
        rt.block_on(store.write(WriteOp::PutDataKey { id: id(7), record: destroyed })).unwrap();
        assert!(store.scrub_pending().unwrap());
        let report = rt.block_on(store.scrub()).unwrap();
        assert!(report.bytes_before > 0 && report.bytes_after > 0);
        assert!(!store.scrub_pending().unwrap());
        assert!(store.key_secret(&id(7)).unwrap().is_none());
        for i in (0..40u32).filter(|&i| i != 7) {
            assert_eq!(store.key_secret(&id(i)).unwrap().unwrap().expose(), &secret_of(i));
        }
        rt.block_on(store.write(WriteOp::Audit(event("officer")))).unwrap();
        drop(store);
        let store = f.open().unwrap();
        assert_eq!(store.issued_count("r").unwrap(), 40);
        let page = kms_server::audit::page(store.store(), 1, 1000).unwrap();
        assert_eq!(page.iter().map(|(r, _)| r.seq).collect::<Vec<_>>(), (1..=41).collect::<Vec<_>>(), "40 before the scrub, one after");
    }

    /// Rows imported as they are (migrate-store): audit entries only in order after the
    /// log's last, then appends link on from the imported head; counters and secrets keep
    /// their values.
    pub fn imported_rows_keep_their_bytes_and_appends_continue_the_chain(kind: Kind) {
        let from = Fixture::new(Kind::Redb);
        let src = from.create();
        let rt = rt();
        for i in 0..5 {
            rt.block_on(src.write(WriteOp::Audit(event(&format!("host{i}"))))).unwrap();
        }
        let mut entries = Vec::new();
        src.store()
            .scan(Table::Audit, (Bound::Unbounded, Bound::Unbounded), &mut |k, v| {
                entries.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
        let f = Fixture::new(kind);
        let dst = f.create_store().unwrap();
        let import = |table: Table, key: Vec<u8>, value: Vec<u8>| {
            let mut g = WriteGroup::default();
            g.push(Op::Import { table, key, value: zeroize::Zeroizing::new(value) });
            g
        };
        // Out of order: entry 2 before entry 1.
        match dst.commit_blocking(import(Table::Audit, entries[1].0.clone(), entries[1].1.clone())) {
            Err(StoreError::ImportOrder { seq: 2, next: 1 }) => {}
            other => panic!("an entry out of order was imported: {:?}", other.err().map(|e| e.to_string())),
        }
        let mut g = WriteGroup::default();
        for (k, v) in &entries {
            g.push(Op::Import { table: Table::Audit, key: k.clone(), value: zeroize::Zeroizing::new(v.clone()) });
        }
        g.push(Op::Import { table: Table::Issued, key: b"r".to_vec(), value: 41u64.to_be_bytes().to_vec().into() });
        g.push(Op::Import { table: Table::KeySecrets, key: id(1).to_vec(), value: secret_of(1).to_vec().into() });
        g.push(Op::Import { table: Table::KmipObjects, key: id(1).to_vec(), value: kmip_of(1).into() });
        dst.commit_blocking(g).unwrap();
        assert_eq!(dst.get(Table::KmipObjects, &id(1)).unwrap(), Some(kmip_of(1)));
        let dst = Registry::new(dst);
        assert_eq!(dst.issued_count("r").unwrap(), 41);
        assert_eq!(dst.key_secret(&id(1)).unwrap().unwrap().expose(), &secret_of(1));
        // An append links to the imported head: the whole log reads back as one chain.
        rt.block_on(dst.write(WriteOp::Audit(event("after")))).unwrap();
        let page = kms_server::audit::page(dst.store(), 1, 100).unwrap();
        assert_eq!(page.len(), 6);
        for w in page.windows(2) {
            assert_eq!(w[1].0.prev, w[0].0.hash, "entry {} links to entry {}", w[1].0.seq, w[0].0.seq);
        }
        assert_eq!(kms_server::audit::page(src.store(), 1, 100).unwrap()[4].0.hash, page[4].0.hash, "imported bytes kept");
    }

    /// Several writes of one row in one group: the last one counts, increments add up
    /// (the PostgreSQL writer folds them into one statement per table).
    pub fn writes_of_one_row_in_one_group_apply_in_order(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create_store().unwrap();
        let meta = |k: &str| store.get(Table::Meta, k.as_bytes()).unwrap();
        let mut g = WriteGroup::default();
        let put = |k: &str, v: &[u8]| Op::Put { table: Table::Meta, key: k.as_bytes().to_vec(), value: v.to_vec() };
        store.commit_blocking({
            let mut g = WriteGroup::default();
            g.push(put("old", b"1"));
            g
        })
        .unwrap();
        for op in [
            put("gone", b"a"),
            Op::Delete { table: Table::Meta, key: b"gone".to_vec() },
            put("twice", b"x"),
            put("twice", b"y"),
            Op::Delete { table: Table::Meta, key: b"old".to_vec() },
            put("old", b"2"),
            Op::Increment { table: Table::Issued, key: b"r".to_vec(), by: 2 },
            Op::Increment { table: Table::Issued, key: b"r".to_vec(), by: 3 },
        ] {
            g.push(op);
        }
        store.commit_blocking(g).unwrap();
        assert_eq!(meta("gone"), None);
        assert_eq!(meta("twice").as_deref(), Some(&b"y"[..]));
        assert_eq!(meta("old").as_deref(), Some(&b"2"[..]));
        assert_eq!(store.get(Table::Issued, b"r").unwrap().as_deref(), Some(&5u64.to_be_bytes()[..]));
    }

    fn kmip_rows(store: &dyn Store, range: (Bound<&[u8]>, Bound<&[u8]>)) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        store
            .scan(Table::KmipObjects, range, &mut |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
        out
    }

    /// `Table::KmipObjects`: put, get, overwrite, delete, compare-and-set, imports, scans in
    /// key order; the rows are there after a reopen; keys of another length are refused.
    pub fn kmip_objects_put_get_overwrite_delete_expect_scan_and_import(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create_store().unwrap();
        let kmip = |i: u32| store.get(Table::KmipObjects, &id(i)).unwrap();
        store.commit_blocking(group([put_kmip(3, kmip_of(3)), put_kmip(1, kmip_of(1)), put_kmip(2, kmip_of(2))])).unwrap();
        assert_eq!(kmip(1), Some(kmip_of(1)));
        assert_eq!(kmip(4), None);
        store.commit_blocking(group([put_kmip(1, kmip_of(11))])).unwrap();
        assert_eq!(kmip(1), Some(kmip_of(11)), "overwritten");
        store.commit_blocking(group([Op::Delete { table: Table::KmipObjects, key: id(2).to_vec() }])).unwrap();
        assert_eq!(kmip(2), None, "deleted");
        // Compare-and-set: on the value there, on an absent row; a stale one writes nothing.
        let expect = |i: u32, value: Option<Vec<u8>>| Op::Expect { table: Table::KmipObjects, key: id(i).to_vec(), value };
        store.commit_blocking(group([expect(1, Some(kmip_of(11))), put_kmip(1, kmip_of(12))])).unwrap();
        store.commit_blocking(group([expect(4, None), put_kmip(4, kmip_of(4))])).unwrap();
        for (what, stale) in [
            ("an old value", group([put_kmip(5, kmip_of(5)), expect(1, Some(kmip_of(11))), put_kmip(1, kmip_of(13))])),
            ("absent, but there", group([put_kmip(5, kmip_of(5)), expect(4, None)])),
            ("there, but deleted", group([put_kmip(5, kmip_of(5)), expect(2, Some(kmip_of(2)))])),
        ] {
            match store.commit_blocking(stale) {
                Err(StoreError::Conflict { what: w }) => assert!(w.starts_with("KmipObjects "), "{w}"),
                other => panic!("{what}: not a conflict: {:?}", other.map_err(|e| e.to_string())),
            }
        }
        assert_eq!(kmip(1), Some(kmip_of(12)));
        assert_eq!(kmip(5), None, "nothing of a group whose expect failed is written");
        // Rows copied from another store (migrate-store).
        let import = |i: u32, v: Vec<u8>| Op::Import { table: Table::KmipObjects, key: id(i).to_vec(), value: v.into() };
        store.commit_blocking(group([import(7, kmip_of(107)), import(0, kmip_of(100))])).unwrap();
        // Scans in key order, with every kind of bound and an early stop.
        let all = kmip_rows(store.as_ref(), (Bound::Unbounded, Bound::Unbounded));
        let want: Vec<_> = [(0, kmip_of(100)), (1, kmip_of(12)), (3, kmip_of(3)), (4, kmip_of(4)), (7, kmip_of(107))]
            .into_iter()
            .map(|(i, v)| (id(i).to_vec(), v))
            .collect();
        assert_eq!(all, want);
        let (lo, hi) = (id(1), id(4));
        let ids = |r: Vec<Vec<u8>>| r.iter().map(|k| u32::from_be_bytes(k[..4].try_into().unwrap())).collect::<Vec<_>>();
        let t = Table::KmipObjects;
        assert_eq!(ids(keys(store.as_ref(), t, (Bound::Included(&lo[..]), Bound::Excluded(&hi[..])), usize::MAX)), [1, 3]);
        assert_eq!(ids(keys(store.as_ref(), t, (Bound::Excluded(&lo[..]), Bound::Included(&hi[..])), usize::MAX)), [3, 4]);
        assert_eq!(ids(keys(store.as_ref(), t, (Bound::Unbounded, Bound::Unbounded), 2)), [0, 1]);
        // Keys are 16 bytes; an object table has no last row.
        let short = Op::Put { table: t, key: vec![1, 2, 3], value: b"x".to_vec() };
        assert!(matches!(store.commit_blocking(group([put_kmip(6, kmip_of(6)), short])), Err(StoreError::BadKey { table: Table::KmipObjects })));
        assert!(matches!(store.get(t, &[0u8; 15]), Err(StoreError::BadKey { table: Table::KmipObjects })));
        assert!(matches!(store.last(t), Err(StoreError::WrongTable { table: Table::KmipObjects })));
        assert_eq!(kmip(6), None);
        drop(store);
        let store = f.open_store().unwrap();
        assert_eq!(kmip_rows(store.as_ref(), (Bound::Unbounded, Bound::Unbounded)), want, "durable across a reopen");
    }

    /// A KMIP object larger than 64 KiB is refused, naming the table and the sizes, before
    /// anything of its group is written, and fails alone among groups sharing a commit;
    /// 64 KiB itself is taken.
    pub fn a_kmip_object_over_64_kib_is_refused_and_nothing_of_its_group_is_written(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create_store().unwrap();
        let max = kms_server::store::KMIP_OBJECT_MAX;
        assert_eq!(max, 64 * 1024);
        let half = || Op::Put { table: Table::Meta, key: b"half".to_vec(), value: b"written".to_vec() };
        let import = |i: u32, v: Vec<u8>| Op::Import { table: Table::KmipObjects, key: id(i).to_vec(), value: v.into() };
        let big = vec![7u8; max + 1];
        let refused = |r: Result<(), StoreError>| match r {
            Err(e @ StoreError::ValueTooLarge { table: Table::KmipObjects, len: 65_537, max: 65_536 }) => {
                let msg = e.to_string();
                assert!(msg.contains("KmipObjects") && msg.contains("65537 bytes") && msg.contains("65536 bytes"), "{msg}");
            }
            other => panic!("not refused as too large: {:?}", other.map_err(|e| e.to_string())),
        };
        refused(store.commit_blocking(group([half(), put_kmip(1, kmip_of(1)), put_kmip(2, big.clone())])));
        refused(store.commit_blocking(group([half(), import(3, big.clone())])));
        let rt = rt();
        refused(rt.block_on(store.commit(group([put_kmip(1, kmip_of(1)), put_kmip(2, big.clone()), half()]))));
        let results = rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 10..30u32 {
                let s = store.clone();
                let value = if i == 20 { big.clone() } else { kmip_of(i) };
                tasks.push(tokio::spawn(async move { s.commit(group([put_kmip(i, value)])).await }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        for (i, r) in (10..30u32).zip(results) {
            if i == 20 {
                refused(r);
            } else {
                r.unwrap();
            }
        }
        assert_eq!(store.get(Table::Meta, b"half").unwrap(), None, "nothing of a refused group is written");
        for i in [1, 2, 3, 20] {
            assert_eq!(store.get(Table::KmipObjects, &id(i)).unwrap(), None, "object {i}");
        }
        for i in (10..30u32).filter(|&i| i != 20) {
            assert_eq!(store.get(Table::KmipObjects, &id(i)).unwrap(), Some(kmip_of(i)), "the groups beside it commit");
        }
        let full = vec![8u8; max];
        store.commit_blocking(group([put_kmip(2, full.clone()), import(3, full.clone())])).unwrap();
        assert_eq!(store.get(Table::KmipObjects, &id(2)).unwrap(), Some(full.clone()));
        assert_eq!(store.get(Table::KmipObjects, &id(3)).unwrap(), Some(full));
    }

    /// KmipObjects takes no counter, no numbered insert, no secret put: each is refused and
    /// nothing of its group is written.
    pub fn kmip_objects_refuse_increment_insert_and_put_secret(kind: Kind) {
        let f = Fixture::new(kind);
        let store = f.create_store().unwrap();
        let key = id(1).to_vec();
        for (what, op) in [
            ("Increment", Op::Increment { table: Table::KmipObjects, key: key.clone(), by: 1 }),
            ("Insert", Op::Insert { table: Table::KmipObjects, value: kmip_of(1) }),
            ("PutSecret", Op::PutSecret { table: Table::KmipObjects, key: key.clone(), value: secret_of(1).to_vec().into() }),
        ] {
            let half = Op::Put { table: Table::Meta, key: b"half".to_vec(), value: b"written".to_vec() };
            match store.commit_blocking(group([half, put_kmip(2, kmip_of(2)), op])) {
                Err(StoreError::WrongTable { table: Table::KmipObjects }) => {}
                other => panic!("{what} on KmipObjects: {:?}", other.map_err(|e| e.to_string())),
            }
        }
        assert_eq!(store.get(Table::Meta, b"half").unwrap(), None);
        assert_eq!(kmip_rows(store.as_ref(), (Bound::Unbounded, Bound::Unbounded)), vec![], "nothing of the refused groups");
    }

    /// Runs each named contract test once per store.
    macro_rules! per_store {
        ($($name:ident),* $(,)?) => {
            mod redb {
                $( #[test] fn $name() { super::$name(super::Kind::Redb) } )*
            }
            mod postgres {
                $( #[test] fn $name() { super::$name(super::Kind::Postgres) } )*
            }
        };
    }

    per_store!(
        concurrent_writes_are_all_durable_after_reopen,
        appends_are_numbered_without_gaps_and_linked_across_a_restart,
        a_group_with_a_bad_op_writes_nothing,
        a_group_whose_expect_fails_writes_nothing_and_fails_alone,
        reads_by_key_and_by_range,
        opening_a_store_that_was_never_made_is_refused,
        a_store_of_a_newer_format_is_refused,
        a_scrub_keeps_every_live_row_and_writes_go_on,
        imported_rows_keep_their_bytes_and_appends_continue_the_chain,
        writes_of_one_row_in_one_group_apply_in_order,
        kmip_objects_put_get_overwrite_delete_expect_scan_and_import,
        a_kmip_object_over_64_kib_is_refused_and_nothing_of_its_group_is_written,
        kmip_objects_refuse_increment_insert_and_put_secret,
    );

    /// A database of schema format 1 (made before KmipObjects) is upgraded at open: the
    /// table made and the format set to 2 in one transaction, also when several replicas
    /// open it at the same moment (each opens, one upgrades). A role that may not create
    /// tables gets the upgrade's own error, and the database stays as it was.
    #[test]
    fn a_postgres_database_of_format_1_is_upgraded_at_open_also_by_replicas_at_once() {
        let f = Fixture::new(Kind::Postgres);
        let pg = f.pg.as_ref().unwrap();
        let store = f.create_store().unwrap();
        store.commit_blocking(group([Op::Put { table: Table::Meta, key: b"kept".to_vec(), value: b"yes".to_vec() }])).unwrap();
        drop(store);
        let format = || pg.psql("kluis", "SELECT format FROM kluis_schema");
        let has_table = || pg.psql("kluis", "SELECT to_regclass('kluis_kmip_objects') IS NOT NULL") == "t";
        let to_format_1 = || pg.psql("kluis", "DROP TABLE kluis_kmip_objects; UPDATE kluis_schema SET format = 1");
        assert_eq!((format().as_str(), has_table()), ("2", true), "a new database is made at format 2");

        to_format_1();
        pg.psql("kluis", "CREATE ROLE app LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app");
        let app = PgOptions { url: format!("postgresql://app@{}/kluis", pg.host()), password: None, ca_file: None };
        match PostgresStore::open(&app, AuditChain::new()) {
            Err(e @ StoreError::SchemaUpgrade { found: 1, supported: 2, .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("from format 1 to 2") && msg.contains("permission denied"), "{msg}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a role that cannot create tables upgraded the schema"),
        }
        assert_eq!((format().as_str(), has_table()), ("1", false), "a failed upgrade changes nothing");

        for round in 0..3u32 {
            if round > 0 {
                to_format_1();
            }
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (opts, barrier) = (f.opts(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        PostgresStore::open(&opts, AuditChain::new())
                    })
                })
                .collect();
            let stores: Vec<PostgresStore> =
                threads.into_iter().map(|t| t.join().unwrap().unwrap_or_else(|e| panic!("round {round}: an open failed: {e}"))).collect();
            assert_eq!((format().as_str(), has_table()), ("2", true), "round {round}");
            stores[0].commit_blocking(group([put_kmip(round, kmip_of(round))])).unwrap();
            assert_eq!(stores[3].get(Table::KmipObjects, &id(round)).unwrap(), Some(kmip_of(round)));
            assert_eq!(stores[1].get(Table::Meta, b"kept").unwrap().as_deref(), Some(&b"yes"[..]), "the rows of format 1 kept");
        }
    }

    /// The PostgreSQL scrub rewrites the tables that hold secrets: the bytes of a deleted
    /// and of an overwritten KMIP object, and of a deleted key secret, leave the database's
    /// files (the WAL aside, as documented); the live rows stay.
    #[test]
    fn a_postgres_scrub_removes_deleted_kmip_objects_and_key_secrets_from_the_table_files() {
        let f = Fixture::new(Kind::Postgres);
        let pg = f.pg.as_ref().unwrap();
        let store = f.create_store().unwrap();
        let secret = |i: u32| Op::PutSecret { table: Table::KeySecrets, key: id(i).to_vec(), value: secret_of(i).to_vec().into() };
        store.commit_blocking(group([put_kmip(1, kmip_of(1)), put_kmip(2, kmip_of(2)), put_kmip(3, kmip_of(3)), secret(1), secret(2)])).unwrap();
        store.commit_blocking(group([put_kmip(3, kmip_of(103))])).unwrap();
        store
            .commit_blocking(group([
                Op::Delete { table: Table::KmipObjects, key: id(2).to_vec() },
                Op::Delete { table: Table::KeySecrets, key: id(2).to_vec() },
            ]))
            .unwrap();
        let file = |table: &str| pg.data.join(pg.psql("kluis", &format!("SELECT pg_relation_filepath('{table}')")));
        // The premise: deleted or overwritten, the bytes are still in the tables' files.
        pg.psql("kluis", "CHECKPOINT");
        let (objects, secrets) = (std::fs::read(file("kluis_kmip_objects")).unwrap(), std::fs::read(file("kluis_key_secrets")).unwrap());
        assert!(contains(&objects, &kmip_of(2)) && contains(&objects, &kmip_of(3)), "before the scrub the old objects are in the heap");
        assert!(contains(&secrets, &secret_of(2)), "before the scrub the deleted secret is in the heap");

        rt().block_on(store.scrub()).unwrap();
        pg.psql("kluis", "CHECKPOINT");
        // Every file of the database (the old heaps are truncated once rewritten).
        let db_dir = file("kluis_kmip_objects").parent().unwrap().to_owned();
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&db_dir).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        for (what, gone) in [("deleted object", kmip_of(2)), ("overwritten object", kmip_of(3)), ("deleted secret", secret_of(2).to_vec())] {
            assert!(!contains(&all, &gone), "after the scrub the {what} is in no file of the database");
        }
        let (objects, secrets) = (std::fs::read(file("kluis_kmip_objects")).unwrap(), std::fs::read(file("kluis_key_secrets")).unwrap());
        assert!(contains(&objects, &kmip_of(1)) && contains(&objects, &kmip_of(103)) && contains(&secrets, &secret_of(1)));
        assert_eq!(store.get(Table::KmipObjects, &id(1)).unwrap(), Some(kmip_of(1)));
        assert_eq!(store.get(Table::KmipObjects, &id(3)).unwrap(), Some(kmip_of(103)));
        assert_eq!(store.get(Table::KmipObjects, &id(2)).unwrap(), None);
        assert_eq!(store.get(Table::KeySecrets, &id(1)).unwrap().as_deref(), Some(&secret_of(1)[..]));
    }

    /// The maintenance lease between two replicas on one database, on a clock the test
    /// moves: the holder keeps it while it renews; a contender takes it only after seeing
    /// the same row for the lease time; the old holder's fence then writes nothing; a
    /// released lease is taken at once.
    #[test]
    fn the_maintenance_lease_moves_only_when_its_holder_stops_renewing_and_fences_it_off() {
        use kms_server::keys::lease::{FENCE_META, Lease, Tick};
        use std::time::{Duration, Instant};
        let f = Fixture::new(Kind::Postgres);
        let a = f.create();
        let b = f.open().unwrap();
        let rt = rt();
        let ttl = Duration::from_secs(10);
        let (la, lb) = (Lease::new("replica-a".into(), ttl), Lease::new("replica-b".into(), ttl));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(rt.block_on(la.tick(&a, at(0))).unwrap(), Tick::Took { token: 1, from: None });
        let fence1 = la.fence(at(0)).expect("the holder may work");
        assert_eq!(fence1.token(), 1);
        assert_eq!(rt.block_on(lb.tick(&b, at(0))).unwrap(), Tick::Following { holder: "replica-a".into(), first: true });
        // A renews every quarter of the lease time for three lease times: B never takes it.
        let mut now = 0;
        for _ in 0..12 {
            now += 2_500;
            assert_eq!(rt.block_on(la.tick(&a, at(now))).unwrap(), Tick::Renewed);
            assert!(matches!(rt.block_on(lb.tick(&b, at(now))).unwrap(), Tick::Following { .. }));
            assert!(lb.fence(at(now)).is_none());
        }
        // A stops renewing (stalled). It stops working at half the lease time.
        assert!(la.fence(at(now + 4_999)).is_some());
        assert!(la.fence(at(now + 5_000)).is_none(), "the holder stops at ttl/2 without a renewal");
        let seen = now + 1_000;
        assert_eq!(rt.block_on(lb.tick(&b, at(seen))).unwrap(), Tick::Following { holder: "replica-a".into(), first: false });
        assert_eq!(rt.block_on(lb.tick(&b, at(now + 9_999))).unwrap(), Tick::Following { holder: "replica-a".into(), first: false });
        assert_eq!(
            rt.block_on(lb.tick(&b, at(now + 10_000))).unwrap(),
            Tick::Took { token: 2, from: Some("replica-a".into()) },
            "taken over a lease time after the row last changed"
        );
        let fence2 = lb.fence(at(now + 10_000)).unwrap();
        assert_eq!(fence2.token(), 2);
        // A, stalled, still believes in its old fence: its write commits nothing.
        let stale = la.fence(at(now)).expect("as A saw it before it stalled");
        let write = |r: &Registry, fence: kms_server::keys::lease::Fence, what: &[u8]| {
            rt.block_on(r.write(WriteOp::Atomic(vec![fence.expect(), WriteOp::PutMeta { key: "swept", value: what.to_vec() }, WriteOp::Audit(event("kms-server"))])))
        };
        let before = a.store().last(Table::Audit).unwrap();
        match write(&a, stale, b"by A") {
            Err(kms_server::keys::registry::RegistryError::Store(StoreError::Conflict { what })) => {
                assert!(what.contains("maintenance_fence"), "{what}")
            }
            other => panic!("a fenced-off write was not refused: {:?}", other.err().map(|e| e.to_string())),
        }
        assert_eq!(a.get_meta("swept").unwrap(), None);
        assert_eq!(a.store().last(Table::Audit).unwrap().map(|r| r.0), before.map(|r| r.0), "no audit entry of the refused write");
        write(&b, fence2, b"by B").unwrap();
        assert_eq!(b.get_meta("swept").unwrap().as_deref(), Some(&b"by B"[..]));
        assert_eq!(b.get_meta(FENCE_META).unwrap().as_deref(), Some(&2u64.to_be_bytes()[..]));
        // A wakes up: it has lost the lease, and says to whom.
        assert_eq!(rt.block_on(la.tick(&a, at(now + 11_000))).unwrap(), Tick::Lost { to: Some("replica-b".into()) });
        assert!(la.fence(at(now + 11_000)).is_none());
        // B shuts down and releases it: A takes it at its next tick, not a lease time later.
        assert!(rt.block_on(lb.release(&b)).unwrap());
        assert!(lb.fence(at(now + 11_000)).is_none());
        assert_eq!(rt.block_on(la.tick(&a, at(now + 11_001))).unwrap(), Tick::Took { token: 3, from: None });
        assert!(!rt.block_on(lb.release(&b)).unwrap(), "B no longer holds it");
    }

    /// On a store only one process can write (redb), the lease is the opener's at once,
    /// whoever held it before (a process killed without releasing it).
    #[test]
    fn on_an_exclusive_store_the_lease_is_taken_at_once() {
        use kms_server::keys::lease::{Lease, Tick};
        use std::time::{Duration, Instant};
        let f = Fixture::new(Kind::Redb);
        let rt = rt();
        let now = Instant::now();
        let first = f.create();
        let l1 = Lease::new("first".into(), Duration::from_secs(10));
        assert_eq!(rt.block_on(l1.tick(&first, now)).unwrap(), Tick::Took { token: 1, from: None });
        assert_eq!(rt.block_on(l1.tick(&first, now + Duration::from_secs(3))).unwrap(), Tick::Renewed);
        drop(first);
        let second = f.open().unwrap();
        let l2 = Lease::new("second".into(), Duration::from_secs(10));
        assert_eq!(rt.block_on(l2.tick(&second, now)).unwrap(), Tick::Took { token: 2, from: Some("first".into()) });
        assert_eq!(l2.fence(now).unwrap().token(), 2);
    }

    /// A chain that signs (with `key`) and anchors its committed checkpoints to `file`.
    fn signing_chain(key: &Arc<ring::signature::Ed25519KeyPair>, file: &std::path::Path) -> Arc<AuditChain> {
        use kms_server::audit::anchor::AnchorTarget;
        let chain = AuditChain::new();
        chain.set_signer(key.clone(), Ok(kms_server::audit::integrity::Checked::default())).unwrap();
        chain.set_anchors(vec![AnchorTarget::File(file.to_owned())]).unwrap();
        chain
    }

    /// Two replicas on one database append to one chain, each signing the checkpoints its
    /// own transactions reach, bound to the checkpoint before whichever replica signed it.
    #[test]
    fn two_replicas_sign_alternate_checkpoints_of_one_chain_without_a_false_alarm() {
        use ring::signature::KeyPair;
        let f = Fixture::new(Kind::Postgres);
        let dir = tempfile::tempdir().unwrap();
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = Arc::new(ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap());
        let (anchor_a, anchor_b) = (dir.path().join("a.anchor"), dir.path().join("b.anchor"));
        let (chain_a, chain_b) = (signing_chain(&key, &anchor_a), signing_chain(&key, &anchor_b));
        let a = Registry::new(Arc::new(PostgresStore::create(&f.opts(), chain_a.clone()).unwrap()));
        let b = Registry::new(Arc::new(PostgresStore::open(&f.opts(), chain_b.clone()).unwrap()));
        let rt = rt();
        // 1..=256 through A, 257..=512 through B, 513 through A.
        for (store, n) in [(&a, 256), (&b, 256), (&a, 1)] {
            for _ in 0..n {
                rt.block_on(store.write(WriteOp::Audit(event("host")))).unwrap();
            }
        }
        assert!(chain_a.alarmed().is_none(), "A: {:?}", chain_a.alarmed());
        assert!(chain_b.alarmed().is_none(), "B alarmed over the checkpoint A signed: {:?}", chain_b.alarmed());
        for seq in [256, 512] {
            assert!(a.store().get(Table::Checkpoints, &id_key(seq)).unwrap().is_some(), "checkpoint {seq} signed");
        }
        // The whole chain verifies, checkpoints included, as the next start checks it.
        let checked = kms_server::audit::integrity::check_at_start(a.store(), key.public_key().as_ref()).unwrap().unwrap();
        assert_eq!(checked.head_seq, 513);
        assert_eq!(checked.checkpoint_hashes.last().unwrap().0, 512);
        // Each replica anchored the checkpoint its own commit holds, and only that one.
        let (text_a, text_b) = (std::fs::read_to_string(&anchor_a).unwrap(), std::fs::read_to_string(&anchor_b).unwrap());
        assert_eq!((text_a.lines().count(), text_b.lines().count()), (1, 1), "A: {text_a}\nB: {text_b}");
        assert!(text_a.contains("\"seq\":256") && text_b.contains("\"seq\":512"), "A: {text_a}\nB: {text_b}");
    }
}
