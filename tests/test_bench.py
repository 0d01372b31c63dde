"""The benchmark command runs and reports what it promises (no timing is asserted)."""

import json

from fdfa.bench import main


def test_bench_reports_step_times_ratios_memory_and_metrics_overhead(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--models", "fc", "--rules", "bp", "fdfa", "--steps", "2", "--warmup", "1"]
    args += ["--epoch-rules", "--metrics-overhead", "--device", "cpu", "--out", str(out)]
    results = main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = {r["algorithm"]: r for r in results["steps"]}
    assert set(rows) == {"bp", "fdfa"} and rows["bp"]["ratio_to_bp"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows.values())
    assert rows["fdfa"]["state_mb"] > rows["bp"]["state_mb"]  # feedback + its Adam moments
    overhead = {r["algorithm"]: r for r in results["metrics"]}
    assert overhead["fdfa"]["every_n_steps"] == 1000 and overhead["fdfa"]["overhead_ratio"] > 1
    printed = capsys.readouterr().out
    assert "## fc (cpu)" in printed and "ratio_to_bp" in printed and "overhead_ratio" in printed
