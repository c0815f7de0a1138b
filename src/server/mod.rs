//! The server: one per device. It alone talks to the backend; clients reach it through a Unix socket (handshake,
//! segment fd, notices) and a shared-memory segment per client process (requests and replies).
//!
//! Threads: an accept loop; per connection a handshake, then two threads per session: the *session thread* executes
//! the ring in order (it owns the session's [`SessionState`]), and the *socket watcher* notices the client going
//! away (EOF). Control commands (`ps`, `checkpoint`, ...) arrive on a second socket (`<socket>.ctl`) and reach a
//! session thread as closures it runs between two requests — that is the call boundary a barrier needs.

pub mod dispatch;
pub mod session;

use crate::backend::{Backend, HostSpan};
use crate::protocol::{self, CuError, Hello, HelloReply, Reply, Request, SessionInfo};
use crate::transport::{socket, Segment, SegmentLayout};
use parking_lot::{Condvar, Mutex};
use session::SessionState;
use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest handshake/control message accepted on a socket.
const MAX_SOCKET_MSG: usize = 1 << 20;

/// Work a control thread asks a session thread to do at the next call boundary.
pub type SessionJob = Box<dyn FnOnce(&mut SessionState, &Segment) -> JobOutcome + Send>;

/// What the session thread does after a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Go on executing requests.
    Continue,
    /// Stay at the barrier until resumed (or until the server ends).
    Pause,
    /// Close the session without tearing down the client (it re-attaches elsewhere).
    Detach,
}

/// Lifecycle of a session, as `devproxy ps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    Paused,
    Closed,
}

/// The part of a session other threads see.
pub struct SessionShared {
    pub id: u64,
    pub token: u64,
    pub pid: u32,
    pub command: String,
    pub seg: Arc<Segment>,
    pub calls: AtomicU64,
    pub device_bytes: AtomicU64,
    /// What an image of the session holds besides device memory ([`SessionState::host_bytes`]).
    pub host_bytes: AtomicU64,
    pub closed: AtomicBool,
    /// The client's socket, for notices.
    pub sock: Mutex<Option<UnixStream>>,
    jobs: Mutex<Vec<SessionJob>>,
    phase: Mutex<Phase>,
    phase_cv: Condvar,
    resume: AtomicBool,
}

impl SessionShared {
    /// Runs `job` on the session thread at the next call boundary; returns once it ran.
    pub fn run_job<T: Send + 'static>(
        self: &Arc<Self>,
        job: impl FnOnce(&mut SessionState, &Segment) -> (T, JobOutcome) + Send + 'static,
    ) -> Result<T, String> {
        let slot = Arc::new((Mutex::new(None::<T>), Condvar::new()));
        let s2 = slot.clone();
        let me = self.clone();
        self.jobs.lock().push(Box::new(move |st, seg| {
            let (v, outcome) = job(st, seg);
            if outcome == JobOutcome::Pause {
                // Paused before the caller hears back, so whatever it does next (ps, resume) sees the session
                // paused; a stale resume is cleared first, so a resume sent from now on counts.
                me.resume.store(false, Ordering::Release);
                me.set_phase(Phase::Paused);
            }
            *s2.0.lock() = Some(v);
            s2.1.notify_all();
            outcome
        }));
        self.seg.wake_server();
        let mut g = slot.0.lock();
        while g.is_none() {
            if self.closed.load(Ordering::Acquire) && self.phase() == Phase::Closed {
                return Err(format!(
                    "session {} closed before the operation could run",
                    self.id
                ));
            }
            slot.1.wait_for(&mut g, Duration::from_millis(100));
        }
        Ok(g.take().expect("checked above"))
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock()
    }

    fn set_phase(&self, p: Phase) {
        *self.phase.lock() = p;
        self.phase_cv.notify_all();
    }

    /// Lets a paused session continue.
    pub fn resume(&self) {
        self.resume.store(true, Ordering::Release);
        self.phase_cv.notify_all();
    }

    /// Sends a notice to the client.
    pub fn notify(&self, notice: &protocol::Notice) -> std::io::Result<()> {
        match self.sock.lock().as_ref() {
            Some(s) => socket::send_msg(s, &protocol::encode(notice), &[]),
            None => Ok(()),
        }
    }
}

