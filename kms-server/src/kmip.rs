//! The KMIP front end: TTLV over TLS with client certificates (same CA, CRLs, revocation
//! list and principals as gRPC), beside the gRPC api over the same core. This layer reads
//! frames, authenticates, runs each batch item and answers; it maps to KMIP result reasons
//! here and nowhere else, as `api` maps to gRPC statuses.
//!
//! A connection carries one request at a time: 8 bytes of header, checked against
//! [`kluis_kmip::ttlv::Limits`] before the rest is read, then the message. A frame that does
//! not decode is answered with Invalid Message and the connection is closed (the stream has
//! lost its framing); a message that decodes but breaks the message rules is answered with
//! Invalid Message and the connection stays open. Nothing a client sends is logged but its
//! operation names and the error kinds.

use std::sync::Arc;

use kluis_kmip::message::{
    ContinuationOption, Failure, MessageError, Operation, ProtocolVersion, Request, RequestItem, Response, ResponseItem,
    ResultReason, SUPPORTED_VERSIONS,
};
use kluis_kmip::tag;
use kluis_kmip::ttlv::{self, HEADER_LEN, Item, TtlvError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

use crate::auth::{Action, AuthError, Authenticator, Authorized, Policy, Principal};
use crate::keys::kmip::{Attribute, AttributeEdit, KmipObject, Material, NewObject, object_type};
use crate::keys::{KeyError, KeyManager};
use crate::metrics::Metrics;
use crate::model::Outcome;
use crate::tls::Conn;

mod pairs;

/// The operations this server answers (Query lists them).
pub const OPERATIONS: [Operation; 15] = [
    Operation::Create,
    Operation::CreateKeyPair,
    Operation::Register,
    Operation::Locate,
    Operation::Get,
    Operation::GetAttributes,
    Operation::GetAttributeList,
    Operation::AddAttribute,
    Operation::ModifyAttribute,
    Operation::DeleteAttribute,
    Operation::Activate,
    Operation::Revoke,
    Operation::Destroy,
    Operation::Query,
    Operation::DiscoverVersions,
];

/// Cryptographic Algorithm AES (section 9.1.3.2.13).
const AES: u32 = 0x03;
/// Key Format Types (section 9.1.3.2.3).
const RAW: u32 = 0x01;
const TRANSPARENT_SYMMETRIC_KEY: u32 = 0x07;
/// The most identifiers one Locate answers (a client pages with Offset Items).
pub const MAX_LOCATE: usize = 1000;

/// Why a connection ended other than by the client closing it between requests.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("reading or writing the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the request was not TTLV: {0}")]
    Frame(#[from] TtlvError),
    #[error("a response could not be encoded: {0}")]
    Encode(#[from] ttlv::EncodeError),
}

/// The KMIP service: what a connection needs.
pub struct Kmip {
    keys: Arc<KeyManager>,
    policy: Arc<Policy>,
    authn: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    limits: ttlv::Limits,
    /// `kmip_keyring` of the config.
    default_keyring: Option<String>,
}

impl Kmip {
    pub fn new(
        keys: Arc<KeyManager>,
        policy: Arc<Policy>,
        authn: Arc<Authenticator>,
        metrics: Arc<Metrics>,
        default_keyring: Option<String>,
    ) -> Self {
        Self { keys, policy, authn, metrics, limits: ttlv::Limits::default(), default_keyring }
    }

    /// Serves every connection of `incoming` until it ends.
    pub async fn serve(self: Arc<Self>, mut incoming: impl tokio_stream::Stream<Item = std::io::Result<Conn>> + Unpin) {
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.connection(conn).await {
                    tracing::debug!(error = %e, "KMIP connection closed");
                }
            });
        }
    }

    #[tracing::instrument(skip_all, fields(principal))]
    async fn connection(&self, mut conn: Conn) -> Result<(), ConnError> {
        // The handshake required a certificate from the CA; the revocation list and the
        // principal rules are checked here, once per connection.
        let who = self.authn.authenticate(conn.peer_leaf().unwrap_or_default());
        if let Ok(p) = &who {
            tracing::Span::current().record("principal", p.name());
        }
        loop {
            let mut header = [0u8; HEADER_LEN];
            match conn.read_exact(&mut header).await {
                Ok(_) => {}
                // The client closed between requests.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let len = match ttlv::message_len(&header, &self.limits) {
                Ok(len) => len,
                Err(e) => return self.refuse_frame(&mut conn, e).await,
            };
            let mut message = zeroize::Zeroizing::new(vec![0u8; len]);
            message[..HEADER_LEN].copy_from_slice(&header);
            conn.read_exact(&mut message[HEADER_LEN..]).await?;
            let item = match ttlv::decode(&message, &self.limits) {
                Ok(item) => item,
                Err(e) => return self.refuse_frame(&mut conn, e).await,
            };
            drop(message);
            let response = match (&who, Request::from_item(&item)) {
                (_, Err(e)) => self.invalid(&item, &e),
                (Err(e), Ok(req)) => self.unauthenticated(&req, e),
                (Ok(p), Ok(req)) => self.handle(p, req).await,
            };
            let bytes = ttlv::encode(&response.to_item())?;
            conn.write_all(&bytes).await?;
            conn.flush().await?;
            // A refused certificate got its answer; the connection ends with it.
            if who.is_err() {
                return Ok(());
            }
        }
    }

    /// Answers a frame that did not decode with Invalid Message, and ends the connection.
    async fn refuse_frame(&self, conn: &mut Conn, e: TtlvError) -> Result<(), ConnError> {
        let response = self.invalid_message(ProtocolVersion::new(1, 0), e.to_string());
        if let Ok(bytes) = ttlv::encode(&response.to_item()) {
            let _ = conn.write_all(&bytes).await;
            let _ = conn.shutdown().await;
        }
        Err(ConnError::Frame(e))
    }

    /// A message that decoded but is no valid request: one failed batch item.
    fn invalid(&self, item: &Item, e: &MessageError) -> Response {
        // Answer in the client's version when its header said one.
        let version = item
            .child(tag::REQUEST_HEADER)
            .and_then(|h| h.child(tag::PROTOCOL_VERSION))
            .and_then(|v| ProtocolVersion::from_item(v).ok())
            .map_or(ProtocolVersion::new(1, 0), answer_version);
        self.invalid_message(version, e.to_string())
    }

    /// One failed batch item, Invalid Message, counted.
    fn invalid_message(&self, version: ProtocolVersion, message: String) -> Response {
        self.metrics.kmip("none", "invalid_message");
        Response {
            version,
            time_stamp: self.keys.now(),
            items: vec![ResponseItem { operation: None, unique_id: None, result: Err(Failure::new(ResultReason::InvalidMessage, message)) }],
        }
    }

    fn unauthenticated(&self, req: &Request, e: &AuthError) -> Response {
        let reason = if matches!(e, AuthError::Revoked { .. }) { "revoked" } else { "unauthenticated" };
        self.metrics.refused("kmip", reason);
        tracing::warn!(error = %e, "KMIP client certificate refused");
        self.each(req, |_| Err(Failure::new(ResultReason::AuthenticationNotSuccessful, e.to_string())))
    }

    /// Runs a request's batch items in order.
    async fn handle(&self, who: &Principal, req: Request) -> Response {
        let version = answer_version(req.header.version);
        let supported = SUPPORTED_VERSIONS.contains(&req.header.version);
        let mut items = Vec::with_capacity(req.items.len());
        // The ID Placeholder: the object the last item made or named, for an item without a
        // Unique Identifier (Create then Activate in one batch).
        let mut placeholder: Option<String> = None;
        if req.header.continuation == ContinuationOption::Undo && req.items.len() > 1 {
            return self.each(&req, |_| {
                Err(Failure::new(ResultReason::FeatureNotSupported, "Batch Error Continuation Option Undo: Kluis cannot undo batch items; use Stop or Continue"))
            });
        }
        for item in &req.items {
            let result = if !supported && item.operation != Operation::DiscoverVersions {
                Err(Failure::new(
                    ResultReason::InvalidMessage,
                    format!("protocol version {} is not supported; this server speaks 1.0 to 1.4 (ask with Discover Versions)", req.header.version),
                ))
            } else {
                self.run(who, item, &mut placeholder).await
            };
            self.metrics.kmip(operation_name(item.operation), result_name(&result));
            let failed = result.is_err();
            items.push(ResponseItem { operation: Some(item.operation), unique_id: item.unique_id.clone(), result });
            if failed && req.header.continuation == ContinuationOption::Stop {
                break;
            }
        }
        let response = Response { version, time_stamp: self.keys.now(), items };
        self.bounded(response, req.header.max_response_size)
    }

    /// The Maximum Response Size the client asked for: a response that would exceed it
    /// becomes Response Too Large on each item (KMIP 1.1 Test Cases 12.1).
    fn bounded(&self, mut response: Response, max: Option<i32>) -> Response {
        let Some(max) = max.and_then(|m| usize::try_from(m).ok()) else { return response };
        if response.to_item().encoded_len() <= max {
            return response;
        }
        for i in &mut response.items {
            i.result = Err(Failure::new(ResultReason::ResponseTooLarge, format!("the response is larger than the Maximum Response Size of {max} bytes")));
        }
        response
    }

    /// Every batch item of `req` answered by `f`.
    fn each(&self, req: &Request, f: impl Fn(&RequestItem) -> Result<Option<Item>, Failure>) -> Response {
        Response {
            version: answer_version(req.header.version),
            time_stamp: self.keys.now(),
            items: req
                .items
                .iter()
                .map(|i| ResponseItem { operation: Some(i.operation), unique_id: i.unique_id.clone(), result: f(i) })
                .collect(),
        }
    }

    #[tracing::instrument(skip_all, fields(operation = operation_name(item.operation)))]
    async fn run(&self, who: &Principal, item: &RequestItem, placeholder: &mut Option<String>) -> Result<Option<Item>, Failure> {
        let p = &item.payload;
        match item.operation {
            Operation::DiscoverVersions => discover_versions(p).map(Some),
            Operation::Query => query(p).map(Some),
            Operation::Create => self.create(who, p, placeholder).await.map(Some),
            Operation::Get => self.get(who, p, placeholder).await.map(Some),
            Operation::Activate => self.activate(who, p, placeholder).await.map(Some),
            Operation::GetAttributes => self.get_attributes(who, p, placeholder).await.map(Some),
            Operation::GetAttributeList => self.get_attribute_list(who, p, placeholder).await.map(Some),
            Operation::AddAttribute | Operation::ModifyAttribute | Operation::DeleteAttribute => {
                self.edit_attribute(who, item.operation, p, placeholder).await.map(Some)
            }
            Operation::Revoke => self.revoke(who, p, placeholder).await.map(Some),
            Operation::Destroy => self.destroy(who, p, placeholder).await.map(Some),
            Operation::Locate => self.locate(who, p).await.map(Some),
            Operation::CreateKeyPair => self.create_key_pair(who, p, placeholder).await.map(Some),
            Operation::Register => self.register(who, p, placeholder).await.map(Some),
            other => Err(Failure::new(
                ResultReason::OperationNotSupported,
                format!("operation {other:?} is not supported by this server (Query lists those that are)"),
            )),
        }
    }

    /// Authorizes `action` on `keyring`; a refusal is audited (fail closed) and answered
    /// Permission Denied.
    async fn authorize(&self, who: &Principal, action: Action, audit_action: &str, keyring: &str, uid: Option<&str>) -> Result<Authorized, Failure> {
        match self.policy.authorize(who, action, Some(keyring)) {
            Ok(a) => Ok(a),
            Err(e) => {
                self.metrics.refused(action.name(), "permission");
                let mut ev = self.keys.event(who.name(), audit_action, Some(keyring), None, Outcome::Denied(e.to_string()));
                ev.key_id = uid.map(str::to_owned);
                self.audit(ev).await?;
                Err(Failure::new(ResultReason::PermissionDenied, e.to_string()))
            }
        }
    }

    /// Writes an audit entry of a request that wrote nothing else; if it cannot be written,
    /// the request fails (fail closed).
    async fn audit(&self, ev: crate::audit::AuditEvent) -> Result<(), Failure> {
        self.keys.audit(ev).await.map_err(|e| {
            self.metrics.audit_failure();
            tracing::error!(error = %e, "audit trail not writable; KMIP request refused");
            Failure::new(ResultReason::GeneralFailure, format!("the audit trail cannot be written, so nothing was done: {e}"))
        })
    }

    /// A key-layer failure of an authorized request: audited, then mapped.
    async fn failed(&self, who: &Principal, audit_action: &str, keyring: Option<&str>, uid: Option<&str>, e: KeyError) -> Failure {
        let f = key_failure(e);
        let mut ev = self.keys.event(
            who.name(),
            audit_action,
            keyring,
            None,
            Outcome::Failed { kind: format!("{:?}", f.reason), detail: f.message.clone() },
        );
        ev.key_id = uid.map(str::to_owned);
        match self.audit(ev).await {
            Ok(()) => f,
            Err(audit) => audit,
        }
    }

    /// The keyring a client's new objects go to.
    fn keyring_for(&self, who: &Principal) -> Result<String, Failure> {
        self.policy.kmip_keyring(who).or_else(|| self.default_keyring.clone()).ok_or_else(|| {
            Failure::new(
                ResultReason::PermissionDenied,
                format!(
                    "no KMIP keyring for {}: grant it sealer on exactly one keyring, or set kmip_keyring in the server config",
                    who.name()
                ),
            )
        })
    }

    async fn create(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        use kluis_kmip::message::{enumeration, opt, req};
        let kind = enumeration(req(p, tag::OBJECT_TYPE).map_err(invalid_field)?).map_err(invalid_field)?;
        if kind != object_type::SYMMETRIC_KEY {
            return Err(Failure::new(ResultReason::InvalidField, format!("Create makes symmetric keys (Object Type 2), not Object Type {kind}; key pairs come with Create Key Pair")));
        }
        let template = opt(p, tag::TEMPLATE_ATTRIBUTE).map_err(invalid_field)?;
        let mut new = NewObject { object_type: kind, key_format: RAW, ..NewObject::default() };
        if let Some(t) = template {
            read_template(t, &mut new)?;
        }
        if new.algorithm != Some(AES) {
            return Err(Failure::new(ResultReason::InvalidField, "Cryptographic Algorithm must be AES (3)"));
        }
        let bytes = match new.length {
            Some(128) => 16,
            Some(256) => 32,
            _ => return Err(Failure::new(ResultReason::InvalidField, "Cryptographic Length must be 128 or 256 for AES")),
        };
        let keyring = self.keyring_for(who)?;
        let auth = self.authorize(who, Action::GenerateDataKey, "KmipCreate", &keyring, None).await?;
        let mut key = zeroize::Zeroizing::new(vec![0u8; bytes]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| Failure::new(ResultReason::CryptographicFailure, "no random bytes from the system"))?;
        let audit = self.keys.event(who.name(), "KmipCreate", Some(&keyring), None, Outcome::ok());
        let uid = match self.keys.kmip_create(&auth, &keyring, new, Material::new(key), audit).await {
            Ok(uid) => uid,
            Err(e) => return Err(self.failed(who, "KmipCreate", Some(&keyring), None, e).await),
        };
        *placeholder = Some(uid.clone());
        Ok(payload(vec![Item::enumeration(tag::OBJECT_TYPE, kind), Item::text(tag::UNIQUE_IDENTIFIER, uid)]))
    }

    /// The Unique Identifier of a payload, or the ID Placeholder.
    fn uid(p: &Item, placeholder: &Option<String>) -> Result<String, Failure> {
        match kluis_kmip::message::opt(p, tag::UNIQUE_IDENTIFIER).map_err(invalid_field)? {
            Some(u) => Ok(kluis_kmip::message::text(u).map_err(invalid_field)?.to_owned()),
            None => placeholder
                .clone()
                .ok_or_else(|| Failure::new(ResultReason::MissingData, "Unique Identifier is missing and no earlier batch item set the ID Placeholder")),
        }
    }

    /// The keyring of the object `uid`, or Item Not Found.
    fn keyring_of(&self, uid: &str) -> Result<String, Failure> {
        self.keys.kmip_object(uid).map(|(_, o)| o.keyring).map_err(key_failure)
    }

    async fn get(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        use kluis_kmip::message::{enumeration, only, opt};
        // Private and public keys and secret data: pairs.rs.
        if let Some(other) = self.get_other(who, p, placeholder).await {
            return other;
        }
        only(p, &[tag::UNIQUE_IDENTIFIER, tag::KEY_FORMAT_TYPE, tag::KEY_COMPRESSION_TYPE, tag::KEY_WRAPPING_SPECIFICATION])
            .map_err(invalid_field)?;
        if opt(p, tag::KEY_WRAPPING_SPECIFICATION).map_err(invalid_field)?.is_some() {
            return Err(Failure::new(ResultReason::FeatureNotSupported, "Key Wrapping Specification: Kluis returns keys unwrapped, over the mutual TLS connection"));
        }
        let format = opt(p, tag::KEY_FORMAT_TYPE).map_err(invalid_field)?.map(enumeration).transpose().map_err(invalid_field)?;
        if let Some(f) = format
            && f != RAW
            && f != TRANSPARENT_SYMMETRIC_KEY
        {
            return Err(Failure::new(ResultReason::KeyFormatTypeNotSupported, format!("Key Format Type {f}: a symmetric key is given as Raw (1) or Transparent Symmetric Key (7)")));
        }
        let uid = Self::uid(p, placeholder)?;
        let keyring = self.keyring_of(&uid)?;
        let auth = self.authorize(who, Action::UnwrapDataKey, "KmipGet", &keyring, Some(&uid)).await?;
        let (object, material) = match self.keys.kmip_get(&auth, &uid).await {
            Ok(got) => got,
            Err(e) => return Err(self.failed(who, "KmipGet", Some(&keyring), Some(&uid), e).await),
        };
        let mut ev = self.keys.event(who.name(), "KmipGet", Some(&keyring), None, Outcome::ok());
        ev.key_id = Some(uid.clone());
        // Fail closed: no key leaves without its audit entry.
        self.audit(ev).await?;
        self.metrics.unwrapped();
        let value = match format {
            Some(TRANSPARENT_SYMMETRIC_KEY) => {
                Item::structure(tag::KEY_VALUE, vec![Item::structure(tag::KEY_MATERIAL, vec![Item::bytes(tag::KEY, material.expose())])])
            }
            _ => Item::structure(tag::KEY_VALUE, vec![Item::bytes(tag::KEY_MATERIAL, material.expose())]),
        };
        let mut block = vec![Item::enumeration(tag::KEY_FORMAT_TYPE, format.unwrap_or(RAW)), value];
        if let Some(a) = object.algorithm {
            block.push(Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, a));
        }
        if let Some(l) = object.length {
            block.push(Item::integer(tag::CRYPTOGRAPHIC_LENGTH, l));
        }
        *placeholder = Some(uid.clone());
        Ok(payload(vec![
            Item::enumeration(tag::OBJECT_TYPE, object.object_type),
            Item::text(tag::UNIQUE_IDENTIFIER, uid),
            Item::structure(tag::SYMMETRIC_KEY, vec![Item::structure(tag::KEY_BLOCK, block)]),
        ]))
    }

    async fn activate(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        kluis_kmip::message::only(p, &[tag::UNIQUE_IDENTIFIER]).map_err(invalid_field)?;
        let uid = Self::uid(p, placeholder)?;
        let keyring = self.keyring_of(&uid)?;
        let auth = self.authorize(who, Action::GenerateDataKey, "KmipActivate", &keyring, Some(&uid)).await?;
        let mut audit = self.keys.event(who.name(), "KmipActivate", Some(&keyring), None, Outcome::ok());
        audit.key_id = Some(uid.clone());
        if let Err(e) = self.keys.kmip_activate(&auth, &uid, audit).await {
            return Err(self.failed(who, "KmipActivate", Some(&keyring), Some(&uid), e).await);
        }
        *placeholder = Some(uid.clone());
        Ok(payload(vec![Item::text(tag::UNIQUE_IDENTIFIER, uid)]))
    }

    async fn get_attributes(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        kluis_kmip::message::only(p, &[tag::UNIQUE_IDENTIFIER, tag::ATTRIBUTE_NAME]).map_err(invalid_field)?;
        let uid = Self::uid(p, placeholder)?;
        let wanted = p
            .children_with(tag::ATTRIBUTE_NAME)
            .map(|n| kluis_kmip::message::text(n).map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid_field)?;
        let (object, seen) = self.readable(who, &uid, "KmipGetAttributes").await?;
        let mut out = vec![Item::text(tag::UNIQUE_IDENTIFIER, uid.clone())];
        out.extend(
            attributes(&uid, &object, seen).into_iter().filter(|(name, _)| wanted.is_empty() || wanted.iter().any(|w| w == name)).map(|(_, a)| a),
        );
        *placeholder = Some(uid);
        Ok(payload(out))
    }

    /// An object whose attributes `who` may read (sealer or restorer on its keyring; a
    /// refusal audited as `audit_action`), and the state and Destroy Date clients see.
    async fn readable(&self, who: &Principal, uid: &str, audit_action: &str) -> Result<(KmipObject, (u32, Option<i64>)), Failure> {
        let (id, object) = self.keys.kmip_object(uid).map_err(key_failure)?;
        if !self.policy.may_use(who, &object.keyring) {
            let _ = self.authorize(who, Action::GenerateDataKey, audit_action, &object.keyring, Some(uid)).await?;
        }
        let seen = self.keys.kmip_state(&id, &object).map_err(key_failure)?;
        Ok((object, seen))
    }

    /// Get Attribute List: the names of the attributes the object has.
    async fn get_attribute_list(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        kluis_kmip::message::only(p, &[tag::UNIQUE_IDENTIFIER]).map_err(invalid_field)?;
        let uid = Self::uid(p, placeholder)?;
        let (object, seen) = self.readable(who, &uid, "KmipGetAttributeList").await?;
        let mut names: Vec<&str> = Vec::new();
        for (name, _) in attributes(&uid, &object, seen) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let mut out = vec![Item::text(tag::UNIQUE_IDENTIFIER, uid.clone())];
        out.extend(names.into_iter().map(|n| Item::text(tag::ATTRIBUTE_NAME, n)));
        *placeholder = Some(uid);
        Ok(payload(out))
    }

    /// Add, Modify or Delete Attribute, for the attributes a client may set.
    async fn edit_attribute(&self, who: &Principal, op: Operation, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        use kluis_kmip::message::{int, opt, req, text};
        let (edit, audit_action) = if op == Operation::DeleteAttribute {
            kluis_kmip::message::only(p, &[tag::UNIQUE_IDENTIFIER, tag::ATTRIBUTE_NAME, tag::ATTRIBUTE_INDEX]).map_err(invalid_field)?;
            let name = text(req(p, tag::ATTRIBUTE_NAME).map_err(invalid_field)?).map_err(invalid_field)?;
            let index = attribute_index(opt(p, tag::ATTRIBUTE_INDEX).map_err(invalid_field)?.map(int).transpose().map_err(invalid_field)?)?;
            (AttributeEdit::Delete(settable(name)?, index), "KmipDeleteAttribute")
        } else {
            kluis_kmip::message::only(p, &[tag::UNIQUE_IDENTIFIER, tag::ATTRIBUTE]).map_err(invalid_field)?;
            let a = req(p, tag::ATTRIBUTE).map_err(invalid_field)?;
            let (name, value) = attribute(a)?;
            let index = opt(a, tag::ATTRIBUTE_INDEX).map_err(invalid_field)?.map(int).transpose().map_err(invalid_field)?;
            let value = settable_value(settable(&name)?, value)?;
            if op == Operation::AddAttribute {
                if index.is_some() {
                    return Err(Failure::new(ResultReason::InvalidField, "Add Attribute takes no Attribute Index: the server gives it"));
                }
                (AttributeEdit::Add(value), "KmipAddAttribute")
            } else {
                (AttributeEdit::Modify(value, attribute_index(index)?), "KmipModifyAttribute")
            }
        };
        let uid = Self::uid(p, placeholder)?;
        let keyring = self.keyring_of(&uid)?;
        let auth = self.authorize(who, Action::GenerateDataKey, audit_action, &keyring, Some(&uid)).await?;
        let mut audit = self.keys.event(who.name(), audit_action, Some(&keyring), None, Outcome::ok_with(edit_summary(&edit)));
        audit.key_id = Some(uid.clone());
        let (a, index) = match self.keys.kmip_edit(&auth, &uid, edit, audit).await {
            Ok(done) => done,
            Err(e) => return Err(self.failed(who, audit_action, Some(&keyring), Some(&uid), e).await),
        };
        *placeholder = Some(uid.clone());
        let mut attr = vec![Item::text(tag::ATTRIBUTE_NAME, a.name())];
        if index > 0 {
            attr.push(Item::integer(tag::ATTRIBUTE_INDEX, i32::try_from(index).unwrap_or(i32::MAX)));
        }
        attr.push(attribute_value(&a));
        Ok(payload(vec![Item::text(tag::UNIQUE_IDENTIFIER, uid), Item::structure(tag::ATTRIBUTE, attr)]))
    }

    /// Revoke: Deactivated, or Compromised for a compromise reason.
    async fn revoke(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        use kluis_kmip::message::{date_time, enumeration, only, opt, req, text};
        only(p, &[tag::UNIQUE_IDENTIFIER, tag::REVOCATION_REASON, tag::COMPROMISE_OCCURRENCE_DATE]).map_err(invalid_field)?;
        let r = req(p, tag::REVOCATION_REASON).map_err(invalid_field)?;
        only(r, &[tag::REVOCATION_REASON_CODE, tag::REVOCATION_MESSAGE]).map_err(invalid_field)?;
        let code = enumeration(req(r, tag::REVOCATION_REASON_CODE).map_err(invalid_field)?).map_err(invalid_field)?;
        if !(1..=7).contains(&code) {
            return Err(Failure::new(ResultReason::InvalidField, format!("Revocation Reason Code {code} is not one KMIP defines (1 to 7)")));
        }
        let message = opt(r, tag::REVOCATION_MESSAGE).map_err(invalid_field)?.map(text).transpose().map_err(invalid_field)?.map(str::to_owned);
        let occurred = opt(p, tag::COMPROMISE_OCCURRENCE_DATE).map_err(invalid_field)?.map(date_time).transpose().map_err(invalid_field)?;
        let uid = Self::uid(p, placeholder)?;
        let keyring = self.keyring_of(&uid)?;
        let auth = self.authorize(who, Action::GenerateDataKey, "KmipRevoke", &keyring, Some(&uid)).await?;
        let mut audit = self.keys.event(who.name(), "KmipRevoke", Some(&keyring), None, Outcome::ok_with(format!("revocation reason {code}")));
        audit.key_id = Some(uid.clone());
        if let Err(e) = self.keys.kmip_revoke(&auth, &uid, code, message, occurred, audit).await {
            return Err(self.failed(who, "KmipRevoke", Some(&keyring), Some(&uid), e).await);
        }
        *placeholder = Some(uid.clone());
        Ok(payload(vec![Item::text(tag::UNIQUE_IDENTIFIER, uid)]))
    }

    /// Destroy: Destroyed to clients at once; the material is erased when the keyring's
    /// waiting period has passed (a scheduled destruction an officer can cancel).
    async fn destroy(&self, who: &Principal, p: &Item, placeholder: &mut Option<String>) -> Result<Item, Failure> {
        kluis_kmip::message::only(p, &[tag::UNIQUE_IDENTIFIER]).map_err(invalid_field)?;
        let uid = Self::uid(p, placeholder)?;
        let keyring = self.keyring_of(&uid)?;
        let auth = self.authorize(who, Action::GenerateDataKey, "KmipDestroy", &keyring, Some(&uid)).await?;
        let mut audit = self.keys.event(who.name(), "KmipDestroy", Some(&keyring), None, Outcome::ok());
        audit.key_id = Some(uid.clone());
        match self.keys.kmip_destroy(&auth, &uid, audit).await {
            Ok(d) => {
                tracing::info!(destruction = d.id, keyring = %keyring, "KMIP Destroy: destruction scheduled");
            }
            Err(e) => return Err(self.failed(who, "KmipDestroy", Some(&keyring), Some(&uid), e).await),
        }
        *placeholder = Some(uid.clone());
        Ok(payload(vec![Item::text(tag::UNIQUE_IDENTIFIER, uid)]))
    }

    async fn locate(&self, who: &Principal, p: &Item) -> Result<Item, Failure> {
        use kluis_kmip::message::{int, opt};
        let max = opt(p, tag::MAXIMUM_ITEMS).map_err(invalid_field)?.map(int).transpose().map_err(invalid_field)?;
        let offset = opt(p, tag::OFFSET_ITEMS).map_err(invalid_field)?.map(int).transpose().map_err(invalid_field)?;
        let max = usize::try_from(max.unwrap_or(i32::MAX)).unwrap_or(0).min(MAX_LOCATE);
        let offset = usize::try_from(offset.unwrap_or(0)).unwrap_or(0);
        let mut want = NewObject::default();
        let mut want_state = None;
        let mut want_type = None;
        for a in p.children_with(tag::ATTRIBUTE) {
            let (name, value) = attribute(a)?;
            match name.as_str() {
                "Object Type" => want_type = Some(kluis_kmip::message::enumeration(value).map_err(invalid_field)?),
                "State" => want_state = Some(kluis_kmip::message::enumeration(value).map_err(invalid_field)?),
                _ => read_attribute(&name, value, &mut want)?,
            }
        }
        for c in p.children().unwrap_or(&[]) {
            if ![tag::ATTRIBUTE, tag::MAXIMUM_ITEMS, tag::OFFSET_ITEMS, tag::STORAGE_STATUS_MASK, tag::OBJECT_GROUP_MEMBER].contains(&c.tag) {
                return Err(Failure::new(ResultReason::InvalidField, format!("{} is not a field of a Locate request", c.tag)));
            }
        }
        let found = self
            .keys
            .kmip_locate(offset, max, |id, o| {
                self.policy.may_use(who, &o.keyring)
                    && want_type.is_none_or(|t| t == o.object_type)
                    && want_state.is_none_or(|s| self.keys.kmip_state(id, o).is_ok_and(|(seen, _)| seen == s))
                    && want.algorithm.is_none_or(|a| Some(a) == o.algorithm)
                    && want.length.is_none_or(|l| Some(l) == o.length)
                    && want.names.iter().all(|n| o.names.contains(n))
                    && want.app_info.iter().all(|(ns, data)| o.app_info.iter().any(|(ons, od)| ons == ns && (data.is_empty() || od == data)))
            })
            .map_err(key_failure)?;
        let ev = self.keys.event(who.name(), "KmipLocate", None, None, Outcome::ok_with(format!("{} found", found.len())));
        self.audit(ev).await?;
        Ok(payload(found.into_iter().map(|u| Item::text(tag::UNIQUE_IDENTIFIER, u)).collect()))
    }
}

