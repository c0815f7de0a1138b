//! The interpreter: blocks on host threads, warps of 32 lanes in lock-step inside a block.

use std::sync::atomic::{
    AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use crate::float::{self, Rnd};
use crate::ir::*;
use crate::{
    DeviceMemory, LaunchConfig, LaunchError, Module, LOCAL_WINDOW, PARAM_WINDOW, SHARED_WINDOW,
    WINDOW_SIZE,
};

const RUN: u8 = 0;
const EXITED: u8 = 1;
const AT_BAR: u8 = 2;
const AT_WSYNC: u8 = 3;
const NO_THREAD: u8 = 4;

/// Per-lane local memory cap (frames of nested calls included).
const MAX_LOCAL: usize = 512 * 1024;

pub(crate) struct Launch<'a> {
    pub m: &'a Module,
    pub kernel: &'a Func,
    pub cfg: &'a LaunchConfig,
    pub params: &'a [u8],
    pub global_addrs: &'a [u64],
    pub mem: &'a dyn DeviceMemory,
    /// Per shared symbol: offset within the block's shared buffer (u64::MAX when not used by this kernel).
    pub shared_off: Vec<u64>,
    pub shared_size: u64,
    pub nregs: usize,
}

struct Frame {
    ret_pc: u32,
    base: u32,
    ret: Option<FrameCopy>,
    callee_base: u32,
    saved: Option<(u32, Vec<u64>)>,
}

struct Warp {
    regs: Vec<u64>,
    pc: [u32; 32],
    state: [u8; 32],
    bar_id: [u32; 32],
    frame_base: [u32; 32],
    stacks: Vec<Vec<Frame>>,
    local: Vec<Vec<u8>>,
    tid: [[u32; 3]; 32],
    warp_id: u32,
    clock: u64,
}

struct BlockState {
    shared: Vec<u8>,
    ctaid: [u32; 3],
    /// arrivals per barrier id (bar.arrive and waiting lanes)
    arrived: [u32; 16],
    expected: [Option<u32>; 16],
}

type R<T> = Result<T, LaunchError>;

