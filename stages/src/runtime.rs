//! Process-wide settings that make training fast: the memory allocator.
//!
//! Every goemo binary (and test binary) allocates with mimalloc. With glibc's malloc a
//! training step was slowed twice over. First, buffers above glibc's mmap threshold were fresh
//! mmaps, page-faulted and zeroed by the kernel on every step (>10% of a profile). Second, a
//! stage runs on a worker thread, and glibc gives such a thread its own arena: a chain of
//! 64 MiB heaps that it unmaps as soon as they empty, whatever the trim settings, so the
//! packed trainer's per-step activation buffers were faulted back in every step: `goemo run`
//! trained at 40 examples/s where the same code on the main thread (goemo-bench) ran at 87.
//! Forcing one arena fixed training (90) but serialised the tokenizer's many small allocations
//! across threads (2 threads slower than 1). mimalloc keeps freed memory in thread-local
//! pages for reuse and scales across threads; with purging off (below) neither slowdown
//! happens (README, "Benchmarks").

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `enum mi_option_e` (the one right after
/// `mi_option_eager_commit_delay` = 14, which libmimalloc-sys names; it names no constant for
/// this one). Pinned by Cargo.lock; `purge_is_off` checks the value took.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed memory back to the OS: by default mimalloc decommits it after 10 ms, and
/// a training step frees and reallocates its activation buffers every few hundred ms, so each
/// step faulted them in again (goemo-bench train minilm: 80 examples/s with the default, 88
/// with purging off; the process's footprint stays the peak it reached, as with glibc).
/// Call first thing in `main`.
pub fn tune_allocator() {
    // SAFETY: mi_option_set only stores an option value; any thread may call it.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_is_off() {
        super::tune_allocator();
        // SAFETY: reads an option value.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, -1);
        // The option next to it is not touched (`use_numa_nodes`, default 0).
        let numa =
            unsafe { libmimalloc_sys::mi_option_get(libmimalloc_sys::mi_option_use_numa_nodes) };
        assert_eq!(numa, 0);
    }
}
