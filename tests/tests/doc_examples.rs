//! Every ```toml block in README.md and docs/*.md is parsed by the real config loaders
//! (`kms_server::config::ServerConfig::load`, `kms_client::config::ClientConfig::load`), so
//! the documents and the code cannot drift apart.
//!
//! The first line of each block says what it is:
//! - `# kms-server config` (optionally `: PATH`, where the walk writes it): a whole server config;
//! - `# kms-server config (excerpt)`: some fields or sections of one, checked by putting them
//!   into a minimal server config (replacing what it had under the same names);
//! - `# client config` (optionally `: PATH`) and `# client config (excerpt)`: the same for clients;
//! - `# not a Kluis config`: skipped (another tool's file).
//!
//! A block without one of these lines fails the test, naming the file and line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod markdown;

use std::path::Path;

use markdown::Block;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Server,
    ServerExcerpt,
    Client,
    ClientExcerpt,
    NotConfig,
}

const MARKERS: &str = "`# kms-server config`, `# kms-server config (excerpt)`, `# client config`, `# client config (excerpt)` or `# not a Kluis config`";

/// What a block's first line says it is (a `: PATH` suffix is allowed on whole configs).
fn kind(block: &Block) -> Result<Kind, String> {
    let first = block.first_line();
    let (marker, path) = match first.split_once(": ") {
        Some((m, p)) => (m.trim(), Some(p.trim())),
        None => (first, None),
    };
    let kind = match marker {
        "# kms-server config" => Kind::Server,
        "# kms-server config (excerpt)" => Kind::ServerExcerpt,
        "# client config" => Kind::Client,
        "# client config (excerpt)" => Kind::ClientExcerpt,
        "# not a Kluis config" => Kind::NotConfig,
        _ => return Err(format!("{}: a ```toml block must start with {MARKERS}; it starts with {first:?}", block.at())),
    };
    if path.is_some_and(|p| !p.starts_with('/')) || (path.is_some() && !matches!(kind, Kind::Server | Kind::Client)) {
        return Err(format!("{}: only a whole config may name where it goes, as an absolute path: {first:?}", block.at()));
    }
    Ok(kind)
}

/// The minimal config an excerpt is put into.
const BASE_SERVER: &str = r#"
version = 1
listen = "127.0.0.1:0"
data_dir = "data"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
[master]
provider = "software"
key_file = "master.key"
"#;

const BASE_CLIENT: &str = r#"
version = 1
endpoint = "https://kms.example:8443"
ca = "ca.pem"
cert = "client.pem"
key = "client.key"
"#;

/// `base` with every top-level field and section of `excerpt` put in (replacing the same names).
fn merged(block: &Block, base: &str) -> Result<String, String> {
    let mut table: toml::Table = base.parse().expect("base config");
    let excerpt: toml::Table = block.body.parse().map_err(|e| format!("{}: not TOML: {e}", block.at()))?;
    for (k, v) in excerpt {
        table.insert(k, v);
    }
    Ok(toml::to_string(&table).expect("serialise"))
}

/// Loads the block with the real loader; an error names the document, line and the loader's message.
fn check(block: &Block, dir: &Path) -> Result<Kind, String> {
    let kind = kind(block)?;
    let text = match kind {
        Kind::NotConfig => return Ok(kind),
        Kind::Server | Kind::Client => block.body.clone(),
        Kind::ServerExcerpt => merged(block, BASE_SERVER)?,
        Kind::ClientExcerpt => merged(block, BASE_CLIENT)?,
    };
    let path = dir.join(format!("block-{}.toml", block.line));
    std::fs::write(&path, &text).unwrap();
    let fail = |e: &dyn std::fmt::Display| format!("{} (block starting there): {e}", block.at());
    match kind {
        Kind::Server | Kind::ServerExcerpt => {
            let cfg = kms_server::config::ServerConfig::load(&path).map_err(|e| fail(&e))?;
            for a in &cfg.audit.anchors {
                a.parse::<kms_server::audit::anchor::AnchorTarget>().map_err(|e| fail(&format!("[audit] anchors: {a:?}: {e}")))?;
            }
        }
        Kind::Client | Kind::ClientExcerpt => {
            kms_client::config::ClientConfig::load(&path).map_err(|e| fail(&e))?;
        }
        Kind::NotConfig => {}
    }
    Ok(kind)
}

