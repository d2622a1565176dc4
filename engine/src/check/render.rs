//! The report `ringproxy check` prints, and the words it is written in (counts, sizes).
//!
//! Rendering adds nothing to the verdicts: every line comes from an [`Item`], and the persistent
//! sysctl block repeats, once per name, the sysctls of the items that are not OK.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{HostFacts, Item, Status};
use crate::config::Config;

/// The report: a header, one aligned line per item with its fix below, the sysctls to persist,
/// and a summary.
pub fn render(config: &Config, facts: &HostFacts, items: &[Item]) -> String {
    let (origin, kernel) = (&config.origin, facts.kernel.as_deref().unwrap_or("?"));
    let (cpus, ram) = (facts.cpus.len(), facts.mem_total.map_or("?".into(), size));
    let mut out =
        format!("ringproxy check: {origin} ({}) on Linux {kernel}, {cpus} usable CPU(s), {ram} RAM\n", counts(config));
    // Item names can carry configured names: the column stops growing at 40 (and a width of 65,535
    // or more would make `format!` panic: review 3e).
    let width = items.iter().map(|i| i.name.len()).max().unwrap_or(0).clamp(20, 40) + 2;
    for i in items {
        let status = ["OK", "WARN", "FAIL"][i.status as usize];
        let _ = writeln!(out, "{status:<6}{:<width$}{}", i.name, i.detail);
        for (n, line) in i.fix.iter().flat_map(|f| f.lines()).enumerate() {
            let _ = writeln!(out, "      {}{line}", if n == 0 { "fix: " } else { "     " });
        }
    }
    let mut seen = BTreeSet::new();
    let persist: Vec<String> = (items.iter().filter(|i| i.status != Status::Ok))
        .flat_map(|i| &i.sysctls)
        .filter(|(n, _)| seen.insert(n.clone()))
        .map(|(n, v)| format!("  {n} = {v}\n"))
        .collect();
    if !persist.is_empty() {
        out.push_str("to keep the sysctl fixes across reboots, put in /etc/sysctl.d/90-ringproxy.conf:\n");
        out.push_str(&persist.concat());
    }
    let n = |s: Status| items.iter().filter(|i| i.status == s).count();
    let (ok, warn, fail) = (n(Status::Ok), n(Status::Warn), n(Status::Fail));
    let _ = writeln!(out, "summary: {ok} OK, {warn} WARN, {fail} FAIL");
    out
}

/// `2 frontends, 1 backend, 3 servers`.
pub(super) fn counts(config: &Config) -> String {
    let servers = config.backends.iter().map(|b| b.servers.len()).sum();
    let (f, b) = (config.frontends.len(), config.backends.len());
    format!("{}, {}, {}", plural(f, "frontend"), plural(b, "backend"), plural(servers, "server"))
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Bytes as `312 MiB` or `30.5 GiB`.
pub(super) fn size(bytes: u64) -> String {
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < 4 {
        v /= 1024.0;
        unit += 1;
    }
    let u = ["B", "KiB", "MiB", "GiB", "TiB"][unit];
    if unit == 0 || v >= 100.0 { format!("{v:.0} {u}") } else { format!("{v:.1} {u}") }
}
