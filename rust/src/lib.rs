//! fusekit's compiled core: the alignment and distribution hot paths of knowledge fusion.
//!
//! The algorithms are plain Rust, tested with `cargo test`; `py.rs` is the only file that knows
//! about Python (built with the `python` feature by maturin).

pub mod codec;
pub mod dtw;
pub mod levenshtein;
pub mod perfect;
pub mod spans;
pub mod topk;
pub mod transfer;
pub mod trie;
pub mod vocab_map;
pub mod whole_text;

#[cfg(feature = "python")]
mod py;
