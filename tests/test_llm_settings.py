"""What a user names for the LLM, through the real entry points: an LLM folder that is not a language
model is one sentence (`blip2 train`), the LLM's settings in a stage-1 config are refused rather than
ignored, the tokenizer saved beside an LLM is the one that loads whatever the LLM's family, the
commands that load retrieval models only offer no LLM options, `model.overrides.llm` sets up the
new LLM of stage 2 from a stage-1 folder, `model.llm` replaces the LLM of a preset (a new model, or one
around a reused Q-Former) with its own name, tokenizer and conventions, and a tokenizer that does not
fit the LLM is one sentence."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from train_utils import blip2_cli, make_caption_json, make_llm_tokenizer

from blip2.cli import main
from blip2.interop.checkpoint import save_folder
from blip2.models import RetrievalModel
from blip2.presets import preset

ROOT = Path(__file__).resolve().parent.parent
TINY1 = str(ROOT / "configs" / "tiny-stage1.yaml")
TINY2 = str(ROOT / "configs" / "tiny-stage2.yaml")
QWEN2 = {  # a tiny random Qwen2 (a family whose folder transformers gives its own tokenizer class)
    "vocab_size": 99,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


@dataclass
class World:
    stage1: Path
    tokenizer: Path
    captions: str
    images: str
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("llm_settings")
    torch.manual_seed(0)
    save_folder(RetrievalModel(preset("tiny-stage1")), root / "stage1")
    captions, images = make_caption_json(str(root / "data"), n=4)
    tok = make_llm_tokenizer(str(root / "tok"))
    return World(root / "stage1", Path(tok), captions, images, root)


def _stage2(w: World, llm: Path, out: Path) -> list[str]:
    return [
        "train",
        TINY2,
        f"model.init_from={w.stage1}",
        f"model.llm={llm}",
        f"model.llm_tokenizer={w.tokenizer}",
        "data.kind=captions",
        f"data.path={w.captions}",
        f"data.images={w.images}",
        f"train.output_dir={out}",
        "train.max_steps=1",
    ]


def _not_an_lm(kind: str, folder: Path) -> tuple[Path, str]:
    """A folder `model.llm` might wrongly name, and what the sentence says of it."""
    import transformers

    if kind == "missing":
        return folder / "nothing-here", "does not exist"
    folder.mkdir()
    if kind == "empty":
        return folder, "is not a transformers language model folder: it has no config.json"
    if kind == "vision model":
        config = transformers.AutoConfig.for_model(
            "vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        transformers.AutoModel.from_config(config).save_pretrained(folder)
        return folder, "the LLM's model type 'vit' is neither a causal LM"
    if kind == "config without weights":
        transformers.AutoConfig.for_model("qwen2", **QWEN2).save_pretrained(folder)
        return folder, "holds no weights of its language model"
    (folder / "config.json").write_text(json.dumps({"hidden_size": 16}))  # no model_type
    return folder, "is not a transformers language model folder ("


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "vision model", "config without weights", "no model_type"]
)
def test_an_llm_folder_that_is_not_a_language_model_is_one_sentence(world, tmp_path, kind):
    folder, says = _not_an_lm(kind, tmp_path / "llm")
    p = blip2_cli(_stage2(world, folder, tmp_path / "out"))
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert says in p.stderr, p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.parametrize(
    "settings, named",
    [
        (["lora.rank=4"], "lora:"),
        (["model.qformer_from=Salesforce/blip2-opt-2.7b"], "model.qformer_from:"),
        (["model.trainable=projection"], "model.trainable:"),
        (["lora.rank=4", "model.trainable=projection+qformer"], "lora, model.trainable:"),
        (["model.llm=tiny-opt"], "model.llm:"),
        (["model.llm_tokenizer=some/tokenizer"], "model.llm_tokenizer:"),
    ],
)
def test_llm_settings_in_a_stage_1_config_are_refused_not_ignored(world, tmp_path, settings, named):
    args = [f"data.path={world.captions}", f"data.images={world.images}", "data.kind=captions"]
    p = blip2_cli(["train", TINY1, *args, f"train.output_dir={tmp_path / 'out'}", *settings])
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"error: {named} only for the tasks that train through an LLM" in p.stderr, p.stderr
    assert "not task 'stage1'" in p.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("start", ["model.preset=tiny-stage1", "stage-1 folder"])
def test_llm_overrides_in_a_stage_1_config_are_refused_as_such(world, tmp_path, start):
    args = [f"data.path={world.captions}", f"data.images={world.images}", "data.kind=captions"]
    if start == "stage-1 folder":
        args += ["model.preset=null", f"model.init_from={world.stage1}"]
    extra = ["model.overrides.llm.chat_template=true", f"train.output_dir={tmp_path / 'out'}"]
    p = blip2_cli(["train", TINY1, *args, *extra])
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "error: model.overrides.llm: task 'stage1' trains stage 1, which has no LLM" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_the_tokenizer_saved_beside_a_qwen2_llm_is_the_one_that_loads(tmp_path):
    """transformers 5 gives a folder whose config.json says `qwen2` Qwen2's own tokenizer class, which
    splits text its own way; `llm_tokenizer` loads the tokenizer saved there (here a character-level
    one), as training and `blip2.load` use it."""
    import transformers

    from blip2.tokenizers import llm_tokenizer

    saved = transformers.AutoTokenizer.from_pretrained(make_llm_tokenizer(str(tmp_path / "tok")))
    folder = tmp_path / "qwen2"
    config = transformers.AutoConfig.for_model("qwen2", **QWEN2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    saved.save_pretrained(folder)
    loaded = llm_tokenizer(str(folder))
    text = "a dog runs on the grass"
    assert loaded(text).input_ids == saved(text).input_ids
    assert len(loaded(text).input_ids) == 1 + len(text)  # `</s>`, then one id per character
    assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("</s>", "</s>", "<pad>")
    assert loaded.get_vocab() == saved.get_vocab()


LLM_OPTIONS = (
    "--llm",
    "--device-map",
    "--max-memory",
    "--offload-folder",
    "--load-in-8bit",
    "--load-in-4bit",
)


def _options_shown(command: list[str], capsys) -> set[str]:
    import re

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return set(re.findall(r"(?<![\w-])--[\w-]+", capsys.readouterr().out))


@pytest.mark.parametrize("command", [["match"], ["search"], ["index", "build"], ["index", "add"]])
def test_retrieval_commands_offer_no_llm_options(command, capsys):
    shown = _options_shown(command, capsys)
    assert {"--model", "--device", "--preset", "--vision-weights", "--tokenizer"} <= shown
    assert not shown & set(LLM_OPTIONS), shown & set(LLM_OPTIONS)
    assert set(LLM_OPTIONS) <= _options_shown(["caption"], capsys)  # commands that load an LLM keep them


# ------------------------------------------------------------------------ the new LLM of stage 2

CHAT = (  # a chat template in the character tokenizer's characters
    "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}bot:{% endif %}"
)


def _qwen2_chat_llm(w: World, folder: Path) -> Path:
    """A tiny random Qwen2 folder whose tokenizer (the character one) has a chat template."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("qwen2", **QWEN2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(w.tokenizer))
    tok.chat_template = CHAT
    tok.save_pretrained(folder)
    return folder


