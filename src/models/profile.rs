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

/// For every module's `gpu_tests` (run on a card by bench/gpu/device.sh).
#[cfg(all(test, feature = "cuda"))]
pub(crate) mod on_a_card {
    use candle_core::{Device, Tensor};

    /// The first CUDA device, or None (and a line saying the test is skipped) without one.
    pub fn gpu() -> Option<Device> {
        let gpu = Device::new_cuda(0).ok();
        if gpu.is_none() {
            eprintln!("no CUDA device: skipped");
        }
        gpu
    }

    /// `f` called `n` times after as many warm-up calls (at most 50): µs per call the host spent
    /// issuing it, and µs per call until the device finished.
    pub fn per_call(device: &Device, n: usize, f: &dyn Fn() -> Tensor) -> (f64, f64) {
        for _ in 0..n.min(50) {
            f();
        }
        device.synchronize().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        let host = t0.elapsed().as_secs_f64();
        device.synchronize().unwrap();
        let total = t0.elapsed().as_secs_f64();
        (host / n as f64 * 1e6, total / n as f64 * 1e6)
    }
}

/// On a card (run by bench/gpu/device.sh; printed, not asserted): what one candle operation costs
/// the host to issue and the card to run, for the kinds the half-precision forward pass is made of.
/// Where the host's µs per operation exceed the device's, a forward pass of ~2000–3700 of them is
/// bound by issuing, whatever the kernels do (`LOGIT_LENS_PROFILE=2` shows it per group).
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::on_a_card::{gpu, per_call};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn candle_operation_overhead_on_the_gpu() {
        let Some(gpu) = gpu() else { return };
        let Device::Cuda(cuda) = &gpu else {
            unreachable!()
        };
        // One decoder row block of Qwen2-VL-2B: 418 positions × 1536, bf16.
        let x = Tensor::randn(0f32, 1.0, (418, 1536), &gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, 1536, &gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let wt = Tensor::randn(0f32, 0.02, (1536, 1536), &gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ops: [(&str, &dyn Fn() -> Tensor); 5] = [
            ("unary (silu), contiguous", &|| x.silu().unwrap()),
            ("binary (add), contiguous", &|| (&x + &x).unwrap()),
            ("binary, broadcast (strided: dims uploaded)", &|| {
                x.broadcast_mul(&w).unwrap()
            }),
            ("cast bf16 → f32", &|| x.to_dtype(DType::F32).unwrap()),
            ("matmul [418, 1536]·[1536, 1536]", &|| {
                x.matmul(&wt).unwrap()
            }),
        ];
        let time = |f: &dyn Fn() -> Tensor| per_call(&gpu, 2000, f);
        for (name, f) in ops {
            let (host, total) = time(f);
            eprintln!("candle op {name}: host {host:.1} µs, host + device {total:.1} µs per op");
        }
        // candle 0.11's parameter cache for CUDA graphs: a strided operation's dims and strides
        // uploaded once per distinct layout instead of once per call (never evicted, so not used
        // by the service; measured to know what it would save).
        let _cache = cuda.enable_cuda_graph_htod_cache();
        let (host, total) = time(&|| x.broadcast_mul(&w).unwrap());
        eprintln!(
            "candle op binary, broadcast, dims cached: host {host:.1} µs, host + device {total:.1} µs per op"
        );
        // The same operations, alternating, on a device as `parse_device` makes it: outputs
        // without cudarc's two CUDA events each (models/mod.rs, `no_event_tracking`).
        let quiet = crate::models::parse_device("cuda").unwrap();
        let (xq, wtq) = (x.to_device(&quiet).unwrap(), wt.to_device(&quiet).unwrap());
        type Op<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Tensor;
        let ops: [(&str, Op); 3] = [
            ("unary (silu)", &|x, _| x.silu().unwrap()),
            ("binary (add)", &|x, _| (x + x).unwrap()),
            ("matmul [418, 1536]·[1536, 1536]", &|x, wt| {
                x.matmul(wt).unwrap()
            }),
        ];
        for (name, f) in ops {
            for round in 0..2 {
                let (h1, t1) = per_call(&gpu, 2000, &|| f(&x, &wt));
                let (h0, t0) = per_call(&quiet, 2000, &|| f(&xq, &wtq));
                eprintln!(
                    "candle op {name} (round {round}): host / host + device µs per op, with events \
                     {h1:.1} / {t1:.1}, without {h0:.1} / {t0:.1}"
                );
            }
        }
    }
}
