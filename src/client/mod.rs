//! The client side of a devproxy session: what the shim (and Rust tests) use to talk to a server.
//!
//! A [`Client`] is one attached session: the Unix socket of the handshake (kept open for the session's life, read by
//! a monitor thread), and the shared-memory segment whose ring carries every device call. It knows nothing about the
//! CUDA C API; the shim (`interpose/`) translates driver calls into [`Request`]s and calls [`Client::call`],
//! [`Client::htod`], [`Client::dtoh`], [`Client::launch_with`] and friends.
//!
//! # Ordering and the call lock
//! CUDA gives one total order per process to the calls it issues; the server executes the ring in order. So every call
//! takes one process-wide lock for push + (wait for reply) + use of the staging area. That keeps the ring
//! single-producer (the transport's contract), lets the reply slot and staging be used without further
//! coordination, and lets the encode buffer be reused: the hot paths (launch, small async copies) allocate nothing
//! once the buffers have grown.
//!
//! # Data paths
//! Host-to-device bytes up to [`INLINE_MAX`] travel inside the request (an async copy is then fire-and-forget);
//! larger ones go through staging chunk by chunk (each chunk waits). A source inside the pinned area (memory from
//! [`Client::host_alloc`]) is referenced by offset and read by the server in stream order. Device-to-host into pinned
//! memory with an async call is fire-and-forget (bytes land in stream order); everything else goes through staging
//! and has completed when the call returns, CUDA's rule for pageable memory.
//!
//! # Server restarts and migration
//! EOF on the socket means the server is gone (killed, or paused for a restore). The monitor thread then re-attaches:
//! it polls the socket path (the one a `Notice::Moved` named, else the original) for up to
//! `DEVPROXY_RECONNECT_TIMEOUT` seconds (default 300), sending `Hello { resume }` with the segment fd attached. Calls
//! blocked in the ring meanwhile keep waiting (their `alive` check stays true): the new server continues the same
//! ring from where the old one stopped, so nothing is resent. A server that refuses the session (a stale image, or
//! another process's, restored at that path) is said once and waited past: stopping it and restoring the right image
//! still saves the process. If no server takes the session back in time, every call returns
//! `CUDA_ERROR_DEVICE_UNAVAILABLE`.

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::protocol::{
    self, CuError, DeviceInfo, Handle, Hello, HelloReply, HostDst, HostSrc, Launch, LaunchDims,
    Notice, Reply, Request, Resume, SessionInfo, MAJOR, MINOR,
};
use crate::transport::{self, Segment, TransportError};

/// Host-to-device copies up to this size travel inside the request record.
pub const INLINE_MAX: usize = 64 * 1024;
/// Room kept in a record for the request's other fields when deciding whether bytes fit inline.
const RECORD_OVERHEAD: usize = 128;
/// Largest handshake/notice message we accept on the socket.
const MAX_SOCKET_MSG: usize = 1 << 20;
/// How long the handshake may take before cuInit gives up (never a hang).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for `DEVPROXY_RECONNECT_TIMEOUT` (seconds).
const DEFAULT_RECONNECT_SECS: u64 = 300;

/// Errors of attaching to a server. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("DEVPROXY_SOCKET is not set: run the program under `devproxy run -- CMD` (or set DEVPROXY_SOCKET to the socket of a running `devproxy serve`)")]
    NoSocket,
    #[error("cannot connect to the devproxy server at {path}: {source}; is a server running there? Run the program under `devproxy run -- CMD` or start `devproxy serve`")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("handshake with the devproxy server at {path} failed: {detail}; check that the shim and the server come from the same devproxy release")]
    Handshake { path: String, detail: String },
    #[error("the devproxy server at {path} refused this process: {reason}")]
    Refused { path: String, reason: String },
    #[error("cannot map the session segment the server at {path} sent: {source}")]
    Segment {
        path: String,
        #[source]
        source: TransportError,
    },
}

const ATTACHED: u8 = 0;
const REATTACHING: u8 = 1;
const GONE: u8 = 2;

