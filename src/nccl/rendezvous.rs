//! How the restored ranks of a job agree on new unique ids for their communicators.
//!
//! A communicator of several ranks cannot be rebuilt from one rank's image: every rank must join it again, together,
//! under a unique id they all know. The old id is useless after a restore: real NCCL's names a bootstrap root (a
//! thread of a server that no longer exists), the emulated device's names a hub that died with its server. So at
//! restore, the server restoring a communicator's rank 0 makes a new id (`ncclGetUniqueId` on the cuda backend, a new
//! hub on the emulated device) and publishes it in the job image's directory; the other ranks' servers wait for it
//! there, then all join, in one order (by old id) so that ranks with several communicators cannot wait on each other
//! crosswise. One path for both backends: CI's emulated multi-rank restores exercise what real NCCL ranks do.
//!
//! Why files: the ranks of a job may be restored on several machines (`devproxy restore DIR --ranks R,...` on each),
//! and the one thing they share is the job image, so a file next to it works wherever the image was readable. Each
//! restore *attempt* has a name, part of the file name, so a second restore of the same image never reads the
//! first one's id: `devproxy restore DIR` gives its per-socket servers a fresh one; separate `--ranks` commands
//! share one through `DEVPROXY_RESTORE_ATTEMPT` (default `default`, whose file rank 0 deletes once its real
//! communicator is up, which NCCL only returns once every rank joined).

use super::state::CommImage;
use super::UNIQUE_ID_BYTES;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Names the restore attempt (see the module docs).
pub const ATTEMPT_ENV: &str = "DEVPROXY_RESTORE_ATTEMPT";
/// How long a rank waits for rank 0's id, in seconds (default 120).
pub const TIMEOUT_ENV: &str = "DEVPROXY_NCCL_RENDEZVOUS_TIMEOUT";
/// Another directory for the exchange than the job image's (one all restore servers can write, e.g. where the
/// image is read-only).
pub const DIR_ENV: &str = "DEVPROXY_RENDEZVOUS_DIR";
const HEADER: &str = "devproxy nccl rendezvous 1";

/// Where and under which attempt name the ranks of one restore exchange ids.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    dir: PathBuf,
    attempt: String,
    timeout: Duration,
}

impl Rendezvous {
    /// Ids are exchanged in `dir` under `attempt` (reduced to letters, digits, `-` and `_`).
    pub fn new(dir: &Path, attempt: &str, timeout: Duration) -> Rendezvous {
        let mut attempt: String = attempt
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(64)
            .collect();
        if attempt.is_empty() {
            attempt = "default".into();
        }
        Rendezvous {
            dir: dir.to_path_buf(),
            attempt,
            timeout,
        }
    }

    /// For restoring the rank image in `image_dir` (`JOB/rank-R`, or its `image.devproxy`): the job's directory when
    /// the parent holds a job manifest, else the image's own (or `DEVPROXY_RENDEZVOUS_DIR`); the attempt from
    /// `attempt` or `DEVPROXY_RESTORE_ATTEMPT`.
    pub fn for_image(image_dir: &Path, attempt: Option<&str>) -> Rendezvous {
        let dir = if image_dir.is_file() {
            image_dir.parent().unwrap_or(Path::new("."))
        } else {
            image_dir
        };
        let dir = match dir.parent() {
            Some(job) if super::restore::is_job_dir(job) => job,
            _ => dir,
        };
        Rendezvous::for_job(dir, attempt)
    }

    /// For restoring the ranks of the job image `dir` (see [`Rendezvous::for_image`]).
    pub fn for_job(dir: &Path, attempt: Option<&str>) -> Rendezvous {
        let over = std::env::var_os(DIR_ENV).map(PathBuf::from);
        let dir = over.as_deref().unwrap_or(dir);
        let env = std::env::var(ATTEMPT_ENV).ok();
        let attempt = attempt.or(env.as_deref()).unwrap_or("default");
        let secs = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(120.0);
        Rendezvous::new(dir, attempt, Duration::from_secs_f64(secs))
    }

