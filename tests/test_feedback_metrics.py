"""``feedback/<l>/cos`` in a trained run is the cosine of the B that the step used.

DKP, FDFA and KP update their feedback B inside ``train_step``, after the step has used it; the
metrics are taken after ``train_step``. A spy records, at every step, the weights and the B the
rule's backward actually used; the logged cosine must be that B's (to rounding), here with
feedback updates large enough that B before and after a step are far apart."""

import copy
import json

import pytest

import fdfa.rules.backward_path as backward_path
import fdfa.rules.base as base
from fdfa.metrics import (
    block_names,
    cosine,
    flat,
    output_jacobians,
    side_forward,
    weight_layer_names,
)
from fdfa.rules import BRSF, DKP, FDFA, KP
from fdfa.rules.backward_path import weight_layers
from fdfa.train import train
from tests.helpers import compose_config, synthetic_overrides

# rule -> (its class, overrides that make each step's feedback update large)
CASES = {
    "dkp": (DKP, ["algorithm.feedback_lr=0.1"]),
    # B <- the step's Ĵ, from DFA's random B at the start
    "fdfa": (
        FDFA,
        [
            "algorithm.feedback_update=ema",
            "algorithm.momentum=0",
            "algorithm.feedback_init=kaiming",
        ],
    ),
    "kp": (KP, ["optimizer.lr=0.05"]),  # B takes the forward optimizer's step
    "brsf": (BRSF, []),  # B's magnitudes are drawn afresh every step
}


def spy_on_the_feedback_used(monkeypatch, rule_cls):
    """Per step: (a copy of the model as the step saw it, the batch, the B tensors it used)."""
    steps = []
    step, project, through = rule_cls.train_step, base.project_error, backward_path.backward_through

    def train_step(self, x, y):
        steps.append((copy.deepcopy(self.model), x.clone(), []))
        return step(self, x, y)

    def project_error(e, b):
        steps[-1][2].append(b.detach().clone())
        return project(e, b)

    def backward_through(layers, feedbacks):
        steps[-1][2].extend(b.detach().clone() for b in feedbacks)
        return through(layers, feedbacks)

    monkeypatch.setattr(rule_cls, "train_step", train_step)
    monkeypatch.setattr(base, "project_error", project_error)
    monkeypatch.setattr(backward_path, "backward_through", backward_through)
    return steps


def expected_cosines(model, x, used) -> dict[str, float]:
    """feedback/<name>/cos from the B the step used, on the weights the step saw."""
    if len(used) == len(model.blocks):  # one B_l per block, against J_l
        logits, hs, taps = side_forward(model, x)
        targets = output_jacobians(logits, hs, taps)
        pairs = zip(block_names(model), used, targets)
    else:  # one B per weight layer, against its W
        names = weight_layer_names(model)
        pairs = ((names[m], b, m.weight) for m, b in zip(weight_layers(model), used))
    return {f"feedback/{n}/cos": cosine(flat([b]), flat([t])).item() for n, b, t in pairs}


@pytest.mark.parametrize("algorithm", CASES)
def test_the_logged_feedback_cosine_is_that_of_the_b_used(algorithm, tmp_path, monkeypatch):
    rule_cls, overrides = CASES[algorithm]
    steps = spy_on_the_feedback_used(monkeypatch, rule_cls)
    cfg = compose_config(
        synthetic_overrides(
            f"algorithm={algorithm}", "trainer.max_steps=3", "metrics.every_n_steps=1", *overrides
        )
    )
    train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    measured = [r for r in records if "align/mean_cos" in r]
    assert [r["step"] for r in measured] == [1, 2, 3] and len(steps) == 3
    for record, (model, x, used) in zip(measured, steps):
        expected = expected_cosines(model, x, used)
        logged = {k: v for k, v in record.items() if k.startswith("feedback/")}
        assert set(logged) == set(expected)
        for key, cos in expected.items():
            assert logged[key] == pytest.approx(cos, abs=1e-6), (record["step"], key)
