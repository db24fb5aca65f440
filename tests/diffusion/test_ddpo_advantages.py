"""Per-prompt reward normalisation, its fallback, buffer eviction and state; batch advantages; clipping."""

import json
import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from rlhf_cli.diffusion.advantages import PerPromptStatTracker, batch_advantages, clip_advantages

D = 1 + 1e-6  # std 1 plus the 1e-6 guard
SQRT_8_3 = math.sqrt(8 / 3)  # population std of [1, 3, 5]: sqrt((4 + 0 + 4) / 3)


def test_per_prompt_normalisation_and_min_count_fallback():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "b", "a"], np.array([1.0, 5.0, 3.0]))
    # "a": buffer [1, 3] (2 >= min_count) -> mean 2, std 1 -> [-1, 1] / (1 + 1e-6)
    # "b": buffer [5] (1 < min_count)     -> batch mean 3, std sqrt(8/3) -> 2 / (sqrt(8/3) + 1e-6)
    assert_allclose(adv, [-1 / D, 2 / (SQRT_8_3 + 1e-6), 1 / D], rtol=1e-12)
    # "b" again: buffer [5, 7] -> mean 6, std 1 -> (7 - 6) / (1 + 1e-6); the batch of one is not used
    assert_allclose(tracker.update(["b"], [7.0]), [1 / D], rtol=1e-12)
    assert tracker.stats() == {"num_prompts": 2, "mean_count": 2.0}


def test_buffer_keeps_only_the_newest_rewards():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    tracker.update(["a", "a"], [1.0, 3.0])
    # buffer [1, 3] + 5 -> evicts 1 -> [3, 5]: mean 4, std 1 -> (5 - 4) / (1 + 1e-6)
    # (without eviction, [1, 3, 5] would give (5 - 3) / sqrt(8/3) = 1.2247)
    assert_allclose(tracker.update(["a"], [5.0]), [1 / D], rtol=1e-12)
    assert list(tracker.buffers["a"]) == [3.0, 5.0]


def test_equal_rewards_give_zero_advantage():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    assert_allclose(tracker.update(["a", "a", "a"], [2.0, 2.0, 2.0]), [0.0, 0.0, 0.0])


def test_tensor_in_tensor_out():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "a"], torch.tensor([1.0, 3.0]))
    assert isinstance(adv, torch.Tensor) and adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([-1 / D, 1 / D]))


def test_state_round_trip_through_json_and_clear():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a", "b", "a", "b"], [1.0, 2.0, 3.0, 6.0])
    restored = PerPromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    batch = (["a", "b", "c"], [4.0, 0.0, 9.0])
    assert_allclose(restored.update(*batch), tracker.update(*batch), rtol=0)
    assert restored.stats() == tracker.stats() == {"num_prompts": 3, "mean_count": 7 / 3}

    tracker.clear()
    assert tracker.stats() == {"num_prompts": 0, "mean_count": 0.0}
    # after clear a single reward per prompt falls back to the batch: [1, 3] -> mean 2, std 1
    assert_allclose(tracker.update(["a", "b"], [1.0, 3.0]), [-1 / D, 1 / D], rtol=1e-12)


def test_load_trims_to_this_trackers_buffer_size():
    small = PerPromptStatTracker(buffer_size=2, min_count=1)
    small.load_state_dict({"buffers": {"a": [1.0, 2.0, 3.0]}})
    assert list(small.buffers["a"]) == [2.0, 3.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=2, min_count=3)
    with pytest.raises(ValueError, match="2 prompts for 3 rewards"):
        PerPromptStatTracker(buffer_size=2, min_count=1).update(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="adv_clip_max"):
        clip_advantages(np.zeros(2), 0.0)


def test_batch_advantages_and_clipping():
    # [1, 2, 3]: mean 2, population std sqrt(2/3) -> [-1, 0, 1] / (sqrt(2/3) + 1e-6) = +-1.2247
    s = math.sqrt(2 / 3) + 1e-6
    assert_allclose(batch_advantages(np.array([1.0, 2.0, 3.0])), [-1 / s, 0.0, 1 / s], rtol=1e-12)
    torch.testing.assert_close(batch_advantages(torch.tensor([1.0, 2.0, 3.0])),
                               torch.tensor([-1 / s, 0.0, 1 / s]))
    assert_allclose(clip_advantages(np.array([-7.0, 0.5, 3.0]), 2.0), [-2.0, 0.5, 2.0])
    torch.testing.assert_close(clip_advantages(torch.tensor([-7.0, 0.5, 3.0]), 2.0),
                               torch.tensor([-2.0, 0.5, 2.0]))
