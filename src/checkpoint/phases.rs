//! Where an operation's time went, for its summary line: `start` on the thread that runs a checkpoint, restore,
//! migration or suspension, `mark` at the end of each phase (on that thread), `take` for the summary.
//!
//! Why: the figures that matter (GB/s over the pause, restore time) hide several steps whose costs differ by host
//! (page faults of fresh guest memory, driver allocation, the copies themselves); users benchmarking checkpoint
//! overhead and we tuning it need to see which one dominates without a profiler. A thread-local keeps the shared
//! image code free of a timer argument; marks on a thread that did not `start` are ignored.

use std::cell::RefCell;
use std::time::Instant;

/// The last mark's time and the phases so far.
type Recording = Option<(Instant, Vec<(&'static str, f64)>)>;

thread_local! {
    static REC: RefCell<Recording> = const { RefCell::new(None) };
}

/// Starts recording on this thread (dropping anything recorded before).
pub fn start() {
    REC.with(|r| *r.borrow_mut() = Some((Instant::now(), Vec::new())));
}

/// Ends phase `name`: the time since the last mark (or `start`). Repeated names add up.
pub fn mark(name: &'static str) {
    REC.with(|r| {
        if let Some((last, v)) = r.borrow_mut().as_mut() {
            let s = last.elapsed().as_secs_f64();
            *last = Instant::now();
            match v.iter_mut().find(|(n, _)| *n == name) {
                Some(p) => p.1 += s,
                None => v.push((name, s)),
            }
        }
    });
}

/// Adds `seconds` to phase `name` without moving the mark (time measured elsewhere, e.g. on another thread).
pub fn add(name: &'static str, seconds: f64) {
    REC.with(|r| {
        if let Some((_, v)) = r.borrow_mut().as_mut() {
            match v.iter_mut().find(|(n, _)| *n == name) {
                Some(p) => p.1 += seconds,
                None => v.push((name, seconds)),
            }
        }
    });
}

/// The phases recorded on this thread since `start`, in order; recording stops.
pub fn take() -> Vec<(String, f64)> {
    REC.with(|r| r.borrow_mut().take())
        .map(|(_, v)| v.into_iter().map(|(n, s)| (n.to_string(), s)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_add_up_in_order_and_only_after_start() {
        mark("ignored");
        assert!(take().is_empty(), "nothing is recorded before start");
        start();
        std::thread::sleep(std::time::Duration::from_millis(5));
        mark("a");
        mark("b");
        std::thread::sleep(std::time::Duration::from_millis(5));
        mark("a");
        add("c", 1.5);
        let p = take();
        let names: Vec<&str> = p.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(p[0].1 >= 0.009, "a is the sum of both of its marks: {p:?}");
        assert_eq!(p[2].1, 1.5);
        assert!(take().is_empty(), "take ends the recording");
    }
}
