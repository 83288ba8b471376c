"""The `llmcycle` command: one subcommand per lifecycle stage.

Every stage takes `--config RECIPE` (a YAML file, or the name of a shipped recipe) followed by any
number of `key=value` overrides; `llmcycle <stage> --help` lists every key with its default.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmcycle import __version__
from llmcycle.config import describe_fields, dump_yaml, load_config
from llmcycle.config import field_help as F
from llmcycle.errors import LlmcycleError
from llmcycle.logs import setup_logging
from llmcycle.paths import check_model_dir


def _options_epilog(cls: type) -> str:
    rows = describe_fields(cls)
    width = max(len(k) for k, *_ in rows)
    lines = ["recipe keys (override any with key=value; default in brackets):"]
    for key, tp, default, help_text in rows:
        lines.append(f"  {key:<{width}}  {help_text} [{default!r}] ({tp})")
    return "\n".join(lines)


def _step_list() -> str:
    from llmcycle.data.readers import READERS
    from llmcycle.data.steps import step_names

    return ("\n\nreaders (inputs[].type): " + ", ".join(sorted(READERS))
            + "\nsteps: " + ", ".join(step_names()) + "\n(parameters: docs/data-readers.md, docs/data-filters.md, docs/data-dedup.md)")


def _add_recipe_args(p: argparse.ArgumentParser, default_recipe: str | None) -> None:
    p.add_argument("--config", "-c", default=default_recipe, metavar="RECIPE",
                   help=f"recipe YAML file or shipped recipe name (default: {default_recipe or 'built-in defaults'})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. train.lr=3e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def _load_recipe(cls: type, recipe: str | None, args: argparse.Namespace):
    """The checked recipe, or None after printing it for --print-config."""
    cfg = load_config(cls, recipe, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return None
    return cfg


@dataclass
class TokenizerTrainConfig:
    out_dir: str = F("runs/tokenizer", "where tokenizer.json and tokenizer_config.json are written")
    corpus: str = F("python", "'python' (embedded corpus), or a .jsonl/.txt file or folder")
    kind: Literal["bpe", "wordpiece", "unigram"] = F("bpe", "tokenizer model")
    vocab_size: int = F(4096, "vocabulary size including special tokens")
    min_frequency: int = F(2, "minimum frequency of a merge / token")
    heldout_fraction: float = F(0.05, "documents held out to measure compression")
    max_bytes: int | None = F(None, "cap on corpus bytes")
    model_max_length: int = F(2048, "model_max_length written to tokenizer_config.json")


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from llmcycle.artifacts.manifest import write_manifest
    from llmcycle.data.pycorpus import split_heldout
    from llmcycle.data.sources import load_documents
    from llmcycle.tokenizer.train import bytes_per_token, train_tokenizer

    cfg = _load_recipe(TokenizerTrainConfig, args.config, args)
    if cfg is None:
        return 0
    t0 = time.time()
    docs = load_documents(cfg.corpus, cfg.max_bytes)
    train_docs, val_docs = split_heldout(docs, cfg.heldout_fraction)
    print(f"corpus: {len(docs)} documents, {len(train_docs)} for training, {len(val_docs)} held out")
    tok = train_tokenizer((d.text for d in train_docs), kind=cfg.kind, vocab_size=cfg.vocab_size,
                          min_frequency=cfg.min_frequency, model_max_length=cfg.model_max_length)
    out = Path(cfg.out_dir)
    tok.save_pretrained(out)
    bpt = bytes_per_token(tok, [d.text for d in val_docs]) if val_docs else float("nan")
    from dataclasses import asdict

    from llmcycle.data.document import corpus_hash

    write_manifest(out, stage="tokenizer", config=asdict(cfg), inputs={"corpus": cfg.corpus,
                   "corpus_sha256": corpus_hash(docs)}, metrics={"heldout_bytes_per_token": bpt,
                   "vocab_size": tok.vocab_size, "seconds": time.time() - t0})
    print(f"tokenizer: {cfg.kind}, {tok.vocab_size} tokens, {bpt:.3f} bytes/token on held-out text "
          f"[{time.time() - t0:.1f}s]")
    print(f"wrote {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from llmcycle.data.config import DataConfig

    if args.executor:
        args.overrides.append(f"executor={args.executor}")
    if args.ray_address:
        args.overrides.append(f"ray_address={args.ray_address}")
    if args.workers is not None:
        args.overrides.append(f"workers={args.workers}")
    cfg = _load_recipe(DataConfig, args.config, args)
    if cfg is None:
        return 0
    from llmcycle.data.run import check_config, run_data

    if args.check:
        plan = check_config(cfg)
        print(f"recipe ok: {len(plan.tasks)} tasks, steps: {', '.join(n for n, _ in plan.steps) or 'none'}")
        return 0
    args.data_work = Path(cfg.out_dir) / "work"
    if args.fresh:
        import shutil

        shutil.rmtree(Path(cfg.out_dir) / "work", ignore_errors=True)
    run_data(cfg)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from llmcycle.train.config import PretrainConfig

    cfg = _load_recipe(PretrainConfig, args.config, args)
    if cfg is None:
        return 0
    args.checkpoint_roots = [Path(cfg.out_dir) / "checkpoints"]
    from llmcycle.train.pretrain.loop import pretrain

    pretrain(cfg, resume=args.resume)
    return 0


def _posttrain_command(module: str, config: str, func: str):
    """`llmcycle sft|reward|dpo|ppo|grpo`: load the recipe, run the trainer, resume on --resume."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        cfg = _load_recipe(getattr(importlib.import_module("llmcycle.train.config"), config), args.config, args)
        if cfg is None:
            return 0
        args.checkpoint_roots = [Path(cfg.out_dir) / "checkpoints"]
        getattr(importlib.import_module(module), func)(cfg, resume=args.resume)
        return 0

    return run


