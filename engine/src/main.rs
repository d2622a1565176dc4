//! The `ringproxy` command line: parse arguments, call into the library, map outcomes to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringproxy::ready::{Ready, ReadyFile, ReadyListener};
use ringproxy::stats::socket::Answer;
use ringproxy::supervisor::Supervisor;
use ringproxy::sys::Signals;
use ringproxy::{Engine, config};

#[derive(Parser)]
#[command(name = "ringproxy", version, about = "An io_uring, thread-per-core TCP proxy and load balancer")]
struct Cli {
    /// Configuration file (YAML).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// Once every listener is bound, write PATH: JSON with the pid and the bound addresses
    /// (rewritten after each reload, removed at exit).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and check this host against it.
    Check(CheckArgs),
    /// Show a running engine's counters (per core, per server, per source IP).
    Stats(StatsArgs),
    /// Ask the running engine to re-read its configuration (through the admin socket).
    Reload(ReloadArgs),
    /// Replace the running process by a new binary without closing anything: it hands the new
    /// process its listening sockets and established connections, then exits (through the admin
    /// socket; SIGUSR2 does the same with the default binary).
    Upgrade(UpgradeArgs),
    /// Send one command to the running engine and print the answer (`help` lists them): through
    /// the admin socket when the configuration has one, else the read-only stats socket.
    Cmd(CmdArgs),
}

#[derive(clap::Args)]
struct CmdArgs {
    /// The socket to send it to (default: global.stats.admin_socket of the -c configuration, or
    /// its global.stats.socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The command, e.g. 'set server app/s1 state drain' (one argument, or several words).
    #[arg(required = true, num_args = 1.., trailing_var_arg = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Print only the /etc/sysctl.d/ drop-in this configuration needs on a host with the kernel's
    /// stock settings (to ship with the configuration), instead of checking this host.
    #[arg(long)]
    sysctl: bool,
}

#[derive(clap::Args)]
struct ReloadArgs {
    /// The engine's admin socket (default: global.stats.admin_socket of the -c configuration).
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(clap::Args)]
struct UpgradeArgs {
    /// The engine's admin socket (default: global.stats.admin_socket of the -c configuration).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The new binary (default: the path the running process was started from, where a package
    /// upgrade puts the new one).
    binary: Option<PathBuf>,
}

#[derive(clap::Args)]
struct StatsArgs {
    /// The engine's stats socket (default: global.stats.socket of the -c configuration).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Refresh every interval (e.g. 1s), with per-second rates, until interrupted or --count.
    #[arg(long, value_parser = parse_interval)]
    watch: Option<Duration>,
    /// With --watch: stop after this many refreshes.
    #[arg(long)]
    count: Option<u64>,
    /// Print the raw snapshot as JSON.
    #[arg(long, conflicts_with_all = ["prometheus", "csv"])]
    json: bool,
    /// Print the Prometheus text format.
    #[arg(long, conflicts_with = "csv")]
    prometheus: bool,
    /// Print HAProxy-style CSV (`show stat`).
    #[arg(long)]
    csv: bool,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    config::duration::parse(s)
        .and_then(|d| if d.is_zero() { Err("the interval must be above zero".into()) } else { Ok(d) })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Stats(args)) = &cli.command {
        return stats(args, cli.config.as_deref());
    }
    if let Some(Command::Reload(args)) = &cli.command
        && let Some(socket) = &args.socket
    {
        return command_via(socket, "reload");
    }
    if let Some(Command::Upgrade(args)) = &cli.command
        && let Some(socket) = &args.socket
    {
        return command_via(socket, &upgrade_line(args));
    }
    if let Some(Command::Cmd(args)) = &cli.command
        && let Some(socket) = &args.socket
    {
        return command_via(socket, &args.command.join(" "));
    }
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
        Command::Check(args) if args.sysctl => {
            print!("{}", ringproxy::check::sysctl_dropin(&config));
            ExitCode::SUCCESS
        }
        Command::Check(_) => ExitCode::from(ringproxy::check::run(&config) as u8),
        Command::Run => run(&path, config, cli.ready_file.as_deref()),
        Command::Reload(args) => reload(&args, &config),
        Command::Upgrade(args) => match config.global.stats.admin_socket.clone() {
            Some(path) => command_via(&path, &upgrade_line(&args)),
            None => {
                eprintln!(
                    "ringproxy upgrade: the configuration sets no global.stats.admin_socket (upgrade is an admin \
                     command); pass --socket PATH or send SIGUSR2"
                );
                ExitCode::from(2)
            }
        },
        Command::Cmd(args) => cmd(&args, &config),
        Command::Stats(_) => unreachable!("handled above"),
    }
}

