//! The operations: barrier + capture on the session thread, checkpoint to a directory, restore (into a new server or
//! an adopting one), live migration, suspend and resume, inspect.

use super::direct::{self, BlobFd};
use super::format::{Header, FLAG_BLOB_IN_FD, FLAG_TRAILING_BLOB_CRC};
use super::image::{
    self, consume_blob_checked, produce_blob, BlobSink, BlobSource, LoadedImage, CHUNK,
};
use super::manifest::{self, DeviceImage, Manifest, Region, RegionKind, SessionImage};
use super::{CheckpointError, Persist};
use crate::backend::{Backend, HostSpan};
use crate::control::{human_bytes, ControlReply, ControlRequest, Summary};
use crate::protocol::{self, Notice};
use crate::server::session::SessionState;
use crate::server::{JobOutcome, PendingSession, Phase, Server, ServerOptions, SessionShared};
use crate::transport::{socket, Segment, SegmentLayout};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

type Reply<'a> = &'a dyn Fn(&ControlReply) -> Result<(), String>;

/// Largest control frame (the control socket's limit).
const MAX_FRAME: usize = 64 << 20;

pub fn control(
    server: &Arc<Server>,
    conn: &UnixStream,
    req: ControlRequest,
    send: Reply<'_>,
) -> Result<(), String> {
    match req {
        ControlRequest::Checkpoint { pid, out, stop } => {
            checkpoint(server, pid, Path::new(&out), stop, send)
        }
        ControlRequest::Resume { pid } => resume(server, pid, send),
        ControlRequest::Migrate { pid, to } => migrate(server, pid, Path::new(&to), send),
        ControlRequest::Suspend { pid } => suspend(server, pid, send),
        ControlRequest::Adopt { image } => adopt(server, conn, &image, send),
        other => Err(format!("{other:?}: not a state-moving request")),
    }
}

fn find_session(server: &Server, pid: u32) -> Result<Arc<SessionShared>, String> {
    server
        .sessions
        .lock()
        .values()
        .find(|s| s.pid == pid && s.phase() != Phase::Closed)
        .cloned()
        .ok_or_else(|| format!("no session of pid {pid} on this server (see devproxy ps)"))
}

/// Waits until the session thread has entered its paused loop (so a `resume` cannot be lost).
fn wait_paused(sh: &SessionShared) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sh.phase() == Phase::Running && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

// ------------------------------------------------------------------------------------------------ barrier, capture

/// Synchronizes the session's context. Work taken from the ring has then finished; an error it produced stays the
/// session's deferred (and, for a fault, sticky) error, exactly as if the next call had observed it.
pub fn barrier(st: &mut SessionState) {
    if let Err(e) = st.backend.context_synchronize(st.ctx) {
        if e.is_sticky() {
            st.sticky.get_or_insert(e);
        }
        st.deferred.get_or_insert(e);
    }
}

/// A session's state captured at the barrier: the manifest and the pinned-area contents (host memory, copied).
pub struct Captured {
    pub manifest: Manifest,
    pub pinned: Vec<Vec<u8>>,
}

/// Who a session is, for its image.
#[derive(Clone)]
pub struct Identity {
    pub id: u64,
    pub token: u64,
    pub pid: u32,
    pub command: String,
    pub socket: String,
}

/// Barrier + capture. Runs on the session thread (or with the session otherwise quiescent).
pub fn capture(
    st: &mut SessionState,
    seg: &Segment,
    who: Identity,
    device: DeviceImage,
) -> Result<Captured, CheckpointError> {
    barrier(st);
    let state = st.save(())?;
    let mut regions = Vec::new();
    for &(addr, bytes) in &state.allocations {
        regions.push(Region {
            session: 0,
            kind: RegionKind::Allocation,
            addr,
            bytes,
        });
    }
    for g in &state.module_globals {
        regions.push(Region {
            session: 0,
            kind: RegionKind::ModuleGlobal,
            addr: g.ptr,
            bytes: g.bytes,
        });
    }
    let mut pinned = Vec::new();
    for &(off, bytes) in &state.pinned {
        if off
            .checked_add(bytes)
            .is_none_or(|e| e > seg.pinned_bytes())
        {
            return Err(CheckpointError::Session(format!(
                "pinned region {off:#x} (+{bytes}) lies outside the segment's pinned area"
            )));
        }
        let mut v = vec![0u8; bytes as usize];
        // SAFETY: the range was checked against the pinned area of the mapped segment; the client is stopped at the
        // barrier, and any write it still makes is a data race the program has with the device, as on a GPU.
        unsafe {
            std::ptr::copy_nonoverlapping(
                seg.pinned_ptr().add(off as usize),
                v.as_mut_ptr(),
                v.len(),
            )
        };
        pinned.push(v);
        regions.push(Region {
            session: 0,
            kind: RegionKind::Pinned,
            addr: off,
            bytes,
        });
    }
    let session = SessionImage {
        id: who.id,
        token: who.token,
        pid: who.pid,
        command: who.command,
        socket: who.socket,
        last_executed: seg.last_executed(),
        state,
    };
    Ok(Captured {
        manifest: Manifest {
            writer: format!("devproxy {}", env!("CARGO_PKG_VERSION")),
            device,
            sessions: vec![session],
            regions,
        },
        pinned,
    })
}

/// Reads the bytes of the captured regions: device memory through the backend's bulk path, pinned memory from the copy.
fn filler<'a>(
    backend: &'a Arc<dyn Backend>,
    cap: &'a Captured,
) -> impl FnMut(usize, &Region, u64, &mut [u8]) -> Result<(), CheckpointError> + 'a {
    let mut pinned_index = Vec::with_capacity(cap.manifest.regions.len());
    let mut k = 0;
    for r in &cap.manifest.regions {
        pinned_index.push(k);
        if r.kind == RegionKind::Pinned {
            k += 1;
        }
    }
    move |i, r, off, dst| match r.kind {
        RegionKind::Pinned => {
            let src = &cap.pinned[pinned_index[i]];
            dst.copy_from_slice(&src[off as usize..off as usize + dst.len()]);
            Ok(())
        }
        _ => backend.read_device(r.addr + off, dst).map_err(|e| {
            CheckpointError::Backend(format!("reading {:#x} (+{}): {e}", r.addr + off, dst.len()))
        }),
    }
}

