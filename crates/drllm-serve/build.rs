//! Links libtorch into this crate's binaries and tests (rpath + no-as-needed, see drllm-build).
fn main() {
    drllm_build::link_libtorch();
}
