"""`posttrain train key=value ...` and `posttrain serve --model ...`.

A `UserError` (bad input, settings, missing keys) is printed as one line, without a traceback, exit code 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable

USAGE = """usage: posttrain <command> [args]

commands:
  train key=value ...   run post-training end to end (default: SFT of SmolLM2-135M on the local engine)
  serve [--model M]     serve models over the Tinker wire protocol (the local engine)
  chat key=value ...    talk to a trained run's model in the terminal (base model's answer beside it: base=true)
  export key=value ...  a trained run's weights: format=peft (the LoRA adapter), merged (a full model) or gguf
  eval key=value ...    evaluate a run's model, a tinker:// checkpoint or a base model as a run evaluates it, on
                        the run's data or another env=/dataset=; against=base|RUN|tinker://... adds the verdict
  sweep KEY=V1,V2 ... [seeds=N]
                        a grid of train runs, the best setting chosen on validation rows and reported once on
                        held-out test rows (table, plot); the same command continues a stopped sweep
  serve-model key=value ...
                        a trained run's model behind an OpenAI-compatible API (/v1/chat/completions)
  runs [RESULTS_DIR]    list the runs in a results folder (default results/); `runs A B` compares two runs
  examples [list|NAME|all]
                        the user's success examples, one command each (tables in gallery/)
  cache [list|prune]    what posttrain keeps on disk (checkpoints by run, converted models); `cache prune
                        older_than=7d` or `run=ID` removes runs from the local checkpoint store

`posttrain train --help` (and `chat --help`, `export --help`, `eval --help`, `sweep --help`, `serve-model --help`,
`cache --help`) lists every setting.
"""


def train_main(argv: list[str]) -> int:
    # Before the settings are parsed: parsing imports the methods' cookbook modules, and with them
    # huggingface_hub and datasets, which read HF_HUB_OFFLINE once, at import.
    from posttrain.netcheck import hub_offline_if_unreachable

    offline = hub_offline_if_unreachable()
    from posttrain.config.parse import HelpRequested
    from posttrain.errors import UserError
    from posttrain.pipeline.settings import parse_train_args

    try:
        cfg = parse_train_args(argv)
    except HelpRequested as exc:
        print(exc.text, end="")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if offline:
        print(
            "note: the Hugging Face Hub is not reachable: models and datasets come from local caches",
            flush=True,
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _stop_on_signals_like_ctrl_c()
    from posttrain.pipeline.run import run
    from posttrain.util import redact

    try:
        summary = run(cfg)
    except UserError as exc:
        _quiet_background_threads()
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _quiet_background_threads()
        kept = "partial results were written to the results folder"
        print(
            f"interrupted: {'nothing was written (a dry run writes no results)' if cfg.dry_run else kept}",
            file=sys.stderr,
        )
        return 130
    return 0 if summary.get("dry_run") else verdict_exit_code(summary)


# A run's exit code says what its verdict is, so a script can act on it (2 is bad input, 130 an interruption).
VERDICT_EXIT_CODES = {"improved": 0, "not improved": 1, "inconclusive": 3}
GUARD_REGRESSED_EXIT_CODE = 4


def verdict_exit_code(summary: dict) -> int:
    """0 improved, 1 not improved, 3 inconclusive (better, but not beyond noise), 4 improved on the task while
    a guard evaluation regressed."""
    code = VERDICT_EXIT_CODES.get(str(summary.get("verdict")), 1)
    if code == 0 and (summary.get("guard") or {}).get("regressed"):
        return GUARD_REGRESSED_EXIT_CODE
    return code


def after_main(command: str, argv: list[str]) -> int:
    """A finished run's model: `posttrain chat`, `export`, `serve-model` (exit 0) and `eval` (with against=, the
    verdict's exit code); and `posttrain sweep` (runs, then the chosen one's verdict on the test rows)."""
    from posttrain.netcheck import hub_offline_if_unreachable

    hub_offline_if_unreachable()
    from posttrain.config.parse import HelpRequested
    from posttrain.errors import UserError
    from posttrain.util import redact

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _stop_on_signals_like_ctrl_c()
    try:
        record = _after_action(command)(argv)
    except HelpRequested as exc:
        print(exc.text, end="")
        return 0
    except UserError as exc:
        _quiet_background_threads()
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _quiet_background_threads()
        again = "; the same command continues it" if command == "sweep" else ""
        print(f"interrupted: {command} stopped{again}", file=sys.stderr)
        return 130
    if record is None or record.get("dry_run"):
        return 0
    if command == "sweep":
        record = (record.get("chosen") or {}).get("test") or {"verdict": "not improved"}
    return VERDICT_EXIT_CODES.get(str(record.get("verdict")), 0)


def _after_action(command: str) -> Callable[[list[str]], dict | None]:
    """The command's action on its key=value arguments: a record with a verdict (eval, sweep) or None."""
    from posttrain.config.parse import parse_args
    from posttrain.pipeline.after import chat, evaluate, export, serve_model, sweep

    if command == "eval":
        return evaluate.evaluate
    if command == "sweep":
        return sweep.sweep
    settings_class, action = {
        "chat": (chat.ChatSettings, chat.chat),
        "export": (export.ExportSettings, export.export),
        "serve-model": (serve_model.ServeModelSettings, serve_model.serve_model),
    }[command]

    def run(argv: list[str]) -> None:
        action(parse_args(settings_class, argv))

    return run


def _stop_on_signals_like_ctrl_c() -> None:
    # `timeout`, job schedulers and `kill` send SIGTERM: stop the same way as on Ctrl-C (partial results,
    # the engine stopped, the resume command printed).
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    # A job started in the background by a non-interactive shell (`train.py &` in a script) inherits SIGINT
    # ignored: SIGTERM above and the engine watcher would then do nothing, and the run went on training.
    # (Ctrl-C never reaches a background job, so restoring the default loses nothing.)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _quiet_background_threads() -> None:
    """After a run that stopped: library threads still retrying requests (the SDK's, to an engine that died) must
    not write to the terminal from here on. One writing to stderr while the interpreter shuts down makes it abort
    (SIGABRT, "could not acquire lock for <stderr> at interpreter shutdown") instead of exiting with our code."""
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader went away (`posttrain examples list | head`): stop quietly as a SIGPIPE'd tool does, and
        # keep Python's flush at exit from reporting the same broken pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _dispatch(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command in ("chat", "export", "serve-model", "eval", "sweep"):
        return after_main(command, rest)
    if command == "serve":
        from posttrain.engine.serve import main as serve_main

        return serve_main(rest)
    if command == "examples":
        from posttrain.gallery.run import examples_main

        _stop_on_signals_like_ctrl_c()
        return examples_main(rest)
    if command == "runs":
        from posttrain.pipeline.results.runs_table import runs_main

        return runs_main(rest)
    if command == "cache":
        from posttrain.cli.cache import cache_main

        return cache_main(rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
