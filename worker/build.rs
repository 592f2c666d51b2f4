//! Link libtorch so that the binaries run without any environment variables.
//!
//! * `--no-as-needed -ltorch`: `libtorch.so` pulls in `libtorch_cuda.so`; with the default
//!   `--as-needed` the linker drops it (no symbol of ours refers to it directly) and CUDA then
//!   looks absent at run time even on a GPU machine.
//! * rpath to the libtorch directory that `torch-sys` linked against (exported by its build
//!   script as `DEP_TCH_LIBTORCH_LIB`), so `sweep-worker` starts without `LD_LIBRARY_PATH`.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
