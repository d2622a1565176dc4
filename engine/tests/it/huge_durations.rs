//! Durations at the type maximum must not break the engine at run time (review 3d): the health
//! checker's deadlines saturate instead of overflowing.

use std::time::Duration;

use crate::common::*;

/// Review 3d: `check: { interval: 18446744073709551615s, timeout: 18446744073709551615s }` made the
/// health thread panic on `Instant + Duration` before its first check on 7b9477c (servers frozen
/// UP, 0 checks). Either the configuration refuses it with its position, or the checker runs: the
/// first check happens, its result counts, and nothing panics.
#[test]
fn a_check_interval_at_the_type_maximum_does_not_panic() {
    let echo = Backend::start(Mode::Echo);
    let yaml = format!(
        "global: {{ workers: 1 }}\nfrontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends:\n  - name: be\n    check: {{ interval: 18446744073709551615s, timeout: 18446744073709551615s, fall: 1 }}\n\
         \x20   servers:\n      - {{ name: up, address: \"{}\", check: false }}\n      - {{ name: refused, address: \"127.0.0.1:{}\" }}\n\
         \x20     - {{ name: later, address: \"{}\" }}\n",
        echo.addr,
        free_port(),
        echo.addr
    );
    let config = match ringproxy::config::parse(&yaml, "huge.yaml") {
        Ok(c) => c,
        Err(e) => {
            // A documented maximum below the type's: refused with the position of the value.
            let e = e.to_string();
            assert!(e.starts_with("huge.yaml:5:"), "{e}");
            return;
        }
    };
    let engine = TestEngine::start(config);
    let state = |name: &str| engine.stats().health.into_iter().find(|h| h.server == name);
    wait_until("the first server checked to be DOWN", Duration::from_secs(5), || {
        state("refused").is_some_and(|h| h.checks == 1 && !h.up)
    });
    // The second checked server is due 1/16 of the interval later: not within this test.
    assert_eq!(state("later").map(|h| h.checks), Some(0));
    let mut c = connect(addr(&engine, "fe"));
    echo_once(&mut c, b"served by the unchecked server");
    drop(c);
    assert_idle(&engine, &[]);
    assert_stops_clean(engine, &[echo.addr.port()]);
}
