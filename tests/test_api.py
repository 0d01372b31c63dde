"""fdfa's plain-PyTorch API (fdfa/api.py): the documented loop on a user's own module for every
rule, BP's .grad against loss.backward(), the same first step as the config path, state_dict
round trips, metrics on the side, autocast, the Lightning example, and the import's weight."""

import ast
import copy
import importlib.util
import io
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import fdfa
import fdfa.api
from fdfa.metrics import AlignmentMetrics
from tests.helpers import CONF, REPO, compose_config, synthetic_overrides

SHAPE = (3, 32, 32)  # the documented loop's input_shape
CLASSES = 4


class MyNet(nn.Module):
    """A network as a user writes it (plain nn.Module, torch.flatten in forward), with the part
    names the documented loop uses."""

    def __init__(self, num_classes=CLASSES, input_shape=SHAPE):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(x, 1))


BLOCKS = [["conv1", "bn1", "relu"], "layer1", "layer2"]
HEAD = ["pool", "flatten", "fc"]


def prototype_data(n=256, shape=SHAPE, noise=1.0, seed=0):
    """Each class a fixed random colour (one value per channel, over the whole image); samples
    add Gaussian noise to every pixel."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(CLASSES, shape[0], *[1] * (len(shape) - 1), generator=g)
    prototypes = prototypes.expand(CLASSES, *shape)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return prototypes[y] + noise * torch.randn(n, *shape, generator=g), y


def loader_of(x, y, batch_size=32):
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def documented_loop() -> str:
    """The loop of fdfa/api.py's docstring (the docs page shows the same lines), as code."""
    doc = fdfa.api.__doc__
    block = doc.split("::\n\n", 1)[1].split("\n\n- ", 1)[0]
    return textwrap.dedent(block)


def run_documented_loop(name, loader, seed=0) -> dict:
    """Execute the documented loop on MyNet with rule ``name`` (the loop as it is for fdfa; for
    the others its rule line alone reads ``fdfa.rule(name, model)``); returns its variables."""
    code = documented_loop()
    if name != "fdfa":
        code, n = re.subn(r"rule = fdfa\.rule\(.*\)", f"rule = fdfa.rule({name!r}, model)", code)
        assert n == 1
    torch.manual_seed(seed)
    namespace = {"my_module": MyNet(), "loader": loader}
    loader.namespace = namespace
    exec(code, namespace)
    return namespace


class RecordingLoader:
    """Batches for the loop, for ``epochs`` epochs; records the loop's ``loss`` after each step."""

    def __init__(self, x, y, epochs):
        self.batches = [batch for _ in range(epochs) for batch in loader_of(x, y)]
        self.namespace, self.losses = {}, []

    def __iter__(self):
        for batch in self.batches:
            yield batch  # the loop's body runs here
            self.losses.append(self.namespace["loss"].item())


def test_the_documented_loop_is_the_one_of_the_issue():
    code = documented_loop()
    assert code.startswith("import torch\nimport fdfa\n")
    assert "out, loss = rule.step(x, y)" in code and code.rstrip().endswith("opt.zero_grad()")
    assert len(code.strip().splitlines()) < 20


EPOCHS = 4


@pytest.mark.parametrize("name", list(fdfa.api.RULES))
def test_the_documented_loop_trains_a_users_module_with_every_rule(name):
    """4 epochs of 8 steps; the training loss the loop returns falls by a quarter from the first
    epoch's mean to the last's for BP, DFA, DKP, FDFA (measured, seeds 0-3: by 43-99%); every
    rule trains the user's module in place and stays finite."""
    x, y = prototype_data()
    loader = RecordingLoader(x, y, EPOCHS)
    torch.manual_seed(0)
    untrained = MyNet()  # the loop's my_module before training
    ns = run_documented_loop(name, loader)
    model, rule = ns["model"], ns["rule"]
    assert isinstance(rule, fdfa.api.RULES[name]) and rule.model is model
    assert model.module is ns["my_module"]  # the user's own module, trained in place
    assert all(torch.isfinite(p).all() for p in model.parameters())
    trained = ns["my_module"].state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in untrained.state_dict().items())
    per_epoch = torch.tensor(loader.losses).view(EPOCHS, -1).mean(1)
    assert torch.isfinite(per_epoch).all()
    if name in ("bp", "dfa", "dkp", "fdfa"):
        assert per_epoch[-1] < 0.75 * per_epoch[0], per_epoch


