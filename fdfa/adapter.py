"""Any ``nn.Module`` whose top level is a sequence of parts, as fdfa's blocks and head.

    Wrapped(module, blocks=[["conv1", "bn1", "relu", "maxpool", "layer1"], "layer2"],
            head=["avgpool", "flatten", "fc"], input_shape=(3, 32, 32))

``blocks`` lists the hidden blocks in order; each is the name of a part of ``module`` (a
submodule, as ``module.get_submodule`` takes it: ``layer1``, or ``layer1.0`` inside it) or a
list of names run one after the other. ``head`` is the name or list of names that map the last
block's output to the logits. The parts are the module's own (the same parameters; nothing is
copied), so an optimizer over either holds the same tensors.

What the top level must look like: ``module(x)`` must equal running the named parts in the
order listed, each on the previous one's output. Between two parts forward may only do what a
part does; the one thing allowed besides is ``torch.flatten(x, 1)``, written as the name
``flatten`` (an ``nn.Flatten()`` fdfa inserts; a part of the module named ``flatten`` wins). Out
of reach: a network whose parts are not in sequence at the level named (a skip connection or a
concatenation across the named parts, several inputs, a part applied to a tensor other than
the previous output, parameters used by forward directly rather than through a part): name
coarser parts that contain those connections (a residual block, a whole stage), or write it as
an fdfa block network (fdfa/models.py).

Before anything trains, the constructor checks on a probe batch (two random samples, eval mode,
no gradients) that the parts in order reproduce ``module(x)``, and that every parameter belongs
to a named part; if not, ``ValueError`` says in one line which part and what to do.

``TorchvisionNet`` (``model=torchvision model.arch=resnet18``) finds the parts of torchvision's
ResNets and VGGs itself. Also: forward-mode tangent closed forms for torchvision's residual
blocks (registered with fdfa.tangents at import).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
from torch import nn

from fdfa.models import BlockNet
from fdfa.tangents import register_tangent_rule, residual_with_tangent

FLATTEN = "flatten"  # the name of torch.flatten(x, 1) between two parts
PROBE_BATCH = 2
RTOL, ATOL = 1e-4, 1e-5  # the probe's tolerance: the same ops in the same order, in float32


def _build(module, input_shape, num_classes, where="model."):
    """An nn.Module, or a class or partial (Hydra's ``_partial_: true``) called with
    ``input_shape`` and ``num_classes`` where its signature names them (``num_classes`` also
    where it takes ``**kwargs``, as torchvision's builders) and nothing binds them already."""
    if isinstance(module, nn.Module):
        return module
    if not callable(module):
        raise ValueError(
            f"{where}module must be an nn.Module or a class that builds one, got {module!r}"
        )
    bound = getattr(module, "keywords", None) or {}
    try:
        names = inspect.signature(module).parameters
    except (TypeError, ValueError):
        names = {}
    given = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    anything = any(p.kind is p.VAR_KEYWORD for p in names.values())  # **kwargs: num_classes too
    kwargs = {
        k: v
        for k, v in given.items()
        if (k in names or (anything and k == "num_classes")) and k not in bound and v is not None
    }
    built = module(**kwargs)
    if not isinstance(built, nn.Module):
        raise ValueError(f"{where}module built a {type(built).__name__}, not an nn.Module")
    return built


def _names(entry, label: str) -> list[str]:
    """A part name, or a list of them, as a list of str."""
    names = [entry] if isinstance(entry, str) else list(entry) if entry is not None else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{label} must be a part name or a list of part names, got {entry!r}")
    return names


def _part(module: nn.Module, name: str, label: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        if name == FLATTEN:
            return nn.Flatten()
        top = ", ".join(n for n, _ in module.named_children())
        raise ValueError(
            f"{label}: {type(module).__name__} has no part {name!r}; its top-level parts are "
            f"{top} (dotted names reach inside one, e.g. layer1.0)"
        ) from None


def _sequence(module, names, label) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n.replace(".", "_"), _part(module, n, label)) for n in names))


