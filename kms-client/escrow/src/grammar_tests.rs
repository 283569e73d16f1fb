//! One test per rule of the share-text grammar (module docs of `share`) and of the
//! manifest grammar (module docs of `manifest`), each named after its rule, with input
//! made by editing what a real ceremony wrote so that it breaks exactly that rule; then
//! the tolerated edge cases, which must still verify against the manifest.
//!
//! The share fixture (a 2-of-3 ceremony, custodian `alice`), by line:
//! ```text
//! 1 kluis-escrow-share v1
//! 2 ceremony: (32 hex)
//! 3 custodian: alice
//! 4 index: 1
//! 5 threshold: 2
//! 6 shares: 3
//! 7 recovery-recipient: age1...
//! 8 share: (44 base64)
//! 9
//! 10.. # comments
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;

use super::*;
use crate::test_support::*;

struct Fixture {
    _tmp: tempfile::TempDir,
    manifest: Manifest,
    /// Alice's share text as the ceremony wrote it.
    text: String,
    /// The manifest as the ceremony wrote it.
    json: String,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ceremony");
    let h = holders(&["alice", "bob", "carol"]);
    let custodians: Vec<Custodian> = h.iter().map(|h| h.custodian.clone()).collect();
    let manifest = ceremony(2, &custodians, &dir).unwrap();
    let text = share_texts(&dir, &h).remove(0);
    let json = std::fs::read_to_string(dir.join(MANIFEST_FILE_NAME)).unwrap();
    Fixture { _tmp: tmp, manifest, text, json }
}

impl Fixture {
    /// The share text with line `n` (1-based) replaced by `with` (several lines allowed).
    fn line(&self, n: usize, with: &str) -> String {
        let mut lines: Vec<String> = self.text.lines().map(str::to_owned).collect();
        lines[n - 1] = with.to_owned();
        lines.join("\n") + "\n"
    }

    /// The value of line `n` (after `name: `).
    fn value(&self, n: usize) -> String {
        let l = self.text.lines().nth(n - 1).unwrap();
        l.split_once(": ").unwrap().1.to_owned()
    }

    /// A share text that parses and verifies against the manifest.
    fn ok(&self, text: &str) {
        let s = ShareText::parse(text).unwrap_or_else(|e| panic!("refused: {e}\n{text}"));
        verify_share(&self.manifest, &s).unwrap();
    }

    /// The manifest JSON edited as a value.
    fn json_with(&self, f: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&self.json).unwrap();
        f(&mut v);
        serde_json::to_string_pretty(&v).unwrap()
    }
}

fn refused(text: &str) -> EscrowError {
    match ShareText::parse(text) {
        Err(e) => e,
        Ok(s) => panic!("accepted: {s:?}\n{text}"),
    }
}

