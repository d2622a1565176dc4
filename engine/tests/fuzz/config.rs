//! Fuzzing the YAML configuration loader (proptest, runs in CI): whatever the text, `config::parse`
//! never panics and either accepts it or refuses it with one clear error that starts with
//! `fuzz.yaml:LINE:COLUMN: ` (LINE, COLUMN ≥ 1, inside the text) followed by a message.
//!
//! Inputs: (a) random bytes and random YAML-ish text; (b) structure-aware mutations of valid
//! configurations (the shipped examples and an every-key one): keys deleted, duplicated, renamed;
//! values replaced by numbers, huge numbers, strings, unicode, lists, maps, tags, anchors and
//! aliases; styles switched between block and flow; indentation, lines and bytes disturbed.
//! Plus fixed hostile inputs: deep nesting, alias bombs, huge scalars.
//!
//! Default: 4,000 cases in total (a few seconds in debug). More: `RINGPROXY_FUZZ_CASES=200000`
//! (cases per property, split as below). Each test prints how many cases it executed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError};

const ORIGIN: &str = "fuzz.yaml";

/// Cases for one property: `RINGPROXY_FUZZ_CASES` scaled by `share` (percent), or `default`.
fn cases(default: u32, share: u32) -> u32 {
    match std::env::var("RINGPROXY_FUZZ_CASES").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(n) => (n * share as u64 / 100).clamp(1, u32::MAX as u64) as u32,
        None => default,
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures print the minimal input; nothing is written into the source tree.
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

/// What the checks saw, for the closing line of each test.
#[derive(Default)]
struct Tally {
    cases: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    slowest_us: AtomicU64,
}

impl Tally {
    const fn new() -> Tally {
        Tally {
            cases: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            slowest_us: AtomicU64::new(0),
        }
    }

    fn report(&self, what: &str) {
        eprintln!(
            "fuzz_config {what}: {} cases executed, {} accepted, {} refused with a positioned error, slowest parse {} us of CPU",
            self.cases.load(Ordering::SeqCst),
            self.accepted.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
            self.slowest_us.load(Ordering::SeqCst)
        );
    }
}

/// Parses `text` and checks the contract. A panic inside `parse` fails the case (proptest catches
/// it and shrinks the input).
fn check(text: &str, tally: &Tally) -> Result<(), TestCaseError> {
    tally.cases.fetch_add(1, Ordering::SeqCst);
    let t = thread_cpu_time();
    let result = ringproxy::config::parse(text, ORIGIN);
    let took = thread_cpu_time().saturating_sub(t);
    tally.slowest_us.fetch_max(took.as_micros() as u64, Ordering::SeqCst);
    // CPU time, not wall time: the bound must hold on a loaded CI machine too.
    prop_assert!(took < Duration::from_secs(2), "parsing {} bytes took {took:?} of CPU", text.len());
    // Positions may point one line past the last one (an error found at the end of the input).
    // Lines are counted as YAML counts them: CRLF, LF and a lone CR each end a line.
    let last_line = text.replace("\r\n", "\n").replace('\r', "\n").split('\n').count() as u64 + 1;
    match result {
        Ok(cfg) => {
            tally.accepted.fetch_add(1, Ordering::SeqCst);
            for w in &cfg.warnings {
                let (line, column, rest) = positioned(w)?;
                prop_assert!(line >= 1 && column >= 1 && line <= last_line, "warning position in {w:?}");
                prop_assert!(rest.starts_with("warning: "), "{w:?}");
            }
        }
        Err(e) => {
            tally.refused.fetch_add(1, Ordering::SeqCst);
            let shown = e.to_string();
            let (line, column, message) = positioned(&shown)?;
            prop_assert!(line >= 1 && column >= 1, "position must be 1-based: {shown:?}");
            prop_assert!(line <= last_line, "line {line} is past the end of a {last_line}-line text: {shown:?}");
            prop_assert_eq!(e.position(), Some((line, column)), "position() disagrees with {:?}", shown);
            prop_assert!(!message.trim().is_empty(), "no message after the position: {shown:?}");
        }
    }
    Ok(())
}

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Splits `fuzz.yaml:LINE:COLUMN: rest`.
fn positioned(shown: &str) -> Result<(u64, u64, &str), TestCaseError> {
    let fail = || TestCaseError::fail(format!("not `{ORIGIN}:LINE:COLUMN: message`: {shown:?}"));
    let rest = shown.strip_prefix(ORIGIN).and_then(|r| r.strip_prefix(':')).ok_or_else(fail)?;
    let (line, rest) = rest.split_once(':').ok_or_else(fail)?;
    let (column, rest) = rest.split_once(':').ok_or_else(fail)?;
    let rest = rest.strip_prefix(' ').ok_or_else(fail)?;
    let line: u64 = line.parse().map_err(|_| fail())?;
    let column: u64 = column.parse().map_err(|_| fail())?;
    Ok((line, column, rest))
}

// ---------------------------------------------------------------------------------------------
// Seeds: valid configurations (shipped examples, and every-key.yaml, which uses every key).

fn seeds() -> Vec<&'static str> {
    vec![
        include_str!("../../../config-examples/minimal.yaml"),
        include_str!("../../../config-examples/pushserver.yaml"),
        include_str!("../../../config-examples/haproxy-300k.yaml"),
        include_str!("../../../config-examples/every-key.yaml"),
    ]
}

