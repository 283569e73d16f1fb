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

use crate::auth::{AuthError, Authenticator, Principal};
use crate::keys::KeyManager;
use crate::metrics::Metrics;
use crate::tls::Conn;

/// The operations this server answers (Query lists them).
pub const OPERATIONS: [Operation; 2] = [Operation::DiscoverVersions, Operation::Query];

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
    authn: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    limits: ttlv::Limits,
}

impl Kmip {
    pub fn new(keys: Arc<KeyManager>, authn: Arc<Authenticator>, metrics: Arc<Metrics>) -> Self {
        Self { keys, authn, metrics, limits: ttlv::Limits::default() }
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
        self.metrics.kmip("none", "invalid_message");
        let response = Response {
            version: ProtocolVersion::new(1, 0),
            time_stamp: self.keys.now(),
            items: vec![ResponseItem {
                operation: None,
                unique_id: None,
                result: Err(Failure::new(ResultReason::InvalidMessage, e.to_string())),
            }],
        };
        if let Ok(bytes) = ttlv::encode(&response.to_item()) {
            let _ = conn.write_all(&bytes).await;
            let _ = conn.shutdown().await;
        }
        Err(ConnError::Frame(e))
    }

    /// A message that decoded but is no valid request: one failed batch item.
    fn invalid(&self, item: &Item, e: &MessageError) -> Response {
        self.metrics.kmip("none", "invalid_message");
        // Answer in the client's version when its header said one.
        let version = item
            .child(tag::REQUEST_HEADER)
            .and_then(|h| h.child(tag::PROTOCOL_VERSION))
            .and_then(|v| ProtocolVersion::from_item(v).ok())
            .map_or(ProtocolVersion::new(1, 0), answer_version);
        Response {
            version,
            time_stamp: self.keys.now(),
            items: vec![ResponseItem { operation: None, unique_id: None, result: Err(Failure::new(ResultReason::InvalidMessage, e.to_string())) }],
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
                self.run(who, item).await
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
    async fn run(&self, _who: &Principal, item: &RequestItem) -> Result<Option<Item>, Failure> {
        match item.operation {
            Operation::DiscoverVersions => discover_versions(&item.payload).map(Some),
            Operation::Query => query(&item.payload).map(Some),
            other => Err(Failure::new(
                ResultReason::OperationNotSupported,
                format!("operation {} is not supported by this server (Query lists those that are)", operation_name(other)),
            )),
        }
    }
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
            // No managed objects are served yet: the list is empty.
            QUERY_OBJECTS => {}
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
