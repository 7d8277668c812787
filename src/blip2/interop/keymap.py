"""Template-based key maps between our state dicts and other layouts, and the strict loading rule.

A `Rule` names one of our parameters (or a fused group) and its counterpart in another layout with
key templates: `{i}` and `{j}` match a layer index, `{p}` matches `weight` or `bias`, `{rest}` matches
any suffix. Most rules are plain renames; a few carry functions that fuse or split tensors (LAVIS's
`q_bias` / `v_bias` into one qkv bias, OpenAI CLIP's fused `in_proj`), check tied duplicates, or drop
a buffer (a rule with no keys on our side).

`convert(state, rules, to="ours")` rewrites a whole state dict; every source key must be consumed by a
rule. `load_state(model, state)` then requires every parameter of the model to be filled (tied aliases
count once) with the right shape. Any mismatch raises `CheckpointError` naming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from blip2.errors import UserError

Fn = Callable[[list[Tensor]], list[Tensor]]

_PLACEHOLDERS = {"i": r"\d+", "j": r"\d+", "p": r"weight|bias", "rest": r".+"}


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped keys."""


def _identity(tensors: list[Tensor]) -> list[Tensor]:
    return tensors


@dataclass(frozen=True)
class Rule:
    """One tensor (or a fused group of tensors) in our layout and in another one.

    Attributes:
        ours: our key template(s).
        theirs: the other layout's key template(s).
        to_ours: their tensors (in `theirs` order) -> our tensors (in `ours` order); default identity.
        to_theirs: the inverse; default identity.
    """

    ours: str | tuple[str, ...]
    theirs: str | tuple[str, ...]
    to_ours: Fn = _identity
    to_theirs: Fn = _identity
    _compiled: dict[str, list[re.Pattern[str]]] = field(default_factory=dict, compare=False, repr=False)

    def templates(self, side: str) -> tuple[str, ...]:
        t = self.ours if side == "ours" else self.theirs
        return (t,) if isinstance(t, str) else t

    def patterns(self, side: str) -> list[re.Pattern[str]]:
        if side not in self._compiled:
            self._compiled[side] = [_compile(t) for t in self.templates(side)]
        return self._compiled[side]


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = ""
    for k, part in enumerate(parts):
        if k % 2 == 0:
            regex += re.escape(part)
        else:
            if part not in _PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{part}}} in key template {template!r}")
            regex += f"(?P<{part}>{_PLACEHOLDERS[part]})"
    return re.compile(regex + r"\Z")


def rename(ours: str, theirs: str) -> Rule:
    """A plain one-to-one rename."""
    return Rule(ours, theirs)


def drop(theirs: str) -> Rule:
    """A key of the other layout that carries nothing we keep (a buffer such as `position_ids`)."""
    return Rule((), theirs, to_ours=lambda ts: [], to_theirs=lambda ts: [])


def tied(ours: str, theirs: Sequence[str]) -> Rule:
    """One of our tensors stored several times in the other layout (tied weights); copies must agree."""

    def to_ours(ts: list[Tensor]) -> list[Tensor]:
        for other, name in zip(ts[1:], theirs[1:], strict=True):
            if other.shape != ts[0].shape or (not other.is_meta and not torch.equal(other, ts[0])):
                raise CheckpointError(f"{name} should be a tied copy of {theirs[0]} but differs from it")
        return ts[:1]

    return Rule(ours, tuple(theirs), to_ours=to_ours, to_theirs=lambda ts: ts * len(theirs))


def _side_names(to: str) -> tuple[str, str]:
    if to not in ("ours", "theirs"):
        raise ValueError(f"to must be 'ours' or 'theirs', not {to!r}")
    return ("theirs", "ours") if to == "ours" else ("ours", "theirs")


