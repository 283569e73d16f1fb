//! The age v1 header: reading, checking and writing.
//!
//! The grammar is the C2SP age specification's ("ABNF definition of file header"),
//! followed exactly:
//!
//! ```text
//! header     = v1-line 1*stanza end
//! v1-line    = %s"age-encryption.org/v1" LF
//! end        = "--- " 43base64char LF
//! base64char = ALPHA / DIGIT / "+" / "/"
//! stanza     = arg-line *full-line final-line
//! arg-line   = "-> " argument *(SP argument) LF
//! argument   = 1*VCHAR
//! full-line  = 64base64char LF
//! final-line = *63base64char LF
//! ```
//!
//! with the specification's prose around it: base64 is canonical (RFC 4648 section
//! 3.5) and unpadded, and "decoders MUST reject non-canonical encodings and
//! encodings ending with `=` padding characters"; "the body MUST end with a line
//! shorter than 64 characters, which MAY be empty"; an scrypt stanza "MUST be the
//! only stanza in the header". `VCHAR` is printable ASCII (33-126), `LF` a line feed
//! alone (no carriage return). The header ends at the LF of its MAC line; the
//! payload starts right after it.
//!
//! `MAC = HMAC-SHA-256(key = HKDF-SHA-256(ikm = file key, salt = "", info = "header"),
//! message = the header up to and including "---")`.
//!
//! The parser is this module's own ([`parse`], used by [`read`]), not `age_core`'s:
//! that one also accepts a legacy body encoding (a stanza with no body line at all,
//! or whose last body line is a full 64 columns), which the specification refuses.
//! Every reader of sealed files (unseal with the Kluis identity, offline unseal with
//! a recovery identity, verify, rewrap) goes through [`read`] or [`parse`]. A header
//! that breaks a rule is refused with a [`HeaderDefect`] naming the line and the rule.

use std::fmt;
use std::io::{self, Read};
use std::ops::Range;

use age_core::format::{FileKey, Stanza, is_arbitrary_string};
use age_core::primitives::hkdf;
use age_core::secrecy::ExposeSecret;
use base64::Engine;
use base64::prelude::BASE64_STANDARD_NO_PAD;
use ring::hmac;
use zeroize::Zeroizing;

/// Every age file starts with this.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/";
const V1_LINE: &[u8] = b"age-encryption.org/v1\n";
const STANZA_PREFIX: &[u8] = b"-> ";
const MAC_PREFIX: &[u8] = b"---";
const MAC_LINE_PREFIX: &[u8] = b"--- ";
const ENCODED_MAC_LEN: usize = 43;
/// Columns of a full stanza body line; the final line is shorter.
const BODY_COLUMNS: usize = 64;
const HEADER_KEY_LABEL: &[u8] = b"header";
/// Headers longer than this are refused (thousands of recipients fit).
pub const MAX_HEADER: usize = 1 << 20;
/// At most this many stanza arguments (tags included) in one header: a 1 MiB header of
/// one-character arguments would otherwise be half a million small allocations.
/// Thousands of recipients still fit (an `X25519` stanza has two).
pub const MAX_ARGUMENTS: usize = 1 << 16;
const READ_STEP: usize = 16 * 1024;
/// How much of the version line is looked at to say what is wrong with it.
const VERSION_LOOKAHEAD: usize = 128;
const SCRYPT_TAG: &str = "scrypt";

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the input is empty")]
    Empty,
    #[error("the input does not start with an age header")]
    NotAge,
    /// The header breaks a rule of the age v1 grammar (or is truncated, or too long).
    #[error("the age header is damaged: {0}")]
    Damaged(HeaderDefect),
    #[error("reading the input failed: {0}")]
    Read(#[source] io::Error),
    #[error("a stanza cannot be written in an age header: {0}")]
    Unwritable(&'static str),
}

/// Where a header breaks a rule, and which one. Its text is the line and the rule:
/// `line 3: stanza body line is 65 columns; body lines are 64 columns, the last one shorter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderDefect {
    /// The header line at fault, counted from 1 (the version line); `None` when no
    /// single line is.
    pub line: Option<usize>,
    pub rule: Rule,
}

impl HeaderDefect {
    fn at(line: usize, rule: Rule) -> Self {
        Self { line: Some(line), rule }
    }

    /// A defect of the header as a whole, not of one line.
    pub fn whole(rule: Rule) -> Self {
        Self { line: None, rule }
    }
}

