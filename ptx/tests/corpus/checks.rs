//! The per-kernel checks of the corpus (`kernels.cu`), written once and run twice: by `ptx/tests/corpus.rs` on the
//! interpreter directly (over its test arena) and by `examples/kernel_corpus.rs` through cudarc (natively on a GPU, or
//! under `devproxy run`). Both include this file with `#[path = ...]` and implement [`Device`] for their road.
//!
//! Inputs come from the same generator and seeds on both roads. Floating-point results are compared bit-exactly where
//! the GPU computes exactly (IEEE add/mul/fma/div/sqrt with round-to-nearest; the references use `mul_add` where
//! NVRTC contracts `a*b+c` into `fma.rn`, so the corpus is compiled with NVRTC's default `--fmad=true`). The
//! `.approx` paths (`__expf`, `__logf`, `__sinf`, `__cosf`, `tanhf`, `rsqrtf`, `expf` in softmax) are compared with
//! a relative tolerance of 1e-5 (absolute 1e-6 near zero): the GPU's documented bounds are 2 ulp for ex2/lg2 and
//! about 2^-21 absolute for sin/cos on [-pi, pi].

// Index loops mirror the kernels' indexing.
#![allow(clippy::needless_range_loop)]
#![allow(dead_code)]

use std::marker::PhantomData;

/// The outcome of one kernel's check: `Err(why)` on a wrong result or a failed device call.
pub type Check = Result<(), String>;
/// A kernel's check, run against some device.
pub type CheckFn = fn(&mut dyn Device) -> Check;

/// A kernel argument, in the order of the kernel's signature in kernels.cu.
pub enum Arg {
    /// A device buffer (its handle from [`Device::upload`]), passed as a pointer.
    Buf(usize),
    I32(i32),
    F32(f32),
    F64(f64),
    /// A struct passed by value: its bytes and alignment.
    Raw(Vec<u8>, usize),
}

impl From<&i32> for Arg {
    fn from(v: &i32) -> Arg {
        Arg::I32(*v)
    }
}
impl From<&f32> for Arg {
    fn from(v: &f32) -> Arg {
        Arg::F32(*v)
    }
}
impl From<&f64> for Arg {
    fn from(v: &f64) -> Arg {
        Arg::F64(*v)
    }
}
impl<T> From<&Buf<T>> for Arg {
    fn from(b: &Buf<T>) -> Arg {
        Arg::Buf(b.id)
    }
}

/// Grid, block and dynamic shared memory of a launch (field names as cudarc's `LaunchConfig`).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

pub fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> Shape {
    Shape {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// What the checks need of a device: buffers in and out, launches, module globals.
pub trait Device {
    /// Allocates a buffer holding `bytes`; returns its handle.
    fn upload(&mut self, bytes: &[u8]) -> Result<usize, String>;
    /// The whole content of buffer `buf`.
    fn download(&mut self, buf: usize) -> Result<Vec<u8>, String>;
    /// Launches kernel `name` of the corpus module and waits for it.
    fn launch(&mut self, name: &str, shape: Shape, args: &[Arg]) -> Result<(), String>;
    /// The bytes of module global `name` (`__device__` or `__constant__`).
    fn global(&mut self, name: &str) -> Result<Vec<u8>, String>;
}

/// Plain numeric types moved to and from device buffers (little-endian).
pub trait Elem: Copy {
    const SIZE: usize;
    fn put(&self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

macro_rules! elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(&self, out: &mut Vec<u8>) { out.extend_from_slice(&self.to_le_bytes()) }
            fn get(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().unwrap()) }
        }
    )*};
}
elem!(u8, u16, i32, u32, u64, f32, f64);

/// A device buffer of `T`s.
pub struct Buf<T> {
    id: usize,
    _t: PhantomData<T>,
}

impl dyn Device + '_ {
    fn up<T: Elem>(&mut self, v: &[T]) -> Result<Buf<T>, String> {
        let mut bytes = Vec::with_capacity(v.len() * T::SIZE);
        for x in v {
            x.put(&mut bytes);
        }
        let id = self.upload(&bytes)?;
        Ok(Buf {
            id,
            _t: PhantomData,
        })
    }
    fn zeros<T: Elem>(&mut self, n: usize) -> Result<Buf<T>, String> {
        let id = self.upload(&vec![0u8; n * T::SIZE])?;
        Ok(Buf {
            id,
            _t: PhantomData,
        })
    }
    fn down<T: Elem>(&mut self, b: &Buf<T>) -> Result<Vec<T>, String> {
        Ok(self
            .download(b.id)?
            .chunks_exact(T::SIZE)
            .map(T::get)
            .collect())
    }
}

