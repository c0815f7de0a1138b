//! Floating-point helpers: IEEE rounding modes the host FPU does not offer directly.
//!
//! Rust arithmetic rounds to nearest-even, which is PTX's `.rn`. The directed modes (`.rz`, `.rm`, `.rp`) and the
//! narrow formats (f16, bf16) are done here in software, from an exactly known value: either an `f64` that holds
//! the exact result (every f32 product, f32 -> f16 conversion, ...) or an `f64` approximation plus the sign of its
//! error (sums, quotients). One rounding step only, so there is no double-rounding error.

/// IEEE rounding direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rnd {
    /// To nearest, ties to even.
    Rn,
    /// Toward zero.
    Rz,
    /// Toward minus infinity.
    Rm,
    /// Toward plus infinity.
    Rp,
}

/// A binary floating-point format: exponent and (explicit) mantissa widths.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Format {
    pub exp_bits: u32,
    pub man_bits: u32,
}

pub(crate) const F16: Format = Format {
    exp_bits: 5,
    man_bits: 10,
};
pub(crate) const BF16: Format = Format {
    exp_bits: 8,
    man_bits: 7,
};
pub(crate) const F32: Format = Format {
    exp_bits: 8,
    man_bits: 23,
};

/// Rounds `x + tail` (where `tail` is tiny next to `x` and only its sign and magnitude relative to the rounding
/// boundary matter; pass 0.0 when `x` is exact) to `fmt` with rounding `rnd`. Returns the bit pattern.
/// NaN becomes the canonical NaN (all mantissa bits set, as the GPU produces).
pub(crate) fn round_to_format(x: f64, tail: f64, fmt: Format, rnd: Rnd) -> u64 {
    let total_bits = 1 + fmt.exp_bits + fmt.man_bits;
    let sign_bit = 1u64 << (total_bits - 1);
    let exp_max = (1u64 << fmt.exp_bits) - 1;
    let inf_bits = exp_max << fmt.man_bits;
    if x.is_nan() {
        return sign_bit - 1;
    }
    let neg = x.is_sign_negative();
    let sign = if neg { sign_bit } else { 0 };
    if x.is_infinite() {
        return sign | inf_bits;
    }
    let max_finite = sign | (inf_bits - 1);
    if x == 0.0 {
        // Only the tail decides (an exact zero stays a signed zero).
        if tail == 0.0 {
            return sign;
        }
        let tneg = tail < 0.0;
        return match (rnd, tneg) {
            (Rnd::Rp, false) => 1,
            (Rnd::Rm, true) => sign_bit | 1,
            _ => {
                if tneg {
                    sign_bit
                } else {
                    0
                }
            }
        };
    }
    // Decompose |x| = m * 2^e with m an integer (53 bits for normal f64).
    let bits = x.to_bits();
    let fexp = ((bits >> 52) & 0x7ff) as i64;
    let fman = bits & ((1u64 << 52) - 1);
    let (m, e) = if fexp == 0 {
        (fman, -1074i64)
    } else {
        (fman | (1u64 << 52), fexp - 1075)
    };
    let bias = (1i64 << (fmt.exp_bits - 1)) - 1;
    let emin = 1 - bias;
    let mb = fmt.man_bits as i64;
    // floor(log2 |x|)
    let lg = 63 - m.leading_zeros() as i64 + e;
    let mut q = lg.max(emin) - mb; // quantum exponent of the result
    let overflow = |away: bool| if away { sign | inf_bits } else { max_finite };
    let round_away = |inexact: bool, half: Option<bool>, odd: bool| -> bool {
        // half: Some(true) above half, Some(false) exactly half, None below half
        match rnd {
            Rnd::Rz => false,
            Rnd::Rm => neg && inexact,
            Rnd::Rp => !neg && inexact,
            Rnd::Rn => match half {
                Some(true) => true,
                Some(false) => odd,
                None => false,
            },
        }
    };
    if lg > bias {
        let away = match rnd {
            Rnd::Rn => true,
            Rnd::Rz => false,
            Rnd::Rm => neg,
            Rnd::Rp => !neg,
        };
        return overflow(away);
    }
    let shift = q - e;
    // tail direction relative to |x|: +1 means the exact magnitude is larger than |x|.
    let tail_dir = if tail == 0.0 {
        0
    } else if (tail > 0.0) != neg {
        1
    } else {
        -1
    };
    let mut n: u64;
    let away;
    if shift <= 0 {
        n = m << (-shift);
        // exact in the target apart from the tail: the tail is below one quantum
        away = match tail_dir {
            0 => false,
            1 => round_away(true, None, false),
            _ => {
                // exact magnitude is slightly below n * 2^q: truncation goes down one quantum
                let down = match rnd {
                    Rnd::Rz => true,
                    Rnd::Rm => !neg,
                    Rnd::Rp => neg,
                    Rnd::Rn => false,
                };
                if down {
                    step_down(&mut n, &mut q, mb, emin);
                }
                false
            }
        };
    } else if shift >= 64 {
        n = 0;
        let inexact = true;
        away = round_away(inexact, None, false);
    } else {
        n = m >> shift;
        let rem = m & ((1u64 << shift) - 1);
        let halfv = 1u64 << (shift - 1);
        let half = if rem > halfv || (rem == halfv && tail_dir > 0) {
            Some(true)
        } else if rem == halfv && tail_dir == 0 {
            Some(false)
        } else {
            None
        };
        let inexact = rem != 0 || tail_dir != 0;
        if rem == 0 && tail_dir < 0 {
            // exact magnitude slightly below n quanta
            let down = match rnd {
                Rnd::Rz => true,
                Rnd::Rm => !neg,
                Rnd::Rp => neg,
                Rnd::Rn => false,
            };
            if down {
                step_down(&mut n, &mut q, mb, emin);
            }
            away = false;
        } else {
            away = round_away(inexact, half, n & 1 == 1);
        }
    }
    if away {
        n += 1;
    }
    let mut qe = q;
    if n >> (mb + 1) != 0 {
        n >>= 1;
        qe += 1;
    }
    if n < (1u64 << mb) {
        // subnormal (or zero)
        return sign | n;
    }
    let exp_field = qe + mb + bias;
    if exp_field >= exp_max as i64 {
        let away = match rnd {
            Rnd::Rn => true,
            Rnd::Rz => false,
            Rnd::Rm => neg,
            Rnd::Rp => !neg,
        };
        return overflow(away);
    }
    sign | ((exp_field as u64) << fmt.man_bits) | (n - (1u64 << mb))
}

