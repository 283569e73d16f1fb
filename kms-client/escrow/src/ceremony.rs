//! The ceremony (generate and split), combination (rebuild) and re-share.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use blahaj::{Share, Sharks};
use kluis_age::fsutil;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::error::EscrowError;
use super::manifest::{self, CustodianEntry, MANIFEST_FILE_NAME, MANIFEST_FORMAT, Manifest};
use super::recipient::{self, PreparedRecipient};
use super::secret::{RecoveryIdentity, RecoverySecret};
use super::share::{self, SHARE_BYTES_LEN, ShareText};

/// One custodian of a ceremony: a name (which becomes the file name `share-NAME.age`) and
/// the age recipient their share file is encrypted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Custodian {
    /// `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// `age1...`, `age1tag1...`, or a plugin recipient such as `age1yubikey1...`.
    pub recipient: String,
}

impl Custodian {
    /// A custodian from name and recipient (checked when the ceremony runs).
    pub fn new(name: impl Into<String>, recipient: impl Into<String>) -> Custodian {
        Custodian {
            name: name.into(),
            recipient: recipient.into(),
        }
    }
}

impl FromStr for Custodian {
    type Err = String;

    /// `NAME=RECIPIENT`, as given on the command line.
    fn from_str(s: &str) -> Result<Custodian, String> {
        match s.split_once('=') {
            Some((name, recipient)) if !name.trim().is_empty() && !recipient.trim().is_empty() => {
                Ok(Custodian::new(name.trim(), recipient.trim()))
            }
            _ => Err(format!(
                "{s:?} is not of the form NAME=RECIPIENT (for example alice=age1...)"
            )),
        }
    }
}

/// The share file name of a custodian.
pub fn share_file_name(custodian: &str) -> String {
    format!("share-{custodian}.age")
}

/// Runs an escrow ceremony, offline: generates the X25519 recovery identity, splits its
/// secret `threshold`-of-N over GF(256) (N = number of custodians), and writes into
/// `out_dir` (created if missing) one `share-NAME.age` per custodian, encrypted to that
/// custodian's recipient, and then `manifest.json`. The recovery private key is never
/// written in clear.
///
/// Everything is checked before anything is generated or written: threshold (2..=N),
/// N <= 255, names, duplicates, recipients (plugin programs must be installed), and that
/// `out_dir` holds no manifest and none of the share files. Files are written atomically
/// and never replace existing files; if writing fails, the files already written by this
/// call are removed.
pub fn ceremony(
    threshold: u8,
    custodians: &[Custodian],
    out_dir: &Path,
) -> Result<Manifest, EscrowError> {
    let prepared = prepare(threshold, custodians, out_dir)?;
    let rng = SystemRandom::new();
    let secret = RecoverySecret::generate(&rng)?;
    deal(
        &rng, &secret, threshold, custodians, &prepared, out_dir, None,
    )
}

/// Rebuilds the recovery identity from custodian shares.
///
/// Each share is first checked on its own against the manifest ([`super::verify_share`]),
/// and the first bad one is named; a share given twice is refused; fewer than `threshold`
/// shares is [`EscrowError::NotEnoughShares`]; the rebuilt identity's recipient must equal
/// the manifest's recovery recipient before it is returned.
pub fn combine(manifest: &Manifest, shares: &[ShareText]) -> Result<RecoveryIdentity, EscrowError> {
    let secret = recover_secret(manifest, shares)?;
    let identity = secret.identity()?;
    Ok(RecoveryIdentity::new(
        identity,
        manifest.ceremony_id.clone(),
    ))
}

/// Re-shares the recovery key to a new custodian set: rebuilds the secret from `shares` of
/// the `old` ceremony (all checks of [`combine`]), then splits the same secret
/// `threshold`-of-N to `custodians` into `out_dir`, as a new ceremony whose `replaces` is
/// the old ceremony id. The recovery recipient stays the same, so existing backups stay
/// recoverable. The new parameters and `out_dir` are checked before the old shares are
/// combined.
///
/// Because the secret is the same, `threshold` shares of the OLD ceremony still rebuild
/// it (with the old manifest): the old custodians must destroy their old share files. The
/// new manifest refuses old shares (they belong to another ceremony).
pub fn reshare(
    old: &Manifest,
    shares: &[ShareText],
    threshold: u8,
    custodians: &[Custodian],
    out_dir: &Path,
) -> Result<Manifest, EscrowError> {
    let prepared = prepare(threshold, custodians, out_dir)?;
    let secret = recover_secret(old, shares)?;
    let rng = SystemRandom::new();
    deal(
        &rng,
        &secret,
        threshold,
        custodians,
        &prepared,
        out_dir,
        Some(old),
    )
}