/// Launches kernel `$name` with the given arguments.
macro_rules! launch {
    ($env:expr, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let args: Vec<Arg> = vec![$(Arg::from($arg)),*];
        $env.launch($name, $cfg, &args)?;
    }};
}

/// Returns `Err(message)` from the enclosing check when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        let ok: bool = $cond;
        if !ok {
            return Err(format!($($msg)+));
        }
    };
}

/// Deterministic pseudo-random numbers (the corpus inputs).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }
    pub fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (self.next() % 1_000_000) as f32 / 1_000_000.0 * (hi - lo)
    }
}

fn close(got: f32, want: f64, rel: f64) -> bool {
    ((got as f64) - want).abs() <= rel * want.abs().max(0.1)
}

pub fn saxpy(e: &mut dyn Device) -> Check {
    let n = 1000usize;
    let mut r = Rng(1);
    let x: Vec<f32> = (0..n).map(|_| r.f32(-10.0, 10.0)).collect();
    let y: Vec<f32> = (0..n).map(|_| r.f32(-10.0, 10.0)).collect();
    let (dx, dy) = (e.up(&x)?, e.up(&y)?);
    let (n32, alpha) = (n as i32, 1.7f32);
    launch!(
        e,
        "saxpy",
        cfg((8, 1, 1), (128, 1, 1)),
        &n32,
        &alpha,
        &dx,
        &dy
    );
    let out = e.down(&dy)?;
    for i in 0..n {
        let want = alpha.mul_add(x[i], y[i]);
        ensure!(
            out[i].to_bits() == want.to_bits(),
            "i={i}: {} vs {want}",
            out[i]
        );
    }
    Ok(())
}

pub fn daxpy_grid_stride(e: &mut dyn Device) -> Check {
    let n = 3001usize;
    let mut r = Rng(2);
    let x: Vec<f64> = (0..n).map(|_| r.f32(0.0, 10.0) as f64).collect();
    let y: Vec<f64> = (0..n).map(|_| r.f32(-5.0, 5.0) as f64).collect();
    let (dx, dy) = (e.up(&x)?, e.up(&y)?);
    let (n32, al) = (n as i32, 0.75f64);
    launch!(
        e,
        "daxpy_grid_stride",
        cfg((5, 1, 1), (96, 1, 1)),
        &n32,
        &al,
        &dx,
        &dy
    );
    let out = e.down(&dy)?;
    for i in 0..n {
        // NVRTC's contraction choices are not reproduced: 1e-14 relative, as in the corpus test.
        let want = al.mul_add(x[i], y[i]) + x[i] * y[i] - al / (x[i] + 3.0);
        ensure!(
            (out[i] - want).abs() <= 1e-14 * want.abs().max(1.0),
            "i={i}: {} vs {want}",
            out[i]
        );
    }
    Ok(())
}

pub fn int_ops(e: &mut dyn Device) -> Check {
    let n = 777usize;
    let mut r = Rng(3);
    let mut xs: Vec<i32> = (0..n).map(|_| r.next() as i32).collect();
    let mut ys: Vec<i32> = (0..n).map(|_| r.range(-100000, 100000) as i32).collect();
    xs[0] = i32::MIN + 1;
    ys[1] = 0;
    xs[2] = -7;
    ys[2] = 2;
    let (dx, dy) = (e.up(&xs)?, e.up(&ys)?);
    let dout = e.zeros::<i32>(n * 12)?;
    let n32 = n as i32;
    launch!(
        e,
        "int_ops",
        cfg((7, 1, 1), (128, 1, 1)),
        &n32,
        &dx,
        &dy,
        &dout
    );
    let out = e.down(&dout)?;
    let prmt = |a: u32, b: u32, s: u32| {
        let bytes = (a as u64) | ((b as u64) << 32);
        (0..4).fold(0u32, |acc, k| {
            acc | ((((bytes >> (((s >> (4 * k)) & 7) * 8)) & 0xff) as u32) << (8 * k))
        })
    };
    for i in 0..n {
        let (x, y) = (xs[i], ys[i]);
        let yy = if y == 0 { 1 } else { y };
        let (ux, uy) = (x as u32, yy as u32);
        let w = x as i64 * y as i64;
        let want = [
            x.wrapping_div(yy),
            x.wrapping_rem(yy),
            (ux / uy) as i32,
            (ux % uy) as i32,
            ((x as i64 * y as i64) >> 32) as i32,
            ((ux as u64 * y as u32 as u64) >> 32) as i32,
            (ux.wrapping_shl((y & 31) as u32) as i32) ^ ((ux >> (y & 15)) as i32) ^ (x >> 3),
            x.min(y)
                .wrapping_add(x.max(y).wrapping_mul(3))
                .wrapping_sub(x.wrapping_abs()),
            ux.count_ones() as i32 + 100 * x.leading_zeros() as i32,
            ux.reverse_bits() as i32,
            (((ux >> 5) & 0x3ff) as i32)
                .wrapping_add(prmt(ux, y as u32, 0x3210 + (i as u32 & 7)) as i32),
            ((w >> 17) as i32).wrapping_add(((w as i128 * 12345678901i128) >> 64) as i32),
        ];
        let got = &out[i * 12..i * 12 + 12];
        ensure!(got == want, "i={i} x={x} y={y}: {got:?} vs {want:?}");
    }
    Ok(())
}

