"""Each rule against its math, on small nets with fixed seeds."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from fdfa.models import ShallowCNN
from fdfa.rules import BP, DFA, DKP, FDFA, KP
from fdfa.rules.base import FeedbackAdam, project_error
from tests.helpers import NETS, SHAPES, logits_given_offsets, make_batch

torch.set_default_dtype(torch.float32)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def bp_grads(model, x, y):
    m = copy.deepcopy(model)
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    return grads(m)


@pytest.mark.parametrize("net", NETS)
def test_bp_equals_autograd(net):
    torch.manual_seed(0)
    model = NETS[net]()
    x, y = make_batch(SHAPES[net])
    expected = bp_grads(model, x, y)
    out = BP(model).train_step(x, y)
    got = grads(model)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, y).item(), rel=1e-6)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0)


def injected_reference_grads(model, feedback, x, y):
    """Weight gradients a DFA-family rule must produce, computed the slow, obvious way: for block l,
    autograd of <h_l, e.B_l> w.r.t. that block's parameters, with e = softmax(z) - onehot(y) / N."""
    m = copy.deepcopy(model)
    m.zero_grad()
    hs, h = [], x
    with torch.no_grad():
        for block in m.blocks:
            h = block(h)
            hs.append(h)
        logits = m.head(h)
        e = (logits.softmax(1) - F.one_hot(y, logits.shape[1]).float()) / len(y)
    ref = {}
    h = x
    for i, (block, b) in enumerate(zip(m.blocks, feedback)):
        out = block(h)
        g = (e @ b.flatten(1)).view_as(out)
        params = list(block.parameters())
        for (n, _), gp in zip(
            block.named_parameters(), torch.autograd.grad((out * g).sum(), params)
        ):
            ref[f"blocks.{i}.{n}"] = gp
        h = hs[i]
    logits = m.head(hs[-1])
    F.cross_entropy(logits, y).backward()
    for n, p in m.head.named_parameters():
        ref[f"head.{n}"] = p.grad.clone()
    return ref


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("rule_cls", [DFA, DKP, FDFA])
def test_direct_feedback_rules_inject_exactly_e_times_B(rule_cls, net):
    torch.manual_seed(1)
    model = NETS[net]()
    rule = rule_cls(model)
    with torch.no_grad():  # non-zero feedback for every rule (DKP and FDFA start at 0)
        for b in rule.feedback:
            b.copy_(torch.randn_like(b) * 0.1)
    before = [b.detach().clone() for b in rule.feedback]
    x, y = make_batch(SHAPES[net])
    expected = injected_reference_grads(model, before, x, y)
    rule.train_step(x, y)
    got = grads(model)
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("rule_cls", [DFA, DKP, FDFA])
def test_output_layer_gets_the_exact_gradient(rule_cls):
    torch.manual_seed(2)
    model = NETS["fc"]()
    x, y = make_batch()
    expected = bp_grads(model, x, y)
    rule_cls(model).train_step(x, y)
    for n in ("head.weight", "head.bias"):
        torch.testing.assert_close(model.get_parameter(n).grad, expected[n], rtol=1e-5, atol=1e-7)


def test_feedback_shapes_are_known_at_build_time():
    model = ShallowCNN((1, 28, 28), 10)
    rule = DFA(model)
    assert [tuple(b.shape) for b in rule.feedback] == [(10, 15, 24, 24), (10, 40, 8, 8), (10, 128)]
    assert all(not b.requires_grad for b in rule.feedback)
    # rng: the state of the generator the rule draws from (fdfa.rules.base._save_own_state)
    assert set(k.split(".")[0] for k in rule.state_dict()) == {"model", "feedback", "rng"}


def test_dfa_feedback_is_fixed_kaiming_uniform():
    torch.manual_seed(3)
    model = NETS["fc"]()
    rule = DFA(model)
    b0 = [b.clone() for b in rule.feedback]
    bound = (6 / 32) ** 0.5  # kaiming-uniform, fan_in = 32 units, gain sqrt(2)
    assert all(b.abs().max() <= bound for b in b0)
    assert all(b.abs().max() > 0.9 * bound for b in b0)
    rule.train_step(*make_batch())
    assert all(torch.equal(a, b) for a, b in zip(b0, rule.feedback))


