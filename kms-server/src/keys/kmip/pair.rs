//! Key pairs and registered objects on the core: Create Key Pair (RSA 2048, 3072, 4096) and
//! Register (symmetric keys, secret data, RSA private and public keys), with the RSA formats
//! they are read and given in.
//!
//! Each object is a data key of its keyring with a row, exactly as a created symmetric key
//! (see the parent module): a pair is two data keys, two rows and two audit entries in one
//! transaction, each row naming the other with a Link. RSA material is kept in one canonical
//! form, PKCS#1 DER (RSAPrivateKey, RSAPublicKey); the row's `key_format` is the format a Get
//! that names none gives (the one it was registered in; PKCS#1 for a generated pair), and
//! the other formats are converted on Get.
//!
//! The RSA keys are generated and parsed with RustCrypto's `rsa` crate (`ring` cannot
//! generate RSA keys). Kluis never decrypts or signs with them, so RUSTSEC-2023-0071 (the
//! Marvin timing attack on `rsa`'s PKCS#1 v1.5 decryption) does not reach it; see
//! docs/architecture.md, "RSA keys for KMIP".

use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey, EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{RsaPrivateKey, RsaPublicKey};
use zeroize::Zeroizing;

use super::super::registry::WriteOp;
use super::super::{KeyError, KeyManager, WRAPPED_DK_V1, derive_data_key};
use super::{KmipObject, MAX_MATERIAL, Material, NewObject, material_aad, object_type, shown, state, uid_of};
use crate::audit::AuditEvent;
use crate::auth::{Action, Authorized};
use crate::secret::{aes_gcm_open, aes_gcm_seal};

/// Key Format Types (KMIP 1.4 section 9.1.3.2.3) of the objects here.
pub mod key_format {
    pub const RAW: u32 = 0x01;
    pub const OPAQUE: u32 = 0x02;
    pub const PKCS_1: u32 = 0x03;
    pub const PKCS_8: u32 = 0x04;
    pub const X_509: u32 = 0x05;
    pub const TRANSPARENT_SYMMETRIC_KEY: u32 = 0x07;
}

/// Link Types (section 9.1.3.2.20) a pair's objects carry.
pub mod link_type {
    pub const PUBLIC_KEY_LINK: u32 = 0x102;
    pub const PRIVATE_KEY_LINK: u32 = 0x103;
}

/// Secret Data Types (section 9.1.3.2.9).
pub mod secret_data_type {
    pub const PASSWORD: u32 = 0x01;
    pub const SEED: u32 = 0x02;
}

/// Cryptographic Algorithm RSA (section 9.1.3.2.13).
pub const RSA: u32 = 0x04;
/// The RSA modulus sizes Kluis makes and registers.
pub const RSA_BITS: [usize; 3] = [2048, 3072, 4096];

/// Why key material cannot be taken or given in a format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The object type is not kept or given in this Key Format Type.
    #[error("{0}")]
    Unsupported(String),
    /// The bytes are not what their format says, or not a key Kluis keeps.
    #[error("{0}")]
    Invalid(String),
}

fn format_name(f: u32) -> &'static str {
    match f {
        key_format::RAW => "Raw",
        key_format::OPAQUE => "Opaque",
        key_format::PKCS_1 => "PKCS#1",
        key_format::PKCS_8 => "PKCS#8",
        key_format::X_509 => "X.509",
        key_format::TRANSPARENT_SYMMETRIC_KEY => "Transparent Symmetric Key",
        _ => "unknown",
    }
}

/// A parsed RSA private key's size, refused unless it is one Kluis keeps: two primes, the
/// components consistent, a modulus of 2048, 3072 or 4096 bits.
fn check_private(key: &RsaPrivateKey) -> Result<usize, FormatError> {
    key.validate().map_err(|e| FormatError::Invalid(format!("the RSA private key is not consistent: {e}")))?;
    if key.primes().len() != 2 {
        return Err(FormatError::Invalid("the RSA private key has more than two primes; Kluis keeps two-prime keys".into()));
    }
    check_bits(key.n().bits())
}

fn check_bits(bits: usize) -> Result<usize, FormatError> {
    if RSA_BITS.contains(&bits) {
        Ok(bits)
    } else {
        Err(FormatError::Invalid(format!("the RSA key is RSA-{bits}; Kluis keeps RSA-2048, RSA-3072 and RSA-4096 keys")))
    }
}

