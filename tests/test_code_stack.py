"""Code stacks (UniTok / DualToken): slot groups from the config, the input embedder, the depth heads
(causality, cache-free stepping, loss, sampling, gradients) and the published sizes on the meta device."""

from __future__ import annotations

import pytest
import torch

from unified_mllm.config import UniTokConfig, VQConfig
from unified_mllm.model.code_stack import (
    CodeGroup,
    CodeStackEmbedder,
    CodeStackHeads,
    DepthHead,
    build_code_stack,
    code_groups,
)
from unified_mllm.vision.dualtoken import published_dualtoken_config, tiny_dualtoken_config
from unified_mllm.vision.unitok import unitok_large_config

GROUPS = [CodeGroup("pixel", 3, 5), CodeGroup("semantic", 2, 7)]
HIDDEN = 12


def random_codes(groups: list[CodeGroup], rows: int, generator: torch.Generator) -> torch.Tensor:
    """Codes ``[rows, D]`` within each group's vocabulary."""
    parts = [torch.randint(0, g.vocab_size, (rows, g.depth), generator=generator) for g in groups]
    return torch.cat(parts, dim=1)


def tiny_heads(num_layers: int = 2) -> CodeStackHeads:
    torch.manual_seed(0)
    return CodeStackHeads(GROUPS, HIDDEN, width=16, num_layers=num_layers, num_heads=2)


def test_code_groups_for_every_tokenizer_kind() -> None:
    assert code_groups(VQConfig()) == [CodeGroup("codes", 1, 8192)]
    assert code_groups(unitok_large_config()) == [CodeGroup("codes", 8, 4096)]
    assert code_groups(published_dualtoken_config()) == [
        CodeGroup("pixel", 8, 16384),
        CodeGroup("semantic", 8, 16384),
    ]
    tiny = tiny_dualtoken_config()
    assert code_groups(tiny) == [CodeGroup("pixel", 3, 32), CodeGroup("semantic", 2, 32)]
    for vq in (VQConfig(), unitok_large_config(), published_dualtoken_config(), tiny):
        assert sum(group.depth for group in code_groups(vq)) == vq.code_depth


def test_embedder_sums_slots_within_groups_and_concatenates_groups() -> None:
    torch.manual_seed(0)
    embedder = CodeStackEmbedder(GROUPS, HIDDEN, embed_dim=4)
    codes = random_codes(GROUPS, 6, torch.Generator().manual_seed(1))
    tables = [embedding.weight for embedding in embedder.embeddings]
    pixel = tables[0][codes[:, 0]] + tables[1][codes[:, 1]] + tables[2][codes[:, 2]]
    semantic = tables[3][codes[:, 3]] + tables[4][codes[:, 4]]
    expected = embedder.projector(torch.cat([pixel, semantic], dim=-1))
    out = embedder(codes)
    assert out.shape == (6, HIDDEN)
    torch.testing.assert_close(out, expected)
    # Leading dimensions pass through: [B, h, w, D] -> [B, h, w, hidden].
    grid = codes.view(1, 2, 3, 5)
    torch.testing.assert_close(embedder(grid), out.view(1, 2, 3, HIDDEN))
    with pytest.raises(ValueError, match="expected codes"):
        embedder(codes[:, :4])
    with pytest.raises(ValueError, match="integers"):
        embedder(codes.float())


def test_depth_head_is_causal_over_slots() -> None:
    torch.manual_seed(0)
    head = DepthHead(CodeGroup("codes", 4, 9), HIDDEN, width=16, num_layers=2, num_heads=4)
    hidden = torch.randn(5, HIDDEN)
    codes = torch.randint(0, 9, (5, 4), generator=torch.Generator().manual_seed(2))
    base = head(hidden, codes)
    assert base.shape == (5, 4, 9)
    for slot in range(4):
        changed = codes.clone()
        changed[:, slot] = (changed[:, slot] + 1) % 9
        logits = head(hidden, changed)
        assert torch.equal(logits[:, : slot + 1], base[:, : slot + 1])
        if slot < 3:
            assert not torch.allclose(logits[:, slot + 1], base[:, slot + 1])


def test_next_logits_equals_the_teacher_forced_slice_exactly() -> None:
    heads = tiny_heads(num_layers=3)
    hidden = torch.randn(7, HIDDEN)
    codes = random_codes(GROUPS, 7, torch.Generator().manual_seed(3))
    logits = heads(hidden, codes)
    for head, part, group_logits in zip(
        heads.heads.values(), codes.split([group.depth for group in heads.groups], dim=1), logits
    ):
        for step in range(head.depth):
            assert torch.equal(head.next_logits(hidden, part[:, :step]), group_logits[:, step])
        with pytest.raises(ValueError, match="prefix"):
            head.next_logits(hidden, part)


