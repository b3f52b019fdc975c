//! Transparent huge pages for fresh outputs, and per-thread scratch kept between calls.
//!
//! A tensor of 32 MiB or more that torch has just allocated is a new mapping: every first write
//! to each of its 4 KiB pages faults, and the kernel zeroes the page before the write goes on,
//! about 1 µs a page on a VM, slower than the kernels themselves write (docs/ops.md has the
//! figures). Advised as transparent huge pages, the same memory faults once per 2 MiB. madvise
//! never changes the contents of memory, so advising a range is always safe; Linux ignores the
//! advice where THP is off.

use std::sync::OnceLock;

/// The size of a huge page (hpage_pmd_size: 2 MiB on x86_64), or None where there are none or
/// `FERROGRAD_HUGE_PAGES=0` turns the advice off.
fn huge_page_size() -> Option<usize> {
    static SIZE: OnceLock<Option<usize>> = OnceLock::new();
    *SIZE.get_or_init(|| {
        if std::env::var("FERROGRAD_HUGE_PAGES").is_ok_and(|v| v.trim() == "0") {
            return None;
        }
        if !cfg!(target_os = "linux") {
            return None;
        }
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|s| s.is_power_of_two())
    })
}

/// The whole huge pages inside `len` bytes at address `ptr`: (start, length), or None.
fn huge_page_range(ptr: usize, len: usize, page: usize) -> Option<(usize, usize)> {
    let start = ptr.checked_next_multiple_of(page)?;
    let end = ptr.checked_add(len)? & !(page - 1);
    (end > start).then(|| (start, end - start))
}

#[cfg(target_os = "linux")]
fn madvise_huge(start: usize, len: usize) -> bool {
    const MADV_HUGEPAGE: std::ffi::c_int = 14;
    extern "C" {
        fn madvise(
            addr: *mut std::ffi::c_void,
            len: usize,
            advice: std::ffi::c_int,
        ) -> std::ffi::c_int;
    }
    // SAFETY: MADV_HUGEPAGE only sets a flag on the mappings in the range (or fails on an
    // address that is not mapped); no memory is read, written or freed.
    unsafe { madvise(start as *mut std::ffi::c_void, len, MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn madvise_huge(_start: usize, _len: usize) -> bool {
    false
}

/// Advises the whole huge pages inside `len` bytes at `ptr` (memory about to be written for
/// the first time) as transparent huge pages. Returns whether any range was advised.
pub fn advise_huge_pages(ptr: usize, len: usize) -> bool {
    huge_page_size()
        .and_then(|page| huge_page_range(ptr, len, page))
        .is_some_and(|(start, len)| madvise_huge(start, len))
}

/// The largest scratch buffer a kernel keeps per thread between calls ([`keep`]).
const KEEP_BYTES: usize = 8 << 20;

/// A kernel's scratch of `len` elements from the thread's `slot` (what its last call handed back
/// by [`keep`]; contents unspecified, growth filled with the default). Scratch allocated per
/// call as `vec![0; n]` is calloc'd, which jemalloc serves from fresh zeroed pages: hundreds of
/// page faults a call where glibc reuses its heap. Taken out and put back rather than borrowed
/// in a closure: closures are not compiled with the caller's SIMD target features.
pub fn take<T: Clone + Default>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
) -> Vec<T> {
    let mut buf = slot.take();
    buf.resize(len, T::default());
    buf
}

/// [`take`] with every element set to `value`, as `vec![value; len]` would hand it out: for
/// scratch whose kernels may read elements the call does not write (padding, defaults).
pub fn take_filled<T: Clone>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    value: T,
) -> Vec<T> {
    let mut buf = slot.take();
    buf.clear();
    buf.resize(len, value);
    buf
}

/// Hands a kernel's scratch `buf` back to the thread's `slot` for its next call ([`take`]), or
/// frees it when larger than 8 MiB (one large call's scratch is not held for the process's
/// life).
pub fn keep<T>(slot: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>, buf: Vec<T>) {
    if buf.capacity() * std::mem::size_of::<T>() <= KEEP_BYTES {
        slot.set(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB2: usize = 2 << 20;

    #[test]
    fn range_is_the_whole_huge_pages_inside() {
        assert_eq!(huge_page_range(0, MIB2, MIB2), Some((0, MIB2)));
        assert_eq!(huge_page_range(1, MIB2, MIB2), None);
        assert_eq!(huge_page_range(100, 2 * MIB2, MIB2), Some((MIB2, MIB2)));
        assert_eq!(
            huge_page_range(MIB2 - 1, 3 * MIB2, MIB2),
            Some((MIB2, 2 * MIB2))
        );
        assert_eq!(huge_page_range(usize::MAX - 10, 100, MIB2), None);
    }

    #[test]
    fn keep_holds_small_scratch_and_frees_large() {
        thread_local! {
            static SLOT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        keep(&SLOT, vec![1; 1000]);
        assert_eq!(
            take(&SLOT, 1200)[..1001],
            [[1; 1000].as_slice(), &[0]].concat()
        );
        keep(&SLOT, vec![1; KEEP_BYTES + 1]);
        assert_eq!(SLOT.take().capacity(), 0);
    }

    #[test]
    fn advising_leaves_the_contents() {
        let mut v = vec![7u8; 3 * MIB2];
        let advised = advise_huge_pages(v.as_mut_ptr() as usize, v.len());
        assert_eq!(
            advised,
            cfg!(target_os = "linux") && huge_page_size().is_some()
        );
        assert!(v.iter().all(|&b| b == 7));
    }
}
