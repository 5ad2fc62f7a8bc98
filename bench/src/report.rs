//! The one table of `make bench`: every figure next to its DESIGN.md target.

use serde_json::Value;

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

fn met(value: &Value) -> &'static str {
    match value.as_bool() {
        Some(true) => "yes",
        Some(false) => "**NO**",
        None => "",
    }
}

fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn table(results: &Value) -> String {
    let mut rows: Vec<[String; 6]> = Vec::new();
    let mut row = |a: &str, b: String, c: String, d: String, e: String, f: &str| {
        rows.push([a.into(), b, c, d, e, f.into()]);
    };

    let mixed = &results["mixed_writes"];
    let heading = format!(
        "Mixed single-row writes ({} clients, 70/20/10 mix, {} rows, median of {} × {} s)",
        mixed["clients"], mixed["table_rows"], mixed["rounds"], mixed["seconds_per_run"]
    );
    for (i, c) in mixed["configurations"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let target = &c["target"];
        let target_text = if let Some(min) = target["min_ratio"].as_f64() {
            format!("≥ {min:.2}×")
        } else if let Some(reference) = target["design_reference_ratio"].as_f64() {
            format!("(DESIGN: peer {reference:.2}×)")
        } else {
            String::new()
        };
        row(
            if i == 0 { &heading } else { "" },
            label(c["configuration"].as_str().unwrap_or("")),
            format!("{} tps", thousands(c["tps"].as_f64().unwrap_or(f64::NAN))),
            format!("{:.2}×", c["ratio_to_bare"].as_f64().unwrap_or(f64::NAN)),
            target_text,
            met(&c["met"]),
        );
    }

    let copy = &results["copy"];
    let heading = format!(
        "Bulk COPY of {} contacts into an empty table (median of {})",
        thousands(copy["rows"].as_f64().unwrap_or(0.0)),
        copy["rounds"]
    );
    for (i, c) in copy["configurations"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let target = &c["target"];
        let target_text = if let Some(max) = target["max_ratio"].as_f64() {
            format!("≤ {max:.1}× the time")
        } else if let Some(reference) = target["design_reference_ratio"].as_f64() {
            format!("(DESIGN: peer {reference:.1}×)")
        } else {
            String::new()
        };
        row(
            if i == 0 { &heading } else { "" },
            label(c["configuration"].as_str().unwrap_or("")),
            format!("{:.3} s", c["seconds"].as_f64().unwrap_or(f64::NAN)),
            format!("{:.2}×", c["ratio_to_bare"].as_f64().unwrap_or(f64::NAN)),
            target_text,
            met(&c["met"]),
        );
    }

    let latency = &results["latency"];
    let heading = format!(
        "Commit → emulator received ({} active webhook bindings, 1 commit / {} ms, {} samples)",
        latency["active_bindings"], latency["interval_ms"], latency["samples"]
    );
    row(
        &heading,
        "p50".into(),
        format!("{:.1} ms", latency["p50_ms"].as_f64().unwrap_or(f64::NAN)),
        String::new(),
        "≤ 20 ms".into(),
        met(&latency["met"]["p50"]),
    );
    row(
        "",
        "p99".into(),
        format!("{:.1} ms", latency["p99_ms"].as_f64().unwrap_or(f64::NAN)),
        format!(
            "(max {:.1} ms)",
            latency["max_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        "≤ 100 ms".into(),
        met(&latency["met"]["p99"]),
    );

    let drain = &results["drain"];
    let heading = format!(
        "Backlog drain of {} changes to the Mailchimp emulator (500 per call)",
        thousands(drain["changes"].as_f64().unwrap_or(0.0))
    );
    let completed = drain["completed"].as_bool().unwrap_or(false);
    row(
        &heading,
        "throughput".into(),
        format!(
            "{} changes/s",
            thousands(drain["changes_per_s"].as_f64().unwrap_or(f64::NAN))
        ),
        if completed {
            format!("{:.1} s", drain["seconds"].as_f64().unwrap_or(f64::NAN))
        } else {
            format!(
                "stopped after {:.0} s, {} left",
                drain["seconds"].as_f64().unwrap_or(f64::NAN),
                drain["status_after"]["pending"]
            )
        },
        "≥ 20,000/s".into(),
        met(&drain["met"]["throughput"]),
    );
    let worker = &drain["worker"];
    let mb = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / 1024.0;
    row(
        "",
        "worker peak RSS (VmHWM)".into(),
        format!("{:.1} MB", mb(&worker["vm_hwm_kb"])),
        format!(
            "private {:.1} MB, shared buffers {:.1} MB",
            mb(&worker["peak_sampled_kb"]["anon"]),
            mb(&worker["peak_sampled_kb"]["shmem"])
        ),
        "< 100 MB".into(),
        met(&drain["met"]["rss"]),
    );

    let header = [
        "Figure",
        "Configuration",
        "Measured",
        "vs bare / detail",
        "Target",
        "Met",
    ];
    let mut text = String::new();
    text.push_str(&format!("| {} |\n", header.join(" | ")));
    text.push_str(&format!(
        "|{}\n",
        header.iter().map(|_| "---|").collect::<String>()
    ));
    for r in rows {
        text.push_str(&format!("| {} |\n", r.join(" | ")));
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
