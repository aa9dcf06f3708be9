//! The queue and the worker: one dedicated OS thread owns the models and runs one job group at a
//! time; the async side talks to it through a bounded channel and gets each answer back on a
//! oneshot. Nothing here blocks the async runtime.
//!
//! Requests that generate (`generate` > 0) are stepped together token by token; each is answered
//! as soon as its own answer ends. Between two steps the queue goes on in its order: requests for
//! the same model that generate join the answers going on, and requests that do not generate (for
//! any model) run as a group of their own, instead of waiting for the longest answer to end.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::generate::{self, Generating};
use super::{run_lens, run_lens_batch, LensRequest};
use crate::api::LensResponse;
use crate::error::Error;
use crate::models::{ModelInfo, VisionLanguageModel};

/// Loads the models on the worker thread, so that they never leave it.
pub type Loader =
    Box<dyn FnOnce() -> crate::Result<Vec<Box<dyn VisionLanguageModel>>> + Send + 'static>;

/// Called with the size of every group the worker runs (for metrics).
pub type BatchHook = Arc<dyn Fn(usize) + Send + Sync>;

pub struct EngineConfig {
    /// Jobs that may wait in the queue; one more is refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// The most jobs for one model run as one group.
    pub max_batch_size: usize,
    /// The most padded tokens (requests × longest sequence) one decoder pass takes.
    pub max_batch_tokens: usize,
    /// The most bytes the keys and values of the answers being generated may hold together; an
    /// answer whose cache would pass it waits for others to end ([`generate::start_within`]).
    pub kv_cache_budget: usize,
    pub on_batch: Option<BatchHook>,
}

/// What the HTTP side may know about a resident model: its description and a tokenizer clone
/// (for the prompt-length limit before queueing).
pub struct ModelEntry {
    pub info: ModelInfo,
    pub tokenizer: tokenizers::Tokenizer,
}

#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<Vec<ModelEntry>>),
    Failed(String),
}

/// Why a job got no lens response.
#[derive(Debug)]
pub enum JobError {
    /// The request itself is bad or the computation failed.
    Lens(Error),
    /// The deadline passed before the job's turn came.
    DeadlineExceeded,
    /// The computation panicked; the message is the panic's.
    Panicked(String),
}

pub type JobResult = Result<LensResponse, JobError>;

pub struct Job {
    /// Index into the loaded models.
    pub model: usize,
    pub request: LensRequest,
    pub deadline: Instant,
    pub reply: oneshot::Sender<JobResult>,
    enqueued: Instant,
    /// Generating: the bytes its answer's keys and values will take, once it had to wait for them.
    kv_bytes: Option<usize>,
    /// It waited for room in the KV budget (counted once in `waited_for_kv`).
    waited: bool,
    /// What the job holds until it is dropped, after its answer is sent (the HTTP side's share of
    /// its image-pixel budget).
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    /// The worker is gone (shutting down or failed to load).
    Closed,
}

/// The answers being generated, for metrics.
#[derive(Default)]
pub struct Answers {
    /// Requests that joined answers already being generated (rather than waiting for them to end).
    pub joined: AtomicU64,
    /// Requests that waited for answers to end because their keys and values would have passed
    /// the budget (each counted once).
    pub waited_for_kv: AtomicU64,
    /// What the keys and values of the answers going on hold now, in bytes.
    pub kv_bytes: AtomicU64,
    /// The budget they share (`--kv-cache-budget`).
    pub kv_budget: u64,
}

/// Jobs the worker dropped without running them (or, generating, without finishing them).
#[derive(Default)]
pub struct Dropped {
    /// The client went away before the job's turn, or while its answer was being generated
    /// (the answer stops there).
    pub client_gone: AtomicU64,
    /// The deadline passed before the job's turn (answered 504).
    pub deadline: AtomicU64,
}

