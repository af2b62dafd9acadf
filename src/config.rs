//! The job configuration: a TOML file plus `section.key=value` overrides, checked against the
//! documented reference (configs/reference.toml) so that a misspelt key is an error that names
//! the key it was probably meant to be.

use phalanx_model::config::{Arch, ModelConfig};
use phalanx_model::optim::OptimConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The documented reference config; its keys are the only keys accepted.
pub const REFERENCE: &str = include_str!("../configs/reference.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error(
        "unknown key `{key}` in {origin}{hint}; every key is listed in configs/reference.toml"
    )]
    UnknownKey {
        key: String,
        origin: String,
        hint: String,
    },
    #[error("override {0:?} is not of the form section.key=value (e.g. train.max_steps=100)")]
    BadOverride(String),
    #[error("invalid value {key} = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: "data/shakespeare-char".into(),
        }
    }
}

/// A preset plus optional per-field overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub preset: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_layer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_head: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_embd: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp_hidden: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            preset: "tiny".into(),
            arch: None,
            n_layer: None,
            n_head: None,
            n_embd: None,
            block_size: None,
            dropout: None,
            bias: None,
            mlp_hidden: None,
            rope_theta: None,
            norm_eps: None,
        }
    }
}

impl ModelSection {
    /// The preset with the overrides applied and the dataset's vocabulary size.
    pub fn resolve(&self, vocab_size: usize) -> Result<ModelConfig, phalanx_model::ModelError> {
        let mut c = ModelConfig::preset(&self.preset)?;
        c.arch = self.arch.unwrap_or(c.arch);
        c.n_layer = self.n_layer.unwrap_or(c.n_layer);
        c.n_head = self.n_head.unwrap_or(c.n_head);
        c.n_embd = self.n_embd.unwrap_or(c.n_embd);
        c.block_size = self.block_size.unwrap_or(c.block_size);
        c.dropout = self.dropout.unwrap_or(c.dropout);
        c.bias = self.bias.unwrap_or(c.bias);
        c.mlp_hidden = self.mlp_hidden.unwrap_or(c.mlp_hidden);
        c.rope_theta = self.rope_theta.unwrap_or(c.rope_theta);
        c.norm_eps = self.norm_eps.unwrap_or(c.norm_eps);
        c.vocab_size = vocab_size;
        c.validate()?;
        Ok(c)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub global_batch: usize,
    pub micro_batch: usize,
    pub max_steps: u64,
    pub seed: u64,
    pub threads: usize,
    /// A rank's micro-batches side by side, one per thread (`phalanx_model::lanes`).
    pub lanes: bool,
    pub device: String,
    pub eval_interval: u64,
    pub eval_sequences: usize,
    pub log_interval: u64,
    pub deterministic: bool,
    /// ZeRO stage: 0 replicates the optimizer on every rank, 1 shards its moments (Z-1).
    pub zero: u8,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            global_batch: 16,
            micro_batch: 4,
            max_steps: 2000,
            seed: 1337,
            threads: 0,
            lanes: true,
            device: "auto".into(),
            eval_interval: 500,
            eval_sequences: 200,
            log_interval: 100,
            deterministic: false,
            zero: 0,
        }
    }
}

/// Where a rank's peers reach it (docs/dataplane.md, "Addresses"). Empty: the address of the
/// interface that routes to the coordinator. `PHALANX_ADDRESS` / `PHALANX_SOCKET_IFNAME` win.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneSection {
    pub address: String,
    pub interface: String,
    /// A collective that completes nothing for this long fails on every member (P-6).
    pub collective_timeout_ms: u64,
    /// Allreduce, reduce-scatter and allgather through the ranks' shared-memory windows when a
    /// generation's ranks all share a node (P-11); off: the ring.
    pub mesh: bool,
}

