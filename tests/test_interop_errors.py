"""Checkpoints a user can get wrong: each gives one clear sentence (a `UserError`) that names the problem."""

from __future__ import annotations

import pytest
import tiny_hf
import torch
from safetensors.torch import load_file, save_file

import blip2
from blip2.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, tok = tiny_hf.retrieval_model("a")
    return tiny_hf.save_retrieval(model, tok, tmp_path_factory.mktemp("itm"))


def _edit(folder, tmp_path, edit) -> str:
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    edit(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _message(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and text.strip()
    return text


def test_missing_key(folder, tmp_path):
    out = _edit(folder, tmp_path, lambda s: s.pop("qformer.encoder.layer.1.attention.output.dense.weight"))
    text = _message(lambda: blip2.load(out))
    assert "missing keys qformer.layers.1.self_attn.out.weight" in text


def test_unexpected_key(folder, tmp_path):
    out = _edit(
        folder, tmp_path, lambda s: s.update({"qformer.encoder.layer.0.adapter.weight": torch.zeros(2)})
    )
    assert "unexpected keys qformer.encoder.layer.0.adapter.weight" in _message(lambda: blip2.load(out))


def test_wrong_shape(folder, tmp_path):
    out = _edit(folder, tmp_path, lambda s: s.update({"itm_head.weight": torch.zeros(3, 32)}))
    text = _message(lambda: blip2.load(out))
    assert "wrong shapes itm_head.weight (checkpoint [3, 32], model [2, 32])" in text


def test_path_that_does_not_exist(tmp_path):
    assert "does not exist" in _message(lambda: blip2.load(tmp_path / "nope"))
    assert "does not exist" in _message(lambda: blip2.load("./models/blip2"))


def test_hub_id_while_offline(tmp_path):
    text = _message(
        lambda: blip2.load("Salesforce/blip2-opt-2.7b", cache_dir=tmp_path, local_files_only=True)
    )
    assert "Salesforce/blip2-opt-2.7b is not in the local Hugging Face cache" in text


def test_pickle_with_objects_is_refused(tmp_path):
    torch.save({"model": {"temp": torch.ones(())}, "config": _Anything()}, tmp_path / "blip2_pretrained.pth")
    assert "unpickling" in _message(lambda: blip2.load(tmp_path / "blip2_pretrained.pth"))


def test_lavis_file_without_preset_or_encoder(tmp_path):
    torch.save({"model": {"temp": torch.ones(())}}, tmp_path / "mine.pth")
    assert "preset=" in _message(lambda: blip2.load(tmp_path / "mine.pth"))
    assert "vision_weights=" in _message(lambda: blip2.load(tmp_path / "mine.pth", preset="tiny-stage1"))


def test_bad_dtype_and_kind(folder):
    assert "unknown dtype" in _message(lambda: blip2.load(folder, dtype="int8"))
    pipe = blip2.load(folder)  # a stage-1 checkpoint: a retriever, which has no caption
    assert isinstance(pipe, blip2.Retriever) and not hasattr(pipe, "caption")


class _Anything:
    pass
