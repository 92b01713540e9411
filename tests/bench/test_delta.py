"""``python -m mmrec.bench delta`` runs end to end on CPU at toy size (its figures mean
something only on a GPU; this keeps the command working)."""

import json

from mmrec.bench.__main__ import main


def test_delta_benchmark_compares_the_op_with_the_loop(tmp_path):
    out = tmp_path / "delta.json"
    assert main(["delta", "--tokens", "64", "--lengths", "32", "--heads", "2", "--head-dims", "8", "--chunk", "16",
                 "--precision", "highest", "--device", "cpu", "--warmup", "0", "--repeat", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["impl"], r["pass"]) for r in rows] == [("op", "fwd"), ("op", "fwd+bwd"), ("loop", "fwd"), ("loop", "fwd+bwd")]
    assert all(r["batch"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    for op, loop in zip(rows[:2], rows[2:]):
        assert op["over_loop"] == op["tokens_per_s"] / loop["tokens_per_s"]
        assert op["rel_err_vs_loop"] < 1e-5  # outputs, then every input's gradient
