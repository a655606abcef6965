//! Links libtorch into `drllm-data` and its tests (rpath + no-as-needed, see drllm-build).
fn main() {
    drllm_build::link_libtorch();
}
