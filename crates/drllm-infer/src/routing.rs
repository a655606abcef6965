//! Router packages and layer paths as the user names them: a package is opened (and checked
//! against the model) before anything slow, and a `--path` is parsed before the model loads.
use anyhow::{Context, Result};
use drllm_router::{Package, Policy};
use drllm_runtime::{LayerPath, LoadedModel};

/// Parses `--path` (before the model loads, so a typo fails fast); `None` when absent.
pub fn parse_path(path: Option<&str>) -> Result<Option<LayerPath>> {
    path.map(|p| p.parse::<LayerPath>().context("--path"))
        .transpose()
}

/// The parsed `--path` checked for a model of `n_layers` blocks (default: all ones).
pub fn path_for(path: Option<LayerPath>, n_layers: usize) -> Result<LayerPath> {
    let Some(p) = path else {
        return Ok(LayerPath::all_ones(n_layers));
    };
    p.check_len(n_layers).context("--path")?;
    Ok(p)
}

/// Reads the router package `spec` (a directory, or `embedded`: the reference routers of the
/// embedded model, compiled in), before the model loads so that a bad package fails fast.
pub fn open_package(spec: &std::path::Path) -> Result<(std::path::PathBuf, Package)> {
    let dir = drllm_router::embedded::resolve(spec)
        .with_context(|| format!("--routers {}", spec.display()))?;
    let pkg = Package::load(&dir).with_context(|| format!("--routers {}", spec.display()))?;
    Ok((dir, pkg))
}

/// The routing policy of the package `spec` for `lm` at `budget`.
pub fn load_policy(lm: &LoadedModel, spec: &std::path::Path, budget: f64) -> Result<Policy> {
    let (mut v, _) = load_policies(lm, spec, open_package(spec)?, &[budget])?;
    v.pop().context("no policy")
}

/// Routing policies of the package `spec` (read by [`open_package`]) for `lm` (same model,
/// same sizes) at each of `budgets`; also its manifest.
pub fn load_policies(
    lm: &LoadedModel,
    spec: &std::path::Path,
    (dir, pkg): (std::path::PathBuf, Package),
    budgets: &[f64],
) -> Result<(Vec<Policy>, drllm_router::PackageManifest)> {
    let dir = &dir;
    let fp = lm.source.fingerprints()?;
    pkg.check_model(
        dir,
        &[&fp.current, &fp.legacy],
        lm.model.num_layers(),
        lm.model.cfg.hidden_size as usize,
    )?;
    warn_held_out(spec, &pkg.manifest, budgets);
    let routers = pkg.routers.to_device(lm.model.device());
    let policies = budgets
        .iter()
        .map(|&b| Ok(Policy::new(routers.snapshot(), pkg.manifest.windows, b)?))
        .collect::<Result<_>>()?;
    Ok((policies, pkg.manifest))
}

/// Tells the user when the package's own held-out routing (drllm-train's budget sweep on
/// training prompts it never trained on) says the requested budgets lose accuracy: routers
/// that cost accuracy must not be used unknowingly.
fn warn_held_out(dir: &std::path::Path, m: &drllm_router::PackageManifest, budgets: &[f64]) {
    let Some(baseline) = m.data["routed_val_baseline_accuracy"].as_f64() else {
        return;
    };
    match m.data["recommended_budget"].as_f64() {
        Some(rec) => {
            if let Some(b) = budgets.iter().find(|&&b| b < rec) {
                tracing::warn!(
                    "{}: on its held-out training prompts these routers kept the baseline's \
                     accuracy ({baseline:.3}) only from budget {rec:+.2}; budget {b:+.2} may lose accuracy",
                    dir.display()
                );
            }
        }
        None => tracing::warn!(
            "{}: on its held-out training prompts these routers lost accuracy against the \
             baseline ({baseline:.3}) at every budget drllm-train measured (see `drllm-train \
             inspect`); budget 1 routes every block",
            dir.display()
        ),
    }
}