/// A private key given in `format` (PKCS#1 or PKCS#8 DER) as the canonical PKCS#1 DER, and
/// its modulus size in bits.
pub fn private_from(format: u32, bytes: &[u8]) -> Result<(Material, usize), FormatError> {
    let key = match format {
        key_format::PKCS_1 => RsaPrivateKey::from_pkcs1_der(bytes)
            .map_err(|e| FormatError::Invalid(format!("the Key Material is not a PKCS#1 RSAPrivateKey in DER: {e}")))?,
        key_format::PKCS_8 => RsaPrivateKey::from_pkcs8_der(bytes)
            .map_err(|e| FormatError::Invalid(format!("the Key Material is not a PKCS#8 PrivateKeyInfo of an RSA key in DER: {e}")))?,
        other => {
            return Err(FormatError::Unsupported(format!(
                "Key Format Type {other} ({}): an RSA private key is taken and given as PKCS#1 (3) or PKCS#8 (4)",
                format_name(other)
            )));
        }
    };
    let bits = check_private(&key)?;
    Ok((private_pkcs1(&key)?, bits))
}

fn private_pkcs1(key: &RsaPrivateKey) -> Result<Material, FormatError> {
    let der = key.to_pkcs1_der().map_err(|e| FormatError::Invalid(format!("the RSA private key cannot be encoded: {e}")))?;
    Ok(Material::new(Zeroizing::new(der.as_bytes().to_vec())))
}

/// A public key given in `format` (PKCS#1 RSAPublicKey or X.509 SubjectPublicKeyInfo, DER)
/// as the canonical PKCS#1 DER, and its modulus size.
pub fn public_from(format: u32, bytes: &[u8]) -> Result<(Vec<u8>, usize), FormatError> {
    let key = match format {
        key_format::PKCS_1 => RsaPublicKey::from_pkcs1_der(bytes)
            .map_err(|e| FormatError::Invalid(format!("the Key Material is not a PKCS#1 RSAPublicKey in DER: {e}")))?,
        key_format::X_509 => RsaPublicKey::from_public_key_der(bytes)
            .map_err(|e| FormatError::Invalid(format!("the Key Material is not an X.509 SubjectPublicKeyInfo of an RSA key in DER: {e}")))?,
        other => {
            return Err(FormatError::Unsupported(format!(
                "Key Format Type {other} ({}): an RSA public key is taken and given as PKCS#1 (3) or X.509 (5)",
                format_name(other)
            )));
        }
    };
    let bits = check_bits(key.n().bits())?;
    let der = key.to_pkcs1_der().map_err(|e| FormatError::Invalid(format!("the RSA public key cannot be encoded: {e}")))?;
    Ok((der.as_bytes().to_vec(), bits))
}

/// The canonical private key (PKCS#1 DER) in `format`.
pub fn private_as(canonical: &Material, format: u32) -> Result<Material, FormatError> {
    match format {
        key_format::PKCS_1 => Ok(Material::new(Zeroizing::new(canonical.expose().to_vec()))),
        key_format::PKCS_8 => {
            let key = RsaPrivateKey::from_pkcs1_der(canonical.expose())
                .map_err(|e| FormatError::Invalid(format!("the stored RSA private key does not parse: {e}")))?;
            let der = key.to_pkcs8_der().map_err(|e| FormatError::Invalid(format!("the RSA private key cannot be encoded: {e}")))?;
            Ok(Material::new(Zeroizing::new(der.as_bytes().to_vec())))
        }
        other => Err(FormatError::Unsupported(format!(
            "Key Format Type {other} ({}): an RSA private key is given as PKCS#1 (3) or PKCS#8 (4)",
            format_name(other)
        ))),
    }
}

/// The canonical public key (PKCS#1 DER) in `format`.
pub fn public_as(canonical: &[u8], format: u32) -> Result<Vec<u8>, FormatError> {
    match format {
        key_format::PKCS_1 => Ok(canonical.to_vec()),
        key_format::X_509 => {
            let key = RsaPublicKey::from_pkcs1_der(canonical)
                .map_err(|e| FormatError::Invalid(format!("the stored RSA public key does not parse: {e}")))?;
            let der = key.to_public_key_der().map_err(|e| FormatError::Invalid(format!("the RSA public key cannot be encoded: {e}")))?;
            Ok(der.as_bytes().to_vec())
        }
        other => Err(FormatError::Unsupported(format!(
            "Key Format Type {other} ({}): an RSA public key is given as PKCS#1 (3) or X.509 (5)",
            format_name(other)
        ))),
    }
}

/// A new RSA key pair of `bits` (2048, 3072 or 4096): the private key and the public key,
/// each PKCS#1 DER. Takes from a tenth of a second to seconds (docs/architecture.md): call
/// it off the async threads.
pub fn generate_rsa(bits: usize) -> Result<(Material, Vec<u8>), KeyError> {
    if !RSA_BITS.contains(&bits) {
        return Err(KeyError::InvalidArgument { field: "Cryptographic Length", reason: "2048, 3072 or 4096 for RSA" });
    }
    let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(|_| KeyError::Rng)?;
    let private = private_pkcs1(&key).map_err(|_| KeyError::Internal { what: "encoding a new RSA private key" })?;
    let public = key
        .to_public_key()
        .to_pkcs1_der()
        .map_err(|_| KeyError::Internal { what: "encoding a new RSA public key" })?
        .as_bytes()
        .to_vec();
    Ok((private, public))
}