/// A Template-Attribute's attributes into a new object. Unknown attributes are refused by
/// name rather than dropped: a client must not believe a setting took that did not.
fn read_template(t: &Item, new: &mut NewObject) -> Result<(), Failure> {
    for c in t.children().unwrap_or(&[]) {
        if c.tag == tag::NAME {
            // A Template's own name (templates are not kept): refused.
            return Err(Failure::new(ResultReason::FeatureNotSupported, "named templates are not supported; give the attributes themselves"));
        }
        if c.tag != tag::ATTRIBUTE {
            return Err(Failure::new(ResultReason::InvalidField, format!("{} is not a field of a Template-Attribute", c.tag)));
        }
        let (name, value) = attribute(c)?;
        read_attribute(&name, value, new)?;
    }
    new.names.sort();
    new.names.dedup();
    Ok(())
}

/// An Attribute's name and value.
fn attribute(a: &Item) -> Result<(String, &Item), Failure> {
    use kluis_kmip::message::{only, req, text};
    only(a, &[tag::ATTRIBUTE_NAME, tag::ATTRIBUTE_INDEX, tag::ATTRIBUTE_VALUE]).map_err(invalid_field)?;
    let name = text(req(a, tag::ATTRIBUTE_NAME).map_err(invalid_field)?).map_err(invalid_field)?.to_owned();
    let value = req(a, tag::ATTRIBUTE_VALUE).map_err(invalid_field)?;
    Ok((name, value))
}

