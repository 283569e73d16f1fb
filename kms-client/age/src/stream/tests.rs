//! Tests of the payload stream and the header through `sealed::seal`/`unseal`:
//! oracles both ways (the `age` crate and the stock `age` command), tampering,
//! hand-made streams, odd readers and writers, and the C2SP age testkit vectors.

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use super::header::{self, HeaderError};
use super::{CHUNK_SIZE, ENC_CHUNK_SIZE, NONCE_SIZE, TAG_SIZE, Tuning};
use crate::sealed::{KluisIdentity, KluisStanza, NoServer, SealError, UnsealError, seal_with, unseal_with};
use crate::secret::{DataKey, IssuedKey};

const DK: [u8; 32] = [7u8; 32];
const WRAPPED: [u8; 65] = [1u8; 65];

/// The tunings every round trip runs under: production, one chunk per batch
/// on two threads (ordering and the held-back batch at small sizes), odd batch
/// and thread counts, and everything on the calling thread.
fn tunings() -> [Tuning; 4] {
    [
        Tuning::default(),
        Tuning { workers: 2, batch_chunks: 1 },
        Tuning { workers: 3, batch_chunks: 3 },
        Tuning { workers: 0, batch_chunks: 2 },
    ]
}

/// Sizes around every chunk boundary case, plus a few pseudo-random ones.
fn sizes() -> Vec<usize> {
    let mut v = vec![0, 1, 65_535, 65_536, 65_537, 3 * 65_536, (1 << 20) + 7, 16 * 65_536, 17 * 65_536];
    let mut rng = XorShift(0x6b6c_7569_735f_7631);
    v.extend((0..4).map(|_| (rng.next() % (3 << 20)) as usize));
    v
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn data(n: usize) -> Vec<u8> {
    XorShift(0x9e37_79b9_7f4a_7c15 ^ n as u64).bytes(n)
}

fn issued(recovery: Option<&age::x25519::Identity>) -> IssuedKey {
    IssuedKey {
        key_id: "00112233445566778899aabbccddeeff".into(),
        keyring: "default".into(),
        version: 1,
        data_key: DataKey::from_slice(&DK).unwrap(),
        wrapped: WRAPPED.to_vec(),
        recovery_recipient: recovery.map(|id| id.to_public().to_string()),
    }
}

fn resolver(st: &KluisStanza) -> Result<DataKey, Infallible> {
    assert_eq!(st.wrapped, WRAPPED.to_vec());
    Ok(DataKey::from_slice(&DK).unwrap())
}

fn seal_t(key: &IssuedKey, pt: &[u8], t: Tuning) -> Vec<u8> {
    seal_with(key, pt, Vec::new(), t).unwrap().0
}

/// Unseals with the Kluis identity; returns the result and what was written.
fn open_kluis(sealed: &[u8], t: Tuning) -> (Result<u64, UnsealError>, Vec<u8>) {
    let ident = KluisIdentity::new(resolver);
    let mut out = Vec::new();
    let r = unseal_with(sealed, Some(&ident), &[], &mut out, t).map(|(_, m)| m.plaintext_bytes);
    (r, out)
}

/// Unseals offline with recovery identities only.
fn open_with(sealed: &[u8], ids: &[&dyn age::Identity], t: Tuning) -> (Result<u64, UnsealError>, Vec<u8>) {
    let none: Option<&KluisIdentity<NoServer>> = None;
    let mut out = Vec::new();
    let r = unseal_with(sealed, none, ids, &mut out, t).map(|(_, m)| m.plaintext_bytes);
    (r, out)
}

fn age_crate_decrypt(sealed: &[u8], id: &age::x25519::Identity) -> Vec<u8> {
    let dec = age::Decryptor::new(sealed).unwrap();
    let mut r = dec.decrypt(std::iter::once(id as &dyn age::Identity)).unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    out
}

fn age_crate_encrypt(pt: &[u8], id: &age::x25519::Identity) -> Vec<u8> {
    let rcpt = id.to_public();
    let enc = age::Encryptor::with_recipients(std::iter::once(&rcpt as &dyn age::Recipient)).unwrap();
    let mut w = enc.wrap_output(Vec::new()).unwrap();
    w.write_all(pt).unwrap();
    w.finish().unwrap()
}

/// The stock `age` command, if installed.
fn age_cli() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/age");
    if p.exists() {
        return Some(p);
    }
    Command::new("age").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| PathBuf::from("age"))
}

