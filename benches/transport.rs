//! Transport benchmark: a plain `main` that prints a table (`cargo bench -p devproxy --bench transport`).
//!
//! A server child is forked; it receives the segment fd over a socketpair (as a real server/client pair would, the
//! other way round), pops records and replies. Each figure is printed next to the same operation done in-process
//! (a function call, a memcpy) with the ratio.
//!
//! NOTE: latency on the 2-core development VM is not representative: idle vCPUs halt, futex wake-ups of a process on
//! the other core take ~30-45 µs, and the spinning server, the client and anything else on the machine compete for two
//! cores. Run it on the real host for numbers worth quoting. `DEVPROXY_SPIN_US` changes the spin budget.

use std::hint::black_box;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use devproxy::transport::{recv_msg, send_msg, Segment, SegmentLayout};

const OP_ECHO: u8 = 0;
const OP_NOP: u8 = 1;
const OP_STAGING: u8 = 2;
const OP_QUIT: u8 = 3;
const STAGING: usize = 64 << 20;

fn server(sock: UnixStream) -> ! {
    let (_, mut fds) = recv_msg(&sock, 64).expect("server: recv segment");
    let seg = Segment::open(fds.pop().expect("server: no fd")).expect("server: open");
    let mut buf = Vec::new();
    let mut private = vec![0u8; STAGING];
    loop {
        let Some(m) = seg
            .pop(&mut buf, Duration::from_secs(30))
            .expect("server: pop")
        else {
            eprintln!("server: idle for 30 s, exiting");
            // SAFETY: _exit ends the forked child without running the parent's atexit handlers.
            unsafe { libc::_exit(1) };
        };
        match buf.first().copied() {
            Some(OP_ECHO) => seg.reply(m.seq, &buf).expect("reply"),
            Some(OP_STAGING) => {
                let len = u64::from_le_bytes(buf[1..9].try_into().unwrap()) as usize;
                let len = len.min(seg.staging_bytes() as usize);
                // SAFETY: `len ≤ staging_bytes`; the client does not touch staging while this request is in flight;
                // `private` is our own buffer of STAGING ≥ len bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(seg.staging_ptr(), private.as_mut_ptr(), len)
                };
                let sum: u64 = private[..len].iter().step_by(4096).map(|&b| b as u64).sum();
                seg.reply(m.seq, &sum.to_le_bytes()).expect("reply");
            }
            Some(OP_QUIT) => {
                seg.reply(m.seq, b"bye").expect("reply");
                // SAFETY: as above.
                unsafe { libc::_exit(0) };
            }
            _ => {}
        }
        seg.set_last_executed(m.seq);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[inline(never)]
fn local_echo(req: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(req);
}

fn row(name: &str, ours: String, local: String, ratio: f64) {
    println!("{name:<44} {ours:>16} {local:>16} {ratio:>10.1}x");
}

fn main() {
    let layout = SegmentLayout {
        staging_bytes: STAGING as u64,
        pinned_bytes: 0,
        ..SegmentLayout::default()
    };
    let seg = Segment::create(layout).expect("create segment");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    // SAFETY: the process is single-threaded here, so the child may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(ours);
        server(theirs);
    }
    drop(theirs);
    send_msg(&ours, b"segment", &[seg.fd().as_fd()]).expect("send segment");
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = move || unsafe { libc::kill(pid, 0) } == 0;
    let mut reply = Vec::new();

    println!(
        "{:<44} {:>16} {:>16} {:>11}",
        "operation", "shm, 2 procs", "in-process", "ratio"
    );

    // 1. Round trip of a small waiting request.
    let req = [OP_ECHO, 1, 2, 3, 4, 5, 6, 7];
    let n = 20_000;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 2_000 {
        let t = Instant::now();
        let s = seg.push(&req, true, &alive).expect("push");
        seg.wait_reply(s, &mut reply, &alive).expect("wait_reply");
        if i >= 2_000 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert_eq!(reply, req);
    }
    lat.sort_by(f64::total_cmp);
    let local_n = 1_000_000;
    let t = Instant::now();
    for _ in 0..local_n {
        local_echo(black_box(&req), black_box(&mut reply));
    }
    let local_ns = t.elapsed().as_secs_f64() * 1e9 / local_n as f64;
    let (med, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    row(
        "round trip, 8 B request + reply (median)",
        format!("{med:.2} us"),
        format!("{local_ns:.1} ns"),
        med * 1e3 / local_ns,
    );
    row(
        "round trip, 8 B request + reply (p99)",
        format!("{p99:.2} us"),
        format!("{local_ns:.1} ns"),
        p99 * 1e3 / local_ns,
    );

    // 2. Fire-and-forget pushes with the server draining.
    let rec = [OP_NOP; 64];
    let pushes = 1_000_000;
    let t = Instant::now();
    for _ in 0..pushes {
        seg.push(&rec, false, &alive).expect("push");
    }
    let push_ns = t.elapsed().as_secs_f64() * 1e9 / pushes as f64;
    let s = seg.push(&req, true, &alive).expect("push");
    seg.wait_reply(s, &mut reply, &alive).expect("drain");
    let t = Instant::now();
    for _ in 0..local_n {
        local_echo(black_box(&rec), black_box(&mut reply));
    }
    let local_ns = t.elapsed().as_secs_f64() * 1e9 / local_n as f64;
    row(
        "fire-and-forget push, 64 B (per push)",
        format!("{push_ns:.1} ns"),
        format!("{local_ns:.1} ns"),
        push_ns / local_ns,
    );

    // 3. Staging: copy 64 MiB in, the server copies it out.
    let src: Vec<u8> = (0..STAGING).map(|i| (i * 7) as u8).collect();
    let mut mid = vec![0u8; STAGING];
    let mut dst = vec![0u8; STAGING];
    let mut shm_t = Vec::new();
    let mut local_t = Vec::new();
    for _ in 0..8 {
        let t = Instant::now();
        // SAFETY: staging is STAGING bytes long and the server does not read it until the request below is pushed.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), seg.staging_ptr(), STAGING) };
        let mut r = vec![OP_STAGING];
        r.extend_from_slice(&(STAGING as u64).to_le_bytes());
        let s = seg.push(&r, true, &alive).expect("push");
        seg.wait_reply(s, &mut reply, &alive).expect("wait_reply");
        shm_t.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        mid.copy_from_slice(black_box(&src));
        dst.copy_from_slice(black_box(&mid));
        black_box(&dst);
        local_t.push(t.elapsed().as_secs_f64());
    }
    shm_t.sort_by(f64::total_cmp);
    local_t.sort_by(f64::total_cmp);
    let gbs = |t: f64| STAGING as f64 / t / 1e9;
    let (ours_gbs, local_gbs) = (gbs(percentile(&shm_t, 0.5)), gbs(percentile(&local_t, 0.5)));
    row(
        "staging 64 MiB in + server copy out (GB/s)",
        format!("{ours_gbs:.2} GB/s"),
        format!("{local_gbs:.2} GB/s"),
        local_gbs / ours_gbs,
    );
    println!("(ratio = how many times slower than in-process; in-process staging = two memcpys of 64 MiB)");

    let s = seg.push(&[OP_QUIT], true, &alive).expect("push");
    seg.wait_reply(s, &mut reply, &alive).expect("quit");
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}
