"""Alignment, feedback and estimator metrics (fdfa/metrics.py) against their definitions."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.func import jacrev, replace_all_batch_norm_modules_

from fdfa.data import TorchvisionData
from fdfa.errors import FdfaError
from fdfa.metrics import (
    AlignmentMetrics,
    block_names,
    first_weight_layer,
    output_jacobians,
    side_forward,
)
from fdfa.models import FCNet
from fdfa.rules import BP, BRSF, DFA, DKP, FDFA, FGA, FGW, KP
from fdfa.rules.base import perturbed_forward
from fdfa.train import train
from tests.helpers import CONF, NETS, SHAPES, compose_config, make_batch, synthetic_overrides

NAMES = {"fc": ["fc1", "fc2", "fc3"], "cnn": ["conv1", "conv2", "fc3"]}
# |1 - cos| <= 1e-5 bounds the angle by acos(1 - 1e-5) = 0.256 degrees.
COS_TOL = 1e-5
ANGLE_TOL = math.degrees(math.acos(1 - COS_TOL))


def stepped(rule_cls, net, seed=0, **kw):
    """A fresh rule after one train_step on a fixed batch, and that batch."""
    torch.manual_seed(seed)
    rule = rule_cls(NETS[net](), **kw)
    x, y = make_batch(SHAPES[net])
    rule.train_step(x, y)
    return rule, x, y


@pytest.mark.parametrize("net", NETS)
def test_bp_is_exactly_aligned_with_itself(net):
    rule, x, y = stepped(BP, net)
    m = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    assert block_names(rule.model) == NAMES[net]
    for name in NAMES[net]:
        assert m[f"align/{name}/cos"] == pytest.approx(1, abs=COS_TOL)
        assert m[f"align/{name}/norm_ratio"] == pytest.approx(1, abs=COS_TOL)
        assert 0 <= m[f"align/{name}/angle_deg"] <= ANGLE_TOL
        assert m[f"estimator/{name}/grad_rel_mse"] == pytest.approx(0, abs=COS_TOL)
    assert m["align/mean_cos"] == pytest.approx(1, abs=COS_TOL)
    assert not any(k.startswith("feedback/") or k.endswith("/jacobian_rel_mse") for k in m)


@pytest.mark.parametrize("net", NETS)
def test_dfa_on_a_fresh_net_is_far_from_bp(net):
    """B_l and -B_l are equally likely and flip the sign of DFA's update but not of BP's, so the
    cosine is symmetric about 0; at these sizes its spread is a few tenths at most (the seeds
    here give |cos| < 0.3), far from 1."""
    rule, x, y = stepped(DFA, net, seed=1)
    m = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    for name in NAMES[net]:
        assert abs(m[f"align/{name}/cos"]) < 0.5
        assert 70 < m[f"align/{name}/angle_deg"] < 110
        assert abs(m[f"feedback/{name}/cos"]) < 0.5
        assert math.cos(math.radians(m[f"align/{name}/angle_deg"])) == pytest.approx(
            m[f"align/{name}/cos"], abs=1e-6
        )
    assert m["align/mean_cos"] < 0.5


def per_sample_jacobians_by_brute_force(model, x, rows=None):
    """mean_n d logits[n] / d h_l[n] over the first ``rows`` samples (None: all), from the full
    batch Jacobian (torch.func.jacrev) of the logits as a function of h_l, with BatchNorm in
    train mode coupling the samples."""
    ref = copy.deepcopy(model)
    replace_all_batch_norm_modules_(ref)  # batch statistics, no buffer updates (jacrev needs it)
    hs, h = [], x
    with torch.no_grad():
        for block in ref.blocks:
            h = block(h)
            hs.append(h)
    targets = []
    for i in range(len(hs)):

        def logits_of(hl, i=i):
            h = hl
            for block in ref.blocks[i + 1 :]:
                h = block(h)
            return ref.head(h)

        full = jacrev(logits_of)(hs[i])  # [N, C, N, *h]
        n = x.shape[0] if rows is None else rows
        diagonal = torch.stack([full[k, :, k] for k in range(n)])  # [N, C, *h]
        targets.append(diagonal.mean(0))
    return targets


class Opaque(nn.Module):
    """A block the metrics cannot look into (not an nn.Sequential)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, h):
        return self.inner(h)


