"""The CIFAR ResNets, the ViT and torchvision's models under every rule: a step on CIFAR- and
MNIST-shaped fake data with the alignment metrics, feedback where the docs say, closed-form
tangents through residual and transformer blocks equal to forward-mode AD, FDFA's Jacobian
estimate through them unbiased, feedback memory refused past its limit, resume exact."""

import copy
import functools
import json
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import fdfa.api
from fdfa.adapter import TorchvisionNet
from fdfa.errors import FdfaError
from fdfa.metrics import AlignmentMetrics
from fdfa.models import BlockNet
from fdfa.resnet import BasicBlock, CifarResNet
from fdfa.rules import DFA, DKP, FDFA
from fdfa.rules import base as rules_base
from fdfa.tangents import forward_with_tangent
from fdfa.vit import PatchEmbedding, TokenPool, TransformerBlock, ViT
from tests.ground_truth import (
    CLASSES,
    assert_mean_within_its_noise,
    assert_one_over_sqrt_law,
    fdfa_single_estimates,
    output_jacobians,
    per_sample_jacobian,
    tiny_batch,
)
from tests.helpers import (
    NETWORK_PRESETS,
    compose_config,
    make_batch,
    synthetic_overrides,
    user_wrapped,
)

RULES = {name: fdfa.api.RULES[name] for name in ("bp", "dfa", "dkp", "fdfa", "fg_w", "fg_a")}
SHAPES = {"cifar": (3, 32, 32), "mnist": (1, 28, 28)}
NETS = {  # small variants (depth 8, a 2-block ViT) keep the tests fast; the presets are full size
    "resnet8": lambda shape: CifarResNet(shape, 10, depth=8),
    "resnet8_stage_b": lambda shape: CifarResNet(
        shape, 10, depth=8, shortcut="B", feedback_at="stage"
    ),
    "vit": lambda shape: ViT(shape, 10, depth=2, width=32, heads=2),
    "vit_mean": lambda shape: ViT(shape, 10, depth=2, width=32, heads=2, pool="mean"),
    "torchvision_resnet18": lambda shape: TorchvisionNet(shape, 10, "resnet18"),
    "wrapped": lambda shape: user_wrapped(shape, 10),
}


@functools.cache
def _built(net, data):
    torch.manual_seed(0)
    return NETS[net](SHAPES[data])


def built(net, data):
    """A fresh copy of the net (building torchvision's ResNet-18 takes seconds: once per shape)."""
    return copy.deepcopy(_built(net, data))


