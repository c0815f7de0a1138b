//! `cuGetExportTable`: the driver's undocumented ("dark") function tables that cudart and the NVIDIA libraries fetch
//! by UUID at start-up.
//!
//! The slot meanings follow the public catalogue kept by the ZLUDA project (`dark_api`), read for semantics only;
//! this is our own implementation. Each table is a static array of pointers whose slot 0 holds the table's size in
//! bytes (the driver's convention), except the context-local-storage table, whose slot 0 is a function.
//!
//! | table (UUID) | slots | what devproxy does |
//! |---|---|---|
//! | CUDART_INTERFACE `6bd5fb6c…` | 10 | 1/6/8: load a fatbin as a module (via the server); 2: retain the primary context |
//! | TOOLS_TLS `42d85a81…` | 4 | no-op hooks returning 0 |
//! | TOOLS_HOOKS `a094798c…` | 7 | 2 and 6 hand out zeroed scratch buffers (ptr, size); the rest are no-ops |
//! | CONTEXT_LOCAL_STORAGE `c693336e…` | 4 | 0 put(ctx, key, value, dtor), 1 delete(ctx, key), 2 get(&value, ctx, key) |
//! | CONTEXT_CHECKS `263e8860…` | 4 | 2: "context is not wrapped" (writes 0); 3: returns 0 |
//! | INTEGRITY_CHECK `d4082055…` | 3 | 1: the HMAC-MD2 answer cudart verifies (see [`integrity_hash`]) |
//! | cuBLASLt `21318c60…` | 95 | 4: writes (arg0 != 0); 39: writes 0 to *arg2; others NOT_SUPPORTED, logged once |
//! | CLUSTER_PROTOTYPE `1734dc26…` | 17 | function cluster attributes; see [`super::cluster`] |
//!
//! Any other UUID (including `f8cff951…`, asked before cuInit) is refused with CUDA_ERROR_INVALID_VALUE, as ZLUDA
//! and the observed behaviour of cudart tolerate. Unknown slots never crash: each is its own function that logs
//! "(table, slot)" once and returns CUDA_ERROR_NOT_SUPPORTED.
//!
//! Context-local storage is kept per (context, key) in this process; destructor callbacks are remembered but
//! never run (devproxy never destroys the primary context: cuDevicePrimaryCtxReset keeps the session's state).

use std::collections::HashMap;
use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use cudarc::driver::sys::{CUcontext, CUdevice, CUmodule, CUresult, CUuuid};
use devproxy::protocol::CuError;
use parking_lot::Mutex;

use super::{client, put, ret};
use crate::imp::context::PRIMARY;
use crate::log;

/// A table of pointers the application reads slots from.
#[repr(transparent)]
pub struct Table<const N: usize>(pub [*const c_void; N]);

// SAFETY: the tables are immutable statics of code addresses and integers; sharing them between threads is sound.
unsafe impl<const N: usize> Sync for Table<N> {}

impl<const N: usize> Table<N> {
    pub fn start(&self) -> *const c_void {
        self.0.as_ptr().cast()
    }
}

const fn size_slot(n: usize) -> *const c_void {
    (n * std::mem::size_of::<usize>()) as *const c_void
}

/// Table ids as the 16 bytes `cuGetExportTable` receives.
pub mod uuid {
    pub const CUDART_INTERFACE: [u8; 16] = hex("6bd5fb6c5bf4e74a8987d93912fd9df9");
    pub const TOOLS_TLS: [u8; 16] = hex("42d85a8123f6cb478298f6e78a3aecdc");
    pub const TOOLS_HOOKS: [u8; 16] = hex("a094798c2e742e7493f20800200c0a66");
    pub const CONTEXT_LOCAL_STORAGE: [u8; 16] = hex("c693336e1121df11a8c368f355d89593");
    pub const CONTEXT_CHECKS: [u8; 16] = hex("263e88607cd2614392f6bbd5006dfa7e");
    pub const INTEGRITY_CHECK: [u8; 16] = hex("d4082055bde6704b8d34ba123c66e1f2");
    pub const CUBLASLT: [u8; 16] = hex("21318c60971432488ca641ff7324c8f2");
    pub const BEFORE_INIT: [u8; 16] = hex("f8cff95121468b4eb9e2fb469e7c0dd9");

    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("bad hex digit"),
        }
    }

    /// 32 hex digits to 16 bytes (compile time).
    pub const fn hex(s: &str) -> [u8; 16] {
        let b = s.as_bytes();
        assert!(b.len() == 32);
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            out[i] = nibble(b[2 * i]) << 4 | nibble(b[2 * i + 1]);
            i += 1;
        }
        out
    }
}

