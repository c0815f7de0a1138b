//! The on-disk image layout: a fixed little-endian header, a bincode manifest, then the memory blob.
//!
//! ```text
//! offset 0             header (HEADER_BYTES = 128): magic, format major/minor, header size, offsets, lengths, CRCs
//! manifest_offset      manifest (bincode 2, standard config): device, sessions, objects, blob regions
//! blob_offset          blob (4096-aligned): the regions' bytes back to back, in manifest order
//! ```
//!
//! See docs/image-format.md for the field table and the compatibility policy. The header is plain bytes on purpose:
//! it is read before anything else is trusted, so it never goes through a decoder that could allocate.

use super::CheckpointError;

/// First bytes of every image.
pub const MAGIC: [u8; 8] = *b"DVPXIMG\0";
/// Image format major version: a reader refuses any other major.
pub const FORMAT_MAJOR: u16 = 1;
/// Image format minor version: a reader accepts images with a minor up to its own.
/// 1: address-space reservations are saved (`ObjectState::Reservation`, a new enum variant: 1.0 images read the same).
/// 2: function attributes the process set are saved (`ObjectState::FuncAttribute`, appended the same way).
pub const FORMAT_MINOR: u16 = 2;
/// Size of the header this version writes.
pub const HEADER_BYTES: u32 = 128;
/// Largest header a reader accepts (a later minor may grow it; the extra bytes are covered by the header CRC).
pub const MAX_HEADER_BYTES: u32 = 4096;
/// Largest manifest a reader accepts.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// The blob starts at a multiple of this (large aligned sequential I/O).
pub const BLOB_ALIGN: u64 = 4096;
/// The file name of the image inside its directory.
pub const IMAGE_FILE: &str = "image.devproxy";

/// Byte offsets of the header fields (all little-endian).
mod off {
    pub const MAGIC: usize = 0;
    pub const MAJOR: usize = 8;
    pub const MINOR: usize = 10;
    pub const HEADER_BYTES: usize = 12;
    pub const FLAGS: usize = 16;
    pub const MANIFEST_OFFSET: usize = 24;
    pub const MANIFEST_LEN: usize = 32;
    pub const MANIFEST_CRC: usize = 40;
    pub const BLOB_CRC: usize = 44;
    pub const BLOB_OFFSET: usize = 48;
    pub const BLOB_LEN: usize = 56;
    pub const CREATED_MS: usize = 64;
    /// The header CRC covers every header byte before it and sits in the header's last 4 bytes.
    pub const CRC_FROM_END: usize = 4;
}

/// Header flag: the blob CRC is not in the header but follows the blob (streamed images, migration).
pub const FLAG_TRAILING_BLOB_CRC: u32 = 1;
/// Header flag (migration streams only): the blob does not come in frames but as a memory file, whose descriptor
/// arrives in one message together with the trailing blob CRC (see `checkpoint::direct::BlobFd`).
pub const FLAG_BLOB_IN_FD: u32 = 2;

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub header_bytes: u32,
    pub flags: u32,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_crc: u32,
    pub blob_crc: u32,
    pub blob_offset: u64,
    pub blob_len: u64,
    pub created_unix_ms: u64,
}

impl Header {
    /// A header for a manifest of `manifest_len` bytes followed by a blob of `blob_len` bytes.
    pub fn new(manifest_len: u64, manifest_crc: u32, blob_len: u64, blob_crc: u32) -> Header {
        let manifest_offset = u64::from(HEADER_BYTES);
        Header {
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            header_bytes: HEADER_BYTES,
            flags: 0,
            manifest_offset,
            manifest_len,
            manifest_crc,
            blob_crc,
            blob_offset: (manifest_offset + manifest_len).div_ceil(BLOB_ALIGN) * BLOB_ALIGN,
            blob_len,
            created_unix_ms: now_ms(),
        }
    }

