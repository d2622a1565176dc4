use std::collections::HashSet;
use std::time::Duration;

use super::*;

fn ok(text: &str) -> Config {
    parse(text, "t.yaml").unwrap_or_else(|e| panic!("expected a valid config, got: {e}"))
}

/// Asserts that `text` is refused at `line:column` with a message containing `needle`.
fn refused(text: &str, line: u64, column: u64, needle: &str) {
    let e = parse(text, "t.yaml").expect_err("expected the configuration to be refused");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("t.yaml:{line}:{column}: ")),
        "wrong position in {shown:?}, wanted {line}:{column}"
    );
    assert!(shown.contains(needle), "{shown:?} does not mention {needle:?}");
}

const BASE: &str = "\
frontends:
  - name: fe
    bind: 127.0.0.1:8080
    backend: be
backends:
  - name: be
    servers:
      - name: s1
        address: 127.0.0.1:9001
";

#[test]
fn minimal_gets_documented_defaults() {
    let c = ok(BASE);
    assert_eq!(c.global.workers, None);
    assert!(c.global.pin_cpus);
    assert_eq!(c.global.maxconn, None);
    let fe = &c.frontends[0];
    assert_eq!(fe.binds, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(fe.client_timeout, default::CLIENT);
    assert_eq!(fe.backlog, default::BACKLOG_MAX);
    let be = &c.backends[0];
    assert_eq!(be.balance, Balance::Roundrobin);
    assert_eq!(be.retries, 3);
    assert_eq!(be.connect_timeout, default::CONNECT);
    assert_eq!(be.queue_timeout, default::CONNECT);
    assert_eq!(be.server_timeout, default::SERVER);
    assert_eq!(be.servers[0].weight, 1);
    assert!(be.servers[0].sources.is_empty());
    assert!(c.warnings.is_empty());
}

#[test]
fn everything_set() {
    // The every-key example (config-examples/every-key.yaml), read as the engine reads it.
    let c = ok(include_str!("../../../config-examples/every-key.yaml"));
    assert_eq!(c.global.workers, Some(3));
    assert!(!c.global.pin_cpus);
    assert_eq!(c.global.maxconn, Some(1000));
    assert_eq!(c.global.drain_timeout, Duration::from_secs(5));
    assert_eq!(
        c.global.tune,
        Tune {
            pipe_size: 1 << 20,
            max_pipes: 64,
            recv_buffers: 1024,
            recv_buffer_size: 32 << 10,
            ring_entries: 1024,
            iowq_workers: 2,
            peer_lookups: 512,
            io_features: None,
            splice: SpliceMode::Always,
            client_buffers: SocketBuffers { receive: Some(16 << 10), send: Some(32 << 10) },
            server_buffers: SocketBuffers { receive: Some(64 << 10), send: Some(128 << 10) },
            notsent_lowat: Some(256 << 10),
            send_zerocopy: Some(64 << 10),
            batch_wait: BatchWait::Every(Duration::from_micros(500)),
            idle_poll_after: Some(Duration::from_secs(30)),
        }
    );
    let fe = &c.frontends[0];
    assert_eq!(fe.binds.len(), 2);
    let acl = fe.acl.as_ref().expect("allow and deny are set");
    assert!(acl.permits("10.1.2.3".parse().unwrap()) && acl.permits("127.0.0.1".parse().unwrap()));
    assert!(!acl.permits("10.66.0.1".parse().unwrap()) && !acl.permits("192.0.2.1".parse().unwrap()));
    assert!(c.frontends[1].acl.is_none());
    let k = fe.tcp_keepalive.expect("set");
    assert_eq!((k.idle, k.interval, k.count), (Duration::from_secs(120), Duration::from_secs(15), 4));
    let k = c.backends[0].tcp_keepalive.expect("set");
    assert_eq!(k.as_sockopts(), [300, 10, 6], "interval and count default to 10s and 6");
    assert!(c.frontends[1].tcp_keepalive.is_none());
    assert_eq!(fe.maxconn, Some(500));
    assert_eq!(fe.backlog, 128);
    assert_eq!(fe.client_timeout, Duration::from_secs(7));
    let be = &c.backends[0];
    assert_eq!(be.balance, Balance::Source);
    assert_eq!(be.maxconn, Some(900));
    assert_eq!(be.retries, 5);
    assert_eq!(be.connect_timeout, Duration::from_millis(1500));
    assert_eq!(be.server_timeout, Duration::from_secs(3));
    assert_eq!(be.queue_timeout, Duration::from_secs(10));
    assert_eq!(be.servers[0].sources.len(), 4);
    assert_eq!(be.servers[0].maxconn, Some(7));
    assert_eq!(be.servers[1].weight, 0);
    assert_eq!((be.splice, c.backends[1].splice), (SpliceMode::Always, SpliceMode::Never), "tune.splice, its own");
}

#[test]
fn examples_parse_and_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(c.warnings.is_empty(), "{}: {:?}", path.display(), c.warnings);
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected the example configurations in {}", dir.display());
    let c = load(&dir.join("haproxy-300k.yaml")).unwrap();
    let be = &c.backends[0];
    assert_eq!(be.servers.len(), 6);
    let sources: Vec<String> = be.servers.iter().map(|s| s.sources[0].to_string()).collect();
    assert_eq!(sources, ["127.0.2.1", "127.0.2.2", "127.0.2.3", "127.0.2.4", "127.0.2.5", "127.0.2.6"]);
    assert_eq!(c.global.maxconn, Some(2_000_000));
    assert_eq!(be.connect_timeout, Duration::from_millis(5000));
}

