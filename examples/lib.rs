//! Examples live beside this file, one program each: `two_nodes`, `server_chat`,
//! `redis_offline`, `echo_bot`, `custom_store` and `key_change`. Each opens with a comment
//! saying what it shows and how to run it (`cargo run -p p2pchat-examples --example NAME`);
//! `tests/examples.rs` runs them all and checks what they print.
