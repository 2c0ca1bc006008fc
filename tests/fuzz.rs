//! Fuzzing harness for everything `moe` reads from outside: `config.json` parsing and
//! validation, safetensors headers and tensor offsets, sharded checkpoints'
//! `model.safetensors.index.json`, and the command line's arguments (ids, numbers, flags).
//! It runs on stable Rust as a plain integration test, one `#[test]` per target:
//!
//! | target        | what one input is                 | what runs                                         |
//! |---------------|-----------------------------------|---------------------------------------------------|
//! | `config`      | `config.json` text                | `MoeCausalLmConfig::from_json`, then on `Ok` `validate`, `parameter_counts`, `moe_layer` (and its `validate`) and the size getters |
//! | `safetensors` | a whole safetensors file          | `TensorSource::from_bytes`, then on `Ok` `shape`, `read_f32` and `read_i64` of every tensor |
//! | `index`       | `model.safetensors.index.json`    | `Checkpoint::open` on a fresh folder holding two valid shards, a FIFO, a directory, symbolic links to `/dev/zero` and out of the folder, a 1 TiB sparse file, and this index; on `Ok` `unused`, `shape` and `read_f32` |
//! | `cli`         | arguments, one per line           | `moe`'s own clap definition (`src/bin/moe/cli.rs`): `Cli::try_parse_from`, and the error's rendering |
//!
//! Inputs are generated two ways, from a seed: structured, by [`arbitrary::Unstructured`] over
//! random bytes (JSON objects built from the real field names and an interesting set of values,
//! safetensors headers with arbitrary dtypes, shapes, offsets and lying length prefixes, index
//! files naming hostile shard paths, argument lists of the real subcommands, flags and odd
//! values), and by byte-level mutation (bit flips, interesting bytes and integers, inserted,
//! deleted, duplicated and spliced spans, dictionary tokens) of the corpus, of valid files built
//! here, and of structured inputs. Input `i` of a seed is always the same input (given the
//! same corpus, which mutation starts from).
//!
//! # Bounds
//!
//! An input fails when it
//! - panics (each input runs under `catch_unwind`);
//! - takes more than **1 s** of wall time (measured with `Instant`; an input over it is run
//!   once more, so that a stall of the machine is not taken for a slow input);
//! - makes the process ask for more than **256 MiB** in one allocation, or hold more than
//!   **256 MiB** more than when the input started (a counting global allocator, counting on
//!   the thread that runs the input).
//!   The allocation that would pass the bound is not made: the thread making it is parked for
//!   good and the input is saved, so the run goes on instead of the process dying (a target
//!   stops after 256 parked threads, or `MOE_FUZZ_MAX_PARKED`, or 1 GiB held by them);
//! - hangs: still running after 5 s. The input is saved, the target is asked to unblock it (a
//!   writer opens the folder's FIFO), and a thread that stays stuck is abandoned (at most 4 per
//!   target, or `MOE_FUZZ_MAX_ABANDONED`; then the target stops).
//!
//! A failing input is written to `tests/fuzz/crashers/<target>/<hash>` and the test fails with
//! the target, that file and the message (kinds of failure are told apart by their message
//! without its numbers; two inputs of each kind are kept, counting the replayed ones, and at
//! most 30 per run). Every run first replays every file of `tests/fuzz/corpus/<target>/`
//! and `tests/fuzz/crashers/<target>/`: the crashers are regression tests, and stay in the repo
//! once fixed.
//!
//! # Running
//!
//! `cargo test --features wgpu,ndarray --test fuzz` is the short pass CI runs: 10,000 generated
//! inputs per target from a fixed seed, a few seconds each. Knobs:
//! - `MOE_FUZZ_INPUTS`: generated inputs per target (`MOE_FUZZ_INPUTS_CONFIG`,
//!   `MOE_FUZZ_INPUTS_SAFETENSORS`, `MOE_FUZZ_INPUTS_INDEX`, `MOE_FUZZ_INPUTS_CLI` override it
//!   for one target);
//! - `MOE_FUZZ_SEED`: the seed (decimal or `0x` hex; default fixed, so CI is reproducible);
//! - `MOE_FUZZ_MAX_ABANDONED`, `MOE_FUZZ_MAX_PARKED`: how many hung or parked threads a target
//!   may leave behind before it stops (4 and 256), to go on past a known failure in a long pass.
//!
//! The long pass (10 million inputs; progress every minute):
//!
//! ```text
//! MOE_FUZZ_INPUTS=2500000 MOE_FUZZ_SEED=$RANDOM cargo test --release --features wgpu,ndarray \
//!     --test fuzz -- --nocapture --test-threads=1
//! ```
//!
//! or the same without `--release` (the test profile optimises `moe-models` and every
//! dependency already, and is the build CI already has; ~2,000 to 15,000 inputs per second per
//! target on one core). Each target prints the inputs it ran, the time, the largest single
//! allocation and the largest peak of live bytes of one input.
//!
//! A failure that kills the whole process (a stack overflow, an abort in foreign code) cannot be
//! saved; the progress lines name the seed, and input `i` of a seed is reproducible.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use moe::moe_models::{Checkpoint, MoeCausalLmConfig, TensorSource};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

#[path = "../src/bin/moe/cli.rs"]
#[allow(dead_code)]
mod cli;

/// The most one input may allocate in one request, and the most it may hold live.
const MEMORY_BOUND: usize = 256 << 20;
/// The longest one input may run.
const TIME_BOUND: Duration = Duration::from_secs(1);
/// An input still running after this long is a hang.
const HANG: Duration = Duration::from_secs(5);
/// Generated inputs are cut to this size.
const MAX_INPUT: usize = 1 << 20;
/// Generated inputs per target by default (the short pass).
const DEFAULT_INPUTS: u64 = 10_000;
/// The default seed ("moe_fuzz").
const DEFAULT_SEED: u64 = 0x6d6f_655f_6675_7a7a;
/// Threads stuck in one input (a hang) a target may leave behind before it stops (by default;
/// `MOE_FUZZ_MAX_ABANDONED` sets it).
const MAX_ABANDONED: u64 = 4;
/// Threads parked by the allocator (at an input passing the memory bound) a target may leave
/// behind (by default; `MOE_FUZZ_MAX_PARKED` sets it), and the bytes they may hold together,
/// before it stops.
const MAX_PARKED: u64 = 256;
const MAX_PARKED_BYTES: usize = 1 << 30;
/// Inputs of one kind of failure saved per run, and of all kinds.
const SAVE_PER_KIND: usize = 2;
const SAVE_PER_RUN: usize = 30;

const FUZZ_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz");
const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

// ---------------------------------------------------------------------------------------------
// The counting allocator.

/// [`System`], counting on a thread that runs a fuzz input the bytes it holds, their peak and
/// the largest request since the input started, and refusing (by parking the thread) an
/// allocation that would take the input past [`MEMORY_BOUND`].
struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What the allocator saw when an input passed the memory bound: the request, and the bytes
/// the input would then hold. Set by the allocator, read by the monitor.
#[derive(Default)]
struct Trip {
    request: AtomicUsize,
    live: AtomicUsize,
}

/// What a thread's allocations did while it ran its current fuzz input.
#[derive(Clone, Copy)]
struct Meter {
    /// This thread is running a fuzz input: its allocations are counted and checked against
    /// the bound, and its panics are recorded instead of printed.
    armed: bool,
    /// Bytes allocated minus bytes freed since the input started.
    live: isize,
    /// The most `live` reached.
    peak: isize,
    /// The largest single request.
    largest: usize,
    /// Where to report a passed bound (the worker's [`Trip`], kept alive by the worker).
    trip: *const Trip,
}

thread_local! {
    /// This thread's [`Meter`] (a `const` thread local without destructor: the allocator may
    /// use it at any time).
    static METER: Cell<Meter> = const {
        Cell::new(Meter { armed: false, live: 0, peak: 0, largest: 0, trip: std::ptr::null() })
    };
    /// The panic message of this thread's input, from the panic hook.
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// The worker number (names the index target's folder).
    static WORKER: Cell<u64> = const { Cell::new(0) };
}

