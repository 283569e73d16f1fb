//! TTLV, the binary encoding of KMIP (KMIP 1.4 specification, section 9.1): every item is a
//! 3-byte tag, a 1-byte type, a 4-byte big-endian length and a value padded with zero bytes
//! to a multiple of 8. A Structure's value is its child items, one after another.
//!
//! The decoder is strict, because its input comes from the network before any check of who
//! sent it:
//! - the whole input is one item, nothing before or after it ([`TtlvError::TrailingBytes`]);
//! - a message is at most [`Limits::max_len`] bytes and nests at most [`Limits::max_depth`]
//!   structures; [`message_len`] checks a declared length against the limit from the first 8
//!   bytes, so nothing is allocated for a size that will be refused;
//! - fixed-size types have exactly their length (Integer 4, Long Integer 8, ...), a Big
//!   Integer's length is a non-zero multiple of 8, a Boolean is 0 or 1, a Text String is UTF-8;
//! - padding bytes are zero, and a child never reaches past the end of its structure;
//! - a tag is in the KMIP range (0x42xxxx) or the extension range (0x54xxxx).
//!
//! Every error names the byte offset where the input went wrong. Byte and Big Integer values
//! (key material travels in them) are held in [`Zeroizing`] buffers, and `Debug` prints only
//! their length.

use std::fmt;

use zeroize::Zeroizing;

/// Bytes of an item's tag, type and length.
pub const HEADER_LEN: usize = 8;

/// A KMIP tag (24 bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(u32);

impl Tag {
    /// A tag from its number; only the low 24 bits count.
    pub const fn new(value: u32) -> Tag {
        Tag(value & 0x00ff_ffff)
    }

    pub const fn value(self) -> u32 {
        self.0
    }

    /// Whether the tag lies in the range the specification defines (0x42xxxx) or leaves to
    /// extensions (0x54xxxx); everything else is reserved.
    pub const fn is_valid(self) -> bool {
        matches!(self.0 >> 16, 0x42 | 0x54)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:06X}", self.0)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:06X}", self.0)
    }
}

/// The item types of TTLV (section 9.1.1.2; Date Time Extended is KMIP 2.0's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ItemType {
    Structure = 0x01,
    Integer = 0x02,
    LongInteger = 0x03,
    BigInteger = 0x04,
    Enumeration = 0x05,
    Boolean = 0x06,
    TextString = 0x07,
    ByteString = 0x08,
    DateTime = 0x09,
    Interval = 0x0A,
    DateTimeExtended = 0x0B,
}

impl ItemType {
    fn from_byte(b: u8) -> Option<ItemType> {
        Some(match b {
            0x01 => ItemType::Structure,
            0x02 => ItemType::Integer,
            0x03 => ItemType::LongInteger,
            0x04 => ItemType::BigInteger,
            0x05 => ItemType::Enumeration,
            0x06 => ItemType::Boolean,
            0x07 => ItemType::TextString,
            0x08 => ItemType::ByteString,
            0x09 => ItemType::DateTime,
            0x0A => ItemType::Interval,
            0x0B => ItemType::DateTimeExtended,
            _ => return None,
        })
    }

    /// The one length a fixed-size type has.
    fn fixed_len(self) -> Option<u32> {
        match self {
            ItemType::Integer | ItemType::Enumeration | ItemType::Interval => Some(4),
            ItemType::LongInteger | ItemType::Boolean | ItemType::DateTime | ItemType::DateTimeExtended => Some(8),
            ItemType::Structure | ItemType::BigInteger | ItemType::TextString | ItemType::ByteString => None,
        }
    }
}

/// An item's value.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    /// Two's complement, big-endian, a multiple of 8 bytes (sign-extended), as on the wire.
    BigInteger(Zeroizing<Vec<u8>>),
    Enumeration(u32),
    Boolean(bool),
    TextString(String),
    ByteString(Zeroizing<Vec<u8>>),
    /// Seconds since the Unix epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
    /// Microseconds since the Unix epoch (KMIP 2.0).
    DateTimeExtended(i64),
}

