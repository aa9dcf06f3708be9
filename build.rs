//! With the `cuda` feature: compiles the lens's GPU kernel (src/lens/row_reduce.cu) to PTX with
//! the CUDA toolkit's nvcc ($NVCC, else nvcc on PATH) for $CUDA_COMPUTE_CAP (default 90).

fn main() {
    println!("cargo:rerun-if-changed=src/lens/row_reduce.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("row_reduce.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/lens/row_reduce.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
    assert!(status.success(), "nvcc failed on src/lens/row_reduce.cu");
}
