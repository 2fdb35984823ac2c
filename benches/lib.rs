//! Benches live under `benches/`.
