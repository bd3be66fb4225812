//! Counters of what the sessions layer did, rendered in Prometheus' text format. Hand-written:
//! a handful of atomics do not need a metrics framework.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the create-latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    pub creates: Counter,
    pub create_failures: Counter,
    pub refreshes: Counter,
    pub expiries: Counter,
    pub deletes: Counter,
    pub sandbox_deaths: Counter,
    pub edit_saves: Counter,
    pub edit_save_failures: Counter,
    pub destroy_failures: Counter,
    create_buckets: [Counter; BUCKETS.len()],
    create_count: Counter,
    create_micros: Counter,
}

impl Metrics {
    pub(crate) fn record_create(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.create_buckets) {
            if secs <= *bound {
                bucket.inc();
            }
        }
        self.create_count.inc();
        self.create_micros
            .0
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these metrics plus the live-session and pool gauges.
    pub(crate) fn render(&self, live: &[(String, usize)], pool: &[(String, usize)]) -> String {
        let mut out = String::new();
        for (name, help, counts) in [
            (
                "burrow_sessions_live",
                "Live sessions by environment.",
                live,
            ),
            (
                "burrow_pool_ready",
                "Ready sandboxes in the warm pool by environment.",
                pool,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (env, n) in counts {
                let _ = writeln!(out, "{name}{{environment=\"{env}\"}} {n}");
            }
        }
        for (name, help, counter) in [
            (
                "burrow_session_creates_total",
                "Sessions created.",
                &self.creates,
            ),
            (
                "burrow_session_create_failures_total",
                "Session creates that failed.",
                &self.create_failures,
            ),
            (
                "burrow_session_refreshes_total",
                "Session refreshes.",
                &self.refreshes,
            ),
            (
                "burrow_session_expiries_total",
                "Sessions that expired.",
                &self.expiries,
            ),
            (
                "burrow_session_deletes_total",
                "Sessions deleted over the API.",
                &self.deletes,
            ),
            (
                "burrow_sandbox_deaths_total",
                "Sandboxes that died on their own.",
                &self.sandbox_deaths,
            ),
            (
                "burrow_edit_saves_total",
                "Edit sessions whose changes became their environment's new version.",
                &self.edit_saves,
            ),
            (
                "burrow_edit_save_failures_total",
                "Edit sessions whose changes could not be saved.",
                &self.edit_save_failures,
            ),
            (
                "burrow_sandbox_destroy_failures_total",
                "Sandboxes of ended sessions that could not be removed at once (retried until they are).",
                &self.destroy_failures,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        out.push_str(
            "# HELP burrow_session_create_seconds Time to create a session, sandbox ready.\n",
        );
        out.push_str("# TYPE burrow_session_create_seconds histogram\n");
        for (bound, bucket) in BUCKETS.iter().zip(&self.create_buckets) {
            let _ = writeln!(
                out,
                "burrow_session_create_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.get()
            );
        }
        let count = self.create_count.get();
        let _ = writeln!(
            out,
            "burrow_session_create_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "burrow_session_create_seconds_sum {}",
            self.create_micros.get() as f64 / 1e6
        );
        let _ = writeln!(out, "burrow_session_create_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.record_create(Duration::from_millis(3));
        m.record_create(Duration::from_millis(30));
        let text = m.render(&[("Bash".into(), 2)], &[("Bash".into(), 3)]);
        assert!(text.contains("burrow_sessions_live{environment=\"Bash\"} 2\n"));
        assert!(text.contains("burrow_pool_ready{environment=\"Bash\"} 3\n"));
        assert!(text.contains("burrow_session_create_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("burrow_session_create_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("burrow_session_create_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("burrow_session_create_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("burrow_session_create_seconds_count 2\n"));
    }
}
