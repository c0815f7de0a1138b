//! Minimal stderr logging for the shim: prefix "devproxy: ", level from `DEVPROXY_LOG` (error|warn|info|debug|trace,
//! default warn). No dependency on a logging framework: the shim lives inside someone else's process and must not
//! install global subscribers there. Nothing is logged on hot paths at the default level.

use std::fmt::Arguments;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    /// Every implemented driver call with its result (see `table::trace_call`).
    Trace = 5,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Parses a `DEVPROXY_LOG` value (unknown values mean the default, warn).
pub fn parse_level(s: Option<&str>) -> Level {
    match s.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("error") => Level::Error,
        Some("info") => Level::Info,
        Some("debug") => Level::Debug,
        Some("trace") => Level::Trace,
        _ => Level::Warn,
    }
}

/// The current level (read from the environment once).
pub fn level() -> Level {
    let l = LEVEL.load(Ordering::Relaxed);
    let l = if l == 0 {
        let l = parse_level(std::env::var("DEVPROXY_LOG").ok().as_deref()) as u8;
        LEVEL.store(l, Ordering::Relaxed);
        l
    } else {
        l
    };
    match l {
        1 => Level::Error,
        2 => Level::Warn,
        3 => Level::Info,
        4 => Level::Debug,
        _ => Level::Trace,
    }
}

pub fn enabled(l: Level) -> bool {
    l <= level()
}

fn write(args: Arguments<'_>) {
    // One write call per line so lines from threads do not interleave; errors writing stderr are ignored.
    let line = format!("devproxy: {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logged whatever the level (messages the user must see, like an unsupported function).
pub fn always(args: Arguments<'_>) {
    write(args)
}
pub fn error(args: Arguments<'_>) {
    if enabled(Level::Error) {
        write(args)
    }
}
pub fn warn(args: Arguments<'_>) {
    if enabled(Level::Warn) {
        write(args)
    }
}
pub fn info(args: Arguments<'_>) {
    if enabled(Level::Info) {
        write(args)
    }
}
pub fn debug(args: Arguments<'_>) {
    if enabled(Level::Debug) {
        write(args)
    }
}
pub fn trace(args: Arguments<'_>) {
    if enabled(Level::Trace) {
        write(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn levels_parse() {
        assert_eq!(parse_level(None), Level::Warn);
        assert_eq!(parse_level(Some("DEBUG")), Level::Debug);
        assert_eq!(parse_level(Some("error")), Level::Error);
        assert_eq!(parse_level(Some("bogus")), Level::Warn);
        assert_eq!(parse_level(Some("trace")), Level::Trace);
        assert!(Level::Debug < Level::Trace);
        assert!(Level::Error < Level::Debug);
    }
}
