//! The training loop: epochs of micro-batches, gradient accumulation, clipping, the optimizer
//! step, the per-epoch dev evaluation and the checkpoints. [`Run`] holds the state a
//! checkpoint saves; each part of a step is one method.

use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use goemo_data::data::Split;
use goemo_data::tokens::TokenizedData;
use goemo_nn::backprop::{Grads, Spare};
use goemo_nn::loss::Loss;
use goemo_nn::model::{NamedTensors, Params};
use goemo_nn::optim::AdamW;
use goemo_report::metrics;

use super::batching::{auto_pos_weight, epoch_batches, first_ids, mix, SoftTargets};
use super::checkpoint::{load_checkpoint, save_checkpoint, CheckpointState, EpochPosition, Tally};
use super::gradients::{loss_and_grads, Objective};
use super::schedule::lr_at;
use super::{
    EpochLog, PosWeight, PosWeightMode, StepLog, TrainEnv, TrainLog, TrainOutcome, TrainParams,
};
use crate::scoring::predict_scores;

/// Train `params` on `data`'s train rows, resuming from a checkpoint in the work folder when
/// there is one. `started` is when the stage began (for the metrics' runtime).
pub fn train_params(
    p: &TrainParams,
    data: &TokenizedData,
    params: Params,
    env: &TrainEnv<'_>,
    started: Instant,
) -> anyhow::Result<TrainOutcome> {
    train_params_with(p, data, params, env, started, None)
}

/// [`train_params`] with the labels mixed with soft targets (a distilled student).
pub fn train_params_with(
    p: &TrainParams,
    data: &TokenizedData,
    params: Params,
    env: &TrainEnv<'_>,
    started: Instant,
    soft: Option<&SoftTargets>,
) -> anyhow::Result<TrainOutcome> {
    let mut run = Run::new(p, data, params, env, started)?;
    run.soft = soft;
    for epoch in run.start_epoch..p.epochs {
        if run.log.stopped_early || (p.max_steps > 0 && run.step >= p.max_steps) {
            break;
        }
        // A run cut short by max_steps ends here, without an end-of-epoch checkpoint.
        if run.epoch(epoch)? {
            break;
        }
        run.checkpoint(epoch + 1, (0, 0, 0.0))?;
    }
    run.finish()
}

/// One training run's state.
struct Run<'a> {
    p: &'a TrainParams,
    data: &'a TokenizedData,
    env: &'a TrainEnv<'a>,
    params: Params,
    train_rows: Vec<usize>,
    dev_rows: Vec<usize>,
    loss: Loss,
    soft: Option<&'a SoftTargets>,
    steps_per_epoch: usize,
    total_steps: usize,
    warmup: usize,
    opt: AdamW,
    log: TrainLog,
    /// The best epoch's weights.
    best: NamedTensors,
    best_f1: f64,
    epochs_since_best: usize,
    step: usize,
    start_epoch: usize,
    /// Where a mid-epoch checkpoint left the first epoch to run.
    resume_in_epoch: Option<EpochPosition>,
    clock: Clock,
    /// The last gradients' word-embedding buffer, for the next micro-batch to write into.
    spare: Option<Spare>,
}

/// Time and work, of this process and of those before it (a resumed run).
struct Clock {
    started: Instant,
    train_started: Instant,
    last_checkpoint: Instant,
    before_this_process: Tally,
    /// This process's work; its clock times are filled in by `so_far`.
    this_process: Tally,
}

impl Clock {
    fn so_far(&self) -> Tally {
        self.before_this_process
            + Tally {
                runtime_secs: self.started.elapsed().as_secs_f64(),
                train_secs: self.train_started.elapsed().as_secs_f64(),
                ..self.this_process
            }
    }

    fn examples_per_sec(&self) -> f64 {
        self.this_process.examples as f64 / self.train_started.elapsed().as_secs_f64()
    }
}

/// Micro-batches gathered for one optimizer step.
#[derive(Default)]
struct Accumulated {
    grads: Option<Grads>,
    loss: f64,
    /// The first rows of the step's first batch, for error messages.
    first_rows: Vec<String>,
    batches: usize,
    /// The token ids of the step's batches: the word-embedding rows its gradient may touch.
    word_rows: Vec<u32>,
}

