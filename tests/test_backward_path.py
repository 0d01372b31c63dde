"""The backward-path rules (FA, KP, uSF, brSF, frSF) and DRTP, each against its math."""

import copy
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from fdfa import checkpoint
from fdfa.metrics import AlignmentMetrics
from fdfa.models import BlockNet
from fdfa.rules import BP, BRSF, DRTP, FA, FRSF, KP, USF
from fdfa.rules.backward_path import weight_layers
from fdfa.train import train
from tests.helpers import (
    NETS,
    SHAPES,
    TinyUserNet,
    compose_config,
    crash_at_step,
    make_batch,
    synthetic_overrides,
)

BACKWARD_PATH = [FA, KP, USF, BRSF, FRSF]


class OddConvNet(BlockNet):
    """Conv layers with stride, reflect padding, 'same' padding, groups and no bias, and a Linear
    on 3-d input: the cases the conv and linear backward must get right besides the plain ones."""

    def __init__(self, input_shape=(2, 9, 9), num_classes=3):
        super().__init__(input_shape, num_classes)
        conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect")
        conv2 = nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(conv1, nn.BatchNorm2d(4), nn.ReLU()),
                nn.Sequential(conv2, nn.Tanh(), nn.Flatten(2), nn.Linear(25, 6), nn.Flatten()),
            ]
        )
        self.head = nn.Linear(24, num_classes)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def bp_grads(model, x, y):
    reference = copy.deepcopy(model)
    BP(reference).train_step(x, y)
    return grads(reference)


MODELS = {**NETS, "odd": lambda: OddConvNet()}
INPUTS = {**SHAPES, "odd": (2, 9, 9)}


@pytest.mark.parametrize("net", MODELS)
def test_fa_with_b_set_to_w_is_bp_exactly(net):
    torch.manual_seed(0)
    model = MODELS[net]().double()
    x, y = make_batch(INPUTS[net], classes=3 if net == "odd" else 10)
    x = x.double()
    expected = bp_grads(model, x, y)
    rule = FA(model)
    with torch.no_grad():
        for b, layer in zip(rule.feedback_weights, rule.layers):
            b.copy_(layer.weight)
    rule.train_step(x, y)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("rule_cls", BACKWARD_PATH)
def test_random_feedback_changes_hidden_gradients_but_not_the_head_or_the_model(rule_cls):
    torch.manual_seed(0)
    model = NETS["cnn"]()
    x, y = make_batch(SHAPES["cnn"])
    expected = bp_grads(model, x, y)
    keys = list(model.state_dict())
    rule_cls(model).train_step(x, y)
    got = grads(model)
    assert torch.equal(got["head.weight"], expected["head.weight"])  # nothing above the head
    assert not torch.allclose(got["blocks.0.0.weight"], expected["blocks.0.0.weight"])
    assert list(model.state_dict()) == keys  # checkpoints and reports see the same model
    assert not any("forward" in vars(m) for m in model.modules())  # plain BP outside the step


def test_usf_on_weights_of_plus_minus_c_is_bp_scaled_by_the_documented_factors():
    """uSF's B = s sign(W), s = 1/sqrt(3 fan_in). With every W_k = ±c_k, B_k = (s_k / c_k) W_k, so
    the signal reaching layer l is BP's times prod_{k above l} s_k / c_k (BN and ReLU backward are
    linear in it): every weight gradient is BP's times that product."""
    torch.manual_seed(0)
    model = NETS["fc"]().double()
    layers = weight_layers(model)
    cs = [0.05, 0.2, 0.01, 0.3]
    with torch.no_grad():
        for layer, c in zip(layers, cs):
            layer.weight.copy_(torch.randn_like(layer.weight).sign() * c)
    x, y = make_batch(SHAPES["fc"])
    x = x.double()
    expected = bp_grads(model, x, y)
    USF(model).train_step(x, y)
    ratios = [1 / math.sqrt(3 * layer.in_features) / c for layer, c in zip(layers, cs)]
    for i, layer in enumerate(layers):
        factor = math.prod(ratios[i + 1 :])
        name = next(n for n, p in model.named_parameters() if p is layer.weight)
        torch.testing.assert_close(layer.weight.grad, factor * expected[name], rtol=1e-9, atol=0)


