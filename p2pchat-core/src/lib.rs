//! p2pchat-core
pub mod crypto;
pub mod identity;
pub mod protocol;
