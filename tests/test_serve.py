"""`edgemoe serve` driven over HTTP as clients drive it: the official openai client (chat, streaming, completions,
models, JSON schema output, tool calls, concurrent clients) and raw HTTP for the errors, against a real server
process on 127.0.0.1 with an ephemeral port, serving a tiny random model. Its greedy output is compared with the
model's own Model.chat / Model.generate in this process."""

import importlib
import json
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from subprocess_python import PYTHON

openai = importlib.import_module("openai")
httpx = importlib.import_module("httpx")
jsonschema = importlib.import_module("jsonschema")
importlib.import_module("uvicorn")
importlib.import_module("starlette")

from tiny_models import CHAT_TEMPLATE, add_chat_template

import edgemoe

KEY = "test-key"
START_TIMEOUT = 60.0

# CHAT_TEMPLATE plus Hermes-style tools: the tools named in a system block (names only: the tiny model's context is
# short), calls as <tool_call> blocks.
TOOL_TEMPLATE = (
    "{% if tools %}{{ bos_token }}<|system|>\nTools: <tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>"
    " Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message.tool_calls %}{% for c in message.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments }}}\n</tool_call>{% endfor %}{% else %}{{ message['content'] | trim }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    "{% else %}" + CHAT_TEMPLATE + "{% endif %}"
)


