//! Machine load from `/proc`: CPU use from the deltas of `/proc/stat`'s `cpu` line, memory
//! use from `/proc/meminfo` (MemTotal against MemAvailable).

/// Cumulative CPU times from the first line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`. Idle time is `idle + iowait`; guest times
/// are already part of `user`/`nice` and are not counted twice.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let counted = &fields[..fields.len().min(8)];
    let total = counted
        .iter()
        .fold(0u64, |sum, value| sum.saturating_add(*value));
    let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// Percent of memory in use, from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<f32> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable").or_else(|| field("MemFree"))?;
    if total == 0 {
        return None;
    }
    let used = total.saturating_sub(available);
    Some((used as f64 * 100.0 / total as f64) as f32)
}

/// Percent of CPU busy between two samples.
pub fn cpu_percent(before: CpuTimes, after: CpuTimes) -> f32 {
    let total = after.total.saturating_sub(before.total);
    let busy = after.busy.saturating_sub(before.busy);
    if total == 0 {
        return 0.0;
    }
    ((busy as f64 * 100.0 / total as f64) as f32).clamp(0.0, 100.0)
}

/// Samples `/proc` for load reports, remembering the previous CPU sample.
#[derive(Debug, Default)]
pub struct LoadSampler {
    previous: Option<CpuTimes>,
}

impl LoadSampler {
    /// (cpu percent since the previous call, memory percent). Zeros where `/proc` is
    /// unavailable; the first call measures from boot.
    pub fn sample(&mut self) -> (f32, f32) {
        let cpu = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_proc_stat(&text));
        let cpu_percent = match cpu {
            Some(now) => {
                let before = self.previous.replace(now).unwrap_or_default();
                cpu_percent(before, now)
            }
            None => 0.0,
        };
        let memory_percent = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| parse_meminfo(&text))
            .unwrap_or(0.0);
        (cpu_percent, memory_percent.clamp(0.0, 100.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_BEFORE: &str =
        "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\nintr 1\n";
    const STAT_AFTER: &str =
        "cpu  160 0 90 880 70 0 0 0 0 0\ncpu0 160 0 90 880 70 0 0 0 0 0\nintr 2\n";
    const MEMINFO: &str = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\nBuffers:          100 kB\n";

    #[test]
    fn cpu_from_stat_deltas() {
        let before = parse_proc_stat(STAT_BEFORE).unwrap();
        let after = parse_proc_stat(STAT_AFTER).unwrap();
        assert_eq!(
            before,
            CpuTimes {
                busy: 150,
                total: 1000
            }
        );
        // 100 busy ticks out of 200.
        assert_eq!(cpu_percent(before, after), 50.0);
        assert_eq!(cpu_percent(after, after), 0.0);
        assert_eq!(cpu_percent(after, before), 0.0);
    }

    #[test]
    fn memory_from_meminfo() {
        assert_eq!(parse_meminfo(MEMINFO), Some(75.0));
        assert_eq!(
            parse_meminfo("MemTotal: 100 kB\nMemFree: 40 kB\n"),
            Some(60.0)
        );
        assert_eq!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
        assert_eq!(parse_meminfo("garbage"), None);
    }

    #[test]
    fn malformed_stat_is_none() {
        assert_eq!(parse_proc_stat(""), None);
        assert_eq!(parse_proc_stat("cpu  1 2\n"), None);
        assert_eq!(parse_proc_stat("cpu  a b c d\n"), None);
    }

    #[test]
    fn sampler_reads_this_machine() {
        let mut sampler = LoadSampler::default();
        let (cpu, memory) = sampler.sample();
        assert!((0.0..=100.0).contains(&cpu));
        assert!((0.0..=100.0).contains(&memory));
    }
}
