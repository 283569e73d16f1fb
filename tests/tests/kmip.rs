//! KMIP end to end: PyKMIP (the real client, its own encoding) against the real
//! `kms-server` over mutual TLS; malformed TTLV from a raw TLS connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kluis_kmip::message::{ContinuationOption, Operation, ProtocolVersion, Request, RequestHeader, RequestItem, Response, ResultReason};
use kluis_kmip::tag;
use kluis_kmip::ttlv::{Item, Limits, decode, encode};
use kluis_tests::{Server, kmip};
use serde_json::{Value, json};

fn server() -> Server {
    Server::start_with_args(&["--kmip-listen", "127.0.0.1:0"])
}

/// One step's result, which must be a success.
fn ok(v: &Value) -> &Value {
    assert!(v.get("error").is_none() && v.get("status").is_none_or(|s| s == "SUCCESS"), "step failed: {v}");
    v
}

/// One step's result, which must be a failure with `reason`.
fn refused<'a>(v: &'a Value, reason: &str) -> &'a Value {
    assert_eq!(v["status"], "OPERATION_FAILED", "{v}");
    assert_eq!(v["reason"], reason, "{v}");
    v
}

fn audit_lines(s: &Server, action: &str) -> Vec<String> {
    let out = s.kmsctl("auditor", &["audit", "export"]);
    assert!(out.status.success(), "{}", kluis_tests::stderr(&out));
    kluis_tests::stdout(&out).lines().filter(|l| l.contains(&format!("\"{action}\""))).map(str::to_owned).collect()
}

/// The response a raw step got, decoded.
fn response(v: &Value) -> Response {
    let bytes = hex::decode(v["response"].as_str().unwrap()).unwrap();
    assert!(!bytes.is_empty(), "no response: {v}");
    Response::from_item(&decode(&bytes, &Limits::default()).unwrap()).unwrap()
}

fn request(max_response_size: Option<i32>, items: Vec<(Operation, Item)>) -> Vec<u8> {
    let r = Request {
        header: RequestHeader {
            version: ProtocolVersion::new(1, 2),
            max_response_size,
            continuation: ContinuationOption::Stop,
            batch_order: true,
            batch_count: i32::try_from(items.len()).unwrap(),
        },
        items: items.into_iter().map(|(operation, payload)| RequestItem { operation, unique_id: None, payload }).collect(),
    };
    encode(&r.to_item()).unwrap().to_vec()
}

fn query_payload(functions: &[u32]) -> Item {
    Item::structure(tag::REQUEST_PAYLOAD, functions.iter().map(|f| Item::enumeration(tag::QUERY_FUNCTION, *f)).collect())
}

#[test]
fn discover_versions_and_query_answer_pykmip_over_mutual_tls() {
    let s = server();
    let r = kmip::run(
        &s,
        "sealer",
        json!([
            {"op": "discover_versions"},
            {"op": "discover_versions", "versions": [[2, 0], [1, 2], [1, 0]]},
            {"op": "discover_versions", "versions": [[3, 0]]},
            {"op": "query", "functions": ["QUERY_OPERATIONS", "QUERY_OBJECTS", "QUERY_SERVER_INFORMATION"]},
        ]),
    );
    assert_eq!(r[0], json!({"status": "SUCCESS", "versions": [[1, 4], [1, 3], [1, 2], [1, 1], [1, 0]]}));
    // The versions both speak, in the server's order; none in common is an empty list.
    assert_eq!(r[1], json!({"status": "SUCCESS", "versions": [[1, 2], [1, 0]]}));
    assert_eq!(r[2], json!({"status": "SUCCESS", "versions": []}));
    assert_eq!(r[3]["status"], "SUCCESS", "{}", r[3]);
    assert_eq!(
        r[3]["operations"],
        json!([
            "CREATE", "CREATE_KEY_PAIR", "REGISTER", "LOCATE", "GET", "GET_ATTRIBUTES", "GET_ATTRIBUTE_LIST", "ADD_ATTRIBUTE",
            "MODIFY_ATTRIBUTE", "DELETE_ATTRIBUTE", "ACTIVATE", "REVOKE", "DESTROY", "QUERY", "DISCOVER_VERSIONS"
        ])
    );
    assert_eq!(r[3]["object_types"], json!(["SYMMETRIC_KEY", "PUBLIC_KEY", "PRIVATE_KEY", "SECRET_DATA"]));
    assert!(r[3]["vendor"].as_str().unwrap().starts_with("Kluis "), "{}", r[3]);
}

#[test]
fn a_batch_is_answered_item_by_item_in_one_response() {
    let s = server();
    let r = kmip::run(
        &s,
        "sealer",
        json!([{"op": "batch", "items": [{"op": "discover_versions"}, {"op": "query", "functions": ["QUERY_OPERATIONS"]}]}]),
    );
    let items = r[0]["items"].as_array().unwrap_or_else(|| panic!("{}", r[0]));
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["versions"][0], json!([1, 4]));
    assert_eq!(items[1]["operations"].as_array().unwrap().len(), 15, "{}", items[1]);
}

#[test]
fn an_operation_not_served_gets_operation_not_supported_and_the_connection_goes_on() {
    let s = server();
    let uid = Item::structure(tag::REQUEST_PAYLOAD, vec![Item::text(tag::UNIQUE_IDENTIFIER, "1")]);
    let archive = request(None, vec![(Operation::Archive, uid)]);
    let query = request(None, vec![(Operation::Query, query_payload(&[1]))]);
    let mut both = archive.clone();
    both.extend_from_slice(&query);
    // Two requests on one connection: the second is answered after the first's refusal.
    let r = kmip::run(&s, "sealer", json!([{"op": "raw", "hex": hex::encode(&both), "read": "two"}]));
    let bytes = hex::decode(r[0]["response"].as_str().unwrap()).unwrap();
    let first_len = 8 + usize::try_from(u32::from_be_bytes(bytes[4..8].try_into().unwrap())).unwrap();
    let first = Response::from_item(&decode(&bytes[..first_len], &Limits::default()).unwrap()).unwrap();
    let f = first.items[0].result.clone().unwrap_err();
    assert_eq!(f.reason, ResultReason::OperationNotSupported);
    assert!(f.message.contains("operation Archive is not supported"), "{}", f.message);
    let second = Response::from_item(&decode(&bytes[first_len..], &Limits::default()).unwrap()).unwrap();
    assert!(second.items[0].result.is_ok(), "{:?}", second.items[0]);
}

/// Frames that do not decode get Invalid Message and a closed connection; the answer to a
/// declared size over the limit comes after its 8-byte header alone, so nothing was read or
/// held for it. After all of them the server serves as before.
#[test]
fn malformed_ttlv_gets_invalid_message_and_a_close_and_the_server_goes_on() {
    let s = server();
    let deep = {
        let mut b = Vec::new();
        for i in 0..64u32 {
            b.extend_from_slice(&[0x42, 0x00, 0x78, 0x01]);
            b.extend_from_slice(&((63 - i) * 8).to_be_bytes());
        }
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a declared size of 4 GiB", hex::decode("42007801fffffff8").unwrap(), "larger than the limit"),
        ("64 nested structures", deep, "nests deeper"),
        ("an Integer where a message starts", hex::decode("42007802000000040000000100000000").unwrap(), "not a Structure"),
        ("a tag outside the KMIP ranges", hex::decode("00000001000000080000000000000000").unwrap(), "outside the KMIP"),
        (
            "a child longer than its structure",
            hex::decode("4200780100000010420077070000001041414141414141414141414141414141").unwrap(),
            "past the end of its structure",
        ),
        ("non-zero padding", hex::decode("42007801000000104200770200000004000000010000FF00").unwrap(), "padding"),
    ];
    let steps: Vec<Value> = cases.iter().map(|(_, b, _)| json!({"op": "raw", "hex": hex::encode(b)})).collect();
    let r = kmip::run(&s, "sealer", Value::Array(steps));
    for ((what, _, needle), got) in cases.iter().zip(&r) {
        assert_eq!(got["closed"], true, "{what}: {got}");
        let resp = response(got);
        let f = resp.items[0].result.clone().unwrap_err();
        assert_eq!(f.reason, ResultReason::InvalidMessage, "{what}");
        assert!(f.message.contains(needle), "{what}: {}", f.message);
    }
    // A message cut short: the server reads to the end of input and closes.
    let half = &request(None, vec![(Operation::Query, query_payload(&[1]))])[..40];
    let r = kmip::run(
        &s,
        "sealer",
        json!([
            {"op": "raw", "hex": hex::encode(half), "read": "close-write"},
            {"op": "query", "functions": ["QUERY_OPERATIONS"]},
        ]),
    );
    assert_eq!(r[0], json!({"closed": true}));
    assert_eq!(r[1]["status"], "SUCCESS", "{}", r[1]);
}