#[test]
fn seeds_are_valid() {
    for (i, s) in seeds().iter().enumerate() {
        if let Err(e) = ringproxy::config::parse(s, ORIGIN) {
            panic!("seed {i} must be a valid configuration: {e}");
        }
        // And they survive the round trip through the tree and the emitter unchanged in meaning.
        let tree = Node::from_yaml(s);
        for style in [Style::Block, Style::Flow, Style::Mixed] {
            let text = tree.emit(style, 2);
            if let Err(e) = ringproxy::config::parse(&text, ORIGIN) {
                panic!("seed {i} re-emitted ({style:?}) must stay valid: {e}\n{text}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A YAML tree that keeps key order and allows duplicate keys, with an emitter.

#[derive(Clone, Debug)]
enum Node {
    /// The scalar exactly as it is written in the text (plain, quoted, tagged, anchored...).
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

#[derive(Clone, Copy, Debug)]
enum Style {
    Block,
    Flow,
    /// Block, but maps and lists of scalars in flow style (as the examples are written).
    Mixed,
}

impl Node {
    fn from_yaml(text: &str) -> Node {
        let v: serde_json::Value = serde_saphyr::from_str(text).expect("seed parses as YAML");
        Node::from_json(&v)
    }

    fn from_json(v: &serde_json::Value) -> Node {
        use serde_json::Value;
        match v {
            Value::Null => Node::Scalar("null".into()),
            Value::Bool(b) => Node::Scalar(b.to_string()),
            Value::Number(n) => Node::Scalar(n.to_string()),
            Value::String(s) => Node::Scalar(quote_if_needed(s)),
            Value::Array(a) => Node::Seq(a.iter().map(Node::from_json).collect()),
            Value::Object(o) => Node::Map(o.iter().map(|(k, v)| (k.clone(), Node::from_json(v))).collect()),
        }
    }

    fn is_scalar(&self) -> bool {
        matches!(self, Node::Scalar(_))
    }

    fn all_scalar_children(&self) -> bool {
        match self {
            Node::Scalar(_) => true,
            Node::Seq(items) => items.iter().all(Node::is_scalar),
            Node::Map(entries) => entries.iter().all(|(_, v)| v.is_scalar()),
        }
    }

    fn emit(&self, style: Style, step: usize) -> String {
        let mut out = String::new();
        match (style, self) {
            (Style::Flow, _) => {
                self.flow(&mut out);
                out.push('\n');
            }
            (_, Node::Scalar(s)) => {
                out.push_str(s);
                out.push('\n');
            }
            _ => self.block(&mut out, 0, step, matches!(style, Style::Mixed)),
        }
        out
    }

    fn flow(&self, out: &mut String) {
        match self {
            Node::Scalar(s) => out.push_str(s),
            Node::Seq(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.flow(out);
                }
                out.push(']');
            }
            Node::Map(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(k);
                    out.push_str(": ");
                    v.flow(out);
                }
                out.push('}');
            }
        }
    }

    /// Block style at `indent` (the node's own lines start there).
    fn block(&self, out: &mut String, indent: usize, step: usize, mixed: bool) {
        let pad = " ".repeat(indent);
        match self {
            Node::Scalar(s) => {
                out.push_str(&pad);
                out.push_str(s);
                out.push('\n');
            }
            Node::Seq(items) if items.is_empty() => {
                out.push_str(&pad);
                out.push_str("[]\n");
            }
            Node::Map(entries) if entries.is_empty() => {
                out.push_str(&pad);
                out.push_str("{}\n");
            }
            Node::Seq(items) => {
                for item in items {
                    out.push_str(&pad);
                    out.push('-');
                    item.after_indicator(out, indent + 2, step, mixed);
                }
            }
            Node::Map(entries) => {
                for (k, v) in entries {
                    out.push_str(&pad);
                    out.push_str(k);
                    out.push(':');
                    v.after_key(out, indent + step, step, mixed);
                }
            }
        }
    }

    /// The value of a `key:` whose children go at `indent`.
    fn after_key(&self, out: &mut String, indent: usize, step: usize, mixed: bool) {
        let inline = self.is_scalar()
            || matches!(self, Node::Seq(v) if v.is_empty())
            || matches!(self, Node::Map(v) if v.is_empty())
            || (mixed && self.all_scalar_children());
        if inline {
            out.push(' ');
            self.flow(out);
            out.push('\n');
        } else {
            out.push('\n');
            self.block(out, indent, step, mixed);
        }
    }

    /// An item after `- `: a map's first key stays on the dash line, the rest align under it.
    fn after_indicator(&self, out: &mut String, indent: usize, step: usize, mixed: bool) {
        let block = !(mixed && self.all_scalar_children());
        match self {
            Node::Map(entries) if block && !entries.is_empty() => {
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i == 0 {
                        out.push(' ');
                    } else {
                        out.push_str(&" ".repeat(indent));
                    }
                    out.push_str(k);
                    out.push(':');
                    v.after_key(out, indent + step, step, mixed);
                }
            }
            Node::Seq(items) if block && !items.is_empty() => {
                out.push('\n');
                self.block(out, indent, step, mixed);
            }
            _ => {
                out.push(' ');
                self.flow(out);
                out.push('\n');
            }
        }
    }

    /// Number of nodes (preorder), the root included.
    fn count(&self) -> usize {
        1 + match self {
            Node::Scalar(_) => 0,
            Node::Seq(items) => items.iter().map(Node::count).sum(),
            Node::Map(entries) => entries.iter().map(|(_, v)| v.count()).sum(),
        }
    }

    /// Applies `op` to the `target`-th child slot in preorder (counting from 0 below the root).
    /// Returns true once applied.
    fn mutate(&mut self, target: &mut usize, op: &Mutation) -> bool {
        match self {
            Node::Scalar(_) => false,
            Node::Seq(items) => {
                for i in 0..items.len() {
                    if *target == 0 {
                        apply_to_seq(items, i, op);
                        return true;
                    }
                    *target -= 1;
                    if items[i].mutate(target, op) {
                        return true;
                    }
                }
                false
            }
            Node::Map(entries) => {
                for i in 0..entries.len() {
                    if *target == 0 {
                        apply_to_map(entries, i, op);
                        return true;
                    }
                    *target -= 1;
                    if entries[i].1.mutate(target, op) {
                        return true;
                    }
                }
                false
            }
        }
    }
}

/// A plain scalar when YAML reads it back as the same string, else a double-quoted one.
fn quote_if_needed(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '/')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._/:-".contains(c))
        && !matches!(s, "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n")
        && s.parse::<f64>().is_err();
    if plain { s.to_owned() } else { serde_json::to_string(s).unwrap() }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

#[derive(Clone, Debug)]
enum Mutation {
    Delete,
    Duplicate,
    RenameKey(String),
    Replace(Node),
    /// Put the value inside a one-item list, or a one-key map.
    WrapInList,
    WrapInMap(String),
}

fn apply_to_seq(items: &mut Vec<Node>, i: usize, op: &Mutation) {
    match op {
        Mutation::Delete => {
            items.remove(i);
        }
        Mutation::Duplicate => {
            let v = items[i].clone();
            items.insert(i, v);
        }
        Mutation::RenameKey(_) => {}
        Mutation::Replace(n) => items[i] = n.clone(),
        Mutation::WrapInList => items[i] = Node::Seq(vec![items[i].clone()]),
        Mutation::WrapInMap(k) => items[i] = Node::Map(vec![(k.clone(), items[i].clone())]),
    }
}

fn apply_to_map(entries: &mut Vec<(String, Node)>, i: usize, op: &Mutation) {
    match op {
        Mutation::Delete => {
            entries.remove(i);
        }
        Mutation::Duplicate => {
            let e = entries[i].clone();
            entries.insert(i + 1, e);
        }
        Mutation::RenameKey(k) => entries[i].0 = k.clone(),
        Mutation::Replace(n) => entries[i].1 = n.clone(),
        Mutation::WrapInList => entries[i].1 = Node::Seq(vec![entries[i].1.clone()]),
        Mutation::WrapInMap(k) => entries[i].1 = Node::Map(vec![(k.clone(), entries[i].1.clone())]),
    }
}

#[rustfmt::skip]
const KEYS: &[&str] = &[
    "global", "defaults", "frontends", "backends", "workers", "pin_cpus", "maxconn", "tune", "pipe_size",
    "max_pipes", "recv_buffers", "recv_buffer_size", "ring_entries", "iowq_workers", "peer_lookups", "stats", "socket", "mode", "prometheus", "connection_log",
    "timeout", "connect", "client", "server", "queue", "drain", "retries", "backlog", "balance", "name", "bind",
    "backend", "servers", "address", "weight", "source",
];

/// Scalars chosen to hit every value parser's edges (counts, sizes, durations, addresses, sources,
/// modes, names), YAML's own special forms, and things that look like them.
#[rustfmt::skip]
const SCALARS: &[&str] = &[
    "0", "1", "-1", "2", "1024", "1025", "65535", "65536", "2147483647", "2147483648", "4294967295", "4294967296",
    "100000000", "100000001", "18446744073709551615", "18446744073709551616", "-9223372036854775809",
    "99999999999999999999999999999999999999", "1e308", "1e309", "-1e400", "0.5", "1.5", "-0", ".inf", "-.inf",
    ".nan", "0x1F", "0o777", "0777", "1_000", "+5", "true", "false", "True", "yes", "no", "on", "null", "~",
    "\"\"", "''", "' '", "auto", "AUTO", "roundrobin", "leastconn", "source", "random", "hash", "5s", "0s", "-5s",
    "5 s", "5000ms", "1.5m", "1h", "2d", "1us", "1ns", "999999999999999999h", "18446744073709551615ms", "5x", "s",
    "ms", "256k", "256K", "256kb", "1m", "1g", "1t", "4096b", "9999999999999999999k", "0k", "127.0.0.1:0",
    "127.0.0.1:1", "127.0.0.1:65535", "127.0.0.1:65536", "127.0.0.1:99999", "127.0.0.1", ":80", "0.0.0.0:1",
    "300.1.1.1:80", "\"[::1]:0\"", "\"[::]:8080\"", "\"[fe80::1%lo]:80\"", "::1:80", "\"[::1]\"", "localhost:80",
    "127.0.2.0/30", "127.0.2.0/16", "127.0.2.0/15", "10.0.0.0/8", "10.0.0.0/33", "10.0.0.0/-1", "10.0.0.0/",
    "127.0.2.9-127.0.2.1", "127.0.2.1-127.0.2.1", "127.0.0.0-127.255.255.255", "\"::1-::ffff\"", "\"::/64\"",
    "\"::/112\"", "\"::1-127.0.0.1\"", "\"0600\"", "\"0777\"", "\"0666\"", "\"9999\"", "\"rw\"", "0600", "stdout",
    "stderr", "/", "/dev/null", "/nonexistent/dir/file.log", "\"\\0\"", "\"\\u0000x\"", "\"a\\nb\"", "\"\\t\"",
    "ünïcödé", "日本語", "\"🦀🦀\"", "\"\\u202Eevil\"", "\"\\uFEFF\"", "Ω", "&anchor 5", "*anchor", "*undefined",
    "!!str 5", "!!int 5", "!!int x", "!!float 1.5", "!!bool yes", "!!null ''", "!!binary aGVsbG8=", "!custom x",
    "!!map {}", "!!seq []", "!<tag:yaml.org,2002:str> x", "|\n  literal\n  block", ">-\n  folded", "? complex",
    "<<", "- item", "a: b", "{", "[", "}", "]", "\"unterminated", "'unterminated", "#comment", "%YAML 1.2", "---",
    "...", "@reserved", "`backtick",
];

fn long_scalar() -> impl Strategy<Value = String> {
    (prop_oneof![Just('a'), Just('9'), Just('é'), Just(' '), Just(':')], 1000usize..20_000).prop_map(|(c, n)| {
        let s: String = std::iter::repeat_n(c, n).collect();
        serde_json::to_string(&s).unwrap()
    })
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(SCALARS).prop_map(str::to_owned),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| format!("{n}{}", ["", "s", "ms", "m", "h", "k", "m", "g"][(n % 8) as usize])),
        1 => any::<f64>().prop_map(|f| format!("{f:e}")),
        2 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        2 => "[a-zA-Z0-9 ._:/\\-]{0,40}",
        1 => long_scalar(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        // Typos of real keys: a character dropped, doubled or changed, or the case changed.
        4 => (proptest::sample::select(KEYS), any::<usize>(), 0u8..4, any::<char>()).prop_map(|(k, at, how, c)| {
            let mut chars: Vec<char> = k.chars().collect();
            let i = at % chars.len();
            match how {
                0 => { chars.remove(i); }
                1 => { let d = chars[i]; chars.insert(i, d); }
                2 => chars[i] = if c.is_alphanumeric() { c } else { 'x' },
                _ => chars = k.to_uppercase().chars().collect(),
            }
            let s: String = chars.into_iter().collect();
            if s.is_empty() { "\"\"".to_owned() } else { quote_if_needed(&s) }
        }),
        1 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => proptest::sample::select(&["\"\"", "<<", "? x", "~", "null", "1", "true", "[a]", "{a: b}", "&k name", "*k", "ключ", "\"🦀\""][..]).prop_map(str::to_owned),
    ]
}

fn value() -> impl Strategy<Value = Node> {
    let leaf = scalar().prop_map(Node::Scalar);
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Node::Seq),
            proptest::collection::vec((key(), inner), 0..4).prop_map(Node::Map),
        ]
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::Delete),
        2 => Just(Mutation::Duplicate),
        3 => key().prop_map(Mutation::RenameKey),
        6 => value().prop_map(Mutation::Replace),
        1 => Just(Mutation::WrapInList),
        1 => key().prop_map(Mutation::WrapInMap),
    ]
}

