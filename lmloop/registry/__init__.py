"""The model registry (named versions, the current pointer, lineage) and model-spec resolution.

`store` owns the on-disk registry; `spec` turns whatever a user types as a model (a preset, a
registry name, a run or model folder, a GGUF file) into one resolved location. Both are torch-free.
"""

from lmloop.registry.store import Registry, default_root, split_spec

__all__ = ["Registry", "default_root", "split_spec"]
