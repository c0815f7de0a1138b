//! The wire protocol between the shim (client) and the server.
//!
//! Two channels carry it:
//! - the Unix socket, for the handshake ([`Hello`] / [`HelloReply`]), the fd of the session's shared-memory segment
//!   (SCM_RIGHTS) and out-of-band notices ([`Notice`]: the session moved to another server);
//! - the session's shared-memory request ring, for every device operation ([`Request`]), answered in the segment's
//!   reply slot ([`Reply`]) when the request waits for one.
//!
//! Both are encoded with bincode 2 (standard config). The protocol is versioned by [`MAJOR`]/[`MINOR`]: a client of
//! another major version is refused at the handshake with a message naming both versions. Variants are only ever
//! appended (bincode encodes the variant index), so an older minor client stays understood.
//!
//! Handles ([`Handle`]) are virtual ids minted by the server per session; device pointers are real device addresses
//! inside the server's fixed arena (see ARCHITECTURE.md).

pub mod error;

pub use error::CuError;

use bincode::{Decode, Encode};

/// Major protocol version: a mismatch is refused at the handshake.
pub const MAJOR: u16 = 1;
/// Minor protocol version: additions only.
pub const MINOR: u16 = 0;

/// bincode configuration used on every channel.
pub fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value with the protocol's bincode configuration, appending to `out`.
pub fn encode_into<T: Encode>(value: &T, out: &mut Vec<u8>) {
    // Encoding into a Vec cannot fail for our types (no size limit, no custom encoders that error).
    bincode::encode_into_std_write(value, out, config()).expect("bincode encode into Vec");
}

/// Encodes a value into a fresh buffer.
pub fn encode<T: Encode>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out);
    out
}

/// Decodes a value; trailing bytes or garbage are an error, never a panic.
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let (value, used) = bincode::decode_from_slice(bytes, config())
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after message",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Errors of the protocol layer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A message could not be decoded: the peer is broken or hostile; the session is closed.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer speaks another major protocol version.
    #[error("protocol version mismatch: client speaks {client_major}.{client_minor}, server speaks {server_major}.{server_minor}; use the same devproxy release for the shim and the server")]
    Version {
        client_major: u16,
        client_minor: u16,
        server_major: u16,
        server_minor: u16,
    },
}

/// A virtual handle (stream, event, module, function, ...). 0 is never a valid handle.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Handle(pub u64);

impl Handle {
    /// The null handle: for streams, the (legacy) default stream.
    pub const NULL: Handle = Handle(0);
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// What a client sends first on the socket.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub major: u16,
    pub minor: u16,
    pub pid: u32,
    /// The client's command line, for `devproxy ps`.
    pub command: String,
    /// Set when re-attaching a session after restore or migration; the client then sends its segment fd along.
    pub resume: Option<Resume>,
}

/// Identifies a session to re-attach to.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub session: u64,
    /// Secret minted at the first attach; a resume with the wrong token is refused.
    pub token: u64,
}

/// The server's answer to [`Hello`]. On `Ok` for a new session, the segment fd follows as SCM_RIGHTS on the same message.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum HelloReply {
    Ok(SessionInfo),
    Refused(String),
}

/// Everything the client caches at attach.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct SessionInfo {
    pub session: u64,
    pub token: u64,
    pub server_pid: u32,
    pub device: DeviceInfo,
    /// Size of the shared segment in bytes (the fd's size).
    pub segment_bytes: u64,
}

/// The device as the client sees it: answered locally from this cache, never by a round trip.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// "emulated" or "cuda".
    pub backend: String,
    pub ordinal: u32,
    pub name: String,
    pub uuid: [u8; 16],
    /// The device's memory (cuDeviceTotalMem): what allocations may commit in all.
    pub total_mem: u64,
    /// `attributes[i]` is the value of CUdevice_attribute `i + 1`; `None` where the driver rejects it.
    pub attributes: Vec<Option<i32>>,
    /// What cuDriverGetVersion reports (e.g. 13000).
    pub driver_version: i32,
    /// The fixed arena every device pointer lives in.
    pub arena_base: u64,
    /// The arena's address space (larger than `total_mem`: reservations take address space, not memory).
    pub arena_bytes: u64,
}

impl DeviceInfo {
    /// The value of a CUdevice_attribute, `None` where unsupported.
    pub fn attribute(&self, attr: i32) -> Option<i32> {
        let idx = usize::try_from(attr).ok()?.checked_sub(1)?;
        self.attributes.get(idx).copied().flatten()
    }
}

/// Host bytes that travel with a request.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum HostSrc {
    /// Small payloads travel inside the request record itself.
    Inline(Vec<u8>),
    /// `len` bytes at `offset` in the segment's staging area.
    Staging { offset: u64, len: u64 },
    /// `len` bytes at `offset` in the segment's pinned area (app-visible page-locked memory).
    Pinned { offset: u64, len: u64 },
}

