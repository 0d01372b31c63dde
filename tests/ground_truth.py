"""Ground truths the estimator tests share (tests/test_statistics.py, tests/test_perturbation.py):
tiny nets small enough for exact Jacobians (``torch.func.jacrev``), exact weight gradients
(autograd), and the statistical checks an unbiased estimate must pass."""

import copy

import torch
import torch.nn.functional as F
from torch.func import jacrev, replace_all_batch_norm_modules_

from fdfa.models import FCNet
from tests.helpers import make_batch

N, CLASSES = 8, 3  # batch and classes of the tiny nets


def tiny_net(seed=0):
    """FC 9-4-4-3 with BatchNorm: 91 parameters, small enough for exact Jacobians."""
    torch.manual_seed(seed)
    return FCNet((1, 3, 3), CLASSES, n_layers=2, width=4)


def tiny_batch(seed=0, n=N, shape=(1, 3, 3)):
    """A batch for the tiny nets: n random inputs of ``shape``, labels in [0, CLASSES)."""
    return make_batch(shape, n, CLASSES, seed)


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def true_gradient(model, x, y):
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    return flat_grad(m)


def estimate(rule, x, y):
    rule.model.zero_grad(set_to_none=True)
    rule.train_step(x, y)
    return flat_grad(rule.model)


def cos(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def output_jacobians(model, x):
    """J[l] of shape [N, classes, N, D_l]: d logits[n] / d h_l[m], BatchNorm on batch statistics."""
    ref = copy.deepcopy(model)
    if ref.training:
        replace_all_batch_norm_modules_(ref)  # same batch statistics, no buffer updates
    with torch.no_grad():
        hs, h = [], x
        for block in ref.blocks:
            h = block(h)
            hs.append(h)
    jacobians = []
    for block_index, h_l in enumerate(hs):

        def logits_given(offset, at=block_index):
            h = x
            for i, block in enumerate(ref.blocks):
                h = block(h) + offset if i == at else block(h)
            return ref.head(h)

        j = jacrev(logits_given)(torch.zeros_like(h_l))
        jacobians.append(j.reshape(len(x), CLASSES, len(x), -1))
    return jacobians


def per_sample_jacobian(j):
    """[classes, D]: mean over n of d logits[n] / d h_l[n] (what FDFA's Ĵ_l estimates)."""
    return torch.diagonal(j, dim1=0, dim2=2).mean(-1)


def dl_dlogits(model, x, y):
    """e = dL/dlogits for the batch-mean cross-entropy."""
    with torch.no_grad():
        logits = copy.deepcopy(model)(x)
    return (logits.softmax(1) - F.one_hot(y, CLASSES).float()) / len(y)


def group_mse(samples, truth, m):
    """Mean over disjoint groups of m samples of |group mean - truth|^2."""
    groups = samples.reshape(-1, m, *samples.shape[1:]).mean(1)
    return (groups - truth).flatten(1).square().sum(1).mean().item()


def assert_mean_within_its_noise(mean, singles, target, label):
    """The mean of K unbiased estimates is off by |e|^2 = MSE_1 / K in expectation, i.e. a
    relative squared error e^2 = MSE_1 / (K |target|^2); the sum over many coordinates rarely
    exceeds 3x its expectation. A bias b adds |b|^2 that does not shrink with K (a rescaled
    estimate fails the first bound, which the cosine alone would not see). The cosine then
    satisfies cos >= 1 / sqrt(1 + 2 e^2) with room for chance."""
    e2 = group_mse(singles, target, 1) / (len(singles) * target.square().sum().item())
    error = ((mean - target).square().sum() / target.square().sum()).item()
    assert error < 3 * e2, f"{label}: relative squared error {error:.3g}, e^2 = {e2:.3g}"
    assert cos(mean, target) >= (1 + 2 * e2) ** -0.5, f"{label}: e^2 = {e2:.3g}"


def assert_one_over_sqrt_law(singles, target, label):
    """Unbiased => M * MSE_M = tr(Cov) = MSE_1 for every group size M (the 1/sqrt(M) law).

    Over the K/M groups the ratio's standard error is <= 0.04 at M = 16 and <= 0.09 at M = 256
    (measured; fewest dof in FDFA's 3-unit CNN block), so [0.6, 1.6] is >= 4.4 standard errors;
    a bias b adds M |b|^2 / MSE_1 and fails at large M."""
    mse_1 = group_mse(singles, target, 1)
    for m in (16, 256):
        ratio = m * group_mse(singles, target, m) / mse_1
        assert 0.6 < ratio < 1.6, f"{label}, M={m}: M * MSE_M / MSE_1 = {ratio:.3f}"


def fdfa_single_estimates(model, x, k: int, seed: int) -> list[torch.Tensor]:
    """One FDFA step with momentum 0 and ``k`` directions, which sets B_l to the mean of k single
    estimates J_l^ = t^T u_l / batch; returns those estimates of each block ([k, classes, n_l]),
    replayed from the step's draws (asserting that B_l is their mean)."""
    from fdfa.rules import FDFA
    from fdfa.rules.base import perturbed_forward

    rule = FDFA(model, feedback_update="ema", momentum=0.0, n_directions=k)
    torch.manual_seed(seed)
    rule.train_step(x, torch.zeros(len(x), dtype=torch.long))
    torch.manual_seed(seed)  # replay the step's draws
    _, us, _, t = perturbed_forward(model, x, k)
    singles = []
    for b, u in zip(rule.feedback, us):
        singles.append(torch.einsum("knc,knd->kcd", t, u.flatten(2)) / len(x))
        torch.testing.assert_close(b.flatten(1), singles[-1].mean(0), rtol=1e-4, atol=1e-6)
    return singles