fn check_all(blocks: &[Block]) -> (Vec<Kind>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut kinds, mut errors) = (Vec::new(), Vec::new());
    for b in blocks.iter().filter(|b| b.lang == "toml") {
        match check(b, dir.path()) {
            Ok(k) => kinds.push(k),
            Err(e) => errors.push(e),
        }
    }
    (kinds, errors)
}

#[test]
fn every_config_example_in_the_docs_loads_with_the_real_parser() {
    let blocks: Vec<Block> = markdown::documents().iter().flat_map(|d| markdown::blocks_of(d)).collect();
    let (kinds, errors) = check_all(&blocks);
    assert!(errors.is_empty(), "config examples in the docs that the real loaders refuse:\n{}", errors.join("\n"));
    // Not vacuous: the server reference, the walk's config, the client reference, and excerpts.
    let count = |k: Kind| kinds.iter().filter(|&&x| x == k).count();
    assert!(count(Kind::Server) >= 2, "{kinds:?}");
    assert!(count(Kind::ServerExcerpt) >= 3, "{kinds:?}");
    assert!(count(Kind::Client) >= 1, "{kinds:?}");
}

/// The field names the real loader knows for one table: it is given an unknown field there,
/// and serde's refusal lists the known ones ("unknown field `zz_probe`, expected one of ...").
fn known_fields(client: bool, table: toml::Table) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("probe.toml");
    std::fs::write(&p, toml::to_string(&table).unwrap()).unwrap();
    let e = if client {
        kms_client::config::ClientConfig::load(&p).map(|_| ()).unwrap_err().to_string()
    } else {
        kms_server::config::ServerConfig::load(&p).map(|_| ()).unwrap_err().to_string()
    };
    let expected = e.split_once("unknown field `zz_probe`, expected").unwrap_or_else(|| panic!("not an unknown-field refusal: {e}")).1;
    expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// `base` with `zz_probe = 1` put at its top level, or into its table `at` (replaced by
