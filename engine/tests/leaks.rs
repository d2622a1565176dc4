//! Nothing leaks after resets, timeouts and normal closes: no socket left open in the kernel, no
//! descriptor left in this process, no connection left in the engine. (One test in this binary,
//! so no other test's descriptors disturb the count.)

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

#[test]
fn resets_and_closes_leave_no_socket_or_descriptor_behind() {
    let fds_before = open_fds();
    let echo = Backend::start(Mode::Echo);
    let resetting = Backend::start(Mode::ResetAfterRead);
    let held = Backend::start(Mode::Hold);
    let fds_with_backends = open_fds();
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ client: 2s }} }}\n\
         frontends:\n  - {{ name: echo, bind: \"127.0.0.1:0\", backend: echo }}\n\
         \x20 - {{ name: reset, bind: \"127.0.0.1:0\", backend: reset }}\n\
         \x20 - {{ name: held, bind: \"127.0.0.1:0\", backend: held }}\n\
         backends:\n  - {{ name: echo, servers: [{{ name: s, address: \"{}\", source: 127.0.2.9 }}] }}\n\
         \x20 - {{ name: reset, servers: [{{ name: s, address: \"{}\" }}] }}\n\
         \x20 - {{ name: held, servers: [{{ name: s, address: \"{}\" }}] }}\n",
        echo.addr, resetting.addr, held.addr
    ));
    let (fe_echo, fe_reset, fe_held) = (addr(&engine, "echo"), addr(&engine, "reset"), addr(&engine, "held"));
    for i in 0..50u32 {
        // A normal exchange and close.
        let mut c = connect(fe_echo);
        echo_once(&mut c, &i.to_le_bytes());
        drop(c);
        // The server resets.
        let mut c = connect(fe_reset);
        c.write_all(b"x").unwrap();
        let _ = read_to_end(&mut c);
        // The client resets mid-connection.
        let mut c = connect(fe_held);
        echo_once(&mut c, b"y");
        reset(c);
        // The client leaves with bytes still in flight toward it.
        let mut c = connect(fe_echo);
        c.write_all(&vec![7u8; 300_000]).unwrap();
        reset(c);
    }
    wait_until("the engine to close every connection", Duration::from_secs(10), || {
        engine.stats().total(|w| w.active) == 0
    });
    for port in
        [fe_echo.port(), fe_reset.port(), fe_held.port(), echo.addr.port(), resetting.addr.port(), held.addr.port()]
    {
        wait_until(&format!("no open socket on port {port}"), Duration::from_secs(5), || {
            open_sockets_on_port(port).is_empty()
        });
    }
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.accepted), 200);
    assert_eq!(stats.total(|w| w.closed), 200);
    assert_eq!(stats.total(|w| w.pipes_in_use), 0, "every pipe is back in its pool");
    engine.shutdown();
    assert_eq!(open_fds(), fds_with_backends, "the engine left descriptors open");
    assert!(fds_with_backends >= fds_before);
}
