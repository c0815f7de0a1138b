//! The control socket (`<server socket>.ctl`): what `devproxy ps`, `checkpoint`, `migrate`, `suspend` and `resume`
//! talk to. One request per connection; long operations stream [`ControlReply::Progress`] lines before their final
//! answer so the CLI can show progress.

use crate::protocol;
use crate::server::{Phase, Server};
use crate::transport::socket;
use bincode::{Decode, Encode};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const MAX_CONTROL_MSG: usize = 64 << 20;

/// A control command.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum ControlRequest {
    /// List sessions.
    Ps,
    /// Barrier + image of the session of `pid` into `out`; with `stop` the session stays paused.
    Checkpoint { pid: u32, out: String, stop: bool },
    /// Let a paused session continue.
    Resume { pid: u32 },
    /// Move a session's device state to the server at `to` while the process keeps running.
    Migrate { pid: u32, to: String },
    /// Move device memory to host memory and free the device; `Resume` brings it back.
    Suspend { pid: u32 },
    /// Receive a session image (incoming migration): `image` is the image header; the manifest, the blob and the
    /// blob CRC follow as raw frames (docs/image-format.md, "Migration stream").
    Adopt { image: Vec<u8> },
    /// End the server (sessions are told it is closing).
    Shutdown,
    /// NCCL jobs: status and the job-wide barrier (`crate::nccl::barrier`).
    Job(crate::nccl::barrier::JobRequest),
    /// A same-host migration's first step, before the barrier: the source's memory file of `len` bytes comes with
    /// the request (its descriptor); the target page-locks it, answers, and the `Adopt` follows on the same
    /// connection (see `checkpoint::direct::BlobFd::adopt`).
    AdoptPrelock { len: u64 },
}

/// One row of `devproxy ps`.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct SessionRow {
    pub session: u64,
    pub pid: u32,
    pub command: String,
    pub device_bytes: u64,
    pub calls: u64,
    pub state: String,
}

/// What a checkpoint, restore or migration did.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct Summary {
    pub what: String,
    pub bytes: u64,
    pub seconds: f64,
    /// Time the process was stopped (barrier to resume), in seconds.
    pub paused_seconds: f64,
    pub path: String,
    /// Where the time went (`checkpoint::phases`), in order; empty where not recorded.
    pub phases: Vec<(String, f64)>,
}

impl Summary {
    pub fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The rate over the pause is what the process felt; the rate over the whole operation includes preparing the
        // destination before the barrier and finishing the file after the process resumed.
        let over_pause = if self.paused_seconds > 0.0 && self.bytes > 0 {
            format!(
                " ({:.2} GB/s over the pause)",
                self.bytes as f64 / self.paused_seconds / 1e9
            )
        } else {
            String::new()
        };
        let phases = if self.phases.is_empty() {
            String::new()
        } else {
            let v: Vec<String> = self
                .phases
                .iter()
                .map(|(n, s)| format!("{n} {s:.3} s"))
                .collect();
            format!(" [{}]", v.join(", "))
        };
        // Operations that do not pause the process (a restore: it waits anyway) say nothing of a pause.
        let paused = if self.paused_seconds > 0.0 {
            format!(", process paused {:.3} s", self.paused_seconds)
        } else {
            String::new()
        };
        write!(
            f,
            "{}: {} in {:.3} s ({:.2} GB/s){paused}{over_pause}{}{phases}",
            self.what,
            human_bytes(self.bytes),
            self.seconds,
            self.gbps(),
            if self.path.is_empty() {
                String::new()
            } else {
                format!(", {}", self.path)
            }
        )
    }
}

/// Bytes as a short human string.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A control answer.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum ControlReply {
    Ps {
        server_pid: u32,
        backend: String,
        device: String,
        sessions: Vec<SessionRow>,
    },
    Progress {
        done: u64,
        total: u64,
    },
    Done(Summary),
    Ok(String),
    Err(String),
    /// The answer to a [`ControlRequest::Job`].
    Job(crate::nccl::barrier::JobReply),
}

/// Serves the control socket until the server shuts down.
pub fn serve_control(server: Arc<Server>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let srv = server.clone();
        let _ = std::thread::Builder::new()
            .name("devproxy-ctl-conn".into())
            .spawn(move || {
                if let Err(e) = handle(&srv, &conn) {
                    let _ = send(&conn, &ControlReply::Err(e));
                }
            });
        if server.shutdown.load(Ordering::Acquire) {
            break;
        }
    }
}