class ServerProcess:
    def __init__(self, model, *args):
        self.proc = subprocess.Popen([*PYTHON, "-m", "edgemoe", "serve", str(model), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = ""
        deadline = time.monotonic() + START_TIMEOUT
        while "http://" not in line:  # the banner names the port
            line = self.proc.stdout.readline()
            if not line and (self.proc.poll() is not None or time.monotonic() > deadline):
                self.proc.kill()
                raise AssertionError(f"the server did not start: {self.proc.stderr.read()}")
        self.banner = line
        self.base = line.split("on ")[-1].strip()  # http://127.0.0.1:PORT/v1
        self.root = self.base[: -len("/v1")]

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(self.root + "/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model_path(tiny_dir, tmp_path_factory):
    """A tiny qwen3moe with a chat template that supports tools."""
    from edgemoe_export import export

    root = tmp_path_factory.mktemp("serve")
    src = shutil.copytree(tiny_dir("qwen3moe"), root / "src")
    add_chat_template(src, TOOL_TEMPLATE)
    return export(src, root / "tiny.emoe", bits=32, show_progress=False)


@pytest.fixture(scope="module")
def server(model_path):
    s = ServerProcess(model_path, "--n-seq", "4", "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ref(model_path):
    with edgemoe.load(model_path) as m:
        yield m


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


def test_models_and_health(server):
    c = server.client()
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    h = server.health()
    assert h["status"] == "ok" and h["slots"] == 4


def test_chat_equals_model_chat(server, ref):
    r = server.client().chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24)
    want = ref.chat(MESSAGES, max_new_tokens=24)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    prompt_ids = ref.encode(ref.apply_chat_template(MESSAGES))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.choices[0].finish_reason in ("length", "stop")
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 24


def test_stream_equals_non_stream(server):
    c = server.client()
    kw = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_completion_tokens": 20}
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)
    # the raw stream ends with data: [DONE]
    with httpx.stream("POST", server.base + "/chat/completions", json={**kw, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_completions_and_stop(server, ref):
    c = server.client()
    r = c.completions.create(model="tiny", prompt="to be or not", temperature=0, max_tokens=16)
    want = ref.generate("to be or not", max_new_tokens=16)
    assert r.choices[0].text == want and r.object == "text_completion"
    stop = want[5:7]  # a stop string the greedy text contains: the reply ends just before its first occurrence
    r = c.completions.create(model="tiny", prompt="to be or not", temperature=0, max_tokens=16, stop=[stop])
    assert r.choices[0].text == want[: want.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="to be or not", temperature=0, max_tokens=16, stream=True) if ch.choices)
    assert streamed == want


def test_sampling_is_seeded(server, ref):
    c = server.client()
    kw = {"model": "tiny", "prompt": "the lazy dog", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7,
          "extra_body": {"top_k": 40, "min_p": 0.01}}
    a, b = (c.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b == ref.generate("the lazy dog", max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40,
                                  min_p=0.01, seed=7)


def test_logprobs(server, ref):
    """The model's log-probabilities: the first reply token's equals log-softmax of Model.logits at the prompt's last
    position (greedy: the maximum); one entry per generated token; streamed entries == non-streamed."""
    import numpy as np

    c = server.client()
    r = c.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    z = ref.logits(ref.encode(ref.apply_chat_template(MESSAGES)))[-1].astype(np.float64)
    lsm = z - z.max() - np.log(np.exp(z - z.max()).sum())
    assert abs(content[0].logprob - lsm.max()) < 1e-4
    assert [round(t.logprob, 4) for t in content[0].top_logprobs] == [round(x, 4) for x in np.sort(lsm)[::-1][:3]]
    assert all(len(e.top_logprobs) == 3 and e.logprob == e.top_logprobs[0].logprob for e in content)
    kw = {"model": "tiny", "prompt": "to be or not", "temperature": 0, "max_tokens": 8, "logprobs": 2}
    full = c.completions.create(**kw).choices[0].logprobs
    assert len(full.tokens) == len(full.token_logprobs) == len(full.top_logprobs) == 8
    chunks = [ch.choices[0].logprobs for ch in c.completions.create(**kw, stream=True) if ch.choices]
    streamed = [x for lp in chunks if lp for x in lp.token_logprobs]
    assert streamed == full.token_logprobs
    r = _post(server, "/chat/completions", {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2})
    _error(r, 400, "invalid_value")


def test_concurrent_clients_equal_serial(server, ref):
    """64 requests from 8 concurrent clients: each equals the serial greedy result, several were decoded in the
    same steps, and the server is alive afterwards."""
    prompts = [f"{w} the quick brown fox {i}" for i, w in enumerate(["to", "be", "or", "not", "that", "is", "the",
                                                                    "question"] * 8)]
    want = [ref.generate(p, max_new_tokens=10) for p in prompts]
    c = server.client()
    before = server.health()

    def ask(p):
        return c.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=10).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts))
    assert got == want
    after = server.health()
    assert after["peak_batch"] > 1, after  # requests shared decode steps
    assert after["decode_steps"] - before["decode_steps"] < 64 * 9  # fewer steps than one request at a time
    assert after["running"] == 0 and after["waiting"] == 0


def test_prompt_prefix_reused(server):
    c = server.client()
    first = c.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=8)
    turn2 = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "to be or not to be"}]
    r = c.chat.completions.create(model="tiny", messages=turn2, temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer"},
    "mood": {"enum": ["happy", "sad", "lazy"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "ok": {"type": ["boolean", "null"]}},
    "required": ["name", "age", "mood", "tags", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output(server, temperature):
    r = server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=temperature, seed=3, max_tokens=230,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    obj = json.loads(r.choices[0].message.content)
    jsonschema.validate(obj, SCHEMA)


def test_json_object_output(server):
    r = server.client().chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=200,
                                                response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":  # a random model may write one long string; then it is cut (length)
        assert isinstance(json.loads(text), dict)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_call(server, choice):
    c = server.client()
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": TOOLS,
          "tool_choice": choice, "temperature": 0, "max_tokens": 120}
    r = c.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    fn = {t["function"]["name"]: t["function"] for t in TOOLS}
    if isinstance(choice, dict):
        assert calls[0].function.name == "add"
    jsonschema.validate(json.loads(calls[0].function.arguments), fn[calls[0].function.name]["parameters"])
    # streamed: the same call as delta.tool_calls with an index
    chunks = list(c.chat.completions.create(**kw, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0]
    assert deltas[0].function.name == calls[0].function.name
    assert json.loads(deltas[0].function.arguments) == json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call goes back into the conversation with its result: the template renders it
    follow = kw["messages"] + [{"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                               {"role": "tool", "tool_call_id": calls[0].id, "content": "42"}]
    r2 = c.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, temperature=0, max_tokens=4)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_auto_streams_like_non_streaming(server):
    """tool_choice auto: the reply is free text (the random model writes no <tool_call>), streamed or not alike."""
    c = server.client()
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "temperature": 0,
          "max_tokens": 16}
    r = c.chat.completions.create(**kw)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


def _post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server.base + path, content=raw, headers=headers | {"Content-Type": "application/json"},
                          timeout=30)
    return httpx.post(server.base + path, json=body, headers=headers, timeout=30)


def _error(r, status, code=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    assert "Traceback" not in e["message"]
    if code:
        assert e["code"] == code, e
    return e


def test_errors(server, ref):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _error(_post(server, "/chat/completions", None, raw=b"{not json"), 400, "invalid_json")
    _error(_post(server, "/chat/completions", ok, key=None), 401, "invalid_api_key")
    _error(_post(server, "/chat/completions", ok, key="wrong"), 401, "invalid_api_key")
    _error(_post(server, "/chat/completions", {**ok, "model": "gpt-4"}), 404, "model_not_found")
    _error(_post(server, "/chat/completions", {**ok, "temperature": 3}), 400, "invalid_value")
    _error(_post(server, "/chat/completions", {**ok, "top_p": 0}), 400, "invalid_value")
    _error(_post(server, "/chat/completions", {**ok, "max_tokens": 0}), 400, "invalid_value")
    _error(_post(server, "/chat/completions", {**ok, "n": 2}), 400, "unsupported_value")
    _error(_post(server, "/chat/completions", {**ok, "frobnicate": 1}), 400, "unsupported_parameter")
    _error(_post(server, "/chat/completions", {**ok, "messages": []}), 400)
    _error(_post(server, "/chat/completions", {**ok, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "unsupported_value")
    _error(_post(server, "/chat/completions", {**ok, "messages": [{"role": "wizard", "content": "hi"}]}), 400)
    _error(_post(server, "/chat/completions", {**ok, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "a+"}}}}), 400, "invalid_value")
    _error(_post(server, "/chat/completions", {**ok, "tool_choice": "required"}), 400)
    long = " ".join(["the quick brown fox"] * 200)
    e = _error(_post(server, "/completions", {"model": "tiny", "prompt": long}), 400, "context_length_exceeded")
    assert str(ref.max_ctx) in e["message"]
    _error(_post(server, "/completions", {"model": "tiny", "prompt": [999999]}), 400)
    _error(_post(server, "/chat/completions", None, raw=b"{" + b" " * (9 << 20) + b"}"), 413, "request_too_large")
    _error(httpx.get(server.base + "/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    _error(httpx.get(server.base + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="nope").models.list()
    assert server.health()["status"] == "ok"  # alive after all of that


def test_disconnect_frees_the_slot(server):
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": 200, "temperature": 0, "stream": True,
            "extra_body": None}
    body.pop("extra_body")
    with httpx.stream("POST", server.base + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        it = r.iter_lines()
        assert next(it).startswith("data: ")
    deadline = time.monotonic() + 10
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["running"] == 0


def test_a_budget_without_max_ctx_serves_the_context_its_slots_fit(model_path):
    """serve --budget without --max-ctx: the context is the one run/chat would take for --n-seq KV caches (the
    model's own would not fit), said on stderr and in the banner; requests are served at it."""
    from edgemoe.container import open_container
    from edgemoe.model import budget_plan, context_for_budget, default_max_ctx

    c = open_container(model_path, verify=False)
    full = default_max_ctx(c.spec)
    c.close()
    budget = budget_plan(model_path, full, 1, "exact", None, 4)["minimum_bytes"] - 1  # 4 full contexts do not fit
    want = context_for_budget(model_path, budget, threads=1, n_seq=4)
    assert want is not None and want < full
    s = ServerProcess(model_path, "--n-seq", "4", "--budget", f"{budget}B", "--threads", "1")
    try:
        assert f"context {want})" in s.banner
        r = s.client().completions.create(model="tiny", prompt="the quick", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
    finally:
        s.stop()
    assert f"context {want} tokens per sequence (4 KV caches)" in s.proc.stderr.read()


def test_queue_full_and_sigterm(model_path):
    """One slot and a queue of one under a memory budget: of 12 simultaneous requests some get 503 (OpenAI error
    object) and the accepted ones complete; then SIGTERM with requests in flight: every client's stream ends (none
    hangs), the server exits with status 0."""
    s = ServerProcess(model_path, "--n-seq", "1", "--queue", "1", "--budget", "8MB")
    try:
        body = {"model": "tiny", "prompt": "the quick", "max_tokens": 250, "temperature": 0, "stream": True}
        results = []

        def run(barrier):
            barrier.wait()
            try:
                with httpx.stream("POST", s.base + "/completions", json=body, timeout=60) as r:
                    lines = [ln for ln in r.iter_lines() if ln]
                    results.append((r.status_code, lines))
            except httpx.TransportError as e:  # the server stopped listening before this request connected
                results.append((None, [type(e).__name__]))

        def burst(n):
            barrier = threading.Barrier(n)
            threads = [threading.Thread(target=run, args=(barrier,)) for _ in range(n)]
            for t in threads:
                t.start()
            return threads

        for t in burst(12):
            t.join(timeout=60)
        statuses = sorted(st for st, _ in results)
        assert 503 in statuses and 200 in statuses, statuses
        for st, lines in results:
            if st == 503:
                assert json.loads(lines[0])["error"]["code"] == "overloaded"
            else:
                assert st == 200 and lines[-1] == "data: [DONE]"
        results.clear()
        threads = burst(3)
        time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive()
        assert len(results) == 3
        assert "stopped" in s.proc.stderr.read()
    finally:
        s.stop()


def test_python_api_same_shapes(server, ref):
    """Model.create_chat_completion / create_completion: the server's dicts, in-process."""
    kw = {"temperature": 0, "max_tokens": 12}
    r = ref.create_chat_completion(MESSAGES, **kw)
    over_http = server.client().chat.completions.create(model="tiny", messages=MESSAGES, **kw)
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["content"] == over_http.choices[0].message.content
    assert r["usage"]["completion_tokens"] == over_http.usage.completion_tokens
    chunks = list(ref.create_chat_completion(MESSAGES, stream=True, **kw))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == r["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    c = ref.create_completion("to be or not", **kw)
    assert c["choices"][0]["text"] == ref.generate("to be or not", max_new_tokens=12)
    obj = json.loads(ref.create_chat_completion(MESSAGES, temperature=0, max_tokens=230, response_format={
        "type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})["choices"][0]["message"]["content"])
    jsonschema.validate(obj, SCHEMA)
    with pytest.raises(edgemoe.EdgeMoEError, match="temperature"):
        ref.create_chat_completion(MESSAGES, temperature=5)


def test_command_line_explains_itself_and_refuses_clearly(model_path, tmp_path):
    def serve(*args):
        return subprocess.run([*PYTHON, "-m", "edgemoe", "serve", *map(str, args)], check=False,
                              capture_output=True,
                              text=True, timeout=120)

    r = serve("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "edgemoe serve" in r.stdout
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [((tmp_path / "nope.emoe", "--port", "0"), "no such file"),
                 ((model_path, "--port", port), f"cannot listen on 127.0.0.1:{port}"),
                 ((model_path, "--port", "0", "--budget", "3XB"), "cannot read size '3XB'"),
                 ((model_path, "--port", "0", "--budget", "1KB"), "below the minimum"),
                 ((model_path, "--port", "0", "--n-seq", "0"), "--n-seq must be >= 1")]
        for args, message in cases:
            r = serve(*args)
            assert (r.returncode, message in r.stderr, "Traceback" in r.stderr) == (1, True, False), (args, r.stderr)