impl Default for DataplaneSection {
    fn default() -> Self {
        DataplaneSection {
            address: String::new(),
            interface: String::new(),
            collective_timeout_ms: 2000,
            mesh: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    pub dir: PathBuf,
    pub checkpoint_interval: u64,
    /// Retention: the newest this many committed checkpoints are kept ...
    pub keep_checkpoints: usize,
    /// ... and every one whose step is a multiple of this (0: none).
    pub keep_every: u64,
    /// Start from the newest committed checkpoint in `dir` that verifies.
    pub resume: bool,
    /// SIGTERM or Ctrl-C: how long the job may take to save the next step and stop.
    pub preempt_grace_s: u64,
    pub progress: bool,
    pub watchdog_timeout_ms: u64,
    pub max_restarts: u32,
    pub restart_window_ms: u64,
    pub prefetch_steps: usize,
    pub fingerprint_interval: u64,
    /// What a step with a non-finite loss or gradient on any rank does (T-4).
    pub on_nonfinite: OnNonfinite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonfinite {
    /// The step is not applied; training goes on from the next step.
    Skip,
    /// Every rank goes back to the last saved checkpoint and trains on from there.
    Rollback,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            dir: "runs/default".into(),
            checkpoint_interval: 0,
            keep_checkpoints: 3,
            keep_every: 0,
            resume: false,
            preempt_grace_s: 50,
            progress: true,
            watchdog_timeout_ms: 60_000,
            max_restarts: 3,
            restart_window_ms: 60_000,
            prefetch_steps: 2,
            fingerprint_interval: 100,
            on_nonfinite: OnNonfinite::Skip,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSection {
    pub job_id: String,
    pub bind: String,
    pub token: String,
    pub admin_token: String,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub rejoin_grace_ms: u64,
    pub min_world: usize,
    pub hang_timeout_floor_ms: u64,
    pub hang_k: f64,
    pub progress_timeout_ms: u64,
    pub straggler_window: usize,
    pub straggler_ratio: f64,
    pub straggler_min_excess_ms: u64,
    pub straggler_flag_after: u32,
    pub straggler_severe_ratio: f64,
    pub straggler_unflag_after: u32,
    pub straggler_clear_ratio: f64,
    pub evict_stragglers: bool,
    pub straggler_min_gain: f64,
    pub straggler_flag_after_ms: u64,
    pub straggler_severe_after_ms: u64,
    pub straggler_act_after_ms: u64,
    pub straggler_evict_after_ms: u64,
    pub straggler_cooldown_ms: u64,
    pub straggler_max_evictions: u32,
    pub straggler_eviction_window_ms: u64,
    pub straggler_startup_grace_ms: u64,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub tick_ms: u64,
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_ca: String,
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        CoordinatorSection {
            job_id: "phalanx".into(),
            bind: "127.0.0.1:7070".into(),
            token: String::new(),
            admin_token: String::new(),
            heartbeat_interval_ms: 200,
            heartbeat_timeout_ms: 800,
            rejoin_grace_ms: 10_000,
            min_world: 1,
            hang_timeout_floor_ms: 10_000,
            hang_k: 10.0,
            progress_timeout_ms: 600_000,
            straggler_window: 6,
            straggler_ratio: 1.75,
            straggler_min_excess_ms: 2,
            straggler_flag_after: 3,
            straggler_severe_ratio: 2.2,
            straggler_unflag_after: 10,
            straggler_clear_ratio: 1.25,
            evict_stragglers: true,
            straggler_min_gain: 0.15,
            straggler_flag_after_ms: 2000,
            straggler_severe_after_ms: 200,
            straggler_act_after_ms: 2000,
            straggler_evict_after_ms: 8000,
            straggler_cooldown_ms: 1000,
            straggler_max_evictions: 2,
            straggler_eviction_window_ms: 1_800_000,
            straggler_startup_grace_ms: 3000,
            keepalive_interval_ms: 1000,
            keepalive_timeout_ms: 1000,
            tick_ms: 50,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
        }
    }
}

impl CoordinatorSection {
    /// The token from PHALANX_JOB_TOKEN, else from the config; None when neither sets one.
    pub fn token(&self) -> Option<String> {
        std::env::var("PHALANX_JOB_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| (!self.token.is_empty()).then(|| self.token.clone()))
    }

    /// The admin token: PHALANX_ADMIN_TOKEN, else the config's (empty: none configured).
    pub fn admin_token(&self) -> Option<String> {
        std::env::var("PHALANX_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| (!self.admin_token.is_empty()).then(|| self.admin_token.clone()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, v: String, reason: &str| {
            Err(ConfigError::Invalid {
                key: format!("coordinator.{key}"),
                value: v,
                reason: reason.into(),
            })
        };
        if self.job_id.is_empty() || self.job_id.len() > 128 {
            return bad("job_id", self.job_id.clone(), "must be 1 to 128 characters");
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_timeout_ms < 2 * self.heartbeat_interval_ms
        {
            return bad(
                "heartbeat_timeout_ms",
                self.heartbeat_timeout_ms.to_string(),
                "must be at least twice heartbeat_interval_ms (> 0), or every late heartbeat evicts a rank",
            );
        }
        if self.tick_ms == 0 || self.keepalive_interval_ms == 0 || self.keepalive_timeout_ms == 0 {
            return bad(
                "tick_ms",
                self.tick_ms.to_string(),
                "tick_ms and keepalive_*_ms must be > 0",
            );
        }
        if self.min_world == 0 {
            return bad("min_world", "0".into(), "must be at least 1");
        }
        if !(self.straggler_ratio > 1.0 && self.straggler_ratio.is_finite()) {
            return bad(
                "straggler_ratio",
                self.straggler_ratio.to_string(),
                "must be a number > 1",
            );
        }
        if !(self.straggler_severe_ratio >= self.straggler_ratio
            && self.straggler_severe_ratio.is_finite())
        {
            return bad(
                "straggler_severe_ratio",
                self.straggler_severe_ratio.to_string(),
                "must be a number >= straggler_ratio",
            );
        }
        if !(self.straggler_clear_ratio >= 1.0
            && self.straggler_clear_ratio <= self.straggler_ratio)
        {
            return bad(
                "straggler_clear_ratio",
                self.straggler_clear_ratio.to_string(),
                "must be between 1 and straggler_ratio (a narrower band than the flag's)",
            );
        }
        if !(0.0..1.0).contains(&self.straggler_min_gain) {
            return bad(
                "straggler_min_gain",
                self.straggler_min_gain.to_string(),
                "must be in [0, 1): the fraction of step compute time a rebalance must save",
            );
        }
        if self.straggler_window > 64 {
            return bad(
                "straggler_window",
                self.straggler_window.to_string(),
                "must be at most 64",
            );
        }
        if self.straggler_window == 0
            || self.straggler_flag_after == 0
            || self.straggler_unflag_after == 0
        {
            return bad(
                "straggler_window",
                self.straggler_window.to_string(),
                "straggler_window, straggler_flag_after and straggler_unflag_after must be > 0",
            );
        }
        if self.straggler_eviction_window_ms == 0 {
            return bad(
                "straggler_eviction_window_ms",
                "0".into(),
                "must be > 0 (the window over which straggler_max_evictions counts); set \
                 straggler_max_evictions = 0 to never evict for slowness",
            );
        }
        if !(self.hang_k > 0.0 && self.hang_k.is_finite()) {
            return bad(
                "hang_k",
                self.hang_k.to_string(),
                "must be a positive number",
            );
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            return bad(
                "tls_cert",
                self.tls_cert.clone(),
                "tls_cert and tls_key go together",
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelSection,
    pub train: TrainSection,
    pub optim: OptimConfig,
    pub run: RunSection,
    pub coordinator: CoordinatorSection,
    pub dataplane: DataplaneSection,
    pub zero: ZeroSection,
}

/// ZeRO-1's buddy replicas (Z-4), used with `train.zero = 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZeroSection {
    /// Ranks that keep a copy of each rank's shard (0: none; a lost shard then costs a return
    /// to the last checkpoint).
    pub replicas: u32,
    /// The copies are refreshed every this many steps (and when a generation starts): a lost
    /// shard sends the job back at most this many steps, from memory.
    pub replica_interval: u64,
}

impl Default for ZeroSection {
    fn default() -> Self {
        ZeroSection {
            replicas: 1,
            replica_interval: 10,
        }
    }
}

/// Dotted paths of every key in a table (tables themselves are not keys).
fn key_paths(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => key_paths(sub, &path, out),
            _ => out.push(path),
        }
    }
}

/// A type error of the merged config, named by its key (`train.max_steps = -5: invalid value
/// ...`): its line numbers are of the merged text, which the user never saw.
fn type_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("").trim();
    let section = text[..start]
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
        .map(|s| format!("{s}."))
        .unwrap_or_default();
    format!("{section}{line}: {}", e.message().trim())
}

fn has_key(t: &toml::Table, section: &str, key: &str) -> bool {
    t.get(section)
        .and_then(|v| v.as_table())
        .is_some_and(|v| v.contains_key(key))
}

fn known_keys() -> Vec<String> {
    let t: toml::Table = REFERENCE.parse().expect("configs/reference.toml parses");
    let mut out = Vec::new();
    key_paths(&t, "", &mut out);
    out
}

fn known_sections() -> Vec<String> {
    let t: toml::Table = REFERENCE.parse().expect("configs/reference.toml parses");
    t.keys().cloned().collect()
}

/// The closest valid key: the same key name in another section first, else the nearest spelling.
pub fn suggest(key: &str, known: &[String]) -> Option<String> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    if let Some(k) = known.iter().find(|k| k.rsplit('.').next() == Some(leaf)) {
        return Some(k.clone());
    }
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

/// The hint for a key that was renamed: its new name and what changed.
fn renamed(key: &str) -> Option<String> {
    match key {
        "train.eval_batches" => Some(
            " — it is now `train.eval_sequences`, a number of sequences (so the validation \
             loss does not change with train.micro_batch)"
                .into(),
        ),
        _ => None,
    }
}

fn check_keys(t: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    let known = known_keys();
    let sections = known_sections();
    let mut keys = Vec::new();
    key_paths(t, "", &mut keys);
    for (k, v) in t {
        if !v.is_table() && sections.contains(k) {
            return Err(ConfigError::Parse {
                origin: origin.into(),
                message: format!("`{k}` must be a table ([{k}]), not a value"),
            });
        }
    }
    for k in keys {
        if !known.contains(&k) {
            let hint = renamed(&k).unwrap_or_else(|| {
                suggest(&k, &known)
                    .map(|s| format!(" — did you mean `{s}`?"))
                    .unwrap_or_default()
            });
            return Err(ConfigError::UnknownKey {
                key: k,
                origin: origin.into(),
                hint,
            });
        }
    }
    Ok(())
}

/// Parses `value` as a TOML value; a bare word that is not TOML is taken as a string.
fn parse_value(value: &str) -> toml::Value {
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

pub fn apply_override(t: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride(spec.into()))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::BadOverride(spec.into()));
    }
    let mut cur = t;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::BadOverride(spec.into()))?;
    }
    cur.insert(
        parts[parts.len() - 1].to_string(),
        parse_value(value.trim()),
    );
    Ok(())
}

