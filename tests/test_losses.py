"""InfoNCELoss against a reference built with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from search.train.losses import InfoNCELoss


def _reference(
    q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, temperature: float, sim: str
) -> float:
    """Mean over queries of -log softmax(own positive) among all positives and negatives."""
    candidates = list(p) + (list(n) if n is not None else [])

    def score(a: torch.Tensor, b: torch.Tensor) -> float:
        dot = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
        if sim == "cos":
            norm_a = math.sqrt(sum(float(x) ** 2 for x in a))
            norm_b = math.sqrt(sum(float(y) ** 2 for y in b))
            dot /= norm_a * norm_b
        return dot / temperature

    total = 0.0
    for i, query in enumerate(q):
        logits = [score(query, c) for c in candidates]
        log_z = math.log(sum(math.exp(s) for s in logits))
        total += log_z - logits[i]
    return total / len(q)


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("n_neg", [0, 1, 3])
def test_loss_equals_loop_reference(similarity: str, n_neg: int) -> None:
    gen = torch.Generator().manual_seed(n_neg)
    batch, dim, temperature = 5, 8, 0.1 if similarity == "cos" else 2.0
    q = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    p = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    n = torch.randn(batch * n_neg, dim, generator=gen, dtype=torch.float64) if n_neg else None
    loss = InfoNCELoss(temperature, similarity=similarity)  # type: ignore[arg-type]
    expected = _reference(q, p, n, temperature, similarity)
    assert loss(q, p, n).item() == pytest.approx(expected, rel=1e-5)


def test_loss_equals_cross_entropy_on_hand_built_logits() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # query 1's positive is orthogonal to it
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # Row i: cos(q_i, [p_0, p_1, n_0, n_1]) / 0.5, target column i.
    logits = torch.tensor([[0.6, 1.0, 0.0, 1.0], [0.8, 0.0, 1.0, 0.0]]) / 0.5
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert InfoNCELoss(0.5)(q, p, n).item() == pytest.approx(expected.item(), rel=1e-6)


def test_temperature_scales_the_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    # dot similarity: temperature t on (q, p) equals temperature 1 on (q / t, p).
    assert InfoNCELoss(0.25, similarity="dot")(q, p).item() == pytest.approx(
        InfoNCELoss(1.0, similarity="dot")(q / 0.25, p).item(), rel=1e-5
    )
    # A lower temperature sharpens: a well-separated batch gets a smaller loss.
    q = torch.eye(3)
    p = torch.eye(3) + 0.1
    assert InfoNCELoss(0.05)(q, p).item() < InfoNCELoss(0.5)(q, p).item()


def test_cos_ignores_norms_dot_does_not() -> None:
    gen = torch.Generator().manual_seed(1)
    q, p = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    assert InfoNCELoss(similarity="cos")(3 * q, p).item() == pytest.approx(
        InfoNCELoss(similarity="cos")(q, p).item(), rel=1e-5
    )
    assert InfoNCELoss(similarity="dot")(3 * q, p).item() != pytest.approx(
        InfoNCELoss(similarity="dot")(q, p).item(), rel=1e-3
    )


def test_gradients_flow_to_all_inputs() -> None:
    q = torch.randn(3, 4, requires_grad=True)
    p = torch.randn(3, 4, requires_grad=True)
    n = torch.randn(6, 4, requires_grad=True)
    InfoNCELoss()(q, p, n).backward()
    for t in (q, p, n):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_bf16_inputs_give_float32_loss() -> None:
    q, p = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    assert InfoNCELoss()(q, p).dtype == torch.float32


def test_get_config_dict() -> None:
    assert InfoNCELoss(0.02, similarity="dot").get_config_dict() == {
        "temperature": 0.02,
        "similarity": "dot",
    }
    assert InfoNCELoss().get_config_dict() == {"temperature": 0.05, "similarity": "cos"}


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.0}, {"temperature": -1.0}, {"similarity": "l2"}]
)
def test_bad_arguments_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        InfoNCELoss(**kwargs)  # type: ignore[arg-type]


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        InfoNCELoss()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError):
        InfoNCELoss()(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5))


def test_cached_infonce_matches_infonce_on_a_linear_encoder() -> None:
    from search.train.losses import CachedInfoNCELoss

    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 8)

    def encoder(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (table(ids) * mask.unsqueeze(-1)).sum(1)

    q = (torch.randint(0, 50, (6, 5)), torch.ones(6, 5, dtype=torch.long))
    p = (torch.randint(0, 50, (12, 7)), torch.ones(12, 7, dtype=torch.long))
    plain = InfoNCELoss(0.1)(encoder(*q), encoder(*p)[:6], encoder(*p)[6:])
    plain.backward()
    expected = table.weight.grad.clone()
    table.weight.grad = None
    cached = CachedInfoNCELoss(encoder, 0.1, mini_batch_size=4)
    loss = cached(q, p)
    assert table.weight.grad is None  # nothing reaches the encoder before backward()
    (2.0 * loss).backward()  # a loss scale reaches the re-encoded mini-batches
    torch.testing.assert_close(loss, plain.detach())
    torch.testing.assert_close(table.weight.grad, 2.0 * expected)
    with torch.no_grad():
        torch.testing.assert_close(cached(q, p), plain.detach())
    assert cached.get_config_dict()["mini_batch_size"] == 4
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedInfoNCELoss(encoder, 0.1, mini_batch_size=0)
