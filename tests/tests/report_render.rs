//! The HTML compliance report in a real headless browser: Chromium loads the page
//! from a file (offline), takes a screenshot and dumps the DOM as it parsed it.
//! The screenshot must be a real, non-blank 1280-wide PNG; the DOM must have every
//! section, show a hostile backup id as escaped text and contain no script element.
//!
//! Needs `/usr/bin/chromium` (Debian package `chromium`; scripts/test-all installs it).
//! Set `KLUIS_REPORT_OUT=DIR` to keep `report.html` and `report.png` for a look.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use kluis_proto::report::{
    ApprovalEntry, BackupEntry, DestructionEntry, DeviationEntry, EscrowEntry, HoldEntry, KeyringReport, KmipCreator, KmipEntry,
    KmipGet, MasterEntry, REPORT_FORMAT, Report, RestoreTestEntry, RotationEntry, VersionEntry,
};
use kmsctl::report::{ESCROW_COPY_NOTICE, ReportFormat, render};

/// The browser the test drives.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Hang guard only: a healthy run takes a second or two and exits by itself.
const CHROMIUM_TIMEOUT_SECS: u32 = 300;

const HOSTILE_BACKUP_ID: &str = "<script>alert(1)</script>";

/// Opens `html_path` in headless Chromium (fresh profile, no network services),
/// writes a 1280x2000 screenshot to `png_path` and returns the DOM as Chromium
/// serialized it after parsing. Panics with a clear message if Chromium is
/// missing, fails, or hangs (killed after a generous timeout).
pub fn chromium_screenshot(html_path: &Path, png_path: &Path) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the report test needs a real browser; install the Debian package `chromium` \
         (`sudo apt-get install chromium`; scripts/test-all does this)"
    );
    let profile = tempfile::tempdir().unwrap();
    let html_path = std::fs::canonicalize(html_path).unwrap();
    let url = format!("file://{}", html_path.display());
    // coreutils `timeout` kills Chromium's whole process group if it ever hangs.
    let out = Command::new("timeout")
        .args(["--kill-after=10", &CHROMIUM_TIMEOUT_SECS.to_string(), CHROMIUM])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png_path.display()))
        .arg("--window-size=1280,2000")
        .arg("--dump-dom")
        .arg(&url)
        .env("HOME", profile.path())
        .output()
        .expect("cannot run `timeout` (coreutils) to start chromium");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(124),
        "chromium did not finish within {CHROMIUM_TIMEOUT_SECS} s (killed by the hang guard); stderr:\n{stderr}"
    );
    assert!(out.status.success(), "chromium failed ({}); stderr:\n{stderr}", out.status);
    let dom = String::from_utf8(out.stdout).expect("chromium's DOM dump is not UTF-8");
    assert!(!dom.trim().is_empty(), "chromium dumped an empty DOM; stderr:\n{stderr}");
    assert!(png_path.exists(), "chromium wrote no screenshot at {}; stderr:\n{stderr}", png_path.display());
    dom
}

/// A decoded 8-bit RGB(A) PNG, as RGB pixels.
pub struct Png {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<[u8; 3]>,
}