// ---- unknown slots ----

/// The body of a slot whose meaning is not known: log once per (table, slot), answer NOT_SUPPORTED. Takes no
/// arguments, which is sound for any C caller on the SysV and AAPCS64 ABIs (arguments live in caller-saved
/// registers or the caller's frame; the callee may ignore them).
extern "C" fn unknown_slot<const TABLE: u8, const SLOT: usize>() -> CUresult {
    static LOGGED: [AtomicBool; 8] = [const { AtomicBool::new(false) }; 8];
    let t = TABLE as usize % 8;
    if !LOGGED[t].swap(true, Ordering::Relaxed) {
        log::always(format_args!(
            "hidden driver table {} slot {SLOT} is not supported (CUDA_ERROR_NOT_SUPPORTED); further unknown slots \
             of this table are not logged",
            TABLE_NAMES[t]
        ));
    }
    CUresult::CUDA_ERROR_NOT_SUPPORTED
}

/// A slot that does nothing and returns 0 (= CUDA_SUCCESS where the caller reads a status).
extern "C" fn noop_slot() -> CUresult {
    CUresult::CUDA_SUCCESS
}

const TABLE_NAMES: [&str; 8] = [
    "CUDART_INTERFACE",
    "TOOLS_TLS",
    "TOOLS_HOOKS",
    "CONTEXT_LOCAL_STORAGE",
    "CONTEXT_CHECKS",
    "INTEGRITY_CHECK",
    "cuBLASLt(21318c60)",
    "?",
];

macro_rules! unknown {
    ($t:literal, $s:literal) => {
        unknown_slot::<$t, $s> as *const c_void
    };
}

// ---- CUDART_INTERFACE ----

/// Loads the fatbin a `__fatBinC_Wrapper_t` (or a bare fatbin header) points to as a module.
///
/// # Safety
/// `image` points to a fatbin wrapper or fatbin; `module` null or writable.
unsafe fn load_module(module: *mut CUmodule, image: *const c_void) -> CUresult {
    // SAFETY: forwarded contract: cuModuleLoadData accepts both forms.
    unsafe { super::module::cuModuleLoadData(module, image) }
}

extern "C" fn cudart_get_module(module: *mut CUmodule, wrapper: *const c_void) -> CUresult {
    // SAFETY: cudart passes a fatbin wrapper and a writable module slot.
    crate::table::guard("dark CUDART_INTERFACE[1]", || unsafe {
        load_module(module, wrapper)
    })
}

extern "C" fn cudart_primary_ctx(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    // SAFETY: cudart passes a writable context slot.
    crate::table::guard("dark CUDART_INTERFACE[2]", || unsafe {
        super::context::cuDevicePrimaryCtxRetain(pctx, dev)
    })
}

extern "C" fn cudart_get_module_ex1(
    module: *mut CUmodule,
    wrapper: *const c_void,
    arg3: *mut c_void,
    arg4: *mut c_void,
    _arg5: c_uint,
) -> CUresult {
    if !arg3.is_null() || !arg4.is_null() {
        return unknown_slot::<0, 6>();
    }
    // SAFETY: as slot 1.
    crate::table::guard("dark CUDART_INTERFACE[6]", || unsafe {
        load_module(module, wrapper)
    })
}