/// TTLV that decodes but breaks the message rules gets Invalid Message naming the rule, and
/// the connection stays open (its framing is intact).
#[test]
fn a_well_framed_invalid_message_gets_invalid_message_and_the_connection_stays() {
    let s = server();
    let mut wrong_count = request(None, vec![(Operation::Query, query_payload(&[1]))]);
    // Batch Count 1 -> 2: the last byte of the count's value, in the header.
    let at = wrong_count.windows(4).position(|w| w == [0x42, 0x00, 0x0D, 0x02]).unwrap() + 11;
    assert_eq!(wrong_count[at], 1);
    wrong_count[at] = 2;
    let r = kmip::run(&s, "sealer", json!([{"op": "raw", "hex": hex::encode(&wrong_count), "read": "one"}]));
    assert_eq!(r[0]["closed"], false, "{}", r[0]);
    let f = response(&r[0]).items[0].result.clone().unwrap_err();
    assert_eq!(f.reason, ResultReason::InvalidMessage);
    assert!(f.message.contains("Batch Count says 2"), "{}", f.message);
}

/// KMIP 1.1 Test Cases 12.1: a response over the Maximum Response Size becomes Response Too
/// Large; with room enough, the same request succeeds.
#[test]
fn a_response_over_the_maximum_response_size_is_refused_as_too_large() {
    let s = server();
    let small = request(Some(64), vec![(Operation::Query, query_payload(&[1, 3]))]);
    let roomy = request(Some(4096), vec![(Operation::Query, query_payload(&[1, 3]))]);
    let r = kmip::run(
        &s,
        "sealer",
        json!([{"op": "raw", "hex": hex::encode(&small), "read": "one"}, {"op": "raw", "hex": hex::encode(&roomy), "read": "one"}]),
    );
    let f = response(&r[0]).items[0].result.clone().unwrap_err();
    assert_eq!(f.reason, ResultReason::ResponseTooLarge, "{}", f.message);
    let ok = response(&r[1]).items[0].result.clone().unwrap().unwrap();
    assert_eq!(ok.children_with(tag::OPERATION).count(), 15);
}

/// A request in a version the server does not speak gets Invalid Message for everything but
/// Discover Versions, which is how a client finds a version to speak.
#[test]
fn an_unsupported_protocol_version_is_refused_except_for_discover_versions() {
    let s = server();
    let mut r = Request {
        header: RequestHeader {
            version: ProtocolVersion::new(2, 1),
            max_response_size: None,
            continuation: ContinuationOption::Continue,
            batch_order: true,
            batch_count: 2,
        },
        items: vec![
            RequestItem { operation: Operation::Query, unique_id: Some(vec![1]), payload: query_payload(&[1]) },
            RequestItem { operation: Operation::DiscoverVersions, unique_id: Some(vec![2]), payload: Item::structure(tag::REQUEST_PAYLOAD, vec![]) },
        ],
    };
    let bytes = encode(&r.to_item()).unwrap();
    let got = kmip::run(&s, "sealer", json!([{"op": "raw", "hex": hex::encode(&bytes), "read": "one"}]));
    let resp = response(&got[0]);
    assert_eq!(resp.version, ProtocolVersion::new(1, 4));
    let f = resp.items[0].result.clone().unwrap_err();
    assert_eq!(f.reason, ResultReason::InvalidMessage);
    assert!(f.message.contains("2.1"), "{}", f.message);
    assert_eq!(resp.items[0].unique_id, Some(vec![1]));
    assert!(resp.items[1].result.is_ok(), "{:?}", resp.items[1]);
    // With Stop (the default), nothing after the failed item runs.
    r.header.continuation = ContinuationOption::Stop;
    let bytes = encode(&r.to_item()).unwrap();
    let got = kmip::run(&s, "sealer", json!([{"op": "raw", "hex": hex::encode(&bytes), "read": "one"}]));
    assert_eq!(response(&got[0]).items.len(), 1);
}

/// vSphere's key provider: Create AES-256 with a name, Activate, Get, Locate by name,
/// Revoke, with PyKMIP's high-level client; the key is the same 32 bytes on every Get,
/// through the raw client too (Raw and Transparent Symmetric Key formats).
#[test]
fn vsphere_like_create_activate_get_and_locate_by_name() {
    let s = server();
    let r = kmip::run(&s, "dev", json!([{"op": "pie_create", "algorithm": "AES", "length": 256, "name": "vsphere-kek-1"}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "pie_activate", "uid": uid},
            {"op": "pie_get", "uid": uid},
            {"op": "pie_locate", "name": "vsphere-kek-1"},
            {"op": "pie_locate", "name": "no-such-name"},
            {"op": "get", "uid": uid},
        ]),
    );
    ok(&r[0]);
    let key = ok(&r[1])["key"].as_str().unwrap().to_owned();
    assert_eq!(key.len(), 64, "{}", r[1]);
    assert_eq!(r[1]["algorithm"], "AES");
    assert_eq!(r[1]["length"], 256);
    assert_eq!(ok(&r[2])["uids"], json!([uid]));
    assert_eq!(ok(&r[3])["uids"], json!([]));
    assert_eq!(ok(&r[4])["key"].as_str(), Some(key.as_str()));
    assert_eq!(r[4]["format"], "RAW");
    // Transparent Symmetric Key (PyKMIP cannot read that form, so read with Kluis's codec):
    // the Key Material is a structure holding the Key.
    let get = Item::structure(
        tag::REQUEST_PAYLOAD,
        vec![Item::text(tag::UNIQUE_IDENTIFIER, uid.clone()), Item::enumeration(tag::KEY_FORMAT_TYPE, 7)],
    );
    let raw = kmip::run(&s, "dev", json!([{"op": "raw", "hex": hex::encode(request(None, vec![(Operation::Get, get)])), "read": "one"}]));
    let p = response(&raw[0]).items[0].result.clone().unwrap().unwrap();
    let block = p.child(tag::SYMMETRIC_KEY).unwrap().child(tag::KEY_BLOCK).unwrap();
    assert_eq!(block.child(tag::KEY_FORMAT_TYPE).unwrap().value, kluis_kmip::ttlv::Value::Enumeration(7));
    let material = block.child(tag::KEY_VALUE).unwrap().child(tag::KEY_MATERIAL).unwrap().child(tag::KEY).unwrap();
    let kluis_kmip::ttlv::Value::ByteString(k) = &material.value else { panic!("{material:?}") };
    assert_eq!(hex::encode(&k[..]), key);
    // Each step is in the audit trail, under the object's id.
    for action in ["KmipCreate", "KmipActivate", "KmipGet", "KmipLocate"] {
        let lines = audit_lines(&s, action);
        assert!(!lines.is_empty(), "no {action} entry");
    }
    assert!(audit_lines(&s, "KmipGet").iter().all(|l| l.contains(&uid)));
    // Revoke (Cessation of Operation): Deactivated, dated; the key is still readable (a
    // deactivated key still decrypts what it encrypted).
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "pie_revoke", "reason": "CESSATION_OF_OPERATION", "uid": uid},
            {"op": "get_attributes", "uid": uid, "names": ["State", "Deactivation Date"]},
            {"op": "pie_get", "uid": uid},
        ]),
    );
    ok(&r[0]);
    let attrs = &ok(&r[1])["attributes"];
    assert_eq!(attrs["State"], json!(["DEACTIVATED"]), "{attrs}");
    assert_eq!(attrs["Deactivation Date"].as_array().map(Vec::len), Some(1), "{attrs}");
    assert_eq!(ok(&r[2])["key"].as_str(), Some(key.as_str()));
    // PyKMIP 0.11 cannot decode a Revocation Reason attribute: read it with Kluis's codec.
    let ga = Item::structure(
        tag::REQUEST_PAYLOAD,
        vec![Item::text(tag::UNIQUE_IDENTIFIER, uid.clone()), Item::text(tag::ATTRIBUTE_NAME, "Revocation Reason")],
    );
    let raw = kmip::run(&s, "dev", json!([{"op": "raw", "hex": hex::encode(request(None, vec![(Operation::GetAttributes, ga)])), "read": "one"}]));
    let p = response(&raw[0]).items[0].result.clone().unwrap().unwrap();
    let reason = p.child(tag::ATTRIBUTE).unwrap().child(tag::ATTRIBUTE_VALUE).unwrap().child(tag::REVOCATION_REASON_CODE).unwrap();
    assert_eq!(reason.value, kluis_kmip::ttlv::Value::Enumeration(6), "Cessation of Operation");
    assert_eq!(audit_lines(&s, "KmipRevoke").len(), 1);
}