@pytest.mark.parametrize(
    "loss_fn",
    [None, lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1), nn.MultiMarginLoss()],
    ids=["cross_entropy", "label_smoothing", "nn_module_loss"],
)
def test_bp_fills_grad_as_loss_backward_on_the_unwrapped_module(loss_fn):
    torch.manual_seed(0)
    mine = MyNet()
    plain = copy.deepcopy(mine)
    x, y = prototype_data(n=16, seed=1)
    rule = fdfa.rule("bp", fdfa.wrap(mine, BLOCKS, HEAD, SHAPE))
    out, loss = rule.step(x, y, loss_fn)
    expected_out = plain(x)
    expected = (loss_fn or F.cross_entropy)(expected_out, y)
    expected.backward()
    torch.testing.assert_close(out, expected_out.detach())
    torch.testing.assert_close(loss, expected.detach())
    named = dict(mine.named_parameters())
    for key, p in plain.named_parameters():
        torch.testing.assert_close(named[key].grad, p.grad, rtol=1e-5, atol=1e-7)
    assert "loss" not in vars(rule)  # the rule's own cross-entropy is back


@pytest.mark.parametrize("name", ["dfa", "fdfa", "fg_a", "fa"])
def test_a_loss_fn_gives_the_head_its_exact_gradient_and_the_loss(name):
    torch.manual_seed(0)
    model = fdfa.wrap(MyNet(), BLOCKS, HEAD, SHAPE)
    x, y = prototype_data(n=16, seed=2)

    def loss_fn(out, y):
        return F.mse_loss(out.softmax(1), F.one_hot(y, CLASSES).float())

    reference = copy.deepcopy(model)
    out, loss = fdfa.rule(name, model).step(x, y, loss_fn)
    head_in = reference.blocks[2](reference.blocks[1](reference.blocks[0](x))).detach()
    expected = loss_fn(reference.head(head_in), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(model.head.fc.weight.grad, reference.head.fc.weight.grad)


def test_the_api_and_the_config_take_the_same_first_step(tmp_path):
    """fdfa.rule + the user's own SGD against the trainer's run of the same config: after one
    step (same seed, same batch) the parameters and the feedback are equal, bit for bit."""
    from fdfa.train import Run, seed_everything

    cfg = compose_config(
        synthetic_overrides(
            "algorithm=fdfa",
            "algorithm.perturbation=rademacher",
            "model=wrapped",
            "model.module._target_=tests.test_api.MyNet",
            "model.blocks=[[conv1,bn1,relu],layer1,layer2]",
            "model.head=[pool,flatten,fc]",
            "optimizer=sgd",
            "optimizer.lr=0.05",
            "trainer.max_steps=1",
            "trainer.device=cpu",
            "seed=3",
        )
    )
    run = Run(cfg, tmp_path / "run").setup()
    run.fit()
    trained = run.rule.state_dict()

    seed_everything(3)
    data = run.data  # the same batches: fdfa's data, not part of what is compared
    model = fdfa.wrap(MyNet(CLASSES, (1, 8, 8)), BLOCKS, HEAD, (1, 8, 8))
    rule = fdfa.rule("fdfa", model, perturbation="rademacher")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True)
    x, y = next(data.train_batches(data.epoch_permutation()))
    rule.step(x, y)
    opt.step()
    opt.zero_grad()
    mine = rule.state_dict()
    assert mine.keys() == trained.keys()
    for key, value in mine.items():
        if torch.is_tensor(value):
            assert torch.equal(value, trained[key]), key
    assert all(b.abs().sum() > 0 for b in rule.feedback)  # B_l started at 0 and learned


