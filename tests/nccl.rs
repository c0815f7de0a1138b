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

/// Starts rank `rank` of `ranks` under `devproxy run` (its own embedded server, or `server`).
fn spawn_rank(
    sb: &Sandbox,
    server: Option<&Path>,
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
        .arg(example("ddp_train"))
        .args([
            "--ranks",
            &ranks.to_string(),
            "--rank",
            &rank.to_string(),
            "--steps",
            STEPS,
        ])
        .arg("--id-file")
        .arg(&id)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn devproxy run")
}

fn finish(children: Vec<Child>, limit: Duration) -> Vec<String> {
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
            checksum(&so)
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
