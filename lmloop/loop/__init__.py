"""The loop's domain: what turns a served model's feedback into a gated next version.

- `config`: LoopConfig, GateSpec, Decision, LoopResult, QuickstartConfig (torch-free).
- `cycle`: a cycle's folder and resumable state, and the checks on its inputs.
- `recipe`: the fine-tuning recipe: the feedback exported and prepared with the base corpus's
  recipe (filters, decontamination, replay), and the child configs of the data and train stages.
- `gate`: the promotion decision: held-out margins, bootstrap intervals, base perplexity, the rule.
- `users`: simulated users with a stated preference (the quickstart's and `bench/loop.py`'s).
- `quickstart`: the quickstart's pieces that are not stages (the served child process, the
  teacher's judgement of continuations, what it prints).

`lmloop/stages/loop.py` chains the stages (data, train, eval) around these.
"""
