//! The invariants of DESIGN.md, checked on a recorded history of calls. Pure: a history
//! in, the violations out. Each check names the invariant it guards.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Value, json};

use super::{Call, Op};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Invariant {
    /// 1. An id a create returned read 404 somewhere, while it should be readable.
    Readable404,
    /// 2. One request in more than one heartbeat ack.
    HandedOutTwice,
    /// 3. A poller saw statuses go backwards.
    WentBackwards,
    /// 3. A terminal status (or its record) changed.
    TerminalChanged,
    /// 4. A report answered 200 is not what a later read shows.
    ReportNotShown,
    /// 4. A report answered 409 shows up anyway.
    ConflictChangedState,
    /// 5. A read shows a request active past its deadline, or a timeout that should not be.
    DeadlineMissed,
    /// 6. A call crossed a runtime boundary.
    CrossedBoundary,
    /// 7. A 5xx other than `runtime is offline` on create.
    Unexpected5xx,
    /// 7. A 4xx on a valid call.
    UnexpectedStatus,
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.invariant, self.detail)
    }
}

/// Deadlines the instances were configured with.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub pending_ms: i64,
    pub running_ms: i64,
}

/// One 200 read of a request record.
struct Read<'a> {
    call: &'a Call,
    record: &'a Value,
}

fn rank(status: &str) -> u8 {
    match status {
        "pending" => 0,
        "running" => 1,
        _ => 2,
    }
}

pub fn is_terminal(status: &str) -> bool {
    rank(status) == 2
}