/// One quantum below `n * 2^q`, moving into the lower binade (finer quantum) at a power of two.
fn step_down(n: &mut u64, q: &mut i64, mb: i64, emin: i64) {
    if *n == (1u64 << mb) && *q > emin - mb {
        *n = (1u64 << (mb + 1)) - 1;
        *q -= 1;
    } else {
        *n -= 1;
    }
}

/// Decodes an IEEE binary16 bit pattern.
pub(crate) fn f16_to_f64(h: u16) -> f64 {
    small_to_f64(h as u64, F16)
}

/// Decodes a bfloat16 bit pattern.
pub(crate) fn bf16_to_f64(h: u16) -> f64 {
    f32::from_bits((h as u32) << 16) as f64
}

fn small_to_f64(bits: u64, fmt: Format) -> f64 {
    let mb = fmt.man_bits;
    let sign = (bits >> (mb + fmt.exp_bits)) & 1 == 1;
    let exp = ((bits >> mb) & ((1 << fmt.exp_bits) - 1)) as i32;
    let man = bits & ((1 << mb) - 1);
    let bias = (1i32 << (fmt.exp_bits - 1)) - 1;
    let mag = if exp == (1 << fmt.exp_bits) - 1 {
        if man == 0 {
            f64::INFINITY
        } else {
            f64::NAN
        }
    } else if exp == 0 {
        man as f64 * 2f64.powi(1 - bias - mb as i32)
    } else {
        (man | (1 << mb)) as f64 * 2f64.powi(exp - bias - mb as i32)
    };
    if sign {
        -mag
    } else {
        mag
    }
}

/// Exact sum error (Knuth two-sum): returns (s, e) with s = fl(a+b) and a + b = s + e exactly.
pub(crate) fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, e)
}

/// f32 result of an exact value given as `s + e` (f64 pair), rounded with `rnd`.
pub(crate) fn f32_round(s: f64, e: f64, rnd: Rnd) -> f32 {
    if rnd == Rnd::Rn && e == 0.0 {
        return s as f32;
    }
    f32::from_bits(round_to_format(s, e, F32, rnd) as u32)
}