/// The tape library profile: a key created with Application Specific Information in the
/// LIBRARY-LTO namespace is found by it, and by nothing else's.
#[test]
fn tape_library_create_with_lto_information_locate_by_it_and_get() {
    let s = server();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "create", "algorithm": "AES", "length": 256, "app_info": ["LIBRARY-LTO", "0123456789ABCDEF"]},
            {"op": "create", "algorithm": "AES", "length": 128, "app_info": ["LIBRARY-LTO", "FEDCBA9876543210"]},
        ]),
    );
    let a = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let b = ok(&r[1])["uid"].as_str().unwrap().to_owned();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "locate", "app_info": ["LIBRARY-LTO", "0123456789ABCDEF"]},
            {"op": "locate", "app_info": ["LIBRARY-LTO", "FEDCBA9876543210"]},
            {"op": "locate", "app_info": ["OTHER", "0123456789ABCDEF"]},
            {"op": "get", "uid": a},
            {"op": "get", "uid": b},
            {"op": "get_attributes", "uid": a, "names": ["Application Specific Information", "State", "Cryptographic Length"]},
        ]),
    );
    assert_eq!(ok(&r[0])["uids"], json!([a]));
    assert_eq!(ok(&r[1])["uids"], json!([b]));
    assert_eq!(ok(&r[2])["uids"], json!([]));
    assert_eq!(ok(&r[3])["key"].as_str().unwrap().len(), 64);
    assert_eq!(ok(&r[4])["key"].as_str().unwrap().len(), 32, "AES-128: 16 bytes");
    let attrs = &ok(&r[5])["attributes"];
    assert_eq!(attrs["Application Specific Information"], json!([["LIBRARY-LTO", "0123456789ABCDEF"]]), "{attrs}");
    assert_eq!(attrs["State"], json!(["PRE_ACTIVE"]), "{attrs}");
    assert_eq!(attrs["Cryptographic Length"], json!([256]), "{attrs}");
}

/// Roles as over gRPC: sealer makes objects and reads their attributes but gets no key
/// material; restorer gets it; an identity without a grant on the keyring gets Permission
/// Denied and sees nothing in a Locate. Every refusal is audited.
#[test]
fn a_sealer_cannot_get_material_a_restorer_can_and_no_grant_means_permission_denied() {
    let s = server();
    let r = kmip::run(&s, "sealer", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "backup-key"}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let r = kmip::run(
        &s,
        "sealer",
        json!([
            {"op": "activate", "uid": uid},
            {"op": "get", "uid": uid},
            {"op": "get_attributes", "uid": uid, "names": ["State"]},
            {"op": "locate", "name": "backup-key"},
        ]),
    );
    ok(&r[0]);
    let denied = refused(&r[1], "PERMISSION_DENIED");
    assert!(denied["message"].as_str().unwrap().contains("UnwrapDataKey"), "{denied}");
    assert!(r[1].get("key").is_none());
    assert_eq!(ok(&r[2])["attributes"]["State"], json!(["ACTIVE"]));
    assert_eq!(ok(&r[3])["uids"], json!([uid]));
    let r = kmip::run(&s, "restorer", json!([{"op": "get", "uid": uid}, {"op": "create", "algorithm": "AES", "length": 256}]));
    assert_eq!(ok(&r[0])["key"].as_str().unwrap().len(), 64);
    refused(&r[1], "PERMISSION_DENIED");
    // The auditor holds no sealer or restorer grant.
    let r = kmip::run(
        &s,
        "auditor",
        json!([
            {"op": "get", "uid": uid},
            {"op": "activate", "uid": uid},
            {"op": "locate", "name": "backup-key"},
            {"op": "get_attributes", "uid": uid},
        ]),
    );
    refused(&r[0], "PERMISSION_DENIED");
    refused(&r[1], "PERMISSION_DENIED");
    assert_eq!(ok(&r[2])["uids"], json!([]));
    refused(&r[3], "PERMISSION_DENIED");
    let denials: Vec<String> = audit_lines(&s, "KmipGet").into_iter().filter(|l| l.contains("denied") || l.contains("Denied")).collect();
    assert_eq!(denials.len(), 2, "the sealer's and the auditor's Get: {denials:?}");
}

/// State rules: Activate only from Pre-Active; an unknown identifier is Item Not Found; a
/// Create the server cannot honour names what is wrong.
#[test]
fn wrong_states_unknown_objects_and_unsupported_attributes_are_refused_by_name() {
    let s = server();
    let r = kmip::run(&s, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "activate", "uid": uid},
            {"op": "activate", "uid": uid},
            {"op": "get", "uid": "00000000000000000000000000000000"},
            {"op": "get", "uid": "not-an-id"},
            {"op": "create", "algorithm": "AES", "length": 192},
            {"op": "create", "algorithm": "RSA", "length": 2048},
            {"op": "create", "algorithm": "AES", "length": 256, "extra": [["CONTACT_INFORMATION", "ops@example.org"]]},
        ]),
    );
    ok(&r[0]);
    assert!(refused(&r[1], "PERMISSION_DENIED")["message"].as_str().unwrap().contains("Active"), "{}", r[1]);
    refused(&r[2], "ITEM_NOT_FOUND");
    refused(&r[3], "ITEM_NOT_FOUND");
    assert!(refused(&r[4], "INVALID_FIELD")["message"].as_str().unwrap().contains("128 or 256"), "{}", r[4]);
    assert!(refused(&r[5], "INVALID_FIELD")["message"].as_str().unwrap().contains("AES"), "{}", r[5]);
    assert!(refused(&r[6], "INVALID_FIELD")["message"].as_str().unwrap().contains("Contact Information"), "{}", r[6]);
}

/// Objects are in the store, not in the process: after a restart the same identifier gives
/// the same key.
#[test]
fn an_object_outlives_a_restart_with_the_same_key() {
    let mut s = server();
    let r = kmip::run(&s, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "kept"}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let before = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}]));
    s.restart();
    let after = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}, {"op": "locate", "name": "kept"}]));
    assert_eq!(ok(&after[0])["key"], ok(&before[0])["key"]);
    assert_eq!(ok(&after[1])["uids"], json!([uid]));
}

/// The same object life on the PostgreSQL store: create, activate, get, locate, restart.
#[test]
fn objects_live_in_the_postgresql_store_too() {
    let mut s = Server::start_with(kluis_tests::Setup { provider: kluis_tests::Provider::Software, store: kluis_tests::StoreKind::Postgres });
    s.args.extend(["--kmip-listen".to_owned(), "127.0.0.1:0".to_owned()]);
    s.restart();
    let r = kmip::run(&s, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "on-pg"}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let before = kmip::run(&s, "dev", json!([{"op": "activate", "uid": uid}, {"op": "get", "uid": uid}]));
    ok(&before[0]);
    s.restart();
    let after = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}, {"op": "locate", "name": "on-pg"}, {"op": "get_attributes", "uid": uid, "names": ["State"]}]));
    assert_eq!(ok(&after[0])["key"], ok(&before[1])["key"]);
    assert_eq!(ok(&after[1])["uids"], json!([uid]));
    assert_eq!(ok(&after[2])["attributes"]["State"], json!(["ACTIVE"]));
    // Revoke and Destroy: the destruction and the row change commit together on PostgreSQL
    // too, and an officer's cancel gives the object back.
    let r = kmip::run(&s, "dev", json!([{"op": "revoke", "reason": "SUPERSEDED", "uid": uid}, {"op": "destroy", "uid": uid}, {"op": "get", "uid": uid}]));
    ok(&r[0]);
    ok(&r[1]);
    refused(&r[2], "KEY_VALUE_NOT_PRESENT");
    s.restart();
    let d = destructions_of(&s, &uid);
    assert_eq!((d.len(), d[0]["state"].as_str()), (1, Some("scheduled")), "{d:?}");
    let officer2 = s.add_officer("officer2");
    let cancel = kluis_tests::kmsctl(&officer2, &["destruction", "cancel", &d[0]["id"].as_u64().unwrap().to_string()]);
    assert!(cancel.status.success(), "{}", kluis_tests::stderr(&cancel));
    let r = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}, {"op": "get_attributes", "uid": uid, "names": ["State"]}]));
    assert_eq!(ok(&r[0])["key"], ok(&before[1])["key"]);
    assert_eq!(ok(&r[1])["attributes"]["State"], json!(["DEACTIVATED"]));
}


/// A server with the test clock, for the waiting periods of destructions.
fn server_with_clock() -> (Server, std::path::PathBuf, i64) {
    let mut s = server();
    let clock = s.dir.path().join("clock");
    let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
    std::fs::write(&clock, t0.to_string()).unwrap();
    s.env.push(("KLUIS_TEST_CLOCK_FILE".into(), clock.to_str().unwrap().into()));
    s.restart();
    (s, clock, t0)
}

/// The destruction of `key_id` in `kmsctl destruction list --json`, as an officer sees it.
fn destructions_of(s: &Server, key_id: &str) -> Vec<Value> {
    let out = s.kmsctl("officer", &["destruction", "list", "--json"]);
    assert!(out.status.success(), "{}", kluis_tests::stderr(&out));
    let all: Value = serde_json::from_str(&kluis_tests::stdout(&out)).unwrap();
    all.as_array().unwrap().iter().filter(|d| d["target"] == key_id).cloned().collect()
}

