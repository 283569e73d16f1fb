//! Writes the seed corpora: valid inputs made by the project's own code and binaries,
//! small, one folder per target. Run by `scripts/fuzz seeds` (which builds the binaries
//! first: the audit export, the configs and the revocation list come from a real
//! `kms-server dev` and the real CLIs).
//!
//! Usage: `make_seeds OUT_DIR` (the repository's `fuzz/corpus`). Every target's folder is
//! emptied and written again; the regressions (`fuzz/regressions`) are left alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use age_core::format::FileKey;
use kluis_age::secret::{DataKey, IssuedKey};
use kluis_age::stream::{Tuning, header, seal_payload};
use kluis_fuzz_targets::{DATA_KEY, FILE_KEY, IDENTITY, TARGETS, rpc};
use kluis_proto::v1 as pb;
use prost::Message;

struct Out(PathBuf);

impl Out {
    fn put(&self, target: &str, name: &str, data: &[u8]) {
        assert!(TARGETS.iter().any(|(t, _)| *t == target), "no target {target}");
        std::fs::write(self.0.join(target).join(name), data).unwrap();
    }
}

fn sealed(recovery: &str, payload: &[u8]) -> Vec<u8> {
    let key = IssuedKey {
        key_id: "00112233445566778899aabbccddeeff".into(),
        keyring: "default".into(),
        version: 1,
        data_key: DataKey::from_slice(&DATA_KEY).unwrap(),
        wrapped: vec![1u8; 65],
        recovery_recipient: Some(recovery.to_owned()),
    };
    kluis_age::sealed::seal(&key, payload, Vec::new()).unwrap().0
}

fn age_files(out: &Out) {
    let id: age::x25519::Identity = IDENTITY.parse().unwrap();
    let recipient = id.to_public();
    for (name, payload) in [("empty", Vec::new()), ("short", b"nightly dump\n".to_vec()), ("two-chunks", vec![0x5a; 64 * 1024 + 100])] {
        let file = sealed(&recipient.to_string(), &payload);
        if payload.len() < 1024 {
            out.put("header", &format!("valid-sealed-{name}.age"), &file);
        }
        out.put("unseal", &format!("valid-sealed-{name}.age"), &file);
        if name == "short" {
            let (h, _) = header::read(&mut &file[..]).unwrap();
            let st = h.stanzas.iter().find(|s| s.tag == kluis_age::sealed::STANZA_TAG).unwrap();
            let mut seed = st.args.join(" ").into_bytes();
            seed.push(b'\n');
            seed.extend_from_slice(&st.body);
            out.put("stanza", "valid-kluis-stanza.bin", &seed);
        }
    }
    // A file of the stock age crate, to the recovery identity.
    let stock = age::encrypt(&recipient, b"made by the age crate\n").unwrap();
    out.put("header", "valid-stock-age.age", &stock);
    out.put("unseal", "valid-stock-age.age", &stock);
    // A payload alone under the fixed file key (the target's payload-only pass).
    let fk = FileKey::new(Box::new(FILE_KEY));
    let mut payload = Vec::new();
    seal_payload(&fk, &mut &b"payload under the fixed file key"[..], &mut payload, Tuning { workers: 0, batch_chunks: 1 }).unwrap();
    out.put("unseal", "payload-fixed-file-key.bin", &payload);
}

fn escrow(out: &Out, tmp: &Path) -> String {
    let holders = kluis_escrow::test_support::holders(&["alice", "bob", "carol"]);
    let custodians: Vec<_> = holders.iter().map(|h| h.custodian.clone()).collect();
    let dir = tmp.join("ceremony");
    kluis_escrow::ceremony(2, &custodians, &dir).unwrap();
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    out.put("manifest", "valid-manifest.json", manifest.as_bytes());
    for (h, text) in holders.iter().zip(kluis_escrow::test_support::share_texts(&dir, &holders)) {
        out.put("share", &format!("valid-share-{}.txt", h.custodian.name), text.as_bytes());
    }
    manifest
}

