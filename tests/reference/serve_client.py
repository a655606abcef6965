"""HTTP client side of drllm-serve's tests (tests/serve.rs): sends requests as the clients users
run would, and prints what came back as JSON. A JSON job on stdin:

  {"base": "http://127.0.0.1:PORT", "key": "...", "requests": [REQ, ...], "concurrent": false}
      REQ = {"method": "POST", "path": "/v1/completions", "json": {...}} (or "raw": "text" for
      a body that is not JSON; "key": "..." overrides the job's key for this request; "stream":
      true reads server-sent events). Answers: [{"status", "body" | "events", "retry_after"}].
      "hangup": true on a streamed request closes the connection after the first event
      (a client that leaves); "hangup_after": S on any request closes it after S seconds
      without an answer.
  {"base": ..., "key": ..., "openai": true}
      the official `openai` client: a completion, a chat completion, and both streamed.
  {"base": ..., "metrics": true}
      GET /metrics parsed by prometheus_client's OpenMetrics parser (the strict one):
      {"content_type", "families": {name: type}, "samples": [[name, labels, value], ...]}.
"""
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def send(base, key, req):
    data = None
    headers = {}
    if "json" in req:
        data = json.dumps(req["json"]).encode()
        headers["Content-Type"] = "application/json"
    elif "raw" in req:
        data = req["raw"].encode()
        headers["Content-Type"] = "application/json"
    k = req.get("key", key)
    if k is not None:
        headers["Authorization"] = f"Bearer {k}"
    r = urllib.request.Request(base + req["path"], data=data, headers=headers,
                               method=req.get("method", "POST" if data else "GET"))
    if "hangup_after" in req:
        try:
            with urllib.request.urlopen(r, timeout=req["hangup_after"]) as resp:
                return {"status": resp.status, "hung_up": False}
        except OSError:  # the timeout (socket.timeout, URLError around it)
            return {"status": None, "hung_up": True}
    if req.get("hangup"):
        with urllib.request.urlopen(r, timeout=600) as resp:
            first = resp.readline()
            return {"status": resp.status, "first": first.decode()}
    try:
        with urllib.request.urlopen(r, timeout=600) as resp:
            status, text, retry = resp.status, resp.read().decode(), resp.headers.get("Retry-After")
    except urllib.error.HTTPError as e:
        status, text, retry = e.code, e.read().decode(), e.headers.get("Retry-After")
    out = {"status": status, "retry_after": retry}
    if req.get("stream") and status == 200:
        events = []
        for block in text.split("\n\n"):
            if block.startswith("data: "):
                payload = block[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        out["events"] = events
    else:
        try:
            out["body"] = json.loads(text)
        except ValueError:
            out["body"] = text
    return out


def with_openai(job):
    import openai
    client = openai.OpenAI(base_url=job["base"] + "/v1", api_key=job["key"] or "none")
    model = job.get("model")
    out = {}
    c = client.completions.create(model=model, prompt=job["prompt"], max_tokens=12, temperature=0)
    out["completion"] = {"text": c.choices[0].text, "finish": c.choices[0].finish_reason,
                         "usage": c.usage.completion_tokens}
    s = client.completions.create(model=model, prompt=job["prompt"], max_tokens=12, temperature=0,
                                  stream=True)
    out["completion_stream"] = "".join(ch.choices[0].text for ch in s if ch.choices)
    msgs = [{"role": "user", "content": job["chat"]}]
    c = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    out["chat"] = {"text": c.choices[0].message.content, "role": c.choices[0].message.role,
                   "finish": c.choices[0].finish_reason}
    s = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                       stream=True)
    out["chat_stream"] = "".join((ch.choices[0].delta.content or "") for ch in s if ch.choices)
    try:
        openai.OpenAI(base_url=job["base"] + "/v1", api_key="wrong", max_retries=0) \
            .completions.create(model=model, prompt="x", max_tokens=1)
        out["wrong_key"] = "accepted"
    except openai.AuthenticationError as e:
        out["wrong_key"] = e.status_code
    return out


def metrics(job):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    with urllib.request.urlopen(job["base"] + "/metrics", timeout=60) as resp:
        ctype, text = resp.headers.get("Content-Type"), resp.read().decode()
    families, samples = {}, []
    for fam in text_string_to_metric_families(text):
        families[fam.name] = fam.type
        samples += [[s.name, s.labels, s.value] for s in fam.samples]
    return {"content_type": ctype, "families": families, "samples": samples}


def main():
    job = json.load(sys.stdin)
    if job.get("metrics"):
        print(json.dumps(metrics(job)))
        return
    if job.get("openai"):
        print(json.dumps(with_openai(job)))
        return
    reqs = job["requests"]
    if job.get("concurrent"):
        with ThreadPoolExecutor(max_workers=len(reqs)) as ex:
            out = list(ex.map(lambda r: send(job["base"], job.get("key"), r), reqs))
    else:
        out = [send(job["base"], job.get("key"), r) for r in reqs]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
