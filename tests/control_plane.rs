//! The coordinator with real processes on loopback: `phalanx coordinator` and simulated ranks
//! (`phalanx sim-rank`, a real control-plane session without training), killed and stopped with
//! real signals.

mod common;

use common::{signal, start_coordinator, test_dir, unix_ms, Proc};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const TOKEN: &str = "s3cret-job-token";
const ADMIN: &str = "s3cret-admin-token";

struct Job {
    dir: PathBuf,
    coord: Proc,
    addr: String,
    ranks: Vec<Proc>,
}

/// The job's coordinator on `bind`, which takes both tokens.
fn job_coordinator(dir: &Path, bind: &str, world: usize, extra: &[&str]) -> (Proc, String) {
    start_coordinator(
        common::coordinator(bind, world)
            .arg("--run-dir")
            .arg(dir)
            .args(["train.global_batch=16", "train.micro_batch=1"])
            .args(extra)
            .env("PHALANX_JOB_TOKEN", TOKEN)
            .env("PHALANX_ADMIN_TOKEN", ADMIN),
    )
}

fn sim(addr: &str, spare: bool) -> Proc {
    let mut cmd = common::bin();
    cmd.args([
        "sim-rank",
        "--coordinator",
        &format!("http://{addr}"),
        "--step-ms",
        "20",
    ])
    .env("PHALANX_JOB_TOKEN", TOKEN);
    if spare {
        cmd.arg("--spare");
    }
    Proc::collect(&mut cmd)
}

fn assigned(p: &Proc, generation: u64) -> Value {
    p.wait_line(
        &format!("assign of generation {generation}"),
        Duration::from_secs(15),
        |v| v["directive"] == "assign" && v["generation"] == generation,
    )
}

impl Job {
    fn start(world: usize, spares: usize, extra: &[&str]) -> Job {
        let dir = tempfile::tempdir().unwrap().keep();
        let (coord, addr) = job_coordinator(&dir, "127.0.0.1:0", world, extra);
        let mut ranks: Vec<Proc> = (0..world).map(|_| sim(&addr, false)).collect();
        for r in &ranks {
            assigned(r, 1);
        }
        ranks.extend((0..spares).map(|_| sim(&addr, true)));
        Job {
            dir,
            coord,
            addr,
            ranks,
        }
    }

    /// A gRPC client's options for this job, with the job token (not the admin token).
    fn client_opts(&self) -> phalanx_runtime::coordinator::client::ClientOpts {
        let mut o =
            phalanx_runtime::coordinator::client::ClientOpts::new(&format!("http://{}", self.addr));
        o.token = Some(TOKEN.into());
        o
    }

    fn events(&self) -> Vec<Value> {
        common::read_jsonl_now(&self.dir.join("events.jsonl"))
    }

    fn wait_event(&self, kind: &str, timeout: Duration) -> Value {
        common::wait_event(&self.dir.join("events.jsonl"), kind, timeout)
    }

    fn status(&self, token: Option<&str>) -> std::process::Output {
        let mut cmd = common::bin();
        cmd.args([
            "status",
            "--coordinator",
            &format!("http://{}", self.addr),
            "--json",
        ]);
        // Status is an admin call: the job's token opens the door, the admin token the room.
        match token {
            Some(t) => cmd
                .env("PHALANX_JOB_TOKEN", t)
                .env("PHALANX_ADMIN_TOKEN", if t == TOKEN { ADMIN } else { t }),
            None => cmd
                .env_remove("PHALANX_JOB_TOKEN")
                .env_remove("PHALANX_ADMIN_TOKEN"),
        };
        cmd.output().unwrap()
    }