def test_dkp_feedback_gradient_is_e_transpose_h():
    torch.manual_seed(4)
    model = NETS["fc"]()
    rule = DKP(model, feedback_lr=1e-3)
    x, y = make_batch()
    m = copy.deepcopy(model)
    with torch.no_grad():
        hs, h = [], x
        for block in m.blocks:
            h = block(h)
            hs.append(h)
        logits = m.head(h)
        e = (logits.softmax(1) - F.one_hot(y, 10).float()) / len(y)
    assert all(torch.count_nonzero(b) == 0 for b in rule.feedback)  # DKP starts at 0
    rule.train_step(x, y)
    for b, h in zip(rule.feedback, hs):
        torch.testing.assert_close(b.grad, e.t() @ h, rtol=1e-4, atol=1e-7)
        # Adam's first step moves every entry with a non-zero gradient by lr against its sign
        moved = b.detach()[b.grad != 0]
        torch.testing.assert_close(
            moved, -1e-3 * torch.sign(b.grad[b.grad != 0]), rtol=1e-3, atol=0
        )


def test_dkp_feedback_decay_is_adams_l2_term():
    """Two steps on one batch (the forward weights untouched, so both gradients are g = e^T h):
    B_1 = -lr g / (|g| + eps) from B_0 = 0, where decay has nothing to act on; the second step's
    Adam gradient is g + decay * B_1. Written out, Adam's second step must give B_2."""
    lr, decay, eps = 1e-2, 0.5, 1e-8
    torch.manual_seed(4)
    rule = DKP(NETS["fc"](), feedback_lr=lr, feedback_decay=decay)
    x, y = make_batch()
    rule.train_step(x, y)
    g = [b.grad.double() for b in rule.feedback]
    b1 = [b.detach().double() for b in rule.feedback]
    rule.train_step(x, y)
    for b, grad, first in zip(rule.feedback, g, b1):
        torch.testing.assert_close(first, -lr * grad / (grad.abs() + eps))
        expected = adam_second_step(grad, first, decay, lr, eps)
        without_decay = adam_second_step(grad, first, 0.0, lr, eps)
        assert (expected - without_decay).abs().max() > 1e-5  # the decay term shows
        torch.testing.assert_close(b.detach().double(), expected, rtol=1e-4, atol=1e-8)


def adam_second_step(grad, first, decay, lr, eps, beta1=0.9, beta2=0.999):
    """Adam's second step from ``first`` (after a first step on ``grad``), gradient ``grad`` plus
    the L2 term ``decay * first``."""
    g2 = grad + decay * first
    m = beta1 * (1 - beta1) * grad + (1 - beta1) * g2
    v = beta2 * (1 - beta2) * grad**2 + (1 - beta2) * g2**2
    m_hat, v_hat = m / (1 - beta1**2), v / (1 - beta2**2)
    return first - lr * m_hat / (v_hat.sqrt() + eps)


def test_project_error_is_a_matmul_over_classes():
    e = torch.randn(5, 3)
    b = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(project_error(e, b), torch.einsum("nc,cdhw->ndhw", e, b))


@pytest.mark.parametrize("net", NETS)
def test_fdfa_tangent_is_sum_of_jacobian_vector_products(net):
    """t must equal sum_l J_l u_l for the u_l drawn in the step (checked with torch.func.jvp)."""
    torch.manual_seed(5)
    model = NETS[net]()
    rule = FDFA(model)
    x, _ = make_batch(SHAPES[net])
    hs, us, logits, t = rule.dual_forward(x)

    zeros = tuple(torch.zeros_like(u) for u in us)
    expected_logits, expected_t = jvp(logits_given_offsets(model, x), zeros, tuple(us))
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t, expected_t, rtol=1e-4, atol=1e-5)


