//! Helpers for the integration tests: servers in temp dirs, programs under the shim, a raw protocol client.
#![allow(dead_code)]

use devproxy::protocol::{self, Hello, HelloReply, Reply, Request, SessionInfo};
use devproxy::transport::{socket, Segment};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace's target directory for this profile (where the shim and the examples are).
pub fn target_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_devproxy"));
    exe.parent().expect("binary has a parent").to_path_buf()
}

pub fn devproxy() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_devproxy"))
}

/// Path of an example binary; fails with what to do when it is missing.
pub fn example(name: &str) -> PathBuf {
    let p = target_dir().join("examples").join(name);
    assert!(
        p.is_file(),
        "{} missing: build with `cargo build --workspace --examples` (scripts/test does)",
        p.display()
    );
    p
}

/// Asserts the shim was built (a cdylib `cargo test` alone does not place in target/debug).
pub fn require_shim() {
    let p = target_dir().join("libdevproxy_interpose.so");
    assert!(
        p.is_file(),
        "{} missing: run `cargo build --workspace` first (scripts/test does)",
        p.display()
    );
}

/// A temp dir per test, also used as DEVPROXY_RUNTIME_DIR so tests never see each other's servers.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        require_shim();
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
            children: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `devproxy` command with this sandbox's environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(devproxy());
        c.env("DEVPROXY_RUNTIME_DIR", self.dir.path());
        c.env("DEVPROXY_RECONNECT_TIMEOUT", "60");
        c
    }

    /// Starts `devproxy serve --backend emulated` on `name.sock` and waits until it listens.
    pub fn serve(&mut self, name: &str, extra: &[&str]) -> PathBuf {
        let sock = self.path(&format!("{name}.sock"));
        let child = self
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
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn devproxy serve");
        self.children.push(child);
        wait_for(
            &devproxy::server::control_path(&sock),
            Duration::from_secs(20),
        );
        sock
    }

    /// Runs `devproxy run --server sock -- prog args` to completion.
    pub fn run_under(&self, sock: Option<&Path>, prog: &Path, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.arg("run");
        if let Some(s) = sock {
            c.arg("--server").arg(s);
        } else {
            c.args(["--backend", "emulated"]);
        }
        c.arg("--")
            .arg(prog)
            .args(args)
            .output()
            .expect("devproxy run")
    }

    /// Spawns `devproxy run --server sock -- prog args` without waiting.
    pub fn spawn_under(&self, sock: &Path, prog: &Path, args: &[&str]) -> Child {
        self.cmd()
            .arg("run")
            .arg("--server")
            .arg(sock)
            .arg("--")
            .arg(prog)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn devproxy run")
    }

    /// Keeps a child to be killed when the sandbox is dropped.
    pub fn adopt(&mut self, c: Child) {
        self.children.push(c);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `p` exists.
pub fn wait_for(p: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !p.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Output of a program without devproxy's own log lines (stdout is the program's alone).
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a program directly (no shim) and returns its output.
pub fn run_plain(prog: &Path, args: &[&str]) -> Output {
    Command::new(prog).args(args).output().expect("run program")
}

/// A client speaking the protocol by hand, for fault tests.
pub struct RawSession {
    pub sock: UnixStream,
    pub seg: Segment,
    pub info: SessionInfo,
    buf: Vec<u8>,
}

impl RawSession {
    pub fn connect(sock: &Path) -> Result<RawSession, String> {
        let s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
        let hello = Hello {
            major: protocol::MAJOR,
            minor: protocol::MINOR,
            pid: std::process::id(),
            command: "raw-test-client".into(),
            resume: None,
        };
        socket::send_msg(&s, &protocol::encode(&hello), &[]).map_err(|e| e.to_string())?;
        let (bytes, mut fds) = socket::recv_msg(&s, 1 << 20).map_err(|e| e.to_string())?;
        match protocol::decode::<HelloReply>(&bytes).map_err(|e| e.to_string())? {
            HelloReply::Ok(info) => {
                let fd = fds.pop().ok_or("no segment fd")?;
                let seg = Segment::open(fd).map_err(|e| e.to_string())?;
                Ok(RawSession {
                    sock: s,
                    seg,
                    info,
                    buf: Vec::new(),
                })
            }
            HelloReply::Refused(m) => Err(m),
        }
    }

    /// Pushes raw bytes as one record and waits for the reply.
    pub fn call_raw(&mut self, payload: &[u8]) -> Result<Reply, String> {
        let seq = self
            .seg
            .push(payload, true, &|| true)
            .map_err(|e| e.to_string())?;
        self.seg
            .wait_reply(seq, &mut self.buf, &|| true)
            .map_err(|e| e.to_string())?;
        protocol::decode::<Reply>(&self.buf).map_err(|e| e.to_string())
    }

    pub fn call(&mut self, req: &Request) -> Reply {
        let bytes = protocol::encode(req);
        if req.waits() {
            self.call_raw(&bytes).expect("call")
        } else {
            self.seg.push(&bytes, false, &|| true).expect("push");
            Reply::Unit
        }
    }
}

/// Asks the server at `sock` for its sessions.
pub fn sessions(sock: &Path) -> Vec<devproxy::control::SessionRow> {
    match devproxy::control::request(sock, &devproxy::control::ControlRequest::Ps, &mut |_, _| {}) {
        Ok(devproxy::control::ControlReply::Ps { sessions, .. }) => sessions,
        other => panic!("ps failed: {other:?}"),
    }
}