# (command, module, config class, function, help)
POSTTRAIN_COMMANDS = (
    ("sft", "llmcycle.train.posttrain.sft", "SFTConfig", "sft",
     "supervised fine-tuning on conversations / instructions (loss on assistant tokens)"),
    ("reward", "llmcycle.train.posttrain.reward", "RewardConfig", "train_reward",
     "train a reward model (scalar head, Bradley-Terry) on preference pairs"),
    ("dpo", "llmcycle.train.posttrain.dpo", "DPOConfig", "dpo",
     "preference tuning: DPO, IPO, hinge, robust, SimPO, ORPO, KTO"),
    ("ppo", "llmcycle.train.rl.ppo", "PPOConfig", "ppo",
     "online RL from a reward model with a value model (PPO, KL-penalised, GAE)"),
    ("grpo", "llmcycle.train.rl.grpo", "GRPOConfig", "grpo",
     "online RL from verifiable rewards: groups of samples per prompt (GRPO)"),
)


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: the lifecycle graph from one recipe (llmcycle/lifecycle/)."""
    from llmcycle.lifecycle import LifecycleConfig

    if args.recipe and "=" in args.recipe:  # `llmcycle run pretrain.train.lr=1e-3`: an override, not a recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = "default"
    cfg = _load_recipe(LifecycleConfig, args.recipe, args)
    if cfg is None:
        return 0
    from llmcycle.lifecycle import Lifecycle

    lc = Lifecycle(cfg)
    args.checkpoint_roots = [lc.dir(s) / "checkpoints" for s in lc.stages]
    results = lc.run(from_stage=args.from_stage)
    print("\nsummary")
    for name, value in summary_lines(results):
        print(f"  {name:<28} {value}")
    print(f"  {'model':<28} {lc.final_model()} (model card: README.md)")
    return 0


def summary_lines(records: dict[str, dict]) -> list[tuple[str, str]]:
    """The run's summary from its stage records: a line per stage (minutes and its `Stage.headline`
    numbers), then the lines of their own each stage adds (`Stage.summary`)."""
    from llmcycle.lifecycle import stages

    ran = [(stages.get(s), r) for s, r in records.items()]
    lines = [(f"{st.name} ({r.get('seconds', 0) / 60:.1f} min)", ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in st.headline(r).items()))
        for st, r in ran if st.headline is not None]
    return lines + [line for st, r in ran for line in st.summary(r)]


def cmd_generate(args: argparse.Namespace) -> int:
    from llmcycle.serve.engine import LLM
    from llmcycle.serve.sampling import SamplingParams
    from llmcycle.tokenizer import Tokenizer

    model_dir, loras = args.model_dir, {}
    if (Path(model_dir) / "adapter_config.json").is_file():  # a LoRA adapter: run it over its base
        from llmcycle.optimize.merge import adapter_base

        model_dir, loras = adapter_base(args.model_dir), {"adapter": args.model_dir}
    check_model_dir(model_dir)
    # The adapter directory's tokenizer when it has one: its chat template is the one it was tuned with.
    tok = Tokenizer.from_pretrained(args.model_dir if (Path(args.model_dir) / "tokenizer.json").is_file() else model_dir)
    if args.chat:
        ids, _ = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt, add_special_tokens=True)
    # The serving engine is the generator: the same sampling, stop handling and text as `llmcycle serve`.
    # One request needs a KV pool for one sequence, not a server's budget.
    block_size = 16
    llm = LLM(model_dir, tokenizer=tok, block_size=block_size, max_num_seqs=1, lora_modules=loras,
              num_blocks=max(1, -(-(len(ids) + args.max_new_tokens) // block_size)))
    context = llm.engine.max_model_len
    max_tokens = min(args.max_new_tokens, context - len(ids))
    if max_tokens < 1:
        raise LlmcycleError(f"the prompt ({len(ids)} tokens) leaves no room in the model's context of {context}.")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=args.seed, max_tokens=max_tokens,
                            stop_token_ids=list(tok.end_of_turn_ids))
    try:
        params.validate()
    except ValueError as e:
        raise LlmcycleError(str(e)) from None
    answer = llm.generate([ids], params, lora_name="adapter" if loras else None)[0].outputs[0].text
    # A chat answer is a turn of its own: glued to the prompt it read as one run-on sentence.
    print(f"user: {args.prompt}\nassistant: {answer.strip()}" if args.chat else args.prompt + answer)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, plus a "did you mean" for a misspelled subcommand or choice (Python < 3.14 has none)."""

    def error(self, message: str):
        import re

        from llmcycle.config import did_you_mean

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            message += did_you_mean(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
        super().error(message)


def _add_run(p: argparse.ArgumentParser) -> None:
    from llmcycle.lifecycle.stages import names

    p.description = (f"Run the lifecycle graph ({' -> '.join(names())}) into runs/<name>/<stage>/; "
                     "the report stage writes report.md, report.html and a model card in every model directory. Up-to-date stages are "
                     "skipped, an interrupted one resumes. Stage sections take every key of the "
                     "stage's own command (llmcycle data / pretrain / sft / dpo --help), prefixed: "
                     "data.tokenizer.vocab_size=8192, pretrain.train.max_steps=100, sft.train.lr=1e-3; "
                     "their out_dir and model keys (and pre-training's data and tokenizer, with a data "
                     "stage) are set by the graph. Shipped recipes: default (CPU, minutes), smoke (the "
                     "whole graph in miniature, to check an install), gpu.")
    p.add_argument("recipe", nargs="?", default="default", help="recipe YAML or shipped name (default: default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", default=None,
                   help=f"redo this stage and every stage after it ({', '.join(names())})")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=cmd_run)


