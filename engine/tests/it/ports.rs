//! Running out of source ports toward a server is visible: counted, and said in a rate-limited
//! log line that names the server, the source and the fix (issue 10, item 8).

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

/// Runs `f` in a network namespace of its own whose ephemeral ports are 10.
fn in_private_network<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_network_namespace(&["/proc/sys/net/ipv4/ip_local_port_range=40000 40009"], f)
}

/// Review 5b (security-review-7b9477c): with the ports of a source address used up, connects
/// failed silently: counters only. Now a log line names the server, the source and the fix, at
/// most once per 10 s per server and worker.
#[test]
fn running_out_of_source_ports_is_said_with_the_server_the_source_and_the_fix() {
    in_private_network(|| {
        let backend = Backend::on("127.0.0.1:8080", Mode::Hold);
        let proxy = Proxy::start(
            "ports",
            "global: { workers: 1, stats: { socket: /tmp/ringproxy-ports-test.sock } }\n\
             frontends: [{ name: fe, bind: \"127.0.0.1:7000\", backend: be }]\n\
             backends: [{ name: be, retries: 0, servers: [{ name: app, address: \"127.0.0.1:8080\", source: 127.0.0.2 }] }]\n",
        );
        // Ten ports from 127.0.0.2 to the server: the eleventh connect and later ones find none.
        // (Each client from an address of its own: the clients' ports come from the same range.)
        let mut held: Vec<TcpStream> = Vec::new();
        for i in 0..15u8 {
            let mut c = connect_from("127.0.0.1:7000".parse().unwrap(), [127, 0, 1, i + 1].into());
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.write_all(b"x");
            held.push(c);
        }
        let line = proxy.wait_stderr("no free port");
        for part in
            ["from source 127.0.0.2", "to server be/app (127.0.0.1:8080)", "servers[].source", "ip_local_port_range"]
        {
            assert!(line.contains(part), "{line:?} does not say {part:?}");
        }
        let exhausted = proxy.stderr().iter().filter(|l| l.contains("no free port")).count();
        assert_eq!(exhausted, 1, "one line for a burst of failures (rate-limited)");
        backend.release();
        drop(held);
        proxy.stop_clean();
    });
}
