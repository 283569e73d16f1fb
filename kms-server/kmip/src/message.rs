//! KMIP request and response messages (KMIP 1.4 specification, section 7): a header and one
//! or more batch items, each an operation with its payload. The payloads stay TTLV items here;
//! the server's front end reads them per operation.
//!
//! Parsing is strict about the message frame: a Request Message is a Request Header followed
//! by batch items, the Batch Count matches them, every batch item has an Operation and a
//! Request Payload, and every field has its type. A frame that breaks a rule is a
//! [`MessageError`], which the server answers with Invalid Message.

use crate::tag;
use crate::ttlv::{Item, ItemType, Tag, Value};

/// A protocol version (major, minor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    pub major: i32,
    pub minor: i32,
}

impl ProtocolVersion {
    pub const fn new(major: i32, minor: i32) -> ProtocolVersion {
        ProtocolVersion { major, minor }
    }

    pub fn to_item(self) -> Item {
        Item::structure(
            tag::PROTOCOL_VERSION,
            vec![
                Item::integer(tag::PROTOCOL_VERSION_MAJOR, self.major),
                Item::integer(tag::PROTOCOL_VERSION_MINOR, self.minor),
            ],
        )
    }

    pub fn from_item(item: &Item) -> Result<ProtocolVersion, MessageError> {
        let major = int(req(item, tag::PROTOCOL_VERSION_MAJOR)?)?;
        let minor = int(req(item, tag::PROTOCOL_VERSION_MINOR)?)?;
        only(item, &[tag::PROTOCOL_VERSION_MAJOR, tag::PROTOCOL_VERSION_MINOR])?;
        Ok(ProtocolVersion { major, minor })
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The versions Kluis speaks, newest first (the order Discover Versions answers in).
pub const SUPPORTED_VERSIONS: [ProtocolVersion; 5] = [
    ProtocolVersion::new(1, 4),
    ProtocolVersion::new(1, 3),
    ProtocolVersion::new(1, 2),
    ProtocolVersion::new(1, 1),
    ProtocolVersion::new(1, 0),
];

macro_rules! kmip_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)*
            /// A value this version of Kluis does not name.
            Other(u32),
        }

        impl $name {
            pub fn from_u32(v: u32) -> $name {
                match v {
                    $($n => $name::$v,)*
                    other => $name::Other(other),
                }
            }

            pub fn to_u32(self) -> u32 {
                match self {
                    $($name::$v => $n,)*
                    $name::Other(v) => v,
                }
            }
        }
    };
}

kmip_enum!(
    /// Operation (section 9.1.3.2.27).
    Operation {
        Create = 0x01, CreateKeyPair = 0x02, Register = 0x03, ReKey = 0x04, DeriveKey = 0x05,
        Certify = 0x06, ReCertify = 0x07, Locate = 0x08, Check = 0x09, Get = 0x0A,
        GetAttributes = 0x0B, GetAttributeList = 0x0C, AddAttribute = 0x0D, ModifyAttribute = 0x0E,
        DeleteAttribute = 0x0F, ObtainLease = 0x10, GetUsageAllocation = 0x11, Activate = 0x12,
        Revoke = 0x13, Destroy = 0x14, Archive = 0x15, Recover = 0x16, Validate = 0x17, Query = 0x18,
        Cancel = 0x19, Poll = 0x1A, Notify = 0x1B, Put = 0x1C, ReKeyKeyPair = 0x1D,
        DiscoverVersions = 0x1E,
    }
);

