//! Copies with non-temporal (streaming) stores, for restores that copy an image out of its mapping into page-locked
//! buffers (`DEVPROXY_RESTORE_READ=mmap` with `DEVPROXY_RESTORE_NT=1`, opt-in until measured on a GPU host).
//!
//! Why: an ordinary copy first reads each destination cache line from memory (to own it) before writing it, so
//! copying N bytes moves 3N through memory, and the device's DMA then reads the buffer again. Streaming stores skip
//! that read. If restores are bound by memory bandwidth (16 workers, ~2 GB/s each, next to the device's DMA on the
//! H100 host), that is a quarter less traffic. The caller checksums the source before copying it (it is then in the
//! cache), since the destination is not left in the cache.

/// Whether copies here use streaming stores (x86-64 with AVX2).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Copies `src` into `dst` (equal lengths), with streaming stores where [`available`]; an ordinary copy elsewhere
/// and for the unaligned head and tail.
pub fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "ntcopy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // Streaming 32-byte stores need a 32-byte aligned destination.
        let head = dst.as_ptr().align_offset(32).min(dst.len());
        let body = (dst.len() - head) / 32 * 32;
        let (d0, rest) = dst.split_at_mut(head);
        let (d1, d2) = rest.split_at_mut(body);
        let (s0, rest) = src.split_at(head);
        let (s1, s2) = rest.split_at(body);
        d0.copy_from_slice(s0);
        // SAFETY: the CPU has AVX2 (checked); d1 is 32-byte aligned and a multiple of 32 bytes, as long as s1.
        unsafe { stream_avx2(d1, s1) };
        d2.copy_from_slice(s2);
        return;
    }
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_avx2(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::*;
    let (d, s) = (
        dst.as_mut_ptr() as *mut __m256i,
        src.as_ptr() as *const __m256i,
    );
    // SAFETY: i < len / 32 stays inside both slices; `d` is 32-byte aligned (caller), `s` is read unaligned. The fence
    // makes the weakly ordered streaming stores visible before anyone (the device's DMA) reads the buffer.
    unsafe {
        for i in 0..dst.len() / 32 {
            _mm256_stream_si256(d.add(i), _mm256_loadu_si256(s.add(i)));
        }
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_exactly_at_any_alignment_and_length() {
        let src: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut dst = vec![0u8; src.len() + 64];
        for (at, len) in [
            (0, 0),
            (0, 31),
            (1, 32),
            (3, 4096),
            (5, 65_536),
            (31, 69_000),
            (32, 70_000 - 32),
        ] {
            dst.iter_mut().for_each(|b| *b = 0xEE);
            super::copy(&mut dst[at..at + len], &src[..len]);
            assert_eq!(&dst[at..at + len], &src[..len], "at {at}, len {len}");
            assert!(
                dst[..at].iter().chain(&dst[at + len..]).all(|&b| b == 0xEE),
                "outside: at {at}, len {len}"
            );
        }
    }
}
