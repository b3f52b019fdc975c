//! Running parallel parts on torch's own OpenMP thread team.
//!
//! torch's CPU ops run on an OpenMP team (libgomp in the pip wheels) whose idle threads spin for
//! a while after each op. A second pool of our own then fights them for the cores: measured on
//! 2 cores, a 0.8 ms W4 GEMV took 1.8 ms right after a torch matmul. When the process has an
//! OpenMP runtime loaded (found in /proc/self/maps, never loaded by us), [`parallel`] hands the
//! parts to that runtime's `GOMP_parallel` instead, so the spinning threads do our work.

use std::any::Any;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type OmpInt = unsafe extern "C" fn() -> c_int;

#[cfg(target_os = "linux")]
#[link(name = "dl")]
extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

const RTLD_NOW: c_int = 2;
const RTLD_NOLOAD: c_int = 4;

/// The entry points of a loaded OpenMP runtime, and the process that found them (a forked
/// child must not use the parent's team).
struct Runtime {
    parallel: GompParallel,
    thread_num: OmpInt,
    num_threads: OmpInt,
    pid: u32,
}

static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();

/// The path of a mapped libgomp or libiomp5 (which also exports the GOMP ABI).
fn mapped_runtime() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            let name = path.rsplit('/').next().unwrap_or("");
            (name.starts_with("libgomp") || name.starts_with("libiomp5")) && name.contains(".so")
        })
        .map(str::to_owned)
}

#[cfg(target_os = "linux")]
fn load() -> Option<Runtime> {
    if std::env::var_os("FERROGRAD_NO_OPENMP").is_some() {
        return None;
    }
    let path = CString::new(mapped_runtime()?).ok()?;
    // SAFETY: RTLD_NOLOAD only returns a handle to a library that is already loaded; the
    // symbols are the documented libgomp ABI with these signatures.
    unsafe {
        let handle = dlopen(path.as_ptr(), RTLD_NOW | RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let symbol = |name: &str| {
            let name = CString::new(name).expect("symbol name");
            let p = dlsym(handle, name.as_ptr());
            (!p.is_null()).then_some(p)
        };
        Some(Runtime {
            parallel: std::mem::transmute::<*mut c_void, GompParallel>(symbol("GOMP_parallel")?),
            thread_num: std::mem::transmute::<*mut c_void, OmpInt>(symbol("omp_get_thread_num")?),
            num_threads: std::mem::transmute::<*mut c_void, OmpInt>(symbol("omp_get_num_threads")?),
            pid: crate::threads::process_id(),
        })
    }
}

#[cfg(not(target_os = "linux"))]
fn load() -> Option<Runtime> {
    None
}

fn runtime() -> Option<&'static Runtime> {
    RUNTIME
        .get_or_init(load)
        .as_ref()
        .filter(|r| r.pid == crate::threads::process_id())
}

/// Whether [`parallel`] will use an OpenMP team in this process.
pub fn available() -> bool {
    runtime().is_some()
}

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    runtime: &'a Runtime,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

extern "C" fn run_team_member(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `parallel` keeps alive until GOMP_parallel returns.
    let job = unsafe { &*(data as *const Job<'_>) };
    let (me, team) = unsafe { ((job.runtime.thread_num)(), (job.runtime.num_threads)()) };
    let (me, team) = (me.max(0) as usize, team.max(1) as usize);
    // A smaller team than asked for (nested regions) still covers every part.
    for part in (me..job.parts).step_by(team) {
        // A panic must not unwind through C frames: keep it and re-raise on the caller.
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (job.f)(part))) {
            let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(payload);
            return;
        }
    }
}

/// Runs `f(part)` for every part in 0..parts on the OpenMP team (the caller is member 0);
/// returns false, running nothing, when no OpenMP runtime is usable.
pub fn parallel(parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let Some(runtime) = runtime() else {
        return false;
    };
    let job = Job {
        f,
        parts,
        runtime,
        panic: Mutex::new(None),
    };
    // SAFETY: GOMP_parallel runs `run_team_member` on every team member and returns after all
    // of them finished, so `job` outlives every use of the pointer.
    unsafe {
        (runtime.parallel)(
            run_team_member,
            &job as *const Job<'_> as *mut c_void,
            parts as c_uint,
            0,
        )
    };
    if let Some(payload) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(payload);
    }
    true
}