impl fmt::Display for HeaderDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}: {}", self.rule),
            None => write!(f, "{}", self.rule),
        }
    }
}

impl std::error::Error for HeaderDefect {}

/// The rule of the age v1 header that a header breaks (see the module docs for the
/// grammar). Columns are counted from 1 within their line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rule {
    /// `v1-line = %s"age-encryption.org/v1" LF`: the version line is something else.
    VersionLine,
    /// `version = 1*VCHAR`, but not `v1`: another version of the format (shown, at most
    /// 32 characters).
    UnsupportedVersion(String),
    /// Lines end with `LF` alone: a carriage return is not part of any rule.
    CarriageReturn { column: usize },
    /// After the version line, a line starts a stanza (`-> `) or is the MAC line (`---`).
    NotStanzaOrMacLine,
    /// `stanza = arg-line *full-line final-line`: the final (short) line ends the
    /// stanza, so another body line after it is out of place.
    BodyLineAfterFinalLine,
    /// `arg-line = "-> " argument *(SP argument) LF`: there is no argument.
    NoArgument,
    /// `argument = 1*VCHAR` separated by single `SP`: an argument is empty (two spaces,
    /// or a space at the start or end).
    EmptyArgument { column: usize },
    /// `argument = 1*VCHAR`: a byte outside printable ASCII (33-126).
    ArgumentNotPrintable { byte: u8, column: usize },
    /// More than [`MAX_ARGUMENTS`] stanza arguments in one header.
    TooManyArguments,
    /// The stanza that starts on `stanza_line` has no body line at all; even an empty
    /// body has its (empty) final line.
    MissingBody { stanza_line: usize },
    /// The stanza that starts on `stanza_line` ends on a full 64-column line; its final
    /// line, shorter (empty if need be), is missing.
    MissingFinalLine { stanza_line: usize },
    /// `full-line = 64base64char LF`, `final-line = *63base64char LF`: longer.
    BodyLineTooLong { columns: usize },
    /// `base64char = ALPHA / DIGIT / "+" / "/"`: another byte in a body line.
    BodyNotBase64 { byte: u8, column: usize },
    /// base64 without `=` padding.
    BodyPadded { column: usize },
    /// Canonical base64: a final line of impossible length, or with unused bits set.
    BodyNotCanonical,
    /// `header = v1-line 1*stanza end`: no stanza before the MAC line.
    NoStanza,
    /// An scrypt stanza MUST be the only stanza in the header.
    ScryptNotAlone,
    /// `end = "--- " 43base64char LF`: the MAC line does not start with `--- `.
    MacLinePrefix,
    /// `43base64char`: a byte of the MAC that is not a base64 character.
    MacNotBase64 { byte: u8, column: usize },
    /// `43base64char`: another number of characters.
    MacLength { characters: usize },
    /// Canonical base64: the unused bits of the MAC's last character are not zero.
    MacNotCanonical,
    /// The input ends before the header does (its MAC line and the line feed after it).
    Truncated,
    /// The header goes on past [`MAX_HEADER`] bytes.
    TooLong,
    /// [`parse`] was given bytes after the MAC line; a header ends there.
    DataAfterMacLine,
    /// The identity of a stanza's type refused its arguments or body (what the age
    /// crate's identity said).
    StanzaRefused(String),
    /// A stanza that the writer cannot encode.
    Unencodable(&'static str),
}

