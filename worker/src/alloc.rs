//! How glibc's `malloc` serves libtorch's CPU tensors in this process.
//!
//! A training step allocates and frees the same large activation and gradient buffers again
//! and again. With glibc's defaults, blocks above the (dynamic) mmap threshold are mapped fresh
//! on every allocation and unmapped on every free, and memory at the top of the heap is given
//! back to the kernel: each new buffer is then faulted in page by page and zeroed by the kernel.
//! Measured on the CPU of this project's machines, 2 threads (`docs/benchmarks.md`, "Per
//! step"): resnet50, batch 8 at 160 px, 850,000 page faults and 190 ms of forward pass per step
//! with the defaults, 300,000 and 146 ms with the settings below; vgg16_bn, batch 8 at 96 px
//! (its 400 MB classifier gradients and Adam's temporaries are all above any mmap threshold),
//! 4.3 million faults and 5 images/s, then 1.1 million and 9.6 images/s.
//!
//! [`tune`] turns mmap off for allocations (every block comes from the heap, or an arena's,
//! and is reused once freed; an allocation too large for a thread's arena is served by the
//! main heap) and stops trimming the heap (freed memory stays for the next step), unless the
//! environment already says how (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
//! `MALLOC_MMAP_MAX_`, `GLIBC_TUNABLES`), or `SWEEP_MALLOC=default` asks for glibc's own
//! behaviour. The cost: the process keeps its peak heap (a worker reaches it again every step
//! anyway), per thread that trains.

/// Blocks malloc may map on their own: none.
pub const MMAP_MAX: i32 = 0;
/// The trim threshold set: freed memory at the heap's top stays up to this much (the most
/// mallopt takes).
pub const TRIM_THRESHOLD: i32 = i32::MAX;

/// What [`tune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuned {
    /// Both settings applied.
    Applied,
    /// The environment sets malloc's behaviour itself (or `SWEEP_MALLOC=default`): left alone.
    LeftToEnvironment,
    /// glibc refused a setting (another libc, or a value out of its range).
    Refused,
}

/// Applies the settings above, once, before libtorch allocates (call it first in `main`).
pub fn tune() -> Tuned {
    let set_elsewhere = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if set_elsewhere || std::env::var("SWEEP_MALLOC").is_ok_and(|v| v == "default") {
        return Tuned::LeftToEnvironment;
    }
    // SAFETY: mallopt(3) only changes the allocator's parameters; it is called before any
    // other thread of this process allocates (the first thing `main` does).
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_MAX, MMAP_MAX) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    };
    if ok { Tuned::Applied } else { Tuned::Refused }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_settings() {
        // Here (glibc, no MALLOC_* settings in the test's environment) both apply; anywhere
        // else the environment decides, and nothing is refused.
        assert_ne!(super::tune(), super::Tuned::Refused);
    }
}
