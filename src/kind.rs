//! The kinds of request: the four questions a platform asks its daemons. Every kind shares
//! one table, one state machine and one set of routes; what differs between them is a row
//! of [`Kind::spec`]. Adding a kind is a variant here, its row, and its parsers in
//! `http::wire`: no store method, no route handler, no conformance case of its own.

use std::time::Duration;

use crate::model::{Status, Timeouts};

/// What a request asks its runtime's daemon.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The models the runtime offers.
    Models,
    /// The skills installed on the runtime's machine.
    LocalSkills,
    /// One local skill's files, to import into the platform.
    SkillImport,
    /// Update the runtime's CLI to a target version.
    Update,
}

/// How a create meets a request of its kind that is already active for the runtime.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Coalesce {
    /// The active one answers instead of a new one.
    Join,
    /// The create is refused (409) with this message.
    Refuse(&'static str),
}

/// One row of the kinds table (DESIGN.md, "Request kinds").
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// The name stored in `requests.kind`, shown as the record's `kind` and as the metrics'
    /// `kind` label.
    pub name: &'static str,
    /// The path after `/api/runtimes/{rt}/` (and `/api/daemon/runtimes/{rt}/`).
    pub path: &'static str,
    /// The heartbeat answer's field that hands a request of this kind out.
    pub ack: &'static str,
    /// The input fields the hand-out carries besides `id`.
    pub ack_fields: &'static [&'static str],
    /// The coalescing key: the input field whose value makes requests distinct (one active
    /// request per runtime and value), or none (one active request per runtime).
    pub key_field: Option<&'static str>,
    pub coalesce: Coalesce,
    /// The most one heartbeat hands out when its daemon takes batches
    /// (`supports_batch_import`); one otherwise.
    pub batch: usize,
    /// The heartbeat answer's field, an array, that hands out a batch.
    pub batch_ack: Option<&'static str>,
    /// Default deadlines, and how long an ended request stays readable.
    pub timeouts: Timeouts,
    pub retention: Duration,
    /// The timeout errors: these words, then the configured time.
    pub pending_error: &'static str,
    pub running_error: &'static str,
    /// Whether the timeout errors spell whole minutes as minutes.
    pub in_minutes: bool,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

impl Kind {
    /// Every kind, in the order of the table.
    pub const ALL: [Kind; 4] = [
        Kind::Models,
        Kind::LocalSkills,
        Kind::SkillImport,
        Kind::Update,
    ];

    pub fn spec(self) -> &'static Spec {
        &SPECS[self.index()]
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The error a request of this kind gets when it times out in `phase`.
    pub fn timeout_error(self, timeouts: &Timeouts, phase: Status) -> String {
        let spec = self.spec();
        if phase == Status::Pending {
            format!(
                "{} {}",
                spec.pending_error,
                spell(timeouts.pending, spec.in_minutes)
            )
        } else {
            format!(
                "{} {}",
                spec.running_error,
                spell(timeouts.running, spec.in_minutes)
            )
        }
    }
}

const DID_NOT_RESPOND: &str = "daemon did not respond within";
const DID_NOT_FINISH: &str = "daemon did not finish within";
/// The reference platform keeps skill lists and imports, and updates, for 5 minutes.
const FIVE_MINUTES: Duration = secs(300);

/// The kinds table, in the order of [`Kind::ALL`].
static SPECS: [Spec; 4] = [
    Spec {
        name: "models",
        path: "models",
        ack: "pending_model_list",
        ack_fields: &[],
        key_field: None,
        coalesce: Coalesce::Join,
        batch: 1,
        batch_ack: None,
        timeouts: Timeouts {
            pending: secs(30),
            running: secs(60),
        },
        retention: secs(600),
        pending_error: DID_NOT_RESPOND,
        running_error: DID_NOT_FINISH,
        in_minutes: false,
    },
    Spec {
        name: "local_skills",
        path: "local-skills",
        ack: "pending_local_skills",
        ack_fields: &[],
        key_field: None,
        coalesce: Coalesce::Join,
        batch: 1,
        batch_ack: None,
        timeouts: Timeouts {
            pending: secs(180),
            running: secs(60),
        },
        retention: FIVE_MINUTES,
        pending_error: DID_NOT_RESPOND,
        running_error: DID_NOT_FINISH,
        in_minutes: true,
    },
    Spec {
        name: "local_skill_import",
        path: "local-skills/import",
        ack: "pending_local_skill_import",
        ack_fields: &["skill_key"],
        key_field: Some("skill_key"),
        coalesce: Coalesce::Join,
        batch: 10,
        batch_ack: Some("pending_local_skill_imports"),
        timeouts: Timeouts {
            pending: secs(180),
            running: secs(60),
        },
        retention: FIVE_MINUTES,
        pending_error: DID_NOT_RESPOND,
        running_error: DID_NOT_FINISH,
        in_minutes: true,
    },
    Spec {
        name: "update",
        path: "update",
        ack: "pending_update",
        ack_fields: &["target_version"],
        key_field: None,
        coalesce: Coalesce::Refuse("an update is already in progress for this runtime"),
        batch: 1,
        batch_ack: None,
        timeouts: Timeouts {
            pending: secs(120),
            running: secs(150),
        },
        retention: FIVE_MINUTES,
        pending_error: DID_NOT_RESPOND,
        running_error: "update did not complete within",
        in_minutes: false,
    },
];

