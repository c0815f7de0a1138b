//! Bad input and faults: the server refuses or fails the offending call, or closes the offending session with a
//! logged reason, and lives on for everyone else.

mod common;

use common::{sessions, RawSession, Sandbox};
use devproxy::protocol::{self, CuError, Handle, HostDst, HostSrc, Reply, Request};
use std::time::{Duration, Instant};

fn alloc(s: &mut RawSession, bytes: u64) -> u64 {
    match s.call(&Request::MemAlloc { bytes }) {
        Reply::Ptr(p) => p,
        other => panic!("alloc failed: {other:?}"),
    }
}

#[test]
fn garbage_and_truncated_requests_fail_the_call_and_the_server_lives_on() {
    let mut sb = Sandbox::new();
    let sock = sb.serve("a", &[]);
    let mut s = RawSession::connect(&sock).expect("connect");
    // Undecodable bytes: an unknown opcode and a truncated request.
    assert_eq!(
        s.call_raw(&[0xff, 0xff, 0xff, 0x7f]).unwrap(),
        Reply::Err(CuError::INVALID_VALUE)
    );
    let mut truncated = protocol::encode(&Request::MemAlloc { bytes: 1 << 20 });
    truncated.truncate(1);
    assert_eq!(
        s.call_raw(&truncated).unwrap(),
        Reply::Err(CuError::INVALID_VALUE)
    );
    // Opcode 0 is never valid.
    assert_eq!(
        s.call(&Request::Invalid),
        Reply::Err(CuError::INVALID_VALUE)
    );
    // The session still works.
    let p = alloc(&mut s, 4096);
    assert_eq!(s.call(&Request::MemFree { ptr: p }), Reply::Unit);
}

#[test]
fn forged_handles_and_bad_pointers_are_refused() {
    let mut sb = Sandbox::new();
    let sock = sb.serve("a", &[]);
    let mut s = RawSession::connect(&sock).expect("connect");
    let forged = Handle(0xdead_beef);
    assert_eq!(
        s.call(&Request::StreamSynchronize { stream: forged }),
        Reply::Err(CuError::INVALID_HANDLE)
    );
    assert_eq!(
        s.call(&Request::EventQuery { event: forged }),
        Reply::Err(CuError::INVALID_HANDLE)
    );
    assert_eq!(
        s.call(&Request::ModuleGetFunction {
            module: forged,
            name: "k".into()
        }),
        Reply::Err(CuError::INVALID_HANDLE)
    );
    // A stream handle used as an event is refused too.
    let stream = match s.call(&Request::StreamCreate {
        flags: 0,
        priority: 0,
    }) {
        Reply::Handle(h) => h,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        s.call(&Request::EventSynchronize { event: stream }),
        Reply::Err(CuError::INVALID_HANDLE)
    );

    let p = alloc(&mut s, 4096);
    // Out of the arena.
    let r = s.call(&Request::MemcpyDtoH {
        dst: HostDst::Staging { offset: 0 },
        src: 0x1000,
        len: 16,
        stream: Handle::NULL,
        sync: true,
    });
    assert_eq!(r, Reply::Err(CuError::INVALID_VALUE));
    // Past the end of an allocation.
    let r = s.call(&Request::MemcpyHtoD {
        dst: p + 4000,
        src: HostSrc::Staging {
            offset: 0,
            len: 200,
        },
        stream: Handle::NULL,
        sync: true,
    });
    assert_eq!(r, Reply::Err(CuError::INVALID_VALUE));
    // Staging offsets outside the segment.
    let r = s.call(&Request::MemcpyHtoD {
        dst: p,
        src: HostSrc::Staging {
            offset: u64::MAX - 8,
            len: 16,
        },
        stream: Handle::NULL,
        sync: true,
    });
    assert_eq!(r, Reply::Err(CuError::INVALID_VALUE));
    // Freeing something that is not an allocation.
    assert_eq!(
        s.call(&Request::MemFree { ptr: p + 256 }),
        Reply::Err(CuError::INVALID_VALUE)
    );
    // And an in-bounds copy still works, with the right bytes.
    let r = s.call(&Request::MemcpyHtoD {
        dst: p + 8,
        src: HostSrc::Inline(vec![1, 2, 3, 4]),
        stream: Handle::NULL,
        sync: true,
    });
    assert_eq!(r, Reply::Unit);
    let r = s.call(&Request::MemcpyDtoH {
        dst: HostDst::Staging { offset: 0 },
        src: p + 8,
        len: 4,
        stream: Handle::NULL,
        sync: true,
    });
    assert_eq!(r, Reply::Unit);
    let mut got = [0u8; 4];
    // SAFETY: the staging area of the mapped segment holds at least 4 bytes; the server finished writing them
    // before it replied.
    unsafe { std::ptr::copy_nonoverlapping(s.seg.staging_ptr(), got.as_mut_ptr(), 4) };
    assert_eq!(got, [1, 2, 3, 4]);
}

