//! Custodian recipients: parsing, plugin resolution and encrypting a share file to one.

use std::io::Write;

use age::secrecy::SecretString;
use zeroize::Zeroizing;

use super::error::EscrowError;

/// A parsed custodian recipient.
pub(crate) enum ShareRecipient {
    /// A native X25519 recipient, `age1...`.
    X25519(age::x25519::Recipient),
    /// A native P-256 tagged recipient (hardware keys), `age1tag1...`.
    Tag(age::tag::Recipient),
    /// A native hybrid post-quantum tagged recipient, `age1tagpq1...`.
    TagPq(Box<age::tagpq::Recipient>),
    /// A plugin recipient, `age1NAME1...`; encrypting needs the program `age-plugin-NAME`.
    Plugin(age::plugin::Recipient),
}

/// Parses a recipient string; errors name the custodian.
pub(crate) fn parse_recipient(custodian: &str, s: &str) -> Result<ShareRecipient, EscrowError> {
    let s = s.trim();
    if s.starts_with("ssh-") || s.starts_with("ecdsa-") || s.starts_with("sk-ssh-") {
        return Err(EscrowError::SshRecipientUnsupported {
            custodian: custodian.to_owned(),
        });
    }
    // The native types first: the plugin syntax (`age1NAME1...`) would also match them.
    let x25519_err = match s.parse::<age::x25519::Recipient>() {
        Ok(r) => return Ok(ShareRecipient::X25519(r)),
        Err(e) => e,
    };
    if let Ok(r) = s.parse::<age::tagpq::Recipient>() {
        return Ok(ShareRecipient::TagPq(Box::new(r)));
    }
    if let Ok(r) = s.parse::<age::tag::Recipient>() {
        return Ok(ShareRecipient::Tag(r));
    }
    if s.starts_with("age1tag1") || s.starts_with("age1tagpq1") {
        return Err(EscrowError::BadRecipient {
            custodian: custodian.to_owned(),
            reason: "damaged tag recipient",
        });
    }
    match s.parse::<age::plugin::Recipient>() {
        Ok(r) => Ok(ShareRecipient::Plugin(r)),
        Err(plugin_err) => Err(EscrowError::BadRecipient {
            custodian: custodian.to_owned(),
            // A string with the plain `age1` prefix was meant to be an X25519 recipient.
            reason: if looks_like_plain_age(s) {
                x25519_err
            } else {
                plugin_err
            },
        }),
    }
}

/// `age1` followed directly by the bech32 data part, i.e. meant as an X25519 recipient.
fn looks_like_plain_age(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    // The separator of bech32 is the last '1'; for `age1...` it is the one after "age".
    lower.starts_with("age1") && lower.rfind('1') == Some(3)
}

/// Callbacks for plugins: messages ("touch your YubiKey") go to standard error; questions
/// cannot be answered (this is not an interactive terminal program).
#[derive(Clone, Copy)]
pub(crate) struct StderrCallbacks;

impl age::Callbacks for StderrCallbacks {
    fn display_message(&self, message: &str) {
        eprintln!("{message}");
    }

    fn confirm(&self, _message: &str, _yes: &str, _no: Option<&str>) -> Option<bool> {
        None
    }

    fn request_public_string(&self, _description: &str) -> Option<String> {
        None
    }

    fn request_passphrase(&self, _description: &str) -> Option<SecretString> {
        None
    }
}

/// A recipient ready to encrypt to (plugin program found).
pub(crate) struct PreparedRecipient {
    custodian: String,
    inner: Box<dyn age::Recipient + Send>,
}

impl ShareRecipient {
    /// Resolves plugins (finds the `age-plugin-NAME` program) so that a missing plugin is
    /// reported before anything is generated or written.
    pub(crate) fn prepare(self, custodian: &str) -> Result<PreparedRecipient, EscrowError> {
        let inner: Box<dyn age::Recipient + Send> = match self {
            ShareRecipient::X25519(r) => Box::new(r),
            ShareRecipient::Tag(r) => Box::new(r),
            ShareRecipient::TagPq(r) => r,
            ShareRecipient::Plugin(r) => {
                let plugin = r.plugin().to_owned();
                let resolved = age::plugin::RecipientPluginV1::new(
                    &plugin,
                    std::slice::from_ref(&r),
                    &[],
                    StderrCallbacks,
                )
                .map_err(|e| match e {
                    age::plugin::ResolveError::MissingPlugin { binary_name } => {
                        EscrowError::PluginMissing {
                            custodian: custodian.to_owned(),
                            binary: binary_name,
                        }
                    }
                    other => EscrowError::PluginResolve {
                        custodian: custodian.to_owned(),
                        source: Box::new(other),
                    },
                })?;
                Box::new(resolved)
            }
        };
        Ok(PreparedRecipient {
            custodian: custodian.to_owned(),
            inner,
        })
    }
}

impl PreparedRecipient {
    /// Encrypts `plaintext` to this recipient as a binary age v1 file.
    pub(crate) fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, EscrowError> {
        let fail = |source: age::EncryptError| EscrowError::EncryptShare {
            custodian: self.custodian.clone(),
            source: Box::new(source),
        };
        let encryptor = age::Encryptor::with_recipients(std::iter::once(
            self.inner.as_ref() as &dyn age::Recipient
        ))
        .map_err(fail)?;
        let mut out = Vec::with_capacity(plaintext.len() + 512);
        let mut writer = encryptor
            .wrap_output(&mut out)
            .map_err(|e| fail(age::EncryptError::Io(e)))?;
        writer
            .write_all(plaintext)
            .map_err(|e| fail(age::EncryptError::Io(e)))?;
        writer
            .finish()
            .map_err(|e| fail(age::EncryptError::Io(e)))?;
        Ok(out)
    }
}

/// Decrypts an age file (binary or armored) with the given identities into a zeroized buffer of at most
/// `limit` bytes. `Ok(None)` if the plaintext is longer than `limit`.
pub(crate) fn decrypt_limited(
    ciphertext: &[u8],
    identities: &[Box<dyn age::Identity + Send + Sync>],
    limit: usize,
) -> Result<Option<Zeroizing<Vec<u8>>>, EscrowError> {
    use std::io::Read;

    // Binary or ASCII-armored (`age -a`) files alike.
    let decryptor = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(ciphertext))
        .map_err(|source| EscrowError::ShareDecrypt {
            source: Box::new(source),
        })?;
    let reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|source| match source {
            age::DecryptError::NoMatchingKeys => EscrowError::NoMatchingIdentity,
            source @ (age::DecryptError::Plugin(_) | age::DecryptError::PluginResolve(_)) => {
                EscrowError::PluginDecrypt {
                    source: Box::new(source),
                }
            }
            source => EscrowError::ShareDecrypt {
                source: Box::new(source),
            },
        })?;
    // Allocated once, large enough never to grow (growing would leave copies behind).
    let mut buf = Zeroizing::new(Vec::with_capacity(limit + 2));
    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(limit_u64)
        .read_to_end(&mut buf)
        .map_err(|e| EscrowError::ShareDecrypt {
            source: Box::new(age::DecryptError::Io(e)),
        })?;
    if buf.len() > limit {
        return Ok(None);
    }
    Ok(Some(buf))
}
