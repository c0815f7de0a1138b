//! NCCL on the `cuda` backend: the real library, in the server.
//!
//! The shim forwards the application's NCCL calls as `Request::Nccl*`; on a server whose backend is `cuda` they are
//! carried out by the real `libnccl.so.2`, loaded here with `dlopen` (never at start: a server without NCCL runs
//! everything else). cudarc's own loader panics when the library is missing, so this module keeps its own small
//! table of the functions it calls, looked up with `dlsym`, and turns a missing library or symbol into an error that
//! says what to do ([`lib`]).
//!
//! - `ncclGetUniqueId` is the real one: the 128 bytes go back to the application, which shares them through its own
//!   channel, so ranks may live on several machines (each rank's server is its own NCCL process).
//! - `ncclCommInitRank` runs on the session thread with the device's primary context current (NCCL takes the device
//!   from the current context); the communicator stays in the server behind the session's virtual handle.
//! - A group (`ncclGroupStart`, its operations, `ncclGroupEnd`) enqueues NCCL's kernels on the *real* streams behind
//!   the session's stream handles ([`Backend::raw_stream`]). Device pointers need no translation: the arena has the
//!   same addresses in the application and in the server.
//! - Errors: a failing call is logged with NCCL's own message; what the application sees is a `CuError` the shim
//!   turns back into the nearest `ncclResult_t` ([`to_cu`]). `ncclCommGetAsyncError` passes NCCL's code through.

use super::{DType, NcclOp, OpKind, RedOp, Scalar, UNIQUE_ID_BYTES};
use crate::backend::Backend;
use crate::protocol::CuError;
use parking_lot::Mutex;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, OnceLock};

/// Where the library is looked for: this variable's path, else `libnccl.so.2` on the loader's search path.
pub const LIB_ENV: &str = "DEVPROXY_NCCL_LIB";
const DEFAULT_NAME: &str = "libnccl.so.2";
/// The oldest NCCL this code calls correctly (ncclAvg, bfloat16, PreMulSum, ncclCommGetAsyncError: 2.12).
const MIN_VERSION: c_int = 21200;

type Comm = *mut c_void;
type Stream = *mut c_void;

/// `ncclUniqueId`, passed by value to `ncclCommInitRank` (a 128-byte struct: in memory, per the C ABI).
#[repr(C)]
#[derive(Clone, Copy)]
struct RawId {
    internal: [u8; UNIQUE_ID_BYTES],
}

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut RawId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, RawId, c_int) -> c_int;
type CommFn = unsafe extern "C" fn(Comm) -> c_int;
type CommInt = unsafe extern "C" fn(Comm, *mut c_int) -> c_int;
type CommSplit = unsafe extern "C" fn(Comm, c_int, c_int, *mut Comm, *mut c_void) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type LastError = unsafe extern "C" fn(Comm) -> *const c_char;
type Group = unsafe extern "C" fn() -> c_int;
/// AllReduce(send, recv, count, type, op, comm, stream); also ReduceScatter (count = recvcount).
type ReduceLike =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
/// Broadcast(send, recv, count, type, root, comm, stream).
type Broadcast =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
/// Reduce(send, recv, count, type, op, root, comm, stream).
type Reduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    c_int,
    Comm,
    Stream,
) -> c_int;
/// AllGather(send, recv, sendcount, type, comm, stream).
type AllGather =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int;
/// Send(send, count, type, peer, comm, stream) / Recv(recv, count, type, peer, comm, stream).
type P2p = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
/// RedOpCreatePreMulSum(&op, scalar, type, residence, comm).
type PreMulSum = unsafe extern "C" fn(*mut c_int, *mut c_void, c_int, c_int, Comm) -> c_int;
type RedOpDestroy = unsafe extern "C" fn(c_int, Comm) -> c_int;

