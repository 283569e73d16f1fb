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
    assert_eq!(r[3]["operations"], json!(["DISCOVER_VERSIONS", "QUERY"]));
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
    assert_eq!(items[1]["operations"], json!(["DISCOVER_VERSIONS", "QUERY"]));
}

#[test]
fn an_operation_not_served_gets_operation_not_supported_and_the_connection_goes_on() {
    let s = server();
    let r = kmip::run(&s, "sealer", json!([{"op": "get", "uid": "1"}, {"op": "query", "functions": ["QUERY_OPERATIONS"]}]));
    assert_eq!(r[0]["status"], "OPERATION_FAILED", "{}", r[0]);
    assert_eq!(r[0]["reason"], "OPERATION_NOT_SUPPORTED", "{}", r[0]);
    assert!(r[0]["message"].as_str().unwrap().contains("get"), "{}", r[0]);
    assert_eq!(r[1]["status"], "SUCCESS", "{}", r[1]);
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
    assert_eq!(ok.children_with(tag::OPERATION).count(), 2);
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
