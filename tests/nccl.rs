//! NCCL through devproxy on the emulated device: data-parallel training with one process per rank, each under
//! `devproxy run`, with the same final checksum as the single-process reference (`ddp_train --cpu`).

mod common;

use common::{example, Sandbox};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: &str = "12";

fn reference(ranks: usize) -> String {
    let out = Command::new(example("ddp_train"))
        .args(["--cpu", "--ranks", &ranks.to_string(), "--steps", STEPS])
        .output()
        .expect("ddp_train --cpu");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    checksum(&String::from_utf8_lossy(&out.stdout))
}

fn checksum(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with("checksum "))
        .unwrap_or_else(|| panic!("no checksum in:\n{stdout}"))
        .to_string()
}

/// Starts rank `rank` of `ranks` of `ddp_train` under `devproxy run` (its own embedded server, or `server`).
fn spawn_rank(
    sb: &Sandbox,
    server: Option<&Path>,
    ranks: usize,
    rank: usize,
    extra: &[&str],
) -> Child {
    let mut args = vec!["--steps", STEPS];
    args.extend_from_slice(extra);
    spawn_program(sb, server, "ddp_train", ranks, rank, &args)
}

/// Starts rank `rank` of `ranks` of example `prog` (which takes `--ranks`, `--rank` and `--id-file`).
fn spawn_program(
    sb: &Sandbox,
    server: Option<&Path>,
    prog: &str,
    ranks: usize,
    rank: usize,
    extra: &[&str],
) -> Child {
    let id = sb.path("nccl-id");
    let mut c = sb.cmd();
    c.arg("run");
    match server {
        Some(s) => c.arg("--server").arg(s),
        None => c.args(["--backend", "emulated"]),
    };
    c.arg("--")
        .arg(example(prog))
        .args(["--ranks", &ranks.to_string(), "--rank", &rank.to_string()])
        .arg("--id-file")
        .arg(&id)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn devproxy run")
}

/// The final checksum line of each rank (see [`outputs`]).
fn finish(children: Vec<Child>, limit: Duration) -> Vec<String> {
    outputs(children, limit)
        .iter()
        .map(|so| checksum(so))
        .collect()
}

/// Waits for every rank (each must succeed within `limit`); their standard outputs.
fn outputs(children: Vec<Child>, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    children
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            while c.try_wait().expect("wait").is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let out = c.wait_with_output().unwrap();
                    panic!(
                        "rank {r} did not finish in {limit:?}:\n{}\n{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let out = c.wait_with_output().unwrap();
            let (so, se) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert!(out.status.success(), "rank {r} failed:\n{so}\n{se}");
            so.into_owned()
        })
        .collect()
}

#[test]
fn ddp_two_ranks_in_two_servers_matches_the_reference() {
    let want = reference(2);
    let sb = Sandbox::new();
    let kids = (0..2).map(|r| spawn_rank(&sb, None, 2, r, &[])).collect();
    for got in finish(kids, Duration::from_secs(40)) {
        assert_eq!(got, want);
    }
}

/// Every collective with every reduction op, checked on the host by each of 3 ranks in 3 servers (what the GPU
/// check's `nccl` step also runs with one rank on the cuda backend).
#[test]
fn every_collective_gives_the_expected_result_on_three_ranks() {
    let sb = Sandbox::new();
    let kids = (0..3)
        .map(|r| spawn_program(&sb, None, "nccl_collectives", 3, r, &["--count", "1001"]))
        .collect();
    for (r, so) in outputs(kids, Duration::from_secs(60)).iter().enumerate() {
        assert!(
            so.contains(&format!("collectives ok: 12 checks (rank {r} of 3)")),
            "{so}"
        );
    }
}

/// What the GPU check's `nccl` step runs on the cuda backend (gpu/check.sh): one rank, no id file.
#[test]
fn ddp_one_rank_without_an_id_file_matches_the_reference() {
    let want = reference(1);
    let sb = Sandbox::new();
    let kid = sb
        .cmd()
        .args(["run", "--backend", "emulated", "--"])
        .arg(example("ddp_train"))
        .args(["--ranks", "1", "--steps", STEPS])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn devproxy run");
    assert_eq!(finish(vec![kid], Duration::from_secs(40)), vec![want]);
}