fn run_age(age: &Path, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(age)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sin = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = sin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success(), "age {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Where the payload (nonce, then chunks) starts in a file.
fn payload_start(file: &[u8]) -> usize {
    let dashes = file.windows(4).position(|w| w == b"\n---").unwrap() + 1;
    dashes + file[dashes..].iter().position(|&b| b == b'\n').unwrap() + 1
}

#[test]
fn our_files_open_with_the_age_crate_the_age_command_and_ourselves() {
    let id = age::x25519::Identity::generate();
    let key = issued(Some(&id));
    let cli = age_cli();
    let dir = tempfile::tempdir().unwrap();
    let id_file = dir.path().join("recovery.txt");
    std::fs::write(&id_file, format!("{}\n", id.to_string().expose_secret())).unwrap();
    if cli.is_none() {
        eprintln!("the `age` command is not installed: skipping the age -d oracle");
    }
    for n in sizes() {
        let pt = data(n);
        for t in tunings() {
            let sealed = seal_t(&key, &pt, t);
            // The expected size: header, nonce, every chunk with its tag (an empty input has one empty chunk).
            let chunks = n.div_ceil(CHUNK_SIZE).max(1);
            assert_eq!(sealed.len(), payload_start(&sealed) + NONCE_SIZE + n + chunks * TAG_SIZE, "size {n} {t:?}");
            assert_eq!(age_crate_decrypt(&sealed, &id), pt, "age crate, size {n} {t:?}");
            for t2 in tunings() {
                let (r, out) = open_kluis(&sealed, t2);
                assert_eq!(r.unwrap(), n as u64);
                assert!(out == pt, "kluis unseal, size {n} sealed {t:?} opened {t2:?}");
            }
            let (r, out) = open_with(&sealed, &[&id], t);
            assert_eq!(r.unwrap(), n as u64);
            assert!(out == pt, "recovery unseal, size {n} {t:?}");
        }
        if let Some(age) = &cli {
            let sealed = seal_t(&key, &pt, Tuning::default());
            let out = run_age(age, &["-d", "-i", id_file.to_str().unwrap()], &sealed);
            assert!(out == pt, "age -d, size {n}");
        }
    }
}

#[test]
fn age_files_open_with_our_unseal() {
    let id = age::x25519::Identity::generate();
    let other = age::x25519::Identity::generate();
    let cli = age_cli();
    let recipient = id.to_public().to_string();
    for n in sizes() {
        let pt = data(n);
        let mut files = vec![("age crate", age_crate_encrypt(&pt, &id))];
        if let Some(age) = &cli {
            files.push(("age -r", run_age(age, &["-r", &recipient], &pt)));
        }
        for (who, file) in &files {
            for t in tunings() {
                // The other identity first: it is tried and does not match.
                let (r, out) = open_with(file, &[&other, &id], t);
                assert_eq!(r.unwrap(), n as u64, "{who}, size {n} {t:?}");
                assert!(out == pt, "{who}, size {n} {t:?}");
            }
            let (r, _) = open_with(file, &[&other], Tuning::default());
            assert!(matches!(r, Err(UnsealError::OtherRecoveryKey)), "{who}: {r:?}");
            // The Kluis identity ignores the X25519 stanza and finds nothing.
            let (r, _) = open_kluis(file, Tuning::default());
            assert!(matches!(r, Err(UnsealError::NoMatchingStanza)), "{who}: {r:?}");
        }
    }
}

/// The chunk nonce, written independently of the pipeline's.
fn nonce(i: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&i.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// A hand-made age file for `id` whose payload has exactly the given chunks
/// (plaintext, last flag), encrypted here without the pipeline.
fn craft(id: &age::x25519::Identity, chunks: &[(&[u8], bool)]) -> Vec<u8> {
    let fk = FileKey::new(Box::new([0x5a; 16]));
    let (stanzas, _) = age::Recipient::wrap_file_key(&id.to_public(), &fk).unwrap();
    let mut out = header::write(&fk, &stanzas).unwrap();
    let payload_nonce = [0x3c; NONCE_SIZE];
    out.extend_from_slice(&payload_nonce);
    let mut pk = [0u8; 32];
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &payload_nonce)
        .extract(&[0x5a; 16])
        .expand(&[b"payload"], ring::hkdf::HKDF_SHA256)
        .unwrap()
        .fill(&mut pk)
        .unwrap();
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &pk).unwrap());
    for (i, (pt, last)) in chunks.iter().enumerate() {
        let mut buf = pt.to_vec();
        let tag = key.seal_in_place_separate_tag(nonce(i as u64, *last), Aad::empty(), &mut buf).unwrap();
        out.extend_from_slice(&buf);
        out.extend_from_slice(tag.as_ref());
    }
    out
}

