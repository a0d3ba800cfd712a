//! The pure-Rust heart of quotaguard. This crate has no Python in it: the
//! extension crate at the repository root adapts it to Python.
//!
//! A request flows one way: the caller asks [`guard::Guard::reserve`], the
//! rules ([`rules`]) decide inside the ledger's atomic step ([`ledger`]), the
//! service is called, and [`guard::Guard::settle`] records what it reported.
pub mod catalog;
pub mod check;
pub mod clock;
pub mod config;
pub mod error;
pub mod guard;
pub mod interrupt;
pub mod ledger;
pub mod money;
pub mod process;
pub mod quota;
pub mod rules;
pub mod tokens;

#[cfg(test)]
mod proptests;

pub use error::{QuotaError, Result};