/// Buffers reused under the call lock (no allocation on the hot paths once grown).
#[derive(Default)]
struct CallBufs {
    /// The encoded request.
    encode: Vec<u8>,
    /// The encoded reply.
    reply: Vec<u8>,
    /// Inline host bytes / packed kernel parameters, moved into a request and taken back after encoding.
    scratch: Vec<u8>,
}

struct Shared {
    segment: Segment,
    info: SessionInfo,
    state: AtomicU8,
    /// The "gave up" line is logged once.
    gone_logged: AtomicBool,
    /// Set by `Notice::Moved`: the socket the session now lives at.
    socket_path: Mutex<String>,
    calls: Mutex<CallBufs>,
    pinned_base: usize,
    pinned_len: usize,
    staging: *mut u8,
    staging_len: usize,
    inline_max: usize,
}

// SAFETY: the raw pointers are addresses into the segment mapping owned by `segment`, which lives as long as
// `Shared`; the staging area is only touched under the `calls` lock, and the pinned area belongs to the application
// (its synchronization is the application's business, as with page-locked memory a GPU writes by DMA).
unsafe impl Send for Shared {}
// SAFETY: see `Send`; every mutable field is an atomic or behind a Mutex.
unsafe impl Sync for Shared {}

impl Shared {
    fn alive(&self) -> bool {
        self.state.load(Ordering::Acquire) != GONE
    }

    fn transport_error(&self, e: TransportError) -> CuError {
        if !self.alive() || matches!(e, TransportError::Disconnected) {
            self.give_up_log();
            CuError::DEVICE_UNAVAILABLE
        } else {
            eprintln!("devproxy: device call failed in the transport: {e}");
            CuError::UNKNOWN
        }
    }

    fn give_up_log(&self) {
        if !self.gone_logged.swap(true, Ordering::Relaxed) {
            eprintln!(
                "devproxy: the devproxy server is gone and re-attaching failed; device calls now fail with CUDA_ERROR_DEVICE_UNAVAILABLE"
            );
        }
    }

    /// Encodes `req` into the reused buffer, pushes it and, if it waits, decodes the reply. Caller holds `calls`.
    fn call_locked(&self, bufs: &mut CallBufs, req: &Request) -> Result<Reply, CuError> {
        bufs.encode.clear();
        protocol::encode_into(req, &mut bufs.encode);
        self.push_encoded(bufs, req.waits())
    }

    fn push_encoded(&self, bufs: &mut CallBufs, waits: bool) -> Result<Reply, CuError> {
        if !self.alive() {
            self.give_up_log();
            return Err(CuError::DEVICE_UNAVAILABLE);
        }
        let alive = || self.alive();
        let seq = self
            .segment
            .push(&bufs.encode, waits, &alive)
            .map_err(|e| self.transport_error(e))?;
        if !waits {
            return Ok(Reply::Unit);
        }
        self.segment
            .wait_reply(seq, &mut bufs.reply, &alive)
            .map_err(|e| self.transport_error(e))?;
        match protocol::decode::<Reply>(&bufs.reply) {
            Ok(Reply::Err(e)) => Err(e),
            Ok(r) => Ok(r),
            Err(e) => {
                eprintln!("devproxy: undecodable reply from the server: {e}");
                Err(CuError::UNKNOWN)
            }
        }
    }
}

/// One attached session. Cheap to share (`&Client` from all threads); calls are serialized internally.
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.shared.info.session)
            .finish_non_exhaustive()
    }
}