/// Destroy follows the keyring's rules. An Active object must be revoked first; then it is
/// Destroyed to clients at once (Get refused, Locate by State finds it), and its material is
/// erased only after the waiting period, by a destruction officers see and can cancel
/// (cancelled, the object is back as it was, key and all). A legal hold refuses a Destroy
/// and holds a scheduled one past its due date; released, the erasure goes ahead.
#[test]
fn destroy_waits_out_the_keyring_period_an_officer_can_cancel_it_and_a_hold_blocks_it() {
    const DAY: i64 = 86_400;
    let (mut s, clock, t0) = server_with_clock();
    let officer2 = s.add_officer("officer2");
    let r = kmip::run(&s, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "to-destroy"}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "activate", "uid": uid},
            {"op": "get", "uid": uid},
            {"op": "destroy", "uid": uid},
            {"op": "revoke", "reason": "CESSATION_OF_OPERATION", "uid": uid, "message": "decommissioned"},
            {"op": "destroy", "uid": uid},
            {"op": "get", "uid": uid},
            {"op": "get_attributes", "uid": uid, "names": ["State", "Destroy Date"]},
            {"op": "locate", "state": "DESTROYED"},
            {"op": "destroy", "uid": uid},
            {"op": "activate", "uid": uid},
        ]),
    );
    ok(&r[0]);
    let key = ok(&r[1])["key"].as_str().unwrap().to_owned();
    assert!(refused(&r[2], "PERMISSION_DENIED")["message"].as_str().unwrap().contains("is Active"), "{}", r[2]);
    ok(&r[3]);
    ok(&r[4]);
    assert!(refused(&r[5], "KEY_VALUE_NOT_PRESENT")["message"].as_str().unwrap().contains("destroyed"), "{}", r[5]);
    assert!(r[5].get("key").is_none());
    let attrs = &ok(&r[6])["attributes"];
    assert_eq!(attrs["State"], json!(["DESTROYED"]), "{attrs}");
    assert_eq!(attrs["Destroy Date"].as_array().map(Vec::len), Some(1), "{attrs}");
    assert_eq!(ok(&r[7])["uids"], json!([uid]));
    refused(&r[8], "PERMISSION_DENIED");
    refused(&r[9], "PERMISSION_DENIED");
    // Officers see the destruction, requested by the appliance's identity, due after the
    // waiting period; the object's key is not gone yet.
    let d = destructions_of(&s, &uid);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0]["state"].as_str(), d[0]["requested_by"].as_str(), d[0]["target_kind"].as_str()), (Some("scheduled"), Some("dev"), Some("key")), "{d:?}");
    assert!(d[0]["due_unix"].as_i64().unwrap() > t0 + DAY, "{d:?}");
    // Cancelled by an officer: back to Deactivated, the same key readable.
    let id = d[0]["id"].as_u64().unwrap().to_string();
    assert!(kluis_tests::kmsctl(&officer2, &["destruction", "cancel", &id]).status.success());
    let r = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}, {"op": "get_attributes", "uid": uid, "names": ["State", "Destroy Date"]}]));
    assert_eq!(ok(&r[0])["key"].as_str(), Some(key.as_str()));
    assert_eq!(ok(&r[1])["attributes"], json!({"State": ["DEACTIVATED"]}));

    // Destroyed again, then a hold: past the due date nothing is erased; a Destroy of
    // another object is refused while the hold stands.
    let r = kmip::run(&s, "dev", json!([{"op": "destroy", "uid": uid}, {"op": "create", "algorithm": "AES", "length": 128}]));
    ok(&r[0]);
    let other = ok(&r[1])["uid"].as_str().unwrap().to_owned();
    let hold = s.kmsctl("officer", &["keyring", "hold", "default", "--reason", "court order 2026-311"]);
    assert!(hold.status.success(), "{}", kluis_tests::stderr(&hold));
    std::fs::write(&clock, (t0 + 30 * DAY).to_string()).unwrap();
    let r = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}, {"op": "destroy", "uid": other}]));
    refused(&r[0], "KEY_VALUE_NOT_PRESENT");
    assert!(refused(&r[1], "PERMISSION_DENIED")["message"].as_str().unwrap().contains("legal hold"), "{}", r[1]);
    let d = destructions_of(&s, &uid);
    assert_eq!(d.iter().filter(|d| d["state"] == "held").count(), 1, "{d:?}");

    // Released (dual control): the next Get carries out the due destruction; the material
    // is erased for good, across a restart.
    let out = s.kmsctl("officer", &["keyring", "release", "default"]);
    let approval = kluis_tests::approval_id(&out);
    assert!(kluis_tests::kmsctl(&officer2, &["approve", &approval]).status.success());
    let r = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}]));
    refused(&r[0], "KEY_VALUE_NOT_PRESENT");
    let d = destructions_of(&s, &uid);
    assert_eq!(d.iter().filter(|d| d["state"] == "destroyed").count(), 1, "{d:?}");
    s.restart();
    let r = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}, {"op": "get_attributes", "uid": uid, "names": ["State"]}]));
    refused(&r[0], "KEY_VALUE_NOT_PRESENT");
    assert_eq!(ok(&r[1])["attributes"]["State"], json!(["DESTROYED"]));
    assert_eq!(audit_lines(&s, "KmipDestroy").len(), 5, "three done, two refused (Active, hold); the repeat was refused too");
}

/// Revoke for a compromise: Compromised, with the Compromise Occurrence Date the client
/// gave; a second compromise is refused; destroyed, it is Destroyed Compromised.
#[test]
fn a_compromised_object_is_compromised_then_destroyed_compromised() {
    let s = server();
    let r = kmip::run(&s, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "activate", "uid": uid},
            {"op": "revoke", "reason": "KEY_COMPROMISE", "uid": uid, "occurred": "2026-11-30T12:00:00+00:00"},
            {"op": "get_attributes", "uid": uid, "names": ["State", "Compromise Occurrence Date", "Compromise Date"]},
            {"op": "revoke", "reason": "KEY_COMPROMISE", "uid": uid},
            {"op": "revoke", "reason": "SUPERSEDED", "uid": uid},
            {"op": "destroy", "uid": uid},
            {"op": "get_attributes", "uid": uid, "names": ["State"]},
            {"op": "revoke", "reason": "UNSPECIFIED", "uid": "00000000000000000000000000000000"},
        ]),
    );
    ok(&r[0]);
    ok(&r[1]);
    let attrs = &ok(&r[2])["attributes"];
    assert_eq!(attrs["State"], json!(["COMPROMISED"]), "{attrs}");
    assert_eq!(attrs["Compromise Occurrence Date"], json!([1_796_040_000]), "{attrs}");
    assert_eq!(attrs["Compromise Date"].as_array().map(Vec::len), Some(1), "{attrs}");
    refused(&r[3], "PERMISSION_DENIED");
    refused(&r[4], "PERMISSION_DENIED");
    ok(&r[5]);
    assert_eq!(ok(&r[6])["attributes"]["State"], json!(["DESTROYED_COMPROMISED"]));
    refused(&r[7], "ITEM_NOT_FOUND");
}

