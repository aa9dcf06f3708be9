//! logit-lens: what a vision-language model "thinks" at every layer.
//!
//! Data flows one way: request → [`preprocess`] → [`engine`] (a [`models`] forward pass with the
//! [`lens`] as observer) → [`api`] response.

/// `eprintln!` that never panics: a `run` or `plot` whose stderr reader went away (`2>&1 | head`)
/// goes on with its work rather than dying at its next line of progress.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod api;
pub mod cli;
pub mod engine;
pub mod error;
pub mod lens;
pub mod models;
pub mod preprocess;
pub mod report;
pub mod server;

pub use error::{Error, Result};

/// `mi_option_purge_delay` in mimalloc.h (the same slot in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped for reuse (unless `MIMALLOC_PURGE_DELAY` says otherwise), for a binary
/// whose global allocator is mimalloc, as the `logit-lens` binary's is: a forward pass allocates
/// and frees tensors of tens to hundreds of MiB per layer, and handing them back to the OS means
/// page faults and zeroing on every reuse (up to half of a long sequence's forward time on the
/// CPU). The process keeps its peak memory instead.
/// The process's compute threads (this one, rayon's pool) flush subnormal floats to zero. Random
/// and real attention rows hold many `e^(x − max)` below 2^-126; on Intel CPUs every arithmetic
/// operation on such a value takes a microcode assist (~100× slower): LLaVA-1.5-mid's decoder
/// attention ran 1.3 s instead of 0.1 s on a Xeon (AMD's cores do not slow down). The numbers
/// change by less than 2^-126 per value. Called once at start, before any compute.
pub fn flush_subnormals() {
    models::fastmath::flush_subnormals_here();
    // rayon's global pool, with every thread flushing too; an already built pool (a second call,
    // tests) is left as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| models::fastmath::flush_subnormals_here())
        .build_global();
}

pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is a plain store in mimalloc, valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}
