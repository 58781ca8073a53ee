"""Checkpoint conversion as data: each format is a table of `Rule`s, one driver converts each direction.

A rule names a big_vision parameter (flat '/'-joined key), the other format's tensor and how the array changes
between them:

    Rule("embedding/kernel", "patch_embed.proj.weight", "conv")
    Rule(("{b}/query/kernel", "{b}/key/kernel", "{b}/value/kernel"), "blocks.{i}.attn.qkv.weight", "heads_in")

`{i}` is the block index (the rule repeats for every block). Several big_vision keys for one tensor are *fused*:
each is converted and they are concatenated on the first axis (timm's packed qkv), and split back evenly.

A table lists everything a format can hold; the model decides which rules apply: `export` converts the rules
whose parameters the params have, `import_params` the rules whose parameters the model expects
(`common.expected_shapes`). Both enforce, once for every format, that nothing is dropped: a parameter the format
has no place for, a tensor the file lacks, a tensor of the file nothing uses, or a size that does not fit, is a
ValueError naming the key. Everything that is not a renaming (config files, heads a format requires, position
tables a format stores differently) stays in the format's module, around these two calls.

Array transforms (`KINDS`; the reverse gets the big_vision shape, so no head count is needed):

    copy       same array
    linear     Flax Dense kernel (in, out)            <-> torch Linear weight (out, in)
    conv       Flax Conv kernel (ph, pw, 3, D)         <-> torch Conv2d weight (D, 3, ph, pw)
    heads_in   attention q/k/v kernel (D, H, hd)       <-> torch (H*hd, D)
    heads_out  attention out kernel (H, hd, D)         <-> torch (D, H*hd)
    flatten    any shape, e.g. q/k/v bias (H, hd)      <-> (H*hd,); class token (1, 1, D) <-> (D,)
    unbatch    (1, ...) e.g. position table (1, N, D)  <-> (N, D)
    patch_linear  Flax Conv kernel (ph, pw, 3, D)      <-> torch Linear over flattened patches (D, ph*pw*3)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from lalign.checkpoints.common import flatten

Shape = tuple


def _reshape_to(shape: Shape, t: np.ndarray) -> np.ndarray:
    if int(np.prod(shape)) != t.size:
        raise ValueError(f"expected {int(np.prod(shape))} values to make shape {tuple(shape)}, got {t.shape}")
    return t.reshape(shape)


# kind -> (to theirs: ours -> theirs, from theirs: (theirs, our shape) -> ours)
KINDS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda t, s: t),
    "linear": (lambda a: a.T, lambda t, s: t.T),
    "conv": (lambda a: a.transpose(3, 2, 0, 1), lambda t, s: t.transpose(2, 3, 1, 0)),
    "heads_in": (lambda a: a.reshape(a.shape[0], -1).T, lambda t, s: _reshape_to(s, t.T)),
    "heads_out": (lambda a: a.reshape(-1, a.shape[-1]).T, lambda t, s: _reshape_to(s, t.T)),
    "flatten": (lambda a: a.reshape(-1), lambda t, s: _reshape_to(s, t)),
    "unbatch": (lambda a: a[0], lambda t, s: t[None]),
}
# A Conv patch kernel (ph, pw, 3, D) as a Linear over flattened (row, column, channel) patches (D, ph*pw*3):
# the same reshapes as an attention output kernel.
KINDS["patch_linear"] = KINDS["heads_out"]


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: Union[str, tuple[str, ...]]  # big_vision key(s); several are fused into one tensor
    theirs: str
    kind: str = "copy"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown conversion kind {self.kind!r}; choose from {sorted(KINDS)}.")
        if isinstance(self.ours, str):
            object.__setattr__(self, "ours", (self.ours,))

    def at(self, i: int) -> "Rule":
        return Rule(tuple(k.replace("{i}", str(i)) for k in self.ours), self.theirs.replace("{i}", str(i)),
                    self.kind)


def expand(rules: Iterable[Rule], depth: int) -> list[Rule]:
    """The concrete rules: a rule with `{i}` once for every block 0..depth-1."""
    out = []
    for r in rules:
        out.extend(r.at(i) for i in range(depth)) if "{i}" in r.theirs else out.append(r)
    return out


# ---------------------------------------------------------------------------------------- table builders
BLOCK = "Transformer/encoderblock_{i}"


def layernorm(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]


def dense(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{theirs}.weight", "linear"), Rule(f"{ours}/bias", f"{theirs}.bias")]


def mlp(ours: str, fc1: str, fc2: str) -> list[Rule]:
    return dense(f"{ours}/Dense_0", fc1) + dense(f"{ours}/Dense_1", fc2)


def out_projection(ours: str, out: str) -> list[Rule]:
    """An attention's output projection (H, hd, D) <-> torch Linear `out`."""
    return [Rule(f"{ours}/out/kernel", f"{out}.weight", "heads_out"), Rule(f"{ours}/out/bias", f"{out}.bias")]


