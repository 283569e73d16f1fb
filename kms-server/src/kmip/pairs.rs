//! Create Key Pair (RSA), Register (symmetric keys, secret data, RSA private and public keys)
//! and Get of the objects that are not symmetric keys. The core is `keys::kmip::pair`; this
//! reads the payloads, checks what a client gives before anything is made, and answers.
//!
//! Roles: making and registering need `sealer` on the client's keyring; Get of a public key
//! needs `sealer` or `restorer` (it is no secret); Get of a private key or of secret data
//! needs `restorer`. Every made object, every Get and every refusal of a role is audited.

use kluis_kmip::message::{Failure, ResultReason, enumeration, int, only, opt, req};
use kluis_kmip::tag;
use kluis_kmip::ttlv::{Item, Tag, Value};

use super::{Kmip, invalid_field, payload, read_template};
use crate::auth::{Action, Principal};
use crate::keys::kmip::pair::{self, FormatError, Made, RSA, key_format, secret_data_type};
use crate::keys::kmip::{Material, NewObject, object_type};
use crate::model::Outcome;

/// Cryptographic Algorithm AES.
const AES: u32 = 0x03;
/// The object structures of a Register payload by Object Type (KMIP 1.4 section 2.2).
const CERTIFICATE: Tag = Tag::new(0x420013);
const SPLIT_KEY: Tag = Tag::new(0x420089);
const TEMPLATE: Tag = Tag::new(0x420090);
const OPAQUE_OBJECT: Tag = Tag::new(0x420058);
const PGP_KEY: Tag = Tag::new(0x42011E);