impl<'a> Run<'a> {
    fn new(
        p: &'a TrainParams,
        data: &'a TokenizedData,
        params: Params,
        env: &'a TrainEnv<'a>,
        started: Instant,
    ) -> anyhow::Result<Run<'a>> {
        let train_rows = data.rows_in(Split::Train);
        let dev_rows = data.rows_in(Split::Dev);
        if train_rows.is_empty() {
            anyhow::bail!("no train rows: check the load and sample stages");
        }
        let pos_weight_values: Option<Vec<f64>> = match &p.pos_weight {
            PosWeight::Mode(PosWeightMode::None) => None,
            PosWeight::Mode(PosWeightMode::Auto) => {
                Some(auto_pos_weight(data, &train_rows, p.pos_weight_cap))
            }
            PosWeight::List(l) if l.len() == data.n_labels() => Some(l.clone()),
            PosWeight::List(l) => anyhow::bail!(
                "pos_weight lists {} weights but the data has {} labels",
                l.len(),
                data.n_labels()
            ),
        };
        for warning in p.conflicts() {
            tracing::warn!("train: {warning}");
        }
        let loss = Loss {
            kind: p.loss_kind(),
            label_smoothing: p.label_smoothing as f32,
            pos_weight: pos_weight_values
                .as_ref()
                .map(|w| w.iter().map(|&x| x as f32).collect()),
        };
        let batches_per_epoch = train_rows.len().div_ceil(p.batch_size);
        let steps_per_epoch = batches_per_epoch.div_ceil(p.grad_accum);
        let mut total_steps = steps_per_epoch * p.epochs;
        if p.max_steps > 0 {
            total_steps = total_steps.min(p.max_steps);
        }
        let warmup = (p.warmup_fraction * total_steps as f64).round() as usize;
        let mut opt = AdamW::new(&params, p.adamw());
        if p.ema_decay > 0.0 {
            opt = opt.with_average(&params, p.ema_decay)?;
        }
        if env.device.is_cpu() {
            // Word-embedding rows outside a step's batches take their updates when next read
            // (the same bits; see `AdamW::defer_word_rows`). On a GPU a row-wise update would
            // copy the table each time.
            opt = opt.defer_word_rows(&params);
        }
        let log = TrainLog {
            total_steps,
            pos_weight: pos_weight_values,
            ..Default::default()
        };
        let best = params.snapshot()?;
        let mut run = Run {
            p,
            data,
            env,
            params,
            train_rows,
            dev_rows,
            loss,
            soft: None,
            steps_per_epoch,
            total_steps,
            warmup,
            opt,
            log,
            best,
            best_f1: f64::NEG_INFINITY,
            epochs_since_best: 0,
            step: 0,
            start_epoch: 0,
            resume_in_epoch: None,
            clock: Clock {
                started,
                train_started: Instant::now(),
                last_checkpoint: Instant::now(),
                before_this_process: Tally::default(),
                this_process: Tally::default(),
            },
            spare: None,
        };
        run.resume()?;
        Ok(run)
    }

    /// Pick up from the work folder's checkpoint, if there is one.
    fn resume(&mut self) -> anyhow::Result<()> {
        let work_dir = self.env.work_dir;
        let Some((state, saved_best)) = load_checkpoint(work_dir, &self.params, &mut self.opt)?
        else {
            return Ok(());
        };
        tracing::info!(
            "train: resuming at epoch {}, batch {} (step {}) from the checkpoint in {}",
            state.epochs_done + 1,
            state.batches_done,
            state.step,
            work_dir.display()
        );
        self.start_epoch = state.epochs_done;
        if state.batches_done > 0 {
            self.resume_in_epoch = Some((
                state.batches_done,
                state.dropout_rng_word_pos,
                state.epoch_loss_sum,
            ));
        }
        self.step = state.step;
        self.clock.before_this_process = state.so_far;
        self.log = state.log;
        self.epochs_since_best = state.epochs_since_best;
        self.best_f1 = if self.log.epochs.is_empty() {
            f64::NEG_INFINITY
        } else {
            self.log.best_dev_macro_f1
        };
        self.best = saved_best;
        self.clock.train_started = Instant::now();
        self.clock.last_checkpoint = Instant::now();
        Ok(())
    }

    /// One epoch (or what is left of it after a resume), its dev evaluation included. Returns
    /// whether `max_steps` was reached.
    fn epoch(&mut self, epoch: usize) -> anyhow::Result<bool> {
        let p = self.p;
        let batches = epoch_batches(
            self.data,
            &self.train_rows,
            p.batch_size,
            p.bucket_batches,
            p.seed,
            epoch,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(mix(p.seed, epoch as u64, 2));
        let bar = progress_bar(self.env.interactive, self.steps_per_epoch, epoch, p.epochs);
        let (mut epoch_loss, mut seen, mut skip) = (0f64, 0usize, 0usize);
        if let Some((done, word_pos, loss_sum)) = self.resume_in_epoch.take() {
            skip = done;
            rng.set_word_pos(word_pos);
            epoch_loss = loss_sum;
            seen = done;
            if let Some(bar) = &bar {
                bar.set_position((done / p.grad_accum) as u64);
                // The jump is not progress made now: rate and ETA start from here.
                bar.reset_eta();
            }
        }
        let mut acc = Accumulated::default();
        let epoch_started = Instant::now();
        let mut reached_max_steps = false;
        for (bi, rows) in batches.iter().enumerate().skip(skip) {
            (self.env.check)()?;
            let loss = self.micro_batch(rows, &mut rng, &mut acc, (epoch, bi))?;
            epoch_loss += loss;
            seen += 1;
            let last = bi + 1 == batches.len();
            if acc.batches < p.grad_accum && !last {
                continue;
            }
            let (entry, norm) = self.optimizer_step(&mut acc, epoch, bi, batches.len())?;
            if let Some(bar) = &bar {
                bar.set_message(format!(
                    "loss {:.4}  {:.1} ex/s",
                    entry.loss,
                    self.clock.examples_per_sec()
                ));
                bar.inc(1);
            } else if self.step.is_multiple_of(p.log_every.max(1)) {
                // From the batches this process ran: a resumed epoch skipped the ones before.
                let ran = (bi + 1 - skip) as f64;
                let left = (batches.len() - bi - 1) as f64;
                let eta = epoch_started.elapsed().as_secs_f64() / ran * left;
                tracing::info!(
                    "epoch {}/{} step {}/{}: loss {:.4}, lr {:.2e}, grad norm {:.3}, {:.1} ex/s, epoch ETA {:.0}s",
                    epoch + 1, p.epochs, self.step, self.total_steps, entry.loss, entry.learning_rate, norm, self.clock.examples_per_sec(), eta
                );
            }
            self.log.steps.push(entry);
            if p.max_steps > 0 && self.step >= p.max_steps {
                reached_max_steps = true;
                break;
            }
            let due = self.clock.last_checkpoint.elapsed().as_secs_f64() >= p.checkpoint_every_secs;
            if !last && due {
                self.checkpoint(epoch, (bi + 1, rng.get_word_pos(), epoch_loss))?;
            }
        }
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        self.finish_epoch(epoch, epoch_loss / seen.max(1) as f64)?;
        Ok(reached_max_steps)
    }

    /// Loss and gradients of one micro-batch, added to `acc` (scaled to a mean over the
    /// step's micro-batches). Returns the batch's loss.
    fn micro_batch(
        &mut self,
        rows: &[usize],
        rng: &mut ChaCha8Rng,
        acc: &mut Accumulated,
        (epoch, bi): (usize, usize),
    ) -> anyhow::Result<f64> {
        let (p, data) = (self.p, self.data);
        let tokens: Vec<u32> = rows
            .iter()
            .flat_map(|&i| data.row(i).iter().copied())
            .collect();
        // The forward pass reads these rows of the word embeddings: bring them up to date.
        self.opt.settle_rows(&self.params, &tokens)?;
        acc.word_rows.extend_from_slice(&tokens);
        let t0 = Instant::now();
        let (loss, grads) = loss_and_grads(
            &self.params,
            data,
            rows,
            Objective {
                loss: &self.loss,
                soft: self.soft,
            },
            Some(rng),
            self.env.device,
            p.precision.products(),
            self.spare.take(),
        )?;
        self.clock.this_process.fwd_bwd_secs += t0.elapsed().as_secs_f64();
        if !loss.is_finite() {
            anyhow::bail!(
                "loss is {loss} at epoch {}, step {} (batch {} of the epoch); first rows of the batch: {}\n  hint: lower lr, cap pos_weight (pos_weight_cap), or check those rows",
                epoch + 1, self.step + 1, bi + 1, first_ids(data, rows)
            );
        }
        let scale = 1.0 / p.grad_accum as f32;
        if let Some(sum) = acc.grads.as_mut() {
            sum.leaves_mut()
                .into_par_iter()
                .zip(grads.leaves())
                .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, g)| *a += g * scale));
            self.spare = Some(Spare::new(grads, tokens));
        } else {
            let mut grads = grads;
            // With grad_accum 1 the scale is 1.0, and x · 1.0 is x: no pass needed.
            if scale != 1.0 {
                grads
                    .leaves_mut()
                    .into_par_iter()
                    .for_each(|g| g.iter_mut().for_each(|x| *x *= scale));
            }
            acc.grads = Some(grads);
        }
        acc.loss += loss / p.grad_accum as f64;
        if acc.first_rows.is_empty() {
            acc.first_rows.push(first_ids(data, rows));
        }
        acc.batches += 1;
        let tally = &mut self.clock.this_process;
        tally.examples += rows.len();
        tally.tokens += rows
            .iter()
            .map(|&i| data.offsets[i + 1] - data.offsets[i])
            .sum::<usize>();
        Ok(loss)
    }

    /// Clip the accumulated gradients and update the parameters: the step's log entry and
    /// its gradient norm (before clipping).
    fn optimizer_step(
        &mut self,
        acc: &mut Accumulated,
        epoch: usize,
        bi: usize,
        batches: usize,
    ) -> anyhow::Result<(StepLog, f64)> {
        let p = self.p;
        let Some(mut grads) = acc.grads.take() else {
            anyhow::bail!("no gradients accumulated at step {}", self.step + 1);
        };
        // The word-embedding gradient is zero outside its batches' rows: the norm and the
        // scalings below read and write those rows of it only (the same bits).
        let vocab = self.params.cfg.vocab_size;
        let rows = goemo_nn::optim::sorted_rows(&acc.word_rows, vocab)?;
        let word = WordRows {
            leaf: grads
                .leaves()
                .iter()
                .position(|g| std::ptr::eq(*g, &grads.embeddings.word))
                .expect("the word embeddings are a leaf"),
            rows: &rows,
            width: grads.embeddings.norm.weight.len(),
        };
        if acc.batches < p.grad_accum {
            // A short final accumulation: rescale to a mean over the micro-batches it had.
            scale(&mut grads, word, p.grad_accum as f32 / acc.batches as f32);
            acc.loss *= p.grad_accum as f64 / acc.batches as f64;
        }
        let leaves: Vec<&[f32]> = grads.leaves().into_iter().map(|g| &g[..]).collect();
        let norm = sums_of_squares(&leaves, Some(word))
            .iter()
            .sum::<f64>()
            .sqrt();
        if !norm.is_finite() {
            anyhow::bail!(
                "gradient norm is {norm} at epoch {}, step {}; first rows of the batch: {}\n  hint: lower lr or cap pos_weight",
                epoch + 1, self.step + 1, acc.first_rows.join(", ")
            );
        }
        if p.max_grad_norm > 0.0 && norm > p.max_grad_norm {
            let c = (p.max_grad_norm / (norm + 1e-6)) as f32;
            scale(&mut grads, word, c);
        }
        let lr = lr_at(self.step, self.total_steps, self.warmup, p.lr);
        let t1 = Instant::now();
        self.opt
            .step_rows(&self.params, &grads, lr, &acc.word_rows)?;
        self.spare = Some(Spare::new(grads, std::mem::take(&mut acc.word_rows)));
        self.clock.this_process.opt_secs += t1.elapsed().as_secs_f64();
        self.step += 1;
        let entry = StepLog {
            step: self.step,
            epoch: goemo_data::data::round6(epoch as f64 + (bi + 1) as f64 / batches as f64),
            loss: goemo_data::data::round6(acc.loss),
            learning_rate: lr,
            grad_norm: goemo_data::data::round6(norm),
        };
        *acc = Accumulated::default();
        Ok((entry, norm))
    }

    /// Save the checkpoint: `epochs_done` whole epochs and `position` inside the next.
    fn checkpoint(&mut self, epochs_done: usize, position: EpochPosition) -> anyhow::Result<()> {
        // The checkpoint holds every weight and moment as a run that never deferred has them.
        self.opt.settle(&self.params)?;
        let state = CheckpointState::new(
            epochs_done,
            position,
            self.step,
            &self.opt,
            &self.log,
            self.epochs_since_best,
            self.clock.so_far(),
        );
        save_checkpoint(
            self.env.work_dir,
            &self.params,
            &self.opt,
            &self.best,
            &state,
        )?;
        self.clock.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Dev macro-F1 and loss (threshold 0.5) after an epoch; keep the best epoch's weights;
    /// early stopping.
    fn finish_epoch(&mut self, epoch: usize, train_loss: f64) -> anyhow::Result<()> {
        // Scoring and the best epoch's snapshot read every weight.
        self.opt.settle(&self.params)?;
        let (dev_f1, dev_loss) = self.evaluate_dev()?;
        self.log.epochs.push(EpochLog {
            epoch: epoch + 1,
            train_loss: goemo_data::data::round6(train_loss),
            dev_loss: goemo_data::data::round6(dev_loss),
            dev_macro_f1: goemo_data::data::round6(dev_f1),
        });
        tracing::info!(
            "epoch {}: train loss {:.4}, dev loss {:.4}, dev macro-F1 {:.4} (threshold 0.5)",
            epoch + 1,
            train_loss,
            dev_loss,
            dev_f1
        );
        if dev_f1 > self.best_f1 || self.dev_rows.is_empty() {
            self.best_f1 = dev_f1;
            self.best = self.scored_snapshot()?;
            self.log.best_epoch = epoch + 1;
            self.log.best_dev_macro_f1 = goemo_data::data::round6(dev_f1);
            self.epochs_since_best = 0;
        } else {
            self.epochs_since_best += 1;
            if self.p.patience > 0 && self.epochs_since_best >= self.p.patience {
                tracing::info!(
                    "early stopping: dev macro-F1 has not improved for {} epoch(s)",
                    self.p.patience
                );
                self.log.stopped_early = true;
            }
        }
        Ok(())
    }

    /// The weights that are scored and exported: the moving average when `ema_decay` is on,
    /// else the trained weights themselves.
    fn scored_weights(&self) -> anyhow::Result<goemo_nn::params::Encoder<Tensor>> {
        match &self.opt.average {
            Some(avg) => avg.tensors(&self.params),
            None => Ok(self.params.detached()),
        }
    }

    /// A copy of [`Run::scored_weights`], named (the best epoch's weights).
    fn scored_snapshot(&self) -> anyhow::Result<NamedTensors> {
        match &self.opt.average {
            Some(avg) => Ok(self
                .params
                .names
                .iter()
                .cloned()
                .zip(avg.tensors(&self.params)?.leaves().into_iter().cloned())
                .collect()),
            None => Ok(self.params.snapshot()?),
        }
    }

    /// (macro-F1 at 0.5, mean BCE of the scores) on the dev rows; zeros without dev rows.
    fn evaluate_dev(&self) -> anyhow::Result<(f64, f64)> {
        let (data, dev_rows) = (self.data, &self.dev_rows);
        if dev_rows.is_empty() {
            return Ok((0.0, 0.0));
        }
        let weights = self.scored_weights()?;
        let scores = predict_scores(
            &self.params.cfg,
            &weights,
            data,
            dev_rows,
            64,
            self.env.device,
        )?;
        let truth: Vec<u8> = dev_rows
            .iter()
            .flat_map(|&i| data.row_labels(i).to_vec())
            .collect();
        let c = metrics::counts(
            &scores,
            &truth,
            data.n_labels(),
            &vec![0.5; data.n_labels()],
        );
        let loss = scores
            .iter()
            .zip(&truth)
            .map(|(&s, &y)| {
                let s = (s as f64).clamp(1e-7, 1.0 - 1e-7);
                if y == 1 {
                    -s.ln()
                } else {
                    -(1.0 - s).ln()
                }
            })
            .sum::<f64>()
            / scores.len().max(1) as f64;
        Ok((metrics::macro_f1(&c), loss))
    }

    /// The outcome over every process that trained this model (when it was stopped and
    /// resumed).
    fn finish(mut self) -> anyhow::Result<TrainOutcome> {
        self.opt.settle(&self.params)?;
        let total = self.clock.so_far();
        let log = self.log;
        let train_secs = total.train_secs.max(1e-9);
        tracing::info!(
            "train: best epoch {} (dev macro-F1 {:.4} at 0.5); {} steps in {:.0}s",
            log.best_epoch,
            log.best_dev_macro_f1,
            self.step,
            total.runtime_secs
        );
        let metrics = serde_json::json!({
            "train_runtime": total.runtime_secs,
            "train_samples": total.examples,
            "train_samples_per_second": total.examples as f64 / train_secs,
            "train_tokens_per_second": total.tokens as f64 / train_secs,
            "train_steps_per_second": log.steps.len() as f64 / train_secs,
            "forward_backward_seconds": total.fwd_bwd_secs,
            "optimizer_seconds": total.opt_secs,
            "train_loss": log.epochs.last().map(|e| e.train_loss),
            "epoch": log.epochs.len(),
            "best_epoch": log.best_epoch,
            "eval_macro_f1": log.best_dev_macro_f1,
            "threads": rayon::current_num_threads(),
            "device": format!("{:?}", self.env.device),
            // Which arithmetic and kernel ran: the provenance of a bf16 entry.
            "precision": self.p.precision.name(),
            "products": format!("{:?}", self.p.precision.products()),
        });
        Ok(TrainOutcome {
            log,
            best_weights: self.best,
            metrics,
        })
    }
}