# (net, data) of the step test; the variants (shortcut B + stages, mean token) on one shape each
STEPPED = [
    *[(net, data) for net in ("resnet8", "vit", "wrapped") for data in SHAPES],
    ("resnet8_stage_b", "cifar"),
    ("vit_mean", "mnist"),
    ("torchvision_resnet18", "cifar"),
    pytest.param("torchvision_resnet18", "mnist", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("net, data", STEPPED)
@pytest.mark.parametrize("rule_name", RULES)
def test_every_rule_takes_a_step_on_every_network_with_metrics(rule_name, net, data):
    """The alignment metrics here; the Jacobian ones (exact J_l: batch x classes reverse passes
    through the net) on small images below."""
    model = built(net, data)
    rule = RULES[rule_name](model)
    x, y = make_batch(SHAPES[data], n=4, classes=10, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    out = rule.train_step(x, y)
    assert torch.isfinite(out.loss) and out.logits.shape == (4, 10)
    for name, p in model.named_parameters():  # every parameter gets an update from the rule
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    metrics = AlignmentMetrics(every_n_steps=1, jacobian_metrics=False).measure(rule, x, y)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert sum(k.startswith("align/") and k.endswith("/cos") for k in metrics) == len(model.blocks)
    if rule_name == "bp":
        assert metrics["align/mean_cos"] > 0.9999
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


SMALL = {  # 8x8 images: the exact Jacobians of the feedback and estimator metrics stay cheap
    "resnet8": lambda: CifarResNet((1, 8, 8), 10, depth=8),
    "vit": lambda: ViT((1, 8, 8), 10, patch=4, depth=2, width=16, heads=2),
}


@pytest.mark.parametrize("net", SMALL)
@pytest.mark.parametrize("rule_name", ["dfa", "dkp", "fdfa"])
def test_feedback_and_estimator_metrics_through_residual_and_transformer_blocks(rule_name, net):
    torch.manual_seed(0)
    model = SMALL[net]()
    rule = RULES[rule_name](model)
    x, y = make_batch((1, 8, 8), n=4, classes=10, seed=1)
    rule.train_step(x, y)
    metrics = AlignmentMetrics(every_n_steps=1).measure(rule, x, y)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    names = [k.split("/")[1] for k in metrics if k.startswith("align/") and k.endswith("/cos")]
    assert len(names) == len(model.blocks)
    assert all(f"feedback/{n}/cos" in metrics for n in names)
    if rule_name == "fdfa":
        assert all(f"estimator/{n}/jacobian_rel_mse" in metrics for n in names)


def test_presets_build_resnet20_and_resnet56_of_the_paper():
    """He et al. 2016, table 6: ResNet-20 has 0.27M parameters, ResNet-56 0.85M (option A)."""
    from hydra.utils import instantiate

    for name, blocks, params in [("resnet20", 9, 0.27e6), ("resnet56", 27, 0.85e6)]:
        cfg = compose_config([f"model={name}"])
        model = instantiate(cfg.model, input_shape=(3, 32, 32), num_classes=10)
        assert len(model.blocks) == blocks
        assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.01e6
        stage = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10, feedback_at="stage")
        assert len(stage.blocks) == 3


# The documented feedback shapes B_l = [classes, *h_l.shape[1:]] (docs: networks page)
DOCUMENTED = {
    ("resnet8", "cifar"): [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    ("resnet8", "mnist"): [(16, 28, 28), (32, 14, 14), (64, 7, 7)],
    ("resnet8_stage_b", "cifar"): [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    ("vit", "cifar"): [(65, 32)] * 2,  # 64 patches + the class token
    ("vit_mean", "mnist"): [(49, 32)] * 2,  # 49 patches, no class token
    ("torchvision_resnet18", "cifar"): [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
    ("torchvision_resnet18", "mnist"): [(64, 7, 7), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
    ("wrapped", "cifar"): [(8, 16, 16), (16, 8, 8)],
}


@pytest.mark.parametrize("rule_cls", [DFA, DKP, FDFA])
@pytest.mark.parametrize("net, data", DOCUMENTED)
def test_direct_feedback_injects_at_the_documented_block_outputs(rule_cls, net, data):
    model = built(net, data)
    rule = rule_cls(model)
    assert [tuple(b.shape) for b in rule.feedback] == [(10, *s) for s in DOCUMENTED[net, data]]
    x, y = make_batch(SHAPES[data], n=4, classes=10, seed=2)
    hs, _ = rule.local_forward(x)
    assert [tuple(h.shape[1:]) for h in hs] == DOCUMENTED[net, data]  # injected at exactly these


def test_resnet20_blocks_are_the_residual_block_outputs():
    """The hidden blocks end after each residual block's add and ReLU; the stem opens block 1."""
    model = CifarResNet((3, 32, 32), 10, depth=20)
    assert isinstance(model.blocks[0][1], BasicBlock) and isinstance(
        model.blocks[0][0][0], nn.Conv2d
    )
    assert all(isinstance(b, BasicBlock) for b in model.blocks[1:])
    assert [tuple(b.shape) for b in DFA(model).feedback] == (
        [(10, 16, 32, 32)] * 3 + [(10, 32, 16, 16)] * 3 + [(10, 64, 8, 8)] * 3
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=21), r"model.depth must be 6n \+ 2 with n >= 1 .*got 21"),
        (dict(shortcut="C"), "model.shortcut must be A or B"),
        (dict(feedback_at="layer"), "model.feedback_at must be block or stage"),
    ],
)
def test_resnet_refuses_bad_arguments_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        CifarResNet((3, 32, 32), 10, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch=5), "model.patch .5. must divide the image size 32x32"),
        (dict(width=30, heads=4), "model.width .30. must be a multiple of model.heads"),
        (dict(depth=0), "model.depth must be an integer >= 1"),
        (dict(pool="max"), "model.pool must be cls or mean"),
    ],
)
def test_vit_refuses_bad_arguments_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViT((3, 32, 32), 10, **kwargs)


# --- tangents through residual and transformer blocks ---------------------------------------------


def reference_jvp(module, x, t):
    m = copy.deepcopy(module)
    with fwAD.dual_level():
        return fwAD.unpack_dual(m(fwAD.make_dual(x, t)))


def _torchvision_block(kind):
    from torchvision.models.resnet import BasicBlock as TVBasic
    from torchvision.models.resnet import Bottleneck

    down = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return TVBasic(4, 8, 2, down) if kind == "basic" else Bottleneck(4, 2, 2, down)