def test_fdfa_estimate_is_batch_mean_of_outer_products():
    t = torch.randn(7, 10)
    us = [torch.randn(7, 5), torch.randn(7, 3, 2, 2)]
    est = FDFA.jacobian_estimates(t, us)
    for j, u in zip(est, us):
        full = torch.einsum("nc,nd->ncd", t, u.flatten(1)).mean(0).view(10, *u.shape[1:])
        torch.testing.assert_close(j, full, rtol=1e-5, atol=1e-6)


def _fdfa_step_with_known_estimate(update, **kw):
    torch.manual_seed(6)
    model = NETS["fc"]()
    rule = FDFA(model, feedback_update=update, **kw)
    with torch.no_grad():
        for b in rule.feedback:
            b.copy_(torch.randn_like(b))
    before = [b.detach().clone() for b in rule.feedback]
    x, y = make_batch()
    state = torch.random.get_rng_state()
    _, us, _, t = rule.dual_forward(x)  # replay the step's draws to know its Ĵ
    estimates = FDFA.jacobian_estimates(t.detach(), us)
    torch.random.set_rng_state(state)
    rule.train_step(x, y)
    return rule, before, estimates


def test_fdfa_ema_update():
    rule, before, est = _fdfa_step_with_known_estimate("ema", momentum=0.9)
    for b, b0, j in zip(rule.feedback, before, est):
        torch.testing.assert_close(b.detach(), 0.9 * b0 + 0.1 * j, rtol=1e-5, atol=1e-6)


def test_fdfa_adam_update_follows_b_minus_estimate():
    rule, before, est = _fdfa_step_with_known_estimate("adam", feedback_lr=1e-3)
    for b, b0, j in zip(rule.feedback, before, est):
        torch.testing.assert_close(b.grad, b0 - j, rtol=1e-5, atol=1e-6)
        step = (b.detach() - b0)[b.grad != 0]
        torch.testing.assert_close(step, -1e-3 * torch.sign(b.grad[b.grad != 0]), rtol=1e-3, atol=0)


def test_fdfa_rejects_unknown_feedback_update():
    with pytest.raises(ValueError, match="feedback_update"):
        FDFA(NETS["fc"](), feedback_update="sgd")


@pytest.mark.parametrize("rule_cls", [DKP, KP, FDFA])
def test_a_copied_rule_steps_as_the_original(rule_cls):
    """copy.deepcopy of a rule (as tests/test_cuda.py and users' own loops do) keeps its feedback
    optimizer working: the copy's step gives the original's numbers."""
    rule = rule_cls(NETS["fc"]())  # each with a FeedbackAdam for its feedback
    copied = copy.deepcopy(rule)
    x, y = make_batch(SHAPES["fc"], n=8)
    for r in (rule, copied):
        torch.manual_seed(1)
        r.train_step(x, y)
    for (name, a), b in zip(rule.state_dict().items(), copied.state_dict().values()):
        assert torch.equal(a, b), name


def test_feedback_adam_update_is_torch_adam_step():
    """FeedbackAdam.update() runs torch's fused Adam kernel on the same state: bit for bit the
    numbers, and a state_dict torch.optim.Adam loads (and back)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(10, 6), (10, 3, 2, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g), requires_grad=False) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in ours]
    fast = FeedbackAdam(ours, lr=1e-2, weight_decay=1e-3)
    slow = torch.optim.Adam(ref, lr=1e-2, weight_decay=1e-3, fused=True)
    for _ in range(3):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fast.update()
        slow.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
    resumed = torch.optim.Adam(ref, lr=1e-2, weight_decay=1e-3, fused=True)
    resumed.load_state_dict(copy.deepcopy(fast.state_dict()))  # as from a checkpoint file
    for p in ref:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed.state[p][key], slow.state[p][key])
    fast.load_state_dict(copy.deepcopy(slow.state_dict()))
    for a, b in zip(ours, ref):
        a.grad, b.grad = torch.ones(a.shape), torch.ones(b.shape)
    fast.update()
    slow.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