/// One object to make: what the client asked, its material, and the rest of its row.
pub struct Made {
    pub new: NewObject,
    pub material: Material,
    pub secret_data_type: Option<u32>,
    pub audit: AuditEvent,
}

impl KeyManager {
    /// Create Key Pair: the private and the public key as two objects of `keyring`, each a
    /// data key of its own with its material sealed under it, linked to each other, written
    /// with both audit entries in one transaction. Needs `sealer`. Returns the private and
    /// the public key's Unique Identifiers.
    pub async fn kmip_create_pair(&self, auth: &Authorized, keyring: &str, private: Made, public: Made) -> Result<(String, String), KeyError> {
        Self::check(auth, Action::GenerateDataKey, Some(keyring))?;
        let (private_id, mut private_ops, mut private_row, private_material) = self.kmip_prepare(auth, keyring, private).await?;
        let (public_id, mut public_ops, mut public_row, public_material) = self.kmip_prepare(auth, keyring, public).await?;
        private_row.links.push((link_type::PUBLIC_KEY_LINK, uid_of(&public_id)));
        public_row.links.push((link_type::PRIVATE_KEY_LINK, uid_of(&private_id)));
        let put = |id, object| WriteOp::PutKmipObject { id, object: Box::new(object), previous: None };
        let (private_put, public_put) = (put(private_id, private_row), put(public_id, public_row));
        // Both keys are escrowed before either commits (as a Create is); if the second
        // cannot be, the first's files go again and nothing is made.
        let private_escrow = self.kmip_escrow_before(&private_put, Some(&private_material)).await?;
        let public_escrow = match self.kmip_escrow_before(&public_put, Some(&public_material)).await {
            Ok(w) => w,
            Err(e) => return self.kmip_escrow_after(private_escrow, Err(e)).await,
        };
        let mut ops = Vec::with_capacity(6);
        ops.push(private_ops.remove(0));
        ops.push(private_put);
        ops.append(&mut private_ops);
        ops.push(public_ops.remove(0));
        ops.push(public_put);
        ops.append(&mut public_ops);
        let r = self.store.write(WriteOp::Atomic(ops)).await.map_err(KeyError::from);
        let r = self.kmip_escrow_after(private_escrow, r).await;
        self.kmip_escrow_after(public_escrow, r).await?;
        Ok((uid_of(&private_id), uid_of(&public_id)))
    }

    /// Register: an object of `keyring` holding the client's material (already checked and
    /// in its canonical form), its row and audit entry in one transaction. Needs `sealer`.
    /// The object starts Pre-Active.
    pub async fn kmip_register(&self, auth: &Authorized, keyring: &str, made: Made) -> Result<String, KeyError> {
        Self::check(auth, Action::GenerateDataKey, Some(keyring))?;
        let (id, mut ops, row, material) = self.kmip_prepare(auth, keyring, made).await?;
        ops.insert(1, WriteOp::PutKmipObject { id, object: Box::new(row), previous: None });
        let op = WriteOp::Atomic(ops);
        // Escrowed before it commits, as a Create is.
        let escrowed = self.kmip_escrow_before(&op, Some(&material)).await?;
        self.kmip_escrow_after(escrowed, self.store.write(op).await.map_err(KeyError::from)).await?;
        Ok(uid_of(&id))
    }

    /// A data key issued for an object and its row, the material sealed under it: the
    /// writes (the data key, then the audit entry) and the row, for the caller to link and
    /// put between them, and the material (for the escrow bundle).
    async fn kmip_prepare(&self, auth: &Authorized, keyring: &str, made: Made) -> Result<([u8; 16], Vec<WriteOp>, KmipObject, Material), KeyError> {
        let Made { new, material, secret_data_type, mut audit } = made;
        new.validate()?;
        if material.expose().is_empty() || material.expose().len() > MAX_MATERIAL {
            return Err(KeyError::InvalidArgument { field: "Key Material", reason: "1 to 8192 bytes" });
        }
        let mut labels = vec![("kmip.object_type".to_owned(), new.object_type.to_string())];
        if let Some(n) = new.names.first() {
            labels.push(("kmip.name".to_owned(), n.clone()));
        }
        labels.sort();
        let mut issue = self.issue(auth, keyring, "kmip", labels).await?;
        // As for a created object: the escrow stanza's rules do not count it as escrowed.
        issue.record.escrowed = false;
        let id = issue.id;
        let sealed = aes_gcm_seal(&issue.data_key, &self.rng, &material_aad(&id), material.expose()).map_err(|_| KeyError::Rng)?;
        let row = KmipObject {
            object_type: new.object_type,
            keyring: keyring.to_owned(),
            algorithm: new.algorithm,
            length: new.length,
            usage_mask: new.usage_mask,
            names: new.names,
            app_info: new.app_info,
            state: state::PRE_ACTIVE,
            initial_date: issue.record.created,
            activation_date: None,
            deactivation_date: None,
            compromise_date: None,
            compromise_occurrence: None,
            destroy_date: None,
            revocation: None,
            created_by: auth.principal().name().to_owned(),
            key_format: new.key_format,
            wrapped: issue.wrapped,
            sealed,
            links: Vec::new(),
            secret_data_type,
        };
        audit.key_id = Some(uid_of(&id));
        let ops = vec![WriteOp::IssueDataKey { id, record: issue.record, secret: Some(issue.secret) }, WriteOp::Audit(audit)];
        Ok((id, ops, row, material))
    }

