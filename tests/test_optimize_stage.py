"""The optimize stage of `llmcycle run` in miniature: LoRA beside the full fine-tune, both evaluated and
compared, the adapter published in PEFT's format with a manifest that lineage follows to the base, dpo
still training from sft's model, skipped when nothing changed and rerun alone when its section changes."""

import json

from test_lifecycle import miniature

from llmcycle.cli import main
from llmcycle.lifecycle import read_record

USED = ("trainable_parameters", "parameters", "trainable_share", "mean_step_seconds", "train_peak_rss_mb", "steps")


def test_optimize_stage_trains_lora_beside_sft_and_compares(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = [*miniature(tiny_data, runs, "[pretrain,sft,dpo,optimize,report]"), "optimize.lora.r=4",
            "optimize.lora.alpha=8", "optimize.lora_lr_scale=2.0"]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    root = runs / "mini"
    rec = read_record(root / "optimize")
    assert rec["status"] == "done"
    assert set(rec["inputs"]) == {"pretrain", "sft"}  # not dpo: a new dpo model does not redo LoRA
    assert rec["config"]["lora_sft"]["model"] == str(root / "pretrain" / "model")  # sft's starting model
    assert rec["config"]["lora_sft"]["train"]["lr"] == 2 * read_record(root / "sft")["config"]["train"]["lr"]

    # the adapter: PEFT's files, a manifest naming its base, and lineage walks through it to the base
    adapter = root / "optimize" / "lora" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(root / "pretrain" / "model")
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["path"] == str(root / "pretrain" / "model")
    assert main(["lineage", str(adapter)]) == 0
    assert f"model: pretrain  {root / 'pretrain' / 'model'}" in capsys.readouterr().out

    # both measured the same way: usage keys from the training core, the suite on both models
    m = rec["metrics"]
    for side in ("full", "lora"):
        assert set(USED) <= set(m[side]), side
        assert set(m[side]["suite"]) >= {"mc_accuracy", "exact_match", "heldout_bpb"}, side
        assert m[side]["mean_step_seconds"] > 0 and m[side]["train_peak_rss_mb"] > 0
    assert m["full"]["trainable_parameters"] == m["full"]["parameters"] and m["full"]["trainable_share"] == 1.0
    assert 0 < m["lora"]["trainable_parameters"] < m["full"]["trainable_parameters"] / 2
    assert m["lora"]["parameters"] == m["full"]["parameters"] + m["lora"]["trainable_parameters"]
    assert m["full"]["steps"] == m["lora"]["steps"] == 2
    sft_suite = json.loads((root / "optimize" / "eval" / "sft.json").read_text())
    assert sft_suite["metrics"] == m["full"]["suite"] and sft_suite["settings"]["limit"] == 16
    assert json.loads((root / "optimize" / "eval" / "lora.json").read_text())["metrics"] == m["lora"]["suite"]
    assert set(m["quality_ratio"]) >= {"heldout_bpb"}

    # dpo trained from sft's model, as without the stage; the final model is still dpo's
    dpo = json.loads((root / "dpo" / "model" / "manifest.json").read_text())
    assert dpo["inputs"]["model"]["path"] == str(root / "sft" / "model")
    assert f"{root / 'dpo' / 'model'} (model card" in out

    # the summary and the report compare them
    assert "LoRA vs full SFT" in out and "optimize (" in out and "trainable" in out
    report = (root / "report.md").read_text()
    assert "## Efficiency: LoRA vs full fine-tuning" in report
    for row in ("| suite: mc_accuracy |", "| trainable parameters |", "| peak RSS of training (MB) |",
                "| seconds per optimizer step |"):
        assert row in report, row
    assert "Full fine-tuning vs LoRA" in (root / "report.html").read_text()  # the chart

    # nothing changed: skipped; a new LoRA setting redoes optimize (and the report) only
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "[optimize] up to date" in out and "running" not in out
    assert main(["run", *args, "optimize.lora.r=2"]) == 0
    out = capsys.readouterr().out
    assert "[sft] up to date" in out and "[dpo] up to date" in out and "[optimize] running" in out
    assert read_record(root / "optimize")["metrics"]["lora"]["trainable_parameters"] == \
        m["lora"]["trainable_parameters"] // 2
