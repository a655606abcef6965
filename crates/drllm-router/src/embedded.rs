//! The reference routers of the embedded model (SmolLM2-135M-Instruct), made by the reference
//! run in docs/benchmarks.md and kept in the repository (`routers/smollm2-135m-instruct/`). They
//! are compiled into the binaries, so `--routers embedded` works on a fresh clone and wherever a
//! binary is copied, without searching or training first.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::package::PackageError;

const MANIFEST: &str = include_str!("../../../routers/smollm2-135m-instruct/manifest.json");
const TENSORS: &[u8] = include_bytes!("../../../routers/smollm2-135m-instruct/routers.safetensors");

/// The name that selects the embedded routers where a package directory is expected.
pub const EMBEDDED_ROUTERS: &str = "embedded";

/// A directory holding the embedded package, written once per process (libtorch reads
/// safetensors from files) and removed when the process ends.
pub fn embedded_package_dir() -> Result<PathBuf, PackageError> {
    static DIR: OnceLock<Result<tempfile::TempDir, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix("drllm-embedded-routers-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        std::fs::write(d.path().join("manifest.json"), MANIFEST).map_err(|e| e.to_string())?;
        std::fs::write(d.path().join("routers.safetensors"), TENSORS).map_err(|e| e.to_string())?;
        Ok(d)
    });
    match dir {
        Ok(d) => Ok(d.path().to_path_buf()),
        Err(msg) => Err(PackageError::Io {
            path: std::env::temp_dir(),
            source: std::io::Error::other(format!("writing the embedded router package: {msg}")),
        }),
    }
}

/// The package directory `spec` names: `embedded`, or a path.
pub fn resolve(spec: &Path) -> Result<PathBuf, PackageError> {
    if spec.as_os_str() == EMBEDDED_ROUTERS {
        embedded_package_dir()
    } else {
        Ok(spec.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_routers_load_and_fit_the_embedded_model() {
        let dir = resolve(Path::new(EMBEDDED_ROUTERS)).unwrap();
        let p = crate::Package::load(&dir).unwrap();
        let s = p.manifest.shape;
        assert_eq!((s.num_layers, s.hidden_size), (30, 576));
        assert_eq!(p.manifest.model_name, "SmolLM2-135M-Instruct.Q4_1");
        assert!(p.manifest.prompts.is_some());
        // A path is left as it is.
        assert_eq!(resolve(Path::new("pkg")).unwrap(), PathBuf::from("pkg"));
    }
}