#[test]
fn hand_made_streams_follow_the_spec() {
    let id = age::x25519::Identity::generate();
    let a = data(CHUNK_SIZE);
    let b = data(CHUNK_SIZE + 1)[1..].to_vec();
    let short = &a[..1000];
    let check = |chunks: &[(&[u8], bool)], want: Result<Vec<u8>, fn(&UnsealError) -> bool>, what: &str| {
        let file = craft(&id, chunks);
        for t in tunings() {
            let (r, out) = open_with(&file, &[&id], t);
            match &want {
                Ok(pt) => {
                    assert_eq!(r.as_ref().ok(), Some(&(pt.len() as u64)), "{what} {t:?}: {r:?}");
                    assert!(&out == pt, "{what} {t:?}");
                }
                Err(f) => assert!(r.as_ref().is_err_and(f), "{what} {t:?}: {r:?}"),
            }
        }
        file
    };
    let cat = |parts: &[&[u8]]| parts.concat();
    let damaged: fn(&UnsealError) -> bool = |e| matches!(e, UnsealError::PayloadDamaged);
    let truncated: fn(&UnsealError) -> bool = |e| matches!(e, UnsealError::Truncated);

    // Valid: a full-size final chunk; an empty plaintext; a short final chunk.
    let file = check(&[(&a, false), (&b, false), (&a, true)], Ok(cat(&[&a, &b, &a])), "full final chunk");
    assert_eq!(age_crate_decrypt(&file, &id), cat(&[&a, &b, &a]), "the age crate agrees with the hand-made file");
    check(&[(b"", true)], Ok(Vec::new()), "empty plaintext");
    check(&[(&a, false), (short, true)], Ok(cat(&[&a, short])), "short final chunk");
    // Invalid: an empty final chunk after full chunks.
    check(&[(&a, false), (&b, false), (b"", true)], Err(damaged), "empty final chunk after full chunks");
    // Two final chunks; a short chunk that is not final; no final chunk.
    check(&[(&a, true), (&b, true)], Err(damaged), "two final chunks");
    check(&[(short, false), (short, true)], Err(damaged), "short non-final chunk");
    check(&[(&a, false), (&b, false)], Err(truncated), "no final chunk (cut at a chunk boundary)");
    check(&[(short, false)], Err(damaged), "short chunk marked not final");
    check(&[], Err(truncated), "no chunks at all");
    // Chunks numbered from 1 instead of 0: the counter is checked.
    let mut shifted = craft(&id, &[(b"", false), (&a, false), (short, true)]);
    let start = payload_start(&shifted) + NONCE_SIZE;
    shifted.drain(start..start + TAG_SIZE);
    let (r, _) = open_with(&shifted, &[&id], Tuning::default());
    assert!(matches!(r, Err(UnsealError::PayloadDamaged)), "{r:?}");
}

/// A file of 5 full chunks and a short one, for tampering.
fn victim(t: Tuning) -> (Vec<u8>, Vec<u8>, usize) {
    let pt = data(5 * CHUNK_SIZE + 1000);
    let sealed = seal_t(&issued(None), &pt, t);
    let p = payload_start(&sealed) + NONCE_SIZE;
    (pt, sealed, p)
}