fn reload(args: &ReloadArgs, config: &config::Config) -> ExitCode {
    let Some(path) = args.socket.clone().or_else(|| config.global.stats.admin_socket.clone()) else {
        eprintln!(
            "ringproxy reload: the configuration sets no global.stats.admin_socket (reload is an admin command); \
             pass --socket PATH or send SIGHUP"
        );
        return ExitCode::from(2);
    };
    command_via(&path, "reload")
}

/// The admin command an `upgrade` asks for (a relative binary path made absolute: the engine runs
/// elsewhere).
fn upgrade_line(args: &UpgradeArgs) -> String {
    match &args.binary {
        Some(b) => format!("upgrade {}", std::path::absolute(b).unwrap_or_else(|_| b.clone()).display()),
        None => "upgrade".into(),
    }
}

fn cmd(args: &CmdArgs, config: &config::Config) -> ExitCode {
    let stats = &config.global.stats;
    let Some(path) = args.socket.clone().or_else(|| stats.admin_socket.clone()).or_else(|| stats.socket.clone()) else {
        eprintln!("ringproxy cmd: the configuration sets neither global.stats.admin_socket nor global.stats.socket");
        return ExitCode::from(2);
    };
    command_via(&path, &args.command.join(" "))
}

/// Sends one command; prints the answer (without its status line). Exit 0 done, 1 refused or no
/// answer.
fn command_via(path: &std::path::Path, line: &str) -> ExitCode {
    match ringproxy::stats::socket::any_command(path, line) {
        Ok(Answer::Ok(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Answer::Fail(text)) => {
            print!("{text}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("ringproxy: {e}");
            ExitCode::from(1)
        }
    }
}

fn stats(args: &StatsArgs, config: Option<&std::path::Path>) -> ExitCode {
    use ringproxy::stats::{prometheus, render, socket};
    let path = match (&args.socket, config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => match config::load(c) {
            Ok(cfg) => match cfg.global.stats.socket {
                Some(p) => p,
                None => {
                    eprintln!("ringproxy: {} sets no global.stats.socket; pass --socket PATH", c.display());
                    return ExitCode::from(2);
                }
            },
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => {
            eprintln!("ringproxy stats: give --socket PATH or -c FILE (with global.stats.socket)");
            return ExitCode::from(2);
        }
    };
    let mut prev = None;
    let mut shown = 0u64;
    loop {
        let snapshot = match socket::fetch(&path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ringproxy: {e}");
                return ExitCode::from(1);
            }
        };
        let text = if args.json {
            serde_json::to_string_pretty(&snapshot).unwrap_or_default() + "\n"
        } else if args.prometheus {
            prometheus::render(&snapshot)
        } else if args.csv {
            render::csv(&snapshot)
        } else {
            render::dump(&snapshot, prev.as_ref())
        };
        print!("{text}");
        shown += 1;
        let Some(every) = args.watch else { break };
        if args.count.is_some_and(|n| shown >= n) {
            break;
        }
        println!();
        prev = Some(snapshot);
        std::thread::sleep(every);
    }
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path, config: config::Config, ready_file: Option<&std::path::Path>) -> ExitCode {
    for w in &config.warnings {
        eprintln!("{w}");
    }
    // Before anything binds: where io_uring is blocked (seccomp, sysctl, sandbox) say why and how
    // to fix it, in one line, instead of failing in the first worker.
    if let Err(b) = uring_access::check(ringproxy::features::FLOOR) {
        eprintln!("ringproxy: {b}");
        return ExitCode::from(1);
    }
    // Before any thread starts, so that every thread inherits it: no_new_privs and no capability
    // to pass on (privileges.rs); the rest is dropped once the engine has bound.
    if let Err(e) = ringproxy::privileges::restrict() {
        eprintln!("ringproxy: cannot restrict its privileges: {e}");
        return ExitCode::from(1);
    }
    // A log file at RLIMIT_FSIZE then fails its writes (EFBIG, reported by the log thread) instead
    // of killing the process.
    if let Err(e) = ringproxy::sys::ignore_signal(libc::SIGXFSZ) {
        eprintln!("ringproxy: cannot ignore SIGXFSZ: {e}");
        return ExitCode::from(1);
    }
    // A splice(2) into a socket whose peer has gone fails with EPIPE and would also raise SIGPIPE
    // (tcp_sendmsg without MSG_NOSIGNAL): the worker sees the error; the process must not die of
    // it. (Rust's runtime ignores SIGPIPE already; this keeps it so whatever starts the engine.)
    if let Err(e) = ringproxy::sys::ignore_signal(libc::SIGPIPE) {
        eprintln!("ringproxy: cannot ignore SIGPIPE: {e}");
        return ExitCode::from(1);
    }
    // Block the signals we handle before any thread starts, so workers inherit the mask and the
    // main thread alone receives them.
    let signals = match Signals::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGHUP, libc::SIGUSR2]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringproxy: cannot block the signals it handles: {e}");
            return ExitCode::from(1);
        }
    };
    // Started by `ringproxy upgrade` (or SIGUSR2) of a running ringproxy: take its sockets over.
    let started = match ringproxy::upgrade::Link::from_env() {
        Some(Ok(link)) => Supervisor::take_over(path, config, link).map_err(|e| format!("upgrade: {e}")),
        Some(Err(e)) => Err(format!("upgrade: {e}")),
        None => Supervisor::start(path, config).map_err(|e| e.to_string()),
    };
    let mut service = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringproxy: {e}");
            return ExitCode::from(1);
        }
    };
    report(service.engine());
    if let Some(p) = &service.engine().config().global.stats.socket {
        eprintln!("ringproxy: stats socket {} (ringproxy stats --socket {})", p.display(), p.display());
    }
    if let Some(p) = &service.engine().config().global.stats.admin_socket {
        eprintln!("ringproxy: admin socket {} (ringproxy cmd --socket {} help)", p.display(), p.display());
    }
    if let Some(a) = service.metrics_addr() {
        eprintln!("ringproxy: Prometheus metrics on http://{a}/metrics");
    }
    let ready_file = ready_file.map(ReadyFile::new);
    let notify = ringproxy::sdnotify::Notifier::from_env();
    let mut written = None;
    // A SIGTERM or SIGINT that came while an upgrade's new process was starting: it applies once
    // the start has come out (to the hand-over, or to this process).
    let mut pending_stop = None;
    // Whether the upgrade starting was asked for by SIGUSR2 (its outcome is logged so).
    let mut by_signal = false;
    let stop = loop {
        if written != Some(service.generation) {
            if let Some(f) = &ready_file
                && let Err(e) = f.write(&ready(&service))
            {
                eprintln!("ringproxy: cannot write the ready file: {e}");
                return ExitCode::from(1);
            }
            if let Some(n) = &notify {
                n.ready(&status_line(&service));
            }
            written = Some(service.generation);
        }
        match signals.wait_or(service.doorbell(), Duration::from_millis(100)) {
            Some(libc::SIGUSR1) => dump(&service),
            Some(libc::SIGHUP) => {
                if let Some(n) = &notify {
                    n.reloading();
                }
                match service.reload() {
                    Ok(r) => {
                        eprintln!("ringproxy: SIGHUP: {r}");
                        report(service.engine());
                    }
                    Err(e) => eprintln!("ringproxy: SIGHUP: reload refused, the running configuration stays: {e}"),
                }
                // READY=1 again (with the new generation's status if it took).
                written = None;
            }
            Some(libc::SIGUSR2) => match service.upgrade(None) {
                Ok(line) => {
                    eprintln!("ringproxy: SIGUSR2: {line}");
                    by_signal = true;
                }
                Err(e) => eprintln!("ringproxy: SIGUSR2: {e}"),
            },
            Some(sig @ (libc::SIGTERM | libc::SIGINT)) if service.upgrade_starting() && pending_stop.is_none() => {
                eprintln!(
                    "ringproxy: {}: an upgrade's new process is starting: once it serves, the connections go on to \
                     it and this process exits; if it fails, this process drains (a second signal: drain now)",
                    signal_name(sig)
                );
                pending_stop = Some(sig);
            }
            Some(other) => break Stop::Signal(other),
            None => {}
        }
        if let Some(outcome) = service.upgrade_started() {
            let by = if std::mem::take(&mut by_signal) { "SIGUSR2: " } else { "" };
            match outcome {
                Ok(line) | Err(line) => eprintln!("ringproxy: {by}{line}"),
            }
            if let Some(sig) = pending_stop {
                break Stop::Signal(sig);
            }
        }
        if let Some(failure) = service.failure() {
            break Stop::Failed(failure);
        }
        service.serve_requests();
        for h in service.reap() {
            eprintln!("ringproxy: {h}");
        }
        match service.upgrade_end() {
            Some(end @ ringproxy::supervisor::UpgradeEnd::HandedOver { pid, .. }) => {
                return handed_over(service, &end, pid, notify.as_ref(), ready_file);
            }
            Some(end) => {
                eprintln!("ringproxy: {end}");
                written = None;
            }
            None => {}
        }
    };
    // A start still under way (a second signal came first) is given up.
    service.cancel_upgrade_start();
    let drain = config::duration::format(service.engine().config().global.drain_timeout);
    // Say "not ready" first, still accepting, so that a routing daemon checking `show ready`
    // withdraws this host's route before its listeners close (a second signal cuts it short).
    // (Not during an upgrade: the new process serves the listeners; stopping it withdraws.)
    if let (Stop::Signal(sig), Some(delay), None) =
        (&stop, service.engine().config().global.withdraw_delay, service.upgrading())
    {
        eprintln!(
            "ringproxy: {}: reporting not ready for {} (withdraw_delay), still accepting; then draining",
            signal_name(*sig),
            config::duration::format(delay)
        );
        service.withdraw();
        let until = std::time::Instant::now() + delay;
        while std::time::Instant::now() < until {
            match signals.wait_or(service.doorbell(), Duration::from_millis(50)) {
                Some(libc::SIGTERM | libc::SIGINT) => break,
                Some(libc::SIGUSR1) => dump(&service),
                _ => {}
            }
            service.serve_requests();
        }
    }
    let status = match &stop {
        Stop::Signal(sig) => {
            match service.upgrading() {
                // The old engine is draining already, handing its connections over: they go on
                // to the new process, which serves on (stopping the service is signalling it).
                Some(pid) => eprintln!(
                    "ringproxy: {}: an upgrade is under way: the established connections still here go on to the \
                     new process (pid {pid}), which serves on (signal it to stop the service); this process exits \
                     once they have",
                    signal_name(*sig)
                ),
                None => eprintln!(
                    "ringproxy: {}: draining: no new connections, open ones get up to {drain}",
                    signal_name(*sig)
                ),
            }
            ExitCode::SUCCESS
        }
        Stop::Failed(failure) => {
            eprintln!(
                "ringproxy: {failure}; draining: no new connections, open ones get up to {drain}; then exiting with \
                 status 1"
            );
            ExitCode::from(1)
        }
    };
    if let Some(n) = &notify {
        n.stopping(&format!("draining, up to {drain}"));
    }
    service.drain();
    // (An upgrade under way ends as it would have: handed over, the process leaves as after one.)
    while !service.finished() || service.upgrading().is_some() {
        match service.upgrade_end() {
            Some(end @ ringproxy::supervisor::UpgradeEnd::HandedOver { pid, .. }) => {
                return handed_over(service, &end, pid, notify.as_ref(), ready_file);
            }
            // Rolled back: what it kept drains here.
            Some(end) => eprintln!("ringproxy: {end}"),
            None => {}
        }
        // The runtime API keeps answering while the connections drain: `show ready` says FAIL at
        // once (a routing daemon's check must not hang), reads answer, changes are refused.
        service.serve_requests();
        match signals.wait_or(service.doorbell(), Duration::from_millis(100)) {
            Some(libc::SIGUSR1) => dump(&service),
            Some(libc::SIGHUP) => eprintln!("ringproxy: SIGHUP ignored while draining"),
            Some(sig) => {
                eprintln!("ringproxy: {} again: exiting now", signal_name(sig));
                // Exit without joining the draining workers (returning would: dropping the
                // supervisor joins its engines); what the engines hold dies with the process.
                service.abandon();
                drop(ready_file);
                std::process::exit(1);
            }
            None => {}
        }
    }
    service.join();
    eprintln!("ringproxy: drained, exiting");
    status
}

