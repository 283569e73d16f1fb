//! Text from the server or from files, made safe for a terminal or a log: the one
//! escaping function that every human-readable output of `kmsctl` and `backup-hook`
//! uses for text it did not write itself (audit records, report fields, server error
//! messages, file names, values read from sealed files and share files).
//!
//! A value shown on an auditor's screen must not be able to drive the terminal (ANSI
//! escape sequences that clear the screen, move the cursor, set the window title), fake
//! the layout (a newline followed by a forged audit line, a carriage return that
//! overwrites the start of the line) or reorder what is shown (bidirectional
//! overrides). So these characters are shown as visible escapes, and every other
//! character as it is:
//!
//! - C0 controls U+0000..U+001F (ESC is U+001B, and `\n`, `\r`, `\t` too) and DEL U+007F;
//! - C1 controls U+0080..U+009F (U+009B is a one-byte CSI);
//! - the line and paragraph separators U+2028, U+2029;
//! - the bidirectional marks, embeddings, overrides and isolates U+061C, U+200E, U+200F,
//!   U+202A..U+202E, U+2066..U+2069.
//!
//! Each is shown as its Rust escape `\u{HEX}` (ESC as `\u{1b}`, a newline as `\u{a}`):
//! one form for all, the form the compliance report has always used.
//!
//! A backslash is kept as it is: the escapes make a value readable and harmless, and a
//! value that contains the text `\x1b` cannot do what the character does. Machine
//! outputs (JSON, the audit export's JSON lines) are not escaped here: `serde_json`
//! writes every control character as a `\u00XX` escape, so they stay valid JSON.

use std::borrow::Cow;
use std::fmt;

/// True for a character that [`escape`] shows as an escape (see the module docs).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with every [`is_unsafe`] character shown as a visible escape; borrowed when there
/// is none (the common case costs no copy).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

fn push_escaped(out: &mut String, c: char) {
    if is_unsafe(c) {
        out.extend(c.escape_unicode());
    } else {
        out.push(c);
    }
}

/// [`escape`] as a `Display` value, for `format!("{}", Esc(&value))`.
#[derive(Clone, Copy, Debug)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&escape(self.0))
    }
}

/// A path as [`Esc`] shows text: file names can hold any byte but `/` and NUL, so a name
/// chosen by whoever could write to a backup directory is shown escaped too.
pub fn path(p: &std::path::Path) -> String {
    escape(&p.to_string_lossy()).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in ["", "ehr-db", "backup 2026-01-01 ok: 3 keys", "Zoë’s café — ünïcode", r"C:\path\x1b"] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s}");
        }
    }

    #[test]
    fn escape_sequences_and_forged_lines_are_shown_not_obeyed() {
        let hostile = "x\u{1b}[2J\u{1b}]0;owned\u{7}\n     9 2026-01-01T00:00:00Z officer unwrap ok\r";
        let e = escape(hostile);
        assert_eq!(
            e,
            "x\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\u{a}     9 2026-01-01T00:00:00Z officer unwrap ok\\u{d}"
        );
        assert!(!e.chars().any(|c| c.is_control()));
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn every_c0_del_and_c1_control_is_escaped() {
        for b in (0u32..0x20).chain([0x7f]).chain(0x80..0xa0) {
            let c = char::from_u32(b).unwrap();
            let e = escape(&c.to_string()).into_owned();
            assert!(e.starts_with('\\') && e.len() > 1, "{b:#x} -> {e:?}");
            assert!(!e.chars().any(|c| c.is_control()), "{b:#x} -> {e:?}");
        }
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("\0"), "\\u{0}");
        assert_eq!(escape("\t"), "\\u{9}");
    }

    #[test]
    fn bidi_controls_and_line_separators_are_escaped() {
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
        for c in ['\u{061c}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202d}', '\u{2066}', '\u{2069}', '\u{2028}', '\u{2029}'] {
            let e = escape(&c.to_string()).into_owned();
            assert_eq!(e, format!("\\u{{{:x}}}", u32::from(c)));
        }
    }

    #[test]
    fn esc_pads_like_a_str() {
        assert_eq!(format!("[{:<8}]", Esc("a\u{1b}")), "[a\\u{1b} ]");
        assert_eq!(format!("[{:<4}]", Esc("ab")), "[ab  ]");
    }

    #[test]
    fn paths_are_escaped() {
        let p = std::path::Path::new("/backups/a\nforged\u{1b}[2J.age");
        assert_eq!(path(p), "/backups/a\\u{a}forged\\u{1b}[2J.age");
    }
}