extern "C" fn cudart_get_module_ex2(
    header: *const c_void,
    module: *mut CUmodule,
    arg3: *mut c_void,
    arg4: *mut c_void,
    arg5: c_uint,
) -> CUresult {
    if !arg3.is_null() || !arg4.is_null() || arg5 != 0 {
        return unknown_slot::<0, 8>();
    }
    // SAFETY: `header` is a fatbin header (its size is in the header), `module` writable.
    crate::table::guard("dark CUDART_INTERFACE[8]", || unsafe {
        load_module(module, header)
    })
}

pub static CUDART_INTERFACE: Table<10> = Table([
    size_slot(10),
    cudart_get_module as *const c_void,
    cudart_primary_ctx as *const c_void,
    unknown!(0, 3),
    unknown!(0, 4),
    unknown!(0, 5),
    cudart_get_module_ex1 as *const c_void,
    unknown!(0, 7),
    cudart_get_module_ex2 as *const c_void,
    unknown!(0, 9),
]);

// ---- TOOLS_TLS, TOOLS_HOOKS ----

pub static TOOLS_TLS: Table<4> = Table([
    size_slot(4),
    noop_slot as *const c_void,
    noop_slot as *const c_void,
    noop_slot as *const c_void,
]);

/// Zeroed scratch memory the tools hooks hand out (callers write into it).
struct Scratch<const N: usize>(std::cell::UnsafeCell<[u64; N]>);
// SAFETY: the buffers are only ever handed out as raw pointers; the driver makes the same promise (one process-wide
// buffer), and devproxy never reads them.
unsafe impl<const N: usize> Sync for Scratch<N> {}

static HOOKS_BUFFER1: Scratch<1024> = Scratch(std::cell::UnsafeCell::new([0; 1024]));
static HOOKS_BUFFER2: Scratch<64> = Scratch(std::cell::UnsafeCell::new([0; 64]));

/// Reported sizes (elements; the backing buffers are larger than any reading of them as bytes or u32/u64 words).
pub const HOOKS_BUFFER1_LEN: usize = 1024;
pub const HOOKS_BUFFER2_LEN: usize = 14;

extern "C" fn hooks_buffer1(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: the caller passes null or writable out-parameters.
    unsafe {
        let _ = put(ptr, HOOKS_BUFFER1.0.get().cast());
        let _ = put(size, HOOKS_BUFFER1_LEN);
    }
}

extern "C" fn hooks_buffer2(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: as above.
    unsafe {
        let _ = put(ptr, HOOKS_BUFFER2.0.get().cast());
        let _ = put(size, HOOKS_BUFFER2_LEN);
    }
}

pub static TOOLS_HOOKS: Table<7> = Table([
    size_slot(7),
    noop_slot as *const c_void,
    hooks_buffer1 as *const c_void,
    noop_slot as *const c_void,
    noop_slot as *const c_void,
    noop_slot as *const c_void,
    hooks_buffer2 as *const c_void,
]);

// ---- CONTEXT_LOCAL_STORAGE ----

type ClsDtor = Option<extern "C" fn(CUcontext, *mut c_void, *mut c_void)>;

/// (context, key) -> (value, destructor callback).
type ClsMap = HashMap<(usize, usize), (usize, ClsDtor)>;
static CLS: LazyLock<Mutex<ClsMap>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn cls_ctx(ctx: CUcontext) -> Result<usize, CuError> {
    let ctx = if ctx.is_null() {
        super::context::current()
    } else {
        ctx
    };
    if ctx == PRIMARY {
        Ok(ctx as usize)
    } else {
        Err(CuError::INVALID_CONTEXT)
    }
}

/// Slot 0: stores `value` under (ctx, key); NULL ctx = the current context.
extern "C" fn cls_put(
    ctx: CUcontext,
    key: *mut c_void,
    value: *mut c_void,
    dtor: ClsDtor,
) -> CUresult {
    ret(cls_ctx(ctx).map(|c| {
        CLS.lock().insert((c, key as usize), (value as usize, dtor));
    }))
}