pub fn reduce_sum(e: &mut dyn Device) -> Check {
    let n = 1000usize;
    let mut r = Rng(4);
    let x: Vec<f32> = (0..n).map(|_| r.f32(-1.0, 1.0)).collect();
    let dx = e.up(&x)?;
    let blocks = n.div_ceil(512);
    let dout = e.zeros::<f32>(blocks)?;
    let n32 = n as i32;
    launch!(
        e,
        "reduce_sum",
        cfg((blocks as u32, 1, 1), (256, 1, 1)),
        &dx,
        &dout,
        &n32
    );
    let out = e.down(&dout)?;
    for b in 0..blocks {
        let mut s = [0f32; 256];
        for (t, sv) in s.iter_mut().enumerate() {
            let i = b * 512 + t;
            let mut v = 0.0f32;
            if i < n {
                v = x[i];
            }
            if i + 256 < n {
                v += x[i + 256];
            }
            *sv = v;
        }
        let mut stride = 128;
        while stride > 0 {
            for t in 0..stride {
                s[t] += s[t + stride];
            }
            stride >>= 1;
        }
        ensure!(
            out[b].to_bits() == s[0].to_bits(),
            "block {b}: {} vs {}",
            out[b],
            s[0]
        );
    }
    Ok(())
}

pub fn atomics(e: &mut dyn Device) -> Check {
    let n = 1000usize;
    let vals: Vec<i32> = (0..n).map(|i| (i as i32 * 37) % 200 - 50).collect();
    let din = e.up(&vals)?;
    let diacc = e.up(&[0i32, i32::MIN, i32::MAX, 0, 5])?;
    let dfacc = e.up(&[0f32])?;
    let ddacc = e.up(&[0f64, 0f64])?;
    let duacc = e.up(&[0u32, 500, 0, 0xffff_ffff, 0])?;
    let n32 = n as i32;
    launch!(
        e,
        "atomics",
        cfg((8, 1, 1), (128, 1, 1)),
        &n32,
        &din,
        &diacc,
        &dfacc,
        &ddacc,
        &duacc
    );
    let ia = e.down(&diacc)?;
    let fa = e.down(&dfacc)?;
    let da = e.down(&ddacc)?;
    let cnt = da[1].to_bits();
    let ua = e.down(&duacc)?;
    let eq = |what: &str, got: String, want: String| -> Check {
        ensure!(got == want, "{what}: {got} vs {want}");
        Ok(())
    };
    eq(
        "atomicAdd int",
        ia[0].to_string(),
        vals.iter().sum::<i32>().to_string(),
    )?;
    eq(
        "atomicMax",
        ia[1].to_string(),
        vals.iter().max().unwrap().to_string(),
    )?;
    eq(
        "atomicMin",
        ia[2].to_string(),
        vals.iter().min().unwrap().to_string(),
    )?;
    eq("atomicExch", ia[3].to_string(), "42".into())?;
    let cas = 5 + vals.iter().map(|v| 2 * v + 1).sum::<i32>();
    eq("atomicCAS loop", ia[4].to_string(), cas.to_string())?;
    let fsum = vals.iter().map(|v| (v & 0xff) as f32 * 0.5).sum::<f32>();
    eq(
        "atomicAdd float",
        format!("{:?}", fa[0]),
        format!("{fsum:?}"),
    )?;
    let dsum = vals.iter().map(|&v| v as f64 * 0.25).sum::<f64>();
    eq(
        "atomicAdd double",
        format!("{:?}", da[0]),
        format!("{dsum:?}"),
    )?;
    eq("atomicAdd u64", cnt.to_string(), n.to_string())?;
    eq("atomicInc", ua[0].to_string(), (n % 101).to_string())?;
    eq("atomicDec", ua[1].to_string(), "501".into())?;
    let or = vals.iter().fold(0u32, |acc, v| acc | 1 << (v & 31));
    eq("atomicOr", ua[2].to_string(), or.to_string())?;
    eq("atomicAnd", ua[3].to_string(), "0".into())?;
    let xor = vals.iter().fold(0u32, |acc, &v| acc ^ v as u32);
    eq("atomicXor", ua[4].to_string(), xor.to_string())
}

