//! The PTX inside a fatbin, for the emulated device (which runs PTX only).
//!
//! Layout (public: the ZLUDA project's catalogue and NVIDIA's `fatbinary_section.h`): a `__fatBinC_Wrapper_t`
//! (magic 0x466243b1) points to a fatbin; a fatbin is a header (u32 magic 0xba55ed50, u16 version, u16 header size,
//! u64 size of the entries) followed by entries, each a header (u16 kind: 1 = PTX, 2 = ELF; u16 version; u32 header
//! size; u32 padded payload size; u32 -; u32 payload size; u32 -; u32 PTX version; u32 SM version; u32, u32 file
//! name; u64 flags; u64 -; u64 uncompressed size) and its payload. Flag 0x2000 marks an LZ4-compressed payload
//! (decoded here); 0x8000 zstd (what CUDA 13's libraries use, e.g. cuBLAS) and 0x1000 the old compression are not
//! supported yet.

/// The fatbin header magic.
pub const FATBIN_MAGIC: u32 = 0xba55_ed50;
const KIND_PTX: u16 = 1;
const FLAG_COMPRESSED_OLD: u64 = 0x1000;
const FLAG_COMPRESSED_LZ4: u64 = 0x2000;
const FLAG_COMPRESSED_ZSTD: u64 = 0x8000;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Whether `image` starts with a fatbin header.
pub fn is_fatbin(image: &[u8]) -> bool {
    u32_at(image, 0) == Some(FATBIN_MAGIC)
}

/// The PTX text of the entry with the highest SM version, or why there is none.
pub fn ptx_of(image: &[u8]) -> Result<Vec<u8>, String> {
    let hdr = u16_at(image, 6).ok_or("truncated fatbin header")? as usize;
    let size = u64_at(image, 8).ok_or("truncated fatbin header")? as usize;
    let end = hdr
        .checked_add(size)
        .filter(|&e| e <= image.len())
        .ok_or("fatbin size exceeds the image")?;
    let mut off = hdr;
    let mut best: Option<(u32, Vec<u8>)> = None;
    let mut skipped = Vec::new();
    while off + 64 <= end {
        let e = &image[off..end];
        let kind = u16_at(e, 0).ok_or("truncated entry")?;
        let ehdr = u32_at(e, 4).ok_or("truncated entry")? as usize;
        let padded = u32_at(e, 8).ok_or("truncated entry")? as usize;
        let payload = u32_at(e, 16).ok_or("truncated entry")? as usize;
        let sm = u32_at(e, 28).ok_or("truncated entry")?;
        let flags = u64_at(e, 40).ok_or("truncated entry")?;
        let raw_size = u64_at(e, 56).unwrap_or(0) as usize;
        if ehdr == 0 || ehdr + padded > e.len() {
            return Err("fatbin entry exceeds the image".into());
        }
        if kind == KIND_PTX && best.as_ref().is_none_or(|(s, _)| sm > *s) {
            let data = &e[ehdr..ehdr + padded];
            let text = if flags & FLAG_COMPRESSED_LZ4 != 0 {
                lz4_block(&data[..payload.min(data.len())], raw_size)
                    .map_err(|w| format!("sm_{sm} PTX: {w}"))
            } else if flags & FLAG_COMPRESSED_ZSTD != 0 {
                Err(format!(
                    "sm_{sm} PTX is zstd-compressed (no zstd decoder in devproxy yet)"
                ))
            } else if flags & FLAG_COMPRESSED_OLD != 0 {
                Err(format!(
                    "sm_{sm} PTX uses the old fatbin compression (not supported)"
                ))
            } else {
                Ok(data.to_vec())
            };
            match text {
                Ok(mut t) => {
                    while t.last() == Some(&0) {
                        t.pop();
                    }
                    best = Some((sm, t));
                }
                Err(why) => skipped.push(why),
            }
        }
        off += ehdr + padded;
    }
    match best {
        Some((_, t)) => Ok(t),
        None if skipped.is_empty() => {
            Err("the fatbin holds no PTX (only SASS for real GPUs)".into())
        }
        None => Err(skipped.join("; ")),
    }
}