/// The loaded library: the functions this module calls.
pub struct Lib {
    pub path: String,
    /// `ncclGetVersion`, e.g. 22805 for 2.28.5.
    pub version: c_int,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommFn,
    comm_abort: CommFn,
    comm_get_async_error: CommInt,
    comm_count: CommInt,
    comm_user_rank: CommInt,
    comm_split: Option<CommSplit>,
    get_error_string: ErrorString,
    get_last_error: Option<LastError>,
    group_start: Group,
    group_end: Group,
    all_reduce: ReduceLike,
    broadcast: Broadcast,
    reduce: Reduce,
    all_gather: AllGather,
    reduce_scatter: ReduceLike,
    send: P2p,
    recv: P2p,
    red_op_create_pre_mul_sum: PreMulSum,
    red_op_destroy: RedOpDestroy,
}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// The library, loaded on first use from `$DEVPROXY_NCCL_LIB` or `libnccl.so.2`; the error says how to fix it.
pub fn lib() -> Result<&'static Lib, String> {
    LIB.get_or_init(|| {
        let r = load(
            std::env::var(LIB_ENV)
                .ok()
                .filter(|p| !p.is_empty())
                .as_deref(),
        );
        match &r {
            Ok(l) => tracing::info!("NCCL {} loaded from {}", version_text(l.version), l.path),
            Err(e) => tracing::error!("{e}"),
        }
        r
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// "2.28.5" from NCCL_VERSION_CODE (2.9 and later: major * 10000 + minor * 100 + patch).
pub fn version_text(v: c_int) -> String {
    format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
}

/// Loads `path` (or `libnccl.so.2` by name) and looks every function up.
pub fn load(path: Option<&str>) -> Result<Lib, String> {
    let name = path.unwrap_or(DEFAULT_NAME);
    let hint = format!(
        "set {LIB_ENV} to libnccl.so.2, e.g. .../site-packages/nvidia/nccl/lib/libnccl.so.2 (the pip package \
         nvidia-nccl-cu12/cu13)"
    );
    let c = CString::new(name).map_err(|_| format!("NCCL not found: bad path {name:?}; {hint}"))?;
    // SAFETY: dlopen with a valid C string; RTLD_LOCAL keeps NCCL's symbols out of the global scope. The handle is
    // never closed: the functions stay valid for the life of the process.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns NULL or a valid C string owned by libc.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            String::from("dlopen failed")
        } else {
            // SAFETY: non-null C string from dlerror.
            unsafe { CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!("NCCL not found ({why}): {hint}"));
    }
    let mut missing = Vec::new();
    let mut sym = |s: &str| -> *mut c_void {
        let cs = CString::new(s).expect("symbol names have no NUL");
        // SAFETY: a valid handle from dlopen and a C string.
        let p = unsafe { libc::dlsym(h, cs.as_ptr()) };
        if p.is_null() {
            missing.push(s.to_string());
        }
        p
    };
    let raw = [
        sym("ncclGetVersion"),
        sym("ncclGetUniqueId"),
        sym("ncclCommInitRank"),
        sym("ncclCommDestroy"),
        sym("ncclCommAbort"),
        sym("ncclCommGetAsyncError"),
        sym("ncclCommCount"),
        sym("ncclCommUserRank"),
        sym("ncclGetErrorString"),
        sym("ncclGroupStart"),
        sym("ncclGroupEnd"),
        sym("ncclAllReduce"),
        sym("ncclBroadcast"),
        sym("ncclReduce"),
        sym("ncclAllGather"),
        sym("ncclReduceScatter"),
        sym("ncclSend"),
        sym("ncclRecv"),
        sym("ncclRedOpCreatePreMulSum"),
        sym("ncclRedOpDestroy"),
    ];
    if !missing.is_empty() {
        return Err(format!(
            "{name} is not a usable NCCL: it lacks {} (NCCL {} or newer is needed); {hint}",
            missing.join(", "),
            version_text(MIN_VERSION)
        ));
    }
    // Optional: ncclCommSplit (2.18), ncclGetLastError (2.13).
    let opt = |s: &str| -> *mut c_void {
        let cs = CString::new(s).expect("symbol names have no NUL");
        // SAFETY: as above.
        unsafe { libc::dlsym(h, cs.as_ptr()) }
    };
    let (split, last) = (opt("ncclCommSplit"), opt("ncclGetLastError"));
    // SAFETY: each pointer is the named NCCL function (non-null, checked above), whose C prototype the type spells
    // (nccl.h; enums are C ints, ncclComm_t/cudaStream_t are pointers).
    let lib = unsafe {
        use std::mem::transmute as t;
        Lib {
            path: name.to_string(),
            version: 0,
            get_unique_id: t::<*mut c_void, GetUniqueId>(raw[1]),
            comm_init_rank: t::<*mut c_void, CommInitRank>(raw[2]),
            comm_destroy: t::<*mut c_void, CommFn>(raw[3]),
            comm_abort: t::<*mut c_void, CommFn>(raw[4]),
            comm_get_async_error: t::<*mut c_void, CommInt>(raw[5]),
            comm_count: t::<*mut c_void, CommInt>(raw[6]),
            comm_user_rank: t::<*mut c_void, CommInt>(raw[7]),
            get_error_string: t::<*mut c_void, ErrorString>(raw[8]),
            group_start: t::<*mut c_void, Group>(raw[9]),
            group_end: t::<*mut c_void, Group>(raw[10]),
            all_reduce: t::<*mut c_void, ReduceLike>(raw[11]),
            broadcast: t::<*mut c_void, Broadcast>(raw[12]),
            reduce: t::<*mut c_void, Reduce>(raw[13]),
            all_gather: t::<*mut c_void, AllGather>(raw[14]),
            reduce_scatter: t::<*mut c_void, ReduceLike>(raw[15]),
            send: t::<*mut c_void, P2p>(raw[16]),
            recv: t::<*mut c_void, P2p>(raw[17]),
            red_op_create_pre_mul_sum: t::<*mut c_void, PreMulSum>(raw[18]),
            red_op_destroy: t::<*mut c_void, RedOpDestroy>(raw[19]),
            comm_split: (!split.is_null()).then(|| t::<*mut c_void, CommSplit>(split)),
            get_last_error: (!last.is_null()).then(|| t::<*mut c_void, LastError>(last)),
        }
    };
    let mut version = 0;
    // SAFETY: ncclGetVersion (checked non-null) with a valid out-pointer.
    let r = unsafe { t_get_version(raw[0])(&mut version) };
    if r != 0 || version < MIN_VERSION {
        return Err(format!(
            "{name}: NCCL {} (ncclGetVersion returned {r}) is too old: {} or newer is needed; {hint}",
            version_text(version),
            version_text(MIN_VERSION)
        ));
    }
    Ok(Lib { version, ..lib })
}

/// # Safety
/// `p` is `ncclGetVersion`.
unsafe fn t_get_version(p: *mut c_void) -> GetVersion {
    // SAFETY: forwarded contract.
    unsafe { std::mem::transmute::<*mut c_void, GetVersion>(p) }
}

/// The `CuError` a failed NCCL call is reported as; the shim (`interpose/src/imp/nccl.rs`) maps it back to the
/// nearest `ncclResult_t`: ncclInvalidArgument, ncclInvalidUsage, else ncclSystemError.
pub fn to_cu(r: c_int) -> CuError {
    match r {
        4 => CuError::INVALID_VALUE,
        5 => CuError::NOT_SUPPORTED,
        _ => CuError::UNKNOWN,
    }
}

/// NCCL's `ncclDataType_t` for a type (ncclInt8 = 0 ... ncclBfloat16 = 9, in [`DType::ALL`]'s order).
pub fn dtype_code(d: DType) -> c_int {
    DType::ALL.iter().position(|&x| x == d).expect("in ALL") as c_int
}

/// NCCL's `ncclRedOp_t` for a built-in op (ncclSum 0, ncclProd 1, ncclMax 2, ncclMin 3, ncclAvg 4); `None` for a
/// PreMulSum, which is made per group with `ncclRedOpCreatePreMulSum`.
pub fn op_code(op: &RedOp) -> Option<c_int> {
    Some(match op {
        RedOp::Sum => 0,
        RedOp::Prod => 1,
        RedOp::Max => 2,
        RedOp::Min => 3,
        RedOp::Avg => 4,
        RedOp::PreMulSum(_) => return None,
    })
}

impl Lib {
    /// NCCL's message for a result, with the last error's detail where the library has ncclGetLastError.
    fn why(&self, r: c_int, comm: Comm) -> String {
        // SAFETY: ncclGetErrorString returns a static C string for any value.
        let s = unsafe { (self.get_error_string)(r) };
        let mut m = if s.is_null() {
            format!("NCCL error {r}")
        } else {
            // SAFETY: non-null static C string.
            format!("{} ({r})", unsafe { CStr::from_ptr(s) }.to_string_lossy())
        };
        if let Some(last) = self.get_last_error {
            // SAFETY: ncclGetLastError accepts any communicator (or NULL) and returns a C string.
            let d = unsafe { last(comm) };
            if !d.is_null() {
                // SAFETY: non-null C string owned by NCCL.
                let d = unsafe { CStr::from_ptr(d) }.to_string_lossy();
                if !d.is_empty() {
                    m = format!("{m}: {d}");
                }
            }
        }
        m
    }

    fn check(&self, r: c_int, what: &str, comm: Comm) -> Result<(), (CuError, String)> {
        if r == 0 {
            Ok(())
        } else {
            Err((to_cu(r), format!("{what}: {}", self.why(r, comm))))
        }
    }

    /// A new unique id (ncclGetUniqueId): the bootstrap root is a thread of this server.
    pub fn unique_id(&self) -> Result<[u8; UNIQUE_ID_BYTES], (CuError, String)> {
        let mut id = RawId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: valid out-pointer to a 128-byte ncclUniqueId.
        let r = unsafe { (self.get_unique_id)(&mut id) };
        self.check(r, "ncclGetUniqueId", std::ptr::null_mut())?;
        Ok(id.internal)
    }
}

/// A communicator made by ncclCommSplit, with its rank and size.
pub type Split = (RealComm, i32, i32);

/// A real communicator, owned by the server. Dropping it aborts it unless it was destroyed (the process went away
/// without ncclCommDestroy: its operations may never complete, so it must not wait for them).
pub struct RealComm {
    lib: &'static Lib,
    /// The `ncclComm_t`; `None` once destroyed.
    raw: Mutex<Option<usize>>,
    /// Keeps the device's context alive while NCCL holds resources in it.
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for RealComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RealComm({:#x?})", *self.raw.lock())
    }
}

impl RealComm {
    /// ncclCommInitRank with the device's context current on this thread. Waits for every rank, as NCCL does.
    pub fn init(
        lib: &'static Lib,
        backend: Arc<dyn Backend>,
        id: &[u8; UNIQUE_ID_BYTES],
        nranks: i32,
        rank: i32,
    ) -> Result<RealComm, (CuError, String)> {
        backend
            .bind_thread()
            .map_err(|e| (e, format!("making the device's context current: {e}")))?;
        let mut comm: Comm = std::ptr::null_mut();
        let id = RawId { internal: *id };
        // SAFETY: valid out-pointer; the id is passed by value as NCCL's prototype says.
        let r = unsafe { (lib.comm_init_rank)(&mut comm, nranks, id, rank) };
        lib.check(r, "ncclCommInitRank", std::ptr::null_mut())?;
        Ok(RealComm {
            lib,
            raw: Mutex::new(Some(comm as usize)),
            backend,
        })
    }

    fn raw(&self) -> Result<Comm, (CuError, String)> {
        self.raw.lock().map(|c| c as Comm).ok_or((
            CuError::INVALID_HANDLE,
            "the communicator was destroyed".into(),
        ))
    }

    /// ncclCommGetAsyncError's code (0 = none, 6 = ncclRemoteError, ...).
    pub fn async_error(&self) -> Result<i32, (CuError, String)> {
        let c = self.raw()?;
        let mut e: c_int = 0;
        // SAFETY: a live communicator and a valid out-pointer.
        let r = unsafe { (self.lib.comm_get_async_error)(c, &mut e) };
        self.lib.check(r, "ncclCommGetAsyncError", c)?;
        Ok(e)
    }

    /// ncclCommSplit: the new communicator with its rank and size, or `None` for NCCL_SPLIT_NOCOLOR (-1).
    pub fn split(&self, color: i32, key: i32) -> Result<Option<Split>, (CuError, String)> {
        let split = self.lib.comm_split.ok_or((
            CuError::NOT_SUPPORTED,
            format!(
                "ncclCommSplit: NCCL {} has none (2.18 or newer)",
                version_text(self.lib.version)
            ),
        ))?;
        let c = self.raw()?;
        self.backend
            .bind_thread()
            .map_err(|e| (e, format!("making the device's context current: {e}")))?;
        let mut n: Comm = std::ptr::null_mut();
        // SAFETY: a live communicator, a valid out-pointer, NULL config (inherit the parent's).
        let r = unsafe { split(c, color, key, &mut n, std::ptr::null_mut()) };
        self.lib.check(r, "ncclCommSplit", c)?;
        if n.is_null() {
            return Ok(None);
        }
        let new = RealComm {
            lib: self.lib,
            raw: Mutex::new(Some(n as usize)),
            backend: self.backend.clone(),
        };
        let (mut rank, mut count) = (0, 0);
        // SAFETY: the new live communicator and valid out-pointers.
        let r = unsafe { (self.lib.comm_user_rank)(n, &mut rank) };
        self.lib.check(r, "ncclCommUserRank", n)?;
        // SAFETY: as above.
        let r = unsafe { (self.lib.comm_count)(n, &mut count) };
        self.lib.check(r, "ncclCommCount", n)?;
        Ok(Some((new, rank, count)))
    }

    /// ncclCommDestroy (waits for the communicator's operations), or ncclCommAbort when it has an async error (its
    /// peers may be gone).
    pub fn destroy(&self) -> Result<(), (CuError, String)> {
        let failed = self.async_error().map(|e| e != 0).unwrap_or(true);
        let Some(c) = self.raw.lock().take() else {
            return Err((CuError::INVALID_HANDLE, "destroyed twice".into()));
        };
        let _ = self.backend.bind_thread();
        let (f, what) = if failed {
            (self.lib.comm_abort, "ncclCommAbort")
        } else {
            (self.lib.comm_destroy, "ncclCommDestroy")
        };
        // SAFETY: a live communicator, released exactly once (taken out of `raw`).
        let r = unsafe { f(c as Comm) };
        self.lib.check(r, what, std::ptr::null_mut())
    }
}

impl Drop for RealComm {
    fn drop(&mut self) {
        if let Some(c) = self.raw.get_mut().take() {
            let _ = self.backend.bind_thread();
            // SAFETY: a live communicator, released exactly once.
            let r = unsafe { (self.lib.comm_abort)(c as Comm) };
            if r != 0 {
                tracing::warn!("ncclCommAbort: {}", self.lib.why(r, std::ptr::null_mut()));
            }
        }
    }
}

/// One operation of a group, resolved: the real stream, the communicator and what to do.
pub struct RealOp<'a> {
    pub stream: usize,
    pub comm: &'a RealComm,
    pub op: &'a NcclOp,
}

/// Issues a group: PreMulSum ops are created first, then ncclGroupStart, every operation on its real stream,
/// ncclGroupEnd (also after a failed operation, so NCCL's group state is closed), then the created ops are destroyed.
pub fn run_group(lib: &'static Lib, ops: &[RealOp<'_>]) -> Result<(), (CuError, String)> {
    let mut made: Vec<(c_int, Comm)> = Vec::new();
    let r = issue(lib, ops, &mut made);
    for (op, comm) in made {
        // SAFETY: an op made on this live communicator; NCCL allows destroying it once the calls using it returned.
        let _ = unsafe { (lib.red_op_destroy)(op, comm) };
    }
    r
}

