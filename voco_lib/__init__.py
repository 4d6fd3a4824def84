"""voco_lib: a thin, tested implementation of VoCo (Volume Contrast) 3D medical image pre-training.

Modules are named after the paper's concepts: crops (base-crop grid, random crops, position labels),
losses, heads (projection heads + EMA teacher), backbone (Swin encoder), data, pretrain, tasks, viz.
"""

__version__ = "0.1.0"
