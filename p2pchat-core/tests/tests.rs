//! Integration tests of p2pchat-core: one test binary, one module per theme.

mod it {
    pub mod conformance;
    pub mod consent;
    pub mod doc_limits;
    pub mod drain_crash;
    pub mod durable;
    pub mod faults;
    pub mod fernet_vectors;
    pub mod files;
    pub mod fuzz_regressions;
    pub mod golden;
    pub mod history;
    pub mod hostile;
    pub mod layers;
    pub mod messaging;
    pub mod mocks;
    pub mod reach;
    pub mod redis_store;
    pub mod security;
    pub mod strangers;
    pub mod util;
    pub mod wire_props;
}
