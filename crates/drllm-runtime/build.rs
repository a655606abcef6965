//! Links libtorch into this crate's test binaries (rpath + no-as-needed, see drllm-build).
fn main() {
    drllm_build::link_libtorch();
}