def opaque(model):
    model.blocks = nn.ModuleList(Opaque(b) for b in model.blocks)
    model.head = Opaque(model.head)
    return model


@pytest.mark.parametrize("wrap", [False, True], ids=["sequential", "opaque"])
@pytest.mark.parametrize("net", NETS)
def test_feedback_target_is_the_mean_per_sample_jacobian(net, wrap):
    torch.manual_seed(2)
    model = opaque(NETS[net]()) if wrap else NETS[net]()
    x, _ = make_batch(SHAPES[net], n=6)
    expected = per_sample_jacobians_by_brute_force(model, x)
    logits, hs, taps = side_forward(copy.deepcopy(model), x)
    assert all((front is None) == wrap for _, front in taps)  # the shortcut, or the plain way
    for chunk_mb in (256, 1e-3):  # one batch of passes, and one pass at a time
        got = output_jacobians(logits, hs, taps, chunk_mb)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # the last hidden block feeds the linear head: d z_n / d h_n = W_out for every sample
    w_out = (model.head.inner if wrap else model.head).weight.detach()
    torch.testing.assert_close(got[-1], w_out, rtol=1e-5, atol=1e-7)
    if net == "fc":
        # One backward per class (summing over samples) gives another quantity under train-mode
        # BN: the derivative along a shift of h_l shared by all samples, which the BN after the
        # next Linear removes, so it is 0 for every block below the last; the target is not.
        seeds = torch.eye(10)[:, None, :].expand(10, len(x), 10)  # seeds[c, n] = onehot(c)
        column_sums = torch.autograd.grad(
            logits, hs[:-1], seeds, is_grads_batched=True, retain_graph=True
        )
        for sums, target in zip(column_sums, got):
            assert sums.mean(1).abs().max() < 1e-5 < target.abs().max()


@pytest.mark.parametrize("net", NETS)
def test_the_target_of_a_few_samples_is_their_mean_in_the_whole_batch(net):
    """jacobian_samples=m: mean over rows 0..m-1 of d z_n / d h_n, each in the forward pass of
    all 6 samples (BatchNorm's statistics are the batch's), not of a batch of m."""
    torch.manual_seed(4)
    model = NETS[net]()
    x, _ = make_batch(SHAPES[net], n=6)
    logits, hs, taps = side_forward(copy.deepcopy(model), x)
    for rows in (1, 3):
        expected = per_sample_jacobians_by_brute_force(model, x, rows)
        got = output_jacobians(logits, hs, taps, 1e-3, samples=rows)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
        alone = per_sample_jacobians_by_brute_force(model, x[:rows].repeat(2, *[1] * (x.dim() - 1)))
        assert not torch.allclose(got[0], alone[0], rtol=1e-2, atol=1e-4)  # not a batch of its own
    whole = output_jacobians(logits, hs, taps)
    for g, e in zip(output_jacobians(logits, hs, taps, samples=50), whole):  # more than the batch
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_fdfa_estimate_of_a_few_samples_is_compared_with_their_target():
    """With jacobian_samples=m, jacobian_rel_mse compares Ĵ_l of the step's draw on rows 0..m-1
    (t^T u_l / m) with J_l of the same rows; by hand from the same fork of the generator."""
    torch.manual_seed(5)
    rule, x, y = stepped(FDFA, "fc", seed=5)
    m = 3
    torch.manual_seed(11)
    got = AlignmentMetrics(every_n_steps=1, jacobian_samples=m).measure(rule, x, y)
    torch.manual_seed(11)
    _, us, _, t = perturbed_forward(rule.model, x, 1, perturbation=rule.perturbation)
    estimates = FDFA.jacobian_estimates(t[0, :m].detach(), [u[0, :m].detach() for u in us])
    logits, hs, taps = side_forward(copy.deepcopy(rule.model), x)
    targets = output_jacobians(logits, hs, taps, samples=m)
    for name, e, j in zip(NAMES["fc"], estimates, targets):
        expected = ((e - j).pow(2).sum() / j.pow(2).sum()).item()
        assert got[f"estimator/{name}/jacobian_rel_mse"] == pytest.approx(expected, rel=1e-4)
    whole = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    assert whole["estimator/fc1/jacobian_rel_mse"] != pytest.approx(
        got["estimator/fc1/jacobian_rel_mse"], rel=1e-3
    )


