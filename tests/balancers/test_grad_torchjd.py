"""Agreement with TorchJD's implementation of the same methods (skipped without torchjd).

Where the definitions differ, the matching configuration is tested:

* MGDA: TorchJD has no gradient normalisation (ours: ``normalization="none"``) and stops
  Frank-Wolfe at a tolerance; it is run here to a tight one (ours is exact).
* PCGrad: TorchJD draws its orders from the global generator; with two tasks the order does
  not matter.
* CAGrad: TorchJD does not rescale (ours: ``rescale=0``); needs cvxpy (``torchjd[cagrad]``).
* UPGrad: TorchJD normalises G by its trace and adds 1e-4 I, as ours with ``reg_eps=1e-4``;
  inputs have trace above TorchJD's 1e-4 threshold.
* Nash-MTL: TorchJD keeps solver state, needs cvxpy + ECOS (``torchjd[nash_mtl]``) and stops its
  sequential convex programme when the iterate moves by less than 1e-6; that stop is tightened
  here, as MGDA's tolerance is (ours solves the condition to machine precision).
* GradDrop: TorchJD draws U from the global generator; it is given ours.
* GradVac: TorchJD treats the whole model as one group with its own random orders; two tasks,
  ``group="whole"``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _inputs import conflicting_jacobian, random_jacobian, run

from mtlkit.balancers._gramian import IMTL, AlignedMTL, CAGrad, NashMTL, UPGrad
from mtlkit.balancers._mgda import MGDA
from mtlkit.balancers._surgery import GradDrop, GradVac, PCGrad
from mtlkit.balancers._torchjd import TorchJDWeighting

agg = pytest.importorskip("torchjd.aggregation")


def _cvxpy_importable() -> bool:
    try:
        import cvxpy  # noqa: F401
        import ecos  # noqa: F401
    except ImportError:
        return False
    return True


# installed by the project's ``torchjd`` extra; skipped only where cvxpy cannot be imported
needs_cvxpy = pytest.mark.skipif(
    not _cvxpy_importable(), reason="needs cvxpy + ECOS (torchjd[cagrad,nash_mtl])"
)
RTOL = 1e-4


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def jacobians(n: int = 6):
    for seed in range(n):
        k = 2 + seed % 4
        strength = (0.3, 0.8, 1.3, 1.7)[seed % 4]
        yield conflicting_jacobian(k, 3 * k + 2, seed=seed, strength=strength)


def ours(balancer, jac) -> tuple[torch.Tensor, torch.Tensor]:
    d, step = run(balancer, jac, dtype=torch.float64)
    return d, step.weight_tensor


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b.to(a.dtype), rtol=RTOL, atol=RTOL * float(b.abs().max()))


def test_mgda():
    for jac in jacobians():
        d, _ = ours(MGDA(names(jac.shape[0])), jac)
        w = agg.MGDAWeighting(epsilon=1e-12, max_iters=20000)(jac @ jac.T)
        close(d, w @ jac)


def test_pcgrad_two_tasks():
    for seed in range(5):
        jac = conflicting_jacobian(2, 6, seed=seed, strength=1.5)
        _, w = ours(PCGrad(["a", "b"]), jac)
        close(w, agg.PCGradWeighting()(jac @ jac.T))


def test_imtl_g():
    for jac in jacobians():
        _, w = ours(IMTL(names(jac.shape[0])), jac)
        close(w, agg.IMTLGWeighting()(jac @ jac.T))


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl(mode):
    for jac in jacobians():
        _, w = ours(AlignedMTL(names(jac.shape[0]), scale_mode=mode), jac)
        close(w, agg.AlignedMTLWeighting(scale_mode=mode)(jac @ jac.T))


def test_upgrad():
    for jac in jacobians():
        _, w = ours(UPGrad(names(jac.shape[0]), reg_eps=1e-4), jac)
        close(w, agg.UPGradWeighting()(jac @ jac.T))


@needs_cvxpy
def test_cagrad():
    for jac in jacobians():
        d, _ = ours(CAGrad(names(jac.shape[0]), c=0.4, rescale=0), jac)
        w = agg.CAGradWeighting(c=0.4)(jac @ jac.T)
        close(d, w @ jac)


@needs_cvxpy
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nash_mtl(monkeypatch, max_norm):
    from torchjd.aggregation import _nash_mtl

    def tight_stop(self, gtg, alpha):
        # TorchJD stops when its iterate moves by < 1e-6 (or on a residual test that, on its
        # normalised problem, does not fire here); a 1e-10 move makes it exact enough for 1e-4
        new = self.alpha_param.value
        return bool(new is None or np.linalg.norm(new - self.prvs_alpha_param.value) < 1e-10)

    monkeypatch.setattr(_nash_mtl._NashMTLWeighting, "_stop_criteria", tight_stop)
    for jac in jacobians():
        k = jac.shape[0]
        d, _ = ours(NashMTL(names(k), max_norm=max_norm), jac)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy: "problem is not DPP"
            ref = agg.NashMTL(n_tasks=k, max_norm=max_norm, optim_niter=500)(jac)
        close(d, ref)


def test_graddrop(monkeypatch):
    import torchjd.aggregation._graddrop as tjd_graddrop

    for seed, jac in enumerate(jacobians()):
        b = GradDrop(names(jac.shape[0]), seed=seed)
        u = b._uniform(torch.Size([jac.shape[1]]), torch.device("cpu"), torch.float64)

        class FixedRand:
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def rand(*args, draws=u, **kwargs):
                return draws.clone()

        monkeypatch.setattr(tjd_graddrop, "torch", FixedRand())
        d, _ = ours(b, jac)
        close(d, agg.GradDrop()(jac))


def test_gradvac_two_tasks_over_steps():
    b = GradVac(["a", "b"], beta=0.5, group="whole")
    ref = agg.GradVacWeighting(beta=0.5)
    for seed in range(6):
        jac = conflicting_jacobian(2, 5, seed=seed, strength=(0.5, 1.5)[seed % 2])
        _, w = ours(b, jac)
        close(w, ref((jac @ jac.T).double()))


def test_wrapper_matches_our_upgrad():
    for jac in jacobians(3):
        k = jac.shape[0]
        _, w = ours(TorchJDWeighting(names(k), weighting=agg.UPGradWeighting()), jac)
        _, ours_w = ours(UPGrad(names(k)), jac)
        close(w, ours_w)
    jac = random_jacobian(3, 4, seed=0)
    b = TorchJDWeighting(names(3), weighting="MGDAWeighting", options={"epsilon": 1e-6})
    assert str(b) == "torchjd:MGDAWeighting"
    assert torch.isfinite(ours(b, jac)[1]).all()
