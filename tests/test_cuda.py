"""The CUDA path: each rule's step on the GPU against the same step on the CPU, and whole runs
(training, evaluation, checkpoint, resume) on the GPU. Skipped where no CUDA device is visible, as
in CI; on a GPU machine: python -m pytest tests/test_cuda.py

Tolerances: cuDNN convolutions run in TF32 by default (10-bit mantissa, relative rounding
2^-11 ~ 5e-4 per product), and summation orders differ between devices, so GPU results are
compared with the CPU's to a relative error of 1e-2 of each tensor's norm."""

import copy
import json

import pytest
import torch

from fdfa.rules import BP, BRSF, DFA, DKP, DRTP, FA, FDFA, FRSF, KP, USF
from fdfa.rules.base import dual_forward, perturbed_forward
from fdfa.train import Run, train
from tests.helpers import NETS, REPO, SHAPES, compose_config, make_batch, synthetic_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def assert_close_rel(got, expected, rel=1e-2):
    err = (got.double().cpu() - expected.double()).norm()
    assert err <= rel * expected.double().norm() + 1e-5, (err, expected.norm())  # 0-gradients


def batch(shape):
    return make_batch(shape, n=32)  # >= 100 samples of each perturbation entry's law


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("rule_cls", [BP, DFA, DKP, FA, KP, USF, BRSF, FRSF, DRTP])
def test_deterministic_rules_step_on_cuda_as_on_cpu(rule_cls, net):
    make, shape = NETS[net], SHAPES[net]
    torch.manual_seed(0)
    cpu_rule = rule_cls(make())
    if rule_cls is DKP:  # B = 0 at the start would hide the feedback path: give it values
        for b in cpu_rule.feedback:
            b.data.normal_()
    gpu_rule = copy.deepcopy(cpu_rule).cuda()
    x, y = batch(shape)
    out_cpu = cpu_rule.train_step(x, y)
    out_gpu = gpu_rule.train_step(x.cuda(), y.cuda())
    assert_close_rel(out_gpu.loss, out_cpu.loss)
    for (name, p_cpu), p_gpu in zip(cpu_rule.named_parameters(), gpu_rule.parameters()):
        assert p_gpu.is_cuda, name
        if p_cpu.grad is not None:
            assert_close_rel(p_gpu.grad, p_cpu.grad)
    if rule_cls is DKP:  # the feedback's own Adam step ran on the GPU too
        for b_cpu, b_gpu in zip(cpu_rule.feedback, gpu_rule.feedback):
            assert_close_rel(b_gpu, b_cpu)
    if rule_cls is KP:  # so did KP's (B_l takes W_l's step)
        for b_cpu, b_gpu in zip(cpu_rule.feedback_weights, gpu_rule.feedback_weights):
            assert_close_rel(b_gpu, b_cpu)


@pytest.mark.parametrize("net", NETS)
def test_fdfa_tangent_and_estimates_on_cuda_as_on_cpu(net):
    make, shape = NETS[net], SHAPES[net]
    torch.manual_seed(0)
    model = make()
    gpu_model = copy.deepcopy(model).cuda()
    x, _ = batch(shape)
    _, us, logits, t = dual_forward(model, x)  # draws the perturbations on the CPU
    _, _, gpu_logits, gpu_t = dual_forward(gpu_model, x.cuda(), [u.cuda() for u in us])
    assert_close_rel(gpu_logits.detach(), logits.detach())
    assert_close_rel(gpu_t, t)
    for j_gpu, j_cpu in zip(
        FDFA.jacobian_estimates(gpu_t, [u.cuda() for u in us]), FDFA.jacobian_estimates(t, us)
    ):
        assert_close_rel(j_gpu, j_cpu)


@pytest.mark.parametrize("net", NETS)
def test_stacked_tangents_on_cuda_as_on_cpu(net):
    """k directions in one pass (FG-A, FDFA with n_directions > 1) take the other BatchNorm
    branch: its formula runs on the GPU's saved statistics."""
    make, shape = NETS[net], SHAPES[net]
    torch.manual_seed(0)
    model = make()
    gpu_model = copy.deepcopy(model).cuda()
    x, _ = batch(shape)
    _, us, _, t = perturbed_forward(model, x, 3)
    _, _, _, gpu_t = perturbed_forward(gpu_model, x.cuda(), 3, [u.cuda() for u in us])
    assert_close_rel(gpu_t, t)


