//! Command-line glue for the offline escrow commands (`kmsctl escrow ...`).
//!
//! Standard output gets results only; plugin prompts (e.g. "touch your YubiKey") go to
//! standard error. Nothing secret is printed: `combine` writes the rebuilt identity to a
//! new file with mode 0600.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use kluis_age::fsutil;
use kluis_escrow::{
    Custodian, EscrowError, MANIFEST_FILE_NAME, Manifest, ShareIdentities, ShareText,
};

/// Decrypted or encrypted share files are small; standard input is read up to this.
const STDIN_LIMIT: usize = 64 * 1024;

/// The offline escrow commands.
#[derive(Debug, Subcommand)]
pub enum OfflineEscrowCommand {
    /// Run an escrow ceremony, offline: generate the recovery key, split it K-of-N and write
    /// one encrypted share file per custodian plus manifest.json.
    Ceremony {
        /// Shares needed to rebuild the recovery key (at least 2).
        #[arg(long, value_name = "K")]
        threshold: u8,
        /// A custodian and the age recipient their share is encrypted to; once per custodian.
        #[arg(long = "custodian", value_name = "NAME=RECIPIENT", required = true)]
        custodians: Vec<Custodian>,
        /// A new directory for manifest.json and the share files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Check one share against the manifest, on its own, without revealing it.
    VerifyShare {
        /// The ceremony's manifest.json (or its directory).
        #[arg(long, value_name = "MANIFEST")]
        manifest: PathBuf,
        /// Your age identity file, if the share file is still encrypted.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// The share file (encrypted or decrypted), or "-" for standard input.
        #[arg(value_name = "SHARE")]
        share: PathBuf,
    },
    /// Rebuild the recovery identity from at least K shares and write it to a new file.
    Combine {
        /// The ceremony's manifest.json (or its directory).
        #[arg(long, value_name = "MANIFEST")]
        manifest: PathBuf,
        /// An age identity file to open encrypted share files with; may be repeated.
        #[arg(long = "identity", value_name = "FILE")]
        identities: Vec<PathBuf>,
        /// Where to write the recovery identity (a new file, mode 0600).
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
        /// The share files (encrypted or decrypted); "-" for standard input (once).
        #[arg(value_name = "SHARE", required = true)]
        shares: Vec<PathBuf>,
    },
    /// Rebuild the recovery key from K shares and split it again to new custodians; the
    /// recovery recipient stays the same.
    Reshare {
        /// The current ceremony's manifest.json (or its directory).
        #[arg(long, value_name = "MANIFEST")]
        manifest: PathBuf,
        /// Shares needed in the new ceremony (at least 2).
        #[arg(long, value_name = "K")]
        threshold: u8,
        /// A new custodian and their age recipient; once per custodian.
        #[arg(long = "custodian", value_name = "NAME=RECIPIENT", required = true)]
        custodians: Vec<Custodian>,
        /// A new directory for the new manifest.json and share files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// An age identity file to open encrypted share files with; may be repeated.
        #[arg(long = "identity", value_name = "FILE")]
        identities: Vec<PathBuf>,
        /// The current ceremony's share files; "-" for standard input (once).
        #[arg(value_name = "SHARE", required = true)]
        shares: Vec<PathBuf>,
    },
}

/// Runs one offline escrow command, writing its results to `out`.
pub fn run_offline(cmd: OfflineEscrowCommand, out: &mut dyn Write) -> Result<(), EscrowError> {
    match cmd {
        OfflineEscrowCommand::Ceremony {
            threshold,
            custodians,
            out: dir,
        } => {
            let manifest = kluis_escrow::ceremony(threshold, &custodians, &dir)?;
            report_ceremony(out, &manifest, &dir)?;
            say(
                out,
                "Give each custodian their own share file and a copy of manifest.json; install manifest.json on the server.\nThe recovery private key was not written anywhere.",
            )
        }
        OfflineEscrowCommand::VerifyShare {
            manifest,
            identity,
            share,
        } => {
            let manifest = Manifest::load(&manifest)?;
            let identities = match &identity {
                Some(p) => ShareIdentities::from_files(&[p])?,
                None => ShareIdentities::none(),
            };
            let mut stdin_used = false;
            let text = read_one(&share, &identities, &mut stdin_used)?;
            let v = kluis_escrow::verify_share(&manifest, &text)
                .map_err(|e| e.in_share_file(&share))?;
            say(
                out,
                &format!(
                    "share {} of ceremony {} (custodian {}) is intact and belongs to this ceremony; {} of {} shares are needed to rebuild the recovery key",
                    v.index, v.ceremony_id, v.custodian, v.threshold, v.shares
                ),
            )
        }
        OfflineEscrowCommand::Combine {
            manifest,
            identities,
            out: target,
            shares,
        } => {
            let manifest = Manifest::load(&manifest)?;
            // Refuse early, before custodians decrypt anything.
            if target.symlink_metadata().is_ok() {
                return Err(EscrowError::IdentityFileExists { path: target });
            }
            let parent = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            if let Err(e) = std::fs::metadata(&parent) {
                return Err(EscrowError::Io {
                    action: "create the recovery identity in",
                    path: parent,
                    source: e,
                });
            }
            let texts = read_and_check(out, &manifest, &identities, &shares)?;
            let identity = kluis_escrow::combine(&manifest, &texts)?;
            identity.write_identity_file(&target)?;
            say(
                out,
                &format!(
                    "rebuilt the recovery identity from {} shares; its recipient {} matches the manifest",
                    texts.len(),
                    identity.recipient()
                ),
            )?;
            say(
                out,
                &format!(
                    "wrote {} (mode 0600); open a sealed backup with: age -d -i {} BACKUP > RESTORED\nKeep this file offline and destroy it when the recovery is done.",
                    target.display(),
                    target.display()
                ),
            )
        }
        OfflineEscrowCommand::Reshare {
            manifest,
            threshold,
            custodians,
            out: dir,
            identities,
            shares,
        } => {
            let old = Manifest::load(&manifest)?;
            let texts = read_and_check(out, &old, &identities, &shares)?;
            let new = kluis_escrow::reshare(&old, &texts, threshold, &custodians, &dir)?;
            report_ceremony(out, &new, &dir)?;
            say(
                out,
                &format!(
                    "This ceremony replaces ceremony {}; the recovery recipient is unchanged, so existing backups stay recoverable.\nInstall the new manifest.json on the server and give each new custodian their share file.\nThe old shares still rebuild the same key: every old custodian must destroy their old share file.",
                    old.ceremony_id
                ),
            )
        }
    }
}

/// Reads every share, checks each on its own (naming the file of a bad one) and refuses a
/// share given twice; prints one line per good share.
fn read_and_check(
    out: &mut dyn Write,
    manifest: &Manifest,
    identity_files: &[PathBuf],
    paths: &[PathBuf],
) -> Result<Vec<ShareText>, EscrowError> {
    let identities = ShareIdentities::from_files(identity_files)?;
    let mut stdin_used = false;
    let mut seen: Vec<u8> = Vec::with_capacity(paths.len());
    let mut texts = Vec::with_capacity(paths.len());
    for path in paths {
        let text = read_one(path, &identities, &mut stdin_used)?;
        let v = kluis_escrow::verify_share(manifest, &text).map_err(|e| e.in_share_file(path))?;
        if seen.contains(&v.index) {
            return Err(EscrowError::Duplicate {
                custodian: v.custodian,
                index: v.index,
            }
            .in_share_file(path));
        }
        seen.push(v.index);
        say(
            out,
            &format!(
                "{}: share {} (custodian {}) is intact",
                path.display(),
                v.index,
                v.custodian
            ),
        )?;
        texts.push(text);
    }
    Ok(texts)
}

/// Reads one share from a file or, for "-", from standard input; errors name the file.
fn read_one(
    path: &Path,
    identities: &ShareIdentities,
    stdin_used: &mut bool,
) -> Result<ShareText, EscrowError> {
    let result = if path.as_os_str() == "-" {
        if *stdin_used {
            return Err(EscrowError::StdinTwice);
        }
        *stdin_used = true;
        let data = fsutil::read_limited(std::io::stdin().lock(), path, STDIN_LIMIT)?;
        kluis_escrow::decode_share(&data, identities)
    } else {
        kluis_escrow::read_share_with(path, identities)
    };
    result.map_err(|e| match e {
        // I/O errors already name the file.
        e @ (EscrowError::Io { .. } | EscrowError::FileTooLarge { .. }) => e,
        e => e.in_share_file(path),
    })
}

fn report_ceremony(out: &mut dyn Write, m: &Manifest, dir: &Path) -> Result<(), EscrowError> {
    say(
        out,
        &format!(
            "ceremony {}: {} of {} shares are needed to rebuild the recovery key",
            m.ceremony_id, m.threshold, m.shares
        ),
    )?;
    say(
        out,
        &format!("recovery recipient: {}", m.recovery_recipient),
    )?;
    for c in &m.custodians {
        say(
            out,
            &format!(
                "wrote {} (share {} for {}, encrypted to {})",
                dir.join(kluis_escrow::share_file_name(&c.name)).display(),
                c.index,
                c.name,
                c.recipient
            ),
        )?;
    }
    say(
        out,
        &format!("wrote {}", dir.join(MANIFEST_FILE_NAME).display()),
    )
}

fn say(out: &mut dyn Write, line: &str) -> Result<(), EscrowError> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|source| EscrowError::Output { source })
}

