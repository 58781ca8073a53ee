"""`data.name = "tfds"`: a tensorflow_datasets data set prepared in the ArrayRecord file format, read through
`tensorflow_datasets` without TensorFlow (`pip install 'lalign[tfds]'`).

    # once, anywhere TFDS is installed:  tfds build imagenet2012 --file_format=array_record --data_dir=/data/tfds
    config.data = dict(name="tfds", dataset="imagenet2012", data_dir="/data/tfds", image_size=224,
                       train_split="train", val_split="validation")

TFDS itself finds the data: `{data_dir}/{dataset}[/{builder_config}]/{version}/` (the newest version unless
`version` names one; `path` may name the version directory directly), its `dataset_info.json` and
`features.json`, and the split's `{dataset}-{split}.array_record-{shard}-of-{count}` files; a split is any TFDS
split string (`train[:99%]`, `train[-10000:]`, `validation[:5000]`, `train+validation`). Each record is read
with TFDS' data source (`as_data_source`, random access over array_record) and its Example parsed by TFDS, the
`image` feature kept encoded (`SkipDecoding`): the bytes go to `lalign.data.images`, which decodes and crops
them (reduced-DCT JPEG decoding, the reference's crops, corrupt images replaced) as for an image folder.

TFRecord-format data (TFDS' default) needs TensorFlow to read at speed; it is refused with a message saying how
to convert.
"""
from __future__ import annotations

import os

import numpy as np

from lalign.data import images

OPTIONS = dict(dataset="", data_dir="", path="", version="", builder_config="", train_split="train",
               val_split="validation", image_key="image", label_key="label")


def _tfds():
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise ImportError("data.name='tfds' reads through tensorflow_datasets (without TensorFlow): "
                          "pip install 'lalign[tfds]'.") from e
    return tensorflow_datasets


def find_builder(opts: dict):
    """The TFDS builder of the prepared data set `opts` names (`path`, or `dataset` under `data_dir`)."""
    tfds = _tfds()
    if opts["path"]:
        d = os.path.expanduser(opts["path"])
        if not os.path.isdir(d):
            raise FileNotFoundError(f"config.data.path: TFDS dataset directory {d!r} does not exist.")
        return tfds.builder_from_directory(d)
    if not (opts["dataset"] and opts["data_dir"]):
        raise ValueError("config.data for name='tfds' needs `path` (a dataset version directory) or both "
                         "`dataset` and `data_dir`.")
    data_dir = os.path.expanduser(opts["data_dir"])
    name = opts["dataset"] + (f"/{opts['builder_config']}" if opts["builder_config"] else "")
    name += f":{opts['version']}" if opts["version"] else ""
    hint = f"prepare it with `tfds build {opts['dataset']} --file_format=array_record --data_dir={opts['data_dir']}`"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, AssertionError) as e:  # unknown name; version not there
        raise FileNotFoundError(f"No TFDS dataset {name!r} under {data_dir!r} ({str(e).splitlines()[0]}); "
                                f"{hint}.") from None
    if not os.path.isdir(builder.data_dir):  # a dataset TFDS knows, not prepared here
        raise FileNotFoundError(f"No TFDS dataset {name!r} under {data_dir!r} (no {builder.data_dir!r}); {hint}.")
    return builder


class TfdsArrayRecord(images.ImageSource):
    def __init__(self, data_cfg, split: str, seed: int = 0):
        opts = images.check_options(data_cfg, OPTIONS, "tfds")
        super().__init__(opts, split, seed)
        tfds = _tfds()
        builder = find_builder(opts)
        self.directory = str(builder.data_dir)
        name = builder.info.name
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(
                f"{self.directory!r} holds {name!r} as {builder.info.file_format.value} files, which need "
                f"TensorFlow. Prepare it as ArrayRecord (`tfds build {name} --file_format=array_record`), or use "
                f"data.name='image_folder'.")
        key = "train_split" if self.train else "val_split"
        spec = opts[key]
        try:
            self._records = builder.as_data_source(split=spec, decoders={opts["image_key"]:
                                                                          tfds.decode.SkipDecoding()})
        except ValueError as e:  # an unknown split, a slice TFDS cannot parse
            raise ValueError(f"config.data.{key} {spec!r} of {self.directory!r}: {e}".splitlines()[0]) from None
        n = len(self._records)
        if not n:
            raise ValueError(f"Split {spec!r} of {self.directory!r} is empty.")
        self.members = np.arange(n, dtype=np.int64)
        self._keys = (opts["image_key"], opts["label_key"])

    def load(self, example_id: int) -> tuple[bytes, int]:
        record = self._records[example_id]
        data = record.get(self._keys[0])
        if not isinstance(data, bytes) or not data:
            raise KeyError(f"no {self._keys[0]!r} bytes feature in the record")
        label = record.get(self._keys[1])
        return data, -1 if label is None else int(label)

    def describe(self, example_id: int) -> str:
        try:  # array_record's own key -> (file, position) mapping
            records = self._records.data_source
            idx, pos = records._reader_idx_and_position(example_id)
            return f"{records._paths[idx]} record {pos}"
        except Exception:  # noqa: BLE001 - a private API; fall back to the split's key
            return f"record {example_id} of split {self.split!r} in {self.directory}"
