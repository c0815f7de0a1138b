//! Transport between the shim (client) and the server: one shared-memory *session segment* per client process, plus a
//! Unix socket for the handshake and for passing the segment's fd.
//!
//! # Segment layout
//! ```text
//! offset 0      header page (4 KiB): identity + layout (written once by the server), then one 64-byte cache line per
//!               hot word: ring head, ring tail (+ popped seq), last pushed seq, server futex (+ waiting flag, kick),
//!               space futex (+ producer waiting flag), reply seq (+ len), reply futex (+ client waiting flag),
//!               last executed seq
//! 4 KiB         request ring (ring_bytes): records [len u32][flags u32][seq u64][payload, padded to 8]
//! +ring         reply slot (reply_bytes): the payload of the latest reply
//! +reply        staging (staging_bytes): bulk copies (host<->device); page-locked by the real backend
//! +staging      pinned area (pinned_bytes): pinned host memory the application allocates (cuMemHostAlloc)
//! ```
//! Every region starts on a page boundary, so staging and the pinned area can be registered with cuMemHostRegister.
//! The memfd is sparse and its size is sealed (see [`shm`]): untouched pages cost nothing and the client cannot shrink
//! it under the server.
//!
//! Head and tail are monotonic byte counters (`pos % ring_bytes` is the offset); a record that does not fit before
//! the end of the ring is preceded by a wrap marker (flags = WRAP) and written at offset 0. A record's seq is
//! 1, 2, 3, ... and the last one pushed is kept in the header, so numbering continues across a re-attach.
//!
//! # Wake protocol (no lost wake-ups)
//! Each sleeper has a futex word (an event counter) and a "waiting" flag; each condition (ring head, ring tail, reply
//! seq) is a separate atomic. The sleeper spins briefly on the condition (`DEVPROXY_SPIN_US`, default 30 µs; 0 turns
//! spinning off), then: reads the futex word `v`, stores `waiting = 1`, re-checks the condition, and only then calls
//! `FUTEX_WAIT(word, v)`. The waker publishes the condition, then loads `waiting`; if set, it increments the word and
//! calls `FUTEX_WAKE`. Both sides use SeqCst for the store-then-load pair (Dekker): either the sleeper's re-check sees
//! the new condition, or the waker sees `waiting = 1`; in the latter case the word changes, so a `FUTEX_WAIT` that has
//! not yet started returns at once (`EAGAIN`) and one that has is woken. The common case costs no syscall: a waker that
//! finds nobody waiting only does one load. Sleeps are bounded (50 ms on the client side) so that `alive()` is polled
//! and a dead peer gives [`TransportError::Disconnected`] instead of a hang.
//!
//! # Why a single producer
//! The shim serialises device calls with one process-wide lock, because CUDA semantics need one total order of calls
//! per process anyway (the server executes the ring in order). A single-producer single-consumer ring then needs no
//! CAS on the hot path: the producer owns `head`, the consumer owns `tail`. Misuse (two threads pushing) is still
//! memory safe: both ends take a process-local mutex, and the consumer validates every length and flag it reads, so a
//! hostile or buggy client can at worst make `pop` return [`TransportError::Corrupt`].

pub mod futex;
pub mod ring;
pub mod shm;
pub mod socket;

pub use ring::{RecordMeta, Segment, SegmentLayout};
pub use socket::{bind_private, peer_credentials, recv_msg, send_msg};

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A system call failed.
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The fd does not hold a devproxy segment.
    #[error("the fd is not a devproxy session segment (magic {found:#018x}): pass the fd the server sent at the handshake")]
    NotASegment { found: u64 },
    /// The segment was created by a build with another protocol major version.
    #[error("the segment speaks protocol {theirs_major}.{theirs_minor} but this build speaks {ours_major}.{ours_minor}: run the shim and the server from the same devproxy release")]
    VersionMismatch {
        ours_major: u16,
        ours_minor: u16,
        theirs_major: u16,
        theirs_minor: u16,
    },
    /// Sizes in the header or in the requested layout are unusable.
    #[error("invalid segment layout: {0}")]
    BadLayout(String),
    /// A payload is larger than a ring record may be.
    #[error("record of {len} bytes exceeds the ring's limit of {max} bytes: move bulk data through the staging area")]
    RecordTooLarge { len: usize, max: usize },
    /// A reply is larger than the reply slot.
    #[error("reply of {len} bytes exceeds the reply slot of {max} bytes: return bulk data through the staging area")]
    ReplyTooLarge { len: usize, max: u64 },
    /// The shared ring holds values no correct peer writes.
    #[error("the shared ring is corrupt ({0}): the peer wrote garbage into the segment; drop this session")]
    Corrupt(String),
    /// `alive()` reported the peer gone while waiting.
    #[error("the peer went away while we waited on the segment: reconnect to a server or restart the session")]
    Disconnected,
    /// The caller broke the calling contract (e.g. waited for a sequence number never pushed).
    #[error("transport misuse: {0}")]
    Misuse(String),
}
