//! `nbdfault sweep`: run a client once without faults, learn every message
//! of its session, run it again once per fault point, and report which
//! faults it survived, which it reported, and which made it hang, crash or
//! return wrong data.
//!
//! - [`plan`] (no I/O): the baseline's messages as points, and the faults
//!   that apply at each, as ordinary rules documents;
//! - [`run`]: one run, with its proxy hosted in this process;
//! - [`outcome`] (no I/O): a run's facts → its verdict;
//! - [`report`]: the table on stdout, `runs.json`, `index.html` and the
//!   reproducer rules files.

pub mod outcome;
pub mod plan;
pub mod report;
pub mod run;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use outcome::Outcome;
use plan::{TraceLine, Trial};
use run::{Facts, RunError, Setup};

use crate::rules;

/// Everything the command line says.
#[derive(Debug)]
pub struct Options {
    pub setup: Setup,
    /// Fault kinds to try (names from [`plan::FAULT_KINDS`]).
    pub faults: Vec<&'static str>,
    /// Fields added to every power-loss rule (`lose: some`, `torn: 512`).
    pub power_loss: Vec<String>,
    /// Event names to target; `None`: every event the baseline saw.
    pub events: Option<Vec<String>>,
    /// Cut handshake messages at every byte.
    pub every_byte: bool,
    pub jobs: usize,
    pub max_points: Option<usize>,
    pub seed: u64,
    pub report: Option<PathBuf>,
    /// Where the baseline's and the findings' captures are kept
    /// (`--pcap`; every run captures when this is set).
    pub pcap: Option<PathBuf>,
    pub fail_on: Vec<Outcome>,
    /// How to say the reproducing command: the server part of it
    /// (`nbdfault null --size 1M`, ...).
    pub reproduce_with: String,
}

/// One finished run, for the report.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: usize,
    pub trial: Trial,
    pub rules: String,
    pub outcome: Outcome,
    pub facts: Facts,
}

/// Runs past their first seconds that may wait at once, per job.
const OPEN_PER_JOB: usize = 8;

/// Exit statuses.
pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_FINDINGS: i32 = 1;
pub const EXIT_UNUSABLE: i32 = 2;

