"""Pre-trains the embedded demo's teacher: a small ViT trained with *image-level* labels only.

CLIP and SigLIP never see where things are; neither does this teacher. It learns which digit classes a scene
contains through its pooling head (MAP by default) with a sigmoid (multi-label) loss, like SigLIP's.
Optionally (`pretrain.crop_scale`) on random resized crops labelled with what each crop shows.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lalign import data as data_lib
from lalign.checkpoints.manager import load_params, save_params
from lalign.data import scenes
from lalign.log import info
from lalign.metric_writer import MetricWriter
from lalign.models.vit import vit_from_config
from lalign.optim import make_optimizer  # one optimizer recipe for every stage


def pretrain_teacher(config, workdir: str):
    """Trains (or reloads from `workdir/teacher/params`) the demo teacher. Returns (model, params)."""
    pcfg = config.pretrain
    data = data_lib.image_source(config.data, "pretrain", seed=config.seed)
    model = vit_from_config(config, num_classes=data.spec.num_classes)
    path = os.path.join(workdir, "teacher", "params")
    example = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
    params = model.init(jax.random.key(config.seed + 1000), example)["params"]
    if os.path.exists(path):
        info(f"[pretrain] reusing the teacher at {path}")
        return model, load_params(path, like=params)


    tx, schedule = make_optimizer(pcfg.optimizer, pcfg.steps)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step_fn(params, opt_state, images, labels, step):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, images, train=True)
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "lr": schedule(step)}

    writer = MetricWriter(os.path.join(workdir, "teacher"), "pretrain", pcfg.steps, pcfg.batch_size,
                          quiet=config.quiet)
    for step in range(pcfg.steps):
        batch = data.batch(step, pcfg.batch_size)
        if pcfg.crop_scale:  # a pure function of (seed, step) like the batch, so a rerun is identical
            batch = scenes.random_crop(batch, np.random.default_rng([config.seed, step]), pcfg.crop_scale,
                                       pcfg.crop_min_visible)
        params, opt_state, metrics = step_fn(params, opt_state, jnp.asarray(batch["image"]),
                                             jnp.asarray(batch["labels"]), step)
        if (step + 1) % config.log_every == 0 or step + 1 == pcfg.steps:
            writer.log_train(step + 1, **jax.device_get(metrics))
    writer.close()
    save_params(path, params)
    return model, params