impl Value {
    pub fn item_type(&self) -> ItemType {
        match self {
            Value::Structure(_) => ItemType::Structure,
            Value::Integer(_) => ItemType::Integer,
            Value::LongInteger(_) => ItemType::LongInteger,
            Value::BigInteger(_) => ItemType::BigInteger,
            Value::Enumeration(_) => ItemType::Enumeration,
            Value::Boolean(_) => ItemType::Boolean,
            Value::TextString(_) => ItemType::TextString,
            Value::ByteString(_) => ItemType::ByteString,
            Value::DateTime(_) => ItemType::DateTime,
            Value::Interval(_) => ItemType::Interval,
            Value::DateTimeExtended(_) => ItemType::DateTimeExtended,
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::LongInteger(v) => write!(f, "LongInteger({v})"),
            // Key material travels in byte strings and big integers: never printed.
            Value::BigInteger(b) => write!(f, "BigInteger({} bytes)", b.len()),
            Value::Enumeration(v) => write!(f, "Enumeration(0x{v:08X})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::TextString(s) => write!(f, "TextString({s:?})"),
            Value::ByteString(b) => write!(f, "ByteString({} bytes)", b.len()),
            Value::DateTime(v) => write!(f, "DateTime({v})"),
            Value::Interval(v) => write!(f, "Interval({v})"),
            Value::DateTimeExtended(v) => write!(f, "DateTimeExtended({v})"),
        }
    }
}

/// One TTLV item.
#[derive(Clone, PartialEq, Eq)]
pub struct Item {
    pub tag: Tag,
    pub value: Value,
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {:?}", self.tag, self.value)
    }
}

impl Item {
    pub fn new(tag: Tag, value: Value) -> Item {
        Item { tag, value }
    }

    pub fn structure(tag: Tag, children: Vec<Item>) -> Item {
        Item::new(tag, Value::Structure(children))
    }

    pub fn integer(tag: Tag, v: i32) -> Item {
        Item::new(tag, Value::Integer(v))
    }

    pub fn long_integer(tag: Tag, v: i64) -> Item {
        Item::new(tag, Value::LongInteger(v))
    }

    pub fn enumeration(tag: Tag, v: u32) -> Item {
        Item::new(tag, Value::Enumeration(v))
    }

    pub fn boolean(tag: Tag, v: bool) -> Item {
        Item::new(tag, Value::Boolean(v))
    }

    pub fn text(tag: Tag, v: impl Into<String>) -> Item {
        Item::new(tag, Value::TextString(v.into()))
    }

    pub fn bytes(tag: Tag, v: impl Into<Vec<u8>>) -> Item {
        Item::new(tag, Value::ByteString(Zeroizing::new(v.into())))
    }

    pub fn date_time(tag: Tag, secs: i64) -> Item {
        Item::new(tag, Value::DateTime(secs))
    }

    /// The children of a structure; `None` for any other type.
    pub fn children(&self) -> Option<&[Item]> {
        match &self.value {
            Value::Structure(c) => Some(c),
            _ => None,
        }
    }

    /// The first child with this tag.
    pub fn child(&self, tag: Tag) -> Option<&Item> {
        self.children()?.iter().find(|c| c.tag == tag)
    }

    /// Every child with this tag, in order.
    pub fn children_with(&self, tag: Tag) -> impl Iterator<Item = &Item> {
        self.children().unwrap_or(&[]).iter().filter(move |c| c.tag == tag)
    }

    /// The number of bytes [`encode`] writes for this item.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + padded(self.value_len())
    }

    fn value_len(&self) -> usize {
        match &self.value {
            Value::Structure(c) => c.iter().map(Item::encoded_len).sum(),
            Value::Integer(_) | Value::Enumeration(_) | Value::Interval(_) => 4,
            Value::LongInteger(_) | Value::Boolean(_) | Value::DateTime(_) | Value::DateTimeExtended(_) => 8,
            Value::BigInteger(b) => b.len(),
            Value::TextString(s) => s.len(),
            Value::ByteString(b) => b.len(),
        }
    }
}

/// Bounds on what the decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest whole message, header included.
    pub max_len: usize,
    /// The deepest nesting of structures; the outermost structure is depth 1.
    pub max_depth: usize,
}

impl Default for Limits {
    /// 1 MiB and 16 levels: the deepest message of the KMIP profiles (a Register of a
    /// transparent RSA private key with attributes) nests 9.
    fn default() -> Limits {
        Limits { max_len: 1 << 20, max_depth: 16 }
    }
}

