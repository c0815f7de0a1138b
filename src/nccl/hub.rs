//! The rendezvous hub of one communicator clique (a job).
//!
//! A hub is a thread in the server that minted the unique id, listening on an abstract Unix socket (no file to
//! clean up, no path-length limit, gone when the server is). Each rank's server opens one connection, says which
//! rank it is ([`ToHub::Join`]) and then sends its contributions tagged with a per-connection `tag`; the hub answers
//! every tag exactly once ([`FromHub::Done`] or [`FromHub::Failed`]).
//!
//! - Collectives are matched by the rank's collective sequence number: the hub waits for contribution `seq` of every
//!   rank, checks that they agree (kind, type, op, count), folds them in rank order and answers each rank.
//! - Send/recv are matched by (sender, receiver, per-pair sequence number), independently of collectives.
//! - A connection that closes marks its rank gone: every operation that waits for it fails with a message naming
//!   the rank, and so does every later one that would need it. The hub exits once every rank has joined and left.

use super::reduce::reduce;
use super::{DType, OpKind, RedOp, UniqueId};
use bincode::{Decode, Encode};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest message accepted on a hub connection.
const MAX_MESSAGE: u64 = 16 << 30;

/// NCCL_SPLIT_NOCOLOR.
pub const SPLIT_NOCOLOR: i32 = -1;

/// Rank -> hub.
#[derive(Encode, Decode, Debug)]
pub enum ToHub {
    Join {
        rank: i32,
        nranks: i32,
        who: String,
    },
    Op {
        tag: u64,
        seq: u64,
        kind: OpKind,
        dtype: DType,
        op: RedOp,
        count: u64,
        data: Vec<u8>,
    },
    Split {
        tag: u64,
        seq: u64,
        color: i32,
        key: i32,
    },
    /// A restored or migrated rank coming back: like `Join`, but the rank may already be known (its old connection
    /// is replaced and closing it no longer counts as the rank leaving) or gone (it is back).
    Rejoin {
        rank: i32,
        nranks: i32,
        who: String,
    },
}

/// Hub -> rank.
#[derive(Encode, Decode, Debug)]
pub enum FromHub {
    Joined,
    Done {
        tag: u64,
        data: Vec<u8>,
    },
    Split {
        tag: u64,
        id: Option<Vec<u8>>,
        rank: i32,
        nranks: i32,
    },
    Failed {
        tag: u64,
        msg: String,
    },
}

/// Writes one framed message (8-byte little-endian length, then bincode).
pub fn write_msg<T: Encode>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let body = crate::protocol::encode(msg);
    let mut buf = Vec::with_capacity(body.len() + 8);
    buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
}

/// Reads one framed message; `Ok(None)` at a clean end of stream.
pub fn read_msg<T: Decode<()>>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 8];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u64::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len}-byte message"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    crate::protocol::decode(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// One contribution waiting to be matched.
struct Contribution {
    tag: u64,
    kind: OpKind,
    dtype: DType,
    op: RedOp,
    count: u64,
    data: Vec<u8>,
    /// For splits: (color, key).
    split: Option<(i32, i32)>,
}

#[derive(Default)]
struct State {
    nranks: i32,
    peers: HashMap<i32, Arc<Mutex<UnixStream>>>,
    joined: BTreeSet<i32>,
    gone: BTreeSet<i32>,
    colls: BTreeMap<u64, BTreeMap<i32, Contribution>>,
    /// (from, to, seq) -> (tag at the sender, data)
    sends: HashMap<(i32, i32, u64), (u64, Vec<u8>)>,
    /// (from, to, seq) -> (tag at the receiver, bytes expected)
    recvs: HashMap<(i32, i32, u64), (u64, u64)>,
}

struct Hub {
    id: UniqueId,
    state: Mutex<State>,
}

static NEXT_HUB: AtomicU64 = AtomicU64::new(1);