def test_perturbations_are_drawn_on_the_gpu():
    make, shape = NETS["cnn"], SHAPES["cnn"]
    model = make().cuda()
    _, us, _, t = dual_forward(model, batch(shape)[0].cuda())
    assert t.is_cuda and all(u.is_cuda for u in us)
    assert all(abs(u.std().item() - 1) < 0.2 for u in us)  # N(0, I): >= 100 samples each


@pytest.mark.parametrize(
    "algorithm", sorted(p.stem for p in (REPO / "conf/algorithm").glob("*.yaml"))
)
def test_every_rule_learns_on_cuda(tmp_path, algorithm):
    cfg = compose_config(
        synthetic_overrides(f"algorithm={algorithm}", "trainer.device=cuda", "trainer.epochs=3",
                            "optimizer.lr=1e-3", "metrics.every_n_steps=4")
    )  # fmt: skip
    run = Run(cfg, tmp_path).setup()
    summary = run.fit()
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert run.graphed.replays > 0  # the rule's step was captured as a CUDA graph
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert any("align/mean_cos" in r for r in records)  # the metrics ran on the GPU too
    if algorithm not in ("fg_w", "fg_a"):  # high-variance estimators need more than 24 steps
        assert summary["best/test/acc"] > 0.5  # 4 classes: chance is 0.25


def test_cuda_run_resumes_from_its_checkpoint(tmp_path):
    overrides = synthetic_overrides("algorithm=fdfa", "trainer.device=cuda")
    first = train(compose_config([*overrides, "trainer.epochs=2"]), tmp_path)
    resumed = train(compose_config([*overrides, "trainer.epochs=3"]), tmp_path)
    assert first["epochs"] == 2 and resumed["epochs"] == 3 and resumed["steps"] == 24
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["progress"]["epoch"] == 3


def _final_weights(run_dir):
    return torch.load(run_dir / "last.ckpt", weights_only=True, map_location="cpu")["rule"]


@pytest.mark.parametrize("algorithm", ["bp", "dfa", "dkp"])
def test_cuda_graph_replays_the_same_steps_as_eager(tmp_path, algorithm):
    """Replaying the captured step runs the same kernels on the same tensors: the weights after
    3 epochs (a capture per epoch, as the learning rate changes; eager last batches) match."""
    runs = {}
    for graph in (True, False):
        cfg = compose_config(
            synthetic_overrides(f"algorithm={algorithm}", "trainer.device=cuda",
                                "trainer.epochs=3", "dataset.train_size=324",
                                f"trainer.cuda_graph={str(graph).lower()}")
        )  # fmt: skip
        run = Run(cfg, tmp_path / str(graph)).setup()
        run.fit()
        runs[graph] = run
    assert runs[True].graphed.replays == 3 * 8 - runs[True].graphed.WARMUP_STEPS
    assert runs[False].graphed.replays == 0
    eager, graphed = _final_weights(tmp_path / "False"), _final_weights(tmp_path / "True")
    for name in eager:
        if eager[name].is_floating_point():
            assert_close_rel(graphed[name], eager[name], rel=1e-5)
        else:
            assert torch.equal(graphed[name], eager[name]), name  # BatchNorm's batch counts


def test_a_step_that_cannot_be_captured_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    original = BP.train_step

    def train_step_with_a_sync(self, x, y):
        out = original(self, x, y)
        out.loss.item()  # reads back to the CPU: not allowed while capturing
        return out

    monkeypatch.setattr(BP, "train_step", train_step_with_a_sync)
    cfg = compose_config(synthetic_overrides("algorithm=bp", "trainer.device=cuda"))
    run = Run(cfg, tmp_path).setup()
    summary = run.fit()
    assert summary["status"] == "completed" and run.graphed.replays == 0
    assert "could not be captured" in caplog.text
