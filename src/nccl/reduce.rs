//! Reductions over every NCCL data type and operation, in rank order.
//!
//! Determinism is the point: every reduction folds the ranks' contributions strictly in rank order
//! (`((x0 op x1) op x2) ...`), element by element, so a result is bit-identical to a single-process reference that
//! does the same. The semantics follow NCCL's:
//! - `Sum`, `Prod`, `Max`, `Min` as named (integers wrap on overflow, as on the GPU);
//! - `Avg`: for floating types each contribution is first multiplied by `1/nranks` (rounded to the type) and the
//!   products are summed (NCCL's `PreMulSum` with scalar `1/nranks`); for integers the wrapped sum is divided by
//!   `nranks` (NCCL's `SumPostDiv`);
//! - `PreMulSum(s)`: each contribution multiplied by `s` (a value of the data type), then summed.
//!
//! Half-precision types (`f16`, `bf16`) compute each step in `f32` and round back to the type after it, like the
//! GPU's half arithmetic.

use super::{DType, RedOp, Scalar};
use half::{bf16, f16};

/// One element type.
trait Elem: Copy {
    const SIZE: usize;
    fn load(b: &[u8]) -> Self;
    fn store(self, b: &mut [u8]);
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    /// `1/n` in the type (floats), `None` for integers.
    fn recip(n: usize) -> Option<Self>;
    /// Integer division by `n` (integers only; floats never call it).
    fn div(self, n: usize) -> Self;
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn load(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().expect("element size")) }
            fn store(self, b: &mut [u8]) { b.copy_from_slice(&self.to_le_bytes()) }
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn max(self, o: Self) -> Self { Ord::max(self, o) }
            fn min(self, o: Self) -> Self { Ord::min(self, o) }
            fn recip(_: usize) -> Option<Self> { None }
            fn div(self, n: usize) -> Self { self.wrapping_div(n as $t) }
        }
    )*};
}
int_elem!(i8, u8, i32, u32, i64, u64);

macro_rules! float_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn load(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().expect("element size")) }
            fn store(self, b: &mut [u8]) { b.copy_from_slice(&self.to_le_bytes()) }
            fn add(self, o: Self) -> Self { self + o }
            fn mul(self, o: Self) -> Self { self * o }
            // fmax/fmin semantics (a NaN operand yields the other), as CUDA's fmaxf/fminf.
            fn max(self, o: Self) -> Self { <$t>::max(self, o) }
            fn min(self, o: Self) -> Self { <$t>::min(self, o) }
            fn recip(n: usize) -> Option<Self> { Some(1.0 / n as $t) }
            fn div(self, n: usize) -> Self { self / n as $t }
        }
    )*};
}
float_elem!(f32, f64);

macro_rules! half_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            const SIZE: usize = 2;
            fn load(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().expect("element size")) }
            fn store(self, b: &mut [u8]) { b.copy_from_slice(&self.to_le_bytes()) }
            fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            fn max(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().max(o.to_f32())) }
            fn min(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().min(o.to_f32())) }
            fn recip(n: usize) -> Option<Self> { Some(<$t>::from_f32(1.0 / n as f32)) }
            fn div(self, n: usize) -> Self { <$t>::from_f32(self.to_f32() / n as f32) }
        }
    )*};
}
half_elem!(f16, bf16);

/// Folds `inputs` (one byte slice per rank, in rank order, all the same length) into `out`.
fn fold<T: Elem>(op: &RedOp, inputs: &[&[u8]], out: &mut [u8]) -> Result<(), String> {
    let n = inputs.len();
    let scalar: Option<T> = match op {
        RedOp::Avg => T::recip(n),
        RedOp::PreMulSum(Scalar::Host(s)) => {
            if s.len() != T::SIZE {
                return Err(format!(
                    "PreMulSum scalar is {} bytes, the data type has {}",
                    s.len(),
                    T::SIZE
                ));
            }
            Some(T::load(s))
        }
        RedOp::PreMulSum(Scalar::Device(_)) => {
            return Err("PreMulSum scalar was not resolved".into())
        }
        _ => None,
    };
    let step = |acc: T, x: T| -> T {
        match op {
            RedOp::Sum => acc.add(x),
            RedOp::Prod => acc.mul(x),
            RedOp::Max => acc.max(x),
            RedOp::Min => acc.min(x),
            RedOp::Avg | RedOp::PreMulSum(_) => match scalar {
                Some(s) => acc.add(x.mul(s)),
                None => acc.add(x),
            },
        }
    };
    for (i, o) in out.chunks_exact_mut(T::SIZE).enumerate() {
        let at = i * T::SIZE..(i + 1) * T::SIZE;
        let first = T::load(&inputs[0][at.clone()]);
        let mut acc = match (op, scalar) {
            (RedOp::Avg | RedOp::PreMulSum(_), Some(s)) => first.mul(s),
            _ => first,
        };
        for inp in &inputs[1..] {
            acc = step(acc, T::load(&inp[at.clone()]));
        }
        if matches!(op, RedOp::Avg) && scalar.is_none() {
            acc = acc.div(n);
        }
        acc.store(o);
    }
    Ok(())
}

/// Reduces one contribution per rank (in rank order) element-wise. All inputs must have the same length, a multiple
/// of the element size.
pub fn reduce(dtype: DType, op: &RedOp, inputs: &[&[u8]]) -> Result<Vec<u8>, String> {
    let first = inputs.first().ok_or("no contributions to reduce")?;
    let len = first.len();
    if inputs.iter().any(|i| i.len() != len) {
        return Err("contributions of different sizes".into());
    }
    if len % dtype.size() != 0 {
        return Err(format!(
            "{len} bytes is not a whole number of {dtype:?} elements"
        ));
    }
    let mut out = vec![0u8; len];
    match dtype {
        DType::I8 => fold::<i8>(op, inputs, &mut out)?,
        DType::U8 => fold::<u8>(op, inputs, &mut out)?,
        DType::I32 => fold::<i32>(op, inputs, &mut out)?,
        DType::U32 => fold::<u32>(op, inputs, &mut out)?,
        DType::I64 => fold::<i64>(op, inputs, &mut out)?,
        DType::U64 => fold::<u64>(op, inputs, &mut out)?,
        DType::F16 => fold::<f16>(op, inputs, &mut out)?,
        DType::F32 => fold::<f32>(op, inputs, &mut out)?,
        DType::F64 => fold::<f64>(op, inputs, &mut out)?,
        DType::BF16 => fold::<bf16>(op, inputs, &mut out)?,
    }
    Ok(out)
}
