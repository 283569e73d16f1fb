//! Replays every seed (`fuzz/corpus/TARGET/`) and every past finding
//! (`fuzz/regressions/TARGET/`) through its target, on the stable toolchain: CI checks
//! that none of them panics. And the seeds named `valid-*` are valid inputs today (each is
//! accepted by its parser), so the corpora keep starting the fuzzer deep in the format;
//! when a format changes, `scripts/fuzz seeds` makes them again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kluis_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

#[test]
fn every_seed_and_regression_file_runs_without_a_panic() {
    let mut seen = 0;
    for (name, body) in TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(name));
        assert!(!seeds.is_empty(), "target {name} has no seed in fuzz/corpus/{name}");
        for f in seeds.iter().chain(files(&fuzz_dir().join("regressions").join(name)).iter()) {
            let data = std::fs::read(f).unwrap();
            let run = std::panic::catch_unwind(|| body(&data));
            assert!(run.is_ok(), "{name}: {} panics", f.display());
            seen += 1;
        }
    }
    assert!(seen >= TARGETS.len());
}

#[test]
fn every_corpus_folder_belongs_to_a_target() {
    for sub in ["corpus", "regressions"] {
        let Ok(rd) = std::fs::read_dir(fuzz_dir().join(sub)) else { continue };
        for e in rd {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(TARGETS.iter().any(|(t, _)| *t == name), "fuzz/{sub}/{name} is no target's");
        }
    }
}

/// Each kind of seed, parsed by the parser it feeds: accepted.
#[test]
fn valid_seeds_are_accepted_by_todays_parsers() {
    use kluis_age::sealed::{KluisIdentity, parse_stanza, unseal};
    use kluis_age::secret::DataKey;
    use kluis_fuzz_targets::{DATA_KEY, IDENTITY};
    let id: age::x25519::Identity = IDENTITY.parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, _) in TARGETS {
        for f in files(&fuzz_dir().join("corpus").join(name)) {
            if !f.file_name().unwrap().to_string_lossy().starts_with("valid-") {
                continue;
            }
            let data = std::fs::read(&f).unwrap();
            let what = f.display().to_string();
            let file = tmp.path().join(f.file_name().unwrap());
            std::fs::write(&file, &data).unwrap();
            match *name {
                "header" => {
                    kluis_age::stream::header::read(&mut &data[..]).map_err(|e| format!("{e:?}")).expect(&what);
                }
                "unseal" => {
                    let kluis = KluisIdentity::new(|_: &kluis_age::sealed::KluisStanza| DataKey::from_slice(&DATA_KEY).ok_or("key"));
                    unseal(&data[..], Some(&kluis), &[&id], std::io::sink()).map_err(|e| e.to_string()).expect(&what);
                }
                "stanza" => {
                    let i = data.iter().position(|b| *b == b'\n').unwrap();
                    let args = String::from_utf8(data[..i].to_vec()).unwrap().split(' ').map(str::to_owned).collect();
                    let s = age_core::format::Stanza { tag: "kluis".into(), args, body: data[i + 1..].to_vec() };
                    assert!(parse_stanza::<std::convert::Infallible>(&s).unwrap().is_some(), "{what}");
                }
                "share" => {
                    kluis_escrow::ShareText::parse(std::str::from_utf8(&data).unwrap()).map_err(|e| e.to_string()).expect(&what);
                }
                "manifest" => {
                    kluis_escrow::Manifest::parse(&data).map_err(|e| e.to_string()).expect(&what);
                }
                "audit_export" => {
                    let (key, text) = data.split_at(32);
                    kluis_proto::audit::verify_export(std::str::from_utf8(text).unwrap(), key).map_err(|e| e.to_string()).expect(&what);
                }
                "server_config" => {
                    kms_server::config::ServerConfig::load(&file).map_err(|e| e.to_string()).expect(&what);
                }
                "client_config" => {
                    kms_client::config::ClientConfig::load(&file).map_err(|e| e.to_string()).expect(&what);
                }
                "revocation_list" => {
                    kms_server::auth::RevocationList::load(&file).map_err(|e| e.to_string()).expect(&what);
                }
                "rpc" => kluis_fuzz_targets::rpc::validate_ok(&data).expect(&what),
                "kmip" => {
                    let item = kluis_kmip::ttlv::decode(&data, &kluis_kmip::ttlv::Limits::default()).expect(&what);
                    kluis_kmip::message::Request::from_item(&item).expect(&what);
                }
                other => panic!("no validity check for target {other}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= TARGETS.len(), "only {checked} valid seeds");
}
