//! ringload binary entry point: parse flags, run, map the outcome to an exit code.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ringload::cli::Cli::parse();
    match ringload::main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ringload: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