/// Writes a capture to `DIR/image.devproxy` (see [`image::write_image`]).
pub fn write_captured(
    backend: &Arc<dyn Backend>,
    cap: &Captured,
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<image::Written, CheckpointError> {
    let mut fill = filler(backend, cap);
    image::write_image(
        dir,
        &cap.manifest,
        &mut fill,
        progress,
        Some(backend.as_ref()),
    )
}

/// Host memory available for staging a blob (MemAvailable), 0 if unknown.
pub(super) fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Writes a capture to `DIR`. With `continue_early`, and where the blob fits in half the available host memory, the
/// device memory is first copied to host memory (the fast part), `resume` is called so the process continues, and
/// the file is written from the copy: the process's pause is the device-to-host copy, not the disk write. Otherwise
/// the blob goes straight from the device to the file (and `resume` is not called).
///
/// With `prepared` (an image file made ready before the barrier, see [`direct`](super::direct)), the blob goes
/// from the device straight into the file's pages and `resume` (if `continue_early`) is called once it is there.
pub fn checkpoint_to_dir(
    backend: &Arc<dyn Backend>,
    cap: &Captured,
    dir: &Path,
    continue_early: bool,
    prepared: Option<super::direct::Prepared>,
    resume: &mut dyn FnMut(),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<image::Written, CheckpointError> {
    if let Some(p) = prepared {
        let mut fill = filler(backend, cap);
        let mut resume_early = || {
            if continue_early {
                resume()
            }
        };
        match p.write(&cap.manifest, &mut fill, &mut resume_early, progress) {
            Ok(r) => return r,
            Err(unused) => {
                tracing::info!("the image outgrew its preparation; writing it the ordinary way");
                drop(unused);
            }
        }
    }
    let len = cap.manifest.blob_len();
    if !continue_early || len > mem_available() / 2 {
        return write_captured(backend, cap, dir, progress);
    }
    let (blob, _) = blob_to_memory(backend, cap)?;
    resume();
    let mut starts = Vec::with_capacity(cap.manifest.regions.len());
    let mut at = 0u64;
    for r in &cap.manifest.regions {
        starts.push(at);
        at += r.bytes;
    }
    let mut fill = |i: usize, _: &Region, off: u64, dst: &mut [u8]| {
        let s = (starts[i] + off) as usize;
        dst.copy_from_slice(&blob[s..s + dst.len()]);
        Ok(())
    };
    image::write_image(dir, &cap.manifest, &mut fill, progress, None)
}

/// Copies a capture's blob into host memory; returns it with its CRC.
pub fn blob_to_memory(
    backend: &Arc<dyn Backend>,
    cap: &Captured,
) -> Result<(Vec<u8>, u32), CheckpointError> {
    let mut blob = image::MemSink::new(cap.manifest.blob_len());
    let mut fill = filler(backend, cap);
    let crc = produce_blob(
        &cap.manifest.regions,
        &mut fill,
        &mut blob,
        &mut |_, _| {},
        Some(backend.as_ref()),
    )?;
    Ok((blob.into_inner(), crc))
}

/// Sessions with a state-moving operation in progress: a second one waits for none, it is refused.
fn busy() -> &'static Mutex<std::collections::HashSet<(usize, u64)>> {
    static B: OnceLock<Mutex<std::collections::HashSet<(usize, u64)>>> = OnceLock::new();
    B.get_or_init(Default::default)
}

/// Marks a session busy for the life of the guard.
struct Busy((usize, u64));

impl Busy {
    fn take(server: &Arc<Server>, sh: &SessionShared) -> Result<Busy, String> {
        let k = key(server, sh.id);
        if !busy().lock().insert(k) {
            return Err(format!(
                "another checkpoint, migration, suspend or resume of pid {} is in progress; try again when it ends",
                sh.pid
            ));
        }
        Ok(Busy(k))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        busy().lock().remove(&self.0);
    }
}

fn suspended() -> &'static Mutex<HashMap<(usize, u64), Suspended>> {
    static S: OnceLock<Mutex<HashMap<(usize, u64), Suspended>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(HashMap::new()))
}

fn key(server: &Server, id: u64) -> (usize, u64) {
    (server as *const Server as usize, id)
}

/// Bytes of device state a suspended session holds in host memory (`None`: not suspended), for `devproxy ps`.
pub fn suspended_bytes(server: &Server, id: u64) -> Option<u64> {
    suspended()
        .lock()
        .get(&key(server, id))
        .map(|s| s.manifest.blob_len())
}

/// A session that ended while suspended (its process exited or was killed): its page-locked memory goes (the pages are
/// let go of on a thread of their own).
pub fn forget_suspended(server: &Server, id: u64) {
    let Some(s) = suspended().lock().remove(&key(server, id)) else {
        return;
    };
    tracing::info!(
        "session {id} ended while suspended: its device state in host memory ({}) is released",
        human_bytes(s.manifest.blob_len())
    );
    if let SuspendedBlob::Locked(fd) = s.blob {
        fd.let_go();
    }
}

/// A suspended session's device state, held in host memory.
struct Suspended {
    manifest: Manifest,
    blob: SuspendedBlob,
    crc: u32,
}

/// Where a suspended session's memory waits: page-locked private memory filled by DMA (`direct::BlobFd::private`), kept
/// page-locked so that the resume's device reads it in place (no copy, no locking again), or a plain buffer where
/// that is not possible.
enum SuspendedBlob {
    Locked(BlobFd),
    Mem(Vec<u8>),
}

/// Barrier + capture on the session thread; the session stays paused. Returns the capture and the barrier time.
fn barrier_and_capture(
    server: &Arc<Server>,
    sh: &Arc<SessionShared>,
) -> Result<(Captured, Instant), String> {
    if suspended().lock().contains_key(&key(server, sh.id)) {
        return Err(format!(
            "pid {} is suspended (its device state is in host memory): resume it first",
            sh.pid
        ));
    }
    let device = DeviceImage::of(server.backend.info());
    let who = identity(server, sh);
    let r = sh.run_job(move |st, seg| {
        let at = Instant::now();
        let r = capture(st, seg, who, device).map(|c| (c, at));
        let outcome = if r.is_ok() {
            JobOutcome::Pause
        } else {
            JobOutcome::Continue
        };
        (r, outcome)
    })?;
    r.map_err(|e| format!("barrier: {e}"))
}

fn identity(server: &Server, sh: &SessionShared) -> Identity {
    Identity {
        id: sh.id,
        token: sh.token,
        pid: sh.pid,
        command: sh.command.clone(),
        socket: server.opts.socket.display().to_string(),
    }
}

fn progress_to<'a>(send: Reply<'a>) -> impl FnMut(u64, u64) + 'a {
    move |done, total| {
        let _ = send(&ControlReply::Progress { done, total });
    }
}

// ------------------------------------------------------------------------------------------------ checkpoint

