"""narrow_band_mse against a float64 numpy reference; masking, empty masks and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodeseg.losses import balanced_mean, narrow_band_mse, narrow_band_sums


def _reference(
    pred: np.ndarray, true: np.ndarray, valid: np.ndarray | None, width: float
) -> tuple[float, np.ndarray]:
    """Pooled and per-sample valid-pixel means, written out with explicit loops over samples."""
    pred, true = pred.astype(np.float64), true.astype(np.float64)
    v = np.ones_like(pred, dtype=bool) if valid is None else valid.astype(bool)
    sq = (np.tanh(pred / width) - np.tanh(true / width)) ** 2
    per_sample = np.array([sq[b][v[b]].mean() if v[b].any() else 0.0 for b in range(pred.shape[0])])
    pooled = sq[v].sum() / max(int(v.sum()), 1)
    return float(pooled), per_sample


def _inputs(seed: int, shape: tuple[int, ...] = (3, 1, 9, 11)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pred = rng.normal(0, 3, shape).astype(np.float32)
    true = rng.normal(0, 3, shape).astype(np.float32)
    valid = np.zeros(shape, dtype=bool)
    valid[0] = True
    valid[1, :, :6, :8] = True  # padded on two sides, as a crop would be
    valid[2] = rng.random(shape[1:]) < 0.3
    return pred, true, valid


@pytest.mark.parametrize("width", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("use_valid", [False, True])
def test_matches_numpy_reference(width: float, use_valid: bool) -> None:
    pred, true, valid = _inputs(0)
    v = valid if use_valid else None
    pooled, per_sample = _reference(pred, true, v, width)
    tv = torch.from_numpy(v) if v is not None else None
    got = narrow_band_mse(torch.from_numpy(pred), torch.from_numpy(true), tv, width)
    assert got.shape == () and got.dtype == torch.float32
    assert float(got) == pytest.approx(pooled, rel=1e-5)
    got_none = narrow_band_mse(torch.from_numpy(pred), torch.from_numpy(true), tv, width, reduction="none")
    assert got_none.shape == (3,)
    np.testing.assert_allclose(got_none.numpy(), per_sample, rtol=1e-5)
    if use_valid:  # pooled ≠ mean of per-sample means when counts differ: the pooling is real
        assert abs(pooled - per_sample.mean()) > 1e-3
    # float valid masks (0/1) behave like bool ones
    if v is not None:
        got_f = narrow_band_mse(
            torch.from_numpy(pred), torch.from_numpy(true), torch.from_numpy(v.astype(np.float32)), width
        )
        assert float(got_f) == pytest.approx(float(got), rel=1e-6)


def test_masked_pixels_change_nothing_and_get_no_gradient() -> None:
    pred, true, valid = _inputs(1)
    tv = torch.from_numpy(valid)
    p1 = torch.from_numpy(pred).requires_grad_()
    loss1 = narrow_band_mse(p1, torch.from_numpy(true), tv)
    loss1.backward()
    # garbage (including NaN and inf) on the padded pixels of both φ
    pred2, true2 = pred.copy(), true.copy()
    pred2[~valid] = np.nan
    true2[~valid] = np.inf
    pred2.flat[np.flatnonzero(~valid)[::2]] = 1e6
    p2 = torch.from_numpy(pred2).requires_grad_()
    loss2 = narrow_band_mse(p2, torch.from_numpy(true2), tv)
    loss2.backward()
    assert torch.isfinite(loss2) and loss2.item() == loss1.item()
    assert p1.grad is not None and p2.grad is not None
    assert torch.equal(p1.grad, p2.grad)
    assert bool((p2.grad[~tv] == 0).all())
    assert float(p2.grad[tv].abs().max()) > 0
    # per-sample reduction: a sample's masked pixels don't leak either
    l_none = narrow_band_mse(p2, torch.from_numpy(true2), tv, reduction="none")
    assert bool(torch.isfinite(l_none).all())


def test_all_invalid_gives_zero_not_nan() -> None:
    pred, true, _ = _inputs(2)
    p = torch.from_numpy(pred).requires_grad_()
    none_valid = torch.zeros(pred.shape, dtype=torch.bool)
    loss = narrow_band_mse(p, torch.from_numpy(true), none_valid)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert p.grad is not None and bool((p.grad == 0).all())
    # one sample entirely padded: its per-sample loss is 0, the others are unaffected
    valid = torch.ones(pred.shape, dtype=torch.bool)
    valid[1] = False
    per = narrow_band_mse(p, torch.from_numpy(true), valid, reduction="none")
    assert per[1].item() == 0.0 and bool((per[[0, 2]] > 0).all())
    full = narrow_band_mse(p, torch.from_numpy(true), reduction="none")
    assert torch.allclose(per[[0, 2]], full[[0, 2]])


def test_identical_phi_gives_zero() -> None:
    pred, _, valid = _inputs(3)
    t = torch.from_numpy(pred)
    assert float(narrow_band_mse(t, t.clone(), torch.from_numpy(valid))) == 0.0


def test_gradcheck_float64() -> None:
    pred, true, valid = _inputs(4, (3, 1, 4, 5))
    p = torch.from_numpy(pred.astype(np.float64)).requires_grad_()
    t = torch.from_numpy(true.astype(np.float64)).requires_grad_()
    tv = torch.from_numpy(valid)
    assert torch.autograd.gradcheck(lambda a, b: narrow_band_mse(a, b, tv, 1.5), (p, t))
    assert torch.autograd.gradcheck(lambda a, b: narrow_band_mse(a, b, tv, 0.7, reduction="none"), (p, t))
    assert torch.autograd.gradcheck(lambda a, b: narrow_band_mse(a, b, None, 1.0), (p, t))


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5)), {}, "phi_true"),
        ((torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)), {}, "phi_pred"),
        ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)), {}, "phi_pred"),
        ((torch.zeros(2, 1, 4, 4), np.zeros((2, 1, 4, 4))), {}, "phi_true"),
        ((torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(2, 1, 4, 4)), {}, "phi_pred"),
        ((torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)), {"valid": torch.ones(2, 1, 4, 3)}, "valid"),
        ((torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)), {"valid": np.ones((2, 1, 4, 4))}, "valid"),
        ((torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)), {"width": 0.0}, "width"),
        ((torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)), {"reduction": "max"}, "reduction"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'"):
        narrow_band_mse(*args, **kwargs)


def test_sum_reduction_over_valid_pixels_divides_into_the_mean() -> None:
    """'sum' is what data-parallel training divides by the global batch's valid count."""
    g = torch.Generator().manual_seed(3)
    pred, true = torch.randn(3, 1, 5, 5, generator=g), torch.randn(3, 1, 5, 5, generator=g)
    valid = torch.rand(3, 1, 5, 5, generator=g) > 0.3
    total = narrow_band_mse(pred, true, valid, width=2.0, reduction="sum")
    mean = narrow_band_mse(pred, true, valid, width=2.0)
    torch.testing.assert_close(total / valid.sum(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(narrow_band_mse(pred, true, None, reduction="sum"),
                               narrow_band_mse(pred, true).mul(75), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------- class-balanced loss


def _balanced_reference(pred: np.ndarray, true: np.ndarray, valid: np.ndarray, width: float) -> float:
    sq = (np.tanh(pred / width) - np.tanh(true / width)) ** 2
    inside, outside = valid & (true < 0), valid & (true >= 0)
    if inside.any() and outside.any():
        return 0.5 * sq[inside].mean() + 0.5 * sq[outside].mean()
    return sq[inside | outside].mean()


@pytest.mark.parametrize("width", [1.0, 3.0])
def test_balanced_loss_is_half_the_mean_inside_plus_half_outside(width: float) -> None:
    rng = np.random.default_rng(3)
    true = rng.normal(2.0, 3.0, (3, 1, 9, 11))
    pred = rng.normal(0.0, 3.0, true.shape)
    valid = rng.random(true.shape) > 0.2
    got = narrow_band_mse(torch.from_numpy(pred), torch.from_numpy(true), torch.from_numpy(valid), width=width,
                          balance=True)
    assert float(got) == pytest.approx(_balanced_reference(pred, true, valid, width), rel=1e-12)
    per = narrow_band_mse(torch.from_numpy(pred), torch.from_numpy(true), torch.from_numpy(valid), width=width,
                          reduction="none", balance=True)
    for i in range(3):
        assert float(per[i]) == pytest.approx(_balanced_reference(pred[i], true[i], valid[i], width), rel=1e-12)


def test_balanced_loss_with_one_class_is_its_plain_mean() -> None:
    true = torch.full((2, 1, 4, 4), 5.0, dtype=torch.float64)  # no object anywhere
    pred = torch.linspace(-3, 3, 32, dtype=torch.float64).reshape(2, 1, 4, 4)
    assert float(narrow_band_mse(pred, true, balance=True)) == pytest.approx(float(narrow_band_mse(pred, true)))


def test_balanced_sums_of_two_halves_give_the_whole_batchs_balanced_mean() -> None:
    # what data-parallel training relies on: per-rank sums and counts, added, give one process's loss
    rng = np.random.default_rng(4)
    true = torch.from_numpy(rng.normal(1.0, 2.0, (4, 1, 6, 6)))
    pred = torch.from_numpy(rng.normal(0.0, 2.0, (4, 1, 6, 6)))
    whole = narrow_band_mse(pred, true, balance=True)
    parts = [narrow_band_sums(pred[i : i + 2], true[i : i + 2]) for i in (0, 2)]
    s_in, s_out, n_in, n_out = (sum(p[k] for p in parts) for k in range(4))
    assert float(balanced_mean(s_in, s_out, n_in, n_out)) == pytest.approx(float(whole), rel=1e-12)


def test_balanced_loss_refuses_a_sum_reduction() -> None:
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="narrow_band_sums"):
        narrow_band_mse(x, x, reduction="sum", balance=True)


def test_balanced_gradient_passes_gradcheck() -> None:
    rng = np.random.default_rng(5)
    true = torch.from_numpy(rng.normal(0.5, 2.0, (2, 1, 5, 5)))
    pred = torch.from_numpy(rng.normal(0.0, 2.0, (2, 1, 5, 5))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: narrow_band_mse(p, true, width=2.0, balance=True), (pred,))
