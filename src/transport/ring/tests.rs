use super::*;
use crate::transport::socket::{recv_msg, send_msg};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn small() -> SegmentLayout {
    SegmentLayout {
        ring_bytes: 4096,
        reply_bytes: 4096,
        staging_bytes: 8192,
        pinned_bytes: 4096,
    }
}

fn yes() -> bool {
    true
}

fn pattern(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (seq.wrapping_mul(31) as usize + j) as u8)
        .collect()
}

fn reopen(seg: &Segment) -> Result<Segment, TransportError> {
    Segment::open(seg.fd().try_clone_to_owned().unwrap())
}

#[test]
fn create_open_layout_and_pointers() {
    let seg = Segment::create(small()).unwrap();
    assert_eq!(seg.total_bytes(), 4096 * 6);
    let other = reopen(&seg).unwrap();
    assert_eq!(other.layout(), small());
    assert_eq!(seg.staging_ptr() as usize % 4096, 0);
    assert_eq!(seg.pinned_ptr() as usize - seg.staging_ptr() as usize, 8192);
    // Staging is shared between the two mappings.
    // SAFETY: both pointers are valid for staging_bytes; nothing else touches them.
    unsafe {
        seg.staging_ptr().add(10).write_volatile(0x77);
        assert_eq!(other.staging_ptr().add(10).read_volatile(), 0x77);
    }
    assert_eq!(seg.max_record_bytes(), 1024);
}

#[test]
fn default_layout_is_sparse_and_opens() {
    let seg = Segment::create(SegmentLayout::default()).unwrap();
    assert!(seg.total_bytes() > 16 << 30);
    let other = reopen(&seg).unwrap();
    assert_eq!(other.layout(), SegmentLayout::default());
    let s = other.push(b"x", false, &yes).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        seg.pop(&mut out, Duration::from_secs(1))
            .unwrap()
            .unwrap()
            .seq,
        s
    );
}

#[test]
fn bad_layouts_are_refused() {
    for l in [
        SegmentLayout {
            ring_bytes: 1000,
            ..small()
        },
        SegmentLayout {
            ring_bytes: 0,
            ..small()
        },
        SegmentLayout {
            reply_bytes: 0,
            ..small()
        },
        SegmentLayout {
            staging_bytes: 5,
            ..small()
        },
        SegmentLayout {
            pinned_bytes: u64::MAX - 4095,
            ..small()
        },
    ] {
        assert!(
            matches!(Segment::create(l), Err(TransportError::BadLayout(_))),
            "{l:?}"
        );
    }
}

#[test]
fn sequence_numbers_pending_and_last_executed() {
    let seg = Segment::create(small()).unwrap();
    for i in 1..=5u64 {
        assert_eq!(seg.push(&[i as u8; 3], false, &yes).unwrap(), i);
    }
    assert_eq!(seg.pending_records(), 5);
    let mut out = Vec::new();
    let m = seg.pop(&mut out, Duration::ZERO).unwrap().unwrap();
    assert_eq!(
        (m.seq, m.wants_reply, out.as_slice()),
        (1, false, &[1u8, 1, 1][..])
    );
    assert_eq!(seg.pending_records(), 4);
    seg.set_last_executed(1);
    // Numbering and the consumer position continue through another mapping (re-attach).
    let again = reopen(&seg).unwrap();
    assert_eq!(again.last_executed(), 1);
    assert_eq!(again.pop(&mut out, Duration::ZERO).unwrap().unwrap().seq, 2);
    assert_eq!(again.push(b"", true, &yes).unwrap(), 6);
    for s in 3..=6 {
        let m = again.pop(&mut out, Duration::ZERO).unwrap().unwrap();
        assert_eq!(m.seq, s);
        assert_eq!(m.wants_reply, s == 6);
    }
    assert_eq!(again.pending_records(), 0);
    assert_eq!(again.pop(&mut out, Duration::from_millis(5)).unwrap(), None);
}