/// Add, Modify and Delete Attribute on the attributes a client may set; Get Attribute List
/// names what the object has. Server-set attributes are refused by name, a missing index
/// is Item Not Found, and an identity without a grant changes nothing. PyKMIP 0.11 has no
/// Add Attribute call, so that request is built with Kluis's own encoder.
#[test]
fn attributes_are_added_modified_deleted_and_listed() {
    let s = server();
    let r = kmip::run(&s, "sealer", json!([{"op": "create", "algorithm": "AES", "length": 256, "name": "first"}]));
    let uid = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let add = |name: &str, value: Item| {
        let p = Item::structure(
            tag::REQUEST_PAYLOAD,
            vec![
                Item::text(tag::UNIQUE_IDENTIFIER, uid.clone()),
                Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, name), value]),
            ],
        );
        json!({"op": "raw", "hex": hex::encode(request(None, vec![(Operation::AddAttribute, p)])), "read": "one"})
    };
    let name_value = |n: &str| Item::structure(tag::ATTRIBUTE_VALUE, vec![Item::text(tag::NAME_VALUE, n), Item::enumeration(tag::NAME_TYPE, 1)]);
    let lto = Item::structure(
        tag::ATTRIBUTE_VALUE,
        vec![Item::text(tag::APPLICATION_NAMESPACE, "LIBRARY-LTO"), Item::text(tag::APPLICATION_DATA, "00AA")],
    );
    let r = kmip::run(
        &s,
        "sealer",
        json!([
            {"op": "get_attribute_list", "uid": uid},
            add("Name", name_value("second")),
            add("Application Specific Information", lto),
            add("State", Item::enumeration(tag::ATTRIBUTE_VALUE, 2)),
            add("Name", name_value("second")),
            {"op": "pie_modify_attribute", "uid": uid, "name": "NAME", "value": "renamed", "index": 0},
            {"op": "pie_delete_attribute", "uid": uid, "name": "Name", "index": 1},
            {"op": "pie_delete_attribute", "uid": uid, "name": "Name", "index": 5},
            {"op": "pie_delete_attribute", "uid": uid, "name": "Object Type"},
            {"op": "get_attributes", "uid": uid, "names": ["Name", "Application Specific Information"]},
            {"op": "locate", "name": "renamed"},
            {"op": "locate", "name": "first"},
            {"op": "get_attribute_list", "uid": uid},
        ]),
    );
    let names = ok(&r[0])["names"].as_array().unwrap().clone();
    for n in ["Unique Identifier", "Object Type", "Cryptographic Algorithm", "Cryptographic Length", "Name", "State", "Initial Date"] {
        assert!(names.contains(&json!(n)), "{n} missing from {names:?}");
    }
    assert!(!names.contains(&json!("Activation Date")), "not activated: {names:?}");
    let added = response(&r[1]).items[0].result.clone().unwrap().unwrap();
    let a = added.child(tag::ATTRIBUTE).unwrap();
    assert_eq!(a.child(tag::ATTRIBUTE_INDEX).map(|i| i.value.clone()), Some(kluis_kmip::ttlv::Value::Integer(1)), "the second name: {a:?}");
    assert!(response(&r[2]).items[0].result.is_ok());
    let f = response(&r[3]).items[0].result.clone().unwrap_err();
    assert_eq!(f.reason, ResultReason::PermissionDenied);
    assert!(f.message.contains("State is set by the server"), "{}", f.message);
    let f = response(&r[4]).items[0].result.clone().unwrap_err();
    assert_eq!(f.reason, ResultReason::InvalidField);
    assert!(f.message.contains("already has this name"), "{}", f.message);
    assert_eq!(ok(&r[5])["value"], "renamed");
    assert_eq!(ok(&r[6])["value"], "second");
    refused(&r[7], "ITEM_NOT_FOUND");
    assert!(refused(&r[8], "PERMISSION_DENIED")["message"].as_str().unwrap().contains("Object Type is set by the server"), "{}", r[8]);
    let attrs = &ok(&r[9])["attributes"];
    assert_eq!(attrs["Name"], json!(["renamed"]), "{attrs}");
    assert_eq!(attrs["Application Specific Information"], json!([["LIBRARY-LTO", "00AA"]]), "{attrs}");
    assert_eq!(ok(&r[10])["uids"], json!([uid]));
    assert_eq!(ok(&r[11])["uids"], json!([]));
    assert!(ok(&r[12])["names"].as_array().unwrap().contains(&json!("Application Specific Information")));
    // No grant on the keyring: nothing changes, and the refusal is audited.
    let r = kmip::run(
        &s,
        "auditor",
        json!([
            {"op": "pie_modify_attribute", "uid": uid, "name": "NAME", "value": "stolen", "index": 0},
            {"op": "get_attribute_list", "uid": uid},
        ]),
    );
    refused(&r[0], "PERMISSION_DENIED");
    refused(&r[1], "PERMISSION_DENIED");
    let denied: Vec<_> = audit_lines(&s, "KmipModifyAttribute").into_iter().filter(|l| l.to_lowercase().contains("denied")).collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    let r = kmip::run(&s, "sealer", json!([{"op": "get_attributes", "uid": uid, "names": ["Name"]}]));
    assert_eq!(ok(&r[0])["attributes"]["Name"], json!(["renamed"]));
}

/// The compliance report covers KMIP objects per keyring: how many in which state, who
/// made them, the Gets and the last one; a refused Get is in the deviation register; the
/// objects' keys are not counted as backups (never restore-tested, without escrow).
#[test]
fn the_report_counts_kmip_objects_per_keyring_with_creators_and_the_last_get() {
    let s = server();
    let r = kmip::run(&s, "sealer", json!([{"op": "create", "algorithm": "AES", "length": 256}, {"op": "create", "algorithm": "AES", "length": 128}]));
    let a = ok(&r[0])["uid"].as_str().unwrap().to_owned();
    let b = ok(&r[1])["uid"].as_str().unwrap().to_owned();
    let r = kmip::run(&s, "dev", json!([{"op": "create", "algorithm": "AES", "length": 256}]));
    ok(&r[0]);
    let r = kmip::run(&s, "sealer", json!([{"op": "activate", "uid": a}, {"op": "get", "uid": a}, {"op": "destroy", "uid": b}]));
    ok(&r[0]);
    refused(&r[1], "PERMISSION_DENIED");
    ok(&r[2]);
    let r = kmip::run(&s, "restorer", json!([{"op": "get", "uid": a}]));
    ok(&r[0]);
    let out = s.kmsctl("auditor", &["report", "--format", "json"]);
    assert!(out.status.success(), "{}", kluis_tests::stderr(&out));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ring = rep["keyrings"].as_array().unwrap().iter().find(|k| k["name"] == "default").unwrap();
    let k = &ring["kmip"];
    assert_eq!(k["objects"], 3, "{k}");
    assert_eq!(k["by_state"], json!({"Active": 1, "Destroyed": 1, "Pre-Active": 1}), "{k}");
    assert_eq!(k["creators"], json!([{"principal": "sealer", "objects": 2}, {"principal": "dev", "objects": 1}]), "{k}");
    assert_eq!(k["gets"], 1, "{k}");
    assert_eq!((k["last_get"]["principal"].as_str(), k["last_get"]["uid"].as_str()), (Some("restorer"), Some(a.as_str())), "{k}");
    let devs = ring["deviations"].as_array().unwrap();
    assert!(devs.iter().any(|d| d["kind"] == "kmip-get-refused" && d["principal"] == "sealer" && d["key_id"] == a.as_str()), "{devs:?}");
    let pending = ring["pending_destructions"].as_array().unwrap();
    assert!(pending.iter().any(|d| d["requested_by"] == "sealer" && d.to_string().contains(&b)), "the Destroy waits there: {pending:?}");
    assert_eq!(ring["untested_backups_total"], 0, "{ring}");
    assert_eq!(ring["keys_without_escrow"], 0, "{ring}");
    assert_eq!(ring["keys_issued_total"], 3, "the objects' data keys are keys of the keyring: {ring}");
    let text = s.kmsctl("auditor", &["report"]);
    let text = kluis_tests::stdout(&text);
    assert!(text.contains("-- KMIP objects (3) --") && text.contains("Made by:   sealer (2 objects)"), "{text}");
}

// Key pairs and registered objects (Create Key Pair, Register, Get of private and public keys
// and secret data). The keys are checked with the openssl command, an RSA implementation
// other than the server's.

/// Runs `openssl ARGS -in FILE` on `input` written to a file; its stdout.
fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.der");
    std::fs::write(&f, input).unwrap();
    let out = std::process::Command::new("openssl").args(args).arg("-in").arg(&f).output().expect("the openssl command");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The X.509 SubjectPublicKeyInfo (DER) that openssl derives from a key in `form`.
fn spki_by_openssl(form: &str, der: &[u8]) -> Vec<u8> {
    match form {
        "private" => openssl(&["pkey", "-inform", "DER", "-pubout", "-outform", "DER"], der),
        "pkcs1-public" => openssl(&["rsa", "-RSAPublicKey_in", "-inform", "DER", "-pubout", "-outform", "DER"], der),
        "spki" => openssl(&["pkey", "-pubin", "-inform", "DER", "-pubout", "-outform", "DER"], der),
        other => panic!("{other}"),
    }
}

/// A new RSA key made by openssl: (PKCS#1 private, PKCS#8 private, PKCS#1 public, X.509 public), DER.
fn openssl_rsa(bits: u32) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", &format!("rsa_keygen_bits:{bits}"), "-outform", "DER", "-quiet"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pkcs8 = openssl(&["pkcs8", "-topk8", "-nocrypt", "-inform", "DER", "-outform", "DER"], &out.stdout);
    let pkcs1 = openssl(&["rsa", "-inform", "DER", "-outform", "DER", "-traditional"], &pkcs8);
    let public1 = openssl(&["rsa", "-inform", "DER", "-RSAPublicKey_out", "-outform", "DER"], &pkcs1);
    let spki = openssl(&["rsa", "-inform", "DER", "-pubout", "-outform", "DER"], &pkcs1);
    (pkcs1, pkcs8, public1, spki)
}

fn key_of(v: &Value) -> Vec<u8> {
    hex::decode(ok(v)["key"].as_str().unwrap_or_else(|| panic!("no key: {v}"))).unwrap()
}

/// Get Attributes for `names` through Kluis's own codec (PyKMIP 0.11 cannot read a Link
/// attribute: its attribute factory raises NotImplementedError for it).
fn raw_attributes(s: &Server, who: &str, uid: &str, names: &[&str]) -> Vec<Item> {
    let mut children = vec![Item::text(tag::UNIQUE_IDENTIFIER, uid)];
    children.extend(names.iter().map(|n| Item::text(tag::ATTRIBUTE_NAME, *n)));
    let req = request(None, vec![(Operation::GetAttributes, Item::structure(tag::REQUEST_PAYLOAD, children))]);
    let r = kmip::run(s, who, json!([{"op": "raw", "hex": hex::encode(req), "read": "one"}]));
    let p = response(&r[0]).items[0].result.clone().unwrap().unwrap();
    p.children_with(tag::ATTRIBUTE).cloned().collect()
}