fn read_attribute(name: &str, v: &Item, new: &mut NewObject) -> Result<(), Failure> {
    use kluis_kmip::message::{enumeration, int, req, text};
    let bad = |e| invalid_field(e);
    match name {
        "Cryptographic Algorithm" => new.algorithm = Some(enumeration(v).map_err(bad)?),
        "Cryptographic Length" => new.length = Some(int(v).map_err(bad)?),
        "Cryptographic Usage Mask" => new.usage_mask = Some(int(v).map_err(bad)?),
        "Name" => new.names.push(text(req(v, tag::NAME_VALUE).map_err(bad)?).map_err(bad)?.to_owned()),
        "Application Specific Information" => {
            let ns = text(req(v, tag::APPLICATION_NAMESPACE).map_err(bad)?).map_err(bad)?.to_owned();
            let data = match kluis_kmip::message::opt(v, tag::APPLICATION_DATA).map_err(bad)? {
                Some(d) => text(d).map_err(bad)?.to_owned(),
                None => String::new(),
            };
            new.app_info.push((ns, data));
        }
        // Kluis's policy is its grants; a client's policy name changes nothing.
        "Operation Policy Name" => {}
        other => {
            return Err(Failure::new(
                ResultReason::InvalidField,
                format!("attribute {:?} is not supported here", other.escape_debug().take(64).collect::<String>()),
            ));
        }
    }
    Ok(())
}