fn format_failure(e: FormatError) -> Failure {
    match e {
        FormatError::Unsupported(m) => Failure::new(ResultReason::KeyFormatTypeNotSupported, m),
        FormatError::Invalid(m) => Failure::new(ResultReason::InvalidField, m),
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(ResultReason::InvalidField, message)
}

impl Kmip {
    /// Create Key Pair (KMIP 1.4 section 4.2): an RSA private and public key, linked to each
    /// other. The Common Template-Attribute applies to both; the Private and Public Key
    /// Template-Attributes to one each and take precedence. The ID Placeholder becomes the
    /// private key's identifier, as the specification says.
    pub(super) async fn create_key_pair(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        only(p, &[tag::COMMON_TEMPLATE_ATTRIBUTE, tag::PRIVATE_KEY_TEMPLATE_ATTRIBUTE, tag::PUBLIC_KEY_TEMPLATE_ATTRIBUTE]).map_err(invalid_field)?;
        let mut common = NewObject::default();
        if let Some(t) = opt(p, tag::COMMON_TEMPLATE_ATTRIBUTE).map_err(invalid_field)? {
            read_template(t, &mut common)?;
        }
        let mut private = NewObject { object_type: object_type::PRIVATE_KEY, key_format: key_format::PKCS_1, ..common.clone() };
        let mut public = NewObject { object_type: object_type::PUBLIC_KEY, key_format: key_format::PKCS_1, ..common };
        if let Some(t) = opt(p, tag::PRIVATE_KEY_TEMPLATE_ATTRIBUTE).map_err(invalid_field)? {
            read_template(t, &mut private)?;
        }
        if let Some(t) = opt(p, tag::PUBLIC_KEY_TEMPLATE_ATTRIBUTE).map_err(invalid_field)? {
            read_template(t, &mut public)?;
        }
        for (which, o) in [("private", &private), ("public", &public)] {
            if o.algorithm != Some(RSA) {
                return Err(invalid(format!("Cryptographic Algorithm of the {which} key must be RSA (4): Create Key Pair makes RSA keys")));
            }
        }
        let bits = match (private.length, public.length) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(format!("Cryptographic Length differs between the private ({a}) and the public key ({b})")));
            }
            (Some(l @ (2048 | 3072 | 4096)), _) => l,
            (Some(l), _) => return Err(invalid(format!("Cryptographic Length {l}: an RSA key pair is 2048, 3072 or 4096 bits"))),
            (None, _) => return Err(invalid("Cryptographic Length is missing: give 2048, 3072 or 4096 for an RSA key pair")),
        };
        let keyring = self.keyring_for(who)?;
        let auth = self.authorize(who, Action::GenerateDataKey, "KmipCreateKeyPair", &keyring, None).await?;
        let generated = tokio::task::spawn_blocking(move || pair::generate_rsa(usize::try_from(bits).unwrap_or(0))).await;
        let (private_key, public_key) = match generated {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => return Err(self.failed(who, "KmipCreateKeyPair", Some(&keyring), None, e).await),
            Err(e) => return Err(self.failed(who, "KmipCreateKeyPair", Some(&keyring), None, e.into()).await),
        };
        let event = |what: &str| self.keys.event(who.name(), "KmipCreateKeyPair", Some(&keyring), None, Outcome::ok_with(format!("RSA-{bits} {what} key")));
        let private = Made { new: private, material: private_key, secret_data_type: None, audit: event("private") };
        let public = Made { new: public, material: Material::new(public_key.into()), secret_data_type: None, audit: event("public") };
        let (private_uid, public_uid) = match self.keys.kmip_create_pair(&auth, &keyring, private, public).await {
            Ok(uids) => uids,
            Err(e) => return Err(self.failed(who, "KmipCreateKeyPair", Some(&keyring), None, e).await),
        };
        *placeholder = Some(private_uid.clone());
        Ok(payload(vec![Item::text(tag::PRIVATE_KEY_UNIQUE_IDENTIFIER, private_uid), Item::text(tag::PUBLIC_KEY_UNIQUE_IDENTIFIER, public_uid)]))
    }

    /// Register (section 4.3): a Symmetric Key (AES-128 or AES-256, Raw or Transparent
    /// Symmetric Key), Secret Data (Password or Seed, Opaque), an RSA Private Key (PKCS#1 or
    /// PKCS#8) or an RSA Public Key (PKCS#1 or X.509), checked before anything is made.
    /// The object starts Pre-Active like a created one.
    pub(super) async fn register(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        let kind = enumeration(req(p, tag::OBJECT_TYPE).map_err(invalid_field)?).map_err(invalid_field)?;
        let object_tag = match kind {
            object_type::SYMMETRIC_KEY => tag::SYMMETRIC_KEY,
            object_type::PUBLIC_KEY => tag::PUBLIC_KEY,
            object_type::PRIVATE_KEY => tag::PRIVATE_KEY,
            object_type::SECRET_DATA => tag::SECRET_DATA,
            other => {
                return Err(invalid(format!(
                    "Register takes Symmetric Key (2), Public Key (3), Private Key (4) and Secret Data (7), not Object Type {other}"
                )));
            }
        };
        only(p, &[tag::OBJECT_TYPE, tag::TEMPLATE_ATTRIBUTE, tag::SYMMETRIC_KEY, tag::PUBLIC_KEY, tag::PRIVATE_KEY, tag::SECRET_DATA, CERTIFICATE, SPLIT_KEY, TEMPLATE, OPAQUE_OBJECT, PGP_KEY])
            .map_err(invalid_field)?;
        if let Some(c) = p.children().unwrap_or(&[]).iter().find(|c| c.tag != tag::OBJECT_TYPE && c.tag != tag::TEMPLATE_ATTRIBUTE && c.tag != object_tag) {
            return Err(invalid(format!("{} does not match Object Type {kind}", c.tag)));
        }
        let object = req(p, object_tag).map_err(invalid_field)?;
        let mut new = NewObject { object_type: kind, ..NewObject::default() };
        if let Some(t) = opt(p, tag::TEMPLATE_ATTRIBUTE).map_err(invalid_field)? {
            read_template(t, &mut new)?;
        }
        let mut secret_type = None;
        if kind == object_type::SECRET_DATA {
            only(object, &[tag::SECRET_DATA_TYPE, tag::KEY_BLOCK]).map_err(invalid_field)?;
            let t = enumeration(req(object, tag::SECRET_DATA_TYPE).map_err(invalid_field)?).map_err(invalid_field)?;
            if t != secret_data_type::PASSWORD && t != secret_data_type::SEED {
                return Err(invalid(format!("Secret Data Type {t}: Kluis keeps Password (1) and Seed (2)")));
            }
            secret_type = Some(t);
        } else {
            only(object, &[tag::KEY_BLOCK]).map_err(invalid_field)?;
        }
        let block = KeyBlock::read(req(object, tag::KEY_BLOCK).map_err(invalid_field)?)?;
        // The Key Block's algorithm and length and the template's must agree.
        if let (Some(a), Some(b)) = (block.algorithm, new.algorithm)
            && a != b
        {
            return Err(invalid(format!("Cryptographic Algorithm is {a} in the Key Block but {b} in the Template-Attribute")));
        }
        if let (Some(a), Some(b)) = (block.length, new.length)
            && a != b
        {
            return Err(invalid(format!("Cryptographic Length is {a} in the Key Block but {b} in the Template-Attribute")));
        }
        new.algorithm = new.algorithm.or(block.algorithm);
        new.length = new.length.or(block.length);
        new.key_format = block.format;
        let material = match kind {
            object_type::SYMMETRIC_KEY => {
                if block.format != key_format::RAW && block.format != key_format::TRANSPARENT_SYMMETRIC_KEY {
                    return Err(Failure::new(
                        ResultReason::KeyFormatTypeNotSupported,
                        format!("Key Format Type {}: a symmetric key is registered as Raw (1) or Transparent Symmetric Key (7)", block.format),
                    ));
                }
                if new.algorithm != Some(AES) {
                    return Err(invalid("Cryptographic Algorithm of a registered symmetric key must be AES (3)"));
                }
                let bits = i32::try_from(block.material.len() * 8).unwrap_or(i32::MAX);
                match new.length {
                    Some(l) if l != bits => {
                        return Err(invalid(format!("the key is {} bytes ({bits} bits) but its Cryptographic Length says {l}", block.material.len())));
                    }
                    _ if bits != 128 && bits != 256 => return Err(invalid(format!("an AES key is 128 or 256 bits, not {bits}"))),
                    _ => new.length = Some(bits),
                }
                Material::new(block.material)
            }
            object_type::SECRET_DATA => {
                if block.format != key_format::OPAQUE {
                    return Err(Failure::new(ResultReason::KeyFormatTypeNotSupported, format!("Key Format Type {}: Secret Data is registered as Opaque (2)", block.format)));
                }
                if new.algorithm.is_some() || new.length.is_some() {
                    return Err(invalid("Secret Data has no Cryptographic Algorithm or Length"));
                }
                Material::new(block.material)
            }
            _ => {
                if new.algorithm.is_some_and(|a| a != RSA) {
                    return Err(invalid("Cryptographic Algorithm of a registered private or public key must be RSA (4)"));
                }
                let (material, bits) = if kind == object_type::PRIVATE_KEY {
                    pair::private_from(block.format, &block.material).map_err(format_failure)?
                } else {
                    let (der, bits) = pair::public_from(block.format, &block.material).map_err(format_failure)?;
                    (Material::new(der.into()), bits)
                };
                let bits = i32::try_from(bits).unwrap_or(i32::MAX);
                if let Some(l) = new.length
                    && l != bits
                {
                    return Err(invalid(format!("the key is RSA-{bits} but its Cryptographic Length says {l}")));
                }
                new.algorithm = Some(RSA);
                new.length = Some(bits);
                material
            }
        };
        let keyring = self.keyring_for(who)?;
        let auth = self.authorize(who, Action::GenerateDataKey, "KmipRegister", &keyring, None).await?;
        let audit = self.keys.event(who.name(), "KmipRegister", Some(&keyring), None, Outcome::ok());
        let made = Made { new, material, secret_data_type: secret_type, audit };
        let uid = match self.keys.kmip_register(&auth, &keyring, made).await {
            Ok(uid) => uid,
            Err(e) => return Err(self.failed(who, "KmipRegister", Some(&keyring), None, e).await),
        };
        *placeholder = Some(uid.clone());
        Ok(payload(vec![Item::text(tag::UNIQUE_IDENTIFIER, uid)]))
    }

    /// Get of an object that is not a symmetric key (None: a symmetric key, or no such
    /// object, which `get` answers as before). Private keys in PKCS#1 (3) or PKCS#8 (4),
    /// public keys in PKCS#1 (3) or X.509 (5), secret data Opaque (2); without a Key Format
    /// Type, in the format the object was registered in (PKCS#1 for a created pair).
    pub(super) async fn get_other(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Option<Result<Item, Failure>> {
        let uid = Self::uid(p, placeholder).ok()?;
        let (_, object) = self.keys.kmip_object(&uid).ok()?;
        if object.object_type == object_type::SYMMETRIC_KEY {
            return None;
        }
        Some(self.get_other_object(who, p, uid, object, placeholder).await)
    }

    async fn get_other_object(
        &self,
        who: &Principal,
        p: &Item,
        uid: String,
        object: crate::keys::kmip::KmipObject,
        placeholder: &mut Option<String>,
    ) -> Result<Item, Failure> {
        only(p, &[tag::UNIQUE_IDENTIFIER, tag::KEY_FORMAT_TYPE, tag::KEY_COMPRESSION_TYPE, tag::KEY_WRAPPING_SPECIFICATION]).map_err(invalid_field)?;
        if opt(p, tag::KEY_WRAPPING_SPECIFICATION).map_err(invalid_field)?.is_some() {
            return Err(Failure::new(ResultReason::FeatureNotSupported, "Key Wrapping Specification: Kluis returns keys unwrapped, over the mutual TLS connection"));
        }
        let format = opt(p, tag::KEY_FORMAT_TYPE).map_err(invalid_field)?.map(enumeration).transpose().map_err(invalid_field)?.unwrap_or(object.key_format);
        let keyring = object.keyring.clone();
        let kind = object.object_type;
        // Who has no role on the keyring learns nothing of the object (not even its type,
        // which the format refusal names): refused and audited first.
        if !self.policy.may_use(who, &keyring) {
            self.authorize(who, Action::UnwrapDataKey, "KmipGet", &keyring, Some(&uid)).await?;
        }
        // The format is checked before the key is opened: a wrong one is refused by name.
        let (what, served): (&str, &[u32]) = match kind {
            object_type::PRIVATE_KEY => ("an RSA private key is given as PKCS#1 (3) or PKCS#8 (4)", &[key_format::PKCS_1, key_format::PKCS_8]),
            object_type::PUBLIC_KEY => ("an RSA public key is given as PKCS#1 (3) or X.509 (5)", &[key_format::PKCS_1, key_format::X_509]),
            _ => ("Secret Data is given as Opaque (2)", &[key_format::OPAQUE]),
        };
        if !served.contains(&format) {
            return Err(Failure::new(ResultReason::KeyFormatTypeNotSupported, format!("Key Format Type {format}: {what}")));
        }
        let material = if kind == object_type::PUBLIC_KEY {
            // No secret: a sealer may read it, and a restorer too.
            let auth = match self.policy.authorize(who, Action::GenerateDataKey, Some(&keyring)) {
                Ok(a) => a,
                Err(_) => self.authorize(who, Action::UnwrapDataKey, "KmipGet", &keyring, Some(&uid)).await?,
            };
            let der = match self.keys.kmip_get_public(&auth, &uid).await {
                Ok((_, der)) => der,
                Err(e) => return Err(self.failed(who, "KmipGet", Some(&keyring), Some(&uid), e).await),
            };
            Material::new(pair::public_as(&der, format).map_err(format_failure)?.into())
        } else {
            let auth = self.authorize(who, Action::UnwrapDataKey, "KmipGet", &keyring, Some(&uid)).await?;
            let material = match self.keys.kmip_get(&auth, &uid).await {
                Ok((_, m)) => m,
                Err(e) => return Err(self.failed(who, "KmipGet", Some(&keyring), Some(&uid), e).await),
            };
            if kind == object_type::PRIVATE_KEY { pair::private_as(&material, format).map_err(format_failure)? } else { material }
        };
        let mut ev = self.keys.event(who.name(), "KmipGet", Some(&keyring), None, Outcome::ok());
        ev.key_id = Some(uid.clone());
        // Fail closed: nothing leaves without its audit entry.
        self.audit(ev).await?;
        if kind != object_type::PUBLIC_KEY {
            self.metrics.unwrapped();
        }
        let mut block = vec![
            Item::enumeration(tag::KEY_FORMAT_TYPE, format),
            Item::structure(tag::KEY_VALUE, vec![Item::bytes(tag::KEY_MATERIAL, material.expose().to_vec())]),
        ];
        if let Some(a) = object.algorithm {
            block.push(Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, a));
        }
        if let Some(l) = object.length {
            block.push(Item::integer(tag::CRYPTOGRAPHIC_LENGTH, l));
        }
        let block = Item::structure(tag::KEY_BLOCK, block);
        let object_item = match kind {
            object_type::PRIVATE_KEY => Item::structure(tag::PRIVATE_KEY, vec![block]),
            object_type::PUBLIC_KEY => Item::structure(tag::PUBLIC_KEY, vec![block]),
            _ => Item::structure(tag::SECRET_DATA, vec![Item::enumeration(tag::SECRET_DATA_TYPE, object.secret_data_type.unwrap_or(secret_data_type::PASSWORD)), block]),
        };
        *placeholder = Some(uid.clone());
        Ok(payload(vec![Item::enumeration(tag::OBJECT_TYPE, kind), Item::text(tag::UNIQUE_IDENTIFIER, uid), object_item]))
    }
}

