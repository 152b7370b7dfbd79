"""Evaluation against any Tinker-protocol server: prompt log-probabilities are aligned by length, not position."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from posttrain.pipeline.evaluation.nll import evaluate_nll, logprobs_after_first


def test_prompt_logprobs_are_aligned_by_length():
    # Tinker and the local engine: one value per token, None for the first (it has no context).
    assert logprobs_after_first([None, -1.0, -2.0], 3).tolist() == [-1.0, -2.0]
    # SkyRL 0.4: n-1 values, no leading None. Dropping the first by position would score the wrong tokens.
    assert logprobs_after_first([-1.0, -2.0], 3).tolist() == [-1.0, -2.0]
    with pytest.raises(ValueError, match="returned 1 values for a 3-token sequence"):
        logprobs_after_first([-1.0], 3)
    with pytest.raises(ValueError, match="no log-probability"):
        logprobs_after_first([None, None, -2.0], 3)


class WithoutLeadingNone:
    """A sampling client that answers compute_logprobs the way SkyRL's Tinker server does."""

    def __init__(self, client):
        self.client = client

    async def compute_logprobs(self, prompt):
        logprobs = await self.client.compute_logprobs(prompt)
        assert logprobs[0] is None
        return logprobs[1:]


def test_nll_is_the_same_from_a_server_that_omits_the_leading_none(service, tiny_model):
    from tinker_cookbook import renderers
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised.data import conversation_to_datum
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    renderer = renderers.get_renderer("role_colon", tokenizer=get_tokenizer(tiny_model))
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count to {i}."},
                {"role": "assistant", "content": f"1 to {i}."},
            ]
        }
        for i in range(2, 6)
    ]
    datums = [
        conversation_to_datum(r["messages"], renderer, 256, TrainOnWhat.LAST_ASSISTANT_MESSAGE) for r in rows
    ]
    client = service.create_sampling_client(base_model=tiny_model).result()
    tinker_rows, tinker_nll = asyncio.run(evaluate_nll(client, datums, rows, 4, "tinker-shaped"))
    skyrl_rows, skyrl_nll = asyncio.run(
        evaluate_nll(WithoutLeadingNone(client), datums, rows, 4, "skyrl-shaped")
    )
    assert all(r.error is None for r in tinker_rows + skyrl_rows)
    assert np.isfinite(tinker_nll) and skyrl_nll == pytest.approx(tinker_nll, rel=1e-9)
    assert [r.nll for r in skyrl_rows] == pytest.approx([r.nll for r in tinker_rows], rel=1e-9)
