//! The job-wide barrier: stop every rank of a job right before the same collective, then write each rank's image.
//!
//! Each server counts the collectives each of its ranks has issued ([`RankComm::issued`]). A coordinator
//! (`devproxy checkpoint --job`) reads the counts from every server, picks the target `T` = the furthest rank's
//! count, and arms a [`Hold`] at `T` on every rank. A rank whose next collective would be number `T` stops in the
//! dispatcher *before* issuing it (so its image is taken before that collective, and the restored process replays
//! it from its ring); ranks behind run on until they get there. A rank already past `T` when the hold is armed
//! (it moved between the read and the arm) makes arming fail, and the coordinator retries with a larger `T`.
//!
//! Waiting never deadlocks: every collective before `T` has been issued by every rank once all have arrived, so
//! each rank's streams drain. A rank that never arrives (it died, or it is stuck elsewhere) makes the wait time out;
//! the coordinator then disarms every hold, releasing the ranks that did arrive, and names the ones that did not.
//!
//! While held, the session thread is inside the dispatcher with the session's state at hand: it takes the rank's
//! image there (through `checkpoint::ops::capture`), when the coordinator asks for it.

use super::rank::{jobs, RankComm};
use super::state::RankState;
use super::NcclOp;
use crate::checkpoint::manifest::DeviceImage;
use crate::checkpoint::ops::{capture, write_captured, Identity};
use crate::server::session::SessionState;
use crate::server::Server;
use crate::transport::Segment;
use bincode::{Decode, Encode};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A capture the coordinator asks a held rank for.
pub struct CaptureCmd {
    pub who: Identity,
    pub dir: PathBuf,
}

/// The barrier's hold on one rank.
pub struct Hold {
    /// Stop before issuing collective number `target` (0-based).
    pub target: u64,
    pub arrived: bool,
    pub released: bool,
    pub cmd: Option<CaptureCmd>,
    pub result: Option<Result<u64, String>>,
}

/// Called by the dispatcher before a group: holds the session thread here while this rank is held.
pub fn before_group(st: &mut SessionState, seg: &Segment, ops: &[NcclOp]) {
    let comms: Vec<Arc<RankComm>> = ops
        .iter()
        .filter(|o| !o.kind.is_p2p())
        .filter_map(|o| st.nccl.get(&o.comm).cloned())
        .collect();
    for comm in comms {
        hold_here(st, seg, &comm, ops);
    }
}

fn hold_here(st: &mut SessionState, seg: &Segment, comm: &RankComm, ops: &[NcclOp]) {
    let mut g = comm.hold.lock();
    loop {
        let Some(h) = g.as_mut() else { return };
        if h.released || h.target != comm.issued() {
            if h.released {
                *g = None;
                comm.hold_cv.notify_all();
            }
            return;
        }
        if !h.arrived {
            h.arrived = true;
            tracing::info!(
                "NCCL job {} rank {}: held before collective #{}",
                comm.id.job(),
                comm.rank,
                h.target
            );
            comm.hold_cv.notify_all();
        }
        if let Some(cmd) = h.cmd.take() {
            drop(g);
            let device = DeviceImage::of(st.backend.info());
            // The group being held was taken from the ring but not executed: the restored session runs it first.
            let nccl = RankState::of(st, ops.to_vec());
            let r = capture(st, seg, cmd.who, device)
                .and_then(|cap| write_captured(&st.backend, &cap, &cmd.dir, &mut |_, _| {}))
                .map(|w| w.file_bytes)
                .map_err(|e| e.to_string())
                .and_then(|bytes| nccl.write(&cmd.dir).map(|()| bytes));
            g = comm.hold.lock();
            if let Some(h) = g.as_mut() {
                h.result = Some(r);
            }
            comm.hold_cv.notify_all();
            continue;
        }
        comm.hold_cv.wait_for(&mut g, Duration::from_millis(100));
    }
}

/// One rank as the control socket reports it.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct JobRow {
    pub job: String,
    pub rank: i32,
    pub nranks: i32,
    pub session: u64,
    pub pid: u32,
    pub collectives: u64,
    pub held: bool,
}

/// Job requests on the control socket.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum JobRequest {
    /// The ranks this server holds.
    Status,
    /// Arm holds at `target` on this server's ranks of `job`.
    Hold { job: String, target: u64 },
    /// Wait until this server's ranks of `job` are held, at most `timeout_ms`.
    Wait { job: String, timeout_ms: u64 },
    /// Write each held rank's image under `dir/rank-<R>`.
    Capture { job: String, dir: String },
    /// Disarm the holds: held ranks continue.
    Release { job: String },
    /// Migration target: rebuild the communicators of the adopted session `session` (waiting for its process) from
    /// an encoded [`RankState`]: they rejoin their cliques, replacing the source's connections.
    Attach { session: u64, state: Vec<u8> },
}