/// Decodes one LZ4 block (the LZ4 block format: sequences of literals and back-references).
pub fn lz4_block(src: &[u8], size_hint: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(size_hint);
    let mut i = 0;
    let len_ext = |i: &mut usize, mut n: usize| -> Result<usize, String> {
        loop {
            let b = *src.get(*i).ok_or("truncated length")?;
            *i += 1;
            n += b as usize;
            if b != 255 {
                return Ok(n);
            }
        }
    };
    while i < src.len() {
        let token = src[i];
        i += 1;
        let mut lit = (token >> 4) as usize;
        if lit == 15 {
            lit = len_ext(&mut i, lit)?;
        }
        let l = src.get(i..i + lit).ok_or("literals past the end")?;
        out.extend_from_slice(l);
        i += lit;
        if i >= src.len() {
            break; // the last sequence has literals only
        }
        let off = u16::from_le_bytes([src[i], *src.get(i + 1).ok_or("truncated offset")?]) as usize;
        i += 2;
        if off == 0 || off > out.len() {
            return Err("bad back-reference".into());
        }
        let mut m = (token & 15) as usize;
        if m == 15 {
            m = len_ext(&mut i, m)?;
        }
        m += 4;
        let start = out.len() - off;
        for k in 0..m {
            let b = out[start + k];
            out.push(b);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: u16, sm: u32, flags: u64, payload: &[u8], raw: u64) -> Vec<u8> {
        let padded = payload.len().div_ceil(8) * 8;
        let mut e = vec![0u8; 64];
        e[0..2].copy_from_slice(&kind.to_le_bytes());
        e[2..4].copy_from_slice(&0x101u16.to_le_bytes());
        e[4..8].copy_from_slice(&64u32.to_le_bytes());
        e[8..12].copy_from_slice(&(padded as u32).to_le_bytes());
        e[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        e[28..32].copy_from_slice(&sm.to_le_bytes());
        e[40..48].copy_from_slice(&flags.to_le_bytes());
        e[56..64].copy_from_slice(&raw.to_le_bytes());
        e.extend_from_slice(payload);
        e.resize(64 + padded, 0);
        e
    }

    fn fatbin(entries: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = entries.concat();
        let mut f = vec![0u8; 16];
        f[0..4].copy_from_slice(&FATBIN_MAGIC.to_le_bytes());
        f[4..6].copy_from_slice(&1u16.to_le_bytes());
        f[6..8].copy_from_slice(&16u16.to_le_bytes());
        f[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn picks_the_newest_plain_ptx() {
        let f = fatbin(&[
            entry(2, 90, 0, b"\x7fELF....", 0),
            entry(1, 80, 0, b".version 8.0\n// sm80\0", 0),
            entry(1, 90, 0, b".version 8.0\n// sm90\0", 0),
        ]);
        assert!(is_fatbin(&f));
        assert_eq!(ptx_of(&f).unwrap(), b".version 8.0\n// sm90");
        assert!(ptx_of(&fatbin(&[entry(2, 90, 0, b"elf", 0)]))
            .unwrap_err()
            .contains("no PTX"));
    }

    #[test]
    fn lz4_literals_and_matches() {
        // "abcabcabcabc!": literals "abc", match offset 3 length 9, then literal "!".
        let block = [0x35, b'a', b'b', b'c', 3, 0, 0x10, b'!'];
        assert_eq!(lz4_block(&block, 13).unwrap(), b"abcabcabcabc!");
        let f = fatbin(&[entry(1, 90, FLAG_COMPRESSED_LZ4, &block, 13)]);
        assert_eq!(ptx_of(&f).unwrap(), b"abcabcabcabc!");
        assert!(lz4_block(&[0x00, 9, 0], 0).is_err());
    }
}
