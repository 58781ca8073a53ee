"""Checkpoints: the train state in orbax (`manager`, verified by `verify`), any format read as (ViT, params) (`load`,
over the records in `formats`, built on `records` and `normalization`), and the converters (`mapping`: the tables
and their drivers; `bigvision`, `hf`, `timm`, `open_clip`)."""
