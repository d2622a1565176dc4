//! The `ringproxy` binary as an operator runs it, one test binary: the runtime API (`admin`), the
//! command line and exit codes (`cli`), hot reload and privileges (`reload`), `ringproxy check`
//! (`check`), capabilities after start (`capabilities`), the connection log's file
//! (`connection_log`), ending other than by a drain (`shutdown`), and the threads it runs
//! (`threads`). Every long-running process is started one way, `common::process::Proxy`, except
//! the few whose command must be adjusted first (`adjusted`).

#[path = "../common/mod.rs"]
mod common;

mod access;
mod admin;
mod capabilities;
mod check;
mod cli;
mod connection_log;
mod monitoring;
mod reload;
mod shutdown;
mod systemd;
mod threads;
mod upgrade;