    fn status_json(&self) -> Value {
        let out = self.status(Some(TOKEN));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// G-1: SIGKILL of a rank is seen through its closed session at once; the survivors get the
// next generation.
#[test]
fn sigkill_is_detected_within_half_a_second() {
    let job = Job::start(3, 0, &[]);
    let victim = job.ranks[1].pid();
    let t_kill = unix_ms();
    signal(victim, "KILL");
    let ev = job.wait_event("rank_failed", Duration::from_secs(5));
    let detect_ms = ev["unix_ms"].as_u64().unwrap() - t_kill;
    eprintln!("SIGKILL detected in {detect_ms} ms: {ev}");
    assert!(detect_ms < 500, "detection took {detect_ms} ms");
    assert_eq!(ev["pid"], victim);
    for (i, r) in job.ranks.iter().enumerate() {
        if i != 1 {
            let a = assigned(r, 2);
            assert_eq!(a["world"], 2);
        }
    }
    let s = job.status_json();
    assert_eq!(
        (s["generation"].as_u64(), s["world"].as_u64()),
        (Some(2), Some(2))
    );
}

// G-1, K-2: a stopped rank is detected by the heartbeat deadline (0.8 s, plus a tick; here with
// room for a loaded machine, the p99 is `phalanx bench detection`'s); woken up, it is fenced,
// not merged.
#[test]
fn sigstop_is_detected_at_the_heartbeat_deadline_and_stays_fenced() {
    let mut job = Job::start(3, 0, &[]);
    let victim = job.ranks[2].pid();
    let t_stop = unix_ms();
    signal(victim, "STOP");
    let ev = job.wait_event("rank_failed", Duration::from_secs(6));
    let detect_ms = ev["unix_ms"].as_u64().unwrap() - t_stop;
    eprintln!("SIGSTOP detected in {detect_ms} ms: {ev}");
    assert!(detect_ms <= 1300, "detection took {detect_ms} ms");
    // P-10: the survivors hear that generation 1 lost a member and give up its collectives.
    let a = assigned(&job.ranks[0], 2);
    assert_eq!(a["abandon_previous"], true, "{a}");
    signal(victim, "CONT");
    // The woken rank heartbeats for generation 1 and is told it is fenced out.
    let code = job.ranks[2].wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(3),
        "fenced rank should exit 3: {:?}",
        job.ranks[2].lines()
    );
    let s = job.status_json();
    assert_eq!(
        (s["generation"].as_u64(), s["world"].as_u64()),
        (Some(2), Some(2))
    );
}

#[test]
fn spare_is_promoted_when_a_rank_dies() {
    let job = Job::start(2, 1, &[]);
    job.ranks[2].wait_line("spare registered", Duration::from_secs(10), |v| {
        v["event"] == "registered"
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(job.ranks[0].pid(), "KILL");
    let a = assigned(&job.ranks[2], 2);
    assert_eq!(a["world"], 2);
    assert_eq!(
        a["heal_from"], 0,
        "the spare heals from the surviving leader: {a}"
    );
}

// Coordinator crash safety: kill -9 and restart; ranks re-register into the same generation.
#[test]
fn coordinator_restart_keeps_the_generation() {
    let mut job = Job::start(2, 0, &[]);
    let port = job.addr.rsplit(':').next().unwrap().to_string();
    signal(job.coord.pid(), "KILL");
    job.coord.wait_exit(Duration::from_secs(5));
    for r in &job.ranks {
        r.wait_line("disconnect", Duration::from_secs(5), |v| {
            v["event"] == "disconnected"
        });
    }
    let (coord, addr) = job_coordinator(&job.dir, &format!("127.0.0.1:{port}"), 2, &[]);
    job.coord = coord;
    job.addr = addr;
    for r in &job.ranks {
        r.wait_line("rejoin", Duration::from_secs(15), |v| {
            v["event"] == "rejoined"
        });
    }
    job.wait_event("coordinator_restarted", Duration::from_secs(1));
    // Past several heartbeat timeouts nobody is evicted and the generation is unchanged.
    std::thread::sleep(Duration::from_millis(2500));
    let s = job.status_json();
    assert_eq!(
        (s["generation"].as_u64(), s["world"].as_u64()),
        (Some(1), Some(2)),
        "{s}"
    );
    assert!(
        job.events().iter().all(|e| e["kind"] != "rank_failed"),
        "{:?}",
        job.events()
    );
}

#[test]
fn wrong_or_missing_token_is_refused() {
    let job = Job::start(1, 0, &[]);
    for token in [None, Some("not-the-job-token")] {
        let out = job.status(token);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("Unauthenticated") && err.contains("PHALANX_JOB_TOKEN"),
            "{err}"
        );
        assert!(!err.contains("panicked"));
    }
    let refused: Vec<_> = job
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "request_refused")
        .collect();
    assert_eq!(refused.len(), 2);
    // The token itself never reaches the event log.
    let log = std::fs::read_to_string(job.dir.join("events.jsonl")).unwrap();
    assert!(!log.contains(TOKEN) && !log.contains("not-the-job-token"));
}

#[test]
fn garbage_and_oversized_messages_do_not_harm_the_job() {
    let job = Job::start(2, 0, &[]);
    // Raw garbage, and an HTTP/2 preface followed by garbage.
    for payload in [
        &b"\x00\xffGET / HTTP/1.1\r\n\r\n not grpc"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xde\xad\xbe\xef",
    ] {
        let mut s = std::net::TcpStream::connect(&job.addr).unwrap();
        s.write_all(payload).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // An oversized and an absurd registration, through a real gRPC client.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use phalanx_proto::pb;
        let opts = job.client_opts();
        let mut c = phalanx_runtime::coordinator::client::connect(&opts)
            .await
            .unwrap();
        let base = pb::RegisterRequest {
            job_id: "phalanx".into(),
            host: "h".into(),
            role: pb::Role::Spare as i32,
            config_hash: "sim".into(),
            ..Default::default()
        };
        let huge = pb::RegisterRequest {
            dataplane_address: vec![7; 1 << 20],
            ..base.clone()
        };
        let e = c.register(huge).await.unwrap_err();
        eprintln!("oversized: {:?} {}", e.code(), e.message());
        assert_ne!(e.code(), tonic::Code::Ok);
        let absurd = pb::RegisterRequest {
            dataplane_address: vec![7; 32 * 1024],
            ..base.clone()
        };
        let e = c.register(absurd).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        let bad_role = pb::RegisterRequest {
            role: 17,
            ..base.clone()
        };
        assert_eq!(
            c.register(bad_role).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let other_job = pb::RegisterRequest {
            job_id: "other".into(),
            ..base
        };
        assert_eq!(
            c.register(other_job).await.unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = job.status_json();
    assert_eq!(
        (s["generation"].as_u64(), s["world"].as_u64()),
        (Some(1), Some(2)),
        "{s}"
    );
    assert!(job.events().iter().all(|e| e["kind"] != "rank_failed"));
    // The ranks are still in session.
    assert!(s["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["heartbeat_age_ms"].as_u64().unwrap() < 1000));
}

#[test]
fn bad_coordinator_address_is_a_clear_error() {
    let out = common::bin()
        .args(["status", "--coordinator", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the coordinator"), "{err}");
    let out = common::bin()
        .args(["status", "--coordinator", "not a url"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid URL"));
}

// `status` takes the address as the coordinator prints it (`host:port`) or the run directory,
// and a reader that goes away (`phalanx status | head -1`) ends it cleanly instead of with a panic.
#[test]
fn status_takes_the_printed_address_a_run_dir_and_a_closed_pipe() {
    let job = Job::start(2, 0, &[]);
    let status = || {
        let mut cmd = common::bin();
        cmd.args(["status", "--coordinator", &job.addr])
            .env("PHALANX_JOB_TOKEN", TOKEN)
            .env("PHALANX_ADMIN_TOKEN", ADMIN);
        cmd
    };
    let out = status().output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("generation 1"), "{stdout}");
    let mut child = status()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // --run-dir: the address from coordinator.url (written by the coordinator), the token from
    // admin-token there unless PHALANX_ADMIN_TOKEN is set.
    std::fs::write(job.dir.join("admin-token"), ADMIN).unwrap();
    let out = common::bin()
        .args(["status", "--json", "--run-dir"])
        .arg(&job.dir)
        .env("PHALANX_JOB_TOKEN", TOKEN)
        .env_remove("PHALANX_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["world"], 2, "{v}");
    // Z-5: the ranks' memory from the run directory (these simulated ranks record none).
    assert!(v["memory"].is_array(), "{v}");
    let out = common::bin()
        .args(["status", "--run-dir", "/nonexistent-run-dir"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("coordinator.url"), "{stderr}");
}

// Optional TLS: a coordinator with a certificate serves TLS; a client that trusts the CA gets
// through, a plain-text client does not.
#[test]
fn tls_coordinator() {
    let dir = test_dir();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (_coord, addr) = job_coordinator(
        dir.path(),
        "127.0.0.1:0",
        1,
        &[
            &format!("coordinator.tls_cert={}", cert.display()),
            &format!("coordinator.tls_key={}", key.display()),
        ],
    );
    let port = addr.rsplit(':').next().unwrap();
    let url = format!("https://localhost:{port}");
    let out = common::bin()
        .args([
            "status",
            "--coordinator",
            &url,
            "--tls-ca",
            cert.to_str().unwrap(),
            "--json",
        ])
        .env("PHALANX_JOB_TOKEN", TOKEN)
        .env("PHALANX_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["generation"], 0);
    let out = common::bin()
        .args([
            "status",
            "--coordinator",
            &format!("http://localhost:{port}"),
        ])
        .env("PHALANX_JOB_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = common::bin()
        .args(["status", "--coordinator", &url])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));
}

// Large worlds get the peer table through GetPeers instead of inline in every Assign.
#[test]
fn peers_are_served_per_generation() {
    let job = Job::start(2, 0, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use phalanx_proto::pb;
        let opts = job.client_opts();
        let mut c = phalanx_runtime::coordinator::client::connect(&opts)
            .await
            .unwrap();
        let all = c
            .get_peers(pb::PeersRequest {
                generation: 1,
                ranks: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.world, 2);
        assert_eq!(all.peers.len(), 2);
        assert!(all
            .peers
            .iter()
            .all(|p| p.dataplane_address.starts_with(b"sim:")));
        let one = c
            .get_peers(pb::PeersRequest {
                generation: 1,
                ranks: vec![1],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.peers[0].rank, 1);
        let stale = c
            .get_peers(pb::PeersRequest {
                generation: 0,
                ranks: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
        let out = c
            .get_peers(pb::PeersRequest {
                generation: 1,
                ranks: vec![5],
            })
            .await
            .unwrap_err();
        assert_eq!(out.code(), tonic::Code::InvalidArgument);
    });
}

/// A client of the job registered as a spare on `host`: the client and its registration.
async fn connect_as_spare(
    opts: &phalanx_runtime::coordinator::client::ClientOpts,
    host: &str,
) -> (
    phalanx_runtime::coordinator::client::Client,
    phalanx_proto::pb::RegisterResponse,
) {
    use phalanx_proto::pb;
    let mut c = phalanx_runtime::coordinator::client::connect(opts)
        .await
        .unwrap();
    let me = c
        .register(rq(
            opts,
            pb::RegisterRequest {
                job_id: "phalanx".into(),
                host: host.into(),
                role: pb::Role::Spare as i32,
                config_hash: "sim".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    (c, me)
}

fn rq<T>(o: &phalanx_runtime::coordinator::client::ClientOpts, m: T) -> tonic::Request<T> {
    phalanx_runtime::coordinator::client::request(m, o)
}

// K-12 (sessions bound to members): a client holding the job token registers as itself and
// then tries to speak for rank 0's member: a session (and so its heartbeats), a fault report, a
// rendezvous and a rejoin as that member are all refused, and so are scale and drain without
// the admin token. Nobody is evicted and the generation does not move.
#[test]
fn a_token_holder_cannot_act_as_another_member() {
    use phalanx_proto::pb;
    let job = Job::start(2, 0, &[]);
    let victim = job.status_json()["ranks"][0]["member"].as_u64().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = job.client_opts();
        let (mut c, mine) = connect_as_spare(&opts, "intruder").await;
        assert!(!mine.member_secret.is_empty());
        let denied = |r: Result<tonic::Status, ()>, what: &str| {
            let s = r.unwrap_or_else(|_| panic!("{what} as member {victim} was accepted"));
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{what}: {s:?}");
        };
        // A session as the victim, with our own secret.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::RankMessage {
            msg: Some(pb::rank_message::Msg::Hello(pb::SessionHello {
                member_id: victim,
                member_secret: mine.member_secret.clone(),
            })),
        })
        .await
        .unwrap();
        let r = c
            .session(rq(&opts, tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await;
        denied(r.map(|_| ()).err().ok_or(()), "a session");
        let r = c
            .report_fault(rq(
                &opts,
                pb::FaultReport {
                    member_id: victim,
                    generation: 1,
                    suspect_rank: 1,
                    kind: pb::ReportedFault::PeerFailed as i32,
                    member_secret: mine.member_secret.clone(),
                    ..Default::default()
                },
            ))
            .await;
        denied(r.err().ok_or(()), "a fault report");
        let r = c
            .rendezvous(rq(
                &opts,
                pb::RendezvousRequest {
                    member_id: victim,
                    generation: 1,
                    rank: 0,
                    address: vec![1, 2, 3],
                    member_secret: "guess".into(),
                },
            ))
            .await;
        denied(r.err().ok_or(()), "a rendezvous");
        let r = c
            .register(rq(
                &opts,
                pb::RegisterRequest {
                    job_id: "phalanx".into(),
                    host: "intruder".into(),
                    role: pb::Role::Active as i32,
                    config_hash: "sim".into(),
                    member_id: victim,
                    generation: 1,
                    rank: 0,
                    member_secret: mine.member_secret.clone(),
                    ..Default::default()
                },
            ))
            .await;
        denied(r.err().ok_or(()), "a rejoin");
        let r = c
            .scale(rq(&opts, pb::ScaleRequest { target_world: 1 }))
            .await;
        denied(r.err().ok_or(()), "scale with the job token");
        let who = Some(pb::drain_request::Who::Rank(1));
        let r = c.drain(rq(&opts, pb::DrainRequest { who })).await;
        denied(r.err().ok_or(()), "drain with the job token");
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = job.status_json();
    assert_eq!(
        (s["generation"].as_u64(), s["world"].as_u64()),
        (Some(1), Some(2)),
        "{s}"
    );
    let events = job.events();
    assert!(
        events.iter().all(|e| e["kind"] != "rank_failed"),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e["kind"] == "request_refused"));
}

// Closed by default: a coordinator on a non-loopback address refuses to start without a job
// token and says how to give one (or --insecure).
#[test]
fn an_exposed_coordinator_needs_a_token() {
    let dir = test_dir();
    let out = common::bin()
        .args(["coordinator", "--bind", "0.0.0.0:0", "--run-dir"])
        .arg(dir.path())
        .env_remove("PHALANX_JOB_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("without a job token") && err.contains("--insecure"),
        "{err}"
    );
}

/// Registers as a new spare with `config_hash`; the refusal's status, if refused.
fn register_with_hash(addr: &str, config_hash: &str) -> Option<tonic::Status> {
    use phalanx_proto::pb;
    let mut opts = phalanx_runtime::coordinator::client::ClientOpts::new(&format!("http://{addr}"));
    opts.token = Some(TOKEN.into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = phalanx_runtime::coordinator::client::connect(&opts)
            .await
            .unwrap();
        c.register(rq(
            &opts,
            pb::RegisterRequest {
                job_id: "phalanx".into(),
                host: "first-caller".into(),
                role: pb::Role::Spare as i32,
                config_hash: config_hash.into(),
                ..Default::default()
            },
        ))
        .await
        .err()
    })
}

// K-6: a coordinator given the job's config hash at start refuses a first caller with another
// one (which would otherwise become the job's hash and shut out every real worker), and takes
// the job's workers. Without one, the first worker's hash is the job's, and an event names it.
#[test]
fn the_config_hash_is_pinned_at_start_not_by_the_first_caller() {
    let dir = test_dir();
    let (_coord, addr) = job_coordinator(dir.path(), "127.0.0.1:0", 1, &["--config-hash", "sim"]);
    let s = register_with_hash(&addr, "intruder").expect("another hash was taken");
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("differs from the job's sim"), "{s:?}");
    let rank = sim(&addr, false);
    assigned(&rank, 1);
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert!(
        !events.contains(r#""kind":"config_hash_pinned""#),
        "{events}"
    );
    drop(rank);

    let dir = test_dir();
    let (_coord, addr) = job_coordinator(dir.path(), "127.0.0.1:0", 1, &[]);
    assert!(register_with_hash(&addr, "first").is_none());
    let s = register_with_hash(&addr, "second").expect("a second hash was taken");
    assert!(s.message().contains("config_hash_pinned"), "{s:?}");
    let events = common::read_jsonl_now(&dir.path().join("events.jsonl"));
    let pinned: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "config_hash_pinned")
        .collect();
    assert_eq!(pinned.len(), 1, "{events:?}");
    assert_eq!(pinned[0]["config_hash"], "first");
    assert_eq!(pinned[0]["host"], "first-caller");
}

// A rank's links describe the group it built: the event names that group's generation and rank,
// even when the heartbeat carrying them arrives after the coordinator renumbered the ranks (here
// the member is a spare, with no rank at all, when they arrive). Reading the member's current
// rank instead once labelled a TCP link as shared memory across simulated hosts.
#[test]
fn links_are_reported_with_the_rank_of_the_group_that_built_them() {
    use phalanx_proto::pb;
    let job = Job::start(2, 0, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = job.client_opts();
        let (mut c, me) = connect_as_spare(&opts, "elsewhere").await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hello = pb::rank_message::Msg::Hello(pb::SessionHello {
            member_id: me.member_id,
            member_secret: me.member_secret.clone(),
        });
        let beat = pb::rank_message::Msg::Heartbeat(pb::Heartbeat {
            generation: 1,
            phase: pb::Phase::Idle as i32,
            links: Some(pb::GroupLinks {
                generation: 1,
                rank: 1,
                links: vec![pb::PeerLink {
                    peer_rank: 0,
                    kind: pb::LinkKind::Tcp as i32,
                    lanes: vec!["tcp/eth0".into()],
                }],
            }),
            ..Default::default()
        });
        for m in [hello, beat] {
            tx.send(pb::RankMessage { msg: Some(m) }).await.unwrap();
        }
        let _session = c
            .session(rq(&opts, tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let e = loop {
            let found = job
                .events()
                .into_iter()
                .find(|e| e["kind"] == "group_links" && e["member"].as_u64() == Some(me.member_id));
            if let Some(e) = found {
                break e;
            }
            assert!(std::time::Instant::now() < deadline, "no group_links event");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            (e["generation"].as_u64(), e["rank"].as_u64()),
            (Some(1), Some(1)),
            "{e}"
        );
        assert_eq!(e["host"], "elsewhere", "{e}");
        assert_eq!(e["links"][0]["link"], "tcp", "{e}");
    });
}

// A drain can name a member (the same process whatever rank it holds) instead of a rank (which
// changes every generation): the member's rank leaves; a member that holds no rank is refused
// with a message that says where to look, and nothing changes.
#[test]
fn drain_by_member_removes_that_member() {
    let job = Job::start(3, 0, &[]);
    let s = job.status_json();
    let victim = s["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rank"] == 2)
        .and_then(|r| r["member"].as_u64())
        .unwrap_or_else(|| panic!("no rank 2 in {s}"));
    let drain = |who: &str| {
        common::bin()
            .args([
                "drain",
                "--coordinator",
                &format!("http://{}", job.addr),
                "--member",
                who,
            ])
            .env("PHALANX_JOB_TOKEN", TOKEN)
            .env("PHALANX_ADMIN_TOKEN", ADMIN)
            .output()
            .unwrap()
    };
    let out = drain("999999");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("member 999999 holds no rank") && err.contains("phalanx status"),
        "{err}"
    );
    let out = drain(&victim.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = job.wait_event("drain", Duration::from_secs(10));
    assert_eq!(e["rank"], 2, "{e}");
    assign_without(&job, victim);
    // P-10: a drain is planned; the old generation's step in flight is not given up. The two
    // members that stay are told so (which processes they are is the coordinator's choice).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let gen2 = loop {
        let a: Vec<Value> = job
            .ranks
            .iter()
            .flat_map(|p| p.lines())
            .filter(|v| v["directive"] == "assign" && v["generation"] == 2)
            .collect();
        if a.len() >= 2 || std::time::Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(gen2.len(), 2, "{gen2:?}");
    assert!(
        gen2.iter().all(|a| a["abandon_previous"] == false),
        "{gen2:?}"
    );
}

/// Waits for a generation whose ranks do not include `member`.
fn assign_without(job: &Job, member: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = job.status_json();
        let ranks: Vec<u64> = s["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["rank"].is_u64())
            .filter_map(|r| r["member"].as_u64())
            .collect();
        if s["generation"].as_u64() > Some(1) && !ranks.contains(&member) {
            assert_eq!(s["world"], 2, "{s}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "member {member} still holds a rank: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