fn command_line() -> String {
    std::fs::read("/proc/self/cmdline")
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Whether `DEVPROXY_LOG` asks for info (or debug) lines.
fn info_enabled() -> bool {
    matches!(
        std::env::var("DEVPROXY_LOG")
            .map(|s| s.to_ascii_lowercase())
            .as_deref(),
        Ok("info") | Ok("debug") | Ok("trace")
    )
}

fn reconnect_timeout() -> Duration {
    let secs = std::env::var("DEVPROXY_RECONNECT_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_RECONNECT_SECS);
    Duration::from_secs(secs)
}

/// Sends a Hello and reads the HelloReply (with its fds) under a timeout.
fn handshake(
    sock: &UnixStream,
    path: &str,
    resume: Option<Resume>,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(SessionInfo, Vec<OwnedFd>), ClientError> {
    let hs = |detail: String| ClientError::Handshake {
        path: path.to_string(),
        detail,
    };
    let hello = Hello {
        major: MAJOR,
        minor: MINOR,
        pid: std::process::id(),
        command: command_line(),
        resume,
    };
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| hs(e.to_string()))?;
    transport::send_msg(sock, &protocol::encode(&hello), &fds)
        .map_err(|e| hs(format!("sending Hello: {e}")))?;
    let (bytes, fds) = transport::recv_msg(sock, MAX_SOCKET_MSG)
        .map_err(|e| hs(format!("reading the reply: {e}")))?;
    sock.set_read_timeout(None).map_err(|e| hs(e.to_string()))?;
    match protocol::decode::<HelloReply>(&bytes).map_err(|e| hs(e.to_string()))? {
        HelloReply::Ok(info) => Ok((info, fds)),
        HelloReply::Refused(reason) => Err(ClientError::Refused {
            path: path.to_string(),
            reason,
        }),
    }
}

impl Client {
    /// Attaches to the server whose socket `DEVPROXY_SOCKET` names.
    pub fn connect_from_env() -> Result<Client, ClientError> {
        let path = std::env::var("DEVPROXY_SOCKET").map_err(|_| ClientError::NoSocket)?;
        if path.is_empty() {
            return Err(ClientError::NoSocket);
        }
        Client::connect(&path)
    }

    /// Attaches to the server listening at `path` (a new session).
    pub fn connect(path: &str) -> Result<Client, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_string(),
            source,
        })?;
        let (info, mut fds) = handshake(&sock, path, None, None)?;
        if fds.len() != 1 {
            return Err(ClientError::Handshake {
                path: path.to_string(),
                detail: format!(
                    "expected exactly one fd (the session segment) with the reply, got {}",
                    fds.len()
                ),
            });
        }
        let fd = fds.pop().expect("one fd");
        let segment = Segment::open(fd).map_err(|source| ClientError::Segment {
            path: path.to_string(),
            source,
        })?;
        let client = Client::from_parts(segment, info, path.to_string());
        let shared = Arc::clone(&client.shared);
        let original = path.to_string();
        std::thread::Builder::new()
            .name("devproxy-monitor".into())
            .spawn(move || monitor(shared, sock, original))
            .map_err(|e| ClientError::Handshake {
                path: path.to_string(),
                detail: format!("monitor thread: {e}"),
            })?;
        Ok(client)
    }

    fn from_parts(segment: Segment, info: SessionInfo, path: String) -> Client {
        let inline_max = INLINE_MAX.min(segment.max_record_bytes().saturating_sub(RECORD_OVERHEAD));
        let shared = Shared {
            pinned_base: segment.pinned_ptr() as usize,
            pinned_len: segment.pinned_bytes() as usize,
            staging: segment.staging_ptr(),
            staging_len: segment.staging_bytes() as usize,
            inline_max,
            segment,
            info,
            state: AtomicU8::new(ATTACHED),
            gone_logged: AtomicBool::new(false),
            socket_path: Mutex::new(path),
            calls: Mutex::new(CallBufs::default()),
        };
        Client {
            shared: Arc::new(shared),
        }
    }

    /// The device as cached at attach (answers every attribute query locally).
    pub fn device(&self) -> &DeviceInfo {
        &self.shared.info.device
    }

    /// The session as the server described it at attach.
    pub fn session(&self) -> &SessionInfo {
        &self.shared.info
    }

    /// False once re-attaching to a server failed for good.
    pub fn is_alive(&self) -> bool {
        self.shared.alive()
    }

    /// Sends one request. Fire-and-forget requests (see [`Request::waits`]) return `Ok(Reply::Unit)` at once; their
    /// errors come back from a later waiting call.
    pub fn call(&self, req: &Request) -> Result<Reply, CuError> {
        let mut bufs = self.shared.calls.lock();
        self.shared.call_locked(&mut bufs, req)
    }

    /// Launches a kernel; `fill` writes the packed parameter buffer into the (cleared, reused) vector it is given.
    /// Allocates nothing once the buffers have grown.
    pub fn launch_with(
        &self,
        func: Handle,
        dims: LaunchDims,
        stream: Handle,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), CuError>,
    ) -> Result<(), CuError> {
        let mut guard = self.shared.calls.lock();
        let bufs = &mut *guard;
        let mut params = std::mem::take(&mut bufs.scratch);
        params.clear();
        if let Err(e) = fill(&mut params) {
            bufs.scratch = params;
            return Err(e);
        }
        let req = Request::LaunchKernel(Launch {
            func,
            dims,
            stream,
            params,
        });
        bufs.encode.clear();
        protocol::encode_into(&req, &mut bufs.encode);
        if let Request::LaunchKernel(l) = req {
            bufs.scratch = l.params;
        }
        self.shared.push_encoded(bufs, false).map(|_| ())
    }

    /// Offset of `[ptr, ptr + len)` in the pinned area, if it lies wholly inside it.
    pub fn pinned_offset(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let p = ptr as usize;
        let base = self.shared.pinned_base;
        let end = base + self.shared.pinned_len;
        let stop = p.checked_add(len)?;
        (p >= base && stop <= end && (p < end || len == 0)).then(|| (p - base) as u64)
    }

    /// Whether `ptr` is a device address inside the server's arena.
    pub fn in_arena(&self, ptr: u64) -> bool {
        let d = self.device();
        ptr >= d.arena_base && ptr - d.arena_base < d.arena_bytes
    }

    /// Copies host bytes to device memory. `sync = false` is an async copy on `stream`: inline or pinned sources are
    /// then fire-and-forget; staged ones wait per chunk (so `src` may be reused when this returns).
    pub fn htod(&self, dst: u64, src: &[u8], stream: Handle, sync: bool) -> Result<(), CuError> {
        let mut guard = self.shared.calls.lock();
        let bufs = &mut *guard;
        if let Some(offset) = self.pinned_offset(src.as_ptr(), src.len()) {
            let req = Request::MemcpyHtoD {
                dst,
                src: HostSrc::Pinned {
                    offset,
                    len: src.len() as u64,
                },
                stream,
                sync,
            };
            return self.shared.call_locked(bufs, &req).map(|_| ());
        }
        if src.len() <= self.shared.inline_max {
            let mut bytes = std::mem::take(&mut bufs.scratch);
            bytes.clear();
            bytes.extend_from_slice(src);
            let req = Request::MemcpyHtoD {
                dst,
                src: HostSrc::Inline(bytes),
                stream,
                sync,
            };
            bufs.encode.clear();
            protocol::encode_into(&req, &mut bufs.encode);
            let waits = req.waits();
            if let Request::MemcpyHtoD {
                src: HostSrc::Inline(b),
                ..
            } = req
            {
                bufs.scratch = b;
            }
            return self.shared.push_encoded(bufs, waits).map(|_| ());
        }
        let chunk = self.shared.staging_len.max(1);
        for (i, part) in src.chunks(chunk).enumerate() {
            // SAFETY: `staging` points at `staging_len` bytes of the mapped segment; `part.len() <= staging_len`;
            // we hold the call lock, so no other call uses staging, and the previous chunk's request has been
            // answered (staged requests wait), so the server no longer reads it.
            unsafe {
                std::ptr::copy_nonoverlapping(part.as_ptr(), self.shared.staging, part.len())
            };
            let req = Request::MemcpyHtoD {
                dst: dst + (i * chunk) as u64,
                src: HostSrc::Staging {
                    offset: 0,
                    len: part.len() as u64,
                },
                stream,
                sync,
            };
            self.shared.call_locked(bufs, &req)?;
        }
        Ok(())
    }

    /// Copies device memory to host. Into pinned memory with `sync = false` this is fire-and-forget (bytes land in
    /// stream order); otherwise the bytes are in `dst` when it returns.
    pub fn dtoh(
        &self,
        dst: &mut [u8],
        src: u64,
        stream: Handle,
        sync: bool,
    ) -> Result<(), CuError> {
        // SAFETY: `dst` is a valid, exclusively borrowed buffer of `dst.len()` bytes.
        unsafe { self.dtoh_raw(dst.as_mut_ptr(), dst.len(), src, stream, sync) }
    }

    /// [`Client::dtoh`] into a raw host buffer (the shim's entry: an async copy into pinned memory outlives any
    /// Rust borrow).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes until the copy completes (when this returns, unless `dst` is
    /// pinned memory and `sync` is false: then until the stream reaches the copy).
    pub unsafe fn dtoh_raw(
        &self,
        dst: *mut u8,
        len: usize,
        src: u64,
        stream: Handle,
        sync: bool,
    ) -> Result<(), CuError> {
        let mut guard = self.shared.calls.lock();
        let bufs = &mut *guard;
        if let Some(offset) = self.pinned_offset(dst, len) {
            let req = Request::MemcpyDtoH {
                dst: HostDst::Pinned { offset },
                src,
                len: len as u64,
                stream,
                sync,
            };
            return self.shared.call_locked(bufs, &req).map(|_| ());
        }
        let chunk = self.shared.staging_len.max(1);
        let mut done = 0usize;
        while done < len {
            let n = chunk.min(len - done);
            let req = Request::MemcpyDtoH {
                dst: HostDst::Staging { offset: 0 },
                src: src + done as u64,
                len: n as u64,
                stream,
                sync,
            };
            self.shared.call_locked(bufs, &req)?;
            // SAFETY: the reply says the server wrote `n` bytes at staging offset 0; `n <= staging_len`; we hold
            // the call lock so nobody else uses staging; the caller guarantees `dst[done..done + n]` is writable.
            unsafe { std::ptr::copy_nonoverlapping(self.shared.staging, dst.add(done), n) };
            done += n;
        }
        Ok(())
    }

    /// Loads a module image (PTX text without its NUL, cubin or fatbin): inline when small, else through staging.
    pub fn module_load(&self, image: &[u8]) -> Result<Handle, CuError> {
        let mut guard = self.shared.calls.lock();
        let bufs = &mut *guard;
        let src = if image.len() <= self.shared.inline_max {
            HostSrc::Inline(image.to_vec())
        } else if image.len() <= self.shared.staging_len {
            // SAFETY: `image.len() <= staging_len`; we hold the call lock, so staging is ours until the reply.
            unsafe {
                std::ptr::copy_nonoverlapping(image.as_ptr(), self.shared.staging, image.len())
            };
            HostSrc::Staging {
                offset: 0,
                len: image.len() as u64,
            }
        } else {
            eprintln!(
                "devproxy: module image of {} bytes exceeds the staging area ({} bytes); raise DEVPROXY_STAGING_MB",
                image.len(),
                self.shared.staging_len
            );
            return Err(CuError::INVALID_VALUE);
        };
        match self
            .shared
            .call_locked(bufs, &Request::ModuleLoad { image: src })?
        {
            Reply::Handle(h) => Ok(h),
            other => Err(unexpected("ModuleLoad", &other)),
        }
    }

    /// Allocates page-locked host memory in the segment's pinned area; the pointer is valid in this process.
    pub fn host_alloc(&self, bytes: usize) -> Result<*mut u8, CuError> {
        match self.call(&Request::HostAlloc {
            bytes: bytes as u64,
        })? {
            Reply::Ptr(offset) => {
                let end = offset.checked_add(bytes as u64).ok_or(CuError::UNKNOWN)?;
                if end > self.shared.pinned_len as u64 {
                    eprintln!("devproxy: server returned pinned offset {offset:#x} (+{bytes}) outside the pinned area");
                    return Err(CuError::UNKNOWN);
                }
                Ok((self.shared.pinned_base + offset as usize) as *mut u8)
            }
            other => Err(unexpected("HostAlloc", &other)),
        }
    }

    /// Frees memory from [`Client::host_alloc`]; a pointer outside the pinned area is `CUDA_ERROR_INVALID_VALUE`.
    pub fn host_free(&self, ptr: *mut u8) -> Result<(), CuError> {
        let offset = self.pinned_offset(ptr, 0).ok_or(CuError::INVALID_VALUE)?;
        self.call(&Request::HostFree { offset }).map(|_| ())
    }

    /// The pinned area's address range in this process, `(base, len)`.
    pub fn pinned_area(&self) -> (usize, usize) {
        (self.shared.pinned_base, self.shared.pinned_len)
    }
}