kmip_enum!(
    /// Result Reason (section 9.1.3.2.29).
    ResultReason {
        ItemNotFound = 0x01, ResponseTooLarge = 0x02, AuthenticationNotSuccessful = 0x03,
        InvalidMessage = 0x04, OperationNotSupported = 0x05, MissingData = 0x06, InvalidField = 0x07,
        FeatureNotSupported = 0x08, OperationCanceledByRequester = 0x09, CryptographicFailure = 0x0A,
        IllegalOperation = 0x0B, PermissionDenied = 0x0C, ObjectArchived = 0x0D, IndexOutOfBounds = 0x0E,
        ApplicationNamespaceNotSupported = 0x0F, KeyFormatTypeNotSupported = 0x10,
        KeyCompressionTypeNotSupported = 0x11, EncodingOptionError = 0x12, KeyValueNotPresent = 0x13,
        AttestationRequired = 0x14, AttestationFailed = 0x15, Sensitive = 0x16, NotExtractable = 0x17,
        ObjectAlreadyExists = 0x18, GeneralFailure = 0x100,
    }
);

/// Result Status (section 9.1.3.2.28).
pub mod result_status {
    pub const SUCCESS: u32 = 0;
    pub const OPERATION_FAILED: u32 = 1;
}

/// Batch Error Continuation Option (section 9.1.3.2.30): what to do after a failed item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContinuationOption {
    /// Go on with the next item (value 1).
    Continue,
    /// Stop; the items not run are reported as Operation Failed (value 2, the default).
    Stop,
    /// Undo the items done; Kluis cannot undo (value 3), so it is refused.
    Undo,
}

/// A frame that breaks the message rules; answered with Invalid Message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the message is a {found}, not a Request Message (0x420078)")]
    NotARequest { found: Tag },
    #[error("the message is a {found}, not a Response Message (0x42007B)")]
    NotAResponse { found: Tag },
    #[error("{field} is missing from {within}")]
    Missing { field: Tag, within: Tag },
    #[error("{field} appears more than once in {within}")]
    Repeated { field: Tag, within: Tag },
    #[error("{field} is not a field of {within}")]
    Unexpected { field: Tag, within: Tag },
    #[error("{field} is a {found:?}, not a {expected:?}")]
    WrongType { field: Tag, expected: ItemType, found: ItemType },
    #[error("Batch Count says {declared} but the message has {found} batch items")]
    BatchCount { declared: i32, found: usize },
    #[error("the message has no batch item")]
    NoBatchItem,
    #[error("Batch Error Continuation Option {0} is not 1, 2 or 3")]
    BadContinuation(u32),
    #[error("Maximum Response Size {0} is not positive")]
    BadMaximumResponseSize(i32),
}

/// The parsed Request Header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub version: ProtocolVersion,
    pub max_response_size: Option<i32>,
    pub continuation: ContinuationOption,
    pub batch_order: bool,
    pub batch_count: i32,
}

/// One batch item of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestItem {
    pub operation: Operation,
    pub unique_id: Option<Vec<u8>>,
    pub payload: Item,
}

/// A parsed Request Message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub header: RequestHeader,
    pub items: Vec<RequestItem>,
}

/// Header fields Kluis reads past without acting on them: authentication is the TLS client
/// certificate, asynchronous operation and attestation are not offered, and correlation
/// values are for the client's own logs.
const IGNORED_HEADER_FIELDS: [Tag; 6] = [
    tag::AUTHENTICATION,
    Tag::new(0x420007), // Asynchronous Indicator
    Tag::new(0x4200D3), // Attestation Capable Indicator
    Tag::new(0x4200C7), // Attestation Type
    Tag::new(0x420105), // Client Correlation Value
    Tag::new(0x420106), // Server Correlation Value
];

const MESSAGE_EXTENSION: Tag = Tag::new(0x420051);

