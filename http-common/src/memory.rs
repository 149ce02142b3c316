//! Keeping an idle daemon's resident memory small on edge devices.
//!
//! glibc keeps freed heap memory mapped, so the peak of a burst of work (start-up: the config,
//! the stores, a TLS trust store parsed from the system bundle; a provisioning round) stays in an
//! idle daemon's RSS. [`release_free_heap`] returns it to the kernel afterwards
//! (docs/identityd.md has the figures).

/// Returns freed heap memory to the kernel (glibc `malloc_trim`; nothing with other C libraries).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory glibc's allocator holds free; any thread may call
    // it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn freed_heap_goes_back_to_the_kernel() {
        fn anonymous_kb() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|line| line.strip_prefix("RssAnon:"))
                .and_then(|value| value.split_whitespace().next()?.parse().ok())
                .unwrap()
        }
        // Many small blocks (below glibc's mmap threshold, so they come from the heap), touched,
        // then freed but for the last one, which keeps the heap's top from shrinking by itself.
        let blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1_u8; 4000]).collect();
        let keep = vec![2_u8; 4000];
        drop(blocks);
        let before = anonymous_kb();
        super::release_free_heap();
        let after = anonymous_kb();
        assert!(
            after + 8000 < before,
            "anonymous RSS {before} kB -> {after} kB"
        );
        assert_eq!(keep[0], 2);
    }
}
