//! The codec against the byte examples of the KMIP specification, its strictness one rule at a
//! time, and the message frame.

use crate::message::*;
use crate::tag;
use crate::ttlv::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace() && *c != '|').collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn dec(bytes: &[u8]) -> Result<Item, TtlvError> {
    decode(bytes, &Limits::default())
}

const T: Tag = Tag::new(0x420020);

/// Each example of KMIP 1.4 section 9.1.2 decodes to its value and encodes back to its bytes.
#[test]
fn the_examples_of_the_specification_decode_and_encode_byte_for_byte() {
    let cases: Vec<(&str, Value)> = vec![
        ("42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00", Value::Integer(8)),
        ("42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00", Value::LongInteger(123_456_789_000_000_000)),
        (
            "42 00 20 | 04 | 00 00 00 10 | 00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00",
            Value::BigInteger(hex("00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00").into()),
        ),
        ("42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00", Value::Enumeration(255)),
        ("42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01", Value::Boolean(true)),
        (
            "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00",
            Value::TextString("Hello World".into()),
        ),
        ("42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00", Value::ByteString(vec![1, 2, 3].into())),
        // Friday, March 14, 2008, 11:56:40 GMT
        ("42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8", Value::DateTime(1_205_495_800)),
        // 10 days
        ("42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00", Value::Interval(864_000)),
        (
            "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | \
             42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
            Value::Structure(vec![Item::enumeration(Tag::new(0x420004), 254), Item::integer(Tag::new(0x420005), 255)]),
        ),
    ];
    for (bytes, value) in cases {
        let bytes = hex(bytes);
        let item = Item::new(T, value);
        assert_eq!(dec(&bytes).unwrap(), item, "decoding {bytes:02X?}");
        assert_eq!(&encode(&item).unwrap()[..], &bytes[..], "encoding {item:?}");
        assert_eq!(item.encoded_len(), bytes.len());
    }
}

#[test]
fn a_nested_message_round_trips() {
    let item = Request {
        header: RequestHeader {
            version: ProtocolVersion::new(1, 2),
            max_response_size: Some(4096),
            continuation: ContinuationOption::Continue,
            batch_order: false,
            batch_count: 2,
        },
        items: vec![
            RequestItem {
                operation: Operation::DiscoverVersions,
                unique_id: Some(vec![1]),
                payload: Item::structure(tag::REQUEST_PAYLOAD, vec![]),
            },
            RequestItem {
                operation: Operation::Get,
                unique_id: Some(vec![2]),
                payload: Item::structure(tag::REQUEST_PAYLOAD, vec![Item::text(tag::UNIQUE_IDENTIFIER, "ü-1")]),
            },
        ],
    }
    .to_item();
    let bytes = encode(&item).unwrap();
    assert_eq!(bytes.len(), item.encoded_len());
    let back = dec(&bytes).unwrap();
    assert_eq!(back, item);
    let req = Request::from_item(&back).unwrap();
    assert_eq!(Request::from_item(&item).unwrap(), req);
    assert_eq!(req.items.len(), 2);
    assert_eq!(req.items[1].operation, Operation::Get);
    assert_eq!(req.header.max_response_size, Some(4096));
    assert_eq!(req.header.continuation, ContinuationOption::Continue);
    assert!(!req.header.batch_order);
}

// One test per rule of the decoder.

#[test]
fn rule_input_is_exactly_one_item() {
    let mut b = hex("42 00 20 02 00 00 00 04 00 00 00 08 00 00 00 00");
    b.extend_from_slice(&[0; 8]);
    assert_eq!(dec(&b), Err(TtlvError::TrailingBytes { offset: 16, len: 8 }));
}

#[test]
fn rule_truncated_input_is_refused_with_its_offset() {
    let b = hex("42 00 20 02 00 00 00 04 00 00 00 08 00 00 00 00");
    for cut in 0..b.len() {
        let e = dec(&b[..cut]).unwrap_err();
        assert!(matches!(e, TtlvError::Truncated { offset: 0, .. }), "cut at {cut}: {e:?}");
    }
    // A string whose declared length runs past the end.
    let b = hex("42 00 20 07 00 00 00 10 41 41 41 41 41 41 41 41");
    assert_eq!(dec(&b), Err(TtlvError::Truncated { offset: 0, needed: 8 }));
}

