"""The `lmloop` command: a static table of stages, each imported only when it runs.

`lmloop --help` must not import torch and must answer fast, so the table below names modules
as strings. Each entry names a frozen config dataclass in a torch-free module (so `--help` and
config validation stay light) and the stage's `run(cfg)`, whose module is imported only to run. User mistakes (`UserError`) print one line and exit with status 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from lmloop import __version__
from lmloop.errors import UserError, did_you_mean

# command -> ("module:ConfigClass", "module:run_function", one-line description).
# Order is the order of the loop; `lmloop --help` prints it as is.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("lmloop.data.config:DataConfig", "lmloop.stages.data:run", "collect and preprocess text into token shards"),
    "tokenizer train": ("lmloop.data.config:TokenizerConfig", "lmloop.stages.tokenizer:run", "train a byte-level BPE tokenizer"),
    "train": ("lmloop.training.config:TrainConfig", "lmloop.stages.train:run", "train a Transformer from scratch or fine-tune one"),
    "eval": ("lmloop.evaluation.config:EvalConfig", "lmloop.stages.evaluate:run", "measure perplexity (token, word, byte) under a stated protocol"),
    "eval compare": ("lmloop.evaluation.config:CompareConfig", "lmloop.stages.evaluate:run_compare", "compare eval reports, refusing mismatched protocols"),
    "generate": ("lmloop.engine.config:GenerateConfig", "lmloop.stages.generate:run", "generate text from a prompt or a JSONL of prompts"),
    "chat": ("lmloop.engine.config:ChatConfig", "lmloop.stages.generate:run_chat", "interactive terminal chat with a model"),
    "serve": ("lmloop.server.settings:ServeConfig", "lmloop.stages.serve:run", "OpenAI-compatible API and chat page, recording feedback"),
    "feedback export": ("lmloop.feedback.config:FeedbackExportConfig", "lmloop.stages.feedback:run_export", "export conversations and ratings as training data"),
    "feedback stats": ("lmloop.feedback.config:StatsConfig", "lmloop.stages.feedback:run_stats", "counts and ratings per model version"),
    "models list": ("lmloop.registry.config:ListConfig", "lmloop.stages.models:run_list", "list registered model versions"),
    "models show": ("lmloop.registry.config:ShowConfig", "lmloop.stages.models:run_show", "show one model version and its lineage"),
    "models promote": ("lmloop.registry.config:PromoteConfig", "lmloop.stages.models:run_promote", "make a version the current one"),
    "models rollback": ("lmloop.registry.config:RollbackConfig", "lmloop.stages.models:run_rollback", "go back to the previous current version"),
    "models register": ("lmloop.registry.config:RegisterConfig", "lmloop.stages.models:run_register", "copy a model folder into the registry as a new version"),
    "loop": ("lmloop.loop.config:LoopConfig", "lmloop.stages.loop:run", "one flywheel cycle: feedback -> data -> fine-tune -> eval -> gate -> promote"),
    "export": ("lmloop.export.config:ExportConfig", "lmloop.stages.export:run", "export a model as a Hugging Face folder or a GGUF file"),
    "quickstart": ("lmloop.loop.config:QuickstartConfig", "lmloop.stages.quickstart:run", "the whole loop on the embedded default, end to end"),
}  # fmt: skip


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in COMMANDS:
        head, _, sub = name.partition(" ")
        if sub:
            groups.setdefault(head, []).append(sub)
    return groups


def main_help() -> str:
    lines = [
        f"lmloop {__version__}: the whole life of a language model as one loop",
        "",
        "usage: lmloop <command> [CONFIG.yaml] [key=value ...] [--key value ...]",
        "",
        "commands:",
    ]
    width = max(len(n) for n in COMMANDS) + 2
    for name, (_, _, desc) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}{desc}")
    lines += [
        "",
        "`lmloop <command> --help` lists that command's options.",
        "global flags: --debug (show tracebacks), --version",
    ]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """Split argv into (command name, remaining args), or raise UserError."""
    head = argv[0]
    groups = _groups()
    if head in groups:
        if len(argv) > 1 and f"{head} {argv[1]}" in COMMANDS:
            return f"{head} {argv[1]}", argv[2:]
        if head in COMMANDS:
            return head, argv[1:]
        given = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else ""
        subs = groups[head]
        if not given:
            raise UserError(f"'lmloop {head}' needs a subcommand: one of {', '.join(subs)}")
        raise UserError(
            f"unknown subcommand 'lmloop {head} {given}'{did_you_mean(given, subs)}; "
            f"expected one of {', '.join(subs)}"
        )
    if head in COMMANDS:
        return head, argv[1:]
    heads = sorted({n.split()[0] for n in COMMANDS})
    raise UserError(
        f"unknown command '{head}'{did_you_mean(head, heads)}", hint="see `lmloop --help`"
    )


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_config(name: str) -> type:
    """The command's config class; its module is torch-free."""
    return _load(COMMANDS[name][0])


def load_command(name: str):
    """(config class, run function): imports the stage, so only to run it."""
    return load_config(name), _load(COMMANDS[name][1])


def reference() -> str:
    """The CLI reference (docs/cli.md), generated from the command table and the configs."""
    from lmloop.config import format_help  # lazy: see main()

    parts = [
        "# CLI reference",
        "",
        "Generated from the code by `python -m lmloop.cli --reference > docs/cli.md`;",
        "`tests/test_cli.py` fails when this file is out of date.",
        "",
        "```text",
        main_help(),
        "```",
    ]
    for name, (_, _, desc) in COMMANDS.items():
        cfg_cls = load_config(name)
        parts += ["", f"## lmloop {name}", "", "```text", format_help(cfg_cls, name, desc), "```"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LMLOOP_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    if argv[0] == "--reference":
        sys.stdout.write(reference())
        return 0
    if argv[0] == "--version":
        print(f"lmloop {__version__}")
        return 0
    # lazy: `lmloop --help` needs neither; yaml, the config machinery and logging would add
    # ~50 ms to it (measured: 37 -> 55 ms CPU for logging, 39 -> 73 ms wall for config)
    from lmloop.config import format_help, parse_args, to_yaml
    from lmloop.log import setup_logging

    setup_logging(debug)
    try:
        name, rest = resolve(argv)
        cfg_cls = load_config(name)
        if "-h" in rest or "--help" in rest:
            print(format_help(cfg_cls, name, COMMANDS[name][2]))
            return 0
        print_config = "--print-config" in rest
        rest = [a for a in rest if a != "--print-config"]
        cfg = parse_args(cfg_cls, rest)
        if print_config:
            sys.stdout.write(to_yaml(cfg))
            return 0
        _, run = load_command(name)
        result = run(cfg)
        return result if isinstance(result, int) else 0
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"lmloop: error: {e.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmloop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
