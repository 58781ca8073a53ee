"""The optimizer every stage uses: AdamW with the reference's defaults, its weight-decay rule, the learning-rate
schedule and how the learning rate follows the global batch. `make_optimizer(config.optimizer, steps, batch)`."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import optax

from lalign import sharding


# Which parameters AdamW's weight decay applies to (`optimizer.weight_decay_on`), by leaf name so that the rule
# reads the same in both block layouts and does not depend on Flax's shapes (q/k/v biases are 2-D here, 1-D in
# torch).
DECAYED = {
    # The reference: its train.py hands timm's create_optimizer_v2 an iterator of parameters (not the module), so
    # timm builds no parameter groups and AdamW decays every parameter (scripts/reference_parity.py measures it).
    "all": None,
    # What timm's factory builds when handed a module: no decay on 1-D parameters and biases (LayerNorm, biases,
    # LayerScale); kernels, position embeddings and the class token decayed. Not what the reference runs.
    "timm_groups": ("kernel", "pos_embedding", "cls"),
    "kernels": ("kernel",),  # big_vision's habit: decay the matrices only
}
# Earlier name of "timm_groups", refused with a pointer rather than silently read as something else.
_RENAMED = {"reference": "timm_groups"}


def weight_decay_mask(params, rule: str = "all"):
    """A tree of bools: True where `rule` (a key of DECAYED) decays the parameter."""
    if rule in _RENAMED:
        raise ValueError(f"optimizer.weight_decay_on {rule!r} is now called {_RENAMED[rule]!r} (no decay on biases, "
                         f"norms and LayerScale); the reference itself decays every parameter: 'all'.")
    if rule not in DECAYED:
        raise ValueError(f"optimizer.weight_decay_on {rule!r}: choose from {sorted(DECAYED)}.")
    names = DECAYED[rule]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: names is None or sharding.path_str(path).rsplit("/", 1)[-1] in names, params)


# How a recipe's learning rate follows the global batch (`optimizer.lr_scale_rule`): the factor applied to `lr`
# at batch B when the recipe's lr belongs to batch `lr_base_batch`. Adam moves every weight by about lr per step
# whatever the batch, so a recipe's lr at a much smaller batch random-walks a pre-trained student away from its
# teacher; 'sqrt' is timm's rule for Adam-family optimizers (`lr_base_scale`), 'linear' its rule for SGD.
LR_SCALE_RULES = {
    "sqrt": lambda ratio: ratio ** 0.5,
    "linear": lambda ratio: ratio,
    "none": lambda ratio: 1.0,
}


def peak_lr(cfg, batch_size: Optional[int] = None) -> tuple[float, str]:
    """(peak learning rate at global batch `batch_size`, a log line saying how it follows from the config; ""
    when nothing was scaled).

    `cfg` is config.optimizer (or a plain dict of it): `lr` is the recipe's peak learning rate at global batch
    `lr_base_batch`; at another batch it is multiplied by LR_SCALE_RULES[`lr_scale_rule`](batch / lr_base_batch).
    `lr_base_batch` 0 (or absent) or no `batch_size`: `lr` is used as given, as the reference uses its --lr."""
    lr, base = float(cfg["lr"]), int(cfg.get("lr_base_batch") or 0)
    rule = cfg.get("lr_scale_rule") or "sqrt"
    if rule not in LR_SCALE_RULES:
        raise ValueError(f"config.optimizer.lr_scale_rule must be one of {tuple(LR_SCALE_RULES)}, got {rule!r}.")
    if not base or not batch_size or batch_size == base:
        return lr, ""
    scaled = lr * LR_SCALE_RULES[rule](batch_size / base)
    how = "lr_scale_rule 'none': not scaled" if rule == "none" else f"{rule} rule"
    return scaled, f"lr {lr:.2g} is for batch {base}; batch {batch_size} → lr {scaled:.2g} ({how})"


def make_optimizer(cfg, total_steps: int, batch_size: Optional[int] = None):
    """AdamW with global-norm clipping; linear warmup then cosine decay to lr * lr_min_ratio.

    Returns (optax transform, schedule). Defaults are the reference's: b1 0.9, b2 0.95, wd 0.01 on every
    parameter (`weight_decay_mask`), clip 1.0, decay to lr/10, no warmup. The peak lr is `peak_lr(cfg,
    batch_size)`: the config's lr, scaled when the global batch differs from the one it belongs to.
    """
    lr = peak_lr(cfg, batch_size)[0]
    warmup = int(cfg["warmup_steps"])
    end = lr * cfg["lr_min_ratio"]
    if warmup:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
    else:
        schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=end / lr)
    parts = []
    if cfg["grad_clip"]:
        parts.append(optax.clip_by_global_norm(cfg["grad_clip"]))
    rule = cfg["weight_decay_on"]
    weight_decay_mask({}, rule)  # an unknown rule is an error now, not at the first step
    parts.append(optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], weight_decay=cfg["wd"],
                             mask=functools.partial(weight_decay_mask, rule=rule)))
    return optax.chain(*parts), schedule
