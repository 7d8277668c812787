"""The training job's configuration: a YAML file plus `section.key=value` overrides.

```yaml
task: stage1                 # stage1 | retrieval | stage2 | caption | vqa (or a registered task)
model:
  preset: tiny-stage1        # a named preset, or
  config: null               # a Blip2Config JSON file, or
  init_from: null            # a trained model folder (stage 2 starts from a stage-1 run's output)
  llm: null                  # stage 2: the LLM (a preset, or a pretrained LM folder or hub id)
  overrides: {}              # Blip2Config fields to change, nested (e.g. {qformer: {dropout: 0.0}})
  tokenizer: null            # Q-Former tokenizer (default: the config's, bert-base-uncased)
  llm_tokenizer: null        # stage 2: the LLM tokenizer (default: the config's llm.name)
  vision: null               # a pretrained image tower (folder or hub id) for a new model
  qformer_from: null         # stage 2 for a new LLM from another model's trained Q-Former
  trainable: null            # stage 2: all | projection | projection+qformer
data:
  kind: webdataset           # webdataset | captions | karpathy | coco | vqa | retrieval
  path: data/{00000..00099}.tar
  ...
optim: {lr: 1.0e-4, ...}
train: {batch_size: 100, ...}
lora: null                   # or {rank: 8, alpha: 16, ...}: LoRA adapters on the LLM (stage 2)
```

Every field is documented on its dataclass below; `blip2 train --help` lists the sections.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from blip2 import tasks
from blip2.config import DTYPES
from blip2.errors import UserError

# `train.precision`'s names in configs written before it took `blip2.config.DTYPES`' names
PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# `train.precision`: a dtype (`float32`; `bfloat16`, `float16`: autocast) or bf16 weights over fp32 masters
PRECISIONS = (*DTYPES, "bfloat16-master")


@dataclass
class ModelSection:
    """What to train. Exactly one of `preset`, `config`, `init_from` names the starting model.

    Attributes:
        preset: a named preset (`blip2 presets`).
        config: path of a Blip2Config JSON.
        init_from: a saved model folder (a previous run's `final/`, or any `blip2.load` folder): its
            weights are the start. For a stage-2 task from a stage-1 model, `llm` names the LLM.
        llm: the LLM of stage 2 from a stage-1 model, or in place of the LLM of a new model (`preset`
            or `config`, with or without `qformer_from`): a preset name whose `llm` is used (e.g.
            tiny-opt, blip2-opt-2.7b), or a folder or hub id of a pretrained transformers LM, which
            then is the LLM's name and default tokenizer (what it inherits: `stage2.llm_for_stage2`).
        overrides: nested Blip2Config fields to change (e.g. `{qformer: {dropout: 0.0}}`) in a new
            model. With `init_from`, only stage 2 from a stage-1 model takes any: `llm`, the settings of
            the new LLM `llm` names (`dtype`, `prompt`, `vqa_prompt`, `eos_text`, `max_txt_len`,
            `chat_template`; `blip2.tasks.stage2.NEW_LLM_SETTINGS`).
        tokenizer: the Q-Former tokenizer (folder or hub id); default the config's.
        llm_tokenizer: the LLM tokenizer (folder or hub id); default `config.llm.name` or `llm`.
        qformer_init: a BERT checkpoint (folder or hub id) to initialize a new Q-Former from, as the
            paper does (`bert-base-uncased`); unused with `init_from`.
        qformer_text_from: instruction tuning from a BLIP-2 stage-2 model: a stage-1 model (folder or
            hub id) whose Q-Former text side the instruction reader starts from (stage-2 checkpoints
            drop it; see `blip2.tasks.instruct`).
        vision: a transformers folder or hub id of a pretrained image model (SigLIP, DINOv2, CLIP, ...):
            the new model's frozen tower starts from its weights, and the config takes its
            architecture, input size and normalization (`overrides.vision` still applies on top,
            e.g. `{hf_config: {num_hidden_layers: 26}}` to read an earlier layer); new models only.
        qformer_from: stage 2 for a new LLM (MiniGPT-4's path): a trained BLIP-2 model (stage 1 or 2,
            or InstructBLIP; any format `blip2.load` reads) whose Q-Former, queries and `ln_vision`
            start the new model that `preset` or `config` names (with the LLM `llm` names, if set),
            and its image tower too when the two towers are the same (another tower of the same width
            comes from `vision`); only the new projection trains (see `trainable`).
        trainable: which parts of a stage-2 model train: `all` (the Q-Former, queries, `ln_vision`
            and the projection: the paper's stage 2), `projection` (the projection only) or
            `projection+qformer` (the projection, the Q-Former and its queries). Default: `projection`
            with `qformer_from`, else `all`. LoRA adapters (`lora`) train besides any of them.
    """

    preset: str | None = None
    config: str | None = None
    init_from: str | None = None
    llm: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    llm_tokenizer: str | None = None
    qformer_init: str | None = None
    qformer_text_from: str | None = None
    vision: str | None = None
    qformer_from: str | None = None
    trainable: str | None = None


# the built-in tasks that train a stage-1 model (no LLM): `lora`, `qformer_from` and `trainable` do not apply
STAGE1_TASKS = ("stage1", "retrieval")
TRAINABLE = ("all", "projection", "projection+qformer")


@dataclass
class LoraSection:
    """Optional: LoRA adapters on the frozen LLM, trained with `peft` (the `lora` extra).

    Hu et al. (2021): each target linear layer `W` of the LLM becomes `W + (alpha / rank) B A`; only `A`
    and `B` train in the LLM, besides the bridge (`model.trainable`).

    Attributes:
        rank: the adapters' inner width.
        alpha: scale numerator (the update is scaled by `alpha / rank`).
        dropout: dropout on the adapters' input.
        target_modules: the LLM's linear layers that get adapters, by name (`q_proj`, ...); default
            the attention projections of the LLM's family (`blip2.interop.lora.DEFAULT_TARGETS`).
        merge: the final model is saved with the adapters merged into the LLM (a plain model folder);
            false: the LLM is saved as it started and the adapters beside it (`final/lora/`, peft's
            adapter folder), which `blip2.load` applies.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    merge: bool = False


@dataclass
class DataSection:
    """Where examples come from.

    Attributes:
        kind: `webdataset` (tar shards), an annotation layout (`captions`, `karpathy`, `coco`, `vqa`,
            `retrieval`, `instructions`, see `blip2.data.annotations`), or `mixture`: the annotation
            files of `sources` drawn in proportion to the square root of their sizes (InstructBLIP).
        path: shard pattern (`data/{00000..00099}.tar`) or annotation JSON.
        images: image root for annotation files.
        split: Karpathy split.
        questions: official VQA questions file (with the annotations file as `path`).
        features: a feature cache folder (`blip2 cache-features`): read frozen features instead of
            decoding images. Cached features mean no augmentation.
        augment: random resized crop (scale 0.5-1) + horizontal flip (the paper); off: eval resize.
        shuffle: shuffle the data.
        shuffle_shards: webdataset: shards shuffled together (the shuffle buffer).
        num_workers: DataLoader worker processes per rank.
        max_len: text token budget.
        prompt: stage-2 caption prompt (default: the model's `llm.prompt`).
        sources: with `kind: mixture`, the datasets mixed: each `{kind, path, images, split,
            questions}` (an annotation layout and its files, as these fields of a section).
    """

    kind: str = "webdataset"
    path: str = ""
    images: str = ""
    split: str = "train"
    questions: str = ""
    features: str | None = None
    augment: bool = True
    shuffle: bool = True
    shuffle_shards: int = 4
    num_workers: int = 2
    max_len: int = 32
    prompt: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)

    def datasets(self) -> list[DataSection]:
        """The annotation datasets this section reads: its `sources` for a mixture, else itself."""
        if self.kind != "mixture":
            return [self]
        blank = {"path": "", "images": "", "split": "train", "questions": "", "sources": []}
        return [dataclasses.replace(self, **{**blank, **source}) for source in self.sources]


SOURCE_FIELDS = ("kind", "path", "images", "split", "questions")


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay, per step.

    Attributes:
        lr: peak learning rate (paper: 1e-4 pre-training, 1e-5 fine-tuning).
        min_lr: floor of the cosine (paper: 1e-5 stage 1 config, 5e-5 stage 2).
        warmup_lr: learning rate at step 0 of the warm-up.
        warmup_steps: linear warm-up length (paper: 2000).
        weight_decay: applied to matrices (and query tokens, temperature as LAVIS), not biases or norms.
        betas: AdamW betas (paper: 0.9, 0.98).
        eps: AdamW eps.
        grad_clip: clip the global gradient norm to this (0 = off; LAVIS does not clip).
    """

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 0.0


@dataclass
class TrainSection:
    """The loop.

    Attributes:
        output_dir: checkpoints (`checkpoints/step-*/`), `metrics.jsonl`, `final/` (the loadable model).
        batch_size: per-rank micro-batch (global batch = batch_size x ranks x grad_accum).
        grad_accum: micro-batches per optimizer step.
        max_steps: optimizer steps (0: from `epochs`, annotation datasets only).
        epochs: passes over an annotation dataset (when max_steps is 0).
        precision: how the trainable part (Q-Former, queries, `ln_vision`, heads, projection)
            computes; frozen towers always run in their own dtype.
            `float32`: fp32 weights and compute.
            `bfloat16`: fp32 weights, bf16 compute under autocast (matmuls in bf16, norms, softmax and
            losses in fp32).
            `float16`: as `bfloat16` in fp16, with a GradScaler.
            `bfloat16-master`: bf16 weights that compute in bf16 with no autocast (LayerNorms too;
            PyTorch's kernels accumulate their statistics in fp32; losses are taken in fp32), and fp32
            master copies of them in the optimizer: the bf16 gradients (summed in bf16 over
            `grad_accum`) are cast onto the masters, clipped and stepped there with fp32 AdamW
            state, and the weights are rounded from the masters after every step. Checkpoints and
            the final model hold the fp32 masters (resume is exact; `final/` is fp32). Less memory
            and no autocast casts; not with `lora` (its adapters train in the LLM's dtype).
            The older names `fp32`, `bf16`, `fp16` are read as `float32`, `bfloat16`, `float16`.
        grad_checkpointing: recompute Q-Former activations in backward (less memory).
        seed: everything random (weights of new parts, data order, augmentation, ITM negatives).
        log_every: steps between progress/metrics lines.
        save_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        eval_every: steps between evaluations on `eval_data` (0: off).
        eval_batches: batches per evaluation.
        fsdp_llm: shard the frozen LLM over the ranks with FSDP2 (LLMs that do not fit one GPU).
        device: `cpu`, `cuda` or null (CUDA when available).
        tensorboard: also write TensorBoard events (needs the `tensorboard` package).
        save_final: write the loadable model to `output_dir/final` at the end.
    """

    output_dir: str = "runs/blip2"
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 0
    epochs: int = 1
    precision: str = "bfloat16"
    grad_checkpointing: bool = False
    seed: int = 42
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batches: int = 50
    fsdp_llm: bool = False
    device: str | None = None
    tensorboard: bool = False
    save_final: bool = True

    def __post_init__(self) -> None:
        self.precision = PRECISION_ALIASES.get(self.precision, self.precision)


@dataclass
class TrainConfig:
    """A whole job: task, model, data, optimizer, loop; `eval_data` and `lora` are optional.

    Attributes:
        task: the objective (`blip2.tasks`): `stage1`, `retrieval` (stage-1 losses; captions of one
            image are positives of each other), `stage2`, `caption`, `vqa` (the LLM's loss), `instruct`
            (InstructBLIP's instruction tuning), or a name
            given to `blip2.tasks.register`.
    """

    task: str = "stage1"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    eval_data: DataSection | None = None
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d or {})
        sections = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "train": TrainSection}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "task":
                kwargs[key] = value
            elif key in sections or key in ("eval_data", "lora"):
                if value is None:
                    kwargs[key] = None
                    continue
                section = sections.get(key, LoraSection if key == "lora" else DataSection)
                kwargs[key] = _section(section, value, key)
            else:
                raise UserError(
                    f"unknown config section {key!r}; use task, model, data, eval_data, optim, train, lora"
                )
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.task not in tasks.names():
            raise UserError(f"unknown task {self.task!r}; use one of {', '.join(tasks.names())}")
        m = self.model
        if sum(x is not None for x in (m.preset, m.config, m.init_from)) != 1:
            raise UserError("set exactly one of model.preset, model.config, model.init_from")
        self._validate_reuse()
        self._validate_precision()
        t, o, d = self.train, self.optim, self.data
        at_least = {
            "train.batch_size": (t.batch_size, 1),
            "train.grad_accum": (t.grad_accum, 1),
            "train.max_steps": (t.max_steps, 0),
            "train.epochs": (t.epochs, 0),
            "train.seed": (t.seed, 0),
            "train.log_every": (t.log_every, 1),
            "train.save_every": (t.save_every, 0),
            "train.keep_checkpoints": (t.keep_checkpoints, 1),
            "train.eval_every": (t.eval_every, 0),
            "train.eval_batches": (t.eval_batches, 1),
            "optim.warmup_steps": (o.warmup_steps, 0),
            "optim.min_lr": (o.min_lr, 0),
            "optim.warmup_lr": (o.warmup_lr, 0),
            "optim.weight_decay": (o.weight_decay, 0),
            "optim.grad_clip": (o.grad_clip, 0),
        }
        for section in (d, self.eval_data):
            if section is not None:
                name = "data" if section is d else "eval_data"
                at_least[f"{name}.num_workers"] = (section.num_workers, 0)
                at_least[f"{name}.shuffle_shards"] = (section.shuffle_shards, 0)
                at_least[f"{name}.max_len"] = (section.max_len, 2)
        for key, (value, low) in at_least.items():
            if value < low:
                raise UserError(f"{key} must be at least {low}, not {value}")
        for key, value in (("optim.lr", o.lr), ("optim.eps", o.eps)):
            if value <= 0:
                raise UserError(f"{key} must be greater than 0, not {value}")
        if not all(0 <= b < 1 for b in o.betas):
            raise UserError(f"optim.betas must both lie in [0, 1), not {list(o.betas)}")
        if t.max_steps == 0 and t.epochs == 0:
            raise UserError("set train.max_steps or train.epochs: both are 0, so there is nothing to train")
        for section, name in ((d, "data"), (self.eval_data, "eval_data")):
            if section is not None:
                _check_sources(section, name)
        if not self.data.path and self.data.kind != "mixture":
            raise UserError("set data.path (shard pattern or annotation file)")
        if self.data.kind == "webdataset" and self.train.max_steps <= 0:
            raise UserError("webdataset training runs by steps: set train.max_steps")

    def _validate_precision(self) -> None:
        precision = self.train.precision
        if precision in ("float16-master", "fp16-master"):
            raise UserError(
                "train.precision float16-master is not offered: float16 gradients need loss scaling, which "
                "the master-weights path does not do; use bfloat16-master, or float16 (autocast over fp32 "
                "weights, with a GradScaler)"
            )
        if precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "bfloat16-master" and self.lora is not None:
            raise UserError(
                "train.precision bfloat16-master keeps fp32 masters of bf16 weights, and LoRA adapters train "
                "inside the frozen LLM in its dtype: use train.precision bfloat16 (autocast) with lora"
            )

    def _validate_reuse(self) -> None:
        """The LLM's settings (`model.llm`, `model.llm_tokenizer`, `model.overrides.llm`),
        `model.qformer_from`, `model.trainable` and `lora`: values, and what they go with."""
        m, lora = self.model, self.lora
        if self.task in STAGE1_TASKS:
            settings = {
                "lora": lora,
                "model.llm": m.llm,
                "model.llm_tokenizer": m.llm_tokenizer,
                "model.qformer_from": m.qformer_from,
                "model.trainable": m.trainable,
            }
            given = [name for name, value in settings.items() if value is not None]
            if given:
                raise UserError(
                    f"{', '.join(given)}: only for the tasks that train through an LLM (stage2, caption, "
                    f"vqa, instruct), not task {self.task!r}, which would ignore it; remove it, or use a "
                    "stage-2 task"
                )
            if m.overrides.get("llm") is not None:
                raise UserError(
                    f"model.overrides.llm: task {self.task!r} trains stage 1, which has no LLM; remove it, "
                    "or use a stage-2 task"
                )
        if m.trainable is not None and m.trainable not in TRAINABLE:
            raise UserError(f"model.trainable must be one of {', '.join(TRAINABLE)}, not {m.trainable!r}")
        if m.vision is not None and m.init_from is not None:
            raise UserError("model.vision starts a new model's image tower; model.init_from brings its own")
        if m.qformer_from is not None and m.init_from is not None:
            raise UserError(
                "model.qformer_from builds a new model around a reused Q-Former: name that model with "
                "model.preset or model.config, not model.init_from"
            )
        if lora is None:
            return
        if lora.rank < 1:
            raise UserError(f"lora.rank must be at least 1, not {lora.rank}")
        if lora.alpha <= 0:
            raise UserError(f"lora.alpha must be greater than 0, not {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            raise UserError(f"lora.dropout must lie in [0, 1), not {lora.dropout}")
        if self.train.fsdp_llm:
            raise UserError(
                "train.fsdp_llm shards a frozen LLM, and lora trains adapters in it: use one of them"
            )


def _check_sources(section: DataSection, name: str) -> None:
    """A mixture's sources are annotation files (no shards, no nested mixtures); other kinds have none."""
    from blip2.data.annotations import KINDS

    if section.kind != "mixture":
        if section.sources:
            raise UserError(f"{name}.sources is for kind: mixture, not {section.kind!r}")
        return
    if not section.sources:
        raise UserError(f"{name}.kind mixture needs {name}.sources: a list of {{kind, path, images}}")
    for i, source in enumerate(section.sources):
        where = f"{name}.sources[{i}]"
        if not isinstance(source, dict):
            raise UserError(f"{where} must be a mapping with {', '.join(SOURCE_FIELDS)}")
        unknown = set(source) - set(SOURCE_FIELDS)
        if unknown:
            raise UserError(
                f"unknown field(s) in {where}: {', '.join(sorted(unknown))}; known: {', '.join(SOURCE_FIELDS)}"
            )
        if source.get("kind") not in KINDS:
            raise UserError(f"{where}.kind must be one of {', '.join(KINDS)}, not {source.get('kind')!r}")
        if not source.get("path"):
            raise UserError(f"set {where}.path (its annotation file)")


def _section(cls, value: dict[str, Any], name: str):
    if not isinstance(value, dict):
        raise UserError(f"config section {name!r} must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(value) - set(known)
    if unknown:
        raise UserError(
            f"unknown field(s) in {name}: {', '.join(sorted(unknown))}; known: {', '.join(known)}"
        )
    kw = {k: _typed(f"{name}.{k}", str(known[k].type), v) for k, v in value.items()}
    return cls(**kw)


def _typed(where: str, kind: str, v: Any) -> Any:
    """`v` as the field's type, or one sentence on what is wrong. YAML reads `3e-4` (no dot) as a string
    and `1e4` too: such strings count as the numbers they spell; `8.0` is the integer 8, `8.5` no
    integer."""
    if v is None and (kind.endswith("| None") or kind.startswith("dict")):
        return None if kind.endswith("| None") else {}
    if kind == "bool":
        if not isinstance(v, bool):
            raise UserError(f"{where} must be true or false, not {v!r}")
        return v
    if kind in ("int", "float"):
        number = v
        if isinstance(v, str):
            try:
                number = float(v.strip())
            except ValueError:
                raise UserError(f"{where} must be a number, not {v!r}") from None
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise UserError(f"{where} must be a number, not {v!r}")
        if not math.isfinite(float(number)):
            raise UserError(f"{where} must be a finite number, not {v!r}")
        if kind == "float":
            return float(number)
        if float(number) != int(number):
            raise UserError(f"{where} must be a whole number, not {v!r}")
        return int(number)
    if kind.startswith("tuple[float"):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise UserError(f"{where} must be a pair of numbers like [0.9, 0.98], not {v!r}")
        return tuple(_typed(where, "float", x) for x in v)
    if kind.startswith("str"):
        if isinstance(v, numbers.Real) and not isinstance(v, bool):  # `output_dir=2024` read by YAML
            return str(v)
        if not isinstance(v, str):
            raise UserError(f"{where} must be a text (quote it in YAML), not {v!r}")
        return v
    if kind.startswith("dict") and not isinstance(v, dict):
        raise UserError(f"{where} must be a mapping, not {v!r}")
    if kind.startswith("list") and not isinstance(v, list):
        raise UserError(f"{where} must be a list, not {v!r}")
    return v


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10); the value is read as YAML."""
    import yaml

    if "=" not in text:
        raise UserError(f"override {text!r} should look like section.key=value (e.g. train.max_steps=100)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config and apply `section.key=value` overrides."""
    import yaml

    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return TrainConfig.from_dict(raw)