/// A registered object's Key Block, read.
struct KeyBlock {
    format: u32,
    material: zeroize::Zeroizing<Vec<u8>>,
    algorithm: Option<u32>,
    length: Option<i32>,
}

impl KeyBlock {
    fn read(b: &Item) -> Result<KeyBlock, Failure> {
        only(b, &[tag::KEY_FORMAT_TYPE, tag::KEY_COMPRESSION_TYPE, tag::KEY_VALUE, tag::CRYPTOGRAPHIC_ALGORITHM, tag::CRYPTOGRAPHIC_LENGTH, tag::KEY_WRAPPING_DATA])
            .map_err(invalid_field)?;
        if opt(b, tag::KEY_COMPRESSION_TYPE).map_err(invalid_field)?.is_some() {
            return Err(Failure::new(ResultReason::KeyCompressionTypeNotSupported, "Key Compression Type: Kluis takes keys uncompressed"));
        }
        if opt(b, tag::KEY_WRAPPING_DATA).map_err(invalid_field)?.is_some() {
            return Err(Failure::new(ResultReason::FeatureNotSupported, "Key Wrapping Data: Kluis registers keys unwrapped, sent over the mutual TLS connection"));
        }
        let format = enumeration(req(b, tag::KEY_FORMAT_TYPE).map_err(invalid_field)?).map_err(invalid_field)?;
        let algorithm = opt(b, tag::CRYPTOGRAPHIC_ALGORITHM).map_err(invalid_field)?.map(enumeration).transpose().map_err(invalid_field)?;
        let length = opt(b, tag::CRYPTOGRAPHIC_LENGTH).map_err(invalid_field)?.map(int).transpose().map_err(invalid_field)?;
        let value = req(b, tag::KEY_VALUE).map_err(invalid_field)?;
        only(value, &[tag::KEY_MATERIAL]).map_err(|_| invalid("the Key Value holds Key Material only here: give attributes in the Template-Attribute"))?;
        let m = req(value, tag::KEY_MATERIAL).map_err(invalid_field)?;
        // Transparent Symmetric Key: the material is a structure holding the Key.
        let m = if format == key_format::TRANSPARENT_SYMMETRIC_KEY {
            only(m, &[tag::KEY]).map_err(invalid_field)?;
            req(m, tag::KEY).map_err(invalid_field)?
        } else {
            m
        };
        let Value::ByteString(bytes) = &m.value else {
            return Err(invalid(format!("Key Material of Key Format Type {format} must be a Byte String")));
        };
        if bytes.is_empty() || bytes.len() > crate::keys::kmip::MAX_MATERIAL {
            return Err(invalid(format!("Key Material is {} bytes: 1 to {} are kept", bytes.len(), crate::keys::kmip::MAX_MATERIAL)));
        }
        Ok(KeyBlock { format, material: bytes.clone(), algorithm, length })
    }
}
