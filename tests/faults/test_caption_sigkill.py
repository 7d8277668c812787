"""`blip2 caption` killed with SIGKILL mid-run, then rerun: the results equal an uninterrupted run's,
caption for caption (not only one line per image)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import usage_helpers as uh

TIMEOUT = 300  # the machine is shared and loaded: be generous


def _captions(path) -> dict[str, str]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_image = {r["image"]: r["caption"] for r in records}
    assert len(by_image) == len(records)  # each image once
    return by_image


@pytest.mark.slow  # three command-line runs
def test_captions_after_sigkill_and_resume_equal_an_uninterrupted_run(tmp_path):
    captioner = uh.save_captioner(tmp_path / "captioner")
    paths = uh.make_images(tmp_path / "images", 30)

    def command(out) -> list[str]:
        return [sys.executable, "-m", "blip2.cli", "caption", "--model", str(captioner), str(tmp_path / "images"),
                "--out", str(out), "--batch-size", "1", "--workers", "0", "--num-beams", "2",
                "--max-new-tokens", "12", "--no-progress"]  # fmt: skip

    whole = tmp_path / "whole.jsonl"
    subprocess.run(command(whole), check=True, timeout=TIMEOUT, capture_output=True)
    expected = _captions(whole)
    assert sorted(expected) == sorted(map(str, paths))
    assert len(set(expected.values())) > 1  # different images, different captions

    out = tmp_path / "resumed.jsonl"
    proc = subprocess.Popen(command(out), stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert 3 <= out.read_text().count("\n") < len(paths)
    with open(out, "a") as f:  # a write torn by the kill: half a line, no newline
        f.write('{"image": "' + str(paths[-1])[:10])
    subprocess.run(command(out), check=True, timeout=TIMEOUT, capture_output=True)
    assert _captions(out) == expected