#[test]
fn unknown_keys_name_the_key_and_position() {
    refused(&format!("global:\n  wrokers: 2\n{BASE}"), 2, 3, "unknown key `wrokers`");
    refused(&BASE.replace("    backend: be\n", "    backend: be\n    colour: red\n"), 5, 5, "colour");
}

#[test]
fn wrong_types() {
    refused(&format!("global:\n  maxconn: lots\n{BASE}"), 2, 12, "expected a whole number, not \"lots\"");
    refused(&format!("global:\n  maxconn: -5\n{BASE}"), 2, 12, "negative");
    refused(&format!("global:\n  workers: many\n{BASE}"), 2, 12, "`auto` or a positive number");
    refused(&format!("global:\n  pin_cpus: maybe\n{BASE}"), 2, 13, "");
    refused(
        &format!("defaults:\n  timeout:\n    connect: 5 seconds\n{BASE}"),
        3,
        14,
        "\"5 seconds\" is not a duration",
    );
    refused(&format!("defaults:\n  balance: fastest\n{BASE}"), 2, 12, "roundrobin");
    refused("frontends: 3\n", 1, 12, "");
}

#[test]
fn out_of_range_values() {
    refused(&format!("global:\n  workers: 0\n{BASE}"), 2, 12, "1-1024");
    refused(&format!("global:\n  maxconn: 0\n{BASE}"), 2, 12, "between 1 and");
    refused(&format!("global:\n  tune:\n    ring_entries: 1000\n{BASE}"), 3, 19, "power of two");
    refused(&format!("defaults:\n  timeout:\n    client: 0\n{BASE}"), 3, 13, "greater than zero");
    refused(
        &BASE.replace("address: 127.0.0.1:9001", "address: 127.0.0.1:9001\n        weight: 300"),
        10,
        17,
        "weight must be between 0 and 256",
    );
}

#[test]
fn duplicate_names() {
    let two_backends = format!("{BASE}  - name: be\n    servers:\n      - {{ name: x, address: 127.0.0.1:1 }}\n");
    refused(&two_backends, 10, 11, "duplicate backend name \"be\" (first defined at line 6)");
    let two_servers = format!("{BASE}      - name: s1\n        address: 127.0.0.1:9002\n");
    refused(&two_servers, 10, 15, "duplicate server name \"s1\"");
    let two_frontends = BASE.replace("backends:", "  - name: fe\n    bind: 127.0.0.1:8081\n    backend: be\nbackends:");
    refused(&two_frontends, 5, 11, "duplicate frontend name \"fe\"");
    refused(&format!("global:\n  maxconn: 1\n  maxconn: 2\n{BASE}"), 3, 3, "key `maxconn` appears twice");
}

#[test]
fn references_and_emptiness() {
    refused(
        &BASE.replace("backend: be", "backend: nope"),
        4,
        14,
        "backend \"nope\" does not exist (defined backends: be)",
    );
    refused(
        "frontends:\n  - { name: fe, bind: \"127.0.0.1:1\", backend: be }\nbackends:\n  - name: be\n    servers: []\n",
        5,
        14,
        "backend \"be\" has no servers",
    );
    refused("backends:\n  - name: be\n    servers: [{ name: a, address: \"127.0.0.1:1\" }]\n", 1, 1, "no `frontends:`");
    refused(
        "frontends: []\nbackends:\n  - name: be\n    servers: [{ name: a, address: \"127.0.0.1:1\" }]\n",
        1,
        12,
        "empty",
    );
    refused(
        &BASE
            .replace("    servers:", "    servers:\n      - { name: z, address: 127.0.0.1:7, weight: 0 }")
            .replace("      - name: s1\n        address: 127.0.0.1:9001\n", ""),
        8,
        7,
        "weight 0",
    );
}

#[test]
fn bad_addresses() {
    refused(
        &BASE.replace("127.0.0.1:9001", "192.168.8.300:1883"),
        9,
        18,
        "server \"s1\": address \"192.168.8.300:1883\": \"192.168.8.300\" is not an IP address",
    );
    refused(&BASE.replace("127.0.0.1:9001", "app1.local:1883"), 9, 18, "host names are not resolved");
    refused(&BASE.replace("bind: 127.0.0.1:8080", "bind: 127.0.0.1"), 3, 11, "has no port");
    refused(
        &BASE.replace("address: 127.0.0.1:9001", "address: 127.0.0.1:9001\n        source: 192.168.8.300"),
        10,
        17,
        "source \"192.168.8.300\" is not an IP address",
    );
    refused(
        &BASE.replace("address: 127.0.0.1:9001", "address: 127.0.0.1:9001\n        source: \"::1\""),
        10,
        17,
        "not of the same address family",
    );
    let overlapping = BASE.replace("backends:", "  - name: fe2\n    bind: 0.0.0.0:8080\n    backend: be\nbackends:");
    refused(&overlapping, 6, 11, "overlaps 127.0.0.1:8080 of frontend \"fe\"");
}

