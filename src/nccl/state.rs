//! A rank's communicators as a checkpoint saves them: `nccl.state` next to the rank's `image.devproxy`.
//!
//! The session image (docs/image-format.md) holds the device state; this file holds what the session needs to
//! rejoin its cliques: per communicator its virtual handle, unique id, rank, size and collective/point-to-point
//! counts, and the group the job barrier held the rank in (popped from the ring but not yet executed, so the restored
//! session executes it first). Layout: `DPNCCLS1`, CRC-32 of the body (4 bytes LE), body (bincode, standard).

use super::rank::RankComm;
use super::rendezvous::{join_order, Rendezvous};
use super::{NcclOp, UniqueId, UNIQUE_ID_BYTES};
use crate::protocol::{Handle, Request};
use crate::server::session::SessionState;
use bincode::{Decode, Encode};
use std::path::Path;
use std::sync::Arc;

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

/// How a session's saved communicators come back.
#[derive(Clone, Copy, Debug)]
pub enum Rejoin<'a> {
    /// A restore: every rank of the job is being restored, and they agree on new unique ids through this.
    Restore(&'a Rendezvous),
    /// A migration target: the job runs on, the moved rank rejoins it.
    Migration,
}

/// A 1-rank communicator made anew for a restored or migrated session, with the saved counts: real NCCL on the cuda
/// backend, a new hub on the emulated device.
fn recreate(st: &SessionState, c: &CommImage) -> Result<Arc<RankComm>, String> {
    let id = fresh_id(st)?;
    join_new(st, c, id)
}

/// A new unique id from this server's NCCL: `ncclGetUniqueId` on the cuda backend (the bootstrap root is a thread
/// here), a new hub on the emulated device.
fn fresh_id(st: &SessionState) -> Result<[u8; UNIQUE_ID_BYTES], String> {
    if st.backend.info().backend == "cuda" {
        super::real::lib()?.unique_id().map_err(|(_, m)| m)
    } else {
        Ok(super::hub::start()?.0)
    }
}

/// Joins the communicator `id` names as `c`'s rank, with `c`'s counts. Real NCCL waits for every rank.
fn join_new(
    st: &SessionState,
    c: &CommImage,
    id: [u8; UNIQUE_ID_BYTES],
) -> Result<Arc<RankComm>, String> {
    if st.backend.info().backend == "cuda" {
        let lib = super::real::lib()?;
        let comm = super::real::RealComm::init(lib, st.backend.clone(), &id, c.nranks, c.rank)
            .map_err(|(_, m)| m)?;
        Ok(RankComm::real(
            UniqueId(id),
            c.rank,
            c.nranks,
            0,
            comm,
            Some(c),
        ))
    } else {
        RankComm::resume(UniqueId(id), c, 0)
    }
}

/// A restored rank of a communicator of several ranks: rank 0 makes and publishes the new id, the others wait for
/// it; then all join.
fn rejoin_restored(
    st: &SessionState,
    c: &CommImage,
    rdv: &Rendezvous,
) -> Result<Arc<RankComm>, String> {
    if c.rank != 0 {
        let mut id = rdv.fetch(c, None)?;
        loop {
            match join_new(st, c, id) {
                Ok(joined) => return Ok(joined),
                // On the emulated device a hub that is not there fails the join at once: perhaps a stale file of an
                // earlier attempt of the same name, which rank 0 has yet to replace. (Real NCCL's errors are its own.)
                Err(e) if st.backend.info().backend != "cuda" => {
                    id = rdv.fetch(c, Some(&id)).map_err(|_| e)?
                }
                Err(e) => return Err(e),
            }
        }
    }
    let id = fresh_id(st)?;
    rdv.publish(c, &id)?;
    let joined = join_new(st, c, id);
    // Real NCCL returned only once every rank joined: nobody needs the file now. (The emulated device's join does
    // not wait; its file goes when the restore command ends.)
    if joined.is_err() || st.backend.info().backend == "cuda" {
        rdv.withdraw(c);
    }
    joined
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

    /// Why these communicators cannot move to another server while their job runs, if they cannot: a real NCCL
    /// communicator (cuda backend) of several ranks has peers in other processes that would all have to re-create it
    /// together with the moved rank, which is not done. (A whole job's checkpoint and restore is: every rank
    /// re-creates its communicators at restore, [`RankState::attach`].)
    pub fn migration_refusal(&self) -> Option<String> {
        self.comms
            .iter()
            .find(|c| c.nranks > 1 && !c.emulated())
            .map(|c| {
                format!(
                    "communicator {:#x} (job {}, rank {}/{}) is a real NCCL communicator of {} ranks: moving one rank \
                     of a multi-rank job on the cuda backend is not supported yet; checkpoint the whole job instead \
                     (`devproxy checkpoint --job {} --stop --out DIR`) and restore it where it should run",
                    c.handle,
                    c.job(),
                    c.rank,
                    c.nranks,
                    c.nranks,
                    c.job()
                )
            })
    }

    /// Rebuilds the communicators in a restored (or adopted) session under their old virtual handles, with their
    /// saved counts, and queues the held group to run before the ring. On failure nothing is attached.
    ///
    /// - A 1-rank communicator is re-created with a fresh unique id on whichever NCCL this server has (real on the
    ///   cuda backend, a hub on the emulated device).
    /// - At a restore ([`Rejoin::Restore`]), a communicator of several ranks is re-created by all its restored ranks
    ///   under a new unique id that rank 0 makes and publishes ([`super::rendezvous`]), in [`join_order`].
    /// - On a migration target ([`Rejoin::Migration`]), an emulated rank rejoins its running clique under the old id,
    ///   replacing the source's hub connection (a real one of several ranks was refused before the barrier).
    pub fn attach(&self, st: &mut SessionState, how: Rejoin<'_>) -> Result<(), String> {
        if let Rejoin::Migration = how {
            if let Some(why) = self.migration_refusal() {
                return Err(why);
            }
        }
        let real_here = st.backend.info().backend == "cuda";
        let mut made = Vec::with_capacity(self.comms.len());
        for i in join_order(&self.comms) {
            let c = &self.comms[i];
            let what = format!(
                "communicator {:#x} (job {}, rank {}/{})",
                c.handle,
                c.job(),
                c.rank,
                c.nranks
            );
            if c.nranks > 1 && real_here == c.emulated() {
                return Err(format!(
                    "{what} was made on {}; this server runs the {} backend: restore the job on the backend it ran on",
                    if c.emulated() { "the emulated device" } else { "a GPU by real NCCL" },
                    if real_here { "cuda" } else { "emulated" },
                ));
            }
            let comm = match how {
                _ if c.nranks == 1 => recreate(st, c),
                Rejoin::Restore(rdv) => rejoin_restored(st, c, rdv),
                Rejoin::Migration => {
                    let id = UniqueId::from_bytes(&c.id).ok_or("not a devproxy unique id")?;
                    RankComm::rejoin(id, c, 0)
                }
            }
            .map_err(|e| format!("{what}: {e}"))?;
            if comm.id.0.as_slice() == c.id.as_slice() {
                tracing::info!("NCCL {what} rejoined before collective #{}", c.issued);
            } else {
                tracing::info!(
                    "NCCL {what} re-created as job {} before collective #{}",
                    comm.id.job(),
                    c.issued
                );
            }
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
