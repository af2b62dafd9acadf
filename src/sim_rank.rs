//! A simulated rank: a real process with a real control-plane session (register, heartbeats,
//! directives, reconnect with backoff) whose "training" is a step counter. The control-plane
//! tests kill and stop these; `phalanx worker` will run the same session with real training.
//! Each directive and session event is printed on stdout as one JSON line.

use crate::control::{client_opts, hostname};
use anyhow::Result;
use phalanx_proto::pb;
use phalanx_runtime::coordinator::client::{self, OpenError, RankSession};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};
use tonic::Code;

pub struct SimArgs {
    pub url: String,
    pub tls_ca: String,
    pub spare: bool,
    pub step_ms: u64,
    pub job_id: String,
    pub config_hash: String,
    /// Give up reconnecting after this long without a coordinator.
    pub give_up: Duration,
}

fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Exit codes: 0 shut down by the coordinator, 2 refused or gave up, 3 fenced out.
pub fn run(a: &SimArgs) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(session_loop(a))
}

async fn session_loop(a: &SimArgs) -> Result<i32> {
    let opts = client_opts(&a.url, &a.tls_ca)?;
    let host = hostname();
    // (member id, generation, rank) once assigned; kept across reconnects to rejoin.
    let mut member: u64 = 0;
    let mut secret = String::new();
    let mut pos = Position::default();
    let mut backoff = Duration::from_millis(100);
    let mut last_contact = Instant::now();
    loop {
        if last_contact.elapsed() > a.give_up {
            emit(json!({"event": "gave_up", "after_ms": a.give_up.as_millis() as u64}));
            return Ok(2);
        }
        let c = match client::connect(&opts).await {
            Ok(c) => c,
            Err(e) => {
                emit(json!({"event": "connect_failed", "error": e.to_string()}));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let req = register_request(a, &host, member, &pos, &secret);
        let sess = match RankSession::open(c, &opts, req).await {
            Ok(s) => s,
            Err(OpenError::Register(s)) => {
                emit(
                    json!({"event": "register_refused", "code": format!("{:?}", s.code()), "error": s.message()}),
                );
                match s.code() {
                    Code::FailedPrecondition => return Ok(3),
                    Code::Unauthenticated | Code::InvalidArgument => return Ok(2),
                    _ => {
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
            }
            Err(OpenError::Session {
                status: s,
                registered,
            }) => {
                last_contact = Instant::now();
                backoff = Duration::from_millis(100);
                member = registered.member_id;
                secret = registered.member_secret;
                emit(
                    json!({"event": if registered.rejoined { "rejoined" } else { "registered" },
                            "member": member, "generation": registered.generation}),
                );
                emit(
                    json!({"event": "session_refused", "code": format!("{:?}", s.code()), "error": s.message()}),
                );
                if s.code() == Code::FailedPrecondition {
                    return Ok(3);
                }
                continue;
            }
        };
        let reg = &sess.registered;
        last_contact = Instant::now();
        backoff = Duration::from_millis(100);
        member = reg.member_id;
        secret = reg.member_secret.clone();
        emit(
            json!({"event": if reg.rejoined { "rejoined" } else { "registered" },
                    "member": member, "generation": reg.generation}),
        );
        let mut hb = tokio::time::interval(sess.heartbeat(Duration::from_millis(10)));
        let (tx, mut inbound) = (sess.tx, sess.inbound);
        let rejoined = sess.registered.rejoined;
        let mut stepper = tokio::time::interval(Duration::from_millis(a.step_ms.max(1)));
        let mut assigned = rejoined;
        loop {
            tokio::select! {
                _ = hb.tick() => {
                    let m = pb::RankMessage { msg: Some(pb::rank_message::Msg::Heartbeat(pb::Heartbeat {
                        generation: pos.generation, step: pos.step, collective_seq: pos.step,
                        phase: if assigned {
                            pb::Phase::Training
                        } else {
                            pb::Phase::Idle
                        } as i32,
                        last_step_time_us: (a.step_ms * 1000) as u32,
                        last_compute_time_us: (a.step_ms * 1000) as u32,
                        loss: 0.0, stats: None, recent: Vec::new(), links: None,
                        durable: None, committed_checkpoint: 0,
                    }))};
                    if tx.send(m).await.is_err() { break; }
                }
                _ = stepper.tick(), if assigned => { pos.step += 1; }
                msg = inbound.message() => match msg {
                    Ok(Some(d)) => {
                        last_contact = Instant::now();
                        if let Some(code) = on_directive(d, &mut pos, &mut assigned) {
                            return Ok(code);
                        }
                    }
                    Ok(None) => { emit(json!({"event": "disconnected", "error": null})); break; }
                    Err(s) => {
                        emit(json!({"event": "disconnected", "code": format!("{:?}", s.code()), "error": s.message()}));
                        if s.code() == Code::FailedPrecondition {
                            return Ok(3);
                        }
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Registers as a new member, or again as `member` (proved by `secret`) where it was.
fn register_request(
    a: &SimArgs,
    host: &str,
    member: u64,
    pos: &Position,
    secret: &str,
) -> pb::RegisterRequest {
    pb::RegisterRequest {
        job_id: a.job_id.clone(),
        host: host.into(),
        dataplane_address: format!("sim:{}", std::process::id()).into_bytes(),
        role: if a.spare {
            pb::Role::Spare
        } else {
            pb::Role::Active
        } as i32,
        capabilities: vec!["sim".into()],
        config_hash: a.config_hash.clone(),
        pid: std::process::id(),
        address: String::new(),
        member_id: member,
        generation: pos.generation,
        rank: pos.rank,
        committed_step: pos.step,
        member_secret: secret.into(),
    }
}

/// Where this simulated rank is: kept across reconnects, to rejoin where it was.
#[derive(Default)]
struct Position {
    generation: u64,
    rank: u32,
    step: u64,
}

/// A directive from the coordinator; `Some(code)` ends the rank with that exit code.
fn on_directive(d: pb::Directive, pos: &mut Position, assigned: &mut bool) -> Option<i32> {
    match d.kind {
        Some(pb::directive::Kind::Assign(x)) => {
            pos.generation = x.generation;
            pos.rank = x.rank;
            pos.step = pos.step.max(x.resume_step);
            *assigned = true;
            emit(
                json!({"directive": "assign", "generation": x.generation, "rank": x.rank,
                        "world": x.world, "resume_step": x.resume_step, "heal_from": x.heal_from,
                        "abandon_previous": x.abandon_previous}),
            );
        }
        Some(pb::directive::Kind::Evict(x)) => {
            emit(json!({"directive": "evict", "generation": x.generation, "reason": x.reason}));
            return Some(3);
        }
        Some(pb::directive::Kind::Shutdown(x)) => {
            emit(json!({"directive": "shutdown", "reason": x.reason}));
            return Some(0);
        }
        Some(pb::directive::Kind::Drain(x)) => {
            *assigned = false;
            emit(json!({"directive": "drain", "generation": x.generation}));
        }
        Some(pb::directive::Kind::Checkpoint(x)) => {
            emit(json!({"directive": "checkpoint", "step": x.step}));
        }
        Some(pb::directive::Kind::Commit(x)) => {
            emit(json!({"directive": "commit", "step": x.step}));
        }
        None => {}
    }
    None
}
