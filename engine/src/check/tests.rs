//! Every verdict on synthetic hosts: a roomy one, then one fact changed at a time.

use std::collections::HashMap;

use super::ports::{ephemeral, port_list};
use super::*;
use crate::host::NofileLimit;

/// A host with room for everything the test configurations ask.
fn roomy() -> HostFacts {
    HostFacts {
        kernel: Some("6.12.0-1-amd64".into()),
        nofile: Some(NofileLimit { soft: 8_000_000, hard: 8_000_000 }),
        nr_open: Some(8_000_000),
        file_max: Some(1 << 40),
        files_in_use: Some(1000),
        somaxconn: Some(65535),
        syn_backlog: Some(65535),
        port_range: Some((32768, 60999)),
        reserved_ports: Vec::new(),
        tcp_mem: Some([10_000_000, 15_000_000, 20_000_000]),
        tcp_rmem: Some([4096, 4096, 16 << 20]),
        tcp_wmem: Some([4096, 4096, 16 << 20]),
        rmem_max: Some(4 << 20),
        wmem_max: Some(4 << 20),
        page_size: 4096,
        mem_total: Some(256 << 30),
        cpus: vec![0, 1, 2, 3],
        io_uring: Ok(Vec::new()),
        io_uring_disabled: Some(0),
        io_features: Ok((crate::features::IoFeatures::ALL, "this kernel's".into())),
        nonlocal_bind: false,
        unbindable: HashMap::new(),
        stats_socket: None,
    }
}

/// A configuration: `global` keys (2 workers unless given), extra frontend keys, server lines.
fn config(global: &str, frontend: &str, servers: &str) -> Config {
    let workers = if global.contains("workers") { "" } else { "workers: 2, " };
    let text = format!(
        "global: {{ {workers}{global} }}\nfrontends:\n  - {{ name: fe, bind: \"127.0.0.1:1880\", backend: be, {frontend} }}\n\
         backends:\n  - name: be\n    servers:\n{servers}"
    );
    crate::config::parse(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
}

const ONE: &str = "      - { name: a, address: \"127.0.0.1:1883\", source: 127.0.2.1 }\n";

fn item<'a>(items: &'a [Item], name: &str) -> &'a Item {
    items.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("no item {name}: {items:#?}"))
}

fn fix(i: &Item) -> &str {
    i.fix.as_deref().unwrap_or_else(|| panic!("{} has no fix", i.name))
}

#[test]
fn a_roomy_host_is_all_ok() {
    let (c, f) = (config("maxconn: 100", "", ONE), roomy());
    let items = evaluate(&c, &f);
    let bad: Vec<&Item> = items.iter().filter(|i| i.status != Status::Ok).collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(exit_code(&items), 0);
    let text = render(&c, &f, &items);
    assert!(text.starts_with("ringproxy check: t.yaml (1 frontend, 1 backend, 1 server) on Linux 6.12.0"), "{text}");
    assert!(text.contains("\nOK    open files"), "{text}");
    assert!(!text.contains("sysctl.d"), "nothing to persist: {text}");
    assert!(text.ends_with(&format!("summary: {} OK, 0 WARN, 0 FAIL\n", items.len())), "{text}");
}

#[test]
fn a_tiny_open_files_limit_fails_with_every_fix() {
    let mut f = roomy();
    f.nofile = Some(NofileLimit { soft: 1000, hard: 1000 });
    f.nr_open = Some(100_000);
    let items = evaluate(&config("maxconn: 100000", "", ONE), &f);
    let files = item(&items, "open files");
    assert_eq!(files.status, Status::Fail);
    assert!(files.detail.contains("hard limit is 1000 -> 2 worker(s) hold 872"), "{}", files.detail);
    let f = fix(files);
    assert!(f.contains("LimitNOFILE=200128"), "{f}");
    assert!(f.contains("\"* hard nofile 200128\""), "{f}");
    assert!(f.contains("global.workers: 230 (230 x 436 >= 100000"), "{f}");
    assert!(f.contains("fs.nr_open raised first"), "{f}");
    let nr_open = item(&items, "fs.nr_open");
    assert_eq!((nr_open.status, fix(nr_open)), (Status::Fail, "sysctl -w fs.nr_open=200128"));
    assert_eq!(exit_code(&items), 2);
}