fn issue(
    lib: &'static Lib,
    ops: &[RealOp<'_>],
    made: &mut Vec<(c_int, Comm)>,
) -> Result<(), (CuError, String)> {
    let mut codes = Vec::with_capacity(ops.len());
    for o in ops {
        let comm = o.comm.raw()?;
        let dt = dtype_code(o.op.dtype);
        let code = match &o.op.op {
            RedOp::PreMulSum(s) => {
                let mut host = [0u8; 8];
                let (ptr, residence) = match s {
                    // ncclScalarDevice: read by the kernels; the pointer is the same in the arena here.
                    Scalar::Device(p) => (*p as usize as *mut c_void, 0),
                    // ncclScalarHostImmediate: read now.
                    Scalar::Host(b) => {
                        let n = b.len().min(8);
                        host[..n].copy_from_slice(&b[..n]);
                        (host.as_mut_ptr().cast::<c_void>(), 1)
                    }
                };
                let mut op: c_int = 0;
                // SAFETY: a live communicator; `ptr` is a device pointer the dispatcher checked, or host bytes that
                // live through the call (host-immediate scalars are read during it).
                let r =
                    unsafe { (lib.red_op_create_pre_mul_sum)(&mut op, ptr, dt, residence, comm) };
                lib.check(r, "ncclRedOpCreatePreMulSum", comm)?;
                made.push((op, comm));
                op
            }
            other => op_code(other).expect("built-in op"),
        };
        codes.push((comm, code));
    }
    // SAFETY: no arguments.
    let r = unsafe { (lib.group_start)() };
    lib.check(r, "ncclGroupStart", std::ptr::null_mut())?;
    let mut first: Result<(), (CuError, String)> = Ok(());
    // Nothing below returns before ncclGroupEnd: the communicators were resolved above.
    for (o, &(comm, code)) in ops.iter().zip(&codes) {
        let (s, st) = (o.op.send as usize as *mut c_void, o.stream as Stream);
        let r_ = o.op.recv as usize as *mut c_void;
        let (n, dt) = (o.op.count as usize, dtype_code(o.op.dtype));
        // SAFETY: the dispatcher checked that the buffers lie in the session's device memory for the op's extents,
        // and that roots and peers are in range; the communicator is live and the stream is the session's real
        // stream, current context bound by `raw_stream`.
        let (r, what) = unsafe {
            match o.op.kind {
                OpKind::AllReduce => (
                    (lib.all_reduce)(s, r_, n, dt, code, comm, st),
                    "ncclAllReduce",
                ),
                OpKind::Broadcast { root } => (
                    (lib.broadcast)(s, r_, n, dt, root, comm, st),
                    "ncclBroadcast",
                ),
                OpKind::Reduce { root } => (
                    (lib.reduce)(s, r_, n, dt, code, root, comm, st),
                    "ncclReduce",
                ),
                OpKind::AllGather => ((lib.all_gather)(s, r_, n, dt, comm, st), "ncclAllGather"),
                OpKind::ReduceScatter => (
                    (lib.reduce_scatter)(s, r_, n, dt, code, comm, st),
                    "ncclReduceScatter",
                ),
                OpKind::Send { peer } => ((lib.send)(s, n, dt, peer, comm, st), "ncclSend"),
                OpKind::Recv { peer } => ((lib.recv)(r_, n, dt, peer, comm, st), "ncclRecv"),
            }
        };
        if first.is_ok() {
            first = lib.check(r, what, comm);
        }
    }
    // SAFETY: no arguments; closes the group opened above.
    let r = unsafe { (lib.group_end)() };
    let end = lib.check(r, "ncclGroupEnd", std::ptr::null_mut());
    first.and(end)
}

/// A job name for a real unique id: `nccl-` and the hex of its first 8 bytes (the bootstrap handle's random magic),
/// the same on every rank.
pub fn job_name(id: &[u8; UNIQUE_ID_BYTES]) -> String {
    let hex: String = id[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("nccl-{hex}")
}

/// The id a real split communicator is listed under: the parent's, its first 8 bytes mixed with the color, so every
/// rank of the new communicator derives the same one (there is no unique id for a split in NCCL's API).
pub fn split_id(parent: &[u8; UNIQUE_ID_BYTES], color: i32) -> [u8; UNIQUE_ID_BYTES] {
    let mut out = *parent;
    let magic = u64::from_le_bytes(parent[..8].try_into().expect("8 bytes"));
    let mut z = (color as u32 as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    out[..8].copy_from_slice(&(magic ^ z).to_le_bytes());
    if out[..8] == super::ID_MAGIC[..] {
        out[0] ^= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error_not_a_panic() {
        let e = load(Some("/nonexistent/dir/libnccl.so.2"))
            .err()
            .expect("error");
        assert!(e.starts_with("NCCL not found"), "{e}");
        assert!(e.contains(LIB_ENV), "{e}");
        assert!(
            e.contains("site-packages/nvidia/nccl/lib/libnccl.so.2"),
            "{e}"
        );
    }

    #[test]
    fn a_library_that_is_not_nccl_names_what_it_lacks() {
        let e = load(Some("libc.so.6")).err().expect("libc is no NCCL");
        assert!(e.contains("lacks ncclGetVersion"), "{e}");
        assert!(e.contains("ncclAllReduce"), "{e}");
        assert!(e.contains(LIB_ENV), "{e}");
    }

    #[test]
    fn data_types_and_ops_map_to_ncclh_values() {
        // nccl.h: ncclInt8 0, ncclUint8 1, ncclInt32 2, ncclUint32 3, ncclInt64 4, ncclUint64 5, ncclFloat16 6,
        // ncclFloat32 7, ncclFloat64 8, ncclBfloat16 9.
        let want = [
            (DType::I8, 0),
            (DType::U8, 1),
            (DType::I32, 2),
            (DType::U32, 3),
            (DType::I64, 4),
            (DType::U64, 5),
            (DType::F16, 6),
            (DType::F32, 7),
            (DType::F64, 8),
            (DType::BF16, 9),
        ];
        for (d, c) in want {
            assert_eq!(dtype_code(d), c, "{d:?}");
            assert_eq!(DType::from_nccl(c as u32), Some(d));
        }
        for c in 0..5u32 {
            let op = RedOp::from_nccl(c).unwrap();
            assert_eq!(op_code(&op), Some(c as c_int));
        }
        assert_eq!(op_code(&RedOp::PreMulSum(Scalar::Device(0))), None);
        assert_eq!(to_cu(4), CuError::INVALID_VALUE);
        assert_eq!(to_cu(5), CuError::NOT_SUPPORTED);
        for r in [1, 2, 3, 6, 7, 8] {
            assert_eq!(to_cu(r), CuError::UNKNOWN);
        }
        assert_eq!(version_text(22805), "2.28.5");
    }

    #[test]
    fn real_ids_name_jobs_and_splits_alike_on_every_rank() {
        let mut id = [0u8; UNIQUE_ID_BYTES];
        id[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        id[8] = 2;
        assert_eq!(job_name(&id), "nccl-8877665544332211");
        let u = super::super::UniqueId(id);
        assert_eq!(u.job(), "nccl-8877665544332211");
        assert!(u.name().is_none());
        let (a, b) = (split_id(&id, 0), split_id(&id, 1));
        assert_ne!(a, b);
        assert_eq!(a, split_id(&id, 0));
        assert_eq!(a[8..], id[8..]);
        assert_ne!(job_name(&a), job_name(&id));
    }

    /// Builds the stand-in library (testdata/fake_nccl.c) with the system's C compiler; `None` where there is none.
    /// The file is removed when this returns: the loaded library stays mapped, and is found again by its name.
    fn fake_lib() -> Option<&'static Lib> {
        let dir = tempfile::tempdir().ok()?;
        let so = dir.path().join("libnccl.so.2");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/nccl/testdata/fake_nccl.c");
        let ok = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&so)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("no C compiler: skipping the fake-NCCL test");
            return None;
        }
        Some(Box::leak(Box::new(
            load(Some(so.to_str()?)).expect("fake loads"),
        )))
    }

    fn fake_log(lib: &Lib) -> String {
        let c = CString::new(lib.path.as_str()).unwrap();
        // SAFETY: the library is already loaded (RTLD_NOLOAD); fake_log returns its static log buffer.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            assert!(!h.is_null());
            let f = libc::dlsym(h, c"fake_log".as_ptr());
            let f: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(f);
            CStr::from_ptr(f()).to_string_lossy().into_owned()
        }
    }

    fn op(kind: OpKind, dtype: DType, op: RedOp, count: u64, send: u64, recv: u64) -> NcclOp {
        NcclOp {
            comm: crate::protocol::Handle(0x1001),
            stream: crate::protocol::Handle::NULL,
            kind,
            dtype,
            op,
            count,
            send,
            recv,
        }
    }

    #[test]
    fn calls_reach_the_library_with_ncclh_argument_order() {
        let Some(lib) = fake_lib() else { return };
        assert_eq!(lib.version, 22805);
        let b: Arc<dyn Backend> = Arc::new(
            crate::backend::emulated::EmulatedBackend::new_for_tests(
                &crate::backend::BackendOptions {
                    arena_bytes: 16 << 20,
                    threads: 1,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let id = lib.unique_id().unwrap();
        assert_eq!(&id[..8], b"FAKEID01");
        let comm = RealComm::init(lib, b.clone(), &id, 1, 0).unwrap();
        assert_eq!(comm.async_error().unwrap(), 0);
        let ops = [
            op(
                OpKind::AllReduce,
                DType::F32,
                RedOp::Avg,
                3,
                0x7e00_0000_1000,
                0x7e00_0000_2000,
            ),
            op(
                OpKind::Broadcast { root: 0 },
                DType::BF16,
                RedOp::Sum,
                4,
                0x10,
                0x20,
            ),
            op(
                OpKind::Reduce { root: 0 },
                DType::I64,
                RedOp::Max,
                5,
                0x30,
                0x40,
            ),
            op(OpKind::AllGather, DType::U8, RedOp::Sum, 6, 0x50, 0x60),
            op(
                OpKind::ReduceScatter,
                DType::F64,
                RedOp::Prod,
                7,
                0x70,
                0x80,
            ),
            op(OpKind::Send { peer: 0 }, DType::I32, RedOp::Sum, 8, 0x90, 0),
            op(OpKind::Recv { peer: 0 }, DType::U32, RedOp::Sum, 9, 0, 0xa0),
            op(
                OpKind::AllReduce,
                DType::F32,
                RedOp::PreMulSum(Scalar::Host(0.5f32.to_le_bytes().to_vec())),
                2,
                0xb0,
                0xb0,
            ),
            op(
                OpKind::AllReduce,
                DType::F16,
                RedOp::PreMulSum(Scalar::Device(0xc0)),
                1,
                0xd0,
                0xd0,
            ),
        ];
        let real: Vec<RealOp> = ops
            .iter()
            .enumerate()
            .map(|(i, o)| RealOp {
                stream: 0x5000 + i,
                comm: &comm,
                op: o,
            })
            .collect();
        run_group(lib, &real).unwrap();
        let log = fake_log(lib);
        let want = "init 1 0 FAKEID01;\
                    premul host 0.5 7 0x1234;premul dev 0xc0 6 0x1234;start;\
                    allreduce 0x7e0000001000 0x7e0000002000 3 7 4 0x1234 0x5000;\
                    broadcast 0x10 0x20 4 9 0 0x1234 0x5001;\
                    reduce 0x30 0x40 5 4 2 0 0x1234 0x5002;\
                    allgather 0x50 0x60 6 1 0x1234 0x5003;\
                    reducescatter 0x70 0x80 7 8 1 0x1234 0x5004;\
                    send 0x90 8 2 0 0x1234 0x5005;\
                    recv 0xa0 9 3 0 0x1234 0x5006;\
                    allreduce 0xb0 0xb0 2 7 77 0x1234 0x5007;\
                    allreduce 0xd0 0xd0 1 6 77 0x1234 0x5008;\
                    end;opdestroy 77 0x1234;opdestroy 77 0x1234;";
        assert_eq!(log, want);
        // A failing operation: reported with NCCL's message, and the group is still closed.
        let bad = op(OpKind::Recv { peer: 0 }, DType::U8, RedOp::Sum, 13, 0, 0xe0);
        let e = run_group(
            lib,
            &[RealOp {
                stream: 1,
                comm: &comm,
                op: &bad,
            }],
        )
        .unwrap_err();
        assert_eq!(e.0, CuError::INVALID_VALUE);
        assert!(
            e.1.contains("ncclRecv") && e.1.contains("count 13 is unlucky"),
            "{}",
            e.1
        );
        assert!(fake_log(lib).ends_with("start;recv 0xe0 13 1 0 0x1234 0x1;end;"));
        // Destroyed on request; a communicator dropped without that (its process went away) is aborted.
        comm.destroy().unwrap();
        assert!(comm.destroy().is_err());
        drop(comm);
        assert!(fake_log(lib).ends_with("destroy 0x1234;"));
        drop(RealComm::init(lib, b, &id, 1, 0).unwrap());
        assert!(fake_log(lib).ends_with("init 1 0 FAKEID01;abort 0x1234;"));
    }
}
