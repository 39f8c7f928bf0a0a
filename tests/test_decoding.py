import pytest
import torch

from lightning_sae.decoding import GATHER_BELOW_K_OVER_M, decode_selected, dense_decode, gather_decode, gathers


def _inputs(rows: int = 16, k: int = 5, d_sae: int = 40, d_out: int = 7, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, k, generator=generator, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(d_sae, generator=generator)[:k] for _ in range(rows)])
    weight = torch.randn(d_sae, d_out, generator=generator, dtype=torch.float64, requires_grad=True)
    return values, indices, weight


def test_gathered_decoding_equals_the_dense_product_in_values_and_gradients() -> None:
    values, indices, weight = _inputs()
    grad = torch.randn(16, 7, dtype=torch.float64)
    results = []
    for decode in (gather_decode, dense_decode):
        out = decode(values, indices, weight)
        results.append((out, *torch.autograd.grad(out, (values, weight), grad)))
    for gathered, dense in zip(*results):
        torch.testing.assert_close(gathered, dense)


def test_gathered_decoding_keeps_leading_dimensions_and_accumulates_in_the_weight_dtype() -> None:
    values, indices, weight = _inputs(rows=6)
    out = gather_decode(values.reshape(2, 3, 5), indices.reshape(2, 3, 5), weight)
    torch.testing.assert_close(out.reshape(6, 7), dense_decode(values, indices, weight))
    out.sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float64


def test_auto_decoding_gathers_only_for_few_features_per_row_and_more_readily_on_a_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    d_sae = 4096
    k_cpu, k_cuda = int(GATHER_BELOW_K_OVER_M["cpu"] * d_sae), int(GATHER_BELOW_K_OVER_M["cuda"] * d_sae)
    assert k_cuda < k_cpu
    assert gathers("auto", k_cpu, d_sae, cpu) and not gathers("auto", k_cpu + 1, d_sae, cpu)
    assert gathers("auto", k_cuda, d_sae, cuda) and not gathers("auto", k_cuda + 1, d_sae, cuda)
    assert not gathers("auto", 1, d_sae, torch.device("meta"))
    assert gathers("sparse", d_sae, d_sae, cpu) and not gathers("dense", 1, d_sae, cpu)


@pytest.mark.parametrize("decoding", ["auto", "dense", "sparse"])
def test_every_decoding_choice_gives_the_same_sum(decoding: str) -> None:
    values, indices, weight = _inputs()
    expected = dense_decode(values, indices, weight)
    torch.testing.assert_close(decode_selected(values, indices, weight, decoding), expected)