/// A byte as an error message shows it.
struct Shown(u8);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b' ' => write!(f, "a space"),
            b @ 0x21..=0x7e => write!(f, "'{}'", char::from(b)),
            b => write!(f, "byte 0x{b:02x}"),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VersionLine => write!(f, "the version line is not \"age-encryption.org/v1\""),
            Self::UnsupportedVersion(v) => {
                write!(f, "age format version \"{v}\" is not supported; the version line is \"age-encryption.org/v1\"")
            }
            Self::CarriageReturn { column } => {
                write!(f, "carriage return at column {column}; header lines end with a line feed alone")
            }
            Self::NotStanzaOrMacLine => {
                write!(f, "expected a stanza line (\"-> \" and arguments) or the MAC line (\"--- \" and the MAC)")
            }
            Self::BodyLineAfterFinalLine => write!(
                f,
                "a body line after the stanza's final line; a body line shorter than 64 columns ends its stanza"
            ),
            Self::NoArgument => write!(f, "the stanza line has no argument; it is \"-> \" and one or more arguments"),
            Self::EmptyArgument { column } => {
                write!(f, "empty stanza argument at column {column}; arguments are separated by single spaces")
            }
            Self::ArgumentNotPrintable { byte, column } => write!(
                f,
                "stanza argument has {} at column {column}; arguments are printable ASCII (33-126)",
                Shown(*byte)
            ),
            Self::TooManyArguments => {
                write!(f, "the header has more than {MAX_ARGUMENTS} stanza arguments")
            }
            Self::MissingBody { stanza_line } => write!(
                f,
                "the stanza on line {stanza_line} has no body; a stanza ends with a body line shorter than 64 columns, empty if need be"
            ),
            Self::MissingFinalLine { stanza_line } => write!(
                f,
                "the stanza on line {stanza_line} ends with a 64-column body line; its final line, shorter (empty if need be), is missing"
            ),
            Self::BodyLineTooLong { columns } => {
                write!(f, "stanza body line is {columns} columns; body lines are 64 columns, the last one shorter")
            }
            Self::BodyNotBase64 { byte, column } => write!(
                f,
                "stanza body has {} at column {column}; a body is base64 (A-Z, a-z, 0-9, '+', '/')",
                Shown(*byte)
            ),
            Self::BodyPadded { column } => {
                write!(f, "stanza body has '=' padding at column {column}; age base64 is unpadded")
            }
            Self::BodyNotCanonical => write!(
                f,
                "stanza body line is not canonical base64 (a length no encoding has, or unused bits that are not zero)"
            ),
            Self::NoStanza => write!(f, "the header has no stanza; one or more come before the MAC line"),
            Self::ScryptNotAlone => write!(f, "an scrypt stanza must be the only stanza in its header"),
            Self::MacLinePrefix => {
                write!(f, "the MAC line does not start with \"--- \" (three dashes and one space)")
            }
            Self::MacNotBase64 { byte, column } => {
                write!(f, "the MAC line has {} at column {column}; the MAC is 43 base64 characters", Shown(*byte))
            }
            Self::MacLength { characters } => {
                write!(f, "the MAC is {characters} characters; it is 43 base64 characters")
            }
            Self::MacNotCanonical => {
                write!(f, "the MAC is not canonical base64 (the unused bits of its last character are not zero)")
            }
            Self::Truncated => write!(f, "the input ends inside the header, before the end of its MAC line"),
            Self::TooLong => write!(f, "the header goes on past {MAX_HEADER} bytes without ending"),
            Self::DataAfterMacLine => write!(f, "bytes follow the MAC line; the header ends with it"),
            Self::StanzaRefused(why) => {
                write!(f, "a stanza is malformed for its recipient type (the identity that reads it says: {why})")
            }
            Self::Unencodable(why) => write!(f, "{why}"),
        }
    }
}

/// A parsed v1 header whose MAC is still to be checked (that needs the file key).
pub struct Header {
    pub stanzas: Vec<Stanza>,
    /// Byte range of each stanza in the header (its `-> ` line through its final
    /// body line's line feed).
    spans: Vec<Range<usize>>,
    /// The header bytes the MAC covers (up to and including `---`).
    mac_input: Vec<u8>,
    mac: [u8; 32],
}

impl Header {
    /// Checks the header MAC (constant time) with the file key a stanza gave.
    pub fn verify_mac(&self, file_key: &FileKey) -> Result<(), HeaderMacMismatch> {
        hmac::verify(&mac_key(file_key), &self.mac_input, &self.mac).map_err(|_| HeaderMacMismatch)
    }

    /// Where each stanza is in the header bytes that were parsed, in order: from
    /// its `-> ` line through the line feed of its final body line.
    pub fn stanza_spans(&self) -> &[Range<usize>] {
        &self.spans
    }

    /// Where the `---` of the MAC line ends: the length of what the MAC covers.
    pub fn mac_input_len(&self) -> usize {
        self.mac_input.len()
    }
}

/// The header MAC does not verify under the file key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the header MAC does not verify")]
pub struct HeaderMacMismatch;

fn mac_key(file_key: &FileKey) -> hmac::Key {
    let k = Zeroizing::new(hkdf(&[], HEADER_KEY_LABEL, file_key.expose_secret()));
    hmac::Key::new(hmac::HMAC_SHA256, &k[..])
}