/// The error for a reply of the wrong kind (a server bug).
pub fn unexpected(what: &str, reply: &Reply) -> CuError {
    eprintln!("devproxy: unexpected reply to {what}: {reply:?}");
    CuError::UNKNOWN
}

/// Reads notices from the server; on EOF re-attaches (see the module docs).
fn monitor(shared: Arc<Shared>, mut sock: UnixStream, original: String) {
    loop {
        match transport::recv_msg(&sock, MAX_SOCKET_MSG) {
            Ok((bytes, _fds)) => match protocol::decode::<Notice>(&bytes) {
                Ok(Notice::Moved { socket }) => {
                    if info_enabled() {
                        eprintln!("devproxy: session moved to the server at {socket}");
                    }
                    *shared.socket_path.lock() = socket;
                }
                Ok(Notice::Closing { reason }) => {
                    eprintln!("devproxy: the devproxy server is closing ({reason}); device calls now fail with CUDA_ERROR_DEVICE_UNAVAILABLE");
                    shared.gone_logged.store(true, Ordering::Relaxed);
                    shared.state.store(GONE, Ordering::Release);
                    return;
                }
                Err(e) => {
                    eprintln!("devproxy: ignoring an undecodable notice from the server: {e}")
                }
            },
            Err(_) => {
                // EOF or a broken socket: the server is gone. Re-attach, unless it said it was closing for good.
                if shared.state.load(Ordering::Acquire) == GONE {
                    return;
                }
                shared.state.store(REATTACHING, Ordering::Release);
                match reattach(&shared, &original) {
                    Some(s) => {
                        sock = s;
                        shared.state.store(ATTACHED, Ordering::Release);
                    }
                    None => {
                        shared.state.store(GONE, Ordering::Release);
                        shared.give_up_log();
                        return;
                    }
                }
            }
        }
    }
}

