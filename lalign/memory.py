"""Per-device memory and runtime estimate of a MaskEmbed config on a TPU slice, without allocating anything.

    python -m lalign.memory --config=configs/siglip_so400m.py [--devices=256] [--chip="TPU v4"]
    python -m lalign.memory --config=configs/siglip_so400m.py --update_docstring   # refresh the config's table

Parameters are counted on the real train state: `jax.eval_shape` of the same init as `lalign.train.build_step`
(teacher init, truncation to the target block, student/proj/decoder init, AdamW init), and each array's
per-device size follows the PartitionSpec that `lalign.sharding` gives it on the config's mesh sized for
`--devices` (default `config.estimate.devices`). Rows:
- student + proj + decoder (fp32 master weights), their gradients (fp32, alive during the step), AdamW's two
  moments (fp32);
- the frozen target teacher (its first k blocks, in `maskembed.teacher_dtype`);
- the full teacher in its loaded dtype, placed on the mesh while the student is initialized from it (a peak at
  start-up; released before training);
- activations: a rough analytic model (below), per device = images per device x per image;
- the target-statistics pass before training (the teacher on `target_std_batches` whole batches, one at a time,
  sharded like the step: teacher + targets / 3 below, per image on the device). It is never alive together with
  the step's activations, so the total counts the larger of the two.

Activation model (bytes, per image; b = bytes of the compute dtype; T tokens, width D, MLP width F, H heads, tp =
mesh 'tensor' size, M masks, L student blocks, Ld decoder blocks at the teacher's width Dt with MLP 4 Dt):
    block_saved(T, D, F, H) = b T (4 D + (4 D + 2 F) / tp) + (H / tp) T^2 (4 + b)
        what autodiff keeps of one pre-LN block: its input, the two LayerNorm outputs and the residual (4 D,
        whole on every tensor shard); q, k, v and the attention output (4 D) and the MLP's pre- and
        post-activation (2 F), split over heads / hidden units by tensor parallelism; the float32 softmax
        output and its b-byte cast (H T^2).
    student = L * block_saved                 remat_policy 'none' or 'dots_saveable' (an upper bound for the latter)
            = L * b T D + block_saved         'nothing_saveable' / 'dots_with_no_batch_dims_saveable': block inputs
                                              only, one block recomputed at a time in the backward pass
    decoder = M * (Ld * block_saved(T, Dt, 4 Dt, H) + b T Dt)                    never rematerialized
    targets = 3 * M * 4 T Dt                  teacher targets, predictions and their difference, float32
    teacher = M * (b_t T (4 D + F / tp) + (H / tp) T^2 (4 + b_t))       forward only: one block's working set
    activations = targets + max(teacher, student + decoder)
Not modelled: XLA's temporary buffers and fusion choices, collective buffers, the input pipeline on the host. The
estimate is for sizing a mesh, not a guarantee; `lalign.bench` reports the measured peak where the backend has one.
Checked against XLA's own buffer assignment on CPU (`compiled.memory_analysis()` of the real step; a width-128,
depth-4 ViT at 64 px, batch 8, float32, one device): XLA's temporaries were 99 MiB without remat and 60 MiB with
'nothing_saveable', against 58 and 44 MiB modelled (activations + gradients). So on CPU the model is low by a
factor 1.4-1.7; read the activation row as a lower bound and keep headroom (TPU buffer assignment is usually
tighter than CPU's, and bf16 halves what float32 needs on CPU, where XLA computes bf16 in float32).

Runtime: `lalign.cost_model.maskembed_flops_per_image` (analytic model FLOPs; rematerialized recomputation is not
counted, as MFU conventionally excludes it) x total_steps x batch_size / (devices x peak bf16 FLOP/s x MFU), with
an assumed MFU (`config.estimate.mfu`, 40% unless stated). An estimate, not a measurement.
"""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from lalign import cli, maskembed, sharding
from lalign import config as config_lib
from lalign.cost_model import HBM_GIB, PEAK_TFLOPS, block_saved, maskembed_flops_per_image
from lalign.models.vit import vit_from_config
from lalign.optim import make_optimizer
from lalign.train import _dtype, make_init_state

GIB, MIB = 2**30, 2**20
BEGIN, END = "--- memory and runtime estimate", "--- end of estimate ---"


def _abstract_mesh(mesh_cfg, devices: int):
    """A stand-in with what `sharding.spec_for` reads of a Mesh (axis names and sizes), for any device count."""
    shape = sharding.mesh_shape(mesh_cfg, devices)
    return SimpleNamespace(axis_names=sharding.AXES, devices=np.empty(shape, dtype=object), shape=dict(
        zip(sharding.AXES, shape)))


def _local_bytes(tree, mesh, rules) -> tuple[int, int]:
    """(number of elements, bytes on one device) of an abstract pytree under the sharding rules."""
    count, local = 0, 0
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = tuple(leaf.shape)
        spec = sharding.spec_for(sharding.path_str(path), shape, mesh, rules)
        n = 1
        for i, d in enumerate(shape):
            axes = spec[i] if i < len(spec) else None
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            n *= math.ceil(d / int(np.prod([sizes[a] for a in axes])) if axes else d)
        count += int(np.prod(shape))
        local += n * jnp.dtype(leaf.dtype).itemsize
    return count, local


