//! How much of the machine other processes took during a measurement.
//!
//! The write-path figures are CPU-bound on two cores: a compiler or another cluster running at
//! the same time lowers them. Each run is bracketed by two snapshots of the machine's busy time
//! (/proc/stat) and of the CPU time of the cluster (the postmaster, its live children, and the
//! children it reaped) and of this process (with pgbench, its child); what is left is other
//! processes', reported next to the figures so that a disturbed run can be recognised.

use postgres::Client;

/// CPU time in clock ticks (USER_HZ).
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    busy: u64,
    total: u64,
    ours: u64,
}

/// Fields 14-17 of /proc/<pid>/stat: utime, stime, cutime, cstime (after the `comm` field,
/// which may contain spaces, hence the split at the last parenthesis).
fn times(pid: &str) -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is the state (field 3), so field n is fields[n - 3].
    let n = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    let ppid = n(4)?;
    Some((ppid, n(14)? + n(15)?, n(16)? + n(17)?))
}

fn own_and_reaped(pid: &str) -> u64 {
    times(pid).map(|(_, own, reaped)| own + reaped).unwrap_or(0)
}

/// The pid of the cluster's postmaster (the parent of our backend).
pub fn postmaster_pid(db: &mut Client) -> u32 {
    let backend: i32 = crate::crm::scalar(db, "SELECT pg_backend_pid()");
    times(&backend.to_string())
        .map(|(ppid, _, _)| ppid as u32)
        .expect("read the backend's /proc entry")
}

pub fn snapshot(postmaster: u32) -> Snapshot {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let get = |i: usize| cpu.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let total = busy + get(3) + get(4);
    let postmaster_text = postmaster.to_string();
    let mut ours = own_and_reaped(&postmaster_text) + own_and_reaped("self");
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let Some((ppid, own, _)) = times(pid)
                && ppid == postmaster as u64
            {
                ours += own;
            }
        }
    }
    Snapshot { busy, total, ours }
}

/// The share of the machine's CPU capacity (all cores) other processes used between the two
/// snapshots, in percent.
pub fn foreign_percent(before: Snapshot, after: Snapshot) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    let ours = after.ours.saturating_sub(before.ours);
    100.0 * busy.saturating_sub(ours) as f64 / total as f64
}
