//! devproxy: a CUDA device proxy. See ARCHITECTURE.md for the map.
pub mod backend;
pub mod protocol;