def abstract_state(config):
    """(teacher ViT, abstract full teacher params, abstract target-teacher params, abstract train state), the
    same trees `train.build_step` creates, as ShapeDtypeStructs."""

    cfg, size = config.maskembed, config.data.image_size
    teacher = vit_from_config(config, num_classes=None)
    key = jax.random.key(0)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    full = jax.eval_shape(lambda k, x: teacher.init(k, x)["params"], key, image)
    target = jax.eval_shape(
        lambda p: maskembed.Teacher.create(teacher, p, cfg.target_layer, dtype=_dtype(cfg.teacher_dtype))[1], full)
    model = maskembed.make_maskembed_model(teacher, cfg)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    init_state = make_init_state(model, tx, cfg, jnp.zeros((2, size, size, 3)))
    return teacher, full, target, jax.eval_shape(init_state, full, key)


def activation_bytes_per_image(config, teacher, mesh_sizes) -> dict[str, float]:
    cfg, size = config.maskembed, config.data.image_size
    tp = mesh_sizes["tensor"]
    gh, gw = maskembed.patch_grid((size, size), teacher.patch_size)
    t = gh * gw + teacher.num_prefix_tokens
    d, f, h = teacher.width, teacher.mlp_dim or 4 * teacher.width, teacher.num_heads
    m = maskembed.num_masks(cfg)
    b = jnp.dtype(cfg.student_dtype or "float32").itemsize
    bt = jnp.dtype(cfg.teacher_dtype or "float32").itemsize
    blk = block_saved(t, d, f, h, b, tp)
    if teacher.remat_policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
        student = teacher.depth * b * t * d + blk
    else:
        student = teacher.depth * blk
    decoder = m * (cfg.decoder_depth * block_saved(t, d, 4 * d, h, b, tp) + b * t * d)
    targets = 3 * m * 4 * t * d
    teacher_ws = m * (bt * t * (4 * d + f / tp) + h / tp * t * t * (4 + bt))
    return {"tokens": t, "student": student, "decoder": decoder, "targets": targets, "teacher": teacher_ws,
            "total": targets + max(teacher_ws, student + decoder)}