#[test]
fn tampering_is_detected_and_named() {
    for t in tunings() {
        let (pt, sealed, p) = victim(t);
        let n = sealed.len();
        let chunk = |i: usize| p + i * ENC_CHUNK_SIZE;
        // A flipped bit in each chunk (data and tag): damaged, and nothing past the chunks before it was written.
        for i in 0..6 {
            for off in [0, 100, 999, 1000 + 3] {
                let at = (chunk(i) + off).min(n - 1);
                let mut bad = sealed.clone();
                bad[at] ^= 0x10;
                let (r, out) = open_kluis(&bad, t);
                assert!(matches!(r, Err(UnsealError::PayloadDamaged)), "chunk {i} +{off} {t:?}: {r:?}");
                assert!(out == pt[..i * CHUNK_SIZE], "chunk {i} {t:?}: {} bytes written", out.len());
            }
        }
        // A flipped bit in the payload nonce: the first chunk fails.
        let mut bad = sealed.clone();
        bad[p - 1] ^= 1;
        assert!(matches!(open_kluis(&bad, t).0, Err(UnsealError::PayloadDamaged)));
        // Truncation at each chunk boundary: truncated; the (authenticated) chunks before the cut are written.
        for k in 1..=5 {
            let (r, out) = open_kluis(&sealed[..chunk(k)], t);
            assert!(matches!(r, Err(UnsealError::Truncated)), "cut after {k} chunks {t:?}: {r:?}");
            assert!(out == pt[..k * CHUNK_SIZE], "cut after {k} chunks {t:?}");
        }
        // Truncation right after the header, inside the nonce, right after the nonce: truncated.
        for cut in [p - NONCE_SIZE, p - 5, p] {
            let (r, out) = open_kluis(&sealed[..cut], t);
            assert!(matches!(r, Err(UnsealError::Truncated)), "cut at {cut} {t:?}: {r:?}");
            assert!(out.is_empty());
        }
        // Truncation mid-chunk, in the final tag, and leaving less than a tag: damaged.
        for cut in [chunk(2) + 1000, n - 10, n - 1, chunk(5) + 5, chunk(3) + TAG_SIZE] {
            let (r, _) = open_kluis(&sealed[..cut], t);
            assert!(matches!(r, Err(UnsealError::PayloadDamaged)), "cut at {cut} {t:?}: {r:?}");
        }
        // Data after the final chunk: damaged.
        for extra in [1, TAG_SIZE, ENC_CHUNK_SIZE - 1016, ENC_CHUNK_SIZE, 3 * ENC_CHUNK_SIZE + 5] {
            let mut bad = sealed.clone();
            bad.extend(std::iter::repeat_n(0xa5, extra));
            let (r, _) = open_kluis(&bad, t);
            assert!(matches!(r, Err(UnsealError::PayloadDamaged)), "{extra} bytes appended {t:?}: {r:?}");
        }
        // A swapped pair of chunks: damaged at the first of them.
        for (i, j) in [(1, 2), (0, 4), (3, 4)] {
            let mut bad = sealed.clone();
            let (ci, cj) = (sealed[chunk(i)..chunk(i + 1)].to_vec(), sealed[chunk(j)..chunk(j + 1)].to_vec());
            bad[chunk(i)..chunk(i + 1)].copy_from_slice(&cj);
            bad[chunk(j)..chunk(j + 1)].copy_from_slice(&ci);
            let (r, out) = open_kluis(&bad, t);
            assert!(matches!(r, Err(UnsealError::PayloadDamaged)), "swap {i} {j} {t:?}: {r:?}");
            assert!(out == pt[..i * CHUNK_SIZE], "swap {i} {j} {t:?}");
        }
        // A chunk dropped from the middle: damaged.
        let mut bad = sealed.clone();
        bad.drain(chunk(1)..chunk(2));
        assert!(matches!(open_kluis(&bad, t).0, Err(UnsealError::PayloadDamaged)));
    }
}