impl Request {
    /// Reads a Request Message from its decoded TTLV.
    pub fn from_item(item: &Item) -> Result<Request, MessageError> {
        if item.tag != tag::REQUEST_MESSAGE {
            return Err(MessageError::NotARequest { found: item.tag });
        }
        let children = structure(item)?;
        let header_item = children.first().ok_or(MessageError::Missing { field: tag::REQUEST_HEADER, within: item.tag })?;
        if header_item.tag != tag::REQUEST_HEADER {
            return Err(MessageError::Missing { field: tag::REQUEST_HEADER, within: item.tag });
        }
        let header = RequestHeader::from_item(header_item)?;
        let mut items = Vec::new();
        for c in &children[1..] {
            if c.tag != tag::BATCH_ITEM {
                return Err(if c.tag == tag::REQUEST_HEADER {
                    MessageError::Repeated { field: c.tag, within: item.tag }
                } else {
                    MessageError::Unexpected { field: c.tag, within: item.tag }
                });
            }
            items.push(RequestItem::from_item(c)?);
        }
        if items.is_empty() {
            return Err(MessageError::NoBatchItem);
        }
        if usize::try_from(header.batch_count).ok() != Some(items.len()) {
            return Err(MessageError::BatchCount { declared: header.batch_count, found: items.len() });
        }
        Ok(Request { header, items })
    }

    /// The request as TTLV (for clients and tests).
    pub fn to_item(&self) -> Item {
        let h = &self.header;
        let mut header = vec![h.version.to_item()];
        if let Some(m) = h.max_response_size {
            header.push(Item::integer(tag::MAXIMUM_RESPONSE_SIZE, m));
        }
        // Stop and ordered execution are the defaults, left out as clients do.
        match h.continuation {
            ContinuationOption::Stop => {}
            ContinuationOption::Continue => header.push(Item::enumeration(tag::BATCH_ERROR_CONTINUATION_OPTION, 1)),
            ContinuationOption::Undo => header.push(Item::enumeration(tag::BATCH_ERROR_CONTINUATION_OPTION, 3)),
        }
        if !h.batch_order {
            header.push(Item::boolean(tag::BATCH_ORDER_OPTION, false));
        }
        header.push(Item::integer(tag::BATCH_COUNT, h.batch_count));
        let mut children = vec![Item::structure(tag::REQUEST_HEADER, header)];
        for i in &self.items {
            let mut b = vec![Item::enumeration(tag::OPERATION, i.operation.to_u32())];
            if let Some(id) = &i.unique_id {
                b.push(Item::bytes(tag::UNIQUE_BATCH_ITEM_ID, id.clone()));
            }
            b.push(i.payload.clone());
            children.push(Item::structure(tag::BATCH_ITEM, b));
        }
        Item::structure(tag::REQUEST_MESSAGE, children)
    }
}

impl RequestHeader {
    fn from_item(item: &Item) -> Result<RequestHeader, MessageError> {
        let version = ProtocolVersion::from_item(req(item, tag::PROTOCOL_VERSION)?)?;
        let max_response_size = opt(item, tag::MAXIMUM_RESPONSE_SIZE)?.map(int).transpose()?;
        if let Some(m) = max_response_size
            && m <= 0
        {
            return Err(MessageError::BadMaximumResponseSize(m));
        }
        let continuation = match opt(item, tag::BATCH_ERROR_CONTINUATION_OPTION)?.map(enumeration).transpose()? {
            None | Some(2) => ContinuationOption::Stop,
            Some(1) => ContinuationOption::Continue,
            Some(3) => ContinuationOption::Undo,
            Some(v) => return Err(MessageError::BadContinuation(v)),
        };
        let batch_order = opt(item, tag::BATCH_ORDER_OPTION)?.map(boolean).transpose()?.unwrap_or(true);
        if let Some(t) = opt(item, tag::TIME_STAMP)? {
            expect_type(t, ItemType::DateTime)?;
        }
        let batch_count = int(req(item, tag::BATCH_COUNT)?)?;
        let mut known = vec![
            tag::PROTOCOL_VERSION,
            tag::MAXIMUM_RESPONSE_SIZE,
            tag::BATCH_ERROR_CONTINUATION_OPTION,
            tag::BATCH_ORDER_OPTION,
            tag::TIME_STAMP,
            tag::BATCH_COUNT,
        ];
        known.extend_from_slice(&IGNORED_HEADER_FIELDS);
        only(item, &known)?;
        Ok(RequestHeader { version, max_response_size, continuation, batch_order, batch_count })
    }
}

