#!/usr/bin/env python3
"""Goodput of torchft 0.2.0 training a small GPT while a replica group is killed every T seconds.

usage: .venv/bin/python bench/torchft_goodput.py DATA_DIR [--minutes 5] [--kill-every-s 60] [--both]
           [--replicas 4] [--threads 1] [--seed 1337] [--min-replicas 2] [--heartbeat-ms 100]
           [--heartbeat-timeout-ms 5000] [--join-timeout-ms 2000] [--timeout-s 10]
           [--batch 16] [--block 64] [--n-layer 4] [--n-head 4] [--n-embd 128] [--iters 2000]
           [--ref ../shared/bench/nanogpt_ref.py] [--workdir DIR] [--out FILE]

DATA_DIR is what `phalanx prepare` writes (train.bin, val.bin, meta.json). The model, optimizer
and learning-rate schedule are nanogpt_ref.py's (imported from --ref): nanoGPT GPT, AdamW lr 1e-3
betas (0.9, 0.99), weight decay 0.1 on 2-D params, clip 1.0, warmup 100 steps then cosine to 1e-4
at --iters (the run itself is bounded by --minutes).

What runs: a torchft lighthouse (LighthouseServer in a process of its own: --min-replicas,
--join-timeout-ms, --heartbeat-timeout-ms) and --replicas replica groups of one process each
(torch.set_num_threads(--threads)), each a torchft Manager over ProcessGroupGloo with torchft's
DistributedDataParallel (gradients averaged over the quorum's participants) and min_replica_size
--min-replicas. Every step trains a global batch of --batch sequences drawn from the train split
with a seed of (--seed, step); replica group i trains its contiguous share of it (as DDP ranks
do). A process restarted after a kill heals from a live group through torchft's checkpoint
transport (model and optimizer state_dict callbacks) and joins at the next quorum.
This script's process is the supervisor (as torchx or Slurm would be): every --kill-every-s
seconds it SIGKILLs a random replica group among 1..N-1 (random.Random(--seed)) and starts it again
at once; after --minutes it stops every process. --kill-every-s 0 is the fault-free baseline;
--both runs the baseline and then the faulted run, back to back, and compares them.

What is measured: replica group 0 (never killed) writes one JSON line per step (the step number
manager.current_step(), its start and end in unix seconds, whether it committed
(manager.should_commit()), the quorum's participant count (manager.num_participants()), its loss,
the quorum id and how long the step was blocked on the quorum). From those lines:
  training window     = start of group 0's first step .. end of its last committed step
  step duration       = its end - its start, less the time it was blocked on a *new* quorum
  time in steps       = sum of the durations of group 0's committed steps
  ETTR_in_training    = time in steps / training window (capped at 1)
  steps/s             = committed steps / training window
  goodput (--both)    = ETTR_in_training(faulted) / ETTR_in_training(fault-free)
Goodput is phalanx's chaos goodput (`phalanx chaos`: the share of the training window spent in
committed steps, against the fault-free run's), so the two can be set side by side; the ratio of
steps/s is printed too, but it also carries the machine's speed drift between the two runs.
torchft regroups inside a step: the step after a failure starts a quorum, waits (in its first
allreduce) for the lighthouse to form one without the dead group, reconfigures gloo, and then
commits. That wait is phalanx's regroup, which phalanx keeps between its steps, so it is taken
out of the step here (a quorum is new when its quorum id changed: the members changed). The
steady per-step quorum round (same members) stays in the step, as the per-step cost it is.
Outside committed steps are then: the step a kill spoils (failed allreduce, uncommitted), the
wait for the new quorums (one without the dead group, one with the restarted group) and their
gloo reconfiguration and checkpoint send. The literal variant, each committed step from its
start to its end with the new-quorum wait in, is given too (ETTR/goodput "incl_regroup"): it
hides most of what a kill costs. Per kill it also gives how long group 0 went without a
committed step, when the restarted group committed again (rejoined: healed, its first
committed step) and when group 0's quorum was back to all N groups.

torchft 0.2.0's own DistributedDataParallel dies on the first failed allreduce (see
patched_ddp); the bench uses it with that one error path fixed, --stock-ddp shows the crash.

Logs (one steps-N.jsonl and worker-N.log per replica group and run) stay in --workdir (a new
temporary directory by default). The machine matters: N processes of --threads threads each
want N * --threads cores.

Example, 5 minutes fault-free and 5 minutes with a kill every 60 s, 4 groups of 1 thread:
  .venv/bin/python bench/torchft_goodput.py data/shakespeare-char --minutes 5 --kill-every-s 60 --both --out torchft.json
torchft 0.2.0 is installed into .venv by scripts/setup.
"""
import argparse
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHFT_VERSION = "0.2.0"