def convert(
    state: dict[str, Tensor], rules: Sequence[Rule], to: str = "ours", source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Rewrite `state` into the other layout.

    Args:
        state: the source state dict (their keys when `to="ours"`, ours when `to="theirs"`).
        rules: the map; the first rule with a template matching a key takes it (specific rules first).
        to: "ours" or "theirs".
        source: a name for the state dict in error messages (a path).

    Raises:
        CheckpointError: a key no rule takes (unexpected) or a fused group with a member missing.
    """
    src_side, dst_side = _side_names(to)
    remaining = dict(state)
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    incomplete: list[str] = []
    for key in list(state):
        if key not in remaining:
            continue  # already taken as part of a fused group
        rule, values = _match(key, rules, src_side)
        if rule is None:
            unexpected.append(key)
            remaining.pop(key)
            continue
        src_keys = [t.format(**values) for t in rule.templates(src_side)]
        absent = [k for k in src_keys if k not in remaining]
        if absent:
            incomplete.extend(absent)
            for k in src_keys:
                remaining.pop(k, None)
            continue
        tensors = [remaining.pop(k) for k in src_keys]
        fn = rule.to_ours if to == "ours" else rule.to_theirs
        results = fn(tensors)
        dst_keys = [t.format(**values) for t in rule.templates(dst_side)]
        if len(results) != len(dst_keys):
            raise RuntimeError(f"rule for {key} returned {len(results)} tensors for {len(dst_keys)} keys")
        out.update(zip(dst_keys, results, strict=True))
    if unexpected or incomplete:
        raise CheckpointError(
            _describe(source, unexpected=unexpected, missing=incomplete)
            + " (is it the right checkpoint for this model?)"
        )
    return out


def _match(key: str, rules: Iterable[Rule], side: str) -> tuple[Rule | None, dict[str, str]]:
    for rule in rules:
        for pattern in rule.patterns(side):
            m = pattern.match(key)
            if m:
                return rule, m.groupdict()
    return None, {}


def _short(keys: Sequence[str], limit: int = 6) -> str:
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _describe(
    source: str,
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    shapes: Sequence[str] = (),
) -> str:
    parts = []
    if missing:
        parts.append(f"missing keys {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        parts.append(f"wrong shapes {_short(shapes, 4)}")
    return f"{source} does not fit the model: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------ loading


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys grouped by the tensor they name: tied parameters form one group."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    groups = list(by_id.values())
    params = {n for g in groups for n in g}
    groups += [[k] for k in model.state_dict() if k not in params]  # persistent buffers
    return groups


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with each tied tensor once, under its first name (as transformers saves)."""
    state = model.state_dict()
    return {group[0]: state[group[0]] for group in tied_groups(model)}


def load_state(
    model: nn.Module,
    state: dict[str, Tensor],
    source: str = "checkpoint",
    optional: Iterable[str] = (),
) -> list[str]:
    """Copy `state` (our key names) into `model`, strictly.

    Every key of `state` must name a tensor of the model with the same shape, and every tensor of the
    model must be given, except keys listed in `optional` (returned when left unfilled). Tied
    parameters count once: any one of their names fills them. Tied names given *different* values
    are untied, as transformers does for Flan-T5's separate `lm_head`.

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped keys.
    """
    groups = tied_groups(model)
    current = model.state_dict()
    optional = set(optional)
    missing, shapes, unfilled = [], [], []
    unexpected = [k for k in state if k not in current]
    for k, v in state.items():
        if k in current and tuple(v.shape) != tuple(current[k].shape):
            shapes.append(f"{k} (checkpoint {list(v.shape)}, model {list(current[k].shape)})")
    for group in groups:
        if not any(k in state for k in group):
            if group[0] in optional:
                unfilled.append(group[0])
            else:
                missing.append(group[0])
    if missing or unexpected or shapes:
        raise CheckpointError(_describe(source, missing, unexpected, shapes))

    with torch.no_grad():
        for group in groups:
            given = [k for k in group if k in state]
            if not given:
                continue
            first = state[given[0]]
            _get(model, group[0]).copy_(first)
            for k in given[1:]:
                if not torch.equal(state[k], first):  # a separate tensor in this checkpoint: untie
                    old = _get(model, k)
                    new = nn.Parameter(state[k].to(old.dtype).clone(), requires_grad=old.requires_grad)
                    module_name, _, attr = k.rpartition(".")
                    setattr(model.get_submodule(module_name), attr, new)
    return unfilled


def _get(model: nn.Module, key: str) -> Tensor:
    module_name, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)