#[test]
fn max_record_and_too_large() {
    let seg = Segment::create(small()).unwrap();
    let max = seg.max_record_bytes();
    let p = pattern(1, max);
    seg.push(&p, false, &yes).unwrap();
    let e = seg.push(&vec![0; max + 1], false, &yes).unwrap_err();
    assert!(matches!(e, TransportError::RecordTooLarge { .. }));
    assert!(e.to_string().contains("staging"));
    let mut out = Vec::new();
    seg.pop(&mut out, Duration::ZERO).unwrap().unwrap();
    assert_eq!(out, p);
    let e = seg.reply(1, &[0; 4097]).unwrap_err();
    assert!(matches!(e, TransportError::ReplyTooLarge { .. }));
    seg.reply(1, &[9; 4096]).unwrap();
    seg.wait_reply(1, &mut out, &yes).unwrap();
    assert_eq!(out, vec![9; 4096]);
}

#[test]
fn threads_wraparound_odd_sizes_and_replies() {
    let seg = Arc::new(Segment::create(small()).unwrap());
    let server = {
        let seg = Arc::clone(&seg);
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut n = 0u64;
            loop {
                let Some(m) = seg.pop(&mut out, Duration::from_secs(10)).unwrap() else {
                    panic!("server timed out after {n} records");
                };
                n += 1;
                assert_eq!(m.seq, n);
                if out.is_empty() && m.wants_reply {
                    seg.reply(m.seq, &n.to_le_bytes()).unwrap();
                    return n;
                }
                assert_eq!(out, pattern(m.seq, out.len()), "record {}", m.seq);
                if m.wants_reply {
                    let r: Vec<u8> = out.iter().map(|b| b ^ 0x5a).collect();
                    seg.reply(m.seq, &r).unwrap();
                }
            }
        })
    };
    let max = seg.max_record_bytes();
    let mut reply = Vec::new();
    let mut seq = 0;
    for i in 0..20_000usize {
        // Odd sizes, including 1, max and everything between, so wraps land at every offset.
        let len = 1 + (i * 37 + i / 7) % max;
        let wants = i % 5 == 0;
        seq = seg.push(&pattern(seq + 1, len), wants, &yes).unwrap();
        if wants {
            seg.wait_reply(seq, &mut reply, &yes).unwrap();
            let expect: Vec<u8> = pattern(seq, len).iter().map(|b| b ^ 0x5a).collect();
            assert_eq!(reply, expect);
        }
    }
    let last = seg.push(b"", true, &yes).unwrap();
    seg.wait_reply(last, &mut reply, &yes).unwrap();
    assert_eq!(reply, last.to_le_bytes());
    assert_eq!(server.join().unwrap(), 20_001);
}