#[test]
fn header_tampering_is_detected_and_named() {
    let id = age::x25519::Identity::generate();
    let (_, sealed, _) = victim(Tuning::default());
    let with_escrow = seal_t(&issued(Some(&id)), b"escrowed", Tuning::default());
    let mac_at = sealed.windows(4).position(|w| w == b"--- ").unwrap() + 4;
    // Each character of the MAC.
    for i in 0..43 {
        let mut bad = sealed.clone();
        bad[mac_at + i] = if bad[mac_at + i] == b'A' { b'B' } else { b'A' };
        let (r, _) = open_kluis(&bad, Tuning::default());
        // The last character also carries 2 bits that must be zero: A<->B there is canonical-ness, not the MAC.
        assert!(matches!(r, Err(UnsealError::HeaderMac | UnsealError::HeaderDamaged(_))), "MAC char {i}: {r:?}");
        if i < 42 {
            assert!(matches!(r, Err(UnsealError::HeaderMac)), "MAC char {i}: {r:?}");
        }
    }
    // The MAC also covers the stanzas: change the recovery stanza's argument (the key still opens by the Kluis stanza).
    let x = with_escrow.windows(10).position(|w| w == b"-> X25519 ").unwrap() + 10;
    let mut bad = with_escrow.clone();
    bad[x] = if bad[x] == b'A' { b'B' } else { b'A' };
    assert!(matches!(open_kluis(&bad, Tuning::default()).0, Err(UnsealError::HeaderMac)));
    // An unknown extra stanza inserted: the MAC fails (it is ignored for unwrapping, not for the MAC).
    let first_stanza = sealed.windows(3).position(|w| w == b"\n->").unwrap() + 1;
    let mut bad = sealed[..first_stanza].to_vec();
    bad.extend_from_slice(b"-> future-thing arg\nAAAA\n");
    bad.extend_from_slice(&sealed[first_stanza..]);
    assert!(matches!(open_kluis(&bad, Tuning::default()).0, Err(UnsealError::HeaderMac)));
    // Structure: bad version, CRLF, garbage in a body, missing MAC line, empty, not age at all.
    let v2 = [b"age-encryption.org/v2".as_slice(), &sealed[21..]].concat();
    let crlf = [b"age-encryption.org/v1\r".as_slice(), &sealed[21..]].concat();
    let mut garbage = sealed.clone();
    let body_at = first_stanza + sealed[first_stanza..].iter().position(|&b| b == b'\n').unwrap() + 1;
    garbage[body_at + 3] = b'!';
    let no_mac = sealed[..mac_at - 4].to_vec();
    for (what, file) in [("v2", v2), ("crlf", crlf), ("garbage", garbage), ("no mac", no_mac)] {
        let (r, _) = open_kluis(&file, Tuning::default());
        assert!(matches!(r, Err(UnsealError::HeaderDamaged(_))), "{what}: {r:?}");
    }
    assert!(matches!(open_kluis(b"", Tuning::default()).0, Err(UnsealError::Empty)));
    assert!(matches!(open_kluis(b"age-enc", Tuning::default()).0, Err(UnsealError::NotSealed)));
    assert!(matches!(
        open_kluis(b"-----BEGIN AGE ENCRYPTED FILE-----\n", Tuning::default()).0,
        Err(UnsealError::NotSealed)
    ));
    // A header that never ends stops at the size limit.
    let mut endless = b"age-encryption.org/v1\n-> x\n".to_vec();
    endless.extend(std::iter::repeat_n(b'A', header::MAX_HEADER + 10));
    assert!(matches!(open_kluis(&endless, Tuning::default()).0, Err(UnsealError::HeaderDamaged(_))));
}

#[test]
fn header_writer_wraps_bodies_as_the_spec_says() {
    let fk = FileKey::new(Box::new([1; 16]));
    for len in [0usize, 1, 47, 48, 49, 95, 96, 97, 200] {
        let s = Stanza { tag: "test".into(), args: vec!["a".into(), "b=c".into()], body: vec![0xee; len] };
        let h = header::write(&fk, std::slice::from_ref(&s)).unwrap();
        let text = std::str::from_utf8(&h).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "age-encryption.org/v1");
        assert_eq!(lines[1], "-> test a b=c");
        let body = &lines[2..lines.len() - 1];
        let (last, full) = body.split_last().unwrap();
        assert!(full.iter().all(|l| l.len() == 64), "{len}: {body:?}");
        assert!(last.len() < 64, "{len}: the final line is short, empty if need be: {body:?}");
        assert_eq!(full.len(), (len * 8).div_ceil(6) / 64, "{len}");
        let parsed = header::parse(&h).unwrap();
        assert_eq!(parsed.stanzas, vec![s]);
        parsed.verify_mac(&fk).unwrap();
        assert!(parsed.verify_mac(&FileKey::new(Box::new([2; 16]))).is_err());
    }
    // Arguments that the format cannot carry are refused, not written.
    for bad in ["", "two words", "new\nline", "caf\u{e9}"] {
        let s = Stanza { tag: "kluis".into(), args: vec![bad.into()], body: vec![] };
        assert!(matches!(header::write(&fk, &[s]), Err(HeaderError::Unwritable(_))), "{bad:?}");
    }
    let mut key = issued(None);
    key.keyring = "has space".into();
    assert!(matches!(seal_with(&key, &b"x"[..], Vec::new(), Tuning::default()), Err(SealError::Header(_))));
}

/// A reader that returns short reads of pseudo-random sizes and `Interrupted` now and then.
struct Trickle<'a> {
    inner: &'a [u8],
    rng: XorShift,
    max: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.rng.next();
        if r.is_multiple_of(13) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = (1 + (r as usize >> 4) % self.max).min(buf.len());
        self.inner.read(&mut buf[..n])
    }
}