/// Appends the canonical encoding of one stanza (its `-> ` line and body lines).
fn encode_stanza(s: &Stanza, out: &mut Vec<u8>) -> Result<(), HeaderError> {
    if !is_arbitrary_string(&s.tag) {
        return Err(HeaderError::Unwritable("a stanza tag must be printable ASCII without spaces"));
    }
    if !s.args.iter().all(is_arbitrary_string) {
        return Err(HeaderError::Unwritable("a stanza argument must be printable ASCII without spaces"));
    }
    out.extend_from_slice(STANZA_PREFIX);
    out.extend_from_slice(s.tag.as_bytes());
    for a in &s.args {
        out.push(b' ');
        out.extend_from_slice(a.as_bytes());
    }
    out.push(b'\n');
    let body = BASE64_STANDARD_NO_PAD.encode(&s.body);
    let mut lines = body.as_bytes().chunks_exact(64);
    for line in lines.by_ref() {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    // The final line is always shorter than 64 columns: empty if need be.
    out.extend_from_slice(lines.remainder());
    out.push(b'\n');
    Ok(())
}

/// Closes a header: `mac_input` ends with the stanzas; appends `---`, the MAC over
/// everything up to it, and the newline.
fn close_with_mac(file_key: &FileKey, mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(MAC_PREFIX);
    let tag = hmac::sign(&mac_key(file_key), &out);
    out.push(b' ');
    out.extend_from_slice(BASE64_STANDARD_NO_PAD.encode(tag.as_ref()).as_bytes());
    out.push(b'\n');
    out
}

/// Writes a v1 header for `stanzas` (one or more), MACed with `file_key`.
pub fn write(file_key: &FileKey, stanzas: &[Stanza]) -> Result<Vec<u8>, HeaderError> {
    if stanzas.is_empty() {
        return Err(HeaderError::Unwritable("an age header has one or more stanzas"));
    }
    let mut out = Vec::with_capacity(256 * (stanzas.len() + 1));
    out.extend_from_slice(V1_LINE);
    for s in stanzas {
        encode_stanza(s, &mut out)?;
    }
    Ok(close_with_mac(file_key, out))
}

/// The header `raw` with the stanza at byte range `span` replaced by `stanza` (in its
/// canonical encoding) and a new MAC under `file_key`; every other byte before the
/// `---` that ends at `dashes_end` is kept as it was (other stanzas stay byte for
/// byte). The same writer and MAC as [`write`]; the caller checks the result parses.
pub fn replace_stanza(
    raw: &[u8],
    span: std::ops::Range<usize>,
    dashes_end: usize,
    stanza: &Stanza,
    file_key: &FileKey,
) -> Result<Vec<u8>, HeaderError> {
    let bad = || HeaderError::Unwritable("the stanza to replace is not inside the header");
    let mac_start = dashes_end.checked_sub(MAC_PREFIX.len()).ok_or_else(bad)?;
    if span.start < V1_LINE.len() || span.end > mac_start || span.start > span.end || raw.get(mac_start..dashes_end) != Some(MAC_PREFIX) {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(raw.len() + 256);
    out.extend_from_slice(&raw[..span.start]);
    encode_stanza(stanza, &mut out)?;
    out.extend_from_slice(&raw[span.end..mac_start]);
    Ok(close_with_mac(file_key, out))
}

/// The header `raw` with `stanza` (canonical encoding) added after its last stanza and
/// a new MAC under `file_key`; every byte before the `---` that ends at `dashes_end` is
/// kept as it was. The caller checks the result parses.
pub fn append_stanza(raw: &[u8], dashes_end: usize, stanza: &Stanza, file_key: &FileKey) -> Result<Vec<u8>, HeaderError> {
    let at = dashes_end
        .checked_sub(MAC_PREFIX.len())
        .ok_or(HeaderError::Unwritable("the stanza to replace is not inside the header"))?;
    replace_stanza(raw, at..at, dashes_end, stanza, file_key)
}

/// Reads a header from `input`. Returns it and the bytes read past it (the
/// start of the payload), which the caller must read before the rest of `input`.
/// Reads at most [`MAX_HEADER`] bytes plus one read step.
pub fn read<R: Read + ?Sized>(input: &mut R) -> Result<(Header, Vec<u8>), HeaderError> {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_STEP);
    // Where to look for "\n---" next, and where the "---" line starts once found.
    let mut scan = 0;
    let mut mac_line: Option<usize> = None;
    loop {
        // Not an age file at all, or (as soon as it can be told) not version 1.
        let magic = buf.len().min(AGE_MAGIC.len());
        if buf[..magic] != AGE_MAGIC[..magic] {
            return Err(HeaderError::NotAge);
        }
        if buf.len() >= V1_LINE.len()
            && !buf.starts_with(V1_LINE)
            && (buf.len() >= VERSION_LOOKAHEAD || buf.contains(&b'\n'))
        {
            return Err(HeaderError::Damaged(version_defect(&buf)));
        }
        // The header ends with the first line that starts with "---", whatever the
        // lines before it are (the parser then checks them all).
        if mac_line.is_none() {
            if let Some(p) = find(&buf[scan..], b"\n---") {
                mac_line = Some(scan + p + 1);
            } else {
                scan = buf.len().saturating_sub(3);
            }
        }
        if let Some(m) = mac_line
            && let Some(e) = buf[m..].iter().position(|&b| b == b'\n')
        {
            let rest = buf.split_off(m + e + 1);
            return Ok((parse(&buf)?, rest));
        }
        if buf.len() >= MAX_HEADER {
            return Err(HeaderError::Damaged(unfinished(&buf, Rule::TooLong)));
        }
        // Read more.
        let old = buf.len();
        buf.resize(old + READ_STEP.min(MAX_HEADER - old), 0);
        let n = loop {
            match input.read(&mut buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HeaderError::Read(e)),
            }
        };
        buf.truncate(old + n);
        if n == 0 {
            return Err(if buf.is_empty() {
                HeaderError::Empty
            } else if buf.len() < AGE_MAGIC.len() {
                HeaderError::NotAge
            } else {
                HeaderError::Damaged(unfinished(&buf, Rule::Truncated))
            });
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The defect of a header that did not end within `buf`: the first rule a line of
/// it breaks, or else `rule` (truncated, too long) at the line where `buf` ends.
fn unfinished(buf: &[u8], rule: Rule) -> HeaderDefect {
    match parse_lines(buf) {
        Err(HeaderDefect { line, rule: Rule::Truncated }) => HeaderDefect { line, rule },
        Err(d) => d,
        // Not reached: a complete header is returned before this is asked.
        Ok(_) => HeaderDefect::whole(rule),
    }
}

/// Parses a complete header (nothing after its MAC line): the version line, one or
/// more stanzas, the MAC line, each exactly as the grammar in the module docs says.
pub fn parse(h: &[u8]) -> Result<Header, HeaderError> {
    let p = parse_lines(h).map_err(HeaderError::Damaged)?;
    if p.len != h.len() {
        return Err(HeaderError::Damaged(HeaderDefect::at(p.mac_line + 1, Rule::DataAfterMacLine)));
    }
    Ok(Header { stanzas: p.stanzas, spans: p.spans, mac_input: h[..p.dashes_end].to_vec(), mac: p.mac })
}

/// What [`parse_lines`] found at the start of its input.
struct Parsed {
    stanzas: Vec<Stanza>,
    spans: Vec<Range<usize>>,
    /// Where the `---` of the MAC line ends.
    dashes_end: usize,
    /// The number of the MAC line.
    mac_line: usize,
    mac: [u8; 32],
    /// Where the header ends (after the MAC line's line feed).
    len: usize,
}

/// One line of a header, without its line feed.
struct Line<'a> {
    /// Counted from 1.
    no: usize,
    /// Offset of its first byte in the header.
    start: usize,
    text: &'a [u8],
}

/// The header's lines, each ended by a line feed and checked for carriage returns.
struct Lines<'a> {
    h: &'a [u8],
    /// Where the next line starts.
    pos: usize,
    /// The number of the last line returned.
    no: usize,
}

impl<'a> Lines<'a> {
    /// The next line; [`Rule::Truncated`] at its number if the input ends first.
    fn next(&mut self) -> Result<Line<'a>, HeaderDefect> {
        self.no += 1;
        let rest = &self.h[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(HeaderDefect::at(self.no, Rule::Truncated));
        };
        let line = Line { no: self.no, start: self.pos, text: &rest[..n] };
        self.pos += n + 1;
        if let Some(c) = line.text.iter().position(|&b| b == b'\r') {
            return Err(HeaderDefect::at(line.no, Rule::CarriageReturn { column: c + 1 }));
        }
        Ok(line)
    }
}

