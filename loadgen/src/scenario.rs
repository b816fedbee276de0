//! Scenario files (`loadgen/scenarios/*.toml`): what to send, how fast, for how
//! long, and which faults to inject when. Every field has a default; [`Scenario::load`]
//! refuses a bad file with an error naming the field, e.g.
//! `put.toml: load.rate: must be > 0 with load.model = "open"`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a scenario was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{file}: cannot read: {message}")]
    Read { file: String, message: String },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

impl ScenarioError {
    /// The dotted path of the bad field, when the error names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ScenarioError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A span of time: a number of seconds, or a string such as `"500ms"`, `"10s"`,
/// `"2m"`. Written back (in reports) as seconds.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Secs(pub f64);

impl Secs {
    pub fn duration(self) -> Duration {
        Duration::from_secs_f64(self.0.max(0.0))
    }
}

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}s", self.0)
    }
}

/// Parses `"250ms"`, `"10s"`, `"1.5m"`, `"1h"` or a bare number of seconds.
pub fn parse_secs(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. \"500ms\", \"10s\", \"2m\")"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m or h)"
            ));
        }
    };
    Ok(n * scale)
}

impl Serialize for Secs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secs, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Secs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("seconds, or a duration such as \"500ms\", \"10s\", \"2m\"")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Secs, E> {
                Ok(Secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secs, E> {
                Ok(Secs(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secs, E> {
                Ok(Secs(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secs, E> {
                parse_secs(v).map(Secs).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// `clients` clients, each sending its next request when the last returns.
    #[default]
    Closed,
    /// A fixed `rate` of requests per second over `clients` clients; latency counts
    /// from each request's intended start (coordinated omission corrected).
    Open,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Load {
    pub model: Model,
    /// Closed: concurrent clients. Open: the most requests in flight at once (each
    /// client sends its share of the schedule, one request at a time).
    pub clients: usize,
    /// gRPC connections the clients share (round-robin over the endpoints).
    pub connections: usize,
    /// Open model: requests per second, over all clients.
    pub rate: f64,
    /// Measured time (after the warm-up). Default 10 s unless `requests` is set.
    pub duration: Option<Secs>,
    /// Measured requests instead of a duration.
    pub requests: Option<u64>,
    /// Load before measuring starts, not recorded.
    pub warmup: Secs,
    /// Deadline of one request; past it the request counts as DeadlineExceeded.
    pub timeout: Secs,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            model: Model::Closed,
            clients: 64,
            connections: 8,
            rate: 0.0,
            duration: None,
            requests: None,
            warmup: Secs(2.0),
            timeout: Secs(5.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    #[default]
    Uniform,
    /// Zipf over the key space: key 0 is the hottest.
    Zipf,
    /// Key 0, 1, 2, … over all clients, wrapping at the end of the space: every
    /// write makes a new key until the space is full (a keyspace that grows).
    Sequential,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keys {
    /// Prefix of every key (after `/<tenant>` when there are tenants).
    pub prefix: String,
    /// Distinct keys (per tenant).
    pub space: u64,
    /// Key length in bytes: the key number is zero-padded to reach it. Default: a
    /// 12-digit number after the prefix.
    pub size: Option<usize>,
    pub distribution: Distribution,
    /// Zipf exponent (`distribution = "zipf"`).
    pub zipf_exponent: f64,
    pub value_size: usize,
    /// Write the key space before the run. Default: yes for workloads that read.
    pub preload: Option<bool>,
    /// At most this many keys (over all tenants) are preloaded.
    pub preload_limit: u64,
}

impl Default for Keys {
    fn default() -> Keys {
        Keys {
            prefix: "/bench/".into(),
            space: 10_000,
            size: None,
            distribution: Distribution::Uniform,
            zipf_exponent: 0.99,
            value_size: 256,
            preload: None,
            preload_limit: 100_000,
        }
    }
}

/// The request mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    #[default]
    Put,
    Get,
    /// `read_ratio` gets, the rest puts.
    Mixed,
    /// Compare-and-swap: a txn comparing the key's mod revision with the last one
    /// this client saw, putting on success and reading the key back on failure.
    TxnCas,
    /// Service discovery (`cellplane.discovery.v1`): register, heartbeat and
    /// resolve instances, in the `[discovery]` mix.
    Discovery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    #[default]
    Linearizable,
    Serializable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub op: Op,
    /// Reads: linearizable (ReadIndex) or serializable (local).
    pub consistency: Consistency,
    /// `op = "mixed"`: the share of reads, 0 to 1.
    pub read_ratio: f64,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            op: Op::Put,
            consistency: Consistency::Linearizable,
            read_ratio: 0.9,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// Watch the written keys and read every event; delivery latency is measured
    /// from the write (the value carries the time it was sent).
    #[default]
    Active,
    /// Watch keys nobody writes (`watches_per_stream` watches per stream).
    Idle,
    /// Watch the written keys and never read the stream.
    Stalled,
}

/// Watchers opened before the load starts (watch fan-out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Watch {
    pub watchers: usize,
    pub mode: WatchMode,
    /// Connections the watchers use, apart from the clients' connections.
    pub connections: usize,
    /// Idle mode: watches per watch stream (the others use one each).
    pub watches_per_stream: usize,
    /// HTTP/2 flow control of the watchers' connections: what a client that
    /// never reads lets the server send before the server sees it stall.
    pub flow: Flow,
}

impl Default for Watch {
    fn default() -> Watch {
        Watch {
            watchers: 0,
            mode: WatchMode::Active,
            connections: 16,
            watches_per_stream: 100,
            flow: Flow::Default,
        }
    }
}

/// HTTP/2 flow-control windows of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    /// hyper's client defaults: 2 MiB per stream, 5 MiB per connection, fixed.
    #[default]
    Default,
    /// Windows grown from the measured bandwidth-delay product (up to 16 MiB),
    /// as grpc-go and gRPC C-core (Python, C++) clients do by default: a stream
    /// nobody reads takes far more before the server's writes block.
    Adaptive,
}

/// The discovery workload: `keys.space` instances (per tenant, whose name is the
/// namespace) spread over `services` services, registered with a TTL before the
/// run; each request registers again, heartbeats or resolves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    pub services: u64,
    /// The instances' TTL: a run longer than it needs every instance heartbeated
    /// within it (heartbeats pick instances at random).
    pub ttl_seconds: i64,
    /// Shares of registers and heartbeats; the rest are resolves.
    pub register_ratio: f64,
    pub heartbeat_ratio: f64,
    /// Resolve only healthy instances.
    pub healthy_only: bool,
}

impl Default for Discovery {
    fn default() -> Discovery {
        Discovery {
            services: 10,
            ttl_seconds: 60,
            register_ratio: 0.05,
            heartbeat_ratio: 0.25,
            healthy_only: true,
        }
    }
}

/// Tenants: each request picks one uniformly; its keys are `/<tenant><prefix>…`, so
/// a router sends it to the tenant's cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tenants {
    /// Explicit tenant names.
    pub names: Vec<String>,
    /// Or this many generated names: `<prefix>000`, `<prefix>001`, …
    pub count: usize,
    pub prefix: String,
}

impl Default for Tenants {
    fn default() -> Tenants {
        Tenants {
            names: Vec::new(),
            count: 0,
            prefix: "tenant-".into(),
        }
    }
}

impl Tenants {
    pub fn resolve(&self) -> Vec<String> {
        if !self.names.is_empty() {
            return self.names.clone();
        }
        (0..self.count)
            .map(|i| format!("{}{i:03}", self.prefix))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultAction {
    /// SIGKILL.
    Kill,
    /// SIGSTOP.
    Pause,
    /// SIGCONT.
    Resume,
    /// Start a killed process again (a running one is killed first).
    Restart,
    /// Move a tenant and its keys to another cell (`cellplane tenant move`).
    Move,
}

impl FaultAction {
    pub fn name(self) -> &'static str {
        match self {
            FaultAction::Kill => "kill",
            FaultAction::Pause => "pause",
            FaultAction::Resume => "resume",
            FaultAction::Restart => "restart",
            FaultAction::Move => "move",
        }
    }
}

/// One fault, applied to an environment started by `cellplane up` (its
/// `up.json`): a member (`cell` + `member`), a whole cell (`cell`), or a router.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// When, counted from the start of measurement (after the warm-up).
    pub at: Secs,
    pub action: FaultAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<u64>,
    /// `move`: the tenant to move, and the cell to move it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl Fault {
    /// `cell beta`, `member beta/2`, `router 1`.
    pub fn target_label(&self) -> String {
        if let (Some(t), Some(to)) = (&self.tenant, &self.to) {
            return format!("tenant {t} to {to}");
        }
        match (&self.cell, self.member, self.router) {
            (Some(c), Some(m), _) => format!("member {c}/{m}"),
            (Some(c), None, _) => format!("cell {c}"),
            (None, _, Some(r)) => format!("router {r}"),
            _ => "nothing".into(),
        }
    }
}

/// A scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Default: the file's name without `.toml`.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seed of every client's random choices: runs are repeatable.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub load: Load,
    #[serde(default)]
    pub keys: Keys,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub watch: Watch,
    #[serde(default)]
    pub tenants: Tenants,
    #[serde(default)]
    pub discovery: Discovery,
    #[serde(default)]
    pub faults: Vec<Fault>,
}

impl Default for Scenario {
    fn default() -> Scenario {
        Scenario {
            name: "scenario".into(),
            description: String::new(),
            seed: 0,
            load: Load::default(),
            keys: Keys::default(),
            workload: Workload::default(),
            watch: Watch::default(),
            tenants: Tenants::default(),
            discovery: Discovery::default(),
            faults: Vec::new(),
        }
    }
}

impl Scenario {
    /// Reads, overrides (`--set load.clients=256`) and validates a scenario file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Read {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Scenario::parse(&text, &file, &stem, overrides)
    }

    /// Parses scenario text; `file` names it in errors, `default_name` fills `name`.
    pub fn parse(
        text: &str,
        file: &str,
        default_name: &str,
        overrides: &[String],
    ) -> Result<Scenario, ScenarioError> {
        let parse_err = |message: String| ScenarioError::Parse {
            file: file.to_string(),
            message,
        };
        let text = if overrides.is_empty() {
            text.to_string()
        } else {
            let mut table: toml::Table =
                toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            toml::to_string(&table).map_err(|e| parse_err(e.to_string()))?
        };
        let de = toml::de::Deserializer::parse(&text).map_err(|e| parse_err(e.to_string()))?;
        let mut s: Scenario = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().message().trim().to_string();
            if path.is_empty() || path == "." {
                parse_err(inner)
            } else {
                ScenarioError::Invalid {
                    file: file.to_string(),
                    field: path,
                    message: inner,
                }
            }
        })?;
        if s.name.is_empty() {
            s.name = default_name.to_string();
        }
        s.validate()
            .map_err(|(field, message)| ScenarioError::Invalid {
                file: file.to_string(),
                field,
                message,
            })?;
        Ok(s)
    }

    /// The measured duration, when the run is bounded by time.
    pub fn duration(&self) -> Option<Duration> {
        match (self.load.duration, self.load.requests) {
            (Some(d), _) => Some(d.duration()),
            (None, None) => Some(Duration::from_secs(10)),
            (None, Some(n)) if self.load.model == Model::Open => {
                Some(Duration::from_secs_f64(n as f64 / self.load.rate))
            }
            (None, Some(_)) => None,
        }
    }

    /// Whether the keys are written before the run.
    pub fn preload(&self) -> bool {
        self.keys
            .preload
            .unwrap_or(!matches!(self.workload.op, Op::Put))
    }

    /// Checks the scenario; the error names the bad field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((field.to_string(), message));
        let l = &self.load;
        if l.clients == 0 {
            return bad("load.clients", "must be > 0".into());
        }
        if l.connections == 0 {
            return bad("load.connections", "must be > 0".into());
        }
        match l.model {
            Model::Open if !(l.rate > 0.0 && l.rate.is_finite()) => {
                return bad("load.rate", "must be > 0 with load.model = \"open\"".into());
            }
            Model::Closed if l.rate != 0.0 => {
                return bad(
                    "load.rate",
                    "only the open model has a rate (set load.model = \"open\")".into(),
                );
            }
            _ => {}
        }
        if l.duration.is_some() && l.requests.is_some() {
            return bad(
                "load.requests",
                "set either load.duration or load.requests, not both".into(),
            );
        }
        if let Some(d) = l.duration
            && !(d.0 > 0.0 && d.0.is_finite())
        {
            return bad("load.duration", "must be > 0".into());
        }
        if l.requests == Some(0) {
            return bad("load.requests", "must be > 0".into());
        }
        if !(l.warmup.0 >= 0.0 && l.warmup.0.is_finite()) {
            return bad("load.warmup", "must be >= 0".into());
        }
        if !(l.timeout.0 > 0.0 && l.timeout.0.is_finite()) {
            return bad("load.timeout", "must be > 0".into());
        }
        let k = &self.keys;
        if k.space == 0 {
            return bad("keys.space", "must be > 0".into());
        }
        let digits = (k.space - 1).to_string().len();
        if let Some(size) = k.size
            && size < k.prefix.len() + digits
        {
            return bad(
                "keys.size",
                format!(
                    "must be at least {} (the prefix, {} bytes, and the widest key number, {digits} digits)",
                    k.prefix.len() + digits,
                    k.prefix.len()
                ),
            );
        }
        if k.distribution == Distribution::Zipf
            && !(k.zipf_exponent > 0.0 && k.zipf_exponent.is_finite())
        {
            return bad("keys.zipf_exponent", "must be > 0".into());
        }
        if k.value_size > 1024 * 1024 {
            return bad("keys.value_size", "must be at most 1 MiB".into());
        }
        if self.workload.op == Op::Mixed && !(0.0..=1.0).contains(&self.workload.read_ratio) {
            return bad("workload.read_ratio", "must be between 0 and 1".into());
        }
        let d = &self.discovery;
        if self.workload.op == Op::Discovery {
            if d.services == 0 {
                return bad("discovery.services", "must be > 0".into());
            }
            if d.ttl_seconds <= 0 {
                return bad("discovery.ttl_seconds", "must be > 0".into());
            }
            for (field, v) in [
                ("discovery.register_ratio", d.register_ratio),
                ("discovery.heartbeat_ratio", d.heartbeat_ratio),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    return bad(field, "must be between 0 and 1".into());
                }
            }
            if d.register_ratio + d.heartbeat_ratio > 1.0 {
                return bad(
                    "discovery.heartbeat_ratio",
                    "discovery.register_ratio + discovery.heartbeat_ratio must be at most 1 (the rest are resolves)".into(),
                );
            }
        }
        let w = &self.watch;
        if w.watchers > 0 {
            if w.connections == 0 {
                return bad("watch.connections", "must be > 0".into());
            }
            if w.watches_per_stream == 0 {
                return bad("watch.watches_per_stream", "must be > 0".into());
            }
            if w.mode == WatchMode::Active && k.value_size < 8 {
                return bad(
                    "keys.value_size",
                    "must be at least 8 with watch.mode = \"active\": the value carries the write's send time".into(),
                );
            }
            if w.mode != WatchMode::Idle && !matches!(self.workload.op, Op::Put | Op::Mixed) {
                return bad(
                    "watch.mode",
                    "active and stalled watchers watch the written keys: use workload.op = \"put\" or \"mixed\"".into(),
                );
            }
        }
        let t = &self.tenants;
        if !t.names.is_empty() && t.count > 0 {
            return bad(
                "tenants.count",
                "set either tenants.names or tenants.count, not both".into(),
            );
        }
        for (i, n) in t.resolve().iter().enumerate() {
            if n.is_empty() || n.contains('/') {
                return bad(
                    &format!("tenants.names[{i}]"),
                    format!("{n:?}: a tenant name is non-empty and has no '/'"),
                );
            }
        }
        let tenant_count = t.resolve().len();
        if tenant_count > l.clients {
            return bad(
                "load.clients",
                format!(
                    "must be at least the number of tenants ({tenant_count}): each tenant has clients of its own"
                ),
            );
        }
        if tenant_count > 0 && !k.prefix.starts_with('/') {
            return bad(
                "keys.prefix",
                "must start with '/' when there are tenants (keys are /<tenant><prefix>…)".into(),
            );
        }
        let duration = self.duration();
        for (i, f) in self.faults.iter().enumerate() {
            let field = |name: &str| format!("faults[{i}].{name}");
            if !(f.at.0 >= 0.0 && f.at.0.is_finite()) {
                return bad(&field("at"), "must be >= 0".into());
            }
            if let Some(d) = duration
                && f.at.duration() >= d
            {
                return bad(
                    &field("at"),
                    format!(
                        "{} is not before the end of the measured run ({}s)",
                        f.at,
                        d.as_secs_f64()
                    ),
                );
            }
            if f.action == FaultAction::Move {
                if f.cell.is_some() || f.member.is_some() || f.router.is_some() {
                    return bad(
                        &field("cell"),
                        "a move names a tenant and the cell it goes to (tenant, to), not a \
                         process"
                            .into(),
                    );
                }
                match (&f.tenant, &f.to) {
                    (Some(t), Some(to)) if !t.is_empty() && !to.is_empty() => continue,
                    (Some(t), _) if !t.is_empty() => {
                        return bad(&field("to"), "name the cell to move the tenant to".into());
                    }
                    _ => return bad(&field("tenant"), "name the tenant to move".into()),
                }
            }
            if f.tenant.is_some() || f.to.is_some() {
                return bad(&field("tenant"), "only a move names a tenant".into());
            }
            match (&f.cell, f.member, f.router) {
                (Some(_), _, Some(_)) => {
                    return bad(&field("router"), "name a cell or a router, not both".into());
                }
                (None, None, None) => {
                    return bad(&field("cell"), "name the cell (or router) to act on".into());
                }
                (None, Some(_), _) => {
                    return bad(
                        &field("member"),
                        "a member needs its cell (faults[].cell)".into(),
                    );
                }
                (Some(c), _, _) if c.is_empty() => {
                    return bad(&field("cell"), "must not be empty".into());
                }
                _ => {}
            }
            if f.member == Some(0) {
                return bad(&field("member"), "member ids start at 1".into());
            }
        }
        Ok(())
    }
}