fn requests(out: &Out, manifest_json: String) {
    let key_id = "00112233445566778899aabbccddeeff".to_owned();
    let wrapped = vec![1u8; 65];
    let mark_key_id = key_id.clone();
    let mut labels = HashMap::new();
    labels.insert("tool".to_owned(), "restic".to_owned());
    labels.insert("host".to_owned(), "db01".to_owned());
    let reqs: Vec<(&str, Vec<u8>)> = vec![
        ("GenerateDataKey", pb::GenerateDataKeyRequest { keyring: "ehr-db".into(), backup_id: "nightly-2026-01-01".into(), labels }.encode_to_vec()),
        ("UnwrapDataKey", pb::UnwrapDataKeyRequest { key_id: key_id.clone(), wrapped_key: wrapped.clone(), keyring: "ehr-db".into() }.encode_to_vec()),
        (
            "RecordRestoreTest",
            pb::RecordRestoreTestRequest {
                keyring: "ehr-db".into(),
                key_id: key_id.clone(),
                backup_id: "nightly".into(),
                ok: false,
                detail: "chunk 3 failed".into(),
                bytes: 1 << 20,
                duration_ms: 1200,
                host: "restore01".into(),
            }
            .encode_to_vec(),
        ),
        ("RewrapDataKey", pb::RewrapDataKeyRequest { key_id: key_id.clone(), wrapped_key: wrapped, keyring: "ehr-db".into() }.encode_to_vec()),
        ("CreateKeyring", pb::CreateKeyringRequest { name: "pacs.images_2".into(), retention_days: 90, rotation_period_days: 30 }.encode_to_vec()),
        ("ListKeyrings", pb::ListKeyringsRequest {}.encode_to_vec()),
        ("GetKeyring", pb::GetKeyringRequest { name: "ehr-db".into() }.encode_to_vec()),
        ("RotateKeyring", pb::RotateKeyringRequest { name: "ehr-db".into() }.encode_to_vec()),
        ("ChangeGrant", pb::ChangeGrantRequest { keyring: "ehr-db".into(), principal: "backup02".into(), role: "sealer".into(), grant: true }.encode_to_vec()),
        ("ListGrants", pb::ListGrantsRequest { keyring: "ehr-db".into() }.encode_to_vec()),
        ("RetireKeyringVersions", pb::RetireKeyringVersionsRequest { keyring: "ehr-db".into(), below_version: 2, force: false }.encode_to_vec()),
        ("Approve", pb::ApproveRequest { id: 7 }.encode_to_vec()),
        ("ListApprovals", pb::ListApprovalsRequest {}.encode_to_vec()),
        ("InstallEscrow", pb::InstallEscrowRequest { manifest_json, allow_new_recipient: true }.encode_to_vec()),
        ("GetEscrowStatus", pb::GetEscrowStatusRequest {}.encode_to_vec()),
        ("RemoveEscrow", pb::RemoveEscrowRequest {}.encode_to_vec()),
        ("SetKeyringPolicy", pb::SetKeyringPolicyRequest { name: "ehr-db".into(), retention_days: Some(365), rotation_period_days: None }.encode_to_vec()),
        ("SetLegalHold", pb::SetLegalHoldRequest { keyring: "ehr-db".into(), hold: true, reason: "case 2026-17".into() }.encode_to_vec()),
        ("GetDataKey", pb::GetDataKeyRequest { key_id: key_id.clone() }.encode_to_vec()),
        ("DestroyKey", pb::DestroyKeyRequest { key_id }.encode_to_vec()),
        ("DestroyKeyring", pb::DestroyKeyringRequest { name: "ehr-db".into() }.encode_to_vec()),
        ("CancelDestruction", pb::CancelDestructionRequest { id: 3 }.encode_to_vec()),
        ("ListDestructions", pb::ListDestructionsRequest {}.encode_to_vec()),
        ("RotateMaster", pb::RotateMasterRequest {}.encode_to_vec()),
        ("GetReport", pb::GetReportRequest { since: "2026-01-01T00:00:00Z".into() }.encode_to_vec()),
        ("ExportAudit", pb::ExportAuditRequest { since: "2026-01-01T00:00:00.000Z".into(), tail: 10 }.encode_to_vec()),
        ("GetAuditPublicKey", pb::GetAuditPublicKeyRequest {}.encode_to_vec()),
        ("FindDataKeys", pb::FindDataKeysRequest { backup_id: "ehr-db/2026-11-22T02:00Z/full".into(), keyring: "ehr-db".into() }.encode_to_vec()),
        (
            "MarkDataKeyEscrowed",
            pb::MarkDataKeyEscrowedRequest {
                key_id: mark_key_id,
                wrapped_key: vec![1u8; 65],
                keyring: "ehr-db".into(),
                recovery_recipient: "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p".into(),
            }
            .encode_to_vec(),
        ),
    ];
    assert_eq!(reqs.len(), rpc::RPCS.len(), "a seed per RPC");
    for (name, body) in reqs {
        let mut seed = vec![rpc::selector(name).unwrap()];
        seed.extend_from_slice(&body);
        out.put("rpc", &format!("valid-{name}.bin"), &seed);
    }
}

