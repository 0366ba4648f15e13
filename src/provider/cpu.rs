//! CPU time of process replicas, for the autoscaler's `cpu` mode: each replica is its own
//! process group (the process provider starts it so), and its CPU time is the sum, over the live
//! processes of that group, of `utime + stime + cutime + cstime` from `/proc/<pid>/stat` (the
//! processes' own time and that of the children they have reaped, so that a short-lived child
//! counts too). One scan of `/proc` reads every group of a function at once.
//!
//! [`CpuMeter`] turns those per-replica readings into one counter that only grows: a replica
//! that is gone keeps the last time read for it, and a reading below the last (a member reaped
//! by a process outside the group) does not move the counter back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The live replicas of one function: replica id → its process group id.
pub type Groups = Arc<Mutex<HashMap<u64, i32>>>;

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of `/proc/<pid>/stat`'s times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The process group and CPU ticks (`utime + stime + cutime + cstime`) in one
/// `/proc/<pid>/stat` line; `None` when it cannot be read.
pub fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    // The command name (field 2) is in parentheses and may contain anything: split after the
    // last ')'. Then: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime stime cutime cstime ...
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().take(15).collect();
    if fields.len() < 15 {
        return None;
    }
    let pgrp = fields[2].parse().ok()?;
    let mut ticks = 0u64;
    for field in &fields[11..15] {
        // cutime and cstime are signed in the kernel's format; never negative in practice.
        ticks += field.parse::<i64>().ok()?.max(0) as u64;
    }
    Some((pgrp, ticks))
}

/// CPU seconds used by the live processes of each of `groups` now (groups with no live process
/// are absent).
pub fn read_groups(groups: &[i32]) -> HashMap<i32, f64> {
    let mut ticks: HashMap<i32, u64> = HashMap::new();
    if groups.is_empty() {
        return HashMap::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may be gone between the listing and the read: skipped.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((pgrp, t)) = parse_stat(&stat) {
            if groups.contains(&pgrp) {
                *ticks.entry(pgrp).or_default() += t;
            }
        }
    }
    let per_second = ticks_per_second();
    ticks
        .into_iter()
        .map(|(g, t)| (g, t as f64 / per_second))
        .collect()
}

/// A function's replicas' CPU seconds since the meter started, as a counter that only grows.
#[derive(Debug, Default)]
pub struct CpuMeter {
    /// The last time read for each live replica.
    last: HashMap<u64, f64>,
    /// CPU time of replicas that are gone.
    retired: f64,
}

impl CpuMeter {
    /// The counter after reading `now` (replica id → CPU seconds of its group, for the live
    /// replicas).
    pub fn update(&mut self, now: &HashMap<u64, f64>) -> f64 {
        let gone: Vec<u64> = self
            .last
            .keys()
            .filter(|id| !now.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.retired += self.last.remove(&id).unwrap_or(0.0);
        }
        for (id, secs) in now {
            let last = self.last.entry(*id).or_insert(0.0);
            *last = last.max(*secs);
        }
        self.retired + self.last.values().sum::<f64>()
    }

    /// Reads the groups of `replicas` from `/proc` and updates the counter.
    pub fn read(&mut self, replicas: &Groups) -> f64 {
        let live: Vec<(u64, i32)> = replicas
            .lock()
            .unwrap()
            .iter()
            .map(|(id, g)| (*id, *g))
            .collect();
        let pgids: Vec<i32> = live.iter().map(|(_, g)| *g).collect();
        let by_group = read_groups(&pgids);
        let now: HashMap<u64, f64> = live
            .into_iter()
            .filter_map(|(id, g)| by_group.get(&g).map(|s| (id, *s)))
            .collect();
        self.update(&now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_the_group_and_every_cpu_field() {
        let line = "4242 (my) prog) R 1 4240 4240 0 -1 4194560 10 0 0 0 150 50 7 3 20 0 1 0 99 0 0";
        assert_eq!(parse_stat(line), Some((4240, 150 + 50 + 7 + 3)));
        assert_eq!(parse_stat("1 (x) R 0"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_group_is_found_and_uses_cpu() {
        // SAFETY: getpgrp has no preconditions.
        let own = unsafe { libc::getpgrp() };
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        std::hint::black_box(x);
        let read = read_groups(&[own]);
        assert!(read.get(&own).is_some_and(|s| *s > 0.0), "{read:?}");
    }

    #[test]
    fn the_counter_only_grows_and_keeps_what_gone_replicas_used() {
        let mut meter = CpuMeter::default();
        let at = |pairs: &[(u64, f64)]| pairs.iter().copied().collect::<HashMap<_, _>>();
        assert_eq!(meter.update(&at(&[(1, 2.0), (2, 1.0)])), 3.0);
        // Replica 2 exits: its 1.0 s stays counted; replica 1 reads lower (a lost child): no
        // step back.
        assert_eq!(meter.update(&at(&[(1, 1.5)])), 3.0);
        assert_eq!(meter.update(&at(&[(1, 4.0), (3, 0.5)])), 5.5);
    }
}
