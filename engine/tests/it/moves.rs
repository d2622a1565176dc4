//! Reload without reconnects: established connections move to the new engine (MSG_RING between
//! the rings, worker/moving.rs) and keep flowing both ways, keep their deadlines and count exactly
//! once against maxconn; those whose server the new file removed follow `on_removed`.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

fn yaml(server: std::net::SocketAddr, extra_global: &str, backend: &str) -> String {
    format!(
        "global: {{ workers: 2{extra_global} }}\ndefaults: {{ timeout: {{ client: 30s, server: 30s, drain: 10s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be{backend}, servers: [{{ name: s, address: \"{server}\" }}] }}]\n"
    )
}

/// Waits until `engine` holds exactly `n` moved-in connections, all active.
fn wait_moved(engine: &TestEngine, n: u64) {
    wait_for(&format!("{n} connections to move in"), Duration::from_secs(20), || {
        let s = engine.stats();
        let (moved, active) = (s.total(|w| w.moved_in), s.total(|w| w.active));
        if moved == n && active >= n { Ok(()) } else { Err(format!("moved_in {moved}, active {active}")) }
    });
}

fn wait_finished(old: &TestEngine) {
    wait_until("the old engine to finish (it holds nothing)", Duration::from_secs(20), || old.finished());
}

#[test]
fn established_connections_move_on_reload_and_keep_flowing_both_ways() {
    for splice in ["never", "auto", "always"] {
        let echo = Backend::start(Mode::Echo);
        let tune = format!(", tune: {{ splice: {splice} }}");
        let mut old = engine(&yaml(echo.addr, &tune, ""));
        let fe = addr(&old, "fe");
        // Idle connections, each having said something.
        let mut idle: Vec<TcpStream> = (0..100u32)
            .map(|i| {
                let mut c = connect(fe);
                echo_once(&mut c, &i.to_le_bytes());
                c
            })
            .collect();
        // Transfers in both directions at once (echo), running through the reload.
        let mut pumps: Vec<Pump> =
            (0..4).map(|i| Pump::connect(fe, 77 + i, false).unwrap().limit(4 * MIB).paced(4 * MIB)).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let step_all = |pumps: &mut Vec<Pump>| {
            for p in pumps.iter_mut() {
                p.step().unwrap();
            }
        };
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            step_all(&mut pumps);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(pumps.iter().all(|p| p.received > 0 && p.received < 4 * MIB), "mid-transfer at the reload");
        // The new file changes the timeouts and the backend's balancing.
        let new_yaml = yaml(echo.addr, &tune, ", balance: leastconn, timeout: { server: 40s }");
        let new = old.reload(&new_yaml);
        let start = Instant::now();
        loop {
            step_all(&mut pumps);
            let s = new.stats();
            if s.total(|w| w.moved_in) == 104 || start.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        wait_moved(&new, 104);
        let took = start.elapsed();
        wait_finished(&old);
        eprintln!("splice {splice}: 104 connections moved in {took:?}");
        // Both ways, byte for byte, to the end.
        for p in &mut pumps {
            p.run(deadline).unwrap();
            p.intact().unwrap();
        }
        for (i, c) in idle.iter_mut().enumerate() {
            echo_once(c, format!("still here {i}").as_bytes());
        }
        let s = new.stats();
        assert_eq!(s.total(|w| w.closed), 4, "only the four transfers ended");
        assert_eq!(s.total(|w| w.active), 100);
        drop(idle);
        drop(pumps);
        assert_clean(new, &[echo.addr.port()]);
        assert_clean(old, &[echo.addr.port()]);
    }
}