def _add_tokenizer(p: argparse.ArgumentParser) -> None:
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tp = tsub.add_parser("train", help="train a BPE / WordPiece / Unigram tokenizer with a chat template",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=_options_epilog(TokenizerTrainConfig))
    _add_recipe_args(tp, None)
    tp.set_defaults(func=cmd_tokenizer_train)


def _add_data(p: argparse.ArgumentParser) -> None:
    from llmcycle.data.config import DataConfig

    p.epilog = _options_epilog(DataConfig) + _step_list()
    _add_recipe_args(p, "data")
    p.add_argument("--executor", choices=["local", "ray"], help="where tasks run (default: the recipe's, local)")
    p.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (default: start a local one)")
    p.add_argument("--workers", type=int, metavar="N", help="processes / Ray CPUs (default: all cores)")
    p.add_argument("--check", action="store_true", help="check the recipe (readers, steps, paths) and exit")
    p.add_argument("--fresh", action="store_true", help="discard finished tasks of earlier runs and start over")
    p.set_defaults(func=cmd_data)


def _add_pretrain(p: argparse.ArgumentParser) -> None:
    from llmcycle.train.config import PretrainConfig

    p.epilog = _options_epilog(PretrainConfig)
    _add_recipe_args(p, "tiny")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.set_defaults(func=cmd_pretrain)


