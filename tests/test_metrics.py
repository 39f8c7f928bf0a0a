"""Tests for ``lightning_sae.metrics``: each metric against a NumPy reference, batching and
DDP invariance (merged states and a real two-process gloo sync), and the edge cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn
from torchmetrics import Metric

from lightning_sae.metrics import (
    L0,
    L1,
    MSE,
    CosineSimilarity,
    DeadFraction,
    DenseFraction,
    ExplainedVariance,
    FeatureDensity,
    FractionOfVarianceUnexplained,
    RelativeReconstructionBias,
    log10_feature_density,
    reconstruction_metrics,
)

D = 6
D_SAE = 10
N = 20
DENSE_THRESHOLD = 0.1
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_batch(n: int = N, seed: int = 0) -> Batch:
    """Target, reconstruction and features [n, D_SAE] with exact zeros, two dead features
    (0 and 1), one always-on feature (2) and one feature firing on exactly one row (3)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, D, generator=g) * 2.0 + 3.0
    reconstruction = 0.8 * target + 0.3 * torch.randn(n, D, generator=g)
    features = torch.relu(torch.randn(n, D_SAE, generator=g) - 0.5)
    features[:, :2] = 0.0
    features[:, 2] = 1.0 + torch.rand(n, generator=g)
    features[:, 3] = 0.0
    features[0, 3] = 0.25
    return target, reconstruction, features


