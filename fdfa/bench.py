"""Speed and memory of every rule on every network, measured in one process.

    python -m fdfa.bench                          # step times on fc, cnn, alexnet + MNIST epochs
    python -m fdfa.bench --models fc cnn --steps 50 --epoch-rules bp fdfa --out bench.json

Step times are medians over ``--steps`` steps after ``--warmup`` steps, with rules interleaved
round by round so that machine noise hits them alike; ratios to BP come from the same process.
The forward-mode rules (FDFA, FG-A, FG-W) run once per ``--perturbation`` kind (gaussian,
rademacher or both), and their ``rng_share`` is the median time of the step's draws alone (timed in
the same rounds) over the median step time.
Memory: on CUDA the peak allocated during the steps; everywhere the bytes of state the rule keeps
(parameters, feedback, optimizer moments) and of its feedback tensors B_l alone (``feedback_mb``).
``--models resnet20 resnet56 vit``: the CIFAR ResNets and the small ViT on CIFAR-10 shapes.
``--metrics-overhead`` adds the cost of the alignment metrics at their default interval, as a ratio
of training time with them to training time without.
``--phases`` splits each rule's (eager) step into draw, forward, backward, feedback and optimizer
time (``PHASES``), in the same interleaved rounds: where a rule's extra time over BP goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fdfa.allocator import keep_freed_memory
from fdfa.cuda_graph import GraphedSteps
from fdfa.errors import user_errors
from fdfa.rules.base import rule_optimizers
from fdfa.rules.perturbation import KINDS
from fdfa.train import train
from fdfa.validate import CONF_DIR, validate_config

# (input shape, classes, batch) per network on the benchmark's synthetic data
SHAPES = {
    "fc": ((1, 28, 28), 10, 64),  # MNIST FC-2x800, batch 64 (the reference's run)
    "cnn": ((1, 28, 28), 10, 64),
    "cnn_ref": ((1, 28, 28), 10, 64),
    "alexnet": ((3, 224, 224), 100, 16),  # CIFAR-100 resized; batch 16 keeps CPU runs short
    "resnet20": ((3, 32, 32), 10, 32),  # CIFAR-10; batch 32 keeps CPU runs short
    "resnet56": ((3, 32, 32), 10, 32),
    "vit": ((3, 32, 32), 10, 32),
}
GPU_BATCH = {"alexnet": 128, "resnet20": 128, "resnet56": 128, "vit": 128}  # the presets' batch


def algorithms() -> list[str]:
    names = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
    return ["bp"] + [n for n in names if n != "bp"]


def perturbing(rule_name) -> bool:
    """Whether the rule draws random directions (its config has ``perturbation``)."""
    return "perturbation" in OmegaConf.load(CONF_DIR / "algorithm" / f"{rule_name}.yaml")


def _variants(rules, kinds):
    """(rule name, perturbation kind or None) for each rule: one per kind for perturbing rules."""
    return [(name, kind) for name in rules for kind in (kinds if perturbing(name) else [None])]


def _kind_override(kind):
    return [] if kind is None else [f"algorithm.perturbation={kind}"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _state_bytes(rule, optimizer) -> int:
    tensors = list(rule.state_dict().values())
    for opt in [optimizer, *rule_optimizers(rule).values()]:
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _feedback_bytes(rule) -> int:
    """The bytes of a rule's feedback tensors B_l (0 for rules without them)."""
    feedback = getattr(rule, "feedback", None)
    return 0 if feedback is None else sum(b.numel() * b.element_size() for b in feedback)


def _synthetic_batch(model_name, device, batch=None):
    """A fixed random batch of the network's benchmark shape: (x, y, batch size)."""
    shape, classes, default_batch = SHAPES[model_name]
    if device.type == "cuda":
        default_batch = GPU_BATCH.get(model_name, default_batch)
    batch = batch or default_batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return x, y, batch


def _build(model_name, rule_name, device, extra=()):
    """(config, rule, forward optimizer) as run.py would build them, seeded alike for every rule."""
    shape, classes, _ = SHAPES[model_name]
    cfg = _compose([f"algorithm={rule_name}", f"model={model_name}", *extra])
    torch.manual_seed(0)
    model = instantiate(cfg.model, input_shape=shape, num_classes=classes).to(device)
    rule = instantiate(cfg.algorithm, model=model)
    return cfg, rule, instantiate(cfg.optimizer)(model.parameters())


