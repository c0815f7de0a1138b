//! PTX parser and interpreter: runs the PTX that NVRTC emits (`.version 9.x`, `.target sm_90`, 64-bit addresses) on
//! the CPU, for devproxy's emulated device.
//!
//! # Why an interpreter, and what it promises
//!
//! The emulated backend must give the answer a GPU gives, or refuse. So every instruction the decoder accepts is
//! implemented with its PTX semantics (IEEE rounding modes included, done in software where the host has no
//! equivalent, see `float`), and anything else fails the load ([`PtxError::Unsupported`]) or the launch
//! ([`LaunchError::Unsupported`]), naming the instruction and the kernel. Wrong results are never a fallback.
//! `.approx` instructions (`ex2`, `lg2`, `sin`, `cos`, `tanh`, `rcp.approx`, `rsqrt`) are computed with the host's
//! correctly rounded or libm functions, which are within the GPU's documented error bounds but not bit-identical to it.
//!
//! # Load once, launch many
//!
//! [`Module::parse`] lexes, parses and decodes the whole module: registers become indices into a register file,
//! labels become instruction indices, symbols become frame offsets or global / shared-symbol indices, and each
//! instruction becomes an enum variant. A launch never looks at text.
//!
//! # Execution model
//!
//! Blocks are independent, so they run in parallel on `LaunchConfig::host_threads` host threads
//! (`std::thread::scope`, blocks handed out from an atomic counter). Inside a block everything runs on one host
//! thread: the block's shared memory is a plain buffer, and `__syncthreads` is a scheduling point, not an OS
//! synchronisation.
//!
//! Threads are grouped into warps of 32 lanes executed in lock-step, with a register file laid out
//! register-major (`regs[reg * 32 + lane]`). Divergence uses *min-PC scheduling*: each lane has its own PC, and at
//! every step the warp executes the instruction at the lowest PC among its runnable lanes, for all lanes sitting at
//! that PC. For structured code this reconverges lanes exactly at the immediate post-dominator (the join point has a
//! higher PC than both sides of the branch). Warp-synchronous instructions (`shfl.sync`, `vote.sync`,
//! `match.sync`, `redux.sync`, `bar.warp.sync`) additionally *wait* until every live lane of their member mask has
//! arrived at the same instruction, then execute once for all of them, so their results are those of a converged
//! warp whatever the scheduling order. Lanes that exited count as arrived.
//!
//! Block barriers (`bar.sync`/`barrier.sync` with an id and optional thread count, `bar.arrive`, `bar.red`) park
//! the arriving lanes; the block scheduler runs every warp until all are parked or exited, then releases the
//! barrier whose arrival count is met (the count given, or all non-exited threads of the block). If nothing can be
//! released the launch fails with a deadlock error instead of hanging.
//!
//! # Memory
//!
//! Device (`.global`, `.const`) memory is the caller's, reached through [`DeviceMemory::translate`] on every access
//! (nothing is cached across launches); accesses use relaxed host atomics of the access width, so blocks running on
//! different host threads race exactly as much as the kernel lets them, without undefined behaviour on the host.
//! `atom`/`red` are compare-and-swap loops (acquire-release). Shared, local and parameter memory are owned by the
//! interpreter and are given generic addresses in windows that cannot collide with device memory (device addresses
//! are user-space addresses, below 2^47):
//!
//! | window | base | contents |
//! |---|---|---|
//! | shared | [`SHARED_WINDOW`] | the block's shared memory (static, then dynamic `extern .shared`) |
//! | local  | [`LOCAL_WINDOW`]  | the thread's local memory: call frames with `.local` arrays and `.param` slots |
//! | param  | [`PARAM_WINDOW`]  | the kernel parameter buffer (read-only) |
//!
//! `mov %r, shared_var` yields the generic window address, and `ld.shared`/`st.shared` accept both window
//! addresses and plain offsets, so `cvta.to.shared`, `cvta.shared` and 32-bit shared addresses all work (the
//! windows' low 32 bits are zero). Generic `ld`/`st` pick the window by address. Any access outside a mapping, or
//! misaligned, stops the kernel with [`LaunchError::IllegalAddress`].
//!
//! Device functions (`.func`) get a frame in the caller thread's local memory: parameters and return value slots
//! first, then the function's `.local` and call-sequence `.param` variables. `call` copies the argument `.param`
//! variables into the callee's parameter slots and `ret` copies the return slot back. Registers of different
//! functions are disjoint ranges of the register file; a recursive function saves its range on call.

mod decode;
mod exec;
mod float;
mod ir;
mod parse;

use std::collections::HashMap;

