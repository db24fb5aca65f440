"""The figures of `rlhf eval` on tiny fixed sets, against answers worked out by hand."""

import math

import pytest
import torch

from rlhf_cli.evaluation.metrics import (
    distinct_n,
    mean_kl,
    mean_std,
    perplexity,
    sequence_kl,
    summarise,
    win_rate,
)
from rlhf_cli.evaluation.plots import curve_series, histogram_data


def test_mean_and_population_std():
    figures = mean_std(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    # mean 12 / 4 = 3; squared deviations 4, 1, 0, 9 -> 14 / 4 = 3.5
    assert figures["mean"] == pytest.approx(3.0)
    assert figures["std"] == pytest.approx(math.sqrt(3.5))


def test_win_rate_counts_a_tie_half():
    model = torch.tensor([0.5, 0.2, -0.1, 0.3])
    baseline = torch.tensor([0.1, 0.2, 0.4, -0.3])
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate(model, baseline) == pytest.approx(0.625)
    assert win_rate(baseline, baseline) == 0.5
    with pytest.raises(ValueError):
        win_rate(model, baseline[:3])


def test_distinct_n_over_whitespace_words():
    texts = ["the cat sat", "the cat ran", "", "alone"]
    # unigrams: the cat sat the cat ran alone = 7, unique {the, cat, sat, ran, alone} = 5
    assert distinct_n(texts, 1) == pytest.approx(5 / 7)
    # bigrams (never across responses): (the cat) (cat sat) (the cat) (cat ran) = 4, unique 3
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0


def test_sequence_kl_sums_valid_tokens_then_averages_samples():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, float("nan")]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.2, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kls = sequence_kl(logprobs, ref_logprobs, mask)
    # row 0: 0.5 - 1.0 + 0.0 = -0.5; row 1: 0.1 - 0.5 = -0.4 (the padded NaN never counts)
    assert kls.tolist() == pytest.approx([-0.5, -0.4])
    assert mean_kl(kls) == pytest.approx(-0.45)


def test_perplexity_is_exp_of_token_weighted_mean_nll():
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_summarise_collects_the_figures():
    figures = summarise(
        {"gold": torch.tensor([1.0, 0.0]), "rm": torch.tensor([2.0, 4.0])}, torch.tensor([3.0, 4.0]),
        lengths=torch.tensor([3, 5]), stopped=torch.tensor([True, False]), responses=["a b", "a c"],
        sequence_kls=torch.tensor([0.2, 0.4]),
    )
    assert figures["num_samples"] == 2
    assert figures["rewards"]["gold"] == {"mean": 0.5, "std": 0.5}
    assert figures["rewards"]["rm"] == {"mean": 3.0, "std": 1.0}
    assert figures["reward"] == {"mean": 3.5, "std": 0.5}
    assert figures["kl_to_reference"] == pytest.approx(0.3)
    assert figures["response_length"] == 4.0 and figures["stop_rate"] == 0.5
    assert figures["distinct_1"] == pytest.approx(3 / 4) and figures["distinct_2"] == 1.0


def test_curve_series_keeps_known_finite_metrics_in_order():
    rows = [
        {"step": 1, "loss/policy_avg": 0.5, "objective/kl": 0.0, "lr": 1e-5, "reward/builtin:sentiment": 0.1},
        {"step": 2, "loss/policy_avg": "nan", "objective/kl": 0.2},
        {"step": 3, "eval/scores": 0.3},
    ]
    assert curve_series(rows) == {
        "objective/kl": {"step": [1, 2], "value": [0.0, 0.2]},
        "loss/policy_avg": {"step": [1], "value": [0.5]},
        "reward/builtin:sentiment": {"step": [1], "value": [0.1]},
        "eval/scores": {"step": [3], "value": [0.3]},
    }


def test_histogram_bins_are_shared_between_models():
    data = histogram_data({"a": [0.0, 1.0], "b": [0.5, 0.5, 2.0]}, bins=4)
    assert data["bins"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert data["counts"] == {"a": [1, 0, 1, 0], "b": [0, 2, 0, 1]}
