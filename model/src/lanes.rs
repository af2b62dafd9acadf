//! Micro-batches side by side: a rank's micro-batches cut into contiguous runs ("lanes"), each
//! computed on a thread of its own with its share of libtorch's threads, instead of one after
//! another with every operator split over the threads. A small model's operators split that
//! way leave the other threads waiting at barriers for much of the step; whole micro-batches
//! side by side keep every core on its own work.
//!
//! The first lane runs on the caller's thread and accumulates into the parameters' gradients
//! as a sequential step does; the others take their gradients apart (`run_backward`) on
//! threads kept for the trainer's life, and are added after it in lane order, so a run's sums
//! are the same from one run to the next (not bitwise those of one lane).

use crate::gpt::Gpt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use tch::{Kind, Tensor};

/// A lane's work: the model (handles on the caller's parameters, taken anew for every step so
/// that a model replaced between steps is never a stale one), its micro-batches, their weight.
struct Job {
    model: Gpt,
    batches: Vec<(Tensor, Tensor)>,
    scale: f64,
    intra_threads: i32,
}

/// A lane's result: its summed loss and its gradient per parameter.
type Done = std::thread::Result<(Tensor, Vec<Tensor>)>;

struct Worker {
    jobs: Sender<Job>,
    done: Receiver<Done>,
}

/// The threads of the lanes after the first, started when first needed.
#[derive(Default)]
pub struct Lanes {
    workers: Vec<Worker>,
}

/// How a step's micro-batches are spread: `lanes` runs of consecutive micro-batches, each
/// with `intra_threads` libtorch threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub lanes: usize,
    pub intra_threads: usize,
}

impl Plan {
    /// `threads` for this rank, `micro_batches` to compute, lanes allowed or not: as many lanes
    /// as threads and micro-batches allow, the threads shared out among them.
    pub fn of(threads: usize, micro_batches: usize, allowed: bool) -> Plan {
        let threads = threads.max(1);
        let lanes = if allowed {
            threads.min(micro_batches).max(1)
        } else {
            1
        };
        Plan {
            lanes,
            intra_threads: (threads / lanes).max(1),
        }
    }
}

impl Lanes {
    /// Forward and backward of `batches` (each loss weighted by `scale`) in up to `plan.lanes`
    /// lanes of as even a share as they allow: the first accumulates into `model`'s gradients
    /// here, the others' gradients are added to them afterwards. Returns the summed loss. A
    /// panic in any lane is raised here once every lane has answered.
    pub fn accumulate(
        &mut self,
        model: &Gpt,
        batches: &[(Tensor, Tensor)],
        scale: f64,
        plan: Plan,
    ) -> Tensor {
        let runs = even_runs(batches, plan.lanes);
        let (mine, others) = runs
            .split_first()
            .map_or((&[][..], &[][..]), |(m, o)| (*m, o));
        while self.workers.len() < others.len() {
            self.workers.push(Worker::start());
        }
        for (w, run) in self.workers.iter_mut().zip(others) {
            w.give(Job {
                model: model.lane(),
                batches: run
                    .iter()
                    .map(|(x, y)| (x.shallow_clone(), y.shallow_clone()))
                    .collect(),
                scale,
                intra_threads: plan.intra_threads as i32,
            });
        }
        let here = catch_unwind(AssertUnwindSafe(|| backward_here(model, mine, scale)));
        // Every lane answers before anything is raised: none is left computing on parameters
        // the caller goes on to change, and no answer is left queued for the next step.
        let theirs: Vec<Done> = self.workers[..others.len()]
            .iter()
            .map(|w| {
                w.done
                    .recv()
                    .unwrap_or_else(|_| Err(Box::new("a lane thread died")))
            })
            .collect();
        let mut sum = here.unwrap_or_else(|p| std::panic::resume_unwind(p));
        for r in theirs {
            let (loss, grads) = r.unwrap_or_else(|p| std::panic::resume_unwind(p));
            sum += loss;
            add_grads(model, &grads);
        }
        sum
    }
}

/// Forward and backward of `batches` one after another on this thread, accumulating into the
/// parameters' gradients; their summed loss.
pub fn backward_here(model: &Gpt, batches: &[(Tensor, Tensor)], scale: f64) -> Tensor {
    let mut sum = Tensor::zeros([], (Kind::Float, model.device()));
    for (x, y) in batches {
        let loss = model.loss(x, y, true);
        (&loss * scale).backward();
        sum += loss.detach();
    }
    sum
}

