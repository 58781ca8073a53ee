"""lalign: locality alignment (MaskEmbed, Covert et al., ICLR 2025) for vision transformers in JAX/Flax."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
