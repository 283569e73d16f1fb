//! Unsealing arbitrary bytes must never panic, hang or write unauthenticated
//! plaintext: the header parser alone, the header reader, a whole unseal with
//! a fixed recovery identity and a fixed Kluis data key, and the payload
//! reader under a fixed file key (one chunk per batch, two threads).
//!
//! Run: `cargo +nightly fuzz run header -- -max_total_time=60` (from the repository root).
//! The seeds in corpus/header are age files for the fixed identity below, so
//! mutations of their payload get past the header MAC.
#![no_main]

use std::io;

use age_core::format::FileKey;
use kluis_age::sealed::{KluisIdentity, KluisStanza, unseal};
use kluis_age::secret::DataKey;
use kluis_age::stream::{Tuning, header, open_payload};
use libfuzzer_sys::fuzz_target;

/// A throwaway test identity (its recipient: age18jtv3trywy6cr4g293a86q7m8ndnc0qaczxwn5e8wnmhuavwl58q64hrwc).
const IDENTITY: &str = "AGE-SECRET-KEY-1Y0EDUWLELU6Q0YP8WCFW6Q5S60CKLLUD0DU6QJTPQA0TYZG57TEQU3WNF4";

fn data_key(_: &KluisStanza) -> Result<DataKey, &'static str> {
    DataKey::from_slice(&[7u8; 32]).ok_or("fuzz")
}

/// Counts the bytes written.
struct Count(u64);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = header::parse(data);
    let _ = header::read(&mut &data[..]);

    let id: age::x25519::Identity = IDENTITY.parse().expect("fixed identity");
    let kluis = KluisIdentity::new(data_key);
    let mut out = Count(0);
    if let Ok((_, moved)) = unseal(data, Some(&kluis), &[&id], &mut out) {
        assert_eq!(moved.plaintext_bytes, out.0);
    }

    let fk = FileKey::new(Box::new([0x42; 16]));
    let mut out = Count(0);
    let tuning = Tuning { workers: 2, batch_chunks: 1 };
    if let Ok(n) = open_payload(&fk, &mut &data[..], &mut out, tuning) {
        // Opened: so the sizes add up.
        assert_eq!(n, out.0);
        assert!(data.len() as u64 >= 16 + n + 16);
    }
});
