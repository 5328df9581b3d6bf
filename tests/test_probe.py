"""Linear probes: exact answers on small synthetic features whose information content is known."""

from __future__ import annotations

import pytest
import torch

from unified_mllm.probe import fit_linear_probe, probe_scores, run_probe


def one_hot_features(labels: list[int], num_classes: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Features that hold the label exactly (a one-hot block), plus a few dimensions of seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.nn.functional.one_hot(torch.tensor(labels), num_classes).float()
    return torch.cat([signal, noise * torch.randn(len(labels), 3, generator=generator)], dim=1)


def test_features_that_hold_the_label_give_a_perfect_probe() -> None:
    train = [0, 1, 2, 0, 1, 2, 2, 1, 0, 0]
    test = [2, 2, 0, 1, 1]
    result = run_probe(
        (one_hot_features(train, 3, noise=1.0), torch.tensor(train)[:, None]),
        (one_hot_features(test, 3, noise=1.0, seed=1), torch.tensor(test)[:, None]),
        3,
    )
    assert result == {"num_train": 10, "num_samples": 5, "accuracy": 1.0, "all_heads": 1.0}


def test_features_without_information_give_the_majority_class() -> None:
    # Constant features: the probe can only learn the prior, so it always answers the commonest class (0).
    train_labels = torch.tensor([[0], [0], [0], [1]])
    probe = fit_linear_probe(torch.zeros(4, 5), train_labels, 2)
    test_labels = torch.tensor([[0], [1], [1], [0], [0]])
    assert probe.predict(torch.zeros(5, 5)).tolist() == [[0]] * 5
    scores = probe_scores(probe, torch.zeros(5, 5), test_labels, positive=1)
    # 3 of 5 right; "yes" never said while 2 are true: F1 = 2 * 0 / (0 + 2) = 0.
    assert scores == {"num_samples": 5, "accuracy": 0.6, "all_heads": 0.6, "f1": 0.0}


def test_each_head_reads_only_what_the_features_hold() -> None:
    # Head 0 is written in the features, head 1 is not (and is "yes" for 1 training sample in 4).
    head0 = [0, 1, 1, 0, 1, 0, 0, 1]
    head1 = [0, 0, 1, 0, 0, 0, 1, 0]
    features = one_hot_features(head0, 2)
    labels = torch.tensor([head0, head1]).t()
    probe = fit_linear_probe(features, labels, 2)
    test0, test1 = [1, 0, 1, 0], [1, 1, 0, 0]
    scores = probe_scores(probe, one_hot_features(test0, 2), torch.tensor([test0, test1]).t(), positive=1)
    # Head 0 all right, head 1 always "no" (right twice): accuracy 6/8; samples with both heads right: 2/4.
    # "Yes": said 2 times (head 0), true 4 times, 2 hits: F1 = 4 / 6.
    assert scores["accuracy"] == 0.75 and scores["all_heads"] == 0.5
    assert scores["f1"] == pytest.approx(2 / 3)


def test_the_fit_is_deterministic() -> None:
    generator = torch.Generator().manual_seed(0)
    features, labels = (
        torch.randn(30, 6, generator=generator),
        torch.randint(0, 3, (30, 2), generator=generator),
    )
    first, second = fit_linear_probe(features, labels, 3), fit_linear_probe(features, labels, 3)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"labels \(N, H\) with the same N"):
        fit_linear_probe(torch.zeros(3, 2), torch.zeros(4, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        fit_linear_probe(torch.zeros(2, 2), torch.tensor([[0], [2]]), 2)
    with pytest.raises(ValueError, match="no samples"):
        fit_linear_probe(torch.zeros(0, 2), torch.zeros(0, 1, dtype=torch.long), 2)