/// Slot 1: removes (ctx, key); removing a missing key is not an error.
extern "C" fn cls_delete(ctx: CUcontext, key: *mut c_void) -> CUresult {
    ret(cls_ctx(ctx).map(|c| {
        CLS.lock().remove(&(c, key as usize));
    }))
}

/// Slot 2: reads (ctx, key) into `*value`; CUDA_ERROR_INVALID_HANDLE when nothing is stored (cudart then creates
/// its state and puts it).
extern "C" fn cls_get(value: *mut *mut c_void, ctx: CUcontext, key: *mut c_void) -> CUresult {
    ret(cls_ctx(ctx).and_then(|c| {
        let v = CLS
            .lock()
            .get(&(c, key as usize))
            .map(|e| e.0)
            .ok_or(CuError::INVALID_HANDLE)?;
        // SAFETY: the caller passes null or a writable pointer slot.
        unsafe { put(value, v as *mut c_void) }
    }))
}

pub static CONTEXT_LOCAL_STORAGE: Table<4> = Table([
    cls_put as *const c_void,
    cls_delete as *const c_void,
    cls_get as *const c_void,
    std::ptr::null(),
]);

// ---- CONTEXT_CHECKS ----

extern "C" fn context_check(
    _ctx: CUcontext,
    wrapped: *mut u32,
    _unwrapped: *mut CUcontext,
) -> CUresult {
    // SAFETY: the caller passes null or a writable u32.
    ret(unsafe { put(wrapped, 0) })
}

extern "C" fn check_zero() -> u32 {
    0
}

pub static CONTEXT_CHECKS: Table<4> = Table([
    size_slot(4),
    unknown!(4, 1),
    context_check as *const c_void,
    check_zero as *const c_void,
]);

// ---- INTEGRITY_CHECK ----

/// The MD2 substitution table (RFC 1319: bytes derived from the digits of pi).
const MD2_S: [u8; 256] = [
    41, 46, 67, 201, 162, 216, 124, 1, 61, 54, 84, 161, 236, 240, 6, 19, 98, 167, 5, 243, 192, 199,
    115, 140, 152, 147, 43, 217, 188, 76, 130, 202, 30, 155, 87, 60, 253, 212, 224, 22, 103, 66,
    111, 24, 138, 23, 229, 18, 190, 78, 196, 214, 218, 158, 222, 73, 160, 251, 245, 142, 187, 47,
    238, 122, 169, 104, 121, 145, 21, 178, 7, 63, 148, 194, 16, 137, 11, 34, 95, 33, 128, 127, 93,
    154, 90, 144, 50, 39, 53, 62, 204, 231, 191, 247, 151, 3, 255, 25, 48, 179, 72, 165, 181, 209,
    215, 94, 146, 42, 172, 86, 170, 198, 79, 184, 56, 210, 150, 164, 125, 182, 118, 252, 107, 226,
    156, 116, 4, 241, 69, 157, 112, 89, 100, 113, 135, 32, 134, 91, 207, 101, 230, 45, 168, 2, 27,
    96, 37, 173, 174, 176, 185, 246, 28, 70, 97, 105, 52, 64, 126, 15, 85, 71, 163, 35, 221, 81,
    175, 58, 195, 92, 249, 206, 186, 197, 234, 38, 44, 83, 13, 110, 133, 40, 132, 9, 211, 223, 205,
    244, 65, 129, 77, 82, 106, 220, 55, 200, 108, 193, 171, 250, 36, 225, 123, 8, 12, 189, 177, 74,
    120, 136, 149, 139, 227, 99, 232, 109, 233, 203, 213, 254, 59, 0, 29, 57, 242, 239, 183, 14,
    102, 88, 208, 228, 166, 119, 114, 248, 235, 117, 75, 10, 49, 68, 80, 180, 143, 237, 31, 26,
    219, 153, 141, 51, 159, 17, 131, 20,
];

/// MD2 (RFC 1319), streaming.
#[derive(Clone)]
pub struct Md2 {
    x: [u8; 48],
    checksum: [u8; 16],
    block: [u8; 16],
    n: usize,
    last: u8,
}