/// A writer that fails once `left` bytes are written.
struct FailAfter {
    left: usize,
}

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that fails after `ok` bytes.
struct BreakAfter<'a> {
    inner: &'a [u8],
    ok: usize,
}

impl Read for BreakAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.ok);
        let n = self.inner.read(&mut buf[..n])?;
        self.ok -= n;
        Ok(n)
    }
}

#[test]
fn short_reads_and_failing_readers_and_writers() {
    let key = issued(None);
    let pt = data(3 * CHUNK_SIZE + 77_777);
    for t in tunings() {
        for max in [1 << 20, 9000, 100] {
            let input = Trickle { inner: &pt, rng: XorShift(max as u64 + 1), max };
            let sealed = seal_with(&key, input, Vec::new(), t).unwrap().0;
            let ident = KluisIdentity::new(resolver);
            let input = Trickle { inner: &sealed, rng: XorShift(max as u64 + 2), max };
            let (out, m) = unseal_with(input, Some(&ident), &[], Vec::new(), t).unwrap();
            assert_eq!(m.plaintext_bytes, pt.len() as u64);
            assert!(out == pt, "max read {max} {t:?}");
        }
        let sealed = seal_t(&key, &pt, t);
        for left in [0, 10, 500, CHUNK_SIZE, 2 * ENC_CHUNK_SIZE + 3] {
            let r = seal_with(&key, &pt[..], FailAfter { left }, t);
            assert!(matches!(r, Err(SealError::WriteOutput(_))), "seal, writer fails after {left} {t:?}");
            let ident = KluisIdentity::new(resolver);
            let r = unseal_with(&sealed[..], Some(&ident), &[], FailAfter { left }, t);
            assert!(matches!(r, Err(UnsealError::WriteOutput(_))), "unseal, writer fails after {left} {t:?}");
        }
        for ok in [0, 5, CHUNK_SIZE + 1, 3 * CHUNK_SIZE] {
            let r = seal_with(&key, BreakAfter { inner: &pt, ok }, Vec::new(), t);
            assert!(matches!(r, Err(SealError::ReadInput(_))), "seal, reader fails after {ok} {t:?}");
        }
        for ok in [0, 5, 600, 2 * ENC_CHUNK_SIZE] {
            let ident = KluisIdentity::new(resolver);
            let r = unseal_with(BreakAfter { inner: &sealed, ok }, Some(&ident), &[], Vec::new(), t);
            assert!(matches!(r, Err(UnsealError::ReadInput(_))), "unseal, reader fails after {ok} {t:?}");
        }
    }
}

#[test]
fn a_long_stream_keeps_to_its_buffers_and_keys_are_fresh() {
    // 40 MiB through the default pipeline; the pipeline asserts (debug builds) that
    // it never allocates more than `depth` batch buffers.
    let key = issued(None);
    let pt = data(40 << 20);
    let a = seal_t(&key, &pt, Tuning::default());
    let b = seal_t(&key, &pt, Tuning::default());
    assert_ne!(a, b, "every seal has a fresh file key and nonce");
    let (r, out) = open_kluis(&a, Tuning::default());
    assert_eq!(r.unwrap(), pt.len() as u64);
    assert!(out == pt);
    let t = Tuning::default();
    assert!(t.depth() * t.batch_bytes() <= 24 << 20, "buffers stay well under the 32 MiB RSS budget: {t:?}");
}

#[test]
fn thread_setting() {
    use super::pipeline::workers_from;
    assert_eq!(workers_from(None, 2), 2);
    assert_eq!(workers_from(None, 0), 1);
    assert_eq!(workers_from(None, 64), 8);
    assert_eq!(workers_from(Some("0"), 2), 0);
    assert_eq!(workers_from(Some(" 3 "), 2), 3);
    assert_eq!(workers_from(Some("lots"), 2), 2);
    assert_eq!(workers_from(Some("1000"), 2), 2);
    let t = Tuning { workers: 8, batch_chunks: 16 };
    assert_eq!(t.depth(), 12);
    assert_eq!(Tuning { workers: 2, batch_chunks: 16 }.depth(), 6);
}

// ---- C2SP age testkit (the CCTV vectors, as shipped in the `age` crate on crates.io) ----

/// The host's target triple, as `rustc -vV` names it.
fn host_triple() -> String {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().unwrap();
    assert!(out.status.success(), "rustc -vV: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host")
}

