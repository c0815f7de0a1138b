//! `devproxy run -- CMD`: run CMD with the shim in front of the CUDA driver.
//!
//! The shim is put first two ways, because either alone misses programs (FACTS.md): LD_PRELOAD loads it before
//! anything else, and a private directory first on LD_LIBRARY_PATH holds `libcuda.so` and `libcuda.so.1` pointing at
//! it, so a `dlopen("libcuda.so")` by cudarc or a `dlopen("libcuda.so.1")` by cudart finds it by name and SONAME.
//! Without `--server`, an embedded server is started as a child process on a private socket and stopped when CMD
//! ends; it is a separate process (not a thread) so it can be checkpointed, killed and restored like any server.

use crate::backend::BackendKind;
use crate::server;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// File name of the shim library as cargo builds it.
pub const SHIM_FILE: &str = "libdevproxy_interpose.so";

/// Finds the shim: $DEVPROXY_SHIM, else next to the devproxy binary (target/{debug,release}), else ../lib.
pub fn find_shim() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DEVPROXY_SHIM") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("DEVPROXY_SHIM={} does not exist", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for cand in [
        dir.join(SHIM_FILE),
        dir.join("../lib").join(SHIM_FILE),
        dir.join("..").join(SHIM_FILE),
    ] {
        if cand.is_file() {
            return Ok(cand.canonicalize().unwrap_or(cand));
        }
    }
    Err(format!(
        "cannot find the shim {SHIM_FILE} next to {} (build it with `cargo build -p devproxy-interpose`, or set DEVPROXY_SHIM)",
        exe.display()
    ))
}

/// Creates the shim directory (libcuda.so, libcuda.so.1, and libnccl.so(.2) for NCCL -> shim; libnvidia-ml.so.1 ->
/// the NVML stub when it was built) under `parent`.
pub fn make_shim_dir(shim: &Path, parent: &Path) -> Result<PathBuf, String> {
    let dir = parent.join(format!("shim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for name in ["libcuda.so", "libcuda.so.1", "libnccl.so", "libnccl.so.2"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(shim, &link).map_err(|e| format!("{}: {e}", link.display()))?;
    }
    // The NVML stub (crate nvml/), built next to the shim: torch and NCCL open libnvidia-ml.so.1 beside the driver.
    let nvml = shim.with_file_name("libdevproxy_nvml.so");
    if nvml.is_file() {
        let link = dir.join("libnvidia-ml.so.1");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&nvml, &link).map_err(|e| format!("{}: {e}", link.display()))?;
    }
    Ok(dir)
}

/// The environment a program needs to run under the shim.
pub fn shim_env(shim: &Path, shim_dir: &Path, socket: &Path) -> Vec<(String, String)> {
    let mut ld = shim_dir.display().to_string();
    if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
        if !old.is_empty() {
            ld = format!("{ld}:{old}");
        }
    }
    let mut preload = shim_dir.join("libcuda.so.1").display().to_string();
    if let Ok(old) = std::env::var("LD_PRELOAD") {
        if !old.is_empty() {
            preload = format!("{preload}:{old}");
        }
    }
    let _ = shim;
    vec![
        ("LD_PRELOAD".into(), preload),
        ("LD_LIBRARY_PATH".into(), ld),
        ("DEVPROXY_SOCKET".into(), socket.display().to_string()),
    ]
}

/// Starts `devproxy serve` on `socket` and waits until it listens.
pub fn spawn_server(
    socket: &Path,
    backend: Option<BackendKind>,
    device: u32,
) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--socket")
        .arg(socket)
        .arg("--device")
        .arg(device.to_string());
    if let Some(b) = backend {
        cmd.arg("--backend").arg(match b {
            BackendKind::Cuda => "cuda",
            BackendKind::Emulated => "emulated",
        });
    }
    // The server must load the real driver, never the shim.
    cmd.env_remove("LD_PRELOAD")
        .env_remove("DEVPROXY_SOCKET")
        .stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the embedded server: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server::control_path(socket).exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the embedded server exited at start ({status}); see its log above"
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!(
                "the embedded server did not listen on {} within 30 s",
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// `devproxy run`. Returns CMD's exit code (128 + signal when it was killed).
pub fn run(
    server_sock: Option<PathBuf>,
    backend: Option<BackendKind>,
    device: u32,
    cmd: Vec<String>,
) -> i32 {
    match run_inner(server_sock, backend, device, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("devproxy: error: {e}");
            125
        }
    }
}

fn run_inner(
    server_sock: Option<PathBuf>,
    backend: Option<BackendKind>,
    device: u32,
    cmd: Vec<String>,
) -> Result<i32, String> {
    use std::os::unix::process::ExitStatusExt;
    let shim = find_shim()?;
    let rt = server::runtime_dir();
    std::fs::create_dir_all(&rt).map_err(|e| format!("{}: {e}", rt.display()))?;
    let shim_dir = make_shim_dir(&shim, &rt)?;
    let (socket, mut embedded) = match server_sock {
        Some(s) => (s, None),
        None => {
            let s = rt.join(format!("run-{}.sock", std::process::id()));
            let child = spawn_server(&s, backend, device)?;
            (s, Some(child))
        }
    };
    let started = Instant::now();
    let mut child = Command::new(&cmd[0]);
    child.args(&cmd[1..]);
    for (k, v) in shim_env(&shim, &shim_dir, &socket) {
        child.env(k, v);
    }
    let status = child
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cmd[0]));
    let secs = started.elapsed().as_secs_f64();
    if let Some(mut srv) = embedded.take() {
        // SAFETY: sending SIGTERM to our own child; it removes its sockets and exits.
        unsafe {
            libc::kill(srv.id() as i32, libc::SIGTERM);
        }
        let _ = srv.wait();
    }
    let _ = std::fs::remove_dir_all(&shim_dir);
    let status = status?;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    eprintln!(
        "devproxy: `{}` exited with status {code} after {secs:.2} s",
        cmd.join(" ")
    );
    Ok(code)
}
