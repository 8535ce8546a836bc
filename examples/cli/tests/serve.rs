//! `mesh serve` over raw HTTP/1.1 on loopback: the APIs' error shapes on bad
//! input, bounded bodies and header time, the bearer key, the queue (503
//! past it), a disconnecting client's session freed, graceful shutdown.
//! (The official OpenAI and Ollama clients are driven by
//! scripts/http-tests.sh.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A `mesh serve` process; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Server {
    let model = common::model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args([
            "serve",
            "--model",
            &model,
            "--name",
            "default",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--threads", "1"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mesh serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let url = v["listening"].as_str().unwrap();
    Server {
        child,
        addr: url.trim_start_matches("http://").to_owned(),
    }
}

/// One request with `Connection: close`; returns status, headers and body.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}

fn post_json(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, body) = request(
        addr,
        "POST",
        path,
        &["Content-Type: application/json"],
        body.to_string().as_bytes(),
    );
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{status}: {:?}: {e}", String::from_utf8_lossy(&body)));
    (status, v)
}

fn status(addr: &str) -> Value {
    let (code, _, body) = request(addr, "GET", "/mesh/v1/status", &[], b"");
    assert_eq!(code, 200);
    serde_json::from_slice(&body).unwrap()
}

/// The text of an SSE completions stream (`data:` events up to `[DONE]`).
fn sse_text(body: &[u8]) -> (String, bool) {
    let mut text = String::new();
    let mut done = false;
    for line in String::from_utf8_lossy(body).lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    (text, done)
}

const STORY: &str = "Once upon a time, in a small village,";

fn story(max_tokens: u32, stream: bool) -> Value {
    json!({"model": "default", "prompt": STORY, "max_tokens": max_tokens,
           "temperature": 0, "stream": stream})
}