#[test]
fn full_ring_blocks_producer_until_consumer_frees_space() {
    let seg = Arc::new(Segment::create(small()).unwrap());
    let rec = vec![1u8; 1000]; // 1016 bytes per record: 4 fill the 4096-byte ring
    for _ in 0..4 {
        seg.push(&rec, false, &yes).unwrap();
    }
    let done = Arc::new(AtomicBool::new(false));
    let t = {
        let (seg, done) = (Arc::clone(&seg), Arc::clone(&done));
        std::thread::spawn(move || {
            let s = seg.push(&[2u8; 1000], false, &yes).unwrap();
            done.store(true, Ordering::SeqCst);
            s
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "push must block while the ring is full"
    );
    let mut out = Vec::new();
    seg.pop(&mut out, Duration::ZERO).unwrap().unwrap();
    assert_eq!(t.join().unwrap(), 5);
    for s in 2..=5 {
        assert_eq!(seg.pop(&mut out, Duration::ZERO).unwrap().unwrap().seq, s);
    }
    assert_eq!(out, vec![2u8; 1000]);
}

#[test]
fn dead_peer_gives_disconnected_not_a_hang() {
    let seg = Segment::create(small()).unwrap();
    let dead = || false;
    let t = Instant::now();
    let s = seg.push(b"q", true, &dead).unwrap(); // space available: push succeeds
    let mut out = Vec::new();
    assert!(matches!(
        seg.wait_reply(s, &mut out, &dead),
        Err(TransportError::Disconnected)
    ));
    for _ in 0..4 {
        seg.push(&[0; 1000], false, &yes).unwrap();
    }
    assert!(matches!(
        seg.push(&[0; 1000], false, &dead),
        Err(TransportError::Disconnected)
    ));
    assert!(t.elapsed() < Duration::from_secs(2));
    // Waiting for a record never pushed is refused at once.
    assert!(matches!(
        seg.wait_reply(99, &mut out, &yes),
        Err(TransportError::Misuse(_))
    ));
    // alive() turning false later is noticed within a poll period.
    let t = Instant::now();
    let alive = move || t.elapsed() < Duration::from_millis(120);
    assert!(matches!(
        seg.wait_reply(s, &mut out, &alive),
        Err(TransportError::Disconnected)
    ));
    assert!(t.elapsed() < Duration::from_millis(600));
}

#[test]
fn pop_times_out_and_wake_server_interrupts() {
    let seg = Arc::new(Segment::create(small()).unwrap());
    let mut out = Vec::new();
    let t = Instant::now();
    assert_eq!(seg.pop(&mut out, Duration::from_millis(30)).unwrap(), None);
    assert!(t.elapsed() >= Duration::from_millis(25));
    let waker = {
        let seg = Arc::clone(&seg);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            seg.wake_server();
        })
    };
    let t = Instant::now();
    assert_eq!(seg.pop(&mut out, Duration::from_secs(10)).unwrap(), None);
    assert!(t.elapsed() < Duration::from_secs(5));
    waker.join().unwrap();
    // Sticky: a wake before pop ends the next pop at once, then normal service resumes.
    seg.wake_server();
    seg.push(b"a", false, &yes).unwrap();
    assert_eq!(seg.pop(&mut out, Duration::from_secs(10)).unwrap(), None);
    assert_eq!(seg.pop(&mut out, Duration::ZERO).unwrap().unwrap().seq, 1);
    // A push wakes a sleeping pop.
    let pusher = {
        let seg = Arc::clone(&seg);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            seg.push(b"b", false, &yes).unwrap();
        })
    };
    let t = Instant::now();
    assert_eq!(
        seg.pop(&mut out, Duration::from_secs(10))
            .unwrap()
            .unwrap()
            .seq,
        2
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    pusher.join().unwrap();
}

fn patch_u16(seg: &Segment, off: usize, v: u16) {
    // SAFETY: `off` is a u16 field of the header inside the live mapping; test-only, no concurrent access.
    unsafe { std::ptr::write_volatile(seg.region.as_ptr().add(off).cast::<u16>(), v) }
}

fn patch_u64(seg: &Segment, off: usize, v: u64) {
    // SAFETY: `off` is an 8-aligned offset inside the live mapping; test-only writes of garbage.
    unsafe { std::ptr::write_volatile(seg.region.as_ptr().add(off).cast::<u64>(), v) }
}

#[test]
fn version_mismatch_names_both_versions() {
    let seg = Segment::create(small()).unwrap();
    patch_u16(&seg, offset_of!(Header, major), MAJOR + 6);
    patch_u16(&seg, offset_of!(Header, minor), 3);
    let e = reopen(&seg).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TransportError::VersionMismatch { .. }));
    assert!(msg.contains(&format!("{}.3", MAJOR + 6)), "{msg}");
    assert!(msg.contains(&format!("{MAJOR}.{MINOR}")), "{msg}");
}

