"""The HTTP server, through a real HTTP client and a real browser: endpoints, batching of concurrent
requests (each gets a lone request's answer), limits, clear errors, `blip2 serve` itself, and the web
page driven in headless Chromium (Debian's, through playwright)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import usage_helpers as uh

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import blip2  # noqa: E402
from blip2.serve import ServerSettings, create_app  # noqa: E402
from blip2.serve.batching import Batcher, Job, QueueFull  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TIMEOUT = 120  # seconds; the machine is shared and loaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app in a thread, on a free local port."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    captioner = blip2.load(uh.save_captioner(tmp_path_factory.mktemp("captioner")))
    retriever = blip2.load(uh.save_retriever(tmp_path_factory.mktemp("retriever")))
    return captioner, retriever


@pytest.fixture(scope="module")
def server(pipes):
    settings = ServerSettings(max_upload_mb=0.05, max_pixels=100_000, batch_wait_ms=300, max_batch=8)
    with Server(create_app(list(pipes), settings)) as s:
        yield s


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return uh.make_images(tmp_path_factory.mktemp("images"), 6)


def upload(path: Path) -> dict:
    return {"image": (path.name, path.read_bytes(), "image/png")}


def test_health_and_schema(server):
    health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok"
    assert {"caption", "ask", "match", "search"} <= set(health["methods"])
    schema = httpx.get(server.url + "/openapi.json", timeout=TIMEOUT).json()
    assert {"/caption", "/ask", "/match", "/search", "/health"} <= set(schema["paths"])


def test_endpoints_answer_as_the_api_does(server, pipes, images):
    captioner, retriever = pipes
    r = httpx.post(server.url + "/caption", files=upload(images[0]), data={"num_beams": 1}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == captioner.caption(images[0], num_beams=1)

    data = {"question": "what is it ?", "history": json.dumps([["what is the sky ?", "blue"]])}
    r = httpx.post(server.url + "/ask", files=upload(images[1]), data=data, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == captioner.chat(images[1], "what is it ?", [("what is the sky ?", "blue")])

    r = httpx.post(
        server.url + "/match", files=upload(images[2]), data={"text": ["a dog", "two cats"]}, timeout=TIMEOUT
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected_itm = retriever.match(images[2], ["a dog", "two cats"]).tolist()
    expected_itc = retriever.similarity(images[2], ["a dog", "two cats"])[0].tolist()
    assert body["itm"] == pytest.approx(expected_itm, abs=1e-5)
    assert body["itc"] == pytest.approx(expected_itc, abs=1e-5)

    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in images]
    r = httpx.post(
        server.url + "/search", files=files, data={"query": "a dog", "top_k": 3, "rerank": 2}, timeout=TIMEOUT
    )
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    expected = retriever.search(images, "a dog", top_k=3, rerank=2)
    assert [h["filename"] for h in hits] == [images[h.index].name for h in expected]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, images):
    def call(job: tuple[str, Path]) -> str:
        endpoint, path = job
        data = {"question": "what is it ?"} if endpoint == "ask" else {}
        r = httpx.post(f"{server.url}/{endpoint}", files=upload(path), data=data, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()["caption" if endpoint == "caption" else "answer"]

    jobs = [("caption", p) for p in images] + [("ask", p) for p in images[:3]]  # two kinds, mixed
    alone = [call(j) for j in jobs]  # one at a time
    assert len(set(alone[: len(images)])) > 1  # different images, different captions: a mix-up would show
    before = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(call, jobs))
    after = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert together == alone
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == len(jobs) and batches < requests  # some requests shared a forward pass
    assert after["largest_batch"] > 1


def test_a_bad_request_batched_with_good_ones_fails_alone(server, images):
    """A request that is refused (its prompt or conversation leaves too few of the LM's 128 positions
    for 100 new tokens) gets its own 400; the valid requests batched with it get their answers."""
    options = {"max_new_tokens": 100, "num_beams": 1}
    long_prompt = " ".join(["w5"] * 25)  # 8 queries + 26 tokens + 100 new > 128 positions
    long_history = json.dumps([["what is the sky ?", "blue"]] * 2)  # about 28 tokens with the question

    def call(job: tuple[str, Path, dict]) -> tuple[int, str]:
        endpoint, path, data = job
        r = httpx.post(
            f"{server.url}/{endpoint}", files=upload(path), data={**options, **data}, timeout=TIMEOUT
        )
        body = r.json()
        return r.status_code, body.get("detail") or body.get("caption") or body.get("answer")

    good = [("caption", p, {}) for p in images[:3]] + [
        ("ask", p, {"question": "what ?"}) for p in images[3:5]
    ]
    bad = [("caption", images[5], {"prompt": long_prompt})]
    bad += [("ask", images[5], {"question": "what ?", "history": long_history})]
    alone = [call(j) for j in good]
    assert all(status == 200 for status, _ in alone), alone
    before = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        together = list(pool.map(call, good + bad))
    after = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert after["batches"] - before["batches"] < len(good) + len(bad)  # some requests shared a batch
    assert together[: len(good)] == alone
    for status, detail in together[len(good) :]:
        assert status == 400 and detail.startswith("the language model reads at most 128 positions"), detail


def test_limits_and_bad_input_get_clear_statuses(server, images, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(80_000))  # over the 0.05 MB limit
    r = httpx.post(server.url + "/caption", files=upload(big), timeout=TIMEOUT)
    assert r.status_code == 413 and "limit of 0.05 MB" in r.json()["detail"]

    r = httpx.post(
        server.url + "/caption", files={"image": ("notes.png", b"hello", "image/png")}, timeout=TIMEOUT
    )
    assert r.status_code == 400 and r.json()["detail"] == "notes.png is not an image file PIL can read"

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (400, 400)).save(buf, format="PNG")  # 160000 pixels, over the 100000 limit (small file)
    r = httpx.post(
        server.url + "/caption", files={"image": ("wide.png", buf.getvalue(), "image/png")}, timeout=TIMEOUT
    )
    assert r.status_code == 400 and "more than the limit of 100000" in r.json()["detail"]

    r = httpx.post(server.url + "/ask", files=upload(images[0]), data={"question": "  "}, timeout=TIMEOUT)
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = httpx.post(
        server.url + "/ask",
        files=upload(images[0]),
        data={"question": "what ?", "history": "[1"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 400 and "history must be JSON" in r.json()["detail"]
    r = httpx.post(server.url + "/caption", files=upload(images[0]), data={"num_beams": 99}, timeout=TIMEOUT)
    assert r.status_code == 400 and "num_beams" in r.json()["detail"]
    for bad, words in [
        ({"repetition_penalty": 0}, "repetition_penalty must be more than 0"),
        ({"min_new_tokens": 9, "max_new_tokens": 3}, "must not be more than max_new_tokens"),
    ]:
        r = httpx.post(server.url + "/caption", files=upload(images[0]), data=bad, timeout=TIMEOUT)
        assert r.status_code == 400 and words in r.json()["detail"], r.text
    r = httpx.post(
        server.url + "/ask",
        files=upload(images[0]),
        data={"question": "what ?", "history": json.dumps([["q", "a"]] * 21)},
        timeout=TIMEOUT,
    )
    assert r.status_code == 400 and "history turns is 21, more than the limit of 20" in r.json()["detail"]
    files = [("images", (images[0].name, images[0].read_bytes(), "image/png"))]
    r = httpx.post(server.url + "/search", files=files, data={"query": "a", "top_k": 10**6}, timeout=TIMEOUT)
    assert r.status_code == 400 and "top_k must be between 1 and 64" in r.json()["detail"]


def test_a_body_without_content_length_is_counted(server, images):
    def chunks():  # a chunked upload (no Content-Length): a small image and 80 KB of something else
        yield b'--abc\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        yield images[0].read_bytes()
        yield b'\r\n--abc\r\nContent-Disposition: form-data; name="extra"; filename="b.bin"\r\n\r\n'
        for _ in range(20):
            yield b"x" * 4096  # the body is over the 0.05 MB limit, though no file is
        yield b"\r\n--abc--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=abc"}
    r = httpx.post(server.url + "/caption", content=chunks(), headers=headers, timeout=TIMEOUT)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "limit of 0.05 MB" in r.json()["detail"]


class BlockingCaptioner:
    """A stand-in captioner whose `generate` waits for `release` and records the prompts it ran."""

    methods = ("caption",)
    config = SimpleNamespace(llm=SimpleNamespace(prompt=""))

    def __init__(self):
        self.release = threading.Event()
        self.ran: list[str] = []

    def check_generation_length(self, prompts, options):
        pass

    def generate(self, images, prompts, **options):
        self.ran += prompts
        self.release.wait(TIMEOUT)
        return ["done"] * len(prompts)


def wait_until(condition) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_batcher_skips_cancelled_jobs_and_bounds_its_queue():
    fake = BlockingCaptioner()
    results: list = []
    batcher = Batcher(lambda group, payloads: fake.generate(None, payloads), 1, 0.0, max_queue=2)
    try:
        jobs = [Job(("caption",), p, lambda r, e: results.append(r)) for p in "abcd"]
        batcher.submit(jobs[0])
        wait_until(lambda: fake.ran == ["a"])  # running: no longer waiting
        batcher.submit(jobs[1])
        batcher.submit(jobs[2])
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            batcher.submit(jobs[3])
        batcher.cancel(jobs[1])  # a cancelled job frees its place and never runs
        batcher.submit(jobs[3])
        fake.release.set()
        wait_until(lambda: len(results) == 3)
        assert fake.ran == ["a", "c", "d"] and batcher.waiting == 0
    finally:
        fake.release.set()
        batcher.close()


def test_a_batch_failing_with_a_user_error_runs_again_one_job_at_a_time():
    from blip2.errors import UserError

    calls: list[list[str]] = []

    def run_group(group, payloads):
        calls.append(list(payloads))
        if "bad" in payloads:
            raise UserError("bad is not allowed")
        return [p.upper() for p in payloads]

    answers: dict[str, tuple] = {}
    batcher = Batcher(run_group, 8, 0.5)
    try:
        for p in ["a", "bad", "b"]:
            batcher.submit(Job(("caption",), p, lambda r, e, p=p: answers.__setitem__(p, (r, e))))
        wait_until(lambda: len(answers) == 3)
    finally:
        batcher.close()
    assert calls[0] == ["a", "bad", "b"]  # batched, then each alone
    assert answers["a"] == ("A", None) and answers["b"] == ("B", None)
    assert answers["bad"][0] is None and str(answers["bad"][1]) == "bad is not allowed"


def test_a_timed_out_request_never_runs_and_a_full_queue_gives_503(images):
    fake = BlockingCaptioner()
    settings = ServerSettings(timeout_s=1.0, max_batch=1, batch_wait_ms=0, max_queue=1)
    with Server(create_app([fake], settings)) as s, ThreadPoolExecutor(2) as pool:

        def post(prompt: str):
            return httpx.post(
                s.url + "/caption", files=upload(images[0]), data={"prompt": prompt}, timeout=TIMEOUT
            )

        first = pool.submit(post, "a")
        wait_until(lambda: fake.ran == ["a"])  # the batcher is busy with it
        second = pool.submit(post, "b")
        wait_until(lambda: s.server.config.app.state.batcher.waiting == 1)
        r = post("c")  # the queue (1) is full
        assert r.status_code == 503 and "the server is busy" in r.json()["detail"]
        assert second.result().status_code == 504  # it waited longer than timeout_s in the queue
        assert first.result().status_code == 504
        fake.release.set()
        r = post("d")
        assert r.status_code == 200 and r.json()["caption"] == "done"
    assert fake.ran == ["a", "d"]  # "b" timed out before its turn: it never ran


def test_a_server_without_a_captioner_says_which_model_it_needs(pipes, images):
    _, retriever = pipes
    with Server(create_app([retriever])) as s:
        r = httpx.post(s.url + "/caption", files=upload(images[0]), timeout=TIMEOUT)
    assert r.status_code == 400
    assert "caption needs a stage-2 (generative) checkpoint" in r.json()["detail"]


def test_request_timeout_gives_504(pipes, images):
    captioner, _ = pipes
    with Server(create_app([captioner], ServerSettings(timeout_s=0.001, batch_wait_ms=200))) as s:
        r = httpx.post(s.url + "/caption", files=upload(images[0]), timeout=TIMEOUT)
    assert r.status_code == 504 and "longer than" in r.json()["detail"]


def test_blip2_serve_command_binds_to_localhost(pipes, tmp_path):
    folder = uh.save_captioner(tmp_path / "captioner")
    port = free_port()
    cmd = [sys.executable, "-m", "blip2.cli", "serve", "--model", str(folder), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "blip2 serve did not answer"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health["methods"] == ["ask", "caption", "chat", "generate"]
        listening = (
            subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
            if shutil.which("ss")
            else ""
        )
        if listening:
            assert f"127.0.0.1:{port}" in listening
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stderr.close()


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (scripts/setup.sh installs it)"
)
def test_web_page_upload_caption_and_ask(server, pipes, images):
    playwright = pytest.importorskip("playwright.sync_api")
    captioner, _ = pipes
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    args += ["--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=args, headless=True, timeout=TIMEOUT * 1000
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT * 1000)
            page.goto(server.url + "/")
            page.set_input_files("#image", str(images[3]))
            page.wait_for_selector("#caption[data-done='1']")
            assert page.inner_text("#caption") == captioner.caption(images[3])
            page.fill("#question", "what is it ?")
            page.click("#ask")
            page.wait_for_selector("#answers li .answer")
            assert page.inner_text("#answers li .answer") == captioner.ask(images[3], "what is it ?")
            page.fill("#question", "what is the sky ?")
            page.click("#ask")
            page.wait_for_selector("#answers li:nth-child(2) .answer")
            first = page.inner_text("#answers li .answer")
            expected = captioner.chat(images[3], "what is the sky ?", [("what is it ?", first)])
            assert page.inner_text("#answers li:nth-child(2) .answer") == expected  # the page keeps the chat
            assert page.inner_text("#status") == ""
        finally:
            browser.close()


def test_instructblip_is_served_with_each_question_reaching_its_qformer(tmp_path, images):
    """An InstructBLIP model behind /caption and /ask; concurrent questions batched together each get
    the answer their own question gives alone (the question is also the Q-Former's instruction)."""
    import eval_fixtures as fx

    pipe = blip2.load(fx.instruct_folder(tmp_path / "instruct"))
    assert pipe.config.kind == "instruct"
    questions = ["what is the sky ?", "what is on the couch ?", "what is red ?", "what is the cat ?"]
    alone = [pipe.ask(images[i], q, num_beams=1) for i, q in enumerate(questions)]
    assert len(set(alone)) > 1  # the questions change the answers
    settings = ServerSettings(batch_wait_ms=300, max_batch=8)
    with Server(create_app([pipe], settings)) as s:

        def ask(i: int) -> str:
            data = {"question": questions[i], "num_beams": 1}
            r = httpx.post(s.url + "/ask", files=upload(images[i]), data=data, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            return r.json()["answer"]

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(ask, range(4))) == alone
        health = httpx.get(s.url + "/health", timeout=TIMEOUT).json()
        assert health["requests"] == 4 and health["batches"] < 4  # some questions shared a batch
        r = httpx.post(s.url + "/caption", files=upload(images[0]), data={"num_beams": 1}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["caption"] == pipe.caption(images[0], num_beams=1)
        assert {"caption", "ask"} <= set(httpx.get(s.url + "/health", timeout=TIMEOUT).json()["methods"])
