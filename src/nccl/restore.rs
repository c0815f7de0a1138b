//! Restore and migration of NCCL ranks: `devproxy restore JOBDIR` (every rank of a job image), the communicator
//! hand-over of `devproxy migrate`, and finding a rank's process for `devproxy migrate --job ID --rank R`.
//!
//! - **Restore**: each rank's session is rebuilt from `JOBDIR/rank-R/image.devproxy` as any image is, then its
//!   communicators from `JOBDIR/rank-R/nccl.state` ([`RankState::attach`]): every rank of a communicator joins it
//!   anew, under a new unique id that the server restoring its rank 0 makes and leaves in `JOBDIR` for the others
//!   ([`super::rendezvous`]; the same on both backends, so real NCCL jobs restore as emulated ones do in CI), with the
//!   saved collective counts, so sequence numbers continue where the job stopped. The group the barrier held each
//!   rank in is executed first when the process re-attaches. Ranks recorded at one server socket are restored into
//!   one server on that socket (one process); `devproxy restore JOBDIR` starts one such process per socket, names
//!   the attempt for their rendezvous, and waits for them.
//! - **Migration**: after the session image reached the target, the source sends the communicators' state
//!   ([`JobRequest::Attach`](super::barrier::JobRequest::Attach)); the target rejoins the clique, replacing the
//!   source's hub connections, before the source lets go of the session. The hub stays where it is.

use super::barrier::{JobReply, JobRequest};
use super::rendezvous::Rendezvous;
use super::state::{RankState, Rejoin};
use crate::checkpoint::ops::{add_pending, restore_state, ExpectedCrc};
use crate::checkpoint::LoadedImage;
use crate::control::{self, ControlReply, ControlRequest, Summary};
use crate::server::session::SessionState;
use crate::server::{JobOutcome, Server, ServerOptions, SessionShared};
use crate::transport::SegmentLayout;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Whether `dir` is a job image (it has a `job.manifest`).
pub fn is_job_dir(dir: &Path) -> bool {
    dir.join("job.manifest").is_file()
}

/// The ranks a job image names: (rank, image directory). The directories are `DIR/rank-R` (so a moved job
/// directory still restores).
pub fn job_ranks(dir: &Path) -> Result<Vec<(i32, PathBuf)>, String> {
    let p = dir.join("job.manifest");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some("devproxy job image") {
        return Err(format!("{}: not a devproxy job manifest", p.display()));
    }
    let mut nranks = None;
    let mut ranks = Vec::new();
    for l in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["ranks", n] => nranks = n.parse::<usize>().ok(),
            ["rank", r, ..] => {
                let r: i32 = r
                    .parse()
                    .map_err(|_| format!("{}: bad line '{l}'", p.display()))?;
                ranks.push((r, dir.join(format!("rank-{r}"))));
            }
            _ => {}
        }
    }
    ranks.sort();
    let n = nranks.ok_or_else(|| format!("{}: no 'ranks' line", p.display()))?;
    if ranks.len() != n || ranks.iter().enumerate().any(|(i, (r, _))| *r != i as i32) {
        return Err(format!(
            "{}: the job has {n} ranks but the manifest names {:?} (an incomplete checkpoint?)",
            p.display(),
            ranks.iter().map(|r| r.0).collect::<Vec<_>>()
        ));
    }
    Ok(ranks)
}

/// Rebuilds a restored session's communicators from `nccl.state` next to its image, if there is one; ranks of
/// several-rank communicators agree on new ids through the job directory under restore attempt `attempt` (default:
/// `DEVPROXY_RESTORE_ATTEMPT`, see [`super::rendezvous`]).
pub fn attach_saved(
    image_dir: &Path,
    st: &mut SessionState,
    attempt: Option<&str>,
) -> Result<(), String> {
    let dir = if image_dir.is_file() {
        image_dir.parent().unwrap_or(Path::new("."))
    } else {
        image_dir
    };
    match RankState::read(dir)? {
        Some(s) => s.attach(st, Rejoin::Restore(&Rendezvous::for_image(dir, attempt))),
        None => Ok(()),
    }
}