pub use crate::ir_public::*;

/// Base of the generic-address window for shared memory (offset 0 of the block's shared memory).
pub const SHARED_WINDOW: u64 = 0xffff_8000_0000_0000;
/// Base of the generic-address window for the current thread's local memory.
pub const LOCAL_WINDOW: u64 = 0xffff_9000_0000_0000;
/// Base of the generic-address window for the kernel parameter buffer.
pub const PARAM_WINDOW: u64 = 0xffff_a000_0000_0000;
/// Size of each window.
pub const WINDOW_SIZE: u64 = 1 << 32;

mod ir_public {
    /// Layout of one kernel parameter in the packed parameter buffer.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ParamInfo {
        /// Byte offset (aligned to `align`, as in the CUDA ABI).
        pub offset: u32,
        pub size: u32,
        pub align: u32,
    }
}

/// Which state space a module-scope variable lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalSpace {
    Global,
    Const,
}

/// A module-scope `.global` or `.const` variable. The caller allocates `size` bytes of device memory aligned to
/// `align`, writes `init` there and passes the address to [`Module::launch`] in `global_addrs`.
#[derive(Clone, Debug)]
pub struct GlobalVar {
    pub name: String,
    pub space: GlobalSpace,
    pub size: u64,
    pub align: u32,
    /// `size` bytes, zero where the PTX gives no initialiser.
    pub init: Vec<u8>,
}

/// What the caller needs to know about a kernel.
#[derive(Clone, Debug)]
pub struct KernelInfo {
    pub name: String,
    pub params: Vec<ParamInfo>,
    /// Static shared memory of the kernel and the device functions it calls (dynamic shared memory excluded).
    pub static_shared_bytes: u32,
    /// Local memory per thread: the kernel's frame plus the deepest chain of callee frames (a recursive kernel
    /// reports its own frame only; its stack grows at run time up to 512 KiB).
    pub local_bytes_per_thread: u32,
    /// Registers declared by the kernel's body (PTX virtual registers, not a hardware allocation).
    pub num_regs: u32,
    /// From `.maxntid`/`.reqntid`, else 1024.
    pub max_threads_per_block: u32,
}

/// Device (global) memory as the interpreter sees it. Device addresses are plain u64.
///
/// `translate` returns a host pointer valid for `len` bytes at device address `addr`, or None when that range is not
/// mapped device memory (=> IllegalAddress). Implementations are thread-safe; data races are the kernel's business,
/// as on a GPU.
pub trait DeviceMemory: Sync {
    fn translate(&self, addr: u64, len: u64) -> Option<*mut u8>;
}

/// Geometry and resources of one launch.
#[derive(Clone, Debug)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
    /// The kernel's max-dynamic-shared-memory attribute; 0 = the default 48 KiB rule.
    pub max_dynamic_shared_bytes: u32,
    /// Host threads running blocks in parallel (at least 1 is used).
    pub host_threads: usize,
}

/// Counters of a finished launch.
#[derive(Clone, Copy, Debug, Default)]
pub struct LaunchStats {
    /// Warp-instructions: one per instruction issued for a group of lanes executing together (a diverged warp issues
    /// an instruction once per group). Guarded-off instructions count.
    pub instructions: u64,
    /// Thread-instructions: the number of lanes that executed each issued instruction, summed.
    pub thread_instructions: u64,
}

/// Errors of [`Module::parse`].
#[derive(thiserror::Error, Debug)]
pub enum PtxError {
    #[error("PTX parse error at line {line}: {msg}")]
    Parse { line: u32, msg: String },
    #[error(
        "unsupported PTX in {kernel}: {instruction} (the emulated device cannot run this kernel)"
    )]
    Unsupported { kernel: String, instruction: String },
}

/// Errors of [`Module::launch`].
#[derive(thiserror::Error, Debug)]
pub enum LaunchError {
    #[error("no kernel named {0} in the module")]
    NoSuchKernel(String),
    #[error("invalid launch configuration: {0}")]
    InvalidConfig(String),
    #[error("kernel {kernel} accessed illegal address {addr:#x}")]
    IllegalAddress { kernel: String, addr: u64 },
    #[error("kernel {kernel} cannot run on the emulated device: {instruction}")]
    Unsupported { kernel: String, instruction: String },
    #[error("parameter buffer is {got} bytes, kernel expects {expected}")]
    ParamSize { expected: usize, got: usize },
    #[error("kernel {kernel} executed trap")]
    Trap { kernel: String },
}

