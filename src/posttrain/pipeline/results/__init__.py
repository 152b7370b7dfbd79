"""The results/ folder: per-example rows (`rows`), files on disk (`store`), summary.json (`summary`) and the
human reports (`report`: report.md and its plot; `report_html`). The names a run needs are re-exported here."""

from posttrain.pipeline.results.report import write_report
from posttrain.pipeline.results.report_html import write_report_html
from posttrain.pipeline.results.rows import (
    PREFERENCE_KEYS,
    PREFERENCE_OPTIONAL_KEYS,
    RL_KEYS,
    SFT_KEYS,
    SFT_OPTIONAL_KEYS,
    MetricKind,
    PreferenceExample,
    RLExample,
    RowSchema,
    SFTExample,
    summary_kind,
    validate_rows,
)
from posttrain.pipeline.results.store import BASE_FILE, SUMMARY_FILE, TRAINED_FILE, ResultsDir, no_space
from posttrain.pipeline.results.summary import (
    TEACHER_KEYS,
    Outcome,
    RunFacts,
    build_summary,
    compare_examples,
    compute_improvement,
    headline,
    validate_summary,
    write_summary,
)

__all__ = [
    "BASE_FILE",
    "PREFERENCE_KEYS",
    "PREFERENCE_OPTIONAL_KEYS",
    "RL_KEYS",
    "SFT_KEYS",
    "SFT_OPTIONAL_KEYS",
    "SUMMARY_FILE",
    "TEACHER_KEYS",
    "TRAINED_FILE",
    "MetricKind",
    "Outcome",
    "PreferenceExample",
    "RLExample",
    "ResultsDir",
    "RowSchema",
    "RunFacts",
    "SFTExample",
    "build_summary",
    "compare_examples",
    "compute_improvement",
    "headline",
    "no_space",
    "summary_kind",
    "validate_rows",
    "validate_summary",
    "write_report",
    "write_report_html",
    "write_summary",
]
