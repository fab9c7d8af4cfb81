"""What `lmloop train` does (lmloop/stages/train.py reads the config, calls these, writes the
run's artifacts).

- `config`: `TrainConfig` and its specs, `TrainResult` (torch-free: `--help` and validation).
- `inputs`: the task a run's data asks for, the data as read, the tokenizer, the checks that
  data, tokenizer, model and batch shape agree, the objective and its validation batches.
- `run`: the run's state (`Run`) and `setup`, which builds it: resume, model, LoRA, reference,
  devices, the DDP or FSDP wrapper, optimizers.
- `fit`: the step loop (schedule, accumulation, clipping, step, log, evaluate, save).
- `objectives`: the next-token loss (pretrain, SFT), seq2seq pairs, DPO and KTO.
- `optim`: parameter groups (no weight decay on norms, biases, embeddings), AdamW or
  Muon + AdamW, and the learning-rate schedules (warmup then cosine / linear / constant / WSD).
- `data`: pretraining windows cut from memory-mapped token shards, and supervised fine-tuning
  examples with the loss only on completion tokens. Batches are a pure function of
  (seed, sample index), so resuming or changing the world size replays the same data.
- `checkpoint`: atomic checkpoints with every RNG state, the run's meta.json, keep-last-K + best.
- `lora`: LoRA adapters through `peft` on lmloop's own modules, and merging them for export.
- `fsdp`: sharding a model with FSDP2 (`parallel=fsdp`), and gathering / re-sharding its
  weights and optimizer state so checkpoints keep the single-process format.
- `distributed`: rank, world and device under `torchrun`, the process group, its collectives.
- `estimate`: memory per process, peak FLOP/s for MFU, the `--dry-run` report.
- `plots`: RUN_DIR/curves.png.
"""
