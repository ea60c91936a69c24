"""Count what one BERT layer stores for its backward pass, padded and padding-free (issue 19).

A tiny BertModel in train mode (dropout on) runs one forward under
``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves is recorded once per
storage (views of one tensor count once; parameters and their autocast copies are left out).
The layer's stored bytes at two lengths ``s`` split into a per-token part (``b*s``) and a
per-attention-element part (``a*b*s^2``); the per-token part is printed in ``h``-sized
elements of the run's element size (4 in fp32, 2 under bf16 autocast) after the feed-forward's
two ``f``-sized tensors and the two dropout masks (``search.memory.estimate``'s formula), the
attention part in bytes per element. Paths:

* ``padded``: transformers' forward (SDPA attention, what ``padding_free: false`` and the
  fail-fast step run);
* ``padding-free``: ``search.train.unpadded.packed_forward`` (what the other steps run), one
  packed pass over the batch, rows full (the worst case).

Run::

    python bench/count_saved_tensors.py            # fp32 and bf16 autocast, both paths
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import BertConfig  # noqa: E402
from transformers import BertModel  # noqa: E402

from search.train import unpadded  # noqa: E402

H, A, F, LAYERS = 64, 4, 256, 2  # hidden, heads, feed-forward, layers


def _model() -> BertModel:
    config = BertConfig(
        hidden_size=H,
        num_attention_heads=A,
        intermediate_size=F,
        num_hidden_layers=LAYERS,
        vocab_size=1000,
        max_position_embeddings=160,  # no weight shares a shape with a (tokens, h) activation
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).train()


def saved_bytes(model: BertModel, batch: int, seq: int, *, padding_free: bool, amp: bool) -> int:
    """Bytes autograd saves in one forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # Leave out parameters, autocast's casts of them and the padding-free layer's
        # concatenated QKV weight: a weight's shape, not per token.
        if ptr not in params and tuple(t.shape) not in weights and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    weights |= {(3 * H, H), (H, 3 * H)} | {w[::-1] for w in weights}
    ids = torch.randint(5, 1000, (batch, seq))
    mask = torch.ones_like(ids)
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if amp
        else torch.autocast("cpu", enabled=False)
    )
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if padding_free:
            packed = unpadded.pack([(ids, mask)])
            out = unpadded.packed_forward(model, packed)
        else:
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    del out
    return sum(seen.values())


def per_layer(batch: int, seq: int, *, padding_free: bool, amp: bool) -> tuple[float, float]:
    """One layer's stored bytes: the model's with LAYERS layers minus the one with one layer."""
    model = _model()
    full = saved_bytes(model, batch, seq, padding_free=padding_free, amp=amp)
    model.encoder.layer = model.encoder.layer[:1]
    one = saved_bytes(model, batch, seq, padding_free=padding_free, amp=amp)
    return (full - one) / (LAYERS - 1), one - (full - one)  # layer, embeddings (+ outside)


def constants(*, padding_free: bool, amp: bool) -> tuple[float, float, float]:
    """(h-sized elements per token, bytes per attention element, embedding bytes per token)."""
    b, s1, s2 = 8, 64, 128
    l1, _ = per_layer(b, s1, padding_free=padding_free, amp=amp)
    l2, e2 = per_layer(b, s2, padding_free=padding_free, amp=amp)
    # layer = t*b*s + u*a*b*s^2: solve for t (bytes per token) and u (bytes per element)
    u = (l2 / (b * s2) - l1 / (b * s1)) / (A * (s2 - s1))
    t = l1 / (b * s1) - u * A * s1
    elem = 2 if amp else 4
    # the formula's (n*h + 2f)*e + 2*h*m: the two dropout masks are bool (m=1) in the
    # padding-free layer, of the element size in transformers' (m=e)
    mask = 1 if padding_free else elem
    n = (t - 2 * F * elem - 2 * H * mask) / (H * elem)
    return n, u, e2 / (b * s2)


def main() -> None:
    b, s1, s2 = 8, 64, 128
    print(f"tiny BERT h={H} a={A} f={F}, batch {b}, lengths {s1} and {s2}, dropout on")
    print(
        f"{'path':<13} {'dtype':<5} {'h-elems/token':>13} {'attn B/elem':>11} "
        f"{'embed B/token':>13}"
    )
    for padding_free in (False, True):
        for amp in (False, True):
            n, u, emb = constants(padding_free=padding_free, amp=amp)
            name = "padding-free" if padding_free else "padded"
            print(f"{name:<13} {'bf16' if amp else 'fp32':<5} {n:>13.2f} {u:>11.2f} {emb:>13.1f}")


if __name__ == "__main__":
    main()