/// Disturbances of the emitted text.
#[derive(Clone, Debug)]
enum TextEdit {
    /// Change one line's indentation by -3..=+3 spaces, or make it start with a tab.
    Indent {
        line: usize,
        by: i8,
    },
    Tab {
        line: usize,
    },
    DuplicateLine {
        line: usize,
    },
    SwapLines {
        a: usize,
        b: usize,
    },
    Insert {
        at: usize,
        text: String,
    },
    DeleteRange {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        4 => (any::<usize>(), -3i8..=3).prop_map(|(line, by)| TextEdit::Indent { line, by }),
        1 => any::<usize>().prop_map(|line| TextEdit::Tab { line }),
        1 => any::<usize>().prop_map(|line| TextEdit::DuplicateLine { line }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TextEdit::SwapLines { a, b }),
        2 => (any::<usize>(), prop_oneof![
            proptest::sample::select(&[":", "-", " ", "\n", "\t", "#", "&", "*", "!", "|", ">", "'", "\"", "{", "}", "[", "]", ",", "?", "%", "@", "\r", "\u{0}", "\u{feff}", "\u{85}", "\u{2028}"][..]).prop_map(str::to_owned),
            any::<String>(),
        ]).prop_map(|(at, text)| TextEdit::Insert { at, text }),
        1 => (any::<usize>(), 1usize..40).prop_map(|(at, len)| TextEdit::DeleteRange { at, len }),
        1 => any::<usize>().prop_map(|at| TextEdit::Truncate { at }),
    ]
}

