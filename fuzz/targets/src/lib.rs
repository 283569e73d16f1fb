//! The bodies of the Kluis fuzz targets: one function per parser of untrusted bytes.
//!
//! Each takes arbitrary bytes and must return without panicking, hanging or holding
//! unbounded memory; where a parser accepts its input, the function also checks a
//! property of the result (sizes add up, a value survives a round trip, what reaches the
//! audit and the log is bounded). The libFuzzer wrappers in `fuzz/fuzz_targets/` call
//! them, and `cargo test -p kluis-fuzz-targets` replays every file of `fuzz/corpus/NAME/`
//! and `fuzz/regressions/NAME/` through them (docs/fuzzing.md).
#![allow(clippy::panic)]

use std::io;

use age_core::format::{FileKey, Stanza};
use kluis_age::sealed::{KluisIdentity, KluisStanza, parse_stanza, unseal, unseal_offline};
use kluis_age::secret::DataKey;
use kluis_age::stream::{Tuning, header, open_payload};

pub mod rpc;

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target: its name (the folder under `fuzz/corpus/` and the libFuzzer binary)
/// and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("header", header),
    ("unseal", unseal_target),
    ("stanza", stanza),
    ("share", share),
    ("manifest", manifest),
    ("audit_export", audit_export),
    ("server_config", server_config),
    ("client_config", client_config),
    ("revocation_list", revocation_list),
    ("rpc", rpc::rpc),
    ("kmip", kmip),
];

/// A throwaway test identity; the seeds are sealed to its recipient
/// (age18jtv3trywy6cr4g293a86q7m8ndnc0qaczxwn5e8wnmhuavwl58q64hrwc), so mutations of
/// their payload get past the header MAC.
pub const IDENTITY: &str = "AGE-SECRET-KEY-1Y0EDUWLELU6Q0YP8WCFW6Q5S60CKLLUD0DU6QJTPQA0TYZG57TEQU3WNF4";
/// The data key every Kluis stanza of the seeds is wrapped under.
pub const DATA_KEY: [u8; 32] = [7u8; 32];
/// The file key the payload-only pass opens with.
pub const FILE_KEY: [u8; 16] = [0x42; 16];

fn identity() -> age::x25519::Identity {
    match IDENTITY.parse() {
        Ok(id) => id,
        Err(e) => panic!("the fixed identity does not parse: {e}"),
    }
}

fn data_key(_: &KluisStanza) -> Result<DataKey, &'static str> {
    DataKey::from_slice(&DATA_KEY).ok_or("fuzz data key")
}

/// Counts the bytes written.
struct Count(u64);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The age v1 header grammar: the parser of a whole header and the reader of a stream.
pub fn header(data: &[u8]) {
    if let Ok(h) = header::parse(data) {
        assert!(h.mac_input_len() <= data.len(), "MAC input beyond the header");
        for r in h.stanza_spans() {
            assert!(r.start <= r.end && r.end <= data.len(), "stanza span {r:?} outside the header");
        }
    }
    if let Ok((_, past)) = header::read(&mut &data[..]) {
        assert!(past.len() <= data.len(), "read past more than was given");
    }
}

/// A sealed stream, unsealed (with the Kluis data key, and offline with the recovery
/// identity) and verified (opened into a counting sink, as `backup-hook verify` does):
/// what is written is exactly what was authenticated.
pub fn unseal_target(data: &[u8]) {
    let id = identity();
    let kluis = KluisIdentity::new(data_key);
    let mut out = Count(0);
    if let Ok((out, moved)) = unseal(data, Some(&kluis), &[&id], &mut out) {
        assert_eq!(moved.plaintext_bytes, out.0, "unseal reported another size than it wrote");
        assert!((data.len() as u64) > moved.plaintext_bytes, "more plaintext than input");
    }
    let mut out = Count(0);
    if let Ok((out, moved)) = unseal_offline(data, &[&id], &mut out) {
        assert_eq!(moved.plaintext_bytes, out.0);
    }
    let fk = FileKey::new(Box::new(FILE_KEY));
    let mut out = Count(0);
    let tuning = Tuning { workers: 2, batch_chunks: 1 };
    if let Ok(n) = open_payload(&fk, &mut &data[..], &mut out, tuning) {
        assert_eq!(n, out.0);
        // Nonce (16) + each chunk's tag (16).
        assert!(data.len() as u64 >= 16 + n + 16, "opened {n} bytes from {} bytes", data.len());
    }
}