pub fn warp_reduce(e: &mut dyn Device) -> Check {
    let n = 1000usize;
    let mut r = Rng(5);
    let vals: Vec<i32> = (0..n).map(|_| r.range(0, 100) as i32).collect();
    let din = e.up(&vals)?;
    let dout = e.zeros::<i32>(n * 4)?;
    let dball = e.zeros::<u32>(32)?;
    let n32 = n as i32;
    launch!(
        e,
        "warp_reduce",
        cfg((8, 1, 1), (128, 1, 1)),
        &din,
        &dout,
        &dball,
        &n32
    );
    let out = e.down(&dout)?;
    let ball = e.down(&dball)?;
    for w in 0..32 {
        let v: Vec<i32> = (0..32)
            .map(|l| vals.get(w * 32 + l).copied().unwrap_or(0))
            .collect();
        let sum: i32 = v.iter().sum();
        let mx = *v.iter().max().unwrap();
        let all = v.iter().all(|&x| x >= 0) as i32;
        let any = v.iter().any(|&x| x > 90) as i32;
        let b = v
            .iter()
            .enumerate()
            .fold(0u32, |acc, (l, &x)| acc | (((x > 10) as u32) << l));
        ensure!(ball[w] == b, "ballot warp {w}: {:#x} vs {b:#x}", ball[w]);
        let mut pre = 0;
        for l in 0..32 {
            let i = w * 32 + l;
            pre += v[l];
            if i >= n {
                continue;
            }
            ensure!(out[i * 4] == pre, "scan i={i}: {} vs {pre}", out[i * 4]);
            ensure!(
                out[i * 4 + 1] == v[3],
                "bcast i={i}: {} vs {}",
                out[i * 4 + 1],
                v[3]
            );
            let want = if l == 0 { sum } else { -1 };
            ensure!(
                out[i * 4 + 2] == want,
                "sum i={i}: {} vs {want}",
                out[i * 4 + 2]
            );
            let want = mx + all * 1000 + any * 10000;
            ensure!(
                out[i * 4 + 3] == want,
                "max i={i}: {} vs {want}",
                out[i * 4 + 3]
            );
        }
    }
    Ok(())
}

pub fn matmul_tiled(e: &mut dyn Device) -> Check {
    let (mm, nn, kk) = (37usize, 29usize, 45usize);
    let mut r = Rng(6);
    let am: Vec<f32> = (0..mm * kk).map(|_| r.f32(-1.0, 1.0)).collect();
    let bm: Vec<f32> = (0..kk * nn).map(|_| r.f32(-1.0, 1.0)).collect();
    let (da, db) = (e.up(&am)?, e.up(&bm)?);
    let dc = e.zeros::<f32>(mm * nn)?;
    let (m32, n32, k32) = (mm as i32, nn as i32, kk as i32);
    let shape = cfg(
        (nn.div_ceil(16) as u32, mm.div_ceil(16) as u32, 1),
        (16, 16, 1),
    );
    launch!(e, "matmul_tiled", shape, &da, &db, &dc, &m32, &n32, &k32);
    let c = e.down(&dc)?;
    for i in 0..mm {
        for j in 0..nn {
            let mut acc = 0f32;
            for k in 0..kk.div_ceil(16) * 16 {
                let (x, y) = if k < kk {
                    (am[i * kk + k], bm[k * nn + j])
                } else {
                    (0.0, 0.0)
                };
                acc = x.mul_add(y, acc);
            }
            let got = c[i * nn + j];
            ensure!(
                got.to_bits() == acc.to_bits(),
                "C[{i}][{j}]: {got} vs {acc}"
            );
        }
    }
    Ok(())
}