impl Default for Md2 {
    fn default() -> Self {
        Md2 {
            x: [0; 48],
            checksum: [0; 16],
            block: [0; 16],
            n: 0,
            last: 0,
        }
    }
}

impl Md2 {
    fn compress(&mut self) {
        for j in 0..16 {
            let m = self.block[j];
            self.x[16 + j] = m;
            self.x[32 + j] = self.x[j] ^ m;
            self.checksum[j] ^= MD2_S[(m ^ self.last) as usize];
            self.last = self.checksum[j];
        }
        let mut t = 0u8;
        for round in 0..18u8 {
            for k in 0..48 {
                self.x[k] ^= MD2_S[t as usize];
                t = self.x[k];
            }
            t = t.wrapping_add(round);
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.block[self.n] = b;
            self.n += 1;
            if self.n == 16 {
                self.compress();
                self.n = 0;
            }
        }
    }

    pub fn finish(mut self) -> [u8; 16] {
        let pad = (16 - self.n) as u8;
        self.update(&vec![pad; pad as usize]);
        let c = self.checksum;
        self.update(&c);
        let mut out = [0u8; 16];
        out.copy_from_slice(&self.x[..16]);
        out
    }
}

/// HMAC (RFC 2104) over MD2, whose block is 16 bytes.
pub fn hmac_md2(key: &[u8; 16], message: &[u8]) -> [u8; 16] {
    let mut inner = Md2::default();
    inner.update(&key.map(|k| k ^ 0x36));
    inner.update(message);
    let ih = inner.finish();
    let mut outer = Md2::default();
    outer.update(&key.map(|k| k ^ 0x5c));
    outer.update(&ih);
    outer.finish()
}

/// The key the driver's integrity check uses (a constant; see ZLUDA's catalogue).
const INTEGRITY_KEY: [u8; 16] = [
    0x14, 0x6a, 0xdd, 0xae, 0x53, 0xa9, 0xa7, 0x52, 0xaa, 0x08, 0x41, 0x36, 0x0b, 0xf5, 0x5a, 0x9f,
];

/// One device's part of the integrity-check message.
#[derive(Clone, Copy, Debug)]
pub struct DeviceHashInfo {
    pub uuid: [u8; 16],
    pub pci_domain: i32,
    pub pci_bus: i32,
    pub pci_device: i32,
}

/// Everything the integrity check hashes besides the devices.
#[derive(Clone, Copy, Debug)]
pub struct IntegrityInput {
    pub runtime_version: u32,
    pub unix_seconds: u64,
    pub driver_version: u32,
    pub pid: u32,
    pub thread: u32,
    pub cudart_table: u64,
    pub integrity_table: u64,
    pub function: u64,
}

/// The answer cudart expects from INTEGRITY_CHECK slot 1: for runtime versions ending in 0 or 1 a constant,
/// otherwise HMAC-MD2 (fixed key) of: driver version, runtime version, pid, thread (u32 each), the CUDART_INTERFACE
/// table, the INTEGRITY_CHECK table and the check function's addresses, the time (u64 each), then per device its
/// UUID and PCI domain, bus and device (i32 each); all little-endian. Returned as two u64 (the driver's layout).
pub fn integrity_hash(input: &IntegrityInput, devices: &[DeviceHashInfo]) -> [u64; 2] {
    match input.runtime_version % 10 {
        0 => return [0x3341_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8],
        1 => return [0x1841_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8],
        _ => {}
    }
    let mut msg = Vec::with_capacity(48 + 28 * devices.len());
    msg.extend_from_slice(&input.driver_version.to_le_bytes());
    msg.extend_from_slice(&input.runtime_version.to_le_bytes());
    msg.extend_from_slice(&input.pid.to_le_bytes());
    msg.extend_from_slice(&input.thread.to_le_bytes());
    msg.extend_from_slice(&input.cudart_table.to_le_bytes());
    msg.extend_from_slice(&input.integrity_table.to_le_bytes());
    msg.extend_from_slice(&input.function.to_le_bytes());
    msg.extend_from_slice(&input.unix_seconds.to_le_bytes());
    for d in devices {
        msg.extend_from_slice(&d.uuid);
        msg.extend_from_slice(&d.pci_domain.to_le_bytes());
        msg.extend_from_slice(&d.pci_bus.to_le_bytes());
        msg.extend_from_slice(&d.pci_device.to_le_bytes());
    }
    let h = hmac_md2(&INTEGRITY_KEY, &msg);
    [
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(h[8..].try_into().expect("8 bytes")),
    ]
}