/// The HTTP side's handle on the worker. Dropping it (and every clone of the sender) lets the
/// worker finish what is queued and stop.
pub struct Engine {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    depth: Arc<AtomicUsize>,
    /// Moving average of the worker's wall time per request, in microseconds (0: none yet).
    per_request_us: Arc<AtomicU64>,
    dropped: Arc<Dropped>,
    answers: Arc<Answers>,
    state: watch::Receiver<LoadState>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the worker thread; it loads the models, then serves the queue.
    pub fn start(loader: Loader, config: EngineConfig) -> std::io::Result<Engine> {
        let (tx, rx) = mpsc::channel(config.max_queue.max(1));
        let (state_tx, state) = watch::channel(LoadState::Loading);
        let depth = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(Dropped::default());
        let per_request_us = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(Answers {
            kv_budget: config.kv_cache_budget as u64,
            ..Default::default()
        });
        let worker = Worker {
            rx,
            pending: VecDeque::new(),
            depth: depth.clone(),
            per_request_us: per_request_us.clone(),
            dropped: dropped.clone(),
            answers: answers.clone(),
            max_batch_size: config.max_batch_size.max(1),
            max_batch_tokens: config.max_batch_tokens.max(1),
            kv_budget: config.kv_cache_budget,
            on_batch: config.on_batch,
        };
        let thread = std::thread::Builder::new()
            .name("lens-worker".into())
            .spawn(move || {
                crate::models::fastmath::flush_subnormals_here();
                worker.run(loader, state_tx)
            })?;
        Ok(Engine {
            tx: Mutex::new(Some(tx)),
            depth,
            per_request_us,
            dropped,
            answers,
            state,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job, or refuses it at once when the queue is full. `held` is released when the
    /// job ends (answered, refused or dropped).
    pub fn submit(
        &self,
        model: usize,
        request: LensRequest,
        deadline: Instant,
        held: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<oneshot::Receiver<JobResult>, SubmitError> {
        let tx = lock(&self.tx).clone().ok_or(SubmitError::Closed)?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            model,
            request,
            deadline,
            reply,
            enqueued: Instant::now(),
            kv_bytes: None,
            waited: false,
            _held: held,
        };
        self.depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Whether a job submitted now would be refused for a full queue (so that the HTTP side need
    /// not decode its image first).
    pub fn is_full(&self) -> bool {
        lock(&self.tx).as_ref().is_some_and(|tx| tx.capacity() == 0)
    }

    /// Jobs accepted and not yet started.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// When a refused client should come back: the time the worker needs for the requests
    /// waiting now, at its recent pace (1 s before it has run anything), between 1 and 120 s.
    pub fn retry_after_s(&self) -> u64 {
        retry_after_s(
            self.queue_depth(),
            self.per_request_us.load(Ordering::Relaxed),
        )
    }

    pub fn dropped(&self) -> &Dropped {
        &self.dropped
    }

    /// Requests that joined answers already being generated (rather than waiting for them to end).
    pub fn joined(&self) -> u64 {
        self.answers.joined.load(Ordering::Relaxed)
    }

    pub fn answers(&self) -> &Answers {
        &self.answers
    }

    pub fn load_state(&self) -> LoadState {
        self.state.borrow().clone()
    }

    /// Waits until the models are loaded (or failed to load).
    pub async fn wait_loaded(&self) -> Result<Arc<Vec<ModelEntry>>, String> {
        let mut state = self.state.clone();
        loop {
            match state.borrow_and_update().clone() {
                LoadState::Ready(m) => return Ok(m),
                LoadState::Failed(e) => return Err(e),
                LoadState::Loading => {}
            }
            if state.changed().await.is_err() {
                return Err("the worker thread stopped while loading".into());
            }
        }
    }

    /// Closes the queue and waits (on a blocking thread) for the worker to finish what is queued.
    pub async fn shutdown(&self) {
        lock(&self.tx).take();
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

struct Worker {
    rx: mpsc::Receiver<Job>,
    /// Jobs taken off the channel but not yet run (other models' jobs wait here in order).
    pending: VecDeque<Job>,
    depth: Arc<AtomicUsize>,
    per_request_us: Arc<AtomicU64>,
    dropped: Arc<Dropped>,
    answers: Arc<Answers>,
    max_batch_size: usize,
    max_batch_tokens: usize,
    kv_budget: usize,
    on_batch: Option<BatchHook>,
}

impl Worker {
    fn run(mut self, loader: Loader, state: watch::Sender<LoadState>) {
        let models = match catch_unwind(AssertUnwindSafe(loader)) {
            Ok(Ok(models)) => models,
            Ok(Err(e)) => {
                let _ = state.send(LoadState::Failed(format!("[{}] {e}", e.code())));
                return;
            }
            Err(p) => {
                let _ = state.send(LoadState::Failed(panic_message(p)));
                return;
            }
        };
        let entries = models
            .iter()
            .map(|m| ModelEntry {
                info: m.info().clone(),
                tokenizer: m.tokenizer().clone(),
            })
            .collect();
        let _ = state.send(LoadState::Ready(Arc::new(entries)));
        while let Some(group) = self.next_group() {
            let started = Instant::now();
            let n = self.run_group(&models, group);
            let per = started.elapsed().as_micros() as u64 / n.max(1) as u64;
            let old = self.per_request_us.load(Ordering::Relaxed);
            // Exponential moving average, weight 1/4 on the newest group.
            let new = if old == 0 { per } else { (3 * old + per) / 4 };
            self.per_request_us.store(new.max(1), Ordering::Relaxed);
        }
    }

    /// Blocks for the next job, then takes every queued job for the same model, in arrival
    /// order, up to the batch size. None once the queue is closed and empty.
    fn next_group(&mut self) -> Option<Vec<Job>> {
        if self.pending.is_empty() {
            self.pending.push_back(self.rx.blocking_recv()?);
        }
        while let Ok(job) = self.rx.try_recv() {
            self.pending.push_back(job);
        }
        let model = self.pending.front()?.model;
        let mut group = Vec::new();
        let mut rest = VecDeque::new();
        for job in self.pending.drain(..) {
            if job.model == model && group.len() < self.max_batch_size {
                group.push(job);
            } else {
                rest.push_back(job);
            }
        }
        self.pending = rest;
        Some(group)
    }

    /// Runs one group of jobs for one model, just taken off the queue (counted out of its depth
    /// and reported to the group hook): the live ones (client still there, deadline not passed)
    /// that do not generate go through the decoder together ([`run_batch`]); then the ones that
    /// generate ([`Self::generate`]). Returns how many jobs ran, those that joined or ran between
    /// the steps included.
    fn run_group(&mut self, models: &[Box<dyn VisionLanguageModel>], group: Vec<Job>) -> usize {
        self.depth.fetch_sub(group.len(), Ordering::SeqCst);
        if let Some(hook) = &self.on_batch {
            hook(group.len());
        }
        let Some(index) = group.first().map(|job| job.model) else {
            return 0;
        };
        let model = models[index].as_ref();
        let started = Instant::now();
        let live: Vec<Job> = group
            .into_iter()
            .filter_map(|job| self.live(job, started))
            .collect();
        let (generating, others): (Vec<Job>, Vec<Job>) = live
            .into_iter()
            .partition(|job| job.request.options.generate > 0);
        let mut n = others.len();
        run_batch(model, others, started, self.max_batch_tokens);
        if !generating.is_empty() {
            n += self.generate(models, index, generating);
        }
        n
    }

    /// `job` if it is to run at `now`; else it is dropped (its client went away) or answered 504.
    fn live(&self, job: Job, now: Instant) -> Option<Job> {
        if job.reply.is_closed() {
            // The client went away: its place is freed without running it.
            self.dropped.client_gone.fetch_add(1, Ordering::Relaxed);
            None
        } else if now > job.deadline {
            self.dropped.deadline.fetch_add(1, Ordering::Relaxed);
            let _ = job.reply.send(Err(JobError::DeadlineExceeded));
            None
        } else {
            Some(job)
        }
    }

    /// Generates the answers of `jobs` (model `index`) together, step by step: each is answered
    /// when it ends, an answer whose client went away stops, and the queue goes on between steps
    /// ([`Self::between_steps`]). Returns how many jobs ran. If a step panics, the answers in it
    /// run again alone, so that only the culprit gets a 500.
    fn generate(
        &mut self,
        models: &[Box<dyn VisionLanguageModel>],
        index: usize,
        jobs: Vec<Job>,
    ) -> usize {
        let model = models[index].as_ref();
        // Each answer's tag: its job and the time it waited in the queue.
        let mut batch: Generating<(Job, Duration)> = Generating::new(model);
        let mut n = self.start_all(model, &mut batch, jobs, false);
        while !batch.is_empty() {
            for (job, _) in batch.stop_where(|(job, _)| job.reply.is_closed()) {
                drop(job);
                self.dropped.client_gone.fetch_add(1, Ordering::Relaxed);
            }
            match catch_unwind(AssertUnwindSafe(|| batch.step())) {
                Ok(ended) => {
                    // Before the ended answers' replies: what those going on hold now.
                    self.answers
                        .kv_bytes
                        .store(batch.kv_bytes() as u64, Ordering::Relaxed);
                    for ((job, queued), answer) in ended {
                        let respond = || answer.and_then(|g| generate::respond(model, g));
                        let result = match catch_unwind(AssertUnwindSafe(respond)) {
                            Ok(result) => finish(result, queued),
                            Err(p) => Err(JobError::Panicked(panic_message(p))),
                        };
                        let _ = job.reply.send(result);
                    }
                }
                Err(_) => {
                    self.answers.kv_bytes.store(0, Ordering::Relaxed);
                    for (job, queued) in batch.into_tags() {
                        let result = run_one(model, &job.request, queued);
                        let _ = job.reply.send(result);
                    }
                    return n;
                }
            }
            n += self.between_steps(models, index, &mut batch);
        }
        self.answers.kv_bytes.store(0, Ordering::Relaxed);
        n
    }

    /// Runs the prompts of `jobs` together ([`generate::start_within`], under the padded-token
    /// budget, beside what `batch` holds of the KV budget) and adds their answers to `batch`; a
    /// job that cannot start is answered at once (a bad request: its error; a panic: 500, only
    /// the culprit's, after the prompts ran again one by one). The jobs that wait for room in
    /// the KV budget, their caches' sizes noted, go back into the queue ([`Self::wait_again`]).
    /// `joining`: the jobs join answers going on, and those that start are counted so (before
    /// any is answered; one refused at once did not join). Returns how many started or were
    /// answered.
    fn start_all(
        &mut self,
        model: &dyn VisionLanguageModel,
        batch: &mut Generating<(Job, Duration)>,
        jobs: Vec<Job>,
        joining: bool,
    ) -> usize {
        if jobs.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let budget = |held| generate::KvBudget {
            limit: self.kv_budget,
            held,
        };
        let reqs: Vec<&LensRequest> = jobs.iter().map(|job| &job.request).collect();
        let together = catch_unwind(AssertUnwindSafe(|| {
            generate::start_within(
                model,
                &reqs,
                self.max_batch_tokens,
                Some(budget(batch.kv_bytes())),
            )
        }));
        let started: Vec<Result<crate::Result<generate::Start>, String>> = match together {
            Ok(started) => started.into_iter().map(Ok).collect(),
            Err(p) if reqs.len() == 1 => vec![Err(panic_message(p))],
            Err(_) => {
                // One by one, each beside those started before it.
                let mut held = batch.kv_bytes();
                let mut waiting = false;
                reqs.iter()
                    .map(|req| {
                        if waiting {
                            // Its size is learnt when it is tried again.
                            return Ok(Ok(generate::Start::Waits { kv_bytes: 0 }));
                        }
                        let one = catch_unwind(AssertUnwindSafe(|| {
                            generate::start_within(model, &[req], usize::MAX, Some(budget(held)))
                                .remove(0)
                        }))
                        .map_err(panic_message);
                        match &one {
                            Ok(Ok(generate::Start::Going(g))) => held += g.kv_bytes(),
                            Ok(Ok(generate::Start::Waits { .. })) => waiting = true,
                            _ => {}
                        }
                        one
                    })
                    .collect()
            }
        };
        let (mut waiting, mut replies) = (Vec::new(), Vec::new());
        let (started_or_answered, mut going) = (jobs.len(), 0);
        for (mut job, started) in jobs.into_iter().zip(started) {
            let queued = now - job.enqueued;
            match started {
                Ok(Ok(generate::Start::Going(answer))) => {
                    batch.push((job, queued), answer);
                    going += 1;
                }
                Ok(Ok(generate::Start::Waits { kv_bytes })) => {
                    if !job.waited {
                        self.answers.waited_for_kv.fetch_add(1, Ordering::Relaxed);
                        job.waited = true;
                    }
                    job.kv_bytes = (kv_bytes > 0).then_some(kv_bytes);
                    waiting.push(job);
                }
                Ok(Err(e)) => replies.push((job, finish(Err(e), queued))),
                Err(message) => replies.push((job, Err(JobError::Panicked(message)))),
            }
        }
        let started_or_answered = started_or_answered - waiting.len();
        if joining {
            self.answers.joined.fetch_add(going, Ordering::Relaxed);
        }
        self.answers
            .kv_bytes
            .store(batch.kv_bytes() as u64, Ordering::Relaxed);
        for (job, result) in replies {
            let _ = job.reply.send(result);
        }
        self.wait_again(waiting);
        started_or_answered
    }

    /// Jobs that wait for room in the KV budget go back into the queue in their order of
    /// arrival: at its front when they came off it, behind any earlier job for another model that
    /// their group was taken past ([`Self::next_group`]).
    fn wait_again(&mut self, jobs: Vec<Job>) {
        self.depth.fetch_add(jobs.len(), Ordering::SeqCst);
        for job in jobs {
            let at = self
                .pending
                .iter()
                .position(|p| p.enqueued > job.enqueued)
                .unwrap_or(self.pending.len());
            self.pending.insert(at, job);
        }
    }

    /// Between two steps of `batch` (model `index`), the queue goes on in its order: the jobs next
    /// in line that generate with the same model join `batch` (up to the batch size; their prompts
    /// run together), and a group of those next in line that do not generate, for any one model,
    /// runs (one group, so that a stream of them cannot hold the answers back). A job that
    /// generates with another model, or joins a full batch, waits for the batch to end; nothing
    /// overtakes it. Returns how many jobs ran or joined.
    fn between_steps(
        &mut self,
        models: &[Box<dyn VisionLanguageModel>],
        index: usize,
        batch: &mut Generating<(Job, Duration)>,
    ) -> usize {
        while let Ok(job) = self.rx.try_recv() {
            self.pending.push_back(job);
        }
        let model = models[index].as_ref();
        let (mut n, mut ran_group) = (0, false);
        let mut joining = Vec::new();
        while let Some(front) = self.pending.front() {
            let generates = front.request.options.generate > 0;
            // One that waits for room in the KV budget and whose client went away, or whose
            // deadline passed, does not hold the line.
            if front.waited && (front.reply.is_closed() || Instant::now() > front.deadline) {
                if let Some(job) = self.pending.pop_front() {
                    self.depth.fetch_sub(1, Ordering::SeqCst);
                    let _ = self.live(job, Instant::now());
                }
                continue;
            }
            // One that waited for room in the KV budget joins once its cache fits beside the
            // answers going on and those joining ahead of it whose size is known (the others
            // are counted when they start, and may send it back to wait).
            let ahead: usize = joining.iter().filter_map(|j: &Job| j.kv_bytes).sum();
            let fits = front.kv_bytes.is_none_or(|b| {
                batch.kv_bytes().saturating_add(ahead).saturating_add(b) <= self.kv_budget
            });
            if generates
                && front.model == index
                && fits
                && batch.len() + joining.len() < self.max_batch_size
            {
                let Some(job) = self.pending.pop_front() else {
                    break;
                };
                self.depth.fetch_sub(1, Ordering::SeqCst);
                if let Some(job) = self.live(job, Instant::now()) {
                    joining.push(job);
                }
            } else if !generates && !ran_group && !joining.is_empty() {
                // Those in line before the group start first. One that waits for room in the KV
                // budget is back in front, and nothing overtakes it.
                n += self.start_all(model, batch, std::mem::take(&mut joining), true);
            } else if !generates && !ran_group {
                // The jobs next in line that do not generate with the front one's model.
                let theirs = front.model;
                let mut group = Vec::new();
                while group.len() < self.max_batch_size
                    && self
                        .pending
                        .front()
                        .is_some_and(|job| job.model == theirs && job.request.options.generate == 0)
                {
                    group.extend(self.pending.pop_front());
                }
                n += self.run_group(models, group);
                ran_group = true;
            } else {
                break;
            }
        }
        n + self.start_all(model, batch, joining, true)
    }
}

/// Runs jobs that do not generate through the decoder together (`run_lens_batch`, padded, under
/// the token budget). If that panics, each runs alone so that only the request that panics gets
/// a 500.
fn run_batch(
    model: &dyn VisionLanguageModel,
    live: Vec<Job>,
    started: Instant,
    max_batch_tokens: usize,
) {
    if live.is_empty() {
        return;
    }
    let requests: Vec<&LensRequest> = live.iter().map(|j| &j.request).collect();
    match catch_unwind(AssertUnwindSafe(|| {
        run_lens_batch(model, &requests, max_batch_tokens)
    })) {
        Ok(results) => {
            for (job, result) in live.into_iter().zip(results) {
                let queued = started - job.enqueued;
                let _ = job.reply.send(finish(result, queued));
            }
        }
        Err(_) if live.len() > 1 => {
            for job in live {
                let result = run_one(model, &job.request, started - job.enqueued);
                let _ = job.reply.send(result);
            }
        }
        Err(p) => {
            if let Some(job) = live.into_iter().next() {
                let _ = job.reply.send(Err(JobError::Panicked(panic_message(p))));
            }
        }
    }
}

fn finish(result: crate::Result<crate::api::LensResponse>, queued: Duration) -> JobResult {
    match result {
        Ok(mut response) => {
            response.timing_ms.queue = Some(queued.as_secs_f64() * 1e3);
            Ok(response)
        }
        Err(e) => Err(JobError::Lens(e)),
    }
}

fn run_one(model: &dyn VisionLanguageModel, request: &LensRequest, queued: Duration) -> JobResult {
    match catch_unwind(AssertUnwindSafe(|| run_lens(model, request))) {
        Ok(result) => finish(result, queued),
        Err(p) => Err(JobError::Panicked(panic_message(p))),
    }
}

fn retry_after_s(waiting: usize, per_request_us: u64) -> u64 {
    if per_request_us == 0 {
        return 1;
    }
    (waiting as u64 * per_request_us)
        .div_ceil(1_000_000)
        .clamp(1, 120)
}

/// A poisoned lock only means another thread panicked while holding it; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::retry_after_s;

    #[test]
    fn retry_after_is_the_time_to_serve_the_waiting_requests() {
        // Nothing run yet: the smallest hint.
        assert_eq!(retry_after_s(64, 0), 1);
        // 8 waiting at 0.3 s each: 2.4 s, rounded up.
        assert_eq!(retry_after_s(8, 300_000), 3);
        // A fast worker still says at least 1 s; a very slow one at most 2 minutes.
        assert_eq!(retry_after_s(64, 100), 1);
        assert_eq!(retry_after_s(64, 10_000_000), 120);
    }
}
