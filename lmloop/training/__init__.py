"""What `lmloop train` does: lmloop/stages/train.py reads the config, calls these modules (each
says what it owns; docs/architecture.md lists them), and writes the run's artifacts."""