fn checkpoint(
    server: &Arc<Server>,
    pid: u32,
    out: &Path,
    stop: bool,
    send: Reply<'_>,
) -> Result<(), String> {
    let sh = find_session(server, pid)?;
    let _busy = Busy::take(server, &sh)?;
    let was_paused = sh.phase() == Phase::Paused;
    let t0 = Instant::now();
    super::phases::start();
    // The image file's pages are made ready while the process still runs (see `checkpoint::direct`).
    let planned = super::direct::planned_len(
        sh.device_bytes.load(Ordering::Relaxed),
        sh.host_bytes.load(Ordering::Relaxed),
    );
    let prepared = match super::direct::Prepared::new(out, planned, &server.backend) {
        Ok(p) => p,
        Err(e) => {
            return Err(format!(
                "checkpoint of pid {pid} failed (the process continues): {e}"
            ))
        }
    };
    super::phases::mark("prepare");
    let prepared_note = prepared
        .as_ref()
        .map(|p| {
            format!(
                ", image file prepared in {:.3} s before the barrier",
                p.seconds
            )
        })
        .unwrap_or_default();
    let (cap, barrier_at) = barrier_and_capture(server, &sh)?;
    super::phases::mark("barrier");
    let continue_early = !stop && !was_paused;
    let mut paused = None;
    let r = checkpoint_to_dir(
        &server.backend,
        &cap,
        out,
        continue_early,
        prepared,
        &mut || {
            wait_paused(&sh);
            sh.resume();
            paused = Some(barrier_at.elapsed().as_secs_f64());
        },
        &mut progress_to(send),
    );
    super::phases::mark("write");
    let keep_paused = was_paused || (stop && r.is_ok());
    if !keep_paused && paused.is_none() {
        wait_paused(&sh);
        sh.resume();
    }
    let paused = paused.unwrap_or_else(|| barrier_at.elapsed().as_secs_f64());
    let w =
        r.map_err(|e| format!("checkpoint of pid {pid} failed (the process continues): {e}"))?;
    tracing::info!("session {}: image written to {}", sh.id, w.path.display());
    send(&ControlReply::Done(Summary {
        what: format!(
            "checkpoint of pid {pid}{}{prepared_note}",
            if keep_paused {
                " (the process stays paused at the barrier)"
            } else {
                ""
            }
        ),
        bytes: w.blob_bytes,
        seconds: t0.elapsed().as_secs_f64(),
        paused_seconds: paused,
        phases: super::phases::take(),
        path: w.path.display().to_string(),
    }))
}

// ------------------------------------------------------------------------------------------------ restore

/// Where the blob CRC to check comes from.
pub enum ExpectedCrc {
    /// From the header.
    Known(u32),
    /// From 4 bytes after the blob in the stream (migration).
    Trailer,
}

/// A session rebuilt on a backend, before it is handed to a server.
pub struct Rebuilt {
    pub state: SessionState,
    pub pinned_data: Vec<(u64, Vec<u8>)>,
    pub bytes: u64,
}

