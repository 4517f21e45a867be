//! How much memory this process may still use: the system's available
//! memory, or a container's (cgroup v2) headroom when that is smaller.

/// Memory available to this process now, in bytes: the smaller of the
/// system's `MemAvailable` and the cgroup's headroom (for a container);
/// `None` if neither can be read.
pub fn available() -> Option<u64> {
    let system = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (system, cgroup_headroom()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A cgroup v2 limit less the cgroup's current use (none when unlimited).
fn cgroup_headroom() -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max" does not parse: unlimited
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    #[test]
    fn available_memory_is_read_here() {
        // Linux (the only platform the server is built for) has /proc/meminfo.
        assert!(super::available().expect("MemAvailable is readable") > 0);
    }
}
