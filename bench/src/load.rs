//! Closed-loop load: `concurrency` workers each call an operation back to back for a fixed
//! time; calls that start after the warm-up are counted and their latency recorded.

use crate::report::{histogram, record};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    pub histogram: Histogram<u64>,
    pub elapsed: Duration,
    /// Error messages (first 80 characters) and how often each came.
    pub error_kinds: BTreeMap<String, u64>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// The most frequent error, for the report.
    pub fn top_error(&self) -> Option<String> {
        self.error_kinds
            .iter()
            .max_by_key(|(_, count)| **count)
            .map(|(kind, count)| format!("{count}x {kind}"))
    }
}

/// Runs `operation(worker, iteration)` from `concurrency` workers for `warmup + duration`.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    operation: F,
) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let operation = Arc::new(operation);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|worker| {
            let operation = operation.clone();
            tokio::spawn(async move {
                let mut histogram = histogram();
                let mut ok = 0u64;
                let mut errors = 0u64;
                let mut kinds = BTreeMap::new();
                let mut iteration = 0u64;
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    let outcome = operation(worker, iteration).await;
                    iteration += 1;
                    let finished = Instant::now();
                    if began < measure_from || finished > end {
                        continue;
                    }
                    match outcome {
                        Ok(()) => {
                            ok += 1;
                            record(&mut histogram, finished - began);
                        }
                        Err(message) => {
                            errors += 1;
                            let kind: String = message.chars().take(80).collect();
                            *kinds.entry(kind).or_insert(0u64) += 1;
                        }
                    }
                }
                (ok, errors, histogram, kinds)
            })
        })
        .collect();
    let mut result = LoadResult {
        ok: 0,
        errors: 0,
        histogram: histogram(),
        elapsed: duration,
        error_kinds: BTreeMap::new(),
    };
    for worker in workers {
        if let Ok((ok, errors, histogram, kinds)) = worker.await {
            result.ok += ok;
            result.errors += errors;
            let _ = result.histogram.add(&histogram);
            for (kind, count) in kinds {
                *result.error_kinds.entry(kind).or_insert(0) += count;
            }
        }
    }
    result
}