fn bad<T: std::fmt::Display>(key: &str, v: T, reason: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key: key.into(),
        value: v.to_string(),
        reason: reason.into(),
    })
}

impl TrainConfig {
    /// `train.zero` and the `[zero]` section.
    fn validate_zero(&self) -> Result<(), ConfigError> {
        if self.train.zero > 1 {
            return bad(
                "train.zero",
                self.train.zero,
                "must be 0 (optimizer replicated) or 1 (its moments sharded over the ranks)",
            );
        }
        if self.zero.replicas > 8 {
            return bad(
                "zero.replicas",
                self.zero.replicas,
                "must be between 0 and 8 (each copy costs a shard's memory on another rank)",
            );
        }
        if self.zero.replica_interval == 0 {
            return bad(
                "zero.replica_interval",
                0,
                "must be at least 1 (steps between refreshes of the replicas)",
            );
        }
        if self.train.zero == 1 && self.run.on_nonfinite == OnNonfinite::Rollback {
            return bad(
                "run.on_nonfinite",
                "rollback",
                "is not available with train.zero = 1 yet (a rollback sends one rank's whole \
                 optimizer state); use \"skip\", or train.zero = 0",
            );
        }
        Ok(())
    }

    /// Reads a config file (or none: the defaults) and applies `section.key=value` overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let t: toml::Table =
                    text.parse()
                        .map_err(|e: toml::de::Error| ConfigError::Parse {
                            origin: p.display().to_string(),
                            message: e.to_string(),
                        })?;
                check_keys(&t, &p.display().to_string())?;
                (t, p.display().to_string())
            }
            None => (toml::Table::new(), "defaults".to_string()),
        };
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let origin = if overrides.is_empty() {
            origin
        } else {
            format!("{origin} with overrides")
        };
        check_keys(&table, &origin)?;
        // Through text, so that a type error is shown with the offending line.
        let text = toml::to_string(&table).expect("a table serializes");
        let mut cfg: TrainConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin,
            message: type_error(&text, &e),
        })?;
        cfg.follow_the_run(has_key(&table, "optim", "decay_steps"));
        cfg.validate()?;
        Ok(cfg)
    }

    /// The learning-rate schedule ends with the run unless the config says otherwise: a run
    /// shortened with `train.max_steps=200` must not end at full learning rate, silently.
    fn follow_the_run(&mut self, decay_steps_set: bool) {
        let steps = self.train.max_steps.max(self.optim.warmup_steps);
        if !decay_steps_set {
            self.optim.decay_steps = steps;
        } else if self.optim.decay_steps != self.train.max_steps {
            tracing::warn!(
                decay_steps = self.optim.decay_steps,
                max_steps = self.train.max_steps,
                "optim.decay_steps differs from train.max_steps: the learning rate reaches \
                 optim.min_lr at step {} (leave optim.decay_steps out to follow the run)",
                self.optim.decay_steps
            );
        }
    }

    /// Range checks that the types alone do not express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_zero()?;
        let t = &self.train;
        let o = &self.optim;
        let r = &self.run;
        if r.watchdog_timeout_ms < 1000 {
            return bad(
                "run.watchdog_timeout_ms",
                r.watchdog_timeout_ms,
                "must be at least 1000: a healthy step or collective must never look stuck",
            );
        }
        let ct = self.dataplane.collective_timeout_ms;
        if !(100..=600_000).contains(&ct) {
            return bad(
                "dataplane.collective_timeout_ms",
                ct,
                "must be between 100 and 600000 (the default is 2000)",
            );
        }
        if r.watchdog_timeout_ms <= ct {
            return bad(
                "run.watchdog_timeout_ms",
                r.watchdog_timeout_ms,
                &format!(
                    "must exceed dataplane.collective_timeout_ms ({ct}): a collective that times \
                     out must be reported before the watchdog gives the rank up"
                ),
            );
        }
        if r.restart_window_ms == 0 {
            return bad("run.restart_window_ms", 0, "must be at least 1");
        }
        if r.on_nonfinite == OnNonfinite::Rollback && r.checkpoint_interval == 0 {
            return bad(
                "run.on_nonfinite",
                "rollback",
                "needs run.checkpoint_interval > 0: there must be a saved model to roll back to",
            );
        }
        if r.prefetch_steps == 0 || r.prefetch_steps > 64 {
            return bad(
                "run.prefetch_steps",
                r.prefetch_steps,
                "must be between 1 and 64",
            );
        }
        if t.micro_batch == 0 {
            return bad("train.micro_batch", 0, "must be at least 1");
        }
        if t.global_batch == 0 || t.global_batch % t.micro_batch != 0 {
            return bad(
                "train.global_batch",
                t.global_batch,
                &format!(
                    "must be a positive multiple of train.micro_batch = {}",
                    t.micro_batch
                ),
            );
        }
        if t.max_steps == 0 {
            return bad("train.max_steps", 0, "must be at least 1");
        }
        // The exact fixed-point sum (i64, 40 fractional bits) of 64 micro-batches of |g| < 2^15
        // stays below 2^61: beyond, deterministic mode could silently stop being exact.
        if t.deterministic && t.global_batch / t.micro_batch > 64 {
            return bad(
                "train.deterministic",
                true,
                &format!(
                    "sums at most 64 micro-batches exactly; train.global_batch / train.micro_batch = {}: raise train.micro_batch",
                    t.global_batch / t.micro_batch
                ),
            );
        }
        if t.threads > 4096 {
            return bad(
                "train.threads",
                t.threads,
                "must be between 0 (one per core) and 4096",
            );
        }
        if !["auto", "cpu", "cuda"].contains(&t.device.as_str()) {
            return bad(
                "train.device",
                &t.device,
                "use \"auto\", \"cpu\" or \"cuda\"",
            );
        }
        if t.eval_sequences == 0 {
            return bad("train.eval_sequences", 0, "must be at least 1");
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optim.lr", o.lr, "must be a positive number");
        }
        if !(o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return bad("optim.min_lr", o.min_lr, "must be between 0 and optim.lr");
        }
        if o.decay_steps < o.warmup_steps {
            return bad(
                "optim.decay_steps",
                o.decay_steps,
                &format!("must be at least optim.warmup_steps = {}", o.warmup_steps),
            );
        }
        for (k, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(k, b, "must be in [0, 1)");
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return bad("optim.eps", o.eps, "must be > 0");
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return bad("optim.weight_decay", o.weight_decay, "must be >= 0");
        }
        if !(o.grad_clip >= 0.0 && o.grad_clip.is_finite()) {
            return bad(
                "optim.grad_clip",
                o.grad_clip,
                "must be >= 0 (0 = no clipping)",
            );
        }
        self.coordinator.validate()?;
        // The model's own checks need the vocabulary; check the preset and shape now anyway.
        self.model.resolve(1).map_err(|e| ConfigError::Invalid {
            key: "model".into(),
            value: self.model.preset.clone(),
            reason: e.to_string(),
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Deterministic mode above 64 micro-batches (so above 64 ranks), where its i64 sums could
    // overflow, is refused instead of silently inexact.
    #[test]
    fn deterministic_mode_refuses_what_it_cannot_sum_exactly() {
        let over = [
            "train.deterministic=true",
            "train.global_batch=4096",
            "train.micro_batch=16",
        ];
        let e = TrainConfig::load(None, &over.map(String::from)).unwrap_err();
        assert!(e.to_string().contains("at most 64 micro-batches"), "{e}");
        let ok = [
            "train.deterministic=true",
            "train.global_batch=256",
            "train.micro_batch=4",
        ];
        TrainConfig::load(None, &ok.map(String::from)).unwrap();
    }

    // A wrong type names the key and the value, not a line of a text the user never saw.
    #[test]
    fn a_type_error_names_its_key() {
        let e = TrainConfig::load(None, &["train.max_steps=-5".to_string()]).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("train.max_steps = -5"), "{m}");
        assert!(!m.contains("line "), "{m}");
    }

    // The schedule follows the run: without optim.decay_steps the cosine ends at
    // train.max_steps (not before the warmup ends); a value given is kept.
    #[test]
    fn decay_steps_follow_max_steps_unless_given() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = TrainConfig::load(None, &o(&["train.max_steps=200"])).unwrap();
        assert_eq!(c.optim.decay_steps, 200);
        let c = TrainConfig::load(None, &o(&["train.max_steps=50"])).unwrap();
        assert_eq!(c.optim.decay_steps, c.optim.warmup_steps);
        let c = TrainConfig::load(None, &o(&["train.max_steps=200", "optim.decay_steps=1000"]))
            .unwrap();
        assert_eq!(c.optim.decay_steps, 1000);
    }

    #[test]
    fn reference_is_complete_and_valid() {
        let c: TrainConfig = toml::from_str(REFERENCE).unwrap();
        c.validate().unwrap();
        // Every field of the config struct is documented in the reference.
        let mut full = TrainConfig::default();
        full.model.arch = Some(Arch::Gpt);
        full.model.n_layer = Some(1);
        full.model.n_head = Some(1);
        full.model.n_embd = Some(1);
        full.model.block_size = Some(1);
        full.model.dropout = Some(0.0);
        full.model.bias = Some(false);
        full.model.mlp_hidden = Some(0);
        full.model.rope_theta = Some(1.0);
        full.model.norm_eps = Some(1.0);
        let t: toml::Table = toml::Table::try_from(&full).unwrap();
        let mut keys = Vec::new();
        key_paths(&t, "", &mut keys);
        let known = known_keys();
        for k in keys {
            assert!(
                known.contains(&k),
                "{k} is not documented in configs/reference.toml"
            );
        }
        // The reference's values are the defaults.
        assert_eq!(c.train, TrainSection::default());
        assert_eq!(c.optim, OptimConfig::default());
        assert_eq!(c.run, RunSection::default());
        assert_eq!(c.coordinator, CoordinatorSection::default());
    }

    #[test]
    fn shipped_configs_load() {
        for f in [
            "configs/shakespeare-char.toml",
            "configs/shakespeare-gpt2.toml",
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            TrainConfig::load(Some(&p), &[]).unwrap();
        }
    }

    #[test]
    fn a_renamed_key_names_its_new_name() {
        let e = TrainConfig::load(None, &["train.eval_batches=5".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("now `train.eval_sequences`"), "{e}");
    }

    #[test]
    fn unknown_keys_name_the_closest_key() {
        let mut t = toml::Table::new();
        apply_override(&mut t, "train.max_step=5").unwrap();
        let e = check_keys(&t, "x").unwrap_err().to_string();
        assert!(e.contains("did you mean `train.max_steps`"), "{e}");
        let mut t = toml::Table::new();
        apply_override(&mut t, "train.lr=0.1").unwrap();
        let e = check_keys(&t, "x").unwrap_err().to_string();
        assert!(e.contains("`optim.lr`"), "{e}");
    }

    #[test]
    fn overrides_types_and_ranges() {
        let c = TrainConfig::load(
            None,
            &["train.max_steps=7".into(), "train.device=cpu".into()],
        )
        .unwrap();
        assert_eq!(c.train.max_steps, 7);
        assert_eq!(c.train.device, "cpu");
        let e = TrainConfig::load(None, &["train.max_steps=abc".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_steps"), "{e}");
        let e = TrainConfig::load(None, &["optim.lr=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("optim.lr"), "{e}");
        let e = TrainConfig::load(
            None,
            &["train.global_batch=10".into(), "train.micro_batch=4".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple"), "{e}");
        assert!(TrainConfig::load(None, &["nonsense".into()]).is_err());
        let e = TrainConfig::load(None, &["model.preset=huge".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("tiny"), "{e}");
    }
}

/// Fuzzing (issue "Trust and restarts", item 8): any config text and any override is a config
/// or an error that names the problem, never a panic. Fixed budgets.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Lines made of known keys and values of every type, some of them wrong.
    fn line() -> impl Strategy<Value = String> {
        let keys = known_keys();
        (
            prop::sample::select(keys),
            prop_oneof![
                Just("0".to_string()),
                Just("-1".to_string()),
                Just("1e308".to_string()),
                Just("\"x\"".to_string()),
                Just("true".to_string()),
                Just("[1, 2]".to_string()),
                Just("18446744073709551616".to_string()),
                any::<u32>().prop_map(|v| v.to_string()),
                "[a-z\\\"\\\\]{0,8}".prop_map(|v| format!("\"{v}\"")),
            ],
        )
            .prop_map(|(k, v)| match k.split_once('.') {
                Some((sec, key)) => format!("[{sec}]\n{key} = {v}"),
                None => format!("{k} = {v}"),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]

        #[test]
        fn any_config_text_is_a_config_or_an_error(lines in proptest::collection::vec(line(), 0..6)) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("c.toml");
            std::fs::write(&p, lines.join("\n")).unwrap();
            let _ = TrainConfig::load(Some(&p), &[]);
        }

        #[test]
        fn any_bytes_as_config_are_an_error_or_a_config(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("c.toml");
            std::fs::write(&p, &raw).unwrap();
            let _ = TrainConfig::load(Some(&p), &[]);
        }

        #[test]
        fn any_override_is_applied_or_refused(spec in "[a-z_.=0-9\\[\\]\"-]{0,30}") {
            let _ = TrainConfig::load(None, &[spec]);
        }
    }
}