fn millis(record: &Value, field: &str) -> i64 {
    let text = record[field].as_str().unwrap_or_default();
    humantime::parse_rfc3339(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(i64::MIN, |d| d.as_millis() as i64)
}

/// Whether `record` shows the end that report `body` sent.
pub fn shows(record: &Value, body: &Value) -> bool {
    let models = |v: &Value| v.get("models").cloned().unwrap_or(json!([]));
    record["status"] == body["status"]
        && models(record) == models(body)
        && record["supported"] == body.get("supported").cloned().unwrap_or(json!(true))
        && record.get("error") == body.get("error")
}

fn ended(body: &Value) -> bool {
    body["status"] != "running"
}

pub fn check(history: &[Call], limits: Limits) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut v = |invariant, detail: String| out.push(Violation { invariant, detail });
    let mut reads: HashMap<&str, Vec<Read>> = HashMap::new();
    let mut acks: HashMap<&str, Vec<&Call>> = HashMap::new();
    let mut reports: HashMap<&str, Vec<(&Call, u16)>> = HashMap::new();

    // Status codes, boundaries, and the collections the later checks need.
    for call in history {
        let Ok((status, json)) = &call.outcome else {
            continue;
        };
        let status = *status;
        let id = call.request.as_deref().unwrap_or("");
        if status >= 500 {
            let offline =
                call.op == Op::Create && status == 503 && json["error"] == "runtime is offline";
            if !offline {
                v(Invariant::Unexpected5xx, format!("{call}"));
            }
            continue;
        }
        match &call.op {
            Op::Heartbeat => {
                if status != 200 {
                    v(Invariant::UnexpectedStatus, format!("{call}"));
                } else if let Some(claimed) = json["pending_model_list"]["id"].as_str() {
                    acks.entry(claimed).or_default().push(call);
                }
            }
            Op::Create | Op::Poll | Op::FinalRead => match status {
                200 => {
                    if json["runtime_id"] != call.runtime.as_str() {
                        v(Invariant::CrossedBoundary, format!("{call}"));
                    }
                    let id = json["id"].as_str().unwrap_or("");
                    reads
                        .entry(id)
                        .or_default()
                        .push(Read { call, record: json });
                }
                404 if call.op != Op::Create => v(Invariant::Readable404, format!("{call}")),
                _ => v(Invariant::UnexpectedStatus, format!("{call}")),
            },
            Op::ForeignRead => {
                if status != 404 {
                    v(Invariant::CrossedBoundary, format!("{call}"));
                }
            }
            Op::Report(_) => match status {
                200 | 409 => reports.entry(id).or_default().push((call, status)),
                404 => v(Invariant::Readable404, format!("{call}")),
                _ => v(Invariant::UnexpectedStatus, format!("{call}")),
            },
        }
    }

    for (id, handed) in &acks {
        if handed.len() > 1 {
            let calls: Vec<String> = handed.iter().map(|c| c.to_string()).collect();
            v(
                Invariant::HandedOutTwice,
                format!("{id}: {}", calls.join(" | ")),
            );
        }
    }

    for (id, reads) in &reads {
        // 3. Per poller, in its own order: never backwards; a terminal record never changes.
        let mut by_actor: HashMap<&str, Vec<&Read>> = HashMap::new();
        for read in reads {
            by_actor.entry(&read.call.actor).or_default().push(read);
        }
        for seen in by_actor.values_mut() {
            seen.sort_by_key(|r| r.call.invoked);
            for pair in seen.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                let (sa, sb) = (a.record["status"].as_str(), b.record["status"].as_str());
                let (sa, sb) = (sa.unwrap_or(""), sb.unwrap_or(""));
                if rank(sb) < rank(sa) {
                    v(
                        Invariant::WentBackwards,
                        format!("{id}: {sa} then {sb}: {}", b.call),
                    );
                }
            }
        }
        // 3. Across everyone: after a terminal read completed, every later read is the same.
        for t in reads
            .iter()
            .filter(|r| is_terminal(r.record["status"].as_str().unwrap_or("")))
        {
            for later in reads.iter().filter(|r| r.call.invoked > t.call.completed) {
                if later.record != t.record {
                    v(
                        Invariant::TerminalChanged,
                        format!("{id}: {} then {}", t.record, later.record),
                    );
                }
            }
        }
        // 5. Deadlines, from the record's own server times.
        for read in reads {
            let record = read.record;
            let status = record["status"].as_str().unwrap_or("");
            let inv = read.call.invoked;
            let pending_over = millis(record, "created_at") + limits.pending_ms;
            let lease_over = millis(record, "updated_at") + limits.running_ms;
            if status == "pending" && inv >= pending_over {
                v(
                    Invariant::DeadlineMissed,
                    format!("{id}: pending past its deadline: {}", read.call),
                );
            }
            if status == "running" && inv >= lease_over {
                v(
                    Invariant::DeadlineMissed,
                    format!("{id}: running past its lease: {}", read.call),
                );
            }
            let error = record["error"].as_str().unwrap_or("");
            if status == "timeout" && error.contains("did not respond") && acks.contains_key(id) {
                v(
                    Invariant::DeadlineMissed,
                    format!("{id}: claimed, yet timed out pending"),
                );
            }
            if status == "timeout" && error.contains("did not finish") {
                let ended_at = millis(record, "updated_at");
                for (renewal, _) in reports
                    .get(id)
                    .into_iter()
                    .flatten()
                    .filter(|(c, s)| *s == 200 && matches!(&c.op, Op::Report(b) if !ended(b)))
                {
                    if ended_at < renewal.invoked + limits.running_ms {
                        v(
                            Invariant::DeadlineMissed,
                            format!("{id}: timed out at {ended_at} despite renewal {renewal}"),
                        );
                    }
                }
            }
        }
    }

    // 4. Reports against the reads that followed them.
    for (id, reports) in &reports {
        let reads = reads.get(id).map(Vec::as_slice).unwrap_or_default();
        let accepted = |body: &Value| {
            reports
                .iter()
                .any(|(c, s)| *s == 200 && matches!(&c.op, Op::Report(b) if b == body))
        };
        for (call, status) in reports {
            let Op::Report(body) = &call.op else { continue };
            if !ended(body) {
                continue;
            }
            for later in reads.iter().filter(|r| r.call.invoked > call.completed) {
                if *status == 200 && !shows(later.record, body) {
                    v(
                        Invariant::ReportNotShown,
                        format!("{id}: {call} then read {}", later.record),
                    );
                }
                if *status == 409 && !accepted(body) && shows(later.record, body) {
                    v(
                        Invariant::ConflictChangedState,
                        format!("{id}: {call} then read {}", later.record),
                    );
                }
            }
        }
    }
    out
}