impl HostSrc {
    pub fn len(&self) -> u64 {
        match self {
            HostSrc::Inline(v) => v.len() as u64,
            HostSrc::Staging { len, .. } | HostSrc::Pinned { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where device-to-host bytes go.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostDst {
    /// The staging area: the request waits and the client copies out after the reply.
    Staging { offset: u64 },
    /// The pinned area: may complete asynchronously, in stream order.
    Pinned { offset: u64 },
}

/// A launch's shape: grid and block in threads, the thread-block cluster (1x1x1: none; Hopper kernels such as
/// cuBLAS's `nvjet_*` ask for 2..16 blocks per cluster through cuLaunchKernelEx) and dynamic shared memory.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub cluster: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchDims {
    /// A launch without clusters.
    pub const fn new(grid: [u32; 3], block: [u32; 3], shared_bytes: u32) -> LaunchDims {
        LaunchDims {
            grid,
            block,
            cluster: [1; 3],
            shared_bytes,
        }
    }

    /// The same launch in clusters of `cluster` blocks (0 in a dimension is taken as 1).
    pub fn with_cluster(self, cluster: [u32; 3]) -> LaunchDims {
        LaunchDims {
            cluster: cluster.map(|d| d.max(1)),
            ..self
        }
    }

    /// Whether the launch asks for clusters larger than one block.
    pub fn clustered(&self) -> bool {
        self.cluster != [1; 3]
    }
}

/// Kernel launch geometry and stream.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub func: Handle,
    pub dims: LaunchDims,
    pub stream: Handle,
    /// The packed parameter buffer, laid out per [`FuncInfo::params`].
    pub params: Vec<u8>,
}

/// A kernel parameter's place in the packed buffer.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSlot {
    pub offset: u32,
    pub size: u32,
}

/// What the client learns about a function when it looks it up (cached client-side).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct FuncInfo {
    pub handle: Handle,
    pub params: Vec<ParamSlot>,
    /// Total size of the packed parameter buffer.
    pub params_bytes: u32,
}