impl Launch<'_> {
    fn illegal(&self, addr: u64) -> LaunchError {
        LaunchError::IllegalAddress {
            kernel: self.kernel.name.clone(),
            addr,
        }
    }
    fn unsupported(&self, what: String) -> LaunchError {
        LaunchError::Unsupported {
            kernel: self.kernel.name.clone(),
            instruction: what,
        }
    }

    pub(crate) fn run(&self) -> R<(u64, u64)> {
        let g = self.cfg.grid;
        let nblocks = g[0] as u64 * g[1] as u64 * g[2] as u64;
        let threads = self.cfg.host_threads.max(1).min(nblocks.max(1) as usize);
        let next = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let winsts = AtomicU64::new(0);
        let tinsts = AtomicU64::new(0);
        let first_err: std::sync::Mutex<Option<(u64, LaunchError)>> = std::sync::Mutex::new(None);
        let workers = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    workers.fetch_add(1, Ordering::Relaxed);
                    let mut warps: Vec<Warp> = Vec::new();
                    let mut counts = (0u64, 0u64);
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= nblocks {
                            break;
                        }
                        let ctaid = [
                            (b % g[0] as u64) as u32,
                            ((b / g[0] as u64) % g[1] as u64) as u32,
                            (b / (g[0] as u64 * g[1] as u64)) as u32,
                        ];
                        if let Err(e) = self.run_block(ctaid, &mut warps, &mut counts) {
                            stop.store(true, Ordering::Relaxed);
                            let mut fe = first_err.lock().unwrap_or_else(|p| p.into_inner());
                            if fe.as_ref().is_none_or(|(fb, _)| b < *fb) {
                                *fe = Some((b, e));
                            }
                            break;
                        }
                    }
                    winsts.fetch_add(counts.0, Ordering::Relaxed);
                    tinsts.fetch_add(counts.1, Ordering::Relaxed);
                });
            }
        });
        if let Some((_, e)) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        Ok((winsts.into_inner(), tinsts.into_inner()))
    }

    fn run_block(&self, ctaid: [u32; 3], warps: &mut Vec<Warp>, counts: &mut (u64, u64)) -> R<()> {
        let b = self.cfg.block;
        let nthreads = (b[0] * b[1] * b[2]) as usize;
        let nwarps = nthreads.div_ceil(32);
        let frame = self.kernel.frame_size as usize;
        while warps.len() < nwarps {
            warps.push(Warp {
                regs: vec![0; self.nregs * 32],
                pc: [0; 32],
                state: [NO_THREAD; 32],
                bar_id: [0; 32],
                frame_base: [0; 32],
                stacks: (0..32).map(|_| Vec::new()).collect(),
                local: (0..32).map(|_| Vec::new()).collect(),
                tid: [[0; 3]; 32],
                warp_id: 0,
                clock: 0,
            });
        }
        for (w, warp) in warps.iter_mut().enumerate().take(nwarps) {
            warp.warp_id = w as u32;
            for l in 0..32 {
                let t = w * 32 + l;
                if t < nthreads {
                    let t = t as u32;
                    warp.tid[l] = [t % b[0], (t / b[0]) % b[1], t / (b[0] * b[1])];
                    warp.state[l] = RUN;
                    warp.pc[l] = self.kernel.entry_pc;
                    warp.frame_base[l] = 0;
                    warp.stacks[l].clear();
                    let loc = &mut warp.local[l];
                    loc.clear();
                    loc.resize(frame, 0);
                } else {
                    warp.state[l] = NO_THREAD;
                }
            }
        }
        let mut blk = BlockState {
            shared: vec![0; self.shared_size as usize],
            ctaid,
            arrived: [0; 16],
            expected: [None; 16],
        };
        let warps = &mut warps[..nwarps];
        loop {
            for w in warps.iter_mut() {
                self.run_warp(w, &mut blk, counts)?;
            }
            let mut live = 0u32;
            let mut waiting = [0u32; 16];
            for w in warps.iter() {
                for l in 0..32 {
                    match w.state[l] {
                        RUN | AT_WSYNC => live += 1,
                        AT_BAR => {
                            live += 1;
                            waiting[w.bar_id[l] as usize] += 1;
                        }
                        _ => {}
                    }
                }
            }
            if live == 0 {
                return Ok(());
            }
            // release the barriers whose expected count is met
            let mut released = false;
            for (id, &nwait) in waiting.iter().enumerate() {
                if nwait == 0 {
                    continue;
                }
                let expected = blk.expected[id].unwrap_or(live);
                if blk.arrived[id] >= expected {
                    self.release_barrier(warps, id as u32)?;
                    blk.arrived[id] = 0;
                    blk.expected[id] = None;
                    released = true;
                }
            }
            if !released {
                // every live lane waits: either at a barrier nobody else reaches or at a warp-synchronous
                // instruction whose member lanes are elsewhere.
                let (w, l) = warps
                    .iter()
                    .enumerate()
                    .find_map(|(wi, w)| {
                        (0..32)
                            .find(|&l| w.state[l] == AT_BAR || w.state[l] == AT_WSYNC)
                            .map(|l| (wi, l))
                    })
                    .unwrap_or((0, 0));
                let pc = warps[w].pc[l] as usize;
                return Err(self.unsupported(format!(
                    "deadlock: thread {} waits at `{}` (pc {pc}) which the other threads never reach",
                    w * 32 + l,
                    self.m.code[pc].opcode
                )));
            }
        }
    }

    fn release_barrier(&self, warps: &mut [Warp], id: u32) -> R<()> {
        // bar.red: reduce the predicates of the waiting lanes
        let mut popc = 0u64;
        let mut all = true;
        let mut any = false;
        for w in warps.iter() {
            for l in 0..32 {
                if w.state[l] == AT_BAR && w.bar_id[l] == id {
                    if let Inst::Bar {
                        red: Some((_, _, p)),
                        ..
                    } = &self.m.code[w.pc[l] as usize].inst
                    {
                        let v = self.read_plain(w, *p, l) & 1 == 1;
                        popc += v as u64;
                        all &= v;
                        any |= v;
                    }
                }
            }
        }
        for w in warps.iter_mut() {
            for l in 0..32 {
                if w.state[l] == AT_BAR && w.bar_id[l] == id {
                    if let Inst::Bar {
                        red: Some((op, d, _)),
                        ..
                    } = &self.m.code[w.pc[l] as usize].inst
                    {
                        let v = match op {
                            ReduxOp::Add => popc,
                            ReduxOp::And => all as u64,
                            _ => any as u64,
                        };
                        w.regs[*d as usize * 32 + l] = v;
                    }
                    w.state[l] = RUN;
                    w.pc[l] += 1;
                }
            }
        }
        Ok(())
    }

    fn read_plain(&self, w: &Warp, op: Op, l: usize) -> u64 {
        match op {
            Op::Reg(r) => w.regs[r as usize * 32 + l],
            Op::NotPred(r) => (w.regs[r as usize * 32 + l] & 1) ^ 1,
            Op::Imm(v) => v,
            Op::Sreg(_) => 0,
        }
    }

    #[inline(always)]
    fn rd(&self, w: &Warp, blk: &BlockState, op: Op, l: usize) -> u64 {
        match op {
            Op::Reg(r) => w.regs[r as usize * 32 + l],
            Op::Imm(v) => v,
            Op::NotPred(r) => (w.regs[r as usize * 32 + l] & 1) ^ 1,
            Op::Sreg(s) => self.sreg(w, blk, s, l),
        }
    }

    #[cold]
    fn sreg(&self, w: &Warp, blk: &BlockState, s: Sreg, l: usize) -> u64 {
        let c = self.cfg;
        match s {
            Sreg::Tid(d) => w.tid[l][d as usize] as u64,
            Sreg::Ntid(d) => c.block[d as usize] as u64,
            Sreg::Ctaid(d) => blk.ctaid[d as usize] as u64,
            Sreg::Nctaid(d) => c.grid[d as usize] as u64,
            Sreg::Laneid => l as u64,
            Sreg::Warpid => w.warp_id as u64,
            Sreg::Nwarpid => 64,
            Sreg::Clock => w.clock & 0xffff_ffff,
            Sreg::Clock64 => w.clock,
            Sreg::Globaltimer => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            Sreg::LanemaskEq => 1u64 << l,
            Sreg::LanemaskLt => (1u64 << l) - 1,
            Sreg::LanemaskLe => (1u64 << (l + 1)) - 1,
            Sreg::LanemaskGt => (!((1u64 << (l + 1)) - 1)) & 0xffff_ffff,
            Sreg::LanemaskGe => (!((1u64 << l) - 1)) & 0xffff_ffff,
            Sreg::Smid => 0,
            Sreg::Nsmid => 132,
            Sreg::DynSmem => c.dynamic_shared_bytes as u64,
            Sreg::TotalSmem => self.shared_size,
        }
    }

    /// Runs one warp until none of its lanes can proceed (exited, at a block barrier, or parked at a
    /// warp-synchronous instruction whose member lanes are elsewhere).
    fn run_warp(&self, w: &mut Warp, blk: &mut BlockState, counts: &mut (u64, u64)) -> R<()> {
        let code = &self.m.code;
        'sched: loop {
            // min-PC scheduling: the lanes at the lowest PC go first.
            let mut minpc = u32::MAX;
            for l in 0..32 {
                if w.state[l] == RUN && w.pc[l] < minpc {
                    minpc = w.pc[l];
                }
            }
            if minpc == u32::MAX {
                return Ok(());
            }
            let mut group = 0u32;
            let mut next_other = u32::MAX;
            for l in 0..32 {
                let s = w.state[l];
                if s == RUN || s == AT_WSYNC {
                    if w.pc[l] == minpc {
                        group |= 1 << l;
                        w.state[l] = RUN;
                    } else if s == RUN && w.pc[l] < next_other {
                        next_other = w.pc[l];
                    }
                }
            }
            let mut pc = minpc;
            loop {
                let di = &code[pc as usize];
                let exec = match di.guard {
                    None => group,
                    Some((p, neg)) => {
                        let mut m = 0;
                        for l in lanes(group) {
                            if ((w.regs[p as usize * 32 + l] & 1) == 1) != neg {
                                m |= 1 << l;
                            }
                        }
                        m
                    }
                };
                counts.0 += 1;
                counts.1 += exec.count_ones() as u64;
                w.clock += 1;
                let mut jump: Option<u32> = None;
                match &di.inst {
                    Inst::Bra { target } => {
                        if exec == group {
                            jump = Some(*target);
                        } else {
                            for l in lanes(group) {
                                w.pc[l] = if exec & (1 << l) != 0 {
                                    *target
                                } else {
                                    pc + 1
                                };
                            }
                            continue 'sched;
                        }
                    }
                    Inst::Call {
                        func,
                        caller_frame,
                        args,
                        ret,
                    } => {
                        let f = &self.m.funcs[*func as usize];
                        for l in lanes(group) {
                            if exec & (1 << l) == 0 {
                                w.pc[l] = pc + 1;
                                continue;
                            }
                            let base = w.frame_base[l];
                            let nb = base + caller_frame;
                            let need = nb as usize + f.frame_size as usize;
                            if need > MAX_LOCAL {
                                return Err(self.unsupported(format!(
                                    "call of {}: local memory stack over {MAX_LOCAL} bytes per thread",
                                    f.name
                                )));
                            }
                            let loc = &mut w.local[l];
                            if loc.len() < need {
                                loc.resize(need, 0);
                            }
                            for a in args {
                                let (from, to) = ((base + a.from) as usize, (nb + a.to) as usize);
                                loc.copy_within(from..from + a.size as usize, to);
                            }
                            let saved = if f.recursive {
                                let (s, e) = f.reg_range;
                                Some((s, (s..e).map(|r| w.regs[r as usize * 32 + l]).collect()))
                            } else {
                                None
                            };
                            w.stacks[l].push(Frame {
                                ret_pc: pc + 1,
                                base,
                                ret: *ret,
                                callee_base: nb,
                                saved,
                            });
                            w.frame_base[l] = nb;
                            w.pc[l] = f.entry_pc;
                        }
                        continue 'sched;
                    }
                    Inst::Ret | Inst::Exit => {
                        let is_exit = matches!(di.inst, Inst::Exit);
                        let mut exited = false;
                        for l in lanes(group) {
                            if exec & (1 << l) == 0 {
                                w.pc[l] = pc + 1;
                                continue;
                            }
                            match if is_exit { None } else { w.stacks[l].pop() } {
                                None => {
                                    w.state[l] = EXITED;
                                    exited = true;
                                }
                                Some(fr) => {
                                    if let Some(rc) = fr.ret {
                                        let loc = &mut w.local[l];
                                        let from = (fr.callee_base + rc.from) as usize;
                                        let to = (fr.base + rc.to) as usize;
                                        loc.copy_within(from..from + rc.size as usize, to);
                                    }
                                    if let Some((s, vals)) = fr.saved {
                                        for (i, v) in vals.into_iter().enumerate() {
                                            w.regs[(s as usize + i) * 32 + l] = v;
                                        }
                                    }
                                    w.frame_base[l] = fr.base;
                                    w.pc[l] = fr.ret_pc;
                                }
                            }
                        }
                        if exited {
                            // lanes parked at a warp-synchronous instruction may now have all their partners
                            for l in 0..32 {
                                if w.state[l] == AT_WSYNC {
                                    w.state[l] = RUN;
                                }
                            }
                        }
                        continue 'sched;
                    }
                    Inst::Trap => {
                        if exec != 0 {
                            return Err(LaunchError::Trap {
                                kernel: self.kernel.name.clone(),
                            });
                        }
                    }
                    Inst::Bar {
                        id, count, wait, ..
                    } => {
                        for l in lanes(group) {
                            w.pc[l] = pc + 1;
                        }
                        if exec != 0 {
                            let l0 = exec.trailing_zeros() as usize;
                            let idv = self.rd(w, blk, *id, l0);
                            if idv >= 16 {
                                return Err(self.unsupported(format!("barrier id {idv}")));
                            }
                            let cnt = count.map(|c| self.rd(w, blk, c, l0) as u32);
                            if let Some(c) = cnt {
                                blk.expected[idv as usize] = Some(c);
                            }
                            blk.arrived[idv as usize] += exec.count_ones();
                            if *wait {
                                for l in lanes(exec) {
                                    w.state[l] = AT_BAR;
                                    w.bar_id[l] = idv as u32;
                                    w.pc[l] = pc;
                                }
                            }
                        }
                        continue 'sched;
                    }
                    inst => {
                        if let Some(mask) = inst.sync_mask() {
                            let mut need = 0u32;
                            for l in lanes(exec) {
                                need |= self.rd(w, blk, mask, l) as u32;
                            }
                            let mut live = 0u32;
                            for l in 0..32 {
                                if w.state[l] != EXITED && w.state[l] != NO_THREAD {
                                    live |= 1 << l;
                                }
                            }
                            if need & live & !exec != 0 {
                                // wait for the other member lanes
                                for l in lanes(group) {
                                    if exec & (1 << l) != 0 {
                                        w.state[l] = AT_WSYNC;
                                        w.pc[l] = pc;
                                    } else {
                                        w.pc[l] = pc + 1;
                                    }
                                }
                                continue 'sched;
                            }
                        }
                        if exec != 0 {
                            self.exec(w, blk, inst, exec, group, &di.opcode)?;
                        }
                    }
                }
                let npc = jump.unwrap_or(pc + 1);
                if jump.is_none() && npc < next_other {
                    pc = npc;
                    continue;
                }
                for l in lanes(group) {
                    w.pc[l] = npc;
                }
                continue 'sched;
            }
        }
    }

    fn frame_addr(&self, w: &Warp, l: usize, off: u32) -> u64 {
        LOCAL_WINDOW + w.frame_base[l] as u64 + off as u64
    }

    fn sym_addr(&self, w: &Warp, l: usize, s: Sym) -> u64 {
        match s {
            Sym::Global(i) => self.global_addrs.get(i as usize).copied().unwrap_or(0),
            Sym::Shared(i) => SHARED_WINDOW + self.shared_off[i as usize],
            Sym::Frame(o) => self.frame_addr(w, l, o),
            Sym::KParam(o) => PARAM_WINDOW + o as u64,
        }
    }

    fn eff_addr(&self, w: &Warp, l: usize, a: &Addr) -> u64 {
        let base = match a.base {
            AddrBase::Reg(r) => w.regs[r as usize * 32 + l],
            AddrBase::Abs => 0,
            AddrBase::Sym(s) => self.sym_addr(w, l, s),
        };
        base.wrapping_add(a.off as u64)
    }

    /// Resolves `len` bytes at `addr` in `space` to a host pointer.
    #[allow(clippy::too_many_arguments)]
    fn locate(
        &self,
        w: &mut Warp,
        blk: &mut BlockState,
        space: Space,
        addr: u64,
        len: u64,
        l: usize,
        write: bool,
    ) -> R<Loc> {
        let in_win = |base: u64| addr >= base && addr - base < WINDOW_SIZE;
        let which = match space {
            Space::Global | Space::Const => 0,
            Space::Shared => 1,
            Space::Local => 2,
            Space::Param => {
                if in_win(PARAM_WINDOW) {
                    3
                } else {
                    2
                }
            }
            Space::Generic => {
                if in_win(SHARED_WINDOW) {
                    1
                } else if in_win(LOCAL_WINDOW) {
                    2
                } else if in_win(PARAM_WINDOW) {
                    3
                } else {
                    0
                }
            }
        };
        let off_in = |base: u64| if addr >= base { addr - base } else { addr };
        match which {
            0 => {
                if !addr.is_multiple_of(len) {
                    return Err(self.illegal(addr));
                }
                match self.mem.translate(addr, len) {
                    Some(p) => Ok(Loc::Device(p)),
                    None => Err(self.illegal(addr)),
                }
            }
            1 => {
                let o = off_in(SHARED_WINDOW);
                if o.checked_add(len)
                    .is_none_or(|e| e > blk.shared.len() as u64)
                {
                    return Err(self.illegal(addr));
                }
                Ok(Loc::Host(blk.shared[o as usize..].as_mut_ptr()))
            }
            2 => {
                let o = off_in(LOCAL_WINDOW);
                let loc = &mut w.local[l];
                if o.checked_add(len).is_none_or(|e| e > loc.len() as u64) {
                    return Err(self.illegal(addr));
                }
                Ok(Loc::Host(loc[o as usize..].as_mut_ptr()))
            }
            _ => {
                let o = addr - PARAM_WINDOW;
                if write
                    || o.checked_add(len)
                        .is_none_or(|e| e > self.params.len() as u64)
                {
                    return Err(self.illegal(addr));
                }
                Ok(Loc::Param(o as usize))
            }
        }
    }

    fn load(&self, loc: Loc, len: u64) -> u64 {
        match loc {
            Loc::Device(p) => {
                // SAFETY: `translate` promised `len` valid bytes at `p`, and `locate` checked that the address is
                // aligned to `len` (1, 2, 4 or 8), so the atomic view is aligned. Relaxed atomics make concurrent
                // access from other blocks' host threads well defined (the GPU gives no more).
                unsafe {
                    match len {
                        1 => AtomicU8::from_ptr(p).load(Ordering::Relaxed) as u64,
                        2 => AtomicU16::from_ptr(p as *mut u16).load(Ordering::Relaxed) as u64,
                        4 => AtomicU32::from_ptr(p as *mut u32).load(Ordering::Relaxed) as u64,
                        _ => AtomicU64::from_ptr(p as *mut u64).load(Ordering::Relaxed),
                    }
                }
            }
            Loc::Host(p) => {
                let mut b = [0u8; 8];
                // SAFETY: `locate` bounds-checked `len` bytes at `p` inside a buffer owned by this host thread
                // (the block's shared memory or the lane's local memory), which is not otherwise borrowed now.
                unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), len as usize) };
                u64::from_le_bytes(b)
            }
            Loc::Param(o) => {
                let mut b = [0u8; 8];
                b[..len as usize].copy_from_slice(&self.params[o..o + len as usize]);
                u64::from_le_bytes(b)
            }
        }
    }

    fn store(&self, loc: Loc, len: u64, v: u64) {
        match loc {
            Loc::Device(p) => {
                // SAFETY: as in `load`: valid, aligned, and accessed atomically.
                unsafe {
                    match len {
                        1 => AtomicU8::from_ptr(p).store(v as u8, Ordering::Relaxed),
                        2 => AtomicU16::from_ptr(p as *mut u16).store(v as u16, Ordering::Relaxed),
                        4 => AtomicU32::from_ptr(p as *mut u32).store(v as u32, Ordering::Relaxed),
                        _ => AtomicU64::from_ptr(p as *mut u64).store(v, Ordering::Relaxed),
                    }
                }
            }
            Loc::Host(p) => {
                let b = v.to_le_bytes();
                // SAFETY: `locate` bounds-checked `len` bytes at `p` in a buffer this host thread owns.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p, len as usize) };
            }
            Loc::Param(_) => {}
        }
    }

    fn atomic(&self, loc: Loc, len: u64, f: impl Fn(u64) -> u64) -> u64 {
        match loc {
            Loc::Device(p) => {
                if len == 4 {
                    // SAFETY: valid for 4 bytes and 4-aligned (checked in `locate`); all device accesses made by
                    // the interpreter are atomic.
                    let a = unsafe { AtomicU32::from_ptr(p as *mut u32) };
                    let mut cur = a.load(Ordering::Relaxed);
                    loop {
                        let new = f(cur as u64) as u32;
                        match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
                        {
                            Ok(_) => return cur as u64,
                            Err(c) => cur = c,
                        }
                    }
                } else {
                    // SAFETY: as above for 8 bytes.
                    let a = unsafe { AtomicU64::from_ptr(p as *mut u64) };
                    let mut cur = a.load(Ordering::Relaxed);
                    loop {
                        let new = f(cur);
                        match a.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
                        {
                            Ok(_) => return cur,
                            Err(c) => cur = c,
                        }
                    }
                }
            }
            _ => {
                // shared/local memory belongs to this host thread: a plain read-modify-write is atomic
                let old = self.load(loc, len);
                self.store(loc, len, f(old));
                old
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        w: &mut Warp,
        blk: &mut BlockState,
        inst: &Inst,
        exec: u32,
        group: u32,
        opcode: &str,
    ) -> R<()> {
        macro_rules! each {
            (|$l:ident| $body:expr) => {
                for $l in lanes(exec) {
                    $body;
                }
            };
        }
        macro_rules! set {
            ($d:expr, $l:expr, $v:expr) => {
                w.regs[*$d as usize * 32 + $l] = $v
            };
        }
        match inst {
            Inst::Mov { d, a, bits } => {
                let mk = mask(*bits);
                each!(|l| {
                    let v = self.rd(w, blk, *a, l) & mk;
                    set!(d, l, v)
                })
            }
            Inst::MovSym { d, sym, off } => each!(|l| {
                let v = self.sym_addr(w, l, *sym).wrapping_add(*off as u64);
                set!(d, l, v)
            }),
            Inst::Pack {
                d,
                parts,
                part_bits,
            } => each!(|l| {
                let mut v = 0u64;
                for (i, p) in parts.iter().enumerate() {
                    v |= (self.rd(w, blk, *p, l) & mask(*part_bits)) << (i as u32 * part_bits);
                }
                set!(d, l, v)
            }),
            Inst::Unpack { ds, a, part_bits } => each!(|l| {
                let v = self.rd(w, blk, *a, l);
                for (i, dd) in ds.iter().enumerate() {
                    if let Some(dd) = dd {
                        set!(dd, l, (v >> (i as u32 * part_bits)) & mask(*part_bits));
                    }
                }
            }),
            Inst::Int { op, ty, d, a, b } => {
                let bits = ty.bits();
                let signed = ty.is_signed();
                each!(|l| {
                    let x = self.rd(w, blk, *a, l);
                    let y = self.rd(w, blk, *b, l);
                    set!(d, l, int_op(*op, bits, signed, x, y))
                })
            }
            Inst::MulWide { ty, d, a, b } => {
                let bits = ty.bits();
                each!(|l| {
                    let x = self.rd(w, blk, *a, l);
                    let y = self.rd(w, blk, *b, l);
                    let v = if ty.is_signed() {
                        (sext(x, bits) * sext(y, bits)) as u64
                    } else {
                        (x & mask(bits)).wrapping_mul(y & mask(bits))
                    };
                    set!(d, l, v & mask(bits * 2))
                })
            }
            Inst::Mad {
                mode,
                sat,
                ty,
                d,
                a,
                b,
                c,
            } => {
                let bits = ty.bits();
                let signed = ty.is_signed();
                each!(|l| {
                    let x = self.rd(w, blk, *a, l);
                    let y = self.rd(w, blk, *b, l);
                    let z = self.rd(w, blk, *c, l);
                    let v = match mode {
                        MadMode::Lo => x.wrapping_mul(y).wrapping_add(z) & mask(bits),
                        MadMode::Hi => {
                            let h = int_op(IntOp::MulHi, bits, signed, x, y);
                            if *sat {
                                (sext(h, 32) + sext(z, 32)).clamp(i32::MIN as i64, i32::MAX as i64)
                                    as u64
                                    & mask(32)
                            } else {
                                h.wrapping_add(z) & mask(bits)
                            }
                        }
                        MadMode::Wide => {
                            let p = if signed {
                                (sext(x, bits) * sext(y, bits)) as u64
                            } else {
                                (x & mask(bits)).wrapping_mul(y & mask(bits))
                            };
                            p.wrapping_add(z) & mask(bits * 2)
                        }
                    };
                    set!(d, l, v)
                })
            }
            Inst::Float {
                op,
                ty,
                rnd,
                ftz,
                d,
                a,
                b,
            } => each!(|l| {
                let x = self.rd(w, blk, *a, l);
                let y = self.rd(w, blk, *b, l);
                let v = if *ty == Ty::F32 {
                    f32_op(
                        *op,
                        *rnd,
                        *ftz,
                        f32::from_bits(x as u32),
                        f32::from_bits(y as u32),
                    )
                    .to_bits() as u64
                } else {
                    f64_op(*op, *rnd, f64::from_bits(x), f64::from_bits(y)).to_bits()
                };
                set!(d, l, v)
            }),
            Inst::Fma {
                ty,
                rnd,
                ftz,
                sat,
                d,
                a,
                b,
                c,
            } => each!(|l| {
                let x = self.rd(w, blk, *a, l);
                let y = self.rd(w, blk, *b, l);
                let z = self.rd(w, blk, *c, l);
                let v = if *ty == Ty::F32 {
                    let f = |v: u64| {
                        let f = f32::from_bits(v as u32);
                        if *ftz {
                            float::ftz32(f)
                        } else {
                            f
                        }
                    };
                    let (x, y, z) = (f(x), f(y), f(z));
                    let mut r = if *rnd == Rnd::Rn {
                        x.mul_add(y, z)
                    } else {
                        let p = x as f64 * y as f64; // exact
                        let (s, e) = float::two_sum(p, z as f64);
                        float::f32_round(s, e, *rnd)
                    };
                    if *ftz {
                        r = float::ftz32(r);
                    }
                    if *sat {
                        r = sat01(r as f64) as f32;
                    }
                    r.to_bits() as u64
                } else {
                    let mut r = f64::from_bits(x).mul_add(f64::from_bits(y), f64::from_bits(z));
                    if *sat {
                        r = sat01(r);
                    }
                    r.to_bits()
                };
                set!(d, l, v)
            }),
            Inst::Unary {
                op,
                ty,
                ftz,
                rnd,
                d,
                a,
            } => {
                let bits = ty.bits();
                each!(|l| {
                    let x = self.rd(w, blk, *a, l);
                    set!(d, l, unary(*op, *ty, bits, *ftz, *rnd, x))
                })
            }
            Inst::Bfe { ty, d, a, b, c } => {
                let bits = ty.bits();
                each!(|l| {
                    let x = self.rd(w, blk, *a, l) & mask(bits);
                    let pos = (self.rd(w, blk, *b, l) & 0xff) as u32;
                    let len = (self.rd(w, blk, *c, l) & 0xff) as u32;
                    let sbit = if ty.is_signed() && len > 0 {
                        let sb = (pos + len - 1).min(bits - 1);
                        (x >> sb) & 1
                    } else {
                        0
                    };
                    let mut v = 0u64;
                    for i in 0..bits {
                        let bit = if i < len && pos + i < bits {
                            (x >> (pos + i)) & 1
                        } else {
                            sbit
                        };
                        v |= bit << i;
                    }
                    set!(d, l, v)
                })
            }
            Inst::Bfi { ty, d, f, a, b, c } => {
                let bits = ty.bits();
                each!(|l| {
                    let fv = self.rd(w, blk, *f, l);
                    let mut v = self.rd(w, blk, *a, l) & mask(bits);
                    let pos = (self.rd(w, blk, *b, l) & 0xff) as u32;
                    let len = (self.rd(w, blk, *c, l) & 0xff) as u32;
                    for i in 0..len {
                        if pos + i >= bits {
                            break;
                        }
                        v = (v & !(1 << (pos + i))) | (((fv >> i) & 1) << (pos + i));
                    }
                    set!(d, l, v)
                })
            }
            Inst::Prmt { d, a, b, c } => each!(|l| {
                let x = self.rd(w, blk, *a, l) & 0xffff_ffff;
                let y = self.rd(w, blk, *b, l) & 0xffff_ffff;
                let s = self.rd(w, blk, *c, l);
                let bytes = x | (y << 32);
                let mut v = 0u64;
                for i in 0..4 {
                    let sel = (s >> (i * 4)) & 0xf;
                    let byte = (bytes >> ((sel & 7) * 8)) & 0xff;
                    let byte = if sel & 8 != 0 {
                        if byte & 0x80 != 0 {
                            0xff
                        } else {
                            0
                        }
                    } else {
                        byte
                    };
                    v |= byte << (i * 8);
                }
                set!(d, l, v)
            }),
            Inst::Shf {
                left,
                clamp,
                d,
                a,
                b,
                c,
            } => each!(|l| {
                let lo = self.rd(w, blk, *a, l) & 0xffff_ffff;
                let hi = self.rd(w, blk, *b, l) & 0xffff_ffff;
                let n = self.rd(w, blk, *c, l) as u32;
                let n = if *clamp { n.min(32) } else { n & 31 };
                let both = (hi << 32) | lo;
                let v = if *left {
                    ((both << n) >> 32) & 0xffff_ffff
                } else {
                    (both >> n) & 0xffff_ffff
                };
                set!(d, l, v)
            }),
            Inst::Setp {
                cmp,
                ty,
                d,
                d2,
                a,
                b,
                comb,
            } => each!(|l| {
                let x = self.rd(w, blk, *a, l);
                let y = self.rd(w, blk, *b, l);
                let r = compare(*cmp, *ty, x, y);
                let (p, q) = match comb {
                    None => (r, !r),
                    Some((op, c)) => {
                        let cv = self.rd(w, blk, *c, l) & 1 == 1;
                        (bool_op(*op, r, cv), bool_op(*op, !r, cv))
                    }
                };
                set!(d, l, p as u64);
                if let Some(d2) = d2 {
                    set!(d2, l, q as u64);
                }
            }),
            Inst::PredLogic { op, d, a, b } => each!(|l| {
                let x = self.rd(w, blk, *a, l) & 1 == 1;
                let y = self.rd(w, blk, *b, l) & 1 == 1;
                set!(d, l, bool_op(*op, x, y) as u64)
            }),
            Inst::Selp { d, a, b, c } => each!(|l| {
                let v = if self.rd(w, blk, *c, l) & 1 == 1 {
                    self.rd(w, blk, *a, l)
                } else {
                    self.rd(w, blk, *b, l)
                };
                set!(d, l, v)
            }),
            Inst::Slct { cty, d, a, b, c } => each!(|l| {
                let cv = self.rd(w, blk, *c, l);
                let ge = if *cty == Ty::F32 {
                    f32::from_bits(cv as u32) >= 0.0
                } else {
                    cv as u32 as i32 >= 0
                };
                let v = if ge {
                    self.rd(w, blk, *a, l)
                } else {
                    self.rd(w, blk, *b, l)
                };
                set!(d, l, v)
            }),
            Inst::Cvt {
                dt,
                st,
                rnd,
                sat,
                ftz,
                d,
                a,
            } => each!(|l| {
                let x = self.rd(w, blk, *a, l);
                set!(d, l, cvt(*dt, *st, *rnd, *sat, *ftz, x))
            }),
            Inst::Cvta { to, space, d, a } => {
                let win = match space {
                    Space::Shared => Some(SHARED_WINDOW),
                    Space::Local => Some(LOCAL_WINDOW),
                    Space::Param => Some(PARAM_WINDOW),
                    _ => None,
                };
                each!(|l| {
                    let x = self.rd(w, blk, *a, l);
                    let v = match win {
                        None => x,
                        Some(base) => {
                            let inw = x >= base && x - base < WINDOW_SIZE;
                            match (to, inw) {
                                (true, true) => x - base,
                                (false, false) => x + base,
                                _ => x,
                            }
                        }
                    };
                    set!(d, l, v)
                })
            }
            Inst::Testp { finite, ty, d, a } => each!(|l| {
                let x = self.rd(w, blk, *a, l);
                let f = if *ty == Ty::F32 {
                    f32::from_bits(x as u32) as f64
                } else {
                    f64::from_bits(x)
                };
                let sub = if *ty == Ty::F32 {
                    f32::from_bits(x as u32).is_subnormal()
                } else {
                    f.is_subnormal()
                };
                let r = match finite {
                    0 => f.is_finite(),
                    1 => f.is_infinite(),
                    2 => !f.is_nan(),
                    3 => f.is_nan(),
                    4 => f.is_finite() && f != 0.0 && !sub,
                    _ => sub,
                };
                set!(d, l, r as u64)
            }),
            Inst::Ld {
                space,
                ty,
                ds,
                addr,
            } => {
                let len = ty.bytes() as u64;
                for l in lanes(exec) {
                    let a0 = self.eff_addr(w, l, addr);
                    if ds.len() > 1
                        && !a0.is_multiple_of(len * ds.len() as u64)
                        && *space != Space::Param
                    {
                        return Err(self.illegal(a0));
                    }
                    for (i, dd) in ds.iter().enumerate() {
                        let ad = a0.wrapping_add(i as u64 * len);
                        let loc = self.locate(w, blk, *space, ad, len, l, false)?;
                        let mut v = self.load(loc, len);
                        if ty.is_signed() {
                            v = sext(v, ty.bits()) as u64;
                        }
                        if let Some(dd) = dd {
                            set!(dd, l, v);
                        }
                    }
                }
            }
            Inst::St {
                space,
                ty,
                vals,
                addr,
            } => {
                let len = ty.bytes() as u64;
                for l in lanes(exec) {
                    let a0 = self.eff_addr(w, l, addr);
                    if vals.len() > 1
                        && !a0.is_multiple_of(len * vals.len() as u64)
                        && *space != Space::Param
                    {
                        return Err(self.illegal(a0));
                    }
                    for (i, v) in vals.iter().enumerate() {
                        let ad = a0.wrapping_add(i as u64 * len);
                        let val = self.rd(w, blk, *v, l);
                        let loc = self.locate(w, blk, *space, ad, len, l, true)?;
                        self.store(loc, len, val);
                    }
                }
            }
            Inst::Atom {
                space,
                op,
                ty,
                d,
                addr,
                b,
                c,
            } => {
                let len = ty.bytes() as u64;
                let bits = ty.bits();
                for l in lanes(exec) {
                    let ad = self.eff_addr(w, l, addr);
                    let loc = self.locate(w, blk, *space, ad, len, l, true)?;
                    if let Loc::Host(p) = loc {
                        if !(p as usize).is_multiple_of(len as usize) && !ad.is_multiple_of(len) {
                            return Err(self.illegal(ad));
                        }
                    }
                    let bv = self.rd(w, blk, *b, l) & mask(bits);
                    let cv = c.map(|c| self.rd(w, blk, c, l) & mask(bits)).unwrap_or(0);
                    let signed = ty.is_signed();
                    let old = self.atomic(loc, len, |o| atom_op(*op, *ty, bits, signed, o, bv, cv));
                    if let Some(d) = d {
                        let old = if signed { sext(old, bits) as u64 } else { old };
                        set!(d, l, old);
                    }
                }
            }
            Inst::Fence | Inst::Nop | Inst::WarpSync { .. } => {}
            Inst::Shfl {
                mode,
                d,
                pd,
                a,
                b,
                c,
                mask: _,
            } => {
                let mut vals = [0u64; 32];
                for (l, v) in vals.iter_mut().enumerate() {
                    *v = self.read_plain(w, *a, l);
                }
                if let Op::Sreg(_) = a {
                    for (l, v) in vals.iter_mut().enumerate() {
                        *v = self.rd(w, blk, *a, l);
                    }
                }
                each!(|l| {
                    let bv = self.rd(w, blk, *b, l) as u32 & 31;
                    let cv = self.rd(w, blk, *c, l) as u32;
                    let clamp = cv & 0x1f;
                    let segmask = (cv >> 8) & 0x1f;
                    let maxl = (l as u32 & segmask) | (clamp & !segmask);
                    let minl = l as u32 & segmask;
                    let lane = l as u32;
                    let (j, ok) = match mode {
                        ShflMode::Up => {
                            let j = lane.wrapping_sub(bv);
                            (j, lane >= bv && j >= minl)
                        }
                        ShflMode::Down => {
                            let j = lane + bv;
                            (j, j <= maxl)
                        }
                        ShflMode::Bfly => {
                            let j = lane ^ bv;
                            (j, j <= maxl)
                        }
                        ShflMode::Idx => {
                            let j = minl | (bv & !segmask);
                            (j, j <= maxl)
                        }
                    };
                    let src = if ok && j < 32 { j as usize } else { l };
                    set!(d, l, vals[src] & 0xffff_ffff);
                    if let Some(pd) = pd {
                        set!(pd, l, ok as u64);
                    }
                })
            }
            Inst::Vote {
                mode,
                d,
                a,
                mask: _,
            } => {
                let mut ballot = 0u32;
                for l in lanes(exec) {
                    if self.rd(w, blk, *a, l) & 1 == 1 {
                        ballot |= 1 << l;
                    }
                }
                let _ = group;
                each!(|l| {
                    let mask = exec; // lanes voting together
                    let v = match mode {
                        VoteMode::Ballot => ballot as u64,
                        VoteMode::All => (ballot & mask == mask) as u64,
                        VoteMode::Any => (ballot & mask != 0) as u64,
                        VoteMode::Uni => (ballot & mask == mask || ballot & mask == 0) as u64,
                    };
                    set!(d, l, v)
                })
            }
            Inst::Activemask { d } => each!(|l| set!(d, l, exec as u64)),
            Inst::Match {
                all,
                bits,
                d,
                pd,
                a,
                mask: _,
            } => {
                let mut vals = [0u64; 32];
                for l in lanes(exec) {
                    vals[l] = self.rd(w, blk, *a, l) & mask(*bits);
                }
                let mut same_all = true;
                let first = vals[exec.trailing_zeros() as usize];
                for l in lanes(exec) {
                    same_all &= vals[l] == first;
                }
                each!(|l| {
                    let mut m = 0u32;
                    for k in lanes(exec) {
                        if vals[k] == vals[l] {
                            m |= 1 << k;
                        }
                    }
                    if *all {
                        set!(d, l, if same_all { exec as u64 } else { 0 });
                        if let Some(pd) = pd {
                            set!(pd, l, same_all as u64);
                        }
                    } else {
                        set!(d, l, m as u64);
                    }
                })
            }
            Inst::Redux {
                op,
                ty,
                d,
                a,
                mask: _,
            } => {
                let signed = ty.is_signed();
                let mut acc: Option<u64> = None;
                for l in lanes(exec) {
                    let v = self.rd(w, blk, *a, l) & 0xffff_ffff;
                    acc = Some(match acc {
                        None => v,
                        Some(x) => match op {
                            ReduxOp::Add => (x + v) & 0xffff_ffff,
                            ReduxOp::And => x & v,
                            ReduxOp::Or => x | v,
                            ReduxOp::Xor => x ^ v,
                            ReduxOp::Min => int_op(IntOp::Min, 32, signed, x, v),
                            ReduxOp::Max => int_op(IntOp::Max, 32, signed, x, v),
                        },
                    });
                }
                let r = acc.unwrap_or(0);
                each!(|l| set!(d, l, r))
            }
            other => {
                return Err(self.unsupported(format!("{opcode} ({other:?}) in this position")));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Loc {
    Device(*mut u8),
    Host(*mut u8),
    Param(usize),
}

#[inline]
fn lanes(m: u32) -> impl Iterator<Item = usize> {
    let mut m = m;
    std::iter::from_fn(move || {
        if m == 0 {
            None
        } else {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            Some(l)
        }
    })
}

#[inline]
pub(crate) fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[inline]
fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let s = 64 - bits;
        ((v << s) as i64) >> s
    }
}

fn int_op(op: IntOp, bits: u32, signed: bool, x: u64, y: u64) -> u64 {
    let mk = mask(bits);
    let (xu, yu) = (x & mk, y & mk);
    let (xs, ys) = (sext(x, bits), sext(y, bits));
    let r = match op {
        IntOp::Add => xu.wrapping_add(yu),
        IntOp::Sub => xu.wrapping_sub(yu),
        IntOp::AddSat => (xs + ys).clamp(i32::MIN as i64, i32::MAX as i64) as u64,
        IntOp::SubSat => (xs - ys).clamp(i32::MIN as i64, i32::MAX as i64) as u64,
        IntOp::MulLo => xu.wrapping_mul(yu),
        IntOp::MulHi => {
            if signed {
                ((xs as i128 * ys as i128) >> bits) as u64
            } else {
                ((xu as u128 * yu as u128) >> bits) as u64
            }
        }
        IntOp::Div => {
            if yu == 0 {
                mk // the GPU returns all ones
            } else if signed {
                xs.wrapping_div(ys) as u64
            } else {
                xu / yu
            }
        }
        IntOp::Rem => {
            if yu == 0 {
                xu
            } else if signed {
                xs.wrapping_rem(ys) as u64
            } else {
                xu % yu
            }
        }
        IntOp::Min => {
            if signed {
                xs.min(ys) as u64
            } else {
                xu.min(yu)
            }
        }
        IntOp::Max => {
            if signed {
                xs.max(ys) as u64
            } else {
                xu.max(yu)
            }
        }
        IntOp::And => xu & yu,
        IntOp::Or => xu | yu,
        IntOp::Xor => xu ^ yu,
        IntOp::Shl => {
            let n = y & 0xffff_ffff;
            if n >= bits as u64 {
                0
            } else {
                xu << n
            }
        }
        IntOp::Shr => {
            let n = y & 0xffff_ffff;
            if signed {
                (xs >> n.min(63)) as u64
            } else if n >= bits as u64 {
                0
            } else {
                xu >> n
            }
        }
    };
    r & mk
}

fn f32_op(op: FOp, rnd: Rnd, ftz: bool, x: f32, y: f32) -> f32 {
    let (x, y) = if ftz {
        (float::ftz32(x), float::ftz32(y))
    } else {
        (x, y)
    };
    let r = match op {
        FOp::Add | FOp::Sub | FOp::Mul | FOp::Div if rnd != Rnd::Rn => {
            let (a, b) = (x as f64, y as f64);
            let (s, e) = match op {
                FOp::Add => float::two_sum(a, b),
                FOp::Sub => float::two_sum(a, -b),
                FOp::Mul => (a * b, 0.0),
                _ => {
                    let q = a / b;
                    // sign of the exact remainder tells on which side q lies
                    let r = (-q).mul_add(b, a);
                    (q, if b < 0.0 { -r } else { r })
                }
            };
            float::f32_round(s, e, rnd)
        }
        FOp::Add => x + y,
        FOp::Sub => x - y,
        FOp::Mul => x * y,
        FOp::Div => x / y,
        FOp::Min => fmin(x as f64, y as f64) as f32,
        FOp::Max => fmax(x as f64, y as f64) as f32,
        FOp::Copysign => y.copysign(x),
    };
    if ftz {
        float::ftz32(r)
    } else {
        r
    }
}

fn fmin(x: f64, y: f64) -> f64 {
    if x.is_nan() {
        return if y.is_nan() { f64::NAN } else { y };
    }
    if y.is_nan() {
        return x;
    }
    if x == y {
        // -0 < +0
        return if x.is_sign_negative() { x } else { y };
    }
    x.min(y)
}

fn fmax(x: f64, y: f64) -> f64 {
    if x.is_nan() {
        return if y.is_nan() { f64::NAN } else { y };
    }
    if y.is_nan() {
        return x;
    }
    if x == y {
        return if x.is_sign_negative() { y } else { x };
    }
    x.max(y)
}

fn f64_op(op: FOp, rnd: Rnd, x: f64, y: f64) -> f64 {
    match op {
        FOp::Add | FOp::Sub | FOp::Mul if rnd != Rnd::Rn => {
            let y2 = if op == FOp::Sub { -y } else { y };
            let (s, e) = if op == FOp::Mul {
                let p = x * y;
                (p, x.mul_add(y, -p))
            } else {
                float::two_sum(x, y2)
            };
            float::f64_round(s, e, rnd)
        }
        FOp::Add => x + y,
        FOp::Sub => x - y,
        FOp::Mul => x * y,
        FOp::Div => x / y,
        FOp::Min => fmin(x, y),
        FOp::Max => fmax(x, y),
        FOp::Copysign => y.copysign(x),
    }
}

fn sat01(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

fn unary(op: UOp, ty: Ty, bits: u32, ftz: bool, rnd: Rnd, x: u64) -> u64 {
    let mk = mask(bits);
    match op {
        UOp::Not => !x & mk,
        UOp::Cnot => ((x & mk) == 0) as u64,
        UOp::Neg => (x & mk).wrapping_neg() & mk,
        UOp::Abs => (sext(x, bits).unsigned_abs()) & mk,
        UOp::Popc => (x & mk).count_ones() as u64,
        UOp::Clz => ((x & mk).leading_zeros() - (64 - bits)) as u64,
        UOp::Brev => ((x & mk).reverse_bits() >> (64 - bits)) & mk,
        UOp::FNeg => {
            if ty == Ty::F32 {
                let f = f32::from_bits(x as u32);
                let f = if ftz { float::ftz32(f) } else { f };
                (-f).to_bits() as u64
            } else {
                x ^ (1 << 63)
            }
        }
        UOp::FAbs => {
            if ty == Ty::F32 {
                let f = f32::from_bits(x as u32);
                let f = if ftz { float::ftz32(f) } else { f };
                f.abs().to_bits() as u64
            } else {
                x & !(1 << 63)
            }
        }
        _ => {
            if ty == Ty::F32 {
                let mut f = f32::from_bits(x as u32);
                if ftz {
                    f = float::ftz32(f);
                }
                let r = match op {
                    UOp::Rcp => {
                        if rnd == Rnd::Rn {
                            1.0 / f
                        } else {
                            f32_op(FOp::Div, rnd, false, 1.0, f)
                        }
                    }
                    UOp::Sqrt => {
                        if rnd == Rnd::Rn {
                            f.sqrt()
                        } else {
                            let s = (f as f64).sqrt();
                            let e = (-s).mul_add(s, f as f64);
                            float::f32_round(s, e, rnd)
                        }
                    }
                    UOp::Rsqrt => 1.0 / f.sqrt(),
                    UOp::Ex2 => f.exp2(),
                    UOp::Lg2 => f.log2(),
                    UOp::Sin => f.sin(),
                    UOp::Cos => f.cos(),
                    UOp::Tanh => f.tanh(),
                    _ => f,
                };
                let r = if ftz { float::ftz32(r) } else { r };
                r.to_bits() as u64
            } else {
                let f = f64::from_bits(x);
                let r = match op {
                    UOp::Rcp => 1.0 / f,
                    UOp::Sqrt => f.sqrt(),
                    UOp::Rsqrt => 1.0 / f.sqrt(),
                    UOp::Ex2 => f.exp2(),
                    UOp::Lg2 => f.log2(),
                    UOp::Sin => f.sin(),
                    UOp::Cos => f.cos(),
                    UOp::Tanh => f.tanh(),
                    _ => f,
                };
                r.to_bits()
            }
        }
    }
}

fn to_f64(ty: Ty, x: u64) -> f64 {
    match ty {
        Ty::F16 => float::f16_to_f64(x as u16),
        Ty::BF16 => float::bf16_to_f64(x as u16),
        Ty::F32 => f32::from_bits(x as u32) as f64,
        _ => f64::from_bits(x),
    }
}

fn compare(cmp: Cmp, ty: Ty, x: u64, y: u64) -> bool {
    if ty.is_float() {
        let (a, b) = (to_f64(ty, x), to_f64(ty, y));
        let un = a.is_nan() || b.is_nan();
        match cmp {
            Cmp::Eq => a == b,
            Cmp::Ne => !un && a != b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Equ => un || a == b,
            Cmp::Neu => un || a != b,
            Cmp::Ltu => un || a < b,
            Cmp::Leu => un || a <= b,
            Cmp::Gtu => un || a > b,
            Cmp::Geu => un || a >= b,
            Cmp::Num => !un,
            Cmp::Nan => un,
        }
    } else {
        let bits = ty.bits();
        let o = if ty.is_signed() {
            sext(x, bits).cmp(&sext(y, bits))
        } else {
            (x & mask(bits)).cmp(&(y & mask(bits)))
        };
        use std::cmp::Ordering::*;
        match cmp {
            Cmp::Eq | Cmp::Equ => o == Equal,
            Cmp::Ne | Cmp::Neu => o != Equal,
            Cmp::Lt | Cmp::Ltu => o == Less,
            Cmp::Le | Cmp::Leu => o != Greater,
            Cmp::Gt | Cmp::Gtu => o == Greater,
            Cmp::Ge | Cmp::Geu => o != Less,
            Cmp::Num => true,
            Cmp::Nan => false,
        }
    }
}

fn bool_op(op: BoolOp, a: bool, b: bool) -> bool {
    match op {
        BoolOp::And => a && b,
        BoolOp::Or => a || b,
        BoolOp::Xor => a ^ b,
    }
}

fn round_int(f: f64, rnd: Rnd) -> f64 {
    match rnd {
        Rnd::Rn => f.round_ties_even(),
        Rnd::Rz => f.trunc(),
        Rnd::Rm => f.floor(),
        Rnd::Rp => f.ceil(),
    }
}

fn from_f64(ty: Ty, f: f64, rnd: Rnd) -> u64 {
    match ty {
        Ty::F64 => f.to_bits(),
        Ty::F32 => float::f32_round(f, 0.0, rnd).to_bits() as u64,
        Ty::F16 => float::round_to_format(f, 0.0, float::F16, rnd),
        _ => float::round_to_format(f, 0.0, float::BF16, rnd),
    }
}

fn cvt(dt: Ty, st: Ty, rnd: Option<CvtRnd>, sat: bool, ftz: bool, x: u64) -> u64 {
    let dbits = dt.bits();
    let sbits = st.bits();
    match (dt.is_float(), st.is_float()) {
        (false, false) => {
            let v: i128 = if st.is_signed() {
                sext(x, sbits) as i128
            } else {
                (x & mask(sbits)) as i128
            };
            let v = if sat {
                let (lo, hi) = int_range(dt);
                v.clamp(lo, hi)
            } else {
                v
            };
            (v as u64) & mask(dbits)
        }
        (false, true) => {
            let mut f = to_f64(st, x);
            if ftz && st == Ty::F32 && f32::from_bits(x as u32).is_subnormal() {
                f = 0.0;
            }
            if f.is_nan() {
                return 0;
            }
            let r = match rnd {
                Some(CvtRnd::I(r)) | Some(CvtRnd::F(r)) => r,
                None => Rnd::Rz,
            };
            let i = round_int(f, r);
            let (lo, hi) = int_range(dt);
            let v = if i <= lo as f64 {
                lo
            } else if i >= hi as f64 {
                hi
            } else {
                i as i128
            };
            (v as u64) & mask(dbits)
        }
        (true, false) => {
            let v: i128 = if st.is_signed() {
                sext(x, sbits) as i128
            } else {
                (x & mask(sbits)) as i128
            };
            let r = match rnd {
                Some(CvtRnd::F(r)) | Some(CvtRnd::I(r)) => r,
                None => Rnd::Rn,
            };
            // nearest double plus the exact (integer) error, then one rounding to the destination
            let s = v as f64;
            let e = (v - s as i128) as f64;
            let out = match dt {
                Ty::F64 => float::f64_round(s, e, r).to_bits(),
                Ty::F32 => float::f32_round(s, e, r).to_bits() as u64,
                Ty::F16 => float::round_to_format(s, e, float::F16, r),
                _ => float::round_to_format(s, e, float::BF16, r),
            };
            if sat {
                from_f64(dt, sat01(to_f64(dt, out)), Rnd::Rn)
            } else {
                out
            }
        }
        (true, true) => {
            let mut f = to_f64(st, x);
            if ftz && st == Ty::F32 && f32::from_bits(x as u32).is_subnormal() {
                f = 0.0f64.copysign(f);
            }
            let mut out = match rnd {
                Some(CvtRnd::I(r)) => from_f64(dt, round_int(f, r), Rnd::Rn),
                Some(CvtRnd::F(r)) => from_f64(dt, f, r),
                None => from_f64(dt, f, Rnd::Rn),
            };
            if sat {
                out = from_f64(dt, sat01(to_f64(dt, out)), Rnd::Rn);
            }
            if ftz && dt == Ty::F32 {
                out = float::ftz32(f32::from_bits(out as u32)).to_bits() as u64;
            }
            out
        }
    }
}

fn int_range(t: Ty) -> (i128, i128) {
    let b = t.bits();
    if t.is_signed() {
        (-(1i128 << (b - 1)), (1i128 << (b - 1)) - 1)
    } else {
        (0, (1i128 << b) - 1)
    }
}

fn atom_op(op: AtomOp, ty: Ty, bits: u32, signed: bool, old: u64, b: u64, c: u64) -> u64 {
    let mk = mask(bits);
    match op {
        AtomOp::Add => old.wrapping_add(b) & mk,
        AtomOp::FAdd => {
            if ty == Ty::F32 {
                (f32::from_bits(old as u32) + f32::from_bits(b as u32)).to_bits() as u64
            } else {
                (f64::from_bits(old) + f64::from_bits(b)).to_bits()
            }
        }
        AtomOp::Min => int_op(IntOp::Min, bits, signed, old, b),
        AtomOp::Max => int_op(IntOp::Max, bits, signed, old, b),
        AtomOp::Inc => {
            if (old & mk) >= b {
                0
            } else {
                (old + 1) & mk
            }
        }
        AtomOp::Dec => {
            if (old & mk) == 0 || (old & mk) > b {
                b
            } else {
                old - 1
            }
        }
        AtomOp::And => old & b,
        AtomOp::Or => old | b,
        AtomOp::Xor => old ^ b,
        AtomOp::Exch => b,
        AtomOp::Cas => {
            if old & mk == b {
                c
            } else {
                old
            }
        }
    }
}