/// The attributes of an object, as (name, Attribute) in the order Get Attributes lists them.
fn attributes(uid: &str, o: &KmipObject, (state, destroy_date): (u32, Option<i64>)) -> Vec<(&'static str, Item)> {
    let attr = |name: &'static str, value: Item| {
        (name, Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, name), value]))
    };
    let v = tag::ATTRIBUTE_VALUE;
    let mut out = vec![
        attr("Unique Identifier", Item::text(v, uid)),
        attr("Object Type", Item::enumeration(v, o.object_type)),
    ];
    if let Some(a) = o.algorithm {
        out.push(attr("Cryptographic Algorithm", Item::enumeration(v, a)));
    }
    if let Some(l) = o.length {
        out.push(attr("Cryptographic Length", Item::integer(v, l)));
    }
    if let Some(m) = o.usage_mask {
        out.push(attr("Cryptographic Usage Mask", Item::integer(v, m)));
    }
    for n in &o.names {
        out.push(attr("Name", Item::structure(v, vec![Item::text(tag::NAME_VALUE, n.clone()), Item::enumeration(tag::NAME_TYPE, 1)])));
    }
    for (ns, data) in &o.app_info {
        out.push(attr(
            "Application Specific Information",
            Item::structure(v, vec![Item::text(tag::APPLICATION_NAMESPACE, ns.clone()), Item::text(tag::APPLICATION_DATA, data.clone())]),
        ));
    }
    out.push(attr("State", Item::enumeration(v, state)));
    out.push(attr("Initial Date", Item::date_time(v, o.initial_date)));
    let dates = [
        ("Activation Date", o.activation_date),
        ("Deactivation Date", o.deactivation_date),
        ("Compromise Date", o.compromise_date),
        ("Compromise Occurrence Date", o.compromise_occurrence),
        ("Destroy Date", destroy_date),
    ];
    for (name, d) in dates {
        if let Some(d) = d {
            out.push(attr(name, Item::date_time(v, d)));
        }
    }
    if let Some((code, message)) = &o.revocation {
        let mut r = vec![Item::enumeration(tag::REVOCATION_REASON_CODE, *code)];
        if let Some(m) = message {
            r.push(Item::text(tag::REVOCATION_MESSAGE, m.clone()));
        }
        out.push(attr("Revocation Reason", Item::structure(v, r)));
    }
    for (link_type, linked) in &o.links {
        out.push(attr("Link", Item::structure(v, vec![Item::enumeration(tag::LINK_TYPE, *link_type), Item::text(tag::LINKED_OBJECT_IDENTIFIER, linked.clone())])));
    }
    out
}

