//! `drllm-serve` as clients use it, over HTTP on loopback with the embedded model: greedy
//! completions equal the runtime's own generation (unrouted, and routed by the embedded routers),
//! concurrent requests equal the same requests sent alone (requests join and leave the running
//! batch; 64 clients at once), echo log-probabilities equal lm-evaluation-harness's definition computed with
//! transformers, streaming equals the plain response, the official `openai` client works, and
//! bad requests get OpenAI-shaped 4xx errors without disturbing the others.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;
use drllm::runtime::tch::{Device, Kind, Tensor};
use drllm::runtime::{
    GenerateOptions, GenerateRequest, LayerPath, LoadedModel, ModelSource, Paths,
};
use drllm::tasks::{data, LoadOptions, Question, Split, TaskName};
use serde_json::{json, Value};

const KEY: &str = "test-key";

struct Server {
    child: Child,
    base: String,
    /// The server's log so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(bin("drllm-serve"))
            .args(["--port", "0", "--threads", "2"])
            .args(args)
            .env_remove("DRLLM_API_KEY")
            // The engine's debug lines say how prompts were prefilled.
            .env("DRLLM_LOG", "info,drllm_serve::engine=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("drllm-serve exited before serving")
                .unwrap();
            if let Some(rest) = line.split("on http://").nth(1) {
                let addr = rest.split('/').next().unwrap();
                break format!("http://{addr}");
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let kept = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(l);
            }
        });
        Server { child, base, log }
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Sends `signal` and waits at most `within` for the exit.
    fn signal_and_wait(
        &mut self,
        signal: &str,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args([signal, &pid]).status().unwrap();
        let t = std::time::Instant::now();
        while t.elapsed() < within {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Runs tests/reference/serve_client.py on `job` against the server at `base`.
fn client(base: &str, mut job: Value) -> Value {
    job["base"] = base.into();
    run_script("serve_client.py", &job)
}

fn model() -> LoadedModel {
    LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap()
}

/// "Question: ...\nAnswer:" prompts of real ARC rows.
fn questions(n: usize) -> Vec<String> {
    data::load(
        &data_dir(),
        TaskName::ArcEasy,
        Split::Dev,
        &LoadOptions {
            limit: Some(n),
            ..Default::default()
        },
    )
    .unwrap()
    .samples
    .iter()
    .map(|s| match &s.question {
        Question::MultipleChoice { stem, .. } => format!("Question: {stem}\nAnswer:"),
        Question::Problem(p) => p.clone(),
    })
    .collect()
}

fn completion(prompt: Value, max_tokens: usize, extra: Value) -> Value {
    let mut body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    json!({"path": "/v1/completions", "json": body})
}

fn texts(answers: &Value) -> Vec<String> {
    answers
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["status"], 200, "{a}");
            a["body"]["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn greedy_completions_equal_the_runtime_alone_and_in_a_crowd() {
    let lm = model();
    let n = lm.model.num_layers();
    let prompts: Vec<Vec<u32>> = questions(6)
        .iter()
        .map(|q| lm.tokenizer.encode(q, true).unwrap())
        .collect();
    let max = [12usize, 3, 20, 7, 12, 1];
    let server = Server::start(&["--api-key", KEY, "--max-batch", "16"]);
    // The runtime's greedy generation of each prompt alone.
    let want: Vec<String> = prompts
        .iter()
        .zip(max)
        .map(|(p, m)| {
            let paths = [LayerPath::all_ones(n)];
            let opts = GenerateOptions {
                max_new_tokens: m,
                stop_ids: lm.stop_ids(),
            };
            let g = lm
                .model
                .generate(GenerateRequest::new(
                    std::slice::from_ref(p),
                    Paths::Fixed(&paths),
                    opts,
                ))
                .unwrap();
            lm.tokenizer.decode(&g.outputs[0].tokens).unwrap()
        })
        .collect();
    let reqs: Vec<Value> = prompts
        .iter()
        .zip(max)
        .map(|(p, m)| completion(json!(p), m, json!({})))
        .collect();
    let alone = client(&server.base, json!({"key": KEY, "requests": reqs}));
    assert_eq!(texts(&alone), want, "one at a time vs the runtime");
    let body = &alone[0]["body"];
    assert_eq!(body["object"], "text_completion");
    let ext = &body["choices"][0]["drllm"];
    assert_eq!(ext["cost"], n);
    assert_eq!(ext["path"], LayerPath::all_ones(n).to_string());
    // 64 clients at once, more than --max-batch: they queue, join the running batch at step
    // boundaries and leave it when done; each answer is the one it got alone.
    let crowd: Vec<Value> = (0..64).map(|i| reqs[i % reqs.len()].clone()).collect();
    let got = client(
        &server.base,
        json!({"key": KEY, "requests": crowd, "concurrent": true}),
    );
    let got = texts(&got);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &want[i % want.len()], "concurrent request {i}");
    }
    // Text prompts are tokenized with the tokenizer's special tokens, as the runtime does.
    let q = questions(1).remove(0);
    let as_text = client(
        &server.base,
        json!({"key": KEY, "requests": [completion(json!(q), 12, json!({}))]}),
    );
    assert_eq!(texts(&as_text)[0], want[0]);
    // Streaming gives the same text, in deltas, then [DONE].
    let streamed = client(
        &server.base,
        json!({"key": KEY, "requests": [{"path": "/v1/completions", "stream": true,
            "json": {"prompt": prompts[2], "max_tokens": 20, "temperature": 0, "stream": true}}]}),
    );
    let events = streamed[0]["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let joined: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(joined, want[2]);
    assert!(events.len() > 3, "{events:?}");
    // The official client: completions and chat, plain and streamed; a wrong key is a 401.
    let o = client(
        &server.base,
        json!({"key": KEY, "openai": true, "prompt": q, "chat": "Which gas do plants take in?"}),
    );
    assert_eq!(o["completion"]["text"], want[0].as_str());
    assert_eq!(o["completion_stream"], want[0].as_str());
    assert_eq!(o["chat"]["role"], "assistant");
    assert!(!o["chat"]["text"].as_str().unwrap().is_empty(), "{o}");
    assert_eq!(o["chat_stream"], o["chat"]["text"]);
    assert_eq!(o["wrong_key"], 401);
    // SIGTERM: a request in flight is answered, then the server exits cleanly.
    let base = server.base.clone();
    let long = std::thread::spawn(move || {
        client(
            &base,
            json!({"key": KEY, "requests": [completion(json!(prompts[0]), 200, json!({}))]}),
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let status = server.stop();
    let answered = long.join().unwrap();
    assert_eq!(answered[0]["status"], 200, "{answered}");
    assert!(status.success(), "{status}");
}

#[test]
fn echo_logprobs_are_lm_evals_loglikelihoods_and_routing_is_per_request() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = data::load(
        &data_dir(),
        TaskName::ArcEasy,
        Split::Dev,
        &LoadOptions {
            limit: Some(3),
            ..Default::default()
        },
    )
    .unwrap()
    .samples
    .iter()
    .map(|s| match &s.question {
        Question::MultipleChoice { stem, choices, .. } => json!({"question": stem,
            "choices": choices.iter().map(|c| c.text.clone()).collect::<Vec<_>>()}),
        Question::Problem(_) => unreachable!("ARC is multiple choice"),
    })
    .collect();
    let (reference, _) = reference(
        json!({"job": "cloze", "gguf": embedded_gguf(), "rows": rows, "paths": [null]}),
        tmp.path(),
    );
    let server = Server::start(&[
        "--routers",
        "embedded",
        "--budget",
        "-0.3",
        "--served-model-name",
        "routed",
    ]);
    // lm-eval's loglikelihood request: context + continuation ids, one token generated, echo.
    for entry in reference.as_array().unwrap() {
        let ctx: Vec<u64> = serde_json::from_value(entry["context_ids"].clone()).unwrap();
        let conts: Vec<Vec<u64>> =
            serde_json::from_value(entry["continuation_ids"].clone()).unwrap();
        let prompts: Vec<Vec<u64>> = conts
            .iter()
            .map(|c| ctx.iter().chain(c).copied().collect())
            .collect();
        let req = json!({"path": "/v1/completions", "json": {"model": "routed",
            "drllm": {"routers": false}, "prompt": prompts, "max_tokens": 1, "echo": true,
            "logprobs": 1, "temperature": 0, "seed": 1234}});
        let got = client(&server.base, json!({"requests": [req.clone()]}));
        assert_eq!(got[0]["status"], 200, "{got}");
        let choices = got[0]["body"]["choices"].as_array().unwrap();
        // Sent together the choices share the question's prefill (the shared-prefix path);
        // alone each takes the plain path: every position's log-probability agrees.
        let alone: Vec<Value> = prompts
            .iter()
            .map(|p| {
                let mut r = req.clone();
                r["json"]["prompt"] = json!(p);
                r
            })
            .collect();
        let alone = client(&server.base, json!({"requests": alone}));
        for (i, a) in alone.as_array().unwrap().iter().enumerate() {
            let together = choices.iter().find(|x| x["index"] == i).unwrap();
            let (x, y) = (
                together["logprobs"]["token_logprobs"].as_array().unwrap(),
                a["body"]["choices"][0]["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap(),
            );
            assert_eq!(x.len(), y.len());
            for (p, (u, v)) in x.iter().zip(y).enumerate() {
                match (u.as_f64(), v.as_f64()) {
                    (Some(u), Some(v)) => assert!(
                        (u - v).abs() < 1e-4,
                        "choice {i} position {p}: shared {u} vs alone {v}"
                    ),
                    (u, v) => assert_eq!(u, v, "choice {i} position {p}"),
                }
            }
            assert_eq!(
                together["logprobs"]["tokens"],
                a["body"]["choices"][0]["logprobs"]["tokens"]
            );
        }
        for (i, ((c, p), want)) in conts
            .iter()
            .zip(&prompts)
            .zip(entry["paths"][0]["logliks"].as_array().unwrap())
            .enumerate()
        {
            let choice = choices.iter().find(|x| x["index"] == i).unwrap();
            let lp = choice["logprobs"]["token_logprobs"].as_array().unwrap();
            assert_eq!(lp.len(), p.len() + 1, "prompt tokens + the generated one");
            assert!(lp[0].is_null());
            let ll: f64 = lp[ctx.len()..lp.len() - 1]
                .iter()
                .map(|x| x.as_f64().unwrap())
                .sum();
            let want = want.as_f64().unwrap();
            assert!(
                (ll - want).abs() < 2e-3,
                "choice {i}: server {ll} vs transformers {want}"
            );
            assert_eq!(c.len(), lp.len() - 1 - ctx.len());
            // lm-eval's is_greedy reads the top-1 alternative at each position.
            let tops = choice["logprobs"]["top_logprobs"].as_array().unwrap();
            assert!(tops[0].is_null() && tops[1].as_object().unwrap().len() == 1);
        }
    }
    // The choices of a question share its tokens: prefilled and scored once for all of them.
    assert!(server.log_has("scored with shared prefixes"));

    // Routing per request: the embedded routers at the default budget, at another one, and
    // off; each routed greedy answer equals the runtime's routed generation of that prompt.
    let lm = model();
    let n = lm.model.num_layers();
    let pkg_dir = drllm_router::embedded::resolve(std::path::Path::new("embedded")).unwrap();
    let pkg = drllm_router::Package::load(&pkg_dir).unwrap();
    let q: Vec<Vec<u32>> = questions(4)
        .iter()
        .map(|q| lm.tokenizer.encode(q, true).unwrap())
        .collect();
    for (model, budget) in [("routed", -0.3), ("routed@-0.6", -0.6)] {
        let policy = drllm_router::Policy::new(
            pkg.routers.to_device(Device::Cpu),
            pkg.manifest.windows,
            budget,
        )
        .unwrap();
        let reqs: Vec<Value> = q
            .iter()
            .map(|p| completion(json!(p), 10, json!({"model": model})))
            .collect();
        let got = client(&server.base, json!({"requests": reqs, "concurrent": true}));
        for (p, g) in q.iter().zip(got.as_array().unwrap()) {
            let lens = [p.len()];
            let mut route = |l: usize, h: &Tensor| policy.decide(l, h, &lens);
            let opts = GenerateOptions {
                max_new_tokens: 10,
                stop_ids: lm.stop_ids(),
            };
            let want = lm
                .model
                .generate(GenerateRequest::new(
                    std::slice::from_ref(p),
                    Paths::Routed(&mut route),
                    opts,
                ))
                .unwrap();
            assert_eq!(g["status"], 200, "{g}");
            let choice = &g["body"]["choices"][0];
            assert_eq!(
                choice["text"].as_str().unwrap(),
                lm.tokenizer.decode(&want.outputs[0].tokens).unwrap(),
                "{model}"
            );
            assert_eq!(
                choice["drllm"]["path"],
                want.paths[0].to_string(),
                "{model}"
            );
            assert_eq!(choice["drllm"]["cost"], want.paths[0].cost());
            assert_eq!(choice["drllm"]["budget"], budget);
            assert!(want.paths[0].cost() < n, "{model}: the routers skip blocks");
        }
    }
    let listed = client(
        &server.base,
        json!({"requests": [{"method": "GET", "path": "/v1/models"}]}),
    );
    let ids: Vec<&str> = listed[0]["body"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["routed", "routed@-0.3", "routed@none"]);
}

#[test]
fn bad_requests_get_openai_errors_and_a_full_queue_gets_503() {
    let server = Server::start(&["--max-batch", "1", "--max-queue", "1"]);
    let c = |body: Value| json!({"path": "/v1/completions", "json": body});
    let cases = vec![
        (
            json!({"path": "/v1/completions", "raw": "{not json"}),
            400,
            Value::Null,
        ),
        (
            c(json!({"prompt": "x", "max_tokens": "5"})),
            400,
            json!("max_tokens"),
        ),
        (c(json!({"prompt": []})), 400, json!("prompt")),
        (c(json!({"prompt": [[]]})), 400, json!("prompt")),
        (c(json!({"prompt": [1, 99999999]})), 400, json!("prompt")),
        (
            c(json!({"prompt": "x", "max_tokens": 100000})),
            400,
            json!("max_tokens"),
        ),
        (
            c(json!({"prompt": "x", "max_tokens": u64::MAX})),
            400,
            json!("max_tokens"),
        ),
        (
            c(json!({"prompt": vec![1; 8193], "max_tokens": 1})),
            400,
            json!("prompt"),
        ),
        (
            c(json!({"prompt": "x", "stop": vec!["a"; 40]})),
            400,
            json!("stop"),
        ),
        (
            c(json!({"prompt": "x", "model": "gpt-4"})),
            404,
            json!("model"),
        ),
        (
            c(json!({"prompt": "x", "model": "routed@-0.3"})),
            404,
            json!("model"),
        ),
        (
            c(json!({"prompt": "x", "temperature": 7})),
            400,
            json!("temperature"),
        ),
        (c(json!({"prompt": "x", "n": 2})), 400, json!("n")),
        (
            json!({"path": "/v1/chat/completions", "json": {"messages": "hi"}}),
            400,
            json!("messages"),
        ),
        (
            json!({"method": "GET", "path": "/v2/nothing"}),
            404,
            Value::Null,
        ),
    ];
    let reqs: Vec<Value> = cases.iter().map(|c| c.0.clone()).collect();
    let got = client(&server.base, json!({"requests": reqs}));
    for ((req, status, param), g) in cases.iter().zip(got.as_array().unwrap()) {
        assert_eq!(&g["status"], status, "{req} -> {g}");
        let err = &g["body"]["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{g}"
        );
        assert!(err["type"].is_string(), "{g}");
        assert_eq!(&err["param"], param, "{req} -> {g}");
    }
    // The tokenizer endpoints lm-eval's remote tokenizer uses.
    let info = client(
        &server.base,
        json!({"requests": [
            {"method": "GET", "path": "/tokenizer_info"},
            {"path": "/tokenize", "json": {"prompt": "Hello world", "add_special_tokens": false}},
            {"path": "/detokenize", "json": {"tokens": [19556, 905]}},
            {"method": "GET", "path": "/health"},
        ]}),
    );
    let eos = info[0]["body"]["eos_token"].as_str().unwrap().to_string();
    assert!(!eos.is_empty(), "{info}");
    let toks = info[1]["body"]["tokens"].as_array().unwrap();
    assert!(!toks.is_empty());
    assert!(info[2]["body"]["prompt"].is_string(), "{info}");
    assert_eq!(info[3]["status"], 200);
    let eos_ids = client(
        &server.base,
        json!({"requests": [{"path": "/tokenize", "json": {"prompt": eos, "add_special_tokens": false}}]}),
    );
    assert_eq!(
        eos_ids[0]["body"]["tokens"].as_array().unwrap().len(),
        1,
        "a special token's text is that token: {eos_ids}"
    );
    // One row decoding and one waiting: the rest of a burst is refused with Retry-After, and
    // the refusals do not disturb the requests that were taken.
    let burst: Vec<Value> = (0..12)
        .map(|_| c(json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0})))
        .collect();
    let got = client(&server.base, json!({"requests": burst, "concurrent": true}));
    let got = got.as_array().unwrap();
    let busy: Vec<&Value> = got.iter().filter(|g| g["status"] == 503).collect();
    let ok: Vec<&Value> = got.iter().filter(|g| g["status"] == 200).collect();
    assert_eq!(busy.len() + ok.len(), 12, "{got:?}");
    assert!(!busy.is_empty() && !ok.is_empty(), "{got:?}");
    assert_eq!(busy[0]["retry_after"], "1");
    let first = &ok[0]["body"]["choices"][0]["text"];
    assert!(ok.iter().all(|g| &g["body"]["choices"][0]["text"] == first));
    // Loopback only without a key; an empty key is no key.
    let (ok, _, err) = outcome(Command::new(bin("drllm-serve")).args(["--host", "0.0.0.0"]));
    assert!(!ok && err.contains("--api-key"), "{err}");
    let (ok, _, err) = outcome(Command::new(bin("drllm-serve")).args(["--api-key", ""]));
    assert!(!ok && err.contains("empty"), "{err}");
}

/// A long greedy completion: counting, which the model keeps up for hundreds of tokens.
fn counting(max_tokens: usize) -> Value {
    completion(
        json!("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"),
        max_tokens,
        json!({}),
    )
}

#[test]
fn the_server_is_bounded_under_abuse_and_observable() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let mut server = Server::start(&[
        "--max-connections",
        "6",
        "--header-timeout",
        "1",
        "--drain-timeout",
        "2",
        "--body-timeout",
        "1",
        "--write-timeout",
        "2",
    ]);
    // Idle connections fill the cap; the header timeout closes them, so /health answers again
    // within seconds, and the cap was logged.
    let addr = server.base.trim_start_matches("http://").to_string();
    let idle: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let health = client(
        &server.base,
        json!({"requests": [{"method": "GET", "path": "/health"}]}),
    );
    assert_eq!(health[0]["status"], 200, "{health}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![];
        c.read_to_end(&mut buf)
            .expect("an idle connection is closed by the header timeout");
    }
    assert!(server.log_has("connection cap reached"));
    // A body that stops arriving after its headers: 408 in OpenAI's shape, then the connection
    // is free again.
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"prompt\"",
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).expect("an answer before the read timeout");
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("request_timeout"), "{text}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    // Errors axum makes itself, and requests this server refuses, in OpenAI's shape.
    let c = |body: Value| json!({"path": "/v1/completions", "json": body});
    let chat = |body: Value| json!({"path": "/v1/chat/completions", "json": body});
    let cases = [
        (
            json!({"method": "GET", "path": "/v1/completions"}),
            405,
            Value::Null,
            "method_not_allowed",
        ),
        (
            json!({"path": "/v1/completions", "raw": "x".repeat(3 << 20)}),
            413,
            Value::Null,
            "request_too_large",
        ),
        // Longer than the context can hold whatever it says: refused before tokenizing.
        (
            c(json!({"prompt": "word ".repeat(200_000), "max_tokens": 1})),
            400,
            json!("prompt"),
            "",
        ),
        // Tokenized, then over the context.
        (
            c(json!({"prompt": "word ".repeat(12_000), "max_tokens": 1})),
            400,
            json!("prompt"),
            "",
        ),
        (
            chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            json!("messages"),
            "",
        ),
        (
            chat(json!({"messages": [{"role": "user"}]})),
            400,
            json!("messages"),
            "",
        ),
        (
            chat(
                json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true,
                "top_logprobs": 1000}),
            ),
            400,
            json!("top_logprobs"),
            "",
        ),
    ];
    let reqs: Vec<Value> = cases.iter().map(|c| c.0.clone()).collect();
    let got = client(&server.base, json!({"requests": reqs}));
    for ((req, status, param, code), g) in cases.iter().zip(got.as_array().unwrap()) {
        let req = req.to_string();
        let req = &req[..req.len().min(120)];
        assert_eq!(&g["status"], status, "{req} -> {g}");
        let err = &g["body"]["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{g}"
        );
        assert_eq!(&err["param"], param, "{req} -> {g}");
        if !code.is_empty() {
            assert_eq!(err["code"], *code, "{req} -> {g}");
        }
    }
    let too_long = got[2]["body"]["error"]["message"].as_str().unwrap();
    assert!(too_long.contains("bytes"), "{too_long}");
    // Answers and a client that leaves mid-stream, as /metrics and /drllm/stats count them.
    let reqs: Vec<Value> = [3usize, 5, 8].iter().map(|&m| counting(m)).collect();
    let answered = client(&server.base, json!({"requests": reqs}));
    let generated: u64 = answered
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["body"]["usage"]["completion_tokens"].as_u64().unwrap())
        .sum();
    let mut hangup = counting(4000);
    hangup["stream"] = json!(true);
    hangup["hangup"] = json!(true);
    hangup["json"]["stream"] = json!(true);
    let left = client(&server.base, json!({"requests": [hangup]}));
    assert_eq!(left[0]["status"], 200, "{left}");
    let t = Instant::now();
    let cancelled = loop {
        let st = client(
            &server.base,
            json!({"requests": [{"method": "GET", "path": "/drllm/stats"}]}),
        );
        let n = st[0]["body"]["cancelled"].as_u64().unwrap();
        if n >= 1 || t.elapsed() > Duration::from_secs(60) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(cancelled, 1, "the client that left is counted once");
    let m = client(&server.base, json!({"metrics": true}));
    assert!(
        m["content_type"]
            .as_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{m}"
    );
    for (family, kind) in [
        ("drllm_requests", "counter"),
        ("drllm_requests_waiting", "gauge"),
        ("drllm_requests_running", "gauge"),
        ("drllm_prompt_tokens", "counter"),
        ("drllm_generation_tokens", "counter"),
        ("drllm_time_to_first_token_seconds", "histogram"),
        ("drllm_time_per_output_token_seconds", "histogram"),
        ("drllm_request_duration_seconds", "histogram"),
        ("drllm_requests_cancelled", "counter"),
        ("drllm_routing_cost_blocks", "histogram"),
    ] {
        assert_eq!(m["families"][family], kind, "{family}: {}", m["families"]);
    }
    let sample = |name: &str, labels: Value| -> f64 {
        m["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == name && (labels.is_null() || s[1] == labels))
            .unwrap_or_else(|| panic!("no {name} {labels} in {m}"))[2]
            .as_f64()
            .unwrap()
    };
    assert_eq!(
        sample("drllm_generation_tokens_total", Value::Null),
        generated as f64
    );
    assert_eq!(sample("drllm_routing_cost_blocks_count", Value::Null), 3.0);
    assert_eq!(sample("drllm_routing_cost_blocks_sum", Value::Null), 90.0);
    assert_eq!(
        sample("drllm_time_to_first_token_seconds_count", Value::Null),
        3.0
    );
    assert_eq!(sample("drllm_requests_cancelled_total", Value::Null), 1.0);
    assert_eq!(sample("drllm_requests_running", Value::Null), 0.0, "idle");
    // The three answers, the stream that was left, and the refused chat and completions.
    assert_eq!(
        sample(
            "drllm_requests_total",
            json!({"route": "/v1/completions", "status": "200"})
        ),
        4.0
    );
    assert_eq!(
        sample(
            "drllm_requests_total",
            json!({"route": "/v1/chat/completions", "status": "400"})
        ),
        3.0
    );
    assert!(
        server.log_has("drllm_serve::access"),
        "an access line per request"
    );
    assert!(server.log_has("status=413"));
    // Streamed chunks carry the log-probabilities the plain answer has (echo included), in
    // pieces: completions and chat.
    let mut plain = counting(12);
    plain["json"]["logprobs"] = json!(2);
    plain["json"]["echo"] = json!(true);
    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    streamed["json"]["stream"] = json!(true);
    let msgs = json!([{"role": "user", "content": "Count to ten."}]);
    let chat_plain = chat(json!({"messages": msgs, "max_tokens": 8, "temperature": 0,
        "logprobs": true, "top_logprobs": 2}));
    let mut chat_streamed = chat_plain.clone();
    chat_streamed["stream"] = json!(true);
    chat_streamed["json"]["stream"] = json!(true);
    let got = client(
        &server.base,
        json!({"requests": [plain, streamed, chat_plain, chat_streamed]}),
    );
    let want = &got[0]["body"]["choices"][0]["logprobs"];
    let events = got[1]["events"].as_array().unwrap();
    let mut joined =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for e in events.iter().filter(|e| e.is_object()) {
        let lp = &e["choices"][0]["logprobs"];
        if lp.is_null() {
            continue;
        }
        for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let more = lp[k].as_array().unwrap().clone();
            joined[k].as_array_mut().unwrap().extend(more);
        }
    }
    assert!(want["tokens"].as_array().unwrap().len() > 12, "{want}");
    assert_eq!(&joined, want, "streamed vs plain completion logprobs");
    let want = &got[2]["body"]["choices"][0]["logprobs"]["content"];
    let joined: Vec<Value> = got[3]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.is_object())
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(
        &Value::from(joined),
        want,
        "streamed vs plain chat logprobs"
    );
    // Cancellations are the clients' alone. A request the full queue refuses leaves the jobs
    // it had queued, which are not cancellations: 1,000 prompts against a queue of 256 (the
    // model thread cannot drain the difference while they are queued).
    let cancelled_now = || -> u64 {
        let st = client(
            &server.base,
            json!({"requests": [{"method": "GET", "path": "/drllm/stats"}]}),
        );
        st[0]["body"]["cancelled"].as_u64().unwrap()
    };
    let wait_cancelled = |want: u64, what: &str| {
        let t = Instant::now();
        loop {
            let n = cancelled_now();
            if n == want {
                return;
            }
            assert!(n < want, "{what}: {n} cancelled, want {want}");
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "{what}: {n} cancelled, want {want}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let before = cancelled_now();
    let many = completion(json!(vec!["1, 2, 3,"; 1000]), 2, json!({}));
    let got = client(&server.base, json!({"requests": [many]}));
    assert_eq!(got[0]["status"], 503, "{got}");
    assert_eq!(got[0]["body"]["error"]["code"], "overloaded", "{got}");
    // The queue is first in, first out: once a later request is answered, the refused
    // request's jobs have been passed over (until then the queue may still be full of them).
    let t = Instant::now();
    loop {
        let after = client(&server.base, json!({"requests": [counting(2)]}));
        if after[0]["status"] == 200 {
            break;
        }
        assert_eq!(after[0]["body"]["error"]["code"], "overloaded", "{after}");
        assert!(t.elapsed() < Duration::from_secs(120), "{after}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        cancelled_now(),
        before,
        "a refused request is not a cancellation"
    );
    // A client that leaves a plain (not streamed) request ends its generation, counted once.
    let mut left = counting(4000);
    left["hangup_after"] = json!(2);
    let got = client(&server.base, json!({"requests": [left]}));
    assert_eq!(got[0]["hung_up"], true, "{got}");
    wait_cancelled(before + 1, "a plain request left");
    // A client that stops reading its event stream: the write timeout closes the connection
    // and cancels its 16 prompts (their echoed log-probabilities are about 8 MB, more than
    // Linux's default socket buffers hold: at most 4 MB to send, and the 128 KB a reader that
    // reads nothing starts with), and /health answers meanwhile.
    {
        use std::io::Write;
        let body = json!({"prompt": vec!["word ".repeat(1200); 16], "max_tokens": 1000,
            "echo": true, "logprobs": 20, "stream": true, "temperature": 0})
        .to_string();
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let t = Instant::now();
        while !server.log_has("made no progress for --write-timeout") {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "a stalled reader was never closed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let health = client(
            &server.base,
            json!({"requests": [{"method": "GET", "path": "/health"}]}),
        );
        assert_eq!(health[0]["status"], 200, "{health}");
        wait_cancelled(before + 17, "a stalled reader");
        drop(c);
    }
    // SIGTERM with a request that outlives the drain deadline: it gets 503, the server exits.
    let base = server.base.clone();
    let long = std::thread::spawn(move || client(&base, json!({"requests": [counting(4000)]})));
    std::thread::sleep(Duration::from_millis(1500));
    let exit = server.signal_and_wait("-TERM", Duration::from_secs(20));
    let answered = long.join().unwrap();
    assert_eq!(answered[0]["status"], 503, "{answered}");
    assert_eq!(
        answered[0]["body"]["error"]["code"], "unavailable",
        "{answered}"
    );
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    assert!(server.log_has("drain deadline passed"));
    // A second signal exits at once, whatever is in flight.
    let mut server = Server::start(&["--drain-timeout", "600"]);
    let base = server.base.clone();
    let long = std::thread::spawn(move || client(&base, json!({"requests": [counting(4000)]})));
    std::thread::sleep(Duration::from_millis(1500));
    let pid = server.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let exit = server.signal_and_wait("-TERM", Duration::from_secs(10));
    assert_eq!(exit.and_then(|s| s.code()), Some(130), "{exit:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let _ = long.join();
}

/// Writes the local lm-eval task YAMLs (tests/reference/lm_eval/) with the data directory.
fn lm_eval_tasks(dir: &std::path::Path) {
    let data = std::fs::canonicalize(data_dir()).unwrap();
    for name in ["arc_easy_drllm.yaml", "gsm8k_drllm.yaml"] {
        let text = std::fs::read_to_string(root().join("tests/reference/lm_eval").join(name))
            .unwrap()
            .replace("${DATA}", data.to_str().unwrap());
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// Runs tests/reference/lm_eval_compare.py on `job`.
fn lm_eval(job: Value) -> Value {
    run_script("lm_eval_compare.py", &job)
}

/// lm-evaluation-harness evaluates the server unchanged (`local-completions`, remote
/// tokenizer): on ARC-Easy dev (a local task over ../shared/data) the all-execute server's
/// per-choice log-likelihoods and accuracy equal lm-eval's own transformers backend (`HFLM`) on
/// the same weights; the routed server is evaluated the same way, its cost read from
/// `/drllm/stats`; a generative GSM8K task with stop strings gives the same continuations.
#[test]
fn lm_eval_evaluates_the_server_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    lm_eval_tasks(tmp.path());
    let server = Server::start(&[
        "--routers",
        "embedded",
        "--budget",
        "-0.3",
        "--served-model-name",
        "routed",
    ]);
    let base = server.base.clone();
    let arc = lm_eval(json!({
        "gguf": embedded_gguf(), "tasks_dir": tmp.path(), "task": "arc_easy_drllm",
        "limit": 40, "batch_size": 8, "hf": true,
        "servers": {"all-execute": {"base": base, "model": "routed@none"},
                    "routed": {"base": base, "model": "routed"}},
    }));
    let (ours, hf) = (&arc["all-execute"], &arc["hf"]);
    assert_eq!(
        ours["metrics"]["acc,none"], hf["metrics"]["acc,none"],
        "{arc}"
    );
    assert_eq!(
        ours["metrics"]["acc_norm,none"],
        hf["metrics"]["acc_norm,none"]
    );
    let (mut worst, mut n) = (0f64, 0);
    for (doc, s) in hf["samples"].as_object().unwrap() {
        let want: Vec<f64> = serde_json::from_value(s["lls"].clone()).unwrap();
        let got: Vec<f64> = serde_json::from_value(ours["samples"][doc]["lls"].clone()).unwrap();
        assert_eq!(got.len(), want.len(), "doc {doc}");
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
            n += 1;
        }
    }
    assert!(n >= 150, "{n} choices");
    assert!(worst < 1e-3, "max |log-likelihood difference| {worst}");
    let stats = client(
        &server.base,
        json!({"requests": [{"method": "GET", "path": "/drllm/stats"}]}),
    );
    let routes = &stats[0]["body"]["routes"];
    let routed = &routes["budget -0.3"];
    assert_eq!(routed["prompts"], routes["all-execute"]["prompts"]);
    assert!(routed["mean_cost"].as_f64().unwrap() < 30.0, "{routes}");
    assert_eq!(routes["all-execute"]["mean_cost"], 30.0);
    eprintln!(
        "lm-eval arc_easy_drllm (40 dev docs): transformers acc {}, server all-execute acc {} \
         (max |ll diff| {worst:.2e} over {n} choices, wall {:.1}s vs hf {:.1}s), routed at -0.3 \
         acc {} at mean cost {:.2} of 30 blocks",
        hf["metrics"]["acc,none"],
        ours["metrics"]["acc,none"],
        ours["wall_s"].as_f64().unwrap(),
        hf["wall_s"].as_f64().unwrap(),
        arc["routed"]["metrics"]["acc,none"],
        routed["mean_cost"].as_f64().unwrap(),
    );

    let gsm = lm_eval(json!({
        "gguf": embedded_gguf(), "tasks_dir": tmp.path(), "task": "gsm8k_drllm",
        "limit": 8, "batch_size": 8, "hf": true,
        "servers": {"all-execute": {"base": base, "model": "routed@none"}},
    }));
    let (ours, hf) = (&gsm["all-execute"]["samples"], &gsm["hf"]["samples"]);
    let same = hf
        .as_object()
        .unwrap()
        .iter()
        .filter(|(doc, s)| ours[doc.as_str()]["text"] == s["text"])
        .count();
    // Greedy continuations of up to 64 tokens; f32 rounding may flip a near-tie.
    assert!(same >= 7, "{same}/8 identical continuations: {gsm}");
    for s in ours.as_object().unwrap().values() {
        let text = s["text"].as_str().unwrap();
        assert!(
            !text.contains("Question:"),
            "a stop string was not cut: {text:?}"
        );
    }
}
