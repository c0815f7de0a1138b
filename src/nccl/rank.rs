//! One rank of a communicator, as its server holds it: the connection to the job's hub (emulated device) or the
//! real NCCL communicator (cuda backend, [`super::real`]), the rank's sequence numbers (the job barrier's position),
//! and the host jobs that carry out an emulated rank's operations in stream order.

use super::hub::{self, read_msg, write_msg, FromHub, ToHub};
use super::{NcclOp, OpKind, RedOp, Scalar, UniqueId};
use crate::backend::{Backend, StreamId};
use crate::protocol::CuError;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, LazyLock, Weak};

/// What a waiting operation gets back from the hub.
pub enum Answer {
    Data(Vec<u8>),
    Split {
        id: Option<UniqueId>,
        rank: i32,
        nranks: i32,
    },
}

type Waiters = HashMap<u64, Sender<Result<Answer, String>>>;

struct Conn {
    waiters: Mutex<Waiters>,
    /// Why the connection is gone, once it is.
    closed: Mutex<Option<String>>,
}

/// How a rank reaches its clique.
enum Link {
    /// Through the job's rendezvous hub (emulated device).
    Hub {
        writer: Mutex<UnixStream>,
        conn: Arc<Conn>,
    },
    /// A real NCCL communicator in this server (cuda backend).
    Real(super::real::RealComm),
}

/// A rank's membership in a clique.
pub struct RankComm {
    pub id: UniqueId,
    pub rank: i32,
    pub nranks: i32,
    /// The owning session's segment address: identifies its session to the control socket (`devproxy ps`). 0 while
    /// a restored session waits for its process (set when it re-attaches).
    session: AtomicU64,
    link: Link,
    next_tag: AtomicU64,
    /// Collectives issued so far (the barrier's "position" of this rank).
    issued: AtomicU64,
    /// Per-peer send and receive sequence numbers.
    p2p: Mutex<HashMap<(bool, i32), u64>>,
    /// The first failure of an operation (ncclCommGetAsyncError).
    async_error: Mutex<Option<String>>,
    /// The job barrier's hold on this rank, if armed (see [`super::barrier`]).
    pub hold: Mutex<Option<super::barrier::Hold>>,
    pub hold_cv: parking_lot::Condvar,
}

impl std::fmt::Debug for RankComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RankComm(job {}, rank {}/{})",
            self.id.job(),
            self.rank,
            self.nranks
        )
    }
}

impl Drop for RankComm {
    fn drop(&mut self) {
        if let Link::Hub { writer, .. } = &self.link {
            let _ = writer.lock().shutdown(std::net::Shutdown::Both);
        }
        // A real communicator aborts itself when dropped unless it was destroyed (`RealComm`'s Drop).
    }
}

static REGISTRY: LazyLock<Mutex<Vec<Weak<RankComm>>>> = LazyLock::new(|| Mutex::new(Vec::new()));

/// One rank of a job, as `devproxy ps` shows it.
#[derive(Clone, Debug)]
pub struct JobRank {
    pub comm: Arc<RankComm>,
    pub job: String,
    pub rank: i32,
    pub nranks: i32,
    pub session: u64,
    pub collectives: u64,
}

/// The ranks this server holds, by job then rank.
pub fn jobs() -> Vec<JobRank> {
    let mut reg = REGISTRY.lock();
    reg.retain(|w| w.strong_count() > 0);
    let mut v: Vec<JobRank> = reg
        .iter()
        .filter_map(Weak::upgrade)
        .map(|c| JobRank {
            comm: c.clone(),
            job: c.id.job(),
            rank: c.rank,
            nranks: c.nranks,
            session: c.session(),
            collectives: c.issued.load(Ordering::Relaxed),
        })
        .collect();
    v.sort_by(|a, b| (&a.job, a.rank).cmp(&(&b.job, b.rank)));
    v
}

