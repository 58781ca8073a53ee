"""Checkpoints: the train state in orbax (`manager`, verified by `verify`), any format read as (ViT, params) (`load`),
and the converters (`mapping`: the tables and their drivers; `bigvision`, `hf`, `timm`, `open_clip`)."""