/// One value per kind, indexed by [`Kind`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PerKind<T>([T; 4]);

impl<T: Copy> PerKind<T> {
    /// The same value for every kind.
    pub fn all(value: T) -> Self {
        PerKind([value; 4])
    }

    pub fn from_fn(f: impl Fn(Kind) -> T) -> Self {
        PerKind(Kind::ALL.map(f))
    }

    pub fn of(&self, kind: Kind) -> T {
        self.0[kind.index()]
    }

    pub fn set(&mut self, kind: Kind, value: T) {
        self.0[kind.index()] = value;
    }
}

impl PerKind<Timeouts> {
    /// Every kind's deadlines as the kinds table has them.
    pub fn defaults() -> Self {
        PerKind::from_fn(|k| k.spec().timeouts)
    }
}

impl Default for PerKind<Timeouts> {
    fn default() -> Self {
        Self::defaults()
    }
}

/// One value where a value per kind is asked for means it for every kind (tests and tools
/// that set one pair of timeouts, or one retention).
impl<T: Copy> From<T> for PerKind<T> {
    fn from(value: T) -> Self {
        PerKind::all(value)
    }
}

impl PerKind<Duration> {
    /// Every kind's retention as the kinds table has it.
    pub fn retentions() -> Self {
        PerKind::from_fn(|k| k.spec().retention)
    }
}

fn spell(d: Duration, in_minutes: bool) -> String {
    match (d.as_secs(), d.subsec_millis()) {
        (60, 0) if in_minutes => "1 minute".to_owned(),
        (s, 0) if in_minutes && s % 60 == 0 && s > 0 => format!("{} minutes", s / 60),
        (1, 0) => "1 second".to_owned(),
        (s, 0) => format!("{s} seconds"),
        _ => format!("{} milliseconds", d.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_table_is_in_order() {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(Kind::parse(kind.name()), Some(kind));
        }
        assert_eq!(Kind::parse("model"), None);
    }

    #[test]
    fn timeout_errors_name_the_configured_time_in_the_kinds_unit() {
        let t = |k: Kind| k.spec().timeouts;
        let error = |k: Kind, phase| k.timeout_error(&t(k), phase);
        assert_eq!(
            error(Kind::Models, Status::Pending),
            "daemon did not respond within 30 seconds"
        );
        assert_eq!(
            error(Kind::Models, Status::Running),
            "daemon did not finish within 60 seconds"
        );
        assert_eq!(
            error(Kind::LocalSkills, Status::Pending),
            "daemon did not respond within 3 minutes"
        );
        assert_eq!(
            error(Kind::SkillImport, Status::Running),
            "daemon did not finish within 1 minute"
        );
        assert_eq!(
            error(Kind::Update, Status::Pending),
            "daemon did not respond within 120 seconds"
        );
        assert_eq!(
            error(Kind::Update, Status::Running),
            "update did not complete within 150 seconds"
        );
        let odd = Timeouts {
            pending: Duration::from_secs(90),
            running: Duration::from_millis(1500),
        };
        assert_eq!(
            Kind::LocalSkills.timeout_error(&odd, Status::Pending),
            "daemon did not respond within 90 seconds"
        );
        assert_eq!(
            Kind::LocalSkills.timeout_error(&odd, Status::Running),
            "daemon did not finish within 1500 milliseconds"
        );
    }
}
