//! A memfd-backed shared-memory region mapped `MAP_SHARED`.
//!
//! Why memfd: it has no name in the file system (nothing to clean up after a crash, nothing another user can open),
//! it is passed to the client over the Unix socket with SCM_RIGHTS, and it is sparse — pages that are never touched
//! cost nothing, so a 16 GiB pinned area is free until the application uses it.
//!
//! Why seals: the client holds the same fd and could `ftruncate` it; a server touching a page beyond the new end of
//! file would die of SIGBUS. [`ShmRegion::create`] therefore seals the size (`F_SEAL_SHRINK | F_SEAL_GROW`) and then
//! the seals themselves (`F_SEAL_SEAL`); [`ShmRegion::map`] refuses an fd whose size is not sealed.
//!
//! The region hands out raw pointers only. Nothing here forms `&`/`&mut` to the shared bytes: another process may
//! write them at any moment, so they are accessed through atomics or raw copies by the layers above.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// A mapped memfd. Unmapped on drop; the fd is closed on drop.
#[derive(Debug)]
pub struct ShmRegion {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is a plain address range plus an fd; it has no thread affinity. All access to the bytes goes
// through raw pointers by callers that synchronise with atomics.
unsafe impl Send for ShmRegion {}
// SAFETY: `&ShmRegion` only exposes the pointer/length/fd; concurrent use of the bytes is the caller's protocol.
unsafe impl Sync for ShmRegion {}

impl ShmRegion {
    /// Creates a sealed memfd of `len` bytes (`MFD_CLOEXEC | MFD_ALLOW_SEALING`) and maps it read-write, shared.
    pub fn create(name: &CStr, len: u64) -> io::Result<ShmRegion> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared-memory region of 0 bytes",
            ));
        }
        // SAFETY: `name` is a valid NUL-terminated string; flags are valid memfd_create flags.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let off: libc::off_t = len
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
        // SAFETY: `fd` is a valid memfd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), off) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd created with MFD_ALLOW_SEALING; no pointers involved.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map_fd(fd, len)
    }

    /// Maps a region received from a peer. The fd must be a memfd whose size is sealed; the whole file is mapped.
    pub fn map(fd: OwnedFd) -> io::Result<ShmRegion> {
        // SAFETY: F_GET_SEALS takes no pointer argument; `fd` is a valid open fd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the received fd is not a memfd ({}): pass the segment fd the server created",
                    io::Error::last_os_error()
                ),
            ));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the segment memfd is not sealed against shrinking: create it with Segment::create",
            ));
        }
        let len = fd_size(fd.as_fd())?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty memfd"));
        }
        Self::map_fd(fd, len)
    }

    fn map_fd(fd: OwnedFd, len: u64) -> io::Result<ShmRegion> {
        let len: usize = len
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
        // SAFETY: we ask for a fresh mapping (addr = null) of a valid fd; the kernel picks the address. MAP_SHARED
        // of a memfd is what makes the bytes visible to the peer.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(ShmRegion { fd, ptr, len })
    }

    /// Start of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes (the memfd's size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: empty regions are refused at creation.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, to pass to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the mapping made in `map_fd`, which nobody else unmaps. Raw pointers
        // handed out earlier must not be used after drop (documented on the users: they borrow `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Size in bytes of the file behind `fd`.
pub fn fd_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out-pointer for a `struct stat`; `fd` is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.st_size.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_map_share_bytes_and_refuse_resize() {
        let a = ShmRegion::create(c"devproxy-test", 8192).unwrap();
        let fd2 = a.fd().try_clone_to_owned().unwrap();
        let b = ShmRegion::map(fd2).unwrap();
        assert_eq!(b.len(), 8192);
        // SAFETY: both pointers are valid for 8192 bytes; no other thread touches them.
        unsafe {
            a.as_ptr().add(100).write_volatile(42);
            assert_eq!(b.as_ptr().add(100).read_volatile(), 42);
        }
        // SAFETY: ftruncate on an fd we hold; the seal must refuse it.
        let rc = unsafe { libc::ftruncate(a.fd().as_raw_fd(), 4096) };
        assert_ne!(rc, 0, "size must be sealed");
    }

    #[test]
    fn map_refuses_unsealed_fd() {
        // SAFETY: valid name and flags.
        let raw = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: valid fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        let e = ShmRegion::map(fd).unwrap_err();
        assert!(e.to_string().contains("seal"), "{e}");
    }
}