/// Parses the header at the start of `h` (anything may follow it).
fn parse_lines(h: &[u8]) -> Result<Parsed, HeaderDefect> {
    if !h.starts_with(V1_LINE) {
        return Err(if V1_LINE.starts_with(h) { HeaderDefect::at(1, Rule::Truncated) } else { version_defect(h) });
    }
    let mut lines = Lines { h, pos: 0, no: 0 };
    lines.next()?;
    let mut stanzas: Vec<Stanza> = Vec::new();
    let mut spans = Vec::new();
    // The line each stanza starts on (for the scrypt rule's message).
    let mut stanza_lines = Vec::new();
    let mut arguments = 0usize;
    let mut line = lines.next()?;
    while !line.text.starts_with(MAC_PREFIX) {
        if !is_arg_line(line.text) {
            // A short line ends a stanza, so a base64 line here is a body line too many.
            let rule = if !stanzas.is_empty() && line.text.iter().all(|&b| is_base64(b)) {
                Rule::BodyLineAfterFinalLine
            } else {
                Rule::NotStanzaOrMacLine
            };
            return Err(HeaderDefect::at(line.no, rule));
        }
        let (tag, args) = arguments_of(line.text).map_err(|r| HeaderDefect::at(line.no, r))?;
        arguments += 1 + args.len();
        if arguments > MAX_ARGUMENTS {
            return Err(HeaderDefect::at(line.no, Rule::TooManyArguments));
        }
        let (first, start) = (line.no, line.start);
        let mut body = Vec::new();
        let mut body_lines = 0usize;
        loop {
            let b = lines.next()?;
            if is_arg_line(b.text) || b.text.starts_with(MAC_PREFIX) {
                let rule = if body_lines == 0 {
                    Rule::MissingBody { stanza_line: first }
                } else {
                    Rule::MissingFinalLine { stanza_line: first }
                };
                return Err(HeaderDefect::at(b.no, rule));
            }
            body_line(b.text, &mut body).map_err(|r| HeaderDefect::at(b.no, r))?;
            body_lines += 1;
            if b.text.len() < BODY_COLUMNS {
                break;
            }
        }
        stanzas.push(Stanza { tag, args, body });
        spans.push(start..lines.pos);
        stanza_lines.push(first);
        line = lines.next()?;
    }
    if stanzas.is_empty() {
        return Err(HeaderDefect::at(line.no, Rule::NoStanza));
    }
    if stanzas.len() > 1
        && let Some(i) = stanzas.iter().position(|s| s.tag == SCRYPT_TAG)
    {
        return Err(HeaderDefect::at(stanza_lines[i], Rule::ScryptNotAlone));
    }
    let mac = mac_of(line.text).map_err(|r| HeaderDefect::at(line.no, r))?;
    Ok(Parsed { stanzas, spans, dashes_end: line.start + MAC_PREFIX.len(), mac_line: line.no, mac, len: lines.pos })
}

