//! Futex wait/wake on an `AtomicU32` that may live in `MAP_SHARED` memory.
//!
//! We use the *shared* futex operations (`FUTEX_WAIT` / `FUTEX_WAKE`, not the `_PRIVATE` variants): the kernel then keys
//! the wait queue by the backing page (memfd inode + offset) instead of by the virtual address in one process, so a
//! client and a server that map the same segment at different addresses still meet on the same queue.
//!
//! The futex word carries no meaning by itself here: callers use it as an event counter next to a separate condition
//! (ring head, reply sequence) and a "waiting" flag, see the wake protocol in `ring.rs`.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Why [`wait`] returned. Callers must re-check their condition in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Woken by [`wake`] (or spuriously).
    Woken,
    /// The word no longer held `expected` when the kernel looked: an event happened before we slept.
    Changed,
    /// The timeout elapsed.
    TimedOut,
    /// A signal interrupted the wait.
    Interrupted,
}

/// Sleeps while `*word == expected`, at most `timeout` (`None`: no limit).
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> WaitOutcome {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call (it is borrowed); FUTEX_WAIT only reads it.
    // `ts_ptr` is null or points to a timespec that outlives the call. The remaining arguments are ignored by
    // FUTEX_WAIT.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if rc == 0 {
        return WaitOutcome::Woken;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => WaitOutcome::Changed,
        Some(libc::ETIMEDOUT) => WaitOutcome::TimedOut,
        Some(libc::EINTR) => WaitOutcome::Interrupted,
        // EFAULT/EINVAL cannot happen for a borrowed, aligned word; treat as a spurious wake-up (callers re-check).
        _ => WaitOutcome::Woken,
    }
}

/// Wakes up to `count` waiters sleeping on `word`; returns how many were woken.
pub fn wake(word: &AtomicU32, count: u32) -> usize {
    let count = count.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: `word` is a valid, aligned u32 (borrowed); FUTEX_WAKE does not access user memory beyond keying on it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            count,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    rc.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_times_out_and_sees_changed_value() {
        let w = AtomicU32::new(7);
        let t = Instant::now();
        assert_eq!(
            wait(&w, 7, Some(Duration::from_millis(20))),
            WaitOutcome::TimedOut
        );
        assert!(t.elapsed() >= Duration::from_millis(15));
        assert_eq!(wait(&w, 8, None), WaitOutcome::Changed);
    }

    #[test]
    fn wake_releases_a_waiter() {
        let w = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&w);
        let h = std::thread::spawn(move || {
            while w2.load(Ordering::SeqCst) == 0 {
                wait(&w2, 0, Some(Duration::from_secs(5)));
            }
        });
        std::thread::sleep(Duration::from_millis(10));
        w.store(1, Ordering::SeqCst);
        wake(&w, 1);
        h.join().unwrap();
    }
}
