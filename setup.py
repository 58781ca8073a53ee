"""lalign: locality alignment (MaskEmbed) for vision transformers in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="lalign",
    version="0.1.0",
    description="Locality alignment (MaskEmbed) for ViTs in JAX/Flax, compatible with big_vision and Hugging Face.",
    packages=find_packages(include=["lalign", "lalign.*", "configs", "configs.*"]),  # configs: as big_vision.configs
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "scikit-learn",  # ships the digits the embedded demo is made of; linear probes
        "matplotlib",
        "pillow",  # image folders and TFDS images (lalign.data)
        "tensorboardX",  # TensorBoard events beside metrics.jsonl (lalign.metrics)
    ],
    extras_require={
        # torch==2.13.0 is the CPU wheel; a looser pin lets pip pull a multi-GB CUDA build.
        "torch": ["torch==2.13.0", "transformers>=4.50", "safetensors"],
        "test": ["pytest", "pytest-xdist", "fsspec", "torch==2.13.0", "transformers>=4.50", "safetensors",
                 "array-record"],
        # timm interop (lalign.checkpoints.timm.timm_model): timm 1.0.8 (the reference's pin) to 1.0.31 tested.
        # timm imports torchvision, whose build must match torch's: `scripts/install.sh test` installs timm,
        # and torchvision where it can.
        "timm": ["timm>=1.0.8", "safetensors"],
        "tfds": ["array-record"],  # data.name='tfds': TFDS data sets in ArrayRecord files (lalign.data.tfds)
        "tpu": ["jax[tpu]>=0.10"],
        "gcs": ["gcsfs"],  # gs:// image folders and file lists (lalign.data.image_folder)
    },
)