/// Answers to [`JobRequest`]s.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum JobReply {
    Rows(Vec<JobRow>),
    /// (rank, bytes written, image dir) per rank.
    Captured(Vec<(i32, u64, String)>),
    Err(String),
}

fn local(job: &str) -> Vec<Arc<RankComm>> {
    jobs()
        .into_iter()
        .filter(|j| j.job == job)
        .map(|j| j.comm)
        .collect()
}

fn session_of(server: &Server, comm: &RankComm) -> Option<Arc<crate::server::SessionShared>> {
    server
        .sessions
        .lock()
        .values()
        .find(|s| Arc::as_ptr(&s.seg) as u64 == comm.session())
        .cloned()
}

fn rows(server: &Server, job: Option<&str>) -> Vec<JobRow> {
    jobs()
        .into_iter()
        .filter(|j| job.is_none_or(|x| x == j.job))
        .map(|j| {
            let sh = session_of(server, &j.comm);
            JobRow {
                job: j.job.clone(),
                rank: j.rank,
                nranks: j.nranks,
                session: sh.as_ref().map_or(0, |s| s.id),
                pid: sh.as_ref().map_or(0, |s| s.pid),
                collectives: j.collectives,
                held: j.comm.hold.lock().as_ref().is_some_and(|h| h.arrived),
            }
        })
        .collect()
}

/// Serves one job request (server side).
pub fn control(server: &Arc<Server>, req: JobRequest) -> JobReply {
    match req {
        JobRequest::Status => JobReply::Rows(rows(server, None)),
        JobRequest::Hold { job, target } => {
            let comms = local(&job);
            for c in &comms {
                let mut g = c.hold.lock();
                if c.issued() > target {
                    drop(g);
                    release(&comms);
                    return JobReply::Err(format!(
                        "rank {} already issued {} collectives, past the target {target}",
                        c.rank,
                        c.issued()
                    ));
                }
                *g = Some(Hold {
                    target,
                    arrived: false,
                    released: false,
                    cmd: None,
                    result: None,
                });
            }
            JobReply::Rows(rows(server, Some(&job)))
        }
        JobRequest::Wait { job, timeout_ms } => {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            for c in local(&job) {
                let mut g = c.hold.lock();
                while g.as_ref().is_some_and(|h| !h.arrived) && Instant::now() < deadline {
                    c.hold_cv.wait_for(&mut g, Duration::from_millis(50));
                }
            }
            JobReply::Rows(rows(server, Some(&job)))
        }
        JobRequest::Capture { job, dir } => {
            let mut out = Vec::new();
            for c in local(&job) {
                let Some(sh) = session_of(server, &c) else {
                    return JobReply::Err(format!("rank {}: its session is gone", c.rank));
                };
                let dir = PathBuf::from(&dir).join(format!("rank-{}", c.rank));
                let who = Identity {
                    id: sh.id,
                    token: sh.token,
                    pid: sh.pid,
                    command: sh.command.clone(),
                    socket: server.opts.socket.display().to_string(),
                };
                let mut g = c.hold.lock();
                match g.as_mut() {
                    Some(h) if h.arrived => {
                        h.result = None;
                        h.cmd = Some(CaptureCmd {
                            who,
                            dir: dir.clone(),
                        });
                    }
                    _ => {
                        return JobReply::Err(format!("rank {} is not held at the barrier", c.rank))
                    }
                }
                c.hold_cv.notify_all();
                let r = loop {
                    if let Some(r) = g.as_mut().and_then(|h| h.result.take()) {
                        break r;
                    }
                    c.hold_cv.wait_for(&mut g, Duration::from_millis(50));
                };
                match r {
                    Ok(bytes) => out.push((c.rank, bytes, dir.display().to_string())),
                    Err(e) => return JobReply::Err(format!("rank {}: {e}", c.rank)),
                }
            }
            JobReply::Captured(out)
        }
        JobRequest::Release { job } => {
            release(&local(&job));
            JobReply::Rows(rows(server, Some(&job)))
        }
        JobRequest::Attach { session, state } => match attach_pending(server, session, &state) {
            Ok(()) => JobReply::Rows(rows(server, None)),
            Err(e) => JobReply::Err(e),
        },
    }
}

fn attach_pending(server: &Server, session: u64, state: &[u8]) -> Result<(), String> {
    let saved = RankState::decode(state, "migration stream")?;
    let mut pending = server.pending.lock();
    let p = pending
        .get_mut(&session)
        .ok_or_else(|| format!("no adopted session {session} waits here for its communicators"))?;
    saved.attach(&mut p.state, super::state::Rejoin::Migration)
}

fn release(comms: &[Arc<RankComm>]) {
    for c in comms {
        if let Some(h) = c.hold.lock().as_mut() {
            h.released = true;
        }
        c.hold_cv.notify_all();
    }
}
