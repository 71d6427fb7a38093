from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from personadual.advantage import (advantage_estimator, batch_advantages, dual_grpo_advantages, grpo_advantages,
                                   register_advantage_estimator, released_dual_advantages, sequence_advantages,
                                   token_advantages)
from personadual.estimators import ADVANTAGE_ESTIMATORS, NO_MODE
from tests.reference_advantage import dual_loop, grpo_loop, released_loop

batches = st.integers(min_value=1, max_value=40).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=n, max_size=n),
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.integers(0, 6), min_size=n, max_size=n),
))


def _tensors(rewards, modes, groups):
    return torch.tensor(rewards), torch.tensor(modes), torch.tensor(groups)


@settings(max_examples=200, deadline=None)
@given(batches)
def test_vectorised_estimators_match_plain_loops(batch):
    rewards, modes, groups = batch
    r, m, g = _tensors(*batch)
    torch.testing.assert_close(dual_grpo_advantages(r, m, g), torch.tensor(dual_loop(rewards, modes, groups)),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dual_grpo_advantages(r, m, g, inter=False),
                               torch.tensor(dual_loop(rewards, modes, groups, inter=False)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grpo_advantages(r, g), torch.tensor(grpo_loop(rewards, groups)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(released_dual_advantages(r, m, g), torch.tensor(released_loop(rewards, modes, groups)),
                               atol=1e-2, rtol=1e-3)


@settings(max_examples=200, deadline=None)
@given(batches)
def test_intra_term_sums_to_zero_per_group_and_mode(batch):
    r, m, g = _tensors(*batch)
    intra = dual_grpo_advantages(r, m, g, inter=False)
    for group in g.unique():
        for mode in (0, 1):
            cell = (g == group) & (m == mode)
            if cell.any():
                assert abs(float(intra[cell].sum())) < 1e-3


@settings(max_examples=200, deadline=None)
@given(batches)
def test_inter_term_is_zero_sum_across_the_two_modes(batch):
    r, m, g = _tensors(*batch)
    inter = dual_grpo_advantages(r, m, g) - dual_grpo_advantages(r, m, g, inter=False)
    for group in g.unique():
        in_group = g == group
        # Per-mode inter terms (constant within a mode) are opposite: mean_m - mean_other.
        per_mode = [inter[in_group & (m == mode)] for mode in (0, 1)]
        if all(t.numel() for t in per_mode):
            assert abs(float(per_mode[0][0] + per_mode[1][0])) < 1e-4
            for t in per_mode:
                assert float(t.max() - t.min()) < 1e-4
        else:
            assert float(inter[in_group].abs().max()) < 1e-6


def test_composed_advantage_is_reward_minus_other_modes_mean():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    m = torch.tensor([0, 0, 0, 1, 1, 1])
    g = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(dual_grpo_advantages(r, m, g), r - torch.where(m == 0, 1 / 3, 2 / 3))


def test_group_with_one_mode_gets_plain_within_mode_centering():
    r = torch.tensor([1.0, 0.0, 0.5, 2.0])
    m = torch.tensor([1, 1, 1, 0])
    g = torch.tensor([7, 7, 7, 3])
    torch.testing.assert_close(dual_grpo_advantages(r, m, g), torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_groups_are_ids_not_positions():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.25])
    m = torch.tensor([0, 1, 0, 1, 0, 1])
    g = torch.tensor([10, 10, 20, 20, 10, 20])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    torch.testing.assert_close(dual_grpo_advantages(r, m, g)[perm], dual_grpo_advantages(r[perm], m[perm], g[perm]))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="modes"):
        dual_grpo_advantages(torch.ones(3), torch.tensor([0, 2, 1]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="algo.advantage"):
        sequence_advantages("ppo", torch.ones(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


masks = st.integers(1, 6).flatmap(lambda n: st.integers(1, 12).flatmap(lambda t: st.tuples(
    st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=n, max_size=n),
    st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t), min_size=n, max_size=n),
    st.integers(0, 3), st.floats(0.0, 4.0, width=32))))


@settings(max_examples=200, deadline=None)
@given(masks)
def test_token_advantages_scale_only_the_prefix(case):
    seq, mask, prefix_tokens, beta = case
    seq_t, mask_t = torch.tensor(seq), torch.tensor(mask)
    out = token_advantages(seq_t, mask_t, prefix_tokens=prefix_tokens, beta=beta)
    for i, row in enumerate(mask):
        seen = 0
        for j, on in enumerate(row):
            if not on:
                assert out[i, j] == 0
                continue
            seen += 1
            expected = seq[i] * (beta if seen <= prefix_tokens else 1.0)
            assert abs(float(out[i, j]) - expected) < 1e-5


def test_every_declared_estimator_name_dispatches_to_its_reference_loop():
    references = {"dual": dual_loop, "grpo": lambda r, m, g: grpo_loop(r, g), "dual_released": released_loop}
    assert set(references) == set(ADVANTAGE_ESTIMATORS)
    rewards, modes, groups = [1.0, 0.0, 0.5, 1.0, 0.0, 0.25], [0, 1, 0, 1, 1, 0], [3, 3, 3, 7, 7, 7]
    for name, loop in references.items():
        out = sequence_advantages(name, *_tensors(rewards, modes, groups))
        assert out.tolist() == pytest.approx(loop(rewards, modes, groups), abs=1e-5), name


def test_an_undeclared_or_repeated_estimator_name_is_refused():
    with pytest.raises(ValueError, match="declare it in personadual/estimators.py"):
        register_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="registered twice"):
        register_advantage_estimator("dual")(lambda rewards, modes, groups: rewards)
    assert advantage_estimator("dual") is dual_grpo_advantages  # the failed registration left it alone


def test_responses_without_a_mode_are_centred_on_their_group_and_get_no_prefix_weight():
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0])
    modes = torch.tensor([0, 1, NO_MODE, 0])
    groups = torch.tensor([0, 0, 0, 1])
    advantages = batch_advantages("dual", rewards, modes, groups)
    assert float(advantages[2]) == pytest.approx(0.5 - 0.5)  # its whole group's mean is 0.5
    # The others' estimator runs among themselves, the modeless response left out.
    expected = dual_grpo_advantages(rewards[[0, 1, 3]], modes[[0, 1, 3]], groups[[0, 1, 3]])
    torch.testing.assert_close(advantages[[0, 1, 3]], expected)
    mask = torch.ones(4, 3)
    tokens = token_advantages(torch.ones(4), mask, prefix_tokens=1, beta=2.0, modes=modes)
    assert tokens[:, 0].tolist() == [2.0, 2.0, 1.0, 2.0] and tokens[:, 1:].eq(1.0).all()


def test_released_advantages_keep_a_tiny_but_real_spread_within_a_group():
    # Two rewards 1e-5 apart: the std as E[x^2] - E[x]^2 cancels in float32 and gave +/-5.0
    # where the reference has +/-0.62.
    rewards = [0.0, 2.0000100135803223, 0.0, 0.0, 2.0, 0.0]
    modes, groups = [0] * 6, [0, 1, 0, 0, 1, 0]
    out = released_dual_advantages(*_tensors(rewards, modes, groups))
    assert out.tolist() == pytest.approx(released_loop(rewards, modes, groups), abs=1e-2)