fn progress_bar(
    interactive: bool,
    steps: usize,
    epoch: usize,
    epochs: usize,
) -> Option<indicatif::ProgressBar> {
    if !interactive {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
    Some(bar)
}

/// Σ x² of each gradient in f64, in element order: the bits of `g.iter().map(x²).sum()` (from
/// -0.0), which the logged gradient norm and clipping have always used. One such chain is a
/// sequence of dependent additions (four cycles each), so eight gradients' chains run
/// interleaved on a thread, and the long, mostly zero word-embedding gradient has its zero
/// blocks found by both threads first and skipped (adding +0.0 changes no sum). A MiniLM
/// step's norm: 5.4 ms → 3.5 ms (one chain per gradient, the zero blocks skipped, before).
///
/// With `word`, that leaf's sum reads only the blocks of its rows (zero elsewhere).
fn sums_of_squares(leaves: &[&[f32]], word: Option<WordRows>) -> Vec<f64> {
    /// Gradients at least this long (the word embeddings) are scanned for zero blocks.
    const SPARSE: usize = 1 << 20;
    let mut dense: Vec<usize> = (0..leaves.len())
        .filter(|&i| leaves[i].len() < SPARSE)
        .collect();
    // Similar lengths side by side, so a group's chains end together.
    dense.sort_by_key(|&i| std::cmp::Reverse(leaves[i].len()));
    let big: Vec<usize> = (0..leaves.len())
        .filter(|&i| leaves[i].len() >= SPARSE)
        .collect();
    let (dense_sums, big_sums) = rayon::join(
        || {
            dense
                .par_chunks(CHAINS)
                .flat_map_iter(|group| {
                    let xs: Vec<&[f32]> = group.iter().map(|&i| leaves[i]).collect();
                    group.iter().copied().zip(interleaved_sums(&xs))
                })
                .collect::<Vec<_>>()
        },
        || {
            big.iter()
                .map(|&i| {
                    let rows = word.filter(|w| w.leaf == i).map(|w| (w.rows, w.width));
                    (i, sparse_sum_of_squares(leaves[i], rows))
                })
                .collect::<Vec<_>>()
        },
    );
    let mut sums = vec![0f64; leaves.len()];
    for (i, sum) in dense_sums.into_iter().chain(big_sums) {
        sums[i] = sum;
    }
    sums
}

/// Chains one thread runs side by side in [`interleaved_sums`].
const CHAINS: usize = 8;

/// Σ x² of each slice in element order (the plain sequential sum from -0.0, as
/// `iter().sum()`), up to [`CHAINS`] slices at a time in lockstep: independent chains, so
/// their additions overlap instead of waiting on each other.
fn interleaved_sums(xs: &[&[f32]]) -> Vec<f64> {
    let mut sums = [-0f64; CHAINS];
    let mut done = 0;
    if xs.len() == CHAINS {
        let n = xs.iter().map(|x| x.len()).min().unwrap_or(0);
        let xs: [&[f32]; CHAINS] = std::array::from_fn(|l| &xs[l][..n]);
        #[allow(clippy::needless_range_loop)] // element i of eight slices in lockstep
        for i in 0..n {
            for l in 0..CHAINS {
                let x = xs[l][i] as f64;
                sums[l] += x * x;
            }
        }
        done = n;
    }
    xs.iter()
        .zip(&mut sums)
        .map(|(x, sum)| {
            for &v in &x[done.min(x.len())..] {
                *sum += (v as f64) * (v as f64);
            }
            *sum
        })
        .collect()
}

/// The word-embedding gradient's place among the leaves, and the rows its step's batches
/// wrote (sorted, each once): it is zero outside them.
#[derive(Clone, Copy)]
struct WordRows<'a> {
    leaf: usize,
    rows: &'a [usize],
    width: usize,
}

