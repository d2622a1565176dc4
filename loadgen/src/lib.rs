//! ringload: the load generator and test backends bundled with ringproxy.
//!
//! `serve` runs backends (echo, sink, source); the client modes `hold`,
//! `rate`, `throughput` and `latency` drive them (directly or through a
//! proxy) on io_uring, one ring per worker thread, splitting into several
//! processes when one process may not hold enough descriptors. See
//! loadgen/README.md for every flag, the JSON schema and the exit codes.

pub mod chart;
pub mod cli;
pub mod client;
pub mod dial;
pub mod exchange;
pub mod hold;
pub mod latency;
pub mod nofile;
pub mod rate;
pub mod ready;
pub mod report;
pub mod ring;
pub mod run;
pub mod serve;
pub mod sources;
pub mod spawn;
pub mod stats;
pub mod stop;
pub mod throughput;
pub mod wire;

use cli::{Cli, Command};

/// Run the parsed command line; returns the process exit code.
pub fn main(cli: Cli) -> anyhow::Result<u8> {
    // Every command runs on io_uring: where it is blocked, say why and how to fix it, up front.
    // Multishot receive (6.0) is the newest thing ringload's rings need.
    uring_access::check((6, 0)).map_err(|b| anyhow::anyhow!("{b}"))?;
    stop::install();
    let nofile = nofile::raise();
    match &cli.command {
        Command::Serve(a) => serve::main(a, nofile),
        Command::Hold(a) => run::main(a, nofile),
        Command::Rate(a) => run::main(a, nofile),
        Command::Throughput(a) => run::main(a, nofile),
        Command::Latency(a) => run::main(a, nofile),
    }
}