/// The `age` crate's copy of the testkit, found through `cargo metadata`.
///
/// Only the host's packages: a build downloads no crate of another platform (e.g.
/// `anstyle-wincon`), and a metadata call over every platform would need them all, which
/// fails on a machine that has only ever built the project (and has no network). Without
/// offline mode, a crate that is somehow missing is fetched instead of failing.
fn testkit_dir() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--filter-platform", &host_triple()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "age")
        .filter_map(|p| p["manifest_path"].as_str())
        .map(|m| Path::new(m).parent().unwrap().join("tests/testdata/testkit"))
        .find(|d| d.is_dir())
        .expect("the age crate's source ships tests/testdata/testkit")
}

struct Vector {
    expect: String,
    payload_sha256: Option<String>,
    identities: Vec<String>,
    passphrases: Vec<String>,
    armored: bool,
    file: Vec<u8>,
}

fn parse_vector(raw: &[u8]) -> Vector {
    let mut v = Vector {
        expect: String::new(),
        payload_sha256: None,
        identities: vec![],
        passphrases: vec![],
        armored: false,
        file: vec![],
    };
    let mut compressed = false;
    let mut rest = raw;
    loop {
        let nl = rest.iter().position(|&b| b == b'\n').unwrap();
        let line = std::str::from_utf8(&rest[..nl]).unwrap().trim();
        rest = &rest[nl + 1..];
        if line.is_empty() {
            break;
        }
        let (k, val) = line.split_once(": ").unwrap();
        match k {
            "expect" => v.expect = val.to_owned(),
            "payload" => v.payload_sha256 = Some(val.to_owned()),
            "identity" => v.identities.push(val.to_owned()),
            "passphrase" => v.passphrases.push(val.to_owned()),
            "armored" => v.armored = val == "yes",
            "compressed" => compressed = val == "zlib",
            "file key" | "comment" => {}
            other => panic!("unknown testkit field {other}"),
        }
    }
    if compressed {
        flate2::read::ZlibDecoder::new(rest).read_to_end(&mut v.file).unwrap();
    } else {
        v.file = rest.to_vec();
    }
    v
}