/// Rebuilds session 0 of `manifest` on `backend`, reading its blob from `source`. Checks the device first; `ready`
/// runs once the objects and allocations exist, before the blob is read. Any failure releases everything made.
pub fn restore_state(
    backend: &Arc<dyn Backend>,
    manifest: &Manifest,
    source: &mut dyn BlobSource,
    expected: ExpectedCrc,
    what: &str,
    ready: &mut dyn FnMut() -> Result<(), CheckpointError>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Rebuilt, CheckpointError> {
    if manifest.sessions.len() != 1 {
        return Err(CheckpointError::invalid(
            what,
            format!(
                "{} sessions in one image; this devproxy restores one",
                manifest.sessions.len()
            ),
        ));
    }
    manifest.device.check_compatible(backend.info())?;
    let img = &manifest.sessions[0];
    let mut st = SessionState::restore(backend, &img.state)?;
    let r = (|| {
        let globals = manifest::place_globals(&mut st, &img.state)?;
        let mut targets = Vec::with_capacity(manifest.regions.len());
        let mut pinned_data: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut gi = 0;
        for r in &manifest.regions {
            match r.kind {
                RegionKind::Allocation => targets.push(r.addr),
                RegionKind::ModuleGlobal => {
                    targets.push(globals[gi]);
                    gi += 1;
                }
                RegionKind::Pinned => {
                    targets.push(pinned_data.len() as u64);
                    pinned_data.push((r.addr, vec![0u8; r.bytes as usize]));
                }
            }
        }
        // With `DEVPROXY_DEVICE_CRC=1`, where the device reads the blob in place, it also checksums what it got.
        let devcrc = super::devcrc::if_enabled(backend, "blob");
        super::phases::mark("objects");
        ready()?;
        // Several reader threads apply chunks at once (see `image::consume_blob`).
        let pinned_data = parking_lot::Mutex::new(pinned_data);
        let crc = consume_blob_checked(
            &manifest.regions,
            source,
            &|i, r, off, src| match r.kind {
                RegionKind::Pinned => {
                    let mut pd = pinned_data.lock();
                    let dst = &mut pd[targets[i] as usize].1;
                    dst[off as usize..off as usize + src.len()].copy_from_slice(src);
                    Ok(())
                }
                // Started only, on a restore worker that overlaps its reads with its device writes.
                _ => super::image::device_write(backend.as_ref(), targets[i] + off, src).map_err(
                    |e| {
                        CheckpointError::Backend(format!(
                            "writing {:#x} (+{}): {e}",
                            targets[i] + off,
                            src.len()
                        ))
                    },
                ),
            },
            progress,
            Some(backend),
            devcrc.is_none(),
        )?;
        let pinned_data = pinned_data.into_inner();
        let crc = match (crc, &devcrc) {
            (Some(c), _) => c,
            (None, Some(dc)) => {
                let c = dc.blob_crc(
                    &manifest.regions,
                    |i| (manifest.regions[i].kind != RegionKind::Pinned).then(|| targets[i]),
                    |i| &pinned_data[targets[i] as usize].1[..],
                )?;
                super::phases::mark("crc on the device");
                c
            }
            (None, None) => unreachable!("the host checksums unless the device does"),
        };
        let stored = match expected {
            ExpectedCrc::Known(c) => c,
            ExpectedCrc::Trailer => {
                let mut t = [0u8; 4];
                source.read_exact(&mut t).map_err(|e| {
                    CheckpointError::Pipeline(format!("{what}: reading the blob CRC: {e}"))
                })?;
                u32::from_le_bytes(t)
            }
        };
        if stored != crc {
            return Err(CheckpointError::Crc {
                path: what.into(),
                part: "blob",
                stored,
                computed: crc,
            });
        }
        Ok((pinned_data, manifest.blob_len()))
    })();
    match r {
        Ok((pinned_data, bytes)) => Ok(Rebuilt {
            state: st,
            pinned_data,
            bytes,
        }),
        Err(e) => {
            st.teardown();
            Err(e)
        }
    }
}

/// Registers a rebuilt session with `server` as waiting for its process.
pub fn add_pending(
    server: &Server,
    img: &SessionImage,
    rebuilt: Rebuilt,
) -> Result<(), CheckpointError> {
    let mut pending = server.pending.lock();
    if server.sessions.lock().contains_key(&img.id) || pending.contains_key(&img.id) {
        let mut st = rebuilt.state;
        st.teardown();
        return Err(CheckpointError::Session(format!(
            "session id {} is already in use on this server; restore it on another server",
            img.id
        )));
    }
    server.reserve_session_ids(img.id);
    pending.insert(
        img.id,
        PendingSession {
            token: img.token,
            pid: img.pid,
            command: img.command.clone(),
            state: rebuilt.state,
            last_executed: img.last_executed,
            pinned_data: rebuilt.pinned_data,
        },
    );
    Ok(())
}

/// A progress line on stderr when it is a terminal (as the CLI shows for checkpoint and migrate).
fn terminal_progress() -> impl FnMut(u64, u64) {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    move |done, total| {
        if tty && total > 0 {
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e9;
            eprint!(
                "\r  {:5.1}%  {} of {}  {rate:.2} GB/s   ",
                done as f64 * 100.0 / total as f64,
                human_bytes(done),
                human_bytes(total)
            );
        }
    }
}

/// `devproxy restore DIR`: checks the image, rebuilds its session on a new server and serves it in the foreground.
/// Nothing is listened on before the session is fully rebuilt, so a refused image leaves the process waiting. With
/// `trial` (a restore drill), the rebuilt session is released again after the summary and nothing is served.
pub fn restore_cmd(
    dir: &Path,
    socket: Option<PathBuf>,
    kind: Option<crate::backend::BackendKind>,
    device: u32,
    trial: bool,
) -> Result<(), String> {
    super::phases::start();
    let img = LoadedImage::open(dir).map_err(|e| e.to_string())?;
    // While the driver starts (a few hundred ms on a GPU host), the memory the copy will use is faulted in: the
    // image's own pages for a direct restore from tmpfs, otherwise the copy buffers.
    let warm = {
        let n = image::restore_buffers(img.manifest.blob_len());
        let preload = img.preload_source().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let (file, base, len) = preload;
            if !super::direct::preload_restore(&file, base, len) {
                image::warm_buffers(n)
            }
        })
    };
    let backend = crate::cli::make_backend(kind, device, None);
    super::phases::mark("driver start");
    // The timed restore starts here: what is left of the warm-up counts in it.
    let t0 = Instant::now();
    let driver_secs = super::phases::take();
    super::phases::start();
    let _ = warm.join();
    super::phases::mark("(rest of the warm-up)");
    let backend = backend?;
    img.manifest
        .device
        .check_compatible(backend.info())
        .map_err(|e| format!("{}: {e}", img.path.display()))?;
    let s = &img.manifest.sessions[0];
    let socket = socket.unwrap_or_else(|| PathBuf::from(&s.socket));
    let mut reader = img.blob_reader().map_err(|e| e.to_string())?;
    let what = img.path.display().to_string();
    let rebuilt = restore_state(
        &backend,
        &img.manifest,
        &mut reader,
        ExpectedCrc::Known(img.header.blob_crc),
        &what,
        &mut || Ok(()),
        &mut terminal_progress(),
    )
    .map_err(|e| format!("restore refused, nothing was restored: {e}"))?;
    let mut rebuilt = rebuilt;
    // An NCCL rank's communicators (nccl.state next to the image) are re-created with the job's other restored ranks;
    // not in a drill, which would take part in the job's rendezvous.
    if !trial {
        if let Err(e) = crate::nccl::restore::attach_saved(&img.path, &mut rebuilt.state, None) {
            rebuilt.state.teardown();
            return Err(format!("restore refused, nothing was restored: {e}"));
        }
    }
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!("\r{:60}\r", "");
    }
    let bytes = rebuilt.bytes;
    let secs = t0.elapsed().as_secs_f64();
    super::phases::mark("finish");
    // The driver's start-up comes before the timed restore; it is shown, not counted.
    let mut phases = driver_secs;
    phases.extend(super::phases::take());
    let summary = Summary {
        what: format!(
            "{}restore of session {} (pid {})",
            if trial { "trial " } else { "" },
            s.id,
            s.pid
        ),
        bytes,
        seconds: secs,
        paused_seconds: 0.0,
        phases,
        path: what,
    };
    if trial {
        rebuilt.state.teardown();
        println!("{summary}");
        println!(
            "trial passed: the image restores on this device (every CRC checked); released again, pid {} untouched",
            s.pid
        );
        return Ok(());
    }
    let srv = Server::new(
        backend,
        ServerOptions {
            socket: socket.clone(),
            layout: SegmentLayout::from_env(),
        },
    );
    add_pending(&srv, s, rebuilt).map_err(|e| e.to_string())?;
    println!("{summary}");
    println!(
        "waiting for pid {} to re-attach at {}",
        s.pid,
        socket.display()
    );
    tracing::info!("listening on {}", socket.display());
    srv.serve()
}

// ------------------------------------------------------------------------------------------------ migration

/// Sends blob chunks as control frames.
struct FrameSink<'a>(&'a UnixStream);

impl BlobSink for FrameSink<'_> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        socket::send_msg(self.0, bytes, &[])
    }
}

/// Reads a byte stream carried in control frames. With `blob_fd` (the header's [`FLAG_BLOB_IN_FD`]) the blob is not
/// in frames: one message brings the memory file that holds it, and the trailing CRC as its bytes.
struct FrameReader<'a> {
    conn: &'a UnixStream,
    buf: Vec<u8>,
    pos: usize,
    blob_fd: bool,
    file: Option<std::fs::File>,
    /// The source's memory file, page-locked here before the barrier (`adopt_prelocked`).
    prelocked: Option<BlobFd>,
}

impl FrameReader<'_> {
    /// For a blob in a memory file: takes the frame that brings the blob CRC and the file's descriptor (once).
    fn take_fd_frame(&mut self) -> Option<()> {
        if self.file.is_some() {
            return Some(());
        }
        if !self.blob_fd || self.pos != self.buf.len() {
            return None;
        }
        let (crc, fds) = socket::recv_msg(self.conn, MAX_FRAME).ok()?;
        let fd = fds.into_iter().next()?;
        // The CRC is what a reader takes next, after the blob.
        self.buf = crc;
        self.pos = 0;
        self.file = Some(std::fs::File::from(fd));
        Some(())
    }
}