/// Rounds an f64 value given as `s + e` (e the exact error of s) to f64 with a directed mode.
pub(crate) fn f64_round(s: f64, e: f64, rnd: Rnd) -> f64 {
    if e == 0.0 || !s.is_finite() {
        return s;
    }
    // s is the nearest double; the exact value lies on the side given by e.
    let up = e > 0.0;
    match rnd {
        Rnd::Rn => s,
        Rnd::Rz => {
            if (s > 0.0) == up {
                s
            } else {
                next_toward_zero(s)
            }
        }
        Rnd::Rm => {
            if up {
                s
            } else {
                next_down(s)
            }
        }
        Rnd::Rp => {
            if up {
                next_up(s)
            } else {
                s
            }
        }
    }
}

fn next_up(x: f64) -> f64 {
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let b = x.to_bits();
    f64::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}
fn next_down(x: f64) -> f64 {
    -next_up(-x)
}
fn next_toward_zero(x: f64) -> f64 {
    if x > 0.0 {
        next_down(x)
    } else {
        next_up(x)
    }
}

/// Flush an f32 subnormal to a zero of the same sign (`.ftz`).
#[inline]
pub(crate) fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_and_ties() {
        assert_eq!(round_to_format(1.0, 0.0, F16, Rnd::Rn), 0x3c00);
        assert_eq!(round_to_format(65504.0, 0.0, F16, Rnd::Rn), 0x7bff);
        assert_eq!(round_to_format(65520.0, 0.0, F16, Rnd::Rn), 0x7c00);
        assert_eq!(round_to_format(65520.0, 0.0, F16, Rnd::Rz), 0x7bff);
        // 1 + 2^-11 is a tie between 1 and 1+2^-10: even is 1.
        assert_eq!(
            round_to_format(1.0 + 2f64.powi(-11), 0.0, F16, Rnd::Rn),
            0x3c00
        );
        assert_eq!(
            round_to_format(1.0 + 3.0 * 2f64.powi(-11), 0.0, F16, Rnd::Rn),
            0x3c02
        );
        // smallest subnormal 2^-24, half of it ties to zero
        assert_eq!(round_to_format(2f64.powi(-24), 0.0, F16, Rnd::Rn), 1);
        assert_eq!(round_to_format(2f64.powi(-25), 0.0, F16, Rnd::Rn), 0);
        assert_eq!(round_to_format(-2f64.powi(-25), 0.0, F16, Rnd::Rm), 0x8001);
        assert_eq!(f16_to_f64(0x3555), 0.333251953125);
        assert_eq!(round_to_format(1.0, 0.0, BF16, Rnd::Rn), 0x3f80);
        assert_eq!(bf16_to_f64(0x3f80), 1.0);
    }

    #[test]
    fn f32_directed() {
        for &(x, rz) in &[
            (1.0f64 + 2f64.powi(-30), 1.0f32),
            (-(1.0f64 + 2f64.powi(-30)), -1.0),
        ] {
            assert_eq!(f32_round(x, 0.0, Rnd::Rz), rz);
        }
        let x = 1.0 + 2f64.powi(-30);
        assert_eq!(f32_round(x, 0.0, Rnd::Rp), 1.0 + f32::EPSILON);
        assert_eq!(f32_round(x, 0.0, Rnd::Rm), 1.0);
        // exact 1.0 with a negative tail: RM goes below 1
        assert_eq!(f32_round(1.0, -1e-30, Rnd::Rm), 1.0 - f32::EPSILON / 2.0);
        assert_eq!(f32_round(1.0, -1e-30, Rnd::Rn), 1.0);
        assert_eq!(f32_round(1.0, 1e-30, Rnd::Rp), 1.0 + f32::EPSILON);
        // compare with native for random values
        let mut s = 12345u64;
        for _ in 0..10000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = f64::from_bits((s >> 2) & 0x3fff_ffff_ffff_ffff)
                * if s & 1 == 1 { -1.0 } else { 1.0 };
            if v.is_finite() {
                assert_eq!(
                    f32_round(v, 0.0, Rnd::Rn).to_bits(),
                    (v as f32).to_bits(),
                    "{v}"
                );
            }
        }
    }
}
