//! Links libtorch into the end-to-end test binaries (rpath + no-as-needed, see drllm-build).
fn main() {
    drllm_build::link_libtorch();
}
