//! The one table of `make bench`: every figure next to its docs/design.md target.

use serde_json::Value;

type Row = [String; 6];

fn label(configuration: &str) -> String {
    let plural = |n: &str, word: &str| {
        if n == "1" {
            format!("{n} {word}")
        } else {
            format!("{n} {word}s")
        }
    };
    if configuration == "bare" {
        "bare table".into()
    } else if let Some(n) = configuration.strip_prefix("listsync_") {
        format!("pg_listsync, {} (paused)", plural(n, "binding"))
    } else if let Some(n) = configuration.strip_prefix("plpgsql_") {
        format!("PL/pgSQL trigger peer, {}", plural(n, "filter"))
    } else {
        configuration.into()
    }
}

fn met(value: &Value) -> String {
    match value.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "**NO**".into(),
        None => String::new(),
    }
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn thousands(n: f64) -> String {
    if !n.is_finite() {
        return format!("{n}");
    }
    let digits = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The first row of a figure names it; the others leave the column empty.
fn figure_rows(heading: String, rows: Vec<[String; 5]>) -> Vec<Row> {
    rows.into_iter()
        .enumerate()
        .map(|(i, [a, b, c, d, e])| {
            let first = if i == 0 {
                heading.clone()
            } else {
                String::new()
            };
            [first, a, b, c, d, e]
        })
        .collect()
}

fn mixed_rows(mixed: &Value) -> Vec<Row> {
    let heading = format!(
        "Mixed single-row writes ({} clients, 70/20/10 mix, {} rows, median of {} × {} s)",
        mixed["clients"],
        thousands(number(&mixed["table_rows"])),
        mixed["rounds"],
        mixed["seconds_per_run"]
    );
    let rows = mixed["configurations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let target = &c["target"];
            let target_text = if let Some(min) = target["min_ratio"].as_f64() {
                format!("≥ {min:.2}×")
            } else if let Some(reference) = target["design_reference_ratio"].as_f64() {
                format!("(design: peer {reference:.2}×)")
            } else {
                String::new()
            };
            [
                label(c["configuration"].as_str().unwrap_or("")),
                format!("{} tps", thousands(number(&c["tps"]))),
                format!("{:.2}×", number(&c["ratio_to_bare"])),
                target_text,
                met(&c["met"]),
            ]
        })
        .collect();
    figure_rows(heading, rows)
}

fn copy_rows(copy: &Value) -> Vec<Row> {
    let heading = format!(
        "Bulk COPY of {} contacts into an empty table (median of {})",
        thousands(number(&copy["rows"])),
        copy["rounds"]
    );
    let rows = copy["configurations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let target = &c["target"];
            let target_text = if let Some(max) = target["max_ratio"].as_f64() {
                format!("≤ {max:.1}× the time")
            } else if let Some(reference) = target["design_reference_ratio"].as_f64() {
                format!("(design: peer {reference:.1}×)")
            } else {
                String::new()
            };
            [
                label(c["configuration"].as_str().unwrap_or("")),
                format!("{:.3} s", number(&c["seconds"])),
                format!("{:.2}×", number(&c["ratio_to_bare"])),
                target_text,
                met(&c["met"]),
            ]
        })
        .collect();
    figure_rows(heading, rows)
}

fn latency_rows(results: &Value) -> Vec<Row> {
    let latency = &results["latency"];
    let heading = format!(
        "Commit → emulator received ({} active webhook bindings, 1 commit / {} ms, {} samples)",
        latency["active_bindings"], latency["interval_ms"], latency["samples"]
    );
    let mut rows = vec![
        [
            "p50".into(),
            format!("{:.1} ms", number(&latency["p50_ms"])),
            format!("(p90 {:.1} ms)", number(&latency["p90_ms"])),
            "≤ 20 ms".into(),
            met(&latency["met"]["p50"]),
        ],
        [
            "p99".into(),
            format!("{:.1} ms", number(&latency["p99_ms"])),
            format!("(max {:.1} ms)", number(&latency["max_ms"])),
            "≤ 100 ms".into(),
            met(&latency["met"]["p99"]),
        ],
    ];
    let without = &results["latency_without_index"];
    if !without.is_null() {
        rows.push([
            "p50 / p99 without the recommended normalize_email index".into(),
            format!(
                "{:.1} / {:.1} ms",
                number(&without["p50_ms"]),
                number(&without["p99_ms"])
            ),
            "(for information)".into(),
            String::new(),
            String::new(),
        ]);
    }
    figure_rows(heading, rows)
}

