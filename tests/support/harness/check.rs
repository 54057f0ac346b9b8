//! The invariants of DESIGN.md, checked on a recorded history of calls. Pure: a history
//! in, the violations out. Each check names the invariant it guards.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Value, json};

use model_relay::kind::Kind;

use super::{Call, Op, handed_out};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Invariant {
    /// 1. An id a create returned read 404 somewhere, while it should be readable.
    Readable404,
    /// 2. One request in more than one heartbeat ack, the later one to a heartbeat whose
    ///    `working_on` did not leave it out.
    HandedOutTwice,
    /// 3. A poller saw statuses go backwards.
    WentBackwards,
    /// 3. A terminal status (or its record) changed.
    TerminalChanged,
    /// 4. A report answered 200 is not what a later read shows.
    ReportNotShown,
    /// 4. A report answered 409 shows up anyway.
    ConflictChangedState,
    /// 4. An answer from the catalog older than a report of its runtime that had already
    ///    been answered 200 when the answer was asked for.
    CachedTooOld,
    /// 5. A read shows a request active past its deadline, or a timeout that should not be.
    DeadlineMissed,
    /// 6. A call crossed a runtime boundary.
    CrossedBoundary,
    /// 7. A 5xx other than `runtime is offline` on create.
    Unexpected5xx,
    /// 7. A 4xx on a valid call.
    UnexpectedStatus,
    /// 8. A waiting call answered before its wait ended with nothing changed (and not by
    ///    a shutdown of its instance).
    AnsweredUnchanged,
    /// 8. A waiting call still held `LATE_MS` after a change it waits for: a claim or an
    ///    end of its request, or a new pending request of its runtime nobody claimed.
    NotWoken,
}

/// How long after a change a waiting call may still be held: the once-a-second re-check
/// bounds it at about a second even when every notification is lost, and a broken wake-up
/// shows as the whole wait.
pub const LATE_MS: i64 = 3_000;
/// Timers and clocks: a held call that answers this much before its wait is early.
const EARLY_MS: i64 = 20;

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

/// Whether `record` shows the end that report `body` sent: a model list's models and
/// `supported`, or every result field another kind's report sent.
pub fn shows(record: &Value, body: &Value) -> bool {
    let same_end = record["status"] == body["status"] && record.get("error") == body.get("error");
    if record["kind"] != "models" {
        let fields = body.as_object().into_iter().flatten();
        let result = fields.filter(|(field, _)| !["status", "error"].contains(&field.as_str()));
        return same_end
            && result
                .into_iter()
                .all(|(field, value)| record.get(field) == Some(value));
    }
    let models = |v: &Value| v.get("models").cloned().unwrap_or(json!([]));
    same_end
        && models(record) == models(body)
        && record["supported"] == body.get("supported").cloned().unwrap_or(json!(true))
}

fn ended(body: &Value) -> bool {
    body["status"] != "running"
}