/// Counts `growth` more live bytes for a request of `request` bytes on an armed thread; when
/// its input would pass the bound, reports it and parks the thread for good (no allocation,
/// no unwinding: neither is allowed here).
fn count(request: usize, growth: isize) {
    let _ = METER.try_with(|meter| {
        let mut m = meter.get();
        if !m.armed {
            return;
        }
        m.live = m.live.saturating_add(growth);
        if request > MEMORY_BOUND || m.live > MEMORY_BOUND as isize {
            if !m.trip.is_null() {
                // SAFETY: the worker that set `trip` holds the Arc owning the Trip for as long
                // as it lives, and this is that worker.
                let trip = unsafe { &*m.trip };
                trip.live.store(m.live.max(0) as usize, Relaxed);
                trip.request.store(request.max(1), Relaxed);
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        m.peak = m.peak.max(m.live);
        m.largest = m.largest.max(request);
        meter.set(m);
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, -(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size, new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Records the panics of armed threads (fuzz inputs) in [`PANIC`]; other panics (the test's
/// own assertions) go to the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if METER.with(Cell::get).armed {
                let message = info.payload_as_str().unwrap_or("(a non-string payload)");
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                PANIC.with(|p| *p.borrow_mut() = Some(format!("{message}{location}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// What one run of one input did.
struct Outcome {
    panic: Option<String>,
    /// The input was accepted (parsed or opened without error).
    accepted: bool,
    elapsed: Duration,
    largest: usize,
    peak: usize,
}

/// Runs `input` through `run` on this thread, armed.
fn run_one(run: &RunFn, input: &[u8]) -> Outcome {
    PANIC.with(|p| p.borrow_mut().take());
    let trip = METER.get().trip;
    METER.set(Meter {
        armed: true,
        live: 0,
        peak: 0,
        largest: 0,
        trip,
    });
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| run(input)));
    let elapsed = start.elapsed();
    let meter = METER.get();
    METER.set(Meter {
        armed: false,
        ..meter
    });
    let accepted = matches!(result, Ok(true));
    let panic = result.err().map(|payload| {
        PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| {
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a non-string payload)".into())
        })
    });
    Outcome {
        panic,
        accepted,
        elapsed,
        largest: meter.largest,
        peak: meter.peak.max(0) as usize,
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: a worker thread runs the inputs, the test thread watches it.

/// Runs one input, saying whether it was accepted.
type RunFn = dyn Fn(&[u8]) -> bool + Send + Sync;
/// Builds a structured input from arbitrary bytes.
type StructuredFn = dyn Fn(&mut Unstructured) -> Vec<u8> + Send + Sync;

/// One fuzz target.
struct Target {
    name: &'static str,
    /// Runs one input, saying whether it was accepted; must neither panic nor pass the bounds.
    run: Box<RunFn>,
    /// A structured input from arbitrary bytes.
    structured: Box<StructuredFn>,
    /// Valid or interesting inputs built here, mutated along with the corpus.
    seeds: Vec<Vec<u8>>,
    /// Tokens the mutator inserts.
    dictionary: Vec<Vec<u8>>,
    /// Tries to let a hung input go on (the index target opens its FIFOs for writing).
    unblock: Box<dyn Fn() + Send + Sync>,
}

/// State shared by the test thread and the worker threads of one target.
struct Shared {
    target: Target,
    /// Corpus and crasher files, replayed first: input `i < replay.len()` is `replay[i]`.
    replay: Vec<(PathBuf, Vec<u8>)>,
    /// What mutation starts from: the corpus and the target's seeds.
    pool: Vec<Vec<u8>>,
    seed: u64,
    /// Replayed plus generated inputs.
    total: u64,
    /// The live worker's number; older workers stop at their next input.
    generation: AtomicU64,
    /// The input in progress (or last run).
    index: AtomicU64,
    /// When it started, in ns since `clock` (0: none running).
    started: AtomicU64,
    clock: Instant,
    /// A copy of the input in progress, for saving when it hangs or passes the memory bound.
    current: Mutex<Vec<u8>>,
    finished: AtomicBool,
    done: AtomicU64,
    accepted: AtomicU64,
    largest: AtomicUsize,
    peak: AtomicUsize,
    slowest: AtomicU64,
    /// 1 + the input the test thread declared hung (the worker then does not report it again).
    hung: AtomicU64,
    trip: Trip,
    failures: Mutex<Failures>,
}

#[derive(Default)]
struct Failures {
    count: usize,
    saved: usize,
    per_kind: HashMap<String, usize>,
    lines: Vec<String>,
}

impl Shared {
    fn input(&self, i: u64) -> Vec<u8> {
        match self.replay.get(i as usize) {
            Some((_, bytes)) => bytes.clone(),
            None => generate(&self.target, &self.pool, self.seed, i),
        }
    }

    /// Records a failure of input `i`: saves a generated input as a crasher and prints it now
    /// (a run cut short still shows it).
    fn fail(&self, i: u64, input: &[u8], kind: &str, message: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.count += 1;
        // One kind of failure: the message without its numbers (sizes, lines, columns).
        let key: String = format!("{kind}: {message}")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(200)
            .collect();
        let seen = failures.per_kind.entry(key).or_insert(0);
        *seen += 1;
        let seen = *seen;
        let place = match self.replay.get(i as usize) {
            // Already kept; it also counts towards the inputs kept of its kind.
            Some((path, _)) => format!("replayed {}", path.display()),
            None => {
                if seen <= SAVE_PER_KIND && failures.saved < SAVE_PER_RUN {
                    failures.saved += 1;
                    match save_crasher(self.target.name, input) {
                        Ok(path) => format!("saved to {}", path.display()),
                        Err(e) => format!("could not be saved: {e}"),
                    }
                } else {
                    "not saved: the same kind of failure as one saved".into()
                }
            }
        };
        let line = format!(
            "fuzz target `{}`, input #{i} (seed {:#x}, {place}): {kind}: {message}",
            self.target.name, self.seed
        );
        eprintln!("{line}");
        if failures.lines.len() < 50 {
            failures.lines.push(line);
        }
    }

    fn now(&self) -> u64 {
        (self.clock.elapsed().as_nanos() as u64).max(1)
    }
}

fn save_crasher(target: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    let dir = Path::new(FUZZ_DIR).join("crashers").join(target);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{:016x}", fnv(input)));
    std::fs::write(&path, input)?;
    Ok(path
        .strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .map(Path::to_path_buf)
        .unwrap_or(path))
}

/// FNV-1a: names crasher files and spreads seeds.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs inputs `start..` until done or superseded.
fn worker(shared: Arc<Shared>, generation: u64, start: u64) {
    METER.set(Meter {
        trip: &shared.trip as *const Trip,
        ..METER.get()
    });
    WORKER.set(generation);
    for i in start..shared.total {
        if shared.generation.load(Relaxed) != generation {
            return;
        }
        let input = shared.input(i);
        {
            let mut current = shared.current.lock().unwrap_or_else(|e| e.into_inner());
            current.clear();
            current.extend_from_slice(&input);
        }
        shared.index.store(i, Relaxed);
        shared.started.store(shared.now(), Relaxed);
        let mut outcome = run_one(&*shared.target.run, &input);
        let hung = || shared.hung.load(Relaxed) == i + 1;
        if outcome.panic.is_none() && outcome.elapsed > TIME_BOUND && !hung() {
            // Once more: a machine busy with something else is not a slow input.
            shared.started.store(shared.now(), Relaxed);
            let again = run_one(&*shared.target.run, &input);
            outcome.elapsed = outcome.elapsed.min(again.elapsed);
            outcome.panic = again.panic;
        }
        if shared.generation.load(Relaxed) != generation {
            return; // abandoned while it ran: a newer worker owns the shared state
        }
        shared.started.store(0, Relaxed);
        shared.largest.fetch_max(outcome.largest, Relaxed);
        shared.peak.fetch_max(outcome.peak, Relaxed);
        shared
            .slowest
            .fetch_max(outcome.elapsed.as_nanos() as u64, Relaxed);
        if let Some(message) = &outcome.panic {
            shared.fail(i, &input, "panic", message);
        } else if outcome.elapsed > TIME_BOUND && !hung() {
            let message = format!(
                "took {:.2} s (twice), more than the bound of {} s",
                outcome.elapsed.as_secs_f64(),
                TIME_BOUND.as_secs()
            );
            shared.fail(i, &input, "too slow", &message);
        }
        shared.accepted.fetch_add(outcome.accepted as u64, Relaxed);
        shared.done.fetch_add(1, Relaxed);
    }
    if shared.generation.load(Relaxed) == generation {
        shared.finished.store(true, Relaxed);
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim().replace('_', "");
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={value:?}: {e}")))
}

/// Every file of `tests/fuzz/<kind>/<target>/` (`kind`: `corpus` or `crashers`), sorted.
fn replay_files(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(FUZZ_DIR).join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let shown = path
                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .map(Path::to_path_buf)
                .unwrap_or(path);
            (shown, bytes)
        })
        .collect()
}

fn mib(bytes: usize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Runs one target: replays its corpus and crashers, then its generated inputs; fails with
/// every failure found.
fn fuzz(target: Target) {
    install_panic_hook();
    let name = target.name;
    let generated = env_u64(&format!("MOE_FUZZ_INPUTS_{}", name.to_uppercase()))
        .or_else(|| env_u64("MOE_FUZZ_INPUTS"))
        .unwrap_or(DEFAULT_INPUTS);
    let seed = env_u64("MOE_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let max_abandoned = env_u64("MOE_FUZZ_MAX_ABANDONED").unwrap_or(MAX_ABANDONED);
    let max_parked = env_u64("MOE_FUZZ_MAX_PARKED").unwrap_or(MAX_PARKED);
    let mut replay = replay_files("corpus", name);
    // Mutation starts from the corpus and the target's seeds, not from the crashers: a known
    // failure would otherwise come back in most inputs.
    let mut pool: Vec<Vec<u8>> = replay.iter().map(|(_, b)| b.clone()).collect();
    pool.extend(target.seeds.iter().cloned());
    replay.extend(replay_files("crashers", name));
    pool.retain(|b| b.len() <= MAX_INPUT);
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let replayed = replay.len() as u64;
    let shared = Arc::new(Shared {
        target,
        total: replayed + generated,
        replay,
        pool,
        seed,
        generation: AtomicU64::new(0),
        index: AtomicU64::new(0),
        started: AtomicU64::new(0),
        clock: Instant::now(),
        current: Mutex::new(Vec::new()),
        finished: AtomicBool::new(false),
        done: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        largest: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        slowest: AtomicU64::new(0),
        hung: AtomicU64::new(0),
        trip: Trip::default(),
        failures: Mutex::new(Failures::default()),
    });
    let spawn = |generation: u64, start: u64| {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("fuzz-{name}-{generation}"))
            .spawn(move || worker(shared, generation, start))
            .expect("spawn a fuzz worker")
    };
    let started = Instant::now();
    let mut generation = 0;
    let mut handle = Some(spawn(generation, 0));
    let (mut stuck, mut parked, mut parked_bytes) = (0u64, 0u64, 0usize);
    let mut last_report = Instant::now();
    let mut stopped = None;
    loop {
        let worker_ended = handle.as_ref().is_some_and(|h| h.is_finished());
        if shared.finished.load(Relaxed) || worker_ended {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        let current = || {
            shared
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        // The allocator parked the worker: an input passed the memory bound.
        let request = shared.trip.request.load(Relaxed);
        let mut abandon = false;
        let mut hung = false;
        if request != 0 {
            let i = shared.index.load(Relaxed);
            let live = shared.trip.live.load(Relaxed);
            let message = match request > MEMORY_BOUND {
                true => format!(
                    "asked for {request} bytes ({}) in one allocation, more than the bound of {}",
                    mib(request),
                    mib(MEMORY_BOUND)
                ),
                false => format!(
                    "would hold {live} bytes ({}) at once, more than the bound of {}",
                    mib(live),
                    mib(MEMORY_BOUND)
                ),
            };
            shared.fail(i, &current(), "memory", &message);
            parked += 1;
            // What the parked thread holds: all but the refused request.
            parked_bytes += live.saturating_sub(request).min(MEMORY_BOUND);
            shared.trip.request.store(0, Relaxed);
            shared.trip.live.store(0, Relaxed);
            abandon = true;
        }
        // A hang: ask the target to unblock it, abandon the worker if that does not help.
        let since = shared.started.load(Relaxed);
        if !abandon && since != 0 && shared.now().saturating_sub(since) > HANG.as_nanos() as u64 {
            let i = shared.index.load(Relaxed);
            shared.hung.store(i + 1, Relaxed);
            let message = format!(
                "still running after {} s (a hang; the bound is {} s)",
                HANG.as_secs(),
                TIME_BOUND.as_secs()
            );
            shared.fail(i, &current(), "hang", &message);
            (shared.target.unblock)();
            let wait = Instant::now();
            while shared.index.load(Relaxed) == i
                && shared.started.load(Relaxed) == since
                && wait.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            abandon = shared.index.load(Relaxed) == i && shared.started.load(Relaxed) == since;
            hung = abandon;
        }
        if abandon {
            stuck += hung as u64;
            let i = shared.index.load(Relaxed);
            handle.take(); // its thread stays parked or stuck; it is not joined
            if stuck > max_abandoned || parked > max_parked || parked_bytes > MAX_PARKED_BYTES {
                stopped = Some(i);
                break;
            }
            generation += 1;
            shared.generation.store(generation, Relaxed);
            shared.started.store(0, Relaxed);
            handle = Some(spawn(generation, i + 1));
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            let done = shared.done.load(Relaxed);
            println!(
                "fuzz `{name}`: {done} of {} inputs after {:.0} s ({:.0}/s), seed {seed:#x}",
                shared.total,
                started.elapsed().as_secs_f64(),
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    if let Some(handle) = handle.filter(|_| stopped.is_none())
        && let Err(panic) = handle.join()
    {
        eprintln!("fuzz target `{name}`: the harness itself failed (seed {seed:#x})");
        std::panic::resume_unwind(panic);
    }
    let seconds = started.elapsed().as_secs_f64();
    let done = shared.done.load(Relaxed);
    let failures = shared.failures.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "fuzz `{name}`: {done} inputs ({} replayed, {} generated, seed {seed:#x}) in {seconds:.1} s \
         ({:.0}/s), {} accepted; largest allocation {}, largest peak of one input {} (bound {}); \
         slowest input {:.1} ms (bound {} s); {} failures",
        replayed.min(done),
        done.saturating_sub(replayed),
        done as f64 / seconds,
        shared.accepted.load(Relaxed),
        mib(shared.largest.load(Relaxed)),
        mib(shared.peak.load(Relaxed)),
        mib(MEMORY_BOUND),
        shared.slowest.load(Relaxed) as f64 / 1e6,
        TIME_BOUND.as_secs(),
        failures.count,
    );
    let mut report = failures.lines.join("\n");
    if let Some(i) = stopped {
        report += &format!(
            "\nfuzz target `{name}` stopped at input #{i}: {stuck} threads stuck in hangs (at most \
             {max_abandoned}), {parked} parked by the memory bound holding {} (at most {max_parked} \
             and {})",
            mib(parked_bytes),
            mib(MAX_PARKED_BYTES)
        );
    }
    assert!(
        failures.count == 0 && stopped.is_none(),
        "fuzz target `{name}`: {} failing inputs (bounds: no panic, at most {} s and {} per input):\n{report}",
        failures.count,
        TIME_BOUND.as_secs(),
        mib(MEMORY_BOUND),
    );
}

// ---------------------------------------------------------------------------------------------
// Input generation: structured from arbitrary bytes, or mutated.

/// Input `i` of `seed` for `target`.
fn generate(target: &Target, pool: &[Vec<u8>], seed: u64, i: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(
        seed ^ fnv(target.name.as_bytes()).rotate_left(29) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut bytes = vec![0u8; rng.random_range(16..1024usize)];
    rng.fill_bytes(&mut bytes);
    let mut u = Unstructured::new(&bytes);
    let mut input = match rng.random_range(0..10u32) {
        0..=4 => return cut((target.structured)(&mut u)),
        5..=8 => pool[rng.random_range(0..pool.len())].clone(),
        _ => (target.structured)(&mut u),
    };
    mutate(&mut rng, &mut input, pool, &target.dictionary);
    cut(input)
}

fn cut(mut input: Vec<u8>) -> Vec<u8> {
    input.truncate(MAX_INPUT);
    input
}

const INTERESTING_BYTES: &[u8] = b"\x00\x01\x7f\x80\xff\"{}[],:-+.eE0123456789\\ \n\t/nultrefa";

/// Byte-level mutations, 1 to 8 stacked.
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, pool: &[Vec<u8>], dictionary: &[Vec<u8>]) {
    let rounds = 1 + rng.random_range(0..8usize).min(rng.random_range(0..8usize));
    for _ in 0..rounds {
        let len = data.len();
        let at = |rng: &mut StdRng| rng.random_range(0..len.max(1));
        let span = |rng: &mut StdRng, from: usize| {
            let most = (len - from).min(if rng.random_ratio(1, 8) { len } else { 64 });
            rng.random_range(1..=most.max(1)).min(len - from)
        };
        match rng.random_range(0..11u32) {
            0 if len > 0 => {
                let i = at(rng);
                data[i] ^= 1 << rng.random_range(0..8u32);
            }
            1 if len > 0 => {
                let i = at(rng);
                data[i] = rng.random();
            }
            2 if len > 0 => {
                let i = at(rng);
                data[i] = INTERESTING_BYTES[rng.random_range(0..INTERESTING_BYTES.len())];
            }
            3 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16usize);
                let fresh: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                data.splice(i..i, fresh);
            }
            4 if len > 0 => {
                let i = at(rng);
                let n = span(rng, i);
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = at(rng);
                let n = span(rng, i);
                let copy = data[i..i + n].to_vec();
                let to = rng.random_range(0..=len);
                data.splice(to..to, copy);
            }
            6 => {
                let other = &pool[rng.random_range(0..pool.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    let n = rng.random_range(1..=(other.len() - from).min(256));
                    let piece = other[from..from + n].to_vec();
                    let i = rng.random_range(0..=len);
                    let replace = rng.random_range(0..=(len - i).min(256));
                    data.splice(i..i + replace, piece);
                }
            }
            7 if !dictionary.is_empty() => {
                let token = dictionary[rng.random_range(0..dictionary.len())].clone();
                let i = rng.random_range(0..=len);
                let replace = match rng.random_bool(0.5) {
                    true => 0,
                    false => rng.random_range(0..=(len - i).min(token.len() + 2)),
                };
                data.splice(i..i + replace, token);
            }
            8 if len > 0 => {
                let values = [
                    0u64,
                    1,
                    0x7f,
                    0x80,
                    0xff,
                    0x7fff,
                    0xffff,
                    0x7fff_ffff,
                    0xffff_ffff,
                    i64::MAX as u64,
                    u64::MAX,
                    100_000_000,
                    100_000_001,
                    len as u64,
                    len.saturating_sub(8) as u64,
                    len.saturating_sub(9) as u64,
                ];
                let value = values[rng.random_range(0..values.len())];
                let width = [1usize, 2, 4, 8][rng.random_range(0..4usize)];
                let i = match rng.random_bool(0.3) {
                    true => 0,
                    false => at(rng),
                };
                for (k, b) in value.to_le_bytes()[..width].iter().enumerate() {
                    if i + k < data.len() {
                        data[i + k] = *b;
                    }
                }
            }
            9 if len > 0 => {
                let i = at(rng);
                data.truncate(i);
            }
            10 if len > 0 => {
                // Repeat a span many times (long strings, deep nesting, many entries).
                let i = at(rng);
                let n = span(rng, i).min(16);
                let copy = data[i..i + n].to_vec();
                let times = rng.random_range(2..=2000usize);
                data.splice(i..i, copy.repeat(times));
            }
            _ => {}
        }
        data.truncate(MAX_INPUT);
    }
}

fn below(u: &mut Unstructured, n: usize) -> usize {
    match n {
        0 | 1 => 0,
        _ => u.int_in_range(0..=n - 1).unwrap_or(0),
    }
}

fn pick<'a, T>(u: &mut Unstructured, items: &'a [T]) -> &'a T {
    &items[below(u, items.len())]
}

fn chance(u: &mut Unstructured, numerator: u32, denominator: u32) -> bool {
    u.ratio(numerator, denominator).unwrap_or(false)
}

/// An arbitrary string, without line breaks when `one_line`.
fn text(u: &mut Unstructured, one_line: bool) -> String {
    let s: String = u.arbitrary().unwrap_or_default();
    match one_line {
        true => s.replace(['\n', '\r'], " "),
        false => s,
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Raw JSON numbers and values that stress size checks and arithmetic.
const JSON_VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "4",
    "8",
    "15",
    "16",
    "64",
    "128",
    "-1",
    "-0",
    "65536",
    "65537",
    "2147483648",
    "4294967296",
    "9007199254740992",
    "4611686018427387904",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1.8446744073709552e19",
    "1e300",
    "-1e300",
    "1e-50",
    "4.9e-324",
    "1e999",
    "0.5",
    "1.0",
    "64.0",
    "1e-5",
    "1e-06",
    "10000.0",
    "3.4028236e38",
    "\"NaN\"",
    "\"nan\"",
    "\"inf\"",
    "\"-Infinity\"",
    "\"64\"",
    "\"\"",
    "\"silu\"",
    "\"gelu\"",
    "null",
    "true",
    "false",
    "[]",
    "[0]",
    "[1,2]",
    "[0,1,2,3,4,5,6,7]",
    "[-1]",
    "[18446744073709551615]",
    "[1e300]",
    "[null]",
    "{}",
    "{\"type\":\"linear\",\"factor\":2.0}",
    "{\"rope_type\":\"yarn\",\"factor\":40}",
    "[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]",
];

/// An interesting JSON value, as text.
fn json_value(u: &mut Unstructured) -> String {
    match below(u, 12) {
        0 => u.arbitrary::<u64>().unwrap_or(0).to_string(),
        1 => u.arbitrary::<i64>().unwrap_or(0).to_string(),
        2 => {
            let f: f64 = u.arbitrary().unwrap_or(0.0);
            match f.is_finite() {
                true => format!("{f:e}"),
                false => "1e400".into(),
            }
        }
        3 => quote(&text(u, false)),
        4 => {
            let long = chance(u, 1, 8);
            let n = u
                .int_in_range(100..=if long { 300_000 } else { 3000 })
                .unwrap_or(100);
            format!("\"{}\"", "x".repeat(n))
        }
        5 => {
            let depth = u.int_in_range(1..=300).unwrap_or(1);
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        }
        6 => {
            let n = below(u, 6);
            let items: Vec<String> = (0..n).map(|_| pick(u, JSON_VALUES).to_string()).collect();
            format!("[{}]", items.join(","))
        }
        7 => {
            // A long list (mlp_only_layers of many layers).
            let long = chance(u, 1, 8);
            let n = u
                .int_in_range(1..=if long { 100_000 } else { 500 })
                .unwrap_or(1);
            let item = pick(u, &["0,", "1,", "7,", "65535,", "18446744073709551615,"]);
            format!("[{}0]", item.repeat(n))
        }
        _ => pick(u, JSON_VALUES).to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Target `config`.

/// Every field `MoeCausalLmConfig` reads (and its aliases): the fields whose transformers defaults
/// `tests/data/config-defaults.json` records for some architecture (one list, kept by
/// `scripts/fixtures/config_defaults.py`), and `architectures`.
fn config_fields() -> &'static [String] {
    static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
    FIELDS.get_or_init(|| {
        let path = Path::new(DATA_DIR).join("config-defaults.json");
        let text = std::fs::read_to_string(&path).expect("tests/data/config-defaults.json");
        let value: serde_json::Value = serde_json::from_str(&text).expect("a JSON object");
        let mut fields = vec!["architectures".to_string()];
        for defaults in value.as_object().expect("a JSON object").values() {
            if let Some(defaults) = defaults.as_object() {
                fields.extend(defaults.keys().filter(|k| !k.starts_with('_')).cloned());
            }
        }
        fields.sort();
        fields.dedup();
        fields
    })
}

const MODEL_TYPES: &[&str] = &[
    "\"olmoe\"",
    "\"qwen2_moe\"",
    "\"qwen3_moe\"",
    "\"mixtral\"",
    "\"deepseek_v3\"",
    "\"garbage\"",
    "\"\"",
    "null",
    "7",
];

const ARCHITECTURES: &[&str] = &[
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV3ForCausalLM",
    "LlamaForCausalLM",
    "",
];

/// A real config: its text, and its (field, raw JSON value) pairs.
type RealConfig = (String, Vec<(String, String)>);

/// The real configs of tests/data/*/config.json.
fn real_configs() -> &'static [RealConfig] {
    static CONFIGS: OnceLock<Vec<RealConfig>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let mut configs = Vec::new();
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(DATA_DIR)
            .expect("tests/data")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        dirs.sort();
        for dir in dirs {
            let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(&text).expect("a real config");
            let fields = value
                .as_object()
                .expect("a config object")
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect();
            configs.push((text, fields));
        }
        assert!(!configs.is_empty(), "no tests/data/*/config.json");
        configs
    })
}

fn structured_config(u: &mut Unstructured) -> Vec<u8> {
    let configs = real_configs();
    let mut names: Vec<&str> = config_fields().iter().map(String::as_str).collect();
    for (_, fields) in configs {
        names.extend(fields.iter().map(|(k, _)| k.as_str()));
    }
    let mut fields: Vec<(String, String)> = match chance(u, 1, 5) {
        true => Vec::new(),
        false => pick(u, configs).1.clone(),
    };
    let edits = u.int_in_range(0..=10).unwrap_or(1);
    for _ in 0..edits {
        let (key, value) = match below(u, 8) {
            0 => {
                if !fields.is_empty() {
                    let i = below(u, fields.len());
                    fields.remove(i);
                }
                continue;
            }
            1 => ("model_type".to_string(), pick(u, MODEL_TYPES).to_string()),
            2 => {
                let n = below(u, 3);
                let classes: Vec<String> = (0..n)
                    .map(|_| quote(pick::<&str>(u, ARCHITECTURES)))
                    .collect();
                (
                    "architectures".to_string(),
                    format!("[{}]", classes.join(",")),
                )
            }
            3 => (text(u, false), json_value(u)),
            _ => (pick(u, &names).to_string(), json_value(u)),
        };
        match fields.iter_mut().find(|(k, _)| *k == key) {
            Some(field) if !chance(u, 1, 10) => field.1 = value,
            _ => fields.push((key, value)),
        }
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", quote(k)))
        .collect();
    let object = format!("{{{}}}", body.join(","));
    let text = match below(u, 30) {
        0 => format!("[{object}]"),
        1 => json_value(u),
        2 => format!("{object} {object}"),
        3 => format!("\u{feff}{object}"),
        _ => object,
    };
    text.into_bytes()
}

fn run_config(input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input);
    let Ok(config) = MoeCausalLmConfig::from_json(&text) else {
        return false;
    };
    let _ = config.validate();
    let _ = config.parameter_counts();
    let layer = config.moe_layer();
    let _ = layer.validate();
    let _ = (
        config.kv_heads(),
        config.head_dim(),
        config.attention_widths(),
    );
    let _ = (config.mla(), config.eos_ids(), config.attention_window());
    for layer in 0..config.num_hidden_layers.min(4) {
        let _ = config.is_sparse(layer);
    }
    true
}

fn config_target() -> Target {
    let mut dictionary: Vec<Vec<u8>> = config_fields()
        .iter()
        .map(|f| format!("\"{f}\":").into_bytes())
        .collect();
    dictionary.extend(JSON_VALUES.iter().map(|v| v.as_bytes().to_vec()));
    dictionary.extend(MODEL_TYPES.iter().map(|v| v.as_bytes().to_vec()));
    Target {
        name: "config",
        run: Box::new(run_config),
        structured: Box::new(structured_config),
        seeds: real_configs()
            .iter()
            .map(|(text, _)| text.clone().into_bytes())
            .collect(),
        dictionary,
        unblock: Box::new(|| {}),
    }
}

#[test]
fn config() {
    fuzz(config_target());
}

// ---------------------------------------------------------------------------------------------
// Target `safetensors`.

/// The dtypes safetensors knows come first in [`DTYPES`].
const REAL_DTYPES: usize = 22;

const DTYPES: &[&str] = &[
    "F32",
    "BF16",
    "F16",
    "I64",
    "I32",
    "U8",
    "I8",
    "BOOL",
    "F64",
    "U64",
    "I16",
    "U16",
    "U32",
    "C64",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "f32",
    "Q4_0",
    "",
];

fn dtype_bits(dtype: &str) -> u64 {
    match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "F32" | "I32" | "U32" => 32,
        "F64" | "I64" | "U64" | "C64" => 64,
        _ => 32,
    }
}

const BIG_NUMBERS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    255,
    1 << 16,
    1 << 31,
    1 << 32,
    1 << 53,
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// A safetensors file with a structured header: consistent offsets and data half of the time
/// (and then, three times in four, a file with nothing else wrong, so that reading reaches
/// every dtype and shape), arbitrary (huge, reversed, overlapping, missing) the other half,
/// and a length prefix that may lie.
fn structured_safetensors(u: &mut Unstructured) -> Vec<u8> {
    let consistent = chance(u, 1, 2);
    let clean = consistent && chance(u, 3, 4);
    let tensors = below(u, 6);
    let mut entries = Vec::new();
    let mut offset = 0u64;
    let mut previous = 0u64;
    for t in 0..tensors {
        let name = match below(u, 8) {
            0 => text(u, false) + &t.to_string(),
            1 if !clean => "__metadata__".to_string(),
            2 if !clean => "".to_string(),
            3 => format!("model.layers.{t}.mlp.gate.weight"),
            _ => format!("t{t}"),
        };
        let dtype = match clean {
            true => *pick(u, &DTYPES[..REAL_DTYPES]),
            false => *pick(u, DTYPES),
        };
        let rank = below(u, 5);
        let dims: Vec<u64> = (0..rank)
            .map(|_| match clean || (consistent && !chance(u, 1, 20)) {
                true => *pick(u, &[0u64, 1, 2, 3, 5, 8]),
                false => *pick(u, BIG_NUMBERS),
            })
            .collect();
        let count = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let size = count
            .and_then(|c| c.checked_mul(dtype_bits(dtype)))
            .map(|bits| bits.div_ceil(8))
            .unwrap_or(u64::MAX);
        let (start, end) = match clean || (consistent && !chance(u, 1, 20)) {
            true => (offset, offset.saturating_add(size)),
            false => match below(u, 6) {
                0 => (offset.saturating_add(size), offset), // reversed
                1 => (previous, previous.saturating_add(size)), // overlapping
                2 => (*pick(u, BIG_NUMBERS), *pick(u, BIG_NUMBERS)),
                3 => (offset, offset.saturating_add(size).saturating_add(1)),
                _ => (offset, u.arbitrary::<u64>().unwrap_or(0) % 4096),
            },
        };
        previous = start;
        offset = end;
        let shape: Vec<String> = dims.iter().map(u64::to_string).collect();
        let mut fields = vec![
            format!("\"dtype\":{}", quote(dtype)),
            format!("\"shape\":[{}]", shape.join(",")),
            format!("\"data_offsets\":[{start},{end}]"),
        ];
        match if clean { 15 } else { below(u, 16) } {
            0 => {
                fields.remove(below(u, 3));
            }
            1 => {
                let i = below(u, 3);
                let key = fields[i].split(':').next().unwrap_or("\"x\"").to_string();
                fields[i] = format!("{key}:{}", json_value(u));
            }
            2 => fields.push(format!("\"extra\":{}", json_value(u))),
            _ => {}
        }
        entries.push(format!("{}:{{{}}}", quote(&name), fields.join(",")));
    }
    match below(u, 6) {
        0 => entries.push("\"__metadata__\":{\"format\":\"pt\"}".into()),
        _ if clean => {}
        1 => entries.push(format!("\"__metadata__\":{}", json_value(u))),
        2 => entries.push(format!(
            "\"__metadata__\":{{{}:{}}}",
            quote(&text(u, false)),
            json_value(u)
        )),
        _ => {}
    }
    if !clean && chance(u, 1, 6) && !entries.is_empty() {
        let i = below(u, entries.len());
        entries.push(entries[i].clone()); // a duplicate name
    }
    let mut header = format!("{{{}}}", entries.join(","));
    if chance(u, 1, 2) {
        while header.len() % 8 != 0 {
            header.push(' ');
        }
    }
    let data_len = match clean || (consistent && !chance(u, 1, 10)) {
        true => offset.min(1 << 20) as usize,
        false => below(u, 300),
    };
    let mut data = vec![0u8; data_len];
    if data_len <= 4096 && chance(u, 1, 2) {
        for b in data.iter_mut() {
            *b = u.arbitrary().unwrap_or(0x3f);
        }
    }
    let honest = header.len() as u64;
    let prefix = match if clean { 11 } else { below(u, 12) } {
        0 => 0,
        1 => honest - 1,
        2 => honest + 1,
        3 => honest + data_len as u64,
        4 => *pick(u, BIG_NUMBERS),
        5 => *pick(u, &[100_000_000u64, 100_000_001, 99_999_999]),
        6 => u.arbitrary::<u64>().unwrap_or(0),
        _ => honest,
    };
    let mut file = prefix.to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    if !clean && chance(u, 1, 10) {
        file.truncate(below(u, file.len() + 1));
    }
    file
}

/// Valid safetensors files: each dtype the loader reads at shape [2, 3], empty tensors, a
/// scalar, all together, with metadata, and none at all.
fn valid_safetensors() -> Vec<Vec<u8>> {
    use ::safetensors::Dtype;
    use ::safetensors::tensor::TensorView;
    let f32s: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 - 2.5).to_le_bytes())
        .collect();
    let halves: Vec<u8> = (0..6u16).flat_map(|i| (0x3c00 + i).to_le_bytes()).collect();
    let i64s: Vec<u8> = (0..6i64).flat_map(|i| (i - 3).to_le_bytes()).collect();
    let i32s: Vec<u8> = (0..3i32).flat_map(|i| (i - 1).to_le_bytes()).collect();
    let tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> = vec![
        ("f32", Dtype::F32, vec![2, 3], &f32s),
        ("bf16", Dtype::BF16, vec![2, 3], &halves),
        ("f16", Dtype::F16, vec![2, 3], &halves),
        ("i64", Dtype::I64, vec![2, 3], &i64s),
        ("i32", Dtype::I32, vec![3], &i32s),
        ("u8", Dtype::U8, vec![6], &halves[..6]),
        ("empty", Dtype::F32, vec![0], &[]),
        ("empty2", Dtype::I64, vec![2, 0], &[]),
        ("scalar", Dtype::F32, vec![], &f32s[..4]),
    ];
    let serialize = |chosen: &[&(&str, Dtype, Vec<usize>, &[u8])],
                     metadata: Option<HashMap<String, String>>| {
        let views: Vec<(String, TensorView)> = chosen
            .iter()
            .map(|(name, dtype, shape, data)| {
                let view = TensorView::new(*dtype, shape.clone(), data).expect("a valid view");
                (name.to_string(), view)
            })
            .collect();
        ::safetensors::serialize(views, metadata).expect("serialise")
    };
    let mut files: Vec<Vec<u8>> = tensors.iter().map(|t| serialize(&[t], None)).collect();
    let all: Vec<_> = tensors.iter().collect();
    files.push(serialize(&all, None));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    files.push(serialize(&all[..3], Some(metadata)));
    files.push(serialize(&[], None));
    files
}

fn run_safetensors(input: &[u8]) -> bool {
    let Ok(source) = TensorSource::from_bytes(input.to_vec(), "fuzz") else {
        return false;
    };
    let _ = source.name();
    let _ = source.contains("f32");
    for name in source.names() {
        let Ok(shape) = source.shape(&name) else {
            continue;
        };
        let _ = source.read_f32(&name, &shape);
        let _ = source.read_i64(&name, &shape);
        let _ = source.read_f32(&name, &[1]);
    }
    let _ = source.read_f32("no such tensor", &[]);
    true
}

fn safetensors_target() -> Target {
    let mut dictionary: Vec<Vec<u8>> = DTYPES
        .iter()
        .map(|d| format!("\"{d}\"").into_bytes())
        .collect();
    for token in [
        "\"dtype\":",
        "\"shape\":",
        "\"data_offsets\":",
        "\"__metadata__\":",
        "[0,0]",
        "[18446744073709551615]",
        "[0,18446744073709551615]",
        "[4294967296,4294967296]",
        "{}",
    ] {
        dictionary.push(token.as_bytes().to_vec());
    }
    dictionary.extend(JSON_VALUES.iter().map(|v| v.as_bytes().to_vec()));
    Target {
        name: "safetensors",
        run: Box::new(run_safetensors),
        structured: Box::new(structured_safetensors),
        seeds: valid_safetensors(),
        dictionary,
        unblock: Box::new(|| {}),
    }
}

#[test]
fn safetensors() {
    fuzz(safetensors_target());
}

// ---------------------------------------------------------------------------------------------
// Target `index`.

const SHARD_1: &str = "model-00001-of-00002.safetensors";
const SHARD_2: &str = "model-00002-of-00002.safetensors";

/// The shards' tensors (shard 1: `model.a`, `model.b`; shard 2: `model.c`, `model.d`) and
/// one outside the folder (`model.e`).
const SHARD_TENSORS: &[&str] = &["model.a", "model.b", "model.c", "model.d", "model.e"];

fn index_shards() -> &'static [Vec<u8>; 3] {
    static SHARDS: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    SHARDS.get_or_init(|| {
        use ::safetensors::Dtype;
        use ::safetensors::tensor::TensorView;
        let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let i64s: Vec<u8> = (0..3i64).flat_map(|i| i.to_le_bytes()).collect();
        let file = |tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])>| {
            let views: Vec<(&str, TensorView)> = tensors
                .into_iter()
                .map(|(n, d, s, b)| (n, TensorView::new(d, s, b).expect("a valid view")))
                .collect();
            ::safetensors::serialize(views, None).expect("serialise")
        };
        [
            file(vec![
                ("model.a", Dtype::F32, vec![2, 3], &f32s),
                ("model.b", Dtype::BF16, vec![2], &f32s[..4]),
            ]),
            file(vec![
                ("model.c", Dtype::I64, vec![3], &i64s),
                ("model.d", Dtype::F16, vec![0], &[]),
            ]),
            file(vec![("model.e", Dtype::F32, vec![1], &f32s[..4])]),
        ]
    })
}

/// Shard names an index may give: the real ones, and hostile ones.
fn shard_names() -> Vec<String> {
    let mut names: Vec<String> = [
        SHARD_1,
        SHARD_2,
        "model.safetensors",
        "model.safetensors.index.json",
        "./model-00001-of-00002.safetensors",
        "sub/../model-00001-of-00002.safetensors",
        "sub/model-00001-of-00002.safetensors",
        "sub/",
        "sub",
        "../x.safetensors",
        "../outside.safetensors",
        "../../../../../../etc/passwd",
        "/etc/passwd",
        "/dev/zero",
        "/dev/null",
        "/dev/urandom",
        "/proc/self/maps",
        "/proc/self/mem",
        "/",
        "",
        ".",
        "..",
        "fifo.safetensors",
        "zero.safetensors",
        "escape.safetensors",
        "loop.safetensors",
        "dangling.safetensors",
        "dir.safetensors",
        "missing.safetensors",
        "model-00001-of-00002.safetensors\0.txt",
        "\0",
        "модель-00001.safetensors",
        "model-00001-of-00002.safetensors ",
        "MODEL-00001-OF-00002.SAFETENSORS",
        "C:\\Windows\\win.ini",
        "\\\\server\\share\\x.safetensors",
        "model-00001-of-00002.safetensors/",
        "//model-00001-of-00002.safetensors",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.push("a".repeat(255) + ".safetensors");
    names.push("a/".repeat(3000));
    names.push("x".repeat(5000));
    names
}

fn structured_index(u: &mut Unstructured) -> Vec<u8> {
    let names = shard_names();
    let entries = below(u, 9);
    // Half the time every entry but one is right, so that a single bad name is what is tested.
    let mostly_right = chance(u, 1, 2);
    let wrong = below(u, entries.max(1));
    let mut map = Vec::new();
    for entry in 0..entries {
        if mostly_right && entry != wrong {
            let (tensor, shard) = *pick(
                u,
                &[
                    ("model.a", SHARD_1),
                    ("model.b", SHARD_1),
                    ("model.c", SHARD_2),
                    ("model.d", SHARD_2),
                    ("model.a", "sub/model-00001-of-00002.safetensors"),
                    ("model.a", "./model-00001-of-00002.safetensors"),
                ],
            );
            map.push(format!("{}:{}", quote(tensor), quote(shard)));
            continue;
        }
        let tensor = match below(u, 5) {
            0 => text(u, false),
            _ => pick(u, SHARD_TENSORS).to_string(),
        };
        let file = match below(u, 16) {
            0 => text(u, false),
            1 => json_value(u),
            // The sparse file: a 99,999,999-byte header of zeros, read at most once per input.
            2 if chance(u, 1, 100) => quote("sparse.safetensors"),
            _ => quote(pick(u, &names).as_str()),
        };
        map.push(format!("{}:{file}", quote(&tensor)));
    }
    let weight_map = match below(u, 20) {
        0 => json_value(u),
        _ => format!("{{{}}}", map.join(",")),
    };
    let mut fields = vec![format!("\"weight_map\":{weight_map}")];
    match below(u, 4) {
        0 => {}
        1 => fields.insert(
            0,
            format!("\"metadata\":{{\"total_size\":{}}}", json_value(u)),
        ),
        _ => fields.insert(0, "\"metadata\":{\"total_size\":56}".into()),
    }
    if chance(u, 1, 20) {
        fields.clear();
    }
    let text = format!("{{{}}}", fields.join(","));
    match below(u, 30) {
        0 => format!("[{text}]").into_bytes(),
        1 => json_value(u).into_bytes(),
        _ => text.into_bytes(),
    }
}

/// The valid index of the two shards.
fn valid_index() -> Vec<u8> {
    format!(
        "{{\"metadata\":{{\"total_size\":56}},\"weight_map\":{{\"model.a\":\"{SHARD_1}\",\"model.b\":\"{SHARD_1}\",\"model.c\":\"{SHARD_2}\",\"model.d\":\"{SHARD_2}\"}}}}"
    )
    .into_bytes()
}

/// The folder of this target's inputs: `/dev/shm` when there is one.
fn index_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = match shm.is_dir() {
            true => shm.to_path_buf(),
            false => std::env::temp_dir(),
        };
        let root = base
            .join(format!("moe-fuzz-{}", std::process::id()))
            .join("index");
        std::fs::create_dir_all(&root).expect("create the fuzz folder");
        std::fs::write(root.join("outside.safetensors"), &index_shards()[2])
            .expect("write a shard");
        root
    })
}

