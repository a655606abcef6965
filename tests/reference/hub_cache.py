"""Where huggingface_hub finds (or puts) a repo's snapshot in the local cache, for drllm's hub
tests (tests/hub.rs). Reads {"cases": [{"env": {...}, "repo": ..., "revision": ... or null,
"download": optional list of file patterns}]} and prints, per case, the snapshot path
`snapshot_download` returns (or the error's class name): offline with `local_files_only=True`,
or, for a case with "download", fetching those files from the hub its env names (HF_ENDPOINT).
Each case runs in a fresh interpreter: huggingface_hub reads its environment variables at
import."""
import json
import os
import subprocess
import sys

CASE = """
import json, sys
from huggingface_hub import snapshot_download
repo, rev, patterns = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
try:
    if patterns is None:
        path = snapshot_download(repo, revision=rev, local_files_only=True)
    else:
        path = snapshot_download(repo, revision=rev, allow_patterns=patterns)
    print(json.dumps({"path": path}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__}))
"""

job = json.load(sys.stdin)
out = []
base = {k: v for k, v in os.environ.items()
        if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME",
                     "HF_ENDPOINT", "HF_TOKEN")}
for case in job["cases"]:
    online = case.get("download") is not None
    env = {**base, **case["env"], "HF_HUB_OFFLINE": "0" if online else "1",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    r = subprocess.run([sys.executable, "-c", CASE, case["repo"], case["revision"] or "",
                        json.dumps(case.get("download"))],
                       env=env, capture_output=True, text=True, check=True)
    out.append(json.loads(r.stdout))
json.dump(out, sys.stdout)
