"""The data layer: where text comes from and what becomes of it before training.

Only `synthetic` runs a model (the teacher that writes the embedded corpus), and only the stages
and the engines (`pipeline`, `ray_engine`) hand it to `sources`; `config` and the modules that
read, clean and shard text never import torch."""
