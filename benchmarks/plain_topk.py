"""The reference the recipes are measured against: a TopK SAE trained by a plain PyTorch loop.

What a researcher writes in forty lines (Gao et al. 2024, as in their released code): encode
x − b_dec, keep the k largest pre-activations (ReLU'd), decode with unit-norm decoder rows,
Adam on the summed squared error, the decoder gradient's component along each row removed and
the rows renormalised after every step. b_dec starts at the mean of the first batch, W_dec at
random unit rows, W_enc at W_decᵀ. No Lightning, no callbacks, no scaling of the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PlainTopK:
    """The trained weights: f = TopK_k((x − b_dec)·W_enc + b_enc), x̂ = f·W_dec + b_dec."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    k: int

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        pre_acts = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre_acts.topk(self.k, dim=-1)
        return torch.zeros_like(pre_acts).scatter(-1, top.indices, top.values.relu())

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return self.encode(x) @ self.W_dec + self.b_dec


def train_plain_topk(
    batches: Iterator[Tensor], d_sae: int, k: int, steps: int, lr: float = 2e-3, seed: int = 0
) -> PlainTopK:
    """Train on ``steps`` batches [B, d] from ``batches``, on their device; the first one also sets b_dec."""
    generator = torch.Generator().manual_seed(seed)
    first = next(batches).float()
    d_in = first.shape[1]
    W_dec = F.normalize(torch.randn(d_sae, d_in, generator=generator), dim=-1).to(first.device).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(d_sae, device=first.device, requires_grad=True)
    b_dec = first.mean(0).requires_grad_()
    optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
    for _ in range(steps):
        x = next(batches).float()
        pre_acts = (x - b_dec) @ W_enc + b_enc
        top = pre_acts.topk(k, dim=-1)
        features = torch.zeros_like(pre_acts).scatter(-1, top.indices, top.values.relu())
        loss = (features @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
        optimizer.step()
        with torch.no_grad():
            W_dec.copy_(F.normalize(W_dec, dim=-1))
    return PlainTopK(*(tensor.detach() for tensor in (W_enc, b_enc, W_dec, b_dec)), k=k)
