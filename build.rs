//! With the `cuda` feature: compiles the GPU kernels (src/lens/row_reduce.cu,
//! src/models/fused/attention.cu, src/models/fused/kernels.cu, src/models/fused/flash.cu, sharing src/lens/online_max_sum.cuh) to PTX with
//! the CUDA toolkit's nvcc ($NVCC, else nvcc on PATH) for $CUDA_COMPUTE_CAP (default 90).

const KERNELS: &[(&str, &str)] = &[
    ("src/lens/row_reduce.cu", "row_reduce.ptx"),
    ("src/models/fused/attention.cu", "attention.ptx"),
    ("src/models/fused/kernels.cu", "fused.ptx"),
    ("src/models/fused/flash.cu", "flash.ptx"),
];

fn main() {
    for (src, _) in KERNELS {
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-changed=src/lens/online_max_sum.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for (src, ptx) in KERNELS {
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(out_dir.join(ptx))
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
