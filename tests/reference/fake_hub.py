"""A Hugging Face hub on loopback for drllm's download tests (tests/hub.rs): serves the two
routes a model download uses, as huggingface.co answers them, from a JSON description read on
stdin: {"repos": {"org/name": {"refs": {"main": COMMIT, "v1": COMMIT}, "files": {NAME: PATH}}},
"token": optional bearer token every request must carry}.

  GET /api/models/{repo}/revision/{rev}   -> {"id", "sha", "siblings": [{"rfilename"}]}
  GET /api/models/{repo}/tree/{rev}       -> [{"type": "file", "path", "size", "oid", "lfs"}]
                                             (the listing newer huggingface_hub clients read)
  GET|HEAD /{repo}/resolve/{rev}/{file}   -> the bytes, honouring Range, with the headers the
                                             clients read (ETag = sha256 of the file, as for LFS
                                             files; X-Repo-Commit; Content-Range on 206)

Prints {"port": N} once listening, then one JSON line per request on stderr (method, path,
status), so the test can count what was fetched. Runs until killed."""
import hashlib
import http.server
import json
import os
import re
import sys
import threading
import urllib.parse

# Requests are answered on several threads; one line per request needs one writer at a time
# (print from two threads can interleave two records on one line).
LOG = threading.Lock()

JOB = json.load(sys.stdin)
SHA = {}


def etag(path):
    if path not in SHA:
        with open(path, "rb") as f:
            SHA[path] = hashlib.sha256(f.read()).hexdigest()
    return SHA[path]


def commit_of(repo, rev):
    r = JOB["repos"].get(repo)
    if r is None:
        return None, None
    if rev in r["refs"]:
        return r, r["refs"][rev]
    if rev in r["refs"].values():
        return r, rev
    return r, None


class Hub(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        line = json.dumps({"method": self.command, "path": self.path, "status": status}) + "\n"
        with LOG:
            sys.stderr.write(line)
            sys.stderr.flush()

    def error(self, status, code, msg):
        self.answer(status, json.dumps({"error": msg}).encode(),
                    [("Content-Type", "application/json"), ("X-Error-Code", code)])

    def do_GET(self):
        token = JOB.get("token")
        if token and self.headers.get("Authorization") != f"Bearer {token}":
            return self.error(401, "GatedRepo", "Access to this repo is restricted")
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            repo, commit = commit_of(m[1], m[2])
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found")
            if commit is None:
                return self.error(404, "RevisionNotFound", "Invalid rev id")
            body = {"id": m[1], "sha": commit,
                    "siblings": [{"rfilename": f} for f in sorted(repo["files"])]}
            return self.answer(200, json.dumps(body).encode(),
                               [("Content-Type", "application/json")])
        # Newer huggingface_hub clients list a snapshot's files through the tree route.
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/(.+)", path)
        if m:
            repo, commit = commit_of(m[1], m[2])
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found")
            if commit is None:
                return self.error(404, "RevisionNotFound", "Invalid rev id")
            entries = []
            for name, file in sorted(repo["files"].items()):
                size = os.path.getsize(file)
                entries.append({"type": "file", "path": name, "size": size, "oid": etag(file)[:40],
                                "lfs": {"oid": etag(file), "size": size, "pointerSize": 134}})
            return self.answer(200, json.dumps(entries).encode(),
                               [("Content-Type", "application/json")])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/(.+?)/([^/]+)", path)
        if m:
            repo, commit = commit_of(m[1], m[2])
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found")
            if commit is None:
                return self.error(404, "RevisionNotFound", "Invalid rev id")
            if m[3] not in repo["files"]:
                return self.error(404, "EntryNotFound", "Entry not found")
            file = repo["files"][m[3]]
            with open(file, "rb") as f:
                data = f.read()
            headers = [("ETag", f'"{etag(file)}"'), ("X-Repo-Commit", commit),
                       ("Accept-Ranges", "bytes")]
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if rng:
                start = int(rng[1])
                end = int(rng[2]) if rng[2] else len(data) - 1
                end = min(end, len(data) - 1)
                headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
                return self.answer(206, data[start:end + 1], headers)
            return self.answer(200, data, headers)
        self.error(404, "NotFound", "no such route")

    # huggingface_hub asks for a file's metadata with HEAD: the same answer without the body.
    do_HEAD = do_GET


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
print(json.dumps({"port": server.server_address[1]}), flush=True)
server.serve_forever()
