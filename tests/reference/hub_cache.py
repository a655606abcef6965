"""Where huggingface_hub finds a repo's snapshot in the local cache, for drllm's hub tests
(tests/hub.rs). Reads {"cases": [{"env": {...}, "repo": ..., "revision": ... or null}]} and prints,
per case, the snapshot path `snapshot_download(..., local_files_only=True)` returns (or the
error's class name). Each case runs in a fresh interpreter: huggingface_hub reads its
environment variables at import."""
import json
import os
import subprocess
import sys

CASE = """
import json, sys
from huggingface_hub import snapshot_download
repo, rev = sys.argv[1], sys.argv[2] or None
try:
    print(json.dumps({"path": snapshot_download(repo, revision=rev, local_files_only=True)}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__}))
"""

job = json.load(sys.stdin)
out = []
base = {k: v for k, v in os.environ.items()
        if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
for case in job["cases"]:
    env = {**base, **case["env"], "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CASE, case["repo"], case["revision"] or ""],
                       env=env, capture_output=True, text=True, check=True)
    out.append(json.loads(r.stdout))
json.dump(out, sys.stdout)
