"""The quantize stage of `llmcycle run` in miniature: the final model quantized each listed way, every variant
and the model evaluated and probed in a process of its own, the trade-off table in the report, the stage
skipped when nothing changed, and a wrong variant refused before anything runs."""

import json

from test_lifecycle import miniature

from llmcycle.cli import main
from llmcycle.lifecycle import read_record

QUANT = ["quantize.variants=[int8,int4-gptq,w8a8-dynamic]", "quantize.calibration_samples=8",
         "quantize.probe_tokens=4", "quantize.probe_concurrency=4", "quantize.group_size=32"]


def test_quantize_stage_evaluates_and_probes_each_variant(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = [*miniature(tiny_data, runs, "[pretrain,sft,quantize,report]"), *QUANT]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    root = runs / "mini"
    rec = read_record(root / "quantize")
    assert rec["status"] == "done" and set(rec["inputs"]) == {"sft"}  # the final model: sft's here
    m = rec["metrics"]
    assert m["model"] == str(root / "sft" / "model")
    assert list(m["variants"]) == ["reference", "int8", "int4-gptq", "w8a8-dynamic"]
    for name, v in m["variants"].items():
        assert {"heldout_bpb", "mc_accuracy", "exact_match"} <= set(v["suite"]), name
        assert v["batch1_tok_s"] > 0 and v["concurrent_tok_s"] > 0 and v["peak_rss_mb"] > 0, name
        if name != "reference":
            manifest = json.loads((root / "quantize" / name / "manifest.json").read_text())
            assert manifest["inputs"]["model"]["path"] == m["model"], name
            assert json.loads((root / "quantize" / "eval" / f"{name}.json").read_text())["metrics"] == v["suite"]
    sizes = {n: v["weight_bytes"] for n, v in m["variants"].items()}
    assert sizes["int4-gptq"] < sizes["int8"] < sizes["reference"]
    gptq = json.loads((root / "quantize" / "int4-gptq" / "manifest.json").read_text())
    assert gptq["config"]["algorithm"] == "gptq" and "calibration" in gptq["inputs"]  # the pre-training shards

    assert "quantize (" in out and "int8 bpb" in out
    report = (root / "report.md").read_text()
    assert "## Efficiency: quantized variants of the final model" in report
    assert "| int4-gptq |" in report and "| reference |" in report
    assert "Decode tokens/s" in (root / "report.html").read_text()

    assert main(["run", *args]) == 0
    assert "[quantize] up to date" in capsys.readouterr().out


def test_a_wrong_variant_is_refused_before_anything_runs(tiny_data, tmp_path, capsys):
    args = [*miniature(tiny_data, tmp_path / "runs", "[pretrain,sft,quantize]"), "quantize.variants=[int3]"]
    assert main(["run", *args]) != 0
    assert "quantize.variants: 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mini" / "pretrain").exists()