EXP_STEP = ["exp_avg", "exp_avg_sq", "step"]


def train_steps(rule, opt, batches):
    for x, y in batches:
        rule.step(x, y)
        opt.step()
        opt.zero_grad()


def fresh(name, seed):
    torch.manual_seed(seed)
    model = fdfa.wrap(MyNet(CLASSES, (1, 8, 8)), BLOCKS, HEAD, (1, 8, 8))
    rule = fdfa.rule(name, model)
    return rule, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


@pytest.mark.parametrize("name", ["fdfa", "dkp", "fg_a", "brsf", "kp"])
def test_state_dict_round_trips_a_rule_mid_training(name):
    """Save rule and optimizer after 3 steps, load them into fresh objects (other seed, other
    generator state), continue: bit for bit the uninterrupted run (feedback optimizer, RNG)."""
    x, y = prototype_data(n=6 * 16, shape=(1, 8, 8), seed=4)
    batches = list(zip(x.split(16), y.split(16)))
    straight, straight_opt = fresh(name, seed=0)
    train_steps(straight, straight_opt, batches)

    first, first_opt = fresh(name, seed=0)
    train_steps(first, first_opt, batches[:3])
    saved = io.BytesIO()
    torch.save({"rule": first.state_dict(), "opt": first_opt.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)  # as a checkpoint file is read
    resumed, resumed_opt = fresh(name, seed=1)
    torch.manual_seed(12345)  # the process's generator elsewhere: the state brings the rule's
    resumed.load_state_dict(state["rule"])
    resumed_opt.load_state_dict(state["opt"])
    train_steps(resumed, resumed_opt, batches[3:])
    ours, theirs = resumed.state_dict(), straight.state_dict()
    for key, value in theirs.items():
        if torch.is_tensor(value):
            assert torch.equal(ours[key], value), key


def test_a_state_dict_of_model_and_feedback_alone_still_loads():
    """last.ckpt of an earlier fdfa holds the model and the feedback only (its trainer saved the
    feedback optimizer beside): it loads, and leaves the rule's optimizer and generator alone."""
    rule, _ = fresh("fdfa", seed=0)
    x, y = prototype_data(n=16, shape=(1, 8, 8))
    rule.step(x, y)
    state = rule.state_dict()
    own = [k for k in state if k.startswith(("rng.", "feedback_optimizer.state."))]
    assert sorted(own) == [
        *(f"feedback_optimizer.state.{i}.{k}" for i in range(3) for k in EXP_STEP),
        "rng.cpu",
    ]
    other, _ = fresh("fdfa", seed=1)
    other.step(x, y)
    kept = copy.deepcopy(other.feedback_optimizer.state_dict())
    generator = torch.get_rng_state()
    other.load_state_dict({k: v for k, v in state.items() if k not in own})
    assert all(torch.equal(a, b) for a, b in zip(other.feedback, rule.feedback))
    assert torch.equal(torch.get_rng_state(), generator)
    for i, values in kept["state"].items():
        for k, v in values.items():
            assert torch.equal(other.feedback_optimizer.state_dict()["state"][i][k], v)


def test_a_state_of_another_rule_is_refused_as_every_state_dict_that_does_not_fit():
    fdfa_rule, _ = fresh("fdfa", seed=0)
    fdfa_rule.step(*prototype_data(n=16, shape=(1, 8, 8)))
    dfa_rule, _ = fresh("dfa", seed=0)
    with pytest.raises(RuntimeError, match="Unexpected key.*feedback_optimizer.state.0.exp_avg"):
        dfa_rule.load_state_dict(fdfa_rule.state_dict())


def test_the_users_optimizer_never_steps_the_feedback():
    """SGD over rule.parameters() (feedback included, as a LightningModule's self.parameters()
    would give) trains exactly as over model.parameters(): step() leaves no .grad on feedback."""
    x, y = prototype_data(n=48, shape=(1, 8, 8), seed=5)
    batches = list(zip(x.split(16), y.split(16)))
    results = []
    for over_rule in (False, True):
        rule, _ = fresh("dkp", seed=0)
        params = rule.parameters() if over_rule else rule.model.parameters()
        opt = torch.optim.SGD(params, lr=0.05, weight_decay=1e-2)
        train_steps(rule, opt, batches)
        assert all(b.grad is None for b in rule.feedback)
        results.append(rule.state_dict())
    for key, value in results[0].items():
        if torch.is_tensor(value):
            assert torch.equal(value, results[1][key]), key


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda m: fdfa.rule("fdfaa", m), "name='fdfaa' is no fdfa rule (did you mean 'fdfa'?)"),
        (lambda m: fdfa.rule("dkp", m, feedback_rate=1e-3), "dkp has no option 'feedback_rate'"),
        (lambda m: fdfa.rule("dfa", m, feedback_lr=1e-3), "dfa has no option 'feedback_lr'"),
        (lambda m: fdfa.rule("fdfa", m, perturbation="uniform"), "perturbation must be"),
        (lambda m: fdfa.rule("fdfa", m, feedback_lr=-1.0), "feedback_lr must be a finite"),
        (lambda m: fdfa.rule("fg_w", m, n_directions=0), "n_directions must be an integer >= 1"),
        (lambda m: fdfa.rule("fg_a", m, per_sample="yes"), "per_sample must be True or False"),
        (lambda m: fdfa.rule("kp", m, feedback_optimizer=0.1), "feedback_optimizer must build"),
        (lambda m: fdfa.rule("bp", m.module), "model must be a block network, got a MyNet"),
        (lambda m: fdfa.wrap(MyNet(), BLOCKS, ["pool", "fc"], SHAPE), "head: part 'fc' gets"),
        (lambda m: fdfa.wrap(MyNet(), ["conv"], HEAD, SHAPE), "blocks[0]: MyNet has no part"),
        (lambda m: fdfa.wrap(MyNet(), BLOCKS, HEAD), "input_shape is required"),
        (lambda m: fdfa.rule("bp", m).step(*prototype_data(2), loss_fn="ce"), "loss_fn must be"),
        (
            lambda m: fdfa.metrics.alignment(fdfa.rule("bp", m), None, None, jacobian_metrics=1),
            "jacobian_metrics must be True or False",
        ),
    ],
)
def test_a_wrong_argument_gives_one_value_error_naming_it(call, argument):
    model = fdfa.wrap(MyNet(), BLOCKS, HEAD, SHAPE)
    with pytest.raises(ValueError) as info:
        call(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith(argument), message
    if argument.startswith("name="):  # the valid names are listed
        assert message.endswith(
            "rules: bp, dfa, dkp, fdfa, fg_w, fg_a, fa, kp, usf, brsf, frsf, drtp"
        )
    if argument.startswith("dkp"):
        assert message.endswith("its options: feedback_lr, feedback_decay")


def test_the_rules_are_the_configs_rules_with_the_configs_options():
    """RULES holds exactly conf/algorithm/<name>.yaml's rules, each the class of its _target_,
    and every key of that file is an option fdfa.rule takes under the same name."""
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (CONF / "algorithm").glob("*.yaml")}
    assert set(fdfa.api.RULES) == set(files)
    for name, node in files.items():
        cls = fdfa.api.RULES[name]
        assert f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}" == node["_target_"], name
        defaults = fdfa.options(name)
        assert set(node) - {"_target_"} <= set(defaults), name
        for key, value in node.items():  # the API's defaults are the config's
            if key != "_target_" and not str(value).startswith("$"):
                default = defaults[key]
                assert (float(value) if isinstance(default, float) else value) == default, key


