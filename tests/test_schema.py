"""The config schema (lalign/config.py): one place for every field's default, rule and meaning."""
import os
import re
import subprocess
import sys

import ml_collections
import pytest
from conftest import ROOT, load_config

from lalign import config as config_lib
from lalign import validate
from lalign.data import probe_splits

SHIPPED = ["configs/demo.py", "configs/demo.py:smoke", "configs/demo.py:tiny", "configs/demo_ablations.py",
           "configs/siglip_so400m.py", "configs/siglip_so400m.py:smoke", "configs/siglip_b16.py",
           "configs/clip_b16.py", "configs/clip_l14_336.py", "configs/dinov2_b14.py", "configs/dinov2_b14.py:smoke"]


def _fields(section: dict, prefix: str = "") -> dict:
    out = {}
    for name, spec in section.items():
        if isinstance(spec, dict):
            out.update(_fields(spec, f"{prefix}{name}."))
        elif isinstance(spec, config_lib.Field):
            out[prefix + name] = spec
    return out


@pytest.mark.parametrize("spec", SHIPPED)
def test_every_shipped_config_follows_the_schema_and_leaves_nothing_to_fill_in(spec):
    config = config_lib.load(spec)
    assert config_lib.errors(config) == []
    before = config.to_dict()
    assert config_lib.complete(config).to_dict() == before  # built from defaults(): every field is there


def test_the_defaults_are_the_references_recipe():
    d = config_lib.defaults()
    assert config_lib.errors(d) == ["config.optimizer.lr must be a positive number, got None"]  # the teacher's own
    o, m = d.optimizer, d.maskembed
    assert (o.b1, o.b2, o.wd, o.grad_clip, o.warmup_steps, o.lr_min_ratio, o.weight_decay_on) == (
        0.9, 0.95, 0.01, 1.0, 0, 0.1, "all")
    assert (m.sampler, m.antithetic, m.include_ones, m.target_layer, m.loss, m.decoder_depth, m.normalize_targets,
            m.whiten_targets, m.attn_softcap) == ("uniform", True, True, "penultimate", "mse", 2, True, False, None)
    assert (d.batch_size, d.total_steps) == (1024, 64_227)  # 5 epochs of ImageNet-21k
    assert "pretrain" not in d and "probe" not in d  # stage sections come with their stages
    assert set(config_lib.defaults(stages=("pretrain", "maskembed", "probe"))) >= {"pretrain", "probe"}


def test_errors_name_every_bad_field_and_suggest_a_typo_fix():
    c = load_config(arg="tiny")
    with c.unlocked():
        c.maskembed.samplr = "block"
        c.optimzer = {}
    c.maskembed.keep_prob = 0.0
    c.log_every = 0
    c.probe.seeds = (0, "1")
    errors = config_lib.errors(c)
    assert errors == [
        "config.optimzer is not a field of the config (did you mean 'optimizer'?)",
        "config.maskembed.samplr is not a field of config.maskembed (did you mean 'sampler'?)",
        "config.maskembed.keep_prob must be in (0, 1], got 0.0",
        "config.log_every must be a positive integer, got 0",
        "config.probe.seeds must be a tuple of integers, got (0, '1')",
    ], errors
    assert all(e in validate.config_errors(c, 8) for e in errors)
    # A ConfigDict refuses a value of another type; a config written as plain dicts is checked here
    assert config_lib.errors({"maskembed": {"antithetic": 1}, "seed": 1.5}) == [
        "config.seed must be an integer, got 1.5", "config.maskembed.antithetic must be True or False, got 1"]


def test_a_config_that_leaves_fields_out_runs_on_their_defaults():
    full = load_config(arg="tiny")
    short = ml_collections.ConfigDict(full.to_dict())
    with short.unlocked():
        del short["watch"], short["estimate"], short["maskembed"]["decoder_ln_eps"], short["probe"]["select_by"]
    assert "watch" not in short
    config_lib.complete(short)
    assert short.watch.to_dict() == config_lib.defaults().watch.to_dict()
    assert short.maskembed.decoder_ln_eps == 1e-5 and short.probe.select_by == "miou"
    assert config_lib.errors(short) == []
    assert validate.config_errors(short, 8) == []
    copy = config_lib.completed({"stages": ("maskembed",)})  # a copy: the dict given is left as it is
    assert copy.batch_size == 1024 and "pretrain" not in copy


def test_a_stage_without_its_section_is_named():
    c = load_config(arg="tiny")
    with c.unlocked():
        del c["pretrain"]
    assert "config.pretrain is needed by the 'pretrain' stage (python -m lalign.config lists its fields)" in \
        config_lib.errors(c)


READERS = ["train.py", "pretrain.py", "optim.py", "memory.py", "teacher.py", "pipeline.py", "validate.py", "watch.py",
           "maskembed.py", "probe/heads.py", "probe/evaluate.py", "probe/run.py", "data/probe_splits.py"]


@pytest.mark.parametrize("module", READERS)
def test_the_loop_reads_fields_without_defaults_of_its_own(module):
    """`config.get("log_every", 1)` restates a default the schema holds; the code reads `config.log_every`."""
    names = ({path.rsplit(".", 1)[-1] for path in _fields(config_lib.SCHEMA)}
             | {path.rsplit(".", 1)[-1] for path in _fields(config_lib.PROBE_SCHEMA)}
             | {key for d in probe_splits.DATASETS.values() for key in d.options}) - {"name", "normalization"}
    # (a run's data.normalization may be absent: "" = the teacher's, pipeline.resolve_normalization)
    source = open(os.path.join(ROOT, "lalign", module)).read()
    restated = [m.group(0) for m in re.finditer(r"""\.get\(["'](\w+)["'],[^)]*\)""", source) if m.group(1) in names]
    assert restated == [], f"lalign/{module} restates schema defaults: {restated}"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lalign.config", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_config_command_lists_every_field_with_its_default_meaning_and_the_configs_value():
    out = _cli("configs/demo.py:tiny")
    assert out.returncode == 0, out.stderr
    for path, field in _fields(config_lib.SCHEMA).items():
        assert f"{path} = {field.default!r}" in out.stdout, path
    assert "maskembed.target_layer = 'penultimate'   * 'last'" in out.stdout  # the demo's deviation, marked
    assert "Deviation: the epoch is chosen by validation mIoU" in out.stdout  # a field's meaning, its reason
    real = _cli("configs/siglip_b16.py")  # an open section: the data source's options from its table
    assert real.returncode == 0, real.stderr
    assert "data.num_val = 10000   * 10240" in real.stdout and "data.train_crop_mode = 'rkrc'\n" in real.stdout
    probe = _cli("configs/probe/coco_stuff.py:smoke")  # a probe config: its data set's options from its table
    assert probe.returncode == 0, probe.stderr
    assert "data.num_val = 5000   * 16" in probe.stdout and "data.label_rule = 'union'\n" in probe.stdout


def test_the_config_command_reports_bad_values_and_missing_files_in_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lalign import config\n\ndef get_config():\n    c = config.defaults()\n"
                   "    c.optimizer.lr = 1e-4\n    c.maskembed.loss = 'mse_typo'\n    return c\n")
    out = _cli(str(bad))
    assert out.returncode == 1
    assert out.stdout.strip().splitlines()[-1].startswith("ERROR config.maskembed.loss must be one of")
    missing = _cli("configs/nope.py")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.py" in missing.stderr