impl RequestItem {
    fn from_item(item: &Item) -> Result<RequestItem, MessageError> {
        let operation = Operation::from_u32(enumeration(req(item, tag::OPERATION)?)?);
        let unique_id = opt(item, tag::UNIQUE_BATCH_ITEM_ID)?.map(byte_string).transpose()?;
        let payload = req(item, tag::REQUEST_PAYLOAD)?;
        expect_type(payload, ItemType::Structure)?;
        only(item, &[tag::OPERATION, tag::UNIQUE_BATCH_ITEM_ID, tag::REQUEST_PAYLOAD, MESSAGE_EXTENSION])?;
        Ok(RequestItem { operation, unique_id, payload: payload.clone() })
    }
}

/// Why a batch item failed: a reason from the specification's list and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: ResultReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: ResultReason, message: impl Into<String>) -> Failure {
        Failure { reason, message: message.into() }
    }
}

/// One batch item of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseItem {
    pub operation: Option<Operation>,
    pub unique_id: Option<Vec<u8>>,
    /// The Response Payload on success (some operations have none), or why it failed.
    pub result: Result<Option<Item>, Failure>,
}

/// A Response Message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub version: ProtocolVersion,
    pub time_stamp: i64,
    pub items: Vec<ResponseItem>,
}

impl Response {
    pub fn to_item(&self) -> Item {
        let header = Item::structure(
            tag::RESPONSE_HEADER,
            vec![
                self.version.to_item(),
                Item::date_time(tag::TIME_STAMP, self.time_stamp),
                Item::integer(tag::BATCH_COUNT, i32::try_from(self.items.len()).unwrap_or(i32::MAX)),
            ],
        );
        let mut children = vec![header];
        for i in &self.items {
            let mut b = Vec::new();
            if let Some(op) = i.operation {
                b.push(Item::enumeration(tag::OPERATION, op.to_u32()));
            }
            if let Some(id) = &i.unique_id {
                b.push(Item::bytes(tag::UNIQUE_BATCH_ITEM_ID, id.clone()));
            }
            match &i.result {
                Ok(payload) => {
                    b.push(Item::enumeration(tag::RESULT_STATUS, result_status::SUCCESS));
                    if let Some(p) = payload {
                        b.push(p.clone());
                    }
                }
                Err(f) => {
                    b.push(Item::enumeration(tag::RESULT_STATUS, result_status::OPERATION_FAILED));
                    b.push(Item::enumeration(tag::RESULT_REASON, f.reason.to_u32()));
                    b.push(Item::text(tag::RESULT_MESSAGE, f.message.clone()));
                }
            }
            children.push(Item::structure(tag::BATCH_ITEM, b));
        }
        Item::structure(tag::RESPONSE_MESSAGE, children)
    }

    /// Reads a Response Message (for clients and tests).
    pub fn from_item(item: &Item) -> Result<Response, MessageError> {
        if item.tag != tag::RESPONSE_MESSAGE {
            return Err(MessageError::NotAResponse { found: item.tag });
        }
        let header = req(item, tag::RESPONSE_HEADER)?;
        let version = ProtocolVersion::from_item(req(header, tag::PROTOCOL_VERSION)?)?;
        let time_stamp = match &req(header, tag::TIME_STAMP)?.value {
            Value::DateTime(t) => *t,
            other => {
                return Err(MessageError::WrongType {
                    field: tag::TIME_STAMP,
                    expected: ItemType::DateTime,
                    found: other.item_type(),
                });
            }
        };
        let declared = int(req(header, tag::BATCH_COUNT)?)?;
        let mut items = Vec::new();
        for b in item.children_with(tag::BATCH_ITEM) {
            let operation = opt(b, tag::OPERATION)?.map(enumeration).transpose()?.map(Operation::from_u32);
            let unique_id = opt(b, tag::UNIQUE_BATCH_ITEM_ID)?.map(byte_string).transpose()?;
            let status = enumeration(req(b, tag::RESULT_STATUS)?)?;
            let result = if status == result_status::SUCCESS {
                Ok(opt(b, tag::RESPONSE_PAYLOAD)?.cloned())
            } else {
                let reason = opt(b, tag::RESULT_REASON)?.map(enumeration).transpose()?.unwrap_or(0);
                let message = match opt(b, tag::RESULT_MESSAGE)? {
                    Some(Item { value: Value::TextString(s), .. }) => s.clone(),
                    _ => String::new(),
                };
                Err(Failure { reason: ResultReason::from_u32(reason), message })
            };
            items.push(ResponseItem { operation, unique_id, result });
        }
        if usize::try_from(declared).ok() != Some(items.len()) {
            return Err(MessageError::BatchCount { declared, found: items.len() });
        }
        Ok(Response { version, time_stamp, items })
    }
}