def die(msg):
    print(f"torchft_goodput: {msg}", file=sys.stderr)
    sys.exit(2)


def parse():
    ap = argparse.ArgumentParser(description="goodput of torchft under replica-group kills",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--minutes", type=float, default=5.0, help="training time of each run")
    ap.add_argument("--kill-every-s", type=float, default=60.0, help="SIGKILL a replica group every this many seconds (0: none)")
    ap.add_argument("--both", action="store_true", help="fault-free run, then the faulted run, and their ratio")
    ap.add_argument("--replicas", type=int, default=4, help="replica groups (one process each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--min-replicas", type=int, default=2, help="lighthouse min_replicas and Manager min_replica_size")
    ap.add_argument("--heartbeat-ms", type=int, default=100, help="Manager heartbeat interval (torchft's default)")
    ap.add_argument("--heartbeat-timeout-ms", type=int, default=5000, help="lighthouse: a replica is dead after this long without a heartbeat (torchft's default)")
    ap.add_argument("--join-timeout-ms", type=int, default=2000,
                    help="lighthouse: how long a valid quorum waits for heartbeating stragglers (torchft's default is 60000; "
                         "shorter than --heartbeat-timeout-ms, survivors go on without a dead group before its heartbeat expires; "
                         "too short on a loaded machine, a group late to a quorum is left out and heals: regroups with no kill)")
    ap.add_argument("--quorum-tick-ms", type=int, default=100, help="lighthouse quorum tick (torchft's default)")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="Manager timeout (collectives, should_commit, checkpoint transfer) and gloo timeout")
    ap.add_argument("--quorum-timeout-s", type=float, default=60.0, help="Manager quorum timeout (torchft's default)")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per step, over all groups)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--iters", type=int, default=2000, help="horizon of the cosine learning-rate schedule")
    ap.add_argument("--ref", default=os.path.join(REPO, "..", "shared", "bench", "nanogpt_ref.py"),
                    help="nanogpt_ref.py (model and schedule)")
    ap.add_argument("--workdir", default=None, help="directory for the logs (default: a new temporary one)")
    ap.add_argument("--out", default=None, help="write the figures as one JSON object to this file")
    ap.add_argument("--stock-ddp", action="store_true",
                    help="torchft 0.2.0's DistributedDataParallel comm hook unpatched (it dies on the first failed allreduce)")
    ap.add_argument("--start-timeout-s", type=float, default=300.0, help="how long the groups may take to start")
    # internal: a replica group's process
    ap.add_argument("--_worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_serve_lighthouse", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_lighthouse", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_incarnation", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args()


def load_ref(path):
    if not os.path.isfile(path):
        die(f"{path}: no such file (the nanoGPT reference; give its path with --ref)")
    spec = importlib.util.spec_from_file_location("nanogpt_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lr_at(it, iters):  # nanogpt_ref.py's schedule
    if it < 100:
        return 1e-3 * (it + 1) / 100
    r = (it - 100) / max(1, iters - 100)
    return 1e-4 + 0.5 * (1 + math.cos(math.pi * min(1.0, r))) * (1e-3 - 1e-4)


# ---------------------------------------------------------------------------------------------
# The lighthouse (its own process, so that its log goes to a file).

def serve_lighthouse(a):
    from torchft._torchft import LighthouseServer
    lh = LighthouseServer(bind="[::]:0", min_replicas=a.min_replicas, join_timeout_ms=a.join_timeout_ms,
                          quorum_tick_ms=a.quorum_tick_ms, heartbeat_timeout_ms=a.heartbeat_timeout_ms)
    print(lh.address(), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (lh.shutdown(), os._exit(0)))
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------------------------------------
# A replica group (one process).

def patched_ddp():
    """torchft.DistributedDataParallel with its comm hook's error path fixed.

    In torchft 0.2.0, when the bucket's allreduce fails (a peer was killed: gloo's "Connection
    reset by peer"), _ManagedWork.wait() records the error with the Manager and returns False
    without building its future chain, and _comm_hook's `assert fut._fut` then raises out of
    loss.backward() and ends the survivor (the same holds when the Manager had already errored
    and allreduce returned a _DummyWork; upstream: meta-pytorch/torchft issue 304). The step
    is lost either way (should_commit() is False after an error), so here the hook hands DDP
    the bucket as it is and the loop goes on to the next quorum, as torchft intends.
    """
    import torch
    from torchft import DistributedDataParallel

    class DDP(DistributedDataParallel):
        @staticmethod
        def _comm_hook(state, bucket):
            buf = bucket.buffer()
            work = state.allreduce(buf)
            ok = work.wait()
            inner = getattr(work.get_future(), "_fut", None)
            if ok and inner is not None:
                return inner
            done = torch.futures.Future()
            done.set_result(buf)
            return done

    return DDP

def worker(a):
    from datetime import timedelta
    import numpy as np
    import torch
    from torch.distributed import TCPStore
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

    stop = []
    rid, n = a._worker, a.replicas
    # Group 0 finishes its step and writes its line; the others, whose lines only serve the
    # rejoin figures, leave at once (they may be waiting on a quorum group 0 has left).
    signal.signal(signal.SIGTERM, (lambda *_: stop.append(1)) if rid == 0 else (lambda *_: os._exit(0)))
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)  # every group starts from the same weights
    ref = load_ref(a.ref)
    meta = json.load(open(os.path.join(a.data_dir, "meta.json")))
    dt = {"u16": np.uint16, "u32": np.uint32}[meta["dtype"]]
    train = np.fromfile(os.path.join(a.data_dir, "train.bin"), dtype=dt).astype(np.int64)
    B, T = a.batch, a.block
    share = [B // n + (1 if r < B % n else 0) for r in range(n)]
    lo, mine = sum(share[:rid]), share[rid]
    c = ref.Cfg(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=T, dropout=0.0,
                bias=False, vocab_size=int(meta["vocab_size"]))
    m = ref.GPT(c)
    decay = [p for p in m.parameters() if p.dim() >= 2]
    nodecay = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": nodecay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))

    def state_dict():
        return {"model": m.state_dict(), "optim": opt.state_dict()}

    def load_state_dict(sd):
        m.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    # This group's own TCPStore (one process per group: world size 1). Group 0's, never killed,
    # is the primary store of the cross-group gloo PG, picked by torchft as the first
    # up-to-date replica in replica-id order.
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=a.timeout_s)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=a.min_replicas,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=a.quorum_timeout_s),
        connect_timeout=timedelta(seconds=60),
        rank=0,
        world_size=1,
        store_addr="localhost",
        store_port=store.port,
        lighthouse_addr=a._lighthouse,
        replica_id=f"replica_{rid}",
        heartbeat_interval=timedelta(milliseconds=a.heartbeat_ms),
        init_sync=False,  # same seed, same initial weights in every group
    )
    net = (DistributedDataParallel if a.stock_ddp else patched_ddp())(manager, m)
    # Time this process is blocked on the quorum (its round with the lighthouse, the gloo
    # reconfiguration when the members changed, sending or fetching a checkpoint): every
    # Manager call that needs the quorum goes through wait_quorum.
    qwait = [0.0]
    wait_quorum = manager.wait_quorum

    def timed_wait_quorum():
        f = manager._quorum_future
        if f is None or f.done():
            return wait_quorum()
        t = time.time()
        try:
            return wait_quorum()
        finally:
            qwait[0] += time.time() - t

    manager.wait_quorum = timed_wait_quorum
    quorum_id = None
    optw = Optimizer(manager, opt)
    out = open(os.path.join(a._dir, f"steps-{rid}.jsonl"), "a", buffering=1)
    # Start together: the first quorum then has every group (the supervisor opens the gate once
    # all are up); a restarted group finds the gate open.
    open(os.path.join(a._dir, f"ready-{rid}.{a._incarnation}"), "w").close()
    gate = os.path.join(a._dir, "go")
    while not os.path.exists(gate) and not stop:
        time.sleep(0.02)
    while not stop:
        t0 = time.time()
        qwait[0] = 0.0
        s0 = manager.current_step()
        rng = np.random.default_rng([a.seed, s0])
        ix = rng.integers(0, len(train) - T - 1, B)[lo:lo + mine]
        x = torch.from_numpy(np.stack([train[i:i + T] for i in ix]))
        y = torch.from_numpy(np.stack([train[i + 1:i + 1 + T] for i in ix]))
        optw.zero_grad(set_to_none=True)  # starts the quorum (async, during forward)
        loss = net(x, y)
        loss.backward()  # gradients averaged over the participants by the comm hook
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        # OptimizerWrapper.step, unrolled to keep should_commit's answer
        committed = manager.should_commit()
        if committed:
            for g in opt.param_groups:
                g["lr"] = lr_at(manager.current_step() - 1, a.iters)
            opt.step()
        t1 = time.time()
        qid = manager._quorum_id
        rec = {"replica": rid, "incarnation": a._incarnation, "step": manager.current_step(),
               "step_start": s0, "t0": t0, "t1": t1, "committed": bool(committed),
               "participants": manager.num_participants(), "loss": float(loss.item()),
               "quorum_id": qid, "new_quorum": qid != quorum_id, "quorum_wait_s": qwait[0]}
        quorum_id = qid
        if not committed and manager.errored() is not None:
            rec["error"] = str(manager.errored().original_exception).splitlines()[0][:200]
        out.write(json.dumps(rec) + "\n")
    out.close()
    manager.shutdown(wait=False)
    os._exit(0)  # native threads (gRPC, gloo) need not be joined