/// Why the header that starts with `h` does not start with `age-encryption.org/v1`
/// and a line feed. Only its first [`VERSION_LOOKAHEAD`] bytes are looked at, so that
/// [`read`] and [`parse`] say the same; a version line not seen whole there is only
/// "not the version line".
fn version_defect(h: &[u8]) -> HeaderDefect {
    let window = &h[..h.len().min(VERSION_LOOKAHEAD)];
    let (text, whole) = match window.iter().position(|&b| b == b'\n') {
        Some(n) => (&window[..n], true),
        None => (window, false),
    };
    if let Some(c) = text.iter().position(|&b| b == b'\r') {
        return HeaderDefect::at(1, Rule::CarriageReturn { column: c + 1 });
    }
    let rule = match text.strip_prefix(AGE_MAGIC) {
        Some(v) if whole && !v.is_empty() && v.iter().all(|b| (33..=126).contains(b)) => {
            let shown: String = v.iter().take(32).map(|&b| char::from(b)).collect();
            Rule::UnsupportedVersion(if v.len() > 32 { shown + "..." } else { shown })
        }
        _ => Rule::VersionLine,
    };
    HeaderDefect::at(1, rule)
}

/// `"-> " ...` (or `"->"` alone, a stanza line without arguments).
fn is_arg_line(text: &[u8]) -> bool {
    text.starts_with(STANZA_PREFIX) || text == &STANZA_PREFIX[..2]
}

fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

