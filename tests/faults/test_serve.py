"""Hostile and careless requests to `blip2 serve`, started as a user starts it (the command, in its own
process) and driven over real HTTP: a request whose images fit one by one but not together is refused
before any of them is decoded (the server's peak memory measured), a slow image decode does not hold up
`/health`, and a long conversation, an empty question and bad generation lengths get one-sentence 400s.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import usage_helpers as uh

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

TIMEOUT = 120  # seconds; the machine is shared and loaded
BUDGET = 30_000_000  # --max-request-pixels of the server under test
SERVER_BUDGET = 40_000_000  # its --max-server-pixels: one 5000 x 5000 image in flight fits, two do not
SIDE = 5000  # a 5000 x 5000 image: 25 million pixels, within the budget alone; six are not
MB = 2**20


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(side: int, paeth: bool = False) -> bytes:
    """A `side` x `side` black RGB PNG, small on the wire (its rows compress to almost nothing), large
    once decoded; with the Paeth filter on every row (`paeth`), seconds to decode."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes([4 if paeth else 0]) + bytes(side * 3)
    z = zlib.compressobj(6)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`blip2 serve` with a captioner and a retriever, a 30-million-pixel request budget, a 40-million
    server budget and a 2000-character text limit: yields (url, process)."""
    root = tmp_path_factory.mktemp("served")
    captioner, retriever = uh.save_captioner(root / "captioner"), uh.save_retriever(root / "retriever")
    port = free_port()
    cmd = [sys.executable, "-m", "blip2.cli", "serve", "--model", str(captioner), "--model", str(retriever)]
    cmd += ["--port", str(port), "--max-request-pixels", str(BUDGET), "--max-text-chars", "2000"]
    cmd += ["--timeout", str(TIMEOUT), "--max-server-pixels", str(SERVER_BUDGET)]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()
            assert time.monotonic() < deadline, "blip2 serve did not answer"
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    return uh.make_images(tmp_path_factory.mktemp("small"), 1)[0]


def peak_rss_growth(pid: int, request) -> tuple[int, object]:
    """Run `request()`; return how far the process's peak resident memory rose above its resident
    memory before it (bytes), and the request's result. Linux: VmHWM, reset through clear_refs."""

    def status(key: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {key} in /proc/{pid}/status")

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from the current size
    before = status("VmRSS")
    result = request()
    return status("VmHWM") - before, result


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through Linux /proc")
def test_images_over_the_request_budget_are_refused_before_they_are_decoded(served):
    url, proc = served
    big = png(SIDE)
    assert len(big) < 200_000  # 75 MB once decoded (RGB), a few KB on the wire
    files = [("images", (f"big{i}.png", big, "image/png")) for i in range(6)]

    def search():
        return httpx.post(url + "/search", files=files, data={"query": "a dog"}, timeout=TIMEOUT)

    grown, r = peak_rss_growth(proc.pid, search)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == (
        f"the 6 images have {6 * SIDE * SIDE} pixels together, more than the limit of {BUDGET} per "
        "request: send fewer or smaller images"
    )
    assert grown < 30 * MB, f"the refused request took {grown / MB:.0f} MB"  # decoded: 450 MB

    # the measurement sees a decode: one such image alone is within the budget, and is decoded
    def caption():
        return httpx.post(url + "/caption", files={"image": ("big.png", big, "image/png")}, timeout=TIMEOUT)

    grown, r = peak_rss_growth(proc.pid, caption)
    assert r.status_code == 200, r.text
    assert grown > 60 * MB, f"decoding 75 MB of pixels raised the peak by only {grown / MB:.0f} MB"


def test_a_slow_decode_does_not_hold_up_health(served):
    url, _ = served
    slow = png(SIDE, paeth=True)  # allowed (25 million pixels), and seconds to decode
    result: dict = {}

    def caption() -> None:
        files = {"image": ("slow.png", slow, "image/png")}
        result["response"] = httpx.post(url + "/caption", files=files, timeout=TIMEOUT)

    thread = threading.Thread(target=caption)
    started = time.monotonic()
    thread.start()
    waits = []
    with httpx.Client(timeout=TIMEOUT) as client:
        while thread.is_alive():
            t = time.monotonic()
            assert client.get(url + "/health").json()["status"] == "ok"
            waits.append(time.monotonic() - t)
            time.sleep(0.05)
    thread.join()
    took = time.monotonic() - started
    assert result["response"].status_code == 200, result["response"].text
    assert len(waits) >= 3, f"the slow request took only {took:.1f} s: nothing to measure"
    assert max(waits) < 1.0, f"/health waited {max(waits):.1f} s while an image was decoded ({took:.1f} s)"


def test_concurrent_uploads_beyond_the_server_budget_get_503_before_decoding(served):
    url, _ = served
    slow = png(SIDE, paeth=True)  # 25 million pixels, seconds to decode: the requests overlap

    def caption(i: int) -> httpx.Response:
        files = {"image": (f"slow{i}.png", slow, "image/png")}
        return httpx.post(url + "/caption", files=files, timeout=TIMEOUT)

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(caption, range(3)))
    codes = sorted(r.status_code for r in responses)
    assert codes[0] == 200 and codes[-1] == 503, [r.text for r in responses]
    for r in responses:
        if r.status_code == 503:
            detail = r.json()["detail"]
            assert detail == "the server is decoding as many images as it can hold; try again in a moment"
    assert httpx.get(url + "/health", timeout=TIMEOUT).json()["pixels_in_flight"] == 0  # all given back
    assert caption(3).status_code == 200  # the budget is free again


