//! The engine's integration tests, one binary: every suite that runs the engine in-process (plus
//! the two that need the binary's own memory or signals, through `common::process`), in parallel.
//! Each test ends with `common::assert_clean`: nothing held, nothing open, a clean shutdown.
//!
//! One suite: `cargo test -p ringproxy --test it faults::`; one test: add its name.

#[path = "../common/mod.rs"]
mod common;

mod accept;
mod backpressure;
mod balance;
mod batch_wait;
mod faults;
mod health;
mod huge_durations;
mod idle_poll;
mod limits;
mod monitoring;
mod moves;
mod per_source;
mod ports;
mod proxy;
mod proxy_protocol;
mod splice;
mod stats;
mod storm;
mod timeouts;
mod zerocopy;