pub fn check(history: &[Call], limits: Limits) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut v = |invariant, detail: String| out.push(Violation { invariant, detail });
    let mut reads: HashMap<&str, Vec<Read>> = HashMap::new();
    let mut acks: HashMap<String, Vec<&Call>> = HashMap::new();
    let mut reports: HashMap<&str, Vec<(&Call, u16)>> = HashMap::new();

    // Status codes, boundaries, and the collections the later checks need.
    let restarts: Vec<&Call> = history.iter().filter(|c| c.op == Op::Restart).collect();
    // Whether `call` was on an instance that restarted while it was held.
    let restarted = |call: &Call| {
        restarts.iter().any(|r| {
            r.instance == call.instance
                && r.invoked <= call.completed
                && call.invoked <= r.completed
        })
    };
    for call in history {
        if call.op == Op::Restart {
            continue;
        }
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
                } else if !handed_out(json).is_empty() {
                    for claimed in handed_out(json) {
                        acks.entry(claimed).or_default().push(call);
                    }
                } else if call.wait_ms > 0
                    && call.completed - call.invoked < call.wait_ms as i64 - EARLY_MS
                    && !restarted(call)
                {
                    v(Invariant::AnsweredUnchanged, format!("{call}"));
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
                // DESIGN.md: a second update while one is active.
                409 if call.op == Op::Create
                    && call.kind == Some(Kind::Update)
                    && json["error"] == "an update is already in progress for this runtime" => {}
                _ => v(Invariant::UnexpectedStatus, format!("{call}")),
            },
            Op::Restart => {}
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

    for (id, handed) in acks.iter_mut() {
        handed.sort_by_key(|c| c.invoked);
        // After the first, only a heartbeat whose working_on says it does not hold the
        // request may be handed it again.
        for again in handed.iter().skip(1) {
            let lost = again
                .working_on
                .as_ref()
                .is_some_and(|held| !held.iter().any(|h| h == id));
            if !lost {
                let calls: Vec<String> = handed.iter().map(|c| c.to_string()).collect();
                v(
                    Invariant::HandedOutTwice,
                    format!("{id}: {}", calls.join(" | ")),
                );
                break;
            }
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
                // 8. A waiting read that came back early must show a change (a read of
                // an ended request is answered at once).
                let early = b.call.completed - b.call.invoked < b.call.wait_ms as i64 - EARLY_MS;
                if b.call.wait_ms > 0 && early && sa == sb && !is_terminal(sa) && !restarted(b.call)
                {
                    v(
                        Invariant::AnsweredUnchanged,
                        format!("{id}: {sa} again: {}", b.call),
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
            if status == "timeout" && error.contains("did not respond") && acks.contains_key(*id) {
                v(
                    Invariant::DeadlineMissed,
                    format!("{id}: claimed, yet timed out pending"),
                );
            }
            if status == "timeout"
                && (error.contains("did not finish") || error.contains("did not complete"))
            {
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

    // 8. Waiting reads held well past a change of their request: its first hand-out, or a
    // report that ended it.
    for (id, reads) in &reads {
        let mut changes: Vec<i64> = acks
            .get(*id)
            .and_then(|handed| handed.first())
            .map(|first| first.completed)
            .into_iter()
            .collect();
        changes.extend(
            reports
                .get(id)
                .into_iter()
                .flatten()
                .filter(|(c, s)| *s == 200 && matches!(&c.op, Op::Report(b) if ended(b)))
                .map(|(c, _)| c.completed),
        );
        for read in reads.iter().filter(|r| r.call.wait_ms > 0) {
            if let Some(change) = changes
                .iter()
                .find(|&&t| read.call.invoked < t && read.call.completed > t + LATE_MS)
            {
                v(
                    Invariant::NotWoken,
                    format!("{id}: changed at {change}, still held: {}", read.call),
                );
            }
        }
    }
    // 8. Held heartbeats that claimed nothing, held well past a create of a new pending
    // request of their runtime that nobody was handed. (Skipped for a runtime whose daemon
    // dropped a heartbeat: the server may have handed it the request, unseen.)
    let mut first_creates: HashMap<&str, &Call> = HashMap::new();
    for call in history.iter().filter(|c| c.op == Op::Create) {
        if let (Some(id), Ok((200, json))) = (call.request.as_deref(), &call.outcome)
            && json["status"] == "pending"
        {
            let first = first_creates.entry(id).or_insert(call);
            if call.completed < first.completed {
                *first = call;
            }
        }
    }
    for held in history.iter().filter(|c| {
        c.op == Op::Heartbeat
            && c.wait_ms > 0
            && matches!(&c.outcome, Ok((200, json)) if handed_out(json).is_empty())
    }) {
        let dropped = history.iter().any(|c| {
            c.op == Op::Heartbeat
                && c.runtime == held.runtime
                && c.outcome.is_err()
                && c.invoked < held.completed
        });
        if dropped {
            continue;
        }
        for (id, create) in &first_creates {
            if create.runtime == held.runtime
                && !acks.contains_key(*id)
                && held.invoked < create.completed
                && held.completed > create.completed + LATE_MS
            {
                v(
                    Invariant::NotWoken,
                    format!("{id} created {create}, nobody handed it, while held: {held}"),
                );
            }
        }
    }

    // 4. Answers from the catalog against the reports of their runtime that ended before
    // they were asked for: the catalog they show was reported no earlier than the first
    // attempt at the newest such report (a report that found models writes the catalog,
    // one that found none removes it; failed and stand-in reports leave it).
    let mut first_attempts: HashMap<&str, i64> = HashMap::new();
    for call in history.iter().filter(|c| matches!(c.op, Op::Report(_))) {
        let id = call.request.as_deref().unwrap_or("");
        let first = first_attempts.entry(id).or_insert(call.invoked);
        *first = (*first).min(call.invoked);
    }
    let catalog_reports: Vec<(&Call, i64)> = history
        .iter()
        .filter(|c| {
            c.kind == Some(Kind::Models)
                && matches!(&c.op, Op::Report(b) if b["status"] == "completed" && b["fallback"] != true)
                && matches!(c.outcome, Ok((200, _)))
        })
        .map(|c| (c, first_attempts[c.request.as_deref().unwrap_or("")]))
        .collect();
    for create in history.iter().filter(|c| c.op == Op::Create) {
        let Ok((200, json)) = &create.outcome else {
            continue;
        };
        if json["cached"] != true {
            continue;
        }
        let cached_at = millis(json, "cached_at");
        for (report, attempted) in &catalog_reports {
            if report.runtime == create.runtime
                && report.completed < create.invoked
                && cached_at < *attempted
            {
                v(Invariant::CachedTooOld, format!("{create} after {report}"));
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