/// The tag and the other arguments of a stanza line:
/// `"-> " argument *(SP argument)`, `argument = 1*VCHAR`.
fn arguments_of(text: &[u8]) -> Result<(String, Vec<String>), Rule> {
    let words = text.get(STANZA_PREFIX.len()..).unwrap_or_default();
    if words.is_empty() {
        return Err(Rule::NoArgument);
    }
    for (i, &b) in words.iter().enumerate() {
        let column = STANZA_PREFIX.len() + i + 1;
        if b == b' ' {
            // An empty argument before this space, or after it at the end of the line.
            if i == 0 || words[i - 1] == b' ' {
                return Err(Rule::EmptyArgument { column });
            }
            if i + 1 == words.len() {
                return Err(Rule::EmptyArgument { column: column + 1 });
            }
        } else if !(33..=126).contains(&b) {
            return Err(Rule::ArgumentNotPrintable { byte: b, column });
        }
    }
    // Printable ASCII only, so each byte is its char.
    let mut all = words.split(|&b| b == b' ').map(|w| w.iter().map(|&b| char::from(b)).collect::<String>());
    let tag = all.next().unwrap_or_default();
    Ok((tag, all.collect()))
}

/// Decodes one body line onto `body`: at most 64 base64 characters, canonical, no padding.
fn body_line(text: &[u8], body: &mut Vec<u8>) -> Result<(), Rule> {
    if text.len() > BODY_COLUMNS {
        return Err(Rule::BodyLineTooLong { columns: text.len() });
    }
    if let Some(i) = text.iter().position(|&b| !is_base64(b)) {
        return Err(if text[i] == b'=' {
            Rule::BodyPadded { column: i + 1 }
        } else {
            Rule::BodyNotBase64 { byte: text[i], column: i + 1 }
        });
    }
    // A full line is 48 bytes exactly; only a final line can have a length no
    // encoding has, or unused bits, and the decoder refuses both.
    BASE64_STANDARD_NO_PAD.decode_vec(text, body).map_err(|_| Rule::BodyNotCanonical)
}

/// The MAC of the MAC line `"--- " 43base64char`, canonical.
fn mac_of(text: &[u8]) -> Result<[u8; 32], Rule> {
    let encoded = text.strip_prefix(MAC_LINE_PREFIX).ok_or(Rule::MacLinePrefix)?;
    if let Some(i) = encoded.iter().position(|&b| !is_base64(b)) {
        return Err(Rule::MacNotBase64 { byte: encoded[i], column: MAC_LINE_PREFIX.len() + i + 1 });
    }
    if encoded.len() != ENCODED_MAC_LEN {
        return Err(Rule::MacLength { characters: encoded.len() });
    }
    // The decoder wants room for its 33-byte estimate of 43 characters, and refuses
    // unused bits that are not zero.
    let mut decoded = [0u8; 33];
    let mut mac = [0u8; 32];
    match BASE64_STANDARD_NO_PAD.decode_slice(encoded, &mut decoded) {
        Ok(32) => mac.copy_from_slice(&decoded[..32]),
        _ => return Err(Rule::MacNotCanonical),
    }
    Ok(mac)
}

#[cfg(test)]
mod grammar_tests;

#[cfg(test)]
mod replace_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stanza(tag: &str, body: &[u8]) -> Stanza {
        Stanza { tag: tag.into(), args: vec!["a1".into()], body: body.to_vec() }
    }

    #[test]
    fn replacing_a_stanza_gives_what_write_would_have_written() {
        let fk = FileKey::new(Box::new([7u8; 16]));
        let (a, b, c) = (stanza("one", &[1; 40]), stanza("two", &[2; 80]), stanza("three", &[3; 100]));
        let old = write(&fk, &[stanza("one", &[1; 40]), b]).unwrap();
        let dashes_end = old.windows(4).position(|w| w == b"\n---").unwrap() + 4;
        let mut first = Vec::new();
        encode_stanza(&a, &mut first).unwrap();
        let span = V1_LINE.len() + first.len()..dashes_end - 3;
        let new = replace_stanza(&old, span, dashes_end, &c, &fk).unwrap();
        assert_eq!(new, write(&fk, &[a, stanza("three", &[3; 100])]).unwrap());
        parse(&new).unwrap().verify_mac(&fk).unwrap();
        // A span outside the stanzas, or a wrong end of the MAC input, is refused.
        assert!(replace_stanza(&old, 0..5, dashes_end, &c, &fk).is_err());
        assert!(replace_stanza(&old, V1_LINE.len()..V1_LINE.len(), dashes_end - 1, &c, &fk).is_err());
    }
}
