//! Running parallel parts on torch's own OpenMP thread team.
//!
//! torch's CPU ops run on an OpenMP team (libgomp in the pip wheels) whose idle threads spin for
//! a while after each op. A second pool of our own then fights them for the cores: measured on
//! 2 cores, a 0.8 ms W4 GEMV took 1.8 ms right after a torch matmul. When the process has an
//! OpenMP runtime loaded (found in /proc/self/maps, never loaded by us), [`parallel`] hands the
//! parts to that runtime's `GOMP_parallel` instead, so the spinning threads do our work.
//!
//! [`torch_threads`] reads torch's thread count, which ferrograd's kernels follow
//! (rust/threads.rs).

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

/// The entry points of a loaded OpenMP runtime, the process that found them (a forked child
/// must not use the parent's team), and whether its team may run our parts
/// (`FERROGRAD_NO_OPENMP` unset).
struct Runtime {
    parallel: GompParallel,
    thread_num: OmpInt,
    num_threads: OmpInt,
    max_threads: OmpInt,
    pid: u32,
    team: bool,
}

static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();

/// The path of a mapped library whose file name `is_it` accepts.
fn mapped(is_it: impl Fn(&str) -> bool) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| is_it(path.rsplit('/').next().unwrap_or("")))
        .map(str::to_owned)
}

/// The named symbols of a library this process has already loaded (never loads one itself).
#[cfg(target_os = "linux")]
fn symbols<const N: usize>(path: String, names: [&str; N]) -> Option<[*mut c_void; N]> {
    let path = CString::new(path).ok()?;
    // SAFETY: RTLD_NOLOAD only returns a handle to a library that is already loaded.
    let handle = unsafe { dlopen(path.as_ptr(), RTLD_NOW | RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    let mut found = [std::ptr::null_mut(); N];
    for (slot, name) in found.iter_mut().zip(names) {
        let name = CString::new(name).ok()?;
        // SAFETY: a lookup in a live handle.
        *slot = unsafe { dlsym(handle, name.as_ptr()) };
        if slot.is_null() {
            return None;
        }
    }
    Some(found)
}

#[cfg(target_os = "linux")]
fn load() -> Option<Runtime> {
    // libgomp, or libiomp5, which also exports the GOMP ABI.
    let path = mapped(|name| {
        (name.starts_with("libgomp") || name.starts_with("libiomp5")) && name.contains(".so")
    })?;
    let names = [
        "GOMP_parallel",
        "omp_get_thread_num",
        "omp_get_num_threads",
        "omp_get_max_threads",
    ];
    let [parallel, thread_num, num_threads, max_threads] = symbols(path, names)?;
    // SAFETY: the documented libgomp ABI, with these signatures.
    unsafe {
        Some(Runtime {
            parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
            thread_num: std::mem::transmute::<*mut c_void, OmpInt>(thread_num),
            num_threads: std::mem::transmute::<*mut c_void, OmpInt>(num_threads),
            max_threads: std::mem::transmute::<*mut c_void, OmpInt>(max_threads),
            pid: crate::threads::process_id(),
            team: std::env::var_os("FERROGRAD_NO_OPENMP").is_none(),
        })
    }
}

#[cfg(not(target_os = "linux"))]
fn load() -> Option<Runtime> {
    None
}

fn loaded() -> Option<&'static Runtime> {
    RUNTIME.get_or_init(load).as_ref()
}

/// The runtime whose team runs our parts: loaded, allowed, and found in this process.
fn runtime() -> Option<&'static Runtime> {
    loaded().filter(|r| r.team && r.pid == crate::threads::process_id())
}

/// torch's C call `int32_t torch_get_num_threads(uint32_t *out)` (its stable ABI, torch 2.10
/// on): `torch.get_num_threads()` itself, which also applies torch's count to a thread that
/// has not run a torch op yet.
type TorchCount = unsafe extern "C" fn(*mut u32) -> i32;

#[cfg(target_os = "linux")]
fn load_torch_count() -> Option<TorchCount> {
    let path = mapped(|name| name.starts_with("libtorch_cpu.") && name.contains(".so"))?;
    let [count] = symbols(path, ["torch_get_num_threads"])?;
    // SAFETY: the signature torch's stable C header declares.
    Some(unsafe { std::mem::transmute::<*mut c_void, TorchCount>(count) })
}

#[cfg(not(target_os = "linux"))]
fn load_torch_count() -> Option<TorchCount> {
    None
}

/// torch's thread count for the calling thread (what `torch.get_num_threads()` returns),
/// where this process has torch loaded: by torch's own C call, else (torch before 2.10) from
/// the OpenMP runtime, which holds it (there, a thread that has not run a torch op yet holds
/// the runtime's default: `OMP_NUM_THREADS`, else the CPUs). A forked child reads it too
/// (DataLoader workers set it to 1).
pub fn torch_threads() -> Option<usize> {
    static TORCH_COUNT: OnceLock<Option<TorchCount>> = OnceLock::new();
    let mut n = 0u32;
    let count = match TORCH_COUNT.get_or_init(load_torch_count) {
        // SAFETY: writes one u32; 0 means success.
        Some(count) if unsafe { count(&mut n) } == 0 => n as i64,
        // SAFETY: omp_get_max_threads only reads the calling thread's settings.
        _ => unsafe { (loaded()?.max_threads)() }.into(),
    };
    Some(
        usize::try_from(count)
            .unwrap_or(1)
            .clamp(1, crate::threads::MAX_THREADS),
    )
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
