//! `ringproxy check` as an operator runs it: the built binary, real configuration files, this host.
//!
//! What is asserted is what an operator relies on: the exit code (0 OK, 1 WARN, 2 FAIL), one
//! `OK`/`WARN`/`FAIL` line per item with a `fix:` under every non-OK one, the numbers in the
//! fixes, and `FILE:LINE:COLUMN:` for a configuration that does not load.

use std::path::{Path, PathBuf};

use crate::common::*;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn check(config: &Path) -> Run {
    let out = ringproxy().arg("check").arg("-c").arg(config).output().expect("run ringproxy");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples").join(name)
}

/// A configuration file with maxconn 100 and one frontend in front of one server `be/s` at
/// `address`, connecting from `source`.
fn one_server(name: &str, address: &str, source: &str) -> PathBuf {
    write_temp(
        &format!("check-{name}.yaml"),
        &format!(
            "global:\n  maxconn: 100\n\
             frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be }}\n\
             backends:\n  - name: be\n    servers:\n      - {{ name: s, address: \"{address}\", source: {source} }}\n"
        ),
    )
}

/// The item lines (`STATUS NAME DETAIL`) of a report, with the fix lines that follow each.
fn items(report: &str) -> Vec<(String, String, Vec<String>)> {
    let mut items: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in report.lines() {
        if let Some(status) = ["OK", "WARN", "FAIL"].into_iter().find(|s| line.starts_with(&format!("{s:<6}"))) {
            items.push((status.to_owned(), line[6..].to_owned(), Vec::new()));
        } else if line.starts_with("      ") {
            let last = items.last_mut().expect("a fix line follows an item");
            last.2.push(line.trim().to_owned());
        }
    }
    items
}

/// Every non-OK item has a fix, and the exit code is the worst status.
fn assert_consistent(run: &Run) {
    let items = items(&run.stdout);
    assert!(!items.is_empty(), "no items in:\n{}", run.stdout);
    for (status, line, fix) in &items {
        assert_eq!(status == "OK", fix.is_empty(), "{status} {line}: fix {fix:?}");
        if let Some(first) = fix.first() {
            assert!(first.starts_with("fix: "), "{first}");
        }
    }
    let worst = items.iter().map(|(s, _, _)| match s.as_str() {
        "FAIL" => 2,
        "WARN" => 1,
        _ => 0,
    });
    assert_eq!(run.code, worst.max().unwrap_or(0), "{}", run.stdout);
    let count = |s: &str| items.iter().filter(|i| i.0 == s).count();
    let summary = format!("summary: {} OK, {} WARN, {} FAIL\n", count("OK"), count("WARN"), count("FAIL"));
    assert!(run.stdout.ends_with(&summary), "{}", run.stdout);
}

#[test]
fn the_300k_configuration_cannot_be_all_ok_here() {
    let path = example("haproxy-300k.yaml");
    let run = check(&path);
    assert!(run.code == 1 || run.code == 2, "exit {}:\n{}", run.code, run.stdout);
    assert!(
        run.stdout.starts_with(&format!("ringproxy check: {} (1 frontend, 1 backend, 6 servers)", path.display())),
        "{}",
        run.stdout
    );
    assert_consistent(&run);
    let items = items(&run.stdout);
    let files = items.iter().find(|i| i.1.starts_with("open files")).expect("an open files item");
    let hard = ringproxy::host::nofile().expect("RLIMIT_NOFILE").hard;
    if hard < 4_000_064 {
        // maxconn 2000000 on 2 sockets per connection: the limit cannot hold it.
        assert_eq!(files.0, "FAIL", "{files:?}");
        assert!(files.1.contains(&format!("hard limit is {hard}")), "{files:?}");
        // 2 x 2,000,000 sockets per worker is past one ring's cap (1,048,576): the cap, and
        // the workers that need.
        assert!(files.2.iter().any(|f| f.contains("LimitNOFILE=1048576")), "{files:?}");
        assert!(files.2.iter().any(|f| f.contains("* hard nofile 1048576")), "{files:?}");
        assert!(files.2.iter().any(|f| f.contains("and global.workers: 4 ")), "{files:?}");
    }
    // One item per server for the port capacity, and the sources are all on loopback.
    for s in 1..=6 {
        let name = format!("ports mqtt/app{s} ");
        assert!(items.iter().any(|i| i.1.starts_with(&name)), "{name}");
    }
    let sources = items.iter().find(|i| i.1.starts_with("source addresses")).expect("a source addresses item");
    assert_ne!(sources.0, "FAIL", "127.0.2.x is loopback: {sources:?}");
}

