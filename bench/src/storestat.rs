//! `kluis-storestat STORE.redb`: what each table of a (stopped) Kluis store takes on disk.
//!
//! Prints one JSON object: the file size and, per table, its entries and redb's storage
//! figures (leaf and branch pages, stored key/value bytes, B-tree metadata, fragmentation).
//! Opens the file read-only: the server must not be running on it (redb locks the file).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use redb::{ReadOnlyDatabase, ReadableDatabase, ReadableTableMetadata, TableHandle};

/// redb's page size (the default of `redb::Builder`, which the server uses).
const PAGE_SIZE: u64 = 4096;

fn run(path: &str) -> Result<serde_json::Value, String> {
    let file_bytes = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?.len();
    let db = ReadOnlyDatabase::open(path).map_err(|e| format!("cannot open {path} read-only: {e}"))?;
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let mut tables = Vec::new();
    for handle in txn.list_tables().map_err(|e| e.to_string())? {
        let name = handle.name().to_owned();
        let table = txn.open_untyped_table(handle).map_err(|e| format!("table {name}: {e}"))?;
        let s = table.stats().map_err(|e| format!("table {name}: {e}"))?;
        tables.push(serde_json::json!({
            "name": name,
            "entries": table.len().map_err(|e| e.to_string())?,
            "tree_height": s.tree_height(),
            "leaf_pages": s.leaf_pages(),
            "branch_pages": s.branch_pages(),
            "page_bytes": (s.leaf_pages() + s.branch_pages()) * PAGE_SIZE,
            "stored_bytes": s.stored_bytes(),
            "metadata_bytes": s.metadata_bytes(),
            "fragmented_bytes": s.fragmented_bytes(),
        }));
    }
    Ok(serde_json::json!({ "file": path, "file_bytes": file_bytes, "tables": tables }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: kluis-storestat STORE.redb");
        return ExitCode::from(2);
    };
    match run(path) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kluis-storestat: {e}");
            ExitCode::FAILURE
        }
    }
}