/// Checks the ceremony parameters and the output directory; resolves recipients.
fn prepare(
    threshold: u8,
    custodians: &[Custodian],
    out_dir: &Path,
) -> Result<Vec<PreparedRecipient>, EscrowError> {
    if custodians.len() > 255 {
        return Err(EscrowError::TooManyCustodians {
            count: custodians.len(),
        });
    }
    if threshold < 2 {
        return Err(EscrowError::ThresholdTooSmall { threshold });
    }
    if usize::from(threshold) > custodians.len() {
        return Err(EscrowError::ThresholdAboveCustodians {
            threshold,
            custodians: custodians.len(),
        });
    }
    let mut folded: Vec<String> = Vec::with_capacity(custodians.len());
    for c in custodians {
        if !manifest::valid_custodian_name(&c.name) {
            return Err(EscrowError::BadCustodianName {
                name: c.name.clone(),
            });
        }
        let f = c.name.to_ascii_lowercase();
        if folded.contains(&f) {
            return Err(EscrowError::DuplicateCustodian {
                name: c.name.clone(),
            });
        }
        folded.push(f);
    }
    for (i, c) in custodians.iter().enumerate() {
        let mine = c.recipient.trim();
        if let Some(first) = custodians[..i]
            .iter()
            .find(|o| o.recipient.trim().eq_ignore_ascii_case(mine))
        {
            return Err(EscrowError::DuplicateRecipient {
                first: first.name.clone(),
                second: c.name.clone(),
            });
        }
    }
    let parsed = custodians
        .iter()
        .map(|c| recipient::parse_recipient(&c.name, &c.recipient))
        .collect::<Result<Vec<_>, _>>()?;

    if out_dir.is_dir() {
        let manifest_path = out_dir.join(MANIFEST_FILE_NAME);
        if manifest_path.symlink_metadata().is_ok() {
            return Err(EscrowError::ManifestExists {
                path: manifest_path,
            });
        }
        for c in custodians {
            let p = out_dir.join(share_file_name(&c.name));
            if p.symlink_metadata().is_ok() {
                return Err(EscrowError::ShareFileExists { path: p });
            }
        }
    }

    // Plugin programs are looked up last, after all cheap checks.
    let prepared = custodians
        .iter()
        .zip(parsed)
        .map(|(c, r)| r.prepare(&c.name))
        .collect::<Result<Vec<_>, _>>()?;

    Ok(prepared)
}

