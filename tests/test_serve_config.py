"""`llmcycle serve` reads a ServeConfig from a recipe; key=value overrides it, flags override both."""

import dataclasses

import pytest
import yaml

from llmcycle.cli import main
from llmcycle.errors import ConfigError
from llmcycle.serve.config import ServeConfig
from llmcycle.serve.protocol import RequestLimits


def resolved(argv, capsys) -> dict:
    assert main(["serve", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_recipe_then_overrides_then_flags(tmp_path, capsys):
    recipe = tmp_path / "serve.yaml"
    recipe.write_text("models: [a=/m/a]\nport: 9000\nmax_n: 4\nkv_cache_mb: 64\n")
    cfg = resolved(["--config", str(recipe), "max_n=8", "block_size=32", "--port", "9001",
                    "--no-prefix-caching"], capsys)
    assert cfg["models"] == ["a=/m/a"] and cfg["port"] == 9001 and cfg["max_n"] == 8
    assert cfg["kv_cache_mb"] == 64 and cfg["block_size"] == 32 and cfg["enable_prefix_caching"] is False
    # Models on the command line (DIR or NAME=DIR: a name that is no recipe key) replace the recipe's.
    cfg = resolved(["--config", str(recipe), "b=/m/b", "/m/c", "threads=1"], capsys)
    assert cfg["models"] == ["b=/m/b", "/m/c"] and cfg["threads"] == 1


def test_shipped_recipe_is_the_defaults():
    from llmcycle.config import load_config

    shipped = load_config(ServeConfig, "serve")
    assert dataclasses.replace(shipped, models=[]) == ServeConfig()


def test_one_source_of_defaults():
    import inspect

    from llmcycle.serve.engine import LLMEngine

    sig = inspect.signature(LLMEngine).parameters
    assert sig["block_size"].default == ServeConfig.block_size
    assert sig["kv_cache_bytes"].default == ServeConfig.kv_cache_mb * 2**20
    assert sig["max_num_seqs"].default == ServeConfig.max_num_seqs
    assert RequestLimits().max_n == ServeConfig.max_n
    assert RequestLimits().max_body_bytes == ServeConfig(models=["x"]).max_body_bytes


def test_validate_names_the_bad_key():
    with pytest.raises(ConfigError, match="max_n must be positive"):
        ServeConfig(models=["x"], max_n=0).validate()
    with pytest.raises(ConfigError, match="no model to serve"):
        ServeConfig().validate()
