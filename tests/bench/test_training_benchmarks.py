"""The training benchmarks run end to end on CPU at toy size (their figures mean
something only on a GPU; this keeps the commands working)."""

import json

from mmrec.bench.__main__ import main

TOY = ["--lengths", "32", "--tokens-per-step", "64", "--no-compile", "--steps", "1", "--device", "cpu"]


def test_model_benchmark_compares_with_the_transformer(tmp_path):
    out, chart = tmp_path / "model.json", tmp_path / "model.png"
    assert main(["model", "--recipes", "tiny", "transformer-tiny", *TOY, "--out", str(out), "--plot", str(chart)]) == 0
    assert chart.read_bytes().startswith(b"\x89PNG")
    rows = json.loads(out.read_text())["results"]
    assert [r["recipe"] for r in rows] == ["tiny", "transformer-tiny"]
    assert all(r["batch"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["speedup_vs_transformer"] > 0 and "speedup_vs_transformer" not in rows[1]


def test_recurrence_benchmark_gives_exact_as_a_fraction_of_parallel(tmp_path):
    out = tmp_path / "recurrence.json"
    assert main(["recurrence", "--recipe", "tiny", "--set", "model.n_layers=1", *TOY, "--warmup", "1",
                 "--out", str(out)]) == 0
    parallel, exact = json.loads(out.read_text())["results"]
    assert (parallel["recurrence"], exact["recurrence"]) == ("parallel", "exact")
    # every layer runs the kind timed, tiny's delta layer 0 included (exact has gate weights and
    # no input gate, so the counts differ; two builds of the delta layer would be equal)
    assert exact["parameters"] != parallel["parameters"]
    assert exact["fraction_of_parallel"] == exact["tokens_per_s"] / parallel["tokens_per_s"]
