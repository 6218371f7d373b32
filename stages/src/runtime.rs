//! Process-wide settings that make candle's CPU training fast.

/// Keep freed buffers in the heap instead of returning them to the OS.
///
/// candle allocates a fresh buffer for every op's result; with glibc's defaults every buffer
/// above the (dynamic) mmap threshold is a fresh mmap, so each training step page-faults
/// millions of times and spends >10% of its time zeroing pages in the kernel (profile in
/// ../shared/notes/reference.md). Serving allocations up to 32 MiB (glibc's maximum threshold)
/// from the heap, and never trimming it, lets those buffers be reused. This is the `mallopt`
/// form of `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=…:glibc.malloc.trim_threshold=…`.
///
/// One arena for all threads: a stage runs on a worker thread, and glibc gives such a thread
/// its own arena, a chain of 64 MiB mmap'd heaps that it shrinks as soon as memory is freed,
/// whatever the trim threshold. The packed trainer frees and reallocates its activation
/// buffers every step, so in its own arena each step page-faulted them back in: `goemo run`
/// trained at 40 examples/s where the same code on the main thread (goemo-bench) ran at 87,
/// with most CPU time in the kernel; with one arena `goemo run` trains at 90 (README,
/// "Performance"). The lock is cheap here: few, large allocations.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
