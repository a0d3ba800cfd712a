//! quotaguard: a local, exact, shared ledger of Alibaba Cloud Model Studio's
//! free token quota. `core` is plain Rust; `bindings` adapts it to Python.
mod bindings;
pub mod core;
