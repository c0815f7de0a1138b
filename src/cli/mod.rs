//! The `devproxy` command line: `serve`, `run`, `ps`, and the state-moving commands (`checkpoint`, `restore`,
//! `migrate`, `suspend`, `resume`, `inspect`) whose work lives in [`crate::checkpoint`].

pub mod run;

use crate::backend::{self, BackendKind, BackendOptions};
use crate::control::{self, ControlReply, ControlRequest};
use crate::server::{self, Server, ServerOptions};
use crate::transport::SegmentLayout;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// devproxy: run unmodified CUDA programs against a device proxy that can checkpoint, restore and migrate them.
#[derive(Parser, Debug)]
#[command(name = "devproxy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve one device: clients attach through the socket.
    Serve {
        /// `cuda` or `emulated`; default: cuda where a driver and a GPU exist, else emulated.
        #[arg(long)]
        backend: Option<BackendKind>,
        /// The GPU's ordinal (cuda backend).
        #[arg(long, default_value_t = 0)]
        device: u32,
        /// Socket path (default: $XDG_RUNTIME_DIR/devproxy/dev<N>.sock or /tmp/devproxy-<uid>/dev<N>.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The device's memory in GiB: what allocations may commit in all, and what cuDeviceTotalMem reports
        /// (default: emulated 16, cuda the device's; emulated: host memory is taken lazily). Restore needs the same.
        #[arg(long, visible_alias = "memory-gib")]
        arena_gib: Option<u64>,
        /// The arena's address space in GiB (default: 4 times the memory): room for cuMemAddressReserve, e.g.
        /// PyTorch's expandable segments. Only address space, nothing is committed.
        #[arg(long)]
        arena_space_gib: Option<u64>,
    },
    /// Run a command with the shim in front of the CUDA driver.
    Run {
        /// Socket of a running server; without it an embedded server is started for this command.
        #[arg(long)]
        server: Option<PathBuf>,
        /// `cuda` or `emulated`; default: cuda where a driver and a GPU exist, else emulated.
        #[arg(long)]
        backend: Option<BackendKind>,
        /// The GPU's ordinal (cuda backend).
        #[arg(long, default_value_t = 0)]
        device: u32,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// List sessions (processes) of the running servers.
    Ps {
        /// Only this server's socket (default: every server in the runtime directory).
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// Write a process's device state to an image directory.
    Checkpoint {
        /// The socket of the server holding the process (default: whichever running server serves the pid).
        #[arg(long)]
        server: Option<PathBuf>,
        /// The process (its pid, as `devproxy ps` shows it).
        #[arg(long, required_unless_present = "job")]
        pid: Option<u32>,
        /// Checkpoint every rank of an NCCL job (see `devproxy ps`), stopped before the same collective.
        #[arg(long, conflicts_with = "pid")]
        job: Option<String>,
        /// Seconds the job barrier waits for every rank.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Image directory to write (created; an existing image in it is replaced only once the new one is complete).
        #[arg(long)]
        out: PathBuf,
        /// Keep the process paused at the barrier afterwards (preemption).
        #[arg(long)]
        stop: bool,
    },
    /// Start a server that restores an image; the paused process re-attaches to it.
    ///
    /// DIR is one process's image directory, or an NCCL job image (`devproxy checkpoint --job ID --out DIR`: a
    /// job.manifest and rank-R/ per rank). A job image restores every rank with one command: one restore server per
    /// server socket the ranks' processes poll (as recorded in their images), in the foreground until all end; each
    /// restored rank re-creates its communicators with the others under new unique ids (rank 0's server makes each
    /// and leaves it in DIR for the other ranks, so DIR must be writable) and continues from the collective the job
    /// was stopped before. Kill the old servers first (their sockets are reused). To restore ranks on several
    /// machines (or each with its own environment, e.g. NCCL_HOSTID), run `devproxy restore DIR --ranks R,...` for
    /// each group of ranks, all with the same DEVPROXY_RESTORE_ATTEMPT=NAME (a name new to this image).
    Restore {
        /// The image directory (one process's, or an NCCL job's).
        dir: PathBuf,
        /// Job image only: restore just these ranks (comma-separated), in one server.
        #[arg(long, value_delimiter = ',')]
        ranks: Option<Vec<i32>>,
        /// Socket to serve the restored process on (default: the one it used, recorded in the image).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// `cuda` or `emulated`; default: cuda where a driver and a GPU exist, else emulated.
        #[arg(long)]
        backend: Option<BackendKind>,
        /// The GPU's ordinal (cuda backend).
        #[arg(long, default_value_t = 0)]
        device: u32,
        /// A restore drill: rebuild the image's device state on this device, check every CRC, print the summary,
        /// then release it all and exit. The paused process is not touched and nothing is served (one process's
        /// image, or a rank's directory of a job image).
        #[arg(long, conflicts_with_all = ["ranks", "socket"])]
        trial: bool,
    },
    /// Move a running process's device state to another server; the process continues there.
    ///
    /// An NCCL rank (`--pid` of its process, or `--job ID --rank R`) takes its communicators along: they rejoin the
    /// job's clique from the target server while the other ranks run on.
    Migrate {
        /// The socket of the server holding the process (default: whichever running server serves the pid).
        #[arg(long)]
        server: Option<PathBuf>,
        /// The process (its pid, as `devproxy ps` shows it).
        #[arg(long, required_unless_present = "job")]
        pid: Option<u32>,
        /// The NCCL job of the rank to move (see `devproxy ps`); with --rank.
        #[arg(long, conflicts_with = "pid", requires = "rank")]
        job: Option<String>,
        /// The rank to move (with --job).
        #[arg(long, requires = "job")]
        rank: Option<i32>,
        /// The target server's socket (a `devproxy serve` on this or another GPU).
        #[arg(long)]
        to: PathBuf,
    },
    /// Move a process's device memory to host memory and free the device until `resume`.
    Suspend {
        /// The socket of the server holding the process (default: whichever running server serves the pid).
        #[arg(long)]
        server: Option<PathBuf>,
        /// The process (its pid, as `devproxy ps` shows it).
        #[arg(long)]
        pid: u32,
    },
    /// Continue a suspended or paused process.
    Resume {
        /// The socket of the server holding the process (default: whichever running server serves the pid).
        #[arg(long)]
        server: Option<PathBuf>,
        /// The process (its pid, as `devproxy ps` shows it).
        #[arg(long)]
        pid: u32,
    },
    /// Show what an image holds.
    Inspect {
        /// The image directory.
        dir: PathBuf,
    },
    /// Stop a server.
    Shutdown {
        /// The server's socket (default: device 0's).
        #[arg(long)]
        server: Option<PathBuf>,
    },
}

/// Sets up logging to stderr; DEVPROXY_LOG (or RUST_LOG syntax) sets the level, default info.
pub fn init_logging() {
    let filter = std::env::var("DEVPROXY_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Picks and creates the backend, saying loudly which one runs. `arena_gib`: the device's memory in GiB (None: the
/// backend's default); the address space is the default multiple of it.
pub fn make_backend(
    kind: Option<BackendKind>,
    device: u32,
    arena_gib: Option<u64>,
) -> Result<std::sync::Arc<dyn backend::Backend>, String> {
    make_backend_with(kind, device, arena_gib, None)
}

/// [`make_backend`] with the arena's address space in GiB (None: the default multiple of the memory).
pub fn make_backend_with(
    kind: Option<BackendKind>,
    device: u32,
    arena_gib: Option<u64>,
    arena_space_gib: Option<u64>,
) -> Result<std::sync::Arc<dyn backend::Backend>, String> {
    let kind = match kind {
        Some(k) => k,
        None => {
            let (k, why) = backend::auto_detect();
            tracing::info!("{why}");
            k
        }
    };
    let opts = BackendOptions {
        device,
        arena_bytes: arena_gib.unwrap_or(0) << 30,
        arena_space: arena_space_gib.unwrap_or(0) << 30,
        threads: 0,
    };
    let b = backend::create(kind, &opts)?;
    let info = b.info();
    tracing::info!(
        "devproxy backend {}: device {} '{}', {} of memory, {} arena (address space) at {:#x}",
        info.backend,
        device,
        info.name,
        control::human_bytes(info.total_mem),
        control::human_bytes(info.arena_bytes),
        info.arena_base
    );
    if info.backend == "emulated" {
        tracing::warn!(
            "EMULATED device: kernels run on the CPU through the PTX interpreter, not on a GPU"
        );
    }
    Ok(b)
}

/// Runs the command line; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    init_logging();
    let r = match cli.cmd {
        Command::Serve {
            backend,
            device,
            socket,
            arena_gib,
            arena_space_gib,
        } => serve(backend, device, socket, arena_gib, arena_space_gib),
        Command::Run {
            server,
            backend,
            device,
            cmd,
        } => return run::run(server, backend, device, cmd),
        Command::Ps { server } => ps(server),
        Command::Checkpoint {
            server,
            pid,
            job,
            timeout,
            out,
            stop,
        } => {
            let out = absolute(out);
            match (job, pid) {
                (Some(job), _) => {
                    let servers = server.map_or_else(control::discover, |s| vec![s]);
                    let d = std::time::Duration::from_secs(timeout);
                    crate::nccl::job::checkpoint(&servers, &job, &out, stop, d)
                        .map(|m| println!("{m}"))
                }
                (None, Some(pid)) => state_cmd(
                    server,
                    pid,
                    ControlRequest::Checkpoint {
                        pid,
                        out: out.display().to_string(),
                        stop,
                    },
                ),
                (None, None) => Err("--pid or --job is required".into()),
            }
        }
        Command::Migrate {
            server,
            pid,
            job,
            rank,
            to,
        } => {
            let to = absolute(to).display().to_string();
            let target = match (pid, job, rank) {
                (Some(pid), _, _) => Ok((server, pid)),
                (None, Some(job), Some(rank)) => {
                    let servers = server.map_or_else(control::discover, |s| vec![s]);
                    crate::nccl::restore::find_rank(&servers, &job, rank).map(|(s, p)| (Some(s), p))
                }
                _ => Err("--pid, or --job with --rank, is required".to_string()),
            };
            target.and_then(|(server, pid)| {
                state_cmd(server, pid, ControlRequest::Migrate { pid, to })
            })
        }
        Command::Suspend { server, pid } => state_cmd(server, pid, ControlRequest::Suspend { pid }),
        Command::Resume { server, pid } => state_cmd(server, pid, ControlRequest::Resume { pid }),
        Command::Restore {
            dir,
            ranks,
            socket,
            backend,
            device,
            trial,
        } => {
            if trial && crate::nccl::restore::is_job_dir(&dir) {
                Err(format!(
                    "{}: --trial restores one process's image; name a rank's directory ({}/rank-R)",
                    dir.display(),
                    dir.display()
                ))
            } else if crate::nccl::restore::is_job_dir(&dir) {
                crate::nccl::restore::restore_job_cmd(&dir, ranks, socket, backend, device)
            } else if ranks.is_some() {
                Err(format!(
                    "{}: --ranks needs a job image (no job.manifest there)",
                    dir.display()
                ))
            } else {
                crate::checkpoint::restore_cmd(&dir, socket, backend, device, trial)
            }
        }
        Command::Inspect { dir } => crate::checkpoint::inspect_cmd(&dir),
        Command::Shutdown { server } => shutdown(server),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("devproxy: error: {e}");
            1
        }
    }
}

fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// `devproxy serve`.
pub fn serve(
    kind: Option<BackendKind>,
    device: u32,
    socket: Option<PathBuf>,
    arena_gib: Option<u64>,
    arena_space_gib: Option<u64>,
) -> Result<(), String> {
    let b = make_backend_with(kind, device, arena_gib, arena_space_gib)?;
    let socket = socket.unwrap_or_else(|| server::default_socket(device));
    let srv = Server::new(
        b,
        ServerOptions {
            socket: socket.clone(),
            layout: SegmentLayout::from_env(),
        },
    );
    install_signal_cleanup(&socket);
    tracing::info!("listening on {}", socket.display());
    srv.serve()
}

/// Removes the sockets on SIGINT/SIGTERM so a later server can bind the same path.
fn install_signal_cleanup(socket: &std::path::Path) {
    use std::sync::OnceLock;
    static PATHS: OnceLock<(std::ffi::CString, std::ffi::CString)> = OnceLock::new();
    let a = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let b = std::ffi::CString::new(server::control_path(socket).as_os_str().as_encoded_bytes())
        .unwrap_or_default();
    let _ = PATHS.set((a, b));
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some((a, b)) = PATHS.get() {
            // SAFETY: unlink and _exit are async-signal-safe; the CStrings live in a static.
            unsafe {
                libc::unlink(a.as_ptr());
                libc::unlink(b.as_ptr());
                libc::_exit(0);
            }
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn ps(server: Option<PathBuf>) -> Result<(), String> {
    let servers = match server {
        Some(s) => vec![s],
        None => control::discover(),
    };
    if servers.is_empty() {
        println!("no devproxy servers in {}", server::runtime_dir().display());
        return Ok(());
    }
    for s in servers {
        match control::request(&s, &ControlRequest::Ps, &mut |_, _| {})? {
            ControlReply::Ps {
                server_pid,
                backend,
                device,
                sessions,
            } => {
                println!(
                    "server {} (pid {server_pid}, {backend}: {device})",
                    s.display()
                );
                println!(
                    "  {:>7} {:>8} {:>12} {:>10}  {:<10} COMMAND",
                    "SESSION", "PID", "DEVICE MEM", "CALLS", "STATE"
                );
                for r in sessions {
                    println!(
                        "  {:>7} {:>8} {:>12} {:>10}  {:<10} {}",
                        r.session,
                        r.pid,
                        control::human_bytes(r.device_bytes),
                        r.calls,
                        r.state,
                        r.command
                    );
                }
            }
            ControlReply::Err(e) => return Err(e),
            other => return Err(format!("unexpected answer {other:?}")),
        }
        let jobs = crate::nccl::job::status(std::slice::from_ref(&s));
        if !jobs.is_empty() {
            println!(
                "  {:<28} {:>9} {:>8} {:>7} {:>12}  STATE",
                "NCCL JOB", "RANK", "PID", "SESSION", "COLLECTIVES"
            );
            for (_, j) in jobs {
                let rank = format!("{}/{}", j.rank, j.nranks);
                let state = if j.held { "held at barrier" } else { "running" };
                println!(
                    "  {:<28} {rank:>9} {:>8} {:>7} {:>12}  {state}",
                    j.job, j.pid, j.session, j.collectives
                );
            }
        }
    }
    Ok(())
}

fn shutdown(server: Option<PathBuf>) -> Result<(), String> {
    let s = server.unwrap_or_else(|| server::default_socket(0));
    match control::request(&s, &ControlRequest::Shutdown, &mut |_, _| {})? {
        ControlReply::Ok(m) => {
            println!("{m}");
            Ok(())
        }
        ControlReply::Err(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Runs a state-moving control command with a progress line on a terminal and a summary at the end.
fn state_cmd(server: Option<PathBuf>, pid: u32, req: ControlRequest) -> Result<(), String> {
    use std::io::{IsTerminal, Write};
    let srv = control::find_server_for_pid(server.as_deref(), pid)?;
    let tty = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut progress = |done: u64, total: u64| {
        if tty && total > 0 {
            let pct = done as f64 * 100.0 / total as f64;
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e9;
            eprint!(
                "\r  {pct:5.1}%  {} of {}  {rate:.2} GB/s   ",
                control::human_bytes(done),
                control::human_bytes(total)
            );
            let _ = std::io::stderr().flush();
        }
    };
    let r = control::request(&srv, &req, &mut progress)?;
    if tty {
        eprint!("\r{:60}\r", "");
    }
    match r {
        ControlReply::Done(summary) => {
            println!("{summary}");
            if let Some(hint) = slow_preparation_hint(&summary) {
                eprintln!("devproxy: hint: {hint}");
            }
            Ok(())
        }
        ControlReply::Ok(m) => {
            println!("{m}");
            Ok(())
        }
        ControlReply::Err(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// For a checkpoint whose image preparation took over a second on a tmpfs without huge pages: how to make it several
/// times faster (measured on the H100 host: 16 GiB in 4-5.8 s on /dev/shm, 0.85-1.3 s with huge pages).
fn slow_preparation_hint(summary: &control::Summary) -> Option<String> {
    let prepare = summary.phases.iter().find(|(n, _)| n == "prepare")?.1;
    if prepare < 1.0 || summary.path.is_empty() {
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mount = tmpfs_without_huge_pages(&mounts, std::path::Path::new(&summary.path))?;
    Some(format!(
        "preparing the image took {prepare:.1} s on {mount}, a tmpfs without huge pages; images on a tmpfs mounted \
         with huge pages prepare several times faster: mount -t tmpfs -o size=64g,huge=always tmpfs /mnt/images"
    ))
}

/// The mount point holding `path` if it is a tmpfs without huge pages (`huge=always` or `within_size`), from the
/// text of /proc/self/mounts.
fn tmpfs_without_huge_pages(mounts: &str, path: &std::path::Path) -> Option<String> {
    // The longest mount point that holds `path`: (mount point, type, options).
    let (mount, fstype, opts) = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            Some((f.next()?, f.next()?, f.next()?))
        })
        .filter(|(mp, _, _)| path.starts_with(mp))
        .max_by_key(|(mp, _, _)| mp.len())?;
    let huge = opts
        .split(',')
        .any(|o| o == "huge=always" || o == "huge=within_size");
    (fstype == "tmpfs" && !huge).then(|| mount.to_string())
}

#[cfg(test)]
mod tests {
    use super::tmpfs_without_huge_pages;
    use std::path::Path;

    #[test]
    fn the_huge_page_hint_names_the_tmpfs_holding_the_image() {
        let mounts = "/dev/vda / ext4 rw 0 0\n\
                      tmpfs /dev/shm tmpfs rw,nosuid,size=24g 0 0\n\
                      tmpfs /mnt/images tmpfs rw,size=64g,huge=always 0 0\n\
                      tmpfs /mnt/within tmpfs rw,huge=within_size 0 0\n";
        let at = |p: &str| tmpfs_without_huge_pages(mounts, Path::new(p));
        assert_eq!(
            at("/dev/shm/job/image.devproxy").as_deref(),
            Some("/dev/shm")
        );
        assert_eq!(
            at("/mnt/images/job/image.devproxy"),
            None,
            "huge pages already"
        );
        assert_eq!(at("/mnt/within/image.devproxy"), None);
        assert_eq!(at("/home/u/job/image.devproxy"), None, "not tmpfs");
    }
}