#[test]
fn rule_tags_are_in_the_kmip_or_extension_range() {
    let b = hex("43 00 20 02 00 00 00 04 00 00 00 08 00 00 00 00");
    assert!(matches!(dec(&b), Err(TtlvError::BadTag { offset: 0, .. })));
    let ext = hex("54 00 01 02 00 00 00 04 00 00 00 08 00 00 00 00");
    assert_eq!(dec(&ext).unwrap(), Item::integer(Tag::new(0x540001), 8));
}

#[test]
fn rule_the_type_byte_is_a_kmip_type() {
    for ty in [0x00u8, 0x0C, 0x80, 0xFF] {
        let b = [0x42, 0x00, 0x20, ty, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0, 0];
        assert_eq!(dec(&b), Err(TtlvError::BadType { offset: 0, ty }));
    }
}

#[test]
fn rule_fixed_size_types_have_exactly_their_length() {
    for (ty, len) in [(0x02u8, 8u32), (0x02, 0), (0x03, 4), (0x05, 8), (0x06, 4), (0x09, 16), (0x0A, 8), (0x0B, 4)] {
        let mut b = vec![0x42, 0x00, 0x20, ty];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend(std::iter::repeat_n(0u8, (len as usize).div_ceil(8) * 8));
        let e = dec(&b).unwrap_err();
        assert!(matches!(e, TtlvError::BadLength { offset: 0, len: l, .. } if l == len), "type {ty:#x} length {len}: {e:?}");
    }
}

#[test]
fn rule_a_big_integer_is_a_nonzero_multiple_of_8_bytes() {
    let b = hex("42 00 20 04 00 00 00 04 00 00 00 01 00 00 00 00");
    assert!(matches!(dec(&b), Err(TtlvError::BadLength { ty: ItemType::BigInteger, len: 4, .. })));
    let b = hex("42 00 20 04 00 00 00 00");
    assert!(matches!(dec(&b), Err(TtlvError::BadLength { ty: ItemType::BigInteger, len: 0, .. })));
}

#[test]
fn rule_a_structure_length_is_a_multiple_of_8() {
    let b = hex("42 00 20 01 00 00 00 04 00 00 00 00 00 00 00 00");
    assert!(matches!(dec(&b), Err(TtlvError::BadLength { ty: ItemType::Structure, len: 4, .. })));
}

#[test]
fn rule_padding_is_zero() {
    let b = hex("42 00 20 02 00 00 00 04 00 00 00 08 00 00 01 00");
    assert_eq!(dec(&b), Err(TtlvError::NonZeroPadding { offset: 12 }));
    let b = hex("42 00 20 08 00 00 00 03 01 02 03 00 00 00 00 01");
    assert_eq!(dec(&b), Err(TtlvError::NonZeroPadding { offset: 11 }));
}

#[test]
fn rule_a_boolean_is_0_or_1() {
    let b = hex("42 00 20 06 00 00 00 08 00 00 00 00 00 00 00 02");
    assert_eq!(dec(&b), Err(TtlvError::BadBoolean { offset: 0 }));
    let b = hex("42 00 20 06 00 00 00 08 01 00 00 00 00 00 00 01");
    assert_eq!(dec(&b), Err(TtlvError::BadBoolean { offset: 0 }));
}

#[test]
fn rule_a_text_string_is_utf8() {
    let b = hex("42 00 20 07 00 00 00 02 C3 28 00 00 00 00 00 00");
    assert_eq!(dec(&b), Err(TtlvError::BadUtf8 { offset: 0 }));
}

#[test]
fn rule_a_child_stays_inside_its_structure() {
    // The structure says 16 bytes; its child (an Integer, 16 bytes) is followed by one that
    // claims 8 more, which lie outside the structure but inside the input.
    let b = hex(
        "42 00 20 01 00 00 00 18 \
         42 00 04 02 00 00 00 04 00 00 00 01 00 00 00 00 \
         42 00 05 07 00 00 00 08 41 41 41 41 41 41 41 41",
    );
    assert_eq!(dec(&b), Err(TtlvError::Overrun { offset: 24 }));
    // The same when the structure ends where the input does: the child still overruns its
    // structure, the input is not short.
    let b = hex("42 00 20 01 00 00 00 10 42 00 05 07 00 00 00 10 41 41 41 41 41 41 41 41");
    assert_eq!(dec(&b), Err(TtlvError::Overrun { offset: 8 }));
}

