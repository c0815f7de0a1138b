//! Barrier, checkpoint image, restore and migration (being written).

use crate::control::{ControlReply, ControlRequest};
use crate::server::Server;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// Handles the control requests that move session state.
pub fn control(
    _server: &Arc<Server>,
    _conn: &UnixStream,
    req: ControlRequest,
    _send: &dyn Fn(&ControlReply) -> Result<(), String>,
) -> Result<(), String> {
    Err(format!("{req:?}: checkpoint support is not built in yet"))
}

/// `devproxy restore DIR`.
pub fn restore_cmd(
    dir: &std::path::Path,
    _socket: Option<std::path::PathBuf>,
    _backend: Option<crate::backend::BackendKind>,
    _device: u32,
) -> Result<(), String> {
    Err(format!("{}: restore is not built in yet", dir.display()))
}

/// `devproxy inspect DIR`.
pub fn inspect_cmd(dir: &std::path::Path) -> Result<(), String> {
    Err(format!("{}: inspect is not built in yet", dir.display()))
}
