//! The `ringproxy` binary as an operator runs it, one test binary: the command line and exit
//! codes (`cli`), hot reload and privileges (`reload`), `ringproxy check` (`check`), and ending
//! other than by a drain (`shutdown`). Every long-running process is started one way,
//! `common::process::Proxy`.

#[path = "../common/mod.rs"]
mod common;

mod check;
mod cli;
mod reload;
mod shutdown;