#[test]
fn bad_magic_and_bad_sizes_are_refused() {
    let seg = Segment::create(small()).unwrap();
    patch_u64(&seg, offset_of!(Header, magic), 0x1234);
    assert!(matches!(
        reopen(&seg),
        Err(TransportError::NotASegment { .. })
    ));
    patch_u64(&seg, offset_of!(Header, magic), MAGIC);
    patch_u64(&seg, offset_of!(Header, staging_bytes), 1 << 40);
    assert!(matches!(reopen(&seg), Err(TransportError::BadLayout(_))));
    patch_u64(&seg, offset_of!(Header, staging_bytes), 8192);
    assert!(reopen(&seg).is_ok());
    // A plain (unsealed) memfd or some other file is refused too.
    let f = tempfile::tempfile().unwrap();
    assert!(Segment::open(OwnedFd::from(f)).is_err());
}

/// xorshift64*: deterministic garbage.
fn rng(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn hostile_ring_gives_errors_not_ub() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::new();
    let mut errors = 0;
    for round in 0..2000 {
        let seg = Segment::create(small()).unwrap();
        // Some valid traffic first so head/tail/seq are not at zero.
        for i in 0..(round % 7) {
            seg.push(&[i as u8; 100], false, &yes).unwrap();
        }
        for _ in 0..(round % 3) {
            let _ = seg.pop(&mut out, Duration::ZERO).unwrap();
        }
        let ring = seg.ring_ptr();
        let n_words = (rng(&mut s) % 64) as usize;
        for _ in 0..n_words {
            let off = (rng(&mut s) % 512) as usize * 8;
            let v = match rng(&mut s) % 4 {
                0 => rng(&mut s),
                1 => rng(&mut s) & 0x0000_0007_0000_ffff, // plausible len, random flags
                2 => (u64::from(FLAG_RECORD) << 32) | (rng(&mut s) & 0xffff_ffff), // valid flag, wild len
                _ => u64::from(FLAG_WRAP) << 32,
            };
            // SAFETY: `off + 8 ≤ 4096 = ring_bytes`, inside the ring region; test-only.
            unsafe { std::ptr::write_volatile(ring.add(off).cast::<u64>(), v) };
        }
        let tail = hdr_u64!(seg, tail).load(Ordering::Relaxed);
        match rng(&mut s) % 4 {
            0 => patch_u64(&seg, offset_of!(Header, head), rng(&mut s)),
            1 => patch_u64(
                &seg,
                offset_of!(Header, head),
                tail + (rng(&mut s) % 600) * 8,
            ),
            2 => patch_u64(&seg, offset_of!(Header, tail), rng(&mut s) & !7),
            _ => patch_u64(&seg, offset_of!(Header, head), tail + 4096),
        }
        for _ in 0..8 {
            match seg.pop(&mut out, Duration::ZERO) {
                Ok(Some(_)) => assert!(out.len() <= seg.max_record_bytes()),
                Ok(None) => break,
                Err(e) => {
                    assert!(matches!(e, TransportError::Corrupt(_)), "{e}");
                    errors += 1;
                    break;
                }
            }
        }
        // The producer side does not crash either.
        let _ = seg.push(b"after", false, &|| false);
    }
    assert!(errors > 1000, "only {errors} corrupt rings detected");
}