#[test]
fn timeouts_only_where_they_apply() {
    refused(
        &BASE.replace("    servers:", "    timeout: { drain: 5s }\n    servers:"),
        7,
        23,
        "timeout drain does not apply to a backend",
    );
    refused(
        &BASE.replace("    backend: be\n", "    backend: be\n    timeout: { server: 5s }\n"),
        5,
        24,
        "timeout server does not apply to a frontend",
    );
}

#[test]
fn queue_timeout_defaults_to_the_backends_own_connect_timeout() {
    let c = ok(&BASE.replace("    servers:", "    timeout: { connect: 2s }\n    servers:"));
    assert_eq!(c.backends[0].queue_timeout, Duration::from_secs(2));
    let c = ok(&format!(
        "defaults:\n  timeout: {{ queue: 9s }}\n{}",
        BASE.replace("    servers:", "    timeout: { connect: 2s }\n    servers:")
    ));
    assert_eq!(c.backends[0].queue_timeout, Duration::from_secs(9), "an explicit defaults queue wins");
}

#[test]
fn health_checks_proxy_protocol_and_privileges() {
    let c = ok(&format!(
        "global: {{ user: nobody, group: nogroup }}\n{}",
        BASE.replace("    backend: be\n", "    backend: be\n    accept_proxy: true\n    timeout: { proxy_header: 2s }\n")
            .replace(
                "    servers:",
                "    check: { interval: 500ms, rise: 1, fall: 2, send: \"PING\\r\\n\", expect: PONG }\n    on_down: shutdown_sessions\n    servers:"
            )
            .replace("address: 127.0.0.1:9001", "address: 127.0.0.1:9001\n        send_proxy: v2\n        check: false")
    ));
    assert_eq!(c.global.user.as_deref(), Some("nobody"));
    assert_eq!(c.global.group.as_deref(), Some("nogroup"));
    let fe = &c.frontends[0];
    assert!(fe.accept_proxy);
    assert_eq!(fe.proxy_header_timeout, Duration::from_secs(2));
    let be = &c.backends[0];
    let check = be.check.as_ref().unwrap();
    assert_eq!(
        (check.interval, check.timeout, check.rise, check.fall),
        (Duration::from_millis(500), Duration::from_millis(500), 1, 2)
    );
    assert_eq!(check.send.as_deref(), Some(b"PING\r\n".as_slice()));
    assert_eq!(check.expect.as_deref(), Some(b"PONG".as_slice()));
    assert_eq!(be.on_down, OnDown::ShutdownSessions);
    assert_eq!(be.servers[0].send_proxy, Some(ProxyVersion::V2));
    assert!(!be.servers[0].check);
    let c = ok(BASE);
    assert!(!c.frontends[0].accept_proxy && c.backends[0].check.is_none() && c.backends[0].servers[0].check);
    refused(
        &BASE.replace("    servers:", "    check: { rise: 0 }\n    servers:"),
        7,
        20,
        "check rise must be between 1",
    );
    refused(&BASE.replace("    servers:", "    on_down: explode\n    servers:"), 7, 14, "shutdown_sessions");
    refused(&BASE.replace("address: 127.0.0.1:9001", "address: 127.0.0.1:9001\n        send_proxy: v3"), 10, 21, "v2");
}

#[test]
fn stats_and_connection_log() {
    let c = ok(&format!(
        "global:\n  stats: {{ socket: /run/rp.sock, mode: \"0660\", prometheus: \"127.0.0.1:9101\" }}\n  connection_log: stdout\n{BASE}"
    ));
    assert_eq!(c.global.stats.socket.as_deref(), Some(Path::new("/run/rp.sock")));
    assert_eq!(c.global.stats.mode, 0o660);
    assert_eq!(c.global.stats.prometheus, Some("127.0.0.1:9101".parse().unwrap()));
    assert_eq!(c.global.connection_log, Some(LogTarget::Stdout));
    let c = ok(BASE);
    assert_eq!(
        c.global.stats,
        Stats { socket: None, mode: 0o600, admin_socket: None, admin_mode: 0o600, prometheus: None }
    );
    assert_eq!(c.global.connection_log, None);
    refused(&format!("global:\n  stats: {{ socket: /x, mode: \"0666\" }}\n{BASE}"), 2, 30, "world-writable");
    refused(&format!("global:\n  stats: {{ socket: /x, mode: \"rw\" }}\n{BASE}"), 2, 30, "not octal");
    refused(&format!("global:\n  stats: {{ prometheus: nowhere }}\n{BASE}"), 2, 24, "stats prometheus");
    let c = ok(&format!("global:\n  stats: {{ prometheus: \"0.0.0.0:9101\" }}\n{BASE}"));
    assert!(c.warnings[0].contains("reachable from other hosts"), "{:?}", c.warnings);
}

#[test]
fn warnings_for_suspicious_but_valid() {
    let c = ok(&format!(
        "global:\n  maxconn: 10\n{}  - name: unused\n    servers: [{{ name: x, address: \"127.0.0.1:1\" }}]\n",
        BASE.replace("    backend: be\n", "    backend: be\n    maxconn: 20\n")
    ));
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings.iter().any(|w| w.contains("above the global maxconn 10")));
    assert!(c.warnings.iter().any(|w| w.starts_with("t.yaml:13:11: warning: backend \"unused\" is not used")));
}

#[test]
fn syntax_errors_have_positions() {
    let e = parse("frontends: [\n", "t.yaml").unwrap_err();
    assert!(e.position().is_some(), "{e}");
    let e = parse("a: b: c\n", "t.yaml").unwrap_err();
    assert!(e.to_string().starts_with("t.yaml:1:"), "{e}");
}