#[test]
fn the_hard_limit_counts_and_more_workers_than_cpus_is_ok() {
    let mut f = roomy();
    f.nofile = Some(NofileLimit { soft: 1024, hard: 20_000 });
    f.cpus = vec![0, 1];
    let c = config(
        "maxconn: 300000, workers: 32, pin_cpus: false",
        "",
        "      - { name: a, address: \"10.0.0.1:80\", source: 127.0.2.0/28 }\n",
    );
    let items = evaluate(&c, &f);
    let files = item(&items, "open files");
    assert_eq!(files.status, Status::Ok, "{files:#?}");
    assert!(files.detail.contains("soft limit 1024 is raised to it at start"), "{}", files.detail);
    let w = item(&items, "workers");
    assert!(w.status == Status::Ok && w.detail.contains("more workers than CPUs is allowed"), "{w:#?}");
}

#[test]
fn a_small_somaxconn_warns_with_the_sysctl() {
    let mut f = roomy();
    (f.somaxconn, f.syn_backlog) = (Some(128), Some(512));
    let items = evaluate(&config("maxconn: 100", "backlog: 1000", ONE), &f);
    let s = item(&items, "net.core.somaxconn");
    assert_eq!(s.status, Status::Warn);
    assert!(s.detail.contains("backlog fe 1000 at 128"), "{}", s.detail);
    assert_eq!(fix(s), "sysctl -w net.core.somaxconn=1000");
    assert_eq!(fix(item(&items, "tcp_max_syn_backlog")), "sysctl -w net.ipv4.tcp_max_syn_backlog=1000");
    assert_eq!(exit_code(&items), 1);
}

#[test]
fn socket_buffer_sizes_beyond_the_kernels_maximum_warn_with_the_sysctl() {
    let mut f = roomy();
    let none = evaluate(&config("maxconn: 100", "", ONE), &f);
    assert!(none.iter().all(|i| i.name != "socket buffers"), "no item when no size is set");
    let within = evaluate(&config("maxconn: 100, tune: { sndbuf_server: 4m, rcvbuf_client: 256k }", "", ONE), &f);
    assert_eq!(item(&within, "socket buffers").status, Status::Ok);
    let tune = "tune: { sndbuf_server: 8m, sndbuf_client: 6m, rcvbuf_server: 1m, rcvbuf_client: 16m }";
    f.rmem_max = Some(212992);
    let items = evaluate(&config(&format!("maxconn: 100, {tune}"), "", ONE), &f);
    let b = item(&items, "socket buffers");
    assert_eq!(b.status, Status::Warn);
    assert!(
        b.detail.contains(
            "tune.rcvbuf_client 16777216, tune.rcvbuf_server 1048576 (net.core.rmem_max 212992); tune.sndbuf_client 6291456, tune.sndbuf_server 8388608 (net.core.wmem_max 4194304)"
        ),
        "{}",
        b.detail
    );
    assert_eq!(fix(b), "sysctl -w net.core.rmem_max=16777216\nsysctl -w net.core.wmem_max=8388608");
    f.wmem_max = None;
    let unread = evaluate(&config("maxconn: 100, tune: { sndbuf_server: 64k }", "", ONE), &f);
    let b = item(&unread, "socket buffers");
    assert_eq!((b.status, b.detail.as_str()), (Status::Warn, "cannot read net.core.wmem_max"));
}