/// Polls the session's socket path until a server takes the session back, or the timeout passes.
fn reattach(shared: &Shared, original: &str) -> Option<UnixStream> {
    let timeout = reconnect_timeout();
    let deadline = Instant::now() + timeout;
    let mut announced = String::new();
    // The last refusal said (each is said once, not on every retry).
    let mut said = String::new();
    let refused = |said: &mut String, why: String| {
        if *said != why {
            eprintln!(
                "devproxy: {why}; still waiting (up to {} s in all) for a server that has this session",
                timeout.as_secs()
            );
            *said = why;
        }
    };
    let resume = Resume {
        session: shared.info.session,
        token: shared.info.token,
    };
    loop {
        let path = {
            let p = shared.socket_path.lock();
            if p.is_empty() {
                original.to_string()
            } else {
                p.clone()
            }
        };
        if announced != path {
            eprintln!(
                "devproxy: server gone, waiting for a server at {path} (up to {} s)",
                timeout.as_secs()
            );
            announced = path.clone();
        }
        if let Ok(sock) = UnixStream::connect(&path) {
            match handshake(
                &sock,
                &path,
                Some(resume.clone()),
                Some(shared.segment.fd()),
            ) {
                Ok((info, _fds)) if info.session == shared.info.session => {
                    if info_enabled() {
                        eprintln!("devproxy: re-attached session {} at {path}", info.session);
                    }
                    return Some(sock);
                }
                // A refusal (a stale or another process's image restored there) is an operator's to fix: stop
                // that server and restore the right image; the process keeps waiting until the timeout.
                Ok((info, _)) => refused(
                    &mut said,
                    format!(
                        "the server at {path} answered with session {} instead of {}",
                        info.session, shared.info.session
                    ),
                ),
                Err(ClientError::Refused { reason, .. }) => refused(
                    &mut said,
                    format!("the server at {path} refused to resume the session: {reason}"),
                ),
                Err(_) => {} // not ready yet: retry
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