pub fn softmax_rows(e: &mut dyn Device) -> Check {
    let (rows, cols) = (5usize, 300usize);
    let mut r = Rng(7);
    let x: Vec<f32> = (0..rows * cols).map(|_| r.f32(-8.0, 8.0)).collect();
    let dx = e.up(&x)?;
    let dy = e.zeros::<f32>(rows * cols)?;
    let c32 = cols as i32;
    launch!(
        e,
        "softmax_rows",
        cfg((rows as u32, 1, 1), (128, 1, 1)),
        &dx,
        &dy,
        &c32
    );
    let y = e.down(&dy)?;
    for rr in 0..rows {
        let row = &x[rr * cols..(rr + 1) * cols];
        let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let s: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
        for c in 0..cols {
            let want = (row[c] as f64 - mx).exp() / s;
            let got = y[rr * cols + c];
            ensure!(close(got, want, 1e-5), "[{rr}][{c}]: {got} vs {want}");
        }
    }
    Ok(())
}

pub fn scan_block(e: &mut dyn Device) -> Check {
    let n = 1000usize;
    let mut r = Rng(8);
    let x: Vec<i32> = (0..n).map(|_| r.range(-50, 50) as i32).collect();
    let dx = e.up(&x)?;
    let dy = e.zeros::<i32>(n)?;
    let n32 = n as i32;
    launch!(e, "scan_block", cfg((4, 1, 1), (256, 1, 1)), &dx, &dy, &n32);
    let y = e.down(&dy)?;
    for b in 0..4 {
        let mut acc = 0;
        for t in 0..256 {
            let i = b * 256 + t;
            if i >= n {
                break;
            }
            acc += x[i];
            ensure!(y[i] == acc, "i={i}: {} vs {acc}", y[i]);
        }
    }
    Ok(())
}

pub fn histogram(e: &mut dyn Device) -> Check {
    let n = 10007usize;
    let mut r = Rng(9);
    let data: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
    let dd = e.up(&data)?;
    let db = e.zeros::<u32>(64)?;
    let n32 = n as i32;
    launch!(e, "histogram", cfg((8, 1, 1), (96, 1, 1)), &dd, &n32, &db);
    let bins = e.down(&db)?;
    let mut want = [0u32; 64];
    for &d in &data {
        want[(d & 63) as usize] += 1;
    }
    ensure!(bins == want, "bins {bins:?} vs {want:?}");
    Ok(())
}

/// `struct Params` of kernels.cu, passed by value: 32 bytes, 8-aligned (padding zero).
fn struct_params() -> Arg {
    let mut s = [0u8; 32];
    s[0..4].copy_from_slice(&1.25f32.to_le_bytes());
    s[4..8].copy_from_slice(&(-3i32).to_le_bytes());
    s[8..16].copy_from_slice(&0.1f64.to_le_bytes());
    s[16] = (-5i8) as u8;
    s[20..24].copy_from_slice(&6i32.to_le_bytes());
    s[24..28].copy_from_slice(&7i32.to_le_bytes());
    s[28..32].copy_from_slice(&40i32.to_le_bytes());
    Arg::Raw(s.to_vec(), 8)
}

pub fn struct_by_value(e: &mut dyn Device) -> Check {
    let n = 100usize;
    let p = struct_params();
    let dout = e.zeros::<f32>(n)?;
    let n32 = n as i32;
    launch!(
        e,
        "struct_by_value",
        cfg((1, 1, 1), (128, 1, 1)),
        p,
        &dout,
        &n32
    );
    let out = e.down(&dout)?;
    for (i, &o) in out.iter().enumerate() {
        let want = 1.25f32.mul_add((i as i32 - 3) as f32, 0.1f64 as f32) + -5.0 + 2.0;
        ensure!(o.to_bits() == want.to_bits(), "i={i}: {o} vs {want}");
    }
    Ok(())
}