/// Server configuration.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub socket: PathBuf,
    pub layout: SegmentLayout,
}

/// A running server.
pub struct Server {
    pub backend: Arc<dyn Backend>,
    pub opts: ServerOptions,
    pub sessions: Mutex<HashMap<u64, Arc<SessionShared>>>,
    /// Sessions restored from an image, waiting for their client to re-attach: id -> (token, state, expected seq).
    pub pending: Mutex<HashMap<u64, PendingSession>>,
    next_session: AtomicU64,
    pub started: Instant,
    pub shutdown: AtomicBool,
}

/// A session rebuilt from an image (restore or incoming migration) waiting for its client.
pub struct PendingSession {
    pub token: u64,
    pub pid: u32,
    pub command: String,
    pub state: SessionState,
    /// The ring sequence number the image was taken at; the client's segment must agree.
    pub last_executed: u64,
    /// Pinned-area contents to write into the client's segment when it re-attaches.
    pub pinned_data: Vec<(u64, Vec<u8>)>,
}

impl Server {
    pub fn new(backend: Arc<dyn Backend>, opts: ServerOptions) -> Arc<Server> {
        Arc::new(Server {
            backend,
            opts,
            sessions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            started: Instant::now(),
            shutdown: AtomicBool::new(false),
        })
    }

    /// Session ids are unique per server; restored sessions keep theirs, so new ones start above them.
    pub fn reserve_session_ids(&self, above: u64) {
        self.next_session.fetch_max(above + 1, Ordering::AcqRel);
    }