/// `fill` if that is given, created empty if absent).
fn probe(base: &str, at: Option<&str>, fill: &str) -> toml::Table {
    let mut t: toml::Table = base.parse().unwrap();
    let target = match at {
        None => &mut t,
        Some(k) => {
            if !fill.is_empty() {
                t.insert(k.to_owned(), toml::Value::Table(fill.parse().unwrap()));
            }
            t.entry(k.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut().unwrap()
        }
    };
    target.insert("zz_probe".into(), toml::Value::Integer(1));
    t
}

#[test]
fn every_field_the_loaders_know_is_shown_in_the_readme() {
    // The fields come from the code (serde's list of known fields), so a field added to a
    // config struct and not to README's Server config or Client config example fails here.
    let blocks = markdown::blocks_of("README.md");
    let shown = |marker: &str| -> Vec<String> {
        blocks
            .iter()
            .filter(|b| b.lang == "toml" && b.first_line().starts_with(marker))
            .flat_map(|b| b.body.lines().map(|l| l.trim().trim_start_matches("# ").to_owned()).collect::<Vec<_>>())
            .collect()
    };
    let server_lines = shown("# kms-server config");
    let client_lines = shown("# client config");
    let has = |lines: &[String], f: &str| {
        lines.iter().any(|l| l.starts_with(&format!("{f} = ")) || *l == format!("[{f}]") || l.starts_with(&format!("[{f}] ")) || *l == format!("[[{f}]]") || l.starts_with(&format!("[[{f}]] ")))
    };
    let grant = "[[grant]]\nprincipal = \"p\"\nroles = [\"sealer\"]\nkeyrings = [\"*\"]\n";
    let mut grant_probe: toml::Table = BASE_SERVER.parse().unwrap();
    let mut g: toml::Table = grant.parse().unwrap();
    if let Some(toml::Value::Array(a)) = g.get_mut("grant") {
        a[0].as_table_mut().unwrap().insert("zz_probe".into(), toml::Value::Integer(1));
    }
    grant_probe.extend(g);
    let server_tables = [
        ("top level", probe(BASE_SERVER, None, "")),
        ("[tls]", probe(BASE_SERVER, Some("tls"), "")),
        ("[master] software", probe(BASE_SERVER, Some("master"), "")),
        ("[master] pkcs11", probe(BASE_SERVER, Some("master"), "provider = \"pkcs11\"\nmodule = \"m.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\n")),
        ("[auth]", probe(BASE_SERVER, Some("auth"), "")),
        ("[limits]", probe(BASE_SERVER, Some("limits"), "")),
        ("[audit]", probe(BASE_SERVER, Some("audit"), "")),
        ("[[grant]]", grant_probe),
    ];
    let mut missing = Vec::new();
    for (table, t) in server_tables {
        let fields = known_fields(false, t);
        assert!(fields.len() >= 2, "{table}: {fields:?}");
        missing.extend(fields.iter().filter(|f| !has(&server_lines, f)).map(|f| format!("server {table}: {f}")));
    }
    for (table, t) in [("top level", probe(BASE_CLIENT, None, "")), ("[retry]", probe(BASE_CLIENT, Some("retry"), ""))] {
        let fields = known_fields(true, t);
        assert!(fields.len() >= 2, "{table}: {fields:?}");
        missing.extend(fields.iter().filter(|f| !has(&client_lines, f)).map(|f| format!("client {table}: {f}")));
    }
    assert!(missing.is_empty(), "fields the loaders know that no README config example shows:\n{}", missing.join("\n"));
}

#[test]
fn an_unmarked_or_wrong_example_fails_naming_where_it_is() {
    let doc = "\
# Doc

```toml
version = 1
```

```toml
# kms-server config
version = 1
listen = \"0.0.0.0:8443\"
data_dir = \"/var/lib/kluis\"
colour = \"blue\"
[tls]
cert = \"s.pem\"
key = \"s.key\"
client_ca = \"ca.pem\"
[master]
provider = \"software\"
key_file = \"m.key\"
```

```toml
# kms-server config (excerpt)
[tls]
cert = \"s.pem\"
destruction_wait_days = 7
```

```toml
# client config (excerpt)
[retry]
deadline_secs = 90000
```

```toml
# kms-server config (excerpt)
[audit]
anchors = [\"carrier-pigeon\"]
```

```toml
# not a Kluis config
anything = \"at all\"
```

```sh
not toml, not checked
```
";
    let blocks = markdown::parse("TEST.md", doc);
    let (kinds, errors) = check_all(&blocks);
    assert_eq!(kinds, vec![Kind::NotConfig], "{errors:#?}");
    assert_eq!(errors.len(), 5, "{errors:#?}");
    assert!(errors[0].starts_with("TEST.md:4: a ```toml block must start with"), "{}", errors[0]);
    assert!(errors[1].starts_with("TEST.md:8") && errors[1].contains("colour"), "{}", errors[1]);
    // A top-level field written below a section header belongs to that section: refused.
    assert!(errors[2].starts_with("TEST.md:23") && errors[2].contains("destruction_wait_days"), "{}", errors[2]);
    assert!(errors[3].starts_with("TEST.md:30") && errors[3].contains("retry.deadline_secs = 90000"), "{}", errors[3]);
    assert!(errors[4].starts_with("TEST.md:36") && errors[4].contains("carrier-pigeon"), "{}", errors[4]);
}