fn drain_rows(drain: &Value) -> Vec<Row> {
    let heading = format!(
        "Backlog drain of {} changes to the Mailchimp emulator (500 per call)",
        thousands(number(&drain["changes"]))
    );
    let detail = if drain["completed"].as_bool().unwrap_or(false) {
        format!("{:.1} s", number(&drain["seconds"]))
    } else {
        format!(
            "stopped after {:.0} s, {} left",
            number(&drain["seconds"]),
            drain["status_after"]["pending"]
        )
    };
    let worker = &drain["worker"];
    let mb = |v: &Value| number(v) / 1024.0;
    figure_rows(
        heading,
        vec![
            [
                "throughput".into(),
                format!("{} changes/s", thousands(number(&drain["changes_per_s"]))),
                detail,
                "≥ 20,000/s".into(),
                met(&drain["met"]["throughput"]),
            ],
            [
                "worker peak RSS (VmHWM)".into(),
                format!("{:.1} MB", mb(&worker["vm_hwm_kb"])),
                format!(
                    "of which private {:.1} MB, shared buffers {:.1} MB (peaks)",
                    mb(&worker["peak_sampled_kb"]["anon"]),
                    mb(&worker["peak_sampled_kb"]["shmem"])
                ),
                "< 100 MB".into(),
                met(&drain["met"]["rss"]),
            ],
        ],
    )
}

pub fn table(results: &Value) -> String {
    // A figure left out (BENCH_ONLY) is null: its rows are absent.
    let mut rows: Vec<Row> = Vec::new();
    if !results["mixed_writes"].is_null() {
        rows.extend(mixed_rows(&results["mixed_writes"]));
    }
    if !results["copy"].is_null() {
        rows.extend(copy_rows(&results["copy"]));
    }
    if !results["latency"].is_null() {
        rows.extend(latency_rows(results));
    }
    if !results["drain"].is_null() {
        rows.extend(drain_rows(&results["drain"]));
    }

    let header = [
        "Figure",
        "Configuration",
        "Measured",
        "vs bare / detail",
        "Target",
        "Met",
    ];
    let mut text = format!("| {} |\n|", header.join(" | "));
    text.push_str(&"---|".repeat(header.len()));
    text.push('\n');
    for r in rows {
        text.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    let others = ["mixed_writes", "copy"]
        .iter()
        .flat_map(|f| {
            results[*f]["configurations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|c| {
            c["other_processes_cpu_pct_runs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|v| v.as_f64())
        .fold(None, |max: Option<f64>, v| {
            Some(max.map_or(v, |m| m.max(v)))
        });
    if let Some(max) = others {
        text.push_str(&format!(
            "\nOther processes on the machine used at most {max:.0}% of its CPU during any write run."
        ));
    }
    let env = &results["environment"];
    text.push_str(&format!(
        "\n{} CPUs ({}), {}; shared_buffers {}, synchronous_commit {} (latency client: on).\n",
        env["cpus"],
        env["cpu_model"].as_str().unwrap_or("?"),
        env["postgres"]
            .as_str()
            .unwrap_or("?")
            .split(" on ")
            .next()
            .unwrap_or("?"),
        env["shared_buffers"].as_str().unwrap_or("?"),
        env["synchronous_commit"].as_str().unwrap_or("?"),
    ));
    text
}