def _build_variants(model_name, variants, device, extra=()):
    """{(rule name, perturbation kind): (rule, forward optimizer)}, built as ``_build`` does."""
    return {
        v: _build(model_name, v[0], device, [*extra, *_kind_override(v[1])])[1:] for v in variants
    }


def _graphed_step(x, y, cuda_graph):
    """step(rule, optimizer) as the trainer takes it: a CUDA graph replay, or eager."""
    graphs = {}

    def step(rule, optimizer):
        if id(rule) not in graphs:
            graphs[id(rule)] = GraphedSteps(rule, optimizer, len(y), cuda_graph)
        graphed = graphs[id(rule)]
        if graphed.replay(x, y) is None:
            with graphed.eager():
                optimizer.zero_grad(set_to_none=True)
                rule.train_step(x, y)
                optimizer.step()

    return step


def peak_cuda_bytes(model_name, rule_name, device, x, y, steps, cuda_graph, extra=()) -> int:
    """Peak CUDA memory of one rule trained alone: model, rule state, optimizer moments, and
    what its steps allocate (a CUDA graph's memory pool included)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _, rule, optimizer = _build(model_name, rule_name, device, extra)
    step = _graphed_step(x, y, cuda_graph)
    for _ in range(steps):
        step(rule, optimizer)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_steps(
    model_name,
    rules,
    steps,
    warmup,
    device,
    batch=None,
    extra=(),
    cuda_graph=False,
    kinds=("gaussian",),
):
    """Median seconds per training step (zero_grad + train_step + optimizer.step) for each rule
    (each perturbation kind of the perturbing ones) and of its draws alone; with ``cuda_graph``
    each step is replayed as a CUDA graph, as the trainer does on a GPU."""
    x, y, batch = _synthetic_batch(model_name, device, batch)
    variants = _variants(rules, kinds)
    peak = {}
    if device.type == "cuda":  # each rule alone; the first twice (CUDA and cuBLAS set-up)
        for name, kind in [variants[0], *variants]:
            peak[name, kind] = peak_cuda_bytes(
                model_name, name, device, x, y, warmup, cuda_graph, [*extra, *_kind_override(kind)]
            )
    built = _build_variants(model_name, variants, device, extra)
    step = _graphed_step(x, y, cuda_graph)
    times = {v: [] for v in variants}
    draw_times = {v: [] for v in variants if v[1] is not None}
    for rule, optimizer in built.values():
        for _ in range(warmup):
            step(rule, optimizer)
    for _ in range(steps):  # round-robin: every rule sees the same machine conditions
        for v, (rule, optimizer) in built.items():
            _sync(device)
            t0 = time.perf_counter()
            step(rule, optimizer)
            _sync(device)
            times[v].append(time.perf_counter() - t0)
            if v in draw_times:  # the same draws as the step's, alone
                t0 = time.perf_counter()
                rule.draw_perturbations(batch)
                _sync(device)
                draw_times[v].append(time.perf_counter() - t0)
    rows = []
    bp = statistics.median(times[variants[0]])
    for v, (rule, optimizer) in built.items():
        median = statistics.median(times[v])
        draw = statistics.median(draw_times[v]) if v in draw_times else None
        rows.append(
            {
                "model": model_name,
                "algorithm": v[0],
                "perturbation": v[1],
                "batch": batch,
                "cuda_graph": cuda_graph,
                "step_ms": 1e3 * median,
                "ratio_to_bp": median / bp,
                "draw_ms": None if draw is None else 1e3 * draw,
                "rng_share": None if draw is None else draw / median,
                "state_mb": _state_bytes(rule, optimizer) / 2**20,
                "feedback_mb": _feedback_bytes(rule) / 2**20,
                "peak_cuda_mb": peak[v] / 2**20 if v in peak else None,
            }
        )
    return rows


# Where a step's time goes (``--phases``): the time spent inside these callables, each less the
# phases nested in it (FDFA's forward draws its directions: that part counts as draw only). "rest"
# is the step less all phases: zero_grad, the loss, Python between the calls.
PHASES = {
    "draw": [("rule", "draw_perturbations")],
    "forward": [
        ("rule", "dual_forward"),
        ("rule", "perturbed_forward"),
        ("rule", "local_forward"),
        ("model", "forward"),
    ],
    "backward": [("autograd", "backward"), ("autograd", "grad")],  # BP's loss.backward() too
    "feedback": [("rule", "inject_and_backward"), ("rule", "update_feedback")],  # e.B_l, Ĵ_l, B_l
    "optimizer": [("optimizer", "step")],
}


class PhaseClock:
    """Times the ``PHASES`` of one rule's steps by wrapping its callables while entered: the
    current step's exclusive seconds per phase are in ``self.now``. ``device`` is synchronised at
    every boundary (on a GPU that adds waits: an eager-step profile, not a CUDA graph's)."""

    def __init__(self, rule, optimizer, device):
        self.device, self.now, self._stack = device, {}, []
        owners = {
            "rule": rule,
            "model": rule.model,
            "optimizer": optimizer,
            "autograd": torch.autograd,
        }
        self._patches = [
            (owners[owner], attr, self._timed(phase, getattr(owners[owner], attr)))
            for phase, callables in PHASES.items()
            for owner, attr in callables
            if hasattr(owners[owner], attr)
        ]

    def _timed(self, phase, fn):
        def timed(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            self._stack.append(0.0)  # time of the phases nested in this call
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                spent = time.perf_counter() - start
                nested = self._stack.pop()
                self.now[phase] = self.now.get(phase, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1] += spent

        return timed

    def __enter__(self):
        self.now = {}
        self._saved = [(o, a, o.__dict__.get(a)) for o, a, _ in self._patches]
        for owner, attr, timed in self._patches:
            setattr(owner, attr, timed)
        return self

    def __exit__(self, *exc):
        for owner, attr, saved in self._saved:
            if saved is None:
                delattr(owner, attr)  # back to the class's method
            else:
                setattr(owner, attr, saved)


def bench_phases(model_name, rules, steps, warmup, device, kinds=("gaussian",)):
    """Median milliseconds of each of the ``PHASES`` (and the whole step) per rule, eager steps
    interleaved round by round as in ``bench_steps``."""
    x, y, batch = _synthetic_batch(model_name, device)
    built = _build_variants(model_name, _variants(rules, kinds), device)
    step = _graphed_step(x, y, cuda_graph=False)  # the eager step bench_steps times
    clocks = {v: PhaseClock(rule, optimizer, device) for v, (rule, optimizer) in built.items()}
    samples = {v: [] for v in built}
    for i in range(warmup + steps):
        for v, (rule, optimizer) in built.items():
            with clocks[v] as clock:
                _sync(device)
                t0 = time.perf_counter()
                step(rule, optimizer)
                _sync(device)
                total = time.perf_counter() - t0
            if i >= warmup:
                samples[v].append(
                    {**clock.now, "rest": total - sum(clock.now.values()), "step": total}
                )
    rows = []
    for (name, kind), rounds in samples.items():
        row = {"model": model_name, "algorithm": name, "perturbation": kind, "batch": batch}
        for phase in ["step", *PHASES, "rest"]:
            row[f"{phase}_ms"] = 1e3 * statistics.median(r.get(phase, 0.0) for r in rounds)
        rows.append(row)
    return rows


def bench_metrics_overhead(model_name, rules, device, every_n_steps=None, repeats=3):
    """Training time with the alignment metrics at the default interval over training time without:
    1 + (median seconds of one measure / every_n_steps) / median seconds of one step."""
    x, y, _ = _synthetic_batch(model_name, device)
    rows = []
    for name in rules:
        cfg, rule, optimizer = _build(model_name, name, device)
        metrics = instantiate(cfg.metrics)
        every = every_n_steps or metrics.every_n_steps
        steps, measures = [], []
        for i in range(10 + 20 * repeats):
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            rule.train_step(x, y)
            _sync(device)
            t1 = time.perf_counter()
            if i >= 10 and i % 20 == 0:
                metrics.measure(rule, x, y)
                _sync(device)
                measures.append(time.perf_counter() - t1)
            optimizer.step()
            _sync(device)
            if i >= 10:
                steps.append(time.perf_counter() - t0 - (measures[-1] if i % 20 == 0 else 0))
        step, measure = statistics.median(steps), statistics.median(measures)
        rows.append(
            {
                "model": model_name,
                "algorithm": name,
                "every_n_steps": every,
                "measure_in_steps": measure / step,
                "overhead_ratio": 1 + measure / every / step,
            }
        )
    return rows


def bench_epochs(rules, root, device, epochs=1, overrides=(), kinds=("gaussian",)):
    """MNIST FC-2 (batch 64): seconds per epoch (train + test, start-up excluded) and accuracy."""
    rows = []
    for name, kind in _variants(rules, kinds):
        cfg = _compose(
            [
                f"algorithm={name}",
                f"dataset.root={root}",
                f"trainer.epochs={epochs}",
                f"trainer.device={device.type}",
                "logger=none",
                "trainer.progress=false",
                "trainer.resume=never",
                *_kind_override(kind),
                *overrides,
            ]
        )
        # bench/, not outputs/: reports of outputs/ never see these runs; one folder per kind
        several = kind is not None and len(kinds) > 1
        out = Path("bench") / (f"{name}-{kind}" if several else name)
        summary = train(cfg, out)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows.append(
            {
                "algorithm": name,
                "perturbation": kind,
                "epochs": epochs,
                "epoch_s": summary["wall_s"] / summary["epochs"],
                "test_acc": [r["test/acc"] for r in records if "test/acc" in r],
            }
        )
    return rows


def table(rows, keys) -> str:
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# The columns each table prints (results JSON holds every field)
STEP_COLUMNS = [
    "algorithm",
    "perturbation",
    "batch",
    "step_ms",
    "ratio_to_bp",
    "rng_share",
    "state_mb",
    "feedback_mb",
    "peak_cuda_mb",
]
PHASE_COLUMNS = ["algorithm", "perturbation", "step_ms", *[f"{p}_ms" for p in PHASES], "rest_ms"]
METRICS_COLUMNS = ["model", "algorithm", "every_n_steps", "measure_in_steps", "overhead_ratio"]
EPOCH_COLUMNS = ["algorithm", "perturbation", "epochs", "epoch_s", "test_acc"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = algorithms()
    parser.add_argument("--models", nargs="+", default=["fc", "cnn", "alexnet"], choices=SHAPES)
    parser.add_argument(
        "--rules",
        nargs="+",
        default=None,
        choices=names,
        help="default: every algorithm (BP always runs: the ratios' baseline)",
    )
    parser.add_argument(
        "--perturbation",
        nargs="+",
        default=["gaussian"],
        choices=KINDS,
        help="directions of FDFA, FG-A and FG-W (each kind given is timed)",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per rule")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--epoch-rules",
        nargs="*",
        default=["bp", "dfa", "dkp", "fdfa"],
        choices=names,
        help="rules for the MNIST epoch timing (none: skip it)",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--metrics-overhead", action="store_true", help="also time the alignment metrics"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time each step's phases (draw, forward, backward, feedback, optimizer; eager)",
    )
    parser.add_argument("--data-root", default=None, help="MNIST root (default: dataset.root)")
    parser.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="on a GPU, time eager steps (default: CUDA graphs, as the trainer)",
    )
    parser.add_argument(
        "--epoch-overrides",
        nargs="*",
        default=[],
        help="config overrides for the epoch runs, e.g. trainer.cuda_graph=false",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.epoch_rules:  # a bad --epoch-overrides fails now, not after the step timings
        validate_config(_compose(args.epoch_overrides))
    keep_freed_memory()  # as run.py does: steps without page-fault storms (fdfa/allocator.py)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    rules = ["bp", *[r for r in (args.rules or names) if r != "bp"]]
    results = {"device": str(device), "torch": torch.__version__, "steps": [], "epochs": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for model_name in args.models:
        graph = device.type == "cuda" and not args.no_cuda_graph
        rows = bench_steps(
            model_name,
            rules,
            args.steps,
            args.warmup,
            device,
            cuda_graph=graph,
            kinds=args.perturbation,
        )
        results["steps"] += rows
        print(f"\n## {model_name} ({device}{', CUDA graphs' if graph else ''})\n")
        print(table(rows, STEP_COLUMNS))
    if args.phases:
        results["phases"] = []
        for model_name in args.models:
            rows = bench_phases(
                model_name, rules, args.steps, args.warmup, device, kinds=args.perturbation
            )
            results["phases"] += rows
            print(f"\n## {model_name}: phases of a step, median ms ({device}, eager)\n")
            print(table(rows, PHASE_COLUMNS))
    if args.metrics_overhead:
        results["metrics"] = []
        for model_name in args.models:
            results["metrics"] += bench_metrics_overhead(model_name, rules, device)
        print(f"\n## alignment metrics at their default interval ({device})\n")
        print(table(results["metrics"], METRICS_COLUMNS))
    if args.epoch_rules:
        root = args.data_root or _compose([]).dataset.root
        results["epochs"] = bench_epochs(
            args.epoch_rules, root, device, args.epochs, args.epoch_overrides, args.perturbation
        )
        print(f"\n## MNIST FC-2, batch 64, {args.epochs} epoch(s) ({device})\n")
        print(table(results["epochs"], EPOCH_COLUMNS))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    with user_errors(also=(HydraException,)):  # missing data, a bad --epoch-overrides: one line
        main()