def test_conversation_length_is_bounded(served, small_image):
    url, _ = served
    image = {"image": (small_image.name, small_image.read_bytes(), "image/png")}

    def ask(history: list) -> httpx.Response:
        data = {"question": "what is it ?", "history": json.dumps(history)}
        return httpx.post(url + "/ask", files=image, data=data, timeout=TIMEOUT)

    r = ask([["what is the sky ?", "blue " * 190]] * 2)  # about 1900 characters: allowed
    assert r.status_code == 200, r.text
    r = ask([["what is the sky ?", "blue " * 190]] * 3)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "characters long, more than the limit of 2000: leave out earlier turns" in detail, detail
    r = ask([["q", "a"]] * 21)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "the number of history turns is 21, more than the limit of 20: send fewer"
    # the limit is on the text, not only on the JSON around it
    r = ask([["what is it ?", "x" * 1978]])  # 2000 characters of JSON, 2002 of text with the question
    assert r.status_code == 400 and "the question with its history is 2002 characters long" in r.text


def test_empty_questions_and_bad_generation_lengths_get_one_sentence(served, small_image):
    url, _ = served
    image = {"image": (small_image.name, small_image.read_bytes(), "image/png")}

    def post(endpoint: str, data: dict) -> tuple[int, str]:
        r = httpx.post(f"{url}/{endpoint}", files=image, data=data, timeout=TIMEOUT)
        detail = r.json().get("detail")
        assert isinstance(detail, str) and "\n" not in detail, (data, r.text)  # one sentence
        return r.status_code, detail

    assert post("ask", {"question": ""}) == (400, "the question is empty: type one")
    assert post("ask", {"question": " \t"}) == (400, "the question is empty: type one")
    assert post("ask", {}) == (400, "the question is empty: type one")
    ask = {"question": "what is it ?"}
    cases = [
        ("ask", {**ask, "max_new_tokens": 0}, "max_new_tokens must be 1 or more (got 0)"),
        ("ask", {**ask, "max_new_tokens": -5}, "max_new_tokens must be 1 or more (got -5)"),
        ("ask", {**ask, "max_new_tokens": 10**9}, "max_new_tokens must be between 1 and 256"),
        ("ask", {**ask, "max_new_tokens": "ten"}, "max_new_tokens must be a whole number, not 'ten'"),
        ("ask", {**ask, "num_beams": "2.5"}, "num_beams must be a whole number, not '2.5'"),
        ("caption", {"max_new_tokens": 3, "min_new_tokens": 9}, "min_new_tokens (9) must not be more than"),
        ("caption", {"min_new_tokens": -1}, "min_new_tokens must be 0 or more (got -1)"),
        ("caption", {"max_new_tokens": "3.5"}, "max_new_tokens must be a whole number, not '3.5'"),
        ("caption", {"repetition_penalty": "x"}, "repetition_penalty must be a number, not 'x'"),
        ("caption", {"max_new_tokens": 200}, "the language model reads at most 128 positions"),
    ]
    for endpoint, data, words in cases:
        status, detail = post(endpoint, data)
        assert status == 400 and detail.startswith(words), (data, status, detail)
    files = [("images", (small_image.name, small_image.read_bytes(), "image/png"))]
    r = httpx.post(url + "/search", files=files, data={"query": " "}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["detail"] == "the query is empty: type some words"
    r = httpx.post(url + "/search", files=files, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["detail"] == "the query is empty: type some words"
