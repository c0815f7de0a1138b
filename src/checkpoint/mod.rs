//! Barrier, checkpoint image, restore, live migration, suspend/resume.
//!
//! Everything a process has on the device lives in its server session ([`SessionState`]), so the server can stop the
//! session at a call boundary and write it out:
//!
//! - **Barrier** ([`ops`]): a job run on the session thread between two requests (`SessionShared::run_job`); it
//!   synchronizes the session's context, so every fire-and-forget call already taken from the ring has finished
//!   (its effect is in device memory, its error is kept as the session's deferred error) and every later call is still
//!   in the ring, which lives in the client's segment and survives the server. The session then stays paused.
//! - **Image** ([`format`], [`manifest`], [`image`]): header + manifest + blob; written under a temporary name and
//!   renamed; on load every size, the version and the CRCs are checked before any device object is created.
//!   docs/image-format.md has the layout and the compatibility policy.
//! - **Restore**: objects are recreated under their old virtual handles, allocations at their old addresses (the arena
//!   has the same base in every server), module variables and memory written back; the session then waits
//!   ([`PendingSession`](crate::server::PendingSession)) for its process to re-attach with its segment.
//! - **Migration**: the image streams over the target's control socket in chunks; the source tells the process
//!   where to go (`Notice::Moved`) and drops its copy.
//!
//! Checkpointed state implements [`Persist`] and the states compose into the [`Manifest`](manifest::Manifest).

pub mod devcrc;
pub mod direct;
pub mod format;
pub mod image;
pub mod manifest;
pub mod ntcopy;
pub mod ops;
pub mod phases;

use crate::control::{ControlReply, ControlRequest};
use crate::server::Server;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

pub use image::{LoadedImage, Written};
pub use manifest::Manifest;

/// State that goes into an image: `save` produces its serializable `State`, `restore` rebuilds it from one.
pub trait Persist<'a>: Sized {
    /// The serializable form (part of the manifest).
    type State;
    /// What saving needs besides `self`.
    type SaveArgs;
    /// What rebuilding needs besides the state (the backend, already restored parents, ...).
    type RestoreArgs;

    fn save(&self, args: Self::SaveArgs) -> Result<Self::State, CheckpointError>;
    fn restore(args: Self::RestoreArgs, state: &Self::State) -> Result<Self, CheckpointError>;
}

/// Errors of checkpoint, restore and migration. Each says what is wrong and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a devproxy image (it starts with {found:02x?}, expected \"DVPXIMG\\0\")")]
    NotAnImage { path: String, found: Vec<u8> },
    #[error("{path}: image format {image_major}.{image_minor} is not readable by this devproxy, which reads format {}.0 to {}.{}; use a devproxy release that reads format {image_major}.{image_minor}",
        format::FORMAT_MAJOR, format::FORMAT_MAJOR, format::FORMAT_MINOR)]
    Version {
        path: String,
        image_major: u16,
        image_minor: u16,
    },
    #[error("{path}: {what} is truncated: the header says {expected} bytes, there are {actual} (an interrupted copy or write?)")]
    Truncated {
        path: String,
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: {part} CRC mismatch (stored {stored:#010x}, computed {computed:#010x}): the image is damaged; restore an intact copy")]
    Crc {
        path: String,
        part: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{path}: invalid image: {why}")]
    Invalid { path: String, why: String },
    #[error("the image is from a device with a {} arena (its memory size) at {image_base:#x}, this server's device has a {} arena at {here_base:#x}: restore on a server with the same memory size and arena base (devproxy serve --arena-gib {})",
        crate::control::human_bytes(*image_bytes), crate::control::human_bytes(*here_bytes), image_bytes >> 30)]
    Device {
        image_base: u64,
        image_bytes: u64,
        here_base: u64,
        here_bytes: u64,
    },
    #[error("device: {0}")]
    Backend(String),
    #[error("{0}")]
    Pipeline(String),
    #[error("{0}")]
    Session(String),
}

impl CheckpointError {
    pub fn invalid(path: &str, why: String) -> CheckpointError {
        CheckpointError::Invalid {
            path: path.into(),
            why,
        }
    }
}

/// Handles the control requests that move session state.
pub fn control(
    server: &Arc<Server>,
    conn: &UnixStream,
    req: ControlRequest,
    send: &dyn Fn(&ControlReply) -> Result<(), String>,
) -> Result<(), String> {
    ops::control(server, conn, req, send)
}

/// Target side of a same-host migration's first step (`ControlRequest::AdoptPrelock`, the memory file in `fds`).
pub fn adopt_prelocked(
    server: &Arc<Server>,
    conn: &UnixStream,
    len: u64,
    fds: Vec<std::os::fd::OwnedFd>,
    send: &dyn Fn(&crate::control::ControlReply) -> Result<(), String>,
) -> Result<(), String> {
    ops::adopt_prelocked(server, conn, len, fds, send)
}

/// Bytes a suspended session holds in host memory (`None`: not suspended).
pub fn suspended_bytes(server: &Server, id: u64) -> Option<u64> {
    ops::suspended_bytes(server, id)
}

/// Whether an opt-in switch is on: the environment variable `var` is `value` (tests: or they forced `var` on for
/// their thread, see [`force`]).
pub(crate) fn switch(var: &str, value: &str) -> bool {
    #[cfg(test)]
    if FORCED.with(|f| f.borrow().contains(var)) {
        return true;
    }
    std::env::var(var).is_ok_and(|v| v == value)
}

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::RefCell<std::collections::HashSet<String>> = Default::default();
}

/// Tests: turns the switch `var` on or off for this thread, whatever the environment says.
#[cfg(test)]
pub(crate) fn force(var: &str, on: bool) {
    FORCED.with(|f| {
        let mut f = f.borrow_mut();
        if on {
            f.insert(var.to_string());
        } else {
            f.remove(var);
        }
    });
}

/// Releases what a suspension of session `id` still holds once the session ended (see `ops::forget_suspended`).
pub fn session_ended(server: &Server, id: u64) {
    ops::forget_suspended(server, id)
}

/// `devproxy restore DIR` (`trial`: `--trial`, rebuild, report and release without serving).
pub fn restore_cmd(
    dir: &std::path::Path,
    socket: Option<std::path::PathBuf>,
    backend: Option<crate::backend::BackendKind>,
    device: u32,
    trial: bool,
) -> Result<(), String> {
    ops::restore_cmd(dir, socket, backend, device, trial)
}

/// `devproxy inspect DIR`.
pub fn inspect_cmd(dir: &std::path::Path) -> Result<(), String> {
    ops::inspect_cmd(dir)
}

#[cfg(test)]
mod tests;