#[cfg(unix)]
fn make_fifo(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `name` is a NUL-terminated path that outlives the call.
    match unsafe { libc::mkfifo(name.as_ptr(), 0o600) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Builds a fresh checkpoint folder around `index` (no index at all when it is empty: then a
/// single `model.safetensors`).
fn build_folder(dir: &Path, index: &[u8]) -> std::io::Result<()> {
    let [shard_1, shard_2, _] = index_shards();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("sub"))?;
    std::fs::create_dir(dir.join("dir.safetensors"))?;
    std::fs::write(dir.join(SHARD_1), shard_1)?;
    std::fs::write(dir.join(SHARD_2), shard_2)?;
    std::fs::write(dir.join("sub").join(SHARD_1), shard_1)?;
    {
        // A 1 TiB sparse file whose header claims 99,999,999 bytes.
        let file = std::fs::File::create(dir.join("sparse.safetensors"))?;
        std::io::Write::write_all(&mut &file, &99_999_999u64.to_le_bytes())?;
        file.set_len(1 << 40)?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        make_fifo(&dir.join("fifo.safetensors"))?;
        symlink("/dev/zero", dir.join("zero.safetensors"))?;
        symlink("../outside.safetensors", dir.join("escape.safetensors"))?;
        symlink("loop.safetensors", dir.join("loop.safetensors"))?;
        symlink("nowhere.safetensors", dir.join("dangling.safetensors"))?;
    }
    match index.is_empty() {
        true => std::fs::write(dir.join("model.safetensors"), shard_1),
        false => std::fs::write(dir.join("model.safetensors.index.json"), index),
    }
}

fn run_index(input: &[u8]) -> bool {
    let dir = index_root().join(format!("case-{}", WORKER.get()));
    build_folder(&dir, input).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let opened = Checkpoint::open(&dir);
    let accepted = opened.is_ok();
    if let Ok(checkpoint) = opened {
        let _ = checkpoint.name();
        for name in checkpoint.unused() {
            let _ = checkpoint.contains(&name);
            if let Ok(shape) = checkpoint.shape(&name) {
                let _ = checkpoint.read_f32(&name, &shape);
            }
        }
        let _ = checkpoint.unused();
        let _ = checkpoint.used();
    }
    let _ = std::fs::remove_dir_all(&dir);
    accepted
}

/// Opens every case folder's FIFO for writing (without blocking): a reader stuck opening it
/// goes on.
fn unblock_fifos() {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let Ok(entries) = std::fs::read_dir(index_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(entry.path().join("fifo.safetensors"));
        }
    }
}

fn index_target() -> Target {
    let mut dictionary: Vec<Vec<u8>> = shard_names()
        .iter()
        .map(|n| quote(n).into_bytes())
        .collect();
    dictionary.extend(SHARD_TENSORS.iter().map(|n| quote(n).into_bytes()));
    dictionary.extend(
        [
            "\"weight_map\":",
            "\"metadata\":",
            "{}",
            "[]",
            "null",
            "\\u0000",
            "\\/",
            "/",
        ]
        .iter()
        .map(|t| t.as_bytes().to_vec()),
    );
    Target {
        name: "index",
        run: Box::new(run_index),
        structured: Box::new(structured_index),
        seeds: vec![valid_index(), Vec::new()],
        dictionary,
        unblock: Box::new(unblock_fifos),
    }
}

#[test]
fn index() {
    let root = index_root().clone();
    let result = catch_unwind(|| fuzz(index_target()));
    unblock_fifos();
    let _ = std::fs::remove_dir_all(root.parent().unwrap_or(&root));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------
// Target `cli`.

const SUBCOMMANDS: &[&str] = &["inspect", "logits", "generate", "bench", "backends", "help"];

const FLAGS: &[&str] = &[
    "--model",
    "--ids",
    "--out",
    "--top-k",
    "--prompt",
    "--prompt-file",
    "--max-new-tokens",
    "--temperature",
    "--seed",
    "--json",
    "--tokens",
    "--runs",
    "--preset",
    "--dispatch",
    "--dtype",
    "--backend",
    "--strict",
    "--dense",
    "--stream",
    "--help",
    "-h",
    "--version",
    "-V",
    "--",
    "-",
    "--ids=",
    "--top_k",
    "--no-such-flag",
    "-x",
];

const CLI_VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "-1",
    "-5",
    "1,2,3",
    "1,2,,3",
    ",",
    ",,",
    "1,",
    ",1",
    "-1,-2",
    "1e9",
    "1.5",
    "-0.0",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "0x10",
    "+1",
    " 1",
    "1 ",
    "007",
    "255",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999",
    "",
    "olmoe-1b-7b",
    "mixtral-8x7b-scaled",
    "qwen3-30b-a3b",
    "olmoe-1b-7b,qwen3-30b-a3b",
    "auto",
    "tensor-ops",
    "kernels",
    "f32",
    "bf16",
    "f16",
    "F32",
    "flex",
    "ndarray",
    "wgpu",
    "cuda",
    "tests/data/olmoe-tiny",
    "/dev/null",
    "/dev/zero",
    "-",
    "The river runs past.",
    "модель",
    "🦀,🦀",
    "\u{0}",
    "1\u{0}2",
];

/// Each subcommand's flags and what values they take (for well-formed argument lists; the
/// definition in cli.rs decides what parses).
const SUBCOMMAND_FLAGS: &[(&str, &[(&str, Value)])] = &[
    (
        "inspect",
        &[("--model", Value::Path), ("--json", Value::None)],
    ),
    (
        "logits",
        &[
            ("--model", Value::Path),
            ("--ids", Value::Ids),
            ("--out", Value::Path),
            ("--top-k", Value::Number),
        ],
    ),
    (
        "generate",
        &[
            ("--model", Value::Path),
            ("--prompt", Value::Text),
            ("--prompt-file", Value::Path),
            ("--ids", Value::Ids),
            ("--max-new-tokens", Value::Number),
            ("--top-k", Value::Number),
            ("--temperature", Value::Number),
            ("--seed", Value::Number),
            ("--json", Value::None),
        ],
    ),
    (
        "bench",
        &[
            ("--preset", Value::Text),
            ("--tokens", Value::Ids),
            ("--dispatch", Value::Text),
            ("--runs", Value::Number),
            ("--json", Value::None),
            ("--dense", Value::None),
            ("--stream", Value::None),
        ],
    ),
    ("backends", &[("--json", Value::None)]),
];

const GLOBAL_FLAGS: &[(&str, Value)] = &[
    ("--backend", Value::Text),
    ("--dtype", Value::Text),
    ("--strict", Value::None),
];

/// What a flag takes.
#[derive(Clone, Copy)]
enum Value {
    None,
    Path,
    Text,
    Number,
    Ids,
}

/// A value of kind `kind`: mostly plausible, sometimes odd.
fn cli_value(u: &mut Unstructured, kind: Value) -> String {
    if chance(u, 1, 4) {
        return pick(u, CLI_VALUES).to_string();
    }
    match kind {
        Value::None => String::new(),
        Value::Path => pick(
            u,
            &[
                "tests/data/olmoe-tiny",
                "m",
                "-",
                "/dev/null",
                "out.safetensors",
            ],
        )
        .to_string(),
        Value::Text => match below(u, 3) {
            0 => text(u, true),
            _ => pick(u, CLI_VALUES).to_string(),
        },
        Value::Number => match below(u, 3) {
            0 => u.arbitrary::<u64>().unwrap_or(0).to_string(),
            1 => u.arbitrary::<i64>().unwrap_or(0).to_string(),
            _ => u.arbitrary::<u8>().unwrap_or(0).to_string(),
        },
        Value::Ids => {
            let n = below(u, 8) + 1;
            let ids: Vec<String> = (0..n)
                .map(|_| match below(u, 4) {
                    0 => u.arbitrary::<i64>().unwrap_or(0).to_string(),
                    1 => pick(u, CLI_VALUES).to_string(),
                    _ => u.arbitrary::<u16>().unwrap_or(0).to_string(),
                })
                .collect();
            ids.join(",")
        }
    }
}

/// `moe` arguments, one per line: half the time a subcommand with its own flags (each given
/// once or twice, as `--flag value` or `--flag=value`), otherwise any sequence of subcommands,
/// flags and values.
fn structured_cli(u: &mut Unstructured) -> Vec<u8> {
    if chance(u, 1, 2) {
        let mut args: Vec<String> = Vec::new();
        let (command, flags) = *pick(u, SUBCOMMAND_FLAGS);
        let push = |u: &mut Unstructured, args: &mut Vec<String>, flag: &str, kind: Value| {
            let value = cli_value(u, kind);
            match (kind, chance(u, 1, 4)) {
                (Value::None, _) => args.push(flag.to_string()),
                (_, true) => args.push(format!("{flag}={value}")),
                (_, false) => {
                    args.push(flag.to_string());
                    args.push(value);
                }
            }
        };
        for &(flag, kind) in GLOBAL_FLAGS {
            if chance(u, 1, 4) {
                push(u, &mut args, flag, kind);
            }
        }
        args.push(command.to_string());
        for &(flag, kind) in flags {
            let times = match flag {
                "--model" | "--ids" | "--out" => usize::from(!chance(u, 1, 10)),
                _ => usize::from(chance(u, 1, 3)),
            } + usize::from(chance(u, 1, 20));
            for _ in 0..times {
                push(u, &mut args, flag, kind);
            }
        }
        return args.join("\n").into_bytes();
    }
    let n = below(u, 13);
    let mut args: Vec<String> = Vec::new();
    if chance(u, 4, 5) {
        args.push(pick(u, SUBCOMMANDS).to_string());
    }
    for _ in 0..n {
        let arg = match below(u, 12) {
            0 => pick(u, SUBCOMMANDS).to_string(),
            1..=4 => pick(u, FLAGS).to_string(),
            5..=7 => pick(u, CLI_VALUES).to_string(),
            8 => format!("{}={}", pick(u, FLAGS), pick(u, CLI_VALUES)),
            9 => {
                // A long id list.
                let long = chance(u, 1, 8);
                let count = u
                    .int_in_range(1..=if long { 20_000 } else { 200 })
                    .unwrap_or(1);
                let id = format!("{},", pick(u, CLI_VALUES));
                id.repeat(count) + "1"
            }
            10 => u.arbitrary::<i64>().unwrap_or(0).to_string(),
            _ => text(u, true),
        };
        args.push(arg);
    }
    args.join("\n").into_bytes()
}

fn run_cli(input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input);
    let args = std::iter::once("moe").chain(text.split('\n').filter(|_| !input.is_empty()));
    match <cli::Cli as clap::Parser>::try_parse_from(args) {
        Ok(_) => true,
        Err(error) => {
            let _ = error.kind();
            let _ = error.render().to_string();
            false
        }
    }
}

