//! Benchmark helpers shared by the criterion benches and the end-to-end harness (`rd-bench`).
//!
//! `RD_BENCH_SCALE` scales durations and sizes everywhere (default 1.0; 0.1 for quick runs).

use std::time::Duration;

pub mod dns;
pub mod front;
pub mod metrics;
pub mod process;

/// The error type of the harnesses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `RD_BENCH_SCALE` factor: 1.0 unless set to a positive number.
pub fn scale() -> f64 {
    std::env::var("RD_BENCH_SCALE")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0)
}

/// `secs * scale`, at least 50 ms.
pub fn scaled_duration(secs: f64, scale: f64) -> Duration {
    Duration::from_secs_f64((secs * scale).max(0.05))
}

/// xorshift64*: fast, deterministic, good enough to make file contents incompressible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// A fast streaming 64-bit hash (not cryptographic) to check that a body arrived intact:
/// any single changed 8-byte word changes the result, and the length is mixed in, so the
/// result does not depend on how the data was split into chunks.
#[derive(Debug, Clone)]
pub struct StreamHash {
    h: u64,
    pending: [u8; 8],
    npending: usize,
    len: u64,
}

impl Default for StreamHash {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamHash {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;

    /// An empty hash.
    pub fn new() -> Self {
        Self {
            h: 0x243F_6A88_85A3_08D3,
            pending: [0; 8],
            npending: 0,
            len: 0,
        }
    }

    fn word(&mut self, w: u64) {
        let h = (self.h ^ w).wrapping_mul(Self::K);
        self.h = h ^ (h >> 29);
    }

    /// Adds `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.npending > 0 {
            let take = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    /// Bytes added so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash of everything added.
    pub fn finish(&self) -> u64 {
        let mut s = self.clone();
        if s.npending > 0 {
            let mut b = [0u8; 8];
            b[..s.npending].copy_from_slice(&s.pending[..s.npending]);
            s.word(u64::from_le_bytes(b));
        }
        s.word(s.len);
        s.h
    }
}

/// Memory and CPU figures of a process from `/proc/PID/status` and `/proc/PID/stat`.
pub mod procfs {
    use std::sync::OnceLock;

    /// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`, ...), or `None` when unreadable.
    pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// A `/proc/PID/status` count without a unit (`Threads`), or `None` when unreadable.
    pub fn status_count(pid: u32, field: &str) -> Option<u64> {
        status_kib(pid, field)
    }

    /// Open file descriptors: the entries of `/proc/PID/fd`.
    pub fn fd_count(pid: u32) -> Option<u64> {
        Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
    }

    /// This process's resident set in bytes.
    pub fn self_rss() -> u64 {
        status_kib(std::process::id(), "VmRSS").unwrap_or(0) * 1024
    }

    /// Resets the process's peak RSS (`VmHWM`) to its current RSS; false if the kernel
    /// refused (needs Linux 4.0 and the same user).
    pub fn reset_peak(pid: u32) -> bool {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
    }

    /// Clock ticks per second for `/proc/PID/stat` times: `getconf CLK_TCK`, else 100.
    pub fn clock_ticks() -> f64 {
        static TICKS: OnceLock<f64> = OnceLock::new();
        *TICKS.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|t| *t > 0.0)
                .unwrap_or(100.0)
        })
    }

    /// User plus system CPU seconds the process has used so far.
    pub fn cpu_seconds(pid: u32) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses; fields resume after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / clock_ticks())
    }
}

/// Latency percentiles over a set of samples.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
    sorted: bool,
}

impl Latencies {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        self.samples.push(d);
        self.sorted = false;
    }

    /// Adds all of `other`'s samples.
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
        self.sorted = false;
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `p`th percentile (0..=100), nearest rank; zero without samples.
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        if !self.sorted {
            self.samples.sort_unstable();
            self.sorted = true;
        }
        let rank = ((p / 100.0) * self.samples.len() as f64 - 1e-9).ceil() as usize;
        self.samples[rank.clamp(1, self.samples.len()) - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut l = Latencies::new();
        for us in 1..=1000 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.percentile(50.0), Duration::from_micros(500));
        assert_eq!(l.percentile(99.0), Duration::from_micros(990));
        assert_eq!(l.percentile(99.9), Duration::from_micros(999));
        assert_eq!(l.percentile(100.0), Duration::from_micros(1000));
    }

    #[test]
    fn rng_fills_odd_lengths() {
        let mut a = [0u8; 13];
        Rng::new(1).fill(&mut a);
        assert!(a.iter().any(|b| *b != 0));
    }

    #[test]
    fn stream_hash_ignores_chunking_and_sees_changes() {
        let mut data = vec![0u8; 1000];
        Rng::new(7).fill(&mut data);
        let mut whole = StreamHash::new();
        whole.update(&data);
        for split in [1, 3, 7, 8, 9, 500, 999] {
            let mut h = StreamHash::new();
            for chunk in data.chunks(split) {
                h.update(chunk);
            }
            assert_eq!(h.finish(), whole.finish(), "split {split}");
        }
        let mut flipped = data.clone();
        flipped[517] ^= 0x10;
        let mut h = StreamHash::new();
        h.update(&flipped);
        assert_ne!(h.finish(), whole.finish());
        let mut short = StreamHash::new();
        short.update(&data[..999]);
        assert_ne!(short.finish(), whole.finish());
    }

    #[test]
    fn reads_own_proc_figures() {
        assert!(procfs::fd_count(std::process::id()).unwrap_or(0) > 0);
        assert!(procfs::status_count(std::process::id(), "Threads").unwrap_or(0) >= 1);
        assert!(procfs::self_rss() > 0);
        assert!(procfs::cpu_seconds(std::process::id()).is_some());
    }
}