def test_stage_2_from_a_stage_1_folder_takes_the_new_llm_s_settings(world, tmp_path, monkeypatch):
    """`model.init_from` (a stage-1 folder) with `model.overrides.llm`: the chat template wraps the
    prompts training feeds the LLM, and the saved model carries the settings."""
    import transformers

    import blip2
    from blip2.tasks.stage2 import CaptionTask
    from blip2.train.config import load_config
    from blip2.train.loop import train

    llm = _qwen2_chat_llm(world, tmp_path / "qwen2")
    out = tmp_path / "out"
    args = [
        *_stage2(world, llm, out)[2:],
        "task=caption",
        f"model.llm_tokenizer={llm}",
        "model.overrides.llm.chat_template=true",
        "model.overrides.llm.prompt=a photo of",
        "model.overrides.llm.max_txt_len=20",
    ]
    seen = []
    inputs = CaptionTask.inputs

    def record(self, batch, gather, generator):
        seen.append(batch["input_ids"])
        return inputs(self, batch, gather, generator)

    monkeypatch.setattr(CaptionTask, "inputs", record)
    train(load_config(TINY2, args))
    tok = transformers.AutoTokenizer.from_pretrained(str(llm))
    texts = tok.batch_decode(seen[0], skip_special_tokens=True)
    assert texts and all(t.startswith("user: a photo of\nbot:") for t in texts), texts
    saved = json.loads((out / "final" / "blip2_config.json").read_text())["llm"]
    assert (saved["chat_template"], saved["prompt"], saved["max_txt_len"]) == (True, "a photo of", 20)
    assert saved["hf_config"]["model_type"] == "qwen2"
    pipe = blip2.load(str(out / "final"))
    prompt = pipe._encode_prompts(["hi"])["input_ids"][0]
    assert tok.decode(prompt, skip_special_tokens=True) == "user: hi\nbot:"  # generation wraps it too