#[test]
fn unreadable_file() {
    let e = load(Path::new("/nonexistent/ringproxy.yaml")).unwrap_err();
    assert!(e.to_string().starts_with("/nonexistent/ringproxy.yaml: cannot read"), "{e}");
}

/// Review 3c (security-review-7b9477c): a duration of 2^64 ms (or s) was accepted and wrapped the
/// engine's deadline arithmetic, closing every connection at once. Every duration now has a
/// documented maximum, refused beyond with its position.
#[test]
fn durations_beyond_the_maximum_are_refused_where_they_are_written() {
    refused(
        &format!("defaults:\n  timeout: {{ client: 18446744073709551615 }}\n{BASE}"),
        2,
        22,
        "timeout client must be at most 24d (as in HAProxy)",
    );
    refused(
        &format!("defaults:\n  timeout: {{ server: 18446744073709551615s }}\n{BASE}"),
        2,
        22,
        "timeout server must be at most",
    );
    refused(&format!("defaults:\n  timeout: {{ drain: 25d }}\n{BASE}"), 2, 21, "timeout drain must be at most");
    // Review 3d: a check interval at the type's maximum made the health thread panic.
    let check = BASE.replace("  - name: be\n", "  - name: be\n    check: { interval: 18446744073709551615s }\n");
    refused(&check, 7, 24, "timeout check interval must be at most");
    ok(&format!("defaults:\n  timeout: {{ client: 24d }}\n{BASE}"));
}

/// Review 3e: `ringproxy check` panicked (a format width of 65,535 or more) on a server name of
/// 65,524 characters. Names now have a maximum, and the check report caps its column anyway.
#[test]
fn names_longer_than_the_maximum_are_refused() {
    let long = "s".repeat(70_000);
    refused(&BASE.replace("name: s1", &format!("name: {long}")), 8, 15, "name is 70000 characters long; at most 128");
    ok(&BASE.replace("name: s1", &format!("name: {}", "s".repeat(128))));
}

/// Review 3a (wording): the YAML parser's safety limits were reported as Rust debug text
/// (`budget breached: ScalarBytes { .. }`); they are said in the file's terms.
#[test]
fn parser_safety_limits_are_worded_in_the_files_terms() {
    let big = format!("global: {{ workers: \"{}\" }}\n", "x".repeat(70 << 20));
    let e = parse(&big, "t.yaml").unwrap_err().to_string();
    assert!(e.starts_with("t.yaml:1:"), "{e}");
    assert!(e.contains("more than 64 MiB of text in its values") && !e.contains("ScalarBytes"), "{e}");
    let deep = format!("global: {}{}\n", "{ a: ".repeat(100), "}".repeat(100));
    let e = parse(&deep, "t.yaml").unwrap_err().to_string();
    assert!(e.contains("nested more than 64 levels deep") || e.contains("expected"), "{e}");
}

/// The keys the loader accepts in one section: it lists them when it refuses an unknown one.
fn accepted_keys(yaml_with_bogus_key: &str) -> Vec<String> {
    let e = parse(yaml_with_bogus_key, "t.yaml").expect_err("an unknown key is refused").to_string();
    let list = e.split("expected one of ").nth(1).unwrap_or_else(|| panic!("no key list in {e:?}"));
    list.split(',').map(|k| k.trim().trim_matches('`').to_string()).filter(|k| !k.is_empty()).collect()
}

/// Issue 10 item 9: docs/configuration.md documents every key the loader accepts (a key added
/// to the loader without its entry fails here). Sections are found from the loader's own list
/// of valid keys, so a new section or key needs no change to this test.
#[test]
fn every_key_the_loader_accepts_is_documented() {
    let docs = include_str!("../../../docs/configuration.md");
    // The key paths documented by headings: "### `a.b`, `.c`" documents a.b and a.c.
    let mut documented = HashSet::new();
    for heading in docs.lines().filter(|l| l.starts_with("### ")) {
        let mut prefix = String::new();
        for item in heading.split('`').skip(1).step_by(2) {
            let path = match item.strip_prefix('.') {
                Some(rest) => format!("{prefix}.{rest}"),
                None => item.to_string(),
            };
            prefix = path.rsplit_once('.').map_or(String::new(), |(p, _)| p.to_string());
            documented.insert(path);
        }
    }
    let bogus = "zz_not_a_key: 1";
    let fe = "frontends: [{ name: f, bind: \"127.0.0.1:1\", backend: b";
    let srv = "servers: [{ name: s, address: \"127.0.0.1:2\"";
    let sections = [
        ("global", format!("global: {{ {bogus} }}\n{BASE}")),
        ("global.tune", format!("global: {{ tune: {{ {bogus} }} }}\n{BASE}")),
        ("global.stats", format!("global: {{ stats: {{ {bogus} }} }}\n{BASE}")),
        ("defaults", format!("defaults: {{ {bogus} }}\n{BASE}")),
        ("defaults.timeout", format!("defaults: {{ timeout: {{ {bogus} }} }}\n{BASE}")),
        ("frontends[]", format!("{fe}, {bogus} }}]\nbackends: [{{ name: b, {srv} }}] }}]\n")),
        ("frontends[].timeout", format!("{fe}, timeout: {{ {bogus} }} }}]\nbackends: [{{ name: b, {srv} }}] }}]\n")),
        ("backends[]", format!("{fe} }}]\nbackends: [{{ name: b, {bogus}, {srv} }}] }}]\n")),
        ("backends[].timeout", format!("{fe} }}]\nbackends: [{{ name: b, timeout: {{ {bogus} }}, {srv} }}] }}]\n")),
        ("backends[].check", format!("{fe} }}]\nbackends: [{{ name: b, check: {{ {bogus} }}, {srv} }}] }}]\n")),
        ("servers[]", format!("{fe} }}]\nbackends: [{{ name: b, {srv}, {bogus} }}] }}]\n")),
    ];
    let mut missing = Vec::new();
    for (section, yaml) in &sections {
        for key in accepted_keys(yaml) {
            let path = format!("{section}.{key}");
            // The timeout sections share their keys, and refuse those meaningless in them (e.g. a
            // frontend's `timeout.connect`): only the keys a section really takes count.
            if section.ends_with(".timeout") && parse(&yaml.replace(bogus, &format!("{key}: 1s")), "t.yaml").is_err() {
                continue;
            }
            // A section documented as a whole (its keys in a table): `check`'s keys are rows.
            let in_table = *section == "backends[].check" && docs.contains(&format!("| `{key}` |"));
            // Timeouts and sub-sections are documented under their own keys.
            let parent = ["timeout", "tune", "stats"].contains(&key.as_str());
            if !documented.contains(&path) && !in_table && !parent {
                missing.push(path);
            }
        }
    }
    assert!(missing.is_empty(), "keys the loader accepts but docs/configuration.md does not document: {missing:?}");
}