/// Decodes a non-interlaced 8-bit RGB or RGBA PNG (what Chromium writes), checking
/// the signature, IHDR, every chunk's CRC-free framing and the scanline filters.
pub fn decode_png(bytes: &[u8]) -> Png {
    const SIG: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    assert!(bytes.len() > 33 && bytes[..8] == SIG, "not a PNG (bad signature)");
    assert_eq!(&bytes[12..16], b"IHDR", "the first PNG chunk is not IHDR");
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let width = be32(&bytes[16..20]);
    let height = be32(&bytes[20..24]);
    let (depth, color, interlace) = (bytes[24], bytes[25], bytes[28]);
    assert_eq!(depth, 8, "unexpected PNG bit depth");
    let channels = match color {
        2 => 3usize,
        6 => 4usize,
        c => panic!("unexpected PNG colour type {c}"),
    };
    assert_eq!(interlace, 0, "interlaced PNG");

    let mut idat = Vec::new();
    let mut pos = 8;
    let mut seen_iend = false;
    while pos + 12 <= bytes.len() {
        let len = be32(&bytes[pos..pos + 4]) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let data = bytes.get(pos + 8..pos + 8 + len).expect("truncated PNG chunk");
        if kind == b"IDAT" {
            idat.extend_from_slice(data);
        }
        if kind == b"IEND" {
            seen_iend = true;
            break;
        }
        pos += 12 + len;
    }
    assert!(seen_iend, "PNG has no IEND chunk (truncated)");

    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..]).read_to_end(&mut raw).expect("PNG image data does not inflate");
    let stride = width as usize * channels;
    assert_eq!(raw.len(), height as usize * (stride + 1), "PNG image data has the wrong length");

    let mut prev = vec![0u8; stride];
    let mut cur = vec![0u8; stride];
    let mut rgb = Vec::with_capacity(width as usize * height as usize);
    for row in raw.chunks_exact(stride + 1) {
        let (filter, line) = (row[0], &row[1..]);
        for i in 0..stride {
            let a = if i >= channels { cur[i - channels] } else { 0 };
            let b = prev[i];
            let c = if i >= channels { prev[i - channels] } else { 0 };
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((u16::from(a) + u16::from(b)) / 2) as u8,
                4 => {
                    let p = i16::from(a) + i16::from(b) - i16::from(c);
                    let (pa, pb, pc) = ((p - i16::from(a)).abs(), (p - i16::from(b)).abs(), (p - i16::from(c)).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("bad PNG filter type {f}"),
            };
            cur[i] = line[i].wrapping_add(pred);
        }
        rgb.extend(cur.chunks_exact(channels).map(|p| [p[0], p[1], p[2]]));
        std::mem::swap(&mut prev, &mut cur);
    }
    Png { width, height, rgb }
}

/// Element names in serialized HTML, in document order (quotes in attributes honoured,
/// so an attribute value can never be mistaken for a tag).
fn element_names(html: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = html.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '<' {
            continue;
        }
        let mut name = String::new();
        while let Some(&(_, n)) = chars.peek() {
            if n.is_ascii_alphanumeric() {
                name.push(n.to_ascii_lowercase());
                chars.next();
            } else {
                break;
            }
        }
        // Skip to the end of the tag (or comment/doctype/closing tag), honouring quotes.
        let mut quote = None;
        for (_, n) in chars.by_ref() {
            match (quote, n) {
                (None, '"' | '\'') => quote = Some(n),
                (Some(q), n) if n == q => quote = None,
                (None, '>') => break,
                _ => {}
            }
        }
        if !name.is_empty() {
            names.push(name);
        }
    }
    names
}