# ---------------------------------------------------------------------------------------------
# The supervisor.

class Run:
    def __init__(self, a, label, kill_every_s):
        self.a, self.label, self.kill_every_s = a, label, kill_every_s
        self.dir = os.path.join(a.workdir, label)
        os.makedirs(self.dir, exist_ok=True)
        self.procs = {}
        self.incarnation = {}
        self.logs = []
        self.kills = []
        self.crashes = []

    def spawn(self, rid):
        a = self.a
        inc = self.incarnation.get(rid, -1) + 1
        self.incarnation[rid] = inc
        cmd = [sys.executable, os.path.abspath(__file__), a.data_dir, "--_worker", str(rid),
               "--_lighthouse", self.lighthouse_addr, "--_dir", self.dir,
               "--_incarnation", str(inc), "--ref", a.ref]
        for k in ("replicas", "threads", "seed", "min_replicas", "heartbeat_ms", "timeout_s",
                  "quorum_timeout_s", "batch", "block", "n_layer", "n_head", "n_embd", "iters"):
            cmd += ["--" + k.replace("_", "-"), str(getattr(a, k))]
        if a.stock_ddp:
            cmd.append("--stock-ddp")
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        log = open(os.path.join(self.dir, f"worker-{rid}.log"), "a")
        log.write(f"=== incarnation {inc} at {time.time():.3f}\n")
        log.flush()
        self.logs.append(log)
        self.procs[rid] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, rid, n=15):
        try:
            with open(os.path.join(self.dir, f"worker-{rid}.log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def check_alive(self, restart):
        for rid, p in list(self.procs.items()):
            if p.poll() is not None:
                if rid == 0 or not restart:
                    self.stop()
                    die(f"replica group {rid} exited with code {p.returncode} "
                        f"({self.label}); its log:\n{self.log_tail(rid)}")
                self.crashes.append({"t": time.time(), "replica": rid, "code": p.returncode})
                print(f"  replica group {rid} exited by itself (code {p.returncode}); restarted", flush=True)
                self.spawn(rid)

    def start(self):
        a = self.a
        cmd = [sys.executable, os.path.abspath(__file__), a.data_dir, "--_serve_lighthouse"]
        for k in ("min_replicas", "join_timeout_ms", "quorum_tick_ms", "heartbeat_timeout_ms"):
            cmd += ["--" + k.replace("_", "-"), str(getattr(a, k))]
        lhlog = open(os.path.join(self.dir, "lighthouse.log"), "a")
        self.logs.append(lhlog)
        self.lighthouse = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lhlog, text=True)
        self.lighthouse_addr = self.lighthouse.stdout.readline().strip()
        if not self.lighthouse_addr:
            self.lighthouse.wait()
            with open(os.path.join(self.dir, "lighthouse.log")) as f:
                tail = "".join(f.readlines()[-15:])
            die(f"the torchft lighthouse did not start (exit code {self.lighthouse.returncode}):\n{tail}")
        for rid in range(a.replicas):
            self.spawn(rid)
        deadline = time.time() + a.start_timeout_s
        while not all(os.path.exists(os.path.join(self.dir, f"ready-{r}.0")) for r in range(a.replicas)):
            self.check_alive(restart=False)
            if time.time() > deadline:
                self.stop()
                die(f"the replica groups were not up after {a.start_timeout_s:.0f} s; logs in {self.dir}")
            time.sleep(0.1)
        open(os.path.join(self.dir, "go"), "w").close()
        self.t_go = time.time()

    def supervise(self):
        a = self.a
        rng = random.Random(a.seed)
        end = self.t_go + a.minutes * 60
        next_kill = self.t_go + self.kill_every_s if self.kill_every_s > 0 else math.inf
        while True:
            now = time.time()
            if now >= end:
                break
            if now >= next_kill:
                rid = rng.randrange(1, a.replicas)
                p = self.procs[rid]
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                t = time.time()
                self.spawn(rid)
                self.kills.append({"t": t, "replica": rid, "incarnation": self.incarnation[rid]})
                print(f"  {t - self.t_go:6.1f} s: killed replica group {rid} (SIGKILL), restarted it", flush=True)
                next_kill += self.kill_every_s
            self.check_alive(restart=True)
            time.sleep(min(0.1, max(0.0, min(end, next_kill) - time.time())))

    def stop(self):
        # Group 0 first (it finishes its step and writes its last line while the others are
        # there), then the others; SIGKILL for any that does not end.
        order = [0] + [r for r in self.procs if r != 0]
        for r in order:
            p = self.procs.get(r)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            if r == 0:
                try:
                    p.wait(timeout=self.a.timeout_s + self.a.quorum_timeout_s)
                except subprocess.TimeoutExpired:
                    p.kill()
        for r in order:
            p = self.procs.get(r)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        lh = getattr(self, "lighthouse", None)
        if lh is not None and lh.poll() is None:
            lh.send_signal(signal.SIGTERM)
            try:
                lh.wait(timeout=10)
            except subprocess.TimeoutExpired:
                lh.kill()
                lh.wait()

    def read(self, rid):
        path = os.path.join(self.dir, f"steps-{rid}.jsonl")
        if not os.path.exists(path):
            return []
        out = []
        for line in open(path):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by SIGKILL
                pass
        return out

    def figures(self):
        a = self.a
        g0 = self.read(0)
        com = [s for s in g0 if s["committed"]]
        if not com:
            die(f"replica group 0 committed no step ({self.label}); logs in {self.dir}")
        t_start, t_end = g0[0]["t0"], com[-1]["t1"]
        window = t_end - t_start
        regroup = sum(s["quorum_wait_s"] for s in com if s["new_quorum"])
        in_steps_incl = sum(s["t1"] - s["t0"] for s in com)
        in_steps = in_steps_incl - regroup
        steady = [s["quorum_wait_s"] for s in com if not s["new_quorum"]]
        tail = [s["loss"] for s in com[-20:]]
        per_kill = []
        full = [s for s in com if s["participants"] == a.replicas]
        for k in self.kills:
            after = [s for s in com if s["t1"] > k["t"]]
            back = [s for s in self.read(k["replica"])
                    if s["incarnation"] == k["incarnation"] and s["committed"]]
            fk = [s for s in full if s["t0"] > k["t"]]
            per_kill.append({
                "t_s": round(k["t"] - self.t_go, 3),
                "replica": k["replica"],
                # how long group 0 went without a committed step
                "g0_next_commit_s": round(after[0]["t1"] - k["t"], 3) if after else None,
                "g0_uncommitted_steps": sum(1 for s in g0 if s["t1"] > k["t"] and not s["committed"]
                                            and (not after or s["t1"] <= after[0]["t1"])),
                # the restarted process's first committed step (it healed and trained)
                "rejoined_s": round(back[0]["t1"] - k["t"], 3) if back else None,
                "rejoined_at_step": back[0]["step"] if back else None,
                # group 0's first committed step with every group in its quorum again
                "all_groups_again_s": round(fk[0]["t1"] - k["t"], 3) if fk else None,
            })
        parts = {}
        for s in com:
            parts[s["participants"]] = parts.get(s["participants"], 0) + 1
        errors = sorted({s.get("error") for s in g0 if s.get("error")})
        return {
            "label": self.label,
            "kill_every_s": self.kill_every_s,
            "committed_steps": len(com),
            "uncommitted_steps": len(g0) - len(com),
            "last_step": com[-1]["step"],
            "training_window_s": window,
            "time_in_committed_steps_s": in_steps,
            "ettr_in_training": min(1.0, in_steps / max(window, 1e-9)),
            "regroup_wait_in_committed_steps_s": regroup,
            "time_in_committed_steps_incl_regroup_s": in_steps_incl,
            "ettr_in_training_incl_regroup": min(1.0, in_steps_incl / max(window, 1e-9)),
            "new_quorums": sum(1 for s in g0 if s["new_quorum"]),
            "steady_quorum_wait_ms_mean": 1e3 * sum(steady) / max(1, len(steady)),
            "steps_per_s": len(com) / max(window, 1e-9),
            "median_step_s": sorted(s["t1"] - s["t0"] for s in com)[len(com) // 2],
            "kills": len(self.kills),
            "crashes": len(self.crashes),
            "final_train_loss": com[-1]["loss"],
            "final_train_loss_mean20": sum(tail) / len(tail),
            "first_train_loss": com[0]["loss"],
            "committed_steps_by_participants": {str(k): v for k, v in sorted(parts.items())},
            "per_kill": per_kill,
            "errors_seen": errors[:5],
            "logs": self.dir,
        }


def run(a, label, kill_every_s):
    r = Run(a, label, kill_every_s)
    kills = f"a kill every {kill_every_s:g} s" if kill_every_s > 0 else "no kills"
    print(f"[{label}] {a.replicas} replica groups x {a.threads} thread(s), {a.minutes:g} min, {kills}; logs in {r.dir}", flush=True)
    try:
        t = time.time()
        r.start()
        print(f"  all {a.replicas} groups up after {r.t_go - t:.1f} s; training", flush=True)
        r.supervise()
    finally:
        r.stop()
    f = r.figures()
    show(f, a.replicas)
    return f


def show(f, n):
    print(f"  committed steps {f['committed_steps']} (uncommitted {f['uncommitted_steps']}), "
          f"window {f['training_window_s']:.1f} s, in committed steps {f['time_in_committed_steps_s']:.1f} s "
          f"(+ {f['regroup_wait_in_committed_steps_s']:.1f} s waiting on {f['new_quorums']} new quorums)")
    print(f"  ETTR_in_training {f['ettr_in_training']:.4f} ({f['ettr_in_training_incl_regroup']:.4f} counting "
          f"the new-quorum waits in), {f['steps_per_s']:.2f} steps/s, median step {1e3 * f['median_step_s']:.0f} ms "
          f"(quorum {f['steady_quorum_wait_ms_mean']:.1f} ms of it), kills {f['kills']}"
          + (f", crashes {f['crashes']}" if f["crashes"] else ""))
    print(f"  train loss {f['first_train_loss']:.4f} -> {f['final_train_loss']:.4f} "
          f"(mean of the last 20 committed steps {f['final_train_loss_mean20']:.4f}), group 0's share of the batch")
    print(f"  group 0's committed steps by quorum size: {f['committed_steps_by_participants']}")
    if f["kills"] == 0 and f["new_quorums"] > 1:
        print(f"  note: {f['new_quorums'] - 1} regroup(s) with no kill: a group was later to a quorum than "
              f"--join-timeout-ms, was left out and healed (a loaded machine); they lower this run's ETTR")
    for k in f["per_kill"]:
        def s(v):
            return "-" if v is None else f"{v:.1f} s"
        rejoin = (f"rejoined (healed; committed step {k['rejoined_at_step']}) after {s(k['rejoined_s'])}"
                  if k["rejoined_s"] is not None else "did not rejoin before it was killed again or the run ended")
        print(f"    kill at {k['t_s']:.1f} s of group {k['replica']}: group 0 committed again after "
              f"{s(k['g0_next_commit_s'])} ({k['g0_uncommitted_steps']} uncommitted), group {k['replica']} "
              f"{rejoin}, all {n} groups in group 0's quorum after {s(k['all_groups_again_s'])}")
    for e in f["errors_seen"]:
        print(f"    error seen by group 0: {e}")


def main():
    a = parse()
    if a._serve_lighthouse:
        return serve_lighthouse(a)
    if a._worker is not None:
        return worker(a)
    if not os.path.isfile(os.path.join(a.data_dir, "train.bin")) or not os.path.isfile(os.path.join(a.data_dir, "meta.json")):
        die(f"{a.data_dir} has no train.bin and meta.json (make one with `phalanx prepare --out DIR`)")
    a.data_dir = os.path.abspath(a.data_dir)
    a.ref = os.path.abspath(a.ref)
    if not os.path.isfile(a.ref):
        die(f"{a.ref}: no such file (the nanoGPT reference; give its path with --ref)")
    if a.replicas < 2:
        die("--replicas must be at least 2 (group 0 is never killed)")
    if a.min_replicas > a.replicas - 1 and (a.both or a.kill_every_s > 0):
        die(f"--min-replicas {a.min_replicas} would stop every commit while a group is down; use at most {a.replicas - 1}")
    if a.both and a.kill_every_s <= 0:
        die("--both needs --kill-every-s > 0")
    # Checked in a child (importing torch here would only slow the supervisor down).
    chk = subprocess.run([sys.executable, "-c", "import torchft; from importlib.metadata import version; print(version('torchft'))"],
                         capture_output=True, text=True)
    if chk.returncode != 0:
        err = (chk.stderr.strip().splitlines() or ["?"])[-1]
        if "No module named 'torchft'" in err:
            die(f"torchft is not installed for {sys.executable}; run scripts/setup (it installs torchft=={TORCHFT_VERSION})")
        die(f"torchft does not import: {err}")
    v = chk.stdout.strip()
    if v != TORCHFT_VERSION:
        print(f"torchft_goodput: note: torchft {v} installed, this bench is written for {TORCHFT_VERSION}", file=sys.stderr)
    a.workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="torchft_goodput_"))
    os.makedirs(a.workdir, exist_ok=True)
    result = {"torchft": v, "replicas": a.replicas, "threads": a.threads, "minutes": a.minutes,
              "min_replicas": a.min_replicas, "heartbeat_ms": a.heartbeat_ms,
              "heartbeat_timeout_ms": a.heartbeat_timeout_ms, "join_timeout_ms": a.join_timeout_ms,
              "timeout_s": a.timeout_s, "seed": a.seed,
              "model": {"n_layer": a.n_layer, "n_head": a.n_head, "n_embd": a.n_embd,
                        "block": a.block, "batch": a.batch}}
    if a.both:
        base = run(a, "fault-free", 0)
        faulted = run(a, "faulted", a.kill_every_s)
        g = faulted["ettr_in_training"] / base["ettr_in_training"]
        gi = faulted["ettr_in_training_incl_regroup"] / base["ettr_in_training_incl_regroup"]
        sr = faulted["steps_per_s"] / base["steps_per_s"]
        result.update({"fault_free": base, "faulted": faulted, "goodput": g,
                       "goodput_incl_regroup": gi, "steps_per_s_ratio": sr})
        print(f"goodput {g:.4f} (ETTR_in_training {faulted['ettr_in_training']:.4f} with a kill every "
              f"{a.kill_every_s:g} s over {base['ettr_in_training']:.4f} without; {gi:.4f} counting the "
              f"new-quorum waits as step time); steps/s {sr:.4f} of the fault-free run's "
              f"({faulted['steps_per_s']:.2f} / {base['steps_per_s']:.2f}); kills {faulted['kills']}")
    else:
        f = run(a, "faulted" if a.kill_every_s > 0 else "fault-free", a.kill_every_s)
        result.update({"run": f})
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
