//! The modules of p2pchat-core depend on each other one way: each uses only those listed
//! before it here (the layers of docs/ARCHITECTURE.md, bottom first).

use std::path::Path;

use p2pchat_core::testing::layers;

/// Bottom first: the error cause, keys and limits; the wire types and codec; the crypto and
/// the signed announcements; the traits and their implementations; the node on top.
const LAYERS: &[&str] = &[
    "error",
    "limits",
    "identity",
    "protocol",
    "crypto",
    "announce",
    "transport",
    "store",
    "discovery",
    "event",
    "node",
    "testing",
];

#[test]
fn core_modules_depend_on_each_other_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    layers::assert_one_way(&src, LAYERS);
}