#[test]
fn io_features_names_a_kernel_at_or_above_the_floor() {
    let base = "frontends:\n  - { name: fe, bind: \"127.0.0.1:0\", backend: be }\n\
                backends:\n  - { name: be, servers: [ { name: s, address: \"127.0.0.1:9\" } ] }\n";
    let with = |v: &str| format!("global:\n  tune: {{ io_features: {v} }}\n{base}");
    assert_eq!(ok(&with("\"6.1\"")).global.tune.io_features, Some((6, 1)));
    assert_eq!(ok(&with("\"6.8\"")).global.tune.io_features, Some((6, 8)));
    assert_eq!(ok(&with("native")).global.tune.io_features, None);
    let e = parse(&with("\"5.15\""), "t.yaml").unwrap_err().to_string();
    assert!(e.starts_with("t.yaml:2:") && e.contains("below the kernel ringproxy needs, 6.1"), "{e}");
    let e = parse(&with("newest"), "t.yaml").unwrap_err().to_string();
    assert!(e.contains("\"native\" or a kernel version"), "{e}");
}

#[test]
fn access_lists_name_their_bad_entry() {
    let with = |l: &str| {
        format!(
            "frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be, {l} }}\n\
             backends:\n  - {{ name: be, servers: [ {{ name: s, address: \"127.0.0.1:9\" }} ] }}\n"
        )
    };
    let e = parse(&with("deny: [\"10.0.0.0/40\"]"), "t.yaml").unwrap_err().to_string();
    assert!(
        e.starts_with("t.yaml:2:") && e.contains("frontend \"fe\": deny") && e.contains("prefix length 0-32"),
        "{e}"
    );
    let e = parse(&with("allow: []"), "t.yaml").unwrap_err().to_string();
    assert!(e.contains("`allow` lists no address"), "{e}");
}

#[test]
fn tcp_keepalive_takes_whole_seconds_the_kernel_accepts() {
    let with = |k: &str| {
        format!(
            "frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be, tcp_keepalive: {k} }}\n\
             backends:\n  - {{ name: be, servers: [ {{ name: s, address: \"127.0.0.1:9\" }} ] }}\n"
        )
    };
    let e = parse(&with("{ idle: 1500ms }"), "t.yaml").unwrap_err().to_string();
    assert!(e.starts_with("t.yaml:2:") && e.contains("tcp_keepalive idle must be whole seconds"), "{e}");
    let e = parse(&with("{ interval: 10h }"), "t.yaml").unwrap_err().to_string();
    assert!(e.contains("from 1s to 32767s"), "{e}");
    let e = parse(&with("{ count: 0 }"), "t.yaml").unwrap_err().to_string();
    assert!(e.contains("tcp_keepalive count must be between 1 and 127"), "{e}");
    let e = parse(&with("{ idel: 5s }"), "t.yaml").unwrap_err().to_string();
    assert!(e.contains("unknown key `idel`"), "{e}");
}

