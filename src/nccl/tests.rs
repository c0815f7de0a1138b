//! Reductions over every type and op, and collectives between ranks on separate emulated devices.

use super::rank::{enqueue_group, Item};
use super::reduce::reduce;
use super::rendezvous::Rendezvous;
use super::state::Rejoin;
use super::*;
use crate::backend::emulated::EmulatedBackend;
use crate::backend::{Backend, BackendOptions, StreamId};
use crate::protocol::Handle;
use half::{bf16, f16};
use std::sync::Arc;

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: plain numeric types without padding; the slice is valid for its byte length.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        .to_vec()
}

macro_rules! check_int {
    ($t:ty, $dt:expr) => {{
        let ranks: Vec<Vec<$t>> = (0..3)
            .map(|r| (0..7).map(|i| ((i * 37 + r * 11) % 23) as $t).collect())
            .collect();
        let inputs: Vec<Vec<u8>> = ranks.iter().map(|v| bytes_of(v)).collect();
        let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
        let s: $t = 3;
        let ops = [
            RedOp::Sum,
            RedOp::Prod,
            RedOp::Max,
            RedOp::Min,
            RedOp::Avg,
            RedOp::PreMulSum(Scalar::Host(bytes_of(&[s]))),
        ];
        for op in ops {
            let got = reduce($dt, &op, &refs).unwrap();
            let want: Vec<$t> = (0..7)
                .map(|i| {
                    let xs: Vec<$t> = ranks.iter().map(|v| v[i]).collect();
                    match op {
                        RedOp::Sum => xs.iter().fold(0 as $t, |a, &x| a.wrapping_add(x)),
                        RedOp::Prod => xs.iter().fold(1 as $t, |a, &x| a.wrapping_mul(x)),
                        RedOp::Max => *xs.iter().max().unwrap(),
                        RedOp::Min => *xs.iter().min().unwrap(),
                        RedOp::Avg => xs.iter().fold(0 as $t, |a, &x| a.wrapping_add(x)) / 3,
                        RedOp::PreMulSum(_) => xs
                            .iter()
                            .fold(0 as $t, |a, &x| a.wrapping_add(x.wrapping_mul(s))),
                    }
                })
                .collect();
            assert_eq!(got, bytes_of(&want), "{:?} {:?}", $dt, op);
        }
    }};
}

macro_rules! check_float {
    ($t:ty, $dt:expr, $from:expr, $to:expr) => {{
        let from = $from;
        let to = $to;
        let ranks: Vec<Vec<$t>> = (0..3)
            .map(|r| {
                (0..9)
                    .map(|i| from(((i * 7 + r * 5) % 13) as f32 * 0.37 - 1.9))
                    .collect()
            })
            .collect();
        let inputs: Vec<Vec<u8>> = ranks.iter().map(|v| bytes_of(v)).collect();
        let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
        let s: $t = from(0.75);
        let ops = [
            RedOp::Sum,
            RedOp::Prod,
            RedOp::Max,
            RedOp::Min,
            RedOp::Avg,
            RedOp::PreMulSum(Scalar::Host(bytes_of(&[s]))),
        ];
        for op in ops {
            let got = reduce($dt, &op, &refs).unwrap();
            // Reference: a rank-ordered fold, each step rounded to the type.
            let r = |x: f64| from(x as f32);
            let want: Vec<$t> = (0..9)
                .map(|i| {
                    let xs: Vec<f64> = ranks.iter().map(|v| to(v[i])).collect();
                    let k = match op {
                        RedOp::Avg => Some(to(from(1.0 / 3.0))),
                        RedOp::PreMulSum(_) => Some(to(s)),
                        _ => None,
                    };
                    let mut acc = match k {
                        Some(k) => r(xs[0] * k),
                        None => r(xs[0]),
                    };
                    for &x in &xs[1..] {
                        acc = match op {
                            RedOp::Sum => r(to(acc) + x),
                            RedOp::Prod => r(to(acc) * x),
                            RedOp::Max => r(to(acc).max(x)),
                            RedOp::Min => r(to(acc).min(x)),
                            _ => r(to(acc) + to(r(x * k.unwrap()))),
                        };
                    }
                    acc
                })
                .collect();
            assert_eq!(got, bytes_of(&want), "{:?} {:?}", $dt, op);
        }
    }};
}

#[test]
fn reductions_every_type_and_op() {
    check_int!(i8, DType::I8);
    check_int!(u8, DType::U8);
    check_int!(i32, DType::I32);
    check_int!(u32, DType::U32);
    check_int!(i64, DType::I64);
    check_int!(u64, DType::U64);
    check_float!(f16, DType::F16, f16::from_f32, |x: f16| x.to_f64());
    check_float!(bf16, DType::BF16, bf16::from_f32, |x: bf16| x.to_f64());
    check_float!(f32, DType::F32, |x: f32| x, |x: f32| x as f64);
}

