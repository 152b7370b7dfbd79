"""`posttrain cache [list]` and `posttrain cache prune older_than=7d | run=ID [dry_run=true]`: what posttrain keeps
on disk (the local engine's checkpoint store, run by run; the converted models and other caches beside it) and
removing old runs from the store. The store's layout is read by `engine/disk.py`; this module parses and prints.

Bad input (an unknown key, a bad duration, an unknown run) is one line, exit code 2.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.engine import disk
from posttrain.errors import UserError

USAGE = """usage: posttrain cache [list] [checkpoint_dir=DIR]
       posttrain cache prune older_than=DURATION [dry_run=true] [checkpoint_dir=DIR]
       posttrain cache prune run=RUN_ID [dry_run=true] [checkpoint_dir=DIR]

list (the default): every run folder in the local engine's checkpoint store (its checkpoints, size, last
  change, base model and user metadata), the other caches beside it (converted models), and the total.
prune: remove run folders from the store, whole: those unchanged for longer than DURATION (a number with s, m,
  h or d: 90m, 12h, 7d), or the one named; dry_run=true shows what would go.
checkpoint_dir: the store (default: $POSTTRAIN_CACHE/checkpoints, i.e. ~/.cache/posttrain/checkpoints), as
  `posttrain serve --checkpoint-dir` takes it.
"""

_KEYS = {"list": {"checkpoint_dir"}, "prune": {"older_than", "run", "dry_run", "checkpoint_dir"}}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


@dataclass
class CacheArgs:
    action: str
    checkpoint_dir: Path
    older_than_s: float | None = None
    older_than_text: str = ""
    run: str | None = None
    dry_run: bool = False


def cache_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE, end="")
        return 0
    try:
        args = parse_args(argv)
        if args.action == "list":
            print_listing(args.checkpoint_dir)
        else:
            prune(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def parse_args(argv: list[str]) -> CacheArgs:
    action = "list"
    if argv and "=" not in argv[0]:
        action, argv = argv[0], argv[1:]
    if action not in _KEYS:
        raise UserError(
            f"cache {action}: unknown action (cache list, cache prune; see posttrain cache --help)"
        )
    values: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in _KEYS[action]:
            allowed = ", ".join(f"{k}=" for k in sorted(_KEYS[action]))
            raise UserError(f"{arg}: not a setting of `posttrain cache {action}` (it takes {allowed})")
        values[key] = value
    store = Path(values["checkpoint_dir"]).expanduser() if values.get("checkpoint_dir") else None
    args = CacheArgs(action, store or disk.cache_root() / "checkpoints")
    if action == "prune":
        _prune_args(args, values)
    return args


def _prune_args(args: CacheArgs, values: dict[str, str]) -> None:
    if ("older_than" in values) == ("run" in values):
        raise UserError("cache prune: give older_than=DURATION (e.g. 7d) or run=RUN_ID, one of them")
    if "older_than" in values:
        args.older_than_s = parse_duration(values["older_than"])
        args.older_than_text = values["older_than"]
    args.run = values.get("run")
    dry = values.get("dry_run", "false").lower()
    if dry not in ("true", "false"):
        raise UserError(f"dry_run={values['dry_run']}: expected true or false")
    args.dry_run = dry == "true"


def parse_duration(text: str) -> float:
    """Seconds in `7d`, `12h`, `90m`, `30s`."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise UserError(f"older_than={text}: not a duration: a number with s, m, h or d, e.g. 7d, 12h, 90m")
    return float(match.group(1)) * _UNITS[match.group(2)]


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def age(modified: float, now: float | None = None) -> str:
    seconds = max(0.0, (time.time() if now is None else now) - modified)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _runs(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def _describe(folder: disk.RunFolder) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(folder.modified))
    checkpoints = ", ".join(folder.checkpoints) or "(no checkpoints)"
    lines = [
        f"  {folder.run_id}  {human_size(folder.size_bytes)}  changed {when} ({age(folder.modified)})",
        f"      {checkpoints}",
    ]
    details = [f"base {folder.base_model}"] if folder.base_model else []
    if folder.user_metadata:
        details.append("metadata " + ", ".join(f"{k}={v}" for k, v in sorted(folder.user_metadata.items())))
    if details:
        lines.append("      " + "; ".join(details))
    return lines


def print_listing(store: Path) -> None:
    folders = disk.run_folders(store)
    in_store = sum(f.size_bytes for f in folders)
    print(f"checkpoint store: {store} ({_runs(len(folders))}, {human_size(in_store)})")
    for folder in folders:
        print("\n".join(_describe(folder)))
    others = disk.other_caches(disk.cache_root(), store)
    if others:
        print("other caches (converted models, search indexes; made again when needed):")
        for path, size in others:
            print(f"  {path}  {human_size(size)}")
    print(f"total: {human_size(in_store + sum(size for _, size in others))}")


def _chosen(args: CacheArgs) -> list[disk.RunFolder]:
    folders = disk.run_folders(args.checkpoint_dir)
    if args.run is None:
        assert args.older_than_s is not None
        return disk.stale(folders, args.older_than_s)
    named = [f for f in folders if f.run_id == args.run]
    if not named:
        known = ", ".join(f.run_id for f in folders[-5:]) or "none"
        raise UserError(f"run={args.run}: no such run in {args.checkpoint_dir} (the latest there: {known})")
    return named


def prune(args: CacheArgs) -> None:
    chosen = _chosen(args)
    if not chosen:
        print(
            f"nothing to remove: no run in {args.checkpoint_dir} unchanged for longer than {args.older_than_text}"
        )
        return
    verb = "would remove" if args.dry_run else "removed"
    for folder in chosen:
        if not args.dry_run:
            disk.remove_folder(folder.path)
        what = ", ".join(folder.checkpoints) or "no checkpoints"
        print(
            f"{verb} {folder.run_id} ({human_size(folder.size_bytes)}, changed {age(folder.modified)}: {what})"
        )
    freed = human_size(sum(f.size_bytes for f in chosen))
    runs = _runs(len(chosen))
    if args.dry_run:
        print(f"dry run: would free {freed} ({runs}); nothing was removed")
    else:
        left = disk.run_folders(args.checkpoint_dir)
        print(
            f"freed {freed} ({runs}); the store holds {_runs(len(left))}, "
            f"{human_size(sum(f.size_bytes for f in left))}"
        )
