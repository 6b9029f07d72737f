//! The processes under test (rd-dummy, rd-server, rd-client; shared with `rd-soak` in
//! `rd_benches::process`) and per-process resource accounting from /proc.

pub use rd_benches::process::{generate_file, Proc, TempDir};
use rd_benches::procfs;

/// CPU seconds and peak RSS of a process over one measured phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_s: f64,
    pub peak_kib: u64,
}

/// Starts measuring `pids`: resets their peak RSS and notes their CPU time.
#[derive(Debug)]
pub struct Meter {
    pids: Vec<u32>,
    cpu0: Vec<f64>,
}

impl Meter {
    pub fn start(pids: &[u32]) -> Self {
        for &pid in pids {
            procfs::reset_peak(pid);
        }
        Self {
            pids: pids.to_vec(),
            cpu0: pids
                .iter()
                .map(|&p| procfs::cpu_seconds(p).unwrap_or(0.0))
                .collect(),
        }
    }

    /// CPU used since `start` and the peak RSS since then, per pid.
    pub fn stop(self) -> Vec<Usage> {
        self.pids
            .iter()
            .zip(self.cpu0)
            .map(|(&pid, c0)| Usage {
                cpu_s: procfs::cpu_seconds(pid).unwrap_or(0.0) - c0,
                peak_kib: procfs::status_kib(pid, "VmHWM").unwrap_or(0),
            })
            .collect()
    }
}

/// Adds a phase's usage to a running total (CPU adds up, the peak is the maximum).
pub fn accumulate(total: &mut [Usage], phase: &[Usage]) {
    for (t, p) in total.iter_mut().zip(phase) {
        t.cpu_s += p.cpu_s;
        t.peak_kib = t.peak_kib.max(p.peak_kib);
    }
}