#[test]
fn f64_sum_is_rank_ordered() {
    let a = bytes_of(&[1e16f64, 1.0]);
    let b = bytes_of(&[1.0f64, 1e16]);
    let c = bytes_of(&[-1e16f64, -1e16]);
    let got = reduce(DType::F64, &RedOp::Sum, &[&a, &b, &c]).unwrap();
    // ((1e16 + 1) - 1e16) = 0 after rounding; ((1 + 1e16) - 1e16) = 0 too; but in rank order only.
    let want = [((1e16f64 + 1.0) + -1e16), ((1.0f64 + 1e16) + -1e16)];
    assert_eq!(got, bytes_of(&want));
    assert!(
        reduce(DType::F32, &RedOp::Sum, &[&a[..3]]).is_err(),
        "partial elements are refused"
    );
}

#[test]
fn unique_id_roundtrip() {
    let id = UniqueId::new("devproxy-nccl/1-2-abc").unwrap();
    assert_eq!(UniqueId::from_bytes(&id.0).unwrap(), id);
    assert_eq!(id.job(), "1-2-abc");
    assert!(UniqueId::from_bytes(&[0u8; 128]).is_none());
    assert!(UniqueId::new(&"x".repeat(121)).is_none());
}

/// One rank: its own device (as if in its own server), a context, its stream.
struct Rank {
    b: Arc<dyn Backend>,
    stream: StreamId,
    comm: Arc<RankComm>,
}

/// A small emulated device for one rank.
fn emulated() -> Arc<dyn Backend> {
    Arc::new(
        EmulatedBackend::new_for_tests(&BackendOptions {
            arena_bytes: 64 << 20,
            threads: 1,
            ..Default::default()
        })
        .unwrap(),
    )
}

fn ranks(n: i32) -> Vec<Rank> {
    let id = hub::start().unwrap();
    (0..n)
        .map(|r| {
            let b = emulated();
            let ctx = b.context_create().unwrap();
            let stream = b.stream_create(ctx, 0, 0).unwrap();
            let comm = RankComm::join(id, r, n, 0).unwrap();
            Rank { b, stream, comm }
        })
        .collect()
}

fn issue(rank: &Rank, kind: OpKind, dtype: DType, op: RedOp, count: u64, send: u64, recv: u64) {
    let nop = NcclOp {
        comm: Handle(1),
        stream: Handle::NULL,
        kind: kind.clone(),
        dtype,
        op,
        count,
        send,
        recv,
    };
    let extents = kind.extents(
        count,
        dtype.size() as u64,
        rank.comm.nranks as u64,
        rank.comm.rank,
    );
    let seq = rank.comm.next_seq(&kind);
    enqueue_group(
        &rank.b,
        vec![(
            rank.stream,
            Item {
                comm: rank.comm.clone(),
                op: nop,
                seq,
                extents,
            },
        )],
    )
    .unwrap();
}

fn put(rank: &Rank, v: &[f32]) -> u64 {
    let p = rank.b.mem_alloc((v.len() * 4).max(4) as u64).unwrap();
    rank.b.write_device(p, &bytes_of(v)).unwrap();
    p
}

