"""fdfa.adapter: a user's own nn.Module (and torchvision's models) as blocks and head, the probe
check that refuses what would not reproduce the module's forward, in one line each."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fdfa.adapter import TorchvisionNet, Wrapped
from fdfa.models import hidden_shapes
from fdfa.rules import BP
from tests.helpers import (
    USER_BLOCKS as BLOCKS,
)
from tests.helpers import (
    USER_HEAD as HEAD,
)
from tests.helpers import (
    UserNet,
    compose_config,
    make_batch,
    synthetic_overrides,
)


def test_bp_through_the_adapter_gives_loss_backward_on_the_users_module():
    torch.manual_seed(0)
    net = UserNet()
    plain = copy.deepcopy(net)
    model = Wrapped(net, BLOCKS, HEAD, (3, 16, 16), 10)
    x, y = make_batch((3, 16, 16), n=8, classes=10, seed=3)
    BP(model).train_step(x, y)
    F.cross_entropy(plain(x), y).backward()
    named = dict(net.named_parameters())
    for name, p in plain.named_parameters():
        assert named[name].grad is not None, name
        torch.testing.assert_close(named[name].grad, p.grad, rtol=1e-5, atol=1e-7)
    for a, b in zip(net.buffers(), plain.buffers()):  # BatchNorm statistics moved alike
        torch.testing.assert_close(a, b)


def test_the_parts_are_the_modules_own():
    net = UserNet()
    model = Wrapped(net, BLOCKS, HEAD, (3, 16, 16))
    assert model.num_classes == 10  # from the module's output
    assert {id(p) for p in model.parameters()} == {id(p) for p in net.parameters()}
    assert model.module is net and "module" not in dict(model.named_children())
    assert hidden_shapes(model) == [(8, 8, 8), (16, 4, 4)]


@pytest.mark.parametrize(
    "blocks, head, message",
    [
        (  # a wrong order within a block: the first part whose input differs is named (a fresh
            # BatchNorm in eval mode is about the identity, so act's input still matches)
            [["conv1", "act", "bn1"], "layer"],
            HEAD,
            r"model.blocks\[0\]: part 'bn1' gets another input than UserNet.forward gives it .*"
            r"list the parts in the order forward calls them \(conv1, bn1, act, layer, pool, fc\)",
        ),
        (  # blocks swapped
            ["layer", ["conv1", "bn1", "act"]],
            HEAD,
            r"model.blocks\[0\]: part 'layer' gets another input .*\(shape \(2, 3, 16, 16\), "
            r"in forward \(2, 8, 8, 8\)\)",
        ),
        (  # torch.flatten left out
            BLOCKS,
            ["pool", "fc"],
            r"model.head: part 'fc' gets another input .*insert 'flatten' before it",
        ),
        (  # a name that is no part
            [["conv1", "bn1", "relu"], "layer"],
            HEAD,
            r"model.blocks\[0\]: UserNet has no part 'relu'; its top-level parts are conv1, bn1, "
            r"act, layer, pool, fc",
        ),
        (  # a part left out that holds parameters
            [["conv1", "act"], "layer"],
            HEAD,
            r"UserNet's parameters bn1.weight, bn1.bias belong to no part",
        ),
        (  # the head misses the pool: the last output differs
            BLOCKS,
            ["flatten", "fc"],
            r"model.head: part 'fc' gets another input .*\(shape \(2, 256\), in forward \(2, 16\)",
        ),
    ],
)
def test_probe_check_refuses_in_one_line_naming_the_part(blocks, head, message):
    with pytest.raises(ValueError, match=message) as err:
        Wrapped(UserNet(), blocks, head, (3, 16, 16))
    assert "\n" not in str(err.value)


def test_probe_check_refuses_a_head_that_misses_the_end():
    class Scaled(UserNet):
        def forward(self, x):
            return 2 * super().forward(x)  # forward does more than call its parts

    with pytest.raises(ValueError, match="model.head: the parts in order end in another output"):
        Wrapped(Scaled(), BLOCKS, HEAD, (3, 16, 16))


def test_a_class_or_partial_is_built_with_the_datas_classes():
    model = Wrapped(UserNet, BLOCKS, HEAD, (3, 16, 16), num_classes=7)
    assert model.num_classes == 7 and model.head.fc.out_features == 7
    with pytest.raises(ValueError, match=r"gives 10 outputs per sample, the data has 4 classes"):
        Wrapped(UserNet(10), BLOCKS, HEAD, (3, 16, 16), num_classes=4)


def test_model_wrapped_trains_from_the_command_line_config(tmp_path):
    from fdfa.train import train

    overrides = synthetic_overrides(
        "model=wrapped",
        "model.module._target_=tests.test_adapter.UserNet",
        "+model.module.channels=1",
        "model.blocks=[[conv1,bn1,act],layer]",
        "model.head=[pool,flatten,fc]",
        "algorithm=fdfa",
        "trainer.max_steps=3",
        "metrics.every_n_steps=2",
    )
    summary = train(compose_config(overrides), tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 3


@pytest.mark.parametrize(
    "arch, feedback_at, blocks",
    [
        ("resnet18", "stage", 4),
        ("resnet18", "block", 8),
        pytest.param("resnet34", "stage", 4, marks=pytest.mark.slow),
        pytest.param("resnet50", "stage", 4, marks=pytest.mark.slow),
        pytest.param("vgg11_bn", "stage", 7, marks=pytest.mark.slow),  # 5 conv stages + 2 FC
        pytest.param("vgg11_bn", "block", 10, marks=pytest.mark.slow),  # 8 convs + 2 FC
    ],
)
def test_torchvision_models_have_their_blocks_found(arch, feedback_at, blocks):
    shape = (1, 32, 32)  # one channel: the first conv adapted (VGG's 5 pools need 32x32)
    model = TorchvisionNet(shape, 10, arch, feedback_at)
    assert len(model.blocks) == blocks and model.num_classes == 10
    x, y = make_batch(shape, n=2, classes=10)
    assert model(x).shape == (2, 10)


def test_a_forward_that_fails_on_the_probe_says_so_in_one_line():
    with pytest.raises(
        ValueError, match=r"VGG.forward fails on a probe batch of shape \(2, 1, 28,"
    ):
        TorchvisionNet((1, 28, 28), 10, "vgg11_bn")


def test_torchvision_refuses_unknown_and_unsupported_models():
    with pytest.raises(ValueError, match="model.arch='resnet19' is no torchvision classification"):
        TorchvisionNet((3, 32, 32), 10, "resnet19")
    with pytest.raises(ValueError, match="model=torchvision finds the blocks of ResNet and VGG"):
        TorchvisionNet((3, 32, 32), 10, "squeezenet1_0")