/// The audit export, configs and a revocation list, from a real dev server and the CLIs.
fn from_a_server(out: &Out) {
    use kluis_tests::*;
    let server = Server::start();
    ok(&server.kmsctl("officer", &["keyring", "create", "ehr-db", "--retention-days", "90"]), "keyring create");
    seal(&server, "sealer", "default", "nightly-1", b"backup");
    let refused = server.kmsctl("sealer", &["keyring", "create", "nope"]);
    assert!(!refused.status.success());
    let export = server.kmsctl("auditor", &["audit", "export"]);
    ok(&export, "audit export");
    let key = server.kmsctl("auditor", &["audit", "public-key"]);
    ok(&key, "audit public-key");
    let hex_key = stdout(&key).lines().find(|l| !l.starts_with('#') && !l.trim().is_empty()).unwrap().trim().to_owned();
    let mut seed = hex::decode(hex_key).unwrap();
    assert_eq!(seed.len(), 32);
    seed.extend_from_slice(&export.stdout);
    out.put("audit_export", "valid-dev-export.jsonl", &seed);

    out.put("server_config", "valid-dev-server.toml", &std::fs::read(server.data_dir().join("server.toml")).unwrap());
    for who in ["sealer", "auditor"] {
        out.put("client_config", &format!("valid-{who}.toml"), &std::fs::read(server.client(who)).unwrap());
    }
    let mut list = String::from("# revoked client certificates (SHA-256 of the DER)\n\n");
    for who in ["sealer", "restorer"] {
        let pem = std::fs::read_to_string(server.data_dir().join(format!("pki/clients/{who}.pem"))).unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, &der));
        if who == "restorer" {
            let colons: Vec<String> = fp.as_bytes().chunks(2).map(|c| String::from_utf8(c.to_vec()).unwrap().to_uppercase()).collect();
            list.push_str(&format!("{}  # {who}, colon form\n", colons.join(":")));
        } else {
            list.push_str(&format!("{fp}  # {who}, stolen laptop\n"));
        }
    }
    out.put("revocation_list", "valid-revoked.txt", list.as_bytes());
}