fn char_boundary(text: &str, at: usize) -> usize {
    let mut i = at % (text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply_text(text: &mut String, edit: &TextEdit) {
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let n = lines.len();
    match edit {
        TextEdit::Indent { line, by } => {
            let l = &mut lines[line % n];
            if *by >= 0 {
                l.insert_str(0, &" ".repeat(*by as usize));
            } else {
                let strip = l.len() - l.trim_start_matches(' ').len();
                l.drain(..strip.min(by.unsigned_abs() as usize));
            }
        }
        TextEdit::Tab { line } => lines[line % n].insert(0, '\t'),
        TextEdit::DuplicateLine { line } => {
            let l = lines[line % n].clone();
            lines.insert(line % n, l);
        }
        TextEdit::SwapLines { a, b } => lines.swap(a % n, b % n),
        TextEdit::Insert { at, text: t } => {
            let i = char_boundary(text, *at);
            text.insert_str(i, t);
            return;
        }
        TextEdit::DeleteRange { at, len } => {
            let i = char_boundary(text, *at);
            let j = char_boundary(text, i + len);
            if j > i {
                text.replace_range(i..j, "");
            }
            return;
        }
        TextEdit::Truncate { at } => {
            let i = char_boundary(text, *at);
            text.truncate(i);
            return;
        }
    }
    *text = lines.join("\n");
}

/// A mutated configuration: a seed, tree mutations, a style, an indentation step, text edits.
fn mutated_config() -> impl Strategy<Value = String> {
    let seeds = seeds();
    (
        0..seeds.len(),
        // Mostly one or two mutations, so many cases stay close to valid and reach the validator.
        prop_oneof![3 => proptest::collection::vec((any::<usize>(), mutation()), 1..3),
                    1 => proptest::collection::vec((any::<usize>(), mutation()), 3..6)],
        prop_oneof![4 => Just(Style::Mixed), 3 => Just(Style::Block), 1 => Just(Style::Flow)],
        prop_oneof![6 => Just(2usize), 1 => Just(1usize), 2 => Just(4usize), 1 => Just(3usize)],
        prop_oneof![2 => Just(Vec::new()), 1 => proptest::collection::vec(text_edit(), 1..4)],
    )
        .prop_map(move |(seed, muts, style, step, edits)| {
            let mut tree = Node::from_yaml(seeds[seed]);
            for (at, m) in &muts {
                let total = tree.count() - 1;
                if total == 0 {
                    break;
                }
                let mut target = at % total;
                tree.mutate(&mut target, m);
            }
            let mut text = tree.emit(style, step);
            for e in &edits {
                apply_text(&mut text, e);
            }
            text
        })
}

/// Runs `cases` cases of `strategy` through `check`, then prints what ran.
fn fuzz<S: Strategy>(what: &str, cases: u32, strategy: S, text: impl Fn(&S::Value) -> String) {
    let tally = Tally::new();
    let mut runner = proptest::test_runner::TestRunner::new(config(cases));
    let result = runner.run(&strategy, |v| check(&text(&v), &tally));
    tally.report(what);
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
}

#[test]
fn mutated_valid_configs_never_panic_and_errors_are_positioned() {
    fuzz("structure-aware mutations of valid configs", cases(2500, 60), mutated_config(), |t| t.clone());
}

#[test]
fn random_bytes_never_panic() {
    fuzz("random bytes", cases(750, 20), proptest::collection::vec(any::<u8>(), 0..2048), |b| {
        String::from_utf8_lossy(b).into_owned()
    });
}

#[test]
fn random_yamlish_text_never_panics() {
    let text = "([a-z_]{1,12}|[0-9.:/\\[\\]{}, \\-#&*!|>'\"?%@`~]|\n {0,6}(- )?){0,120}";
    fuzz("random YAML-ish text", cases(750, 20), text, |t| t.clone());
}

// ---------------------------------------------------------------------------------------------
// Fixed hostile inputs: stack depth, alias expansion, size.

fn handled_quickly(text: &str, what: &str) {
    let tally = Tally::new();
    let t = Instant::now();
    if let Err(e) = check(text, &tally) {
        panic!("{what}: {e}");
    }
    eprintln!("fuzz_config {what}: {} bytes handled in {:?}", text.len(), t.elapsed());
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // Run on a thread with the main thread's default stack (8 MiB) as the binary would.
    let h = std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(|| {
            for depth in [1_000usize, 100_000] {
                handled_quickly(&"[".repeat(depth), &format!("{depth} nested flow lists"));
                handled_quickly(&"{a: ".repeat(depth), &format!("{depth} nested flow maps"));
                let mut block = String::new();
                for i in 0..depth.min(5_000) {
                    block.push_str(&" ".repeat(i));
                    block.push_str("- \n");
                }
                handled_quickly(&block, &format!("{} nested block lists", depth.min(5_000)));
                handled_quickly(
                    &format!("frontends: {}x{}\n", "[".repeat(depth), "]".repeat(depth)),
                    &format!("{depth} nested lists as a value"),
                );
            }
        })
        .unwrap();
    h.join().expect("the loader must not crash on deep nesting");
}

#[test]
fn alias_bombs_are_handled_quickly() {
    // "Billion laughs": 9 levels of 9 aliases each expand to 9^9 = 387 million scalars.
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    handled_quickly(&text, "alias bomb at the top level");
    // The same anchors defined inside a value the loader reads (a server's source list).
    let mut levels = vec!["&a0 [x, x, x, x, x, x, x, x, x]".to_owned()];
    for i in 1..10 {
        levels.push(format!("&a{i} [{}]", vec![format!("*a{}", i - 1); 9].join(", ")));
    }
    let bomb_in_value = format!(
        "frontends: [{{ name: fe, bind: 127.0.0.1:1, backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: 127.0.0.1:2, source: [{}, *a9] }}] }}]\n",
        levels.join(", ")
    );
    handled_quickly(&bomb_in_value, "alias bomb inside the configuration");
    // Aliases used where the loader expects a real value.
    handled_quickly(
        "backends: &b [{ name: be, servers: [{ name: s, address: \"127.0.0.1:2\" }]}]\nfrontends: [{ name: fe, bind: \"127.0.0.1:1\", backend: be }]\ndefaults: *b\n",
        "alias of a list where a map belongs",
    );
}

#[test]
fn huge_inputs_are_handled() {
    let big_name = format!("frontends: [{{ name: {}, bind: 127.0.0.1:1, backend: be }}]\n", "n".repeat(4 << 20));
    handled_quickly(&big_name, "a 4 MiB scalar");
    let mut many = String::from(
        "frontends: [{ name: fe, bind: 127.0.0.1:1, backend: be }]\nbackends:\n  - name: be\n    servers:\n",
    );
    for i in 0..5_000 {
        many.push_str(&format!("      - {{ name: s{i}, address: 127.0.0.1:{} }}\n", 1 + i % 60_000));
    }
    handled_quickly(&many, "5,000 servers");
    let mut keys = String::from("global:\n");
    for _ in 0..50_000 {
        keys.push_str("  workers: 1\n");
    }
    handled_quickly(&keys, "50,000 duplicate keys");
    handled_quickly(&"\n".repeat(1 << 20), "a megabyte of newlines");
    handled_quickly(&"# comment\n".repeat(100_000), "only comments");
    handled_quickly("\u{feff}frontends: []\n", "a byte order mark");
    handled_quickly("---\nfrontends: []\n---\nbackends: []\n", "two documents");
}

/// "Clear error" also means the operator is told what is wrong in the file's terms, not the
/// deserializer's: no advice about library options or Rust types.
#[test]
fn errors_speak_the_files_language() {
    const BASE: &str = "frontends: [{ name: fe, bind: 127.0.0.1:1, backend: be }]\n";
    let cases = [
        (
            "a duplicate key",
            format!(
                "{BASE}backends:\n  - name: be\n    name: be2\n    servers: [{{ name: s, address: 127.0.0.1:2 }}]\n"
            ),
        ),
        ("an empty name", format!("{BASE}backends:\n  - name:\n    servers: [{{ name: s, address: 127.0.0.1:2 }}]\n")),
        (
            "balance as a list",
            format!(
                "{BASE}backends:\n  - name: be\n    balance: [roundrobin]\n    servers: [{{ name: s, address: 127.0.0.1:2 }}]\n"
            ),
        ),
        (
            "balance as a map",
            format!(
                "{BASE}defaults: {{ balance: {{ roundrobin: 1 }} }}\nbackends: [{{ name: be, servers: [{{ name: s, address: 127.0.0.1:2 }}] }}]\n"
            ),
        ),
        (
            "workers as a list",
            format!(
                "{BASE}global: {{ workers: [2] }}\nbackends: [{{ name: be, servers: [{{ name: s, address: 127.0.0.1:2 }}] }}]\n"
            ),
        ),
    ];
    let mut leaks = Vec::new();
    for (what, text) in &cases {
        let shown = ringproxy::config::parse(text, ORIGIN).expect_err(what).to_string();
        eprintln!("{what}: {shown}");
        if ["DuplicateKeyPolicy", "Options", "Option<", "externally tagged", "deserialize"]
            .iter()
            .any(|w| shown.contains(w))
        {
            leaks.push(format!("{what}: {shown}"));
        }
    }
    assert!(leaks.is_empty(), "errors in library terms:\n{}", leaks.join("\n"));
}
