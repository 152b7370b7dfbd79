"""An environment brings its own settings: a chz option group in a module beside it and its name on the
environment's registry line are all it takes (`envs/settings.py` collects them into the methods' configs); a
setting given with another environment is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import chz

from posttrain.pipeline.envs import registry
from posttrain.pipeline.envs.settings import EnvSettings, ProblemSettings
from posttrain.pipeline.methods.distillation.settings import DistillationConfig
from posttrain.pipeline.methods.rl import RLConfig

TOY = """
import chz


@chz.chz
class ToyOptions:
    toy_level: int = chz.field(default=1, doc="env=toy: how hard the toy problems are")
"""

# What a new environment with one setting adds to the tree: its module (here the settings part of it) and one
# registry line. Nothing in methods/, settings.py or rl.py names it.
PROBE = """
import json
from posttrain.errors import ConfigError
from posttrain.pipeline.envs import registry
registry.ENVIRONMENTS["toy"] = registry.Entry("toy_env:Toy", options=("toy_env:ToyOptions",))
from posttrain.pipeline.settings import TrainConfig, config_class, method_config, parse_train_args

import chz
out = {"listed": "toy_level" in chz.chz_fields(TrainConfig)}
cfg = parse_train_args(["env=toy", "toy_level=3"])
out["rl"] = method_config(cfg, "rl").toy_level
out["distillation_takes_it"] = "toy_level" in chz.chz_fields(config_class("distillation"))
for args in (["env=math", "toy_level=3"], ["toy_level=3"], ["task=sft", "toy_level=3"]):
    try:
        parse_train_args(args)
        out[" ".join(args)] = "accepted"
    except ConfigError as e:
        out[" ".join(args)] = str(e)
print(json.dumps(out))
"""


def test_a_new_environment_with_one_setting_is_its_module_and_one_registry_line(tmp_path: Path) -> None:
    (tmp_path / "toy_env.py").write_text(TOY)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_with_path(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (
        out["listed"] and out["rl"] == 3 and out["distillation_takes_it"]
    )  # `options=`: it shapes problems, both methods take it
    assert out["env=math toy_level=3"] == "toy_level is only used by env=toy, not env=math; leave it out"
    assert out["toy_level=3"] == "toy_level is only used by env=toy; leave it out"
    assert out["task=sft toy_level=3"] == "toy_level is only used by env=toy; leave it out"


def test_every_registered_setting_group_reaches_the_configs_of_the_methods_that_take_it() -> None:
    rl, distillation = set(chz.chz_fields(RLConfig)), set(chz.chz_fields(DistillationConfig))
    for key, entry in registry.ENVIRONMENTS.items():
        for path in entry.options:
            module, _, name = path.partition(":")
            fields = set(chz.chz_fields(getattr(__import__(module, fromlist=[name]), name)))
            assert fields <= rl and fields <= distillation, key
        for path in entry.played_options:
            module, _, name = path.partition(":")
            fields = set(chz.chz_fields(getattr(__import__(module, fromlist=[name]), name)))
            assert fields <= rl and not fields & distillation, key  # played only where task=rl plays it
    assert set(chz.chz_fields(ProblemSettings)) < set(chz.chz_fields(EnvSettings))


def _with_path(folder: Path) -> dict[str, str]:
    import os

    paths = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