/// Runs the sweep to its end (or to Ctrl-C) and returns the exit status.
pub fn main(opts: Options) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.jobs.clamp(1, 4))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbdfault sweep: cannot start the runtime: {e}");
            return EXIT_UNUSABLE;
        }
    };
    let code = rt.block_on(sweep(opts));
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn sweep(opts: Options) -> i32 {
    let opts = Arc::new(opts);
    let started = Instant::now();
    // The baseline: nothing can be learnt from a session that fails.
    let mut base = match run::run(&opts.setup, None, &opts.setup.dir.join("baseline")).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nbdfault sweep: the baseline run could not start: {e}");
            return EXIT_UNUSABLE;
        }
    };
    keep_capture(&opts, &mut base, "baseline");
    let verdict = outcome::classify(base.exit, true, &base.output, || {
        base.verified.unwrap_or(true)
    });
    if verdict != Outcome::Ok {
        let why = match verdict {
            Outcome::Corrupt => "--verify failed after it".to_string(),
            Outcome::Hang => format!("it ran past --timeout ({:?})", opts.setup.timeout),
            _ => format!("the client ended with {:?}", base.exit),
        };
        eprintln!(
            "nbdfault sweep: the baseline run (no faults) failed: {why}; nothing can be learnt \
             from it. Its output:\n{}",
            base.output
        );
        return EXIT_UNUSABLE;
    }
    let trace: Vec<TraceLine> = base
        .trace
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if trace.is_empty() {
        eprintln!(
            "nbdfault sweep: the baseline run made no NBD connection, so there is nothing to \
             sweep: the client must connect to \"$uri\" (for a command line, -- sh -c '... \
             \"$uri\"'). Its output:\n{}",
            base.output
        );
        return EXIT_UNUSABLE;
    }
    let points = plan::points(&trace, opts.events.as_deref());
    let delay = (opts.setup.timeout / 4).min(Duration::from_secs(1));
    let mut trials: Vec<(Trial, String)> = Vec::new();
    for p in &points {
        for mut t in plan::trials(p, &opts.faults, delay, opts.every_byte) {
            if t.kind == "power-loss" && !opts.power_loss.is_empty() {
                t.action.extend(opts.power_loss.iter().cloned());
                t.variant = format!("{}, {}", t.variant, opts.power_loss.join(", "));
            }
            let name = format!("sweep-{}", trials.len() + 1);
            let doc = t.rules(opts.seed, &name);
            // The rule checker decides what applies where.
            if rules::parse_str("sweep", &doc).is_ok() {
                trials.push((t, doc));
            }
        }
    }
    let total_trials = trials.len();
    if let Some(n) = opts.max_points {
        let keep = plan::sample(trials.len(), n, opts.seed);
        let mut kept = Vec::with_capacity(keep.len());
        for (i, t) in trials.into_iter().enumerate() {
            if keep.binary_search(&i).is_ok() {
                kept.push(t);
            }
        }
        trials = kept;
    }
    let progress = Progress::new(trials.len());
    eprintln!(
        "nbdfault sweep: the baseline took {:.1} s and saw {} messages: {} runs{}",
        base.duration.as_secs_f64(),
        points.len(),
        trials.len(),
        if trials.len() < total_trials {
            format!(" (a sample of {total_trials})")
        } else {
            String::new()
        }
    );

    let stop = Arc::new(AtomicBool::new(false));
    // `--jobs` bounds the runs that are working. A run still going after
    // `lingering` (a few times the baseline) is most likely waiting on a
    // hang it will be killed for: it gives up its slot and waits among at
    // most `OPEN_PER_JOB` × jobs such runs, so hangs cost time, not turns.
    let slots = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let open = Arc::new(Semaphore::new(opts.jobs.max(1) * OPEN_PER_JOB));
    let lingering = (base.duration * 4).max(Duration::from_secs(1));
    let mut tasks = Vec::new();
    for (id, (trial, doc)) in trials.into_iter().enumerate() {
        let (opts, slots, open, stop, progress) = (
            opts.clone(),
            slots.clone(),
            open.clone(),
            stop.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _open = open.acquire_owned().await.ok()?;
            let slot = slots.acquire_owned().await.ok()?;
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let set = rules::parse_str("sweep", &doc).ok()?;
            let dir = opts.setup.dir.join(format!("{:04}", id + 1));
            let running = run::run(&opts.setup, Some(set), &dir);
            tokio::pin!(running);
            let result = tokio::select! {
                r = &mut running => r,
                () = tokio::time::sleep(lingering) => {
                    drop(slot);
                    running.await
                }
            };
            let mut facts = match result {
                Ok(f) => f,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Some(Err(e));
                }
            };
            let verdict =
                outcome::after_power_loss(trial.kind, facts.exit, facts.fired, facts.verified)
                    .unwrap_or_else(|| {
                        outcome::classify(facts.exit, facts.fired, &facts.output, || {
                            facts.verified.unwrap_or(true)
                        })
                    });
            if opts.fail_on.contains(&verdict) {
                keep_capture(&opts, &mut facts, &format!("{:03}", id + 1));
            } else {
                facts.capture = None;
            }
            let _ = std::fs::remove_dir_all(&dir);
            // Kept until the report: what it uses of the trace, bounded.
            facts.trace = report::keep_trace(&facts.trace, opts.fail_on.contains(&verdict));
            progress.done(opts.fail_on.contains(&verdict));
            Some(Ok(Finished {
                id: id + 1,
                trial,
                rules: doc,
                outcome: verdict,
                facts,
            }))
        }));
    }
    // Ctrl-C: no new runs; the running ones are killed (their process
    // groups go with their tasks); the report says what finished.
    let interrupted = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Relaxed);
            }
        })
    };
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let mut finished = Vec::new();
    let mut failed: Option<RunError> = None;
    for t in tasks {
        let result = tokio::select! {
            r = t => r.ok().flatten(),
            () = wait_for(&stop) => None,
        };
        match result {
            Some(Ok(f)) => finished.push(f),
            Some(Err(e)) => {
                failed.get_or_insert(e);
                stop.store(true, Ordering::Relaxed);
            }
            None => {}
        }
    }
    interrupted.abort();
    // Runs still going after a stop are dropped, which kills their process
    // groups.
    for a in aborts {
        a.abort();
    }
    progress.finish();
    if let Some(e) = failed {
        eprintln!("nbdfault sweep: a run could not start: {e}");
    }
    let was_stopped = stop.load(Ordering::Relaxed);
    finished.sort_by_key(|f| f.id);
    let summary = report::Summary {
        finished: &finished,
        total: progress.total,
        elapsed: started.elapsed(),
        interrupted: was_stopped,
        opts: &opts,
    };
    print!("{}", report::text(&summary));
    let _ = std::io::stdout().flush();
    if let Some(dir) = &opts.report
        && let Err(e) = report::write_dir(dir, &summary)
    {
        eprintln!(
            "nbdfault sweep: cannot write the report in {}: {e}",
            dir.display()
        );
        return EXIT_UNUSABLE;
    }
    if finished.iter().any(|f| opts.fail_on.contains(&f.outcome)) {
        EXIT_FINDINGS
    } else if was_stopped {
        EXIT_UNUSABLE
    } else {
        EXIT_CLEAN
    }
}

/// Moves a run's capture out of its directory into `--pcap`'s as
/// `NAME.pcapng`, before the run's directory goes; `facts.capture` then
/// names where it is kept (`None` if it could not be kept, which is said).
fn keep_capture(opts: &Options, facts: &mut Facts, name: &str) {
    let (Some(dir), Some(from)) = (&opts.pcap, facts.capture.take()) else {
        return;
    };
    let to = dir.join(format!("{name}.pcapng"));
    // A rename fails across filesystems (the runs live in the temporary
    // directory): then a copy.
    let kept = std::fs::rename(&from, &to).or_else(|_| std::fs::copy(&from, &to).map(|_| ()));
    match kept {
        Ok(()) => facts.capture = Some(to),
        Err(e) => eprintln!(
            "nbdfault sweep: cannot keep the capture {} as {}: {e}",
            from.display(),
            to.display()
        ),
    }
}

async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs done so far, on stderr: a bar on a terminal, a line per tenth
/// otherwise.
#[derive(Clone)]
struct Progress {
    total: usize,
    done: Arc<AtomicUsize>,
    findings: Arc<AtomicUsize>,
    started: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            done: Arc::default(),
            findings: Arc::default(),
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn done(&self, finding: bool) {
        let n = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let f = self
            .findings
            .fetch_add(usize::from(finding), Ordering::Relaxed)
            + usize::from(finding);
        let rate = n as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        if self.tty {
            let width = 30;
            let filled = n * width / self.total.max(1);
            eprint!(
                "\r[{}{}] {n}/{} runs, {f} finding(s), {rate:.1} runs/s ",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.total
            );
        } else if n == self.total || n.is_multiple_of((self.total / 10).max(1)) {
            eprintln!(
                "nbdfault sweep: {n}/{} runs, {f} finding(s), {rate:.1} runs/s",
                self.total
            );
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
