//! `ringproxy check`: a preflight of this host against a configuration, one line per item.
//!
//! Reading and judging are separate. `facts.rs` is the only code here that reads the host:
//! [`HostFacts::read`] gathers limits, sysctls, an io_uring probe and a binding test per configured
//! IP, and never fails (an unreadable value is `None` and its item says so). `items.rs` and
//! `ports.rs` judge: [`evaluate`] is pure (facts and configuration in, [`Item`]s out), so every
//! verdict is unit-tested with synthetic hosts. `render.rs` writes the report. Each item is OK,
//! WARN or FAIL, and every non-OK item carries the exact fix with the number in it. The exit code
//! is the worst status: 0 OK, 1 WARN, 2 FAIL.

mod facts;
mod items;
mod ports;
mod render;

pub use facts::HostFacts;
pub use items::evaluate;
pub use render::render;

use crate::config::Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Item {
    pub status: Status,
    pub name: String,
    pub detail: String,
    /// How to make it OK; alternatives on separate lines.
    pub fix: Option<String>,
    /// `(name, value)` of the sysctls in the fix, for the persistent block at the end.
    pub sysctls: Vec<(String, String)>,
}

impl Item {
    fn new(status: Status, name: impl Into<String>, detail: impl Into<String>) -> Item {
        let (name, detail) = (name.into(), detail.into());
        Item { status, name, detail, fix: None, sysctls: Vec::new() }
    }

    /// Appends a line to the fix.
    fn fix(mut self, line: impl AsRef<str>) -> Item {
        let line = line.as_ref();
        self.fix = Some(self.fix.map_or(line.to_owned(), |f| format!("{f}\n{line}")));
        self
    }

    /// Appends `sysctl -w NAME=VALUE` to the fix.
    fn sysctl(mut self, name: &str, value: impl ToString) -> Item {
        let value = value.to_string();
        let cmd = match value.contains(' ') {
            true => format!("sysctl -w {name}=\"{value}\""),
            false => format!("sysctl -w {name}={value}"),
        };
        self.sysctls.push((name.to_owned(), value));
        self.fix(cmd)
    }
}

/// OK up to `warn_above`, WARN up to `fail_above`, FAIL beyond.
fn grade(value: u64, warn_above: u64, fail_above: u64) -> Status {
    match value {
        v if v > fail_above => Status::Fail,
        v if v > warn_above => Status::Warn,
        _ => Status::Ok,
    }
}

fn ok(name: impl Into<String>, detail: impl Into<String>) -> Item {
    Item::new(Status::Ok, name, detail)
}

fn warn(name: impl Into<String>, detail: impl Into<String>) -> Item {
    Item::new(Status::Warn, name, detail)
}

fn fail(name: impl Into<String>, detail: impl Into<String>) -> Item {
    Item::new(Status::Fail, name, detail)
}

/// Runs the preflight, prints one line per item, returns the exit code (0 ok, 1 warnings, 2 errors).
pub fn run(config: &Config) -> i32 {
    // Without io_uring nothing else here matters yet: one line, the cause and the fix.
    if let Err(b) = uring_access::check(crate::features::FLOOR) {
        eprintln!("ringproxy check: {b}");
        return 2;
    }
    let facts = HostFacts::read(config);
    let items = evaluate(config, &facts);
    print!("{}", render(config, &facts, &items));
    exit_code(&items)
}

/// `ringproxy check --sysctl`: the /etc/sysctl.d/ drop-in the configuration needs, judged as on a
/// host with the kernel's stock sysctls (this host's RAM, CPUs and limits), so that it can ship
/// with the configuration to hosts not yet tuned. Every value is one a check item asks for.
pub fn sysctl_dropin(config: &Config) -> String {
    let mut facts = HostFacts::read(config);
    facts.stock_sysctls();
    let items = evaluate(config, &facts);
    let mut seen = std::collections::BTreeSet::new();
    let mut out = format!(
        "# /etc/sysctl.d/90-ringproxy.conf: what {} needs ({}), from `ringproxy check --sysctl`.\n\
         # Load it with `sysctl --system`; `ringproxy check -c FILE` then verifies the host.\n",
        config.origin,
        render::counts(config)
    );
    for (name, value) in items.iter().flat_map(|i| &i.sysctls) {
        if seen.insert(name.clone()) {
            out.push_str(&format!("{name} = {value}\n"));
        }
    }
    if seen.is_empty() {
        out.push_str("# nothing: the kernel's stock settings are enough for this configuration\n");
    }
    out
}

/// 0 when every item is OK, 1 with warnings only, 2 with any failure.
pub fn exit_code(items: &[Item]) -> i32 {
    match items.iter().map(|i| i.status).max() {
        Some(Status::Fail) => 2,
        Some(Status::Warn) => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
