//! Micro-batches side by side: a rank's micro-batches cut into contiguous runs ("lanes"), each
//! computed on a thread of its own with one libtorch thread, instead of one micro-batch after
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
    /// Forward and backward of `batches` (each loss weighted by `scale`) in `plan.lanes` lanes:
    /// the first accumulates into `model`'s gradients here, the others' gradients are added to
    /// them afterwards. Returns the summed loss. A panic in a lane is raised here.
    pub fn accumulate(
        &mut self,
        model: &Gpt,
        batches: &[(Tensor, Tensor)],
        scale: f64,
        plan: Plan,
    ) -> Tensor {
        let per = batches.len().div_ceil(plan.lanes.max(1)).max(1);
        let (mine, rest) = batches.split_at(per.min(batches.len()));
        let runs: Vec<&[(Tensor, Tensor)]> = rest.chunks(per).collect();
        while self.workers.len() < runs.len() {
            self.workers.push(Worker::start());
        }
        for (w, run) in self.workers.iter().zip(&runs) {
            let job = Job {
                model: model.lane(),
                batches: run
                    .iter()
                    .map(|(x, y)| (x.shallow_clone(), y.shallow_clone()))
                    .collect(),
                scale,
                intra_threads: plan.intra_threads as i32,
            };
            w.jobs
                .send(job)
                .expect("a lane thread outlives its trainer");
        }
        let mut sum = Tensor::zeros([], (Kind::Float, model.device()));
        for (x, y) in mine {
            let loss = model.loss(x, y, true);
            (&loss * scale).backward();
            sum += loss.detach();
        }
        // Every lane is waited for before a panic is raised: none is left computing on
        // parameters the caller goes on to change.
        let results: Vec<Done> = self.workers[..runs.len()]
            .iter()
            .map(|w| w.done.recv().expect("a lane thread answers every job"))
            .collect();
        for r in results {
            let (loss, grads) = r.unwrap_or_else(|p| std::panic::resume_unwind(p));
            sum += loss;
            add_grads(model, &grads);
        }
        sum
    }
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
                // Ends when the trainer (the sender) is dropped.
                while let Ok(job) = inbox.recv() {
                    tch::set_num_threads(job.intra_threads);
                    let r = catch_unwind(AssertUnwindSafe(|| {
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
}

/// One lane's micro-batches: their summed loss and their gradient, kept apart from the
/// parameters' own (the first lane accumulates into those meanwhile).
fn lane_grads(model: &Gpt, batches: &[(Tensor, Tensor)], scale: f64) -> (Tensor, Vec<Tensor>) {
    let mut sum = Tensor::zeros([], (Kind::Float, model.device()));
    let mut acc: Option<Vec<Tensor>> = None;
    for (x, y) in batches {
        let loss = model.loss(x, y, true);
        let grads = Tensor::run_backward(&[&loss * scale], model.params.leaves(), false, false);
        sum += loss.detach();
        acc = Some(match acc {
            None => grads,
            Some(mut a) => {
                tch::no_grad(|| {
                    for (a, g) in a.iter_mut().zip(&grads) {
                        *a += g;
                    }
                });
                a
            }
        });
    }
    (sum, acc.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

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