#[test]
fn bad_input_gets_the_apis_error_shapes() {
    let s = serve(&["--max-body", "200000"]);
    let a = &s.addr;
    let chat = "/v1/chat/completions";
    let openai_error = |status: u16, body: &[u8], want: u16| -> Value {
        assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
        let v: Value = serde_json::from_slice(body).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        v
    };
    // Malformed JSON, wrong types, not an object, invalid UTF-8.
    for body in [
        &b"{not json"[..],
        br#"{"model": "default", "messages": "hi"}"#,
        br#"{"model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
        br#"{"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}"#,
        b"[1, 2]",
        b"{\"model\": \"default\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}",
        b"",
    ] {
        let (st, _, b) = request(a, "POST", chat, &[], body);
        openai_error(st, &b, 400);
    }
    // Unknown model: 404 with OpenAI's code; Ollama's shape on /api.
    let (st, v) = post_json(
        a,
        chat,
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (st, v) = post_json(
        a,
        "/api/chat",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(st, 404);
    assert!(v["error"].as_str().unwrap().contains("gpt-9"), "{v}");
    let (st, _, b) = request(a, "POST", "/api/generate", &[], b"{\"model\": 5}");
    assert_eq!(st, 400);
    assert!(serde_json::from_slice::<Value>(&b).unwrap()["error"].is_string());
    // A prompt longer than the context: 400, context_length_exceeded.
    let long = "hello ".repeat(9000);
    let (st, v) = post_json(
        a,
        chat,
        &json!({"model": "default", "messages": [{"role": "user", "content": long}]}),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );
    // Over the body limit: 413 before the body is read.
    let mut conn = TcpStream::connect(a).unwrap();
    write!(
        conn,
        "POST {chat} HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = conn.read_to_end(&mut raw);
    let (st, _, b) = parse_response(&raw);
    openai_error(st, &b, 413);
    // Unsupported features are refused, not ignored.
    let (st, v) = post_json(
        a,
        chat,
        &json!({"model": "default", "n": 3, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("n")));
    // A JSON schema with a keyword the automaton does not enforce is
    // refused by name; one without its schema too.
    let (st, v) = post_json(
        a,
        "/api/generate",
        &json!({"model": "default", "prompt": "hi", "format": {"type": "object",
                "properties": {"a": {"type": "string", "pattern": "^x"}}}}),
    );
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("\"pattern\""), "{v}");
    let (st, v) = post_json(
        a,
        chat,
        &json!({"model": "default", "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
    );
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("schema"),
        "{v}"
    );
    // Structured output: the object the schema asks for.
    let (st, v) = post_json(
        a,
        "/api/generate",
        &json!({"model": "default", "stream": false,
                "format": {"type": "object", "properties": {
                    "name": {"type": "string"}, "age": {"type": "integer"},
                    "indoor": {"type": "boolean"}}, "required": ["name", "age", "indoor"]},
                "prompt": "Describe a cat as JSON with the keys name and age.",
                "options": {"temperature": 0, "num_predict": 256}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["done_reason"], "stop", "{v}");
    let obj: Value = serde_json::from_str(v["response"].as_str().unwrap()).unwrap();
    assert!(
        obj["name"].is_string() && obj["age"].is_i64() && obj["indoor"].is_boolean(),
        "{v}"
    );
    assert_eq!(obj.as_object().unwrap().len(), 3, "{v}");
    // JSON mode: one JSON object, ended when it closes.
    let (st, v) = post_json(
        a,
        "/api/generate",
        &json!({"model": "default", "stream": false, "format": "json",
                "prompt": "Describe a cat as JSON with the keys name and age.",
                "options": {"temperature": 0, "num_predict": 256}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["done_reason"], "stop", "{v}");
    let obj: serde_json::Value = serde_json::from_str(v["response"].as_str().unwrap()).unwrap();
    assert!(obj.is_object(), "{v}");
    let (st, v) = post_json(
        a,
        chat,
        &json!({"model": "default", "temperature": 0, "max_tokens": 256,
                "response_format": {"type": "json_object"},
                "messages": [{"role": "user", "content": "Describe a cat as JSON with the keys name and age."}]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let obj: serde_json::Value = serde_json::from_str(content).unwrap();
    assert!(obj.is_object(), "{v}");
    // Unknown route.
    let (st, _, b) = request(a, "GET", "/v1/nothing", &[], b"");
    openai_error(st, &b, 404);
    // A huge max_tokens is capped by the context: the answer ends normally.
    let (st, v) = post_json(
        a,
        chat,
        &json!({"model": "default", "max_tokens": u32::MAX, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{v}"
    );
    // The server is still healthy and counted every generation it ran.
    assert_eq!(status(a)["in_flight"], 0);
}

#[test]
fn slow_headers_are_cut_off_and_others_still_served() {
    let s = serve(&["--header-timeout", "1"]);
    let mut slow = TcpStream::connect(&s.addr).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t0 = Instant::now();
    // Meanwhile, another client is served at once.
    let (code, _, page) = request(&s.addr, "GET", "/", &[], b"");
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&page).contains("<title>mesh-llm chat</title>"));
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = Vec::new();
    let r = slow.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(r.is_ok() || buf.is_empty(), "{r:?}");
    assert!(
        waited < Duration::from_secs(15),
        "the slow connection stayed open {waited:?}"
    );
}

#[test]
fn api_key_is_required_when_set() {
    let s = serve(&["--api-key", "s3cret"]);
    let (code, _, b) = request(&s.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&b));
    let (code, _, _) = request(
        &s.addr,
        "GET",
        "/v1/models",
        &["Authorization: Bearer wrong!"],
        b"",
    );
    assert_eq!(code, 401);
    let (code, _, _) = request(&s.addr, "GET", "/api/tags", &[], b"");
    assert_eq!(code, 401);
    let (code, _, b) = request(
        &s.addr,
        "GET",
        "/v1/models",
        &["Authorization: Bearer s3cret"],
        b"",
    );
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["data"][0]["id"], "default");
    // A 3 MB body is within the default 4 MiB limit: parsed (unknown model), not 413.
    let big =
        json!({"model": "nope", "messages": [{"role": "user", "content": "x".repeat(3 << 20)}]});
    let (code, _, b) = request(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        &["Authorization: Bearer s3cret"],
        big.to_string().as_bytes(),
    );
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&b));
    // The page itself and Ollama's version probe need no key.
    assert_eq!(request(&s.addr, "GET", "/", &[], b"").0, 200);
    assert_eq!(request(&s.addr, "GET", "/api/version", &[], b"").0, 200);
}

#[test]
fn eight_concurrent_clients_are_correct_and_the_ninth_is_refused() {
    let s = serve(&["--parallel", "2", "--queue", "8"]);
    let (code, alone) = post_json(&s.addr, "/v1/completions", &story(48, false));
    assert_eq!(code, 200, "{alone}");
    let want = alone["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(
        alone["usage"]["completion_tokens"], 48,
        "the story should not end early"
    );
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let addr = s.addr.clone();
            std::thread::spawn(move || {
                let (code, _, body) = request(
                    &addr,
                    "POST",
                    "/v1/completions",
                    &[],
                    story(48, true).to_string().as_bytes(),
                );
                (code, sse_text(&body))
            })
        })
        .collect();
    // Once all eight are in (2 running, 6 waiting), the ninth is refused.
    let t0 = Instant::now();
    while status(&s.addr)["in_flight"] != 8 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            status(&s.addr)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, v) = post_json(&s.addr, "/v1/completions", &story(4, false));
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    let (code, _) = post_json(
        &s.addr,
        "/api/generate",
        &json!({"model": "default", "prompt": "hi"}),
    );
    assert_eq!(code, 503);
    for c in clients {
        let (code, (text, done)) = c.join().unwrap();
        assert_eq!(code, 200);
        assert!(done, "stream did not end with [DONE]");
        assert_eq!(
            text, want,
            "a concurrent answer differs from the same request alone"
        );
    }
}

#[test]
fn a_client_that_disconnects_frees_its_session_within_a_second() {
    let s = serve(&[]);
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    let body = story(4000, true).to_string();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Wait for streamed text, then hang up.
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    let mut pieces = 0;
    while pieces < 3 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0);
        if line.contains("\"text\"") {
            pieces += 1;
        }
    }
    assert_eq!(status(&s.addr)["running"], 1);
    drop(reader);
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    let t0 = Instant::now();
    loop {
        let st = status(&s.addr);
        if st["running"] == 0 && st["in_flight"] == 0 {
            assert_eq!(st["cancelled"], 1, "{st}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "still running after 1 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn shutdown_lets_in_flight_requests_finish() {
    let s = serve(&["--grace", "30"]);
    let addr = s.addr.clone();
    let client = std::thread::spawn(move || {
        request(
            &addr,
            "POST",
            "/v1/completions",
            &[],
            story(40, true).to_string().as_bytes(),
        )
    });
    let t0 = Instant::now();
    while status(&s.addr)["running"] != 1 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (code, _, body) = client.join().unwrap();
    assert_eq!(code, 200);
    let (text, done) = sse_text(&body);
    assert!(
        done && !text.is_empty(),
        "the in-flight stream was cut: {text:?}"
    );
    let mut s = s;
    let exit = s.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// The mesh behind the same endpoints: with two `mesh node` processes
/// (layers 0-15 and 15-30, helper duty), `default:pipeline` gives local's
/// greedy text over two hops, `"mesh": {"mode": "private"}` the text of
/// two helpers, each response saying where it was computed.
#[test]
fn pipeline_and_private_requests_run_on_the_mesh() {
    let model = common::model();
    let a = common::spawn_node(&format!("{model}:0-15"), &["--helper"], None, "helping");
    let b = common::spawn_node(
        &format!("{model}:15-30"),
        &["--helper"],
        Some(&a.addr),
        "helping",
    );
    let s = serve(&[
        "--bootstrap",
        &a.addr,
        "--trust",
        &a.peer_id,
        "--trust",
        &b.peer_id,
        "--spares",
        "0",
    ]);
    let ask = |model: &str, extra: Value| {
        let mut body = json!({"model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (code, v) = post_json(&s.addr, "/v1/chat/completions", &body);
        assert_eq!(code, 200, "{v}");
        v
    };
    let local = ask("default", json!({}));
    assert_eq!(local["mesh"]["mode"], "local");
    let text = &local["choices"][0]["message"]["content"];
    let pipeline = ask("default:pipeline", json!({}));
    assert_eq!(pipeline["mesh"]["mode"], "pipeline", "{pipeline}");
    assert_eq!(&pipeline["choices"][0]["message"]["content"], text);
    let plan = pipeline["mesh"]["plan"].as_array().unwrap();
    let peers: Vec<&str> = plan
        .iter()
        .map(|h| h["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        peers,
        [a.peer_id.as_str(), b.peer_id.as_str()],
        "{pipeline}"
    );
    let private = ask("default", json!({"mesh": {"mode": "private"}}));
    assert_eq!(private["mesh"]["mode"], "private", "{private}");
    let helpers = private["mesh"]["helpers"].as_array().unwrap();
    assert_eq!(helpers.len(), 2, "{private}");
    assert!(private["mesh"]["bytes_per_token"].as_f64().unwrap() > 0.0);
    assert!(private["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    // Ollama's API reaches the mesh the same way.
    let (code, v) = post_json(
        &s.addr,
        "/api/chat",
        &json!({"model": "default:pipeline", "stream": false,
                "options": {"temperature": 0, "num_predict": 16, "repeat_penalty": 1.0},
                "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(&v["message"]["content"], text);
    assert_eq!(v["mesh"]["mode"], "pipeline");
}
