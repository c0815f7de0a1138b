//! NCCL collectives on the emulated device, real NCCL on the cuda backend ([`real`]), and the bookkeeping a job-wide
//! barrier needs.
//!
//! The shim exports the NCCL API (`interpose/src/nccl*.rs`) and forwards communicator creation and collectives to
//! the server as requests (`Request::Nccl*`). On the emulated backend they are carried out here:
//!
//! - **Rendezvous** ([`hub`]): `ncclGetUniqueId` starts a *hub* thread in the server that answers it, listening on an
//!   abstract Unix socket whose name is carried in the 128-byte unique id ([`UniqueId`]). Every rank's server
//!   connects to the hub when the rank calls `ncclCommInitRank`, so ranks of one clique may live in one server or in
//!   several servers on this machine. A clique is a *job* (`devproxy ps`), named by the hub's id.
//! - **Data** moves through the hub: each rank sends its contribution, the hub folds the contributions in rank order
//!   once all ranks have contributed ([`reduce`]; deterministic, bit-identical to a rank-ordered reference) and sends
//!   every rank its part of the result. Send/recv pairs are matched by (sender, receiver, sequence number).
//! - **Stream order** ([`rank`]): a collective is one host job on the rank's stream (`Backend::enqueue_host`): it
//!   reads the send buffer when the stream reaches it, waits for the hub and writes the receive buffer, so it is
//!   ordered with the session's other work on that stream and blocks only that stream, never other sessions. The ops
//!   of one `ncclGroupStart/End` are one job per stream, which submits all of them before waiting for any, so a
//!   group's sends and receives (or several ranks of one process, `ncclCommInitAll`) cannot deadlock.
//! - **Failure**: a rank whose connection closes (its server died, the process went away) fails every collective
//!   still waiting on it, with a message naming the rank; the communicator's async error turns `ncclRemoteError`.

pub mod barrier;
pub mod hub;
pub mod job;
pub mod rank;
pub mod real;
pub mod reduce;
pub mod rendezvous;
pub mod restore;
pub mod state;
#[cfg(test)]
mod tests;

use bincode::{Decode, Encode};

pub use rank::{jobs, JobRank, RankComm};

/// Size of `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;
/// First bytes of a devproxy unique id.
pub const ID_MAGIC: &[u8; 8] = b"DPNCCL01";

/// NCCL's data types (`ncclDataType_t` codes 0..=9; the fp8 types are not supported).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    I8,
    U8,
    I32,
    U32,
    I64,
    U64,
    F16,
    F32,
    F64,
    BF16,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::I8,
        DType::U8,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::BF16,
    ];

    /// From an `ncclDataType_t` value.
    pub fn from_nccl(code: u32) -> Option<DType> {
        Self::ALL.get(code as usize).copied()
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }
}

/// Where a `PreMulSum` scalar lives.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum Scalar {
    /// The value's bytes (`ncclScalarHostImmediate`, captured at creation).
    Host(Vec<u8>),
    /// A device pointer read when the collective runs (`ncclScalarDevice`).
    Device(u64),
}

/// A reduction operation.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum RedOp {
    Sum,
    Prod,
    Max,
    Min,
    Avg,
    PreMulSum(Scalar),
}

impl RedOp {
    /// From a built-in `ncclRedOp_t` value (0..=4).
    pub fn from_nccl(code: u32) -> Option<RedOp> {
        Some(match code {
            0 => RedOp::Sum,
            1 => RedOp::Prod,
            2 => RedOp::Max,
            3 => RedOp::Min,
            4 => RedOp::Avg,
            _ => return None,
        })
    }
}

/// What a collective or point-to-point operation does. Counts are in elements, as in NCCL's API.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    AllReduce,
    Broadcast {
        root: i32,
    },
    Reduce {
        root: i32,
    },
    /// `count` = elements each rank sends; the receive buffer holds `nranks * count`.
    AllGather,
    /// `count` = elements each rank receives; the send buffer holds `nranks * count`.
    ReduceScatter,
    Send {
        peer: i32,
    },
    Recv {
        peer: i32,
    },
}

impl OpKind {
    pub fn is_p2p(&self) -> bool {
        matches!(self, OpKind::Send { .. } | OpKind::Recv { .. })
    }

    /// (send bytes, receive bytes) this rank's buffers must hold.
    pub fn extents(&self, count: u64, elem: u64, nranks: u64, rank: i32) -> (u64, u64) {
        let b = count.saturating_mul(elem);
        match self {
            OpKind::AllReduce => (b, b),
            OpKind::Broadcast { root } => (if *root == rank { b } else { 0 }, b),
            OpKind::Reduce { root } => (b, if *root == rank { b } else { 0 }),
            OpKind::AllGather => (b, b.saturating_mul(nranks)),
            OpKind::ReduceScatter => (b.saturating_mul(nranks), b),
            OpKind::Send { .. } => (b, 0),
            OpKind::Recv { .. } => (0, b),
        }
    }
}

/// One operation of a group as the shim sends it.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct NcclOp {
    pub comm: crate::protocol::Handle,
    pub stream: crate::protocol::Handle,
    pub kind: OpKind,
    pub dtype: DType,
    pub op: RedOp,
    pub count: u64,
    pub send: u64,
    pub recv: u64,
}

/// The 128 bytes of an `ncclUniqueId` minted by devproxy: magic, then the hub's abstract socket name (NUL padded).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => write!(f, "UniqueId({n})"),
            None => write!(f, "UniqueId(real NCCL, job {})", self.job()),
        }
    }
}

impl UniqueId {
    /// An id naming the hub socket `name` (at most 120 bytes).
    pub fn new(name: &str) -> Option<UniqueId> {
        let mut b = [0u8; UNIQUE_ID_BYTES];
        if name.len() > UNIQUE_ID_BYTES - ID_MAGIC.len() || name.is_empty() {
            return None;
        }
        b[..8].copy_from_slice(ID_MAGIC);
        b[8..8 + name.len()].copy_from_slice(name.as_bytes());
        Some(UniqueId(b))
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<UniqueId> {
        let b: [u8; UNIQUE_ID_BYTES] = bytes.try_into().ok()?;
        let id = UniqueId(b);
        id.name().map(|_| id)
    }

    /// The hub's socket name, if this is a devproxy id.
    pub fn name(&self) -> Option<&str> {
        if &self.0[..8] != ID_MAGIC {
            return None;
        }
        let rest = &self.0[8..];
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end])
            .ok()
            .filter(|s| !s.is_empty())
    }

    /// The job id shown by `devproxy ps`: the hub name's last component; for a real NCCL id (the cuda backend,
    /// [`real`]) `nccl-` and the hex of its random first 8 bytes.
    pub fn job(&self) -> String {
        match self.name() {
            Some(n) => n.rsplit('/').next().unwrap_or(n).to_string(),
            None => real::job_name(&self.0),
        }
    }

    /// Whether the id was made by the real NCCL (not a devproxy hub id).
    pub fn is_real(&self) -> bool {
        self.name().is_none()
    }
}