impl Read for FrameReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            let (b, _) = socket::recv_msg(self.conn, MAX_FRAME)?;
            self.buf = b;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Read in order, by one reader; or, for a blob in a memory file, at offsets in that file.
impl BlobSource for FrameReader<'_> {
    fn positional(&mut self, len: u64) -> Option<image::PositionalSource<'_>> {
        self.take_fd_frame()?;
        BlobSource::positional(self.file.as_mut()?, len)
    }

    /// The prelocked memory file, drained while the source still fills it: the source sends the blob position it
    /// has reached (8-byte frames) as it goes, and the blob CRC frame after the last one (read as the trailer).
    fn locked(&mut self) -> Option<image::Locked<'_>> {
        if !self.blob_fd || self.pos != self.buf.len() {
            return None;
        }
        let conn = self.conn;
        let fd = self.prelocked.as_ref()?;
        let mut have = 0u64;
        Some(image::Locked {
            fd,
            filled: Box::new(move |need| {
                while have < need {
                    let (b, _) = socket::recv_msg(conn, MAX_FRAME)?;
                    have = <[u8; 8]>::try_from(&b[..])
                        .map(u64::from_le_bytes)
                        .map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!(
                                    "the source ended the blob at {have} bytes ({}-byte frame)",
                                    b.len()
                                ),
                            )
                        })?;
                }
                Ok(())
            }),
        })
    }
}

fn recv_reply(conn: &UnixStream) -> Result<ControlReply, String> {
    loop {
        let (b, _) = socket::recv_msg(conn, MAX_FRAME)
            .map_err(|e| format!("the target closed the connection: {e}"))?;
        match protocol::decode::<ControlReply>(&b).map_err(|e| e.to_string())? {
            ControlReply::Progress { .. } => continue,
            other => return Ok(other),
        }
    }
}

/// Streams a capture to the target's control connection: `Adopt { header }`, the manifest in frames, (target: ready),
/// the blob in frames, its CRC. Returns the target's summary.
///
/// With `blob_fd` (a memory file prepared before the barrier) the blob goes into that file by DMA and the file's
/// descriptor is sent instead of the bytes (both servers are on this machine: the control socket is a Unix socket).
/// With `prelocked` (the target page-locked the file before the barrier) the target drains the file while it fills:
/// each position reached goes to it as an 8-byte frame, before the CRC frame.
fn stream_to(
    conn: &UnixStream,
    backend: &Arc<dyn Backend>,
    cap: &Captured,
    blob_fd: Option<BlobFd>,
    prelocked: bool,
    send: Reply<'_>,
) -> Result<Summary, String> {
    let m = cap.manifest.encode();
    let mut header = Header::new(
        m.len() as u64,
        crc32fast::hash(&m),
        cap.manifest.blob_len(),
        0,
    );
    header.flags |= FLAG_TRAILING_BLOB_CRC;
    let mut blob_fd = blob_fd.filter(|f| f.fits(cap.manifest.blob_len()));
    if blob_fd.is_some() {
        header.flags |= FLAG_BLOB_IN_FD;
    }
    // If the target stopped reading, it has usually said why.
    let io = |e: std::io::Error| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        match recv_reply(conn) {
            Ok(ControlReply::Err(why)) => format!("the target refused the session: {why}"),
            _ if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
            {
                format!(
                    "the target server closed the connection ({e}): did it exit? Its log says why"
                )
            }
            _ => format!("sending to the target: {e}"),
        }
    };
    socket::send_msg(
        conn,
        &protocol::encode(&ControlRequest::Adopt {
            image: header.encode(),
        }),
        &[],
    )
    .map_err(io)?;
    for c in m.chunks(CHUNK) {
        socket::send_msg(conn, c, &[]).map_err(io)?;
    }
    match recv_reply(conn)? {
        ControlReply::Ok(_) => {}
        ControlReply::Err(e) => return Err(format!("the target refused the session: {e}")),
        other => return Err(format!("unexpected answer from the target: {other:?}")),
    }
    let mut fill = filler(backend, cap);
    if let Some(fd) = blob_fd.as_mut() {
        // A target that page-locked the file drains it as it fills: it is told how far the blob is in.
        let mut progress = progress_to(send);
        let mut told = Ok(());
        let mut report = |done: u64, total: u64| {
            progress(done, total);
            if prelocked && told.is_ok() {
                told = socket::send_msg(conn, &done.to_le_bytes(), &[]);
            }
        };
        let crc = fd
            .fill(&cap.manifest.regions, &mut fill, &mut report)
            .map_err(|e| e.to_string())?;
        told.map_err(io)?;
        use std::os::fd::AsFd;
        let file = fd
            .file()
            .ok_or("a migration's blob is in private memory, not a memory file")?;
        socket::send_msg(conn, &crc.to_le_bytes(), &[file.as_fd()]).map_err(io)?;
        let answer = recv_reply(conn);
        // The target has read the blob (or given up): now the pages may be unlocked.
        if let Some(fd) = blob_fd.take() {
            fd.let_go();
        }
        return match answer? {
            ControlReply::Done(s) => Ok(s),
            ControlReply::Err(e) => Err(format!("the target failed: {e}")),
            other => Err(format!("unexpected answer from the target: {other:?}")),
        };
    }
    let mut sink = FrameSink(conn);
    let sent = produce_blob(
        &cap.manifest.regions,
        &mut fill,
        &mut sink,
        &mut progress_to(send),
        Some(backend.as_ref()),
    );
    let crc = match sent {
        Ok(c) => c,
        Err(e) => {
            // The target may have said why it stopped reading.
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            if let Ok(ControlReply::Err(why)) = recv_reply(conn) {
                return Err(format!("the target failed: {why}"));
            }
            return Err(e.to_string());
        }
    };
    socket::send_msg(conn, &crc.to_le_bytes(), &[]).map_err(io)?;
    match recv_reply(conn)? {
        ControlReply::Done(s) => Ok(s),
        ControlReply::Err(e) => Err(format!("the target failed: {e}")),
        other => Err(format!("unexpected answer from the target: {other:?}")),
    }
}