/// One device operation. Requests marked (ff) are fire-and-forget: the client does not wait, an error is kept by
/// the server and returned by the next waiting request of the session (sticky like CUDA's async errors).
/// All others wait for a [`Reply`].
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum Request {
    /// Opcode 0 is never valid.
    Invalid,
    /// -> Reply::Ptr
    MemAlloc { bytes: u64 },
    /// -> Reply::Unit
    MemFree { ptr: u64 },
    /// Stream-ordered allocation -> Reply::Ptr
    MemAllocAsync { bytes: u64, stream: Handle },
    /// (ff) stream-ordered free
    MemFreeAsync { ptr: u64, stream: Handle },
    /// -> Reply::MemInfo
    MemGetInfo,
    /// Host to device. (ff) when `sync` is false and `src` is Inline or Pinned; else waits -> Reply::Unit.
    MemcpyHtoD {
        dst: u64,
        src: HostSrc,
        stream: Handle,
        sync: bool,
    },
    /// Device to host. Into Staging: waits -> Reply::Unit once bytes are in staging. Into Pinned with !sync: (ff).
    MemcpyDtoH {
        dst: HostDst,
        src: u64,
        len: u64,
        stream: Handle,
        sync: bool,
    },
    /// (ff) unless `sync`.
    MemcpyDtoD {
        dst: u64,
        src: u64,
        len: u64,
        stream: Handle,
        sync: bool,
    },
    /// memset of `count` elements of `elem_bytes` (1, 2 or 4). (ff) unless `sync`.
    Memset {
        dst: u64,
        value: u32,
        elem_bytes: u8,
        count: u64,
        stream: Handle,
        sync: bool,
    },
    /// Load a PTX (or, on the cuda backend, cubin/fatbin) image -> Reply::Handle
    ModuleLoad { image: HostSrc },
    /// -> Reply::Unit
    ModuleUnload { module: Handle },
    /// -> Reply::Func
    ModuleGetFunction { module: Handle, name: String },
    /// -> Reply::Global
    ModuleGetGlobal { module: Handle, name: String },
    /// -> Reply::Int
    FuncGetAttribute { func: Handle, attr: i32 },
    /// -> Reply::Unit
    FuncSetAttribute { func: Handle, attr: i32, value: i32 },
    /// (ff)
    LaunchKernel(Launch),
    /// -> Reply::Handle
    StreamCreate { flags: u32, priority: i32 },
    /// -> Reply::Unit
    StreamDestroy { stream: Handle },
    /// -> Reply::Unit
    StreamSynchronize { stream: Handle },
    /// -> Reply::Bool (true = all work done)
    StreamQuery { stream: Handle },
    /// (ff)
    StreamWaitEvent {
        stream: Handle,
        event: Handle,
        flags: u32,
    },
    /// -> Reply::Handle
    EventCreate { flags: u32 },
    /// (ff)
    EventRecord { event: Handle, stream: Handle },
    /// -> Reply::Unit
    EventSynchronize { event: Handle },
    /// -> Reply::Bool
    EventQuery { event: Handle },
    /// -> Reply::Float (milliseconds)
    EventElapsedTime { start: Handle, end: Handle },
    /// (ff)
    EventDestroy { event: Handle },
    /// -> Reply::Unit
    CtxSynchronize,
    /// Allocate page-locked host memory in the segment's pinned area -> Reply::Ptr (offset into the pinned area)
    HostAlloc { bytes: u64 },
    /// -> Reply::Unit
    HostFree { offset: u64 },
    /// Returns the session's sticky error, if any, without side effects -> Reply::Unit or Err.
    GetLastError,
    /// Starts a rendezvous hub for a new NCCL clique -> Reply::Bytes (the 128-byte ncclUniqueId)
    NcclGetUniqueId,
    /// Joins a clique -> Reply::NcclComm
    NcclCommInitRank { id: Vec<u8>, nranks: i32, rank: i32 },
    /// Splits a communicator (collective over it) -> Reply::NcclComm (`comm` NULL for NCCL_SPLIT_NOCOLOR)
    NcclCommSplit { comm: Handle, color: i32, key: i32 },
    /// -> Reply::Unit
    NcclCommDestroy { comm: Handle },
    /// (ff) one operation, or the operations of one ncclGroupStart/End, enqueued on their streams
    NcclGroup { ops: Vec<crate::nccl::NcclOp> },
    /// -> Reply::Int (an ncclResult_t: 0, or 6 = ncclRemoteError once an operation failed)
    NcclCommGetAsyncError { comm: Handle },
    /// cuMemAddressReserve: `bytes` of arena address space, nothing committed -> Reply::Ptr. `addr` is a hint
    /// (ignored, as the driver may).
    MemAddressReserve { bytes: u64, align: u64, addr: u64 },
    /// cuMemAddressFree of a whole reservation (nothing may be mapped in it) -> Reply::Unit
    MemAddressFree { ptr: u64 },
    /// cuMemMap: `[ptr, ptr + bytes)` inside one reservation becomes a session allocation -> Reply::Unit
    MemMap { ptr: u64, bytes: u64 },
    /// cuMemUnmap: frees the mappings that `[ptr, ptr + bytes)` covers; the range stays reserved -> Reply::Unit
    MemUnmap { ptr: u64, bytes: u64 },
}

/// The granularity of cuMemAddressReserve / cuMemCreate / cuMemMap (what an H100 reports).
pub const VMM_GRANULARITY: u64 = 2 << 20;

impl Request {
    /// Whether the client waits for a reply. Fire-and-forget requests return only a status; their error is deferred.
    pub fn waits(&self) -> bool {
        match self {
            Request::MemFreeAsync { .. }
            | Request::LaunchKernel(_)
            | Request::StreamWaitEvent { .. }
            | Request::EventRecord { .. }
            | Request::EventDestroy { .. }
            | Request::NcclGroup { .. } => false,
            Request::MemcpyHtoD { src, sync, .. } => {
                *sync || matches!(src, HostSrc::Staging { .. })
            }
            Request::MemcpyDtoH { dst, sync, .. } => {
                *sync || matches!(dst, HostDst::Staging { .. })
            }
            Request::MemcpyDtoD { sync, .. } | Request::Memset { sync, .. } => *sync,
            _ => true,
        }
    }