pub fn device_calls(e: &mut dyn Device) -> Check {
    let n = 300usize;
    let dout = e.zeros::<f32>(n)?;
    let n32 = n as i32;
    launch!(e, "device_calls", cfg((3, 1, 1), (128, 1, 1)), &dout, &n32);
    let out = e.down(&dout)?;
    let coeffs = [1, 2, 3, 4, 5, 6, 7, 8];
    for (i, &o) in out.iter().enumerate() {
        let x = (i as f32).mul_add(0.001, 0.5);
        let k = (i & 7) + 1;
        let mut acc = 0f32;
        for c in coeffs.iter().take(k) {
            acc = acc.mul_add(x, *c as f32);
        }
        let mut v = i as i64 + 1;
        let mut steps = 0;
        while v != 1 && steps < 1000 {
            v = if v & 1 == 1 { 3 * v + 1 } else { v / 2 };
            steps += 1;
        }
        let want = acc + steps as f32;
        ensure!(o.to_bits() == want.to_bits(), "i={i}: {o} vs {want}");
    }
    Ok(())
}

pub fn divergent_search(e: &mut dyn Device) -> Check {
    let len = 60usize;
    let n = 333usize;
    let mut r = Rng(10);
    let data: Vec<i32> = (0..len).map(|_| r.range(0, 200) as i32).collect();
    let keys: Vec<i32> = (0..n).map(|_| r.range(0, 120) as i32).collect();
    let (dd, dk) = (e.up(&data)?, e.up(&keys)?);
    let dout = e.zeros::<i32>(n)?;
    let (len32, n32) = (len as i32, n as i32);
    launch!(
        e,
        "divergent_search",
        cfg((3, 1, 1), (128, 1, 1)),
        &dd,
        &len32,
        &dk,
        &dout,
        &n32
    );
    let out = e.down(&dout)?;
    for i in 0..n {
        let mut found = -1;
        for (j, &d) in data.iter().enumerate() {
            if d == keys[i] {
                found = j as i32;
                break;
            }
            if d > keys[i] * 4 {
                found = -2 - j as i32;
                break;
            }
        }
        ensure!(out[i] == found, "i={i}: {} vs {found}", out[i]);
    }
    Ok(())
}

/// Independent reference: nearest binary16 by binary search over the (monotone) positive encodings, ties to even.
fn ref_f16(x: f32) -> u16 {
    let dec = |h: u16| -> f64 {
        let e = ((h >> 10) & 0x1f) as i32;
        let m = (h & 0x3ff) as f64;
        if e == 0 {
            m * 2f64.powi(-24)
        } else {
            (1.0 + m / 1024.0) * 2f64.powi(e - 15)
        }
    };
    let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
    let v = (x as f64).abs();
    if v >= 65520.0 {
        return sign | 0x7c00;
    }
    let (mut lo, mut hi) = (0u16, 0x7bffu16);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if dec(mid) <= v {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if dec(hi) <= v {
        lo = hi;
    }
    let next = lo + 1;
    let pick = if next > 0x7bff {
        lo
    } else {
        let (dl, dn) = (v - dec(lo), dec(next) - v);
        if dl < dn || (dl == dn && lo & 1 == 0) {
            lo
        } else {
            next
        }
    };
    sign | pick
}

fn ref_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b as u64 + 0x7fff + ((b >> 16) & 1) as u64) >> 16) as u16
}

pub fn half_conv(e: &mut dyn Device) -> Check {
    let mut r = Rng(11);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        5.96e-8,
        2.98e-8,
        3.0e-8,
        1e-10,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        0.333_333_34,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f80_8001),
    ];
    for _ in 0..300 {
        x.push(
            f32::from_bits(r.next() as u32 & 0xbfff_ffff)
                * if r.next() & 1 == 0 { 1.0 } else { 1e-30 },
        );
    }
    let x: Vec<f32> = x.into_iter().filter(|v| v.is_finite()).collect();
    let n = x.len();
    let dx = e.up(&x)?;
    let dh = e.zeros::<u16>(n)?;
    let db = e.zeros::<u16>(n)?;
    let dback = e.zeros::<f32>(2 * n)?;
    let n32 = n as i32;
    launch!(
        e,
        "half_conv",
        cfg((n.div_ceil(64) as u32, 1, 1), (64, 1, 1)),
        &dx,
        &dh,
        &db,
        &dback,
        &n32
    );
    let h = e.down(&dh)?;
    let b = e.down(&db)?;
    let back = e.down(&dback)?;
    for i in 0..n {
        let want = ref_f16(x[i]);
        ensure!(
            h[i] == want,
            "f16 of {:e} ({:#x}): {:#x} vs {want:#x}",
            x[i],
            x[i].to_bits(),
            h[i]
        );
        let want = ref_bf16(x[i]);
        ensure!(b[i] == want, "bf16 of {:e}: {:#x} vs {want:#x}", x[i], b[i]);
        ensure!(
            back[2 * i + 1].to_bits() == (b[i] as u32) << 16,
            "bf16->f32 of {:#x}: {:#x}",
            b[i],
            back[2 * i + 1].to_bits()
        );
        // f16 -> f32 is exact
        let hv = h[i];
        let ex = ((hv >> 10) & 0x1f) as i32;
        let mm = (hv & 0x3ff) as f64;
        let mag = if ex == 31 {
            f64::INFINITY
        } else if ex == 0 {
            mm * 2f64.powi(-24)
        } else {
            (1.0 + mm / 1024.0) * 2f64.powi(ex - 15)
        };
        let want = if hv & 0x8000 != 0 { -mag } else { mag } as f32;
        ensure!(
            back[2 * i].to_bits() == want.to_bits(),
            "f16->f32 of {hv:#x}: {} vs {want}",
            back[2 * i]
        );
    }
    Ok(())
}

