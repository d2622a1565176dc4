//! The `ringproxy` command line: parse arguments, call into the library, map outcomes to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringproxy::{Engine, config};

#[derive(Parser)]
#[command(
    name = "ringproxy",
    version,
    about = "An io_uring, thread-per-core TCP proxy and load balancer"
)]
struct Cli {
    /// Configuration file (YAML).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and check this host against it.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(path) = cli.config else {
        eprintln!("ringproxy: no configuration given; use -c FILE (see config-examples/)");
        return ExitCode::from(2);
    };
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => ExitCode::from(ringproxy::check::run(&config) as u8),
        Command::Run => run(config),
    }
}

fn run(config: config::Config) -> ExitCode {
    for w in &config.warnings {
        eprintln!("{w}");
    }
    // Block the signals we handle before any thread starts, so workers inherit the mask and the
    // main thread alone receives them.
    let signals = Signals::block(&[libc::SIGINT, libc::SIGTERM]);
    let mut engine = match Engine::start(config) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ringproxy: {e}");
            return ExitCode::from(1);
        }
    };
    let plan = engine.plan();
    let cpus: Vec<String> = plan
        .cpus
        .iter()
        .map(|c| c.map_or("-".into(), |c| c.to_string()))
        .collect();
    eprintln!(
        "ringproxy {}: {} workers (CPUs {}), maxconn {}{}, RLIMIT_NOFILE {}, {} connections per worker",
        env!("CARGO_PKG_VERSION"),
        plan.workers,
        cpus.join(","),
        plan.maxconn,
        plan.configured_maxconn
            .map_or(" (not configured)".into(), |m| format!(" (configured {m})")),
        plan.nofile,
        plan.conns_per_worker,
    );
    for w in &plan.warnings {
        eprintln!("ringproxy: warning: {w}");
    }
    for b in engine.bound() {
        eprintln!(
            "ringproxy: frontend \"{}\" listening on {}",
            b.frontend, b.addr
        );
    }
    let sig = signals.wait(None);
    let drain = engine.config().global.drain_timeout;
    eprintln!(
        "ringproxy: {}: draining: no new connections, open ones get up to {}",
        signal_name(sig.unwrap_or(libc::SIGTERM)),
        config::duration::format(drain)
    );
    engine.drain();
    loop {
        if engine.finished() {
            break;
        }
        if let Some(sig) = signals.wait(Some(Duration::from_millis(100))) {
            eprintln!("ringproxy: {} again: exiting now", signal_name(sig));
            return ExitCode::from(1);
        }
    }
    engine.join();
    eprintln!("ringproxy: drained, exiting");
    ExitCode::SUCCESS
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// A set of blocked signals, received synchronously with sigtimedwait.
struct Signals(libc::sigset_t);

impl Signals {
    fn block(sigs: &[i32]) -> Signals {
        // SAFETY: sigset_t is plain data initialised by sigemptyset; the calls only touch `set`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in sigs {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals(set)
        }
    }

    /// The next signal, or `None` after `timeout`.
    fn wait(&self, timeout: Option<Duration>) -> Option<i32> {
        loop {
            let r = match timeout {
                // SAFETY: `self.0` is an initialised set; `ts` lives across the call.
                Some(d) => unsafe {
                    let ts = libc::timespec {
                        tv_sec: d.as_secs() as libc::time_t,
                        tv_nsec: d.subsec_nanos() as _,
                    };
                    libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts)
                },
                // SAFETY: as above, without a timeout.
                None => unsafe { libc::sigwaitinfo(&self.0, std::ptr::null_mut()) },
            };
            if r > 0 {
                return Some(r);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
    }
}