def test_loss_is_the_mean_cross_entropy_over_all_slots() -> None:
    heads = tiny_heads()
    hidden = torch.randn(4, HIDDEN)
    codes = random_codes(GROUPS, 4, torch.Generator().manual_seed(4))
    pixel, semantic = heads(hidden, codes)
    assert pixel.shape == (4, 3, 5) and semantic.shape == (4, 2, 7)
    per_slot = []
    for logits, target in ((pixel, codes[:, :3]), (semantic, codes[:, 3:])):
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        per_slot.append(-log_probs.gather(-1, target[..., None]).squeeze(-1))
    expected = torch.cat(per_slot, dim=1).mean(dim=1)
    loss = heads.loss(hidden, codes)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected)
    with pytest.raises(ValueError, match="expected codes"):
        heads.loss(hidden, codes[:, :4])


def test_greedy_sampling_follows_next_logits() -> None:
    heads = tiny_heads()
    hidden = torch.randn(6, HIDDEN)
    slots: list[int] = []

    def greedy(logits: torch.Tensor, slot: int) -> torch.Tensor:
        assert logits.dtype == torch.float32
        slots.append(slot)
        return logits.argmax(-1)

    codes = heads.sample(hidden, greedy)
    assert codes.shape == (6, heads.depth) and codes.dtype == torch.long
    assert slots == list(range(heads.depth))
    start = 0
    for head in heads.heads.values():
        for step in range(head.depth):
            expected = head.next_logits(hidden, codes[:, start : start + step]).argmax(-1)
            assert torch.equal(codes[:, start + step], expected)
        start += head.depth
    # Greedy codes reproduce themselves under teacher forcing: each slot is the argmax of its logits.
    for part, logits in zip(
        codes.split([group.depth for group in heads.groups], dim=1), heads(hidden, codes)
    ):
        assert torch.equal(part, logits.argmax(-1))


def test_guidance_choice_is_shared_by_the_two_halves() -> None:
    heads = tiny_heads()
    cond, uncond = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)

    def guided(logits: torch.Tensor, slot: int) -> torch.Tensor:
        top, bottom = logits.chunk(2)
        return (bottom + 3.0 * (top - bottom)).argmax(-1).repeat(2)

    codes = heads.sample(torch.cat([cond, uncond]), guided)
    assert torch.equal(codes[:3], codes[3:])
    with pytest.raises(ValueError, match="choose returned"):
        heads.sample(cond, lambda logits, slot: logits.argmax(-1)[:1])


def test_gradients_reach_hidden_and_every_parameter() -> None:
    heads = tiny_heads()
    hidden = torch.randn(5, HIDDEN, requires_grad=True)
    codes = random_codes(GROUPS, 5, torch.Generator().manual_seed(5))
    heads.loss(hidden, codes).mean().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    for name, param in heads.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    embedder = CodeStackEmbedder(GROUPS, HIDDEN, embed_dim=4)
    embedder(codes).square().sum().backward()
    for name, param in embedder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_build_code_stack_structure() -> None:
    assert build_code_stack(VQConfig(), 32) is None
    unitok = VQConfig(kind="unitok", codebook_size=16, embed_dim=8, unitok=UniTokConfig(num_codebooks=4))
    built = build_code_stack(unitok, 32, width=24, num_layers=1)
    assert built is not None
    embedder, heads = built
    assert embedder.groups == heads.groups == [CodeGroup("codes", 4, 16)]
    assert list(heads.heads) == ["codes"] and len(heads.heads["codes"].blocks) == 1
    assert heads.heads["codes"].position.shape == (4, 24)
    assert embedder.embeddings[0].weight.shape == (16, 32)  # embed_dim defaults to the LM width
    built = build_code_stack(tiny_dualtoken_config(), 32, num_layers=1)
    assert built is not None
    embedder, heads = built
    assert list(heads.heads) == ["pixel", "semantic"] and heads.depth == embedder.depth == 5
    assert heads.heads["pixel"].blocks[0].attn.num_heads == 1  # width 32: one head of 32 channels
    codes = random_codes(heads.groups, 4, torch.Generator().manual_seed(6))
    assert embedder(codes).shape == (4, 32)
    assert heads.loss(torch.randn(4, 32), codes).shape == (4,)
    wide = build_code_stack(unitok, 200, num_layers=1, device="meta")
    assert wide is not None and wide[1].heads["codes"].blocks[0].attn.num_heads == 2  # 200 // 64 = 3 -> 2


def test_published_unitok_code_stack_size() -> None:
    built = build_code_stack(unitok_large_config(), 4096, width=4096, num_layers=3, device="meta")
    assert built is not None
    embedder, heads = built
    head_params = sum(param.numel() for param in heads.parameters())
    embed_params = sum(param.numel() for param in embedder.parameters())
    print(f"UniTok code stack at 4096: head {head_params / 1e6:.1f}M, embedder {embed_params / 1e6:.1f}M")
    assert head_params > 0 and embed_params > 0
    assert heads.heads["codes"].blocks[0].attn.num_heads == 64