/// Starts a hub and returns its unique id. The hub lives until all its ranks have joined and left.
pub fn start() -> Result<UniqueId, String> {
    let nonce: u64 = {
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| e.to_string())?;
        u64::from_le_bytes(b)
    };
    let name = format!(
        "devproxy-nccl/{}-{}-{:08x}",
        std::process::id(),
        NEXT_HUB.fetch_add(1, Ordering::Relaxed),
        nonce as u32
    );
    let id = UniqueId::new(&name).ok_or("hub name too long")?;
    start_at(id).map_err(|e| format!("cannot listen on the NCCL hub socket: {e}"))
}

/// Starts a hub listening on the name `id` carries (a migrated rank whose hub is gone starts a new one under the old id, so the
/// restored ranks' unique ids stay valid). Fails with `AddrInUse` where a hub already listens there.
pub fn start_at(id: UniqueId) -> std::io::Result<UniqueId> {
    let name = id
        .name()
        .ok_or_else(|| std::io::Error::other("not a devproxy NCCL unique id"))?;
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let hub = Arc::new(Hub {
        id,
        state: Mutex::new(State::default()),
    });
    std::thread::Builder::new()
        .name("devproxy-nccl-hub".into())
        .spawn(move || hub.accept_loop(listener))?;
    tracing::info!("NCCL rendezvous hub {} started", id.job());
    Ok(id)
}