#[test]
fn own_ports_inside_the_ephemeral_range_warn() {
    let mut f = roomy();
    f.reserved_ports = vec![(50000, 50001)];
    f.unbindable.insert("192.0.2.9".parse().unwrap(), "Cannot assign requested address".into());
    let servers =
        "      - { name: a, address: \"127.0.0.1:40001\" }\n      - { name: b, address: \"192.0.2.9:40002\" }\n";
    let c = crate::config::parse(&format!("global: {{ maxconn: 100 }}\nfrontends:\n  - {{ name: fe, bind: [\"0.0.0.0:40000\", \"127.0.0.1:0\"], backend: be }}\nbackends:\n  - name: be\n    servers:\n{servers}"), "t").unwrap();
    let r = evaluate(&c, &f);
    let r = item(&r, "reserved ports");
    assert_eq!(r.status, Status::Warn);
    assert!(r.detail.starts_with("40000-40001 inside ip_local_port_range 32768-60999"), "{}", r.detail);
    // The remote server's port does not matter; what is reserved already stays reserved.
    assert_eq!(fix(r), "sysctl -w net.ipv4.ip_local_reserved_ports=40000-40001,50000-50001");
}

#[test]
fn port_capacity_counts_sources_and_shared_pairs() {
    let six: String = (1..=6)
        .map(|i| format!("      - {{ name: s{i}, address: \"127.0.0.1:{}\", source: 127.0.2.{i} }}\n", 1883 + i / 4))
        .collect();
    let items = evaluate(&config("maxconn: 300000", "", &six), &roomy());
    let s1 = item(&items, "ports be/s1");
    assert_eq!(s1.status, Status::Fail);
    assert_eq!(
        s1.detail,
        "127.0.0.1:1883: 1 source(s) (127.0.2.1) x 28232 ports = 28232 connections; may receive up to 50000 (maxconn 300000 x weight 1/6)"
    );
    assert!(fix(s1).contains("add sources: 3 needed, e.g. source: 127.0.2.0/30 (4 x 28232 = 112928)"), "{}", fix(s1));
    assert!(fix(s1).contains("sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"\nsysctl -w net.ipv4.ip_local_reserved_ports=1880,1883-1884"), "{}", fix(s1));
    // The second server at the same address gets the next block; it points at the first for the sysctls.
    let s2 = fix(item(&items, "ports be/s2"));
    assert!(s2.contains("source: 127.0.2.4/30") && s2.contains("as shown for ports be/s1"), "{s2}");

    let enough = "      - { name: a, address: \"127.0.0.1:1883\", source: 127.0.2.0/30, maxconn: 90000 }\n      - { name: b, address: \"127.0.0.1:1883\", source: 127.0.3.0/30 }\n";
    let items = evaluate(&config("maxconn: 300000", "", enough), &roomy());
    let a = item(&items, "ports be/a");
    assert_eq!(a.status, Status::Ok, "{a:#?}");
    assert!(a.detail.contains("4 source(s) (127.0.2.0..127.0.2.3) x 28232 ports = 112928 connections; may receive up to 90000 (server maxconn)"), "{}", a.detail);

    // Each alone fits, but both use the one source toward the one address.
    let shared = "      - { name: a, address: \"127.0.0.1:1883\", source: 127.0.2.1 }\n      - { name: b, address: \"127.0.0.1:1883\", source: 127.0.2.1 }\n";
    let items = evaluate(&config("maxconn: 40000", "", shared), &roomy());
    let a = item(&items, "ports be/a");
    assert_eq!(a.status, Status::Fail, "{a:#?}");
    assert!(a.detail.ends_with("shares sources and address with be/b: up to 40000 per source"), "{}", a.detail);
}

#[test]
fn frontend_limits_bound_what_is_sized() {
    let items = evaluate(&config("maxconn: 300000", "maxconn: 1000", ONE), &roomy());
    let a = item(&items, "ports be/a");
    assert!(a.detail.ends_with("may receive up to 1000 (frontend maxconn 1000 x weight 1/1)"), "{}", a.detail);
    assert!(item(&items, "memory").detail.starts_with("1000 connections x "));
}

#[test]
fn unassigned_sources_fail_with_ip_addr_add() {
    let mut f = roomy();
    f.unbindable.insert("192.0.2.77".parse().unwrap(), "Cannot assign requested address (os error 99)".into());
    let c = config(
        "maxconn: 100",
        "",
        "      - { name: a, address: \"192.0.2.1:1883\", source: [127.0.2.1, 192.0.2.77] }\n",
    );
    let items = evaluate(&c, &f);
    let s = item(&items, "source addresses");
    assert_eq!(s.status, Status::Fail);
    assert!(s.detail.starts_with("1 of 2 not assigned to this host: 192.0.2.77 (be/a) (Cannot assign"), "{}", s.detail);
    assert!(fix(s).starts_with("ip addr add 192.0.2.77/32 dev lo\n"), "{}", fix(s));
    f.unbindable.clear();
    f.nonlocal_bind = true;
    assert_eq!(item(&evaluate(&c, &f), "source addresses").status, Status::Warn);
}

#[test]
fn io_uring_and_kernel_problems_fail() {
    let mut f = roomy();
    f.io_uring = Err("io_uring_setup failed: Invalid argument (os error 22)".into());
    f.kernel = Some("5.15.0-91-generic".into());
    let items = evaluate(&config("maxconn: 100", "", ONE), &f);
    assert_eq!(item(&items, "io_uring").status, Status::Fail);
    assert!(fix(item(&items, "io_uring")).contains("need 6.1+"));
    assert_eq!(item(&items, "kernel").status, Status::Fail);
    f.io_uring = Ok(vec!["SPLICE"]);
    assert!(
        item(&evaluate(&config("maxconn: 100", "", ONE), &f), "io_uring").detail.contains("lacks IORING_OP_SPLICE")
    );
    // 6.1 is enough; what it lacks is named with its fallback.
    f.io_uring = Ok(Vec::new());
    f.kernel = Some("6.1.0-28-amd64".into());
    f.io_features = Ok((crate::features::IoFeatures::of_kernel((6, 1)), "this kernel's".into()));
    let items = evaluate(&config("maxconn: 100", "", ONE), &f);
    assert_eq!(item(&items, "kernel").status, Status::Ok);
    let detail = &item(&items, "io_uring").detail;
    assert!(
        detail.contains("no BIND") && detail.contains("fallbacks: ") && detail.contains("connect to AF_UNSPEC"),
        "{detail}"
    );
}

#[test]
fn memory_is_sized_for_the_configured_maxconn() {
    let mut f = roomy();
    (f.mem_total, f.tcp_mem) = (Some(1 << 30), Some([1000, 2000, 3000]));
    f.tcp_rmem = Some([4096, 131072, 6 << 20]);
    let items = evaluate(&config("maxconn: 100000", "", ONE), &f);
    let m = item(&items, "memory");
    assert_eq!(m.status, Status::Fail, "22 KiB x 100000 = 2.1 GiB > 1 GiB: {m:#?}");
    // 1 GiB / 2 / (2 x (4096 + 4096 + 3072)) connections.
    assert!(fix(m).starts_with("global.maxconn: 23831 "), "{}", fix(m));
    let t = item(&items, "tcp memory");
    assert_eq!(t.status, Status::Fail);
    assert!(t.detail.contains("= 200000 sockets x (tcp_rmem min 4096 + tcp_wmem min 4096)"), "{}", t.detail);
    // Sized for the 23831 connections that fit: 2 x 23831 x 8 KiB = 95324 pages.
    let fix = fix(t);
    assert!(fix.contains("for maxconn 23831:\nsysctl -w net.ipv4.tcp_mem=\"95324 142986 190648\""), "{fix}");
    assert!(fix.contains("net.ipv4.tcp_rmem=\"4096 4096 6291456\""), "{fix}");
    let small = evaluate(&config("maxconn: 100", "", ONE), &f);
    assert_eq!(item(&small, "tcp memory").status, Status::Ok);
    // Filled buffers: the defaults (and how far they may grow), or the sizes set, doubled.
    let d = &item(&small, "tcp memory").detail;
    assert!(d.contains("(client side 131072 + 4096, server side 131072 + 4096: tcp_rmem"), "{d}");
    assert!(d.contains("autotune up to 6291456 + 16777216 each"), "{d}");
    let set = evaluate(&config("maxconn: 100, tune: { sndbuf_client: 16k, rcvbuf_server: 32k }", "", ONE), &f);
    let d = &item(&set, "tcp memory").detail;
    assert!(d.contains("(client side 131072 + 32768, server side 65536 + 4096: tune.rcvbuf_*"), "{d}");
    assert!(d.contains("they would need 22.3 MiB"), "100 x (131072 + 32768 + 65536 + 4096) B: {d}");
}

#[test]
fn memory_counts_the_stats_every_worker_keeps_per_server() {
    let servers: String =
        (0..1000).map(|i| format!("      - {{ name: s{i}, address: \"127.0.0.1:{}\" }}\n", 2000 + i)).collect();
    let mut f = roomy();
    let items = evaluate(&config("maxconn: 100", "", &servers), &f);
    let m = item(&items, "memory");
    let each = crate::stats::SERVER_BYTES_PER_WORKER;
    assert!(
        m.detail.contains(&format!("+ 1000 servers x 2 workers x {} of stats", super::render::size(each))),
        "{}",
        m.detail
    );
    assert_eq!(m.status, Status::Ok);
    // 1000 servers x 2 workers x ~1.7 KiB = ~3.3 MiB: too much for a 4 MiB host.
    f.mem_total = Some(4 << 20);
    let m = item(&evaluate(&config("maxconn: 100", "", &servers), &f), "memory").clone();
    assert_eq!(m.status, Status::Fail, "{m:#?}");
    assert!(fix(&m).contains("per-server stats alone take 3."), "{}", fix(&m));
}

#[test]
fn a_file_at_the_stats_socket_path_fails() {
    use crate::stats::socket::Occupant;
    let c = config("stats: { socket: /etc/ringproxy.yaml }", "", ONE);
    let mut f = roomy();
    f.stats_socket = Some(Occupant::Other("a regular file"));
    let i = item(&evaluate(&c, &f), "stats socket").clone();
    assert_eq!(i.status, Status::Fail);
    assert!(i.detail.contains("/etc/ringproxy.yaml is a regular file, not a socket"), "{}", i.detail);
    assert!(fix(&i).contains("global.stats.socket"));
    for ok in [Occupant::Nothing, Occupant::Socket] {
        f.stats_socket = Some(ok);
        assert_eq!(item(&evaluate(&c, &f), "stats socket").status, Status::Ok);
    }
    f.stats_socket = None;
    assert!(evaluate(&config("", "", ONE), &f).iter().all(|i| i.name != "stats socket"));
}

#[test]
fn file_max_counts_two_sockets_per_connection() {
    let mut f = roomy();
    f.file_max = Some(150_000);
    let items = evaluate(&config("maxconn: 100000", "", ONE), &f);
    let i = item(&items, "fs.file-max");
    assert_eq!(i.status, Status::Fail, "{i:#?}");
    assert!(fix(i).starts_with("sysctl -w fs.file-max="), "{}", fix(i));
    let text = render(&config("maxconn: 100000", "", ONE), &f, &items);
    assert!(text.contains("/etc/sysctl.d/90-ringproxy.conf:\n  fs.file-max = "), "{text}");
}

#[test]
fn config_warnings_are_items() {
    let text = "frontends:\n  - { name: fe, bind: \"127.0.0.1:0\", backend: a }\nbackends:\n  - { name: a, servers: [{ name: s, address: \"127.0.0.1:9\" }] }\n  - { name: b, servers: [{ name: s, address: \"127.0.0.1:9\" }] }\n";
    let items = evaluate(&crate::config::parse(text, "t.yaml").unwrap(), &roomy());
    let w = items.iter().find(|i| i.status == Status::Warn).expect("a warning item");
    assert!(w.detail.contains("backend \"b\" is not used"), "{w:#?}");
    assert!(fix(w).starts_with("edit t.yaml:5:"), "{}", fix(w));
}

#[test]
fn port_lists_use_the_kernel_syntax() {
    assert_eq!(port_list(vec![1884, 1880, 1883, 1880]), "1880,1883-1884");
    assert_eq!(ephemeral((100, 109), &[(105, 200), (100, 100)]), 4);
}
