"""`dyncomp annotate`: the rule-based annotator, and the LLM annotator against a mock endpoint.

The mock is an OpenAI-compatible chat completions server on 127.0.0.1 that replies from a
script per question. Each test decides which request gets a rewrite, a 429, a 500 or a
bad rewrite, and checks how many requests each question received.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dyncomp.cli import main
from dyncomp.data import annotate as annotate_module
from dyncomp.data import load_annotated
from dyncomp.data.annotate import (
    AnnotateConfig,
    annotate,
    annotate_rules,
    build_messages,
    check_rewrite,
    clean_response,
    progress_path,
)
from dyncomp.data.gsm8k import Problem, load_gsm8k
from dyncomp.errors import UserError

GOLDS = ["72", "10", "1234", "5", "18", "3"]
PROBLEMS = [
    {
        "question": f"Problem {index}: how many items are there in the end?",
        "answer": f"First 2 * 3 = <<2*3=6>>6 items.\nThen 6 + 1 = <<6+1=7>>7 more.\nSo {gold} in all.\n#### {gold}",
    }
    for index, gold in enumerate(GOLDS)
]


def good_rewrite(gold: str) -> str:
    return f"First, 2 * 3 = 6 items. <COMP>\n\nThen there are {gold} items in all. <COMP>\n\nThe answer is {gold}.\n#### {gold}"


class MockEndpoint:
    """A chat completions server whose reply to each request comes from `script`.

    `script(question_index, attempt)` returns a string, which is sent as a 200 reply with
    that content, or an int, which is sent as that HTTP status with an error body. The
    attempt counts from 0 per question. By default every request gets a good rewrite.
    """

    def __init__(self):
        self.script = lambda index, attempt: good_rewrite(GOLDS[index])
        self.requests: Counter = Counter()
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                index = endpoint.question_index(body["messages"][-1]["content"])
                with endpoint.lock:
                    attempt = endpoint.requests[index]
                    endpoint.requests[index] += 1
                    endpoint.bodies.append(body)
                reply = endpoint.script(index, attempt)
                if isinstance(reply, int):
                    self.send_json(reply, {"error": {"message": f"mock status {reply}", "type": "mock_error"}})
                else:
                    self.send_json(200, completion(reply))

            def send_json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                # The openai client waits this long before a retry instead of its backoff.
                self.send_header("retry-after-ms", "1")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def question_index(content: str) -> int:
        matches = [index for index, problem in enumerate(PROBLEMS) if problem["question"] in content]
        assert len(matches) == 1, content
        return matches[0]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def completion(content: str) -> dict:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": "mock-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@pytest.fixture
def endpoint(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    server = MockEndpoint()
    yield server
    server.close()


@pytest.fixture
def gsm8k_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(problem) + "\n" for problem in PROBLEMS), encoding="utf-8")
    return path


def llm_config(gsm8k_file, endpoint, **overrides) -> AnnotateConfig:
    settings = dict(
        input=str(gsm8k_file),
        out=str(gsm8k_file.parent / "out.json"),
        method="llm",
        api_base=endpoint.url,
        api_model="mock-model",
        concurrency=1,
        max_retries=2,
        timeout=10.0,
    )
    settings.update(overrides)
    return AnnotateConfig(**settings)


def read_progress(config: AnnotateConfig) -> list[dict]:
    return [json.loads(line) for line in progress_path(config.out).read_text(encoding="utf-8").splitlines()]


def output_ids(config: AnnotateConfig) -> list[str]:
    return [example.id for example in load_annotated(config.out)]


# ---------------------------------------------------------------------------
# Rules


def test_rules_marks_each_line(gsm8k_file):
    (problem,) = load_gsm8k(str(gsm8k_file), limit=1)
    record = annotate_rules(problem)
    assert record["reasoning_with_compression"] == (
        "First 2 * 3 = 6 items. <COMP>\nThen 6 + 1 = 7 more. <COMP>\nSo 72 in all. <COMP>\n#### 72"
    )
    assert record["id"] == "problems-00000"
    assert record["answer"] == "72"
    assert record["original_reasoning"] == PROBLEMS[0]["answer"]


def test_rules_file_round_trip(gsm8k_file, tmp_path):
    out = tmp_path / "rules.json"
    summary = annotate(AnnotateConfig(input=str(gsm8k_file), out=str(out), method="rules", offset=1, limit=3))
    assert summary.written == 3
    examples = load_annotated(out)
    assert [example.id for example in examples] == ["problems-00001", "problems-00002", "problems-00003"]
    assert [example.answer for example in examples] == ["10", "1234", "5"]
    assert examples[0].steps() == ["First 2 * 3 = 6 items.", "\nThen 6 + 1 = 7 more.", "\nSo 10 in all.", "\n#### 10"]
    assert not progress_path(out).exists()


def test_rules_on_real_test_file(shared_data, tmp_path):
    out = tmp_path / "test200.json"
    annotate(AnnotateConfig(input=str(shared_data / "gsm8k" / "test.jsonl"), out=str(out), method="rules", limit=200))
    examples = load_annotated(out)
    assert len(examples) == 200
    for example in examples:
        assert "<<" not in example.reasoning
        assert example.num_markers == len(example.original_reasoning.split("####")[0].strip().splitlines())
        assert example.reasoning.endswith(f"#### {example.answer}")


# ---------------------------------------------------------------------------
# The prompt and the rewrite check


def test_prompt_contains_problem():
    problem = Problem(id="p", question="How many?", reference="2 + 2 = <<2+2=4>>4\n#### 4", gold="4")
    messages = build_messages(problem)
    assert [message["role"] for message in messages] == ["system", "user", "assistant", "user"]
    assert "<COMP>" in messages[0]["content"]
    assert "How many?" in messages[-1]["content"]
    assert "2 + 2 = 4" in messages[-1]["content"]
    assert "<<" not in messages[-1]["content"]
    assert check_rewrite(messages[2]["content"], "29") is None


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty response"),
        ("It is 72.\n#### 72", "no marker"),
        ("It is 72. <COMP>\n\nThe answer is 72.", "no final line"),
        ("It is 70. <COMP>\n#### 70", "wrong answer"),
        ("#### 72 <COMP> wait, 71", None),
    ],
)
def test_check_rewrite(text, reason):
    result = check_rewrite(text, "72")
    assert (result[0] if result else None) == reason


def test_clean_response_strips_fence():
    assert clean_response("```text\nA <COMP>\n#### 1\n```") == "A <COMP>\n#### 1"
    assert clean_response("  A <COMP>\n#### 1 \n") == "A <COMP>\n#### 1"
    assert clean_response(None) == ""


# ---------------------------------------------------------------------------
# LLM against the mock endpoint


def test_llm_all_accepted(gsm8k_file, endpoint):
    config = llm_config(gsm8k_file, endpoint, concurrency=3)
    summary = annotate(config)
    assert (summary.written, summary.rejected, summary.queried, summary.reused) == (6, 0, 6, 0)
    assert output_ids(config) == [f"problems-{index:05d}" for index in range(6)]
    assert load_annotated(config.out)[2].reasoning == good_rewrite("1234")
    assert sorted(endpoint.requests.values()) == [1] * 6
    assert {body["model"] for body in endpoint.bodies} == {"mock-model"}
    assert {body["temperature"] for body in endpoint.bodies} == {0.0}
    assert {entry["status"] for entry in read_progress(config)} == {"ok"}


@pytest.mark.parametrize("status", [429, 500, 503])
def test_llm_retries_transient_status(gsm8k_file, endpoint, status):
    endpoint.script = lambda index, attempt: status if index == 1 and attempt == 0 else good_rewrite(GOLDS[index])
    config = llm_config(gsm8k_file, endpoint)
    summary = annotate(config)
    assert summary.written == 6
    assert endpoint.requests[1] == 2
    assert endpoint.requests[0] == 1


def test_llm_rejects_bad_rewrites(gsm8k_file, endpoint):
    replies = {2: "There are 1234 items in all.\n#### 1234", 4: "It is 17. <COMP>\n#### 17"}
    endpoint.script = lambda index, attempt: replies.get(index) or good_rewrite(GOLDS[index])
    config = llm_config(gsm8k_file, endpoint)
    summary = annotate(config)
    assert (summary.written, summary.rejected) == (4, 2)
    assert summary.rejection_reasons == Counter({"no marker": 1, "wrong answer": 1})
    assert output_ids(config) == ["problems-00000", "problems-00001", "problems-00003", "problems-00005"]

    rejected = {entry["id"]: entry for entry in read_progress(config) if entry["status"] == "rejected"}
    assert rejected["problems-00002"]["reason"] == "no marker"
    assert rejected["problems-00004"]["reason"] == "wrong answer"
    assert rejected["problems-00004"]["response"] == replies[4]


def test_llm_rerun_skips_rejected(gsm8k_file, endpoint):
    endpoint.script = lambda index, attempt: "no marker here #### 5" if attempt == 0 and index == 2 else good_rewrite(GOLDS[index])
    config = llm_config(gsm8k_file, endpoint)
    annotate(config)

    summary = annotate(config)
    assert (summary.queried, summary.reused, summary.rejected) == (0, 6, 1)
    assert sum(endpoint.requests.values()) == 6

    summary = annotate(llm_config(gsm8k_file, endpoint, retry_rejected=True))
    assert (summary.queried, summary.written, summary.rejected) == (1, 6, 0)
    assert endpoint.requests[2] == 2
    assert output_ids(config) == [f"problems-{index:05d}" for index in range(6)]


def test_llm_failing_endpoint_then_resume(gsm8k_file, endpoint):
    endpoint.script = lambda index, attempt: 500 if index == 3 else good_rewrite(GOLDS[index])
    config = llm_config(gsm8k_file, endpoint, max_retries=1)
    with pytest.raises(UserError) as caught:
        annotate(config)
    message = str(caught.value)
    assert message.startswith(f"the endpoint {endpoint.url} failed after 1 retries: HTTP 500")
    assert f"kept in {progress_path(config.out)}" in message
    assert "rerun" in message
    assert "\n" not in message
    assert endpoint.requests[3] == 2
    # Problem 4 may already be in flight when problem 3 fails; it is then recorded too.
    finished = [entry["id"] for entry in read_progress(config)]
    assert finished[:3] == ["problems-00000", "problems-00001", "problems-00002"]
    assert "problems-00003" not in finished

    endpoint.script = lambda index, attempt: good_rewrite(GOLDS[index])
    summary = annotate(config)
    assert (summary.written, summary.reused, summary.queried) == (6, len(finished), 6 - len(finished))
    assert endpoint.requests[3] == 3
    for index in (0, 1, 2, 4, 5):
        assert endpoint.requests[index] == 1, f"problem {index}"


def test_llm_interrupt_then_resume(gsm8k_file, endpoint, monkeypatch, capsys):
    original_entry = annotate_module._entry
    calls = []

    def entry_then_interrupt(problem, response):
        calls.append(problem.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original_entry(problem, response)

    monkeypatch.setattr(annotate_module, "_entry", entry_then_interrupt)
    config = llm_config(gsm8k_file, endpoint)
    argv = ["annotate", "--input", config.input, "--method", "llm", "--out", config.out]
    argv += ["--api-base", endpoint.url, "--api-model", "mock-model", "--concurrency", "1"]
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    finished = [entry["id"] for entry in read_progress(config)]
    assert finished == ["problems-00000", "problems-00001"]

    monkeypatch.setattr(annotate_module, "_entry", original_entry)
    assert main(argv) == 0
    assert "wrote 6 records" in capsys.readouterr().out
    assert endpoint.requests[0] == 1
    assert endpoint.requests[1] == 1
    # Problem 2's reply was lost to the interrupt, and problem 3 may have been in flight.
    assert endpoint.requests[2] == 2
    assert endpoint.requests[3] in (1, 2)


def test_llm_partial_last_line(gsm8k_file, endpoint):
    config = llm_config(gsm8k_file, endpoint, limit=2)
    annotate(config)
    progress = progress_path(config.out)
    lines = progress.read_text(encoding="utf-8").splitlines()
    # A crash in the middle of the second write leaves half a line without a newline.
    progress.write_text(lines[0] + "\n" + lines[1][:25], encoding="utf-8")

    summary = annotate(config)
    assert (summary.written, summary.reused, summary.queried) == (2, 1, 1)
    assert endpoint.requests[1] == 2
    assert progress.read_text(encoding="utf-8").splitlines()[2] == lines[1]


def test_llm_progress_from_other_input(gsm8k_file, endpoint):
    config = llm_config(gsm8k_file, endpoint, limit=1)
    annotate(config)
    entries = read_progress(config)
    entries[0]["question"] = "A different question."
    progress_path(config.out).write_text(json.dumps(entries[0]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="was written for another input"):
        annotate(config)


def test_llm_fenced_reply_accepted(gsm8k_file, endpoint):
    endpoint.script = lambda index, attempt: f"```\n{good_rewrite(GOLDS[index])}\n```"
    config = llm_config(gsm8k_file, endpoint, limit=1)
    assert annotate(config).written == 1
    assert load_annotated(config.out)[0].reasoning == good_rewrite("72")


def test_llm_unauthorized_not_retried(gsm8k_file, endpoint):
    endpoint.script = lambda index, attempt: 401
    config = llm_config(gsm8k_file, endpoint)
    with pytest.raises(UserError, match="rejected the request with HTTP 401 .*check --api-model, --api-base and OPENAI_API_KEY"):
        annotate(config)
    assert endpoint.requests[0] == 1
    # No new request starts after the error; problem 1 may already have been in flight.
    assert sum(endpoint.requests.values()) <= 2


def test_llm_connection_refused(gsm8k_file, endpoint):
    # Bind and close a socket to get a local port that nothing listens on.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = llm_config(gsm8k_file, endpoint, api_base=f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(UserError, match=f"the endpoint http://127.0.0.1:{port}/v1 failed after 0 retries: Connection error"):
        annotate(config)


def test_llm_without_api_key(gsm8k_file, endpoint, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(UserError, match="needs the environment variable OPENAI_API_KEY"):
        annotate(llm_config(gsm8k_file, endpoint))
    assert sum(endpoint.requests.values()) == 0


def test_llm_without_openai_package(gsm8k_file, endpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(UserError, match=r"pip install 'dyncomp\[llm\]'"):
        annotate(llm_config(gsm8k_file, endpoint))


# ---------------------------------------------------------------------------
# The command line


def test_cli_rules_summary(gsm8k_file, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert main(["annotate", "--input", str(gsm8k_file), "--method", "rules", "--out", str(out), "--limit", "4"]) == 0
    assert capsys.readouterr().out == f"wrote 4 records to {out}\n"
    assert len(load_annotated(out)) == 4


def test_cli_llm_summary(gsm8k_file, endpoint, capsys):
    endpoint.script = lambda index, attempt: "#### 0" if index == 5 else good_rewrite(GOLDS[index])
    out = gsm8k_file.parent / "llm.json"
    argv = ["annotate", "--input", str(gsm8k_file), "--method", "llm", "--out", str(out)]
    argv += ["--api-base", endpoint.url, "--api-model", "mock-model", "--max-retries", "1", "--timeout", "5"]
    argv += ["--temperature", "none"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote 5 records to {out}" in printed
    assert f"queried 6 problems, reused 0 finished earlier, rejected 1; progress and rejection reasons are in {progress_path(out)}" in printed
    assert all("temperature" not in body for body in endpoint.bodies)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--input", "{tmp}/absent.jsonl", "--method", "rules", "--out", "{tmp}/o.json"], "GSM8K source not found"),
        (["--input", "{input}", "--method", "rules", "--out", "{tmp}/o.jsonl"], "must end in .json"),
        (["--input", "{input}", "--method", "rules", "--out", "{tmp}/o.json", "--offset", "-1"], "offset must be 0 or more"),
        (["--input", "{input}", "--method", "rules", "--out", "{tmp}/o.json", "--offset", "99"], "no problems left"),
        (["--input", "{input}", "--method", "llm", "--out", "{tmp}/o.json"], "needs --api-base"),
        (["--input", "{input}", "--method", "llm", "--out", "{tmp}/o.json", "--api-base", "127.0.0.1:1"], "not an http(s) URL"),
        (["--input", "{input}", "--method", "llm", "--out", "{tmp}/o.json", "--api-base", "http://127.0.0.1:9/v1"], "needs --api-model"),
        (
            ["--input", "{input}", "--method", "llm", "--out", "{tmp}/o.json", "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m", "--concurrency", "0"],
            "--concurrency must be at least 1",
        ),
        (
            ["--input", "{input}", "--method", "llm", "--out", "{tmp}/o.json", "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m", "--max-retries", "-1"],
            "--max-retries must be 0 or more",
        ),
        (
            ["--input", "{input}", "--method", "llm", "--out", "{tmp}/o.json", "--api-base", "http://127.0.0.1:9/v1", "--api-model", "m", "--timeout", "0"],
            "--timeout must be a positive number",
        ),
    ],
)
def test_cli_errors(gsm8k_file, tmp_path, capsys, extra, message):
    argv = ["annotate"] + [part.format(tmp=tmp_path, input=gsm8k_file) for part in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dyncomp annotate: error: ")
    assert message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o.json").exists()
