//! Build-script helper shared by every crate that builds a binary or test linking libtorch.
//!
//! Two problems are solved here, once:
//! - binaries must find `libtorch.so` without `LD_LIBRARY_PATH`: we add an rpath to libtorch's
//!   lib directory;
//! - the linker's `--as-needed` default drops `libtorch.so` (and with it `libtorch_cuda.so`)
//!   because no symbol is referenced directly, so CUDA is silently unavailable at run time
//!   (tch-rs issue 980): we force `-Wl,--no-as-needed -ltorch`.
//!
//! The calling crate must depend on `torch-sys` directly, since cargo only hands
//! `DEP_TCH_LIBTORCH_LIB` to direct dependents of the `links = "tch"` package.
#![warn(missing_docs)]

/// Emits the link arguments; call from `build.rs`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-L{lib}");
            println!("cargo:rustc-link-arg=-ltorch");
            let cuda = std::path::Path::new(&lib).join("libtorch_cuda.so");
            if cuda.exists() {
                println!("cargo:rustc-link-arg=-ltorch_cuda");
            }
        }
        Err(_) => println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: add torch-sys as a direct dependency"
        ),
    }
}
