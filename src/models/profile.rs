//! Where the time goes, stage by stage, on any device: with `LOGIT_LENS_PROFILE=1` the device is
//! synchronised at each stage boundary (CUDA work is asynchronous, so host clocks otherwise
//! measure kernel launches, not the work) and each stage's wall time goes to stderr as
//! `profile: <stage> <ms> ms`. Off by default: the synchronisations cost overlap.

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;

pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LOGIT_LENS_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Runs `f` as the stage `name`, timed between device synchronisations when profiling.
pub fn stage<R>(name: &str, device: &Device, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let t = Instant::now();
    let r = f()?;
    device.synchronize()?;
    eprintln!("profile: {name} {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    Ok(r)
}
