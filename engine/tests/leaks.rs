//! Nothing leaks after resets, timeouts and normal closes: no socket left open in the kernel, no
//! descriptor left in this process, no connection left in the engine. This binary runs its tests
//! one at a time (`serial()`), so no other test's descriptors disturb the count: `assert_clean`
//! then also checks that the process holds exactly the descriptors it held before the engine.

mod common;

use std::io::Write;

use common::*;

#[test]
fn resets_and_closes_leave_no_socket_or_descriptor_behind() {
    let _serial = serial();
    let echo = Backend::start(Mode::Echo);
    let resetting = Backend::start(Mode::ResetAfterRead);
    let held = Backend::start(Mode::Hold);
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
    let ports = [echo.addr.port(), resetting.addr.port(), held.addr.port()];
    assert_idle(&engine, &ports);
    let stats = engine.stats();
    assert_eq!(stats.total(|w| w.accepted), 200);
    assert_eq!(stats.total(|w| w.closed), 200);
    // Shut down: afterwards the process holds the descriptors it held before the engine started.
    assert_stops_clean(engine, &ports);
}