def attention(ours: str, q: str, k: str, v: str, out: str) -> list[Rule]:
    """Separate q/k/v/out projections (HF)."""
    rules = []
    for name, theirs in (("query", q), ("key", k), ("value", v)):
        rules += [Rule(f"{ours}/{name}/kernel", f"{theirs}.weight", "heads_in"),
                  Rule(f"{ours}/{name}/bias", f"{theirs}.bias", "flatten")]
    return rules + out_projection(ours, out)


def packed(ours: str, names: Sequence[str], weight: str, bias: str) -> list[Rule]:
    """Projections `names` (e.g. query, key, value) packed into one torch Linear (timm qkv, torch in_proj)."""
    return [Rule(tuple(f"{ours}/{n}/kernel" for n in names), weight, "heads_in"),
            Rule(tuple(f"{ours}/{n}/bias" for n in names), bias, "flatten")]


def packed_attention(ours: str, qkv: str, out: str, *, in_proj: bool = False) -> list[Rule]:
    """q, k, v packed in one projection: timm `{qkv}.weight`, or torch MultiheadAttention `in_proj_weight`."""
    weight, bias = (f"{qkv}in_proj_weight", f"{qkv}in_proj_bias") if in_proj else (f"{qkv}.weight", f"{qkv}.bias")
    return packed(ours, ("query", "key", "value"), weight, bias) + out_projection(ours, out)


# ------------------------------------------------------------------------------------------------ drivers
def export(params: Mapping, rules: Iterable[Rule], depth: int, fmt: str, prefix: str = "") -> dict:
    """The other format's state dict (numpy, contiguous) for big_vision `params` (per-block layout, nested or
    flat), every name starting with `prefix`. Every parameter must have a rule in `rules` (else the format cannot
    hold it: ValueError)."""
    flat = flatten(params)
    sd, used = {}, set()
    for r in expand(rules, depth):
        have = [k in flat for k in r.ours]
        if not any(have):
            continue
        if not all(have):
            raise ValueError(f"{fmt}: {r.theirs} is made of {list(r.ours)}, but the params have only "
                             f"{[k for k in r.ours if k in flat]}.")
        to = KINDS[r.kind][0]
        parts = [to(np.asarray(flat[k])) for k in r.ours]
        sd[prefix + r.theirs] = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
        used.update(r.ours)
    left = sorted(set(flat) - used)
    if left:
        raise ValueError(f"{fmt} has no place for the parameter(s) {left[:8]}{' ...' if len(left) > 8 else ''}.")
    return sd


def import_params(sd: Mapping, rules: Iterable[Rule], expected: Mapping, depth: int, source: str,
                  what: str = "the model", prefix: str = "") -> dict:
    """Flat big_vision params for a model whose parameter shapes are `expected` (flat or nested), from the other
    format's state dict `sd` (names starting with `prefix`). Every expected parameter must have a rule, every rule's
    tensor must be in `sd` and every tensor of `sd` must be used; anything else is a ValueError naming `source` and
    the key."""
    shapes = {k: tuple(np.shape(v)) for k, v in flatten(expected).items()}
    out, used = {}, set()
    for r in expand(rules, depth):
        want = [k in shapes for k in r.ours]
        if not any(want):
            continue
        if not all(want):
            raise ValueError(f"{source}: {r.theirs} holds {list(r.ours)}, but {what} has only "
                             f"{[k for k in r.ours if k in shapes]}.")
        name = prefix + r.theirs
        if name not in sd:
            raise ValueError(f"{source}: missing weight {name!r} (needed for {what}).")
        t = np.asarray(sd[name])
        used.add(name)
        parts = [t] if len(r.ours) == 1 else _split(t, len(r.ours), name, source)
        back = KINDS[r.kind][1]
        for k, part in zip(r.ours, parts):
            try:
                a = np.ascontiguousarray(back(part, shapes[k]))
            except ValueError as e:
                raise ValueError(f"{source}: shape mismatch at {k!r}: expected {shapes[k]}, but tensor "
                                 f"{name!r} has shape {t.shape} ({e}); {what}.") from None
            if a.shape != shapes[k]:
                raise ValueError(f"{source}: shape mismatch at {k!r}: expected {shapes[k]}, got {a.shape} (tensor "
                                 f"{name!r} of shape {t.shape}); {what}.")
            out[k] = a
    uncovered = sorted(set(shapes) - set(out))
    if uncovered:
        raise ValueError(f"{source}: this format has no tensor for {uncovered[:8]} of {what}.")
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"{source}: unexpected keys for {what}: {unexpected[:8]}"
                         f"{f' ... and {len(unexpected) - 8} more' if len(unexpected) > 8 else ''}.")
    return out


def _split(t: np.ndarray, n: int, key: str, source: str) -> list:
    if t.shape[0] % n:
        raise ValueError(f"{source}: tensor {key!r} of shape {t.shape} does not split into {n} equal parts.")
    return np.split(t, n, axis=0)