#[test]
fn lifetime_slowstart_close_spread_and_the_admin_socket_are_checked() {
    let with = |defaults: &str, fe: &str, be: &str, server: &str| {
        format!(
            "global: {{ stats: {{ socket: /tmp/s.sock, admin_socket: /tmp/a.sock }} }}\ndefaults: {{ {defaults} }}\n\
             frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be{fe} }}\n\
             backends:\n  - {{ name: be{be}, servers: [ {{ name: s, address: \"127.0.0.1:9\"{server} }} ] }}\n"
        )
    };
    let c = parse(
        &with("timeout: { lifetime: 1h, lifetime_jitter: 10m }", "", ", close_spread: 10s", ", slowstart: 30s"),
        "t.yaml",
    )
    .unwrap();
    let life = c.frontends[0].lifetime.expect("inherited from defaults");
    assert_eq!((life.max, life.jitter), (Duration::from_secs(3600), Duration::from_secs(600)));
    assert!((0..1000).map(|k| life.of(k)).all(|ms| (3_000_000..=3_600_000).contains(&ms)));
    assert_ne!(life.of(1), life.of(2), "each connection draws its own part of the jitter");
    assert_eq!(c.backends[0].close_spread, Some(Duration::from_secs(10)));
    assert_eq!(c.backends[0].servers[0].slowstart, Some(Duration::from_secs(30)));
    assert_eq!(c.global.stats.admin_socket.as_deref(), Some(std::path::Path::new("/tmp/a.sock")));
    let c = parse(&with("timeout: { lifetime: 1h }", ", timeout: { lifetime: 0s }", "", ""), "t.yaml").unwrap();
    assert_eq!(c.frontends[0].lifetime, None, "lifetime: 0 turns the default off");
    for (yaml, want) in [
        (
            with("timeout: { lifetime: 10s, lifetime_jitter: 10s }", "", "", ""),
            "lifetime_jitter (10s) must be below the lifetime (10s)",
        ),
        (with("timeout: { lifetime_jitter: 1s }", "", "", ""), "timeout lifetime_jitter needs a timeout lifetime"),
        (with("timeout: { lifetime: 500ms }", "", "", ""), "timeout lifetime must be from 1s to 365d"),
        (with("", "", ", timeout: { lifetime: 1h }", ""), "timeout lifetime does not apply to a backend"),
        (with("", "", ", close_spread: 2h", ""), "close_spread must be above zero and at most 1h, not 2h"),
        (with("", "", "", ", slowstart: 0s"), "slowstart must be above zero"),
        (
            with("", "", "", "").replace("/tmp/a.sock", "/tmp/s.sock"),
            "stats admin_socket is the same path as stats socket",
        ),
        (
            with("", "", "", "")
                .replace("admin_socket: /tmp/a.sock", "admin_socket: /tmp/a.sock, admin_mode: \"0666\""),
            "stats admin_mode 0666 makes the socket world-writable",
        ),
    ] {
        let e = parse(&yaml, "t.yaml").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:") && e.contains(want), "{want}: {e}");
    }
}

#[test]
fn per_source_limits_and_rate_limit_are_checked() {
    let with = |fe: &str| {
        format!(
            "frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be{fe} }}\n\
             backends:\n  - {{ name: be, balance: hash, servers: [ {{ name: s, address: \"127.0.0.1:9\" }} ] }}\n"
        )
    };
    let c =
        parse(&with(", maxconn_per_source: 50, rate_per_source: 10/s, source_prefix: 24, rate_limit: 2000"), "t.yaml")
            .unwrap();
    let p = c.frontends[0].per_source.expect("set");
    assert_eq!((p.maxconn, p.rate, p.prefix_v4, p.prefix_v6), (Some(50), Some(10), 24, 128));
    assert_eq!(c.frontends[0].rate_limit, Some(2000), "a bare number is per second");
    assert_eq!(c.backends[0].balance, Balance::Hash);
    for (fe, want) in [
        (
            ", maxconn_per_source: 5, accept_proxy: true",
            "which on an accept_proxy frontend is the load balancer in front",
        ),
        (", rate_per_source: 0/s", "rate_per_source must be from 1/s to 1000000/s, not 0/s"),
        (", rate_per_source: fast", "expected a rate such as 200/s, not \"fast\""),
        (", maxconn_per_source: 5, source_prefix: 33", "source_prefix must be between 0 and 32, not 33"),
        (", rate_limit: 0", "rate_limit must be from 1/s to 10000000/s, not 0/s"),
    ] {
        let e = parse(&with(fe), "t.yaml").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:") && e.contains(want), "{want}: {e}");
    }
    let e = parse(&with("").replace("balance: hash", "balance: leastconn, hash_key: source"), "t.yaml").unwrap_err();
    assert!(e.to_string().contains("hash_key applies to balance: hash, not leastconn"), "{e}");
    let c = parse(&with(", source_prefix: 24"), "t.yaml").unwrap();
    assert!(c.frontends[0].per_source.is_none());
    assert!(
        c.warnings.iter().any(|w| w.contains("sets a source prefix without maxconn_per_source")),
        "{:?}",
        c.warnings
    );
}

/// A minimal file with `tune` (flow-map keys) set; its `tune:` is on line 2.
fn with_tune(tune: &str) -> String {
    format!(
        "global:\n  tune: {{ {tune} }}\n\
         frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be }}\n\
         backends:\n  - {{ name: be, servers: [ {{ name: s, address: \"127.0.0.1:9\" }} ] }}\n"
    )
}