#[test]
fn a_session_cannot_touch_another_sessions_memory() {
    let mut sb = Sandbox::new();
    let sock = sb.serve("a", &[]);
    let mut a = RawSession::connect(&sock).expect("connect a");
    let mut b = RawSession::connect(&sock).expect("connect b");
    let pa = alloc(&mut a, 1 << 16);
    let mem = |dst| Request::Memset {
        dst,
        value: 0xab,
        elem_bytes: 1,
        count: 64,
        stream: Handle::NULL,
        sync: true,
    };
    assert_eq!(b.call(&mem(pa)), Reply::Err(CuError::INVALID_VALUE));
    let read = Request::MemcpyDtoH {
        dst: HostDst::Staging { offset: 0 },
        src: pa,
        len: 64,
        stream: Handle::NULL,
        sync: true,
    };
    assert_eq!(b.call(&read), Reply::Err(CuError::INVALID_VALUE));
    assert_eq!(
        b.call(&Request::MemFree { ptr: pa }),
        Reply::Err(CuError::INVALID_VALUE)
    );
    let pb = alloc(&mut b, 1 << 16);
    let dtod = Request::MemcpyDtoD {
        dst: pb,
        src: pa,
        len: 64,
        stream: Handle::NULL,
        sync: true,
    };
    assert_eq!(b.call(&dtod), Reply::Err(CuError::INVALID_VALUE));
    // The owner still can.
    assert_eq!(a.call(&mem(pa)), Reply::Unit);
}

#[test]
fn a_client_of_another_major_version_is_refused_with_both_versions() {
    let mut sb = Sandbox::new();
    let sock = sb.serve("a", &[]);
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let hello = protocol::Hello {
        major: protocol::MAJOR + 1,
        minor: 0,
        pid: std::process::id(),
        command: "old".into(),
        resume: None,
    };
    devproxy::transport::send_msg(&s, &protocol::encode(&hello), &[]).unwrap();
    let (bytes, fds) = devproxy::transport::recv_msg(&s, 1 << 20).unwrap();
    assert!(fds.is_empty());
    match protocol::decode::<protocol::HelloReply>(&bytes).unwrap() {
        protocol::HelloReply::Refused(m) => {
            assert!(m.contains(&format!("{}.", protocol::MAJOR + 1)), "{m}");
            assert!(
                m.contains(&format!("{}.{}", protocol::MAJOR, protocol::MINOR)),
                "{m}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_killed_client_frees_its_session_and_others_keep_running() {
    let mut sb = Sandbox::new();
    let sock = sb.serve("a", &[]);
    let mut survivor = RawSession::connect(&sock).expect("connect");
    let keep = alloc(&mut survivor, 1 << 20);
    // A client that allocates and is then killed without a goodbye.
    let victim_pid = {
        let mut victim = sb.spawn_under(
            &sock,
            &common::example("train"),
            &[
                "--steps",
                "100000",
                "--log-every",
                "1000",
                "--step-delay-ms",
                "5",
            ],
        );
        // Wait until the victim's session holds memory.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = sessions(&sock);
            if rows
                .iter()
                .any(|r| r.command.contains("train") && r.device_bytes > 0 && r.calls > 50)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "victim never got going: {rows:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let rows = sessions(&sock);
        let pid = rows
            .iter()
            .find(|r| r.command.contains("train"))
            .unwrap()
            .pid;
        // SAFETY: kill(2) on a pid we just looked up; SIGKILL cannot be caught.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = victim.wait();
        pid
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while sessions(&sock).iter().any(|r| r.pid == victim_pid) {
        assert!(
            Instant::now() < deadline,
            "the killed client's session was not freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its memory is back: only the survivor's allocation remains.
    match survivor.call(&Request::MemGetInfo) {
        Reply::MemInfo { free, total } => {
            assert_eq!(total - free, 1 << 20, "memory of the killed client leaked")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(survivor.call(&Request::MemFree { ptr: keep }), Reply::Unit);
}

#[test]
fn a_corrupt_ring_closes_only_that_session() {
    let mut sb = Sandbox::new();
    let sock = sb.serve("a", &[]);
    let mut good = RawSession::connect(&sock).expect("connect");
    let bad = RawSession::connect(&sock).expect("connect");
    // Scribble over the bad session's header words (ring head/tail region) with garbage.
    let fd = bad.seg.fd();
    let len = 4096 * 2;
    // SAFETY: mapping our own segment fd a second time and writing garbage into it is the point of the test; the
    // mapping is private to this block and unmapped before it ends.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let bytes = p as *mut u8;
        for i in 64..len {
            *bytes.add(i) = (i as u8).wrapping_mul(37) | 0x81;
        }
        libc::munmap(p, len);
    }
    bad.seg.wake_server();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sessions(&sock).len() > 1 {
        assert!(
            Instant::now() < deadline,
            "the corrupt session was not closed: {:?}",
            sessions(&sock)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = alloc(&mut good, 4096);
    assert_eq!(good.call(&Request::MemFree { ptr: p }), Reply::Unit);
}