fn sample_report() -> Report {
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
            VersionEntry { version: 2, created: "2024-06-01T08:00:00Z".into(), age_days: 172, state: "active".into(), keys: 260 },
        ],
        rotations: vec![RotationEntry { version: 2, time: "2024-06-01T08:00:00Z".into() }],
        next_rotation: Some("2024-08-30T08:00:00Z".into()),
        rotation_overdue: true,
        untested_backups: vec![
            BackupEntry { backup_id: HOSTILE_BACKUP_ID.into(), key_id: "k-0001".into(), created: "2024-07-01T02:00:00Z".into() },
            BackupEntry { backup_id: "pacs-2024-07-02".into(), key_id: "k-0002".into(), created: "2024-07-02T02:00:00Z".into() },
            BackupEntry { backup_id: "pacs-2024-07-03".into(), key_id: "k-0003".into(), created: "2024-07-03T02:00:00Z".into() },
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
                principal: "sealer-backup02".into(),
                key_id: Some("k-0050".into()),
                backup_id: None,
                detail: "<img src=x onerror=alert(2)> principal is not a restorer".into(),
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
        kmip: Some(KmipEntry {
            objects: 3,
            by_state: [("Active".to_owned(), 2), ("Destroyed".to_owned(), 1)].into_iter().collect(),
            creators: vec![KmipCreator { principal: "<img src=x onerror=alert(3)>".into(), objects: 3 }],
            gets: 4,
            last_get: Some(KmipGet { time: "2024-11-19T02:00:00Z".into(), principal: "veeam-01".into(), uid: "0123456789abcdef0123456789abcdef".into() }),
        }),
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
        versions: vec![VersionEntry { version: 1, created: "2024-03-01T08:00:00Z".into(), age_days: 264, state: "active".into(), keys: 3 }],
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
        master: MasterEntry { description: "pkcs11 token kluis, key label kluis-master".into(), generation: 3 },
        escrow: EscrowEntry {
            installed: true,
            ceremony_id: Some("cer-2024-01".into()),
            recovery_recipient: Some("age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj".into()),
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

fn keep_output(html: &Path, png: &Path) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("KLUIS_REPORT_OUT")?);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(html, dir.join("report.html")).unwrap();
    std::fs::copy(png, dir.join("report.png")).unwrap();
    Some(dir)
}

#[test]
fn html_report_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let html_path = dir.path().join("report.html");
    let png_path = dir.path().join("report.png");
    std::fs::write(&html_path, render(&sample_report(), ReportFormat::Html)).unwrap();

    let dom = chromium_screenshot(&html_path, &png_path);
    if let Some(kept) = keep_output(&html_path, &png_path) {
        eprintln!("report.html and report.png kept in {}", kept.display());
    }

    // The screenshot: a real PNG of the requested size, with a page drawn on it.
    let bytes = std::fs::read(&png_path).unwrap();
    let png = decode_png(&bytes);
    assert_eq!((png.width, png.height), (1280, 2000), "screenshot size");
    let background = png.rgb[0];
    let inked = png.rgb.iter().filter(|p| **p != background).count();
    let total = png.rgb.len();
    assert!(inked * 100 > total * 3, "screenshot looks blank: only {inked} of {total} pixels differ from the background");
    let rows_with_ink = png.rgb.chunks_exact(1280).filter(|row| row.iter().any(|p| p != &background)).count();
    assert!(rows_with_ink > 1000, "only {rows_with_ink} of 2000 rows have anything drawn on them");
    // The red flags (overdue rotation, deviations, legal hold) are visible.
    let reddish = png.rgb.iter().filter(|[r, g, b]| *r > 150 && i16::from(*r) - i16::from(*g) > 60 && i16::from(*r) - i16::from(*b) > 60).count();
    assert!(reddish > 200, "no flagged (red) cells visible in the screenshot ({reddish} red pixels)");

    // The DOM as Chromium parsed it: every section is there.
    for id in [
        "report-header",
        "summary",
        "escrow",
        "escrow-copy-notice",
        "without-escrow",
        "pending-approvals",
        "keyrings",
        "keyring-pacs",
        "versions-pacs",
        "rotations-pacs",
        "restore-tests-pacs",
        "untested-pacs",
        "deviations-pacs",
        "kmip-pacs",
        "destructions-pacs",
        "keyring-lab",
        "versions-lab",
        "rotations-lab",
        "restore-tests-lab",
        "untested-lab",
        "deviations-lab",
        "destructions-lab",
    ] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "the parsed page has no element with id {id:?}");
    }
    for heading in [
        "Versions",
        "Rotations",
        "Restore tests",
        "Never restore-tested",
        "Deviation register",
        "Destructions and legal hold",
        "KMIP objects",
        "Escrow",
        "Pending approvals",
        "Summary",
    ] {
        assert!(dom.contains(&format!(">{heading}")), "the parsed page has no heading {heading:?}");
    }
    assert!(dom.contains(ESCROW_COPY_NOTICE));
    assert!(dom.contains("data-flag=\"rotation-overdue\""));
    assert!(dom.contains("data-flag=\"deviations\""));
    assert!(dom.contains("data-flag=\"held\""));
    assert!(dom.contains("id=\"deviations-pacs\" data-count=\"2\""));

    // The hostile strings arrive as text, never as elements.
    assert!(
        dom.contains("<code>&lt;script&gt;alert(1)&lt;/script&gt;</code>"),
        "the hostile backup id is not shown as escaped text"
    );
    assert!(dom.contains("&lt;img src=x onerror=alert(2)&gt;"));
    assert!(dom.contains("&lt;img src=x onerror=alert(3)&gt;"), "the KMIP creator is escaped too");
    assert!(!dom.contains("id=\"kmip-lab\""), "a keyring without KMIP objects has no KMIP section");
    let elements = element_names(&dom);
    for forbidden in ["script", "img", "link", "iframe", "object", "embed", "base"] {
        assert!(!elements.iter().any(|e| e == forbidden), "the parsed page has a <{forbidden}> element");
    }
    assert_eq!(elements.iter().filter(|e| *e == "style").count(), 1, "exactly one inline <style>");
    assert!(elements.iter().filter(|e| *e == "section").count() >= 2 + 7 * 2);
}