    /// Short name for logs and statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Invalid => "Invalid",
            Request::MemAlloc { .. } => "MemAlloc",
            Request::MemFree { .. } => "MemFree",
            Request::MemAllocAsync { .. } => "MemAllocAsync",
            Request::MemFreeAsync { .. } => "MemFreeAsync",
            Request::MemGetInfo => "MemGetInfo",
            Request::MemcpyHtoD { .. } => "MemcpyHtoD",
            Request::MemcpyDtoH { .. } => "MemcpyDtoH",
            Request::MemcpyDtoD { .. } => "MemcpyDtoD",
            Request::Memset { .. } => "Memset",
            Request::ModuleLoad { .. } => "ModuleLoad",
            Request::ModuleUnload { .. } => "ModuleUnload",
            Request::ModuleGetFunction { .. } => "ModuleGetFunction",
            Request::ModuleGetGlobal { .. } => "ModuleGetGlobal",
            Request::FuncGetAttribute { .. } => "FuncGetAttribute",
            Request::FuncSetAttribute { .. } => "FuncSetAttribute",
            Request::LaunchKernel(_) => "LaunchKernel",
            Request::StreamCreate { .. } => "StreamCreate",
            Request::StreamDestroy { .. } => "StreamDestroy",
            Request::StreamSynchronize { .. } => "StreamSynchronize",
            Request::StreamQuery { .. } => "StreamQuery",
            Request::StreamWaitEvent { .. } => "StreamWaitEvent",
            Request::EventCreate { .. } => "EventCreate",
            Request::EventRecord { .. } => "EventRecord",
            Request::EventSynchronize { .. } => "EventSynchronize",
            Request::EventQuery { .. } => "EventQuery",
            Request::EventElapsedTime { .. } => "EventElapsedTime",
            Request::EventDestroy { .. } => "EventDestroy",
            Request::CtxSynchronize => "CtxSynchronize",
            Request::HostAlloc { .. } => "HostAlloc",
            Request::HostFree { .. } => "HostFree",
            Request::GetLastError => "GetLastError",
            Request::NcclGetUniqueId => "NcclGetUniqueId",
            Request::NcclCommInitRank { .. } => "NcclCommInitRank",
            Request::NcclCommSplit { .. } => "NcclCommSplit",
            Request::NcclCommDestroy { .. } => "NcclCommDestroy",
            Request::NcclGroup { .. } => "NcclGroup",
            Request::NcclCommGetAsyncError { .. } => "NcclCommGetAsyncError",
            Request::MemAddressReserve { .. } => "MemAddressReserve",
            Request::MemAddressFree { .. } => "MemAddressFree",
            Request::MemMap { .. } => "MemMap",
            Request::MemUnmap { .. } => "MemUnmap",
        }
    }
}

/// The answer to a waiting request.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum Reply {
    Unit,
    Ptr(u64),
    Handle(Handle),
    Bool(bool),
    Int(i32),
    Float(f32),
    MemInfo {
        free: u64,
        total: u64,
    },
    Func(FuncInfo),
    Global {
        ptr: u64,
        bytes: u64,
    },
    /// The request (or an earlier fire-and-forget one) failed.
    Err(CuError),
    /// Opaque bytes (an ncclUniqueId).
    Bytes(Vec<u8>),
    /// A communicator and this rank's place in it.
    NcclComm {
        comm: Handle,
        rank: i32,
        nranks: i32,
    },
}

/// Notices the server sends on the socket outside the ring.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The session now lives at another server: re-attach there with the same [`Resume`].
    Moved { socket: String },
    /// The server is going away for good (shutdown, not a crash): calls fail from now on.
    Closing { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request::LaunchKernel(Launch {
            func: Handle(7),
            dims: LaunchDims::new([2, 2, 3], [32, 1, 1], 0).with_cluster([2, 0, 1]),
            stream: Handle::NULL,
            params: vec![1, 2, 3, 4],
        });
        let bytes = encode(&r);
        assert_eq!(decode::<Request>(&bytes).unwrap(), r);
        let Request::LaunchKernel(l) = decode::<Request>(&bytes).unwrap() else {
            unreachable!()
        };
        assert_eq!(
            l.dims.cluster,
            [2, 1, 1],
            "a zero cluster dimension means 1"
        );
        assert!(l.dims.clustered());
        assert!(!LaunchDims::new([1; 3], [1; 3], 0).clustered());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<Request>(&[0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut bytes = encode(&Request::MemAlloc { bytes: 5 });
        bytes.push(0);
        assert!(
            decode::<Request>(&bytes).is_err(),
            "trailing bytes must be refused"
        );
        bytes.truncate(1);
        assert!(decode::<Request>(&bytes).is_err());
    }

    #[test]
    fn opcode_zero_is_invalid() {
        assert_eq!(encode(&Request::Invalid), vec![0]);
    }

    #[test]
    fn waits_classification() {
        assert!(!Request::LaunchKernel(Launch {
            func: Handle(1),
            dims: LaunchDims::new([1; 3], [1; 3], 0),
            stream: Handle::NULL,
            params: vec![]
        })
        .waits());
        assert!(Request::MemAlloc { bytes: 1 }.waits());
        let inline = HostSrc::Inline(vec![1]);
        assert!(!Request::MemcpyHtoD {
            dst: 0,
            src: inline.clone(),
            stream: Handle::NULL,
            sync: false
        }
        .waits());
        assert!(Request::MemcpyHtoD {
            dst: 0,
            src: inline,
            stream: Handle::NULL,
            sync: true
        }
        .waits());
        let staged = HostSrc::Staging { offset: 0, len: 1 };
        assert!(Request::MemcpyHtoD {
            dst: 0,
            src: staged,
            stream: Handle::NULL,
            sync: false
        }
        .waits());
    }
}