/// Splits `secret`, encrypts and writes the share files, then the manifest.
fn deal(
    rng: &SystemRandom,
    secret: &RecoverySecret,
    threshold: u8,
    custodians: &[Custodian],
    prepared: &[PreparedRecipient],
    out_dir: &Path,
    replaces: Option<&Manifest>,
) -> Result<Manifest, EscrowError> {
    let recovery_recipient = secret.identity()?.to_public().to_string();
    if let Some(old) = replaces
        && recovery_recipient != old.recovery_recipient
    {
        return Err(EscrowError::RecipientMismatch {
            expected: old.recovery_recipient.clone(),
            found: recovery_recipient,
        });
    }
    let mut id = [0u8; 16];
    rng.fill(&mut id)
        .map_err(|_| EscrowError::RandomUnavailable)?;
    let ceremony_id = hex::encode(id);
    let created = super::now_rfc3339()?;
    let n = u8::try_from(custodians.len()).map_err(|_| EscrowError::TooManyCustodians {
        count: custodians.len(),
    })?;

    // The dealer evaluates at x = 1, 2, ...: custodian i (in the order given) gets index i+1.
    // `Share` zeroizes itself on drop.
    let dealt: Vec<Share> = Sharks(threshold)
        .dealer(secret.bytes())
        .take(custodians.len())
        .collect();
    if dealt.len() != custodians.len() {
        return Err(EscrowError::Reconstruction {
            reason: "the share dealer produced too few shares",
        });
    }

    let mut entries = Vec::with_capacity(custodians.len());
    let mut files: Vec<(String, Vec<u8>)> = Vec::with_capacity(custodians.len());
    for ((custodian, recipient), dealt_share) in custodians.iter().zip(prepared).zip(&dealt) {
        let bytes = Zeroizing::new(Vec::from(dealt_share));
        let index = bytes.first().copied().unwrap_or(0);
        if bytes.len() != SHARE_BYTES_LEN || index == 0 {
            return Err(EscrowError::Reconstruction {
                reason: "the share dealer produced a malformed share",
            });
        }
        let text = ShareText::new(
            &ceremony_id,
            &custodian.name,
            threshold,
            n,
            &recovery_recipient,
            &bytes,
        );
        let plaintext = text.to_text()?;
        let ciphertext = recipient.encrypt(plaintext.as_bytes())?;
        entries.push(CustodianEntry {
            name: custodian.name.clone(),
            recipient: custodian.recipient.trim().to_owned(),
            index,
            commitment: manifest::share_commitment(&ceremony_id, index, &bytes),
        });
        files.push((share_file_name(&custodian.name), ciphertext));
    }
    drop(dealt);

    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_owned(),
        ceremony_id,
        created,
        recovery_recipient,
        threshold,
        shares: n,
        custodians: entries,
        replaces: replaces.map(|m| m.ceremony_id.clone()),
    };
    manifest.validate()?;
    let json = manifest.to_json()?;

    fs::create_dir_all(out_dir).map_err(|e| EscrowError::io("create directory", out_dir, e))?;

    let mut written: Vec<PathBuf> = Vec::with_capacity(files.len() + 1);
    let result = (|| {
        for (name, ciphertext) in &files {
            let path = write_new_file(out_dir, name, ciphertext, 0o600, |p| {
                EscrowError::ShareFileExists { path: p }
            })?;
            written.push(path);
        }
        // The manifest last: its presence means the ceremony is complete.
        let path = write_new_file(
            out_dir,
            MANIFEST_FILE_NAME,
            json.as_bytes(),
            0o644,
            |p| EscrowError::ManifestExists { path: p },
        )?;
        written.push(path);
        fsutil::sync_dir_if_supported(out_dir).map_err(EscrowError::from)
    })();
    if let Err(e) = result {
        for p in &written {
            let _ = fs::remove_file(p);
        }
        let _ = fsutil::sync_dir_if_supported(out_dir);
        return Err(e);
    }
    Ok(manifest)
}

/// Writes `bytes` to the new file `dir/name` atomically, never replacing an existing
/// file (`exists` builds the error for one); returns its path.
fn write_new_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
    exists: impl FnOnce(PathBuf) -> EscrowError,
) -> Result<PathBuf, EscrowError> {
    let target = dir.join(name);
    match fsutil::write_new_file_atomically(dir, &target, ".kluis-escrow-", ".tmp", bytes, mode) {
        Ok(()) => Ok(target),
        Err(fsutil::WriteNewError::Exists) => Err(exists(target)),
        Err(fsutil::WriteNewError::Io(e)) => Err(e.into()),
    }
}

/// Verifies every share, refuses duplicates and too few shares, rebuilds the secret and
/// checks it against the manifest's recovery recipient.
pub(crate) fn recover_secret(
    manifest: &Manifest,
    shares: &[ShareText],
) -> Result<RecoverySecret, EscrowError> {
    manifest.validate()?;
    let mut seen = [false; 256];
    let mut distinct: Vec<Share> = Vec::with_capacity(shares.len());
    for s in shares {
        let verified = share::verify_against_valid(manifest, s)?;
        let slot = &mut seen[usize::from(verified.index)];
        if *slot {
            return Err(EscrowError::Duplicate {
                custodian: verified.custodian,
                index: verified.index,
            });
        }
        *slot = true;
        let parsed = Share::try_from(s.share_bytes())
            .map_err(|reason| EscrowError::Reconstruction { reason })?;
        distinct.push(parsed);
    }
    if distinct.len() < usize::from(manifest.threshold) {
        return Err(EscrowError::NotEnoughShares {
            have: distinct.len(),
            need: manifest.threshold,
        });
    }
    let rebuilt = Zeroizing::new(Sharks(manifest.threshold).recover(&distinct).map_err(|_| {
        EscrowError::Reconstruction {
            reason: "the shares do not fit together",
        }
    })?);
    drop(distinct);
    let secret = RecoverySecret::from_slice(&rebuilt)?;
    let found = secret.identity()?.to_public().to_string();
    if found != manifest.recovery_recipient {
        return Err(EscrowError::RecipientMismatch {
            expected: manifest.recovery_recipient.clone(),
            found,
        });
    }
    Ok(secret)
}
