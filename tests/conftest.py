import os
import sys
from pathlib import Path

import pytest

# Tests run on CI's 2 cores; keep torch from oversubscribing when pytest runs subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_state_dir(tmp_path_factory):
    """Servers started by tests keep their request logs (`request_log: auto`) in a temporary directory,
    not in the user's ~/.local/state."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg_state"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A small slice of the embedded corpus, a 512-token BPE tokenizer and train/val shards, built once."""
    from llmcycle.config import load_config
    from llmcycle.train.config import PretrainConfig
    from llmcycle.train.core.distributed import DistInfo
    from llmcycle.train.pretrain.prepare import prepare_data

    out = tmp_path_factory.mktemp("tiny_data")
    cfg = load_config(PretrainConfig, None, [f"out_dir={out}", "data.max_bytes=400000", "tokenizer.vocab_size=512",
                                             "data.heldout_fraction=0.1", "train.seq_len=64"])
    prepared = prepare_data(cfg, out, DistInfo())
    return {
        "tokenizer": str(prepared.tokenizer_dir),
        "train": str(out / "data" / "train"),
        "val": str(out / "data" / "val"),
        "overrides": [f"tokenizer.path={prepared.tokenizer_dir}", f"data.train_shards={out / 'data' / 'train'}",
                      f"data.val_shards={out / 'data' / 'val'}"],
    }


def tiny_train_overrides(out_dir: Path, steps: int = 20, **extra) -> list[str]:
    base = {
        "out_dir": str(out_dir), "model.size": "tiny", "model.hidden_size": 64, "model.intermediate_size": 128,
        "model.num_hidden_layers": 2, "train.seq_len": 64, "train.batch_size": 8, "train.max_steps": steps,
        "train.warmup_steps": 5, "train.lr": 3e-3, "train.dtype": "fp32", "train.threads": 1,
        "eval.every": 10, "eval.sequences": 16, "eval.sample_every": 0, "eval.sample_tokens": 8,
        "checkpoint.every": 10, "checkpoint.keep": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_serving_model(tokenizer_dir: str | Path, out: Path, seed: int = 0, layers: int = 2, hidden: int = 64,
                       max_positions: int = 128) -> str:
    """A random-weight model directory with the tiny tokenizer, for engine and server tests.

    A wide initialisation (0.2) gives clear argmax winners, so greedy comparisons are not decided by
    rounding differences between batched and unbatched kernels."""
    import shutil

    import torch

    from llmcycle.model.config import ModelConfig
    from llmcycle.model.transformer import Transformer
    from llmcycle.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, initializer_range=0.2, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    Transformer(cfg).save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, Path(out) / f.name)
    return str(out)


def wait_until_healthy(proc, url: str, timeout: float = 60.0) -> None:
    """Wait for a `llmcycle serve` subprocess to answer /health 200; fails with its output if it exits."""
    import contextlib
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health").status_code == 200:
                return
        assert time.monotonic() < deadline, f"{url} did not answer /health within {timeout:.0f} s"
        time.sleep(0.2)


def run_cli(args: list[str], **kw):
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llmcycle", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="session")
def tiny_base_model(tiny_data, tmp_path_factory) -> str:
    """A randomly initialised 2-layer model with the tiny tokenizer: the starting point of post-training tests."""
    import shutil

    import torch

    from llmcycle.model.config import ModelConfig
    from llmcycle.model.transformer import Transformer
    from llmcycle.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("tiny_base") / "model"
    tok = Tokenizer.from_pretrained(tiny_data["tokenizer"])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    Transformer(cfg).save_pretrained(out)
    for f in Path(tiny_data["tokenizer"]).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return str(out)


def write_shards(out_dir, docs, vocab_size: int, tokenizer_hash: str, bos_id: int | None,
                 shard_tokens: int = 1 << 24, metadata: dict | None = None) -> dict:
    """Already tokenized documents (lists of ids) as a shard set; returns the sidecar dict. Only tests
    build shard sets from ids; the library tokenizes text (`tokenize_to_shards`, the data stage)."""
    from llmcycle.data.shards import ShardWriter

    with ShardWriter(out_dir, vocab_size, tokenizer_hash, bos_id, shard_tokens, metadata=metadata) as w:
        for ids in docs:
            w.add(ids)
    return w.close()


def dropped_pairs(decision: dict) -> list[tuple[int, int]]:
    """Every document a global step's decision drops, as (task, index), in order."""
    offs = decision["drop_offsets"]
    out = []
    for t in range(len(offs) - 1):
        out.extend((t, int(i)) for i in decision["drop_index"][offs[t]:offs[t + 1]])
    return out


def qwen2_byte_level_bpe(texts: list[str], vocab_size: int = 400):
    """A `tokenizers` byte-level BPE built as Qwen2's (its split regex, NFC, ChatML special tokens), trained
    on `texts`: transformers rebuilds a Qwen2 tokenizer from vocab and merges, so the tests need the real kind."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Backend(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def randomize_(model, seed: int = 0) -> None:
    """Norm weights around 1, everything else N(0, 0.1): logits of order 1, so tight tolerances are a real
    test (parity with transformers, PEFT)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by playwright (the pages at / and /dashboard)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on a free loopback port (initdb + pg_ctl; as root, run as the
    `postgres` user), its URL; skipped where PostgreSQL or psycopg is missing."""
    import shutil
    import socket
    import subprocess

    pytest.importorskip("psycopg")
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl)")
    import tempfile

    # not under pytest's own temporary folder: it is private to this user, and as root the server runs as
    # `postgres`, which must reach its data directory
    root = Path(tempfile.mkdtemp(prefix="llmcycle-pg-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root
        import pwd

        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user")
        os.chown(root, pg.pw_uid, pg.pw_gid)
        as_user = ["su", "postgres", "-s", "/bin/sh", "-c"]
    data = root / "data"

    def run(cmd: str) -> None:
        full = as_user + [cmd] if as_user else ["sh", "-c", cmd]
        subprocess.run(full, check=True, capture_output=True, timeout=120)

    run(f"initdb -D {data} -A trust -U llm")
    run(f"pg_ctl -D {data} -o '-p {port} -k {root} -c listen_addresses=127.0.0.1' -l {root}/log -w start")
    yield f"postgresql://llm@127.0.0.1:{port}/postgres"
    run(f"pg_ctl -D {data} -m immediate stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A database of its own on the test PostgreSQL server, for one test."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
