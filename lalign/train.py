"""The MaskEmbed training loop, top to bottom: init, step, eval, checkpoint, log.

    state = {"step", "params": {"student", "proj", "decoder"}, "opt_state", "target_std"
             [, "target_whitening": {"mean", "matrix"}  with maskembed.whiten_targets]}

The teacher's params are a separate, frozen input of the step. Batches are a pure function of the step (see
`lalign.data`), so a run resumed from its latest checkpoint sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from lalign import data as data_lib
from lalign import distributed
from lalign import files
from lalign import maskembed
from lalign import sharding
from lalign import watch
from lalign.checkpoints.manager import Checkpoints
from lalign.data.images import device_normalize, run_normalization
from lalign.log import info
from lalign.metric_writer import MetricWriter
from lalign.optim import make_optimizer, peak_lr
from lalign.models.vit import ViT


def check_image_size(model: ViT, params, image_size: int, where: str) -> None:
    """A learned position embedding fixes the patch grid: say so clearly instead of a deep shape error."""
    pos = params.get("pos_embedding")
    if pos is None:
        return
    grid = image_size // model.patch_size[0]
    expected = grid * grid + int(model.has_class_token and model.cls_posemb)
    if pos.shape[1] != expected:
        raise ValueError(
            f"{where}: image_size {image_size} with patch {tuple(model.patch_size)} gives {grid}x{grid} patches, "
            f"but the model's pos_embedding has {pos.shape[1]} rows (shape {tuple(pos.shape)}). Set "
            f"config.data.image_size to match the checkpoint.")


def make_init_state(model: maskembed.MaskEmbedModel, tx, cfg, example_images) -> Callable:
    """init_state(full teacher params, key) -> a fresh train state (the module docstring's tree). The target
    normalization in it is a placeholder (std 1, identity whitening) until `train_maskembed` measures it."""
    n_masks = maskembed.num_masks(cfg)

    def init_state(teacher_params, key):
        params = maskembed.init_from_teacher(model, teacher_params, key, example_images, n_masks)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                 "target_std": jnp.ones((), jnp.float32)}
        if cfg.whiten_targets:
            d = model.decoder_width
            state["target_whitening"] = {"mean": jnp.zeros((d,), jnp.float32), "matrix": jnp.eye(d, dtype=jnp.float32)}
        return state

    return init_state


def target_norm(state):
    """What the loss normalizes teacher targets with: the whitening if the state has one, else the std."""
    return state.get("target_whitening", state["target_std"])


@dataclasses.dataclass
class MaskEmbedStep:
    """What the training loop and the benchmark share: models, mesh, shardings, keys and the jitted functions.

    init(teacher_params, key) -> sharded state; train_step(state, teacher_params, images) -> (state, metrics) with
    the state donated; eval_loss(params, teacher_params, images, key, target_norm(state)) -> scalar.
    """

    model: maskembed.MaskEmbedModel
    teacher: maskembed.Teacher
    teacher_params: Any  # the truncated target teacher, on the mesh
    mesh: Any
    state_shardings: Any
    init: Callable
    train_step: Callable
    eval_loss: Callable
    keys: dict


def build_step(config, teacher: ViT, teacher_params, example_images) -> MaskEmbedStep:
    cfg = config.maskembed
    init_key, std_key, train_key, val_key = jax.random.split(jax.random.key(config.seed), 4)

    # --- Models: frozen truncated teacher, student + projection + decoder initialized from it.
    target_teacher, target_params = maskembed.Teacher.create(teacher, teacher_params, cfg.target_layer,
                                                              dtype=_dtype(cfg.teacher_dtype))
    model = maskembed.make_maskembed_model(teacher, cfg)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    loss_fn = maskembed.make_loss_fn(model, target_teacher, cfg)
    masked_loss_fn = maskembed.make_masked_loss_fn(model, target_teacher, cfg)
    accum = config.grad_accum_steps
    pixels = run_normalization(config.data)  # what the batches' uint8 pixels are normalized with, on the device

    # --- Sharding: one mesh; every array of the state, the teacher and the batch gets an explicit sharding.
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.batch_size, mesh, accum)
    rules = tuple(config.sharding_rules) or sharding.DEFAULT_RULES
    init_state = make_init_state(model, tx, cfg, jnp.asarray(example_images))

    # Shapes first (no computation), then init directly into the sharded layout: no device holds it all.
    state_sh = sharding.tree_shardings(jax.eval_shape(init_state, teacher_params, init_key), mesh, rules)
    teacher_sh = sharding.tree_shardings(target_params, mesh, rules)
    target_params = jax.device_put(target_params, teacher_sh)
    full_teacher_sh = sharding.tree_shardings(teacher_params, mesh, rules)
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    jit_init = jax.jit(init_state, out_shardings=state_sh)

    def init(teacher_params, key):
        # The full teacher (head included) only seeds the student: placed on the mesh for this call (it may sit
        # on any device, e.g. restored) and not kept afterwards.
        return jit_init(jax.device_put(teacher_params, full_teacher_sh), key)

    micro_sh = NamedSharding(mesh, P(None, *sharding.BATCH_SPEC))

    def accumulated_grads(params, teacher_params, images, key, norm):
        """Mean loss and gradient over `accum` micro-batches (a scan: activations of one micro-batch at a time).
        The masks are drawn for the whole batch first, so the result is the full-batch gradient up to float
        rounding; micro-batch i holds images i, i+accum, ... so that each device keeps its own rows."""
        masks, dropout_key = maskembed.draw_masks(key, images.shape, model.student.patch_size, cfg)

        def split(x):  # (B, ...) -> (accum, B / accum, ...), batch rows staying on their devices
            x = jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0)
            return jax.lax.with_sharding_constraint(x, micro_sh)

        grad_fn = jax.value_and_grad(masked_loss_fn, has_aux=True)

        def body(total, inputs):
            i, micro_images, micro_masks = inputs
            (loss, _), grads = grad_fn(params, teacher_params, micro_images, micro_masks,
                                       jax.random.fold_in(dropout_key, i), norm, True)
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), split(images), split(masks)))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    @functools.partial(jax.jit, donate_argnums=(0,), in_shardings=(state_sh, teacher_sh, batch_sh),
                       out_shardings=(state_sh, repl))
    def train_step(state, teacher_params, images):
        images = device_normalize(images, pixels)  # uint8 from the host, normalized here on the device
        key = jax.random.fold_in(train_key, state["step"])
        if accum == 1:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, _), grads = grad_fn(state["params"], teacher_params, images, key, target_norm(state), True)
        else:
            loss, grads = accumulated_grads(state["params"], teacher_params, images, key, target_norm(state))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    norm_sh = target_norm(state_sh)  # the whitening matrix is sharded like the state holds it (fsdp > 1)

    @functools.partial(jax.jit, in_shardings=(state_sh["params"], teacher_sh, batch_sh, None, norm_sh),
                       out_shardings=repl)
    def eval_loss(params, teacher_params, images, key, norm):
        return loss_fn(params, teacher_params, device_normalize(images, pixels), key, norm, False)[0]

    return MaskEmbedStep(model=model, teacher=target_teacher, teacher_params=target_params, mesh=mesh,
                         state_shardings=state_sh, init=init,
                         train_step=train_step, eval_loss=eval_loss,
                         keys={"init": init_key, "std": std_key, "val": val_key})


def _announce(config, teacher: ViT) -> None:
    """Log what a run does that a user might not expect: a patch grid not covering the image, a scaled lr."""
    size, patch = config.data.image_size, teacher.patch_size[0]
    covered = size // patch * patch
    if covered != size:  # So400m/14 at 384: by design, but never silently
        info(f"[maskembed] image {size} px, patch {patch}: the patch grid covers {covered} px; the last "
             f"{size - covered} pixel rows and columns are outside it (masked to zero for the teacher, not seen by "
             f"the student's patch embedding)")
    lr_note = peak_lr(config.optimizer, config.batch_size)[1]
    if lr_note:  # the recipe's lr belongs to another global batch
        info(f"[maskembed] {lr_note}")


def _with_target_stats(state: dict, s: MaskEmbedStep, config, batches: list) -> dict:
    """The target scale (and whitening), measured once before training on masked images of `batches`, sharded
    over the mesh like the step, and kept in the state so a resumed run uses the same values."""
    cfg, repl = config.maskembed, sharding.replicated(s.mesh)
    stats = maskembed.estimate_target_stats(s.teacher, s.teacher_params, batches, s.keys["std"], cfg,
                                            whiten=cfg.whiten_targets, out_sharding=repl,
                                            normalization=run_normalization(config.data))
    if cfg.normalize_targets:
        state["target_std"] = jax.device_put(np.float32(stats["std"]), repl)
    info(f"[maskembed] teacher target std (masked images) = {stats['std']:.4f}")
    if "whitening" in stats:
        state["target_whitening"] = jax.device_put(stats["whitening"], s.state_shardings["target_whitening"])
        info("[maskembed] targets whitened (ZCA on masked images)")
    return state


def _save_and_exit(step: int, state: dict, ckpts: Checkpoints, host: "HostReport", train_data) -> None:
    if ckpts.latest_step() != step:  # the signal may have come during this step's own save
        ckpts.save(step, state)
    ckpts.wait()
    host.write(step, "preempted", train_data)
    info(f"[maskembed] SIGTERM: saved step {step} to {ckpts.latest.directory}; exiting")
    raise SystemExit(143)


def _log_train(writer: MetricWriter, step: int, sums: dict, count: int, train_data, ckpts: Checkpoints) -> None:
    """The mean of the metrics summed since the last record (one device read), checked finite, written."""
    means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
    if getattr(train_data, "num_skipped", 0):  # unreadable images replaced (real data sources)
        means["images_skipped"] = train_data.num_skipped
    _check_finite(means["loss"], step, ckpts)
    writer.log_train(step, **means)


def train_maskembed(config, workdir: str, teacher: ViT, teacher_params) -> dict[str, Any]:
    """Runs (or resumes) MaskEmbed. Returns {'params': best by val loss, 'last_params', 'best_val_loss',
    'best_step', 'target_std', 'step', 'model'}.

    Multi-host: every host builds only the rows of each batch its devices hold (training, target statistics,
    validation), all hosts take part in every checkpoint save and restore, process 0 alone writes metrics, and a
    preemption stops every host at one agreed step (`lalign.distributed.Preemption`). Each host leaves a short
    account of what it did in `workdir/hosts/process_<i>.json`."""
    total_steps, batch_size, size = config.total_steps, config.batch_size, config.data.image_size
    check_image_size(teacher, teacher_params, size, "teacher")
    _announce(config, teacher)
    s = build_step(config, teacher, teacher_params, np.zeros((2, size, size, 3), np.float32))
    mesh, repl = s.mesh, sharding.replicated(s.mesh)
    shard = sharding.host_shard(batch_size, mesh)  # (i, n): this host's slice of every global batch

    # --- Data: the training stream and a fixed validation set (fixed masks too: comparable across evals).
    train_data = data_lib.image_source(config.data, "maskembed", seed=config.seed)
    val_batches = [sharding.put_batch(b["image"], mesh) for b in data_lib.fixed_batches(
        config.data, "maskembed_val", config.val_batches, batch_size, seed=config.seed, shard=shard)]
    host = HostReport(workdir, shard, batch_size)

    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=config.async_checkpointing,
                        replicated=repl)
    state = s.init(teacher_params, s.keys["init"])
    if ckpts.latest_step() is not None:
        state = ckpts.restore_latest(state)
        host.resumed_from = int(state["step"])
        info(f"[maskembed] resumed from {ckpts.latest.directory} at step {host.resumed_from}")
    else:
        state = _with_target_stats(state, s, config, [
            sharding.put_batch(train_data.batch(i, batch_size, shard)["image"], mesh)
            for i in range(config.maskembed.target_std_batches)])

    # The locality meter (lalign/watch.py): teacher measured once here, the student at each validation.
    meter = watch.Watch(config, teacher, teacher_params, s.model, mesh, val_batches[0])

    def validate(state) -> dict:
        losses = [s.eval_loss(state["params"], s.teacher_params, im, jax.random.fold_in(s.keys["val"], i),
                              target_norm(state)) for i, im in enumerate(val_batches)]
        return {"val_loss": float(np.mean(jax.device_get(losses))), **meter.measure(state["params"])}

    def report(step: int, vals: dict, note: str = "") -> None:
        writer.write(step, **vals)
        info(f"[maskembed] step {step} | val_loss {vals['val_loss']:.4f}{meter.describe(vals)}{note}")
        warning = meter.warning(vals)
        if warning:
            info(f"[maskembed] {warning}")

    writer = MetricWriter(workdir, "maskembed", total_steps, batch_size, quiet=config.quiet)
    if host.resumed_from is not None:
        dropped = writer.resume_at(host.resumed_from)
        if dropped:
            info(f"[maskembed] metrics.jsonl: {dropped} records after step {host.resumed_from}, logged before the "
                 f"restart, dropped (they are logged again)")
    step = int(state["step"])
    if step == 0 and config.eval_every:
        report(0, validate(state), " (before training)")
    sums, count, last_loss = None, 0, None
    with distributed.Preemption() as preemption, distributed.StopIfHostLost(lambda: _resume_point(ckpts)):
        while step < total_steps:
            if preemption.stop(step):  # SIGTERM on any host: all hosts save this same step, then stop
                _save_and_exit(step, state, ckpts, host, train_data)
            images = sharding.put_batch(train_data.batch(step, batch_size, shard)["image"], mesh)
            state, metrics = s.train_step(state, s.teacher_params, images)
            step += 1
            if last_loss is not None:  # the previous step's loss, read while this step runs: no stall
                _check_finite(float(last_loss), step - 1, ckpts)
            last_loss = metrics["loss"]
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            count += 1
            if step % config.log_every == 0 or step == total_steps:
                _log_train(writer, step, sums, count, train_data, ckpts)
                sums, count = None, 0
            if (config.eval_every and step % config.eval_every == 0) or step == total_steps:
                vals = validate(state)
                _check_finite(vals["val_loss"], step, ckpts, "validation loss")
                report(step, vals)
                ckpts.save(step, state, val_loss=vals["val_loss"])
                writer.reset_clock()
            elif config.checkpoint_every and step % config.checkpoint_every == 0:
                ckpts.save(step, state)
    ckpts.wait()
    writer.close()
    host.write(step, "finished", train_data)
    best = ckpts.restore_best(state)
    result = {"params": best["params"], "last_params": state["params"], "best_val_loss": ckpts.best_val_loss(),
              "best_step": ckpts.best.best_step(), "target_std": float(state["target_std"]), "step": step,
              "model": s.model}
    ckpts.close()
    return result


class HostReport:
    """`workdir/hosts/process_<i>.json`, written by each host for itself: its devices, the rows of each global
    batch it builds, the steps it ran and the files it read. How a pod rehearsal checks every host's share."""

    def __init__(self, workdir: str, shard: tuple[int, int], batch_size: int):
        local = batch_size // shard[1]
        self.path = epath.Path(workdir) / "hosts" / f"process_{jax.process_index()}.json"
        if jax.process_index() == 0 and self.path.parent.exists():
            # Reports of an earlier start (other hosts, another host count) would read as this run's: cleared
            # before any host can write (every host passes the first collective after this).
            for stale in self.path.parent.glob("process_*.json"):
                stale.unlink()
        self.record = {"process": jax.process_index(), "processes": jax.process_count(),
                       "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                       "batch_rows": [shard[0] * local, (shard[0] + 1) * local], "batch_size": batch_size}
        self.resumed_from, self._t0 = None, time.time()

    def write(self, step: int, outcome: str, train_data) -> None:
        record = {**self.record, "outcome": outcome, "resumed_from": self.resumed_from, "step": step,
                  "seconds": round(time.time() - self._t0, 1),
                  "train_files_read": getattr(train_data, "num_read", None)}
        files.write_text(self.path, json.dumps(record, indent=2))


def _resume_point(ckpts: Checkpoints) -> str:
    """Where a restart resumes, for a run stopping now: the newest finalized step on disk (a save still in flight
    never finishes once a host is lost)."""
    root = epath.Path(ckpts.latest.directory)
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []
    return f"step {max(steps)}" if steps else "the start (no checkpoint was saved)"


def _check_finite(value: float, step: int, ckpts: Checkpoints, what: str = "training loss") -> None:
    if not np.isfinite(value):
        ckpts.wait()
        raise FloatingPointError(
            f"MaskEmbed {what} became {value} at step {step}; stopped without saving. {ckpts.resume_note()} Lower "
            f"the learning rate or enable the soft-cap (config.maskembed.attn_softcap=30) before restarting.")


def _dtype(name):
    return None if not name else jnp.dtype(name)