/// Connects to the hub `id` names; if nobody listens there (the job's servers were restored after the one holding
/// the hub died), starts a new hub under that name in this server first. Ranks restored concurrently in several
/// servers race to start it: the loser connects to the winner's.
pub fn connect_or_start(id: &UniqueId) -> Result<UnixStream, String> {
    let mut last = String::new();
    for _ in 0..50 {
        match connect(id) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        match start_at(*id) {
            Ok(_) => {
                tracing::info!(
                    "NCCL job {}: no rendezvous hub was listening; started a new one here",
                    id.job()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => {
                return Err(format!(
                    "cannot start a rendezvous hub for job {}: {e}",
                    id.job()
                ))
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(last)
}

/// Connects to the hub an id names.
pub fn connect(id: &UniqueId) -> Result<UnixStream, String> {
    let name = id
        .name()
        .ok_or("not a devproxy NCCL unique id (was it made by ncclGetUniqueId under devproxy?)")?;
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(|e| e.to_string())?;
    UnixStream::connect_addr(&addr).map_err(|e| {
        format!("cannot reach the job's rendezvous hub {name}: {e} (the server that made the unique id is gone?)")
    })
}

impl Hub {
    fn accept_loop(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            if self.finished() {
                break;
            }
            let hub = self.clone();
            let _ = std::thread::Builder::new()
                .name("devproxy-nccl-peer".into())
                .spawn(move || hub.serve(conn));
        }
        tracing::info!("NCCL rendezvous hub {} finished", self.id.job());
    }

    fn finished(&self) -> bool {
        let s = self.state.lock();
        s.nranks > 0 && s.joined.len() == s.nranks as usize && s.gone.len() == s.nranks as usize
    }

    fn serve(self: Arc<Self>, mut conn: UnixStream) {
        let (rank, writer) = match read_msg::<ToHub>(&mut conn) {
            Ok(Some(msg @ (ToHub::Join { .. } | ToHub::Rejoin { .. }))) => {
                let (rank, nranks, who, again) = match msg {
                    ToHub::Join { rank, nranks, who } => (rank, nranks, who, false),
                    ToHub::Rejoin { rank, nranks, who } => (rank, nranks, who, true),
                    _ => return,
                };
                let writer = match conn.try_clone() {
                    Ok(w) => Arc::new(Mutex::new(w)),
                    Err(_) => return,
                };
                let refused = {
                    let mut s = self.state.lock();
                    if s.nranks == 0 {
                        s.nranks = nranks;
                    }
                    if nranks != s.nranks
                        || rank < 0
                        || rank >= nranks
                        || (!again && s.joined.contains(&rank))
                    {
                        Some(format!(
                            "rank {rank} of {nranks} cannot join a clique of {} ranks (ranks joined: {:?})",
                            s.nranks, s.joined
                        ))
                    } else {
                        s.joined.insert(rank);
                        s.gone.remove(&rank);
                        // A rejoin replaces the rank's old connection (a migration's source still holds it).
                        s.peers.insert(rank, writer.clone());
                        None
                    }
                };
                let reply = match &refused {
                    Some(msg) => FromHub::Failed {
                        tag: 0,
                        msg: msg.clone(),
                    },
                    None => FromHub::Joined,
                };
                let _ = write_msg(&mut *writer.lock(), &reply);
                if refused.is_some() {
                    return;
                }
                tracing::debug!(
                    "NCCL job {}: rank {rank}/{nranks} {} ({who})",
                    self.id.job(),
                    if again { "rejoined" } else { "joined" }
                );
                (rank, writer)
            }
            _ => return,
        };
        while let Ok(Some(msg)) = read_msg::<ToHub>(&mut conn) {
            self.handle(rank, msg);
        }
        let replaced = !self
            .state
            .lock()
            .peers
            .get(&rank)
            .is_some_and(|w| Arc::ptr_eq(w, &writer));
        if replaced {
            // The rank rejoined through another connection (it moved): this one closing is not the rank leaving.
            tracing::debug!(
                "NCCL job {}: rank {rank}'s old connection closed",
                self.id.job()
            );
            return;
        }
        self.rank_gone(rank);
        if self.finished() {
            // Wake the accept loop so it sees the hub is finished.
            let _ = connect(&self.id);
        }
    }

    fn send_to(&self, s: &State, rank: i32, msg: &FromHub) {
        if let Some(w) = s.peers.get(&rank) {
            let _ = write_msg(&mut *w.lock(), msg);
        }
    }

    fn handle(&self, rank: i32, msg: ToHub) {
        let mut s = self.state.lock();
        match msg {
            ToHub::Join { .. } | ToHub::Rejoin { .. } => {}
            ToHub::Op {
                tag,
                seq,
                kind,
                dtype,
                op,
                count,
                data,
            } => match kind {
                OpKind::Send { peer } => {
                    let key = (rank, peer, seq);
                    if let Some((rtag, bytes)) = s.recvs.remove(&key) {
                        let reply = if bytes == data.len() as u64 {
                            self.send_to(&s, peer, &FromHub::Done { tag: rtag, data });
                            FromHub::Done {
                                tag,
                                data: Vec::new(),
                            }
                        } else {
                            let msg = format!(
                                "send of {} bytes from rank {rank} does not match a receive of {bytes} bytes at rank {peer}",
                                data.len()
                            );
                            self.send_to(
                                &s,
                                peer,
                                &FromHub::Failed {
                                    tag: rtag,
                                    msg: msg.clone(),
                                },
                            );
                            FromHub::Failed { tag, msg }
                        };
                        self.send_to(&s, rank, &reply);
                    } else if s.gone.contains(&peer) {
                        let msg = format!(
                            "rank {peer} left the job; send from rank {rank} cannot complete"
                        );
                        self.send_to(&s, rank, &FromHub::Failed { tag, msg });
                    } else {
                        s.sends.insert(key, (tag, data));
                    }
                }
                OpKind::Recv { peer } => {
                    let key = (peer, rank, seq);
                    let bytes = count * dtype.size() as u64;
                    if let Some((stag, data)) = s.sends.remove(&key) {
                        if data.len() as u64 == bytes {
                            self.send_to(&s, rank, &FromHub::Done { tag, data });
                            self.send_to(
                                &s,
                                peer,
                                &FromHub::Done {
                                    tag: stag,
                                    data: Vec::new(),
                                },
                            );
                        } else {
                            let msg = format!(
                                "send of {} bytes from rank {peer} does not match a receive of {bytes} bytes at rank {rank}",
                                data.len()
                            );
                            self.send_to(
                                &s,
                                rank,
                                &FromHub::Failed {
                                    tag,
                                    msg: msg.clone(),
                                },
                            );
                            self.send_to(&s, peer, &FromHub::Failed { tag: stag, msg });
                        }
                    } else if s.gone.contains(&peer) {
                        let msg = format!(
                            "rank {peer} left the job; receive at rank {rank} cannot complete"
                        );
                        self.send_to(&s, rank, &FromHub::Failed { tag, msg });
                    } else {
                        s.recvs.insert(key, (tag, bytes));
                    }
                }
                _ => {
                    let c = Contribution {
                        tag,
                        kind,
                        dtype,
                        op,
                        count,
                        data,
                        split: None,
                    };
                    self.contribute(&mut s, rank, seq, c);
                }
            },
            ToHub::Split {
                tag,
                seq,
                color,
                key,
            } => {
                let c = Contribution {
                    tag,
                    kind: OpKind::AllGather,
                    dtype: DType::I32,
                    op: RedOp::Sum,
                    count: 0,
                    data: Vec::new(),
                    split: Some((color, key)),
                };
                self.contribute(&mut s, rank, seq, c);
            }
        }
    }

    fn contribute(&self, s: &mut State, rank: i32, seq: u64, c: Contribution) {
        let missing_gone: Vec<i32> = {
            let e = s.colls.entry(seq).or_default();
            e.insert(rank, c);
            let have: BTreeSet<i32> = e.keys().copied().collect();
            s.gone
                .iter()
                .copied()
                .filter(|r| !have.contains(r))
                .collect()
        };
        if !missing_gone.is_empty() {
            let contribs = s.colls.remove(&seq).unwrap_or_default();
            let msg = format!("rank(s) {missing_gone:?} left the job before collective #{seq}");
            for (r, c) in contribs {
                self.send_to(
                    s,
                    r,
                    &FromHub::Failed {
                        tag: c.tag,
                        msg: msg.clone(),
                    },
                );
            }
            return;
        }
        if s.colls.get(&seq).map_or(0, |e| e.len()) < s.nranks as usize {
            return;
        }
        let contribs = s.colls.remove(&seq).unwrap_or_default();
        let mut replies = self.complete(seq, s.nranks, &contribs);
        for (r, c) in &contribs {
            let msg = match &mut replies {
                Ok(out) => out.remove(r).unwrap_or(FromHub::Done {
                    tag: c.tag,
                    data: Vec::new(),
                }),
                Err(m) => FromHub::Failed {
                    tag: c.tag,
                    msg: m.clone(),
                },
            };
            self.send_to(s, *r, &msg);
        }
    }

    /// Computes every rank's answer to one collective.
    fn complete(
        &self,
        seq: u64,
        nranks: i32,
        contribs: &BTreeMap<i32, Contribution>,
    ) -> Result<HashMap<i32, FromHub>, String> {
        let first = contribs.values().next().ok_or("empty collective")?;
        if first.split.is_some() {
            return self.complete_split(seq, contribs);
        }
        for (r, c) in contribs {
            if c.kind != first.kind
                || c.dtype != first.dtype
                || c.op != first.op
                || c.count != first.count
            {
                return Err(format!(
                    "collective #{seq} does not match across ranks: rank 0 issued {:?} of {} x {:?}, rank {r} \
                     issued {:?} of {} x {:?}",
                    first.kind, first.count, first.dtype, c.kind, c.count, c.dtype
                ));
            }
        }
        let elem = first.dtype.size() as u64;
        for (r, c) in contribs {
            let (send, _) = first.kind.extents(c.count, elem, nranks as u64, *r);
            if c.data.len() as u64 != send {
                return Err(format!(
                    "rank {r} contributed {} bytes to collective #{seq}, expected {send}",
                    c.data.len()
                ));
            }
        }
        let inputs: Vec<&[u8]> = contribs.values().map(|c| c.data.as_slice()).collect();
        let mut out = HashMap::new();
        let done = |tag: u64, data: Vec<u8>| FromHub::Done { tag, data };
        match &first.kind {
            OpKind::AllReduce => {
                let res = reduce(first.dtype, &first.op, &inputs)?;
                for (r, c) in contribs {
                    out.insert(*r, done(c.tag, res.clone()));
                }
            }
            OpKind::Reduce { root } => {
                let res = reduce(first.dtype, &first.op, &inputs)?;
                let mut res = Some(res);
                for (r, c) in contribs {
                    let data = if r == root {
                        res.take().unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    out.insert(*r, done(c.tag, data));
                }
            }
            OpKind::Broadcast { root } => {
                let data = contribs
                    .get(root)
                    .ok_or(format!("broadcast root {root} is not a rank"))?
                    .data
                    .clone();
                for (r, c) in contribs {
                    out.insert(*r, done(c.tag, data.clone()));
                }
            }
            OpKind::AllGather => {
                let all: Vec<u8> = inputs.concat();
                for (r, c) in contribs {
                    out.insert(*r, done(c.tag, all.clone()));
                }
            }
            OpKind::ReduceScatter => {
                let res = reduce(first.dtype, &first.op, &inputs)?;
                let chunk = (first.count * elem) as usize;
                for (r, c) in contribs {
                    let i = *r as usize;
                    out.insert(*r, done(c.tag, res[i * chunk..(i + 1) * chunk].to_vec()));
                }
            }
            OpKind::Send { .. } | OpKind::Recv { .. } => {
                return Err("point-to-point op in a collective".into())
            }
        }
        Ok(out)
    }

    fn complete_split(
        &self,
        seq: u64,
        contribs: &BTreeMap<i32, Contribution>,
    ) -> Result<HashMap<i32, FromHub>, String> {
        let mut groups: BTreeMap<i32, Vec<(i32, i32)>> = BTreeMap::new();
        for (r, c) in contribs {
            let (color, key) = c.split.ok_or(format!(
                "collective #{seq}: split mixed with another collective"
            ))?;
            if color != SPLIT_NOCOLOR {
                if color < 0 {
                    return Err(format!("rank {r}: split color {color} is negative"));
                }
                groups.entry(color).or_default().push((key, *r));
            }
        }
        let mut out = HashMap::new();
        for members in groups.values_mut() {
            members.sort();
            let id = start()?;
            for (new_rank, (_, r)) in members.iter().enumerate() {
                let tag = contribs[r].tag;
                out.insert(
                    *r,
                    FromHub::Split {
                        tag,
                        id: Some(id.0.to_vec()),
                        rank: new_rank as i32,
                        nranks: members.len() as i32,
                    },
                );
            }
        }
        for (r, c) in contribs {
            out.entry(*r).or_insert(FromHub::Split {
                tag: c.tag,
                id: None,
                rank: -1,
                nranks: 0,
            });
        }
        Ok(out)
    }

    fn rank_gone(&self, rank: i32) {
        let mut s = self.state.lock();
        s.gone.insert(rank);
        s.peers.remove(&rank);
        tracing::debug!("NCCL job {}: rank {rank} left", self.id.job());
        // Collectives waiting for this rank can never complete.
        let stuck: Vec<u64> = s
            .colls
            .iter()
            .filter(|(_, e)| !e.contains_key(&rank))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in stuck {
            let contribs = s.colls.remove(&seq).unwrap_or_default();
            let msg = format!("rank {rank} left the job before collective #{seq}");
            for (r, c) in contribs {
                self.send_to(
                    &s,
                    r,
                    &FromHub::Failed {
                        tag: c.tag,
                        msg: msg.clone(),
                    },
                );
            }
        }
        let sends: Vec<_> = s.sends.keys().filter(|k| k.1 == rank).copied().collect();
        for k in sends {
            if let Some((tag, _)) = s.sends.remove(&k) {
                let msg = format!(
                    "rank {rank} left the job; send from rank {} cannot complete",
                    k.0
                );
                self.send_to(&s, k.0, &FromHub::Failed { tag, msg });
            }
        }
        let recvs: Vec<_> = s.recvs.keys().filter(|k| k.0 == rank).copied().collect();
        for k in recvs {
            if let Some((tag, _)) = s.recvs.remove(&k) {
                let msg = format!(
                    "rank {rank} left the job; receive at rank {} cannot complete",
                    k.1
                );
                self.send_to(&s, k.1, &FromHub::Failed { tag, msg });
            }
        }
    }
}
