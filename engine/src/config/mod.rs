//! Configuration: YAML text in, validated types out.
//!
//! Three steps, as ripgrep goes from low-level to high-level arguments: `raw.rs` mirrors the file
//! (serde types with spans), `validate.rs` checks it once, and `types.rs` is the result, [`Config`],
//! whose values are already parsed (addresses, durations, source sets) and cross-checked (a
//! frontend's backend exists, names are unique). Nothing downstream re-checks strings. Every
//! rejection is a [`ConfigError`] that prints as `FILE:LINE:COLUMN: message` in the file's terms
//! (`message.rs`); loading never binds, connects or spawns anything.

pub mod address;
pub mod duration;
mod message;
mod raw;
mod types;
mod validate;
pub use validate::check_name;

use std::path::Path;

pub use message::ConfigError;
pub use raw::{Balance, OnDown, OnRemoved, ProxyVersion};
pub use types::{
    AUTO_BATCH_WINDOW, Acl, BATCH_EVENTS, Backend, BatchWait, Config, DEFAULT_IDLE_POLL_AFTER, Frontend, Global,
    HealthCheck, Keepalive, Lifetime, LogTarget, MAXCONN_LIMIT, PerSource, Server, SockOpt, SocketBuffers, SpliceMode,
    Stats, Tune, WEIGHT_LIMIT, default,
};

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string())
}

/// Validates configuration text; `origin` names it in messages (normally the file path).
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::yaml(origin, &e))?;
    validate::validate(raw, origin)
}

#[cfg(test)]
mod tests;