/// Every gradient × `factor`; of the word embeddings' only its rows (the rest is zero, and stays
/// zero, of the same sign, when multiplied by a positive factor).
fn scale(grads: &mut Grads, word: WordRows, factor: f32) {
    grads
        .leaves_mut()
        .into_par_iter()
        .enumerate()
        .for_each(|(i, g)| {
            if i != word.leaf {
                return g.iter_mut().for_each(|x| *x *= factor);
            }
            for &id in word.rows {
                let row = id * word.width..(id + 1) * word.width;
                if let Some(row) = g.get_mut(row) {
                    row.iter_mut().for_each(|x| *x *= factor);
                }
            }
        });
}

/// Σ x² of a long gradient in element order: which 64-element blocks hold a non-zero found by
/// all threads, then the one chain over those blocks, in order. With `rows` (sorted row ids
/// and the row width), only the blocks that hold part of those rows are looked at: the
/// gradient is zero elsewhere.
fn sparse_sum_of_squares(g: &[f32], rows: Option<(&[usize], usize)>) -> f64 {
    const BLOCK: usize = 64;
    const PIECE: usize = BLOCK * 1024;
    let any_nonzero =
        |block: &[f32]| block.iter().fold(0u32, |any, x| any | (x.to_bits() << 1)) != 0;
    let nonzero: Vec<usize> = match rows {
        Some((rows, width)) => {
            let mut blocks: Vec<usize> = rows
                .iter()
                .flat_map(|&id| {
                    let (start, end) = (id * width, (id + 1) * width);
                    start / BLOCK..end.min(g.len()).div_ceil(BLOCK)
                })
                .collect();
            blocks.dedup();
            blocks
                .into_par_iter()
                .map(|b| b * BLOCK)
                .filter(|&start| any_nonzero(&g[start..(start + BLOCK).min(g.len())]))
                .collect()
        }
        None => g
            .par_chunks(PIECE)
            .enumerate()
            .flat_map_iter(|(p, piece)| {
                piece
                    .chunks(BLOCK)
                    .enumerate()
                    .filter(|(_, block)| any_nonzero(block))
                    .map(move |(b, _)| p * PIECE + b * BLOCK)
            })
            .collect(),
    };
    let mut sum = -0f64;
    for &start in &nonzero {
        for &x in &g[start..(start + BLOCK).min(g.len())] {
            sum += (x as f64) * (x as f64);
        }
    }
    if !g.is_empty() {
        // What the skipped +0.0 terms would have done to a -0.0 start.
        sum += 0.0;
    }
    sum
}