BLOCKS = {
    "resnet-basic-A": (lambda: BasicBlock(4, 8, 2, "A"), (4, 6, 6)),
    "resnet-basic-B": (lambda: BasicBlock(4, 8, 2, "B"), (4, 6, 6)),
    "resnet-basic-identity": (lambda: BasicBlock(4, 4), (4, 6, 6)),
    "torchvision-basic": (lambda: _torchvision_block("basic"), (4, 6, 6)),
    "torchvision-bottleneck": (lambda: _torchvision_block("bottleneck"), (4, 6, 6)),
    "transformer": (lambda: TransformerBlock(8, 2, 2), (5, 8)),
    "patch-embedding": (lambda: PatchEmbedding(3, 8, 2, 9, cls_token=True), (3, 6, 6)),
    "token-pool": (lambda: nn.Sequential(nn.LayerNorm(8), TokenPool("mean")), (5, 8)),
    "dropout-eval": (lambda: nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5)).eval(), (6,)),
}


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("name", BLOCKS)
def test_block_tangents_equal_forward_mode_ad(name, train_mode):
    """One direction and three stacked: the closed forms give torch.autograd.forward_ad's J t."""
    torch.manual_seed(0)
    make, shape = BLOCKS[name]
    block = make().train(train_mode and name != "dropout-eval")
    for m in block.modules():  # non-trivial BatchNorm/LayerNorm affine parameters
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            nn.init.normal_(m.weight, 1, 0.3), nn.init.normal_(m.bias, 0, 0.3)
    x, t, ts = torch.randn(6, *shape), torch.randn(6, *shape), torch.randn(3, 6, *shape)
    ref_y, ref_t = reference_jvp(block, x, t)
    y, tangent = forward_with_tangent(copy.deepcopy(block), x, t)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(tangent, ref_t, rtol=1e-4, atol=1e-5)
    _, stacked = forward_with_tangent(copy.deepcopy(block), x, ts)
    for k in range(3):
        torch.testing.assert_close(
            stacked[k], reference_jvp(block, x, ts[k])[1], rtol=1e-4, atol=1e-5
        )


def test_residual_and_attention_tangents_are_closed_forms_not_the_fallback(monkeypatch):
    """Their tangents never go through torch's generic forward-mode fallback."""
    from fdfa import tangents

    def no_fallback(m, x, t):
        raise AssertionError(f"fallback used for {type(m).__name__}")

    monkeypatch.setattr(tangents, "_fallback", no_fallback)
    for name in ("resnet-basic-A", "torchvision-bottleneck", "transformer", "patch-embedding"):
        make, shape = BLOCKS[name]
        forward_with_tangent(make(), torch.randn(4, *shape), torch.randn(2, 4, *shape))


def test_dropout_tangent_uses_the_primal_mask_for_every_direction():
    torch.manual_seed(0)
    x, ts = torch.randn(8, 50).abs() + 0.1, torch.randn(3, 8, 50)
    y, tangents = forward_with_tangent(nn.Dropout(0.5).train(), x, ts)
    mask = y / x  # 0 or 1 / (1 - p), drawn once
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    torch.testing.assert_close(tangents, ts * mask)


# --- FDFA's Jacobian estimate through a residual block and a transformer block --------------------


class TinyResidualNet(BlockNet):
    """conv stem, then two residual blocks (identity and option-A shortcut), 3 classes, 4x4."""

    def __init__(self):
        super().__init__((1, 4, 4), CLASSES)
        stem = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU()
        )
        self.blocks = nn.ModuleList([stem, BasicBlock(2, 2), BasicBlock(2, 4, 2, "A")])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES))


class TinyTransformerNet(BlockNet):
    """Patches of 2x2 (4 + a class token, width 8), two transformer blocks, 3 classes."""

    def __init__(self):
        super().__init__((1, 4, 4), CLASSES)
        embed = PatchEmbedding(1, 8, 2, 4, cls_token=True)
        self.blocks = nn.ModuleList(
            [nn.Sequential(embed, TransformerBlock(8, 2, 2)), TransformerBlock(8, 2, 2)]
        )
        self.head = nn.Sequential(nn.LayerNorm(8), TokenPool("cls"), nn.Linear(8, CLASSES))
        with torch.no_grad():  # sharper attention: its Jacobian terms weigh as much as the rest
            for block in self.modules():
                if isinstance(block, TransformerBlock):
                    block.attn.qkv.weight.mul_(4)


@pytest.mark.parametrize("net", [TinyResidualNet, TinyTransformerNet])
def test_fdfa_jacobian_estimate_through_residual_and_transformer_blocks_is_unbiased(net):
    """As tests/test_statistics.py does for FC and CNN: one FDFA step with momentum 0 and K
    directions sets B_l to the mean of K estimates Ĵ_l = t^T u_l / batch; against the
    per-sample Jacobian from jacrev, the mean's relative squared error must stay within 3x
    MSE_1 / (K |J|^2) measured from the K single estimates (a bias does not shrink with K), and
    M * MSE_M = MSE_1 must hold at M = 16 and 256 (the 1/sqrt(M) law)."""
    torch.manual_seed(8)
    model = net()
    x, _ = tiny_batch(8, shape=(1, 4, 4))
    targets = [per_sample_jacobian(j) for j in output_jacobians(model, x)]
    for i, (singles, target) in enumerate(zip(fdfa_single_estimates(model, x, 16384, 9), targets)):
        assert_mean_within_its_noise(singles.mean(0), singles, target, f"block {i}")
        assert_one_over_sqrt_law(singles, target, f"block {i}")


