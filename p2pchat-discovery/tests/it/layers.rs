//! The server's modules depend on each other one way: each uses only those listed before it
//! (the rooms of docs/ARCHITECTURE.md, bottom first).

use std::path::Path;

use p2pchat_core::testing::layers;

/// Bottom first: configuration and rates; storage; the mail rules over it; the relays; the
/// directory the sessions share; the sessions; the accept loop; the fuzz check driving a session.
const LAYERS: &[&str] = &[
    "operator",
    "testing",
    "config",
    "limits",
    "storage",
    "mail",
    "relay",
    "directory",
    "session",
    "server",
    "fuzz",
];

#[test]
fn server_modules_depend_on_each_other_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    layers::assert_one_way(&src, LAYERS);
}
