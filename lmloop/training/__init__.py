"""Training pieces used by `lmloop train` (lmloop/stages/train.py holds the loop itself).

- `optim`: parameter groups (no weight decay on norms, biases, embeddings), AdamW or
  Muon + AdamW, and the learning-rate schedules (warmup then cosine / linear / constant / WSD).
- `data`: pretraining windows cut from memory-mapped token shards, and supervised fine-tuning
  examples with the loss only on completion tokens. Batches are a pure function of
  (seed, sample index), so resuming or changing the world size replays the same data.
- `checkpoint`: atomic checkpoints with every RNG state, the run's meta.json, keep-last-K + best.
- `lora`: LoRA adapters through `peft` on lmloop's own modules, and merging them for export.
- `fsdp`: sharding a model with FSDP2 (`parallel=fsdp`), and gathering / re-sharding its
  weights and optimizer state so checkpoints keep the single-process format.
"""
