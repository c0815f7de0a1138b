//! The client against a fake server: a thread that does the handshake with a real segment and answers requests by
//! hand from a small "device" byte array, enough to check the data paths (inline, staged, pinned), replies, errors,
//! fire-and-forget requests and re-attaching after the server goes away.

use super::*;
use crate::protocol::{
    DeviceInfo, Handle, HostDst, HostSrc, LaunchDims, Reply, Request, SessionInfo,
};
use crate::transport::{recv_msg, send_msg, Segment, SegmentLayout};
use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;

const BASE: u64 = 0x7e00_0000_0000;
const DEV_BYTES: usize = 1 << 16;

fn layout() -> SegmentLayout {
    SegmentLayout {
        ring_bytes: 16384,
        reply_bytes: 4096,
        staging_bytes: 8192,
        pinned_bytes: 8192,
    }
}

fn info() -> SessionInfo {
    SessionInfo {
        session: 7,
        token: 99,
        server_pid: 1,
        device: DeviceInfo {
            backend: "emulated".into(),
            ordinal: 0,
            name: "fake".into(),
            uuid: [0; 16],
            total_mem: DEV_BYTES as u64,
            attributes: vec![Some(1024)],
            driver_version: 13000,
            arena_base: BASE,
            arena_bytes: DEV_BYTES as u64,
        },
        segment_bytes: 0,
    }
}

/// Serves one connection's requests until `stop` or the ring goes quiet after the socket closed.
struct Fake {
    seg: Arc<Segment>,
    dev: Vec<u8>,
    /// Fire-and-forget launches seen.
    launches: Arc<AtomicU64>,
}

impl Fake {
    fn serve(&mut self, stop: &AtomicBool) {
        let mut rec = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let Some(meta) = self.seg.pop(&mut rec, Duration::from_millis(20)).unwrap() else {
                continue;
            };
            let req: Request = protocol::decode(&rec).unwrap();
            let reply = self.handle(req);
            if meta.wants_reply {
                self.seg.reply(meta.seq, &protocol::encode(&reply)).unwrap();
            }
        }
    }

    fn off(&self, ptr: u64) -> usize {
        (ptr - BASE) as usize
    }

    fn handle(&mut self, req: Request) -> Reply {
        let staging = self.seg.staging_ptr();
        let pinned = self.seg.pinned_ptr();
        match req {
            Request::MemAlloc { bytes } if bytes > DEV_BYTES as u64 => {
                Reply::Err(CuError::OUT_OF_MEMORY)
            }
            Request::MemAlloc { .. } => Reply::Ptr(BASE),
            Request::HostAlloc { .. } => Reply::Ptr(4096),
            Request::HostFree { offset } => {
                assert_eq!(offset, 4096);
                Reply::Unit
            }
            Request::LaunchKernel(l) => {
                assert_eq!(l.params, vec![1, 2, 3, 4]);
                self.launches.fetch_add(1, Ordering::SeqCst);
                Reply::Unit
            }
            Request::MemcpyHtoD { dst, src, .. } => {
                let o = self.off(dst);
                match src {
                    HostSrc::Inline(b) => self.dev[o..o + b.len()].copy_from_slice(&b),
                    HostSrc::Staging { offset, len } => {
                        // SAFETY: test: staging holds `len` bytes the client wrote before pushing.
                        let s = unsafe {
                            std::slice::from_raw_parts(staging.add(offset as usize), len as usize)
                        };
                        self.dev[o..o + len as usize].copy_from_slice(s);
                    }
                    HostSrc::Pinned { offset, len } => {
                        // SAFETY: test: the pinned range lies in the mapping.
                        let s = unsafe {
                            std::slice::from_raw_parts(pinned.add(offset as usize), len as usize)
                        };
                        self.dev[o..o + len as usize].copy_from_slice(s);
                    }
                }
                Reply::Unit
            }
            Request::MemcpyDtoH { dst, src, len, .. } => {
                let o = self.off(src);
                let base = match dst {
                    // SAFETY: test: offsets lie in the mapping.
                    HostDst::Staging { offset } => unsafe { staging.add(offset as usize) },
                    // SAFETY: as above.
                    HostDst::Pinned { offset } => unsafe { pinned.add(offset as usize) },
                };
                // SAFETY: test: `len` bytes fit at `base`.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.dev[o..].as_ptr(), base, len as usize)
                };
                Reply::Unit
            }
            Request::StreamSynchronize { .. } | Request::CtxSynchronize => Reply::Unit,
            Request::StreamCreate { .. } => Reply::Handle(Handle(5)),
            _ => Reply::Err(CuError::NOT_SUPPORTED),
        }
    }
}