/// A loaded PTX module: decoded once, launched many times. `Send + Sync`: launches may run concurrently.
pub struct Module {
    code: Vec<ir::DInst>,
    funcs: Vec<ir::Func>,
    globals: Vec<GlobalVar>,
    shared: Vec<ir::SharedSym>,
    num_regs: u32,
    by_name: HashMap<String, usize>,
    kernels: Vec<usize>,
    /// Per kernel function index: shared-symbol offsets, static size, dynamic-area offset.
    layouts: HashMap<usize, SharedLayout>,
}

struct SharedLayout {
    offsets: Vec<u64>,
    static_bytes: u64,
    dyn_align: u64,
    local_bytes: u64,
}

/// H100 limits.
const MAX_THREADS: u64 = 1024;
const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
const MAX_GRID: [u32; 3] = [2_147_483_647, 65535, 65535];
const DEFAULT_SHARED: u64 = 48 * 1024;
const MAX_SHARED_OPTIN: u64 = 232_448;

impl Module {
    /// Parses, decodes and validates every function; an unsupported instruction anywhere fails the load with
    /// [`PtxError::Unsupported`] naming the instruction and the function.
    pub fn parse(ptx_text: &str) -> Result<Module, PtxError> {
        let ast = parse::parse(ptx_text)?;
        let d = decode::decode(&ast)?;
        let mut by_name = HashMap::new();
        let mut kernels = Vec::new();
        for (i, f) in d.funcs.iter().enumerate() {
            by_name.insert(f.name.clone(), i);
            if f.is_entry && f.has_body {
                kernels.push(i);
            }
        }
        let mut m = Module {
            code: d.code,
            funcs: d.funcs,
            globals: d.globals,
            shared: d.shared,
            num_regs: d.num_regs,
            by_name,
            kernels,
            layouts: HashMap::new(),
        };
        for &k in &m.kernels.clone() {
            let l = m.layout(k);
            m.layouts.insert(k, l);
        }
        Ok(m)
    }

    fn layout(&self, k: usize) -> SharedLayout {
        // functions reachable from k
        let mut seen = vec![false; self.funcs.len()];
        let mut stack = vec![k];
        seen[k] = true;
        while let Some(f) = stack.pop() {
            for &c in &self.funcs[f].callees {
                if !seen[c as usize] {
                    seen[c as usize] = true;
                    stack.push(c as usize);
                }
            }
        }
        let mut offsets = vec![u64::MAX; self.shared.len()];
        let mut off = 0u64;
        let mut dyn_align = 1u64;
        let mut place = |i: usize, offsets: &mut Vec<u64>| {
            let s = &self.shared[i];
            if s.dynamic {
                dyn_align = dyn_align.max(s.align as u64);
            } else {
                let a = s.align.max(1) as u64;
                off = off.div_ceil(a) * a;
                offsets[i] = off;
                off += s.size;
            }
        };
        for i in 0..self.shared.len() {
            if self.shared[i].module_scope {
                place(i, &mut offsets);
            }
        }
        for (f, &reach) in seen.iter().enumerate() {
            if reach {
                for &s in &self.funcs[f].shared_syms {
                    place(s as usize, &mut offsets);
                }
            }
        }
        let static_bytes = off;
        let dyn_off = static_bytes.div_ceil(dyn_align) * dyn_align;
        for (i, s) in self.shared.iter().enumerate() {
            if s.dynamic {
                offsets[i] = dyn_off;
            }
        }
        // deepest frame chain (non-recursive)
        fn depth(m: &Module, f: usize, visiting: &mut Vec<bool>) -> u64 {
            if visiting[f] {
                return 0;
            }
            visiting[f] = true;
            let own = m.funcs[f].frame_size as u64;
            let sub = m.funcs[f]
                .callees
                .iter()
                .map(|&c| depth(m, c as usize, visiting))
                .max()
                .unwrap_or(0);
            visiting[f] = false;
            own + sub
        }
        let local_bytes = depth(self, k, &mut vec![false; self.funcs.len()]);
        SharedLayout {
            offsets,
            static_bytes,
            dyn_align,
            local_bytes,
        }
    }

    /// Names of the `.entry` kernels, in declaration order.
    pub fn kernel_names(&self) -> Vec<String> {
        self.kernels
            .iter()
            .map(|&k| self.funcs[k].name.clone())
            .collect()
    }

    /// Information about kernel `name`.
    pub fn kernel(&self, name: &str) -> Option<KernelInfo> {
        let &k = self.by_name.get(name)?;
        let f = &self.funcs[k];
        if !f.is_entry || !f.has_body {
            return None;
        }
        let l = &self.layouts[&k];
        Some(KernelInfo {
            name: f.name.clone(),
            params: f.kparams.clone(),
            static_shared_bytes: l.static_bytes as u32,
            local_bytes_per_thread: l.local_bytes as u32,
            num_regs: f.num_regs,
            max_threads_per_block: f.maxntid.unwrap_or(1024),
        })
    }