/// What is wrong with TTLV input; every variant names the byte offset of the item at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlvError {
    #[error("TTLV truncated at byte {offset}: {needed} more bytes needed")]
    Truncated { offset: usize, needed: usize },
    #[error("TTLV message of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("TTLV nests deeper than {max} structures at byte {offset}")]
    TooDeep { offset: usize, max: usize },
    #[error("TTLV tag {tag} at byte {offset} is outside the KMIP (0x42xxxx) and extension (0x54xxxx) ranges")]
    BadTag { offset: usize, tag: Tag },
    #[error("TTLV item type 0x{ty:02X} at byte {offset} is not a KMIP type")]
    BadType { offset: usize, ty: u8 },
    #[error("TTLV {ty:?} at byte {offset} has length {len}, which that type cannot have")]
    BadLength { offset: usize, ty: ItemType, len: u32 },
    #[error("TTLV item at byte {offset} reaches past the end of its structure")]
    Overrun { offset: usize },
    #[error("TTLV padding at byte {offset} is not zero")]
    NonZeroPadding { offset: usize },
    #[error("TTLV Boolean at byte {offset} is neither 0 nor 1")]
    BadBoolean { offset: usize },
    #[error("TTLV Text String at byte {offset} is not UTF-8")]
    BadUtf8 { offset: usize },
    #[error("TTLV message at byte 0 is a {ty:?}, not a Structure")]
    NotAStructure { ty: ItemType },
    #[error("{len} bytes after the TTLV item that ends at byte {offset}")]
    TrailingBytes { offset: usize, len: usize },
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// The total length of the message whose first [`HEADER_LEN`] bytes are `header`: checks that
/// it is a Structure with a valid tag and a length within `limits`, so a reader knows how
/// many more bytes to read, and never allocates for a declared size it would refuse.
pub fn message_len(header: &[u8; HEADER_LEN], limits: &Limits) -> Result<usize, TtlvError> {
    let tag = Tag::new(u32::from_be_bytes([0, header[0], header[1], header[2]]));
    if !tag.is_valid() {
        return Err(TtlvError::BadTag { offset: 0, tag });
    }
    let ty = ItemType::from_byte(header[3]).ok_or(TtlvError::BadType { offset: 0, ty: header[3] })?;
    if ty != ItemType::Structure {
        return Err(TtlvError::NotAStructure { ty });
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let total = HEADER_LEN as u64 + u64::from(len);
    if total > limits.max_len as u64 {
        return Err(TtlvError::TooLarge { len: total, max: limits.max_len });
    }
    if !len.is_multiple_of(8) {
        return Err(TtlvError::BadLength { offset: 0, ty, len });
    }
    Ok(total as usize)
}

/// Decodes `bytes`, which must hold exactly one item.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Item, TtlvError> {
    if bytes.len() > limits.max_len {
        return Err(TtlvError::TooLarge { len: bytes.len() as u64, max: limits.max_len });
    }
    let mut d = Decoder { buf: bytes, pos: 0, max_depth: limits.max_depth };
    let item = d.item(bytes.len(), 0, false)?;
    if d.pos != bytes.len() {
        return Err(TtlvError::TrailingBytes { offset: d.pos, len: bytes.len() - d.pos });
    }
    Ok(item)
}

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    max_depth: usize,
}

