"""causal_lm_loss: shift, cross-entropy + z-loss against hand computations, ignore index, normaliser."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from unified_mllm.data.conversation import IGNORE_INDEX
from unified_mllm.train.losses import causal_lm_loss

IGN = IGNORE_INDEX


def lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]]])
    labels = torch.tensor([[IGN, 1, 2]])  # position 0 predicts id 1, position 1 predicts id 2
    return logits, labels


def test_hand_computed_cross_entropy_and_z_loss() -> None:
    logits, labels = hand_example()
    parts = causal_lm_loss(logits, labels, z_loss_weight=0.1)
    lse0, lse1 = lse([1.0, 2.0, 0.5]), math.log(3.0)
    ce = (lse0 - 2.0) + (lse1 - 0.0)
    z = 0.1 * (lse0**2 + lse1**2)
    assert parts.num_tokens.item() == 2
    assert parts.ce_sum.item() == pytest.approx(ce, abs=1e-6)
    assert parts.z_sum.item() == pytest.approx(z, abs=1e-6)
    assert parts.loss.item() == pytest.approx((ce + z) / 2, abs=1e-6)
    assert parts.loss.dtype == torch.float32 and parts.loss.ndim == 0
    assert parts.loss.requires_grad is False  # logits did not require grad
    assert not parts.ce_sum.requires_grad and not parts.z_sum.requires_grad


def test_matches_torch_cross_entropy_on_shifted_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, 2:5] = IGN
    parts = causal_lm_loss(logits, labels, 0.0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    assert parts.num_tokens.item() == 3 * 6 - 3
    torch.testing.assert_close(parts.ce_sum, expected)
    torch.testing.assert_close(parts.loss, expected / (3 * 6 - 3))


def test_ignored_positions_neither_count_nor_get_gradient() -> None:
    logits, labels = hand_example()
    logits.requires_grad_(True)
    labels[0, 2] = IGN  # only position 0 is supervised now
    parts = causal_lm_loss(logits, labels, 0.1)
    lse0 = lse([1.0, 2.0, 0.5])
    assert parts.num_tokens.item() == 1
    assert parts.loss.item() == pytest.approx((lse0 - 2.0) + 0.1 * lse0**2, abs=1e-6)
    parts.loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    # d/dx of (lse - x_label + w lse^2) = softmax * (1 + 2 w lse) - onehot(label)
    soft = torch.softmax(torch.tensor([1.0, 2.0, 0.5]), -1)
    expected = soft * (1 + 2 * 0.1 * lse0) - torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(logits.grad[0, 0], expected)


def test_first_label_is_never_used_and_last_logits_predict_nothing() -> None:
    logits, labels = hand_example()
    base = causal_lm_loss(logits, labels, 0.1).loss
    labels[0, 0] = 0
    logits[0, 2] = torch.tensor([-5.0, 9.0, 4.0])
    assert torch.equal(causal_lm_loss(logits, labels, 0.1).loss, base)


def test_a_row_without_supervised_tokens() -> None:
    logits, labels = hand_example()
    batch_logits = torch.cat([logits, torch.randn(1, 3, 3)]).requires_grad_(True)
    batch_labels = torch.cat([labels, torch.full((1, 3), IGN)])
    parts = causal_lm_loss(batch_logits, batch_labels, 0.1)
    alone = causal_lm_loss(logits, labels, 0.1)
    assert parts.num_tokens.item() == 2
    torch.testing.assert_close(parts.loss, alone.loss)
    parts.loss.backward()
    assert batch_logits.grad[1].abs().sum() == 0


def test_no_supervised_tokens_at_all_gives_zero_not_nan() -> None:
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), IGN)
    parts = causal_lm_loss(logits, labels, 1e-4)
    assert parts.num_tokens.item() == 0
    assert parts.loss.item() == 0.0 and parts.ce_sum.item() == 0.0 and parts.z_sum.item() == 0.0
    parts.loss.backward()  # still differentiable, with zero gradient
    assert logits.grad.abs().sum() == 0
    zero_global = causal_lm_loss(logits, labels, 1e-4, normalizer=torch.tensor(0))
    assert zero_global.loss.item() == 0.0


def test_z_loss_weight_zero_versus_positive() -> None:
    logits, labels = hand_example()
    without = causal_lm_loss(logits, labels, 0.0)
    with_z = causal_lm_loss(logits, labels, 1e-2)
    lse0, lse1 = lse([1.0, 2.0, 0.5]), math.log(3.0)
    assert without.z_sum.item() == 0.0
    torch.testing.assert_close(without.ce_sum, with_z.ce_sum)
    assert (with_z.loss - without.loss).item() == pytest.approx(1e-2 * (lse0**2 + lse1**2) / 2, abs=1e-7)
    with pytest.raises(ValueError, match="z_loss_weight"):
        causal_lm_loss(logits, labels, -1.0)


def test_normalizer_number_and_tensor() -> None:
    logits, labels = hand_example()
    parts = causal_lm_loss(logits, labels, 0.1)
    total = parts.ce_sum + parts.z_sum
    torch.testing.assert_close(causal_lm_loss(logits, labels, 0.1, normalizer=8).loss, total / 8)
    torch.testing.assert_close(
        causal_lm_loss(logits, labels, 0.1, normalizer=torch.tensor(5)).loss, total / 5
    )
    torch.testing.assert_close(causal_lm_loss(logits, labels, 0.1, normalizer=0.5).loss, total / 0.5)
    with pytest.raises(ValueError, match="normalizer must be positive"):
        causal_lm_loss(logits, labels, 0.1, normalizer=0)


def test_global_normalizer_makes_accumulated_gradients_equal_the_full_batch_mean() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 9, generator=gen)
    labels = torch.randint(0, 9, (2, 6), generator=gen)
    labels[1, 1:5] = IGN  # micro-batches with very different token counts: 5 and 1
    full = logits.clone().requires_grad_(True)
    causal_lm_loss(full, labels, 1e-3).loss.backward()
    micro = logits.clone().requires_grad_(True)
    total = int((labels[:, 1:] != IGN).sum())
    assert total == 6
    for row in range(2):
        causal_lm_loss(micro[row : row + 1], labels[row : row + 1], 1e-3, normalizer=total).loss.backward()
    torch.testing.assert_close(micro.grad, full.grad)
    # A per-micro-batch mean would weigh the lone token of row 1 five times more than each token of row 0.
    naive = logits.clone().requires_grad_(True)
    for row in range(2):
        causal_lm_loss(naive[row : row + 1], labels[row : row + 1], 1e-3).loss.backward()
    assert not torch.allclose(naive.grad, full.grad)


def test_loss_weights_give_a_weighted_mean() -> None:
    logits, labels = hand_example()
    # The weight of the token expected at t: position 1's id (weight 3) and position 2's id (weight 0.5).
    weights = torch.tensor([[7.0, 3.0, 0.5]])
    parts = causal_lm_loss(logits, labels, 0.1, weights=weights)
    lse0, lse1 = lse([1.0, 2.0, 0.5]), math.log(3.0)
    ce = 3.0 * (lse0 - 2.0) + 0.5 * (lse1 - 0.0)
    z = 0.1 * (3.0 * lse0**2 + 0.5 * lse1**2)
    assert parts.num_tokens.item() == 2 and parts.weight_sum.item() == 3.5
    assert parts.ce_sum.item() == pytest.approx(ce, abs=1e-6)
    assert parts.z_sum.item() == pytest.approx(z, abs=1e-6)
    assert parts.loss.item() == pytest.approx((ce + z) / 3.5, abs=1e-6)
    # Weights of 1 are the plain mean; a constant weight cancels out of the default normaliser.
    plain = causal_lm_loss(logits, labels, 0.1)
    torch.testing.assert_close(causal_lm_loss(logits, labels, 0.1, weights=torch.ones(1, 3)).loss, plain.loss)
    torch.testing.assert_close(
        causal_lm_loss(logits, labels, 0.1, weights=torch.full((1, 3), 4.0)).loss, plain.loss
    )
    with pytest.raises(ValueError, match=r"weights must match labels \(1, 3\)"):
        causal_lm_loss(logits, labels, 0.1, weights=torch.ones(1, 2))


def test_weighted_gradients_scale_each_token() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    weights = torch.tensor([[1.0] * 5, [4.0] * 5])
    # Row 1 weighted 4 == row 1 repeated four times, unweighted.
    weighted = logits.clone().requires_grad_(True)
    causal_lm_loss(weighted, labels, 1e-3, weights=weights).loss.backward()
    repeated = logits.clone().requires_grad_(True)
    stacked = torch.cat([repeated[:1]] + [repeated[1:]] * 4)
    causal_lm_loss(stacked, torch.cat([labels[:1]] + [labels[1:]] * 4), 1e-3).loss.backward()
    torch.testing.assert_close(weighted.grad, repeated.grad)


def test_bf16_logits_are_scored_in_fp32() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 5, 300, generator=gen) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 300, (2, 5), generator=gen)
    parts = causal_lm_loss(logits, labels, 1e-4)
    reference = causal_lm_loss(logits.float(), labels, 1e-4)
    assert parts.loss.dtype == torch.float32
    torch.testing.assert_close(parts.loss, reference.loss)  # same values, upcast before the reduction


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"expected logits \[B, T, V\] and labels \[B, T\]"):
        causal_lm_loss(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="integer ids"):
        causal_lm_loss(torch.zeros(2, 4, 5), torch.zeros(2, 4), 0.0)