#[cfg(test)]
mod tests {
    use goemo_nn::config::{Arch, EncoderConfig};
    use goemo_nn::params::Encoder;
    use goemo_nn::test_support::{random_floats, tiny_config};

    /// Scaling a step's gradients, of the word embeddings only the step's rows, gives the bits
    /// of scaling every element (a zero stays the zero it was, -0.0 included), for rows given
    /// out of order and twice as the trainer would collect them, and the first and last row.
    #[test]
    fn scaling_a_steps_rows_is_scaling_everything() {
        for arch in [Arch::Bert, Arch::DistilBert] {
            let cfg = EncoderConfig::from_json(tiny_config(arch, 0.0)).unwrap();
            let specs = Encoder::new(&cfg, 28);
            let mut seed = 0;
            let mut grads: super::Grads = specs.map_each(|spec| {
                seed += 1;
                random_floats(spec.shape.iter().product(), seed)
            });
            let width = cfg.hidden;
            let batch_rows = [17u32, 3, 0, 17, 30521, 101];
            let word = &mut grads.embeddings.word;
            for (r, row) in word.chunks_exact_mut(width).enumerate() {
                if !batch_rows.contains(&(r as u32)) {
                    row.iter_mut()
                        .enumerate()
                        .for_each(|(j, x)| *x = if j % 3 == 0 { -0.0 } else { 0.0 });
                }
            }
            let mut want = grads.clone();
            want.leaves_mut()
                .into_iter()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= 0.37));
            let rows = goemo_nn::optim::sorted_rows(&batch_rows, cfg.vocab_size).unwrap();
            let word = super::WordRows {
                leaf: 0,
                rows: &rows,
                width,
            };
            super::scale(&mut grads, word, 0.37);
            for (g, w) in grads.leaves().into_iter().zip(want.leaves()) {
                assert!(
                    g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{arch:?}"
                );
            }
        }
    }

    /// The same bits as the plain sequential sum, on a sparse gradient (zero blocks skipped),
    /// a dense one, and with -0.0, NaN and infinity.
    #[test]
    fn sparse_sum_of_squares_is_the_sequential_sum() {
        let plain = |g: &[f32]| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let mut sparse = vec![0f32; 100_003];
        for (i, v) in sparse.iter_mut().enumerate() {
            if i % 997 == 3 {
                *v = (i as f32).sin() * 1e-3;
            } else if i % 13 == 0 {
                *v = -0.0;
            }
        }
        let dense: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.37).cos()).collect();
        for g in [&sparse[..], &dense[..], &[][..], &[0.0, -0.0][..]] {
            assert_eq!(
                super::sparse_sum_of_squares(g, None).to_bits(),
                plain(g).to_bits()
            );
        }
        assert!(super::sparse_sum_of_squares(&[0.0, f32::NAN], None).is_nan());
        assert_eq!(
            super::sparse_sum_of_squares(&[f32::INFINITY], None),
            f64::INFINITY
        );
    }

    /// Told which rows of a gradient its batches wrote, the sum reads only those and gives the
    /// plain sum's bits: rows whose width is and is not a multiple of the 64-element blocks
    /// (neighbours sharing a block), the first and the last row, a row of zeros and -0.0.
    #[test]
    fn the_sum_over_a_steps_rows_is_the_sequential_sum() {
        let plain = |g: &[f32]| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        for width in [16usize, 24, 64, 384] {
            let vocab = 3001;
            let ids: Vec<u32> = vec![0, 5, 6, 7, 700, 701, 1500, 2999, 3000, 42];
            let mut g = vec![0f32; vocab * width];
            for (k, &id) in ids.iter().enumerate() {
                for (j, x) in g[id as usize * width..][..width].iter_mut().enumerate() {
                    *x = match k {
                        9 => 0.0,
                        8 if j % 2 == 0 => -0.0,
                        _ => ((k * 131 + j) as f32).sin() * 1e-3,
                    };
                }
            }
            let rows = goemo_nn::optim::sorted_rows(&ids, vocab).unwrap();
            assert_eq!(
                super::sparse_sum_of_squares(&g, Some((&rows, width))).to_bits(),
                plain(&g).to_bits(),
                "width {width}"
            );
            let none = vec![0f32; vocab * width];
            assert_eq!(
                super::sparse_sum_of_squares(&none, Some((&[], width))).to_bits(),
                plain(&none).to_bits()
            );
        }
    }

    /// The norm's fast path gives each gradient the bits of the plain sequential sum: gradients
    /// of many lengths (groups of eight and a short last group, equal and unequal lengths), a
    /// long mostly-zero one (the word embeddings' shape) and one with -0.0, NaN and infinity.
    #[test]
    fn sums_of_squares_are_each_gradients_sequential_sum() {
        let plain = |g: &[f32]| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let mut leaves: Vec<Vec<f32>> = Vec::new();
        for (i, len) in [
            0usize, 1, 7, 64, 65, 1000, 1000, 1000, 4096, 4097, 384, 384, 99, 3,
        ]
        .into_iter()
        .cycle()
        .take(29)
        .enumerate()
        {
            leaves.push(
                (0..len)
                    .map(|j| ((i * 31 + j) as f32 * 0.37).sin() * 1e-2)
                    .collect(),
            );
        }
        let mut sparse = vec![0f32; (1 << 20) + 300];
        for (i, v) in sparse.iter_mut().enumerate() {
            if i % 9973 < 5 {
                *v = (i as f32).cos() * 1e-3;
            }
        }
        leaves.push(sparse);
        leaves.push(vec![0f32; 1 << 21]);
        leaves.push(vec![-0.0, 0.0, -0.0]);
        leaves.push(vec![1.0, f32::NAN, 2.0]);
        leaves.push(vec![f32::INFINITY; 5]);
        let refs: Vec<&[f32]> = leaves.iter().map(|g| &g[..]).collect();
        let sums = super::sums_of_squares(&refs, None);
        assert_eq!(sums.len(), refs.len());
        for (i, (g, sum)) in refs.iter().zip(&sums).enumerate() {
            let want = plain(g);
            assert!(
                sum.to_bits() == want.to_bits() || (sum.is_nan() && want.is_nan()),
                "gradient {i} (length {}): {sum} against {want}",
                g.len()
            );
        }
        assert!(sums[refs.len() - 2].is_nan());
    }
}