#[test]
fn rule_nesting_stops_at_the_depth_limit() {
    fn nest(depth: usize) -> Item {
        let mut item = Item::integer(T, 1);
        for _ in 0..depth {
            item = Item::structure(T, vec![item]);
        }
        item
    }
    let limits = Limits { max_len: 1 << 20, max_depth: 16 };
    let ok = encode(&nest(16)).unwrap();
    assert!(decode(&ok, &limits).is_ok());
    let deep = encode(&nest(17)).unwrap();
    assert_eq!(decode(&deep, &limits), Err(TtlvError::TooDeep { offset: 128, max: 16 }));
    // Hostile depth does not exhaust the stack: 100,000 nested headers are refused at 17.
    let mut b = Vec::new();
    for i in 0..100_000u32 {
        let len = (100_000 - i - 1) * 8;
        b.extend_from_slice(&[0x42, 0x00, 0x20, 0x01]);
        b.extend_from_slice(&len.to_be_bytes());
    }
    let big = Limits { max_len: usize::MAX, max_depth: 16 };
    assert!(matches!(decode(&b, &big), Err(TtlvError::TooDeep { max: 16, .. })));
}

#[test]
fn rule_a_declared_size_over_the_limit_is_refused_from_the_header_alone() {
    let limits = Limits { max_len: 4096, max_depth: 16 };
    let header = [0x42, 0x00, 0x78, 0x01, 0xFF, 0xFF, 0xFF, 0xF8];
    assert_eq!(message_len(&header, &limits), Err(TtlvError::TooLarge { len: 8 + 0xFFFF_FFF8, max: 4096 }));
    let header = [0x42, 0x00, 0x78, 0x01, 0x00, 0x00, 0x0F, 0xF8];
    assert_eq!(message_len(&header, &limits), Ok(4096));
    let header = [0x42, 0x00, 0x78, 0x01, 0x00, 0x00, 0x10, 0x00];
    assert!(matches!(message_len(&header, &limits), Err(TtlvError::TooLarge { .. })));
    // A message must be a structure, with a length that a structure can have.
    let header = [0x42, 0x00, 0x78, 0x02, 0x00, 0x00, 0x00, 0x04];
    assert_eq!(message_len(&header, &limits), Err(TtlvError::NotAStructure { ty: ItemType::Integer }));
    let header = [0x42, 0x00, 0x78, 0x01, 0x00, 0x00, 0x00, 0x0C];
    assert!(matches!(message_len(&header, &limits), Err(TtlvError::BadLength { len: 12, .. })));
    // And decode refuses an input over the limit before reading it.
    assert!(matches!(decode(&vec![0; 4097], &limits), Err(TtlvError::TooLarge { len: 4097, .. })));
}

#[test]
fn key_material_is_not_printed_by_debug() {
    let item = Item::bytes(tag::KEY_MATERIAL, vec![0xAB; 32]);
    let shown = format!("{item:?}");
    assert_eq!(shown, "0x420043 ByteString(32 bytes)");
    let big = Item::new(T, Value::BigInteger(big_integer_from_unsigned(&[0xCD; 9])));
    assert!(!format!("{big:?}").contains("CD") && !format!("{big:?}").contains("205"));
}

#[test]
fn big_integers_convert_to_and_from_unsigned_magnitudes() {
    assert_eq!(&big_integer_from_unsigned(&[0x01])[..], &[0, 0, 0, 0, 0, 0, 0, 1]);
    // A leading 1 bit gets a zero byte in front, so it stays non-negative.
    assert_eq!(&big_integer_from_unsigned(&[0x80; 8])[..], &hex("00 00 00 00 00 00 00 00 80 80 80 80 80 80 80 80")[..]);
    assert_eq!(&big_integer_from_unsigned(&[0, 0, 0x7F])[..], &[0, 0, 0, 0, 0, 0, 0, 0x7F]);
    assert_eq!(&big_integer_from_unsigned(&[])[..], &[0; 8]);
    assert_eq!(&big_integer_to_unsigned(&big_integer_from_unsigned(&[0x80; 8])).unwrap()[..], &[0x80; 8]);
    assert!(big_integer_to_unsigned(&[0xFF; 8]).is_none());
}

// The message frame.

fn header(count: i32) -> Item {
    Item::structure(
        tag::REQUEST_HEADER,
        vec![ProtocolVersion::new(1, 1).to_item(), Item::integer(tag::BATCH_COUNT, count)],
    )
}

fn batch(op: Operation) -> Item {
    Item::structure(
        tag::BATCH_ITEM,
        vec![Item::enumeration(tag::OPERATION, op.to_u32()), Item::structure(tag::REQUEST_PAYLOAD, vec![])],
    )
}

