"""Start-up imports: what a run's two processes load before their first request."""

from __future__ import annotations

import subprocess
import sys

# The imports a run's client (the SDK, a tokenizer) and its engine (peft over transformers) make after the
# start-up step each process runs first; then a module that wants scikit-learn imports it.
PROBE = """
import sys
from posttrain.lean_imports import skip_unused_sklearn
skip_unused_sklearn()
import tinker, peft
from transformers import AutoTokenizer
import posttrain.engine.engine
print("sklearn" in sys.modules, "transformers.generation.candidate_generator" in sys.modules)
import sklearn.metrics
print(sklearn.metrics.roc_curve.__name__)
"""


def test_scikit_learn_stays_out_of_start_up_but_can_still_be_imported():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # transformers' generation code loaded, without the scikit-learn import it makes when it thinks it is there.
    assert out.stdout.split() == ["False", "True", "roc_curve"]
