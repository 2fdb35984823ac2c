//! `cargo +nightly fuzz run fernet_differential`: the crate's own Fernet against the `fernet`
//! crate, both ways. The input format and the checks are documented on
//! `p2pchat_core::testing::fernet::differential`. Inputs worth keeping go in
//! `fuzz/regressions/fernet_differential/`, which the normal test suite replays (against the
//! same reference, in `p2pchat-core/tests/it/fernet_vectors.rs`).

#![no_main]

use p2pchat_core::testing::fernet::{self, KEY_LEN, Reference};

/// The `fernet` crate, the implementation ours is compared with.
struct FernetCrate;

impl Reference for FernetCrate {
    fn seal(&self, key: &[u8; KEY_LEN], unix_secs: u64, plaintext: &[u8]) -> String {
        ::fernet::Fernet::new(&fernet::encode_key(key))
            .expect("any 32 bytes are a key")
            .encrypt_at_time(plaintext, unix_secs)
    }

    fn open(
        &self,
        key: &[u8; KEY_LEN],
        token: &str,
        now_secs: u64,
        ttl_secs: Option<u64>,
    ) -> Option<Vec<u8>> {
        ::fernet::Fernet::new(&fernet::encode_key(key))
            .expect("any 32 bytes are a key")
            .decrypt_at_time(token, ttl_secs, now_secs)
            .ok()
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| fernet::differential(data, &FernetCrate));
