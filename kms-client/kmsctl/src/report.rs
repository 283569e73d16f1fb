//! The compliance report renderer (`kmsctl report`): text for a terminal, JSON
//! (exactly [`Report`]) and a single self-contained HTML page for the auditor.
//!
//! Every string in a [`Report`] may come from a client (backup ids, principals,
//! failure details), so the HTML form escapes all of them, and the text form
//! shows control characters as escapes so they cannot drive the terminal.
//! The HTML page loads nothing (no scripts, external CSS, fonts or images; its
//! Content-Security-Policy forbids them), so it works offline and prints as is.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::str::FromStr;

use kluis_proto::report::{
    ApprovalEntry, BackupEntry, DestructionEntry, DeviationEntry, EscrowEntry, KeyringReport, KmipEntry, Report, RestoreTestEntry,
    RotationEntry, VersionEntry,
};

/// The sentence the design asks the report to state plainly next to the escrow manifest.
pub const ESCROW_COPY_NOTICE: &str = "An escrow copy of each file key exists until that recovery key is retired.";

/// How `kmsctl report` prints the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportFormat {
    /// Plain text for a terminal, one section per keyring.
    Text,
    /// The [`Report`] as pretty-printed JSON.
    Json,
    /// A single self-contained HTML page.
    Html,
}

impl ReportFormat {
    /// The names [`FromStr`] accepts, in the order they are listed in errors.
    pub const ALLOWED: &'static [&'static str] = &["text", "json", "html"];

    /// The name of the format (`text`, `json`, `html`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReportFormat::Text => "text",
            ReportFormat::Json => "json",
            ReportFormat::Html => "html",
        }
    }
}