/// The old process of an upgrade has handed everything over (`end`) to process `pid`: tells
/// systemd which process is the service now, leaves the stats sockets' files and the ready file to
/// it, and exits.
fn handed_over(
    service: Supervisor,
    end: &ringproxy::supervisor::UpgradeEnd,
    pid: u32,
    notify: Option<&ringproxy::sdnotify::Notifier>,
    ready_file: Option<ReadyFile>,
) -> ExitCode {
    eprintln!("ringproxy: {end}");
    if let Some(n) = notify {
        n.main_pid(pid, "upgraded");
    }
    service.handed_over();
    if let Some(f) = ready_file {
        f.leave();
    }
    ExitCode::SUCCESS
}

/// Why the main loop ended.
enum Stop {
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// A helper thread failed.
    Failed(ringproxy::watch::Failure),
}

/// The startup report: workers, limits, warnings, listening addresses.
fn report(engine: &Engine) {
    let plan = engine.plan();
    let cpus: Vec<String> = plan.cpus.iter().map(|c| c.map_or("-".into(), |c| c.to_string())).collect();
    eprintln!(
        "ringproxy {}: {} worker{} (CPUs {}), maxconn {}{}, RLIMIT_NOFILE {}, {} connections per worker",
        env!("CARGO_PKG_VERSION"),
        plan.workers,
        if plan.workers == 1 { "" } else { "s" },
        cpus.join(","),
        plan.maxconn,
        plan.configured_maxconn.map_or(" (not configured)".into(), |m| format!(" (configured {m})")),
        plan.nofile,
        plan.conns_per_worker,
    );
    eprintln!("ringproxy: io_uring features ({}): {}", plan.io_chosen, plan.io);
    for w in &plan.warnings {
        eprintln!("ringproxy: warning: {w}");
    }
    for b in engine.bound() {
        eprintln!("ringproxy: frontend \"{}\" listening on {}", b.frontend, b.addr);
    }
}

/// systemd's STATUS= line: what runs.
fn status_line(service: &Supervisor) -> String {
    let engine = service.engine();
    let plan = engine.plan();
    format!(
        "generation {}: {} workers, maxconn {}, {} listeners",
        service.generation,
        plan.workers,
        plan.maxconn,
        engine.bound().len()
    )
}

/// What the ready file says about the current engine.
fn ready(service: &Supervisor) -> Ready {
    let engine = service.engine();
    Ready {
        pid: std::process::id(),
        generation: service.generation,
        listeners: engine.bound().iter().map(|b| ReadyListener { name: b.frontend.clone(), addr: b.addr }).collect(),
        stats_socket: engine.config().global.stats.socket.clone(),
        admin_socket: engine.config().global.stats.admin_socket.clone(),
        metrics: service.metrics_addr(),
    }
}

fn dump(service: &Supervisor) {
    let d = ringproxy::stats::render::dump(&service.engine().stats(), None);
    let draining = service.draining();
    let note = if draining > 0 { format!(" ({draining} older engine(s) still draining)") } else { String::new() };
    eprint!("ringproxy: SIGUSR1: per-core stats{note}\n{d}");
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
