"""Stages: each a frozen config dataclass and `run(cfg)`. Stages never import each other."""
