"""``python -m mmrec.bench delta`` runs end to end on CPU at toy size (its figures mean
something only on a GPU; this keeps the command working)."""

import json

import torch

from mmrec.bench.__main__ import main


def test_delta_benchmark_compares_the_op_with_the_loop(tmp_path):
    out = tmp_path / "delta.json"
    assert main(["delta", "--tokens", "64", "--lengths", "32", "--heads", "2", "--head-dims", "8", "--chunk", "16",
                 "--precision", "highest", "--device", "cpu", "--warmup", "0", "--repeat", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    bf16 = "op, bf16 intermediates"
    assert [(r["impl"], r["pass"]) for r in rows] == [("op", "fwd"), ("op", "fwd+bwd"), (bf16, "fwd"), (bf16, "fwd+bwd"),
                                                      ("loop", "fwd"), ("loop", "fwd+bwd")]
    assert all(r["batch"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    for op, loop in zip(rows[:4], rows[4:] * 2):
        assert op["over_loop"] == op["tokens_per_s"] / loop["tokens_per_s"]
    assert rows[0]["rel_err_vs_loop"] < 1e-5 and rows[1]["rel_err_vs_loop"] < 1e-5  # outputs, then every gradient
    assert 1e-5 < rows[2]["rel_err_vs_loop"] < 2e-2 and 1e-5 < rows[3]["rel_err_vs_loop"] < 2e-2  # rounded to bf16


def _fake_fla(monkeypatch, chunk_gated_delta_rule, chunk_delta_rule=None):
    """Install ``fla.ops.gated_delta_rule`` holding ``chunk_gated_delta_rule`` (and
    ``fla.ops.delta_rule`` holding ``chunk_delta_rule``, when given)."""
    import sys
    import types

    names = ("fla", "fla.ops", "fla.ops.gated_delta_rule") + (("fla.ops.delta_rule",) if chunk_delta_rule else ())
    modules = {name: types.ModuleType(name) for name in names}
    modules["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = chunk_gated_delta_rule
    if chunk_delta_rule:
        modules["fla.ops.delta_rule"].chunk_delta_rule = chunk_delta_rule
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


ARGS = ["delta", "--tokens", "64", "--lengths", "32", "--heads", "2", "--head-dims", "8", "--chunk", "16",
        "--precision", "highest", "--device", "cpu", "--warmup", "0", "--repeat", "1"]


def test_fla_baseline_is_called_with_the_same_recurrence(tmp_path, monkeypatch):
    """A stand-in with fla's documented signature and meaning (layout [B, T, H, D], ``g`` the
    log decay, ``o = scale · S_tᵀ q_t``), computed by the token-by-token reference: the
    benchmark's adapter must pass it what makes it equal the loop."""
    from mmrec.ops.delta_rule import naive_delta_rule

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
        o, state = naive_delta_rule(q, k, v, beta, g, initial_state, scale=scale)
        return o, state if output_final_state else None

    _fake_fla(monkeypatch, chunk_gated_delta_rule)
    out = tmp_path / "delta.json"
    assert main([*ARGS, "--dtype", "fp32", "--out", str(out)]) == 0
    rows = {(r["impl"], r["pass"]): r for r in json.loads(out.read_text())["results"]}
    for pass_ in ("fwd", "fwd+bwd"):
        assert rows["fla chunk_gated_delta_rule", pass_]["rel_err_vs_loop"] < 1e-5
        op, fla = rows["op", pass_], rows["fla chunk_gated_delta_rule", pass_]
        assert op["over_fla"] == op["tokens_per_s"] / fla["tokens_per_s"]
    assert main([*ARGS, "--no-baselines", "--out", str(out)]) == 0
    assert not any(r["impl"].startswith("fla") for r in json.loads(out.read_text())["results"])
    # bf16 v: fla gets q, k and β in bf16 too (cast before timing), the op keeps them float32
    assert main([*ARGS, "--dtype", "bf16", "--out", str(out)]) == 0
    rows = {(r["impl"], r["pass"]): r for r in json.loads(out.read_text())["results"]}
    assert rows["fla chunk_gated_delta_rule", "fwd"]["qk_dtype"] == "bfloat16" and rows["op", "fwd"]["qk_dtype"] == "float32"
    assert 1e-4 < rows["fla chunk_gated_delta_rule", "fwd"]["rel_err_vs_loop"] < 0.05  # the bf16 rounding of q, k, β


def test_an_fla_that_refuses_the_device_is_reported_not_fatal(tmp_path, monkeypatch):
    def refuses(**kwargs):
        raise RuntimeError("gated delta rule needs triton >= 3.7.1 on Hopper\nmore")

    _fake_fla(monkeypatch, refuses)
    out = tmp_path / "delta.json"
    assert main([*ARGS, "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["results"] if r["impl"].startswith("fla")]
    assert [r["error"] for r in rows] == ["RuntimeError: gated delta rule needs triton >= 3.7.1 on Hopper"] * 2


def test_an_fla_that_fails_to_import_is_reported(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name.startswith("fla"):
            raise ImportError("fla needs triton >= 3.7")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    out = tmp_path / "delta.json"
    assert main([*ARGS, "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["results"] if r["impl"].startswith("fla")]
    assert [r["error"] for r in rows] == ["ImportError: fla needs triton >= 3.7"] * 4  # two baselines, two passes


def test_the_ungated_fla_baseline_is_timed_not_checked(tmp_path, monkeypatch):
    """fla's delta rule without the decay: a different recurrence, so its speed is reported
    against the op and its outputs are not compared with the loop's."""
    from mmrec.ops.delta_rule import naive_delta_rule

    def refuses(**kwargs):
        raise RuntimeError("gated backward needs triton >= 3.7.1 on Hopper")

    def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False):
        o, state = naive_delta_rule(q, k, v, beta, torch.zeros_like(beta), initial_state, scale=scale)
        return o, state if output_final_state else None

    _fake_fla(monkeypatch, refuses, chunk_delta_rule)
    out = tmp_path / "delta.json"
    assert main([*ARGS, "--dtype", "fp32", "--out", str(out)]) == 0
    rows = {(r["impl"], r["pass"]): r for r in json.loads(out.read_text())["results"]}
    for pass_ in ("fwd", "fwd+bwd"):
        op, ungated = rows["op", pass_], rows["fla chunk_delta_rule (α = 1)", pass_]
        assert "rel_err_vs_loop" not in ungated and "error" in rows["fla chunk_gated_delta_rule", pass_]
        assert op["over_fla_ungated"] == op["tokens_per_s"] / ungated["tokens_per_s"] and "over_fla" not in op


def test_the_callers_float32_matmul_precision_is_kept(tmp_path):
    torch.set_float32_matmul_precision("medium")
    assert main([*ARGS, "--precision", "high", "--no-baselines", "--out", str(tmp_path / "d.json")]) == 0
    assert torch.get_float32_matmul_precision() == "medium"
