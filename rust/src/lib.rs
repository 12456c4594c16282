//! fusekit's compiled core: the alignment and distribution hot paths of knowledge fusion.
//!
//! The algorithms are plain Rust, tested with `cargo test`; `py.rs` is the only file that knows
//! about Python (built with the `python` feature by maturin).

pub mod codec;
pub mod dtw;
pub mod levenshtein;
pub mod topk;
pub mod transfer;
pub mod vocab_map;

#[cfg(feature = "python")]
mod py;