pub fn dyn_shared_reverse(e: &mut dyn Device) -> Check {
    let n = 200usize;
    let x: Vec<i32> = (0..n as i32).collect();
    let dx = e.up(&x)?;
    let dy = e.up(&vec![-7i32; n])?;
    let n32 = n as i32;
    let mut c = cfg((4, 1, 1), (64, 1, 1));
    c.shared_mem_bytes = 64 * 4;
    launch!(e, "dyn_shared_reverse", c, &dx, &dy, &n32);
    let y = e.down(&dy)?;
    for j in 0..n {
        let b = j / 64;
        let t = 63 - (j % 64);
        let i = b * 64 + t;
        let want = if i < n { i as i32 } else { -1 };
        ensure!(y[j] == want, "j={j}: {} vs {want}", y[j]);
    }
    Ok(())
}

pub fn globals_const(e: &mut dyn Device) -> Check {
    let counter = e.global("g_counter")?;
    ensure!(
        counter == 7i32.to_le_bytes(),
        "g_counter initialised to {counter:?}, not 7"
    );
    let n = 50usize;
    let dout = e.zeros::<f32>(n)?;
    let n32 = n as i32;
    launch!(e, "globals_const", cfg((1, 1, 1), (64, 1, 1)), &dout, &n32);
    let out = e.down(&dout)?;
    let table = [1.5f32, -2.0, 3.25, 0.0];
    for (i, &o) in out.iter().enumerate() {
        let want = table[i & 3].mul_add((i % 8 + 1) as f32, 7.0);
        ensure!(o == want, "i={i}: {o} vs {want}");
    }
    let w = e.global("g_written")?;
    ensure!(w == 15i32.to_le_bytes(), "g_written is {w:?}, not 15");
    Ok(())
}

pub fn grid3d(e: &mut dyn Device) -> Check {
    let (nx, ny, nz) = (20usize, 13usize, 9usize);
    let dout = e.up(&vec![-1i32; nx * ny * nz])?;
    let (nx32, ny32, nz32) = (nx as i32, ny as i32, nz as i32);
    launch!(
        e,
        "grid3d",
        cfg((3, 4, 5), (8, 4, 2)),
        &dout,
        &nx32,
        &ny32,
        &nz32
    );
    let out = e.down(&dout)?;
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let want =
                    (x * 10000 + y * 100 + z) as i32 + 3 * 1_000_000 + 4 * 100_000 + 5 * 10_000;
                let got = out[(z * ny + y) * nx + x];
                ensure!(got == want, "({x},{y},{z}): {got} vs {want}");
            }
        }
    }
    Ok(())
}