fn get(rank: &Rank, p: u64, n: usize) -> Vec<f32> {
    rank.b.stream_synchronize(rank.stream).unwrap();
    let mut b = vec![0u8; n * 4];
    rank.b.read_device(p, &mut b).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn collectives_between_devices() {
    let rs = ranks(3);
    let data: Vec<Vec<f32>> = (0..3)
        .map(|r| (0..6).map(|i| (r * 10 + i) as f32).collect())
        .collect();
    let send: Vec<u64> = rs.iter().zip(&data).map(|(r, d)| put(r, d)).collect();
    let recv: Vec<u64> = rs.iter().map(|r| put(r, &[0.0; 18])).collect();
    let f = DType::F32;
    // all-reduce (out of place) then in place
    for (i, r) in rs.iter().enumerate() {
        issue(r, OpKind::AllReduce, f, RedOp::Sum, 6, send[i], recv[i]);
    }
    let want: Vec<f32> = (0..6).map(|i| (30 + 3 * i) as f32).collect();
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(get(r, recv[i], 6), want);
    }
    for (i, r) in rs.iter().enumerate() {
        issue(r, OpKind::AllReduce, f, RedOp::Max, 6, recv[i], recv[i]);
    }
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(get(r, recv[i], 6), want);
    }
    // broadcast from 2, reduce to 1, all-gather, reduce-scatter
    for (i, r) in rs.iter().enumerate() {
        issue(
            r,
            OpKind::Broadcast { root: 2 },
            f,
            RedOp::Sum,
            6,
            send[i],
            recv[i],
        );
    }
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(get(r, recv[i], 6), data[2]);
    }
    for (i, r) in rs.iter().enumerate() {
        issue(r, OpKind::AllGather, f, RedOp::Sum, 6, send[i], recv[i]);
    }
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(get(r, recv[i], 18), data.concat());
    }
    for (i, r) in rs.iter().enumerate() {
        issue(r, OpKind::ReduceScatter, f, RedOp::Sum, 2, send[i], recv[i]);
    }
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(get(r, recv[i], 2), want[2 * i..2 * i + 2].to_vec());
    }
    // send/recv around a ring, each rank's pair in one group (sends and receives on one stream)
    for (i, r) in rs.iter().enumerate() {
        let to = ((i + 1) % 3) as i32;
        let from = ((i + 2) % 3) as i32;
        let mk = |kind: OpKind, s, d| {
            let extents = kind.extents(6, 4, 3, i as i32);
            let seq = r.comm.next_seq(&kind);
            let op = NcclOp {
                comm: Handle(1),
                stream: Handle::NULL,
                kind,
                dtype: f,
                op: RedOp::Sum,
                count: 6,
                send: s,
                recv: d,
            };
            (
                r.stream,
                Item {
                    comm: r.comm.clone(),
                    op,
                    seq,
                    extents,
                },
            )
        };
        enqueue_group(
            &r.b,
            vec![
                mk(OpKind::Recv { peer: from }, 0, recv[i]),
                mk(OpKind::Send { peer: to }, send[i], 0),
            ],
        )
        .unwrap();
    }
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(get(r, recv[i], 6), data[(i + 2) % 3]);
    }
    assert!(rs
        .iter()
        .all(|r| r.comm.issued() == 5 && r.comm.async_error().is_none()));
    assert_eq!(
        jobs()
            .iter()
            .filter(|j| j.job == rs[0].comm.id.job())
            .count(),
        3
    );
}

#[test]
fn a_rank_that_leaves_fails_the_others_with_its_name() {
    let mut rs = ranks(3);
    let gone = rs.remove(1);
    drop(gone);
    let send: Vec<u64> = rs.iter().map(|r| put(r, &[1.0; 4])).collect();
    for (i, r) in rs.iter().enumerate() {
        issue(
            r,
            OpKind::AllReduce,
            DType::F32,
            RedOp::Sum,
            4,
            send[i],
            send[i],
        );
    }
    for r in &rs {
        assert!(r.b.stream_synchronize(r.stream).is_err());
        let e = r.comm.async_error().unwrap();
        assert!(e.contains("rank") && e.contains('1'), "{e}");
    }
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    let rs = ranks(2);
    let p: Vec<u64> = rs.iter().map(|r| put(r, &[1.0; 4])).collect();
    issue(
        &rs[0],
        OpKind::AllReduce,
        DType::F32,
        RedOp::Sum,
        4,
        p[0],
        p[0],
    );
    issue(
        &rs[1],
        OpKind::AllReduce,
        DType::F32,
        RedOp::Sum,
        2,
        p[1],
        p[1],
    );
    for r in &rs {
        assert!(r.b.stream_synchronize(r.stream).is_err());
        assert!(r.comm.async_error().unwrap().contains("does not match"));
    }
}

#[test]
fn split_by_color() {
    let rs = ranks(4);
    let hs: Vec<_> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let c = r.comm.clone();
            std::thread::spawn(move || {
                c.split(
                    if i == 3 {
                        hub::SPLIT_NOCOLOR
                    } else {
                        (i % 2) as i32
                    },
                    -(i as i32),
                )
            })
        })
        .collect();
    let out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    // color 0: ranks 0, 2 (keys 0, -2 -> rank 2 first); color 1: rank 1; rank 3: none
    assert_eq!(out[0].map(|o| (o.1, o.2)), Some((1, 2)));
    assert_eq!(out[2].map(|o| (o.1, o.2)), Some((0, 2)));
    assert_eq!(out[1].map(|o| (o.1, o.2)), Some((0, 1)));
    assert!(out[3].is_none());
    assert_eq!(out[0].unwrap().0, out[2].unwrap().0);
}

fn one_rank_state(id: Vec<u8>, nranks: i32) -> super::state::RankState {
    super::state::RankState {
        comms: vec![super::state::CommImage {
            handle: 0x2345,
            id,
            rank: 0,
            nranks,
            issued: 5,
            p2p: Vec::new(),
        }],
        replay: Vec::new(),
    }
}

fn session() -> crate::server::session::SessionState {
    crate::server::session::SessionState::new(emulated()).unwrap()
}