/// A manifest JSON refusal by the JSON reader: its JSON path and message.
fn json_refused(json: &[u8]) -> (String, String) {
    match Manifest::parse(json) {
        Err(ManifestError::Json { field, source }) => (field, source.to_string()),
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

fn problem(json: &str) -> ManifestProblem {
    match Manifest::parse(json.as_bytes()) {
        Err(ManifestError::Invalid { problem }) => problem,
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("accepted: {json}"),
    }
}

// ----- share text -----

#[test]
fn share_fixture_is_as_documented() {
    let f = fixture();
    let names: Vec<&str> = f.text.lines().take(8).map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(
        names,
        ["kluis-escrow-share v1", "ceremony", "custodian", "index", "threshold", "shares", "recovery-recipient", "share"]
    );
    assert_eq!(f.text.lines().nth(8), Some(""));
    assert!(f.text.lines().skip(9).all(|l| l.starts_with('#')));
    assert_eq!(f.value(8).len(), 44);
    f.ok(&f.text);
}

#[test]
fn share_text_bom_is_optional() {
    let f = fixture();
    f.ok(&format!("\u{feff}{}", f.text));
    // Only one, and only at the start.
    assert!(matches!(refused(&format!("\u{feff}\u{feff}{}", f.text)), EscrowError::NotAShare));
    assert!(matches!(refused(&f.line(3, "custodian: \u{feff}alice")), EscrowError::BadField { line: 3, .. }));
}

#[test]
fn share_text_header_line_is_the_first_line() {
    let f = fixture();
    assert!(matches!(refused(&format!("\n{}", f.text)), EscrowError::NotAShare));
    assert!(matches!(refused(&format!("# a comment\n{}", f.text)), EscrowError::NotAShare));
    assert!(matches!(refused(&format!(" {}", f.text)), EscrowError::NotAShare));
    assert!(matches!(refused(""), EscrowError::NotAShare));
}

#[test]
fn share_text_header_line_is_exactly_v1() {
    let f = fixture();
    assert!(matches!(refused(&f.line(1, "Kluis-Escrow-Share v1")), EscrowError::NotAShare));
    assert!(matches!(
        refused(&f.line(1, "kluis-escrow-share  v1")),
        EscrowError::UnsupportedShareVersion { found } if found == "kluis-escrow-share  v1"
    ));
    assert!(matches!(refused(&f.line(1, "kluis-escrow-share v10")), EscrowError::UnsupportedShareVersion { .. }));
    assert!(matches!(refused(&f.line(1, "kluis-escrow-share v2")), EscrowError::UnsupportedShareVersion { .. }));
    f.ok(&f.line(1, "kluis-escrow-share v1 \t"));
}

#[test]
fn share_text_field_line_name_is_exact_and_lowercase() {
    let f = fixture();
    let e = refused(&f.line(4, "Index: 1"));
    assert!(matches!(&e, EscrowError::UnknownField { line: 4, field } if field == "Index"), "{e:?}");
    assert_eq!(e.to_string(), "the share has an unexpected line 4 (\"Index\"); it was edited or is damaged");
    assert!(matches!(refused(&f.line(4, "index : 1")), EscrowError::UnknownField { line: 4, .. }));
    assert!(matches!(refused(&f.line(7, "recovery_recipient: x")), EscrowError::UnknownField { line: 7, .. }));
}

#[test]
fn share_text_field_line_has_nothing_before_the_name() {
    let f = fixture();
    for indented in [" index: 1", "\tindex: 1"] {
        let e = refused(&f.line(4, indented));
        assert!(matches!(e, EscrowError::MalformedLine { line: 4, why: "it starts with white space" }), "{e:?}");
    }
}

#[test]
fn share_text_field_line_has_a_colon() {
    let f = fixture();
    let e = refused(&f.line(4, "index 1"));
    assert!(matches!(e, EscrowError::MalformedLine { line: 4, why: "it has no colon" }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "line 4 of the share is not of the form \"name: value\" (it has no colon); the share is damaged"
    );
}

#[test]
fn share_text_field_line_white_space_after_the_colon_and_at_the_end() {
    let f = fixture();
    f.ok(&f.line(4, "index:1"));
    f.ok(&f.line(4, "index:\t 1 \t"));
    f.ok(&f.line(8, &format!("share:   {}   ", f.value(8))));
}

#[test]
fn share_text_fields_each_once() {
    let f = fixture();
    let e = refused(&f.line(5, "threshold: 2\nthreshold: 2"));
    assert!(matches!(e, EscrowError::DuplicateField { line: 6, field: "threshold" }), "{e:?}");
    assert_eq!(e.to_string(), "line 6 of the share is a second \"threshold\" line; it was edited");
}

#[test]
fn share_text_fields_all_present() {
    let f = fixture();
    let e = refused(&f.line(6, "# shares line removed"));
    assert!(matches!(e, EscrowError::MissingField { field: "shares" }), "{e:?}");
}

#[test]
fn share_text_fields_in_written_order() {
    let f = fixture();
    // Lines 5 (threshold) and 6 (shares) swapped.
    let mut lines: Vec<&str> = f.text.lines().collect();
    lines.swap(4, 5);
    let e = refused(&lines.join("\n"));
    assert!(matches!(e, EscrowError::OutOfOrder { line: 5, field: "shares", after: "threshold" }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "line 5 of the share is the \"shares\" line, which belongs after the \"threshold\" line; the share was edited"
    );
    // The share line first.
    let mut lines: Vec<&str> = f.text.lines().collect();
    let share = lines.remove(7);
    lines.insert(1, share);
    let e = refused(&lines.join("\n"));
    assert!(matches!(e, EscrowError::OutOfOrder { line: 2, field: "share", after: "recovery-recipient" }), "{e:?}");
}

#[test]
fn share_text_unknown_field_is_refused() {
    let f = fixture();
    let e = refused(&f.line(9, "color: blue"));
    assert!(matches!(&e, EscrowError::UnknownField { line: 9, field } if field == "color"), "{e:?}");
}

#[test]
fn share_text_ignored_lines_are_blank_or_comment() {
    let f = fixture();
    f.ok(&f.line(4, "\n# between\n \t\nindex: 1\n\n"));
    // A comment starts in column 1.
    let e = refused(&f.line(9, "  # indented comment"));
    assert!(matches!(e, EscrowError::MalformedLine { line: 9, .. }), "{e:?}");
}

#[test]
fn share_text_nothing_but_ignored_lines_after_the_share_line() {
    let f = fixture();
    assert!(matches!(refused(&format!("{}garbage\n", f.text)), EscrowError::MalformedLine { .. }));
    assert!(matches!(refused(&format!("{}index: 1\n", f.text)), EscrowError::DuplicateField { field: "index", .. }));
    assert!(matches!(refused(&format!("{}x: y", f.text)), EscrowError::UnknownField { .. }));
}

#[test]
fn share_text_eol_is_lf_or_crlf_or_the_end() {
    let f = fixture();
    f.ok(&f.text.replace('\n', "\r\n"));
    f.ok(f.text.lines().take(8).collect::<Vec<_>>().join("\n").as_str());
    // A lone CR is not a line end.
    let e = refused(&f.line(4, "index: 1\rthreshold: 2"));
    assert!(matches!(e, EscrowError::ControlCharacter { line: 4 }), "{e:?}");
    let e = refused(&f.text.replace("\nshares", "\r\rshares"));
    assert!(matches!(e, EscrowError::ControlCharacter { line: 5 }), "{e:?}");
}

#[test]
fn share_text_has_no_control_characters() {
    let f = fixture();
    for (n, bad) in [
        (10, "# \u{1b}[2J cleared"),
        (9, "\u{0}"),
        (3, "custodian: alice\u{7f}"),
        (10, "# next line\u{85}"),
        (10, "# \u{9b}31m"),
    ] {
        let e = refused(&f.line(n, bad));
        assert!(matches!(e, EscrowError::ControlCharacter { line } if line == n), "{bad:?}: {e:?}");
    }
    assert_eq!(
        refused(&f.line(10, "#\u{1b}")).to_string(),
        "line 10 of the share contains a control character; the share is damaged or was edited"
    );
    // A tab is white space, and comments may hold any other text.
    f.ok(&f.line(10, "#\tZoë’s share — ünïcode ✓"));
}

#[test]
fn share_text_is_utf8() {
    let f = fixture();
    let mut bytes = f.line(10, "# x").into_bytes();
    let at = bytes.windows(4).position(|w| w == b"# x\n").unwrap() + 2;
    bytes[at] = 0xff;
    let e = decode_share(&bytes, &ShareIdentities::none()).unwrap_err();
    assert!(matches!(e, EscrowError::ShareNotUtf8 { line: 10 }), "{e:?}");
    assert_eq!(e.to_string(), "line 10 of the share is not UTF-8 text; the share is damaged");
    // UTF-16 (what a Windows editor may save) is not a share at all.
    let utf16: Vec<u8> = f.text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert!(matches!(decode_share(&utf16, &ShareIdentities::none()), Err(EscrowError::NotAShare)));
}

#[test]
fn share_text_is_at_most_16_kib() {
    let f = fixture();
    let big = format!("{}# {}\n", f.text, "x".repeat(16 * 1024));
    let e = refused(&big);
    assert!(matches!(e, EscrowError::ShareTextTooLarge { limit: 16384, .. }), "{e:?}");
    assert!(matches!(decode_share(big.as_bytes(), &ShareIdentities::none()), Err(EscrowError::ShareTextTooLarge { .. })));
    let fits = format!("{}# {}\n", f.text, "x".repeat(16 * 1024 - f.text.len() - 3));
    assert_eq!(fits.len(), 16 * 1024);
    f.ok(&fits);
}

#[test]
fn share_file_over_the_cap_is_refused_by_its_size() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("share-huge.txt");
    let file = std::fs::File::create(&p).unwrap();
    // 1 TiB, sparse: reading it whole is not an option.
    file.set_len(1 << 40).unwrap();
    let e = read_share(&p, None).unwrap_err();
    assert!(matches!(&e, EscrowError::FileTooLarge { limit: 65536, .. }), "{e:?}");
    assert!(e.to_string().contains("share-huge.txt is larger than 65536 bytes"), "{e}");
    // A directory is named as one.
    let e = read_share(tmp.path(), None).unwrap_err();
    assert!(matches!(&e, EscrowError::Io { .. }), "{e:?}");
}

#[test]
fn share_text_ceremony_id_is_32_lowercase_hex() {
    let f = fixture();
    let id = f.value(2);
    for bad in [id.to_uppercase(), id[..31].to_owned(), format!("{id}0"), format!("{}g", &id[..31]), String::new()] {
        let e = refused(&f.line(2, &format!("ceremony: {bad}")));
        assert!(matches!(e, EscrowError::BadField { line: 2, field: "ceremony", .. }), "{bad}: {e:?}");
    }
}

#[test]
fn share_text_custodian_is_1_to_64_name_characters() {
    let f = fixture();
    for bad in ["", "al ice", "alice/..", "ålice", &"a".repeat(65)] {
        let e = refused(&f.line(3, &format!("custodian: {bad}")));
        assert!(matches!(e, EscrowError::BadField { line: 3, field: "custodian", .. }), "{bad}: {e:?}");
    }
}

#[test]
fn share_text_number_has_no_sign_and_no_leading_zero() {
    let f = fixture();
    for bad in ["+1", "01", "001", "1.0", "1e0", "0x1", "-1", "", " ", "one", "1 1"] {
        let e = refused(&f.line(4, &format!("index: {bad}")));
        assert!(matches!(e, EscrowError::BadField { line: 4, field: "index", .. }), "{bad:?}: {e:?}");
    }
}

#[test]
fn share_text_index_is_1_to_255() {
    let f = fixture();
    assert!(matches!(refused(&f.line(4, "index: 0")), EscrowError::IndexZero));
    assert!(matches!(refused(&f.line(4, "index: 256")), EscrowError::BadField { line: 4, field: "index", .. }));
    // In range but not this share's: the share bytes name index 1.
    assert!(matches!(refused(&f.line(4, "index: 255")), EscrowError::ShareIndexMismatch { field: 255, embedded: 1 }));
}

#[test]
fn share_text_shares_is_2_to_255() {
    let f = fixture();
    for bad in ["0", "1", "256", "999"] {
        let e = refused(&f.line(6, &format!("shares: {bad}")));
        assert!(matches!(e, EscrowError::BadField { line: 6, field: "shares", .. }), "{bad}: {e:?}");
    }
}

#[test]
fn share_text_threshold_is_2_to_shares() {
    let f = fixture();
    for bad in ["0", "1", "4", "256"] {
        let e = refused(&f.line(5, &format!("threshold: {bad}")));
        assert!(matches!(e, EscrowError::BadField { line: 5, field: "threshold", .. }), "{bad}: {e:?}");
    }
    // 3 of 3 is within the grammar; the manifest then says it is not this ceremony's.
    let s = ShareText::parse(&f.line(5, "threshold: 3")).unwrap();
    assert!(matches!(verify_share(&f.manifest, &s), Err(EscrowError::ShareFieldMismatch { field: "threshold", .. })));
}

#[test]
fn share_text_recipient_is_a_lowercase_x25519_recipient() {
    let f = fixture();
    let r = f.value(7);
    let yubikey = "age1yubikey1qwf2x0q5gu9pgvmkkg9lv6pp0wxcd3yqmcxpwqxwa0q2nwxglqrauz4ue9k";
    for bad in [r.to_uppercase(), r[..r.len() - 1].to_owned(), format!("{r}q"), yubikey.to_owned(), "age1".to_owned()] {
        let e = refused(&f.line(7, &format!("recovery-recipient: {bad}")));
        assert!(matches!(e, EscrowError::BadField { line: 7, field: "recovery-recipient", .. }), "{bad}: {e:?}");
    }
}

#[test]
fn share_text_share_value_is_standard_base64() {
    let f = fixture();
    let v = f.value(8);
    let url_safe = v.replace('+', "-").replace('/', "_");
    let mut bad_values = vec![format!("{} {}", &v[..20], &v[20..]), format!("{}!", &v[..43]), format!("{v}=")];
    if url_safe != v {
        bad_values.push(url_safe);
    } else {
        bad_values.push(format!("-{}", &v[1..]));
    }
    for bad in bad_values {
        let e = refused(&f.line(8, &format!("share: {bad}")));
        assert!(
            matches!(e, EscrowError::BadShareEncoding { line: 8 } | EscrowError::BadShareLength { line: 8, .. }),
            "{bad}: {e:?}"
        );
    }
    let e = refused(&f.line(8, "share: ***"));
    assert_eq!(
        e.to_string(),
        "line 8 of the share, the \"share\" line, is not valid base64 (standard alphabet); the share was damaged or mistyped"
    );
}

#[test]
fn share_text_share_value_is_33_bytes() {
    let f = fixture();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes = b64.decode(f.value(8)).unwrap();
    for len in [0usize, 1, 32, 34, 60] {
        let mut b = bytes.clone();
        b.resize(len, 1);
        let e = refused(&f.line(8, &format!("share: {}", b64.encode(&b))));
        match e {
            EscrowError::BadShareLength { line: 8, len: l } if l == len => {}
            EscrowError::BadShareLength { line: 8, .. } if len > 60 => {}
            EscrowError::MissingField { .. } | EscrowError::BadField { .. } if len == 0 => {}
            other => panic!("{len}: {other:?}"),
        }
    }
}

#[test]
fn share_text_share_value_first_byte_is_the_index() {
    let f = fixture();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut bytes = b64.decode(f.value(8)).unwrap();
    bytes[0] = 2;
    let e = refused(&f.line(8, &format!("share: {}", b64.encode(&bytes))));
    assert!(matches!(e, EscrowError::ShareIndexMismatch { field: 1, embedded: 2 }), "{e:?}");
}

// ----- manifest -----

#[test]
fn manifest_fixture_is_as_written() {
    let f = fixture();
    assert_eq!(Manifest::parse(f.json.as_bytes()).unwrap(), f.manifest);
    assert_eq!(f.manifest.to_json().unwrap(), f.json);
    assert!(f.json.contains("\"replaces\": null"));
}

#[test]
fn manifest_is_one_json_object() {
    for bad in ["", "null", "[]", "\"manifest\"", "3"] {
        let (field, msg) = json_refused(bad.as_bytes());
        assert_eq!(field, ".", "{bad}: {msg}");
    }
}

#[test]
fn manifest_objects_are_json_objects_not_arrays() {
    let f = fixture();
    // serde would fill a struct from an array of its values in order; the grammar has objects.
    let v: serde_json::Value = serde_json::from_str(&f.json).unwrap();
    let as_array = |o: &serde_json::Value| serde_json::Value::Array(o.as_object().unwrap().values().cloned().collect());
    let (field, msg) = json_refused(as_array(&v).to_string().as_bytes());
    assert_eq!(field, ".", "{msg}");
    assert!(msg.contains("invalid type: sequence, expected a JSON object"), "{msg}");
    let c0 = as_array(&v["custodians"][0]);
    let (field, msg) = json_refused(f.json_with(|v| v["custodians"][0] = c0).as_bytes());
    assert_eq!(field, "custodians[0]", "{msg}");
    assert!(msg.contains("expected a JSON object"), "{msg}");
}

#[test]
fn manifest_members_are_exactly_these() {
    let f = fixture();
    let (field, msg) = json_refused(f.json_with(|v| v["extra"] = 1.into()).as_bytes());
    assert!(msg.contains("unknown field `extra`"), "{field}: {msg}");
    let (field, msg) = json_refused(f.json_with(|v| v["custodians"][1]["note"] = "x".into()).as_bytes());
    assert!(field.starts_with("custodians[1]") && msg.contains("unknown field `note`"), "{field}: {msg}");
    let e = Manifest::parse(f.json_with(|v| v["custodians"][1]["note"] = "x".into()).as_bytes()).unwrap_err();
    assert!(e.to_string().starts_with("this is not a Kluis escrow manifest: at custodians[1]"), "{e}");
}

#[test]
fn manifest_members_each_once() {
    let f = fixture();
    let dup = f.json.replacen('{', "{\n  \"threshold\": 2,", 1);
    let (_, msg) = json_refused(dup.as_bytes());
    assert!(msg.contains("duplicate field `threshold`"), "{msg}");
    let dup = f.json.replacen("\"index\": 2,", "\"index\": 2,\n      \"index\": 2,", 1);
    assert_ne!(dup, f.json);
    let (field, msg) = json_refused(dup.as_bytes());
    assert!(field.starts_with("custodians[1]") && msg.contains("duplicate field `index`"), "{field}: {msg}");
}

#[test]
fn manifest_members_all_present() {
    let f = fixture();
    for member in ["format", "ceremony_id", "created", "recovery_recipient", "threshold", "shares", "custodians"] {
        let (_, msg) = json_refused(f.json_with(|v| drop(v.as_object_mut().unwrap().remove(member))).as_bytes());
        assert!(msg.contains(&format!("missing field `{member}`")), "{member}: {msg}");
    }
    let (field, msg) =
        json_refused(f.json_with(|v| drop(v["custodians"][2].as_object_mut().unwrap().remove("commitment"))).as_bytes());
    assert!(field.starts_with("custodians[2]") && msg.contains("missing field `commitment`"), "{field}: {msg}");
}

#[test]
fn manifest_nothing_after_the_object() {
    let f = fixture();
    let (field, msg) = json_refused(format!("{}x", f.json).as_bytes());
    assert_eq!(field, ".");
    assert!(msg.contains("trailing characters"), "{msg}");
    json_refused(format!("{}{}", f.json, f.json).as_bytes());
    json_refused(format!("{}\0", f.json).as_bytes());
    // White space is nothing.
    Manifest::parse(format!("\n {}\n\t\r\n", f.json).as_bytes()).unwrap();
}

#[test]
fn manifest_is_utf8_without_bom() {
    let f = fixture();
    let (field, _) = json_refused(format!("\u{feff}{}", f.json).as_bytes());
    assert_eq!(field, ".");
    let mut bytes = f.json.replacen("\"alice\"", "\"al\u{e9}ce\"", 1).into_bytes();
    let at = bytes.iter().position(|b| *b == 0xc3).unwrap();
    bytes[at] = 0xff;
    let (field, msg) = json_refused(&bytes);
    assert!(field.starts_with("custodians[0]"), "{field}: {msg}");
    // UTF-16 is not it either.
    let utf16: Vec<u8> = f.json.encode_utf16().flat_map(u16::to_le_bytes).collect();
    json_refused(&utf16);
}

#[test]
fn manifest_is_at_most_256_kib() {
    let f = fixture();
    let big = format!("{}{}", f.json, " ".repeat(256 * 1024 - f.json.len() + 1));
    assert!(matches!(
        Manifest::parse(big.as_bytes()),
        Err(ManifestError::TooLarge { limit: 262_144, len }) if len == 262_145
    ));
    Manifest::parse(&big.as_bytes()[..256 * 1024]).unwrap();
    // A file is refused by its size, before it is read.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("manifest.json");
    let mut file = std::fs::File::create(&p).unwrap();
    file.write_all(f.json.as_bytes()).unwrap();
    file.set_len(1 << 40).unwrap();
    let e = Manifest::load(&p).unwrap_err();
    assert!(matches!(&e, EscrowError::FileTooLarge { limit: 262_144, .. }), "{e:?}");
}

#[test]
fn manifest_integers_are_json_integers() {
    let f = fixture();
    for (bad, needle) in [
        (serde_json::json!(2.0), "invalid type: floating point"),
        (serde_json::json!("2"), "invalid type: string"),
        (serde_json::json!(-2), "invalid value"),
        (serde_json::json!(256), "invalid value"),
        (serde_json::json!(null), "invalid type: null"),
        (serde_json::json!(true), "invalid type: boolean"),
    ] {
        let (field, msg) = json_refused(f.json_with(|v| v["threshold"] = bad.clone()).as_bytes());
        assert_eq!(field, "threshold", "{bad}: {msg}");
        assert!(msg.contains(needle), "{bad}: {msg}");
        let (field, _) = json_refused(f.json_with(|v| v["custodians"][2]["index"] = bad.clone()).as_bytes());
        assert_eq!(field, "custodians[2].index", "{bad}");
    }
    // Written forms a JSON number may take that are not integers.
    for bad in ["2e0", "02", "+2", "0x2"] {
        let json = f.json.replacen("\"threshold\": 2", &format!("\"threshold\": {bad}"), 1);
        assert_ne!(json, f.json);
        json_refused(json.as_bytes());
    }
}

#[test]
fn manifest_depth_is_fixed_by_the_shape() {
    let f = fixture();
    // Nesting where a value is expected is refused at that value, without descending.
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let json = f.json.replacen("\"threshold\": 2", &format!("\"threshold\": {deep}"), 1);
    let (field, msg) = json_refused(json.as_bytes());
    assert_eq!(field, "threshold", "{msg}");
    let json = f.json_with(|v| v["custodians"][0]["name"] = serde_json::json!([[[[["alice"]]]]]));
    let (field, msg) = json_refused(json.as_bytes());
    assert_eq!(field, "custodians[0].name", "{msg}");
    // And an unbalanced flood is a JSON error, not a stack overflow.
    json_refused("[".repeat(200_000).as_bytes());
    json_refused(format!("{{\"custodians\": {}", "[".repeat(200_000)).as_bytes());
}

#[test]
fn manifest_json_escapes_decode_to_the_value() {
    let f = fixture();
    let json = f.json.replacen("kluis-escrow-manifest/v1", "kluis-escrow-manifest\\/v\\u0031", 1);
    assert_ne!(json, f.json);
    assert_eq!(Manifest::parse(json.as_bytes()).unwrap(), f.manifest);
    // A lone surrogate is not a string.
    let json = f.json.replacen("\"alice\"", "\"\\ud800\"", 1);
    let (field, _) = json_refused(json.as_bytes());
    assert!(field.starts_with("custodians[0]"), "{field}");
}

#[test]
fn manifest_format_is_v1() {
    let f = fixture();
    for bad in ["kluis-escrow-manifest/v2", "KLUIS-ESCROW-MANIFEST/V1", "kluis-escrow-manifest/v1 ", ""] {
        assert!(matches!(
            problem(&f.json_with(|v| v["format"] = bad.into())),
            ManifestProblem::UnsupportedFormat { .. }
        ));
    }
}

#[test]
fn manifest_ceremony_id_is_32_lowercase_hex() {
    let f = fixture();
    let id = f.manifest.ceremony_id.clone();
    for bad in [id.to_uppercase(), id[..31].to_owned(), format!("{id}0"), format!(" {}", &id[1..])] {
        assert!(matches!(problem(&f.json_with(|v| v["ceremony_id"] = bad.clone().into())), ManifestProblem::BadCeremonyId));
    }
}

#[test]
fn manifest_created_is_utc_in_whole_seconds() {
    let f = fixture();
    for bad in [
        "2026-01-01T00:00:00+01:00",
        "2026-01-01T00:00:00.5Z",
        "2026-01-01t00:00:00z",
        "2026-01-01 00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-1-01T00:00:00Z",
        "",
    ] {
        let p = problem(&f.json_with(|v| v["created"] = bad.into()));
        assert!(matches!(p, ManifestProblem::BadCreated), "{bad}: {p:?}");
    }
    Manifest::parse(f.json_with(|v| v["created"] = "2024-02-29T23:59:59Z".into()).as_bytes()).unwrap();
}

#[test]
fn manifest_recovery_recipient_is_a_lowercase_x25519_recipient() {
    let f = fixture();
    let r = f.manifest.recovery_recipient.clone();
    for bad in [r.to_uppercase(), format!("{r} "), r[..r.len() - 1].to_owned(), "age1".to_owned()] {
        let p = problem(&f.json_with(|v| v["recovery_recipient"] = bad.clone().into()));
        assert!(matches!(p, ManifestProblem::BadRecoveryRecipient), "{bad}: {p:?}");
    }
}

#[test]
fn manifest_threshold_is_2_to_shares() {
    let f = fixture();
    assert!(matches!(problem(&f.json_with(|v| v["threshold"] = 1.into())), ManifestProblem::ThresholdTooSmall { .. }));
    assert!(matches!(
        problem(&f.json_with(|v| v["threshold"] = 4.into())),
        ManifestProblem::ThresholdAboveShares { threshold: 4, shares: 3 }
    ));
}

#[test]
fn manifest_custodians_one_per_share() {
    let f = fixture();
    let p = problem(&f.json_with(|v| drop(v["custodians"].as_array_mut().unwrap().pop())));
    assert!(matches!(p, ManifestProblem::CustodianCount { listed: 2, shares: 3 }), "{p:?}");
    assert_eq!(p.to_string(), "custodians lists 2 custodians but shares is 3");
}

#[test]
fn manifest_custodian_name_is_a_unique_name() {
    let f = fixture();
    let p = problem(&f.json_with(|v| v["custodians"][1]["name"] = "b\u{1b}[2Jb".into()));
    assert!(matches!(p, ManifestProblem::BadCustodianName { at: 1, .. }), "{p:?}");
    assert!(p.to_string().starts_with("custodians[1].name \"b\\u{1b}[2Jb\" is not allowed"), "{p}");
    let p = problem(&f.json_with(|v| v["custodians"][2]["name"] = "ALICE".into()));
    assert!(matches!(p, ManifestProblem::DuplicateCustodian { at: 2, .. }), "{p:?}");
}

#[test]
fn manifest_custodian_index_is_1_to_shares_and_unique() {
    let f = fixture();
    for bad in [0, 4] {
        let p = problem(&f.json_with(|v| v["custodians"][1]["index"] = bad.into()));
        assert!(matches!(p, ManifestProblem::BadIndex { at: 1, .. }), "{bad}: {p:?}");
    }
    let p = problem(&f.json_with(|v| v["custodians"][2]["index"] = 1.into()));
    assert!(matches!(p, ManifestProblem::DuplicateIndex { at: 2, index: 1 }), "{p:?}");
    assert_eq!(p.to_string(), "custodians[2].index: index 1 is given to more than one custodian");
}

#[test]
fn manifest_custodian_commitment_is_64_lowercase_hex() {
    let f = fixture();
    let c = f.manifest.custodians[0].commitment.clone();
    for bad in [c.to_uppercase(), c[..63].to_owned(), format!("{c}0")] {
        let p = problem(&f.json_with(|v| v["custodians"][0]["commitment"] = bad.clone().into()));
        assert!(matches!(p, ManifestProblem::BadCommitment { at: 0, .. }), "{bad}: {p:?}");
    }
}

#[test]
fn manifest_custodian_recipient_is_an_age_recipient_not_the_recovery_one() {
    let f = fixture();
    let r = f.manifest.custodians[0].recipient.clone();
    for bad in [format!(" {r}"), format!("{r}\n"), "nope".to_owned()] {
        let p = problem(&f.json_with(|v| v["custodians"][0]["recipient"] = bad.clone().into()));
        assert!(matches!(p, ManifestProblem::BadCustodianRecipient { at: 0, .. }), "{bad:?}: {p:?}");
    }
    let rr = f.manifest.recovery_recipient.clone();
    let p = problem(&f.json_with(|v| v["custodians"][2]["recipient"] = rr.into()));
    assert!(matches!(p, ManifestProblem::CustodianIsRecoveryRecipient { at: 2, .. }), "{p:?}");
}

#[test]
fn manifest_replaces_is_optional_and_another_ceremony() {
    let f = fixture();
    let m = Manifest::parse(f.json_with(|v| drop(v.as_object_mut().unwrap().remove("replaces"))).as_bytes()).unwrap();
    assert_eq!(m, f.manifest);
    let other = "00112233445566778899aabbccddeeff";
    assert_eq!(Manifest::parse(f.json_with(|v| v["replaces"] = other.into()).as_bytes()).unwrap().replaces.as_deref(), Some(other));
    let own = f.manifest.ceremony_id.clone();
    for bad in [own, other.to_uppercase(), "x".to_owned()] {
        assert!(matches!(problem(&f.json_with(|v| v["replaces"] = bad.clone().into())), ManifestProblem::BadReplaces), "{bad}");
    }
    let (field, _) = json_refused(f.json_with(|v| v["replaces"] = 7.into()).as_bytes());
    assert_eq!(field, "replaces");
}

#[test]
fn manifest_refusals_from_a_file_name_the_file_and_the_field() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("manifest.json");
    std::fs::write(&p, f.json_with(|v| v["custodians"][2]["index"] = "3".into())).unwrap();
    let e = Manifest::load(&p).unwrap_err();
    assert!(matches!(&e, EscrowError::ManifestParse { field, .. } if field == "custodians[2].index"), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("manifest.json is not a readable Kluis escrow manifest: at custodians[2].index: invalid type: string \"3\", expected u8"), "{msg}");
    assert!(msg.contains(" line "), "{msg}");
}