pub fn warp_misc(e: &mut dyn Device) -> Check {
    let n = 100usize;
    let mut r = Rng(12);
    let vals: Vec<i32> = (0..n).map(|_| r.range(0, 1000) as i32).collect();
    let din = e.up(&vals)?;
    let dout = e.zeros::<i32>(n * 3)?;
    let n32 = n as i32;
    launch!(
        e,
        "warp_misc",
        cfg((2, 1, 1), (64, 1, 1)),
        &din,
        &dout,
        &n32
    );
    let out = e.down(&dout)?;
    for i in 0..n {
        let w = i / 32;
        let v: Vec<i32> = (0..32)
            .map(|l| vals.get(w * 32 + l).copied().unwrap_or(0))
            .collect();
        let key = v[i % 32] & 3;
        let mm = (0..32).fold(0u32, |acc, l| acc | (((v[l] & 3 == key) as u32) << l));
        ensure!(
            out[i * 3] as u32 == mm,
            "match i={i}: {:#x} vs {mm:#x}",
            out[i * 3]
        );
        let sum = v.iter().sum::<i32>();
        ensure!(
            out[i * 3 + 1] == sum,
            "redux add i={i}: {} vs {sum}",
            out[i * 3 + 1]
        );
        let mx = v.iter().max().unwrap() + (i % 32) as i32;
        ensure!(
            out[i * 3 + 2] == mx,
            "redux max i={i}: {} vs {mx}",
            out[i * 3 + 2]
        );
    }
    Ok(())
}

pub fn float_math(e: &mut dyn Device) -> Check {
    let mut r = Rng(13);
    let mut x: Vec<f32> = (0..200).map(|_| r.f32(-3.0, 3.0)).collect();
    x.extend([0.5, -0.5, 1.5, 2.5, -2.5, 0.0, 7.0]);
    let n = x.len();
    let dx = e.up(&x)?;
    let dout = e.zeros::<f32>(n * 8)?;
    let n32 = n as i32;
    launch!(
        e,
        "float_math",
        cfg((2, 1, 1), (128, 1, 1)),
        &dx,
        &dout,
        &n32
    );
    let out = e.down(&dout)?;
    for i in 0..n {
        let v = x[i];
        let o = &out[i * 8..i * 8 + 8];
        ensure!(o[0] == v.abs().sqrt(), "sqrt {v}: {}", o[0]);
        let div = v / v.mul_add(v, 1.0);
        ensure!(
            o[1].to_bits() == div.to_bits(),
            "div {v}: {} vs {div}",
            o[1]
        );
        let vd = v as f64;
        ensure!(close(o[2], (vd * 0.1).exp(), 1e-5), "exp {v}: {}", o[2]);
        ensure!(
            close(o[3], (vd.abs() + 1.0).ln(), 1e-5),
            "log {v}: {}",
            o[3]
        );
        ensure!(
            ((o[4] as f64) - (vd.sin() + vd.cos())).abs() < 1e-5,
            "sincos {v}: {}",
            o[4]
        );
        ensure!(close(o[5], (vd * 0.01).tanh(), 1e-5), "tanh {v}: {}", o[5]);
        ensure!(
            close(o[6], 1.0 / (vd.abs() + 1.0).sqrt(), 1e-5),
            "rsqrt {v}: {}",
            o[6]
        );
        let want = v.floor() as i32 as f32
            + (v * 0.5).trunc()
            + v.ceil()
            + v.round_ties_even()
            + v.round_ties_even() as i32 as f32
            + 2.0f32.copysign(v);
        // the adds happen in a fixed order in the PTX: floor + trunc, + ceil, + rint, + int_rn, + copysign
        let w2 = ((((v.floor() as i32 as f32 + (v * 0.5).trunc()) + v.ceil())
            + v.round_ties_even())
            + v.round_ties_even() as i32 as f32)
            + 2.0f32.copysign(v);
        ensure!(o[7] == w2 || o[7] == want, "rounding {v}: {} vs {w2}", o[7]);
    }
    Ok(())
}

/// Every kernel of the corpus and its check, in the order of ptx/tests/corpus.rs.
pub const CHECKS: &[(&str, CheckFn)] = &[
    ("saxpy", saxpy),
    ("daxpy_grid_stride", daxpy_grid_stride),
    ("int_ops", int_ops),
    ("reduce_sum", reduce_sum),
    ("atomics", atomics),
    ("warp_reduce", warp_reduce),
    ("matmul_tiled", matmul_tiled),
    ("softmax_rows", softmax_rows),
    ("scan_block", scan_block),
    ("histogram", histogram),
    ("struct_by_value", struct_by_value),
    ("device_calls", device_calls),
    ("divergent_search", divergent_search),
    ("half_conv", half_conv),
    ("dyn_shared_reverse", dyn_shared_reverse),
    ("globals_const", globals_const),
    ("grid3d", grid3d),
    ("warp_misc", warp_misc),
    ("float_math", float_math),
];