/// CUdevice_attribute numbers of the PCI location.
const ATTR_PCI_BUS_ID: i32 = 33;
const ATTR_PCI_DEVICE_ID: i32 = 34;
const ATTR_PCI_DOMAIN_ID: i32 = 50;

extern "C" fn integrity_check(version: u32, unix_seconds: u64, result: *mut [u64; 2]) -> CUresult {
    crate::table::guard("dark INTEGRITY_CHECK[1]", || {
        ret(client().and_then(|c| {
            let d = c.device();
            let dev = DeviceHashInfo {
                uuid: d.uuid,
                pci_domain: d.attribute(ATTR_PCI_DOMAIN_ID).unwrap_or(0),
                pci_bus: d.attribute(ATTR_PCI_BUS_ID).unwrap_or(0),
                pci_device: d.attribute(ATTR_PCI_DEVICE_ID).unwrap_or(0),
            };
            // SAFETY: pthread_self has no preconditions.
            let thread = unsafe { libc::pthread_self() } as u64 as u32;
            let input = IntegrityInput {
                runtime_version: version,
                unix_seconds,
                driver_version: d.driver_version as u32,
                pid: std::process::id(),
                thread,
                cudart_table: CUDART_INTERFACE.start() as u64,
                integrity_table: INTEGRITY_CHECK.start() as u64,
                function: INTEGRITY_CHECK.0[1] as u64,
            };
            // SAFETY: the caller passes null or a writable 16-byte result.
            unsafe { put(result, integrity_hash(&input, &[dev])) }
        }))
    })
}

pub static INTEGRITY_CHECK: Table<3> = Table([
    size_slot(3),
    integrity_check as *const c_void,
    std::ptr::null(),
]);

// ---- cuBLASLt (21318c60) ----

extern "C" fn cublaslt_slot4(arg0: *mut c_void, out: *mut u64) -> CUresult {
    if out.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null out-parameter the caller owns.
    unsafe { out.write(u64::from(!arg0.is_null())) };
    CUresult::CUDA_SUCCESS
}

extern "C" fn cublaslt_slot39(_arg0: *mut c_void, arg1: *mut c_void, out: *mut u64) -> CUresult {
    if arg1.is_null() || out.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null out-parameter the caller owns.
    unsafe { out.write(0) };
    CUresult::CUDA_SUCCESS
}

/// 95 slots, as driver 595 serves it (slot 0 = 95 * 8 bytes).
pub static CUBLASLT: Table<95> = {
    macro_rules! slots {
        ($($n:literal)*) => { [$(unknown_slot::<6, $n> as *const c_void),*] };
    }
    let mut t = slots!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94);
    t[0] = size_slot(95);
    t[4] = cublaslt_slot4 as *const c_void;
    t[39] = cublaslt_slot39 as *const c_void;
    Table(t)
};

/// The table for an id, or None (refused).
pub fn table_for(id: &[u8; 16]) -> Option<*const c_void> {
    Some(match *id {
        uuid::CUDART_INTERFACE => CUDART_INTERFACE.start(),
        uuid::TOOLS_TLS => TOOLS_TLS.start(),
        uuid::TOOLS_HOOKS => TOOLS_HOOKS.start(),
        uuid::CONTEXT_LOCAL_STORAGE => CONTEXT_LOCAL_STORAGE.start(),
        uuid::CONTEXT_CHECKS => CONTEXT_CHECKS.start(),
        uuid::INTEGRITY_CHECK => INTEGRITY_CHECK.start(),
        uuid::CUBLASLT => CUBLASLT.start(),
        super::cluster::UUID => super::cluster::CLUSTER_PROTOTYPE.start(),
        _ => return None,
    })
}

