"""The server's index search, its OpenAI-compatible chat endpoint, its API key and its access log, through
real clients: the official `openai` package against the running server (loopback), httpx, `blip2
serve` itself and the web page in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import usage_helpers as uh
from test_usage_serve import CHROMIUM, TIMEOUT, Server, free_port, wait_until

httpx = pytest.importorskip("httpx")

import blip2  # noqa: E402
from blip2.cli import main  # noqa: E402
from blip2.index import Index  # noqa: E402
from blip2.serve import ServerSettings, create_app  # noqa: E402

NAME = "tiny-blip2"  # the name the captioner is served under


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_api")
    images = root / "photos"
    uh.make_images(images, 8)
    from PIL import Image

    Image.new("RGB", (600, 300), (200, 30, 30)).save(images / "wide.png")  # thumbnailed to 256 x 128
    return {
        "captioner": uh.save_captioner(root / "captioner"),
        "retriever": uh.save_retriever(root / "retriever"),
        "images": images,
        "index": root / "photos.index",
    }


@pytest.fixture(scope="module")
def pipes(folders):
    return blip2.load(folders["captioner"]), blip2.load(folders["retriever"])


@pytest.fixture(scope="module")
def index_path(folders) -> Path:
    out = folders["index"]
    cmd = ["index", "build", str(folders["images"]), "--model", str(folders["retriever"]), "--out", str(out)]
    assert main(cmd) == 0
    return out


@pytest.fixture(scope="module")
def server(pipes, index_path):
    settings = ServerSettings(batch_wait_ms=50, max_upload_mb=1.0, max_pixels=500_000)
    app = create_app(list(pipes), settings, index=Index.open(index_path), model_name=NAME)
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str | None, image: Path | None) -> dict:
    parts = [] if text is None else [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"role": "user", "content": parts}


def photos(folders) -> list[Path]:
    return sorted(folders["images"].glob("img*.png"))


def test_openai_client_gets_the_pipelines_answers(client, pipes, folders):
    captioner, _ = pipes
    tok = captioner.llm_tokenizer
    image = photos(folders)[1]
    question = "what is it ?"

    reply = client.chat.completions.create(model=NAME, messages=[user(question, image)], max_tokens=8)
    expected = captioner.chat(image, question, max_new_tokens=8)
    assert reply.model == NAME and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    made = len(tok(expected, add_special_tokens=False)["input_ids"])
    assert reply.usage.completion_tokens == made
    assert reply.choices[0].finish_reason == ("length" if made >= 8 else "stop")
    prompt = captioner.conversation_prompt(question)
    assert reply.usage.prompt_tokens == captioner.config.qformer.num_query_tokens + len(
        tok(prompt)["input_ids"]
    )
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + made

    # streaming: chunks of text as they are generated, then why it ended, the usage and [DONE]
    stream = client.chat.completions.create(
        model=NAME,
        messages=[user(question, image)],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == NAME for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces
    assert text == "".join(captioner.chat(image, question, stream=True, max_new_tokens=8)).strip()
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    # temperature 0: greedy; an image without text: its caption; the conversation: `chat` with history
    greedy = client.chat.completions.create(
        model=NAME, messages=[user(question, image)], max_tokens=8, temperature=0
    )
    assert greedy.choices[0].message.content == captioner.chat(image, question, max_new_tokens=8, num_beams=1)
    caption = client.chat.completions.create(model=NAME, messages=[user(None, image)], max_tokens=6)
    assert caption.choices[0].message.content == captioner.caption(image, max_new_tokens=6)
    turns = [
        {"role": "system", "content": "You are a helpful assistant."},  # ignored: BLIP-2 has no system prompt
        user(None, image),  # the image alone, captioned: left out of the conversation
        {"role": "assistant", "content": "w5 w6"},
        {"role": "user", "content": "what is the sky ?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and the cat ?"},
    ]
    later = client.chat.completions.create(model=NAME, messages=turns, max_tokens=8)
    expected = captioner.chat(image, "and the cat ?", [("what is the sky ?", "blue")], max_new_tokens=8)
    assert later.choices[0].message.content == expected

    # stop: the text is cut before the first stop string, streamed or not
    words = captioner.chat(image, question, max_new_tokens=8, num_beams=1).split()
    stop = words[2]
    cut = " ".join(words[: words.index(stop)])
    kw = dict(model=NAME, messages=[user(question, image)], max_tokens=8, temperature=0, stop=[stop])
    stopped = client.chat.completions.create(**kw)
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_chat_requests_it_cannot_serve_get_openai_errors(client, server, folders):
    image = photos(folders)[0]
    cases = [
        (
            dict(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/a.jpg"}}],
                    }
                ]
            ),
            openai.BadRequestError,
            "the server fetches nothing: send the image as a base64 data URL",
        ),
        (
            dict(messages=[user("a ?", image), user("b ?", image)]),
            openai.BadRequestError,
            "exactly one image",
        ),
        (dict(messages=[{"role": "user", "content": "hello"}]), openai.BadRequestError, "hold 0 images"),
        (dict(messages=[user("a ?", image)], n=2), openai.BadRequestError, "n must be 1"),
        (
            dict(messages=[user("a ?", image)], logprobs=True),
            openai.BadRequestError,
            "logprobs is not supported",
        ),
        (dict(messages=[user("a ?", image)], max_tokens=0), openai.BadRequestError, "max_tokens must be"),
    ]
    for extra, error, words in cases:
        with pytest.raises(error) as caught:
            client.chat.completions.create(model=NAME, **extra)
        assert words in caught.value.message, caught.value.message
    # hostile input stays within the server's limits, answered in OpenAI's error shape
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(png, format="PNG")  # a small file, a million pixels
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    wide = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match="has 1000x1000 pixels, more than the limit of 500000"):
        client.chat.completions.create(model=NAME, messages=wide)
    with pytest.raises(openai.APIStatusError, match="more than the limit of 1 MB") as caught:
        client.chat.completions.create(model=NAME, messages=[user("x" * 2_000_000, image)])
    assert caught.value.status_code == 413
    turns = [user("a ?", image)] + [{"role": r, "content": "b"} for r in ["assistant", "user"] * 21]
    with pytest.raises(openai.BadRequestError, match="earlier turns is 21, more than the limit of 20"):
        client.chat.completions.create(model=NAME, messages=turns)

    # what fails before a stream starts gets its status, as without streaming
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="the language model reads at most 128 positions"):
            client.chat.completions.create(
                model=NAME, messages=[user("a ?", image)], max_tokens=200, stream=stream
            )

    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4o' does not exist here"):
        client.chat.completions.create(model="gpt-4o", messages=[user("a ?", image)])
    assert [m.id for m in client.models.list()] == [NAME]

    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "the request body is not JSON",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_max_tokens_above_the_servers_most_counts_as_it(pipes, folders, client):
    """OpenAI clients (lmms-eval too) ask for 1024 tokens and more: above the server's `max_new_tokens`
    `max_tokens` counts as it, and the answer says it ended there (finish_reason "length"); when even that
    does not fit the model, the 400 speaks of the request's max_tokens."""
    captioner, _ = pipes
    image = photos(folders)[1]
    question = "what is it ?"
    with Server(create_app([captioner], ServerSettings(max_new_tokens=6), model_name=NAME)) as s:
        small = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        kw = dict(model=NAME, messages=[user(question, image)], max_tokens=1000, temperature=0)
        reply = small.chat.completions.create(**kw)
        expected = captioner.chat(image, question, max_new_tokens=6, num_beams=1)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
        assert expected != captioner.chat(image, question, max_new_tokens=12, num_beams=1)  # it was cut
        chunks = list(small.chat.completions.create(**kw, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
        # the defaults count as the server's most too (a caption's is 30 new tokens)
        caption = small.chat.completions.create(model=NAME, messages=[user(None, image)])
        assert caption.choices[0].message.content == captioner.caption(image, max_new_tokens=6)
        assert caption.choices[0].finish_reason == "length"
        # the form routes refuse more than the server's most
        r = httpx.post(
            s.url + "/caption",
            files={"image": ("a.png", image.read_bytes())},
            data={"max_new_tokens": "7"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 400 and r.json()["detail"] == "max_new_tokens must be between 1 and 6"

    # the module's server: 256 at most, and a language model of 128 positions
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=[user(question, image)], max_tokens=1000)
    message = caught.value.body["message"]
    assert "the language model reads at most 128 positions" in message
    assert "with max_tokens=1000 (counted as 256, this server's most) need" in message
    assert re.search(r"ask for at most \d+ new tokens or shorten the prompt$", message), message
    with pytest.raises(openai.BadRequestError, match="with max_tokens=200 need"):
        client.chat.completions.create(model=NAME, messages=[user(question, image)], max_tokens=200)


def test_hostile_requests_get_one_sentence_4xx(server, client, folders):
    """Each request the server cannot serve gets a 4xx with one sentence, never a 500 or a traceback."""
    image = photos(folders)[0]
    png = {"image": ("a.png", image.read_bytes())}

    def refused(r: httpx.Response, status: int, words: str) -> None:
        assert r.status_code == status, r.text
        detail = r.json()["detail"] if "detail" in r.json() else r.json()["error"]["message"]
        assert words in detail and "\n" not in detail and "Traceback" not in r.text, detail

    ask = server.url + "/ask"
    deep = "[" * 3000 + "]" * 3000  # within the text limit, deeper than Python's JSON parser goes
    for history in (deep, '{"q": "a"}', '[["q", "a", "b"]]'):
        r = httpx.post(ask, files=png, data={"question": "a ?", "history": history}, timeout=TIMEOUT)
        refused(r, 400, 'history must be JSON like [["question", "answer"], ...]')
    for value in ("inf", "nan"):
        r = httpx.post(server.url + "/caption", files=png, data={"length_penalty": value}, timeout=TIMEOUT)
        refused(r, 400, f"length_penalty must be a finite number, not {value}")

    chat = server.url + "/v1/chat/completions"
    many = [user("a ?", image)] + [{"role": "system", "content": "be brief"}] * 64
    r = httpx.post(chat, json={"model": NAME, "messages": many}, timeout=TIMEOUT)
    refused(r, 400, "the number of messages is 65, more than the limit of 64: send a shorter conversation")
    parts = [{"type": "text", "text": ""}] * 64 + user("a ?", image)["content"]
    r = httpx.post(
        chat, json={"model": NAME, "messages": [{"role": "user", "content": parts}]}, timeout=TIMEOUT
    )
    refused(r, 400, "the number of parts of messages[0] is 66, more than the limit of 64")
    bad_text = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
    r = httpx.post(chat, json={"model": NAME, "messages": bad_text}, timeout=TIMEOUT)
    refused(r, 400, 'messages[0] has a text part without a string "text"')
    nan = b'{"model": "%s", "messages": [], "temperature": NaN}' % NAME.encode()
    r = httpx.post(chat, content=nan, timeout=TIMEOUT)
    refused(r, 400, "messages must be a list of at least one message")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError, match="tools is not supported by this server"):
        client.chat.completions.create(model=NAME, messages=[user("a ?", image)], stream=True, tools=tools)


def test_access_log_has_one_line_per_request(server, client, folders, caplog):
    """Streams (logged once they end, or once the client leaves), refusals and unknown paths included."""
    image = photos(folders)[0]
    made = []  # (method, path, status) of each request, in order

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "blip2.serve.access"]

    with caplog.at_level(logging.INFO, logger="blip2.serve.access"):
        stream = client.chat.completions.create(
            model=NAME, messages=[user("a ?", image)], max_tokens=8, stream=True
        )
        assert len(list(stream)) > 2
        made.append(("POST", "/v1/chat/completions", 200))
        left = client.chat.completions.create(
            model=NAME, messages=[user("a ?", image)], max_tokens=8, stream=True
        )
        next(iter(left))
        left.close()  # the client leaves in the middle of the stream
        made.append(("POST", "/v1/chat/completions", 200))
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=NAME, messages=[user("a ?", image)], n=2, stream=True)
        made.append(("POST", "/v1/chat/completions", 400))
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[user("a ?", image)])
        made.append(("POST", "/v1/chat/completions", 404))
        r = httpx.post(server.url + "/caption", content=b"x" * (2 * 2**20), timeout=TIMEOUT)
        assert r.status_code == 413
        made.append(("POST", "/caption", 413))
        r = httpx.post(server.url + "/ask", files={"image": ("a.png", image.read_bytes())}, timeout=TIMEOUT)
        assert r.status_code == 400
        made.append(("POST", "/ask", 400))
        assert httpx.get(server.url + "/nowhere", timeout=TIMEOUT).status_code == 404
        made.append(("GET", "/nowhere", 404))
        assert httpx.get(server.url + "/search", params={"q": "a secret"}, timeout=TIMEOUT).status_code == 200
        made.append(("GET", "/search", 200))
        wait_until(lambda: len(lines()) >= len(made))
    logged = lines()
    line = re.compile(r"127\.0\.0\.1:\d+ (\S+) (\S+) (\d+) \d+\.\d ms")
    parsed = [line.fullmatch(x) for x in logged]
    assert all(parsed), logged
    assert sorted((m[1], m[2], int(m[3])) for m in parsed) == sorted(made), logged
    assert not any("secret" in x for x in logged)  # the query string stays out of the log


