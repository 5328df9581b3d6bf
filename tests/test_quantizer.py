"""The quantizers against hand computations: lookup, losses, straight-through, EMA, dead codes, usage; the
multi-codebook (UniTok) and residual (DualToken) quantizers built on the vector quantizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unified_mllm.vision.quantizer import (
    MultiCodebookQuantizer,
    ResidualQuantizer,
    VectorQuantizer,
    code_counts,
    nearest_code_indices,
    perplexity_from_counts,
)


def quantizer_with(codebook: list[list[float]], **kwargs: object) -> VectorQuantizer:
    weight = torch.tensor(codebook)
    quantizer = VectorQuantizer(weight.shape[0], weight.shape[1], **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        quantizer.embedding.weight.copy_(weight)
    quantizer.reset_statistics()
    return quantizer


def test_nearest_code_by_l2_distance() -> None:
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    vectors = torch.tensor([[0.4, 0.1], [0.6, 0.0], [0.1, 1.2], [5.0, 5.0]])
    # [0.1, 1.2]: 1.45 to code 0, 0.65 to code 2; [5, 5]: 41 to code 1, 34 to code 2.
    assert nearest_code_indices(vectors, codebook).tolist() == [0, 1, 2, 2]


def test_nearest_code_by_cosine_ignores_code_norms() -> None:
    codebook = torch.tensor([[3.0, 0.0], [0.0, 0.1]])
    vectors = torch.tensor([[2.0, 2.2], [2.5, 0.5]])
    # [2, 2.2] is closer to [3, 0] in L2 (5.84 vs 8.41) but points closer to [0, 1] in angle.
    assert nearest_code_indices(vectors, codebook).tolist() == [0, 0]
    assert nearest_code_indices(vectors, codebook, cosine=True).tolist() == [1, 0]
    quantizer = quantizer_with([[3.0, 0.0], [0.0, 0.1]], l2_normalize=True)
    out = quantizer(vectors)
    assert out.indices.tolist() == [1, 0]
    assert torch.allclose(out.quantized, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # unit-length codes


def test_chunked_lookup_matches_one_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(50, 8, generator=generator), torch.randn(20, 8, generator=generator)
    expected = torch.cdist(vectors, codebook).argmin(dim=1)
    assert torch.equal(nearest_code_indices(vectors, codebook, chunk_rows=7), expected)
    with pytest.raises(ValueError, match="expected vectors"):
        nearest_code_indices(vectors, codebook[:, :4])


def test_losses_and_gradients_by_hand() -> None:
    quantizer = quantizer_with([[0.0, 0.0], [1.0, 1.0]], beta=0.25)
    z = torch.tensor([[0.2, 0.1], [0.9, 1.3]], requires_grad=True)
    out = quantizer(z)
    assert out.indices.tolist() == [0, 1]
    # Differences z - e: [[0.2, 0.1], [-0.1, 0.3]]; mean of squares 0.15 / 4.
    assert out.codebook_loss.item() == pytest.approx(0.0375)
    assert out.commitment_loss.item() == pytest.approx(0.0375)
    assert out.loss.item() == pytest.approx(0.0375 * 1.25)
    out.loss.backward()
    # The encoder only feels beta * commitment: 0.25 * 2 (z - e) / 4; the codebook only the codebook loss:
    # 2 (e - z) / 4 summed per code (taming's legacy loss would swap the two factors).
    assert torch.allclose(z.grad, torch.tensor([[0.025, 0.0125], [-0.0125, 0.0375]]))
    assert torch.allclose(quantizer.embedding.weight.grad, torch.tensor([[-0.1, -0.05], [0.05, -0.15]]))


def test_straight_through_gradient_is_identity() -> None:
    quantizer = quantizer_with([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]])
    z = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = quantizer(z, dim=1)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 3)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    out.quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)
    assert quantizer.embedding.weight.grad is None  # the codes reach the decoder without a gradient path
    # The forward value is the codes themselves, at the positions of `dim`.
    assert torch.equal(out.quantized.detach(), quantizer.lookup(out.indices, dim=1))
    assert torch.equal(quantizer.nearest(z, dim=1), out.indices)


def test_usage_and_perplexity_of_a_known_assignment() -> None:
    quantizer = quantizer_with([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    out = quantizer(torch.tensor([[0.1, 0.0], [0.0, 0.2], [9.9, 0.0], [10.0, 0.3]]))
    assert out.counts.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert out.perplexity.item() == pytest.approx(2.0)
    assert out.usage.item() == 0.5
    assert perplexity_from_counts(code_counts(torch.arange(4), 4)).item() == pytest.approx(4.0)
    assert perplexity_from_counts(torch.tensor([3.0, 1.0])).item() == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )


def test_all_reduce_hook_sums_counts_in_training() -> None:
    quantizer = quantizer_with([[0.0, 0.0], [10.0, 0.0]], dead_code_steps=1)
    quantizer.all_reduce = lambda t: t * 2  # two identical ranks
    z = torch.tensor([[0.0, 0.1]])
    assert quantizer(z).counts.tolist() == [2.0, 0.0]
    quantizer.eval()
    assert quantizer(z).counts.tolist() == [1.0, 0.0]  # eval: local counts, no statistics


def test_ema_update_by_hand() -> None:
    quantizer = quantizer_with([[0.0, 0.0], [1.0, 1.0]], ema_decay=0.9, ema_epsilon=1e-5)
    assert not quantizer.embedding.weight.requires_grad
    z = torch.tensor([[0.2, 0.0], [0.4, 0.2], [1.0, 2.0]], requires_grad=True)
    out = quantizer(z)
    assert out.indices.tolist() == [0, 0, 1]
    # Batch statistics: counts [2, 1], sums [[0.6, 0.2], [1.0, 2.0]].
    sizes = [0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 1]  # [1.1, 1.0]
    sums = [[0.1 * 0.6, 0.1 * 0.2], [0.9 + 0.1 * 1.0, 0.9 + 0.1 * 2.0]]
    total, eps = sum(sizes), 1e-5
    smoothed = [(n + eps) / (total + 2 * eps) * total for n in sizes]
    expected = torch.tensor([[s / smoothed[k] for s in sums[k]] for k in range(2)])
    assert torch.allclose(quantizer.ema_cluster_size, torch.tensor(sizes))
    assert torch.allclose(quantizer.ema_embed_sum, torch.tensor(sums))
    assert torch.allclose(quantizer.embedding.weight, expected, atol=1e-6)
    # No codebook loss under EMA; the loss uses the codebook before the update.
    assert out.codebook_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(0.25 * ((0.04 + 0.16 + 0.04) + (0.0 + 1.0)) / 6)
    quantizer.eval()
    before = quantizer.embedding.weight.clone()
    quantizer(z)
    assert torch.equal(quantizer.embedding.weight, before)


def test_dead_code_restart_replaces_exactly_the_dead_codes() -> None:
    codebook = [[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]
    quantizer = quantizer_with(codebook, dead_code_steps=2, ema_decay=0.5)
    batch = torch.tensor([[0.1, 0.0], [19.0, 20.0]])  # uses codes 0 and 2 only
    pool = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 9.5]])
    quantizer(batch)
    assert quantizer.restart_dead_codes(pool).numel() == 0  # one step unused is not dead yet
    quantizer(batch)
    assert quantizer.steps_since_used.tolist() == [0, 2, 0, 2]
    before = quantizer.embedding.weight.clone()
    sent: list[torch.Tensor] = []
    restarted = quantizer.restart_dead_codes(pool, torch.Generator().manual_seed(0), broadcast=sent.append)
    assert restarted.tolist() == [1, 3]
    weight = quantizer.embedding.weight
    assert torch.equal(weight[[0, 2]], before[[0, 2]])
    new_rows = [tuple(row) for row in weight[[1, 3]].tolist()]
    assert len(set(new_rows)) == 2 and set(new_rows) <= {tuple(row) for row in pool.tolist()}
    assert quantizer.steps_since_used.tolist() == [0, 0, 0, 0]
    assert quantizer.ema_cluster_size[[1, 3]].tolist() == [1.0, 1.0]
    assert torch.equal(quantizer.ema_embed_sum[[1, 3]], weight[[1, 3]])
    # Every state tensor is handed to the broadcast, the codebook first.
    assert [t.data_ptr() for t in sent] == [t.data_ptr() for t in quantizer.state_tensors()]
    assert sent[0].data_ptr() == weight.data_ptr() and len(sent) == 4


def test_dead_code_restart_with_fewer_latents_than_dead_codes() -> None:
    quantizer = quantizer_with([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]], dead_code_steps=1)
    quantizer(torch.tensor([[0.0, 0.0]]))
    restarted = quantizer.restart_dead_codes(torch.tensor([[4.0, 4.0]]), torch.Generator().manual_seed(0))
    assert restarted.tolist() == [1, 2]
    assert quantizer.embedding.weight[1:].tolist() == [[4.0, 4.0], [4.0, 4.0]]
    quantizer(torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least one"):
        quantizer.restart_dead_codes(torch.zeros(0, 2))


def test_statistics_buffers_only_when_enabled() -> None:
    plain = VectorQuantizer(8, 4)
    assert set(plain.state_dict()) == {"embedding.weight"}
    full = VectorQuantizer(8, 4, ema_decay=0.99, dead_code_steps=10)
    assert set(full.state_dict()) == {"embedding.weight", *VectorQuantizer.STATISTIC_BUFFERS}
    assert plain.restart_dead_codes(torch.zeros(3, 4)).numel() == 0
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(8, 4, ema_decay=1.0)
    with pytest.raises(ValueError, match="channels"):
        plain(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="integers"):
        plain.lookup(torch.zeros(2))


# ------------------------------------------------------------------------------- multi-code quantizers


def test_multi_codebook_quantizes_each_chunk_with_its_own_codebook() -> None:
    torch.manual_seed(0)
    mcq = MultiCodebookQuantizer(3, 5, 6, l2_normalize=True)
    z = torch.randn(4, 6, requires_grad=True)
    out = mcq(z)
    assert out.indices.shape == (4, 3) and out.counts.shape == (3, 5) and out.quantized.shape == (4, 6)
    for k, codebook in enumerate(mcq.codebooks):
        chunk = F.normalize(z[:, 2 * k : 2 * k + 2].detach(), dim=1)
        expected = (chunk @ codebook.codebook.t()).argmax(dim=1)
        assert torch.equal(out.indices[:, k], expected)
        assert torch.equal(out.counts[k], torch.bincount(expected, minlength=5).float())
    torch.testing.assert_close(mcq.lookup(out.indices), out.quantized.detach())
    assert torch.equal(mcq.nearest(z), out.indices)
    # Losses: the mean over chunks of each chunk's codebook + beta * commitment.
    chunks = [F.normalize(c, dim=1) for c in z.detach().split(2, dim=1)]
    codes = [mcq.codebooks[k].codebook[out.indices[:, k]] for k in range(3)]
    by_hand = sum(F.mse_loss(c, e) for c, e in zip(chunks, codes)) / 3
    torch.testing.assert_close(out.commitment_loss, by_hand.detach())
    torch.testing.assert_close(out.loss, by_hand * 1.25, atol=1e-6, rtol=1e-5)
    out.quantized.sum().backward()  # straight-through: the gradient reaches z
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_residual_quantizer_sums_codes_over_depth_with_rq_vae_losses() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(3, 8, 4, beta=0.5)
    z = torch.randn(10, 4, requires_grad=True)
    out = rq(z)
    assert out.indices.shape == (10, 3) and out.counts.shape == (3, 8) and out.latents.shape == (30, 4)
    weight = rq.codebook.codebook.detach()
    residual, partial, commitments, codebook_terms = z.detach(), torch.zeros(10, 4), [], []
    for depth in range(3):
        index = ((residual[:, None, :] - weight[None]) ** 2).sum(-1).argmin(dim=1)
        assert torch.equal(out.indices[:, depth], index)
        partial = partial + weight[index]
        commitments.append(F.mse_loss(z.detach(), partial))
        codebook_terms.append(F.mse_loss(weight[index], residual))
        residual = residual - weight[index]
    torch.testing.assert_close(out.commitment_loss, torch.stack(commitments).mean().detach())
    torch.testing.assert_close(out.codebook_loss, torch.stack(codebook_terms).mean().detach())
    torch.testing.assert_close(out.quantized.detach(), partial)
    torch.testing.assert_close(rq.lookup(out.indices), partial)
    sums = rq.partial_sums(out.indices)
    assert sums.shape == (10, 3, 4)
    torch.testing.assert_close(sums[:, -1], partial)
    assert torch.equal(rq.nearest(z), out.indices)
    out.quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight through, whatever the depth


def test_residual_quantizer_ema_updates_once_from_every_depth() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(2, 4, 3, ema_decay=0.5)
    before = rq.codebook.embedding.weight.clone()
    z = torch.randn(6, 3)
    out = rq(z)
    # One EMA step whose counts are the histogram of both depths' indices, whose sums are their residuals.
    reference = VectorQuantizer(4, 3, ema_decay=0.5)
    reference.embedding.weight.data.copy_(before)
    reference.reset_statistics()
    flat = out.latents
    indices = out.indices.t().reshape(-1)
    counts = torch.bincount(indices, minlength=4).float()
    sums = torch.zeros(4, 3).index_add_(0, indices, flat)
    reference.ema_update(counts, sums)
    torch.testing.assert_close(rq.codebook.embedding.weight, reference.embedding.weight)
    torch.testing.assert_close(out.counts.sum(dim=0), counts)