/// # Safety
/// `ppExportTable` null or writable; `pExportTableId` null or readable.
pub unsafe fn cuGetExportTable(
    ppExportTable: *mut *const c_void,
    pExportTableId: *const CUuuid,
) -> CUresult {
    if ppExportTable.is_null() || pExportTableId.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null and readable per the contract.
    let id = unsafe { (*pExportTableId).bytes }.map(|b| b as u8);
    match table_for(&id) {
        Some(t) => {
            // SAFETY: non-null and writable per the contract.
            unsafe { ppExportTable.write(t) };
            CUresult::CUDA_SUCCESS
        }
        None => {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            if id == uuid::BEFORE_INIT {
                log::debug(format_args!(
                    "cuGetExportTable({hex}) refused (asked before cuInit; expected)"
                ));
            } else {
                log::always(format_args!(
                    "cuGetExportTable({hex}): unknown hidden table, refused"
                ));
            }
            // SAFETY: as above.
            unsafe { ppExportTable.write(std::ptr::null()) };
            CUresult::CUDA_ERROR_INVALID_VALUE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex16(h: [u8; 16]) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn md2_rfc1319_vectors() {
        let md2 = |s: &str| {
            let mut m = Md2::default();
            m.update(s.as_bytes());
            hex16(m.finish())
        };
        assert_eq!(md2(""), "8350e5a3e24c153df2275c9f80692773");
        assert_eq!(md2("a"), "32ec01ec4a6dac72c0ab96fb34c0b5d1");
        assert_eq!(md2("abc"), "da853b0d3f88d99b30283a69e6ded6bb");
        assert_eq!(md2("message digest"), "ab4f496bfb2a530b219ff33031fe06b0");
        assert_eq!(
            md2("12345678901234567890123456789012345678901234567890123456789012345678901234567890"),
            "d5976f79d83d3a0dc9806c3c66f3efd8"
        );
    }

    #[test]
    fn integrity_hash_matches_catalogue_sample() {
        // The sample the public catalogue records from a real driver (runtime 11082, driver 12020, one device).
        let input = IntegrityInput {
            runtime_version: 0x2b4a,
            unix_seconds: 0x64a3_65ee,
            driver_version: 12020,
            pid: 0x4d08,
            thread: 0x2b78,
            cudart_table: 0x7ff8_c807_17f0,
            integrity_table: 0x7ff8_c825_e4b0,
            function: 0x7ff8_c7dd_0ad0,
        };
        let dev = DeviceHashInfo {
            uuid: [
                0x67, 0x22, 0xcb, 0xcf, 0xc6, 0x61, 0xf2, 0x92, 0x74, 0xd6, 0xed, 0x23, 0x2a, 0x32,
                0x13, 0x1c,
            ],
            pci_domain: 0,
            pci_bus: 4,
            pci_device: 0,
        };
        let h = integrity_hash(&input, &[dev]);
        let v = (h[1] as u128) << 64 | h[0] as u128;
        assert_eq!(v, 0xEAF1_3133_42BF_CD84_A7C3_4628_F214_707A);
    }

    #[test]
    fn integrity_hash_constant_versions() {
        let mut input = IntegrityInput {
            runtime_version: 13000,
            unix_seconds: 1,
            driver_version: 13000,
            pid: 1,
            thread: 1,
            cudart_table: 1,
            integrity_table: 1,
            function: 1,
        };
        assert_eq!(
            integrity_hash(&input, &[]),
            [0x3341_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8]
        );
        input.runtime_version = 13001;
        assert_eq!(integrity_hash(&input, &[])[0], 0x1841_181c_03cb_675c);
    }

    #[test]
    fn tables_have_their_slot_counts() {
        let size = |p: *const c_void| p as usize / 8;
        assert_eq!(size(CUDART_INTERFACE.0[0]), 10);
        assert_eq!(size(TOOLS_TLS.0[0]), 4);
        assert_eq!(size(TOOLS_HOOKS.0[0]), 7);
        assert_eq!(size(CONTEXT_CHECKS.0[0]), 4);
        assert_eq!(size(INTEGRITY_CHECK.0[0]), 3);
        assert_eq!(size(CUBLASLT.0[0]), 95);
        assert!(CUBLASLT.0[1..].iter().all(|p| !p.is_null()));
        assert!(CONTEXT_LOCAL_STORAGE.0[..3].iter().all(|p| !p.is_null()));
        for id in [
            uuid::CUDART_INTERFACE,
            uuid::TOOLS_TLS,
            uuid::TOOLS_HOOKS,
            uuid::CONTEXT_LOCAL_STORAGE,
            uuid::CONTEXT_CHECKS,
            uuid::INTEGRITY_CHECK,
            uuid::CUBLASLT,
        ] {
            assert!(table_for(&id).is_some());
        }
        assert!(table_for(&uuid::BEFORE_INIT).is_none());
    }

    #[test]
    fn export_table_c_entry() {
        let mut t: *const c_void = std::ptr::null();
        let id = CUuuid {
            bytes: uuid::INTEGRITY_CHECK.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: valid out-pointer and id.
        let r = unsafe { cuGetExportTable(&mut t, &id) };
        assert_eq!(r, CUresult::CUDA_SUCCESS);
        assert_eq!(t, INTEGRITY_CHECK.start());
        let bad = CUuuid {
            bytes: uuid::BEFORE_INIT.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: as above.
        let r = unsafe { cuGetExportTable(&mut t, &bad) };
        assert_eq!(r, CUresult::CUDA_ERROR_INVALID_VALUE);
        assert!(t.is_null());
    }

    #[test]
    fn context_local_storage_put_get_delete() {
        let key = 0x5151 as *mut c_void;
        let mut v: *mut c_void = std::ptr::null_mut();
        assert_eq!(
            cls_get(&mut v, PRIMARY, key),
            CUresult::CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(
            cls_put(PRIMARY, key, 0x77 as *mut c_void, None),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(cls_get(&mut v, PRIMARY, key), CUresult::CUDA_SUCCESS);
        assert_eq!(v as usize, 0x77);
        // Overwrite, then a NULL context means the current one (none on this thread: refused).
        assert_eq!(
            cls_put(PRIMARY, key, 0x78 as *mut c_void, None),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(cls_get(&mut v, PRIMARY, key), CUresult::CUDA_SUCCESS);
        assert_eq!(v as usize, 0x78);
        assert_eq!(
            cls_get(&mut v, std::ptr::null_mut(), key),
            CUresult::CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(
            cls_get(&mut v, 0x1234 as CUcontext, key),
            CUresult::CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(cls_delete(PRIMARY, key), CUresult::CUDA_SUCCESS);
        assert_eq!(
            cls_get(&mut v, PRIMARY, key),
            CUresult::CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(cls_delete(PRIMARY, key), CUresult::CUDA_SUCCESS);
    }

    #[test]
    fn tools_hooks_and_checks() {
        let mut p: *mut c_void = std::ptr::null_mut();
        let mut n = 0usize;
        hooks_buffer1(&mut p, &mut n);
        assert!(!p.is_null());
        assert_eq!(n, HOOKS_BUFFER1_LEN);
        hooks_buffer2(&mut p, &mut n);
        assert_eq!(n, HOOKS_BUFFER2_LEN);
        let mut w = 7u32;
        assert_eq!(
            context_check(PRIMARY, &mut w, std::ptr::null_mut()),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(w, 0);
        let mut out = 9u64;
        assert_eq!(
            cublaslt_slot4(std::ptr::null_mut(), &mut out),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(out, 0);
        assert_eq!(
            cublaslt_slot4(8 as *mut c_void, &mut out),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(out, 1);
        assert_eq!(unknown_slot::<6, 1>(), CUresult::CUDA_ERROR_NOT_SUPPORTED);
    }
}