fn migrate(server: &Arc<Server>, pid: u32, to: &Path, send: Reply<'_>) -> Result<(), String> {
    let sh = find_session(server, pid)?;
    let _busy = Busy::take(server, &sh)?;
    if to == server.opts.socket {
        return Err(format!("pid {pid} already lives at {}", to.display()));
    }
    let ctl_path = crate::server::control_path(to);
    let connect = || {
        UnixStream::connect(&ctl_path).map_err(|e| {
            format!(
                "cannot reach the target server's control socket {}: {e}",
                ctl_path.display()
            )
        })
    };
    let mut conn = connect()?;
    let was_paused = sh.phase() == Phase::Paused;
    if let Some(why) = crate::nccl::restore::migration_refusal(&sh, was_paused)? {
        return Err(format!(
            "migration of pid {pid} refused (it stays here): {why}"
        ));
    }
    let t0 = Instant::now();
    super::phases::start();
    // The memory file that carries the blob is made ready while the process still runs (see `direct::BlobFd`).
    let blob_fd = BlobFd::new(
        direct::planned_len(
            sh.device_bytes.load(Ordering::Relaxed),
            sh.host_bytes.load(Ordering::Relaxed),
        ),
        &server.backend,
    );
    super::phases::mark("prepare");
    // The target page-locks the memory file too, while the process still runs here, so that after the barrier its
    // device reads the blob in place. A target that cannot (or an older devproxy) has closed the connection: the
    // migration goes on over a new one and the target reads the file through buffers.
    let mut prelocked = false;
    if let Some(fd) = blob_fd.as_ref() {
        match prelock(&conn, fd) {
            Ok(()) => prelocked = true,
            Err(e) => {
                tracing::info!("migration: the target did not page-lock the memory file ({e})");
                conn = connect()?;
            }
        }
        super::phases::mark("target page-locks");
    }
    let (mut cap, barrier_at) = barrier_and_capture(server, &sh)?;
    super::phases::mark("barrier");
    // (stream_to uses the memory file when the blob fits it)
    let how = match blob_fd.as_ref() {
        Some(f) if f.fits(cap.manifest.blob_len()) && prelocked => {
            "blob handed over in a memory file, page-locked by the target in advance"
        }
        Some(f) if f.fits(cap.manifest.blob_len()) => "blob handed over in a memory file",
        _ => "blob streamed",
    };
    let to_s = to.display().to_string();
    // From now on the process polls the target's socket.
    cap.manifest.sessions[0].socket = to_s.clone();
    // An NCCL rank's communicators follow: the target rejoins their cliques before this server lets go.
    let moved = stream_to(&conn, &server.backend, &cap, blob_fd, prelocked, send)
        .and_then(|s| crate::nccl::restore::hand_over(&sh, to).map(|()| s));
    super::phases::mark("send");
    match moved {
        Ok(adopted) => {
            let sh2 = sh.clone();
            let note = to_s.clone();
            sh.run_job(move |_st, _seg| {
                if let Err(e) = sh2.notify(&Notice::Moved { socket: note }) {
                    tracing::warn!(
                        "session {}: could not tell the process it moved: {e}",
                        sh2.id
                    );
                }
                ((), JobOutcome::Detach)
            })?;
            let seconds = t0.elapsed().as_secs_f64();
            // The pause ends when the process runs on the target.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && waiting_on(to, sh.id) {
                std::thread::sleep(Duration::from_millis(2));
            }
            super::phases::mark("target takes over");
            // Then where the target's part of "send" went.
            let mut phases = super::phases::take();
            phases.extend(
                adopted
                    .phases
                    .into_iter()
                    .map(|(n, t)| (format!("target: {n}"), t)),
            );
            send(&ControlReply::Done(Summary {
                what: format!("migration of pid {pid} to {to_s} ({how})"),
                bytes: cap.manifest.blob_len(),
                seconds,
                paused_seconds: barrier_at.elapsed().as_secs_f64(),
                phases,
                path: to_s,
            }))
        }
        Err(e) => {
            if !was_paused {
                wait_paused(&sh);
                sh.resume();
            }
            Err(format!(
                "migration of pid {pid} failed (it continues here): {e}"
            ))
        }
    }
}

