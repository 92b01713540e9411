"""``python -m mmrec.bench host`` runs end to end on CPU at toy size (there every call is
synchronous, so its figures mean something only on a GPU; this keeps the command working)."""

import json

from mmrec.bench.__main__ import main
from mmrec.bench.host import GOAL_OPS, OPS


def test_host_benchmark_times_every_op_and_the_baseline(tmp_path):
    out = tmp_path / "host.json"
    assert main(["host", "--batch", "1", "--length", "40", "--dim", "128", "--heads", "2", "--calls", "2",
                 "--rounds", "3", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {(r["op"], r["impl"], r["pass"]): r for r in payload["results"]}
    for op in OPS:
        for pass_ in ("fwd", "fwd+bwd"):
            row = rows[op, "op", pass_]
            assert row["host_ms"] > 0 and row["host_loop_ms"] > 0 and row["gpu_ms"] is None
            assert row["host_ms_range"][0] <= row["host_ms"] <= row["host_ms_range"][1]
    for op in GOAL_OPS:  # the backward op alone, as autograd calls it
        assert rows[op, "op", "bwd"]["host_ms"] > 0
    assert ("linear_scan", "torch.cumsum (baseline)", "fwd+bwd") in rows
    assert payload["goal_host_ms"] == 0.1 and payload["length"] == 40