fn cli_target() -> Target {
    let mut dictionary: Vec<Vec<u8>> = Vec::new();
    for token in SUBCOMMANDS.iter().chain(FLAGS).chain(CLI_VALUES) {
        dictionary.push(format!("\n{token}").into_bytes());
        dictionary.push(token.as_bytes().to_vec());
    }
    let seeds = [
        "inspect\n--model\ntests/data/olmoe-tiny\n--json",
        "logits\n--model\ntests/data/olmoe-tiny\n--ids\n1,2,3\n--out\n-\n--top-k\n2",
        "generate\n--model\nm\n--ids\n-5,7\n--max-new-tokens\n3\n--temperature\n0.7\n--seed\n42\n--json",
        "generate\n--model\nm\n--prompt\nhi\n--prompt-file\n-",
        "bench\n--preset\nolmoe-1b-7b,qwen3-30b-a3b\n--tokens\n1,16\n--runs\n3\n--dispatch\nkernels\n--json\n--dense\n--stream",
        "--backend\nndarray\n--dtype\nbf16\n--strict\nbackends\n--json",
    ];
    Target {
        name: "cli",
        run: Box::new(run_cli),
        structured: Box::new(structured_cli),
        seeds: seeds.iter().map(|s| s.as_bytes().to_vec()).collect(),
        dictionary,
        unblock: Box::new(|| {}),
    }
}

#[test]
fn cli() {
    fuzz(cli_target());
}