/// The Attribute Value of an attribute a client set.
fn attribute_value(a: &Attribute) -> Item {
    let v = tag::ATTRIBUTE_VALUE;
    match a {
        Attribute::Name(n) => Item::structure(v, vec![Item::text(tag::NAME_VALUE, n.clone()), Item::enumeration(tag::NAME_TYPE, 1)]),
        Attribute::AppInfo(ns, data) => {
            Item::structure(v, vec![Item::text(tag::APPLICATION_NAMESPACE, ns.clone()), Item::text(tag::APPLICATION_DATA, data.clone())])
        }
        Attribute::UsageMask(m) => Item::integer(v, *m),
    }
}

/// The attributes a client may add, change or delete, by name; the others are refused
/// naming the attribute.
fn settable(name: &str) -> Result<&'static str, Failure> {
    match name {
        "Name" => Ok("Name"),
        "Application Specific Information" => Ok("Application Specific Information"),
        "Cryptographic Usage Mask" => Ok("Cryptographic Usage Mask"),
        "Unique Identifier" | "Object Type" | "Cryptographic Algorithm" | "Cryptographic Length" | "State" | "Initial Date"
        | "Activation Date" | "Deactivation Date" | "Compromise Date" | "Compromise Occurrence Date" | "Destroy Date"
        | "Revocation Reason" | "Link" => Err(Failure::new(
            ResultReason::PermissionDenied,
            format!("{name} is set by the server (or by its own operation) and cannot be added, changed or deleted"),
        )),
        other => Err(Failure::new(
            ResultReason::InvalidField,
            format!("attribute {:?} is not supported here", other.escape_debug().take(64).collect::<String>()),
        )),
    }
}