impl fmt::Display for ReportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--format` value that is not a report format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportFormatError {
    #[error("unknown report format {value:?}; allowed: {}", allowed.join(", "))]
    Unknown { value: String, allowed: &'static [&'static str] },
}

impl FromStr for ReportFormat {
    type Err = ReportFormatError;

    /// `text`, `json` or `html`, in any letter case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(ReportFormat::Text),
            "json" => Ok(ReportFormat::Json),
            "html" => Ok(ReportFormat::Html),
            _ => Err(ReportFormatError::Unknown { value: s.to_owned(), allowed: Self::ALLOWED }),
        }
    }
}

/// Renders the report. Every form ends with a newline.
///
/// - [`ReportFormat::Json`]: `serde_json` pretty print of `report`, nothing added or left out
///   (parses back to an equal [`Report`]).
/// - [`ReportFormat::Text`]: readable plain text, one section per keyring.
/// - [`ReportFormat::Html`]: one self-contained page (see [`render_html`]).
pub fn render(report: &Report, format: ReportFormat) -> String {
    match format {
        ReportFormat::Json => render_json(report),
        ReportFormat::Text => render_text(report),
        ReportFormat::Html => render_html(report),
    }
}

/// The report as pretty-printed JSON (plus a final newline).
pub fn render_json(report: &Report) -> String {
    match serde_json::to_string_pretty(report) {
        Ok(mut s) => {
            s.push('\n');
            s
        }
        // Unreachable for these plain structs (string keys, no maps, no floats); say so
        // as JSON rather than panicking in an audit tool.
        Err(e) => format!("{}\n", serde_json::json!({ "error": format!("cannot serialize the report: {e}") })),
    }
}

// ---------------------------------------------------------------------------
// Shared wording
// ---------------------------------------------------------------------------

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 { format!("{n} {one}") } else { format!("{n} {many}") }
}

fn bytes_human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn duration_human(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        let s = ms / 1000;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn retention_text(days: u32) -> String {
    if days == 0 { "keys do not expire".to_owned() } else { format!("{days} days") }
}

fn rotation_period_text(days: u32) -> String {
    if days == 0 { "no automatic rotation".to_owned() } else { format!("every {days} days") }
}

fn period_text(since: Option<&str>) -> String {
    match since {
        Some(s) => format!("since {s}"),
        None => "all time".to_owned(),
    }
}

fn untested_shown_note(k: &KeyringReport) -> Option<String> {
    let shown = k.untested_backups.len() as u64;
    (shown < k.untested_backups_total)
        .then(|| format!("showing the oldest {shown} of {}", k.untested_backups_total))
}

fn pending_destructions_held(k: &KeyringReport) -> usize {
    k.pending_destructions.iter().filter(|d| d.state == "held").count()
}

// ---------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------

/// Client-supplied text for a terminal: control characters (ANSI escapes, CR, newlines
/// that would fake extra lines), line separators and bidirectional overrides are shown
/// as `\u{..}` escapes, by the one function every CLI output uses
/// ([`kms_client::escape::escape`]).
fn t(s: &str) -> Cow<'_, str> {
    kms_client::escape::escape(s)
}

fn t_opt(s: Option<&str>) -> Cow<'_, str> {
    match s {
        Some(s) => t(s),
        None => Cow::Borrowed("-"),
    }
}

/// The text form: a header, escrow, pending approvals, then one section per keyring.
pub fn render_text(r: &Report) -> String {
    let mut o = String::new();
    // Writing into a String cannot fail; the results are ignored with `let _`.
    let _ = writeln!(o, "KLUIS COMPLIANCE REPORT ({})", t(&r.format));
    let _ = writeln!(o, "Generated:   {}", t(&r.generated));
    let _ = writeln!(o, "Period:      {}", t(&period_text(r.since.as_deref())));
    let _ = writeln!(o, "Master key:  generation {}, {}", r.master.generation, t(&r.master.description));
    let _ = writeln!(o, "Keyrings:    {}", r.keyrings.len());

    o.push('\n');
    text_escrow(&mut o, &r.escrow, &r.keyrings);
    o.push('\n');
    text_approvals(&mut o, &r.pending_approvals);

    if r.keyrings.is_empty() {
        o.push('\n');
        let _ = writeln!(o, "== Keyrings ==");
        let _ = writeln!(o, "  none");
    }
    for k in &r.keyrings {
        o.push('\n');
        text_keyring(&mut o, k);
    }
    o
}

fn text_escrow(o: &mut String, e: &EscrowEntry, keyrings: &[KeyringReport]) {
    let _ = writeln!(o, "== Escrow ==");
    if e.installed {
        let _ = writeln!(o, "  Manifest in force:   ceremony {}", t_opt(e.ceremony_id.as_deref()));
        let _ = writeln!(o, "  Installed at:        {}", t_opt(e.installed_at.as_deref()));
        let _ = writeln!(o, "  Recovery recipient:  {}", t_opt(e.recovery_recipient.as_deref()));
        let _ = writeln!(o, "  Threshold:           {} of {} shares", e.threshold, e.shares);
    } else {
        let _ = writeln!(o, "  NO ESCROW MANIFEST INSTALLED: sealed files carry no recovery stanza.");
    }
    if e.custodians.is_empty() {
        let _ = writeln!(o, "  Custodians:          none");
    } else {
        let list: Vec<_> = e.custodians.iter().map(|c| t(c)).collect();
        let _ = writeln!(o, "  Custodians:          {}", list.join(", "));
    }
    if e.previous_recipients.is_empty() {
        let _ = writeln!(o, "  Previous recipients: none");
    } else {
        let _ = writeln!(o, "  Previous recipients (their recovery keys still open older backups):");
        for p in &e.previous_recipients {
            let _ = writeln!(o, "    {}", t(p));
        }
    }
    let without: Vec<_> = keyrings.iter().filter(|k| k.keys_without_escrow > 0).collect();
    if without.is_empty() {
        let _ = writeln!(o, "  Keys without escrow: none");
    } else {
        let _ = writeln!(o, "  Keys without escrow:");
        for k in without {
            let _ = writeln!(o, "    {}: {}", t(&k.name), plural(k.keys_without_escrow, "key", "keys"));
        }
    }
    let _ = writeln!(o, "  {ESCROW_COPY_NOTICE}");
}

fn text_approvals(o: &mut String, approvals: &[ApprovalEntry]) {
    let _ = writeln!(o, "== Pending approvals (dual control) ==");
    if approvals.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for a in approvals {
        let _ = writeln!(
            o,
            "  #{} {}: requested by {} at {}, expires {}",
            a.id,
            t(&a.action),
            t(&a.requested_by),
            t(&a.requested),
            t(&a.expires)
        );
    }
}

fn text_keyring(o: &mut String, k: &KeyringReport) {
    let mut flags = Vec::new();
    if let Some(d) = &k.destroyed {
        flags.push(format!("DESTROYED {}", t(d)));
    }
    if k.legal_hold.is_some() {
        flags.push("LEGAL HOLD".to_owned());
    }
    if k.rotation_overdue {
        flags.push("ROTATION OVERDUE".to_owned());
    }
    if !k.deviations.is_empty() {
        flags.push(format!("{} IN DEVIATION REGISTER", plural(k.deviations.len() as u64, "ENTRY", "ENTRIES")));
    }
    let flags = if flags.is_empty() { String::new() } else { format!("  [{}]", flags.join("; ")) };
    let _ = writeln!(o, "== Keyring {}{flags} ==", t(&k.name));
    let _ = writeln!(o, "  Created:          {}", t(&k.created));
    let _ = writeln!(o, "  Retention:        {}", retention_text(k.retention_days));
    let _ = writeln!(o, "  Rotation period:  {}", rotation_period_text(k.rotation_period_days));
    let _ = writeln!(
        o,
        "  Keys:             {} issued in the period, {} in total; {} active, {} destroyed",
        k.keys_issued, k.keys_issued_total, k.keys_active, k.keys_destroyed
    );
    let _ = writeln!(o, "  Without escrow:   {}", plural(k.keys_without_escrow, "active key", "active keys"));

    let _ = writeln!(o, "  -- Versions --");
    if k.versions.is_empty() {
        let _ = writeln!(o, "    none");
    }
    for v in &k.versions {
        let _ = writeln!(
            o,
            "    v{:<4} {:<8} created {}  age {}  {} still wrapped",
            v.version,
            t(&v.state),
            t(&v.created),
            plural(v.age_days, "day", "days"),
            plural(v.keys, "key", "keys")
        );
    }

    let _ = writeln!(o, "  -- Rotations --");
    if k.rotations.is_empty() {
        let _ = writeln!(o, "    none in the period");
    }
    for r in &k.rotations {
        let _ = writeln!(o, "    v{} at {}", r.version, t(&r.time));
    }
    match (&k.next_rotation, k.rotation_overdue) {
        (Some(n), true) => {
            let _ = writeln!(o, "    Next rotation due: {} (OVERDUE)", t(n));
        }
        (Some(n), false) => {
            let _ = writeln!(o, "    Next rotation due: {}", t(n));
        }
        (None, true) => {
            let _ = writeln!(o, "    Next rotation due: OVERDUE");
        }
        (None, false) => {
            let _ = writeln!(o, "    Next rotation due: none (no rotation period)");
        }
    }

    let _ = writeln!(o, "  -- Restore tests (last test per backup) --");
    if k.last_tests.is_empty() {
        let _ = writeln!(o, "    none");
    }
    for x in &k.last_tests {
        let outcome = if x.ok { "OK".to_owned() } else { format!("FAILED: {}", t(&x.detail)) };
        let _ = writeln!(
            o,
            "    {}  backup {}  key {}  {}  ({}, {}, host {}, by {})",
            t(&x.time),
            t(&x.backup_id),
            t(&x.key_id),
            outcome,
            bytes_human(x.bytes),
            duration_human(x.duration_ms),
            t(&x.host),
            t(&x.principal)
        );
    }

    let _ = writeln!(o, "  -- Never restore-tested ({}) --", k.untested_backups_total);
    if k.untested_backups.is_empty() {
        let _ = writeln!(o, "    none");
    } else if let Some(note) = untested_shown_note(k) {
        let _ = writeln!(o, "    ({note})");
    }
    for b in &k.untested_backups {
        let _ = writeln!(o, "    backup {}  key {}  created {}", t(&b.backup_id), t(&b.key_id), t(&b.created));
    }

    let _ = writeln!(o, "  -- Deviation register ({}) --", k.deviations.len());
    if k.deviations.is_empty() {
        let _ = writeln!(o, "    none in the period");
    }
    for d in &k.deviations {
        let mut line = format!("    {}  {}  by {}", t(&d.time), t(&d.kind), t(&d.principal));
        if let Some(b) = &d.backup_id {
            let _ = write!(line, "  backup {}", t(b));
        }
        if let Some(key) = &d.key_id {
            let _ = write!(line, "  key {}", t(key));
        }
        if let Some(seq) = d.audit_seq {
            let _ = write!(line, "  audit #{seq}");
        }
        if !d.detail.is_empty() {
            let _ = write!(line, ": {}", t(&d.detail));
        }
        let _ = writeln!(o, "{line}");
    }

    if let Some(x) = &k.kmip {
        text_kmip(o, x);
    }

    let _ = writeln!(o, "  -- Destructions and legal hold --");
    match &k.legal_hold {
        Some(h) => {
            let _ = writeln!(o, "    Legal hold: IN FORCE since {}, by {}: {}", t(&h.since), t(&h.by), t(&h.reason));
        }
        None => {
            let _ = writeln!(o, "    Legal hold: none");
        }
    }
    if k.pending_destructions.is_empty() {
        let _ = writeln!(o, "    Pending destructions: none");
    } else {
        let _ = writeln!(o, "    Pending destructions:");
    }
    for d in &k.pending_destructions {
        let _ = writeln!(o, "      {}", text_destruction(d));
    }
    if k.destructions_done.is_empty() {
        let _ = writeln!(o, "    Destructions done in the period: none");
    } else {
        let _ = writeln!(o, "    Destructions done in the period:");
    }
    for d in &k.destructions_done {
        let _ = writeln!(o, "      {}", text_destruction(d));
    }
}

/// A keyring's KMIP objects: how many in which state, who made them, their Gets.
fn text_kmip(o: &mut String, x: &KmipEntry) {
    let _ = writeln!(o, "  -- KMIP objects ({}) --", x.objects);
    let states: Vec<String> = x.by_state.iter().map(|(s, n)| format!("{n} {}", t(s))).collect();
    let _ = writeln!(o, "    States:    {}", states.join(", "));
    for c in &x.creators {
        let _ = writeln!(o, "    Made by:   {} ({})", t(&c.principal), plural(c.objects, "object", "objects"));
    }
    match &x.last_get {
        Some(g) => {
            let _ = writeln!(
                o,
                "    Gets:      {} in the period; last {} by {} (object {})",
                x.gets,
                t(&g.time),
                t(&g.principal),
                t(&g.uid)
            );
        }
        None => {
            let _ = writeln!(o, "    Gets:      none");
        }
    }
}

fn text_destruction(d: &DestructionEntry) -> String {
    let mut s = format!(
        "#{} {} {}: {} ({}), due {}, requested by {} at {}",
        d.id,
        t(&d.target_kind),
        t(&d.target),
        t(&d.state),
        t(&d.reason),
        t(&d.due),
        t(&d.requested_by),
        t(&d.requested)
    );
    if let Some(done) = &d.done {
        let _ = write!(s, ", done {}", t(done));
    }
    s
}

// ---------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------

/// Escapes text for HTML element content and quoted attribute values. Control
/// characters and bidirectional overrides are shown as `\u{..}` escapes first, as in the
/// text form ([`kms_client::escape::escape`]): they have no place in a page, and the
/// page may be read in a terminal too.
pub fn html_escape(s: &str) -> Cow<'_, str> {
    match kms_client::escape::escape(s) {
        Cow::Borrowed(s) => html_special(s),
        Cow::Owned(s) => Cow::Owned(html_special(&s).into_owned()),
    }
}

/// `&`, `<`, `>`, `"` and `'` as character references.
fn html_special(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

use html_escape as h;

fn h_opt(s: Option<&str>) -> Cow<'_, str> {
    match s {
        Some(s) => h(s),
        None => Cow::Borrowed("&#8212;"),
    }
}