/// `devproxy restore JOBDIR [--ranks R,...]`. With `ranks`, restores those ranks into one server (on the socket
/// their images record; they must agree) and serves in the foreground. Without, starts one such `devproxy restore`
/// per server socket the job's images record and waits for them (ending them all if one fails).
pub fn restore_job_cmd(
    dir: &Path,
    ranks: Option<Vec<i32>>,
    socket: Option<PathBuf>,
    kind: Option<crate::backend::BackendKind>,
    device: u32,
) -> Result<(), String> {
    let all = job_ranks(dir)?;
    let mut groups: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (r, d) in &all {
        let img = LoadedImage::open(d).map_err(|e| e.to_string())?;
        let s = socket
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| img.manifest.sessions[0].socket.clone());
        groups.entry(s).or_default().push(*r);
    }
    if let Some(want) = ranks {
        let picked: Vec<(i32, PathBuf)> =
            all.into_iter().filter(|(r, _)| want.contains(r)).collect();
        if picked.len() != want.len() {
            return Err(format!(
                "--ranks {want:?}: the job image has ranks 0..{}",
                groups.values().map(|v| v.len()).sum::<usize>()
            ));
        }
        return serve_ranks(&picked, socket, kind, device, None);
    }
    // The ranks agree on their communicators' new unique ids through files in DIR named by this attempt.
    let attempt = std::env::var(super::rendezvous::ATTEMPT_ENV)
        .unwrap_or_else(|_| Rendezvous::fresh_attempt());
    let rdv = Rendezvous::for_job(dir, Some(&attempt));
    if groups.len() == 1 {
        let r = serve_ranks(&all, socket, kind, device, Some(rdv.attempt()));
        rdv.clean();
        return r;
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut kids = Vec::new();
    for (sock, rs) in &groups {
        let list = rs
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut c = std::process::Command::new(&exe);
        c.arg("restore")
            .arg(dir)
            .args(["--ranks", &list, "--device", &device.to_string()]);
        if let Some(k) = kind {
            let k = match k {
                crate::backend::BackendKind::Cuda => "cuda",
                crate::backend::BackendKind::Emulated => "emulated",
            };
            c.args(["--backend", k]);
        }
        if socket.is_some() {
            c.arg("--socket").arg(sock);
        }
        c.env(super::rendezvous::ATTEMPT_ENV, rdv.attempt());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent: the per-socket
        // restore servers end with this command.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = c.spawn().map_err(|e| format!("{}: {e}", exe.display()))?;
        println!(
            "rank(s) {list}: restore server pid {} on {sock}",
            child.id()
        );
        kids.push((list, child));
    }
    // The restore servers serve until shut down; one that fails ends the whole restore.
    loop {
        let mut running = 0;
        for (list, k) in kids.iter_mut() {
            match k.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(st)) if !st.success() => {
                    let msg = format!("the restore server of rank(s) {list} failed ({st})");
                    for (_, o) in kids.iter_mut() {
                        let _ = o.kill();
                        let _ = o.wait();
                    }
                    rdv.clean();
                    return Err(msg);
                }
                _ => {}
            }
        }
        if running == 0 {
            rdv.clean();
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn serve_ranks(
    ranks: &[(i32, PathBuf)],
    socket: Option<PathBuf>,
    kind: Option<crate::backend::BackendKind>,
    device: u32,
    attempt: Option<&str>,
) -> Result<(), String> {
    let t0 = Instant::now();
    let imgs: Vec<(i32, LoadedImage)> = ranks
        .iter()
        .map(|(r, d)| {
            LoadedImage::open(d)
                .map(|i| (*r, i))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let first = &imgs.first().ok_or("no rank to restore")?.1;
    let socket = socket.unwrap_or_else(|| PathBuf::from(&first.manifest.sessions[0].socket));
    for (r, i) in &imgs {
        let s = &i.manifest.sessions[0].socket;
        if Path::new(s) != socket && imgs.len() > 1 {
            return Err(format!(
                "rank {r}'s process polls {s}, not {}: restore it in its own server",
                socket.display()
            ));
        }
    }
    let arena = first.manifest.device.arena_bytes;
    let gib = (arena % (1 << 30) == 0).then_some(arena >> 30);
    let backend = crate::cli::make_backend(kind, device, gib)?;
    let srv = Server::new(
        backend.clone(),
        ServerOptions {
            socket: socket.clone(),
            layout: SegmentLayout::from_env(),
        },
    );
    let mut bytes = 0;
    for (r, img) in &imgs {
        let what = img.path.display().to_string();
        let mut reader = img.blob_reader().map_err(|e| e.to_string())?;
        let mut rebuilt = restore_state(
            &backend,
            &img.manifest,
            &mut reader,
            ExpectedCrc::Known(img.header.blob_crc),
            &what,
            &mut || Ok(()),
            &mut |_, _| {},
        )
        .map_err(|e| format!("rank {r}: restore refused: {e}"))?;
        if let Err(e) = attach_saved(&img.path, &mut rebuilt.state, attempt) {
            rebuilt.state.teardown();
            return Err(format!("rank {r}: {e}"));
        }
        bytes += rebuilt.bytes;
        // The jobs its communicators now belong to (new unique ids, new names in `devproxy ps`).
        let mut jobs: Vec<String> = rebuilt.state.nccl.values().map(|c| c.id.job()).collect();
        jobs.sort();
        jobs.dedup();
        let s = &img.manifest.sessions[0];
        add_pending(&srv, s, rebuilt).map_err(|e| e.to_string())?;
        println!(
            "rank {r}: waiting for pid {} to re-attach at {}{}",
            s.pid,
            socket.display(),
            if jobs.is_empty() {
                String::new()
            } else {
                format!(" (now job {})", jobs.join(", "))
            }
        );
    }
    println!(
        "{}",
        Summary {
            what: format!(
                "restore of rank(s) {:?}",
                imgs.iter().map(|i| i.0).collect::<Vec<_>>()
            ),
            bytes,
            seconds: t0.elapsed().as_secs_f64(),
            paused_seconds: 0.0,
            phases: crate::checkpoint::phases::take(),
            path: socket.display().to_string(),
        }
    );
    srv.serve()
}

/// Why the session's communicators cannot move, if they cannot (a migration asks before its barrier, so a refusal
/// costs the process nothing). The session stays as it was: running, or paused when `paused`.
pub fn migration_refusal(sh: &Arc<SessionShared>, paused: bool) -> Result<Option<String>, String> {
    let outcome = if paused {
        JobOutcome::Pause
    } else {
        JobOutcome::Continue
    };
    sh.run_job(move |st, _| {
        let saved = RankState::of(st, Vec::new());
        let why = if saved.comms.is_empty() {
            None
        } else {
            saved.migration_refusal()
        };
        (why, outcome)
    })
}

/// Migration source, after the target adopted the session image: sends the session's communicators to the target,
/// which rejoins their cliques (replacing this server's connections). A session without communicators sends nothing.
pub fn hand_over(sh: &Arc<SessionShared>, to: &Path) -> Result<(), String> {
    let saved = sh.run_job(|st, _| (RankState::of(st, Vec::new()), JobOutcome::Pause))?;
    if saved.comms.is_empty() {
        return Ok(());
    }
    if let Some(why) = saved.migration_refusal() {
        return Err(why);
    }
    let req = ControlRequest::Job(JobRequest::Attach {
        session: sh.id,
        state: saved.encode(),
    });
    match control::request(to, &req, &mut |_, _| {})? {
        ControlReply::Job(JobReply::Err(e)) | ControlReply::Err(e) => Err(format!(
            "the target could not rebuild the communicators: {e}"
        )),
        _ => Ok(()),
    }
}

/// The server and pid of rank `rank` of `job` (for `devproxy migrate --job ID --rank R`).
pub fn find_rank(servers: &[PathBuf], job: &str, rank: i32) -> Result<(PathBuf, u32), String> {
    super::job::status(servers)
        .into_iter()
        .find(|(_, r)| r.job == job && r.rank == rank && r.pid != 0)
        .map(|(s, r)| (s, r.pid))
        .ok_or_else(|| format!("no server holds rank {rank} of job {job} (see devproxy ps)"))
}
