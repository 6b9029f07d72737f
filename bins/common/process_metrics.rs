//! `process_*` metrics (client_golang's names and meanings, so Go dashboards work), the
//! `rd_build_info{version,commit}` info metric, and the sessions' driver counters
//! (`rd_driver_wakeups_total`, `rd_driver_polls_total`), for every binary that serves
//! /metrics.
//!
//! Read from /proc at each scrape with the procfs crate (metrics-process, the usual choice,
//! feeds the `metrics` facade rather than prometheus-client). Outside Linux only the build
//! info is exported.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Registers the process collector and the build info metric in `registry`.
pub fn register(registry: &mut Registry, version: &'static str, commit: &'static str) {
    registry.register_collector(Box::new(ProcessCollector));
    registry.register(
        "rd_build",
        "The version and commit of this binary (value 1)",
        Info::new(vec![("version", version), ("commit", commit)]),
    );
}

/// Collects `process_*` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    #[cfg(target_os = "linux")]
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use procfs::prelude::*;
        encode_driver_stats(&mut encoder)?;
        use procfs::process::{LimitValue, Process};

        let Ok(me) = Process::myself() else {
            return Ok(());
        };
        let ticks = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stat.rss_bytes().get() as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.vsize as f64,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process",
                stat.num_threads as f64,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    boot as f64 + stat.starttime as f64 / ticks,
                )?;
            }
        }
        if let Ok(fds) = me.fd_count() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds as f64,
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let LimitValue::Value(max) = limits.max_open_files.soft_limit {
                gauge(
                    &mut encoder,
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max as f64,
                )?;
            }
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_driver_stats(&mut encoder)
    }
}

/// How often stream handles woke a session driver (a hop to its task) and how often the
/// drivers ran, all sessions of the process: wake-ups per MiB moved is the cost the data
/// path pays in cross-thread hops (rd-bench reports it).
fn encode_driver_stats(encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let stats = rd_session::driver_stats();
    for (name, help, value) in [
        (
            "rd_driver_wakeups",
            "Times stream or session handles woke a session's driver",
            stats.stream_wakes,
        ),
        (
            "rd_driver_polls",
            "Times a session's driver ran",
            stats.polls,
        ),
    ] {
        let c = ConstCounter::new(value);
        c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}
