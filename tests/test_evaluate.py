from __future__ import annotations

import numpy as np
import pytest

from harness.evaluate import (bootstrap_ci, exit_distribution, flops_per_sample, paper_flops_saving, quadrants,
                              topk_correct)


def test_quadrants_and_exact_mcnemar_on_a_crafted_table():
    method = np.array([1, 1, 0, 0, 1, 0, 1, 1], bool)
    baseline = np.array([1, 0, 1, 0, 0, 0, 1, 0], bool)
    q = quadrants(method, baseline)
    assert (q.both_correct, q.rescued, q.lost, q.both_wrong, q.net_rescue) == (2, 3, 1, 2, 2)
    # exact McNemar: two-sided binomial on 3 of 4 discordant pairs = (1 + 4 + 4 + 1) / 16
    assert q.mcnemar_p == pytest.approx(10 / 16)
    assert quadrants(baseline, baseline).mcnemar_p == 1.0


def test_paper_formula_on_the_papers_own_exit_distribution():
    # the paper's reported exits (L8 10.1%, L10 25.3%, L11 32.1%, full 32.5%) of 1000 images
    exits = np.repeat([8, 10, 11, 12], [101, 253, 321, 325])
    saving = paper_flops_saving(exits, np.full(12, 1 / 12))
    assert saving == pytest.approx(1 - (8 * .101 + 10 * .253 + 11 * .321 + 12 * .325) / 12)
    assert round(100 * saving, 1) == 10.3  # not the 13.38% the paper prints beside it
    assert paper_flops_saving(np.array([12, 6, 9]), np.full(12, 1 / 12)) == pytest.approx(0.25)


def test_exit_distribution_and_topk():
    assert exit_distribution(np.array([3, 3, 12, 12]), 12) == {3: 50.0, 12: 50.0}
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_correct(logits, np.array([2, 2]), 1).tolist() == [False, False]
    assert topk_correct(logits, np.array([2, 2]), 2).tolist() == [True, False]


def test_bootstrap_ci_matches_the_normal_approximation():
    values = np.zeros(1000)
    values[:700] = 1
    low, high = bootstrap_ci(values, seed=0)
    half = 1.96 * np.sqrt(0.7 * 0.3 / 1000)
    assert low == pytest.approx(0.7 - half, abs=0.006) and high == pytest.approx(0.7 + half, abs=0.006)
    assert bootstrap_ci(values, seed=0) == (low, high)  # seeded: reproducible


def test_bootstrap_ci_does_not_depend_on_its_chunk_size(monkeypatch):
    values = np.random.default_rng(1).random(997)
    whole = bootstrap_ci(values, seed=3)  # 2,000 resamples of 997 in one chunk
    monkeypatch.setattr("harness.evaluate._BOOTSTRAP_CHUNK", 997 * 7)  # 7 resamples a chunk, the last one short
    assert bootstrap_ci(values, seed=3) == whole
    monkeypatch.setattr("harness.evaluate._BOOTSTRAP_CHUNK", 1)  # one resample a chunk
    assert bootstrap_ci(values, seed=3) == whole


class _FakeFlops:
    embed, head = 10.0, 5.0

    def __call__(self, block, patches):
        return 100.0 * (patches + 1)  # depends on the token count, like a real block


def test_flops_per_sample_counts_blocks_heads_and_final_head():
    tokens = np.array([[4, 4, 4], [4, 4, 0], [4, 2, 2], [4, 4, 4]])  # sample 2: tokens pruned after block 1
    exit_layer = np.array([3, 2, 3, 3])
    by_policy = np.array([False, True, False, True])  # sample 3 left through a policy head after block 3
    flops = flops_per_sample(tokens, _FakeFlops(), exit_layer, head_flops={2: 7.0, 3: 4.0}, exit_layers=[2, 3],
                             by_policy=by_policy)
    assert flops.tolist() == [10 + 3 * 500 + 7 + 4 + 5, 10 + 2 * 500 + 7, 10 + 500 + 2 * 300 + 7 + 4 + 5,
                              10 + 3 * 500 + 7 + 4]