/// The (Link Type, Linked Object Identifier) of each Link attribute.
fn links(attrs: &[Item]) -> Vec<(u32, String)> {
    use kluis_kmip::ttlv::Value as V;
    attrs
        .iter()
        .filter(|a| a.child(tag::ATTRIBUTE_NAME).is_some_and(|n| n.value == V::TextString("Link".into())))
        .map(|a| {
            let v = a.child(tag::ATTRIBUTE_VALUE).unwrap();
            let V::Enumeration(t) = v.child(tag::LINK_TYPE).unwrap().value else { panic!("{v:?}") };
            let V::TextString(u) = &v.child(tag::LINKED_OBJECT_IDENTIFIER).unwrap().value else { panic!("{v:?}") };
            (t, u.clone())
        })
        .collect()
}

/// Create Key Pair RSA-2048 and RSA-3072: two objects linked to each other; the private key
/// as PKCS#1 (the default) and PKCS#8, the public key as PKCS#1 (the default) and X.509, all
/// four one key pair by openssl's reading; other formats refused; both audited.
#[test]
fn create_key_pair_makes_a_linked_rsa_pair_given_in_each_format() {
    let s = server();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "create_key_pair", "common": {"algorithm": "RSA", "length": 2048}, "private": {"name": "pair-private"}, "public": {"name": "pair-public"}},
            {"op": "create_key_pair", "common": {"algorithm": "RSA", "length": 3072}},
            {"op": "create_key_pair", "common": {"algorithm": "RSA", "length": 1024}},
            {"op": "create_key_pair", "common": {"algorithm": "AES", "length": 2048}},
            {"op": "create_key_pair", "common": {"algorithm": "RSA"}, "private": {"length": 2048}, "public": {"length": 3072}},
        ]),
    );
    let (private, public) = (ok(&r[0])["private"].as_str().unwrap().to_owned(), r[0]["public"].as_str().unwrap().to_owned());
    let (private3, public3) = (ok(&r[1])["private"].as_str().unwrap().to_owned(), r[1]["public"].as_str().unwrap().to_owned());
    assert!(refused(&r[2], "INVALID_FIELD")["message"].as_str().unwrap().contains("2048, 3072 or 4096"), "{}", r[2]);
    assert!(refused(&r[3], "INVALID_FIELD")["message"].as_str().unwrap().contains("RSA"), "{}", r[3]);
    assert!(refused(&r[4], "INVALID_FIELD")["message"].as_str().unwrap().contains("differs"), "{}", r[4]);
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "get_key", "uid": private},
            {"op": "get_key", "uid": private, "format": "PKCS_8"},
            {"op": "get_key", "uid": public},
            {"op": "get_key", "uid": public, "format": "X_509"},
            {"op": "get_key", "uid": public, "format": "PKCS_8"},
            {"op": "get_key", "uid": private, "format": "X_509"},
            {"op": "get_key", "uid": private, "format": "RAW"},
            {"op": "get_key", "uid": private3, "format": "PKCS_8"},
            {"op": "get_key", "uid": public3, "format": "X_509"},
            {"op": "locate", "name": "pair-private"},
            {"op": "locate", "object_type": "PUBLIC_KEY"},
            {"op": "get_attributes", "uid": private, "names": ["Object Type", "Cryptographic Algorithm", "Cryptographic Length", "State", "Name"]},
        ]),
    );
    assert_eq!((&r[0]["format"], &r[0]["object_type"], &r[0]["algorithm"], &r[0]["length"]), (&json!("PKCS_1"), &json!("PRIVATE_KEY"), &json!("RSA"), &json!(2048)), "{}", r[0]);
    assert_eq!(r[1]["format"], "PKCS_8", "{}", r[1]);
    assert_eq!((&r[2]["format"], &r[2]["object_type"]), (&json!("PKCS_1"), &json!("PUBLIC_KEY")), "{}", r[2]);
    assert_eq!(r[3]["format"], "X_509", "{}", r[3]);
    let spki = key_of(&r[3]);
    assert_eq!(spki_by_openssl("private", &key_of(&r[0])), spki, "PKCS#1 private key of another pair");
    assert_eq!(spki_by_openssl("private", &key_of(&r[1])), spki, "PKCS#8 private key of another pair");
    assert_eq!(spki_by_openssl("pkcs1-public", &key_of(&r[2])), spki, "PKCS#1 public key differs");
    assert_eq!(spki_by_openssl("spki", &spki), spki, "the X.509 public key is not canonical DER");
    let text = String::from_utf8(openssl(&["rsa", "-inform", "DER", "-check", "-noout", "-text"], &key_of(&r[0]))).unwrap();
    assert!(text.contains("2048 bit") && text.contains("RSA key ok"), "{text}");
    for (i, needle) in [(4, "PKCS#1 (3) or X.509 (5)"), (5, "PKCS#1 (3) or PKCS#8 (4)"), (6, "PKCS#1 (3) or PKCS#8 (4)")] {
        assert!(refused(&r[i], "KEY_FORMAT_TYPE_NOT_SUPPORTED")["message"].as_str().unwrap().contains(needle), "{}", r[i]);
    }
    assert_eq!(spki_by_openssl("private", &key_of(&r[7])), key_of(&r[8]));
    assert!(String::from_utf8(openssl(&["pkey", "-inform", "DER", "-noout", "-text"], &key_of(&r[7]))).unwrap().contains("3072 bit"));
    assert_eq!(ok(&r[9])["uids"], json!([private]));
    let mut publics = ok(&r[10])["uids"].as_array().unwrap().clone();
    publics.sort_by_key(|v| v.as_str().unwrap().to_owned());
    let mut want = vec![json!(public), json!(public3)];
    want.sort_by_key(|v| v.as_str().unwrap().to_owned());
    assert_eq!(publics, want);
    let attrs = &ok(&r[11])["attributes"];
    assert_eq!(attrs["Object Type"], json!(["PRIVATE_KEY"]), "{attrs}");
    assert_eq!(attrs["Cryptographic Algorithm"], json!(["RSA"]), "{attrs}");
    assert_eq!(attrs["Cryptographic Length"], json!([2048]), "{attrs}");
    assert_eq!(attrs["State"], json!(["PRE_ACTIVE"]), "{attrs}");
    assert_eq!(attrs["Name"], json!(["pair-private"]), "{attrs}");
    // The Link attributes (Public Key Link 0x102 on the private key, Private Key Link 0x103 on the public).
    assert_eq!(links(&raw_attributes(&s, "dev", &private, &["Link"])), vec![(0x102, public.clone())]);
    assert_eq!(links(&raw_attributes(&s, "dev", &public, &[])), vec![(0x103, private.clone())]);
    // One audit entry per object made, under its id.
    let made = audit_lines(&s, "KmipCreateKeyPair");
    for uid in [&private, &public, &private3, &public3] {
        assert_eq!(made.iter().filter(|l| l.contains(uid.as_str())).count(), 1, "{uid}: {made:?}");
    }
}

/// The ID Placeholder after Create Key Pair is the private key: Create Key Pair then Activate
/// in one batch activates the private key.
#[test]
fn create_key_pair_sets_the_id_placeholder_to_the_private_key() {
    let s = server();
    let attr = |name: &str, value: Item| Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, name), value]);
    let common = Item::structure(
        tag::COMMON_TEMPLATE_ATTRIBUTE,
        vec![attr("Cryptographic Algorithm", Item::enumeration(tag::ATTRIBUTE_VALUE, 4)), attr("Cryptographic Length", Item::integer(tag::ATTRIBUTE_VALUE, 2048))],
    );
    let req = request(
        None,
        vec![
            (Operation::CreateKeyPair, Item::structure(tag::REQUEST_PAYLOAD, vec![common])),
            (Operation::Activate, Item::structure(tag::REQUEST_PAYLOAD, vec![])),
        ],
    );
    let r = kmip::run(&s, "dev", json!([{"op": "raw", "hex": hex::encode(req), "read": "one"}]));
    let resp = response(&r[0]);
    let made = resp.items[0].result.clone().unwrap().unwrap();
    let activated = resp.items[1].result.clone().unwrap().unwrap();
    let private = made.child(tag::PRIVATE_KEY_UNIQUE_IDENTIFIER).unwrap();
    assert_eq!(activated.child(tag::UNIQUE_IDENTIFIER).unwrap().value, private.value);
    let kluis_kmip::ttlv::Value::TextString(private) = &private.value else { panic!() };
    let kluis_kmip::ttlv::Value::TextString(public) = &made.child(tag::PUBLIC_KEY_UNIQUE_IDENTIFIER).unwrap().value else { panic!() };
    let r = kmip::run(
        &s,
        "dev",
        json!([{"op": "get_attributes", "uid": private, "names": ["State"]}, {"op": "get_attributes", "uid": public, "names": ["State"]}]),
    );
    assert_eq!(ok(&r[0])["attributes"]["State"], json!(["ACTIVE"]));
    assert_eq!(ok(&r[1])["attributes"]["State"], json!(["PRE_ACTIVE"]));
}