def test_sign_rules_feedback_has_the_weights_signs_and_their_magnitudes():
    torch.manual_seed(0)
    model = NETS["fc"]()
    frsf, brsf = FRSF(model), BRSF(model)
    fixed = [b.clone() for b in frsf.feedback_matrices()]
    assert all(torch.equal(a, b) for a, b in zip(fixed, frsf.feedback_matrices()))
    drawn = [brsf.feedback_matrices(), brsf.feedback_matrices()]
    for i, layer in enumerate(weight_layers(model)):
        bound = 1 / math.sqrt(layer.in_features)
        for b in (fixed[i], drawn[0][i]):
            assert torch.equal(b.sign(), layer.weight.sign()) and b.abs().max() <= bound
        assert not torch.equal(drawn[0][i], drawn[1][i])  # brSF redraws every step


def test_kp_feedback_converges_to_w_geometrically_under_weight_decay():
    """SGD at lr η with decay λ on W and on B, both from W's gradient: B - W <- (1 - ηλ)(B - W)."""
    torch.manual_seed(0)
    lr, decay = 0.1, 0.05
    model = TinyUserNet((1, 4, 4), 3, hidden=5).double()
    sgd = functools.partial(torch.optim.SGD, lr=lr, weight_decay=decay)
    rule = KP(model, feedback_optimizer=sgd)
    forward = sgd(model.parameters())
    gaps = []
    for step in range(20):
        x, y = make_batch((1, 4, 4), n=8, classes=3, seed=step)
        forward.zero_grad()
        gaps.append([(b - m.weight).norm() for b, m in zip(rule.feedback_weights, rule.layers)])
        rule.train_step(x.double(), y)
        forward.step()
    for before, after in zip(gaps, gaps[1:]):
        for a, b in zip(before, after):
            torch.testing.assert_close(b, (1 - lr * decay) * a, rtol=1e-9, atol=0)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_kp_feedback_optimizer_is_a_copy_of_the_forward_one(optimizer):
    cfg = compose_config(["algorithm=kp", f"optimizer={optimizer}", "optimizer.lr=0.003"])
    model = NETS["fc"]()
    rule = instantiate(cfg.algorithm, model=model)
    forward = instantiate(cfg.optimizer)(model.parameters())
    assert type(rule.feedback_optimizer) is type(forward)
    (mine,), (theirs,) = rule.feedback_optimizer.param_groups, forward.param_groups
    assert {k: v for k, v in mine.items() if k != "params"} == {
        k: v for k, v in theirs.items() if k != "params"
    }
    assert mine["weight_decay"] > 0  # conf/algorithm/optimizer/kp_adam.yaml


def test_kp_rejects_a_feedback_optimizer_that_is_not_callable():
    with pytest.raises(ValueError, match="^feedback_optimizer must build an optimizer"):
        KP(NETS["fc"](), feedback_optimizer=0.1)


