//! End-to-end checkpoint, restore, migration and suspend of a real program (examples/train) running under the shim
//! against emulated-device servers. Every interrupted run must print exactly what an uninterrupted run prints.
//!
//! Needs `cargo build --workspace --examples` (the shim and the train example) and NVRTC (`scripts/setup`, with
//! `.tools/nvrtc/nvidia/cu13/lib` on LD_LIBRARY_PATH). The tests run one at a time (a 2-core CI machine cannot run
//! several emulated trainings side by side without timing out).

use devproxy::checkpoint::format::{Header, IMAGE_FILE};
use devproxy::checkpoint::LoadedImage;
use devproxy::control::{self, ControlReply, ControlRequest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_devproxy");
/// Steps long enough to act mid-run, short enough for CI.
const TRAIN: &[&str] = &["--steps", "14", "--log-every", "1", "--step-delay-ms", "40"];
const TRAIN2: &[&str] = &[
    "--steps",
    "14",
    "--log-every",
    "1",
    "--step-delay-ms",
    "40",
    "--lr",
    "0.03",
];

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn target_dir() -> PathBuf {
    Path::new(BIN).parent().expect("target dir").to_path_buf()
}

fn train_exe() -> PathBuf {
    let p = target_dir().join("examples").join("train");
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build --workspace --examples`",
        p.display()
    );
    let shim = target_dir().join("libdevproxy_interpose.so");
    assert!(
        shim.is_file(),
        "{} is missing: build the shim with `cargo build --workspace`",
        shim.display()
    );
    p
}

/// A per-test directory for sockets and images; DEVPROXY_RUNTIME_DIR points there for every child.
struct Env {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
            children: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("DEVPROXY_RUNTIME_DIR", self.dir.path())
            .env("DEVPROXY_RECONNECT_TIMEOUT", "60");
        c
    }

    /// Starts `devproxy serve` and waits until its control socket answers.
    fn serve(&mut self, sock: &Path, extra: &[&str], env: &[(&str, &str)]) -> usize {
        let log = std::fs::File::create(sock.with_extension("log")).unwrap();
        let mut c = self.cmd();
        c.args(["serve", "--backend", "emulated", "--socket"])
            .arg(sock)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().expect("spawn devproxy serve");
        self.children.push(child);
        wait_until(Duration::from_secs(10), "the server to listen", || {
            control::request(sock, &ControlRequest::Ps, &mut |_, _| {}).is_ok()
        });
        self.children.len() - 1
    }

    /// `devproxy restore DIR --socket S` in the background (it serves in the foreground).
    fn restore(&mut self, dir: &Path, sock: &Path) -> usize {
        let log = std::fs::File::create(sock.with_extension("restore.log")).unwrap();
        let mut c = self.cmd();
        c.args(["restore", "--backend", "emulated", "--socket"])
            .arg(sock)
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(log);
        self.children
            .push(c.spawn().expect("spawn devproxy restore"));
        self.children.len() - 1
    }

    fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Runs a devproxy command to completion; (success, stdout + stderr).
    /// `devproxy ARGS`, given `secs` seconds to end; `None` (after killing it) if it did not.
    fn devproxy_within(&self, args: &[&str], secs: u64) -> Option<(bool, String)> {
        use std::process::Stdio;
        let mut child = self
            .cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run devproxy");
        let deadline = Instant::now() + Duration::from_secs(secs);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("output");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        Some((out.status.success(), s))
    }

    fn devproxy(&self, args: &[&str]) -> (bool, String) {
        let out = self.cmd().args(args).output().expect("run devproxy");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), s)
    }

    /// `devproxy checkpoint --server S --pid P --out DIR [--stop]`, which must succeed; returns its output.
    fn checkpoint(&self, server: &Path, pid: &str, out: &Path, stop: bool) -> String {
        let mut args = vec![
            "checkpoint",
            "--server",
            server.to_str().unwrap(),
            "--pid",
            pid,
            "--out",
            out.to_str().unwrap(),
        ];
        if stop {
            args.push("--stop");
        }
        self.ok(&args)
    }

    /// `devproxy migrate --server FROM --pid PID --to TO`: (success, output).
    fn migrate(&self, from: &Path, pid: &str, to: &Path) -> (bool, String) {
        let (from, to) = (from.to_str().unwrap(), to.to_str().unwrap());
        self.devproxy(&["migrate", "--server", from, "--pid", pid, "--to", to])
    }

    /// [`Env::migrate`] that must succeed; its summary.
    fn migrated(&self, from: &Path, pid: &str, to: &Path) -> String {
        let (ok, s) = self.migrate(from, pid, to);
        assert!(ok, "migrate failed: {s}");
        s
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, s) = self.devproxy(args);
        assert!(ok, "devproxy {args:?} failed: {s}");
        s
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A training run under the shim, its stdout collected as it comes.
struct Run {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Run {
    /// The output so far, once lines printed before a barrier have come through the pipe.
    fn settled_stdout(&self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        self.stdout()
    }

    fn start(env: &Env, server: Option<&Path>, args: &[&str]) -> Run {
        let mut c = env.cmd();
        c.arg("run");
        if let Some(s) = server {
            c.arg("--server").arg(s);
        } else {
            c.args(["--backend", "emulated"]);
        }
        c.arg("--")
            .arg(train_exe())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn devproxy run");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        for (pipe, buf) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                out.clone(),
            ),
            (Box::new(child.stderr.take().unwrap()), err.clone()),
        ] {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut b = buf.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
        }
        Run { child, out, err }
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    fn wait_for_step(&mut self, step: u32) {
        let needle = format!("step {step:5} ");
        let t = Instant::now();
        while !self.stdout().contains(&needle) {
            if let Ok(Some(st)) = self.child.try_wait() {
                let e = self.stderr();
                if e.contains("NVRTC") {
                    panic!("NVRTC is missing: run scripts/setup and put .tools/nvrtc/nvidia/cu13/lib on LD_LIBRARY_PATH\n{e}");
                }
                panic!(
                    "train ended ({st}) before step {step}:\n{}\n{e}",
                    self.stdout()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no step {step} after 30 s:\n{}",
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the end; returns stdout.
    fn finish(mut self) -> String {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                let e = self.stderr();
                assert!(st.success(), "train failed ({st}):\n{}\n{e}", self.stdout());
                return self.stdout();
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "train did not finish:\n{}\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The uninterrupted output of `train args` (computed once per argument list).
fn reference(args: &[&str]) -> String {
    static CACHE: OnceLock<Mutex<std::collections::HashMap<String, String>>> = OnceLock::new();
    let key = args.join(" ");
    if let Some(s) = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .get(&key)
    {
        return s.clone();
    }
    let env = Env::new();
    let mut r = Run::start(&env, None, args);
    r.wait_for_step(0);
    let out = r.finish();
    assert!(out.contains("checksum 0x"), "{out}");
    CACHE
        .get()
        .unwrap()
        .lock()
        .unwrap()
        .insert(key, out.clone());
    out
}

/// The pid of the (only) session running `needle` on `server`.
fn pid_on(server: &Path, needle: &str) -> u32 {
    match control::request(server, &ControlRequest::Ps, &mut |_, _| {}).expect("ps") {
        ControlReply::Ps { sessions, .. } => sessions
            .iter()
            .find(|s| s.command.contains(needle))
            .map(|s| s.pid)
            .unwrap_or_else(|| panic!("no session runs {needle}: {sessions:?}")),
        other => panic!("{other:?}"),
    }
}

fn sessions(server: &Path) -> Vec<control::SessionRow> {
    match control::request(server, &ControlRequest::Ps, &mut |_, _| {}).expect("ps") {
        ControlReply::Ps { sessions, .. } => sessions,
        other => panic!("{other:?}"),
    }
}

/// The start most tests share: the serial guard (bind it to `_g` so that it lives as long as the test), the
/// reference output, the environment, one server (`a.sock`, its index) and `train` on it run to `step`, its pid.
type OneRun = (
    std::sync::MutexGuard<'static, ()>,
    String,
    Env,
    PathBuf,
    usize,
    Run,
    String,
);

fn one_run(step: u32) -> OneRun {
    let g = serial();
    let want = reference(TRAIN);
    let mut env = Env::new();
    let sock = env.path("a.sock");
    let srv = env.serve(&sock, &[], &[]);
    let mut run = Run::start(&env, Some(&sock), TRAIN);
    run.wait_for_step(step);
    let pid = pid_on(&sock, "train").to_string();
    (g, want, env, sock, srv, run, pid)
}

#[test]
fn checkpoint_stop_kill_server_restore_gives_identical_output() {
    let (_g, want, mut env, sock, srv, mut run, pid) = one_run(3);
    let img = env.path("img");
    let s = env.checkpoint(&sock, &pid, &img, true);
    assert!(s.contains("checkpoint of pid") && s.contains("GB/s"), "{s}");
    let at = run.settled_stdout();
    env.kill(srv);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run.stdout(), at, "the process ran on while stopped");
    assert!(run.alive());
    let s = env.ok(&["inspect", img.to_str().unwrap()]);
    assert!(
        s.contains("blob CRC") && s.contains("OK") && s.contains("forward_hidden"),
        "{s}"
    );
    env.restore(&img, &sock);
    assert_eq!(run.finish(), want);
}

/// The wrong image restored first (one taken without `--stop`, which the process has run past): the restore server
/// refuses the process, which says why and keeps waiting; once the right image is restored it continues, its output
/// unchanged.
#[test]
fn a_stale_image_restored_first_is_refused_and_the_process_waits_for_the_right_one() {
    let (_g, want, mut env, sock, srv, mut run, pid) = one_run(2);
    let (old, new) = (env.path("old"), env.path("new"));
    env.checkpoint(&sock, &pid, &old, false);
    run.wait_for_step(4);
    env.checkpoint(&sock, &pid, &new, true);
    let at = run.settled_stdout();
    env.kill(srv);
    let stale = env.restore(&old, &sock);
    wait_until(Duration::from_secs(30), "the process to be refused", || {
        run.stderr().contains("older than the process")
    });
    assert!(run.stderr().contains("still waiting"), "{}", run.stderr());
    std::thread::sleep(Duration::from_millis(300));
    assert!(run.alive(), "the process gave up: {}", run.stderr());
    assert_eq!(run.stdout(), at, "the process moved on");
    env.kill(stale);
    let _ = std::fs::remove_file(&sock);
    env.restore(&new, &sock);
    assert_eq!(run.finish(), want);
}

#[test]
fn live_migration_gives_identical_output_and_refuses_another_device_size() {
    let _g = serial();
    let want = reference(TRAIN);
    let mut env = Env::new();
    let a = env.path("a.sock");
    let b = env.path("b.sock");
    let c = env.path("c.sock");
    env.serve(&a, &[], &[]);
    env.serve(&b, &[], &[]);
    env.serve(&c, &["--arena-gib", "8"], &[]);
    let mut run = Run::start(&env, Some(&a), TRAIN);
    run.wait_for_step(2);
    let pid = pid_on(&a, "train").to_string();
    // A target with another arena size refuses; the process continues where it is.
    let (ok, s) = env.migrate(&a, &pid, &c);
    assert!(!ok, "{s}");
    assert!(
        s.contains("8.00 GiB arena") && s.contains("16.00 GiB arena"),
        "{s}"
    );
    assert!(sessions(&c).is_empty());
    run.wait_for_step(4);
    let s = env.migrated(&a, &pid, &b);
    assert!(s.contains("migration of pid"), "{s}");
    // Both servers are on this machine: the blob goes over as a memory file, not through the socket (unless the
    // direct path is turned off, as scripts/test does once to cover the streamed path).
    if std::env::var("DEVPROXY_IMAGE_DIRECT").as_deref() == Ok("0") {
        assert!(s.contains("blob streamed"), "{s}");
    } else {
        assert!(s.contains("memory file"), "{s}");
        // The target page-locked it before the barrier and restored from it in place.
        assert!(s.contains("page-locked by the target in advance"), "{s}");
        assert!(s.contains("target page-locks"), "{s}");
        assert!(
            s.contains("target: (from page-locked memory"),
            "the target's device read the file in place: {s}"
        );
        assert!(
            s.contains("target: (waiting for the source)"),
            "the target drained the file while the source filled it: {s}"
        );
    }
    assert!(
        sessions(&a).is_empty(),
        "the source still holds the session"
    );
    // On to a target that will not page-lock the memory file (its direct path is off): it says so, the source goes
    // on over a new connection, and the target reads the file through its buffers.
    let d = env.path("d.sock");
    env.serve(&d, &[], &[("DEVPROXY_IMAGE_DIRECT", "0")]);
    wait_until(Duration::from_secs(30), "the process to re-attach", || {
        sessions(&b).iter().any(|r| r.state == "running")
    });
    let s = env.migrated(&b, &pid, &d);
    assert!(s.contains("migration of pid"), "{s}");
    if std::env::var("DEVPROXY_IMAGE_DIRECT").as_deref() != Ok("0") {
        assert!(
            s.contains("memory file") && !s.contains("in advance"),
            "{s}"
        );
    }
    assert!(sessions(&b).is_empty());
    assert_eq!(run.finish(), want);
}

/// A same-host migration's target that dies after page-locking the memory file, before the session arrives: the
/// migration fails with a message and the process carries on where it was, its output unchanged.
#[test]
fn a_migration_target_that_dies_after_page_locking_leaves_the_process_running() {
    if std::env::var("DEVPROXY_IMAGE_DIRECT").as_deref() == Ok("0") {
        return; // no memory file, nothing page-locked
    }
    let _g = serial();
    let want = reference(TRAIN);
    let mut env = Env::new();
    let a = env.path("a.sock");
    let b = env.path("b.sock");
    env.serve(&a, &[], &[]);
    env.serve(&b, &[], &[("DEVPROXY_TEST_EXIT_AFTER_PRELOCK", "1")]);
    let mut run = Run::start(&env, Some(&a), TRAIN);
    run.wait_for_step(2);
    let pid = pid_on(&a, "train").to_string();
    let (ok, s) = env.migrate(&a, &pid, &b);
    assert!(!ok, "{s}");
    assert!(
        s.contains("failed (it continues here)") && s.contains("closed the connection"),
        "{s}"
    );
    assert_eq!(sessions(&a).len(), 1, "the session stays on the source");
    assert_eq!(run.finish(), want);
}

/// A process killed while suspended: its server lets go of the host memory that held its device state.
#[test]
fn a_process_killed_while_suspended_has_its_host_memory_released() {
    let (_g, _, env, a, _, mut run, pid) = one_run(2);
    env.ok(&["suspend", "--server", a.to_str().unwrap(), "--pid", &pid]);
    let st = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(st.success());
    let log = a.with_extension("log");
    wait_until(
        Duration::from_secs(30),
        "the suspended state to be released",
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ended while suspended")),
    );
    assert!(sessions(&a).is_empty());
    let _ = run.alive();
}

#[test]
fn suspend_frees_the_device_and_resume_continues() {
    let (_g, want, env, a, _, run, pid) = one_run(3);
    let s = env.ok(&["suspend", "--server", a.to_str().unwrap(), "--pid", &pid]);
    let direct = std::env::var("DEVPROXY_IMAGE_DIRECT").as_deref() != Ok("0");
    assert!(
        s.contains(if direct {
            "page-locked host memory"
        } else {
            "a buffer"
        }),
        "{s}"
    );
    // The only session: the whole device is free.
    assert!(s.contains("device: 16.00 GiB free of 16.00 GiB"), "{s}");
    let rows = sessions(&a);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].device_bytes, 0, "{rows:?}");
    assert!(
        rows[0].state.starts_with("suspended (") && rows[0].state.ends_with(" in host memory)"),
        "{rows:?}"
    );
    let ps = env.ok(&["ps", "--server", a.to_str().unwrap()]);
    assert!(ps.contains(" 0 B ") && ps.contains("suspended ("), "{ps}");
    let at = run.settled_stdout();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(run.stdout(), at, "the process ran on while suspended");
    let s = env.ok(&["resume", "--server", a.to_str().unwrap(), "--pid", &pid]);
    assert!(s.contains("resume of pid"), "{s}");
    // The memory file stayed page-locked: the device reads it in place (no copy through buffers).
    assert_eq!(
        s.contains("from page-locked memory"),
        direct,
        "resumed from the memory file in place only where it exists: {s}"
    );
    assert!(sessions(&a)[0].device_bytes > 0);
    assert_eq!(run.finish(), want);
}

#[test]
fn two_processes_one_checkpointed_and_migrated_the_other_undisturbed() {
    let _g = serial();
    let want1 = reference(TRAIN);
    let want2 = reference(TRAIN2);
    let mut env = Env::new();
    let a = env.path("a.sock");
    let b = env.path("b.sock");
    env.serve(&a, &[], &[]);
    env.serve(&b, &[], &[]);
    let mut one = Run::start(&env, Some(&a), TRAIN);
    let mut two = Run::start(&env, Some(&a), TRAIN2);
    one.wait_for_step(2);
    two.wait_for_step(2);
    let rows = sessions(&a);
    let p1 = rows
        .iter()
        .find(|r| !r.command.contains("--lr"))
        .expect("train one")
        .pid
        .to_string();
    let img = env.path("img");
    let s = env.checkpoint(&a, &p1, &img, false);
    assert!(s.contains("paused"), "{s}");
    one.wait_for_step(4);
    env.migrated(&a, &p1, &b);
    assert_eq!(sessions(&a).len(), 1);
    assert_eq!(one.finish(), want1);
    assert_eq!(two.finish(), want2);
}

/// Rewrites an image with a changed manifest, valid CRCs.
fn rewrite(src: &Path, dst: &Path, change: impl FnOnce(&mut devproxy::checkpoint::Manifest)) {
    let img = LoadedImage::open(src).unwrap();
    let bytes = std::fs::read(src.join(IMAGE_FILE)).unwrap();
    let mut m = img.manifest.clone();
    change(&mut m);
    let enc = m.encode();
    let h = Header::new(
        enc.len() as u64,
        crc32fast::hash(&enc),
        img.header.blob_len,
        img.header.blob_crc,
    );
    let mut f = h.encode();
    f.resize(h.blob_offset as usize, 0);
    f[h.manifest_offset as usize..][..enc.len()].copy_from_slice(&enc);
    f.extend_from_slice(&bytes[img.header.blob_offset as usize..]);
    std::fs::create_dir_all(dst).unwrap();
    std::fs::write(dst.join(IMAGE_FILE), f).unwrap();
}

fn variant(src: &Path, dst: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(src.join(IMAGE_FILE)).unwrap();
    f(&mut b);
    std::fs::create_dir_all(dst).unwrap();
    std::fs::write(dst.join(IMAGE_FILE), b).unwrap();
}

#[test]
fn damaged_images_are_refused_and_the_process_waits_for_a_good_one() {
    let (_g, want, mut env, sock, srv, mut run, pid) = one_run(3);
    let img = env.path("img");
    env.checkpoint(&sock, &pid, &img, true);
    env.kill(srv);
    let at = run.settled_stdout();
    let loaded = LoadedImage::open(&img).unwrap();
    let (mo, bo, bl) = (
        loaded.header.manifest_offset,
        loaded.header.blob_offset,
        loaded.header.blob_len,
    );
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "manifest",
            env.path("bad-manifest"),
            vec!["manifest CRC mismatch"],
        ),
        ("blob", env.path("bad-blob"), vec!["blob CRC mismatch"]),
        (
            "truncated",
            env.path("bad-trunc"),
            vec!["truncated", "the header says"],
        ),
        (
            "version",
            env.path("bad-version"),
            vec!["format 7.", "reads format 1.0"],
        ),
        (
            "device",
            env.path("bad-device"),
            vec!["32.00 GiB arena", "16.00 GiB arena"],
        ),
    ];
    variant(&img, &cases[0].1, |b| b[(mo + 20) as usize] ^= 1);
    variant(&img, &cases[1].1, |b| b[(bo + bl / 3) as usize] ^= 1);
    variant(&img, &cases[2].1, |b| b.truncate(b.len() - 1000));
    variant(&img, &cases[3].1, |b| {
        b[8..10].copy_from_slice(&7u16.to_le_bytes())
    });
    rewrite(&img, &cases[4].1, |m| m.device.arena_bytes = 32 << 30);
    for (what, dir, needles) in &cases {
        // A restore that accepts the image serves it and never ends: bounded, so that fails instead of hanging.
        let Some((ok, s)) = env.devproxy_within(
            &[
                "restore",
                "--backend",
                "emulated",
                "--socket",
                sock.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
            120,
        ) else {
            panic!("{what}: restore accepted a bad image (still serving it after 120 s)");
        };
        assert!(!ok, "{what}: restore accepted a bad image: {s}");
        for n in needles {
            assert!(s.contains(n), "{what}: '{n}' missing from: {s}");
        }
        assert!(run.alive(), "{what}: the process died");
        assert_eq!(run.stdout(), at, "{what}: the process moved on");
    }
    // A restore drill (`--trial`) refuses the damaged blob and passes the good image; it ends (serves nothing) and
    // leaves the paused process as it was.
    let trial = |dir: &Path| {
        env.devproxy_within(
            &[
                "restore",
                "--backend",
                "emulated",
                "--trial",
                dir.to_str().unwrap(),
            ],
            120,
        )
        .expect("a restore drill ends")
    };
    let (ok, s) = trial(&cases[1].1);
    assert!(!ok && s.contains("blob CRC mismatch"), "{s}");
    let (ok, s) = trial(&img);
    assert!(
        ok && s.contains("trial restore of session") && s.contains("trial passed"),
        "{s}"
    );
    assert!(run.alive());
    assert_eq!(run.stdout(), at, "the drill moved the process on");
    env.restore(&img, &sock);
    assert_eq!(run.finish(), want);
}

#[test]
fn server_killed_while_writing_leaves_the_earlier_image_intact() {
    let _g = serial();
    let mut env = Env::new();
    let sock = env.path("a.sock");
    let srv = env.serve(
        &sock,
        &[],
        &[("DEVPROXY_TEST_IMAGE_WRITE_DELAY_MS", "1500")],
    );
    // Long enough to outlive two image writes (the process is not needed to finish).
    let mut run = Run::start(
        &env,
        Some(&sock),
        &[
            "--steps",
            "200",
            "--log-every",
            "1",
            "--step-delay-ms",
            "40",
        ],
    );
    run.wait_for_step(2);
    let pid = pid_on(&sock, "train").to_string();
    let img = env.path("img");
    env.checkpoint(&sock, &pid, &img, false);
    let first = std::fs::read(img.join(IMAGE_FILE)).unwrap();
    let mut second = env
        .cmd()
        .args([
            "checkpoint",
            "--server",
            sock.to_str().unwrap(),
            "--pid",
            &pid,
            "--out",
            img.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the server once the new image is being written (its temporary file exists).
    wait_until(Duration::from_secs(10), "the second image to start", || {
        if let Ok(Some(st)) = second.try_wait() {
            panic!("the second checkpoint ended ({st}) before the server was killed");
        }
        std::fs::read_dir(&img)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
    });
    env.kill(srv);
    let _ = second.wait();
    assert_eq!(
        std::fs::read(img.join(IMAGE_FILE)).unwrap(),
        first,
        "the earlier image changed"
    );
    let s = env.ok(&["inspect", img.to_str().unwrap()]);
    assert!(s.contains("OK"), "{s}");
    drop(run);
}