#[test]
fn socket_buffers_and_notsent_lowat_are_unset_by_default_and_set_from_4k_to_1g() {
    let tune = |t: &str| ok(&with_tune(t)).global.tune;
    let unset = SocketBuffers { receive: None, send: None };
    assert_eq!((Tune::default().client_buffers, Tune::default().server_buffers), (unset, unset));
    let t = tune("rcvbuf_client: 4k, sndbuf_server: 1g");
    assert_eq!(t.client_buffers, SocketBuffers { receive: Some(4096), send: None });
    assert_eq!(t.server_buffers, SocketBuffers { receive: None, send: Some(1 << 30) });
    assert_eq!(tune("").notsent_lowat, None);
    let t = tune("sndbuf_client: 65536, rcvbuf_server: 256k, notsent_lowat: 128k");
    let lowat = (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, 128 << 10);
    assert_eq!(t.client_sockopts(), [(libc::SOL_SOCKET, libc::SO_SNDBUF, 65536), lowat]);
    assert_eq!(t.server_sockopts(), [(libc::SOL_SOCKET, libc::SO_RCVBUF, 256 << 10), lowat]);
    assert_eq!(tune("rcvbuf_client: 8k").server_sockopts(), [], "each side its own");
    for (key, bad) in [
        ("rcvbuf_client", "1k"),
        ("sndbuf_client", "2g"),
        ("rcvbuf_server", "0"),
        ("sndbuf_server", "4095"),
        ("notsent_lowat", "2k"),
    ] {
        let e = parse(&with_tune(&format!("{key}: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:2:") && e.contains(&format!("{key} must be between 4k and 1g bytes")),
            "{key} {bad}: {e}"
        );
    }
}

#[test]
fn batch_wait_is_auto_by_default_off_auto_with_a_window_or_a_duration_from_10us_to_100ms_when_set() {
    let tune = |t: &str| ok(&with_tune(t)).global.tune;
    let auto = BatchWait::Auto(Duration::from_millis(2));
    assert_eq!(Tune::default().batch_wait, auto);
    assert_eq!(tune("").batch_wait, auto);
    assert_eq!(tune("batch_wait: auto").batch_wait, auto);
    assert_eq!(tune("batch_wait: AUTO").batch_wait, auto);
    assert_eq!(tune("batch_wait: auto 1ms").batch_wait, BatchWait::Auto(Duration::from_millis(1)));
    assert_eq!(tune("batch_wait: \"Auto  500us \"").batch_wait, BatchWait::Auto(Duration::from_micros(500)));
    assert_eq!(tune("batch_wait: auto 3").batch_wait, BatchWait::Auto(Duration::from_millis(3)), "a bare number is ms");
    assert_eq!(tune("batch_wait: off").batch_wait, BatchWait::Off);
    assert_eq!(tune("batch_wait: false").batch_wait, BatchWait::Off);
    assert_eq!(tune("batch_wait: 2ms").batch_wait, BatchWait::Every(Duration::from_millis(2)));
    assert_eq!(tune("batch_wait: 500us").batch_wait, BatchWait::Every(Duration::from_micros(500)));
    assert_eq!(tune("batch_wait: 1").batch_wait, BatchWait::Every(Duration::from_millis(1)), "a bare number is ms");
    for (bad, shown) in
        [("5us", "5us"), ("101ms", "101ms"), ("1s", "1s"), ("0", "0us"), ("auto 5us", "5us"), ("auto 1s", "1s")]
    {
        let e = parse(&with_tune(&format!("batch_wait: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:2:")
                && e.contains(&format!(
                    "batch_wait's window must be between 10us and 100ms (batch_wait: off, auto, auto 1ms or 2ms), not {shown}"
                )),
            "{bad}: {e}"
        );
    }
    for bad in ["on", "true", "soon", "auto soon", "autos", "auto 1ms 2ms"] {
        let e = parse(&with_tune(&format!("batch_wait: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:2:")
                && e.contains("auto, auto with its window (auto 1ms), or a duration such as 500us or 2ms"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn idle_poll_after_is_10s_by_default_off_or_a_duration_from_100ms_to_1d_when_set() {
    let tune = |t: &str| ok(&with_tune(t)).global.tune;
    assert_eq!(Tune::default().idle_poll_after, Some(Duration::from_secs(10)));
    assert_eq!(tune("").idle_poll_after, Some(Duration::from_secs(10)));
    assert_eq!(tune("idle_poll_after: off").idle_poll_after, None);
    assert_eq!(tune("idle_poll_after: false").idle_poll_after, None);
    assert_eq!(tune("idle_poll_after: 1m").idle_poll_after, Some(Duration::from_secs(60)));
    assert_eq!(tune("idle_poll_after: 250ms").idle_poll_after, Some(Duration::from_millis(250)));
    assert_eq!(tune("idle_poll_after: 5000").idle_poll_after, Some(Duration::from_secs(5)), "a bare number is ms");
    for (bad, shown) in [("50ms", "50ms"), ("2d", "2d"), ("0", "0us")] {
        let e = parse(&with_tune(&format!("idle_poll_after: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:2:")
                && e.contains(&format!("idle_poll_after must be off or between 100ms and 1d, not {shown}")),
            "{bad}: {e}"
        );
    }
    for bad in ["on", "true", "soon"] {
        let e = parse(&with_tune(&format!("idle_poll_after: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:2:") && e.contains("a duration such as 10s or 1m"), "{bad}: {e}");
    }
}

#[test]
fn send_zerocopy_is_off_by_default_and_a_size_from_4k_to_1g_when_set() {
    let tune = |t: &str| ok(&with_tune(t)).global.tune;
    assert_eq!(Tune::default().send_zerocopy, None);
    assert_eq!(tune("").send_zerocopy, None);
    assert_eq!(tune("send_zerocopy: off").send_zerocopy, None);
    assert_eq!(tune("send_zerocopy: false").send_zerocopy, None);
    assert_eq!(tune("send_zerocopy: 64k").send_zerocopy, Some(64 << 10));
    assert_eq!(tune("send_zerocopy: 4096").send_zerocopy, Some(4096));
    for bad in ["1k", "2g", "0"] {
        let e = parse(&with_tune(&format!("send_zerocopy: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:2:") && e.contains("send_zerocopy must be off or between 4k and 1g bytes"),
            "{bad}: {e}"
        );
    }
    for bad in ["on", "true", "lots"] {
        let e = parse(&with_tune(&format!("send_zerocopy: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:2:") && e.contains("64k"), "{bad}: {e}");
    }
}

/// Two frontends, to a backend `local` and a backend `remote`, with these `tune` keys and these
/// keys of each backend.
fn two_backends(tune: &str, local: &str, remote: &str) -> String {
    format!(
        "global:\n  tune: {{ {tune} }}\n\
         frontends:\n  - {{ name: a, bind: \"127.0.0.1:0\", backend: local }}\n\
         \x20 - {{ name: b, bind: \"127.0.0.1:0\", backend: remote }}\n\
         backends:\n  - {{ name: local, {local}servers: [ {{ name: s, address: \"127.0.0.1:9\" }} ] }}\n\
         \x20 - {{ name: remote, {remote}servers: [ {{ name: s, address: \"127.0.0.2:9\" }} ] }}\n"
    )
}

#[test]
fn a_backend_sets_its_own_splice_mode_over_tune_splice_and_the_pools_follow() {
    let modes = |c: &Config| (c.backends[0].splice, c.backends[1].splice);
    // Unset: tune.splice, whose default is auto.
    let c = ok(&two_backends("", "", ""));
    assert_eq!(modes(&c), (SpliceMode::Auto, SpliceMode::Auto));
    assert!(c.uses_ring() && c.splices() && c.splices_auto());
    let c = ok(&two_backends("splice: always", "", ""));
    assert_eq!(modes(&c), (SpliceMode::Always, SpliceMode::Always));
    assert!(!c.uses_ring() && c.splices() && !c.splices_auto(), "no backend uses the receive buffers");
    // A backend's own mode over tune.splice, the other keeps tune.splice's.
    let c = ok(&two_backends("", "splice: never, ", ""));
    assert_eq!(modes(&c), (SpliceMode::Never, SpliceMode::Auto));
    // One backend copying all its bytes gets the workers `never`'s pool of receive buffers.
    assert_eq!(c.global.tune.recv_buffers, 1024);
    let c = ok(&two_backends("splice: always", "splice: never, ", ""));
    assert_eq!(modes(&c), (SpliceMode::Never, SpliceMode::Always));
    assert!(c.uses_ring() && c.splices() && !c.splices_auto());
    assert_eq!(c.global.tune.recv_buffers, 1024);
    let c = ok(&two_backends("splice: never", "", "splice: always, "));
    assert_eq!(modes(&c), (SpliceMode::Never, SpliceMode::Always));
    let c = ok(&two_backends("splice: never", "splice: auto, ", "splice: auto, "));
    assert_eq!(modes(&c), (SpliceMode::Auto, SpliceMode::Auto));
    assert_eq!(c.global.tune.recv_buffers, 256, "no backend copies all: auto's pool");
    assert!(c.splices() && c.splices_auto());
    let c = ok(&two_backends("splice: never, recv_buffers: 300", "", ""));
    assert_eq!(c.global.tune.recv_buffers, 300, "set: as set");
    // A backend no frontend uses makes the workers do nothing for it (it only gets a warning).
    let unused =
        ok(&two_backends("splice: never", "", "splice: always, ").replace("backend: remote", "backend: local"));
    assert!(!unused.splices(), "only the used backend's mode counts");
    refused(
        &two_backends("", "splice: sometimes, ", ""),
        7,
        28,
        "splice \"sometimes\" is not one of auto, always, never",
    );
}

#[test]
fn recv_buffer_size_is_whole_pages_from_4k_to_1m() {
    // 64 KiB in every mode; the number of buffers makes a pool of bytes that follows the mode
    // (16 MiB where bulk flows may splice, 64 MiB where the buffers carry all), unless set.
    let tune = |t: &str| ok(&with_tune(t)).global.tune;
    assert_eq!((Tune::default().recv_buffer_size, Tune::default().recv_buffers), (64 << 10, 256));
    assert_eq!((tune("splice: auto").recv_buffer_size, tune("splice: auto").recv_buffers), (64 << 10, 256));
    assert_eq!((tune("splice: never").recv_buffer_size, tune("splice: never").recv_buffers), (64 << 10, 1024));
    assert_eq!(tune("recv_buffer_size: 16k").recv_buffers, 1024);
    assert_eq!(tune("splice: never, recv_buffer_size: 16k").recv_buffers, 4096);
    assert_eq!(tune("recv_buffer_size: 1m").recv_buffers, 64, "never fewer than 64");
    assert_eq!(tune("recv_buffer_size: 4k, splice: never").recv_buffers, 16384);
    assert_eq!(tune("recv_buffer_size: 1m, recv_buffers: 100").recv_buffers, 100, "set: as set");
    assert_eq!(tune("recv_buffer_size: 1m").recv_buffer_size, 1 << 20);
    for bad in ["2k", "6000", "2m"] {
        let e = parse(&with_tune(&format!("recv_buffer_size: {bad}")), "t.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:2:") && e.contains("recv_buffer_size must be a multiple of 4k between 4k and 1m"),
            "{bad}: {e}"
        );
    }
}