fn settable_value(name: &'static str, v: &Item) -> Result<Attribute, Failure> {
    let mut new = NewObject::default();
    read_attribute(name, v, &mut new)?;
    Ok(match name {
        "Name" => Attribute::Name(new.names.pop().unwrap_or_default()),
        "Application Specific Information" => {
            let (ns, data) = new.app_info.pop().unwrap_or_default();
            Attribute::AppInfo(ns, data)
        }
        _ => Attribute::UsageMask(new.usage_mask.unwrap_or_default()),
    })
}

/// An Attribute Index: 0 when not given; never negative.
fn attribute_index(index: Option<i32>) -> Result<usize, Failure> {
    usize::try_from(index.unwrap_or(0))
        .map_err(|_| Failure::new(ResultReason::InvalidField, "Attribute Index must not be negative"))
}

/// What an attribute edit did, for the audit entry (the attribute's name and index, not
/// its value).
fn edit_summary(e: &AttributeEdit) -> String {
    match e {
        AttributeEdit::Add(a) => format!("added {}", a.name()),
        AttributeEdit::Modify(a, i) => format!("modified {} index {i}", a.name()),
        AttributeEdit::Delete(name, i) => format!("deleted {name} index {i}"),
    }
}

/// The KMIP answer to a key-layer error.
fn key_failure(e: KeyError) -> Failure {
    let reason = match &e {
        KeyError::KmipObjectNotFound { .. } | KeyError::UnknownKeyId { .. } => ResultReason::ItemNotFound,
        KeyError::KmipState { .. } | KeyError::KmipAttributeFixed { .. } => ResultReason::PermissionDenied,
        KeyError::KmipAttributeMissing { .. } => ResultReason::ItemNotFound,
        KeyError::AlreadyScheduled { .. } => ResultReason::PermissionDenied,
        KeyError::NotCovered => ResultReason::PermissionDenied,
        KeyError::InvalidArgument { .. } => ResultReason::InvalidField,
        KeyError::Destroyed { .. } | KeyError::KeyMaterialErased { .. } => ResultReason::KeyValueNotPresent,
        KeyError::KeyringNotFound { .. } | KeyError::KeyringDestroyed { .. } | KeyError::VersionRetired { .. } => ResultReason::PermissionDenied,
        KeyError::LegalHold { .. } => ResultReason::PermissionDenied,
        KeyError::UnwrapFailed { .. } => ResultReason::CryptographicFailure,
        _ => ResultReason::GeneralFailure,
    };
    if reason == ResultReason::GeneralFailure {
        tracing::error!(error = %e, "KMIP request failed");
    }
    Failure::new(reason, e.to_string())
}

