//! Integration tests of the discovery server and its client: one test binary, one module per
//! theme. Redis tests start their own `redis-server` (or use `REDIS_URL`).

// Helpers outside `#[test]` functions too: in tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod it {
    pub mod abuse;
    pub mod announce;
    pub mod bad_input;
    pub mod binary;
    pub mod conformance;
    pub mod counts;
    pub mod doc_limits;
    pub mod files;
    pub mod fuzz_regressions;
    pub mod hostile;
    pub mod kills;
    pub mod layers;
    pub mod lifecycle;
    pub mod offline;
    pub mod proxied;
    pub mod proxy;
    pub mod reach;
    pub mod util;
}
