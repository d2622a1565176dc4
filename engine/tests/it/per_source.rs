//! Per-source limits (`maxconn_per_source`, `rate_per_source`, `source_prefix`) from real source
//! addresses: exact across two workers (the listeners steer each source to one worker), refused
//! connections closed at accept and counted, the table emptied once its sources are gone.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::*;

/// A connection from `from`: `Some` if the proxy serves it (its echo comes back), `None` if it was
/// closed at accept.
fn served(front: SocketAddr, from: &str) -> Option<TcpStream> {
    let mut c = connect_from(front, from.parse::<IpAddr>().unwrap());
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"?").ok()?;
    let mut b = [0u8];
    loop {
        match c.read(&mut b) {
            Ok(1) => return Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Closed at accept: a reset (the "?" was unread) or an end.
            _ => return None,
        }
    }
}

#[test]
fn per_source_limits_are_exact_across_workers() {
    let backend = Backend::start(Mode::Echo);
    let engine = engine(&format!(
        "global: {{ workers: 2 }}\n\
         frontends:\n  - {{ name: one, bind: \"127.0.0.1:0\", backend: be, maxconn_per_source: 3 }}\n\
         \x20 - {{ name: net, bind: \"127.0.0.1:0\", backend: be, maxconn_per_source: 3, source_prefix: 24 }}\n\
         \x20 - {{ name: rate, bind: \"127.0.0.1:0\", backend: be, rate_per_source: 4/s }}\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
        backend.addr
    ));
    let (one, net, rate) = (addr(&engine, "one"), addr(&engine, "net"), addr(&engine, "rate"));
    let mut held = Vec::new();

    // Eight connections from one address: three served, wherever the kernel would have put them
    // (two workers with three each would have served six).
    let from_a: Vec<_> = (0..8).filter_map(|_| served(one, "127.0.5.1")).collect();
    assert_eq!(from_a.len(), 3, "maxconn_per_source 3 across two workers");
    held.extend(from_a);
    let from_b: Vec<_> = (0..5).filter_map(|_| served(one, "127.0.5.2")).collect();
    assert_eq!(from_b.len(), 3, "another address has its own three");
    held.extend(from_b);
    // A /24: its addresses share three.
    let in_24 = ["127.0.6.1", "127.0.6.2", "127.0.6.3", "127.0.6.1", "127.0.6.9"];
    let shared: Vec<_> = in_24.iter().filter_map(|ip| served(net, ip)).collect();
    assert_eq!(shared.len(), 3, "source_prefix: 24 counts the block");
    held.extend(shared);
    // One closes: its source may connect again.
    held.pop();
    let mut retried = 0;
    wait_for("the closed connection to be given back", Duration::from_secs(5), || match served(net, "127.0.6.77") {
        Some(c) => {
            held.push(c);
            Ok(())
        }
        None => {
            retried += 1;
            Err("still refused".into())
        }
    });

    // Steering spreads sources over both workers (it does not send everyone to one).
    let before: Vec<u64> = engine.stats().workers.iter().map(|w| w.accepted).collect();
    for i in 1..=40 {
        assert!(served(one, &format!("127.0.7.{i}")).is_some());
    }
    let after: Vec<u64> = engine.stats().workers.iter().map(|w| w.accepted).collect();
    let per_worker: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(per_worker.iter().all(|&n| n >= 8), "40 sources over two workers: {per_worker:?}");

    // Rate: four at once (a second's worth), then four per second.
    let burst: Vec<_> = (0..10).filter_map(|_| served(rate, "127.0.8.1")).collect();
    assert_eq!(burst.len(), 4, "rate_per_source 4/s: a burst of 4");
    std::thread::sleep(Duration::from_millis(600));
    let later = (0..5).filter_map(|_| served(rate, "127.0.8.1")).count();
    assert_eq!(later, 2, "0.6 s later: 2.4 tokens");
    drop(burst);

    let stats = engine.stats();
    let refused = stats.total(|w| w.source_refused.maxconn);
    assert_eq!(refused, 5 + 2 + 2 + retried, "refused by maxconn_per_source");
    assert_eq!(stats.total(|w| w.source_refused.rate), 6 + 3);
    assert!(stats.total(|w| w.sources_tracked) >= 4);
    drop(held);
    // Once their connections are gone and their buckets full, the sources leave the table.
    wait_until("the source tables to empty", Duration::from_secs(5), || {
        engine.stats().total(|w| w.sources_tracked) == 0
    });
    assert_clean(engine, &[backend.addr.port()]);
}
