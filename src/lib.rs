//! devproxy: a CUDA device proxy. See ARCHITECTURE.md for the map.
//!
//! - [`protocol`]: messages between shim and server (the one wire format).
//! - [`transport`]: the shared-memory segment (ring, replies, staging, pinned area) and the Unix socket helpers.
//! - [`server`]: sessions, their virtual handles, and the dispatch of requests to a [`backend`].
//! - [`client`]: the client side of a session (used by the shim and by tests).
//! - [`backend`]: the device: `emulated` (CPU, PTX interpreter) or `cuda` (real driver through cudarc).
//! - [`control`]: the control socket behind `devproxy ps/checkpoint/migrate/...`.
//! - [`checkpoint`]: barrier, image format, restore, migration, suspend.
//! - [`cli`]: the `devproxy` command line.
pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod control;
pub mod nccl;
pub mod protocol;
pub mod server;
pub mod transport;