def test_a_feedback_equal_to_w_out_has_cos_1_in_the_last_block():
    rule, x, y = stepped(DFA, "fc")
    with torch.no_grad():
        rule.feedback[-1].copy_(rule.model.head.weight)  # a feedback equal to its target
    m = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    assert m["feedback/fc3/cos"] == pytest.approx(1, abs=COS_TOL)


def test_fdfa_estimate_is_unbiased_for_the_target_and_jacobian_rel_mse_is_its_variance():
    """The mean of k independent estimates Ĵ_l has E|mean - J|^2 = E|Ĵ - J|^2 / k. With many
    coordinates the sums concentrate: the measured ratio is within a factor 2 of 1/k."""
    torch.manual_seed(3)
    model = FCNet((1, 4, 4), 5, n_layers=2, width=12)
    rule = FDFA(model)
    x, y = make_batch((1, 4, 4), n=8, classes=5)
    metrics = AlignmentMetrics(every_n_steps=1)
    repeats = [metrics.measure(rule, x, y) for _ in range(3)]  # no RNG consumed: the same draw
    assert len({r["estimator/fc1/jacobian_rel_mse"] for r in repeats}) == 1
    rule.n_directions = k = 2000  # the estimate then averages k directions
    averaged = metrics.measure(rule, x, y)
    # a fresh single-direction draw per seed, for the expected value of jacobian_rel_mse
    rule.n_directions = 1
    draws = []
    for seed in range(40):
        torch.manual_seed(seed)
        draws.append(metrics.measure(rule, x, y))
    for name in ("fc1", "fc2"):
        one = sum(d[f"estimator/{name}/jacobian_rel_mse"] for d in draws) / len(draws)
        ratio = averaged[f"estimator/{name}/jacobian_rel_mse"] / one
        assert 0.5 / k < ratio < 2 / k