@pytest.mark.parametrize("name", ["bp", "fdfa", "dkp", "fg_w", "brsf"])
def test_alignment_is_the_clis_metrics_and_leaves_the_step_alone(name):
    x, y = prototype_data(n=48, shape=(1, 8, 8), seed=6)
    batches = list(zip(x.split(16), y.split(16)))
    runs = []
    for measured in (False, True):
        rule, opt = fresh(name, seed=0)
        for bx, by in batches:
            rule.step(bx, by)
            if measured:
                metrics = fdfa.metrics.alignment(rule, bx, by)
                reference = AlignmentMetrics(every_n_steps=None).measure(rule, bx, by)
                assert metrics == reference
            opt.step()
            opt.zero_grad()
        runs.append((rule.state_dict(), torch.get_rng_state()))
    (plain, rng_plain), (with_metrics, rng_metrics) = runs
    assert torch.equal(rng_plain, rng_metrics)
    for key, value in plain.items():
        if torch.is_tensor(value):
            assert torch.equal(value, with_metrics[key]), key
    if name == "bp":
        assert metrics["align/mean_cos"] == pytest.approx(1.0)
    if name == "fdfa":
        assert "estimator/conv3/jacobian_rel_mse" in metrics and "feedback/conv1/cos" in metrics


@pytest.mark.parametrize("name", list(fdfa.api.RULES))
def test_under_bfloat16_autocast_the_rule_keeps_its_state_in_float32(name):
    """What the docs claim: the forward runs in bfloat16, .grad and the rule's own state stay
    float32 and finite; BP's gradient is close to float32's."""
    x, y = prototype_data(n=32, shape=(1, 8, 8), seed=7)
    rule, _ = fresh(name, seed=0)
    reference = copy.deepcopy(rule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = rule.step(x, y)
        rule.step(x, y)  # a second step: the feedback optimizers' state exists now
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    for p in [*rule.parameters(), *rule.model.parameters()]:
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    if name == "bp":
        reference.step(x, y)
        reference.step(x, y)
        grads = [
            torch.cat([p.grad.flatten() for p in r.model.parameters()]) for r in (rule, reference)
        ]
        assert F.cosine_similarity(*grads, dim=0) > 0.99


def test_importing_the_api_loads_no_config_sweep_or_logging_library():
    code = textwrap.dedent(
        """
        import sys
        import torch
        from torch import nn
        import fdfa
        net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
        model = fdfa.wrap(net, blocks=[["0", "1", "2"]], head="3", input_shape=(3, 4))
        rule = fdfa.rule("fdfa", model)
        x, y = torch.randn(4, 3, 4), torch.tensor([0, 1, 2, 0])
        rule.step(x, y)
        fdfa.metrics.alignment(rule, x, y)
        rule.load_state_dict(rule.state_dict())
        heavy = ("hydra", "omegaconf", "optuna", "wandb")
        print(sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_import_fdfa_alone_loads_nothing_of_the_api():
    code = "import sys, fdfa; print('torch' in sys.modules, 'fdfa.api' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "False False", done.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("pytorch_lightning") is None,
    reason="PyTorch Lightning is the optional extra fdfa[lightning]",
)
def test_the_lightning_example_trains_as_the_plain_loop():
    spec = importlib.util.spec_from_file_location(
        "lightning_loop", REPO / "examples" / "lightning_loop.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    x, y = prototype_data(n=80, shape=(1, 8, 8), seed=8)
    loader = loader_of(x, y, batch_size=16)
    plain, plain_opt = fresh("fdfa", seed=0)
    train_steps(plain, plain_opt, loader)
    lightning_rule, _ = fresh("fdfa", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = example.fit(lightning_rule, loader, max_steps=5)
    assert module.rule is lightning_rule
    ours = lightning_rule.state_dict()
    for key, value in plain.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(ours[key], value), key


def test_the_docs_page_shows_the_loop_that_the_tests_run():
    """docs/own-loop.md's first code block is the documented loop (the same code, as ruff lays
    it out), so the page a user copies from is the loop the tests above execute."""
    page = (REPO / "docs" / "own-loop.md").read_text()
    shown = page.split("```python\n", 1)[1].split("```", 1)[0]
    assert ast.dump(ast.parse(shown)) == ast.dump(ast.parse(documented_loop()))