impl Decoder<'_> {
    /// Reads one item that must end at or before `end`: the end of the input, or of the
    /// structure that encloses it (`inside`; that structure already fits in the input).
    /// `depth` structures enclose it.
    fn item(&mut self, end: usize, depth: usize, inside: bool) -> Result<Item, TtlvError> {
        let offset = self.pos;
        let header = self.take(end, HEADER_LEN, offset, inside)?;
        let tag = Tag::new(u32::from_be_bytes([0, header[0], header[1], header[2]]));
        let ty_byte = header[3];
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if !tag.is_valid() {
            return Err(TtlvError::BadTag { offset, tag });
        }
        let ty = ItemType::from_byte(ty_byte).ok_or(TtlvError::BadType { offset, ty: ty_byte })?;
        if let Some(fixed) = ty.fixed_len()
            && len != fixed
        {
            return Err(TtlvError::BadLength { offset, ty, len });
        }
        if matches!(ty, ItemType::Structure | ItemType::BigInteger) && !len.is_multiple_of(8)
            || ty == ItemType::BigInteger && len == 0
        {
            return Err(TtlvError::BadLength { offset, ty, len });
        }
        let len = len as usize;
        let value_start = self.pos;
        // The value and its padding must fit in what remains of the enclosing item.
        let room = end - value_start;
        let full = padded(len);
        if full > room {
            return Err(if inside { TtlvError::Overrun { offset } } else { TtlvError::Truncated { offset, needed: full - room } });
        }
        let value = if ty == ItemType::Structure {
            if depth + 1 > self.max_depth {
                return Err(TtlvError::TooDeep { offset, max: self.max_depth });
            }
            let stop = value_start + len;
            let mut children = Vec::new();
            while self.pos < stop {
                children.push(self.item(stop, depth + 1, true)?);
            }
            Value::Structure(children)
        } else {
            let raw = &self.buf[value_start..value_start + len];
            let pad = &self.buf[value_start + len..value_start + full];
            if pad.iter().any(|&b| b != 0) {
                return Err(TtlvError::NonZeroPadding { offset: value_start + len });
            }
            self.pos = value_start + full;
            let b4 = || [raw[0], raw[1], raw[2], raw[3]];
            let b8 = || [raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]];
            match ty {
                ItemType::Integer => Value::Integer(i32::from_be_bytes(b4())),
                ItemType::Enumeration => Value::Enumeration(u32::from_be_bytes(b4())),
                ItemType::Interval => Value::Interval(u32::from_be_bytes(b4())),
                ItemType::LongInteger => Value::LongInteger(i64::from_be_bytes(b8())),
                ItemType::DateTime => Value::DateTime(i64::from_be_bytes(b8())),
                ItemType::DateTimeExtended => Value::DateTimeExtended(i64::from_be_bytes(b8())),
                ItemType::Boolean => match u64::from_be_bytes(b8()) {
                    0 => Value::Boolean(false),
                    1 => Value::Boolean(true),
                    _ => return Err(TtlvError::BadBoolean { offset }),
                },
                ItemType::BigInteger => Value::BigInteger(Zeroizing::new(raw.to_vec())),
                ItemType::ByteString => Value::ByteString(Zeroizing::new(raw.to_vec())),
                ItemType::TextString => match std::str::from_utf8(raw) {
                    Ok(s) => Value::TextString(s.to_owned()),
                    Err(_) => return Err(TtlvError::BadUtf8 { offset }),
                },
                ItemType::Structure => unreachable!("handled above"),
            }
        };
        Ok(Item { tag, value })
    }

    fn take(&mut self, end: usize, n: usize, offset: usize, inside: bool) -> Result<&[u8], TtlvError> {
        let room = end - self.pos;
        if n > room {
            return Err(if inside { TtlvError::Overrun { offset } } else { TtlvError::Truncated { offset, needed: n - room } });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

/// What cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("item {tag} has a value of {len} bytes; TTLV lengths stop at 4 GiB")]
    TooLong { tag: Tag, len: usize },
    #[error("Big Integer {tag} has {len} bytes, which is not a non-zero multiple of 8")]
    BigIntegerLength { tag: Tag, len: usize },
    #[error("tag {tag} is outside the KMIP and extension ranges")]
    BadTag { tag: Tag },
}

/// Encodes one item. The buffer is sized before writing (no reallocation leaves copies of key
/// material behind) and is zeroed when dropped.
pub fn encode(item: &Item) -> Result<Zeroizing<Vec<u8>>, EncodeError> {
    let mut out = Zeroizing::new(Vec::with_capacity(item.encoded_len()));
    encode_into(item, &mut out)?;
    Ok(out)
}

fn encode_into(item: &Item, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let tag = item.tag;
    if !tag.is_valid() {
        return Err(EncodeError::BadTag { tag });
    }
    let len = item.value_len();
    let len32 = u32::try_from(len).map_err(|_| EncodeError::TooLong { tag, len })?;
    out.extend_from_slice(&tag.value().to_be_bytes()[1..]);
    out.push(item.value.item_type() as u8);
    out.extend_from_slice(&len32.to_be_bytes());
    match &item.value {
        Value::Structure(children) => {
            for c in children {
                encode_into(c, out)?;
            }
        }
        Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
        Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
        Value::LongInteger(v) | Value::DateTime(v) | Value::DateTimeExtended(v) => out.extend_from_slice(&v.to_be_bytes()),
        Value::Boolean(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
        Value::BigInteger(b) => {
            if b.is_empty() || !b.len().is_multiple_of(8) {
                return Err(EncodeError::BigIntegerLength { tag, len: b.len() });
            }
            out.extend_from_slice(b)
        }
        Value::TextString(s) => out.extend_from_slice(s.as_bytes()),
        Value::ByteString(b) => out.extend_from_slice(b),
    }
    out.resize(out.len() + padded(len) - len, 0);
    Ok(())
}

/// A big-endian unsigned magnitude as a KMIP Big Integer: sign-extended with zero bytes to a
/// multiple of 8, with at least one leading zero bit so it reads as non-negative.
pub fn big_integer_from_unsigned(magnitude: &[u8]) -> Zeroizing<Vec<u8>> {
    let start = magnitude.iter().position(|&b| b != 0).unwrap_or(magnitude.len());
    let digits = &magnitude[start..];
    let need = digits.len() + usize::from(digits.first().is_some_and(|&b| b & 0x80 != 0));
    let total = padded(need.max(1));
    let mut out = Zeroizing::new(vec![0u8; total]);
    out[total - digits.len()..].copy_from_slice(digits);
    out
}

/// The unsigned big-endian magnitude of a non-negative Big Integer, without leading zeros;
/// `None` if it is negative.
pub fn big_integer_to_unsigned(value: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if value.first().is_some_and(|&b| b & 0x80 != 0) {
        return None;
    }
    let start = value.iter().position(|&b| b != 0).unwrap_or(value.len());
    Some(Zeroizing::new(value[start..].to_vec()))
}