def _add_posttrain(module: str, config: str, func: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        import importlib

        p.epilog = _options_epilog(getattr(importlib.import_module("llmcycle.train.config"), config))
        _add_recipe_args(p, None)
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
        p.set_defaults(func=_posttrain_command(module, config, func))

    return add


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory, or a LoRA adapter directory (run over its base)")
    p.add_argument("--prompt", default="def", help="text to continue (default: 'def')")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.set_defaults(func=cmd_generate)


def _add_serve(p: argparse.ArgumentParser) -> None:
    from llmcycle.serve.config import ServeConfig as S

    p.description = ("Serve one or more model directories (each its own engine) with the OpenAI "
                     "API (/v1/completions, /v1/chat/completions, /v1/models) and Anthropic's "
                     "(/v1/messages), /health, /metrics, "
                     "a chat page at / and a monitoring dashboard at /dashboard (every request is logged: "
                     "llmcycle monitor). SIGTERM/SIGINT drain running requests, then exit. Options come "
                     "from a recipe (--config, keys below) with key=value overrides; the flags override both.")
    p.epilog = _options_epilog(S)
    p.add_argument("items", nargs="*", metavar="MODEL|key=value",
                   help="a model directory, or NAME=DIR to choose its name (these replace the recipe's models); "
                        "key=value overrides a recipe key")
    p.add_argument("--config", "-c", default=None, metavar="RECIPE",
                   help="recipe YAML file or shipped recipe name, e.g. serve (default: built-in defaults)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    # Flags default to "not given" so that only the ones on the command line override the recipe.
    none = argparse.SUPPRESS
    p.add_argument("--host", default=none, help=f"address to listen on (default: {S.host})")
    p.add_argument("--port", type=int, default=none, help=f"port (default: {S.port})")
    p.add_argument("--keys", metavar="DB", default=none,
                   help="API key database (llmcycle keys create ...): keys required")
    p.add_argument("--request-log", metavar="DB|auto|off", default=none,
                   help="SQLite request log (default: auto, beside --keys or in ~/.local/state/llmcycle)")
    p.add_argument("--kv-cache-mb", type=int, default=none,
                   help=f"KV cache budget per model in MiB (default: {S.kv_cache_mb})")
    p.add_argument("--block-size", type=int, default=none, help=f"tokens per KV block (default: {S.block_size})")
    p.add_argument("--max-num-seqs", type=int, default=none, help=f"sequences per batch (default: {S.max_num_seqs})")
    p.add_argument("--max-num-batched-tokens", type=int, default=none,
                   help=f"tokens per step (default: {S.max_num_batched_tokens})")
    p.add_argument("--chunk-size", type=int, default=none, help="prefill chunk length (default: token budget)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=none,
                   help="disable prefix caching")
    p.add_argument("--registered", action="append", metavar="NAME", default=none,
                   help="a registry name to serve (llmcycle registry; repeat for more): NAME follows its production "
                        "alias or A/B split, NAME@ALIAS or NAME@N one version; moving an alias switches without a "
                        "restart. The registry is the request log's database unless registry=DB says otherwise")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR", default=none,
                   help="LoRA adapters (PEFT directories) served by name over the model, as vLLM's flag; "
                        "a JSON item {\"name\", \"path\", \"base_model_name\"} picks the base among several")
    p.add_argument("--draft-model", metavar="DIR", default=none,
                   help="a smaller model with the same tokenizer for speculative decoding (all served models)")
    p.add_argument("--num-speculative-tokens", type=int, default=none,
                   help=f"draft tokens proposed per step with --draft-model (default: {S.num_speculative_tokens})")
    p.add_argument("--max-waiting", type=int, default=none,
                   help=f"requests allowed to wait; more get 503 (default: {S.max_waiting})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=none,
                   help="weights and KV dtype (default: as saved)")
    p.add_argument("--device", default=none, help="cpu, cuda, cuda:1 ... (default: cuda if present, else cpu)")
    p.add_argument("--threads", type=int, default=none, help="torch CPU threads, kept fixed (default: the CPUs this process may use, following those other "
                   "processes leave free)")
    p.add_argument("--log-level", default=none, help=f"uvicorn log level (default: {S.log_level})")
    p.add_argument("--ray-replicas", type=int, metavar="N", default=none,
                   help="run each model's engine as N Ray Serve replicas behind this server (pip install "
                        "'llmcycle[ray]'); ray_autoscaling in a recipe scales them on queue length")
    p.add_argument("--tool-call-parser", choices=["auto", "hermes", "llama3_json"], default=none,
                   help="how tool calls are found in answers (default: auto, from each model's chat template)")
    p.add_argument("--ssl-certfile", metavar="PEM", default=none,
                   help="serve https with this certificate chain (with --ssl-keyfile), as uvicorn's flag")
    p.add_argument("--ssl-keyfile", metavar="PEM", default=none, help="the certificate's private key")
    p.add_argument("--ssl-ca-certs", metavar="PEM", default=none,
                   help="require client certificates that chain to these CAs (mutual TLS)")
    p.add_argument("--max-n", type=int, default=none,
                   help=f"most sequences per prompt (n, best_of); more get 400 (default: {S.max_n})")
    p.add_argument("--max-prompts", type=int, default=none,
                   help=f"most prompts in one completion request (default: {S.max_prompts})")
    p.add_argument("--max-stop", type=int, default=none, help=f"most stop strings per request (default: {S.max_stop})")
    p.add_argument("--max-body-mb", type=float, default=none,
                   help=f"largest request body in MiB; larger ones get 413 (default: {S.max_body_mb:g})")
    p.add_argument("--drain-timeout", type=float, default=none,
                   help=f"seconds SIGTERM waits for running requests before exiting 2 (default: {S.drain_timeout:g})")
    p.set_defaults(func=cmd_serve)


def _add_eval(p: argparse.ArgumentParser) -> None:
    from llmcycle.eval.cli import add_eval_arguments, eval_main

    p.description = ("Suite v1 on a causal LM directory, or --compare A B as a regression gate "
                     "(exit 1 when B is worse beyond --threshold). See docs/eval.md.")
    add_eval_arguments(p)
    p.set_defaults(func=eval_main)


def _add_lineage(p: argparse.ArgumentParser) -> None:
    from llmcycle.artifacts.lineage import add_lineage_arguments, lineage_main

    p.description = ("Walk a model directory's manifests back to the data, re-hashing every "
                     "artifact on the way; exit 1 when one was modified after it was recorded.")
    add_lineage_arguments(p)
    p.set_defaults(func=lineage_main)


def _add_quantize(p: argparse.ArgumentParser) -> None:
    from llmcycle.optimize.quantize_cli import add_quantize_arguments

    add_quantize_arguments(p)


def _add_merge(p: argparse.ArgumentParser) -> None:
    from llmcycle.optimize.merge import add_merge_arguments

    add_merge_arguments(p)


def _add_export(p: argparse.ArgumentParser) -> None:
    from llmcycle.optimize.gguf import add_export_arguments

    add_export_arguments(p)


def _add_monitor(p: argparse.ArgumentParser) -> None:
    from llmcycle.monitor.cli import add_monitor_arguments

    add_monitor_arguments(p)


def _add_audit(p: argparse.ArgumentParser) -> None:
    from llmcycle.monitor.audit import add_audit_arguments

    add_audit_arguments(p)


def _add_keys(p: argparse.ArgumentParser) -> None:
    from llmcycle.serve.auth import add_keys_arguments, keys_main

    p.description = ("API keys for `llmcycle serve --keys DB`: create (with limits, a budget and a role), list, "
                     "revoke. Keys are stored as hashes; each change is recorded in the audit trail beside the "
                     "database. See docs/serve-keys.md.")
    add_keys_arguments(p)
    p.set_defaults(func=keys_main)


def _add_improve_command(module: str, builder: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        import importlib

        getattr(importlib.import_module(f"llmcycle.improve.{module}"), builder)(p)

    return add


# (command, help, builder). A builder adds the command's arguments, epilog and function; build_parser runs
# only the chosen command's builder, so `llmcycle data --help` never imports torch or the trainers.
COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("run", "run the whole lifecycle from one recipe (default: embedded corpus, tiny model)", _add_run),
    ("tokenizer", "train tokenizers", _add_tokenizer),
    ("data", "collect, clean, deduplicate, tokenize and shard text (local or Ray)", _add_data),
    ("pretrain", "pre-train a causal or masked LM (torchrun for many processes)", _add_pretrain),
    *((name, help_text, _add_posttrain(module, config, func))
      for name, module, config, func, help_text in POSTTRAIN_COMMANDS),
    ("generate", "continue a prompt with a model directory", _add_generate),
    ("serve", "serve model directories behind OpenAI- and Anthropic-compatible HTTP APIs", _add_serve),
    ("eval", "evaluate a model (bits/byte, multiple choice, exact match), or gate B against A", _add_eval),
    ("merge", "fold a LoRA adapter into its base model: a plain Hugging Face model directory", _add_merge),
    ("quantize", "quantize a model: int8, int4 (RTN or GPTQ), W8A8, NF4 (compressed-tensors / bitsandbytes formats)", _add_quantize),
    ("export", "write a model for another runtime: GGUF for llama.cpp (edge devices)", _add_export),
    ("lineage", "the chain from a model back to its raw sources, verified by content hashes", _add_lineage),
    ("keys", "create, list and revoke API keys for `llmcycle serve --keys`", _add_keys),
    ("audit", "verify or list the hash-chained audit trail of keys, servers and (optionally) requests", _add_audit),
    ("monitor", "read serve's request log: usage (tokens, cost, latency) by key, model, route, day; export; drift", _add_monitor),
    ("registry", "register model versions, move aliases (production, challenger, ...) that serve follows live",
     _add_improve_command("cli", "add_registry_arguments")),
    ("ab", "A/B tests between registered versions: start a split, report with significance, end",
     _add_improve_command("cli", "add_ab_arguments")),
    ("feedback", "export user feedback and labels as preference pairs and SFT data", _add_improve_command(
        "cli", "add_feedback_arguments")),
    ("label", "pairwise labelling: import items, annotator agreement and quality report, export pairs",
     _add_improve_command("label_cli", "add_label_arguments")),
    ("improve", "one gated turn: feedback -> DPO -> eval gate -> register @challenger -> A/B -> promote",
     _add_improve_command("loop", "add_improve_arguments")),
)


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `llmcycle` parser. Every command is listed; only `command`'s arguments are built (all of them when
    `command` is None), because building one imports what that stage needs."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="llmcycle", formatter_class=fmt,
        description="The whole life of a language model: data, tokenizer, pre-training, and on.",
    )
    parser.add_argument("--version", action="version", version=f"llmcycle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    for name, help_text, add in COMMANDS:
        # allow_abbrev=False: a misspelt flag (`--thread 2`) is an error, not silently `--threads 2`.
        p = sub.add_parser(name, help=help_text, formatter_class=fmt, allow_abbrev=False)
        if command is None or command == name:
            add(p)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from llmcycle.serve.config import ServeConfig

    keys = {f.name for f in dataclasses.fields(ServeConfig)}
    # A positional item is a recipe override when what precedes "=" names a recipe key (engine.x: a key
    # with a section); otherwise it is a model, DIR or NAME=DIR.
    overrides = [a for a in args.items if a.partition("=")[1] and a.partition("=")[0].split(".")[0] in keys]
    models = [a for a in args.items if a not in overrides]
    cfg = load_config(ServeConfig, args.config, overrides)
    flags = {k: v for k, v in vars(args).items() if k in keys}
    cfg = dataclasses.replace(cfg, **flags, **({"models": models} if models else {}))
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    for spec in cfg.models + ([cfg.draft_model] if cfg.draft_model else []):
        name, sep, path = spec.partition("=")
        check_model_dir(path if sep else spec)
    cfg.validate()

    from llmcycle.serve.server import run_server

    run_server(cfg)
    return 0


# The directories that commands implemented in modules of their own open, with check_model_dir's
# arguments: checked here, before dispatch, so they get the same "not a model directory" wording.
CHECKED_DIRS = {
    "eval": (lambda a: [a.model, *(a.compare or []), a.judge], {}),
    "lineage": (lambda a: [] if _file_artifact(a.model_dir) else [a.model_dir],
                {"what": "artifact", "marker": "manifest.json"}),
}


def _file_artifact(path: str) -> bool:
    """A one-file artifact (a GGUF export with FILE.manifest.json): lineage reads it, not a directory."""
    from llmcycle.artifacts.lineage import file_artifact

    return file_artifact(path) is not None


def check_dirs(args: argparse.Namespace) -> None:
    """Raise LlmcycleError (one wording) for the first directory of CHECKED_DIRS[command] that is not one."""
    dirs, kw = CHECKED_DIRS.get(args.command, (lambda a: [], {}))
    for d in dirs(args):
        if d is not None:
            check_model_dir(d, **kw)


def _latest_checkpoint(roots: list[Path]) -> Path | None:
    """The newest published checkpoint under any of `roots` (each `<out_dir>/checkpoints`), by its `latest`."""
    from llmcycle.train.core.checkpoint import LATEST

    markers = [r / LATEST for r in roots if (r / LATEST).is_file()]
    if not markers:
        return None
    newest = max(markers, key=lambda m: m.stat().st_mtime)
    return newest.parent / newest.read_text().strip()


def interrupted_message(args: argparse.Namespace | None, argv: list[str]) -> str:
    """What Ctrl-C leaves behind: the latest checkpoint and the command that continues from it.

    `llmcycle run` resumes an interrupted stage by itself, so its resume command is the same command;
    the standalone trainers refuse an out_dir with checkpoints unless given --resume."""
    import shlex

    if getattr(args, "data_work", None) is not None:  # the data stage keeps every finished task
        again = [a for a in argv if a != "--fresh"]
        return (f"llmcycle: interrupted; finished tasks are kept in {args.data_work}\n"
                f"continue with: llmcycle {shlex.join(again)}")
    roots = getattr(args, "checkpoint_roots", None) if args is not None else None
    if roots is None:  # not a training command, or interrupted before its recipe was read
        return "llmcycle: interrupted"
    resume = list(argv)
    if args.command != "run" and "--resume" not in resume:
        resume.append("--resume")
    ckpt = _latest_checkpoint(roots)
    where = f"latest checkpoint: {ckpt}" if ckpt else "no checkpoint was written yet"
    again = "resume with" if ckpt else "start again with"
    return f"llmcycle: interrupted; {where}\n{again}: llmcycle {shlex.join(resume)}"


def _quiet_broken_pipe() -> int:
    """`llmcycle lineage | head`: the reader left. Point stdout at /dev/null so the interpreter's final flush
    does not raise again, and exit as a process killed by SIGPIPE would (128 + 13)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    setup_logging()  # progress to stdout, warnings to stderr (llmcycle/logs.py)
    try:
        parser = build_parser(_chosen_command(argv) or "")
        args, extra = parser.parse_known_args(argv)
        # argparse takes a command's positional items in one run: `serve DIR --port 1 key=value` leaves
        # key=value over. Words (not options) after the flags belong with the items given before them.
        if extra and isinstance(getattr(args, "items", None), list) and not any(x.startswith("-") for x in extra):
            args.items.extend(extra)
        elif extra:  # named by the command's own parser, so its usage line is the one shown
            subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            subs.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        check_dirs(args)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, while we can still handle it
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except LlmcycleError as e:
        print(f"llmcycle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(args, argv), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