#[test]
fn the_batch_count_matches_the_batch_items() {
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![header(2), batch(Operation::Query)]);
    assert_eq!(Request::from_item(&m), Err(MessageError::BatchCount { declared: 2, found: 1 }));
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![header(0)]);
    assert_eq!(Request::from_item(&m), Err(MessageError::NoBatchItem));
}

#[test]
fn the_header_comes_first_and_once() {
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![batch(Operation::Query), header(1)]);
    assert_eq!(Request::from_item(&m), Err(MessageError::Missing { field: tag::REQUEST_HEADER, within: tag::REQUEST_MESSAGE }));
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![header(1), header(1), batch(Operation::Query)]);
    assert_eq!(Request::from_item(&m), Err(MessageError::Repeated { field: tag::REQUEST_HEADER, within: tag::REQUEST_MESSAGE }));
}

#[test]
fn a_batch_item_needs_an_operation_and_a_payload() {
    let no_payload = Item::structure(tag::BATCH_ITEM, vec![Item::enumeration(tag::OPERATION, 0x18)]);
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![header(1), no_payload]);
    assert_eq!(Request::from_item(&m), Err(MessageError::Missing { field: tag::REQUEST_PAYLOAD, within: tag::BATCH_ITEM }));
    let wrong = Item::structure(
        tag::BATCH_ITEM,
        vec![Item::integer(tag::OPERATION, 0x18), Item::structure(tag::REQUEST_PAYLOAD, vec![])],
    );
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![header(1), wrong]);
    assert_eq!(
        Request::from_item(&m),
        Err(MessageError::WrongType { field: tag::OPERATION, expected: ItemType::Enumeration, found: ItemType::Integer })
    );
}

#[test]
fn unknown_header_fields_are_refused_and_known_ones_read() {
    let mut h = header(1);
    if let Value::Structure(c) = &mut h.value {
        c.push(Item::integer(Tag::new(0x4200AA), 1));
    }
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![h, batch(Operation::Query)]);
    assert_eq!(
        Request::from_item(&m),
        Err(MessageError::Unexpected { field: Tag::new(0x4200AA), within: tag::REQUEST_HEADER })
    );
    let h = Item::structure(
        tag::REQUEST_HEADER,
        vec![
            ProtocolVersion::new(1, 4).to_item(),
            Item::integer(tag::MAXIMUM_RESPONSE_SIZE, 256),
            Item::enumeration(tag::BATCH_ERROR_CONTINUATION_OPTION, 1),
            Item::boolean(tag::BATCH_ORDER_OPTION, true),
            Item::date_time(tag::TIME_STAMP, 1_700_000_000),
            Item::structure(tag::AUTHENTICATION, vec![]),
            Item::integer(tag::BATCH_COUNT, 1),
        ],
    );
    let r = Request::from_item(&Item::structure(tag::REQUEST_MESSAGE, vec![h, batch(Operation::Query)])).unwrap();
    assert_eq!(r.header.continuation, ContinuationOption::Continue);
    assert_eq!(r.header.version, ProtocolVersion::new(1, 4));
    let bad = Item::structure(
        tag::REQUEST_HEADER,
        vec![
            ProtocolVersion::new(1, 4).to_item(),
            Item::enumeration(tag::BATCH_ERROR_CONTINUATION_OPTION, 4),
            Item::integer(tag::BATCH_COUNT, 1),
        ],
    );
    let m = Item::structure(tag::REQUEST_MESSAGE, vec![bad, batch(Operation::Query)]);
    assert_eq!(Request::from_item(&m), Err(MessageError::BadContinuation(4)));
}

#[test]
fn a_response_round_trips_with_success_and_failure() {
    let resp = Response {
        version: ProtocolVersion::new(1, 2),
        time_stamp: 1_765_000_000,
        items: vec![
            ResponseItem {
                operation: Some(Operation::Create),
                unique_id: Some(vec![7]),
                result: Ok(Some(Item::structure(tag::RESPONSE_PAYLOAD, vec![Item::text(tag::UNIQUE_IDENTIFIER, "1")]))),
            },
            ResponseItem {
                operation: None,
                unique_id: None,
                result: Err(Failure::new(ResultReason::PermissionDenied, "sealer role needed")),
            },
        ],
    };
    let bytes = encode(&resp.to_item()).unwrap();
    assert_eq!(Response::from_item(&dec(&bytes).unwrap()).unwrap(), resp);
}