#[test]
fn element_scanner_sees_through_quoted_attributes() {
    let names = element_names("<p data-x=\"<script>\" title='a>b'>x &lt;script&gt;</p><!-- c --><SCRIPT>1</SCRIPT>");
    assert_eq!(names, ["p", "script"]);
}

/// The report of a real server after a scripted scenario: every field the issue
/// names, from JSON, and the HTML form of the same report in Chromium.
#[test]
fn report_of_a_scripted_scenario_from_a_real_server() {
    use kluis_tests::{Server, s, seal, stderr, unseal};
    let server = Server::start();
    assert!(server.kmsctl("officer", &["keyring", "create", "pacs", "--retention-days", "30", "--rotation-period-days", "90"]).status.success());
    let a = seal(&server, "sealer", "default", "ehr/2026-11-23/full", b"backup a");
    let b = seal(&server, "sealer", "default", "ehr/2026-11-23/incr", b"backup b");
    let c = seal(&server, "sealer", "default", HOSTILE_BACKUP_ID, b"backup c");
    assert!(server.kmsctl("officer", &["keyring", "rotate", "default"]).status.success());

    // A restore test that passes, and one that fails (a damaged copy of b).
    let dir = server.dir.path();
    let (good, bad) = (dir.join("a.kluis"), dir.join("b-damaged.kluis"));
    std::fs::write(&good, &a).unwrap();
    let mut damaged = b.clone();
    let n = damaged.len();
    damaged[n - 5] ^= 1;
    std::fs::write(&bad, &damaged).unwrap();
    assert!(server.backup_hook("restorer", &["verify", "-i", s(&good), "--host", "restore01"], b"").status.success());
    assert_eq!(server.backup_hook("restorer", &["verify", "-i", s(&bad), "--host", "restore01"], b"").status.code(), Some(5));
    // A refused unwrap (the sealer is write-only) and a failed one (altered wrapped key).
    assert_eq!(unseal(&server, "sealer", &c).status.code(), Some(4));
    let mut altered = c.clone();
    let stanza = altered.windows(3).position(|w| w == b"\n->").unwrap();
    let line2 = stanza + 1 + altered[stanza + 1..].iter().position(|&x| x == b'\n').unwrap() + 1;
    altered[line2 + 10] = if altered[line2 + 10] == b'A' { b'B' } else { b'A' };
    assert_eq!(unseal(&server, "restorer", &altered).status.code(), Some(5));
    // A pending destruction (dual control) and a legal hold on another keyring.
    let out = server.kmsctl("officer", &["keyring", "destroy", "default"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(server.kmsctl("officer", &["keyring", "hold", "pacs", "--reason", "inspection IGJ-2026-4"]).status.success());

    let out = server.kmsctl("auditor", &["report", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rep: Report = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep.format, REPORT_FORMAT);
    assert_eq!(rep.master.generation, 1);
    assert!(!rep.escrow.installed);
    assert_eq!(rep.pending_approvals.len(), 1);
    assert!(rep.pending_approvals[0].action.contains("destroy keyring default"), "{:?}", rep.pending_approvals);
    let names: Vec<&str> = rep.keyrings.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["default", "pacs"]);
    let d = &rep.keyrings[0];
    assert_eq!((d.keys_issued, d.keys_active, d.keys_destroyed, d.keys_without_escrow), (3, 3, 0, 3));
    assert_eq!(d.versions.iter().map(|v| (v.version, v.state.as_str(), v.keys)).collect::<Vec<_>>(), [(1, "active", 3), (2, "active", 0)]);
    assert_eq!(d.rotations.iter().map(|r| r.version).collect::<Vec<_>>(), [2]);
    assert_eq!(d.last_tests.len(), 2);
    assert!(d.last_tests.iter().any(|t| t.ok && t.backup_id == "ehr/2026-11-23/full" && t.host == "restore01"));
    assert!(d.last_tests.iter().any(|t| !t.ok && t.backup_id == "ehr/2026-11-23/incr"));
    assert_eq!(d.untested_backups_total, 1, "only c was never tested");
    assert_eq!(d.untested_backups[0].backup_id, HOSTILE_BACKUP_ID);
    let kinds: Vec<&str> = d.deviations.iter().map(|x| x.kind.as_str()).collect();
    for k in ["restore-test-failed", "unwrap-refused", "unwrap-failed"] {
        assert!(kinds.contains(&k), "deviation {k} missing from {kinds:?}");
    }
    assert!(d.deviations.iter().any(|x| x.kind == "unwrap-refused" && x.principal == "sealer"));
    assert!(d.pending_destructions.is_empty(), "approval pending, nothing scheduled yet");
    let p = &rep.keyrings[1];
    assert_eq!((p.retention_days, p.rotation_period_days), (30, 90));
    assert!(p.next_rotation.is_some() && !p.rotation_overdue);
    assert_eq!(p.legal_hold.as_ref().unwrap().reason, "inspection IGJ-2026-4");

    // --since in the future: no events, the standing facts remain.
    let out = server.kmsctl("auditor", &["report", "--format", "json", "--since", "2999-01-01T00:00:00Z"]);
    let later: Report = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(later.keyrings[0].keys_issued, 0);
    assert_eq!(later.keyrings[0].keys_issued_total, 3);
    assert!(later.keyrings[0].deviations.is_empty() && later.keyrings[0].rotations.is_empty());
    let out = server.kmsctl("auditor", &["report", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("since"), "{}", stderr(&out));
    let out = server.kmsctl("auditor", &["report", "--format", "pdf"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("pdf"), "{}", stderr(&out));
    assert_eq!(server.kmsctl("sealer", &["report"]).status.code(), Some(4));

    // Text and HTML of the same server.
    let text = String::from_utf8(server.kmsctl("auditor", &["report"]).stdout).unwrap();
    assert!(text.contains("restore-test-failed") && text.contains("inspection IGJ-2026-4"), "{text}");
    let out = server.kmsctl("auditor", &["report", "--format", "html"]);
    assert!(out.status.success());
    let html = dir.join("report.html");
    std::fs::write(&html, &out.stdout).unwrap();
    let png = dir.join("report.png");
    let dom = chromium_screenshot(&html, &png);
    let shot = decode_png(&std::fs::read(&png).unwrap());
    assert_eq!(shot.width, 1280);
    for id in ["summary", "escrow", "pending-approvals", "keyring-default", "deviations-default", "untested-default", "restore-tests-default", "hold-pacs"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "section {id} missing from the rendered page");
    }
    assert!(dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "hostile backup id must be shown escaped");
    assert!(!element_names(&dom).iter().any(|e| e == "script"), "no script element may reach the page");
}