fn send(conn: &UnixStream, r: &ControlReply) -> Result<(), String> {
    socket::send_msg(conn, &protocol::encode(r), &[]).map_err(|e| e.to_string())
}

fn handle(server: &Arc<Server>, conn: &UnixStream) -> Result<(), String> {
    let (_, uid) = socket::peer_credentials(conn).map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if uid != me && uid != 0 {
        return Err(format!("uid {uid} may not control this server"));
    }
    let (bytes, fds) = socket::recv_msg(conn, MAX_CONTROL_MSG).map_err(|e| e.to_string())?;
    let req: ControlRequest = protocol::decode(&bytes).map_err(|e| e.to_string())?;
    match req {
        ControlRequest::AdoptPrelock { len } => {
            crate::checkpoint::adopt_prelocked(server, conn, len, fds, &|r| send(conn, r))
        }
        ControlRequest::Ps => {
            let mut sessions: Vec<SessionRow> = server
                .sessions
                .lock()
                .values()
                .map(|s| SessionRow {
                    session: s.id,
                    pid: s.pid,
                    command: s.command.clone(),
                    device_bytes: s.device_bytes.load(Ordering::Relaxed),
                    calls: s.calls.load(Ordering::Relaxed),
                    state: match (s.phase(), crate::checkpoint::suspended_bytes(server, s.id)) {
                        (Phase::Paused, Some(b)) => {
                            format!("suspended ({} in host memory)", human_bytes(b))
                        }
                        (Phase::Running, _) => "running".into(),
                        (Phase::Paused, None) => "paused".into(),
                        (Phase::Closed, _) => "closed".into(),
                    },
                })
                .collect();
            for (id, p) in server.pending.lock().iter() {
                sessions.push(SessionRow {
                    session: *id,
                    pid: p.pid,
                    command: p.command.clone(),
                    device_bytes: p.state.device_bytes(),
                    calls: p.last_executed,
                    state: "restored, waiting for the process".into(),
                });
            }
            sessions.sort_by_key(|s| s.session);
            let info = server.backend.info();
            send(
                conn,
                &ControlReply::Ps {
                    server_pid: std::process::id(),
                    backend: info.backend.clone(),
                    device: info.name.clone(),
                    sessions,
                },
            )
        }
        ControlRequest::Shutdown => {
            server.shutdown.store(true, Ordering::Release);
            send(conn, &ControlReply::Ok("shutting down".into()))?;
            // Unblock the accept loop.
            let _ = UnixStream::connect(&server.opts.socket);
            Ok(())
        }
        ControlRequest::Job(j) => send(
            conn,
            &ControlReply::Job(crate::nccl::barrier::control(server, j)),
        ),
        other => crate::checkpoint::control(server, conn, other, &|r| send(conn, r)),
    }
}

/// Sends one control request and collects the answer, calling `progress` for progress lines.
pub fn request(
    server_socket: &Path,
    req: &ControlRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ControlReply, String> {
    let path = crate::server::control_path(server_socket);
    let conn = UnixStream::connect(&path).map_err(|e| {
        format!("cannot reach the devproxy server's control socket {}: {e} (is `devproxy serve` running?)", path.display())
    })?;
    socket::send_msg(&conn, &protocol::encode(req), &[]).map_err(|e| e.to_string())?;
    loop {
        let (bytes, _) = socket::recv_msg(&conn, MAX_CONTROL_MSG)
            .map_err(|e| format!("the server closed the control connection: {e}"))?;
        let r: ControlReply = protocol::decode(&bytes).map_err(|e| e.to_string())?;
        match r {
            ControlReply::Progress { done, total } => progress(done, total),
            other => return Ok(other),
        }
    }
}

/// Server sockets found in the runtime directory (those whose control socket exists).
pub fn discover() -> Vec<PathBuf> {
    let dir = crate::server::runtime_dir();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sock")
                && crate::server::control_path(&p).exists()
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Finds the server serving `pid` among `--server` or the discovered ones.
pub fn find_server_for_pid(explicit: Option<&Path>, pid: u32) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let candidates = discover();
    for s in &candidates {
        if let Ok(ControlReply::Ps { sessions, .. }) =
            request(s, &ControlRequest::Ps, &mut |_, _| {})
        {
            if sessions.iter().any(|r| r.pid == pid) {
                return Ok(s.clone());
            }
        }
    }
    Err(format!(
        "no devproxy server in {} serves pid {pid} ({} server(s) found); name one with --server PATH",
        crate::server::runtime_dir().display(),
        candidates.len()
    ))
}
