//! Framed messages with file descriptors over a Unix stream socket, peer credentials, and a private listening socket.
//!
//! Frame: `u32` little-endian length, then that many bytes. File descriptors (SCM_RIGHTS) ride on the first
//! `sendmsg` of the frame, so the receiver collects them while reading the length prefix. Every send uses
//! `MSG_NOSIGNAL`: the shim runs inside an arbitrary application, and a server that went away must give an `EPIPE`
//! error, not a SIGPIPE that kills the application. Received fds are created with `MSG_CMSG_CLOEXEC` so they do not
//! leak into programs the application executes.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};

/// Most fds one message may carry.
pub const MAX_FDS_PER_MSG: usize = 16;

fn nix_err(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Sends one frame (`u32` LE length + `bytes`), with `fds` attached to its first byte.
pub fn send_msg(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let len: u32 = bytes.len().try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "message longer than 4 GiB: send bulk data through the staging area",
        )
    })?;
    if fds.len() > MAX_FDS_PER_MSG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS_PER_MSG} fds per message"),
        ));
    }
    let prefix = len.to_le_bytes();
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let total = prefix.len() + bytes.len();
    let mut sent = 0usize;
    let mut first = true;
    while sent < total {
        let iov_storage;
        let iov: &[IoSlice<'_>] = if sent < prefix.len() {
            iov_storage = [IoSlice::new(&prefix[sent..]), IoSlice::new(bytes)];
            &iov_storage
        } else {
            iov_storage = [
                IoSlice::new(&bytes[sent - prefix.len()..]),
                IoSlice::new(&[]),
            ];
            &iov_storage[..1]
        };
        let c = if first { cmsgs } else { &[] };
        match sendmsg::<()>(sock.as_raw_fd(), iov, c, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => {
                sent += n;
                first = false;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(nix_err(e)),
        }
    }
    Ok(())
}

/// Reads into `buf` completely, collecting any fds that arrive. Returns false on EOF before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0usize;
    while got < buf.len() {
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MSG]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let (n, truncated) = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                for c in msg.cmsgs().map_err(nix_err)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for r in raw {
                            // SAFETY: the kernel just installed `r` in our fd table for this message; we are its
                            // only owner.
                            fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                        }
                    }
                }
                (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(nix_err(e)),
        };
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer sent more than {MAX_FDS_PER_MSG} fds in one message"),
            ));
        }
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the socket in the middle of a message",
            ));
        }
        got += n;
    }
    Ok(true)
}

/// Receives one frame and the fds attached to it. Clean EOF before a frame => `UnexpectedEof`;
/// a length above `max_len` => `InvalidData` (the fds received so far are closed).
pub fn recv_msg(sock: &UnixStream, max_len: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let mut prefix = [0u8; 4];
    if !recv_exact(sock, &mut prefix, &mut fds)? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the socket",
        ));
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the limit of {max_len}: peer is misbehaving or speaks another protocol"),
        ));
    }
    let mut body = vec![0u8; len];
    if len > 0 && !recv_exact(sock, &mut body, &mut fds)? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the socket in the middle of a message",
        ));
    }
    Ok((body, fds))
}

/// `(pid, uid)` of the process at the other end (SO_PEERCRED, taken when it connected).
pub fn peer_credentials(sock: &UnixStream) -> io::Result<(u32, u32)> {
    let c = getsockopt(&sock.as_fd(), sockopt::PeerCredentials).map_err(nix_err)?;
    Ok((c.pid() as u32, c.uid()))
}

/// Binds a listening socket at `path` that only the current user can connect to.
///
/// Creates the parent directory (mode 0700) if missing. An existing socket file at `path` is removed only when nothing
/// listens on it (a stale socket from a crashed server); if a server is listening the call fails with `AddrInUse`; a
/// non-socket file is never removed. The socket is bound under a temporary name, chmod-ed to 0600 and then renamed into
/// place, so it is never reachable with a wider mode (`local_addr()` reports the temporary name).
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket: remove it or choose another path",
                        path.display()
                    ),
                ));
            }
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "a server already listens at {}: stop it or choose another path",
                            path.display()
                        ),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name")
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = parent.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let finish = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = finish {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn frames_and_fds_survive_the_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        send_msg(&a, b"hello", &[f.as_fd()]).unwrap();
        send_msg(&a, b"", &[]).unwrap();
        let big = vec![0xabu8; 300_000];
        let big2 = big.clone();
        let a2 = a.try_clone().unwrap();
        let t = std::thread::spawn(move || send_msg(&a2, &big2, &[]).unwrap());
        let (m, fds) = recv_msg(&b, 1024).unwrap();
        assert_eq!(m, b"hello");
        assert_eq!(fds.len(), 1);
        // CLOEXEC on the received fd.
        // SAFETY: F_GETFD on a valid fd.
        let fl = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert!(fl & libc::FD_CLOEXEC != 0);
        // Write through the received fd, read through the original.
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.write_all(b"via fd").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "via fd");
        let (m, fds) = recv_msg(&b, 1024).unwrap();
        assert!(m.is_empty() && fds.is_empty());
        let (m, _) = recv_msg(&b, 1 << 20).unwrap();
        assert_eq!(m, big);
        t.join().unwrap();
        drop(a);
        let e = recv_msg(&b, 1024).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn oversize_and_truncated_frames() {
        let (a, b) = UnixStream::pair().unwrap();
        send_msg(&a, &[1u8; 100], &[]).unwrap();
        let e = recv_msg(&b, 99).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // A length prefix announcing more than arrives, then EOF.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&10u32.to_le_bytes()).unwrap();
        (&a).write_all(b"abc").unwrap();
        drop(a);
        let e = recv_msg(&b, 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Send to a closed peer: EPIPE error, not SIGPIPE.
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(send_msg(&a, b"x", &[]).is_err());
    }

    #[test]
    fn credentials_are_ours() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (pid, uid) = peer_credentials(&a).unwrap();
        assert_eq!(pid, std::process::id());
        // SAFETY: getuid has no preconditions.
        assert_eq!(uid, unsafe { libc::getuid() });
    }

    #[test]
    fn bind_private_mode_and_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/devproxy.sock");
        let l = bind_private(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let pmeta = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(pmeta.mode() & 0o777, 0o700);
        // Reachable under the final name.
        let c = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        send_msg(&c, b"ping", &[]).unwrap();
        assert_eq!(recv_msg(&s, 16).unwrap().0, b"ping");
        // Someone listens: refused.
        let e = bind_private(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // Listener gone, file stays: stale, replaced.
        drop((c, s, l));
        assert!(path.exists());
        let _l2 = bind_private(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        // A regular file is never removed.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            bind_private(&file).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
