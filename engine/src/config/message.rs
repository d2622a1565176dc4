//! How the configuration speaks to an operator: every refusal and warning as
//! `FILE:LINE:COLUMN: message`, and the YAML parser's and serde's wording (Rust types, library
//! options, " at line N, column M") rewritten into the file's terms.
//!
//! Positions start at 1: a position the parser does not know (0) becomes 1, so every message
//! points into the file.

use serde_saphyr::Location;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid { origin: String, line: u64, column: u64, message: String },
}

impl ConfigError {
    /// The line and column, when the error points into the file.
    pub fn position(&self) -> Option<(u64, u64)> {
        match self {
            ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
            ConfigError::Read { .. } => None,
        }
    }

    /// A refusal at `loc` in `origin`.
    pub(super) fn at(origin: &str, loc: Location, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(origin, (loc.line(), loc.column()), message.into())
    }

    /// The YAML parser's refusal, in the file's terms.
    pub(super) fn yaml(origin: &str, e: &serde_saphyr::Error) -> ConfigError {
        let position = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        ConfigError::invalid(origin, position, yaml_message(e))
    }

    fn invalid(origin: &str, (line, column): (u64, u64), message: String) -> ConfigError {
        ConfigError::Invalid { origin: origin.to_owned(), line: line.max(1), column: column.max(1), message }
    }
}

/// `FILE:LINE:COLUMN: warning: message`: allowed, but probably not intended.
pub(super) fn warning(origin: &str, loc: Location, message: &str) -> String {
    format!("{origin}:{}:{}: warning: {message}", loc.line().max(1), loc.column().max(1))
}

/// The parser's message without the " at line N, column M" it appends (we print the position first).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.without_snippet().to_string();
    let msg = match full.rsplit_once(" at line ") {
        Some((head, tail)) if tail.contains(", column ") => head.to_owned(),
        _ => full,
    };
    let msg = msg.trim_start_matches("error: ").to_owned();
    operator_words(&msg)
}

/// Rewrites the deserializer's wording (Rust types, library options) into the file's terms.
fn operator_words(msg: &str) -> String {
    if let Some(breach) = msg.strip_prefix("budget breached: ") {
        return budget_words(breach);
    }
    if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        return format!("key `{key}` appears twice in this section; keep one");
    }
    if msg.starts_with("cannot deserialize null") || msg.contains("invalid type: unit value") {
        return "a value is missing here".into();
    }
    // serde's wording for a misspelt key lists every valid one: keep it, it is the fix.
    let msg = msg.replace("unknown field", "unknown key");
    // "invalid type: sequence, expected X" -> "expected X, found a list"
    if let Some(rest) = msg.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        let found = match found {
            "sequence" => "a list".to_string(),
            "map" => "a mapping".to_string(),
            "unit value" => "nothing".to_string(),
            other => other.replace("string ", "").to_string(),
        };
        return format!("expected {expected}, found {found}");
    }
    msg
}

/// The YAML parser's safety limits (serde-saphyr's `Budget`), said in the file's terms: what the
/// file has too much of. A configuration is a few KiB; these stop hostile or mistaken input.
fn budget_words(breach: &str) -> String {
    let kind = breach.split([' ', '{']).next().unwrap_or(breach);
    let what = match kind {
        "ScalarBytes" => "more than 64 MiB of text in its values",
        "InputBytes" => "more than 256 MiB",
        "Events" | "Nodes" => "too many entries (over 250,000 values, lists and mappings)",
        "Aliases" | "AliasAnchorRatio" => "too many aliases (`*name`) for its anchors (a guard against alias bombs)",
        "Anchors" => "too many anchors (`&name`)",
        "Depth" => "lists or mappings nested more than 64 levels deep",
        "Documents" => "more than 1,024 YAML documents (`---`); a configuration is one",
        "MergeKeys" => "too many merge keys (`<<`)",
        _ => return format!("the file is beyond a safety limit of the YAML parser ({breach}); is it the right file?"),
    };
    format!("the file has {what}; a configuration is far smaller: is it the right file?")
}