// Field access with typed errors, shared by the payload readers of the front end.

/// The children of a structure.
pub fn structure(item: &Item) -> Result<&[Item], MessageError> {
    match &item.value {
        Value::Structure(c) => Ok(c),
        other => Err(MessageError::WrongType { field: item.tag, expected: ItemType::Structure, found: other.item_type() }),
    }
}

/// The one child with this tag, if there is one; more than one is an error.
pub fn opt(item: &Item, field: Tag) -> Result<Option<&Item>, MessageError> {
    let mut found = item.children_with(field);
    let first = found.next();
    if found.next().is_some() {
        return Err(MessageError::Repeated { field, within: item.tag });
    }
    Ok(first)
}

/// The one child with this tag.
pub fn req(item: &Item, field: Tag) -> Result<&Item, MessageError> {
    structure(item)?;
    opt(item, field)?.ok_or(MessageError::Missing { field, within: item.tag })
}

/// Refuses any child whose tag is not in `allowed`.
pub fn only(item: &Item, allowed: &[Tag]) -> Result<(), MessageError> {
    match structure(item)?.iter().find(|c| !allowed.contains(&c.tag)) {
        Some(c) => Err(MessageError::Unexpected { field: c.tag, within: item.tag }),
        None => Ok(()),
    }
}

fn expect_type(item: &Item, expected: ItemType) -> Result<(), MessageError> {
    let found = item.value.item_type();
    if found == expected { Ok(()) } else { Err(MessageError::WrongType { field: item.tag, expected, found }) }
}

pub fn int(item: &Item) -> Result<i32, MessageError> {
    match item.value {
        Value::Integer(v) => Ok(v),
        ref other => Err(MessageError::WrongType { field: item.tag, expected: ItemType::Integer, found: other.item_type() }),
    }
}

pub fn enumeration(item: &Item) -> Result<u32, MessageError> {
    match item.value {
        Value::Enumeration(v) => Ok(v),
        ref other => Err(MessageError::WrongType { field: item.tag, expected: ItemType::Enumeration, found: other.item_type() }),
    }
}

pub fn boolean(item: &Item) -> Result<bool, MessageError> {
    match item.value {
        Value::Boolean(v) => Ok(v),
        ref other => Err(MessageError::WrongType { field: item.tag, expected: ItemType::Boolean, found: other.item_type() }),
    }
}

pub fn date_time(item: &Item) -> Result<i64, MessageError> {
    match item.value {
        Value::DateTime(v) => Ok(v),
        ref other => Err(MessageError::WrongType { field: item.tag, expected: ItemType::DateTime, found: other.item_type() }),
    }
}

pub fn text(item: &Item) -> Result<&str, MessageError> {
    match &item.value {
        Value::TextString(s) => Ok(s),
        other => Err(MessageError::WrongType { field: item.tag, expected: ItemType::TextString, found: other.item_type() }),
    }
}

fn byte_string(item: &Item) -> Result<Vec<u8>, MessageError> {
    match &item.value {
        Value::ByteString(b) => Ok(b.to_vec()),
        other => Err(MessageError::WrongType { field: item.tag, expected: ItemType::ByteString, found: other.item_type() }),
    }
}