#[test]
fn a_small_configuration_has_no_failure() {
    let config = one_server("small", "127.0.0.1:9", "127.0.2.1");
    let run = check(&config);
    assert!(run.code == 0 || run.code == 1, "exit {}:\n{}", run.code, run.stdout);
    assert!(!run.stdout.contains("\nFAIL "), "{}", run.stdout);
    assert_consistent(&run);
    let items = items(&run.stdout);
    let find = |name: &str| {
        items.iter().find(|i| i.1.starts_with(name)).unwrap_or_else(|| panic!("no {name} item in:\n{}", run.stdout))
    };
    assert_eq!(find("open files ").0, "OK");
    assert_eq!(find("ports be/s ").0, "OK");
    assert!(find("source addresses").1.contains("all 1 are assigned"));
}

#[test]
fn an_unassigned_source_fails_with_the_command_that_assigns_it() {
    let nonlocal = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind");
    if nonlocal.is_ok_and(|v| v.trim() != "0") {
        eprintln!("skipped: ip_nonlocal_bind lets any address bind on this host");
        return;
    }
    let config = one_server("unassigned", "203.0.113.1:80", "203.0.113.77");
    let run = check(&config);
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert_consistent(&run);
    let items = items(&run.stdout);
    let sources = items.iter().find(|i| i.1.starts_with("source addresses")).expect("a source addresses item");
    assert_eq!(sources.0, "FAIL");
    assert!(sources.1.contains("203.0.113.77 (be/s)"), "{sources:?}");
    assert_eq!(sources.2[0], "fix: ip addr add 203.0.113.77/32 dev lo");
}

#[test]
fn a_bad_key_is_refused_with_its_position() {
    let config = write_temp(
        "check-badkey.yaml",
        "global:\n  maxconn: 100\nfrontends:\n  - name: fe\n    bind: \"127.0.0.1:0\"\n    backend: be\n    maxconns: 10\n\
         backends:\n  - { name: be, servers: [{ name: s, address: \"127.0.0.1:9\" }] }\n",
    );
    let run = check(&config);
    assert_eq!(run.code, 2);
    let prefix = format!("{}:7:5: ", config.display());
    assert!(run.stderr.starts_with(&prefix), "wanted {prefix:?}, got {:?}", run.stderr);
    assert!(run.stderr.contains("maxconns"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "nothing is checked: {}", run.stdout);
}

/// `check --sysctl` prints the /etc/sysctl.d/ drop-in the configuration needs on a stock kernel:
/// `name = value` lines only (after the comments), every setting the 300k example needs, and
/// values the running check agrees with (the same items compute them).
#[test]
fn sysctl_prints_the_drop_in_a_fresh_host_needs() {
    let out = ringproxy().args(["check", "--sysctl", "-c"]).arg(example("haproxy-300k.yaml")).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let settings: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_once(" = ").unwrap_or_else(|| panic!("not `name = value`: {l}")))
        .collect();
    let names: Vec<&str> = settings.iter().map(|s| s.0).collect();
    for want in ["fs.file-max", "net.core.somaxconn", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_mem"] {
        assert!(names.contains(&want), "{want} missing from:\n{text}");
    }
    // Its workers' tables need RLIMIT_NOFILE 1,048,576 (the most one io_uring table holds): the
    // default fs.nr_open allows it, so the drop-in leaves it alone.
    assert!(!names.contains(&"fs.nr_open"), "{text}");
    let file_max: u64 = settings.iter().find(|s| s.0 == "fs.file-max").unwrap().1.parse().unwrap();
    assert!(file_max > 2 * 2_000_000, "two descriptors per connection at maxconn 2,000,000: {file_max}");
    assert_eq!(settings.iter().find(|s| s.0 == "net.ipv4.ip_local_port_range").unwrap().1, "1024 65535");
}