#[test]
fn ddp_four_ranks_across_two_servers_matches_the_reference() {
    let want = reference(4);
    let mut sb = Sandbox::new();
    let a = sb.serve("a", &[]);
    let b = sb.serve("b", &[]);
    let kids = (0..4)
        .map(|r| spawn_rank(&sb, Some(if r % 2 == 0 { &a } else { &b }), 4, r, &[]))
        .collect();
    for got in finish(kids, Duration::from_secs(40)) {
        assert_eq!(got, want);
    }
    assert_ne!(
        reference(2),
        want,
        "the rank count must change the result, or the test proves nothing"
    );
}

/// Waits until both servers report `n` ranks of one job; returns the job id.
fn job_on(servers: &[std::path::PathBuf], n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = devproxy::nccl::job::status(servers);
        if rows.len() == n && rows.iter().all(|(_, r)| r.collectives > 0) {
            return rows[0].1.job.clone();
        }
        assert!(
            Instant::now() < deadline,
            "ranks never showed up in the job status: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn job_checkpoint_stops_all_ranks_before_one_collective_and_they_continue_identically() {
    let want = reference(2);
    let mut sb = Sandbox::new();
    let servers = vec![sb.serve("a", &[]), sb.serve("b", &[])];
    let kids = (0..2)
        .map(|r| spawn_rank(&sb, Some(&servers[r]), 2, r, &["--step-delay-ms", "60"]))
        .collect();
    let job = job_on(&servers, 2);
    let ps = sb
        .cmd()
        .args(["ps", "--server"])
        .arg(&servers[0])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout).to_string();
    assert!(ps.contains("NCCL JOB") && ps.contains(&job), "{ps}");
    let out = sb.path("job-img");
    let o = sb
        .cmd()
        .args(["checkpoint", "--job", &job, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{msg}");
    assert!(msg.contains("2 ranks stopped before collective #"), "{msg}");
    let manifest = std::fs::read_to_string(out.join("job.manifest")).unwrap();
    assert!(
        manifest.contains("rank 0 ") && manifest.contains("rank 1 "),
        "{manifest}"
    );
    assert!(
        out.join("rank-0").join("image.devproxy").is_file()
            && out.join("rank-1").join("image.devproxy").is_file()
    );
    for got in finish(kids, Duration::from_secs(40)) {
        assert_eq!(got, want);
    }
}

#[test]
fn a_rank_that_dies_during_the_barrier_is_named_and_the_others_are_released() {
    let mut sb = Sandbox::new();
    let servers = vec![sb.serve("a", &[]), sb.serve("b", &[])];
    // Rank 1 is slow (30 s between steps), so the barrier is still waiting for it when it dies 0.5 s in.
    let mut kids: Vec<Child> = (0..2)
        .map(|r| {
            let delay = if r == 1 { "30000" } else { "0" };
            spawn_rank(&sb, Some(&servers[r]), 2, r, &["--step-delay-ms", delay])
        })
        .collect();
    let job = job_on(&servers, 2);
    let rows = devproxy::nccl::job::status(&servers);
    let pid1 = rows.iter().find(|(_, r)| r.rank == 1).unwrap().1.pid;
    let ckpt = sb
        .cmd()
        .args(["checkpoint", "--job", &job, "--timeout", "4", "--out"])
        .arg(sb.path("never"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on the program we started (through devproxy run); no memory is involved.
    unsafe { libc::kill(pid1 as i32, libc::SIGKILL) };
    let o = ckpt.wait_with_output().unwrap();
    let msg = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{msg}");
    assert!(
        msg.contains("timed out") && msg.contains("did not arrive") && msg.contains('1'),
        "{msg}"
    );
    // Rank 0 is not left stuck at the barrier: it runs into the dead peer and exits.
    let mut k0 = kids.remove(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while k0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "rank 0 is still stuck");
        std::thread::sleep(Duration::from_millis(50));
    }
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
}

/// Starts `devproxy serve` on `name.sock` as a child the test can SIGKILL; waits until it listens.
fn serve_killable(sb: &Sandbox, name: &str) -> (std::path::PathBuf, Child) {
    let sock = sb.path(&format!("{name}.sock"));
    let child = sb
        .cmd()
        .args([
            "serve",
            "--backend",
            "emulated",
            "--arena-gib",
            "4",
            "--socket",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn devproxy serve");
    common::wait_for(
        &devproxy::server::control_path(&sock),
        Duration::from_secs(20),
    );
    (sock, child)
}

/// A delay in `lo..hi` ms that differs from run to run (the step a checkpoint or migration lands on).
fn random_ms(lo: u64, hi: u64) -> Duration {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(lo + t % (hi - lo))
}

#[test]
fn job_checkpoint_stop_kill_all_servers_restore_matches_the_reference() {
    // Four ranks, two per server: each restore server rebuilds two ranks, one of them rank 0 (it publishes the new
    // unique id and, in the same process, another rank takes it).
    let want = reference(4);
    let mut sb = Sandbox::new();
    let (a, mut ka) = serve_killable(&sb, "a");
    let (b, mut kb) = serve_killable(&sb, "b");
    let servers = vec![a.clone(), b.clone()];
    let kids = (0..4)
        .map(|r| spawn_rank(&sb, Some(&servers[r % 2]), 4, r, &["--step-delay-ms", "60"]))
        .collect();
    let job = job_on(&servers, 4);
    std::thread::sleep(random_ms(0, 500));
    let out = sb.path("job-img");
    let o = sb
        .cmd()
        .args(["checkpoint", "--job", &job, "--stop", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{msg}");
    assert!(msg.contains("ranks stay stopped"), "{msg}");
    for k in [&mut ka, &mut kb] {
        k.kill().unwrap();
        k.wait().unwrap();
    }
    // Rank 1 restored alone: its server waits for rank 0's new unique id, then gives up saying what to do, before
    // it serves (the process keeps waiting for the real restore).
    let lone = sb
        .cmd()
        .args(["restore", "--backend", "emulated", "--ranks", "1"])
        .arg(&out)
        .env("DEVPROXY_NCCL_RENDEZVOUS_TIMEOUT", "1")
        .env("DEVPROXY_RESTORE_ATTEMPT", "lonely")
        .env("DEVPROXY_RENDEZVOUS_DIR", sb.path(""))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&lone.stderr);
    assert!(!lone.status.success(), "{err}");
    assert!(
        err.contains("rank 0 did not publish") && err.contains("restore rank 0 too"),
        "{err}"
    );
    // It waited in the directory it was told to, not in the job image.
    let rdv = sb.path("").display().to_string();
    assert!(
        err.contains(&format!("{}/.nccl-", rdv.trim_end_matches('/'))),
        "{err}"
    );
    let mut restore = sb
        .cmd()
        .args(["restore", "--backend", "emulated"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, said) = std::sync::mpsc::channel();
    let stdout = restore.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    sb.adopt(restore);
    // The restored ranks re-created their communicator under a new unique id (rank 0's restore server made it and
    // published it in the job image's directory), so the job has a new name, which the restore prints per rank.
    let again = job_on(&servers, 4);
    assert_ne!(again, job, "the restored job kept its old unique id");
    let mut lines = Vec::new();
    while lines.len() < 4 {
        match said.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.contains("waiting for pid") => lines.push(l),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(
        lines.len() == 4
            && lines
                .iter()
                .all(|l| l.contains(&format!("(now job {again})"))),
        "{lines:?}"
    );
    for got in finish(kids, Duration::from_secs(40)) {
        assert_eq!(got, want, "{msg}");
    }
}

#[test]
fn one_rank_live_migrated_mid_run_matches_the_reference() {
    let want = reference(2);
    let mut sb = Sandbox::new();
    let servers = vec![sb.serve("a", &[]), sb.serve("b", &[])];
    let c = sb.serve("c", &[]);
    let kids = (0..2)
        .map(|r| spawn_rank(&sb, Some(&servers[r]), 2, r, &["--step-delay-ms", "60"]))
        .collect();
    let job = job_on(&servers, 2);
    std::thread::sleep(random_ms(0, 400));
    let o = sb
        .cmd()
        .args(["migrate", "--job", &job, "--rank", "1", "--to"])
        .arg(&c)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{msg}");
    assert!(msg.contains("migration of pid"), "{msg}");
    let on_c = devproxy::nccl::job::status(std::slice::from_ref(&c));
    assert!(
        on_c.iter().any(|(_, r)| r.job == job && r.rank == 1),
        "rank 1 is not on the target: {on_c:?}"
    );
    for got in finish(kids, Duration::from_secs(40)) {
        assert_eq!(got, want, "{msg}");
    }
}