@pytest.mark.parametrize(
    "override, says",
    [
        ("model.overrides.llm.hf_config.num_hidden_layers=2", "model.overrides.llm.hf_config does not apply"),
        (
            "model.overrides.llm.chat_template=maybe",
            "model.overrides.llm.chat_template is 'maybe': give true",
        ),
        ("model.overrides.llm.dtype=float64", "model.overrides.llm.dtype is 'float64': give one of float32"),
        ("model.overrides.qformer.dropout=0.0", "drop model.overrides.qformer (from this model, only "),
        ("model.overrides.llm=true", "model.overrides.llm is True: give the LLM's settings"),
        (  # the LLM's own folder has a chat template; the tokenizer model.llm_tokenizer names has none
            "model.overrides.llm.chat_template=true",
            "has no chat template, and model.overrides.llm.chat_template asks for one",
        ),
    ],
)
def test_overrides_a_stage_1_folder_cannot_take_are_one_sentence(world, tmp_path, override, says):
    llm = _qwen2_chat_llm(world, tmp_path / "qwen2")
    p = blip2_cli([*_stage2(world, llm, tmp_path / "out"), override])
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert says in p.stderr, p.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_a_tokenizer_larger_than_the_llm_s_vocabulary_is_one_sentence(world, tmp_path):
    """A BERT tokenizer (30k tokens) for the tiny Qwen2 (99 embedding rows): refused before training,
    never an index error inside the embedding."""
    import tiny_hf

    llm = _qwen2_chat_llm(world, tmp_path / "qwen2")
    args = _stage2(world, llm, tmp_path / "out")
    args[args.index(f"model.llm_tokenizer={world.tokenizer}")] = (
        f"model.llm_tokenizer={tiny_hf.bert_tokenizer_dir()}"
    )
    p = blip2_cli(args)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "embeds only 99, so its ids would run past the LLM's embedding table" in p.stderr, p.stderr
    assert "set model.llm_tokenizer to the LLM's own tokenizer" in p.stderr
    assert not (tmp_path / "out" / "final").exists()


# ------------------------------------------------------------- model.llm in place of a preset's LLM


def _new_model_args(w: World, out: Path, *extra: str) -> list[str]:
    """`blip2 train` on tiny-stage2.yaml with a new model (no `model.init_from`)."""
    data = [f"data.path={w.captions}", f"data.images={w.images}", "data.kind=captions"]
    run = [f"train.output_dir={out}", "train.max_steps=1", "train.save_every=0"]
    return ["train", TINY2, "model.init_from=null", *data, *run, *extra]


