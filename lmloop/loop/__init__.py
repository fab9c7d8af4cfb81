"""The loop's domain: what turns a served model's feedback into a gated next version.

`lmloop/stages/loop.py` chains the stages (data, train, eval) around these modules (each says
what it owns; docs/architecture.md lists them)."""