/// Accepts one client on `listener`; returns the segment it handed out.
fn accept_new(listener: &UnixListener) -> (UnixStream, Arc<Segment>) {
    let (sock, _) = listener.accept().unwrap();
    let (bytes, fds) = recv_msg(&sock, 1 << 16).unwrap();
    let hello: Hello = protocol::decode(&bytes).unwrap();
    assert!(hello.resume.is_none() && fds.is_empty());
    assert_eq!(hello.pid, std::process::id());
    let seg = Arc::new(Segment::create(layout()).unwrap());
    send_msg(
        &sock,
        &protocol::encode(&HelloReply::Ok(info())),
        &[seg.fd()],
    )
    .unwrap();
    (sock, seg)
}

fn tmp_socket(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "devproxy-client-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("sock").to_string_lossy().into_owned()
}

#[test]
fn connect_error_names_socket_and_remedy() {
    let e = Client::connect("/nonexistent/devproxy.sock").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("/nonexistent/devproxy.sock") && msg.contains("devproxy run"),
        "{msg}"
    );
    assert!(ClientError::NoSocket.to_string().contains("devproxy run"));
}

#[test]
fn calls_and_data_paths() {
    let path = tmp_socket("paths");
    let listener = UnixListener::bind(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let launches = Arc::new(AtomicU64::new(0));
    let (stop2, launches2) = (Arc::clone(&stop), Arc::clone(&launches));
    let server = std::thread::spawn(move || {
        let (_sock, seg) = accept_new(&listener);
        Fake {
            seg,
            dev: vec![0; DEV_BYTES],
            launches: launches2,
        }
        .serve(&stop2);
    });

    let c = Client::connect(&path).unwrap();
    assert_eq!(c.device().name, "fake");
    assert!(c.in_arena(BASE) && !c.in_arena(BASE + DEV_BYTES as u64));
    assert_eq!(
        c.call(&Request::MemAlloc { bytes: 16 }).unwrap(),
        Reply::Ptr(BASE)
    );
    assert_eq!(
        c.call(&Request::MemAlloc { bytes: 1 << 30 }),
        Err(CuError::OUT_OF_MEMORY)
    );

    // Inline (small), staged in chunks (larger than staging), both synchronous and async.
    let small: Vec<u8> = (0..100u8).collect();
    c.htod(BASE, &small, Handle::NULL, false).unwrap();
    let big: Vec<u8> = (0..20000u32).map(|i| (i * 7) as u8).collect();
    c.htod(BASE + 1000, &big, Handle::NULL, true).unwrap();
    let mut back = vec![0u8; 100];
    c.dtoh(&mut back, BASE, Handle::NULL, true).unwrap();
    assert_eq!(back, small);
    let mut back = vec![0u8; big.len()];
    c.dtoh(&mut back, BASE + 1000, Handle::NULL, false).unwrap();
    assert_eq!(
        back, big,
        "a pageable async copy has completed when it returns"
    );

    // Pinned memory: sources and destinations referenced by offset.
    let p = c.host_alloc(256).unwrap();
    assert_eq!(c.pinned_offset(p, 256), Some(4096));
    assert_eq!(c.pinned_offset(small.as_ptr(), 1), None);
    // SAFETY: `p` is 256 bytes of the pinned area.
    let pinned = unsafe { std::slice::from_raw_parts_mut(p, 256) };
    pinned.fill(0xab);
    c.htod(BASE + 50_000, pinned, Handle::NULL, false).unwrap();
    // An async copy from pinned memory reads it in stream order: wait before reusing the buffer.
    c.call(&Request::StreamSynchronize {
        stream: Handle::NULL,
    })
    .unwrap();
    pinned.fill(0);
    // SAFETY: `p` is valid for 256 bytes until the sync below.
    unsafe { c.dtoh_raw(p, 256, BASE + 50_000, Handle::NULL, false) }.unwrap();
    c.call(&Request::StreamSynchronize {
        stream: Handle::NULL,
    })
    .unwrap();
    // SAFETY: as above; the stream was synchronized.
    assert!(unsafe { std::slice::from_raw_parts(p, 256) }
        .iter()
        .all(|b| *b == 0xab));
    c.host_free(p).unwrap();
    assert_eq!(
        c.host_free(small.as_ptr() as *mut u8),
        Err(CuError::INVALID_VALUE)
    );

    // Launches are fire-and-forget; the next waiting call orders after them.
    for _ in 0..3 {
        c.launch_with(
            Handle(9),
            LaunchDims::new([1; 3], [1; 3], 0),
            Handle::NULL,
            |b| {
                b.extend_from_slice(&[1, 2, 3, 4]);
                Ok(())
            },
        )
        .unwrap();
    }
    assert_eq!(c.call(&Request::CtxSynchronize).unwrap(), Reply::Unit);
    assert_eq!(launches.load(Ordering::SeqCst), 3);
    assert_eq!(
        c.call(&Request::EventQuery { event: Handle(1) }),
        Err(CuError::NOT_SUPPORTED)
    );

    stop.store(true, Ordering::Release);
    server.join().unwrap();
}

#[test]
fn reattaches_after_server_restart() {
    let path = tmp_socket("reattach");
    std::env::set_var("DEVPROXY_RECONNECT_TIMEOUT", "20");
    let listener = UnixListener::bind(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (stop2, path2) = (Arc::clone(&stop), path.clone());
    let server = std::thread::spawn(move || {
        let (sock, seg) = accept_new(&listener);
        // The "old server" goes away: close the socket and the listener; the segment lives on (as in a restore).
        drop(sock);
        drop(listener);
        std::fs::remove_file(&path2).unwrap();
        rx.recv().unwrap(); // the client has started a call that is now waiting
        let listener = UnixListener::bind(&path2).unwrap();
        let (sock, _) = listener.accept().unwrap();
        let (bytes, fds) = recv_msg(&sock, 1 << 16).unwrap();
        let hello: Hello = protocol::decode(&bytes).unwrap();
        assert_eq!(
            hello.resume,
            Some(Resume {
                session: 7,
                token: 99
            })
        );
        assert_eq!(fds.len(), 1, "the segment fd travels with a resume");
        let seg2 = Segment::open(fds.into_iter().next().unwrap()).unwrap();
        drop(seg);
        send_msg(&sock, &protocol::encode(&HelloReply::Ok(info())), &[]).unwrap();
        Fake {
            seg: Arc::new(seg2),
            dev: vec![0; DEV_BYTES],
            launches: Arc::new(AtomicU64::new(0)),
        }
        .serve(&stop2);
        drop(sock);
    });

    let c = Client::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    tx.send(()).unwrap();
    // This call was pushed while no server ran; the resumed server picks it up from the same ring.
    assert_eq!(
        c.call(&Request::StreamCreate {
            flags: 0,
            priority: 0
        })
        .unwrap(),
        Reply::Handle(Handle(5))
    );
    assert!(c.is_alive());
    stop.store(true, Ordering::Release);
    server.join().unwrap();
}