def _same(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def _uncovered_parameters(module: nn.Module, parts) -> list[str]:
    covered = {id(p) for part in parts for p in part.parameters()}
    return [n for n, p in module.named_parameters() if id(p) not in covered]


@torch.no_grad()
def check_probe(module: nn.Module, steps, input_shape, where: str = "model.") -> torch.Tensor:
    """Raise ValueError unless running ``steps`` ([(label, name, part)] in order) on a probe batch
    gives ``module``'s own output; compares each part's input with the one forward gives it.
    Returns the module's output on the probe batch."""
    cls = type(module).__name__
    ref = next(module.parameters(), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_BATCH, *input_shape, generator=g)
    if ref is not None:
        x = x.to(ref.device, ref.dtype)
    calls, order = {}, []  # part name -> its inputs in call order; names in call order

    def recorder(name):
        def hook(_, inputs):  # before the call: an in-place part (ReLU(inplace=True)) changes it
            first = inputs[0] if inputs else None
            calls.setdefault(name, []).append(first.clone() if torch.is_tensor(first) else first)
            order.append(name)

        return hook

    by_name = dict(module.named_modules())
    watched = {n for _, n, _ in steps if n in by_name} | {n for n, _ in module.named_children()}
    hooks = [by_name[n].register_forward_pre_hook(recorder(n)) for n in watched]
    was_training = module.training
    module.eval()
    try:
        try:
            expected = module(x)
        except Exception as err:  # e.g. images too small for the network's pools
            first = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(
                f"{cls}.forward fails on a probe batch of shape {tuple(x.shape)} "
                f"({type(err).__name__}: {first}); give it inputs it takes ({where}input_size "
                "resizes the images)"
            ) from None
        finally:
            for hook in hooks:
                hook.remove()
        h, used = x, {}
        for label, name, part in steps:
            if name in by_name:
                i = used[name] = used.get(name, -1) + 1
                inputs = calls.get(name, [])
                if i >= len(inputs):
                    raise ValueError(
                        f"{label}: {cls}.forward calls {name!r} {len(inputs)} time(s), not "
                        f"{i + 1}: leave it out or list the parts in the order forward calls "
                        f"them ({', '.join(order)})"
                    )
                if torch.is_tensor(inputs[i]) and not _same(h, inputs[i]):
                    hint = f"list the parts in the order forward calls them ({', '.join(order)})"
                    if h.numel() == inputs[i].numel() and _same(
                        h.reshape(inputs[i].shape), inputs[i]
                    ):
                        hint = f"insert {FLATTEN!r} before it (forward reshapes its input)"
                    raise ValueError(
                        f"{label}: part {name!r} gets another input than {cls}.forward gives it "
                        f"(shape {tuple(h.shape)}, in forward {tuple(inputs[i].shape)}); {hint}"
                    )
            try:
                h = part(h)
            except Exception as err:  # a shape that does not fit: the line names the part
                raise ValueError(
                    f"{label}: part {name!r} fails on the previous part's output of shape "
                    f"{tuple(h.shape)} ({type(err).__name__}); list the parts in the order "
                    f"{cls}.forward calls them ({', '.join(order)})"
                ) from None
    finally:
        module.train(was_training)
    if not torch.is_tensor(expected) or expected.dim() != 2:
        raise ValueError(f"{cls}.forward must give logits [batch, classes], not {type(expected)}")
    if not _same(h, expected):
        raise ValueError(
            f"{where}head: the parts in order end in another output than {cls}.forward "
            f"(shape {tuple(h.shape)}, forward {tuple(expected.shape)}); the head misses a part or "
            f"forward does more than call its parts (it calls {', '.join(order)})"
        )
    return expected


class Wrapped(BlockNet):
    """A module's named parts as fdfa's ``blocks`` and ``head``; see the module docstring.

    ``num_classes`` None: taken from the module's output. ``input_size``: the data pipeline
    resizes images to it (as for fdfa's own models); None keeps their size. ``where``: what the
    messages put before an argument's name (the config's ``model.``; ``fdfa.wrap``: nothing)."""

    def __init__(
        self, module, blocks, head, input_shape, num_classes=None, input_size=None, where="model."
    ):
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        module = _build(module, input_shape, num_classes, where)
        if isinstance(blocks, str) or not blocks:
            raise ValueError(f"{where}blocks must be a list of part names, got {blocks!r}")
        block_names = [_names(e, f"{where}blocks[{i}]") for i, e in enumerate(blocks)]
        head_names = _names(head, f"{where}head")
        seqs = [_sequence(module, n, f"{where}blocks[{i}]") for i, n in enumerate(block_names)]
        head_seq = _sequence(module, head_names, f"{where}head")
        left = _uncovered_parameters(module, [*seqs, head_seq])
        if left:
            raise ValueError(
                f"{type(module).__name__}'s parameters {', '.join(left[:3])} belong to no part "
                f"of {where}blocks or {where}head: name the parts that hold them"
            )
        steps = [
            (f"{where}blocks[{i}]", n, part)
            for i, (names, seq) in enumerate(zip(block_names, seqs))
            for n, part in zip(names, seq)
        ] + [(f"{where}head", n, part) for n, part in zip(head_names, head_seq)]
        out = check_probe(module, steps, input_shape, where)
        if num_classes is not None and out.shape[1] != num_classes:
            raise ValueError(
                f"{type(module).__name__} gives {out.shape[1]} outputs per sample, the data has "
                f"{num_classes} classes: build it with {num_classes} outputs (e.g. "
                f"+model.module.num_classes={num_classes})"
            )
        super().__init__(input_shape, out.shape[1])
        if input_size is not None:
            self.input_size = int(input_size)
        self.blocks = nn.ModuleList(seqs)
        self.head = head_seq
        self.part_names = {"blocks": block_names, "head": head_names}
        # the module itself, unregistered: its parameters are the parts' (no second state_dict key)
        object.__setattr__(self, "module", module)
        self.feedback_option = None


# --- torchvision's classification models -----------------------------------------------------

ARCH_EXAMPLES = "resnet18, resnet34, resnet50, vgg11_bn, vgg16_bn"


def _first_conv(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """The conv itself, or one like it taking ``channels`` inputs (1 for MNIST), He-initialised."""
    if conv.in_channels == channels:
        return conv
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def resnet_parts(net, feedback_at: str):
    """torchvision ResNet: the stem (conv1, bn1, relu, maxpool) joins the first block; hidden
    blocks layer1..layer4 (``stage``) or each of their residual blocks (``block``); head
    avgpool, flatten (forward's torch.flatten), fc."""
    stem = ["conv1", "bn1", "relu", "maxpool"]
    stages = [f"layer{i}" for i in range(1, 5)]
    if feedback_at == "stage":
        units = stages
    else:
        units = [f"{s}.{j}" for s in stages for j in range(len(net.get_submodule(s)))]
    return [[*stem, units[0]], *units[1:]], ["avgpool", FLATTEN, "fc"]


def vgg_parts(net, feedback_at: str):
    """torchvision VGG: ``features`` cut after each max-pool (``stage``: the conv stages) or after
    each ReLU (``block``: every conv, a following pool joining it); then avgpool, flatten and the
    classifier's two hidden layers (Linear, ReLU, Dropout) as two more blocks; head: the last
    Linear."""
    blocks, current = [], []
    for i, layer in enumerate(net.features):
        if isinstance(layer, nn.MaxPool2d) and not current and blocks:
            blocks[-1].append(f"features.{i}")
            continue
        current.append(f"features.{i}")
        ends = nn.MaxPool2d if feedback_at == "stage" else (nn.ReLU, nn.MaxPool2d)
        if isinstance(layer, ends):
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    n = len(net.classifier)
    fc = [f"classifier.{i}" for i in range(n - 1)]
    return [*blocks, ["avgpool", FLATTEN, *fc[:3]], fc[3:]], [f"classifier.{n - 1}"]


class TorchvisionNet(Wrapped):
    """A torchvision classification model by name (``weights=None``, the data's classes), its
    first conv taking the data's channels; hidden blocks found for ResNets and VGGs
    (``resnet_parts``, ``vgg_parts``; ``feedback_at``: ``stage`` or ``block``)."""

    def __init__(
        self, input_shape, num_classes, arch="resnet18", feedback_at="stage", input_size=None
    ):
        import torchvision

        if feedback_at not in ("stage", "block"):
            raise ValueError(f"model.feedback_at must be stage or block, got {feedback_at!r}")
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(
                f"model.arch={arch!r} is no torchvision classification model; e.g. {ARCH_EXAMPLES}"
            )
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        channels = int(input_shape[0])
        if isinstance(net, torchvision.models.ResNet):
            net.conv1 = _first_conv(net.conv1, channels)
            blocks, head = resnet_parts(net, feedback_at)
        elif isinstance(net, torchvision.models.VGG):
            net.features[0] = _first_conv(net.features[0], channels)
            blocks, head = vgg_parts(net, feedback_at)
        else:
            raise ValueError(
                f"model=torchvision finds the blocks of ResNet and VGG models ({ARCH_EXAMPLES}), "
                f"not of {arch}: wrap it with model=wrapped model.module._target_="
                f"torchvision.models.{arch} and name its parts in model.blocks and model.head"
            )
        super().__init__(net, blocks, head, input_shape, num_classes, input_size)
        self.arch, self.feedback_at = arch, feedback_at
        self.feedback_option = "model.feedback_at=stage" if feedback_at == "block" else None


def _register_torchvision_tangents():
    """Closed-form tangents of torchvision's BasicBlock and Bottleneck (else the generic
    forward-mode fallback would run each once per direction): the add is linear."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency of fdfa's data
        return

    def basic(m, x, t):
        main = [m.conv1, m.bn1, m.relu, m.conv2, m.bn2]
        return residual_with_tangent(main, m.downsample, x, t, after=m.relu)

    def bottleneck(m, x, t):
        main = [m.conv1, m.bn1, m.relu, m.conv2, m.bn2, m.relu, m.conv3, m.bn3]
        return residual_with_tangent(main, m.downsample, x, t, after=m.relu)

    register_tangent_rule(BasicBlock, basic)
    register_tangent_rule(Bottleneck, bottleneck)


_register_torchvision_tangents()
