//! Host preflight for `ringproxy check` (being written).

use crate::config::Config;

/// Runs the preflight, prints one line per item, returns the exit code (0 ok, 1 warnings, 2 errors).
pub fn run(config: &Config) -> i32 {
    let _ = config;
    0
}