    /// Module-scope `.global` and `.const` variables, in declaration order.
    pub fn globals(&self) -> &[GlobalVar] {
        &self.globals
    }

    /// Runs kernel `name` to completion. `params` is the packed parameter buffer laid out per
    /// [`KernelInfo::params`]; `global_addrs[i]` is the device address where `globals()[i]` lives.
    pub fn launch(
        &self,
        name: &str,
        cfg: &LaunchConfig,
        params: &[u8],
        global_addrs: &[u64],
        mem: &dyn DeviceMemory,
    ) -> Result<LaunchStats, LaunchError> {
        let info = self
            .kernel(name)
            .ok_or_else(|| LaunchError::NoSuchKernel(name.to_string()))?;
        let k = self.by_name[name];
        let f = &self.funcs[k];
        let b = cfg.block;
        let g = cfg.grid;
        for i in 0..3 {
            if b[i] == 0 || g[i] == 0 {
                return Err(LaunchError::InvalidConfig(format!(
                    "grid {g:?} / block {b:?} has a zero dimension"
                )));
            }
            if b[i] > MAX_BLOCK[i] {
                return Err(LaunchError::InvalidConfig(format!(
                    "block dimension {} is {} (max {})",
                    ["x", "y", "z"][i],
                    b[i],
                    MAX_BLOCK[i]
                )));
            }
            if g[i] > MAX_GRID[i] {
                return Err(LaunchError::InvalidConfig(format!(
                    "grid dimension {} is {} (max {})",
                    ["x", "y", "z"][i],
                    g[i],
                    MAX_GRID[i]
                )));
            }
        }
        let threads = b[0] as u64 * b[1] as u64 * b[2] as u64;
        if threads > MAX_THREADS {
            return Err(LaunchError::InvalidConfig(format!(
                "{threads} threads per block (max {MAX_THREADS})"
            )));
        }
        if threads > info.max_threads_per_block as u64 {
            return Err(LaunchError::InvalidConfig(format!(
                "{threads} threads per block exceeds the kernel's .maxntid/.reqntid {}",
                info.max_threads_per_block
            )));
        }
        let l = &self.layouts[&k];
        let dyn_off = l.static_bytes.div_ceil(l.dyn_align) * l.dyn_align;
        let total = dyn_off + cfg.dynamic_shared_bytes as u64;
        let limit = if cfg.max_dynamic_shared_bytes > 0 {
            MAX_SHARED_OPTIN
        } else {
            DEFAULT_SHARED
        };
        if cfg.max_dynamic_shared_bytes as u64 > MAX_SHARED_OPTIN {
            return Err(LaunchError::InvalidConfig(format!(
                "max dynamic shared memory attribute {} exceeds {MAX_SHARED_OPTIN}",
                cfg.max_dynamic_shared_bytes
            )));
        }
        if cfg.max_dynamic_shared_bytes > 0
            && cfg.dynamic_shared_bytes > cfg.max_dynamic_shared_bytes
        {
            return Err(LaunchError::InvalidConfig(format!(
                "dynamic shared memory {} exceeds the kernel's max-dynamic-shared attribute {}",
                cfg.dynamic_shared_bytes, cfg.max_dynamic_shared_bytes
            )));
        }
        if total > limit {
            return Err(LaunchError::InvalidConfig(format!(
                "shared memory {} static + {} dynamic = {total} bytes exceeds {limit}",
                l.static_bytes, cfg.dynamic_shared_bytes
            )));
        }
        let expected = info
            .params
            .iter()
            .map(|p| (p.offset + p.size) as usize)
            .max()
            .unwrap_or(0);
        if params.len() < expected {
            return Err(LaunchError::ParamSize {
                expected,
                got: params.len(),
            });
        }
        if global_addrs.len() < self.globals.len() {
            return Err(LaunchError::InvalidConfig(format!(
                "{} global addresses given, the module has {} globals",
                global_addrs.len(),
                self.globals.len()
            )));
        }
        let run = exec::Launch {
            m: self,
            kernel: f,
            cfg,
            params,
            global_addrs,
            mem,
            shared_off: l.offsets.clone(),
            shared_size: total,
            nregs: self.num_regs as usize,
        };
        let (w, t) = run.run()?;
        Ok(LaunchStats {
            instructions: w,
            thread_instructions: t,
        })
    }
}

// Compile-time check of the Send + Sync promise.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Module>();
};
