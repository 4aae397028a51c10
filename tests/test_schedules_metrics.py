import math

import pytest
import torch
import torch.nn.functional as F

from mctool.errors import ConfigError
from mctool.evaluation import MIN_PROB, brier, ece, error, nll, probabilities
from mctool.schedules import cosine_factor, lr_at, paper_factor


def test_paper_schedule_matches_the_formula():
    # a = epoch / epochs: flat to a = 0.5, linear to 0.01 at a = 0.9, then flat.
    assert paper_factor(0, 100) == 1.0
    assert paper_factor(50, 100) == 1.0
    assert paper_factor(70, 100) == pytest.approx(1 - 0.99 * 0.2 / 0.4)
    assert paper_factor(90, 100) == pytest.approx(0.01)
    assert paper_factor(99, 100) == 0.01
    # lr is constant within an epoch for the paper schedule
    assert lr_at("paper", 0.1, 70, 100, 0, 10) == lr_at("paper", 0.1, 70, 100, 9, 10)


def test_cosine_and_constant():
    assert cosine_factor(0.0) == 1.0
    assert cosine_factor(0.5) == pytest.approx(0.5)
    assert cosine_factor(1.0) == pytest.approx(0.0)
    assert lr_at("cosine", 0.2, 1, 2, 0, 10) == pytest.approx(0.1)
    assert lr_at("constant", 0.3, 5, 10) == 0.3
    with pytest.raises(ConfigError):
        lr_at("nope", 0.1, 0, 1)


def test_cosine_is_updated_every_iteration():
    """docs/cli.md (train --schedule cosine): updated every iteration, from the fraction of training done,
    (epoch + i / n) / epochs; not once per epoch."""
    lrs = [lr_at("cosine", 0.2, 1, 2, i, 10) for i in range(10)]
    # the formula's own float64 operations: equal up to a few 2^-53 relative. The per-epoch value (i = 0) for
    # the whole epoch is off by up to 0.099 (0.2 x (0.5 - 0.5 (1 + cos(0.95 pi)))).
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * (1 + i / 10) / 2)) for i in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing within the epoch


@pytest.mark.parametrize("cycle_iters, epochs, per_epoch, expected", [
    (5, None, 10, 6), (7, None, 10, 8), (9, None, 10, 10), (8, None, 10, 8), (2, None, 10, 2), (3, None, 10, 4),
    (None, 0.05, 10, 2), (None, 1.0, 12, 12), (None, 0.25, 10, 2), (None, 1.5, 5, 8),
    (None, 0.3, 10, 4), (None, 0.7, 10, 8),
    (10**9, None, 10, 10**9), (10**9 - 1, None, 10, 10**9)])
def test_fge_cycle_is_even_and_rounds_as_documented(cycle_iters, epochs, per_epoch, expected):
    """docs/cli.md (fge, Cycle): c = 2 floor(x / 2 + 1/2), at least 2: an odd count rounds up (5 -> 6, 9 -> 10)."""
    from mctool.fge import FGEConfig, cycle_length

    cfg = FGEConfig(cycle_iters=cycle_iters, cycle_epochs=epochs, lr_max=0.1, lr_min=0.01)
    assert cycle_length(cfg, per_epoch) == expected


def test_nll_error_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1, 1])
    # nll and ece compute in float32 from float32 probabilities: each input and each of a handful of operations
    # rounds by 2^-24 of terms up to 1, so the results (0.4 and 0.3) are within ~1e-6 relative of the exact
    # values; allow 1e-5. A wrong label, bin or sign changes them by 0.05 or more.
    assert nll(probs, labels) == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4,
                                               rel=1e-5)
    assert error(probs, labels) == 0.25
    # confidences 0.9, 0.6, 0.7, 0.8 fall in four different 15-bins; accuracies 1, 0, 1, 1
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.8)) / 4
    assert ece(probs, labels) == pytest.approx(expected, rel=1e-5)
    # a perfectly calibrated, confident predictor has ECE 0 (confidences and accuracies are all exactly 1)
    assert ece(torch.eye(3), torch.arange(3)) == 0.0


