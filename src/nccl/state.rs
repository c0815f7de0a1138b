//! A rank's communicators as a checkpoint saves them: `nccl.state` next to the rank's `image.devproxy`.
//!
//! The session image (docs/image-format.md) holds the device state; this file holds what the session needs to
//! rejoin its cliques: per communicator its virtual handle, unique id, rank, size and collective/point-to-point
//! counts, and the group the job barrier held the rank in (popped from the ring but not yet executed, so the restored
//! session executes it first). Layout: `DPNCCLS1`, CRC-32 of the body (4 bytes LE), body (bincode, standard).

use super::rank::RankComm;
use super::{NcclOp, UniqueId};
use crate::protocol::{Handle, Request};
use crate::server::session::SessionState;
use bincode::{Decode, Encode};
use std::path::Path;

/// The file name, in the rank's image directory.
pub const FILE: &str = "nccl.state";
const MAGIC: &[u8; 8] = b"DPNCCLS1";

/// One communicator of a session.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct CommImage {
    /// The communicator's virtual handle (the process keeps using it).
    pub handle: u64,
    /// The 128-byte unique id (names the clique's hub).
    pub id: Vec<u8>,
    pub rank: i32,
    pub nranks: i32,
    /// Collectives issued: the hub's sequence number of the next one.
    pub issued: u64,
    /// (send?, peer, count) point-to-point sequence numbers.
    pub p2p: Vec<(bool, i32, u64)>,
}

impl CommImage {
    /// Whether the communicator ran on devproxy's emulated NCCL (a hub id), not the real library.
    pub fn emulated(&self) -> bool {
        UniqueId::from_bytes(&self.id).is_some()
    }

    /// The job name `devproxy ps` showed for it.
    pub fn job(&self) -> String {
        match <[u8; super::UNIQUE_ID_BYTES]>::try_from(self.id.as_slice()) {
            Ok(b) => UniqueId(b).job(),
            Err(_) => String::from("?"),
        }
    }
}

/// A 1-rank communicator made anew for a restored or migrated session, with the saved counts: real NCCL on the cuda
/// backend, a new hub on the emulated device.
fn recreate(st: &SessionState, c: &CommImage) -> Result<std::sync::Arc<RankComm>, String> {
    if st.backend.info().backend == "cuda" {
        let lib = super::real::lib()?;
        let id = lib.unique_id().map_err(|(_, m)| m)?;
        let comm =
            super::real::RealComm::init(lib, st.backend.clone(), &id, 1, 0).map_err(|(_, m)| m)?;
        Ok(RankComm::real(UniqueId(id), 0, 1, 0, comm, Some(c)))
    } else {
        let id = super::hub::start()?;
        RankComm::rejoin(id, c, 0)
    }
}

/// A session's NCCL state.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
pub struct RankState {
    pub comms: Vec<CommImage>,
    /// The group the barrier held the session in (taken from the ring, not executed): executed first on restore.
    pub replay: Vec<NcclOp>,
}

impl RankState {
    /// The communicators of a stopped session, and the group it is held in.
    pub fn of(st: &SessionState, replay: Vec<NcclOp>) -> RankState {
        let mut comms: Vec<CommImage> = st.nccl.iter().map(|(h, c)| c.save(h.0)).collect();
        comms.sort_by_key(|c| c.handle);
        RankState { comms, replay }
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = crate::protocol::encode(self);
        let mut out = Vec::with_capacity(body.len() + 12);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(b: &[u8], what: &str) -> Result<RankState, String> {
        if b.len() < 12 || &b[..8] != MAGIC {
            return Err(format!("{what}: not a devproxy NCCL state file"));
        }
        let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if crc32fast::hash(&b[12..]) != crc {
            return Err(format!("{what}: CRC mismatch: the file is damaged"));
        }
        crate::protocol::decode(&b[12..]).map_err(|e| format!("{what}: {e}"))
    }

    /// Writes `dir/nccl.state` (temporary name, then rename).
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        let tmp = dir.join(format!(".{FILE}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, self.encode()).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(FILE)).map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// Reads `dir/nccl.state`; `None` where the image has none (a session without communicators).
    pub fn read(dir: &Path) -> Result<Option<RankState>, String> {
        let p = dir.join(FILE);
        match std::fs::read(&p) {
            Ok(b) => RankState::decode(&b, &p.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    /// Why these communicators cannot be saved to continue elsewhere, if they cannot: a real NCCL communicator
    /// (cuda backend) of several ranks has peers in other processes that would all have to re-create it together,
    /// which is not done yet. A 1-rank one is re-created at restore ([`RankState::attach`]).
    pub fn refusal(&self) -> Option<String> {
        self.comms
            .iter()
            .find(|c| c.nranks > 1 && !c.emulated())
            .map(|c| {
                format!(
                    "communicator {:#x} (job {}, rank {}/{}) is a real NCCL communicator of {} ranks: checkpoint, \
                     restore and migration of a multi-rank job on the cuda backend are not supported yet (1-rank \
                     communicators are re-created)",
                    c.handle,
                    c.job(),
                    c.rank,
                    c.nranks,
                    c.nranks
                )
            })
    }

    /// Rebuilds the communicators in a restored (or adopted) session under their old virtual handles, and queues
    /// the held group to run before the ring. An emulated rank rejoins its clique with its saved rank and counts
    /// (starting the clique's hub here if none listens). A 1-rank communicator is re-created instead, with a fresh
    /// unique id, on whichever NCCL this server has (real on the cuda backend, the hub on the emulated device); a
    /// real one of several ranks is refused ([`RankState::refusal`]). On failure nothing is attached.
    pub fn attach(&self, st: &mut SessionState) -> Result<(), String> {
        if let Some(why) = self.refusal() {
            return Err(why);
        }
        let real_here = st.backend.info().backend == "cuda";
        let mut made = Vec::with_capacity(self.comms.len());
        for c in &self.comms {
            if c.nranks == 1 && (real_here || !c.emulated()) {
                let comm = recreate(st, c).map_err(|e| {
                    format!(
                        "communicator {:#x} (job {}, 1 rank): re-creating it: {e}",
                        c.handle,
                        c.job()
                    )
                })?;
                tracing::info!(
                    "NCCL job {} (1 rank) re-created as job {} before collective #{}",
                    c.job(),
                    comm.id.job(),
                    c.issued
                );
                made.push((Handle(c.handle), comm));
                continue;
            }
            if real_here {
                return Err(format!(
                    "communicator {:#x} (job {}, rank {}/{}) was made on the emulated device; this server runs the \
                     cuda backend",
                    c.handle,
                    c.job(),
                    c.rank,
                    c.nranks
                ));
            }
            let id = UniqueId::from_bytes(&c.id)
                .ok_or_else(|| format!("communicator {:#x}: not a devproxy unique id", c.handle))?;
            let comm = RankComm::rejoin(id, c, 0).map_err(|e| {
                format!(
                    "communicator {:#x} (job {}, rank {}/{}): {e}",
                    c.handle,
                    id.job(),
                    c.rank,
                    c.nranks
                )
            })?;
            tracing::info!(
                "NCCL job {}: rank {}/{} rejoined before collective #{}",
                id.job(),
                c.rank,
                c.nranks,
                c.issued
            );
            made.push((Handle(c.handle), comm));
        }
        for (h, comm) in made {
            st.set_next_handle(h.0);
            st.nccl.insert(h, comm);
        }
        if !self.replay.is_empty() {
            st.replay.push(Request::NcclGroup {
                ops: self.replay.clone(),
            });
        }
        Ok(())
    }
}