@pytest.mark.parametrize("rule_cls", [BP, DFA, DKP, FDFA, FGW, FGA, KP, BRSF])
def test_measuring_does_not_change_training(rule_cls):
    """Same seed, metrics every step (the feedback copied before it, as the trainer does) vs
    never: bit-identical weights, buffers, feedback, optimizer state and RNG state after several
    steps (brSF's copy draws B: on a fork of the generators)."""

    def run(with_metrics):
        torch.manual_seed(4)
        rule = rule_cls(NETS["fc"]())
        opt = torch.optim.Adam(rule.model.parameters(), 1e-2)
        metrics = AlignmentMetrics(every_n_steps=1)
        for step in range(1, 6):
            x, y = make_batch(SHAPES["fc"], seed=step)
            used = metrics.feedback_before_step(rule) if with_metrics else None
            opt.zero_grad(set_to_none=True)
            rule.train_step(x, y)
            if with_metrics and metrics.due(step):
                grads = [p.grad.clone() for p in rule.model.parameters()]
                m = metrics.measure(rule, x, y, used)
                assert all(torch.equal(a, p.grad) for a, p in zip(grads, rule.model.parameters()))
                assert "align/mean_cos" in m
            opt.step()
        return rule.state_dict(), opt.state_dict()["state"], torch.random.get_rng_state()

    (rule_a, opt_a, rng_a), (rule_b, opt_b, rng_b) = run(True), run(False)
    assert rule_a.keys() == rule_b.keys()
    for key in rule_a:  # model parameters, BatchNorm buffers, feedback tensors
        assert torch.equal(rule_a[key], rule_b[key]), key
    for i in opt_a:
        assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for k in opt_a[i])
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("rule_cls", [BP, DFA, DKP, FDFA, FGW, FGA])
def test_grad_rel_mse_is_the_error_of_the_applied_update_for_every_rule(rule_cls):
    """|update - g|^2 / |g|^2 of W_l's update against autograd's g on the same batch and weights,
    for every rule (0 for BP), and consistent with the alignment keys: r^2 - 2 r cos + 1."""
    rule, x, y = stepped(rule_cls, "fc", seed=5)
    m = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    reference = copy.deepcopy(rule.model)  # same weights and BatchNorm buffers as the step saw
    reference.zero_grad(set_to_none=True)
    F.cross_entropy(reference(x), y).backward()
    for i, name in enumerate(NAMES["fc"]):
        update = first_weight_layer(rule.model.blocks[i]).weight.grad
        g = first_weight_layer(reference.blocks[i]).weight.grad
        expected = ((update - g).square().sum() / g.square().sum()).item()
        assert m[f"estimator/{name}/grad_rel_mse"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
        r, cos = m[f"align/{name}/norm_ratio"], m[f"align/{name}/cos"]
        assert m[f"estimator/{name}/grad_rel_mse"] == pytest.approx(
            r * r - 2 * r * cos + 1, rel=1e-9, abs=1e-9
        )
    jacobian_keys = {k for k in m if k.endswith("/jacobian_rel_mse")}
    assert bool(jacobian_keys) == (rule_cls is FDFA)  # the Jacobian estimate is FDFA's alone
    if rule_cls is BP:
        assert all(m[f"estimator/{n}/grad_rel_mse"] < 1e-10 for n in NAMES["fc"])


def test_fdfa_grad_rel_mse_is_of_the_update_from_b_not_of_its_jacobian_estimate():
    """With B_L = W_out (the last block's exact target J_L) FDFA's update of the last block is BP's
    (grad_rel_mse 0 to rounding), while a fresh Ĵ_L of one direction is far from J_L."""
    torch.manual_seed(6)
    rule = FDFA(NETS["fc"]())
    with torch.no_grad():
        rule.feedback[-1].copy_(rule.model.head.weight)
    x, y = make_batch(SHAPES["fc"])
    rule.train_step(x, y)  # the weight update uses B before this step's feedback update
    m = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    assert m["estimator/fc3/grad_rel_mse"] < 1e-8
    assert m["estimator/fc3/jacobian_rel_mse"] > 0.1
    assert m["estimator/fc1/grad_rel_mse"] == pytest.approx(1, abs=1e-6)  # B_1 = 0: no update


@pytest.mark.slow
def test_fdfa_feedback_aligns_with_the_true_jacobian_during_a_short_mnist_run(mnist_root):
    """Both blocks, under the default feedback update (adam). fc2's target J_2 is W_out; fc1's is
    the Jacobian through fc2, BN and ReLU, which also moves as the weights train: B_1 must follow
    it too. B starts at 0 (cos 0); after one step B = lr * sign(Ĵ) of a single noisy draw."""
    torch.manual_seed(0)
    data = TorchvisionData("mnist", str(mnist_root), subset=2048, batch_size=64)
    data.setup(torch.device("cpu"))
    model = FCNet(data.image_shape, 10, n_layers=2, width=64)
    rule = FDFA(model)  # the paper's defaults: B starts at 0, Adam at lr 1e-4 on B - Ĵ
    assert rule.feedback_update == "adam"
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    metrics = AlignmentMetrics(every_n_steps=30)
    measured = []
    for step, (x, y) in enumerate(data.train_batches(data.epoch_permutation()), start=1):
        optimizer.zero_grad(set_to_none=True)
        rule.train_step(x, y)
        if step == 1 or metrics.due(step):
            m = metrics.measure(rule, x, y)
            measured.append({name: m[f"feedback/{name}/cos"] for name in ("fc1", "fc2")})
        optimizer.step()
        if step == 30:
            break
    print("feedback cos after 1 and 30 steps:", measured)
    for name in ("fc1", "fc2"):
        assert measured[1][name] > measured[0][name] + 0.2, name
        assert measured[1][name] > 0.8, name


def test_default_config_builds_and_rejects_bad_values():
    cfg = OmegaConf.load(CONF / "metrics" / "default.yaml")
    metrics = instantiate(cfg)
    assert isinstance(metrics, AlignmentMetrics) and metrics.every_n_steps == cfg.every_n_steps
    assert [metrics.due(s) for s in (1, cfg.every_n_steps, 2 * cfg.every_n_steps)] == [
        False,
        True,
        True,
    ]
    assert not any(AlignmentMetrics(every_n_steps=None).due(s) for s in range(1, 100))
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(FdfaError, match="metrics.every_n_steps"):
            AlignmentMetrics(every_n_steps=bad)
    with pytest.raises(FdfaError, match="metrics.jacobian_chunk_mb"):
        AlignmentMetrics(jacobian_chunk_mb=0)
    with pytest.raises(FdfaError, match="metrics.jacobian_metrics"):
        AlignmentMetrics(jacobian_metrics="no")
    for bad in (0, 2.5, "8"):
        with pytest.raises(FdfaError, match="metrics.jacobian_samples"):
            AlignmentMetrics(jacobian_samples=bad)


@pytest.mark.parametrize("rule_cls", [DFA, FDFA, FGW])
def test_without_jacobian_metrics_only_the_costly_keys_go(rule_cls):
    rule, x, y = stepped(rule_cls, "fc")
    full = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    cheap = AlignmentMetrics(every_n_steps=1, jacobian_metrics=False).measure(rule, x, y)
    costly = {k for k in full if k.startswith("feedback/")}
    if rule_cls is FDFA:  # its Jacobian estimate's error needs the exact Jacobians
        costly |= {k for k in full if k.endswith("/jacobian_rel_mse")}
    assert bool(costly) == (rule_cls is not FGW)  # every grad_rel_mse is cheap
    assert all(f"estimator/{n}/grad_rel_mse" in cheap for n in NAMES["fc"])
    assert set(cheap) == set(full) - costly
    assert all(cheap[k] == full[k] for k in cheap)


def test_trainer_logs_the_metrics_to_metrics_jsonl_and_csv(tmp_path):
    cfg = compose_config(
        synthetic_overrides(
            "algorithm=fdfa", "trainer.epochs=1", "metrics.every_n_steps=3", "logger=csv"
        )
    )
    summary = train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    aligned = [r for r in records if "align/mean_cos" in r]
    assert [r["step"] for r in aligned] == [3, 6]  # 8 steps per epoch
    for r in aligned:
        assert {"feedback/fc1/cos", "align/fc2/angle_deg"} <= set(r)
        assert {"estimator/fc2/grad_rel_mse", "estimator/fc2/jacobian_rel_mse"} <= set(r)
    assert records[-1]["step"] == 8 and summary["test/acc"] == records[-1]["test/acc"]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 4 and "align/mean_cos" in header and "test/acc" in header
    # metrics rows came first, yet the columns start with the evaluation's, the rest sorted
    evaluation = ["train/loss", "val/loss", "val/acc", "test/loss", "test/acc", "lr", "time_s"]
    assert header[:9] == ["step", "epoch", *evaluation]
    assert header[9:] == sorted(header[9:])
    cfg = compose_config(synthetic_overrides("trainer.max_steps=4", "metrics.every_n_steps=null"))
    train(cfg, tmp_path / "off")
    assert not any("align/mean_cos" in line for line in (tmp_path / "off/metrics.jsonl").open())


def test_metrics_change_nothing_in_a_trained_run(tmp_path):
    overrides = synthetic_overrides("algorithm=fdfa", "trainer.max_steps=6")
    on = train(compose_config([*overrides, "metrics.every_n_steps=2"]), tmp_path / "on")
    off = train(compose_config([*overrides, "metrics.every_n_steps=null"]), tmp_path / "off")
    assert on["train/loss"] == off["train/loss"] and on["test/loss"] == off["test/loss"]


def test_the_true_gradient_is_that_of_the_rules_own_loss():
    """With a loss scaled by 3, BP's update and the true gradient scale together (ratio 1)."""

    class ScaledBP(BP):
        def loss(self, logits, y):
            return 3 * F.cross_entropy(logits, y)

    rule, x, y = stepped(ScaledBP, "fc")
    m = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    assert m["align/fc1/norm_ratio"] == pytest.approx(1, abs=COS_TOL)