def test_drtp_injects_the_target_projection_by_hand():
    """One tanh block: dL/dW_1 = ((y* B / n) ∘ (1 - h^2))^T x, and the head gets BP's gradient."""
    torch.manual_seed(0)
    model = TinyUserNet((1, 2, 2), 3, hidden=4).double()
    x, y = make_batch((1, 2, 2), n=5, classes=3)
    x = x.double()
    expected = bp_grads(model, x, y)
    rule = DRTP(model)
    rule.train_step(x, y)
    (b,) = rule.feedback
    linear = model.blocks[0][1]
    h = torch.tanh(linear(x.flatten(1)))
    signal = F.one_hot(y, 3).double() @ b / len(y)  # +y* B over the batch size
    delta = signal * (1 - h**2)
    torch.testing.assert_close(linear.weight.grad, delta.t() @ x.flatten(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(linear.bias.grad, delta.sum(0), rtol=1e-12, atol=0)
    assert torch.equal(model.head.weight.grad, expected["head.weight"])


def test_batchnorm_relu_and_pooling_keep_their_true_backward():
    """Under FA with random B, every BN, ReLU and max-pool call passes back exactly the vector-
    Jacobian product of its own forward with the signal it receives."""
    torch.manual_seed(0)
    model = NETS["cnn"]().double()
    calls = []
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)
    modules = [m for m in model.modules() if isinstance(m, kinds)]

    def save_input(module, args):
        calls.append([module, args[0].detach().clone()])

    def save_grads(module, grad_input, grad_output):
        entry = next(c for c in reversed(calls) if c[0] is module and len(c) == 2)
        entry += [grad_output[0].clone(), grad_input[0].clone()]

    for m in modules:
        m.register_forward_pre_hook(save_input)
        m.register_full_backward_hook(save_grads)
    x, y = make_batch(SHAPES["cnn"])
    FA(model).train_step(x.double(), y)
    checked = [c for c in calls if len(c) == 4]
    assert {type(c[0]) for c in checked} == {nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d}
    for module, inp, grad_out, grad_in in checked:
        fresh = copy.deepcopy(module)
        fresh._backward_hooks.clear()
        fresh._forward_pre_hooks.clear()
        inp = inp.requires_grad_()
        (true,) = torch.autograd.grad(fresh(inp), inp, grad_out)
        assert torch.equal(grad_in, true), type(module).__name__


@pytest.mark.parametrize("rule_cls", [*BACKWARD_PATH, DRTP])
def test_metrics_log_alignment_and_the_feedback_angle(rule_cls):
    model = NETS["fc"]()
    rule = rule_cls(model)
    x, y = make_batch(SHAPES["fc"])
    rule.train_step(x, y)
    out = AlignmentMetrics().measure(rule, x, y)
    for name in ("fc1", "fc2", "fc3"):
        assert f"align/{name}/cos" in out and f"estimator/{name}/grad_rel_mse" in out
        assert f"feedback/{name}/cos" in out
    assert ("feedback/head/cos" in out) == (rule_cls is not DRTP)  # per weight layer vs per block
    if rule_cls is USF:  # B = s sign(W): cos = |W|_1 / (sqrt(n) |W|_2)
        w = model.head.weight.detach().double()
        cos = w.abs().sum() / (w.numel() ** 0.5 * w.norm())
        assert out["feedback/head/cos"] == pytest.approx(cos.item(), rel=1e-9)


SLOW = pytest.mark.slow  # ~35 s each on a loaded 2-core machine; KP (its own optimizer) stays fast


@pytest.mark.parametrize(
    "algorithm",
    ["kp", *(pytest.param(a, marks=SLOW) for a in ("fa", "usf", "brsf", "frsf", "drtp"))],
)
def test_each_rule_resumes_bit_exactly(tmp_path, monkeypatch, algorithm):
    overrides = synthetic_overrides(
        f"algorithm={algorithm}", "trainer.epochs=2", "trainer.ckpt_every_n_steps=3"
    )
    train(compose_config(overrides), tmp_path / "straight")
    cls = type(instantiate(compose_config(overrides).algorithm, model=NETS["fc"]()))
    crash_at_step(monkeypatch, cls, 8)  # after the checkpoint at step 6, mid epoch 1
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(overrides), tmp_path / "resumed")
    assert checkpoint.load(tmp_path / "resumed" / "last.ckpt")["progress"]["step"] == 6
    monkeypatch.undo()
    train(compose_config(overrides), tmp_path / "resumed")

    def records(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(s).items() if k != "time_s"} for s in lines]

    assert records(tmp_path / "resumed") == records(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    assert a["rule"].keys() == b["rule"].keys()
    assert all(torch.equal(a["rule"][k], b["rule"][k]) for k in a["rule"])
    assert a["optimizers"].keys() == b["optimizers"].keys()
    assert ("rule.feedback_optimizer" in a["optimizers"]) == (algorithm == "kp")