def np_inputs(batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, y_hat, f = (t.double().numpy() for t in batch)
    return y, y_hat, f


def ref_l0(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return float((f > 0).sum(axis=1).mean())


def ref_mse(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return float(((y - y_hat) ** 2).sum(axis=1).mean())


def ref_fvu(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(axis=0)) ** 2).sum())


def ref_explained_variance(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return 1.0 - ref_fvu(y, y_hat, f)


def ref_cosine(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    cos = (y * y_hat).sum(axis=1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(y_hat, axis=1))
    return float(cos.mean())


def ref_relative_bias(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return float((y_hat**2).sum() / (y_hat * y).sum())


def ref_l1(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return float(f.sum(axis=1).mean())


def ref_density(f: np.ndarray) -> np.ndarray:
    return np.asarray((f > 0).mean(axis=0), dtype=np.float64)


def ref_dead(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return float((ref_density(f) == 0).mean())


def ref_dense(y: np.ndarray, y_hat: np.ndarray, f: np.ndarray) -> float:
    return float((ref_density(f) > DENSE_THRESHOLD).mean())


Reference = Callable[[np.ndarray, np.ndarray, np.ndarray], float]
SCALAR_CASES: dict[str, tuple[Callable[[], Metric], Reference]] = {
    "l0": (L0, ref_l0),
    "mse": (MSE, ref_mse),
    "fvu": (FractionOfVarianceUnexplained, ref_fvu),
    "fvu_sized": (lambda: FractionOfVarianceUnexplained(D), ref_fvu),
    "explained_variance": (ExplainedVariance, ref_explained_variance),
    "cosine_similarity": (CosineSimilarity, ref_cosine),
    "relative_reconstruction_bias": (RelativeReconstructionBias, ref_relative_bias),
    "l1": (L1, ref_l1),
    "dead_fraction": (lambda: DeadFraction(D_SAE), ref_dead),
    "dense_fraction": (lambda: DenseFraction(D_SAE, DENSE_THRESHOLD), ref_dense),
}
ALL_FACTORIES: dict[str, Callable[[], Metric]] = {
    **{name: factory for name, (factory, _) in SCALAR_CASES.items()},
    "feature_density": lambda: FeatureDensity(D_SAE),
}


def update(metric: Metric, batch: Batch) -> None:
    target, reconstruction, features = batch
    metric.update(target=target, reconstruction=reconstruction, features=features)


def split(batch: Batch, sizes: list[int]) -> list[Batch]:
    parts = [torch.split(t, sizes) for t in batch]
    return [(a, b, c) for a, b, c in zip(*parts, strict=True)]


@pytest.mark.parametrize("name", list(SCALAR_CASES))
def test_scalar_metric_matches_reference(name: str) -> None:
    factory, reference = SCALAR_CASES[name]
    batch = make_batch()
    metric = factory()
    update(metric, batch)
    result = metric.compute()
    assert result.shape == () and result.dtype == torch.float32
    assert result.item() == pytest.approx(reference(*np_inputs(batch)), rel=1e-5, abs=1e-6)


def test_feature_density_matches_reference() -> None:
    batch = make_batch()
    metric = FeatureDensity(D_SAE)
    update(metric, batch)
    expected = torch.from_numpy(ref_density(np_inputs(batch)[2])).float()
    torch.testing.assert_close(metric.compute(), expected)


def test_l1_weighted_by_decoder_norms() -> None:
    target, reconstruction, features = make_batch()
    norms = torch.linspace(0.5, 2.0, D_SAE)
    metric = L1()
    metric.update(target, reconstruction, features, decoder_norms=norms)
    expected = (features.double() @ norms.double()).mean().item()
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_three_batches_equal_one_update(name: str) -> None:
    batch = make_batch()
    whole, batched = ALL_FACTORIES[name](), ALL_FACTORIES[name]()
    update(whole, batch)
    for part in split(batch, [3, 9, 8]):
        update(batched, part)
    torch.testing.assert_close(batched.compute(), whole.compute())


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_merged_halves_equal_whole(name: str) -> None:
    """What a DDP sum-reduction does: states of two ranks added, then ``compute``."""
    batch = make_batch()
    first_half, second_half = split(batch, [7, 13])
    whole, rank0, rank1 = (ALL_FACTORIES[name]() for _ in range(3))
    update(whole, batch)
    update(rank0, first_half)
    update(rank1, second_half)
    rank0.merge_state(rank1)
    torch.testing.assert_close(rank0.compute(), whole.compute())


def test_fvu_is_whole_set_not_mean_of_batches() -> None:
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(50, D, generator=g) * 5.0
    narrow = 20.0 + 0.1 * torch.randn(50, D, generator=g)
    batches = [(y, y + 0.5 * torch.randn(50, D, generator=g)) for y in (wide, narrow)]
    features = torch.ones(50, D_SAE)

    f = features.numpy()
    per_batch = [ref_fvu(y.double().numpy(), y_hat.double().numpy(), f) for y, y_hat in batches]
    y_all = torch.cat([y for y, _ in batches]).double().numpy()
    y_hat_all = torch.cat([y_hat for _, y_hat in batches]).double().numpy()
    whole_set = ref_fvu(y_all, y_hat_all, f)
    assert abs(np.mean(per_batch) - whole_set) > 1.0  # the pitfall is real on this data

    metric = FractionOfVarianceUnexplained()
    for y, y_hat in batches:
        metric.update(y, y_hat, features)
    assert metric.compute().item() == pytest.approx(whole_set, rel=1e-5)


def test_fvu_survives_large_mean() -> None:
    """float64 accumulators: a mean 1e4 times the spread still gives the right variance."""
    g = torch.Generator().manual_seed(2)
    y = 1e4 + torch.randn(1000, D, generator=g)
    y_hat = y + 0.1 * torch.randn(1000, D, generator=g)
    features = torch.ones(1000, 1)
    metric = FractionOfVarianceUnexplained()
    for part in split((y, y_hat, features), [100] * 10):
        update(metric, part)
    expected = ref_fvu(y.double().numpy(), y_hat.double().numpy(), features.numpy())
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_relative_reconstruction_bias_is_the_scale(scale: float) -> None:
    target, _, features = make_batch()
    metric = RelativeReconstructionBias()
    metric.update(target, scale * target, features)
    assert metric.compute().item() == pytest.approx(scale, rel=1e-6)


def test_l0_counts_exact_zeros_as_inactive() -> None:
    features = torch.tensor([[0.0, 1e-30, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 0.0]])
    target = torch.zeros(3, 2)
    metric = L0()
    metric.update(target, target, features)
    assert metric.compute().item() == pytest.approx((2 + 0 + 3) / 3)


def test_dead_and_dense_fractions_on_constructed_features() -> None:
    # 10 rows; feature i fires on the first `fires[i]` rows: densities 0, 0.1, 0.2, 0.3, 1.
    fires = [0, 1, 2, 3, 10]
    features = torch.zeros(10, 5)
    for feature, n_rows in enumerate(fires):
        features[:n_rows, feature] = 0.5
    features[5:, 0] = -1.0  # negative pre-activations are not firing either
    target = torch.zeros(10, 2)
    density, dead, dense = FeatureDensity(5), DeadFraction(5), DenseFraction(5)
    loose = DenseFraction(5, threshold=0.25)
    for metric in (density, dead, dense, loose):
        metric.update(target, target, features)
    torch.testing.assert_close(density.compute(), torch.tensor([0.0, 0.1, 0.2, 0.3, 1.0]))
    assert dead.compute().item() == pytest.approx(1 / 5)
    assert dense.compute().item() == pytest.approx(3 / 5)  # 0.2, 0.3, 1 > 0.1; 0.1 is not
    assert loose.compute().item() == pytest.approx(2 / 5)  # 0.3, 1 > 0.25


def test_cosine_similarity_of_zero_vector_is_zero() -> None:
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    reconstruction = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    metric = CosineSimilarity()
    metric.update(target, reconstruction, torch.zeros(2, 1))
    assert metric.compute().item() == pytest.approx(0.5)


def test_low_precision_inputs() -> None:
    batch = make_batch()
    half = (batch[0].bfloat16(), batch[1].bfloat16(), batch[2].bfloat16())
    for name, (factory, reference) in SCALAR_CASES.items():
        metric = factory()
        update(metric, half)
        expected = reference(*np_inputs(half))
        assert metric.compute().item() == pytest.approx(expected, rel=1e-4, abs=1e-6), name


def test_log10_feature_density() -> None:
    density = torch.tensor([0.0, 1e-3, 1.0])
    torch.testing.assert_close(log10_feature_density(density), torch.tensor([-10.0, -3.0, 0.0]))
    assert log10_feature_density(density, eps=1e-6)[0].item() == pytest.approx(-6.0)


def test_collection_matches_individual_metrics() -> None:
    batch = make_batch()
    norms = torch.linspace(0.5, 2.0, D_SAE)
    collection = reconstruction_metrics(D_SAE, prefix="val/")
    for part in split(batch, [10, 10]):
        target, reconstruction, features = part
        collection.update(
            target=target, reconstruction=reconstruction, features=features, decoder_norms=norms
        )
    results = collection.compute()
    assert set(results) == {
        f"val/{name}"
        for name in (
            "l0",
            "mse",
            "fvu",
            "cosine_similarity",
            "relative_reconstruction_bias",
            "l1",
            "dead_fraction",
            "dense_fraction",
        )
    }
    y, y_hat, f = np_inputs(batch)
    expected = {name: reference(y, y_hat, f) for name, (_, reference) in SCALAR_CASES.items()}
    expected["l1"] = float((f @ norms.double().numpy()).mean())
    for key, value in results.items():
        name = key.removeprefix("val/")
        assert value.item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert ["dead_fraction", "dense_fraction"] in collection.compute_groups.values()


def test_collection_forward_gives_batch_values_and_accumulates() -> None:
    batch = make_batch()
    collection = reconstruction_metrics(D_SAE, prefix="")
    for part in split(batch, [12, 8]):
        batch_values = collection(target=part[0], reconstruction=part[1], features=part[2])
    for name, value in batch_values.items():
        expected = SCALAR_CASES[name][1](*np_inputs(part))
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    for name, value in collection.compute().items():
        expected = SCALAR_CASES[name][1](*np_inputs(batch))
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), name


def test_invalid_inputs_raise() -> None:
    target, reconstruction, features = make_batch()
    with pytest.raises(ValueError, match="target and reconstruction"):
        MSE().update(target, reconstruction[:, :-1], features)
    with pytest.raises(ValueError, match="features"):
        L0().update(target, reconstruction, features[:-1])
    with pytest.raises(ValueError, match="d_sae"):
        FeatureDensity(D_SAE + 1).update(target, reconstruction, features)
    with pytest.raises(ValueError, match="expected"):
        FractionOfVarianceUnexplained(D + 1).update(target, reconstruction, features)
    with pytest.raises(ValueError, match="decoder_norms"):
        L1().update(target, reconstruction, features, decoder_norms=torch.ones(D_SAE + 1))
    with pytest.raises(ValueError, match="threshold"):
        DenseFraction(D_SAE, threshold=1.0)


def _ddp_worker(rank: int, init_file: str) -> None:
    """One of two gloo ranks: update on this rank's uneven shard, compute (which syncs)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        batch = make_batch()
        shard = split(batch, [7, 13])[rank]
        collection = reconstruction_metrics(D_SAE, prefix="", d_target=D)
        density = FeatureDensity(D_SAE)
        lazy_fvu = FractionOfVarianceUnexplained()
        collection.update(target=shard[0], reconstruction=shard[1], features=shard[2])
        for metric in (density, lazy_fvu):
            update(metric, shard)

        y, y_hat, f = np_inputs(batch)
        for name, value in collection.compute().items():
            expected = SCALAR_CASES[name][1](y, y_hat, f)
            assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), name
        assert lazy_fvu.compute().item() == pytest.approx(ref_fvu(y, y_hat, f), rel=1e-5)
        torch.testing.assert_close(density.compute(), torch.from_numpy(ref_density(f)).float())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_sync_with_two_gloo_processes(tmp_path: Path) -> None:
    spawn(_ddp_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def test_metrics_that_agree_on_a_first_batch_stay_apart() -> None:
    """A first batch where no feature fires gives L0, L1 and cosine similarity the same (zero)
    states; they must still be computed separately afterwards."""
    collection = reconstruction_metrics(4, prefix="")
    y = torch.randn(8, 3)
    collection.update(y, torch.zeros(8, 3), torch.zeros(8, 4), decoder_norms=torch.ones(4))
    features = torch.tensor([[2.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    collection.update(y, y, features, decoder_norms=torch.full((4,), 3.0))
    results = collection.compute()
    assert results["l0"].item() == pytest.approx(0.5)
    assert results["l1"].item() == pytest.approx(3.0)
    assert results["cosine_similarity"].item() == pytest.approx(0.5)
