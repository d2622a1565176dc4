//! ringproxy: a layer-4 TCP proxy and load balancer built as an io_uring, thread-per-core engine.
//!
//! The library holds everything; `main.rs` only parses the command line. See docs/architecture.md.

pub mod config;