/// `batches` cut into at most `lanes` consecutive runs whose lengths differ by one at most,
/// the longer first.
fn even_runs(batches: &[(Tensor, Tensor)], lanes: usize) -> Vec<&[(Tensor, Tensor)]> {
    let lanes = lanes.clamp(1, batches.len().max(1));
    let (base, extra) = (batches.len() / lanes, batches.len() % lanes);
    let mut at = 0;
    (0..lanes)
        .map(|i| {
            let n = base + usize::from(i < extra);
            at += n;
            &batches[at - n..at]
        })
        .collect()
}

/// Adds a lane's gradients into the parameters' own.
fn add_grads(model: &Gpt, grads: &[Tensor]) {
    tch::no_grad(|| {
        for (v, g) in model.params.leaves().iter().zip(grads) {
            if g.defined() {
                let mut own = v.grad();
                own += g;
            }
        }
    });
}

impl Worker {
    fn start() -> Worker {
        let (jobs, inbox) = channel::<Job>();
        let (outbox, done) = channel::<Done>();
        std::thread::Builder::new()
            .name("phalanx-lane".into())
            .spawn(move || {
                // libtorch's thread count is this thread's own: set when it changes only.
                let mut intra = 0;
                while let Ok(job) = inbox.recv() {
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        if job.intra_threads != intra {
                            tch::set_num_threads(job.intra_threads);
                            intra = job.intra_threads;
                        }
                        lane_grads(&job.model, &job.batches, job.scale)
                    }));
                    if outbox.send(r).is_err() {
                        break;
                    }
                }
            })
            .expect("cannot start a lane thread");
        Worker { jobs, done }
    }

    /// Hands `job` to the lane's thread, started anew if it has gone.
    fn give(&mut self, job: Job) {
        if let Err(back) = self.jobs.send(job) {
            *self = Worker::start();
            let _ = self.jobs.send(back.0);
        }
    }
}

/// One lane's micro-batches: their summed loss and their gradient, kept apart from the
/// parameters' own (the first lane accumulates into those meanwhile).
fn lane_grads(model: &Gpt, batches: &[(Tensor, Tensor)], scale: f64) -> (Tensor, Vec<Tensor>) {
    let mut sum = Tensor::zeros([], (Kind::Float, model.device()));
    let mut acc: Vec<Tensor> = Vec::new();
    for (x, y) in batches {
        let loss = model.loss(x, y, true);
        let grads = Tensor::run_backward(&[&loss * scale], model.params.leaves(), false, false);
        sum += loss.detach();
        if acc.is_empty() {
            acc = grads;
            continue;
        }
        // Out of place: a gradient autograd hands back may be a view that cannot take an
        // in-place add; one that is undefined (a parameter the loss does not use) adds nothing.
        tch::no_grad(|| {
            for (a, g) in acc.iter_mut().zip(&grads) {
                match (a.defined(), g.defined()) {
                    (true, true) => *a = &*a + g,
                    (false, true) => *a = g.shallow_clone(),
                    _ => {}
                }
            }
        });
    }
    (sum, acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Runs are consecutive, cover every micro-batch once, and differ in length by one at most
    // (5 over 4 lanes: 2, 1, 1, 1, not 2, 2, 1 on 3 lanes with a thread idle).
    #[test]
    fn runs_are_even_and_in_order() {
        let b: Vec<(Tensor, Tensor)> = (0..5)
            .map(|i| (Tensor::from(i as i64), Tensor::from(0i64)))
            .collect();
        for (lanes, want) in [
            (4, vec![2, 1, 1, 1]),
            (2, vec![3, 2]),
            (1, vec![5]),
            (9, vec![1, 1, 1, 1, 1]),
            (0, vec![5]),
        ] {
            let runs = even_runs(&b, lanes);
            assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), want);
            let order: Vec<i64> = runs
                .iter()
                .flat_map(|r| r.iter().map(|(x, _)| x.int64_value(&[])))
                .collect();
            assert_eq!(order, vec![0, 1, 2, 3, 4]);
        }
        assert!(even_runs(&b[..0], 2).iter().all(|r| r.is_empty()));
    }

    // Lanes take what threads and micro-batches allow, and share the threads out.
    #[test]
    fn a_plan_shares_threads_among_lanes() {
        // (threads, micro-batches, allowed) -> (lanes, libtorch threads per lane)
        for ((threads, mbs, allowed), (lanes, intra_threads)) in [
            ((2, 4, true), (2, 1)),
            ((2, 1, true), (1, 2)),
            ((4, 2, true), (2, 2)),
            ((2, 4, false), (1, 2)),
            ((0, 0, true), (1, 1)),
            ((3, 2, true), (2, 1)),
        ] {
            let want = Plan {
                lanes,
                intra_threads,
            };
            assert_eq!(
                Plan::of(threads, mbs, allowed),
                want,
                "{threads} {mbs} {allowed}"
            );
        }
    }
}