    /// Total file size the header promises.
    pub fn file_len(&self) -> u64 {
        self.blob_offset.saturating_add(self.blob_len)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_bytes as usize];
        b[off::MAGIC..off::MAGIC + 8].copy_from_slice(&MAGIC);
        put(&mut b, off::MAJOR, &self.major.to_le_bytes());
        put(&mut b, off::MINOR, &self.minor.to_le_bytes());
        put(&mut b, off::HEADER_BYTES, &self.header_bytes.to_le_bytes());
        put(&mut b, off::FLAGS, &self.flags.to_le_bytes());
        put(
            &mut b,
            off::MANIFEST_OFFSET,
            &self.manifest_offset.to_le_bytes(),
        );
        put(&mut b, off::MANIFEST_LEN, &self.manifest_len.to_le_bytes());
        put(&mut b, off::MANIFEST_CRC, &self.manifest_crc.to_le_bytes());
        put(&mut b, off::BLOB_CRC, &self.blob_crc.to_le_bytes());
        put(&mut b, off::BLOB_OFFSET, &self.blob_offset.to_le_bytes());
        put(&mut b, off::BLOB_LEN, &self.blob_len.to_le_bytes());
        put(&mut b, off::CREATED_MS, &self.created_unix_ms.to_le_bytes());
        let n = b.len() - off::CRC_FROM_END;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header. `prefix` holds the file's first bytes (at least `MAX_HEADER_BYTES` when the
    /// file is that long); `file_len` is the file's size (`None` for a stream). Checks, in this order: magic,
    /// version, header size, header CRC, offsets and lengths, file size.
    pub fn decode(
        prefix: &[u8],
        file_len: Option<u64>,
        path: &str,
    ) -> Result<Header, CheckpointError> {
        let too_short = |need: u64| CheckpointError::Truncated {
            path: path.into(),
            expected: need,
            actual: prefix.len() as u64,
            what: "header",
        };
        if prefix.len() < 8 {
            if MAGIC.starts_with(prefix) {
                return Err(too_short(u64::from(HEADER_BYTES)));
            }
            return Err(CheckpointError::NotAnImage {
                path: path.into(),
                found: prefix.to_vec(),
            });
        }
        if prefix[..8] != MAGIC {
            return Err(CheckpointError::NotAnImage {
                path: path.into(),
                found: prefix[..8].to_vec(),
            });
        }
        if prefix.len() < 16 {
            return Err(too_short(u64::from(HEADER_BYTES)));
        }
        let major = u16::from_le_bytes([prefix[off::MAJOR], prefix[off::MAJOR + 1]]);
        let minor = u16::from_le_bytes([prefix[off::MINOR], prefix[off::MINOR + 1]]);
        if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
            return Err(CheckpointError::Version {
                path: path.into(),
                image_major: major,
                image_minor: minor,
            });
        }
        let header_bytes = get_u32(prefix, off::HEADER_BYTES);
        if !(HEADER_BYTES..=MAX_HEADER_BYTES).contains(&header_bytes) {
            return Err(CheckpointError::invalid(
                path,
                format!(
                    "header size {header_bytes} is outside {HEADER_BYTES}..={MAX_HEADER_BYTES}"
                ),
            ));
        }
        if (prefix.len() as u64) < u64::from(header_bytes) {
            return Err(too_short(u64::from(header_bytes)));
        }
        let h = &prefix[..header_bytes as usize];
        let n = h.len() - off::CRC_FROM_END;
        let stored = get_u32(h, n);
        let computed = crc32fast::hash(&h[..n]);
        if stored != computed {
            return Err(CheckpointError::Crc {
                path: path.into(),
                part: "header",
                stored,
                computed,
            });
        }
        let hdr = Header {
            major,
            minor,
            header_bytes,
            flags: get_u32(h, off::FLAGS),
            manifest_offset: get_u64(h, off::MANIFEST_OFFSET),
            manifest_len: get_u64(h, off::MANIFEST_LEN),
            manifest_crc: get_u32(h, off::MANIFEST_CRC),
            blob_crc: get_u32(h, off::BLOB_CRC),
            blob_offset: get_u64(h, off::BLOB_OFFSET),
            blob_len: get_u64(h, off::BLOB_LEN),
            created_unix_ms: get_u64(h, off::CREATED_MS),
        };
        if hdr.manifest_len > MAX_MANIFEST_BYTES {
            return Err(CheckpointError::invalid(
                path,
                format!(
                    "manifest of {} bytes exceeds the {} byte limit",
                    hdr.manifest_len, MAX_MANIFEST_BYTES
                ),
            ));
        }
        let manifest_end = hdr.manifest_offset.checked_add(hdr.manifest_len);
        if hdr.manifest_offset < u64::from(header_bytes)
            || manifest_end.is_none_or(|e| e > hdr.blob_offset)
            || hdr.blob_offset.checked_add(hdr.blob_len).is_none()
        {
            return Err(CheckpointError::invalid(
                path,
                format!(
                    "inconsistent layout: manifest at {} (+{}), blob at {} (+{})",
                    hdr.manifest_offset, hdr.manifest_len, hdr.blob_offset, hdr.blob_len
                ),
            ));
        }
        if let Some(actual) = file_len {
            if actual < hdr.file_len() {
                return Err(CheckpointError::Truncated {
                    path: path.into(),
                    expected: hdr.file_len(),
                    actual,
                    what: "file",
                });
            }
        }
        Ok(hdr)
    }
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_checks() {
        let h = Header::new(1000, 7, 1 << 20, 9);
        assert_eq!(h.blob_offset, 4096);
        let b = h.encode();
        assert_eq!(b.len(), HEADER_BYTES as usize);
        assert_eq!(Header::decode(&b, Some(h.file_len()), "x").unwrap(), h);
        // Truncated file.
        let e = Header::decode(&b, Some(h.file_len() - 1), "x").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // Flipped header byte.
        let mut bad = b.clone();
        bad[33] ^= 1;
        let e = Header::decode(&bad, None, "x").unwrap_err();
        assert!(e.to_string().contains("header CRC mismatch"), "{e}");
        // Wrong version: named before the CRC is looked at.
        let mut v = b.clone();
        v[8] = 9;
        let e = Header::decode(&v, None, "x").unwrap_err();
        assert!(
            e.to_string().contains(&format!("format 9.{FORMAT_MINOR}")),
            "{e}"
        );
        assert!(e.to_string().contains("1.0"), "{e}");
        // Not an image.
        let e = Header::decode(b"hello world, not an image", None, "x").unwrap_err();
        assert!(e.to_string().contains("not a devproxy image"), "{e}");
        // Short.
        let e = Header::decode(&b[..40], None, "x").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