def estimate(config, devices: int | None = None, chip: str | None = None) -> dict:
    config = config_lib.completed(config)
    est = config.estimate
    devices = devices or est.devices
    chip = chip or est.chip
    mfu = est.mfu
    mesh = _abstract_mesh(config.mesh, devices)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    rules = tuple(config.sharding_rules) or sharding.DEFAULT_RULES
    teacher, full, target, state = abstract_state(config)
    params = state["params"]
    rows = {}
    rows["student"] = _local_bytes(params["student"], mesh, rules)
    rows["proj_decoder"] = _local_bytes({"proj": params["proj"], "decoder": params["decoder"]}, mesh, rules)
    n_train = rows["student"][0] + rows["proj_decoder"][0]
    train_local = rows["student"][1] + rows["proj_decoder"][1]
    _, opt_local = _local_bytes(state["opt_state"], mesh, rules)
    rows["teacher"] = _local_bytes(target, mesh, rules)
    rows["full_teacher"] = _local_bytes(full, mesh, rules)
    batch_shards = sizes["data"] * sizes["fsdp"]
    if config.batch_size % batch_shards:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {batch_shards} batch shards of a "
                         f"{devices}-device mesh {sizes}.")
    accum = config.grad_accum_steps
    per_device_images = config.batch_size // batch_shards // accum  # live at once: one micro-batch
    act = activation_bytes_per_image(config, teacher, sizes)
    act_local = act["total"] * per_device_images
    # Before training, the target statistics run the teacher on whole batches (not micro-batches), sharded like
    # the step: its working set and float32 outputs on this device's images; never alive together with the step.
    stats_local = (act["teacher"] + act["targets"] / 3) * (config.batch_size // batch_shards)
    total = train_local * 2 + opt_local + rows["teacher"][1] + rows["full_teacher"][1] + max(act_local, stats_local)


    flops_image = maskembed_flops_per_image(teacher, config.data.image_size, config.maskembed,
                                            config.maskembed.decoder_depth)["total"]
    images = config.total_steps * config.batch_size
    peak = PEAK_TFLOPS.get(chip)
    seconds = flops_image * images / (devices * peak * 1e12 * mfu) if peak else float("nan")
    return {
        "devices": devices, "chip": chip, "slice": est.slice, "mesh": sizes, "mfu": mfu,
        "images_per_device": per_device_images, "grad_accum_steps": accum, "tokens": act["tokens"],
        "remat_policy": teacher.remat_policy, "target_blocks": maskembed.target_num_blocks(
            teacher.depth, config.maskembed.target_layer),
        "trainable_params": n_train, "student_params": rows["student"][0], "decoder_params": rows["proj_decoder"][0],
        "teacher_params": rows["full_teacher"][0],
        "bytes": {"params": train_local, "grads": train_local, "adamw": opt_local, "teacher": rows["teacher"][1],
                  "full_teacher": rows["full_teacher"][1], "activations": act_local,
                  "target_stats": stats_local, "total": total},
        "activations_per_image": act, "hbm_gib": HBM_GIB.get(chip),
        "flops_per_image": flops_image, "images": images, "runtime_s": seconds,
    }


def shardings(config, devices: int | None = None) -> dict:
    """{'mesh': sizes, 'specs': {path: PartitionSpec as text}} for every parameter a run places on the mesh: the
    student, projection and decoder (`state/params/...`; optimizer moments follow the same rules), the target
    teacher and the full teacher. What the golden-sharding test pins for the real configs."""
    config = config_lib.completed(config)
    mesh = _abstract_mesh(config.mesh, devices or config.estimate.devices)
    rules = tuple(config.sharding_rules) or sharding.DEFAULT_RULES
    _, full, target, state = abstract_state(config)
    specs = {}
    for prefix, tree in (("state/params", state["params"]), ("target_teacher", target), ("full_teacher", full)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = f"{prefix}/{sharding.path_str(path)}"
            specs[name] = str(tuple(sharding.spec_for(name, tuple(leaf.shape), mesh, rules))) + f" {list(leaf.shape)}"
    return {"mesh": dict(zip(mesh.axis_names, mesh.devices.shape)), "specs": specs}


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:7.2f} GiB" if n >= GIB else f"{n / MIB:7.1f} MiB"


def report(config, devices: int | None = None, chip: str | None = None) -> str:
    e = estimate(config, devices, chip)
    accum = e["grad_accum_steps"]
    mesh = " ".join(f"{k}={v}" for k, v in e["mesh"].items())
    tdtype = config.maskembed.teacher_dtype or "float32"
    b = e["bytes"]
    rows = [
        (f"student + proj + decoder, fp32 ({e['trainable_params'] / 1e6:.1f}M params)", b["params"]),
        ("gradients, fp32", b["grads"]),
        ("AdamW moments, 2 x fp32", b["adamw"]),
        (f"target teacher, {e['target_blocks']} block(s), {tdtype}", b["teacher"]),
        ("full teacher, fp32 (at init only)", b["full_teacher"]),
        ("activations (rough model, lalign/memory.py)", b["activations"]),
        ("target statistics pass (before training; not added)", b["target_stats"]),
        ("total per device (the larger of the two above)", b["total"]),
    ]
    lines = [f"{e['devices']} devices ({e['chip']}), mesh {mesh}; batch {config.batch_size} = "
             f"{e['images_per_device']} images per device" + (f" per micro-batch ({accum} micro-batches)" if
                                                                accum > 1 else "") + ";",
             f"{e['tokens']} tokens per image, remat_policy {e['remat_policy']!r}. Bytes per device:"]
    lines += [f"  {label:<52}{_fmt_bytes(n)}" for label, n in rows]
    if e["hbm_gib"]:
        lines[-1] += f"   (of {e['hbm_gib']} GiB HBM)"
    hours = e["runtime_s"] / 3600
    named = e["slice"] and e["devices"] == config.estimate.devices
    where = f"{e['slice']} ({e['devices']} x {e['chip']})" if named else f"{e['devices']} x {e['chip']}"
    lines += [f"Runtime, ESTIMATE: {e['flops_per_image'] / 1e12:.2f} TFLOP/image (lalign.bench FLOP model) x "
              f"{e['images'] / 1e6:.2f}M images",
              f"on {where} at an assumed {e['mfu']:.0%} MFU: {hours:.1f} h."]
    return "\n".join(lines)


def docstring_block(text: str) -> str | None:
    """The estimate between the BEGIN and END marker lines of a config's source, or None."""
    m = re.search(re.escape(BEGIN) + r"[^\n]*\n(.*?)" + re.escape(END), text, re.S)
    return m.group(1).rstrip("\n") if m else None


def update_docstring(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    if docstring_block(text) is None:
        raise ValueError(f"{path} has no '{BEGIN} ...' / '{END}' block to update.")
    new = re.sub(re.escape(BEGIN) + r"([^\n]*)\n.*?" + re.escape(END),
                 lambda m: f"{BEGIN}{m.group(1)}\n{table}\n{END}", text, count=1, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.shardings:
        print(json.dumps(shardings(FLAGS.config, FLAGS.devices), indent=1))
        return
    table = report(FLAGS.config, FLAGS.devices, FLAGS.chip)
    print(table)
    if FLAGS.update_docstring:
        path = config_flags.get_config_filename(FLAGS["config"])
        update_docstring(path, table)
        print(f"updated {path}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
    flags.DEFINE_integer("devices", None, "Number of devices (default: config.estimate.devices, else 256).")
    flags.DEFINE_string("chip", None, "Chip kind for HBM and peak FLOP/s (default: config.estimate.chip).")
    flags.DEFINE_bool("shardings", False, "Print the PartitionSpec and shape of every parameter instead (JSON).")
    flags.DEFINE_bool("update_docstring", False, "Rewrite the estimate block in the config file's docstring.")
    flags.mark_flags_as_required(["config"])
    cli.run_absl("memory", main)