/// The version a response is in: the request's, or the newest Kluis speaks if the request's
/// is newer still.
fn answer_version(asked: ProtocolVersion) -> ProtocolVersion {
    if SUPPORTED_VERSIONS.contains(&asked) { asked } else { SUPPORTED_VERSIONS[0].min(asked).max(ProtocolVersion::new(1, 0)) }
}

fn payload(children: Vec<Item>) -> Item {
    Item::structure(tag::RESPONSE_PAYLOAD, children)
}

fn invalid_field(e: MessageError) -> Failure {
    Failure::new(ResultReason::InvalidField, e.to_string())
}

/// Discover Versions: the versions both sides speak, in the server's order of preference;
/// all of the server's when the client lists none.
fn discover_versions(p: &Item) -> Result<Item, Failure> {
    kluis_kmip::message::only(p, &[tag::PROTOCOL_VERSION]).map_err(invalid_field)?;
    let asked = p
        .children_with(tag::PROTOCOL_VERSION)
        .map(ProtocolVersion::from_item)
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid_field)?;
    let answer = SUPPORTED_VERSIONS.iter().filter(|v| asked.is_empty() || asked.contains(v));
    Ok(payload(answer.map(|v| v.to_item()).collect()))
}

/// Query Function values (KMIP 1.4 section 9.1.3.2.24).
const QUERY_OPERATIONS: u32 = 1;
const QUERY_OBJECTS: u32 = 2;
const QUERY_SERVER_INFORMATION: u32 = 3;