/// What the `age` crate writes before it fails on a damaged payload.
fn age_crate_partial(file: &[u8], ids: &[age::x25519::Identity]) -> Vec<u8> {
    let dec = age::Decryptor::new(file).unwrap();
    let mut r = dec.decrypt(ids.iter().map(|i| i as &dyn age::Identity)).unwrap();
    let mut out = Vec::new();
    assert!(r.read_to_end(&mut out).is_err());
    out
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

#[test]
fn c2sp_age_testkit_vectors() {
    let dir = testkit_dir();
    let mut names: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert!(names.len() >= 100, "{} vectors in {}", names.len(), dir.display());
    let mut ran = 0;
    let mut fails: Vec<String> = Vec::new();
    macro_rules! check {
        ($ok:expr, $what:expr) => {
            if !$ok {
                fails.push(format!("{}", $what));
            }
        };
    }
    for name in &names {
        let v = parse_vector(&std::fs::read(dir.join(name)).unwrap());
        let mut x25519 = Vec::new();
        for s in &v.identities {
            x25519.push(s.parse::<age::x25519::Identity>().unwrap());
        }
        let mut scrypt = Vec::new();
        for p in &v.passphrases {
            let mut id = age::scrypt::Identity::new(age::secrecy::SecretString::from(p.clone()));
            id.set_max_work_factor(16);
            scrypt.push(id);
        }
        let mut ids: Vec<&dyn age::Identity> = x25519.iter().map(|i| i as &dyn age::Identity).collect();
        ids.extend(scrypt.iter().map(|i| i as &dyn age::Identity));
        for t in [Tuning::default(), Tuning { workers: 2, batch_chunks: 1 }] {
            let (r, out) = open_with(&v.file, &ids, t);
            let what = format!("{name} ({}) {t:?}: got {r:?}", v.expect);
            if v.armored {
                // Sealed files are binary age files: armor is not a sealed file, as before.
                check!(matches!(r, Err(UnsealError::NotSealed)), what);
                continue;
            }
            match v.expect.as_str() {
                "success" => {
                    check!(r.is_ok(), what);
                    check!(Some(sha256_hex(&out)) == v.payload_sha256, format!("{what}: wrong plaintext"));
                }
                // A missing or short payload nonce: reported as a truncated file.
                "header failure" if ["stream_no_nonce", "stream_short_nonce"].contains(&name.as_str()) => {
                    check!(matches!(r, Err(UnsealError::Truncated)), what)
                }
                // An empty input is named as such.
                "header failure" if name == "empty" => check!(matches!(r, Err(UnsealError::Empty)), what),
                "header failure" => check!(matches!(r, Err(UnsealError::HeaderDamaged(_))), what),
                "HMAC failure" => check!(matches!(r, Err(UnsealError::HeaderMac)), what),
                "no match" => {
                    check!(matches!(r, Err(UnsealError::NoMatchingStanza | UnsealError::OtherRecoveryKey)), what)
                }
                "payload failure" => {
                    // Cut after a full non-final chunk: truncated; anything else: damaged.
                    let cut = ["stream_no_chunks", "stream_no_final_full", "stream_no_final_two_chunks_full"];
                    if cut.contains(&name.as_str()) {
                        check!(matches!(r, Err(UnsealError::Truncated)), what);
                    } else {
                        check!(matches!(r, Err(UnsealError::PayloadDamaged)), what);
                    }
                    // Only whole authenticated chunks were written: exactly what the testkit
                    // expects; or, where a full final chunk has data after it, one chunk less
                    // (see `open_batch`): then a prefix of what the `age` crate releases.
                    let after_final = ["stream_trailing_garbage_long", "stream_trailing_garbage_short"];
                    if after_final.contains(&name.as_str()) || name.starts_with("stream_two_final_chunks") {
                        let theirs = age_crate_partial(&v.file, &x25519);
                        check!(Some(sha256_hex(&theirs)) == v.payload_sha256, format!("{what}: age crate output"));
                        check!(
                            theirs.starts_with(&out)
                                && out.len().is_multiple_of(CHUNK_SIZE)
                                && theirs.len() - out.len() <= CHUNK_SIZE,
                            format!("{what}: wrote {} of the {} bytes age releases", out.len(), theirs.len())
                        );
                    } else {
                        check!(Some(sha256_hex(&out)) == v.payload_sha256, format!("{what}: wrong plaintext"));
                    }
                }
                other => panic!("{name}: unknown expectation {other}"),
            }
        }
        ran += 1;
    }
    assert!(fails.is_empty(), "{} of {ran} vectors disagree:\n{}", fails.len(), fails.join("\n"));
    eprintln!("ran {ran} C2SP age testkit vectors from {}", dir.display());
}

/// Throughput probe, not a pass/fail test: `cargo test --release -p kluis-age
/// stream_throughput -- --ignored --nocapture`. Memory to a sink, so no I/O and no server.
#[test]
#[ignore]
fn stream_throughput() {
    use std::time::Instant;
    let key = issued(None);
    let pt = data(512 << 20);
    let mib = pt.len() as f64 / f64::from(1 << 20);
    // ring alone, one thread, in place, 64 KiB at a time.
    let lsk = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[3; 32]).unwrap());
    let one = |buf: &mut [u8]| {
        for (i, c) in buf.chunks_mut(CHUNK_SIZE).enumerate() {
            let _ = lsk.seal_in_place_separate_tag(nonce(i as u64, false), Aad::empty(), c).unwrap();
        }
    };
    let mut buf = pt.clone();
    let t = Instant::now();
    one(&mut buf);
    eprintln!("ring, 1 thread:        {:6.0} MiB/s", mib / t.elapsed().as_secs_f64());
    let half = buf.len() / 2;
    let (a, b) = buf.split_at_mut(half);
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| one(a));
        s.spawn(|| one(b));
    });
    eprintln!("ring, 2 threads:       {:6.0} MiB/s", mib / t.elapsed().as_secs_f64());
    for tuning in [
        Tuning { workers: 0, batch_chunks: 16 },
        Tuning { workers: 1, batch_chunks: 16 },
        Tuning::default(),
        Tuning { workers: 3, batch_chunks: 16 },
        Tuning { workers: 2, batch_chunks: 32 },
    ] {
        let t = Instant::now();
        seal_with(&key, &pt[..], io::sink(), tuning).unwrap();
        let s = t.elapsed().as_secs_f64();
        let (sealed, _) = seal_with(&key, &pt[..], Vec::new(), tuning).unwrap();
        let ident = KluisIdentity::new(resolver);
        let t = Instant::now();
        unseal_with(&sealed[..], Some(&ident), &[], io::sink(), tuning).unwrap();
        let o = t.elapsed().as_secs_f64();
        eprintln!("pipeline {tuning:?}: seal {:6.0} MiB/s, open {:6.0} MiB/s", mib / s, mib / o);
    }
}