#[cfg(test)]
mod tests {
    //! The offline escrow commands end to end, through clap as kmsctl parses them. The
    //! helpers are those of the escrow crate's own tests.

    use std::path::{Path, PathBuf};

    use age::secrecy::ExposeSecret;
    use clap::Parser;
    use kluis_escrow::combine;

    use super::*;
    use kluis_escrow::test_support::*;


    /// The CLI as `kmsctl escrow ...` will flatten it.
    #[derive(Parser)]
    struct TestCli {
        #[command(subcommand)]
        cmd: OfflineEscrowCommand,
    }

    fn run(args: &[&str]) -> (Result<(), EscrowError>, String) {
        let mut argv = vec!["kmsctl"];
        argv.extend_from_slice(args);
        let cli = TestCli::try_parse_from(argv).unwrap();
        let mut out = Vec::new();
        let r = run_offline(cli.cmd, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    fn p(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    #[test]
    fn cli_ceremony_verify_combine_reshare() {
        let tmp = tempfile::tempdir().unwrap();
        let h = holders(&["alice", "bob", "carol"]);
        let keys: Vec<PathBuf> = h
            .iter()
            .map(|h| {
                let k = tmp.path().join(format!("{}.key", h.custodian.name));
                std::fs::write(&k, h.identity.to_string().expose_secret()).unwrap();
                k
            })
            .collect();
        let dir = tmp.path().join("c1");
        let specs: Vec<String> = h
            .iter()
            .map(|h| format!("{}={}", h.custodian.name, h.custodian.recipient))
            .collect();

        let mut args = vec!["ceremony", "--threshold", "2", "--out", p(&dir)];
        for s in &specs {
            args.extend(["--custodian", s.as_str()]);
        }
        let (r, out) = run(&args);
        r.unwrap();
        let m = Manifest::load(&dir).unwrap();
        assert!(
            out.contains(&format!("ceremony {}", m.ceremony_id)),
            "{out}"
        );
        assert!(out.contains(&m.recovery_recipient), "{out}");
        assert!(out.contains("share-carol.age"), "{out}");
        assert!(
            !out.to_ascii_uppercase().contains("AGE-SECRET-KEY"),
            "{out}"
        );

        // A malformed --custodian is a clap error.
        assert!(
            TestCli::try_parse_from([
                "kmsctl",
                "ceremony",
                "--threshold",
                "2",
                "--out",
                "x",
                "--custodian",
                "alice"
            ])
            .is_err()
        );

        let alice_share = share_path(&dir, "alice");
        let (r, out) = run(&[
            "verify-share",
            "--manifest",
            p(&dir.join(MANIFEST_FILE_NAME)),
            "--identity",
            p(&keys[0]),
            p(&alice_share),
        ]);
        r.unwrap();
        assert_eq!(
            out.trim(),
            format!(
                "share 1 of ceremony {} (custodian alice) is intact and belongs to this ceremony; 2 of 3 shares are needed to rebuild the recovery key",
                m.ceremony_id
            )
        );
        let (r, out) = run(&["verify-share", "--manifest", p(&dir), p(&alice_share)]);
        let e = r.unwrap_err();
        assert!(out.is_empty());
        assert!(matches!(e.innermost(), EscrowError::StillEncrypted));
        assert!(e.to_string().contains("share-alice.age"), "{e}");

        // Combine with each custodian's key given; age tries each key on each file.
        let key_out = tmp.path().join("recovery.key");
        let (r, out) = run(&[
            "combine",
            "--manifest",
            p(&dir),
            "--identity",
            p(&keys[0]),
            "--identity",
            p(&keys[2]),
            "-o",
            p(&key_out),
            p(&alice_share),
            p(&share_path(&dir, "carol")),
        ]);
        r.unwrap();
        assert!(out.contains("matches the manifest"), "{out}");
        assert!(
            !out.to_ascii_uppercase().contains("AGE-SECRET-KEY"),
            "{out}"
        );
        let idf = age::IdentityFile::from_file(p(&key_out).to_owned()).unwrap();
        let mut rf = Vec::new();
        idf.write_recipients_file(&mut rf).unwrap();
        assert_eq!(String::from_utf8(rf).unwrap().trim(), m.recovery_recipient);

        // The output file exists now: refused before anything is read.
        let (r, _) = run(&[
            "combine",
            "--manifest",
            p(&dir),
            "--identity",
            p(&keys[0]),
            "-o",
            p(&key_out),
            p(&alice_share),
        ]);
        assert!(matches!(r, Err(EscrowError::IdentityFileExists { .. })));

        // The same share twice: named by file.
        let key_out2 = tmp.path().join("recovery2.key");
        let (r, _) = run(&[
            "combine",
            "--manifest",
            p(&dir),
            "--identity",
            p(&keys[0]),
            "-o",
            p(&key_out2),
            p(&alice_share),
            p(&alice_share),
        ]);
        let e = r.unwrap_err();
        assert!(
            matches!(e.innermost(), EscrowError::Duplicate { custodian, .. } if custodian == "alice")
        );
        assert!(!key_out2.exists());

        // Only one share: not enough.
        let (r, _) = run(&[
            "combine",
            "--manifest",
            p(&dir),
            "--identity",
            p(&keys[1]),
            "-o",
            p(&key_out2),
            p(&share_path(&dir, "bob")),
        ]);
        assert!(matches!(
            r,
            Err(EscrowError::NotEnoughShares { have: 1, need: 2 })
        ));
        assert!(!key_out2.exists());

        // Re-share to two new custodians.
        let nh = holders(&["dora", "emil"]);
        let new_dir = tmp.path().join("c2");
        let nspecs: Vec<String> = nh
            .iter()
            .map(|h| format!("{}={}", h.custodian.name, h.custodian.recipient))
            .collect();
        let mut args = vec![
            "reshare",
            "--manifest",
            p(&dir),
            "--threshold",
            "2",
            "--out",
            p(&new_dir),
            "--identity",
            p(&keys[1]),
            "--identity",
            p(&keys[2]),
        ];
        for s in &nspecs {
            args.extend(["--custodian", s.as_str()]);
        }
        let (bob_share, carol_share) = (share_path(&dir, "bob"), share_path(&dir, "carol"));
        args.extend([p(&bob_share), p(&carol_share)]);
        let (r, out) = run(&args);
        r.unwrap();
        let new = Manifest::load(&new_dir).unwrap();
        assert_eq!(new.replaces.as_deref(), Some(m.ceremony_id.as_str()));
        assert_eq!(new.recovery_recipient, m.recovery_recipient);
        assert!(out.contains("replaces ceremony"), "{out}");
        let texts = share_texts(&new_dir, &nh);
        let id = combine(&new, &parse_all(&texts)).unwrap();
        assert_eq!(id.recipient().to_string(), m.recovery_recipient);
    }
}
