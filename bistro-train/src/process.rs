//! Process-wide settings of the binaries: the memory allocator and Candle's CPU threads.
//!
//! A training step allocates and frees the same large activation and gradient buffers
//! every step. With glibc's allocator (and mimalloc's defaults) those pages go back to the
//! kernel and are faulted and zeroed again on the next step, which cost about a third of a
//! `tiny` CPU step. Binaries opt in (a library never picks the allocator):
//!
//! ```ignore
//! async fn run() -> anyhow::Result<()> { Ok(()) }
//! bistro_train::node_main!(run); // mimalloc, then `block_on(run())` first thing in `main`
//! ```
//!
//! ([`block_on`] applies [`tune`] before the runtime's threads exist; a program that starts
//! its own threads calls [`tune`] first instead.) Both are `unsafe`: they set an
//! environment variable, which is only sound while the process has a single thread.

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e` of mimalloc 2.x).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's purge delay for the binaries: `-1`, never return freed memory to the kernel.
/// Measured on the `small` step (7 steps): 9,471 page faults with mimalloc's default, 8,056
/// with a 10 s delay, 1,474 with `-1`. The process keeps its peak working set, which a
/// training node needs again at the next step anyway.
pub const PURGE_DELAY_MS: i64 = -1;

/// Keep freed memory in the process (see [`PURGE_DELAY_MS`]). Harmless when mimalloc is
/// not the global allocator.
pub fn keep_freed_memory() {
    // SAFETY: sets a plain integer option of the linked mimalloc; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
}

/// Spin iterations of Candle's element-wise worker threads before they sleep, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set. Candle's default (25,000) keeps a core busy
/// spinning after every element-wise op, which on a small machine takes that core from the
/// matrix products; measured on the `small` step with 2 cores: 1.30-1.34 s -> 1.19-1.22 s.
pub const CANDLE_SPIN_LIMIT: u32 = 100;

/// Applies [`keep_freed_memory`] and [`CANDLE_SPIN_LIMIT`] (Candle reads the latter from the
/// environment variable `CANDLE_BARRIER_POOL_SPIN_LIMIT`, which this sets when unset).
///
/// # Safety
/// Sets an environment variable: call it first thing in `main`, while the process has a
/// single thread (no other thread may read or write the environment concurrently).
pub unsafe fn tune() {
    keep_freed_memory();
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: the caller guarantees the process is still single-threaded.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT.to_string()) };
    }
}

/// [`tune`], then runs `fut` to completion on a new multi-threaded tokio runtime: the `main`
/// of an async binary, with the settings applied before any runtime thread starts.
///
/// # Safety
/// As for [`tune`]: call it first thing in `main`, before any other thread exists.
pub unsafe fn block_on<F: std::future::Future>(fut: F) -> std::io::Result<F::Output> {
    // SAFETY: forwarded to the caller.
    unsafe { tune() };
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(fut))
}

/// The `main` of a node binary: mimalloc as the global allocator, then [`block_on`] of the
/// named `async fn() -> anyhow::Result<()>` first thing in `main`, which is what makes the
/// `unsafe` sound. An error is printed with its causes and exits with
/// [`crate::cli::exit_code`]: 78 for a configuration error, else 1. The calling crate
/// depends on `anyhow`.
///
/// ```ignore
/// async fn run() -> anyhow::Result<()> { Ok(()) }
/// bistro_train::node_main!(run);
/// ```
#[macro_export]
macro_rules! node_main {
    ($run:ident) => {
        #[global_allocator]
        static ALLOC: $crate::process::MiMalloc = $crate::process::MiMalloc;

        fn main() -> std::process::ExitCode {
            // SAFETY: first thing in `main`, before any other thread exists.
            let result: anyhow::Result<()> = match unsafe { $crate::process::block_on($run()) } {
                Ok(r) => r,
                Err(e) => Err(anyhow::Error::from(e)),
            };
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("Error: {e:?}");
                    std::process::ExitCode::from($crate::cli::exit_code(&e) as u8)
                }
            }
        }
    };
}
