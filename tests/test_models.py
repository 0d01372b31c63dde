"""Every network trains with every rule (synthetic tensors of the right shapes)."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

import fdfa.rules
from fdfa.data import random_resized_crop_flip
from fdfa.errors import FdfaError
from fdfa.models import AlexNet, FCNet, ShallowCNN, hidden_shapes
from fdfa.rules import BP, DFA, DKP, FDFA, FGW
from tests.helpers import compose_config

RULES = [BP, DFA, DKP, FDFA]
EVERY_RULE = [getattr(fdfa.rules, name) for name in fdfa.rules.__all__ if name.isupper()]


def test_fc_widths_follow_the_reference():
    assert FCNet((1, 28, 28), 10).width == 800
    assert FCNet((3, 32, 32), 10).width == 1000
    assert len(FCNet((1, 28, 28), 10, n_layers=3).blocks) == 3


def test_fc_without_batchnorm_is_linear_relu_blocks():
    net = FCNet((1, 28, 28), 10, n_layers=2, batchnorm=False)
    assert [[type(m) for m in block] for block in net.blocks] == [
        [nn.Flatten, nn.Linear, nn.ReLU],
        [nn.Linear, nn.ReLU],
    ]
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in net.modules())
    assert not list(net.buffers())  # no running statistics
    with_bn = FCNet((1, 28, 28), 10, n_layers=2)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.modules()) == 2
    with pytest.raises(FdfaError, match="batchnorm must be True or False"):
        FCNet((1, 28, 28), 10, batchnorm="no")


@pytest.mark.parametrize("rule_cls", EVERY_RULE, ids=lambda c: c.__name__)
def test_every_rule_takes_a_step_on_the_fc_net_without_batchnorm(rule_cls):
    """A finite loss and a finite update of every parameter; a hidden signal at the first step
    (DKP and FDFA start with B = 0: none yet), and an optimizer step that moves the weights."""
    torch.manual_seed(0)
    net = FCNet((1, 8, 8), 4, n_layers=2, width=16, batchnorm=False)
    rule = rule_cls(net)
    x, y = _learnable((1, 8, 8), 4, n=16)
    before = [p.detach().clone() for p in net.parameters()]
    out = rule.train_step(x, y)
    assert out.logits.shape == (16, 4) and torch.isfinite(out.loss)
    for p in net.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
    first = net.blocks[0][1].weight.grad
    assert (first.abs().sum() == 0) == (rule_cls in (DKP, FDFA)), rule_cls.__name__
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert not torch.equal(before[-2], net.head.weight)


def test_the_reference_fg_w_preset_builds_fg_w_on_the_net_without_batchnorm():
    cfg = compose_config(["experiment=mnist_fc1_fgw_ref"])
    net = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    assert isinstance(instantiate(cfg.algorithm, net), FGW) and cfg.optimizer.lr == 1e-3
    # fc_mnist_fwd.py: 784 -> 800 -> ReLU -> 10, nothing else
    assert [[type(m) for m in b] for b in net.blocks] == [[nn.Flatten, nn.Linear, nn.ReLU]]
    assert (net.blocks[0][1].in_features, net.width, net.head.out_features) == (784, 800, 10)
    assert not list(net.buffers())
    cfg = compose_config(["experiment=mnist_fc1_fgw_ref", "algorithm=bp"])  # any rule, same net
    assert cfg.algorithm._target_ == "fdfa.rules.BP" and cfg.model.batchnorm is False
    assert compose_config(["experiment=mnist_fc1"]).model.batchnorm is True


def test_cnn_shapes_paper_and_reference_variant():
    """Feedback meets each conv's output before its pool, where the reference's conv_mnist.py and
    conv_cifar10.py hook it (conv -> BN -> ReLU -> hook -> max_pool2d): the pool opens the next
    block. cnn_ref's conv2 feedback is then [10, 40, 20, 20] on MNIST (400 positions per
    channel), [10, 40, 24, 24] on CIFAR-10, and fc1 takes 4000 / 5760 inputs, as there."""
    paper = ShallowCNN((1, 28, 28), 10)
    ref = ShallowCNN((1, 28, 28), 10, pool=(False, True))
    assert hidden_shapes(paper) == [(15, 24, 24), (40, 8, 8), (128,)]
    assert hidden_shapes(ref) == [(15, 24, 24), (40, 20, 20), (128,)]
    assert isinstance(paper.blocks[1][0], nn.MaxPool2d)  # conv1's pool opens block 2
    assert isinstance(ref.blocks[2][0], nn.MaxPool2d)
    assert ref.blocks[2][2].in_features == 4000  # the reference code's fc1 (4000 -> 128)
    cifar = ShallowCNN((3, 32, 32), 10, pool=(False, True))
    assert hidden_shapes(cifar) == [(15, 28, 28), (40, 24, 24), (128,)]
    assert cifar.blocks[2][2].in_features == 5760
    for dataset, shape, expected in [
        ("mnist", (1, 28, 28), [(10, 15, 24, 24), (10, 40, 20, 20), (10, 128)]),
        ("cifar10", (3, 32, 32), [(10, 15, 28, 28), (10, 40, 24, 24), (10, 128)]),
    ]:
        cfg = compose_config([f"experiment={dataset}_cnn"])  # model=cnn_ref, the reference's runs
        rule = FDFA(instantiate(cfg.model, input_shape=shape, num_classes=10))
        assert [tuple(b.shape) for b in rule.feedback] == expected, dataset


def test_alexnet_shapes_and_feedback_size():
    net = AlexNet((3, 224, 224), 100)
    shapes = hidden_shapes(net)
    assert shapes[0] == (64, 27, 27) and shapes[4] == (9216,) and shapes[-1] == (4096,)
    feedback = sum(100 * torch.Size(s).numel() for s in shapes)
    assert 19e6 < feedback < 21e6  # ≈ 20 M extra parameters, as in the reference


def test_alexnet_rejects_small_inputs_with_advice():
    with pytest.raises(FdfaError, match="input_size"):
        AlexNet((3, 32, 32), 100)


def _learnable(shape, classes, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return protos[y] + 0.3 * torch.randn(n, *shape, generator=g), y


@pytest.mark.parametrize("rule_cls", RULES)
@pytest.mark.parametrize(
    "make_net, shape, classes",
    [
        (lambda s, c: ShallowCNN(s, c), (3, 32, 32), 10),  # CIFAR-10 shapes
        (lambda s, c: AlexNet(s, c, fc_width=256), (3, 64, 64), 100),  # CIFAR-100, small resize
    ],
    ids=["cnn-cifar10", "alexnet-cifar100"],
)
def test_loss_falls_on_a_learnable_task(rule_cls, make_net, shape, classes):
    torch.manual_seed(0)
    net = make_net(shape, classes)
    rule = rule_cls(net, **({"feedback_lr": 1e-2} if rule_cls in (DKP, FDFA) else {}))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = _learnable(shape, classes, n=32)
    before = [p.detach().clone() for p in net.parameters()]
    losses = []
    for _ in range(12):
        opt.zero_grad()
        losses.append(rule.train_step(x, y).loss.item())
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert losses[-1] < losses[0] - 0.2, losses  # nats: a clear fall, not noise


@pytest.mark.parametrize("rule_cls", RULES)
def test_full_size_alexnet_takes_a_step(rule_cls):
    torch.manual_seed(0)
    net = AlexNet((3, 224, 224), 100)
    rule = rule_cls(net)
    x = random_resized_crop_flip(torch.randn(4, 3, 32, 32), 224)  # CIFAR-100 batch, augmented
    y = torch.randint(0, 100, (4,))
    w0 = net.blocks[0][0].weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = rule.train_step(x, y)
    opt.step()
    assert out.logits.shape == (4, 100) and torch.isfinite(out.loss)
    if rule_cls is not DKP and rule_cls is not FDFA:  # these start with B = 0: no hidden signal yet
        assert not torch.equal(w0, net.blocks[0][0].weight)
    assert not torch.equal(net.head.weight.grad, torch.zeros_like(net.head.weight))


def test_random_resized_crop_flip_samples_inside_the_image():
    torch.manual_seed(0)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_resized_crop_flip(x, 8)
    assert out.shape == (64, 1, 8, 8)
    assert out.min() >= 0 and out.max() <= 15  # only values of the image (bilinear, border)
    full = random_resized_crop_flip(x, 4, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = torch.flip(x, dims=[3])
    same = [(torch.allclose(o, x[0]) or torch.allclose(o, flipped[0])) for o in full]
    assert all(same)  # full-size crop: the image or its mirror, exactly
    assert 10 < sum(torch.allclose(o, flipped[0]) for o in full) < 54  # about half are flipped


def test_cross_entropy_gradient_matches_softmax_minus_onehot():
    logits = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0])
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    torch.testing.assert_close(g, (logits.softmax(1) - F.one_hot(y, 3)) / 5)
