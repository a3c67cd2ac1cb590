//! A criterion measurement of the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) instead
//! of wall time.
//!
//! The machines ferry is benchmarked on are small and shared: with a load of 8 on 2 cores, a
//! wall-clock sample also counts the time the thread spent waiting for a core, and figures move by
//! 2-4x between runs. The thread's CPU time counts only the time it ran. What it still includes:
//! the caches and TLBs other tasks evicted while it waited, so a loaded figure stays somewhat above
//! a quiet one; a bench that reads the whole of a large table is affected most. A single-threaded
//! bench that neither sleeps nor waits measures the same on a quiet machine either way.
//!
//! [`bench_main!`](crate::bench_main) makes a bench's `main` measure CPU time, or wall time when
//! `FERRY_BENCH_WALL` is set (to compare with figures taken before). Criterion reads the clock
//! once per sample (a batch of iterations), so the clock's cost (a system call) is not counted
//! per iteration.

use criterion::Throughput;
use criterion::measurement::{Measurement, ValueFormatter};

/// The calling thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}", std::io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The benchmark thread's CPU time (see the module's text).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadCpuTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_ns()
    }

    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns().saturating_sub(start)
    }

    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }

    fn zero(&self) -> u64 {
        0
    }

    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// A bench's `main`: `bench_main!(config, bench_a, bench_b)`, where `config` is a generic
/// `fn config<M: Measurement>(c: Criterion<M>) -> Criterion<M>` and each target a generic
/// `fn bench<M: Measurement>(c: &mut Criterion<M>)`. Measures the thread's CPU time
/// ([`ThreadCpuTime`]), or wall time when `FERRY_BENCH_WALL` is set.
#[macro_export]
macro_rules! bench_main {
    ($config:path, $($target:path),+ $(,)?) => {
        fn main() {
            if std::env::var_os("FERRY_BENCH_WALL").is_some() {
                let mut c = $config(::criterion::Criterion::default()).configure_from_args();
                $( $target(&mut c); )+
                c.final_summary();
            } else {
                let mut c = $config(
                    ::criterion::Criterion::default().with_measurement($crate::cputime::ThreadCpuTime),
                )
                .configure_from_args();
                $( $target(&mut c); )+
                c.final_summary();
            }
        }
    };
}

/// Formats nanoseconds of CPU time like criterion's wall time ("cpu" marks the unit).
struct CpuFormatter;

/// The unit for a typical value in nanoseconds, and the factor that converts to it.
fn unit(ns: f64) -> (f64, &'static str) {
    if ns < 1e3 {
        (1.0, "ns cpu")
    } else if ns < 1e6 {
        (1e-3, "µs cpu")
    } else if ns < 1e9 {
        (1e-6, "ms cpu")
    } else {
        (1e-9, "s cpu")
    }
}

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = unit(typical);
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(&self, _typical: f64, throughput: &Throughput, values: &mut [f64]) -> &'static str {
        // Per second of CPU time.
        let (n, unit) = match *throughput {
            Throughput::Bytes(b) | Throughput::BytesDecimal(b) => (b as f64, "B/s cpu"),
            Throughput::Elements(e) | Throughput::ElementsAndBytes { elements: e, .. } => (e as f64, "elem/s cpu"),
            Throughput::Bits(b) => (b as f64, "bit/s cpu"),
        };
        values.iter_mut().for_each(|v| *v = n * 1e9 / *v);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_work_and_not_sleep() {
        let m = ThreadCpuTime;
        let t = m.start();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let slept = m.end(t);
        assert!(slept < 20_000_000, "a sleeping thread used {slept} ns of CPU");
        let t = m.start();
        let mut x = 1u64;
        let begun = std::time::Instant::now();
        while begun.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(3).wrapping_add(1));
        }
        let spun = m.end(t);
        assert!(spun > 1_000_000, "30 ms of spinning counted only {spun} ns of CPU");
    }

    #[test]
    fn scales_like_wall_time() {
        let mut v = [1500.0, 2500.0];
        assert_eq!(CpuFormatter.scale_values(2000.0, &mut v), "µs cpu");
        assert_eq!(v, [1.5, 2.5]);
    }
}