/// The Kluis stanza: first line its arguments (space-separated), the rest its body.
/// Parsed, then opened with the fixed data key as the Kluis identity does.
pub fn stanza(data: &[u8]) {
    let (args, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let args: Vec<String> = String::from_utf8_lossy(args).split(' ').map(str::to_owned).collect();
    let s = Stanza { tag: kluis_age::sealed::STANZA_TAG.to_owned(), args, body: body.to_vec() };
    if let Ok(Some(k)) = parse_stanza::<std::convert::Infallible>(&s) {
        assert_eq!(k.wrapped.len() + 32, s.body.len(), "the body splits into the wrapped key and the 32-byte file key box");
        let kluis = KluisIdentity::new(data_key);
        let _ = age::Identity::unwrap_stanzas(&kluis, &[s]);
    }
}

/// A custodian's share text, and a share file's bytes (not encrypted: no identity).
pub fn share(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(s) = kluis_escrow::ShareText::parse(text)
    {
        // The parser's promises (module docs of kluis_escrow::share): an index of at least 1
        // that the share bytes carry too, and 2 <= threshold <= shares. That the index is at
        // most the number of shares is checked against the manifest (`verify_share`), not
        // here: fuzz/regressions/share/crash-64e17e… is such a text, refused there.
        assert!(s.index() >= 1, "index {}", s.index());
        assert!(s.threshold() >= 2 && s.threshold() <= s.shares(), "threshold {} of {} shares", s.threshold(), s.shares());
    }
    let _ = kluis_escrow::decode_share(data, &kluis_escrow::ShareIdentities::none());
}

/// The escrow manifest, as the server and `kmsctl escrow` read it; an accepted one
/// survives writing and reading again.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = kluis_escrow::Manifest::parse(data)
        && let Ok(json) = m.to_json()
        && let Err(e) = kluis_escrow::Manifest::parse(json.as_bytes())
    {
        panic!("an accepted manifest does not read back: {e}");
    }
}

/// An audit export given to `kmsctl audit verify` (first 32 bytes: the Ed25519 public
/// key; the rest: the JSON lines), and each line as `kmsctl audit tail` reads it.
pub fn audit_export(data: &[u8]) {
    if data.len() < 32 {
        return;
    }
    let (key, text) = data.split_at(32);
    let Ok(text) = std::str::from_utf8(text) else { return };
    if let Ok(v) = kluis_proto::audit::verify_export(text, key) {
        assert!(v.first_seq <= v.last_seq, "{v:?}");
        assert!(v.records <= text.lines().count() as u64, "{v:?}");
    }
    for line in text.lines().take(64) {
        let _ = kluis_proto::audit::view_line(line);
    }
}

/// Writes `data` to a file of this thread's own and runs `f` on its path (the config
/// and list loaders read files; they have no parse-from-bytes entry point).
fn with_file(ext: &str, data: &[u8], f: impl FnOnce(&std::path::Path)) {
    let name = format!("kluis-fuzz-{}-{:?}.{ext}", std::process::id(), std::thread::current().id())
        .replace(['(', ')'], "");
    let path = std::env::temp_dir().join(name);
    if std::fs::write(&path, data).is_ok() {
        f(&path);
    }
    let _ = std::fs::remove_file(&path);
}

/// The server config (`kms-server serve --config`).
pub fn server_config(data: &[u8]) {
    with_file("toml", data, |p| {
        let _ = kms_server::config::ServerConfig::load(p);
    });
}

/// The client config (`--client-config`, `KLUIS_CLIENT_CONFIG`).
pub fn client_config(data: &[u8]) {
    with_file("toml", data, |p| {
        let _ = kms_client::config::ClientConfig::load(p);
    });
}

/// A KMIP message as the server reads it off the wire: the frame length from the first 8
/// bytes, the TTLV decoded under the server's limits, the Request Message read from it.
/// Properties: the length from the header agrees with what decodes; what decodes encodes
/// back to the same bytes (the decoder accepts only the canonical form); a request that
/// parses encodes and parses again to the same request.
pub fn kmip(data: &[u8]) {
    use kluis_kmip::message::Request;
    use kluis_kmip::ttlv::{HEADER_LEN, Limits, decode, encode, message_len};
    let limits = Limits { max_len: 64 * 1024, max_depth: 16 };
    let framed = data.first_chunk::<HEADER_LEN>().map(|h| message_len(h, &limits));
    let Ok(item) = decode(data, &limits) else { return };
    if let Some(Ok(len)) = framed {
        assert_eq!(len, data.len(), "the header's length disagrees with the decoded item");
    }
    let again = match encode(&item) {
        Ok(b) => b,
        Err(e) => panic!("a decoded item does not encode: {e}"),
    };
    assert_eq!(&again[..], data, "decode then encode changed the bytes");
    if let Ok(req) = Request::from_item(&item) {
        match Request::from_item(&req.to_item()) {
            Ok(back) => assert_eq!(back, req, "a request changed in a round trip"),
            Err(e) => panic!("a parsed request does not parse again: {e}"),
        }
    }
}

/// The revocation list of client certificate fingerprints.
pub fn revocation_list(data: &[u8]) {
    with_file("txt", data, |p| {
        let _ = kms_server::auth::RevocationList::load(p);
    });
}