/// RSA-4096 with PyKMIP's high-level client: the pair is made and reads as one 4096-bit key.
#[test]
fn create_key_pair_rsa_4096_with_the_high_level_client() {
    let s = server();
    let r = kmip::run(&s, "dev", json!([{"op": "pie2_create_key_pair", "length": 4096}]));
    let (private, public) = (ok(&r[0])["private"].as_str().unwrap().to_owned(), r[0]["public"].as_str().unwrap().to_owned());
    let r = kmip::run(&s, "dev", json!([{"op": "pie2_get", "uid": private}, {"op": "get_key", "uid": public, "format": "X_509"}]));
    assert_eq!((&ok(&r[0])["key_format_type"], &r[0]["length"]), (&json!("PKCS_1"), &json!(4096)), "{}", r[0]);
    assert_eq!(spki_by_openssl("private", &key_of(&r[0])), key_of(&r[1]));
    assert!(String::from_utf8(openssl(&["rsa", "-inform", "DER", "-noout", "-text"], &key_of(&r[0]))).unwrap().contains("4096 bit"));
}

/// A public key is no secret: a sealer-only identity gets it, but is refused the private key
/// (Permission Denied, audited); a restorer gets the private key; an identity without a grant
/// on the keyring gets neither.
#[test]
fn a_sealer_gets_the_public_key_but_not_the_private_key() {
    let s = server();
    let r = kmip::run(&s, "sealer", json!([{"op": "create_key_pair", "common": {"algorithm": "RSA", "length": 2048}}]));
    let (private, public) = (ok(&r[0])["private"].as_str().unwrap().to_owned(), r[0]["public"].as_str().unwrap().to_owned());
    let r = kmip::run(&s, "sealer", json!([{"op": "get_key", "uid": public, "format": "X_509"}, {"op": "get_key", "uid": private}]));
    let spki = key_of(&r[0]);
    assert!(refused(&r[1], "PERMISSION_DENIED")["message"].as_str().unwrap().contains("UnwrapDataKey"), "{}", r[1]);
    assert!(r[1].get("key").is_none());
    let r = kmip::run(&s, "restorer", json!([{"op": "get_key", "uid": private}, {"op": "get_key", "uid": public}]));
    assert_eq!(spki_by_openssl("private", &key_of(&r[0])), spki);
    ok(&r[1]);
    let r = kmip::run(&s, "auditor", json!([{"op": "get_key", "uid": public}, {"op": "get_key", "uid": private}]));
    refused(&r[0], "PERMISSION_DENIED");
    refused(&r[1], "PERMISSION_DENIED");
    let gets = audit_lines(&s, "KmipGet");
    let denied: Vec<&String> = gets.iter().filter(|l| l.contains("enied")).collect();
    assert_eq!(denied.iter().filter(|l| l.contains(&private)).count(), 2, "the sealer's and the auditor's Get of the private key: {denied:?}");
    assert_eq!(denied.iter().filter(|l| l.contains(&public)).count(), 1, "the auditor's Get of the public key: {denied:?}");
    assert_eq!(gets.iter().filter(|l| !l.contains("enied") && l.contains(&public)).count(), 2, "{gets:?}");
}

/// Register of each kind, and Get gives back the bytes registered, in the format registered
/// (and the private key in the other format, as openssl writes it). Registered objects start
/// Pre-Active.
#[test]
fn register_each_kind_and_get_back_the_same_bytes() {
    let s = server();
    let (pkcs1, pkcs8, public1, spki) = openssl_rsa(2048);
    let aes = (0u8..32).collect::<Vec<_>>();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "register", "object_type": "PRIVATE_KEY", "format": "PKCS_1", "key": hex::encode(&pkcs1), "key_algorithm": "RSA", "key_length": 2048, "template": {"name": "reg-private"}},
            {"op": "register", "object_type": "PRIVATE_KEY", "format": "PKCS_8", "key": hex::encode(&pkcs8), "key_algorithm": "RSA", "key_length": 2048},
            {"op": "register", "object_type": "PUBLIC_KEY", "format": "PKCS_1", "key": hex::encode(&public1), "key_algorithm": "RSA", "key_length": 2048},
            {"op": "register", "object_type": "PUBLIC_KEY", "format": "X_509", "key": hex::encode(&spki), "key_algorithm": "RSA"},
            {"op": "register", "object_type": "SYMMETRIC_KEY", "format": "RAW", "key": hex::encode(&aes), "key_algorithm": "AES", "key_length": 256, "template": {"name": "reg-aes"}},
            {"op": "register", "object_type": "SECRET_DATA", "format": "OPAQUE", "key": hex::encode(b"correct horse battery staple"), "secret_data_type": "PASSWORD"},
            {"op": "register", "object_type": "SECRET_DATA", "format": "OPAQUE", "key": "00112233445566778899aabbccddeeff", "secret_data_type": "SEED"},
            {"op": "pie2_register", "object_type": "PRIVATE_KEY", "format": "PKCS_8", "key": hex::encode(&pkcs8), "length": 2048, "name": "pie-private"},
            {"op": "pie2_register", "object_type": "SECRET_DATA", "key": hex::encode(b"s3cret"), "secret_data_type": "PASSWORD"},
        ]),
    );
    let uids: Vec<String> = r.iter().map(|v| ok(v)["uid"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned()).collect();
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "get_key", "uid": uids[0]},
            {"op": "get_key", "uid": uids[1]},
            {"op": "get_key", "uid": uids[2]},
            {"op": "get_key", "uid": uids[3]},
            {"op": "get", "uid": uids[4]},
            {"op": "get_key", "uid": uids[5]},
            {"op": "get_key", "uid": uids[6]},
            {"op": "pie2_get", "uid": uids[7]},
            {"op": "pie2_get", "uid": uids[8]},
            {"op": "get_key", "uid": uids[0], "format": "PKCS_8"},
            {"op": "get_key", "uid": uids[1], "format": "PKCS_1"},
            {"op": "get_key", "uid": uids[3], "format": "PKCS_1"},
            {"op": "get_attributes", "uid": uids[0], "names": ["State", "Cryptographic Length", "Name", "Object Type"]},
            {"op": "get_key", "uid": uids[5], "format": "RAW"},
            {"op": "locate", "name": "reg-private"},
        ]),
    );
    assert_eq!((key_of(&r[0]), &r[0]["format"]), (pkcs1.clone(), &json!("PKCS_1")));
    assert_eq!((key_of(&r[1]), &r[1]["format"], &r[1]["length"]), (pkcs8.clone(), &json!("PKCS_8"), &json!(2048)));
    assert_eq!((key_of(&r[2]), &r[2]["format"]), (public1.clone(), &json!("PKCS_1")));
    assert_eq!((key_of(&r[3]), &r[3]["format"], &r[3]["length"]), (spki.clone(), &json!("X_509"), &json!(2048)));
    assert_eq!(key_of(&r[4]), aes);
    assert_eq!((key_of(&r[5]), &r[5]["secret_data_type"], &r[5]["format"]), (b"correct horse battery staple".to_vec(), &json!("PASSWORD"), &json!("OPAQUE")));
    assert_eq!((&r[6]["key"], &r[6]["secret_data_type"]), (&json!("00112233445566778899aabbccddeeff"), &json!("SEED")));
    assert_eq!((key_of(&r[7]), &r[7]["key_format_type"], &r[7]["object_type"]), (pkcs8.clone(), &json!("PKCS_8"), &json!("PRIVATE_KEY")));
    assert_eq!((key_of(&r[8]), &r[8]["data_type"], &r[8]["object_type"]), (b"s3cret".to_vec(), &json!("PASSWORD"), &json!("SECRET_DATA")));
    // Converted: the same bytes openssl writes for the other format.
    assert_eq!(key_of(&r[9]), pkcs8);
    assert_eq!(key_of(&r[10]), pkcs1);
    assert_eq!(key_of(&r[11]), public1);
    let attrs = &ok(&r[12])["attributes"];
    assert_eq!((&attrs["State"], &attrs["Cryptographic Length"], &attrs["Name"]), (&json!(["PRE_ACTIVE"]), &json!([2048]), &json!(["reg-private"])), "{attrs}");
    assert!(refused(&r[13], "KEY_FORMAT_TYPE_NOT_SUPPORTED")["message"].as_str().unwrap().contains("Opaque"), "{}", r[13]);
    assert_eq!(ok(&r[14])["uids"], json!([uids[0]]));
    assert_eq!(audit_lines(&s, "KmipRegister").len(), 9);
}