/// Query: the operations and object types served, and who the server is. Other query
/// functions are answered with nothing, as the specification allows.
fn query(p: &Item) -> Result<Item, Failure> {
    kluis_kmip::message::only(p, &[tag::QUERY_FUNCTION]).map_err(invalid_field)?;
    let mut out = Vec::new();
    for f in p.children_with(tag::QUERY_FUNCTION) {
        match kluis_kmip::message::enumeration(f).map_err(invalid_field)? {
            QUERY_OPERATIONS => out.extend(OPERATIONS.iter().map(|o| Item::enumeration(tag::OPERATION, o.to_u32()))),
            QUERY_OBJECTS => out.extend(
                [object_type::SYMMETRIC_KEY, object_type::PUBLIC_KEY, object_type::PRIVATE_KEY, object_type::SECRET_DATA].map(|t| Item::enumeration(tag::OBJECT_TYPE, t)),
            ),
            QUERY_SERVER_INFORMATION => {
                out.push(Item::text(tag::VENDOR_IDENTIFICATION, concat!("Kluis ", env!("CARGO_PKG_VERSION"))));
                out.push(Item::structure(tag::SERVER_INFORMATION, vec![]));
            }
            _ => {}
        }
    }
    Ok(payload(out))
}

fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::Create => "create",
        Operation::CreateKeyPair => "create_key_pair",
        Operation::Register => "register",
        Operation::ReKey => "rekey",
        Operation::Locate => "locate",
        Operation::Get => "get",
        Operation::GetAttributes => "get_attributes",
        Operation::GetAttributeList => "get_attribute_list",
        Operation::AddAttribute => "add_attribute",
        Operation::ModifyAttribute => "modify_attribute",
        Operation::DeleteAttribute => "delete_attribute",
        Operation::Activate => "activate",
        Operation::Revoke => "revoke",
        Operation::Destroy => "destroy",
        Operation::Query => "query",
        Operation::DiscoverVersions => "discover_versions",
        _ => "other",
    }
}

fn result_name(r: &Result<Option<Item>, Failure>) -> &'static str {
    match r {
        Ok(_) => "success",
        Err(f) => match f.reason {
            ResultReason::ItemNotFound => "item_not_found",
            ResultReason::ResponseTooLarge => "response_too_large",
            ResultReason::AuthenticationNotSuccessful => "authentication_not_successful",
            ResultReason::InvalidMessage => "invalid_message",
            ResultReason::OperationNotSupported => "operation_not_supported",
            ResultReason::InvalidField => "invalid_field",
            ResultReason::FeatureNotSupported => "feature_not_supported",
            ResultReason::PermissionDenied => "permission_denied",
            _ => "other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discover_versions_answers_the_common_versions_newest_first() {
        let all = discover_versions(&Item::structure(tag::REQUEST_PAYLOAD, vec![])).unwrap();
        let got: Vec<_> = all.children_with(tag::PROTOCOL_VERSION).map(|v| ProtocolVersion::from_item(v).unwrap()).collect();
        assert_eq!(got, SUPPORTED_VERSIONS.to_vec());
        let asked = Item::structure(
            tag::REQUEST_PAYLOAD,
            vec![ProtocolVersion::new(2, 0).to_item(), ProtocolVersion::new(1, 0).to_item(), ProtocolVersion::new(1, 2).to_item()],
        );
        let got: Vec<_> =
            discover_versions(&asked).unwrap().children_with(tag::PROTOCOL_VERSION).map(|v| ProtocolVersion::from_item(v).unwrap()).collect();
        assert_eq!(got, vec![ProtocolVersion::new(1, 2), ProtocolVersion::new(1, 0)]);
        let none = Item::structure(tag::REQUEST_PAYLOAD, vec![ProtocolVersion::new(3, 0).to_item()]);
        assert_eq!(discover_versions(&none).unwrap().children(), Some(&[][..]));
    }

    #[test]
    fn a_newer_request_is_answered_in_the_newest_version_spoken() {
        assert_eq!(answer_version(ProtocolVersion::new(1, 2)), ProtocolVersion::new(1, 2));
        assert_eq!(answer_version(ProtocolVersion::new(2, 1)), ProtocolVersion::new(1, 4));
        assert_eq!(answer_version(ProtocolVersion::new(0, 9)), ProtocolVersion::new(1, 0));
    }

    #[test]
    fn query_lists_the_operations_served_and_refuses_a_wrong_field() {
        let p = Item::structure(tag::REQUEST_PAYLOAD, vec![Item::enumeration(tag::QUERY_FUNCTION, QUERY_OPERATIONS)]);
        let ops: Vec<_> = query(&p).unwrap().children_with(tag::OPERATION).map(|o| o.value.clone()).collect();
        assert_eq!(ops.len(), OPERATIONS.len());
        let bad = Item::structure(tag::REQUEST_PAYLOAD, vec![Item::integer(tag::QUERY_FUNCTION, 1)]);
        assert_eq!(query(&bad).unwrap_err().reason, ResultReason::InvalidField);
        let stray = Item::structure(tag::REQUEST_PAYLOAD, vec![Item::text(tag::UNIQUE_IDENTIFIER, "1")]);
        assert_eq!(query(&stray).unwrap_err().reason, ResultReason::InvalidField);
    }
}