    /// A fresh attempt name (time and pid), for a command that restores all ranks.
    pub fn fresh_attempt() -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}-{}-{}",
            t.as_secs(),
            t.subsec_micros(),
            std::process::id()
        )
    }

    pub fn attempt(&self) -> &str {
        &self.attempt
    }

    /// The file that carries communicator `c`'s new id: named by a hash of its old id (the same on every rank) and
    /// the attempt.
    pub fn path(&self, c: &CommImage) -> PathBuf {
        self.dir.join(format!(
            ".nccl-{:08x}-{}.uid",
            crc32fast::hash(&c.id),
            self.attempt
        ))
    }

    /// Rank 0: publishes `id` for the other ranks of `c` (temporary name, then rename, so a reader never sees half).
    pub fn publish(&self, c: &CommImage, id: &[u8; UNIQUE_ID_BYTES]) -> Result<(), String> {
        let p = self.path(c);
        let tmp = p.with_extension(format!("tmp-{}", std::process::id()));
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!("{HEADER}\nattempt {}\nid {hex}\n", self.attempt);
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &p))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!(
                    "cannot publish the new unique id in {}: {e} (the job image's directory must be writable \
                     during a restore, or name another one all restore servers can reach in {DIR_ENV})",
                    p.display()
                )
            })
    }

    /// Ranks other than 0: waits for rank 0's id of `c`, at most the timeout; for one other than `not` (an id that
    /// did not work: a stale file of an earlier attempt of the same name, which rank 0 will replace).
    pub fn fetch(
        &self,
        c: &CommImage,
        not: Option<&[u8; UNIQUE_ID_BYTES]>,
    ) -> Result<[u8; UNIQUE_ID_BYTES], String> {
        let p = self.path(c);
        let t0 = Instant::now();
        let mut delay = Duration::from_millis(5);
        let mut said = false;
        loop {
            if let Ok(text) = std::fs::read_to_string(&p) {
                match self.parse(&text) {
                    Some(id) if Some(&id) != not => return Ok(id),
                    _ => {}
                }
            }
            if t0.elapsed() >= self.timeout {
                return Err(format!(
                    "rank {}/{} of job {}: rank 0 did not publish the communicator's new unique id in {} within \
                     {:.0} s; restore rank 0 too, in the same attempt (`devproxy restore` of the whole job does; \
                     separate `--ranks` restores need the same {ATTEMPT_ENV}), or raise {TIMEOUT_ENV}",
                    c.rank,
                    c.nranks,
                    c.job(),
                    p.display(),
                    self.timeout.as_secs_f64()
                ));
            }
            if !said && t0.elapsed() >= Duration::from_secs(3) {
                said = true;
                tracing::info!(
                    "rank {}/{} of job {}: waiting for rank 0's server to publish the communicator's new unique id \
                     in {} (at most {:.0} s)",
                    c.rank,
                    c.nranks,
                    c.job(),
                    p.display(),
                    self.timeout.as_secs_f64()
                );
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// Rank 0, once every rank has joined: the file is no longer needed.
    pub fn withdraw(&self, c: &CommImage) {
        let _ = std::fs::remove_file(self.path(c));
    }

    /// Removes every file of this attempt (the restore command, when it ends).
    pub fn clean(&self) {
        let suffix = format!("-{}.uid", self.attempt);
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(".nccl-") && n.ends_with(&suffix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn parse(&self, text: &str) -> Option<[u8; UNIQUE_ID_BYTES]> {
        let mut lines = text.lines();
        if lines.next()? != HEADER || lines.next()? != format!("attempt {}", self.attempt) {
            return None;
        }
        let hex = lines.next()?.strip_prefix("id ")?;
        if hex.len() != 2 * UNIQUE_ID_BYTES {
            return None;
        }
        let mut id = [0u8; UNIQUE_ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(id)
    }
}

/// The order in which a restored rank rebuilds its communicators: by old id (the same on every rank of one), so two
/// ranks sharing several communicators join them in the same order and never wait on each other crosswise.
pub fn join_order(comms: &[CommImage]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..comms.len()).collect();
    order.sort_by(|&a, &b| (&comms[a].id, comms[a].handle).cmp(&(&comms[b].id, comms[b].handle)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(id: u8, rank: i32, nranks: i32, handle: u64) -> CommImage {
        CommImage {
            handle,
            id: vec![id; UNIQUE_ID_BYTES],
            rank,
            nranks,
            issued: 7,
            p2p: Vec::new(),
        }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("devproxy-rdv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn ranks_waiting_before_rank_0_publishes_get_its_id() {
        let d = tmpdir("wait");
        let rdv = Rendezvous::new(&d, "a1", Duration::from_secs(10));
        let waiters: Vec<_> = (1..4)
            .map(|r| {
                let rdv = rdv.clone();
                std::thread::spawn(move || rdv.fetch(&comm(9, r, 4, 1), None))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let mut id = [0u8; UNIQUE_ID_BYTES];
        id.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        rdv.publish(&comm(9, 0, 4, 1), &id).unwrap();
        for w in waiters {
            assert_eq!(w.join().unwrap().unwrap(), id);
        }
        rdv.withdraw(&comm(9, 0, 4, 1));
        assert!(!rdv.path(&comm(9, 0, 4, 1)).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn another_attempts_or_another_communicators_id_is_never_taken() {
        let d = tmpdir("attempt");
        let old = Rendezvous::new(&d, "first", Duration::from_secs(10));
        let new = Rendezvous::new(&d, "second", Duration::from_millis(150));
        old.publish(&comm(3, 0, 2, 1), &[1; UNIQUE_ID_BYTES])
            .unwrap();
        let err = new.fetch(&comm(3, 1, 2, 1), None).unwrap_err();
        assert!(
            err.contains("rank 0 did not publish") && err.contains(ATTEMPT_ENV),
            "{err}"
        );
        // The same attempt, another communicator (another old id): not taken either.
        let same = Rendezvous::new(&d, "first", Duration::from_millis(150));
        assert!(same.fetch(&comm(4, 1, 2, 1), None).is_err());
        assert_eq!(
            same.fetch(&comm(3, 1, 2, 1), None).unwrap(),
            [1; UNIQUE_ID_BYTES]
        );
        // A file renamed to another attempt's name (its content says which attempt made it) is not taken.
        std::fs::copy(old.path(&comm(3, 0, 2, 1)), new.path(&comm(3, 0, 2, 1))).unwrap();
        assert!(new.fetch(&comm(3, 1, 2, 1), None).is_err());
        // An id that did not work is passed over until rank 0 replaces it.
        let stale = [1; UNIQUE_ID_BYTES];
        assert!(same.fetch(&comm(3, 1, 2, 1), Some(&stale)).is_err());
        let later = {
            let same = same.clone();
            std::thread::spawn(move || same.fetch(&comm(3, 1, 2, 1), Some(&stale)))
        };
        std::thread::sleep(Duration::from_millis(30));
        same.publish(&comm(3, 0, 2, 1), &[2; UNIQUE_ID_BYTES])
            .unwrap();
        assert_eq!(later.join().unwrap().unwrap(), [2; UNIQUE_ID_BYTES]);
        old.clean();
        assert!(!old.path(&comm(3, 0, 2, 1)).exists());
        assert!(new.path(&comm(3, 0, 2, 1)).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn attempt_names_are_reduced_to_safe_characters() {
        let d = Path::new("/tmp");
        assert_eq!(Rendezvous::new(d, "../x y", Duration::ZERO).attempt(), "xy");
        assert_eq!(
            Rendezvous::new(d, "//", Duration::ZERO).attempt(),
            "default"
        );
        let a = Rendezvous::fresh_attempt();
        assert_eq!(Rendezvous::new(d, &a, Duration::ZERO).attempt(), a);
    }

    #[test]
    fn a_rank_image_exchanges_in_its_job_directory() {
        let d = tmpdir("jobdir");
        std::fs::write(d.join("job.manifest"), "devproxy job image\n").unwrap();
        std::fs::create_dir_all(d.join("rank-1")).unwrap();
        let r = Rendezvous::for_image(&d.join("rank-1"), Some("t"));
        assert!(r.path(&comm(1, 1, 2, 1)).starts_with(&d));
        let lone = tmpdir("lone");
        let r = Rendezvous::for_image(&lone, Some("t"));
        assert!(r.path(&comm(1, 1, 2, 1)).starts_with(&lone));
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::remove_dir_all(&lone).unwrap();
    }

    #[test]
    fn every_rank_joins_shared_communicators_in_one_order() {
        // Rank A made communicators x then y, rank B y then x (handles in the other order): both join by old id.
        let a = vec![comm(0x20, 0, 2, 1), comm(0x10, 0, 2, 2)];
        let b = vec![comm(0x10, 1, 2, 1), comm(0x20, 1, 2, 2)];
        let ids =
            |v: &[CommImage]| -> Vec<u8> { join_order(v).iter().map(|&i| v[i].id[0]).collect() };
        assert_eq!(ids(&a), vec![0x10, 0x20]);
        assert_eq!(ids(&a), ids(&b));
    }
}
