//! The fenced code blocks of the project's Markdown documents, for the tests that run or
//! parse what the documents show (doc_examples.rs, real_server_walk.rs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fenced code block.
#[derive(Clone, Debug)]
pub struct Block {
    /// The document, relative to the workspace root (e.g. `README.md`).
    pub file: String,
    /// 1-based line of the block's first content line in the document.
    pub line: usize,
    /// The info string after the opening fence (`sh`, `toml`, ...; empty if none).
    pub lang: String,
    /// The nearest `## ` heading above the block (without the hashes).
    pub section: String,
    /// The nearest `### ` heading above the block within that section, if any.
    pub subsection: Option<String>,
    /// The block's text, with the fence's own indentation removed, ending in a newline.
    pub body: String,
}

impl Block {
    /// `README.md:123`, for messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    /// The first line of the body, trimmed.
    pub fn first_line(&self) -> &str {
        self.body.lines().next().unwrap_or("").trim()
    }
}

/// The workspace root (the tests crate is one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// `README.md` and every `docs/*.md`, sorted, relative to the workspace root.
pub fn documents() -> Vec<String> {
    let root = workspace_root();
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    docs.insert(0, "README.md".to_owned());
    docs
}

/// The blocks of the document `file` (relative to the workspace root).
pub fn blocks_of(file: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(workspace_root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    parse(file, &text)
}

/// The fenced blocks of `text` (named `file` in messages). An unclosed fence panics.
pub fn parse(file: &str, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut subsection = None;
    let mut open: Option<(usize, usize, String, Vec<&str>)> = None; // (indent, first line, lang, lines)
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some((fence_indent, first, lang, mut lines)) = open.take() {
            if trimmed.trim_end() == "```" {
                let mut body: String = lines.iter().map(|l| format!("{}\n", l.get(fence_indent..).unwrap_or(l.trim_start()))).collect();
                if body.is_empty() {
                    body.push('\n');
                }
                blocks.push(Block { file: file.to_owned(), line: first, lang, section: section.clone(), subsection: subsection.clone(), body });
            } else {
                lines.push(line);
                open = Some((fence_indent, first, lang, lines));
            }
            continue;
        }
        if let Some(info) = trimmed.strip_prefix("```") {
            open = Some((indent, i + 2, info.trim().to_owned(), Vec::new()));
        } else if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_owned();
            subsection = None;
        } else if let Some(h) = line.strip_prefix("### ") {
            subsection = Some(h.trim().to_owned());
        }
    }
    if let Some((_, first, _, _)) = open {
        panic!("{file}:{}: a code block is never closed", first - 1);
    }
    blocks
}

/// The blocks under the `## heading` of `file`, in order; panics if there is no such section.
pub fn section_blocks(file: &str, heading: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(workspace_root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(text.lines().any(|l| l.strip_prefix("## ").is_some_and(|h| h.trim() == heading)), "{file} has no section `## {heading}`");
    parse(file, &text).into_iter().filter(|b| b.section == heading).collect()
}