#[test]
fn specific_garbage_is_reported() {
    let mut out = Vec::new();
    let cases: [(u64, u64); 4] = [
        (0xffff_ffff | (u64::from(FLAG_RECORD) << 32), 64), // huge len
        (8 | (0x80u64 << 32), 64),                          // unknown flag
        (8 | (u64::from(FLAG_RECORD) << 32), 8),            // record longer than what head covers
        (u64::from(FLAG_WRAP) << 32, 8),                    // wrap marker past head
    ];
    for (word, head) in cases {
        let seg = Segment::create(small()).unwrap();
        // SAFETY: offset 0 of the ring region; test-only.
        unsafe { std::ptr::write_volatile(seg.ring_ptr().cast::<u64>(), word) };
        patch_u64(&seg, offset_of!(Header, head), head);
        let e = seg.pop(&mut out, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
    // Out-of-sequence record.
    let seg = Segment::create(small()).unwrap();
    seg.push(b"abc", false, &yes).unwrap();
    patch_u64(&seg, 4096 + 8, 42);
    assert!(matches!(
        seg.pop(&mut out, Duration::ZERO),
        Err(TransportError::Corrupt(_))
    ));
}

// ------------------------------------------------------------------------------------------------ cross-process

const CHILD_ENV: &str = "DEVPROXY_TRANSPORT_ECHO_FD";
const CHILD_TEST: &str = "transport::ring::tests::echo_child_process";

/// Not a test of its own: the body of the child process spawned by `cross_process_round_trips` (it re-executes this
/// test binary with only this test selected). Without the env variable it does nothing.
#[test]
fn echo_child_process() {
    let Ok(fd) = std::env::var(CHILD_ENV) else {
        return;
    };
    let raw: i32 = fd.parse().unwrap();
    // SAFETY: the parent passed us this inherited socket fd; nothing else in this process owns it.
    let sock = unsafe { UnixStream::from_raw_fd(raw) };
    let (hello, mut fds) = recv_msg(&sock, 64).unwrap();
    assert_eq!(hello, b"segment");
    let seg = Segment::open(fds.pop().unwrap()).unwrap();
    let mut out = Vec::new();
    let (mut count, mut bad) = (0u64, 0u64);
    loop {
        let Some(m) = seg.pop(&mut out, Duration::from_secs(20)).unwrap() else {
            panic!("child: no record for 20 s");
        };
        count += 1;
        if out.is_empty() && m.wants_reply {
            let mut r = count.to_le_bytes().to_vec();
            r.extend_from_slice(&bad.to_le_bytes());
            seg.reply(m.seq, &r).unwrap();
            seg.set_last_executed(m.seq);
            return;
        }
        if out != pattern(m.seq, out.len()) {
            bad += 1;
        }
        if m.wants_reply {
            let r: Vec<u8> = out.iter().rev().copied().collect();
            seg.reply(m.seq, &r).unwrap();
        }
        seg.set_last_executed(m.seq);
    }
}

#[test]
fn cross_process_round_trips() {
    use std::os::unix::process::CommandExt;
    let seg = Segment::create(SegmentLayout {
        ring_bytes: 64 << 10,
        ..small()
    })
    .unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, raw.to_string())
        .stdout(std::process::Stdio::null());
    // SAFETY: the closure runs between fork and exec and only calls fcntl (async-signal-safe) to let the child
    // inherit its socket end.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = parking_lot::Mutex::new(cmd.spawn().unwrap());
    drop(theirs);
    send_msg(&ours, b"segment", &[seg.fd().as_fd()]).unwrap();
    let alive = || matches!(child.lock().try_wait(), Ok(None));
    let mut reply = Vec::new();
    let mut round_trips = 0;
    for i in 0..30_000usize {
        let len = (i * 13) % 700;
        let len = if len == 0 { 1 } else { len };
        let wants = i % 3 == 0;
        let seq = seg
            .push(&pattern(i as u64 + 1, len), wants, &alive)
            .unwrap();
        assert_eq!(seq, i as u64 + 1);
        if wants {
            seg.wait_reply(seq, &mut reply, &alive).unwrap();
            let expect: Vec<u8> = pattern(seq, len).into_iter().rev().collect();
            assert_eq!(reply, expect, "reply to {seq}");
            round_trips += 1;
        }
    }
    assert_eq!(round_trips, 10_000);
    let last = seg.push(b"", true, &alive).unwrap();
    seg.wait_reply(last, &mut reply, &alive).unwrap();
    assert_eq!(&reply[0..8], &30_001u64.to_le_bytes());
    assert_eq!(
        &reply[8..16],
        &0u64.to_le_bytes(),
        "child saw corrupted payloads"
    );
    let status = child.lock().wait().unwrap();
    assert!(status.success());
    assert_eq!(seg.last_executed(), last);
}

#[test]
fn segment_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Segment>();
}

#[test]
fn error_messages_say_what_to_do() {
    let e = TransportError::Disconnected.to_string();
    assert!(e.contains("reconnect"));
}