# --- feedback memory ------------------------------------------------------------------------------


def test_feedback_memory_over_the_limit_is_refused_naming_the_option(monkeypatch, caplog):
    """ResNet-8 at feedback_at=block on CIFAR: B_l of 10 x (3 x 16x32x32 ... ) floats; a limit
    below that refuses in one line naming model.feedback_at=stage, which passes."""
    model = CifarResNet((3, 32, 32), 10, depth=8)
    size = 10 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8) * 4
    monkeypatch.setattr(rules_base, "FEEDBACK_LIMIT_BYTES", size - 1)
    with pytest.raises(FdfaError, match="set model.feedback_at=stage") as err:
        DFA(model)
    assert "\n" not in str(err.value)
    with caplog.at_level("INFO", logger="fdfa.rules.base"):
        monkeypatch.setattr(rules_base, "FEEDBACK_LIMIT_BYTES", size)
        DFA(model)
    assert f"{size / 2**20:.1f} MiB" in caplog.text  # printed before training


# --- configs and resume ---------------------------------------------------------------------------

RESNET_RUN = synthetic_overrides(
    "model=resnet20",
    "model.depth=8",
    "algorithm=fdfa",
    "trainer.epochs=3",
    "trainer.ckpt_every_n_steps=3",
    "metrics.every_n_steps=12",
    "metrics.jacobian_metrics=false",  # exact Jacobians: tested above on one step
)


def test_resume_on_a_resnet_is_bit_exact(tmp_path, monkeypatch):
    """As tests/test_checkpoint.py on the FC net: a crash at step 14 after the checkpoint at step
    12, then a rerun, gives the records, weights, BatchNorm statistics and feedback of a run
    that never stopped."""
    from fdfa import checkpoint
    from fdfa.train import train

    train(compose_config(RESNET_RUN), tmp_path / "straight")
    calls = {"n": 0}
    real_step = FDFA.train_step

    def crash_at_step_14(self, x, y):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(FDFA, "train_step", crash_at_step_14)
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(RESNET_RUN), tmp_path / "resumed")
    assert checkpoint.load(tmp_path / "resumed" / "last.ckpt")["progress"]["step"] == 12
    monkeypatch.setattr(FDFA, "train_step", real_step)
    summary = train(compose_config(RESNET_RUN), tmp_path / "resumed")
    assert summary["status"] == "completed" and summary["steps"] == 24

    def records(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]

    assert records(tmp_path / "resumed") == records(tmp_path / "straight")
    assert any("align/mean_cos" in r for r in records(tmp_path / "straight"))
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)["rule"]
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)["rule"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any("running_mean" in k for k in a) and any(k.startswith("feedback") for k in a)


@pytest.mark.parametrize("preset", NETWORK_PRESETS)
def test_network_presets_compose_with_their_recipe(preset):
    from hydra.utils import instantiate

    from fdfa.validate import validate_config
    from tests.helpers import CONF

    lines = (CONF / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# python run.py") and f"experiment={preset}" in lines[1]
    dataset, depth, target, opt, lr, batch, epochs, scheduler, augment = NETWORK_PRESETS[preset]
    for algorithm in RULES:
        cfg = compose_config([f"experiment={preset}", f"algorithm={algorithm}"])
        validate_config(cfg)
        assert cfg.dataset.name == dataset and cfg.model._target_ == f"fdfa.{target}"
        assert cfg.model.depth == depth and cfg.optimizer._target_ == f"torch.optim.{opt}"
        assert (cfg.optimizer.lr, cfg.dataset.batch_size, cfg.trainer.epochs) == (lr, batch, epochs)
        assert cfg.scheduler._target_ == f"torch.optim.lr_scheduler.{scheduler}"
        assert "step_size" not in cfg.scheduler  # config.yaml's StepLR keys do not leak in
        assert cfg.dataset.augment == augment
    optimizer = instantiate(cfg.optimizer)([nn.Parameter(torch.zeros(1))])
    instantiate(cfg.scheduler)(optimizer)
    cfg = compose_config([f"experiment={preset}", "dataset=fake", "trainer.epochs=2"])
    assert cfg.dataset._target_ == "fdfa.data.FakeImageData" and cfg.trainer.epochs == 2
