//! # bistro-train
//!
//! The miner side of BISTRO as a library: [`data`] (pages, corpus, tokenizer, batches).
//! A miner never needs validator code; `bistro-validate` builds on this crate.

pub mod data;
