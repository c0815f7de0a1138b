//! The NCCL unique id between the ranks of an example: rank 0 makes it and publishes it atomically in a file, the
//! others wait for the file (one process per rank, as `torchrun` would start them).

use cudarc::nccl::Id;
use std::path::Path;
use std::time::{Duration, Instant};

/// Rank 0: `ncclGetUniqueId`, written to `path`; other ranks: the id read from `path` (waiting up to 60 s).
pub fn exchange_id(rank: usize, path: &Path) -> Result<Id, String> {
    if rank == 0 {
        let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(b) = std::fs::read(path) {
            if b.len() == 128 {
                let mut internal = [0 as std::ffi::c_char; 128];
                for (d, s) in internal.iter_mut().zip(&b) {
                    *d = *s as std::ffi::c_char;
                }
                return Ok(Id::uninit(internal));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "rank {rank}: no unique id appeared at {} within 60 s",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// cudarc panics when libnccl cannot be loaded: an error instead.
pub fn check_nccl() -> Result<(), String> {
    // SAFETY: is_culib_present only tries to dlopen the library.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(
            "no NCCL (libnccl.so) found: run this under `devproxy run -- ...` or install NCCL"
                .into(),
        )
    }
}
