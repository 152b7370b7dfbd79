"""training_curves.png: the figure `plot_training_curves` saves, inspected panel by panel."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from posttrain.pipeline.results.report import plot_training_curves, training_figure

SUMMARY = {"baseline_nll": 2.41, "trained_nll": 1.35, "verdict": "improved"}
# A 3-step run: a loss at each step, and an evaluation at steps 0 and 2.
METRICS = [
    {"step": 0, "train_mean_nll": 2.4, "test/nll": 2.5},
    {"step": 1, "train_mean_nll": 1.9},
    {"step": 2, "train_mean_nll": 1.4, "test/nll": 1.5},
]


def _step_tick_labels(fig) -> dict[str, list[str]]:
    """The x tick labels of each panel over the steps, as drawn."""
    fig.canvas.draw()
    return {
        ax.get_title(): [t.get_text() for t in ax.get_xticklabels()]
        for ax in fig.axes
        if ax.get_xlabel() == "step"
    }


def test_a_short_runs_steps_are_labelled_as_whole_numbers():
    fig = training_figure(SUMMARY, METRICS)
    try:
        labels = _step_tick_labels(fig)
    finally:
        plt.close(fig)
    assert set(labels) == {"Training", "Evaluation during training"}, labels
    for title, texts in labels.items():
        # Not 0.00, 0.25, ... 2.00: every label a whole step (matplotlib writes a minus sign as U+2212).
        assert texts and all(t.replace("\u2212", "-").lstrip("-").isdigit() for t in texts), (title, texts)
        assert {"0", "1", "2"} <= set(texts), (title, texts)


def test_the_plot_is_written(tmp_path: Path):
    out = plot_training_curves(tmp_path / "training_curves.png", SUMMARY, METRICS)
    assert out.read_bytes().startswith(b"\x89PNG")
