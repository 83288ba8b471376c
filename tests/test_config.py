import pytest

from llmcycle.cli import TokenizerTrainConfig, main
from llmcycle.config import load_config
from llmcycle.errors import ConfigError
from llmcycle.train.config import PretrainConfig


def test_shipped_recipe_and_overrides():
    cfg = load_config(PretrainConfig, "recipes/tiny.yaml", ["train.lr=3e-4", "model.size=mini", "eval.prompts=[a, b]"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.size == "mini"
    assert cfg.eval.prompts == ["a", "b"]
    assert cfg.train.seq_len == 256  # from the recipe


def test_shipped_recipe_by_name():
    assert load_config(PretrainConfig, "tiny").out_dir == "runs/tiny"


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("train.lr=abc", "train.lr = 'abc' has the wrong type; expected float"),
    ("train.dtype=fp16", "choose one of: auto, fp32, bf16"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.compile=3", "expected bool"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_are_refused_with_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(PretrainConfig, "tiny", [override])
    assert needle in str(e.value)


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainConfig, scalar)


def test_cli_refuses_before_work_and_exits_2(capsys, tmp_path):
    code = main(["pretrain", f"out_dir={tmp_path}", "train.bogus=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.bogus'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before any work started


def test_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for key in ("train.lr", "train.objective", "checkpoint.keep", "model.size", "data.corpus"):
        assert key in out
    assert "[0.003]" in out


def test_tokenizer_train_config_defaults():
    cfg = load_config(TokenizerTrainConfig, None, ["kind=unigram", "vocab_size=1000"])
    assert cfg.kind == "unigram" and cfg.vocab_size == 1000
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(TokenizerTrainConfig, None, ["kind=sentencepiece"])


def test_model_size_checked_up_front():
    from llmcycle.model.config import SIZES

    with pytest.raises(ConfigError, match="choose one of: tiny"):
        load_config(PretrainConfig, "tiny", ["model.size=huge"])
    assert set(SIZES) == {"tiny", "mini", "small", "base", "medium", "1b"}  # the recipe's choices


def test_run_takes_overrides_without_a_recipe(capsys):
    assert main(["run", "pretrain.train.max_steps=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "name: default" in out


@pytest.mark.parametrize("name", ["tiny", "tiny-mlm", "mini"])
def test_every_shipped_recipe_is_valid(name):
    cfg = load_config(PretrainConfig, name)
    assert cfg.train.max_steps > 0 and cfg.out_dir.startswith("runs/")


def test_the_default_lifecycle_recipe_is_valid():
    from llmcycle.lifecycle import STAGE_NAMES as STAGES
    from llmcycle.lifecycle import LifecycleConfig

    cfg = load_config(LifecycleConfig, "default")
    assert cfg.name == "default" and tuple(cfg.stages) == STAGES and cfg.pretrain.train.max_steps > 0
