//! ringproxy: a layer-4 TCP proxy and load balancer built as an io_uring, thread-per-core engine.
//!
//! The library holds everything; `main.rs` only parses the command line. See docs/architecture.md
//! for the design: one worker per core (`worker`), each with its own ring, listeners, connection
//! slab (`conn`), pipes (`pipes`), maxconn shares (`limits`) and source shards (`sources`).

pub mod admin;
pub mod balance;
pub mod check;
pub mod config;
pub mod conn;
pub mod control;
pub mod engine;
pub mod features;
pub mod health;
pub mod host;
pub mod limits;
pub mod listener;
pub mod log;
pub mod pipes;
pub mod plan;
pub mod privileges;
pub mod proxy_protocol;
pub mod ready;
pub mod sdnotify;
pub mod sourcelimits;
pub mod sources;
pub mod stats;
pub mod supervisor;
pub mod sys;
pub mod upgrade;
pub mod watch;
pub mod worker;

pub use engine::Engine;