    /// A public key's object and material, for a caller with `sealer` or `restorer` on its
    /// keyring: a public key is no secret, but it is opened with every check of an unwrap
    /// (destroyed, retired version, keyring destroyed) as any material is.
    pub async fn kmip_get_public(&self, auth: &Authorized, uid: &str) -> Result<(KmipObject, Vec<u8>), KeyError> {
        // A Destroy made on another replica is seen.
        self.sync().await?;
        let (id, object) = self.kmip_object(uid)?;
        if !(auth.covers(Action::GenerateDataKey, Some(&object.keyring)) || auth.covers(Action::UnwrapDataKey, Some(&object.keyring))) {
            return Err(KeyError::NotCovered);
        }
        if object.object_type != object_type::PUBLIC_KEY {
            return Err(KeyError::InvalidArgument { field: "Unique Identifier", reason: "not a public key" });
        }
        self.refuse_destroyed_object(&id, &object).await?;
        let (_, _, opened) = self.unwrap_inner(&uid_of(&id), &object.keyring, &object.wrapped).await?;
        let data_key = if opened.format == WRAPPED_DK_V1 {
            opened.key
        } else {
            let secret = self.store.key_secret(&id)?.ok_or_else(|| KeyError::KeyMaterialErased { key_id: uid_of(&id) })?;
            derive_data_key(&opened.key, &secret, &id)?
        };
        let material = aes_gcm_open(&data_key, &material_aad(&id), &object.sealed).map_err(|_| KeyError::UnwrapFailed { key_id: shown(uid) })?;
        Ok((object, material.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_converts_between_its_formats_and_back() {
        let (private, public) = generate_rsa(2048).unwrap();
        let pkcs8 = private_as(&private, key_format::PKCS_8).unwrap();
        let (back, bits) = private_from(key_format::PKCS_8, pkcs8.expose()).unwrap();
        assert_eq!(bits, 2048);
        assert_eq!(back.expose(), private.expose());
        let spki = public_as(&public, key_format::X_509).unwrap();
        let (back, bits) = public_from(key_format::X_509, &spki).unwrap();
        assert_eq!((back, bits), (public.clone(), 2048));
        // The public key is the private key's.
        let from_private = RsaPrivateKey::from_pkcs1_der(private.expose()).unwrap().to_public_key();
        assert_eq!(from_private, RsaPublicKey::from_pkcs1_der(&public).unwrap());
        assert!(matches!(private_as(&private, key_format::X_509), Err(FormatError::Unsupported(_))));
        assert!(matches!(public_as(&public, key_format::PKCS_8), Err(FormatError::Unsupported(_))));
    }

    #[test]
    fn small_and_malformed_keys_are_refused_by_what_is_wrong() {
        let small = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let der = small.to_pkcs1_der().unwrap();
        let Err(FormatError::Invalid(m)) = private_from(key_format::PKCS_1, der.as_bytes()) else { panic!("RSA-1024 taken") };
        assert!(m.contains("RSA-1024"), "{m}");
        let pub_der = small.to_public_key().to_public_key_der().unwrap();
        let Err(FormatError::Invalid(m)) = public_from(key_format::X_509, pub_der.as_bytes()) else { panic!("RSA-1024 taken") };
        assert!(m.contains("RSA-1024"), "{m}");
        let Err(FormatError::Invalid(m)) = private_from(key_format::PKCS_1, b"\x30\x03\x02\x01\x00") else { panic!("garbage taken") };
        assert!(m.contains("PKCS#1"), "{m}");
        assert!(matches!(private_from(key_format::RAW, der.as_bytes()), Err(FormatError::Unsupported(_))));
        assert!(generate_rsa(1024).is_err());
    }
}