/// KMIP requests of the operations and appliance sequences the server serves, as TTLV.
fn kmip_requests(out: &Out) {
    use kluis_kmip::message::{ContinuationOption, Operation, ProtocolVersion, Request, RequestHeader, RequestItem};
    use kluis_kmip::tag;
    use kluis_kmip::ttlv::{Item, encode};
    fn attr(name: &str, value: Item) -> Item {
        Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, name), value])
    }
    fn payload(children: Vec<Item>) -> Item {
        Item::structure(tag::REQUEST_PAYLOAD, children)
    }
    fn name(v: &str) -> Item {
        attr(
            "Name",
            Item::structure(tag::ATTRIBUTE_VALUE, vec![Item::text(tag::NAME_VALUE, v), Item::enumeration(tag::NAME_TYPE, 1)]),
        )
    }
    let aes256 = |extra: Vec<Item>| {
        let mut attrs = vec![
            attr("Cryptographic Algorithm", Item::enumeration(tag::ATTRIBUTE_VALUE, 3)),
            attr("Cryptographic Length", Item::integer(tag::ATTRIBUTE_VALUE, 256)),
            attr("Cryptographic Usage Mask", Item::integer(tag::ATTRIBUTE_VALUE, 12)),
        ];
        attrs.extend(extra);
        payload(vec![Item::enumeration(tag::OBJECT_TYPE, 2), Item::structure(tag::TEMPLATE_ATTRIBUTE, attrs)])
    };
    let uid = |u: &str| payload(vec![Item::text(tag::UNIQUE_IDENTIFIER, u)]);
    let one = |op: Operation, p: Item| vec![(op, p)];
    let cases: Vec<(&str, Vec<(Operation, Item)>)> = vec![
        ("discover-versions", one(Operation::DiscoverVersions, payload(vec![]))),
        (
            "query",
            one(
                Operation::Query,
                payload(vec![Item::enumeration(tag::QUERY_FUNCTION, 1), Item::enumeration(tag::QUERY_FUNCTION, 2)]),
            ),
        ),
        ("create-aes256", one(Operation::Create, aes256(vec![name("vsphere-kek-1")]))),
        (
            "create-lto",
            one(
                Operation::Create,
                aes256(vec![attr(
                    "Application Specific Information",
                    Item::structure(
                        tag::ATTRIBUTE_VALUE,
                        vec![Item::text(tag::APPLICATION_NAMESPACE, "LIBRARY-LTO"), Item::text(tag::APPLICATION_DATA, "0123456789ABCDEF")],
                    ),
                )]),
            ),
        ),
        ("get", one(Operation::Get, uid("1"))),
        ("locate-by-name", one(Operation::Locate, payload(vec![name("vsphere-kek-1")]))),
        ("activate-then-get", vec![(Operation::Activate, uid("1")), (Operation::Get, uid("1"))]),
        ("destroy", one(Operation::Destroy, uid("1"))),
    ];
    for (file, ops) in cases {
        let request = Request {
            header: RequestHeader {
                version: ProtocolVersion::new(1, 2),
                max_response_size: None,
                continuation: ContinuationOption::Stop,
                batch_order: true,
                batch_count: i32::try_from(ops.len()).unwrap(),
            },
            items: ops
                .into_iter()
                .enumerate()
                .map(|(i, (operation, payload))| RequestItem { operation, unique_id: Some(vec![u8::try_from(i).unwrap()]), payload })
                .collect(),
        };
        out.put("kmip", &format!("valid-{file}.ttlv"), &encode(&request.to_item()).unwrap());
    }
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: make_seeds OUT_DIR (fuzz/corpus)"));
    for (t, _) in TARGETS {
        // Only the seeds this generator makes (`valid-*`, `payload-*`) are replaced; hand-made
        // cases (`hand-*`) and past crashes (`crash-*`, ...) in the same folder are kept.
        let d = dir.join(t);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("valid-") || name.starts_with("payload-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    let out = Out(dir.clone());
    let tmp = tempfile::tempdir().unwrap();
    age_files(&out);
    let manifest = escrow(&out, tmp.path());
    requests(&out, manifest);
    from_a_server(&out);
    kmip_requests(&out);
    for (t, _) in TARGETS {
        let n = std::fs::read_dir(dir.join(t)).unwrap().count();
        println!("{t}: {n} seeds");
    }
}