/// The id fragment for a keyring: its name if it is `[A-Za-z0-9._-]` (what the server
/// allows), otherwise every other character as `_XX` hex, so ids stay unique and valid.
pub fn keyring_slug(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "_{b:02X}");
        }
    }
    s
}

const CSS: &str = r#"
:root { --ink:#1b1f24; --muted:#5b6470; --line:#d0d5dc; --head:#eef1f5; --bad:#b3261e; --badbg:#fde7e5; --warn:#7a5200; --warnbg:#fff3cd; --ok:#1e6b34; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0 auto; max-width: 1200px; padding: 24px 32px 48px; color: var(--ink); background: #fff;
  font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
header { border-bottom: 3px solid var(--ink); padding-bottom: 12px; margin-bottom: 20px; }
h1 { font-size: 24px; margin: 0 0 8px; }
h2 { font-size: 19px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
h4 { font-size: 13.5px; margin: 12px 0 4px; }
h2 code { font-size: inherit; }
code, .mono { font-family: "DejaVu Sans Mono", "Liberation Mono", Consolas, monospace; font-size: 12.5px; overflow-wrap: break-word; }
td.t, td code { white-space: nowrap; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
section.part { margin: 28px 0; page-break-inside: auto; }
section.keyring { margin: 36px 0; padding-top: 8px; border-top: 2px solid var(--ink); }
table { border-collapse: collapse; width: auto; min-width: 40%; margin: 4px 0 8px; }
table.wide { width: 100%; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr { page-break-inside: avoid; }
.flag { background: var(--badbg); color: var(--bad); font-weight: 700; }
.warn { background: var(--warnbg); color: var(--warn); font-weight: 600; }
.ok { color: var(--ok); font-weight: 600; }
.badge { display: inline-block; font-size: 12px; font-weight: 700; padding: 1px 8px; margin-left: 6px;
  border: 1px solid currentColor; border-radius: 3px; vertical-align: middle; }
.badge.flag { background: var(--badbg); }
p.none { color: var(--muted); font-style: italic; margin: 4px 0 8px; }
p.notice { border-left: 4px solid var(--warn); background: var(--warnbg); padding: 6px 10px; margin: 10px 0; }
p.notice.flag { border-left-color: var(--bad); background: var(--badbg); }
p.note { color: var(--muted); margin: 2px 0 6px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 8px; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  section.keyring { page-break-before: always; border-top: none; }
  .flag, .warn, .badge.flag, p.notice, th { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  thead { display: table-header-group; }
  h2, h3 { page-break-after: avoid; }
}
@page { margin: 15mm; }
"#;

/// The HTML form: one page, no external resources, no scripts; all report strings escaped.
///
/// Element ids tests and readers can rely on (`K` is [`keyring_slug`] of the keyring name):
/// `report-header`, `summary`, `escrow`, `pending-approvals`, `keyrings`, and per keyring
/// `keyring-K`, `versions-K`, `rotations-K`, `restore-tests-K`, `untested-K`,
/// `deviations-K`, `destructions-K`. Sections with lists carry `data-count`; the keyring
/// sections carry `data-keyring` (the escaped name); summary rows `data-keyring` too,
/// and flagged summary cells `data-flag` (`rotation-overdue`, `deviations`, `held`,
/// `without-escrow`, `untested`, `destroyed`).
pub fn render_html(r: &Report) -> String {
    let mut o = String::with_capacity(16 * 1024);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"kmsctl report\">\n\
         <title>Kluis compliance report {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
        h(&r.generated)
    );

    html_header(&mut o, r);
    html_summary(&mut o, r);
    html_escrow(&mut o, &r.escrow, &r.keyrings);
    html_approvals(&mut o, &r.pending_approvals);

    let _ = writeln!(o, "<div id=\"keyrings\" data-count=\"{}\">", r.keyrings.len());
    if r.keyrings.is_empty() {
        o.push_str("<section class=\"part\"><h2>Keyrings</h2><p class=\"none\">none</p></section>\n");
    }
    for k in &r.keyrings {
        html_keyring(&mut o, k);
    }
    o.push_str("</div>\n");

    let _ = writeln!(
        o,
        "<footer>Report format <code>{}</code>, generated {} by <code>kmsctl report</code>. \
         All times are UTC (RFC 3339).</footer>\n</body>\n</html>",
        h(&r.format),
        h(&r.generated)
    );
    o
}

fn html_header(o: &mut String, r: &Report) {
    let _ = writeln!(o, "<header id=\"report-header\">\n<h1>Kluis compliance report</h1>\n<dl class=\"facts\">");
    let _ = writeln!(o, "<dt>Generated</dt><dd id=\"generated\">{}</dd>", h(&r.generated));
    let _ = writeln!(
        o,
        "<dt>Period</dt><dd id=\"since\">{}</dd>",
        match &r.since {
            Some(s) => format!("events since {}", h(s)),
            None => "all time (no <code>--since</code>)".to_owned(),
        }
    );
    let _ = writeln!(
        o,
        "<dt>Master key</dt><dd id=\"master\">generation {}: <code>{}</code></dd>",
        r.master.generation,
        h(&r.master.description)
    );
    let _ = writeln!(o, "<dt>Keyrings</dt><dd>{}</dd>", r.keyrings.len());
    let _ = writeln!(o, "<dt>Format</dt><dd><code>{}</code></dd>\n</dl>\n</header>", h(&r.format));
}

/// A summary cell: plain, or flagged with a class and a `data-flag` name.
fn cell(o: &mut String, text: &str, flag: Option<(&str, &str)>) {
    match flag {
        Some((class, name)) => {
            let _ = write!(o, "<td class=\"num {class}\" data-flag=\"{name}\">{text}</td>");
        }
        None => {
            let _ = write!(o, "<td class=\"num\">{text}</td>");
        }
    }
}

fn html_summary(o: &mut String, r: &Report) {
    o.push_str("<section class=\"part\" id=\"summary\">\n<h2>Summary</h2>\n");
    if r.keyrings.is_empty() {
        o.push_str("<p class=\"none\">none: no keyrings</p>\n</section>\n");
        return;
    }
    o.push_str(
        "<table class=\"wide\">\n<thead><tr><th>Keyring</th><th class=\"num\">Issued (period)</th><th class=\"num\">Issued (total)</th>\
         <th class=\"num\">Active</th><th class=\"num\">Destroyed</th><th class=\"num\">Without escrow</th>\
         <th class=\"num\">Never restore-tested</th><th class=\"num\">Deviations</th><th>Rotation</th>\
         <th>Legal hold</th><th class=\"num\">Pending destructions</th></tr></thead>\n<tbody>\n",
    );
    for k in &r.keyrings {
        let slug = keyring_slug(&k.name);
        let _ = write!(
            o,
            "<tr data-keyring=\"{}\"><td><a href=\"#keyring-{}\"><code>{}</code></a>",
            h(&k.name),
            h(&slug),
            h(&k.name)
        );
        if k.destroyed.is_some() {
            o.push_str("<span class=\"badge flag\" data-flag=\"destroyed\">destroyed</span>");
        }
        o.push_str("</td>");
        cell(o, &k.keys_issued.to_string(), None);
        cell(o, &k.keys_issued_total.to_string(), None);
        cell(o, &k.keys_active.to_string(), None);
        cell(o, &k.keys_destroyed.to_string(), None);
        cell(
            o,
            &k.keys_without_escrow.to_string(),
            (k.keys_without_escrow > 0).then_some(("warn", "without-escrow")),
        );
        cell(
            o,
            &k.untested_backups_total.to_string(),
            (k.untested_backups_total > 0).then_some(("warn", "untested")),
        );
        cell(o, &k.deviations.len().to_string(), (!k.deviations.is_empty()).then_some(("flag", "deviations")));
        if k.rotation_overdue {
            o.push_str("<td class=\"flag\" data-flag=\"rotation-overdue\">OVERDUE</td>");
        } else if k.rotation_period_days == 0 {
            o.push_str("<td>no period</td>");
        } else {
            o.push_str("<td class=\"ok\">on schedule</td>");
        }
        match &k.legal_hold {
            Some(hold) => {
                let _ = write!(o, "<td class=\"flag\" data-flag=\"held\">HELD since {}</td>", h(&hold.since));
            }
            None => o.push_str("<td>none</td>"),
        }
        cell(o, &k.pending_destructions.len().to_string(), None);
        o.push_str("</tr>\n");
    }
    o.push_str("</tbody>\n</table>\n</section>\n");
}

fn html_escrow(o: &mut String, e: &EscrowEntry, keyrings: &[KeyringReport]) {
    let _ = writeln!(
        o,
        "<section class=\"part\" id=\"escrow\" data-installed=\"{}\">\n<h2>Escrow</h2>",
        e.installed
    );
    if e.installed {
        o.push_str("<dl class=\"facts\">\n");
        let _ = writeln!(o, "<dt>Manifest in force</dt><dd>ceremony <code>{}</code></dd>", h_opt(e.ceremony_id.as_deref()));
        let _ = writeln!(o, "<dt>Installed at</dt><dd>{}</dd>", h_opt(e.installed_at.as_deref()));
        let _ = writeln!(
            o,
            "<dt>Recovery recipient</dt><dd><code>{}</code></dd>",
            h_opt(e.recovery_recipient.as_deref())
        );
        let _ = writeln!(o, "<dt>Threshold</dt><dd>{} of {} shares</dd>", e.threshold, e.shares);
        o.push_str("</dl>\n");
    } else {
        o.push_str(
            "<p class=\"notice flag\">No escrow manifest is installed: sealed files carry no recovery stanza \
             and cannot be recovered without this server.</p>\n",
        );
    }

    o.push_str("<h3>Custodians</h3>\n");
    if e.custodians.is_empty() {
        o.push_str("<p class=\"none\">none</p>\n");
    } else {
        o.push_str("<ul>\n");
        for c in &e.custodians {
            let _ = writeln!(o, "<li><code>{}</code></li>", h(c));
        }
        o.push_str("</ul>\n");
    }

    o.push_str("<h3>Previous recovery recipients</h3>\n");
    if e.previous_recipients.is_empty() {
        o.push_str("<p class=\"none\">none</p>\n");
    } else {
        o.push_str("<p class=\"note\">Their recovery keys still open older backups.</p>\n<ul>\n");
        for p in &e.previous_recipients {
            let _ = writeln!(o, "<li><code>{}</code></li>", h(p));
        }
        o.push_str("</ul>\n");
    }

    let without: Vec<_> = keyrings.iter().filter(|k| k.keys_without_escrow > 0).collect();
    let _ = writeln!(o, "<h3 id=\"without-escrow\" data-count=\"{}\">Keys without escrow</h3>", without.len());
    if without.is_empty() {
        o.push_str("<p class=\"none\">none</p>\n");
    } else {
        o.push_str("<table>\n<thead><tr><th>Keyring</th><th class=\"num\">Active keys without escrow</th></tr></thead>\n<tbody>\n");
        for k in without {
            let _ = writeln!(
                o,
                "<tr><td><code>{}</code></td><td class=\"num warn\">{}</td></tr>",
                h(&k.name),
                k.keys_without_escrow
            );
        }
        o.push_str("</tbody>\n</table>\n");
    }
    let _ = writeln!(o, "<p class=\"notice\" id=\"escrow-copy-notice\">{}</p>\n</section>", h(ESCROW_COPY_NOTICE));
}

fn html_approvals(o: &mut String, approvals: &[ApprovalEntry]) {
    let _ = writeln!(
        o,
        "<section class=\"part\" id=\"pending-approvals\" data-count=\"{}\">\n<h2>Pending approvals</h2>\n\
         <p class=\"note\">Dual-control requests waiting for a second officer.</p>",
        approvals.len()
    );
    if approvals.is_empty() {
        o.push_str("<p class=\"none\">none</p>\n</section>\n");
        return;
    }
    o.push_str(
        "<table class=\"wide\">\n<thead><tr><th class=\"num\">Id</th><th>Action</th><th>Requested by</th><th>Requested</th>\
         <th>Expires</th></tr></thead>\n<tbody>\n",
    );
    for a in approvals {
        let _ = writeln!(
            o,
            "<tr><td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td><td class=\"t\">{}</td><td class=\"t\">{}</td></tr>",
            a.id,
            h(&a.action),
            h(&a.requested_by),
            h(&a.requested),
            h(&a.expires)
        );
    }
    o.push_str("</tbody>\n</table>\n</section>\n");
}

/// Opens a sub-section of a keyring: `<section id="{part}-{slug}" data-count=..><h3>title</h3>`.
fn sub_open(o: &mut String, part: &str, slug: &str, count: usize, title: &str) {
    let _ = writeln!(
        o,
        "<section class=\"sub\" id=\"{part}-{}\" data-count=\"{count}\">\n<h3>{title}</h3>",
        h(slug)
    );
}

fn none_line(o: &mut String, text: &str) {
    let _ = writeln!(o, "<p class=\"none\">{text}</p>");
}

fn html_keyring(o: &mut String, k: &KeyringReport) {
    let slug = keyring_slug(&k.name);
    let _ = write!(
        o,
        "<section class=\"keyring\" id=\"keyring-{}\" data-keyring=\"{}\">\n<h2>Keyring <code>{}</code>",
        h(&slug),
        h(&k.name),
        h(&k.name)
    );
    if let Some(d) = &k.destroyed {
        let _ = write!(o, "<span class=\"badge flag\">destroyed {}</span>", h(d));
    }
    if k.legal_hold.is_some() {
        o.push_str("<span class=\"badge flag\">legal hold</span>");
    }
    if k.rotation_overdue {
        o.push_str("<span class=\"badge flag\">rotation overdue</span>");
    }
    if !k.deviations.is_empty() {
        let _ = write!(o, "<span class=\"badge flag\">{}</span>", plural(k.deviations.len() as u64, "deviation", "deviations"));
    }
    o.push_str("</h2>\n<dl class=\"facts\">\n");
    let _ = writeln!(o, "<dt>Created</dt><dd>{}</dd>", h(&k.created));
    let _ = writeln!(o, "<dt>Retention</dt><dd>{}</dd>", retention_text(k.retention_days));
    let _ = writeln!(o, "<dt>Rotation period</dt><dd>{}</dd>", rotation_period_text(k.rotation_period_days));
    let _ = writeln!(
        o,
        "<dt>Keys issued</dt><dd>{} in the period, {} in total</dd>",
        k.keys_issued, k.keys_issued_total
    );
    let _ = writeln!(o, "<dt>Keys now</dt><dd>{} active, {} destroyed</dd>", k.keys_active, k.keys_destroyed);
    let _ = writeln!(
        o,
        "<dt>Without escrow</dt><dd><span{}>{}</span></dd>",
        if k.keys_without_escrow > 0 { " class=\"warn\"" } else { "" },
        plural(k.keys_without_escrow, "active key", "active keys")
    );
    o.push_str("</dl>\n");

    html_versions(o, &slug, &k.versions);
    html_rotations(o, &slug, k);
    html_tests(o, &slug, &k.last_tests);
    html_untested(o, &slug, k);
    html_deviations(o, &slug, &k.deviations);
    if let Some(x) = &k.kmip {
        html_kmip(o, &slug, x);
    }
    html_destructions(o, &slug, k);
    o.push_str("</section>\n");
}

fn html_kmip(o: &mut String, slug: &str, x: &KmipEntry) {
    sub_open(o, "kmip", slug, usize::try_from(x.objects).unwrap_or(usize::MAX), "KMIP objects");
    o.push_str("<dl class=\"facts\">\n");
    let states: Vec<String> = x.by_state.iter().map(|(s, n)| format!("{n} {}", h(s))).collect();
    let _ = writeln!(o, "<dt>Objects</dt><dd>{}: {}</dd>", x.objects, states.join(", "));
    let makers: Vec<String> = x.creators.iter().map(|c| format!("<code>{}</code> ({})", h(&c.principal), c.objects)).collect();
    let _ = writeln!(o, "<dt>Made by</dt><dd>{}</dd>", makers.join(", "));
    match &x.last_get {
        Some(g) => {
            let _ = writeln!(
                o,
                "<dt>Gets</dt><dd>{} in the period; last {} by <code>{}</code> (object <code>{}</code>)</dd>",
                x.gets,
                h(&g.time),
                h(&g.principal),
                h(&g.uid)
            );
        }
        None => {
            let _ = writeln!(o, "<dt>Gets</dt><dd>none</dd>");
        }
    }
    o.push_str("</dl>\n</section>\n");
}

fn html_versions(o: &mut String, slug: &str, versions: &[VersionEntry]) {
    sub_open(o, "versions", slug, versions.len(), "Versions");
    if versions.is_empty() {
        none_line(o, "none");
    } else {
        o.push_str(
            "<table>\n<thead><tr><th class=\"num\">Version</th><th>State</th><th>Created</th>\
             <th class=\"num\">Age (days)</th><th class=\"num\">Keys still wrapped</th></tr></thead>\n<tbody>\n",
        );
        for v in versions {
            let _ = writeln!(
                o,
                "<tr><td class=\"num\">v{}</td><td>{}</td><td class=\"t\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                v.version,
                h(&v.state),
                h(&v.created),
                v.age_days,
                v.keys
            );
        }
        o.push_str("</tbody>\n</table>\n");
    }
    o.push_str("</section>\n");
}

fn html_rotations(o: &mut String, slug: &str, k: &KeyringReport) {
    let rotations: &[RotationEntry] = &k.rotations;
    sub_open(o, "rotations", slug, rotations.len(), "Rotations");
    if rotations.is_empty() {
        none_line(o, "none in the period");
    } else {
        o.push_str("<table>\n<thead><tr><th class=\"num\">New version</th><th>Time</th></tr></thead>\n<tbody>\n");
        for r in rotations {
            let _ = writeln!(o, "<tr><td class=\"num\">v{}</td><td class=\"t\">{}</td></tr>", r.version, h(&r.time));
        }
        o.push_str("</tbody>\n</table>\n");
    }
    match (&k.next_rotation, k.rotation_overdue) {
        (Some(n), true) => {
            let _ = writeln!(
                o,
                "<p id=\"next-rotation-{}\" class=\"notice flag\" data-flag=\"rotation-overdue\">Next rotation was due {}: OVERDUE</p>",
                h(slug),
                h(n)
            );
        }
        (None, true) => {
            let _ = writeln!(
                o,
                "<p id=\"next-rotation-{}\" class=\"notice flag\" data-flag=\"rotation-overdue\">Rotation OVERDUE</p>",
                h(slug)
            );
        }
        (Some(n), false) => {
            let _ = writeln!(o, "<p id=\"next-rotation-{}\">Next rotation due {}</p>", h(slug), h(n));
        }
        (None, false) => {
            let _ = writeln!(
                o,
                "<p id=\"next-rotation-{}\" class=\"note\">Next rotation: none due (no rotation period)</p>",
                h(slug)
            );
        }
    }
    o.push_str("</section>\n");
}

fn html_tests(o: &mut String, slug: &str, tests: &[RestoreTestEntry]) {
    sub_open(o, "restore-tests", slug, tests.len(), "Restore tests");
    o.push_str("<p class=\"note\">The last restore test of each tested backup.</p>\n");
    if tests.is_empty() {
        none_line(o, "none");
    } else {
        o.push_str(
            "<table class=\"wide\">\n<thead><tr><th>Time</th><th>Backup</th><th>Key</th><th>Outcome</th><th class=\"num\">Bytes</th>\
             <th class=\"num\">Duration</th><th>Host</th><th>By</th></tr></thead>\n<tbody>\n",
        );
        for x in tests {
            let outcome = if x.ok {
                "<td class=\"ok\">OK</td>".to_owned()
            } else {
                format!("<td class=\"flag\">FAILED: {}</td>", h(&x.detail))
            };
            let _ = writeln!(
                o,
                "<tr data-backup-id=\"{}\"><td class=\"t\">{}</td><td><code>{}</code></td><td><code>{}</code></td>{outcome}\
                 <td class=\"num\" title=\"{} bytes\">{}</td><td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td></tr>",
                h(&x.backup_id),
                h(&x.time),
                h(&x.backup_id),
                h(&x.key_id),
                x.bytes,
                bytes_human(x.bytes),
                duration_human(x.duration_ms),
                h(&x.host),
                h(&x.principal)
            );
        }
        o.push_str("</tbody>\n</table>\n");
    }
    o.push_str("</section>\n");
}

fn html_untested(o: &mut String, slug: &str, k: &KeyringReport) {
    let list: &[BackupEntry] = &k.untested_backups;
    let _ = writeln!(
        o,
        "<section class=\"sub\" id=\"untested-{}\" data-count=\"{}\" data-total=\"{}\">\n<h3>Never restore-tested ({})</h3>",
        h(slug),
        list.len(),
        k.untested_backups_total,
        k.untested_backups_total
    );
    if list.is_empty() {
        none_line(o, "none");
    } else {
        if let Some(note) = untested_shown_note(k) {
            let _ = writeln!(o, "<p class=\"note\">{note}</p>");
        }
        o.push_str("<table>\n<thead><tr><th>Backup</th><th>Key</th><th>Created</th></tr></thead>\n<tbody>\n");
        for b in list {
            let _ = writeln!(
                o,
                "<tr data-backup-id=\"{}\"><td><code>{}</code></td><td><code>{}</code></td><td class=\"t\">{}</td></tr>",
                h(&b.backup_id),
                h(&b.backup_id),
                h(&b.key_id),
                h(&b.created)
            );
        }
        o.push_str("</tbody>\n</table>\n");
    }
    o.push_str("</section>\n");
}

fn html_deviations(o: &mut String, slug: &str, devs: &[DeviationEntry]) {
    sub_open(o, "deviations", slug, devs.len(), "Deviation register");
    o.push_str("<p class=\"note\">Failed restore tests and failed or refused unwraps in the period.</p>\n");
    if devs.is_empty() {
        none_line(o, "none in the period");
    } else {
        o.push_str(
            "<table class=\"wide\">\n<thead><tr><th>Time</th><th>Kind</th><th>Principal</th><th>Backup</th><th>Key</th>\
             <th>Detail</th><th class=\"num\">Audit #</th></tr></thead>\n<tbody>\n",
        );
        for d in devs {
            let _ = writeln!(
                o,
                "<tr class=\"deviation\"><td class=\"t\">{}</td><td class=\"flag t\">{}</td><td><code>{}</code></td><td><code>{}</code></td>\
                 <td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td></tr>",
                h(&d.time),
                h(&d.kind),
                h(&d.principal),
                h_opt(d.backup_id.as_deref()),
                h_opt(d.key_id.as_deref()),
                h(&d.detail),
                d.audit_seq.map_or_else(|| "&#8212;".to_owned(), |s| s.to_string())
            );
        }
        o.push_str("</tbody>\n</table>\n");
    }
    o.push_str("</section>\n");
}

fn destruction_table(o: &mut String, list: &[DestructionEntry], with_done: bool) {
    let _ = write!(
        o,
        "<table class=\"wide\">\n<thead><tr><th class=\"num\">Id</th><th>Target</th><th>State</th><th>Reason</th><th>Requested by</th>\
         <th>Requested</th><th>Due</th>{}</tr></thead>\n<tbody>\n",
        if with_done { "<th>Done</th>" } else { "" }
    );
    for d in list {
        let state_class = if d.state == "held" { " class=\"flag\"" } else { "" };
        let _ = write!(
            o,
            "<tr><td class=\"num\">{}</td><td>{} <code>{}</code></td><td{state_class}>{}</td><td>{}</td><td><code>{}</code></td>\
             <td class=\"t\">{}</td><td class=\"t\">{}</td>",
            d.id,
            h(&d.target_kind),
            h(&d.target),
            h(&d.state),
            h(&d.reason),
            h(&d.requested_by),
            h(&d.requested),
            h(&d.due)
        );
        if with_done {
            let _ = write!(o, "<td class=\"t\">{}</td>", h_opt(d.done.as_deref()));
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</tbody>\n</table>\n");
}

fn html_destructions(o: &mut String, slug: &str, k: &KeyringReport) {
    let _ = writeln!(
        o,
        "<section class=\"sub\" id=\"destructions-{}\" data-count=\"{}\" data-held=\"{}\">\n<h3>Destructions and legal hold</h3>",
        h(slug),
        k.pending_destructions.len(),
        k.legal_hold.is_some()
    );
    match &k.legal_hold {
        Some(hold) => {
            let _ = writeln!(
                o,
                "<p class=\"notice flag\" id=\"hold-{}\">Legal hold in force since {}, placed by <code>{}</code>: {}. \
                 Scheduled destructions wait until it is lifted.</p>",
                h(slug),
                h(&hold.since),
                h(&hold.by),
                h(&hold.reason)
            );
        }
        None => {
            let _ = writeln!(o, "<p id=\"hold-{}\">Legal hold: none</p>", h(slug));
        }
    }
    let held = pending_destructions_held(k);
    let _ = writeln!(
        o,
        "<h4>Pending destructions{}</h4>",
        if held > 0 { format!(" ({held} held)") } else { String::new() }
    );
    if k.pending_destructions.is_empty() {
        none_line(o, "none");
    } else {
        destruction_table(o, &k.pending_destructions, false);
    }
    o.push_str("<h4>Destructions carried out in the period</h4>\n");
    if k.destructions_done.is_empty() {
        none_line(o, "none");
    } else {
        destruction_table(o, &k.destructions_done, true);
    }
    o.push_str("</section>\n");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use kluis_proto::report::{HoldEntry, MasterEntry, REPORT_FORMAT};

    const HOSTILE: &str = "<script>alert(1)</script>";

    fn sample() -> Report {
        let pacs = KeyringReport {
            name: "pacs".into(),
            created: "2023-01-10T08:00:00Z".into(),
            retention_days: 3650,
            rotation_period_days: 90,
            keys_issued: 12,
            keys_issued_total: 340,
            keys_active: 300,
            keys_destroyed: 40,
            keys_without_escrow: 2,
            versions: vec![
                VersionEntry { version: 1, created: "2023-01-10T08:00:00Z".into(), age_days: 800, state: "retired".into(), keys: 40 },
                VersionEntry { version: 2, created: "2024-06-01T08:00:00Z".into(), age_days: 180, state: "active".into(), keys: 260 },
            ],
            rotations: vec![RotationEntry { version: 2, time: "2024-06-01T08:00:00Z".into() }],
            next_rotation: Some("2024-08-30T08:00:00Z".into()),
            rotation_overdue: true,
            untested_backups: vec![
                BackupEntry { backup_id: HOSTILE.into(), key_id: "k-0001".into(), created: "2024-07-01T02:00:00Z".into() },
                BackupEntry { backup_id: "pacs-2024-07-02".into(), key_id: "k-0002".into(), created: "2024-07-02T02:00:00Z".into() },
            ],
            untested_backups_total: 57,
            last_tests: vec![
                RestoreTestEntry {
                    time: "2024-11-01T03:00:00Z".into(),
                    backup_id: "pacs-2024-10-31".into(),
                    key_id: "k-0100".into(),
                    ok: true,
                    detail: String::new(),
                    bytes: 209_715_200,
                    duration_ms: 4_200,
                    host: "backup01".into(),
                    principal: "restorer-backup01".into(),
                },
                RestoreTestEntry {
                    time: "2024-11-08T03:00:00Z".into(),
                    backup_id: "pacs-2024-11-07".into(),
                    key_id: "k-0107".into(),
                    ok: false,
                    detail: "chunk 17 failed authentication".into(),
                    bytes: 1_048_576,
                    duration_ms: 310,
                    host: "backup01".into(),
                    principal: "restorer-backup01".into(),
                },
            ],
            deviations: vec![
                DeviationEntry {
                    time: "2024-11-08T03:00:00Z".into(),
                    kind: "restore-test-failed".into(),
                    principal: "restorer-backup01".into(),
                    key_id: Some("k-0107".into()),
                    backup_id: Some("pacs-2024-11-07".into()),
                    detail: "chunk 17 failed authentication".into(),
                    audit_seq: Some(9001),
                },
                DeviationEntry {
                    time: "2024-11-09T10:00:00Z".into(),
                    kind: "unwrap-refused".into(),
                    principal: "sealer-ransom\u{1b}[2J".into(),
                    key_id: Some("k-0050".into()),
                    backup_id: None,
                    detail: "principal is not a restorer & <b>not</b> allowed".into(),
                    audit_seq: Some(9010),
                },
            ],
            pending_destructions: vec![DestructionEntry {
                id: 7,
                target_kind: "key".into(),
                target: "k-0003".into(),
                requested_by: "officer-anna".into(),
                requested: "2024-11-01T09:00:00Z".into(),
                due: "2024-11-15T09:00:00Z".into(),
                state: "held".into(),
                reason: "request".into(),
                done: None,
            }],
            destructions_done: vec![DestructionEntry {
                id: 5,
                target_kind: "key".into(),
                target: "k-0001-old".into(),
                requested_by: "retention".into(),
                requested: "2024-10-01T00:00:00Z".into(),
                due: "2024-10-15T00:00:00Z".into(),
                state: "destroyed".into(),
                reason: "expiry".into(),
                done: Some("2024-10-15T00:00:05Z".into()),
            }],
            legal_hold: Some(HoldEntry {
                by: "officer-bert".into(),
                since: "2024-11-02T12:00:00Z".into(),
                reason: "litigation 2024-117".into(),
            }),
            destroyed: None,
            kmip: None,
        };
        let lab = KeyringReport {
            name: "lab".into(),
            created: "2024-03-01T08:00:00Z".into(),
            retention_days: 0,
            rotation_period_days: 0,
            keys_issued: 3,
            keys_issued_total: 3,
            keys_active: 3,
            keys_destroyed: 0,
            keys_without_escrow: 0,
            versions: vec![VersionEntry { version: 1, created: "2024-03-01T08:00:00Z".into(), age_days: 260, state: "active".into(), keys: 3 }],
            rotations: vec![],
            next_rotation: None,
            rotation_overdue: false,
            untested_backups: vec![],
            untested_backups_total: 0,
            last_tests: vec![],
            deviations: vec![],
            pending_destructions: vec![],
            destructions_done: vec![],
            legal_hold: None,
            destroyed: None,
            kmip: None,
        };
        Report {
            format: REPORT_FORMAT.into(),
            generated: "2024-11-20T10:00:00Z".into(),
            since: Some("2024-06-01T00:00:00Z".into()),
            master: MasterEntry { description: "software key file master.key".into(), generation: 3 },
            escrow: EscrowEntry {
                installed: true,
                ceremony_id: Some("cer-2024-01".into()),
                recovery_recipient: Some("age1recoveryrecipientexample".into()),
                threshold: 3,
                shares: 5,
                custodians: vec!["alice".into(), "bob".into(), "carol".into(), "dave".into(), "erin".into()],
                installed_at: Some("2024-01-15T10:00:00Z".into()),
                previous_recipients: vec![],
            },
            keyrings: vec![pacs, lab],
            pending_approvals: vec![ApprovalEntry {
                id: 42,
                action: "destroy-keyring".into(),
                requested_by: "officer-anna".into(),
                requested: "2024-11-19T09:00:00Z".into(),
                expires: "2024-11-26T09:00:00Z".into(),
            }],
        }
    }

    #[test]
    fn format_parses_and_names_bad_values() {
        assert_eq!("text".parse::<ReportFormat>().unwrap(), ReportFormat::Text);
        assert_eq!("JSON".parse::<ReportFormat>().unwrap(), ReportFormat::Json);
        assert_eq!("html".parse::<ReportFormat>().unwrap(), ReportFormat::Html);
        for f in [ReportFormat::Text, ReportFormat::Json, ReportFormat::Html] {
            assert_eq!(f.to_string().parse::<ReportFormat>().unwrap(), f);
        }
        let err = "pdf".parse::<ReportFormat>().unwrap_err();
        assert_eq!(err, ReportFormatError::Unknown { value: "pdf".into(), allowed: &["text", "json", "html"] });
        let msg = err.to_string();
        assert!(msg.contains("\"pdf\"") && msg.contains("text, json, html"), "{msg}");
    }

    #[test]
    fn json_round_trips_exactly() {
        let r = sample();
        let json = render(&r, ReportFormat::Json);
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        // Pretty, and the same as serde_json's own pretty print.
        assert_eq!(json.trim_end(), serde_json::to_string_pretty(&r).unwrap());
        assert!(json.contains("\n  \"keyrings\": ["));
    }

    #[test]
    fn text_has_the_key_facts() {
        let text = render(&sample(), ReportFormat::Text);
        for needle in [
            "Generated:   2024-11-20T10:00:00Z",
            "since 2024-06-01T00:00:00Z",
            "generation 3, software key file master.key",
            "ceremony cer-2024-01",
            "3 of 5 shares",
            "alice, bob, carol, dave, erin",
            ESCROW_COPY_NOTICE,
            "#42 destroy-keyring: requested by officer-anna",
            "== Keyring pacs  [LEGAL HOLD; ROTATION OVERDUE; 2 ENTRIES IN DEVIATION REGISTER] ==",
            "12 issued in the period, 340 in total; 300 active, 40 destroyed",
            "Without escrow:   2 active keys",
            "v2    active   created 2024-06-01T08:00:00Z  age 180 days  260 keys still wrapped",
            "v2 at 2024-06-01T08:00:00Z",
            "Next rotation due: 2024-08-30T08:00:00Z (OVERDUE)",
            "backup pacs-2024-10-31  key k-0100  OK  (200.0 MiB, 4.2 s",
            "FAILED: chunk 17 failed authentication",
            "-- Never restore-tested (57) --",
            "(showing the oldest 2 of 57)",
            "backup <script>alert(1)</script>  key k-0001",
            "-- Deviation register (2) --",
            "restore-test-failed  by restorer-backup01  backup pacs-2024-11-07  key k-0107  audit #9001",
            "unwrap-refused",
            "Legal hold: IN FORCE since 2024-11-02T12:00:00Z, by officer-bert: litigation 2024-117",
            "#7 key k-0003: held (request), due 2024-11-15T09:00:00Z",
            "#5 key k-0001-old: destroyed (expiry)",
            "done 2024-10-15T00:00:05Z",
            "Keys without escrow:\n    pacs: 2 keys",
        ] {
            assert!(text.contains(needle), "text report lacks {needle:?}:\n{text}");
        }
        // The clean keyring: every empty list says so.
        let lab = &text[text.find("== Keyring lab ==").expect("lab section")..];
        assert!(lab.contains("Retention:        keys do not expire"));
        assert!(lab.contains("no automatic rotation"));
        assert!(lab.contains("-- Rotations --\n    none in the period"));
        assert!(lab.contains("-- Restore tests (last test per backup) --\n    none"));
        assert!(lab.contains("-- Never restore-tested (0) --\n    none"));
        assert!(lab.contains("-- Deviation register (0) --\n    none in the period"));
        assert!(lab.contains("Legal hold: none"));
        assert!(lab.contains("Pending destructions: none"));
        assert!(lab.contains("Destructions done in the period: none"));
        assert!(!lab.contains("LEGAL HOLD"));
        // A client-supplied escape sequence cannot reach the terminal.
        assert!(!text.contains('\u{1b}'));
        assert!(text.contains("sealer-ransom\\u{1b}[2J"));
        let mut r = sample();
        r.keyrings[0].untested_backups[1].backup_id = "evil\u{202e}fdp.exe".into();
        let text = render(&r, ReportFormat::Text);
        assert!(text.contains("evil\\u{202e}fdp.exe") && !text.contains('\u{202e}'));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn text_without_escrow_or_keyrings_says_so() {
        let mut r = sample();
        r.keyrings.clear();
        r.pending_approvals.clear();
        r.since = None;
        r.escrow = EscrowEntry {
            installed: false,
            ceremony_id: None,
            recovery_recipient: None,
            threshold: 0,
            shares: 0,
            custodians: vec![],
            installed_at: None,
            previous_recipients: vec![],
        };
        let text = render(&r, ReportFormat::Text);
        assert!(text.contains("Period:      all time"));
        assert!(text.contains("NO ESCROW MANIFEST INSTALLED"));
        assert!(text.contains("Custodians:          none"));
        assert!(text.contains("Pending approvals (dual control) ==\n  none"));
        assert!(text.contains("== Keyrings ==\n  none"));
        let html = render(&r, ReportFormat::Html);
        assert!(html.contains("No escrow manifest is installed"));
        assert!(html.contains("id=\"pending-approvals\" data-count=\"0\""));
        assert!(html.contains("<p class=\"none\">none: no keyrings</p>"));
    }

    #[test]
    fn html_escapes_every_client_string() {
        let html = render(&sample(), ReportFormat::Html);
        assert!(!html.contains(HOSTILE), "raw hostile backup id in the page");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script"), "the page must have no script element at all");
        assert!(html.contains("principal is not a restorer &amp; &lt;b&gt;not&lt;/b&gt; allowed"));
        assert!(!html.contains("<b>"));
        // In attributes too.
        assert!(html.contains("data-backup-id=\"&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert_eq!(html_escape("a\"b'c"), "a&quot;b&#39;c");
        assert!(matches!(html_escape("plain-id_1"), Cow::Borrowed(_)));
    }

    /// A value that clears the screen and then forges an audit-looking line.
    const FORGED: &str = "b1\u{1b}[2J\n     42 2026-01-01T00:00:00Z officer1 unwrap ok\u{9b}31m\u{2028}";

    #[test]
    fn every_format_keeps_a_forged_line_and_escape_sequences_off_the_screen() {
        let mut r = sample();
        r.keyrings[0].untested_backups[1].backup_id = FORGED.into();
        r.keyrings[0].deviations[0].detail = FORGED.into();
        r.pending_approvals[0].requested_by = FORGED.into();
        r.escrow.custodians.push(FORGED.into());
        for format in [ReportFormat::Text, ReportFormat::Html] {
            let out = render(&r, format);
            assert!(!out.contains('\u{1b}') && !out.contains('\u{9b}') && !out.contains('\u{2028}'), "{format}");
            assert!(!out.contains("\n     42 "), "{format}: the forged line starts a line of its own");
            assert!(out.contains("b1\\u{1b}[2J\\u{a}     42 2026-01-01T00:00:00Z officer1 unwrap ok\\u{9b}31m\\u{2028}"), "{format}");
        }
        // JSON stays JSON: the value is escaped by serde_json and reads back exactly.
        let json = render(&r, ReportFormat::Json);
        assert!(!json.contains('\u{1b}') && !json.contains("\n     42 "));
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.keyrings[0].untested_backups[1].backup_id, FORGED);
        assert_eq!(back, r);
    }

    #[test]
    fn html_has_the_sections_and_flags() {
        let html = render(&sample(), ReportFormat::Html);
        assert!(html.starts_with("<!DOCTYPE html>"));
        for id in [
            "report-header",
            "summary",
            "escrow",
            "pending-approvals",
            "keyrings",
            "keyring-pacs",
            "versions-pacs",
            "rotations-pacs",
            "restore-tests-pacs",
            "untested-pacs",
            "deviations-pacs",
            "destructions-pacs",
            "keyring-lab",
            "versions-lab",
            "deviations-lab",
            "destructions-lab",
        ] {
            assert!(html.contains(&format!("id=\"{id}\"")), "no element with id {id}");
        }
        for heading in [
            "<h3>Versions</h3>",
            "<h3>Rotations</h3>",
            "<h3>Restore tests</h3>",
            "<h3>Never restore-tested (57)</h3>",
            "<h3>Deviation register</h3>",
            "<h3>Destructions and legal hold</h3>",
            "<h2>Escrow</h2>",
            "<h2>Pending approvals</h2>",
        ] {
            assert!(html.contains(heading), "no {heading}");
        }
        assert!(html.contains(ESCROW_COPY_NOTICE));
        assert!(html.contains("id=\"deviations-pacs\" data-count=\"2\""));
        assert!(html.contains("id=\"deviations-lab\" data-count=\"0\""));
        assert!(html.contains("data-flag=\"rotation-overdue\""));
        assert!(html.contains("data-flag=\"deviations\""));
        assert!(html.contains("data-flag=\"held\""));
        assert!(html.contains("software key file master.key"));
        // Self-contained: nothing is fetched.
        for bad in ["<link", "src=", "url(", "@import", "http://", "https://"] {
            assert!(!html.contains(bad), "page references an external resource: {bad}");
        }
        // The clean keyring's empty lists render as explicit lines.
        let lab = &html[html.find("id=\"keyring-lab\"").unwrap()..];
        assert!(lab.matches("<p class=\"none\">").count() >= 5, "{lab}");
    }

    #[test]
    fn slug_keeps_valid_names_and_encodes_others() {
        assert_eq!(keyring_slug("pacs-2024.a"), "pacs-2024.a");
        assert_eq!(keyring_slug("a b\"<"), "a_20b_22_3C");
        assert_eq!(keyring_slug("x_y"), "x_5Fy");
    }
}
