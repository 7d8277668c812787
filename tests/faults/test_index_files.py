"""Faults of an image index's files, injected into a built index and met through `blip2 index ...` and
`blip2 search --index`: a segment's vectors truncated or deleted, a line of `entries.jsonl` that is not
an entry, `index.json` without a field. Each is one sentence naming the damaged file and what to do,
and the file is left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import usage_helpers as uh

from blip2.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[str, Path, Path]:
    """A retriever, its index of 12 images (one segment) and the images' folder."""
    base = tmp_path_factory.mktemp("built")
    retriever = str(uh.save_retriever(base / "retriever"))
    uh.make_images(base / "images", 12)
    out = base / "photos.index"
    assert main(["index", "build", str(base / "images"), "--model", retriever, "--out", str(out)]) == 0
    return retriever, out, base / "images"


def truncate(index: Path) -> tuple[Path, str]:
    vec = index / "segments" / "000000.vec"
    vec.write_bytes(vec.read_bytes()[: vec.stat().st_size // 2])
    return vec, "holds 6 rows where entries.jsonl uses 12"


def delete(index: Path) -> tuple[Path, str]:
    (index / "segments" / "000000.vec").unlink()
    return index / "segments" / "000000.vec", "is missing"


def garbage(index: Path) -> tuple[Path, str]:
    log = index / "entries.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join([*lines[:3], "garbage\n", *lines[3:]]))
    return log, "line 4 is not an index entry"


def missing_key(index: Path) -> tuple[Path, str]:
    meta = json.loads((index / "index.json").read_text())
    del meta["dim"]
    (index / "index.json").write_text(json.dumps(meta))
    return index / "index.json", "has no valid 'dim'"


@pytest.mark.parametrize("damage", [truncate, delete, garbage, missing_key])
def test_a_damaged_index_file_is_named_in_one_sentence(built, tmp_path, capsys, damage):
    retriever, original, images = built
    index = tmp_path / "damaged.index"
    shutil.copytree(original, index)
    path, words = damage(index)
    before = path.read_bytes() if path.exists() else None
    commands = [
        ["index", "info", str(index)],
        ["search", "--index", str(index), "a dog", "--candidates", "5"],
        ["index", "add", str(index), str(images / "img000.png")],
        ["index", "remove", str(index), str(images / "img001.png")],
        ["index", "rebuild", str(index)],
    ]
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert f"{path} {words} (the index is damaged)" in err and "blip2 index build" in err, err
    assert (path.read_bytes() if path.exists() else None) == before  # left as it was