def test_a_new_stage_2_model_takes_the_llm_model_llm_names(world, tmp_path):
    """`model.preset: tiny-opt` with `model.llm` a Qwen2 folder: the preset's Q-Former and tower, and
    that LLM (not the preset's OPT)."""
    import blip2

    llm = _qwen2_chat_llm(world, tmp_path / "qwen2")
    out = tmp_path / "out"
    p = blip2_cli(
        _new_model_args(
            world, out, "model.preset=tiny-opt", f"model.llm={llm}", f"model.llm_tokenizer={world.tokenizer}"
        )
    )
    assert p.returncode == 0, p.stderr[-3000:]
    text_config = json.loads((out / "final" / "config.json").read_text())["text_config"]
    assert text_config["model_type"] == "qwen2"
    model = blip2.load(str(out / "final")).model
    assert model.config.llm.name == str(llm) and model.config.llm.model_type == "qwen2"
    assert model.config.qformer == preset("tiny-opt").qformer
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(llm).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.llm.state_dict().items())  # frozen, loaded


def test_a_reused_qformer_with_another_llm_takes_that_llm_s_name_tokenizer_and_conventions(world, tmp_path):
    """A config whose LLM is a named OPT (as blip2-opt-2.7b's: float16, EOS text "\\n") around a reused
    Q-Former, with `model.llm` a Qwen2 folder and no `model.llm_tokenizer`: the tokenizer is the Qwen2
    folder's (never the preset's OPT one), the saved name is the folder, the EOS text is the family's
    (the tokenizer's EOS), the dtype the one the folder's config records; the prompt and text length
    are the config's."""
    import dataclasses

    import transformers

    import blip2

    config = preset("tiny-opt")
    named_opt = dataclasses.replace(
        config.llm,
        name="facebook/opt-2.7b",
        dtype="float16",
        eos_text="\n",
        prompt="a photo of",
        max_txt_len=24,
    )
    (tmp_path / "config.json").write_text(dataclasses.replace(config, llm=named_opt).to_json())
    llm = _qwen2_chat_llm(world, tmp_path / "qwen2")
    out = tmp_path / "out"
    extra = [
        f"model.config={tmp_path / 'config.json'}",
        f"model.qformer_from={world.stage1}",
        f"model.llm={llm}",
    ]
    p = blip2_cli(_new_model_args(world, out, "model.llm_tokenizer=null", "task=caption", *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    saved = json.loads((out / "final" / "blip2_config.json").read_text())["llm"]
    assert saved["name"] == str(llm) and saved["hf_config"]["model_type"] == "qwen2"
    assert (saved["eos_text"], saved["dtype"]) == (None, "float32")  # the family's and the folder's
    assert (saved["prompt"], saved["max_txt_len"]) == ("a photo of", 24)  # the config's
    pipe = blip2.load(str(out / "final"))
    vocab = {k: v for k, v in pipe.llm_tokenizer.get_vocab().items() if k != "<image>"}  # added on saving
    assert vocab == transformers.AutoTokenizer.from_pretrained(llm).get_vocab()
    assert pipe.llm_tokenizer.chat_template == CHAT  # the Qwen2 folder's own, not model.llm_tokenizer's


def test_model_llm_naming_another_llm_than_a_stage_2_model_s_is_refused(world, tmp_path):
    """`model.init_from` a stage-2 model keeps its LLM: `model.llm` naming another is one sentence (it
    was ignored), while the same LLM again (tiny-stage2.yaml's `llm: tiny-opt`) trains on."""
    first = tmp_path / "first"
    p = blip2_cli([*_stage2(world, "tiny-opt", first), "train.save_every=0"])
    assert p.returncode == 0, p.stderr[-3000:]
    again = [f"model.init_from={first / 'final'}", f"train.output_dir={tmp_path / 'again'}"]
    p = blip2_cli([*_stage2(world, "tiny-opt", tmp_path / "unused"), *again, "train.save_every=0"])
    assert p.returncode == 0, p.stderr[-3000:]
    llm = _qwen2_chat_llm(world, tmp_path / "qwen2")
    p = blip2_cli([*_stage2(world, llm, tmp_path / "unused"), *again])
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "is a stage-2 model and keeps its own LLM" in p.stderr and str(llm) in p.stderr
