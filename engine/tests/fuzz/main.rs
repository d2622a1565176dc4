//! Fuzzing of the two parsers that read untrusted input (proptest, runs in CI): the YAML
//! configuration loader (`config`) and the PROXY protocol header parser (`proxy_protocol`).
//! More cases: `RINGPROXY_FUZZ_CASES=200000 cargo test -p ringproxy --test fuzz -- --nocapture`.

mod config;
mod proxy_protocol;