    /// Binds the client socket and the control socket, then serves until shutdown.
    pub fn serve(self: &Arc<Self>) -> Result<(), String> {
        let listener = socket::bind_private(&self.opts.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", self.opts.socket.display()))?;
        let ctl_path = control_path(&self.opts.socket);
        let ctl = socket::bind_private(&ctl_path)
            .map_err(|e| format!("cannot listen on {}: {e}", ctl_path.display()))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("devproxy-ctl".into())
            .spawn(move || crate::control::serve_control(me, ctl))
            .map_err(|e| e.to_string())?;
        self.accept_loop(listener);
        Ok(())
    }

    fn accept_loop(self: &Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            if self.shutdown.load(Ordering::Acquire) {
                break;
            }
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            };
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name("devproxy-conn".into())
                .spawn(move || {
                    if let Err(e) = me.handshake(conn) {
                        tracing::warn!("client refused: {e}");
                    }
                });
        }
    }

    fn handshake(self: &Arc<Self>, conn: UnixStream) -> Result<(), String> {
        let (pid, uid) = socket::peer_credentials(&conn).map_err(|e| e.to_string())?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if uid != me && uid != 0 {
            let msg = format!("uid {uid} may not use this server (it runs as uid {me})");
            let _ = socket::send_msg(
                &conn,
                &protocol::encode(&HelloReply::Refused(msg.clone())),
                &[],
            );
            return Err(msg);
        }
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let (bytes, mut fds) =
            socket::recv_msg(&conn, MAX_SOCKET_MSG).map_err(|e| format!("pid {pid}: {e}"))?;
        let refuse = |msg: String| {
            let _ = socket::send_msg(
                &conn,
                &protocol::encode(&HelloReply::Refused(msg.clone())),
                &[],
            );
            Err::<(), String>(msg)
        };
        let hello: Hello = match protocol::decode(&bytes) {
            Ok(h) => h,
            Err(e) => return refuse(format!("pid {pid}: bad hello: {e}")),
        };
        if hello.major != protocol::MAJOR {
            return refuse(
                protocol::ProtocolError::Version {
                    client_major: hello.major,
                    client_minor: hello.minor,
                    server_major: protocol::MAJOR,
                    server_minor: protocol::MINOR,
                }
                .to_string(),
            );
        }
        conn.set_read_timeout(None).map_err(|e| e.to_string())?;
        match hello.resume {
            None => {
                let seg = Segment::create(self.opts.layout).map_err(|e| e.to_string())?;
                let state = SessionState::new(self.backend.clone()).map_err(|e| e.to_string())?;
                let id = self.next_session.fetch_add(1, Ordering::AcqRel);
                let token = random_u64();
                let info = self.session_info(id, token, &seg);
                socket::send_msg(&conn, &protocol::encode(&HelloReply::Ok(info)), &[seg.fd()])
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    "session {id}: pid {} attached ({})",
                    hello.pid,
                    hello.command
                );
                self.start_session(
                    id,
                    token,
                    hello.pid,
                    hello.command,
                    Arc::new(seg),
                    state,
                    conn,
                    0,
                );
                Ok(())
            }
            Some(resume) => {
                let Some(fd) = fds.pop() else {
                    return refuse("resume without the session's segment fd".into());
                };
                let pending = {
                    let mut p = self.pending.lock();
                    match p.get(&resume.session) {
                        Some(ps) if ps.token == resume.token => p.remove(&resume.session),
                        Some(_) => None,
                        None => None,
                    }
                };
                let Some(pending) = pending else {
                    return refuse(format!(
                        "no session {} waiting here (or wrong token): restore its image on this server first",
                        resume.session
                    ));
                };
                let seg = match Segment::open(fd) {
                    Ok(s) => s,
                    Err(e) => {
                        let msg = format!("session {}: segment refused: {e}", resume.session);
                        self.pending.lock().insert(resume.session, pending);
                        return refuse(msg);
                    }
                };
                if seg.last_executed() != pending.last_executed {
                    let msg = format!(
                        "session {}: the process has executed up to call {} but the image was taken at call {}; \
                         an image older than the process cannot be restored under it",
                        resume.session,
                        seg.last_executed(),
                        pending.last_executed
                    );
                    self.pending.lock().insert(resume.session, pending);
                    return refuse(msg);
                }
                for (off, data) in &pending.pinned_data {
                    if off + data.len() as u64 <= seg.pinned_bytes() {
                        // SAFETY: the range was bounds-checked against the pinned area of the mapped segment; the
                        // client is paused (it waits for this handshake) so nobody else writes it now.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                data.as_ptr(),
                                seg.pinned_ptr().add(*off as usize),
                                data.len(),
                            )
                        };
                    }
                }
                let info = self.session_info(resume.session, pending.token, &seg);
                socket::send_msg(&conn, &protocol::encode(&HelloReply::Ok(info)), &[])
                    .map_err(|e| e.to_string())?;
                tracing::info!("session {}: pid {} re-attached", resume.session, hello.pid);
                let PendingSession {
                    token,
                    pid,
                    command,
                    mut state,
                    ..
                } = pending;
                register_segment(&mut state, &seg);
                for (&off, &bytes) in state.pinned.clone().iter() {
                    let span = HostSpan {
                        ptr: seg.pinned_ptr().wrapping_add(off as usize),
                        len: bytes as usize,
                    };
                    if state.backend.host_register(span).is_ok() {
                        state.registered.push(span);
                    }
                }
                let calls = seg.last_executed();
                self.start_session(
                    resume.session,
                    token,
                    pid,
                    command,
                    Arc::new(seg),
                    state,
                    conn,
                    calls,
                );
                Ok(())
            }
        }
    }

    fn session_info(&self, id: u64, token: u64, seg: &Segment) -> SessionInfo {
        SessionInfo {
            session: id,
            token,
            server_pid: std::process::id(),
            device: self.backend.info().clone(),
            segment_bytes: seg.total_bytes(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_session(
        self: &Arc<Self>,
        id: u64,
        token: u64,
        pid: u32,
        command: String,
        seg: Arc<Segment>,
        mut state: SessionState,
        conn: UnixStream,
        calls: u64,
    ) {
        if state.registered.is_empty() {
            register_segment(&mut state, &seg);
        }
        // A restored rank's communicators belong to this segment from now on (`devproxy ps`, the job barrier).
        for c in state.nccl.values() {
            c.set_session(Arc::as_ptr(&seg) as u64);
        }
        let watch = conn.try_clone().ok();
        let shared = Arc::new(SessionShared {
            id,
            token,
            pid,
            command,
            seg,
            calls: AtomicU64::new(calls),
            device_bytes: AtomicU64::new(state.device_bytes()),
            host_bytes: AtomicU64::new(state.host_bytes()),
            closed: AtomicBool::new(false),
            sock: Mutex::new(Some(conn)),
            jobs: Mutex::new(Vec::new()),
            phase: Mutex::new(Phase::Running),
            phase_cv: Condvar::new(),
            resume: AtomicBool::new(false),
        });
        self.sessions.lock().insert(id, shared.clone());
        if let Some(watch) = watch {
            let sh = shared.clone();
            let _ = std::thread::Builder::new()
                .name(format!("devproxy-watch-{id}"))
                .spawn(move || {
                    // The client never sends after the handshake: any read return is EOF or an error = gone.
                    let mut buf = [0u8; 64];
                    loop {
                        match std::io::Read::read(&mut &watch, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => continue,
                        }
                    }
                    sh.closed.store(true, Ordering::Release);
                    sh.seg.wake_server();
                    sh.phase_cv.notify_all();
                });
        }
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name(format!("devproxy-session-{id}"))
            .spawn(move || me.session_loop(shared, state));
    }

    fn session_loop(self: Arc<Self>, sh: Arc<SessionShared>, mut st: SessionState) {
        let mut buf = Vec::with_capacity(4096);
        let mut detached = false;
        // (allocations, pinned blocks, objects) when the sizes were last published.
        let mut shape = (usize::MAX, 0, 0);
        // A restored rank held by the job barrier inside an NCCL group: that record was taken from the ring but not
        // executed (it is the one after `last_executed`), so it runs first, as that record.
        for req in std::mem::take(&mut st.replay) {
            let seq = sh.seg.last_executed() + 1;
            tracing::info!("session {}: executing held call {seq} again", sh.id);
            sh.calls.fetch_add(1, Ordering::Relaxed);
            let _ = self.execute(&mut st, &sh, req, false);
            sh.seg.set_last_executed(seq);
        }
        'outer: loop {
            // Jobs (barrier, checkpoint, migration) run here: between two requests.
            let jobs: Vec<SessionJob> = std::mem::take(&mut *sh.jobs.lock());
            for job in jobs {
                match job(&mut st, &sh.seg) {
                    JobOutcome::Continue => {}
                    JobOutcome::Detach => {
                        detached = true;
                        break 'outer;
                    }
                    JobOutcome::Pause => {
                        // run_job already cleared a stale resume and set the phase to Paused.
                        tracing::info!(
                            "session {}: paused at call {}",
                            sh.id,
                            sh.seg.last_executed()
                        );
                        loop {
                            // Jobs posted while paused (inspect, migrate, resume-with-state) still run.
                            let more: Vec<SessionJob> = std::mem::take(&mut *sh.jobs.lock());
                            for job in more {
                                if job(&mut st, &sh.seg) == JobOutcome::Detach {
                                    detached = true;
                                    break 'outer;
                                }
                            }
                            if sh.resume.swap(false, Ordering::AcqRel) {
                                break;
                            }
                            if sh.closed.load(Ordering::Acquire)
                                || self.shutdown.load(Ordering::Acquire)
                            {
                                break 'outer;
                            }
                            let mut g = sh.phase.lock();
                            sh.phase_cv.wait_for(&mut g, Duration::from_millis(50));
                        }
                        sh.set_phase(Phase::Running);
                        tracing::info!("session {}: resumed", sh.id);
                    }
                }
            }
            if sh.closed.load(Ordering::Acquire) && sh.seg.pending_records() == 0 {
                break;
            }
            let meta = match sh.seg.pop(&mut buf, Duration::from_millis(200)) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("session {}: closing: ring is corrupt: {e}", sh.id);
                    break;
                }
            };
            sh.calls.fetch_add(1, Ordering::Relaxed);
            let reply = match protocol::decode::<Request>(&buf) {
                Ok(req) => self.execute(&mut st, &sh, req, meta.wants_reply),
                Err(e) => {
                    tracing::warn!(
                        "session {}: call {}: undecodable request ({e}); failing it",
                        sh.id,
                        meta.seq
                    );
                    Reply::Err(CuError::INVALID_VALUE)
                }
            };
            if meta.wants_reply {
                if let Err(e) = sh.seg.reply(meta.seq, &protocol::encode(&reply)) {
                    tracing::error!("session {}: closing: cannot reply: {e}", sh.id);
                    break;
                }
            }
            sh.seg.set_last_executed(meta.seq);
            // The sizes `ps` and checkpoints read, summed again only when a request added or removed an allocation,
            // a pinned block or an object (each request does at most one of these): not on every forwarded call.
            let now = (st.allocations.len(), st.pinned.len(), st.objects.len());
            if now != shape {
                shape = now;
                sh.device_bytes.store(st.device_bytes(), Ordering::Relaxed);
                sh.host_bytes.store(st.host_bytes(), Ordering::Relaxed);
            }
        }
        sh.closed.store(true, Ordering::Release);
        st.teardown();
        crate::checkpoint::session_ended(&self, sh.id);
        if detached {
            tracing::info!(
                "session {}: moved away; its device memory here is freed",
                sh.id
            );
        } else {
            tracing::info!(
                "session {}: pid {} detached; its memory is freed",
                sh.id,
                sh.pid
            );
        }
        sh.set_phase(Phase::Closed);
        self.sessions.lock().remove(&sh.id);
        if let Some(s) = sh.sock.lock().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Executes one request with the session's deferred-error rules.
    fn execute(
        &self,
        st: &mut SessionState,
        sh: &SessionShared,
        req: Request,
        waits: bool,
    ) -> Reply {
        if let Some(e) = st.sticky {
            return Reply::Err(e);
        }
        if waits {
            // An earlier fire-and-forget failure is reported by the next call that can observe it.
            if let Some(e) = st.deferred.take() {
                return Reply::Err(e);
            }
        }
        let name = req.name();
        let reply = dispatch::execute(st, &sh.seg, req);
        if let Reply::Err(e) = reply {
            tracing::debug!("session {}: {name} failed: {e}", sh.id);
            if e.is_sticky() {
                st.sticky = Some(e);
            }
            if !waits && st.deferred.is_none() {
                st.deferred = Some(e);
            }
        }
        reply
    }
}

fn register_segment(state: &mut SessionState, seg: &Segment) {
    let span = HostSpan {
        ptr: seg.staging_ptr(),
        len: seg.staging_bytes() as usize,
    };
    match state.backend.host_register(span) {
        Ok(()) => state.registered.push(span),
        Err(e) => tracing::warn!("staging could not be page-locked ({e}); copies will be slower"),
    }
}

/// The control socket that belongs to a server socket.
pub fn control_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// Where servers put their sockets by default: `$XDG_RUNTIME_DIR/devproxy` or `/tmp/devproxy-<uid>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEVPROXY_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("devproxy");
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    PathBuf::from(format!("/tmp/devproxy-{uid}"))
}

/// The default socket of device `n`.
pub fn default_socket(device: u32) -> PathBuf {
    runtime_dir().join(format!("dev{device}.sock"))
}

/// A random 64-bit value from the OS.
pub fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most `v.len()` bytes into `v`.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n != 8 {
        // Fall back to time and pid; the token only guards against mistakes, not against a hostile same-uid peer.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
    }
    u64::from_le_bytes(v)
}
