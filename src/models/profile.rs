//! Where the time goes, on any device. Off by default (the synchronisations cost overlap).
//!
//! - `LOGIT_LENS_PROFILE=1`: the device is synchronised at each stage boundary (CUDA work is
//!   asynchronous, so host clocks otherwise measure kernel launches, not the work) and each
//!   stage's wall time goes to stderr as `profile: <stage> <ms> ms`.
//! - `LOGIT_LENS_PROFILE=2`: also each group of operations inside the blocks (norms, projections,
//!   rotary, attention, MLP, lens), summed over the layers of one forward pass and printed after
//!   it as `profile-op: <group> calls <n> total <ms> ms host <ms> ms`. *total* is the group's
//!   time between synchronisations; *host* is the part the CPU spent issuing it (the time until
//!   the last launch returned). host ≈ total means the GPU waited on the CPU: the group is bound
//!   by per-operation overhead, not by the kernels, and fewer, fused operations are the cure.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;

fn level() -> u8 {
    static LEVEL: OnceLock<u8> = OnceLock::new();
    // Unset or empty: 0; a number: that level; anything else (`yes`, `on`): 1.
    *LEVEL.get_or_init(|| match std::env::var("LOGIT_LENS_PROFILE") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or(1),
        _ => 0,
    })
}

pub fn enabled() -> bool {
    level() >= 1
}

fn ops_enabled() -> bool {
    level() >= 2
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

#[derive(Default)]
struct Totals {
    /// (group, calls, total seconds, host seconds), in first-seen order.
    groups: Vec<(&'static str, usize, f64, f64)>,
}

thread_local! {
    static TOTALS: RefCell<Totals> = RefCell::new(Totals::default());
}

/// Runs `f` as one call of the operation group `group` (level 2): synchronise, time the host's
/// issuing, synchronise, time the whole; summed per group until [`report_ops`].
pub fn op<R>(group: &'static str, device: &Device, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if !ops_enabled() {
        return f();
    }
    device.synchronize()?;
    let t = Instant::now();
    let r = f()?;
    let host = t.elapsed().as_secs_f64();
    device.synchronize()?;
    let total = t.elapsed().as_secs_f64();
    TOTALS.with(|c| {
        let mut c = c.borrow_mut();
        match c.groups.iter_mut().find(|g| g.0 == group) {
            Some(g) => {
                g.1 += 1;
                g.2 += total;
                g.3 += host;
            }
            None => c.groups.push((group, 1, total, host)),
        }
    });
    Ok(r)
}

/// Prints the groups timed since the last report (level 2) and clears them; returns them as
/// `(group, calls, total ms, host ms)` for tests.
pub fn report_ops() -> Vec<(&'static str, usize, f64, f64)> {
    if !ops_enabled() {
        return Vec::new();
    }
    let groups = TOTALS.with(|c| std::mem::take(&mut c.borrow_mut().groups));
    let groups: Vec<_> = groups
        .into_iter()
        .map(|(g, n, t, h)| (g, n, t * 1e3, h * 1e3))
        .collect();
    for (g, n, t, h) in &groups {
        eprintln!("profile-op: {g} calls {n} total {t:.2} ms host {h:.2} ms");
    }
    groups
}