def test_index_search_ranks_as_blip2_search_index(server, index_path, capsys):
    for query in ("a dog", "two red cats on a sofa"):
        r = httpx.get(server.url + "/search", params={"q": query, "top_k": 6, "rerank": 4}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        hits = r.json()["results"]
        assert (
            main(["search", "--index", str(index_path), query, "--top-k", "6", "--rerank", "4", "--json"])
            == 0
        )
        expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [h["path"] for h in hits] == [e["image"] for e in expected]
        assert [h["rank"] for h in hits] == list(range(1, 7))
        for got, want in zip(hits, expected, strict=True):
            assert got["itc"] == pytest.approx(want["itc"], abs=1e-5)
            assert (got["itm"] is None) == (want["itm"] is None)
            if want["itm"] is not None:
                assert got["itm"] == pytest.approx(want["itm"], abs=1e-5)
                assert got["score"] == pytest.approx(want["score"], abs=1e-5)

    # thumbnails: a small JPEG of an indexed image, by its position; nothing else is ever read
    index = Index.open(index_path)
    wide = index.paths.index(next(p for p in index.paths if p.endswith("wide.png")))
    r = httpx.get(f"{server.url}/thumbnail/{wide}", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert Image.open(io.BytesIO(r.content)).size == (256, 128)
    assert hits[0]["thumbnail"] == f"/thumbnail/{hits[0]['index']}"
    for bad, status in [(len(index), 404), (-1, 404), ("..%2F..%2Fetc%2Fpasswd", 404), ("abc", 400)]:
        r = httpx.get(f"{server.url}/thumbnail/{bad}", timeout=TIMEOUT)
        assert r.status_code == status, r.text
    r = httpx.get(server.url + "/search", params={"q": " "}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["detail"] == "the query is empty: type some words"
    r = httpx.get(server.url + "/search", params={"q": "a", "top_k": 1000}, timeout=TIMEOUT)
    assert r.status_code == 400 and "top_k must be between 1 and 64" in r.json()["detail"]


def test_a_server_without_an_index_says_so(pipes):
    with Server(create_app(list(pipes))) as s:
        r = httpx.get(s.url + "/search", params={"q": "a dog"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "this server has no index: start it with --index" in r.json()["detail"]


def test_api_key_is_required_on_every_route_but_the_page(pipes, folders, caplog):
    captioner, _ = pipes
    image = photos(folders)[0]
    with caplog.at_level(logging.INFO, logger="blip2.serve.access"):
        with Server(create_app([captioner], model_name=NAME, api_key="s3cret")) as s:
            assert httpx.get(s.url + "/", timeout=TIMEOUT).status_code == 200  # the page asks for the key
            r = httpx.get(s.url + "/health", timeout=TIMEOUT)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.json() == {
                "detail": "the API key is missing: send the header Authorization: Bearer <key>"
            }
            r = httpx.get(s.url + "/health", headers={"Authorization": "Bearer wrong"}, timeout=TIMEOUT)
            assert r.status_code == 401 and r.json() == {"detail": "the API key is not valid"}
            r = httpx.get(s.url + "/health", headers={"Authorization": "Bearer s3cret"}, timeout=TIMEOUT)
            assert r.status_code == 200 and r.json()["model"] == NAME
            r = httpx.post(
                s.url + "/caption", files={"image": ("a.png", image.read_bytes())}, timeout=TIMEOUT
            )
            assert r.status_code == 401

            wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
            with pytest.raises(openai.AuthenticationError) as caught:
                wrong.chat.completions.create(model=NAME, messages=[user("a ?", image)])
            assert caught.value.status_code == 401
            assert caught.value.body == {
                "message": "the API key is not valid",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_api_key",
            }
            right = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=TIMEOUT)
            reply = right.chat.completions.create(model=NAME, messages=[user("a ?", image)], max_tokens=3)
            assert reply.choices[0].message.content == captioner.chat(image, "a ?", max_new_tokens=3)

    # one access-log line a request, the refused ones included: client, method, path, status, latency
    lines = [r.getMessage() for r in caplog.records if r.name == "blip2.serve.access"]
    line = r"127\.0\.0\.1:\d+ {} {} {} \d+\.\d ms"
    for method, path, status in [
        ("GET", "/", 200),
        ("GET", "/health", 401),
        ("GET", "/health", 200),
        ("POST", "/caption", 401),
        ("POST", "/v1/chat/completions", 401),
        ("POST", "/v1/chat/completions", 200),
    ]:
        assert any(re.fullmatch(line.format(method, re.escape(path), status), x) for x in lines), lines
    assert len(lines) == 7  # and nothing else


def test_serving_other_machines_needs_a_key_or_insecure(index_path, capsys):
    assert main(["serve", "--index", str(index_path), "--host", "0.0.0.0"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "--host 0.0.0.0 lets other machines in: give --api-key (or BLIP2_API_KEY), or --insecure to serve "
            "it without one"
        )
    )
    assert main(["serve", "--host", "127.0.0.1"]) == 2
    assert (
        "give the model to serve (--model), an index to search (--index), or both" in capsys.readouterr().err
    )


def test_stop_strings_are_cut_across_pieces():
    from blip2.serve.chat import StopCut, cut

    cutter = StopCut(["END", "\n\n"])
    sent = [cutter.feed(p) for p in [" a b", " E", "N", "x c ", "\n", "\nmore"]]
    assert "".join(sent) + cutter.finish() == "a b ENx c" and cutter.stopped
    assert sent[1:4] == [" ", "", "ENx c"]  # "E" and "EN" held back until they were not "END"
    assert cut("  one two END three", ["END"]) == ("one two", True)
    assert cut("  one two  ", ["END"]) == ("one two", False)


@pytest.mark.slow
def test_blip2_serve_with_an_index_and_a_key(folders, index_path):
    """`blip2 serve --index` alone loads the model the index records; a key guards it; each request is
    one line on stderr."""
    port = free_port()
    cmd = [sys.executable, "-m", "blip2.cli", "serve", "--index", str(index_path), "--port", str(port)]
    env = {**os.environ, "BLIP2_API_KEY": "k3y"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k3y"}
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "blip2 serve did not answer"
            try:
                health = httpx.get(url + "/health", headers=key, timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["index"] == 9
        assert httpx.get(url + "/search", params={"q": "a dog"}, timeout=TIMEOUT).status_code == 401
        r = httpx.get(url + "/search", params={"q": "a dog", "top_k": 3}, headers=key, timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        err = proc.stderr.read()
        proc.stderr.close()
    assert "9 indexed images" in err and "API key required" in err
    assert re.search(r"127\.0\.0\.1:\d+ GET /search 401 \d+\.\d ms", err), err
    assert re.search(r"127\.0\.0\.1:\d+ GET /search 200 \d+\.\d ms", err), err


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (scripts/setup.sh installs it)"
)
def test_web_page_searches_the_index_and_matches_with_the_key(pipes, index_path):
    playwright = pytest.importorskip("playwright.sync_api")
    _, retriever = pipes
    index = Index.open(index_path)
    expected = index.search(retriever, "a dog", top_k=10)
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with Server(create_app([retriever], index=index, api_key="k3y")) as s, playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=args, headless=True, timeout=TIMEOUT * 1000
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT * 1000)
            page.goto(s.url + "/")
            page.wait_for_selector("#key-form:not([hidden])")  # the page asks for the key
            page.fill("#key", "k3y")
            page.click("#key-form button")
            page.wait_for_selector("#search-section:not([hidden])")
            assert page.inner_text("#search-what") == "Search the server's 9 indexed images."
            page.fill("#query", "a dog")
            page.click("#search")
            page.wait_for_selector("#results[data-done]")
            assert page.locator("#results .path").all_inner_texts() == [
                index.paths[h.index] for h in expected
            ]
            # every thumbnail was fetched with the key and decoded by the browser
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            assert page.inner_text("#status") == ""
            # the match form: the chosen image against two texts, ITM and ITC as the retriever scores them
            photo = index.paths[expected[0].index]
            page.set_input_files("#image", photo)
            page.wait_for_selector("#match-form:not([hidden]) #match:not([disabled])")
            page.fill("#texts", "a dog; two cats")
            page.click("#match")
            page.wait_for_selector("#matches tr:nth-child(3)")
            rows = [r.split("\t") for r in page.locator("#matches tr").all_inner_texts()[1:]]
            itm, itc = retriever.pair_scores([photo, photo], ["a dog", "two cats"])
            assert rows == [
                [t, f"{m:.3f}", f"{c:.3f}"] for t, m, c in zip(["a dog", "two cats"], itm, itc, strict=True)
            ]
            assert page.inner_text("#status") == ""
        finally:
            browser.close()