def test_ece_bins_hold_their_upper_edge():
    """ECE's bins are (lo, hi] (docs; evaluation.ece): a confidence of exactly 9/15 = 0.6 (0.6 x 15 is 9.0 in
    float64) shares the bin (8/15, 9/15] with 0.58; in [lo, hi) bins it would sit alone in [0.6, 10/15)."""
    probs = torch.tensor([[0.6, 0.4], [0.58, 0.42]], dtype=torch.float64)
    labels = torch.tensor([0, 1])  # the first right, the second wrong
    assert 0.6 * 15 == 9.0
    # one bin: |(0.6 + 0.58) - 1| / 2 = 0.09, from a few float64 roundings of terms <= 2 (within 1e-14 relative);
    # two bins give (|0.6 - 1| + |0.58 - 0|) / 2 = 0.49
    assert ece(probs, labels) == pytest.approx(0.09, rel=1e-12)


def test_nll_of_confidently_wrong_images_is_exact():
    """Far out on a plane or surface an image's true label can sit hundreds below the top logit: its NLL is
    that gap (plus the log-sum), not a cap; also in an ensemble's mean. (Float32 probabilities underflow at an
    NLL of about 87, and mctool 0.2.0 clamped them at 1e-12: an NLL of 27.6.)"""
    logits = torch.tensor([[0.0, 50.0, 0.0], [300.0, 0.0, -5.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 1, 2])
    exact = F.cross_entropy(logits.double(), labels).item()  # float64 log-softmax of the same float32 logits
    assert exact > 100
    # float64 softmax then log: each probability within a few 2^-53 relative, so the NLL within 1e-14 relative
    assert nll(probabilities(logits), labels) == pytest.approx(exact, rel=1e-12)
    # two members: -log of the mean of the true label's probabilities, by log-sum-exp in float64
    other = torch.tensor([[60.0, 0.0, 0.0], [0.0, 100.0, 0.0], [3.0, 2.0, 1.0]])
    mean = (probabilities(logits) + probabilities(other)) / 2
    logp = torch.stack([F.log_softmax(z.double(), 1).gather(1, labels[:, None])[:, 0] for z in (logits, other)])
    assert nll(mean, labels) == pytest.approx(-(torch.logsumexp(logp, 0) - math.log(2)).mean().item(), rel=1e-12)


def test_an_image_with_overflowing_logits_has_no_prediction():
    """Non-finite logits (overflow far from trained weights) give a row of zero probabilities: the image is
    wrong, with NLL -log(MIN_PROB), whatever its label; the other images are unchanged. No metric is NaN."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[2.0, 0.0], [inf, 0.0], [nan, 1.0], [-inf, -inf], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    probs = probabilities(logits)
    assert torch.equal(probs[1:4], torch.zeros(3, 2))
    assert torch.equal(probs[[0, 4]], torch.softmax(logits[[0, 4]].double(), 1))
    assert error(probs, labels) == pytest.approx(3 / 5)  # 3 of 5 wrong: exact in float32 up to one rounding
    good = -(math.log(probs[0, 0].item()) + math.log(probs[4, 1].item()))
    # float64 logs of two probabilities and three terms of 690.8: within 1e-15 relative of the exact sum
    assert probs.dtype == torch.float64 and -math.log(MIN_PROB) == pytest.approx(690.8, abs=0.05)
    assert nll(probs, labels) == pytest.approx((good - 3 * math.log(MIN_PROB)) / 5, rel=1e-12)
    for value in (ece(probs, labels), brier(probs, labels)):
        assert math.isfinite(value)
    # an ensemble's mean: a member with no prediction for an image adds nothing to it
    other = probabilities(torch.tensor([[0.0, 1.0]] * 5))
    mean = (probs + other) / 2
    assert torch.equal(mean[1:4], other[1:4] / 2) and error(mean, labels) == pytest.approx(1 / 5)  # only image 1