impl RankComm {
    /// Joins the clique `id` names as `rank` of `nranks`. Does not wait for the other ranks: operations do.
    pub fn join(
        id: UniqueId,
        rank: i32,
        nranks: i32,
        session: u64,
    ) -> Result<Arc<RankComm>, String> {
        Self::connect(id, rank, nranks, session, None, false)
    }

    /// Rejoins the clique `id` names with a saved position (a restored or migrated rank): the hub under that name
    /// is started here if none listens, the collective and point-to-point counts continue from `saved`.
    pub fn rejoin(
        id: UniqueId,
        saved: &super::state::CommImage,
        session: u64,
    ) -> Result<Arc<RankComm>, String> {
        Self::connect(id, saved.rank, saved.nranks, session, Some(saved), true)
    }

    /// Joins the new clique `id` names (a restored rank's communicator, re-created under a new id whose hub rank 0's
    /// server started) with a saved position. Unlike [`RankComm::rejoin`], never starts a hub: one missing under a
    /// new id means rank 0's server is gone.
    pub fn resume(
        id: UniqueId,
        saved: &super::state::CommImage,
        session: u64,
    ) -> Result<Arc<RankComm>, String> {
        Self::connect(id, saved.rank, saved.nranks, session, Some(saved), false)
    }

    fn connect(
        id: UniqueId,
        rank: i32,
        nranks: i32,
        session: u64,
        saved: Option<&super::state::CommImage>,
        start_if_absent: bool,
    ) -> Result<Arc<RankComm>, String> {
        if nranks < 1 || rank < 0 || rank >= nranks {
            return Err(format!("rank {rank} of {nranks} is out of range"));
        }
        let who = format!("server pid {} session {session}", std::process::id());
        let mut stream = if start_if_absent {
            hub::connect_or_start(&id)?
        } else {
            hub::connect(&id)?
        };
        let msg = match saved {
            None => ToHub::Join { rank, nranks, who },
            Some(_) => ToHub::Rejoin { rank, nranks, who },
        };
        write_msg(&mut stream, &msg).map_err(|e| e.to_string())?;
        match read_msg::<FromHub>(&mut stream).map_err(|e| e.to_string())? {
            Some(FromHub::Joined) => {}
            Some(FromHub::Failed { msg, .. }) => return Err(msg),
            _ => return Err("the rendezvous hub closed the connection".into()),
        }
        let conn = Arc::new(Conn {
            waiters: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
        });
        let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
        let c2 = conn.clone();
        std::thread::Builder::new()
            .name(format!("devproxy-nccl-r{rank}"))
            .spawn(move || {
                loop {
                    let (tag, ans) = match read_msg::<FromHub>(&mut reader) {
                        Ok(Some(FromHub::Done { tag, data })) => (tag, Ok(Answer::Data(data))),
                        Ok(Some(FromHub::Split { tag, id, rank, nranks })) => {
                            let id = id.and_then(|b| UniqueId::from_bytes(&b));
                            (tag, Ok(Answer::Split { id, rank, nranks }))
                        }
                        Ok(Some(FromHub::Failed { tag, msg })) => (tag, Err(msg)),
                        Ok(Some(FromHub::Joined)) => continue,
                        Ok(None) | Err(_) => break,
                    };
                    if let Some(tx) = c2.waiters.lock().remove(&tag) {
                        let _ = tx.send(ans);
                    }
                }
                let why = "lost the connection to the job's rendezvous hub (the server holding it is gone)";
                *c2.closed.lock() = Some(why.to_string());
                for (_, tx) in c2.waiters.lock().drain() {
                    let _ = tx.send(Err(why.to_string()));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self::register(
            id,
            rank,
            nranks,
            session,
            Link::Hub {
                writer: Mutex::new(stream),
                conn,
            },
            saved,
        ))
    }

    /// A rank of a real NCCL communicator (cuda backend): `id` is its unique id (or, for a split, the id derived by
    /// [`super::real::split_id`]); `saved` continues the counts of a restored or migrated rank.
    pub fn real(
        id: UniqueId,
        rank: i32,
        nranks: i32,
        session: u64,
        comm: super::real::RealComm,
        saved: Option<&super::state::CommImage>,
    ) -> Arc<RankComm> {
        Self::register(id, rank, nranks, session, Link::Real(comm), saved)
    }

    fn register(
        id: UniqueId,
        rank: i32,
        nranks: i32,
        session: u64,
        link: Link,
        saved: Option<&super::state::CommImage>,
    ) -> Arc<RankComm> {
        let comm = Arc::new(RankComm {
            id,
            rank,
            nranks,
            session: AtomicU64::new(session),
            link,
            next_tag: AtomicU64::new(1),
            issued: AtomicU64::new(saved.map_or(0, |c| c.issued)),
            p2p: Mutex::new(
                saved
                    .map(|c| {
                        c.p2p
                            .iter()
                            .map(|&(send, peer, n)| ((send, peer), n))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            async_error: Mutex::new(None),
            hold: Mutex::new(None),
            hold_cv: parking_lot::Condvar::new(),
        });
        REGISTRY.lock().push(Arc::downgrade(&comm));
        comm
    }

    /// The real NCCL communicator, on the cuda backend.
    pub fn as_real(&self) -> Option<&super::real::RealComm> {
        match &self.link {
            Link::Real(c) => Some(c),
            Link::Hub { .. } => None,
        }
    }

    /// The owning session's segment address (0: a restored session not yet re-attached).
    pub fn session(&self) -> u64 {
        self.session.load(Ordering::Acquire)
    }

    /// Binds the communicator to the segment of the session that (re-)attached with it.
    pub fn set_session(&self, session: u64) {
        self.session.store(session, Ordering::Release);
    }

    /// What a restore or a migration target needs to rejoin as this rank: id, rank, size and counts. Only valid
    /// while the rank issues nothing (its session is stopped at a barrier).
    pub fn save(&self, handle: u64) -> super::state::CommImage {
        let mut p2p: Vec<(bool, i32, u64)> = self
            .p2p
            .lock()
            .iter()
            .map(|(&(send, peer), &n)| (send, peer, n))
            .collect();
        p2p.sort();
        super::state::CommImage {
            handle,
            id: self.id.0.to_vec(),
            rank: self.rank,
            nranks: self.nranks,
            issued: self.issued(),
            p2p,
        }
    }

    /// Collectives issued so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Acquire)
    }

    /// The first failure of an operation, if any.
    pub fn async_error(&self) -> Option<String> {
        self.async_error.lock().clone()
    }

    /// Takes the next sequence number for an operation, in issue order.
    pub fn next_seq(&self, kind: &OpKind) -> u64 {
        match kind {
            OpKind::Send { peer } => Self::bump(&mut self.p2p.lock(), (true, *peer)),
            OpKind::Recv { peer } => Self::bump(&mut self.p2p.lock(), (false, *peer)),
            _ => self.issued.fetch_add(1, Ordering::AcqRel),
        }
    }

    fn bump(map: &mut HashMap<(bool, i32), u64>, key: (bool, i32)) -> u64 {
        let e = map.entry(key).or_insert(0);
        *e += 1;
        *e - 1
    }

    fn submit(&self, make: impl FnOnce(u64) -> ToHub) -> Receiver<Result<Answer, String>> {
        let (tx, rx) = channel();
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let Link::Hub { writer, conn } = &self.link else {
            let _ = tx.send(Err("a real NCCL communicator has no rendezvous hub".into()));
            return rx;
        };
        if let Some(why) = conn.closed.lock().clone() {
            let _ = tx.send(Err(why));
            return rx;
        }
        conn.waiters.lock().insert(tag, tx);
        let msg = make(tag);
        if let Err(e) = write_msg(&mut *writer.lock(), &msg) {
            if let Some(tx) = conn.waiters.lock().remove(&tag) {
                let _ = tx.send(Err(format!("cannot reach the job's rendezvous hub: {e}")));
            }
        }
        rx
    }

    fn fail(&self, msg: &str) {
        let mut e = self.async_error.lock();
        if e.is_none() {
            tracing::error!("NCCL job {} rank {}: {msg}", self.id.job(), self.rank);
            *e = Some(msg.to_string());
        }
    }

    /// Splits the communicator (collective over it): returns the new clique's id, rank and size, or `None` for
    /// `NCCL_SPLIT_NOCOLOR`. Waits for every rank.
    pub fn split(&self, color: i32, key: i32) -> Result<Option<(UniqueId, i32, i32)>, String> {
        let seq = self.next_seq(&OpKind::AllReduce);
        let rx = self.submit(|tag| ToHub::Split {
            tag,
            seq,
            color,
            key,
        });
        match rx.recv().map_err(|_| "rendezvous hub gone".to_string())? {
            Ok(Answer::Split {
                id: Some(id),
                rank,
                nranks,
            }) => Ok(Some((id, rank, nranks))),
            Ok(Answer::Split { id: None, .. }) => Ok(None),
            Ok(Answer::Data(_)) => Err("unexpected answer to a split".into()),
            Err(m) => {
                self.fail(&m);
                Err(m)
            }
        }
    }
}

/// One operation of a group, resolved by the dispatcher: handles checked, sequence number taken.
pub struct Item {
    pub comm: Arc<RankComm>,
    pub op: NcclOp,
    pub seq: u64,
    /// (send bytes, receive bytes).
    pub extents: (u64, u64),
}

/// Enqueues a group's operations: one host job per stream that submits all of that stream's operations, then waits
/// for them and writes the results to device memory.
pub fn enqueue_group(
    backend: &Arc<dyn Backend>,
    items: Vec<(StreamId, Item)>,
) -> Result<(), CuError> {
    let mut by_stream: Vec<(StreamId, Vec<Item>)> = Vec::new();
    for (st, item) in items {
        match by_stream.iter_mut().find(|(s, _)| *s == st) {
            Some((_, v)) => v.push(item),
            None => by_stream.push((st, vec![item])),
        }
    }
    for (st, items) in by_stream {
        let b = backend.clone();
        backend.enqueue_host(st, Box::new(move || run_items(&*b, items)))?;
    }
    Ok(())
}

fn run_items(b: &dyn Backend, items: Vec<Item>) -> Result<(), CuError> {
    let mut waits = Vec::with_capacity(items.len());
    for it in &items {
        let mut data = vec![0u8; it.extents.0 as usize];
        if !data.is_empty() {
            b.read_device(it.op.send, &mut data)?;
        }
        let mut op = it.op.op.clone();
        if let RedOp::PreMulSum(Scalar::Device(p)) = op {
            let mut s = vec![0u8; it.op.dtype.size()];
            b.read_device(p, &mut s)?;
            op = RedOp::PreMulSum(Scalar::Host(s));
        }
        let (seq, kind, dtype, count) = (it.seq, it.op.kind.clone(), it.op.dtype, it.op.count);
        waits.push(it.comm.submit(|tag| ToHub::Op {
            tag,
            seq,
            kind,
            dtype,
            op,
            count,
            data,
        }));
    }
    let mut first_err = None;
    for (it, rx) in items.iter().zip(waits) {
        match rx.recv() {
            Ok(Ok(Answer::Data(data))) => {
                let want = it.extents.1 as usize;
                if want > 0 {
                    if data.len() != want {
                        it.comm.fail(&format!(
                            "hub answered {} bytes, expected {want}",
                            data.len()
                        ));
                        first_err.get_or_insert(CuError::UNKNOWN);
                        continue;
                    }
                    b.write_device(it.op.recv, &data)?;
                }
            }
            Ok(Ok(Answer::Split { .. })) => {
                first_err.get_or_insert(CuError::UNKNOWN);
            }
            Ok(Err(m)) => {
                it.comm.fail(&m);
                first_err.get_or_insert(CuError::UNKNOWN);
            }
            Err(_) => {
                it.comm.fail("rendezvous hub gone");
                first_err.get_or_insert(CuError::UNKNOWN);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}
