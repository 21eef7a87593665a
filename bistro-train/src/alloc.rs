//! The memory allocator the binaries use: mimalloc, told to keep freed memory for a while.
//!
//! A training step allocates and frees the same large activation and gradient buffers
//! every step. With glibc's allocator (and mimalloc's defaults) those pages go back to the
//! kernel and are faulted and zeroed again on the next step, which cost about a third of a
//! `tiny` CPU step. Binaries opt in (a library never picks the allocator):
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: bistro_train::alloc::MiMalloc = bistro_train::alloc::MiMalloc;
//! fn main() { bistro_train::alloc::keep_freed_memory(); /* ... */ }
//! ```

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
