//! The coordinator side of the job-wide barrier (`devproxy checkpoint --job`, `devproxy ps`): talks to every server
//! holding a rank of the job over their control sockets. See [`super::barrier`] for the protocol.

use super::barrier::{JobReply, JobRequest, JobRow};
use crate::control::{self, ControlReply, ControlRequest};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn ask(server: &Path, req: JobRequest) -> Result<JobReply, String> {
    match control::request(server, &ControlRequest::Job(req), &mut |_, _| {})? {
        ControlReply::Job(JobReply::Err(e)) => Err(e),
        ControlReply::Job(r) => Ok(r),
        ControlReply::Err(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

fn rows_of(r: JobReply) -> Vec<JobRow> {
    match r {
        JobReply::Rows(v) => v,
        _ => Vec::new(),
    }
}

/// The job's ranks on each server (servers that cannot be reached are skipped).
pub fn status(servers: &[PathBuf]) -> Vec<(PathBuf, JobRow)> {
    let mut out = Vec::new();
    for s in servers {
        if let Ok(r) = ask(s, JobRequest::Status) {
            out.extend(rows_of(r).into_iter().map(|row| (s.clone(), row)));
        }
    }
    out
}

/// Stops every rank of `job` right before the same collective and writes each rank's image plus `DIR/job.manifest`.
/// Without `stop` the ranks continue afterwards. On a timeout every hold is released and the ranks that did not
/// arrive are named.
pub fn checkpoint(
    servers: &[PathBuf],
    job: &str,
    out: &Path,
    stop: bool,
    timeout: Duration,
) -> Result<String, String> {
    let started = Instant::now();
    let ranks: Vec<(PathBuf, JobRow)> = status(servers)
        .into_iter()
        .filter(|(_, r)| r.job == job)
        .collect();
    let nranks = ranks
        .first()
        .ok_or(format!(
            "no server holds a rank of job {job} (see devproxy ps)"
        ))?
        .1
        .nranks;
    let mut where_: Vec<PathBuf> = ranks.iter().map(|(s, _)| s.clone()).collect();
    where_.sort();
    where_.dedup();
    let mut target = ranks.iter().map(|(_, r)| r.collectives).max().unwrap_or(0);
    let release_all = || {
        for s in &where_ {
            let _ = ask(
                s,
                JobRequest::Release {
                    job: job.to_string(),
                },
            );
        }
    };
    // Arm the holds; a rank that moved past the target in the meantime makes us retry further on.
    let mut armed = false;
    for _ in 0..20 {
        let mut err = None;
        for s in &where_ {
            if let Err(e) = ask(
                s,
                JobRequest::Hold {
                    job: job.to_string(),
                    target,
                },
            ) {
                err = Some(e);
                break;
            }
        }
        match err {
            None => {
                armed = true;
                break;
            }
            Some(_) => {
                release_all();
                target = status(&where_)
                    .iter()
                    .filter(|(_, r)| r.job == job)
                    .map(|(_, r)| r.collectives)
                    .max()
                    .unwrap_or(target)
                    + 1;
            }
        }
    }
    if !armed {
        release_all();
        return Err(format!(
            "job {job}: could not arm the barrier (ranks kept moving past it)"
        ));
    }
    let deadline = started + timeout;
    let mut held = BTreeSet::new();
    for s in &where_ {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(r) = ask(
            s,
            JobRequest::Wait {
                job: job.to_string(),
                timeout_ms: left.as_millis() as u64,
            },
        ) {
            held.extend(rows_of(r).into_iter().filter(|r| r.held).map(|r| r.rank));
        }
    }
    let missing: Vec<i32> = (0..nranks).filter(|r| !held.contains(r)).collect();
    if !missing.is_empty() {
        release_all();
        return Err(format!(
            "job {job}: barrier timed out after {:.1} s before collective #{target}: rank(s) {missing:?} did not \
             arrive (dead, or stuck outside NCCL); the ranks that arrived ({held:?}) were released",
            timeout.as_secs_f64()
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut manifest =
        format!("devproxy job image\njob {job}\nranks {nranks}\nbefore-collective {target}\n");
    let mut total = 0;
    for s in &where_ {
        match ask(
            s,
            JobRequest::Capture {
                job: job.to_string(),
                dir: out.display().to_string(),
            },
        ) {
            Ok(JobReply::Captured(v)) => {
                for (rank, bytes, dir) in v {
                    total += bytes;
                    manifest.push_str(&format!("rank {rank} server {} image {dir}\n", s.display()));
                }
            }
            Ok(_) => {}
            Err(e) => {
                release_all();
                return Err(format!("job {job}: {e}"));
            }
        }
    }
    let tmp = out.join("job.manifest.tmp");
    std::fs::write(&tmp, &manifest).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out.join("job.manifest")).map_err(|e| e.to_string())?;
    if !stop {
        release_all();
    }
    Ok(format!(
        "job {job}: {nranks} ranks stopped before collective #{target}, {} written in {:.3} s to {}{}",
        control::human_bytes(total),
        started.elapsed().as_secs_f64(),
        out.display(),
        if stop { " (ranks stay stopped)" } else { "" }
    ))
}