/// What Register cannot keep is refused before anything is made, by the reason the
/// specification names and a message saying what is wrong.
#[test]
fn register_refuses_malformed_small_and_mismatched_keys_by_name() {
    let s = server();
    let (pkcs1, _, _, spki) = openssl_rsa(2048);
    let (small, _, _, small_spki) = openssl_rsa(1024);
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "register", "object_type": "PRIVATE_KEY", "format": "PKCS_1", "key": hex::encode(&pkcs1[..pkcs1.len() - 9]), "key_algorithm": "RSA"},
            {"op": "register", "object_type": "PRIVATE_KEY", "format": "PKCS_1", "key": hex::encode(&small), "key_algorithm": "RSA", "key_length": 1024},
            {"op": "register", "object_type": "PUBLIC_KEY", "format": "X_509", "key": hex::encode(&small_spki), "key_algorithm": "RSA"},
            {"op": "register", "object_type": "SYMMETRIC_KEY", "format": "RAW", "key": hex::encode([7u8; 31]), "key_algorithm": "AES", "key_length": 256},
            {"op": "register", "object_type": "SYMMETRIC_KEY", "format": "RAW", "key": hex::encode([7u8; 24]), "key_algorithm": "AES", "key_length": 192},
            {"op": "register", "object_type": "PRIVATE_KEY", "format": "RAW", "key": hex::encode(&pkcs1), "key_algorithm": "RSA"},
            {"op": "register", "object_type": "PRIVATE_KEY", "format": "PKCS_1", "key": hex::encode(&pkcs1), "key_algorithm": "RSA", "key_length": 4096},
            {"op": "register", "object_type": "PUBLIC_KEY", "format": "PKCS_1", "key": hex::encode(&spki), "key_algorithm": "RSA"},
            {"op": "register", "object_type": "SECRET_DATA", "format": "RAW", "key": "0011", "secret_data_type": "PASSWORD"},
            {"op": "register", "object_type": "PRIVATE_KEY", "format": "PKCS_1", "key": hex::encode(&pkcs1), "key_algorithm": "AES"},
        ]),
    );
    let message = |i: usize, reason: &str| refused(&r[i], reason)["message"].as_str().unwrap().to_owned();
    assert!(message(0, "INVALID_FIELD").contains("not a PKCS#1 RSAPrivateKey"), "{}", r[0]);
    assert!(message(1, "INVALID_FIELD").contains("RSA-1024"), "{}", r[1]);
    assert!(message(2, "INVALID_FIELD").contains("RSA-1024"), "{}", r[2]);
    assert!(message(3, "INVALID_FIELD").contains("31 bytes"), "{}", r[3]);
    assert!(message(4, "INVALID_FIELD").contains("128 or 256"), "{}", r[4]);
    assert!(message(5, "KEY_FORMAT_TYPE_NOT_SUPPORTED").contains("PKCS#1 (3) or PKCS#8 (4)"), "{}", r[5]);
    assert!(message(6, "INVALID_FIELD").contains("RSA-2048"), "{}", r[6]);
    assert!(message(7, "INVALID_FIELD").contains("not a PKCS#1 RSAPublicKey"), "{}", r[7]);
    assert!(message(8, "KEY_FORMAT_TYPE_NOT_SUPPORTED").contains("Opaque"), "{}", r[8]);
    assert!(message(9, "INVALID_FIELD").contains("RSA"), "{}", r[9]);
    assert!(audit_lines(&s, "KmipRegister").is_empty(), "nothing was made");
    let r = kmip::run(&s, "dev", json!([{"op": "locate"}]));
    assert_eq!(ok(&r[0])["uids"], json!([]));
}

/// Veeam's key pair sequence with PyKMIP's high-level client: Create Key Pair RSA-2048 with
/// names, Activate, Get the public key, Locate by name, Get the private key, Destroy. KMIP
/// destroys no Active object (1.4, 4.21), so the pair is revoked (Cessation of Operation)
/// before the Destroy; a Destroy of the Active key is refused first.
#[test]
fn veeam_like_create_key_pair_activate_get_public_locate_get_private() {
    let s = server();
    let r = kmip::run(&s, "dev", json!([{"op": "pie2_create_key_pair", "length": 2048, "private_name": "veeam-rsa-1", "public_name": "veeam-rsa-1-pub"}]));
    let (private, public) = (ok(&r[0])["private"].as_str().unwrap().to_owned(), r[0]["public"].as_str().unwrap().to_owned());
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "pie_activate", "uid": private},
            {"op": "pie_activate", "uid": public},
            {"op": "pie2_get", "uid": public},
            {"op": "pie_locate", "name": "veeam-rsa-1"},
            {"op": "pie2_get", "uid": private},
        ]),
    );
    ok(&r[0]);
    ok(&r[1]);
    assert_eq!((&ok(&r[2])["object_type"], &r[2]["key_format_type"], &r[2]["length"]), (&json!("PUBLIC_KEY"), &json!("PKCS_1"), &json!(2048)), "{}", r[2]);
    assert_eq!(ok(&r[3])["uids"], json!([private]));
    assert_eq!((&ok(&r[4])["object_type"], &r[4]["cryptographic_algorithm"]), (&json!("PRIVATE_KEY"), &json!("RSA")), "{}", r[4]);
    assert_eq!(spki_by_openssl("private", &key_of(&r[4])), spki_by_openssl("pkcs1-public", &key_of(&r[2])));
    let r = kmip::run(
        &s,
        "dev",
        json!([
            {"op": "pie_destroy", "uid": private},
            {"op": "pie_revoke", "reason": "CESSATION_OF_OPERATION", "uid": private},
            {"op": "pie_revoke", "reason": "CESSATION_OF_OPERATION", "uid": public},
            {"op": "pie_destroy", "uid": private},
            {"op": "pie_destroy", "uid": public},
            {"op": "pie2_get", "uid": private},
            {"op": "pie2_get", "uid": public},
            {"op": "locate", "state": "DESTROYED"},
        ]),
    );
    assert!(refused(&r[0], "PERMISSION_DENIED")["message"].as_str().unwrap().contains("is Active"), "{}", r[0]);
    for step in &r[1..5] {
        ok(step);
    }
    refused(&r[5], "KEY_VALUE_NOT_PRESENT");
    refused(&r[6], "KEY_VALUE_NOT_PRESENT");
    let mut destroyed: Vec<String> = serde_json::from_value(ok(&r[7])["uids"].clone()).unwrap();
    destroyed.sort();
    let mut pair = vec![private.clone(), public.clone()];
    pair.sort();
    assert_eq!(destroyed, pair);
    // Both wait out the keyring's waiting period, as officers see.
    assert_eq!(destructions_of(&s, &private).len() + destructions_of(&s, &public).len(), 2);
    // An identity without a role on the keyring learns nothing of the object, not even
    // its type (which a wrong format's refusal would name), and the refusal is audited.
    let r = kmip::run(&s, "auditor", json!([{"op": "get", "uid": private, "format": "X_509"}]));
    let denied = refused(&r[0], "PERMISSION_DENIED");
    assert!(!denied["message"].as_str().unwrap().contains("private key"), "{denied}");
    assert!(audit_lines(&s, "KmipGet").iter().any(|l| l.contains("\"auditor\"") && l.contains(&private)), "the refusal is audited");
}

/// Register of a Transparent Symmetric Key (PyKMIP cannot build one, so with Kluis's codec):
/// the Key inside the Key Material structure is the key PyKMIP then gets.
#[test]
fn register_a_transparent_symmetric_key_and_get_it_raw() {
    let s = server();
    let key: Vec<u8> = (100u8..116).collect();
    let attr = |name: &str, value: Item| Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, name), value]);
    let block = Item::structure(
        tag::KEY_BLOCK,
        vec![
            Item::enumeration(tag::KEY_FORMAT_TYPE, 7),
            Item::structure(tag::KEY_VALUE, vec![Item::structure(tag::KEY_MATERIAL, vec![Item::bytes(tag::KEY, key.clone())])]),
            Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, 3),
            Item::integer(tag::CRYPTOGRAPHIC_LENGTH, 128),
        ],
    );
    let payload = Item::structure(
        tag::REQUEST_PAYLOAD,
        vec![
            Item::enumeration(tag::OBJECT_TYPE, 2),
            Item::structure(tag::TEMPLATE_ATTRIBUTE, vec![attr("Name", Item::structure(tag::ATTRIBUTE_VALUE, vec![Item::text(tag::NAME_VALUE, "tsk"), Item::enumeration(tag::NAME_TYPE, 1)]))]),
            Item::structure(tag::SYMMETRIC_KEY, vec![block]),
        ],
    );
    let r = kmip::run(&s, "dev", json!([{"op": "raw", "hex": hex::encode(request(None, vec![(Operation::Register, payload)])), "read": "one"}]));
    let p = response(&r[0]).items[0].result.clone().unwrap().unwrap();
    let kluis_kmip::ttlv::Value::TextString(uid) = &p.child(tag::UNIQUE_IDENTIFIER).unwrap().value else { panic!("{p:?}") };
    let r = kmip::run(&s, "dev", json!([{"op": "get", "uid": uid}, {"op": "locate", "name": "tsk"}]));
    assert_eq!((key_of(&r[0]), &r[0]["length"], &r[0]["format"]), (key, &json!(128), &json!("RAW")));
    assert_eq!(ok(&r[1])["uids"], json!([uid]));
}