/// Asks the target to page-lock the memory file `fd` (its descriptor goes with the request); `Ok` once it has.
fn prelock(conn: &UnixStream, fd: &BlobFd) -> Result<(), String> {
    use std::os::fd::AsFd;
    let file = fd.file().ok_or("the blob is in private memory")?;
    socket::send_msg(
        conn,
        &protocol::encode(&ControlRequest::AdoptPrelock { len: fd.capacity() }),
        &[file.as_fd()],
    )
    .map_err(|e| e.to_string())?;
    match recv_reply(conn)? {
        ControlReply::Ok(_) => Ok(()),
        ControlReply::Err(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Whether session `id` still waits for its process at the server `to`.
fn waiting_on(to: &Path, id: u64) -> bool {
    match crate::control::request(to, &ControlRequest::Ps, &mut |_, _| {}) {
        Ok(ControlReply::Ps { sessions, .. }) => sessions
            .iter()
            .any(|r| r.session == id && r.state.starts_with("restored")),
        _ => false,
    }
}

/// Target side of a same-host migration's first step: the source's memory file is page-locked here while the
/// process still runs on the source; the `Adopt` that follows on this connection restores from it in place.
pub fn adopt_prelocked(
    server: &Arc<Server>,
    conn: &UnixStream,
    len: u64,
    fds: Vec<std::os::fd::OwnedFd>,
    send: Reply<'_>,
) -> Result<(), String> {
    let fd = fds
        .into_iter()
        .next()
        .ok_or("a page-locking request without a memory file")?;
    let t0 = Instant::now();
    let locked = BlobFd::adopt(std::fs::File::from(fd), len, &server.backend)
        .ok_or("the memory file could not be page-locked here")?;
    let secs = t0.elapsed().as_secs_f64();
    send(&ControlReply::Ok(format!("page-locked in {secs:.3} s")))?;
    // Tests only: a target that dies between page-locking and the session (the source must carry on).
    if std::env::var("DEVPROXY_TEST_EXIT_AFTER_PRELOCK").is_ok_and(|v| v == "1") {
        std::process::exit(9);
    }
    let (b, _) = socket::recv_msg(conn, MAX_FRAME)
        .map_err(|e| format!("the source left after page-locking: {e}"))?;
    match protocol::decode::<ControlRequest>(&b).map_err(|e| e.to_string())? {
        ControlRequest::Adopt { image } => adopt_with(server, conn, &image, send, Some(locked)),
        other => Err(format!(
            "expected the session after page-locking, got {other:?}"
        )),
    }
}

/// Target side of a migration.
fn adopt(
    server: &Arc<Server>,
    conn: &UnixStream,
    first: &[u8],
    send: Reply<'_>,
) -> Result<(), String> {
    adopt_with(server, conn, first, send, None)
}

/// [`adopt`], with the source's memory file already page-locked here (`adopt_prelocked`).
fn adopt_with(
    server: &Arc<Server>,
    conn: &UnixStream,
    first: &[u8],
    send: Reply<'_>,
    prelocked: Option<BlobFd>,
) -> Result<(), String> {
    let what = "migration stream";
    let t0 = Instant::now();
    super::phases::start();
    let header = Header::decode(first, None, what).map_err(|e| e.to_string())?;
    if header.flags & FLAG_TRAILING_BLOB_CRC == 0 {
        return Err(format!(
            "{what}: the header does not announce a trailing blob CRC"
        ));
    }
    let mut rd = FrameReader {
        conn,
        buf: Vec::new(),
        pos: 0,
        blob_fd: header.flags & FLAG_BLOB_IN_FD != 0,
        file: None,
        prelocked,
    };
    let mut m = vec![0u8; header.manifest_len as usize];
    rd.read_exact(&mut m)
        .map_err(|e| format!("{what}: reading the manifest: {e}"))?;
    let computed = crc32fast::hash(&m);
    if computed != header.manifest_crc {
        return Err(CheckpointError::Crc {
            path: what.into(),
            part: "manifest",
            stored: header.manifest_crc,
            computed,
        }
        .to_string());
    }
    let manifest = Manifest::decode(&m, what).map_err(|e| e.to_string())?;
    manifest
        .validate(header.blob_len, what)
        .map_err(|e| e.to_string())?;
    let s = &manifest.sessions[0];
    if server.sessions.lock().contains_key(&s.id) || server.pending.lock().contains_key(&s.id) {
        return Err(format!(
            "session id {} is already in use on the target server",
            s.id
        ));
    }
    let rebuilt = restore_state(
        &server.backend,
        &manifest,
        &mut rd,
        ExpectedCrc::Trailer,
        what,
        &mut || send(&ControlReply::Ok("ready".into())).map_err(CheckpointError::Pipeline),
        &mut |_, _| {},
    )
    .map_err(|e| e.to_string());
    // The prelocked pages are let go of on a thread of their own (the blob is on the device, or was refused).
    if let Some(fd) = rd.prelocked.take() {
        fd.let_go();
    }
    let rebuilt = rebuilt?;
    let bytes = rebuilt.bytes;
    add_pending(server, s, rebuilt).map_err(|e| e.to_string())?;
    tracing::info!(
        "session {}: adopted (pid {}), waiting for the process",
        s.id,
        s.pid
    );
    send(&ControlReply::Done(Summary {
        what: format!("adopted session {} (pid {})", s.id, s.pid),
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        paused_seconds: 0.0,
        phases: super::phases::take(),
        path: server.opts.socket.display().to_string(),
    }))
}

// ------------------------------------------------------------------------------------------------ suspend, resume

fn suspend(server: &Arc<Server>, pid: u32, send: Reply<'_>) -> Result<(), String> {
    let sh = find_session(server, pid)?;
    let _busy = Busy::take(server, &sh)?;
    if suspended().lock().contains_key(&key(server, sh.id)) {
        return send(&ControlReply::Ok(format!("pid {pid} is already suspended")));
    }
    let device = DeviceImage::of(server.backend.info());
    let who = identity(server, &sh);
    let backend = server.backend.clone();
    let sh2 = sh.clone();
    let t0 = Instant::now();
    // The page-locked memory for the blob is made ready while the process still runs.
    let blob_fd = BlobFd::private(
        direct::planned_len(
            sh.device_bytes.load(Ordering::Relaxed),
            sh.host_bytes.load(Ordering::Relaxed),
        ),
        &server.backend,
    );
    let prepare_secs = t0.elapsed().as_secs_f64();
    let r = sh.run_job(move |st, seg| {
        let barrier_at = Instant::now();
        super::phases::start();
        super::phases::add("prepare", prepare_secs);
        let r = (|| {
            let cap = capture(st, seg, who, device)?;
            super::phases::mark("barrier");
            let (blob, crc) = match blob_fd.filter(|f| f.fits(cap.manifest.blob_len())) {
                Some(mut fd) => {
                    let mut fill = filler(&backend, &cap);
                    let crc = fd.fill(&cap.manifest.regions, &mut fill, &mut |_, _| {})?;
                    (SuspendedBlob::Locked(fd), crc)
                }
                None => {
                    let (blob, crc) = blob_to_memory(&backend, &cap)?;
                    (SuspendedBlob::Mem(blob), crc)
                }
            };
            // Device memory, modules, streams and events go; host registrations too (resume redoes them).
            super::phases::mark("copy");
            st.teardown();
            sh2.device_bytes.store(0, Ordering::Relaxed);
            super::phases::mark("free device memory");
            Ok::<_, CheckpointError>(Suspended {
                manifest: cap.manifest,
                blob,
                crc,
            })
        })();
        let outcome = if r.is_ok() {
            JobOutcome::Pause
        } else {
            JobOutcome::Continue
        };
        (r.map(|s| (s, barrier_at, super::phases::take())), outcome)
    })?;
    let (s, barrier_at, phases) =
        r.map_err(|e| format!("suspend of pid {pid} failed (it continues): {e}"))?;
    let bytes = s.manifest.blob_len();
    let held_in = match s.blob {
        SuspendedBlob::Locked(_) => "page-locked host memory",
        SuspendedBlob::Mem(_) => "a buffer",
    };
    suspended().lock().insert(key(server, sh.id), s);
    let (free, total) = server.backend.mem_info();
    send(&ControlReply::Done(Summary {
        what: format!(
            "suspend of pid {pid}: device memory moved to host memory, {held_in} (device: {} free of {})",
            human_bytes(free),
            human_bytes(total)
        ),
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        paused_seconds: barrier_at.elapsed().as_secs_f64(),
        phases,
        path: String::new(),
    }))
}

/// Page-locks the segment's staging area and the session's pinned allocations for a rebuilt state.
fn register_host(st: &mut SessionState, seg: &Segment) {
    let mut spans = vec![HostSpan {
        ptr: seg.staging_ptr(),
        len: seg.staging_bytes() as usize,
    }];
    for (&off, &bytes) in st.pinned.iter() {
        if off
            .checked_add(bytes)
            .is_some_and(|e| e <= seg.pinned_bytes())
        {
            spans.push(HostSpan {
                ptr: seg.pinned_ptr().wrapping_add(off as usize),
                len: bytes as usize,
            });
        }
    }
    for span in spans {
        match st.backend.host_register(span) {
            Ok(()) => st.registered.push(span),
            Err(e) => tracing::warn!(
                "host memory could not be page-locked again ({e}); copies will be slower"
            ),
        }
    }
}

fn resume(server: &Arc<Server>, pid: u32, send: Reply<'_>) -> Result<(), String> {
    let sh = find_session(server, pid)?;
    let _busy = Busy::take(server, &sh)?;
    let held = suspended().lock().remove(&key(server, sh.id));
    let Some(s) = held else {
        if sh.phase() != Phase::Paused {
            return send(&ControlReply::Ok(format!("pid {pid} is not paused")));
        }
        sh.resume();
        return send(&ControlReply::Ok(format!("pid {pid} continues")));
    };
    let t0 = Instant::now();
    let backend = server.backend.clone();
    let sh2 = sh.clone();
    let r = sh.run_job(move |st, seg| {
        super::phases::start();
        let what = "suspended state";
        let restore_from = |src: &mut dyn BlobSource| {
            restore_state(
                &backend,
                &s.manifest,
                src,
                ExpectedCrc::Known(s.crc),
                what,
                &mut || Ok(()),
                &mut |_, _| {},
            )
        };
        let r = match &s.blob {
            SuspendedBlob::Mem(blob) => restore_from(&mut &blob[..]),
            SuspendedBlob::Locked(fd) => restore_from(&mut direct::LockedSource::new(fd)),
        };
        let r = match r {
            Ok(mut rebuilt) => {
                register_host(&mut rebuilt.state, seg);
                *st = rebuilt.state;
                sh2.device_bytes.store(st.device_bytes(), Ordering::Relaxed);
                super::phases::mark("page-lock staging");
                // The memory file's pages are let go of on a thread of their own, after the resume.
                if let SuspendedBlob::Locked(fd) = s.blob {
                    fd.let_go();
                }
                Ok((rebuilt.bytes, super::phases::take()))
            }
            Err(e) => Err((e, s)),
        };
        (r, JobOutcome::Continue)
    })?;
    match r {
        Ok((bytes, phases)) => {
            wait_paused(&sh);
            sh.resume();
            send(&ControlReply::Done(Summary {
                what: format!("resume of pid {pid}: device memory restored"),
                bytes,
                seconds: t0.elapsed().as_secs_f64(),
                paused_seconds: 0.0,
                phases,
                path: String::new(),
            }))
        }
        Err((e, s)) => {
            suspended().lock().insert(key(server, sh.id), s);
            Err(format!(
                "resume of pid {pid} failed, it stays suspended: {e}"
            ))
        }
    }
}

// ------------------------------------------------------------------------------------------------ inspect

/// `devproxy inspect DIR`.
pub fn inspect_cmd(dir: &Path) -> Result<(), String> {
    let img = LoadedImage::open(dir).map_err(|e| e.to_string())?;
    print!("{}", describe(&img));
    match img.verify_blob() {
        Ok(()) => {
            println!("  blob CRC    {:#010x} OK", img.header.blob_crc);
            Ok(())
        }
        Err(e) => {
            println!("  blob CRC    BAD");
            Err(e.to_string())
        }
    }
}

/// A readable description of an image (everything but the blob check).
pub fn describe(img: &LoadedImage) -> String {
    use std::fmt::Write;
    let h = &img.header;
    let m = &img.manifest;
    let mut o = String::new();
    let _ = writeln!(o, "image {}", img.path.display());
    let _ = writeln!(
        o,
        "  format      {}.{} (written by {}), header {} bytes",
        h.major, h.minor, m.writer, h.header_bytes
    );
    let _ = writeln!(o, "  created     {} ms since the epoch", h.created_unix_ms);
    let _ = writeln!(
        o,
        "  size        {} ({} manifest, {} blob)",
        human_bytes(h.file_len()),
        human_bytes(h.manifest_len),
        human_bytes(h.blob_len)
    );
    let _ = writeln!(o, "  header CRC  OK");
    let _ = writeln!(o, "  manifest CRC {:#010x} OK", h.manifest_crc);
    let d = &m.device;
    let _ = writeln!(
        o,
        "  device      {} '{}' #{}, memory {}, arena at {:#x}",
        d.backend,
        d.name,
        d.ordinal,
        human_bytes(d.arena_bytes),
        d.arena_base
    );
    for s in &m.sessions {
        let st = &s.state;
        let _ = writeln!(
            o,
            "  session {} pid {} ({}), socket {}, at call {}",
            s.id, s.pid, s.command, s.socket, s.last_executed
        );
        let count =
            |f: fn(&manifest::ObjectState) -> bool| st.objects.iter().filter(|(_, o)| f(o)).count();
        let _ = writeln!(
            o,
            "    objects   {} streams, {} events, {} modules, {} functions; next handle {:#x}",
            count(|o| matches!(o, manifest::ObjectState::Stream { .. })),
            count(|o| matches!(o, manifest::ObjectState::Event { .. })),
            count(|o| matches!(o, manifest::ObjectState::Module { .. })),
            count(|o| matches!(o, manifest::ObjectState::Function { .. })),
            st.next_handle
        );
        for (h, obj) in &st.objects {
            if let manifest::ObjectState::Module { image } = obj {
                let funcs: Vec<&str> = st
                    .objects
                    .iter()
                    .filter_map(|(_, o)| match o {
                        manifest::ObjectState::Function { module, name, .. } if module == h => {
                            Some(name.as_str())
                        }
                        _ => None,
                    })
                    .collect();
                let _ = writeln!(
                    o,
                    "    module    {h:#x}: {} image; functions {}",
                    human_bytes(image.len() as u64),
                    funcs.join(", ")
                );
            }
        }
        let total: u64 = st.allocations.iter().map(|a| a.1).sum();
        let _ = writeln!(
            o,
            "    memory    {} allocations, {}",
            st.allocations.len(),
            human_bytes(total)
        );
        for (a, b) in st.allocations.iter().take(8) {
            let _ = writeln!(o, "              {a:#x} +{}", human_bytes(*b));
        }
        if st.allocations.len() > 8 {
            let _ = writeln!(o, "              ... {} more", st.allocations.len() - 8);
        }
        let _ = writeln!(
            o,
            "    globals   {} module variables",
            st.module_globals.len()
        );
        let _ = writeln!(
            o,
            "    pinned    {} regions, {}",
            st.pinned.len(),
            human_bytes(st.pinned.iter().map(|p| p.1).sum())
        );
        let err = |e: Option<u32>| {
            e.map(|c| crate::protocol::CuError(c).name().to_string())
                .unwrap_or_else(|| "none".into())
        };
        let _ = writeln!(
            o,
            "    errors    deferred {}, sticky {}",
            err(st.deferred),
            err(st.sticky)
        );
    }
    o
}
