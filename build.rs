//! With the `cuda` feature: compiles the GPU kernels (src/lens/row_reduce.cu,
//! src/models/fused/attention.cu, src/models/fused/kernels.cu, src/models/fused/flash.cu, sharing src/lens/online_max_sum.cuh) to PTX with
//! the CUDA toolkit's nvcc ($NVCC, else nvcc on PATH) for $CUDA_COMPUTE_CAP (default 90).
//! With `cudnn` too: the cuDNN attention shim (src/models/fused/cudnn_sdpa.cpp) with the host C++
//! compiler, against the cuDNN frontend's headers ($CUDNN_FRONTEND_INCLUDE), cuDNN's
//! ($CUDNN_INCLUDE) and the CUDA runtime's ($CUDA_HOME/include); see bench/gpu/cudnn-headers.sh.

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
    #[cfg(feature = "cudnn")]
    cudnn_shim();
}

#[cfg(feature = "cudnn")]
fn cudnn_shim() {
    const SHIM: &str = "src/models/fused/cudnn_sdpa.cpp";
    println!("cargo:rerun-if-changed={SHIM}");
    let dir = |var: &str| -> std::path::PathBuf {
        println!("cargo:rerun-if-env-changed={var}");
        std::env::var_os(var).map(Into::into).unwrap_or_else(|| {
            panic!("the cudnn feature needs ${var} (run `source bench/gpu/cudnn-headers.sh` first)")
        })
    };
    let cuda = dir("CUDA_HOME").join("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        .include(dir("CUDNN_FRONTEND_INCLUDE"))
        .include(dir("CUDNN_INCLUDE"))
        .include(cuda)
        .warnings(false)
        .file(SHIM)
        .compile("logit_lens_cudnn_sdpa");
    println!("cargo:rustc-link-lib=dl");
}
