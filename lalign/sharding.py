"""Device mesh (data, fsdp, tensor) and regex -> PartitionSpec rules for every array of the train state.

Rules are `(regex, spec)` pairs matched with `re.search` against a leaf's path written with slashes
(`params/student/Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel`, optimizer moments included: their paths
end the same way), first match wins. `spec` is a tuple with one entry per array axis: a mesh axis name, None, or
the string "fsdp_auto" alone = shard the largest axis divisible by the fsdp size over 'fsdp' (the default for
everything no other rule names). A scanned block leaf (`encoderblock/...`, leading depth axis) gets a leading
None. A named axis that does not divide its dimension is left unsharded rather than failing; the golden-sharding
test pins the result for real models so that silent replication of big weights is caught.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_SPEC = P(("data", "fsdp"))

# Megatron-style tensor parallelism inside each block (heads / MLP hidden over 'tensor') with FSDP on the model
# dimension; everything else FSDP on its largest divisible axis.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (r"MultiHeadDotProductAttention_0/(query|key|value)/kernel$", ("fsdp", "tensor", None)),
    (r"MultiHeadDotProductAttention_0/(query|key|value)/bias$", ("tensor", None)),
    (r"MultiHeadDotProductAttention_0/out/kernel$", ("tensor", None, "fsdp")),
    (r"MlpBlock_0/Dense_0/kernel$", ("fsdp", "tensor")),
    (r"MlpBlock_0/Dense_0/bias$", ("tensor",)),
    (r"MlpBlock_0/Dense_1/kernel$", ("tensor", "fsdp")),
    (r".*", "fsdp_auto"),
)


def _devices_text(num_devices: int) -> str:
    if jax.process_count() > 1 and num_devices == jax.device_count():
        return f"{num_devices} devices ({jax.process_count()} processes x {jax.local_device_count()})"
    return f"{num_devices} devices"


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor) from the config; one -1 takes the rest of the devices (default: data)."""
    sizes = [int(mesh_cfg.get(a, -1 if a == "data" else 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(AXES, sizes))}: {_devices_text(num_devices)} are not "
                             f"divisible by {known}.")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, but "
                         f"{_devices_text(num_devices)} are available.")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices, or the first `mesh_cfg['num_devices']` (tests, benchmarks).

    Devices are placed by `mesh_utils.create_device_mesh`, which on TPU follows the chips' torus so that the
    inner axes (fsdp, tensor: the most traffic) sit on neighbouring chips; elsewhere it keeps the enumeration
    order (each host's devices together). A device subset it cannot lay out keeps the enumeration order."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh_cfg.get("num_devices"):
        devices = devices[:int(mesh_cfg["num_devices"])]
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # e.g. a TPU subset that is not a sub-torus
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """The PartitionSpec of one array (see the module docstring)."""
    if not shape:
        return P()
    for pattern, spec in rules:  # noqa: B007 - the matching rule's spec is read after the loop
        if re.search(pattern, path):
            break
    else:
        return P()
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    if spec == "fsdp_auto":
        spec = [None] * len(shape)
        if sizes.get("fsdp", 1) > 1:
            divisible = [i for i, d in enumerate(shape) if d % sizes["fsdp"] == 0]
            if divisible:
                spec[max(divisible, key=lambda i: shape[i])] = "fsdp"
        return P(*spec)
    spec = list(spec)
    if len(spec) == len(shape) - 1 and re.search(r"(^|/)encoderblock/", path):
        spec = [None] + spec  # scanned layout: leading depth axis stays whole
    if len(spec) != len(shape):
        raise ValueError(f"Sharding rule {pattern!r} gives {len(spec)} axes for {path} of shape {shape}.")
    return P(*[a if a is None or (sizes.get(a, 1) > 1 and d % sizes[a] == 0) else None
               for a, d in zip(spec, shape)])


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding for every leaf of a (possibly abstract) pytree."""
    rules = tuple(rules) if rules else DEFAULT_RULES
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_str(p), tuple(np.shape(x)), mesh, rules)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, data: int, fsdp: int, accum: int = 1) -> None:
    """The global batch, and each of its `accum` micro-batches, splits evenly over the data x fsdp batch shards."""
    shards = data * fsdp
    if batch_size % shards:
        raise ValueError(f"config.batch_size {batch_size} is not divisible by the {shards} batch shards of the mesh "
                         f"(data={data} x fsdp={fsdp}). Resuming on another mesh keeps the global batch (the data "
                         f"order depends on it): choose config.mesh so that data x fsdp divides it.")
    if accum > 1:
        if batch_size % accum:
            raise ValueError(f"config.batch_size {batch_size} is not divisible by config.grad_accum_steps {accum}.")
        micro = batch_size // accum
        if micro % shards:
            raise ValueError(f"With config.grad_accum_steps={accum}, each micro-batch of {micro} images is split over "
                             f"the mesh, but {micro} is not divisible by its {shards} batch shards (data={data} x "
                             f"fsdp={fsdp}).")


def check_batch_divisible(batch_size: int, mesh: Mesh, accum: int = 1) -> None:
    check_batch(batch_size, mesh.shape["data"], mesh.shape["fsdp"], accum)


def host_shard(batch_size: int, mesh: Mesh) -> tuple[int, int]:
    """(i, n): this process's devices hold the i-th of n equal, contiguous slices of every global batch, which is
    what the data sources build (`batch(step, batch_size, shard=(i, n))`). Read from the batch sharding itself,
    so it holds for any mesh layout (a host whose devices share rows with another host's builds the same rows)."""
    check_batch_divisible(batch_size, mesh)
    rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                   for s in batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    local = stop - start
    if covered != local or batch_size % local or start % local:
        raise ValueError(f"Process {jax.process_index()}'s devices hold batch rows {rows} of {batch_size}: not one "
                         f"contiguous, evenly dividing slice. Use a mesh whose batch axes (data, fsdp) keep each "
                         f"host's devices together.")
    return start // local, batch_size // local


def put_batch(x: np.ndarray, mesh: Mesh):
    """This process's slice of the global batch -> a global array sharded over (data, fsdp)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(x))


def local_copy(tree):
    """A pytree every host can compute with on its own devices (the probe, after training): arrays spread over
    several hosts' devices are gathered whole as numpy arrays; arrays this host holds whole are returned as they
    are (so a one-process run computes exactly what it did before). Every host must call it (a collective when
    arrays span hosts)."""
    leaves, treedef = jax.tree.flatten(tree)
    spread = [i for i, x in enumerate(leaves) if not getattr(x, "is_fully_addressable", True)]
    if not spread:
        return tree
    gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
    for i, x in zip(spread, gathered):
        leaves[i] = np.asarray(x)
    return jax.tree.unflatten(treedef, leaves)