/// Applies `a.b.c=value` to a TOML table; `value` is read as TOML (`256`, `0.5`,
/// `"zipf"`, `true`), else taken as a string.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ScenarioError> {
    let err = |message: &str| ScenarioError::Override {
        arg: arg.to_string(),
        message: message.to_string(),
    };
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected FIELD=VALUE, e.g. load.clients=256"))?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = path.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("empty field name"));
    }
    let mut here = table;
    for p in &parts[..parts.len() - 1] {
        let entry = here
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        here = entry
            .as_table_mut()
            .ok_or_else(|| err(&format!("`{p}` is not a table")))?;
    }
    here.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(text, "s.toml", "s", &[])
    }

    fn field_of(text: &str) -> String {
        let e = parse(text).expect_err("should be refused");
        let msg = e.to_string();
        assert!(msg.starts_with("s.toml: "), "{msg}");
        e.field().map(str::to_string).unwrap_or(msg)
    }

    #[test]
    fn a_move_names_a_tenant_and_a_cell_and_nothing_else() {
        let s = parse("[[faults]]\nat = 1\naction = \"move\"\ntenant = \"a\"\nto = \"beta\"\n")
            .unwrap();
        assert_eq!(s.faults[0].target_label(), "tenant a to beta");
        assert_eq!(
            field_of("[[faults]]\nat = 1\naction = \"move\"\ntenant = \"a\"\n"),
            "faults[0].to"
        );
        assert_eq!(
            field_of("[[faults]]\nat = 1\naction = \"move\"\nto = \"beta\"\n"),
            "faults[0].tenant"
        );
        assert_eq!(
            field_of(
                "[[faults]]\nat = 1\naction = \"move\"\ntenant = \"a\"\nto = \"b\"\ncell = \"x\"\n"
            ),
            "faults[0].cell"
        );
        assert_eq!(
            field_of("[[faults]]\nat = 1\naction = \"kill\"\ncell = \"x\"\ntenant = \"a\"\n"),
            "faults[0].tenant"
        );
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let s = parse("").unwrap();
        assert_eq!(s.name, "s");
        assert_eq!(s.load.clients, 64);
        assert_eq!(s.duration(), Some(Duration::from_secs(10)));
        assert!(!s.preload());
    }

    #[test]
    fn durations_accept_numbers_and_units() {
        let s = parse("[load]\nduration = \"1.5m\"\nwarmup = 0.5\ntimeout = \"250ms\"\n").unwrap();
        assert_eq!(s.load.duration, Some(Secs(90.0)));
        assert_eq!(s.load.warmup, Secs(0.5));
        assert_eq!(s.load.timeout, Secs(0.25));
        let e = parse("[load]\nduration = \"10 parsecs\"\n").unwrap_err();
        assert_eq!(e.field(), Some("load.duration"), "{e}");
    }

    #[test]
    fn errors_name_the_bad_field() {
        assert_eq!(field_of("[load]\nmodel = \"open\"\n"), "load.rate");
        assert_eq!(
            field_of("[load]\nmodel = \"open\"\nrate = -5\n"),
            "load.rate"
        );
        assert_eq!(field_of("[load]\nclients = 0\n"), "load.clients");
        assert_eq!(field_of("[load]\nclients = \"many\"\n"), "load.clients");
        assert_eq!(
            field_of("[load]\nduration = 5\nrequests = 10\n"),
            "load.requests"
        );
        assert_eq!(field_of("[keys]\nspace = 0\n"), "keys.space");
        assert_eq!(field_of("[keys]\nsize = 4\n"), "keys.size");
        assert_eq!(field_of("[workload]\nop = \"delete\"\n"), "workload.op");
        assert_eq!(
            field_of("[workload]\nop = \"mixed\"\nread_ratio = 1.5\n"),
            "workload.read_ratio"
        );
        assert_eq!(
            field_of("[watch]\nwatchers = 10\n[keys]\nvalue_size = 4\n"),
            "keys.value_size"
        );
        assert_eq!(
            field_of("[tenants]\nnames = [\"a/b\"]\n"),
            "tenants.names[0]"
        );
        assert_eq!(
            field_of(
                "[workload]\nop = \"discovery\"\n[discovery]\nregister_ratio = 0.8\nheartbeat_ratio = 0.5\n"
            ),
            "discovery.heartbeat_ratio"
        );
        assert_eq!(
            field_of("[[faults]]\nat = \"20s\"\naction = \"kill\"\ncell = \"beta\"\n"),
            "faults[0].at"
        );
        assert_eq!(
            field_of("[[faults]]\nat = 1\naction = \"kill\"\nmember = 2\n"),
            "faults[0].member"
        );
        assert_eq!(
            field_of("[[faults]]\nat = 1\naction = \"explode\"\ncell = \"beta\"\n"),
            "faults[0].action"
        );
        // Unknown fields are refused by name, with the fields that exist.
        let e = parse("[load]\nrat = 5\n").unwrap_err();
        assert_eq!(e.field(), Some("load.rat"), "{e}");
        assert!(e.to_string().contains("`rate`"), "{e}");
    }

    #[test]
    fn the_message_reads_like_the_issue_asks() {
        let e = parse("[load]\nmodel = \"open\"\nrate = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.toml: load.rate: must be > 0 with load.model = \"open\""
        );
    }

    #[test]
    fn overrides_apply_before_validation() {
        let s = Scenario::parse(
            "[load]\nclients = 4\n",
            "s.toml",
            "s",
            &[
                "load.clients=256".into(),
                "workload.op=get".into(),
                "keys.prefix=/a/x/".into(),
            ],
        )
        .unwrap();
        assert_eq!(s.load.clients, 256);
        assert_eq!(s.workload.op, Op::Get);
        assert_eq!(s.keys.prefix, "/a/x/");
        let e = Scenario::parse("", "s.toml", "s", &["load.clients=0".into()]).unwrap_err();
        assert_eq!(e.field(), Some("load.clients"));
        assert!(Scenario::parse("", "s.toml", "s", &["nonsense".into()]).is_err());
    }

    #[test]
    fn open_loop_request_count_sets_the_duration() {
        let s = parse("[load]\nmodel = \"open\"\nrate = 100\nrequests = 500\n").unwrap();
        assert_eq!(s.duration(), Some(Duration::from_secs(5)));
        let s = parse("[load]\nrequests = 500\n").unwrap();
        assert_eq!(s.duration(), None);
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 7, "found {n} scenarios in {}", dir.display());
    }
}