#[test]
fn a_saved_one_rank_real_communicator_is_re_created_with_its_counts() {
    // A real NCCL id (random first bytes, not devproxy's magic), as the cuda backend saves it.
    let mut id = vec![0u8; UNIQUE_ID_BYTES];
    id[..8].copy_from_slice(&0x0bad_cafe_1234_5678u64.to_le_bytes());
    let saved = one_rank_state(id, 1);
    assert!(saved.migration_refusal().is_none());
    assert!(!saved.comms[0].emulated());
    let mut st = session();
    saved.attach(&mut st, Rejoin::Migration).unwrap();
    let c = st.nccl.get(&Handle(0x2345)).expect("same handle").clone();
    assert_eq!((c.rank, c.nranks, c.issued()), (0, 1, 5));
    // On the emulated device it becomes an emulated communicator with a new hub, and works.
    assert!(c.as_real().is_none() && !c.id.is_real());
    let r = Rank {
        b: st.backend.clone(),
        stream: st.default_stream,
        comm: c,
    };
    let p = put(&r, &[1.5, -2.0, 3.25]);
    issue(&r, OpKind::AllReduce, DType::F32, RedOp::Avg, 3, p, p);
    assert_eq!(get(&r, p, 3), vec![1.5, -2.0, 3.25]);
    assert_eq!(r.comm.issued(), 6);
}

#[test]
fn a_multi_rank_real_communicator_cannot_move_alone_nor_come_back_on_the_emulated_device() {
    let mut id = vec![0u8; UNIQUE_ID_BYTES];
    id[..8].copy_from_slice(&0x0bad_cafe_1234_5678u64.to_le_bytes());
    let saved = one_rank_state(id, 2);
    let why = saved.migration_refusal().expect("refused");
    assert!(why.contains("real NCCL communicator of 2 ranks"), "{why}");
    assert!(why.contains("checkpoint --job nccl-7856341"), "{why}");
    let mut st = session();
    assert_eq!(saved.attach(&mut st, Rejoin::Migration).unwrap_err(), why);
    // A restore of the whole job re-creates it, but only on a GPU: this server has the emulated device.
    let dir = std::env::temp_dir().join(format!("devproxy-nccl-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rdv = Rendezvous::new(&dir, "t", std::time::Duration::from_millis(100));
    let err = saved.attach(&mut st, Rejoin::Restore(&rdv)).unwrap_err();
    assert!(
        err.contains("made on a GPU by real NCCL") && err.contains("emulated backend"),
        "{err}"
    );
    assert!(st.nccl.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
    // An emulated communicator of several ranks may move (it rejoins its hub).
    let emu = one_rank_state(UniqueId::new("x/job").unwrap().0.to_vec(), 2);
    assert!(emu.migration_refusal().is_none());
}

#[test]
fn restored_ranks_re_create_their_communicator_under_a_new_id_and_continue_their_counts() {
    let old = UniqueId::new("devproxy-nccl/gone-1-0").unwrap();
    let state = |rank: i32| super::state::RankState {
        comms: vec![super::state::CommImage {
            handle: 1,
            id: old.0.to_vec(),
            rank,
            nranks: 2,
            issued: 41,
            p2p: Vec::new(),
        }],
        replay: Vec::new(),
    };
    let dir = std::env::temp_dir().join(format!("devproxy-nccl-restore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rdv = Rendezvous::new(&dir, "t", std::time::Duration::from_secs(20));
    // Rank 1 starts first and waits for rank 0's new id.
    let r1 = {
        let rdv = rdv.clone();
        let s1 = state(1);
        std::thread::spawn(move || {
            let mut st = session();
            s1.attach(&mut st, Rejoin::Restore(&rdv)).map(|()| st)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut st0 = session();
    state(0).attach(&mut st0, Rejoin::Restore(&rdv)).unwrap();
    let st1 = r1.join().unwrap().unwrap();
    let ranks: Vec<Rank> = [&st0, &st1]
        .iter()
        .map(|st| Rank {
            b: st.backend.clone(),
            stream: st.default_stream,
            comm: st.nccl.get(&Handle(1)).expect("same handle").clone(),
        })
        .collect();
    assert_ne!(ranks[0].comm.id, old, "a new id: the old hub is gone");
    assert_eq!(ranks[0].comm.id, ranks[1].comm.id);
    assert_eq!(ranks[1].comm.rank, 1);
    let ps: Vec<u64> = [(0, 1.0f32), (1, 3.0)]
        .iter()
        .map(|&(r, x)| put(&ranks[r], &[x, 2.0 * x]))
        .collect();
    for (r, p) in ranks.iter().zip(&ps) {
        issue(r, OpKind::AllReduce, DType::F32, RedOp::Sum, 2, *p, *p);
    }
    for (r, p) in ranks.iter().zip(&ps) {
        assert_eq!(get(r, *p, 2), vec![4.0, 8.0]);
        assert_eq!(r.comm.issued(), 42, "the count continues from the image");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
