"""Model cards: `README.md` in a model directory, as on the Hugging Face Hub.

A card is written from the records alone: the model's manifest and the manifests on its lineage chain
(data sources and the filter funnel, tokenizer, every training stage's configuration and metrics), plus
evaluation results when the caller has them. Trainers write one when they publish a model; `llmcycle run`
rewrites it after evaluation. The card is documentation of the manifest, so the manifest does not hash
it (`manifest.CARD`) and rewriting it never invalidates an artifact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError
from llmcycle.lineage import show_path
from llmcycle.manifest import CARD, MANIFEST

TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")
CONFIG_ROWS = {  # what a reader wants to know of each training stage, by dotted config key
    "pretrain": ("train.objective", "train.max_steps", "train.batch_size", "train.seq_len", "train.lr",
                 "train.seed"),
    "sft": ("train.max_steps", "train.epochs", "train.batch_size", "train.lr", "data.train", "data.max_length"),
    "dpo": ("loss_type", "beta", "rpo_alpha", "train.epochs", "train.batch_size", "train.lr", "data.train"),
    "reward": ("train.epochs", "train.batch_size", "train.lr", "data.train"),
    "ppo": ("train.max_steps", "train.lr", "kl_coef", "reward_model"),
    "grpo": ("train.max_steps", "train.lr", "num_generations", "reward_funcs"),
}


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join("-" if c is None else _fmt(c) for c in row) + " |" for row in rows)]


def parameter_count(model_dir: Path) -> int | None:
    """Parameters stored in model.safetensors (shapes from its header; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            total = 0
            for k in f.keys():
                n = 1
                for s in f.get_slice(k).get_shape():
                    n *= s
                total += n
            return total
    except (OSError, ValueError, RuntimeError):
        return None


def _chain(model_dir: Path) -> list[tuple[str, Path, dict]]:
    """(stage, directory, manifest) for every artifact with a manifest on the lineage chain, model first."""
    from llmcycle.lineage import trace

    out = []
    for link in trace(model_dir, verify=False):
        d = Path(link.key)
        if (d / MANIFEST).is_file():
            out.append((link.stage, d, json.loads((d / MANIFEST).read_text())))
        elif (d / "prepared.json").is_file():
            out.append(("prepared-data", d, {"metrics": json.loads((d / "prepared.json").read_text())}))
    return out


def _data_section(chain: list[tuple[str, Path, dict]]) -> list[str]:
    data = next(((d, m) for s, d, m in chain if s == "data"), None)
    if data is not None:
        d, m = data
        cfg, met = m.get("config", {}), m.get("metrics", {})
        sources = [("the embedded corpus (`python`: the documentation and standard-library source that ship "
                    "with Python)") if i.get("type") == "python" else
                   f"`{i.get('type')}`" + (f" ({', '.join(map(str, i['paths']))})" if i.get("paths") else "")
                   for i in cfg.get("inputs", [])]
        lines = ["## Training data", "", f"Made by `llmcycle data` into `{show_path(d)}` from " + ", ".join(sources)
                 + ".", ""]
        funnel = met.get("funnel") or []
        if funnel:
            lines += ["Documents through each step (dropped, by reason):", ""]
            lines += _table(["step", "documents in", "documents out", "dropped"],
                            [[f["step"], f["in"], f["out"], ", ".join(f"{k} {v}" for k, v in f["dropped"].items())
                              or None] for f in funnel])
        tr, va = met.get("train") or {}, met.get("val") or {}
        if tr.get("num_tokens"):
            bpt = tr["num_bytes"] / tr["num_tokens"]
            lines += ["", f"Tokens: {tr['num_tokens']:,} for training ({tr.get('num_docs', 0):,} documents), "
                      f"{va.get('num_tokens', 0):,} held out ({va.get('num_docs', 0):,} documents, split by "
                      f"document hash); the tokenizer ({_get(cfg, 'tokenizer.kind')}, "
                      f"{_get(cfg, 'tokenizer.vocab_size')} tokens, trained on the cleaned text) averages "
                      f"{bpt:.2f} bytes per token."]
        bad = met.get("bad_input") or {}
        lines += ["", f"Malformed input records: {sum(bad.values()) if bad else 0}."]
        return lines
    prepared = next((m.get("metrics", {}) for s, _, m in chain if s == "prepared-data"), None)
    if prepared is not None:
        return ["## Training data", "", f"Corpus `{prepared.get('corpus')}`, split by document hash: "
                f"{_get(prepared, 'tokens.train'):,} training tokens, {_get(prepared, 'tokens.val'):,} held out "
                "(prepared by pre-training itself, no filtering steps)."]
    return ["## Training data", "", "Not recorded on the lineage chain (the base model came from elsewhere)."]


def _training_section(chain: list[tuple[str, Path, dict]]) -> list[str]:
    lines = ["## Training", "", "Stages, first to last (each one's full configuration is in its manifest.json "
             "and recipe.yaml):", ""]
    for stage, d, m in reversed(chain):
        if stage not in TRAINING_STAGES:
            continue
        cfg, met = m.get("config", {}), m.get("metrics", {})
        facts = [f"{k} {_fmt(_get(cfg, k))}" for k in CONFIG_ROWS.get(stage, ()) if _get(cfg, k) is not None]
        results = [f"{k} {_fmt(v)}" for k, v in met.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and any(w in k for w in ("val_", "eval_", "loss", "accurac", "exact"))][:6]
        lines.append(f"- **{stage}** (`{show_path(d)}`, {m.get('created', '?')}): " + ", ".join(facts)
                     + (f". Measured by the trainer: {', '.join(results)}." if results else "."))
    return lines


def _evaluation_section(evaluation: dict[str, dict[str, float]] | None, chain) -> list[str]:
    if evaluation:
        stages = list(evaluation)
        names = sorted({k for m in evaluation.values() for k, v in m.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return ["## Evaluation", "", "`llmcycle eval` suite v1 (held-out shards and held-out embedded tasks; "
                "see docs/eval.md), this model and the stages before it:", "",
                *_table(["metric", *stages], [[n, *(evaluation[s].get(n) for s in stages)] for n in names])]
    _, _, m = chain[0]
    met = {k: v for k, v in (m.get("metrics") or {}).items() if isinstance(v, (int, float))
           and not isinstance(v, bool) and any(w in k for w in ("val_", "eval_", "bpb"))}
    lines = ["## Evaluation", "", "Not run yet: `llmcycle eval` on this directory gives the suite's numbers."]
    if met:
        lines += ["", "Held-out numbers the trainer measured:", "", *_table(["metric", "value"], sorted(
            [[k, v] for k, v in met.items()]))]
    return lines


def model_card(model_dir: str | Path, evaluation: dict[str, dict[str, float]] | None = None,
               name: str | None = None) -> str:
    """The card's Markdown: front matter, description, data, training, evaluation, intended use, limits."""
    d = Path(model_dir)
    if not (d / MANIFEST).is_file():
        raise LlmcycleError(f"{d}: no {MANIFEST}; a model card is written from an llmcycle artifact's records.")
    notes: list[str] = []
    try:
        chain = _chain(d)
    except LlmcycleError as e:  # an unreadable ancestor manifest: describe the model itself
        own = json.loads((d / MANIFEST).read_text())
        chain, notes = [(own.get("stage", "?"), d, own)], [f"Lineage could not be read: {e}"]
    stage, _, manifest = chain[0]
    data_steps = next((m.get("config", {}).get("steps", []) for s, _, m in chain if s == "data"), [])
    step_names = {next(iter(x)) if isinstance(x, dict) else x for x in data_steps}
    data_cfg = next((m.get("config", {}) for s, _, m in chain if s == "data"), None)
    prepared = next((m.get("metrics", {}) for s, _, m in chain if s == "prepared-data"), None)
    embedded_only = (all(i.get("type") == "python" for i in data_cfg.get("inputs", [])) if data_cfg is not None
                     else (prepared or {}).get("corpus") == "python")
    pii = ("personal data (emails, IP addresses, phone numbers) was redacted from the training text by the "
           "data stage's `pii` step" if "pii" in step_names else "the training text was not filtered for "
           "personal data")
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    params = parameter_count(d)
    size = f"{params / 1e6:.1f}M-parameter " if params else ""
    arch = (f"{cfg.get('num_hidden_layers')} layers, hidden size {cfg.get('hidden_size')}, "
            f"{cfg.get('num_attention_heads')} attention heads ({cfg.get('num_key_value_heads')} key/value), "
            f"vocabulary {cfg.get('vocab_size')}, context {cfg.get('max_position_embeddings')} tokens")
    versions = manifest.get("versions") or {}
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [llmcycle, {cfg.get('model_type', 'llama')}, {stage}]", "---", "",
             f"# {name or d.name}", "",
             f"A {size}{cfg.get('model_type', 'llama').capitalize()}-architecture causal language model ({arch}), "
             f"the output of `llmcycle {stage}` ({manifest.get('created', '?')}; llmcycle "
             f"{versions.get('llmcycle', '?')}, torch {versions.get('torch', '?')}).", "",
             f"Use it with `llmcycle serve {d}` (OpenAI-compatible API) or `transformers`: "
             f"`AutoModelForCausalLM.from_pretrained(\"{d}\")` with `AutoTokenizer` (the chat template is in "
             "tokenizer_config.json).", "",
             "## Lineage", "", f"`llmcycle lineage {d}` prints the chain back to the raw sources and re-checks "
             "every recorded content hash:", ""]
    lines += _table(["stage", "artifact", "created", "weights sha256"],
                    [[s, f"`{show_path(p)}`", m.get("created"), (m.get("outputs") or {}).get("model.safetensors", "")[:12]
                      or None] for s, p, m in chain])
    lines += ["", *_data_section(chain), "", *_training_section(chain), "",
              *_evaluation_section(evaluation, chain), "",
              "## Intended use", "",
              ("Learning, testing and demonstrating the model lifecycle: a small model trained end to end on "
               "one machine, whose every number can be traced to its data. It completes Python-flavoured "
               "English text and answers the embedded procedural tasks (arithmetic, string reversal and "
               "counting, what a standard-library function does) in the chat format it was tuned on."
               if embedded_only else
               "Research and evaluation of the training stages listed above, on the data listed above. It "
               "has been measured only by the numbers in this card; judge it on your own task before use."), "",
              "## Limitations", "",
              ("- Tiny by design and trained on one narrow corpus (Python's documentation and source): it is "
               "not a general assistant, knows nothing beyond that corpus, and often answers wrongly or "
               "fluently but meaninglessly." if embedded_only else
               "- It knows only what its training data holds (see Training data) and reproduces that data's "
               "biases and errors; it can answer wrongly with confidence."),
              f"- {'English only; ' if embedded_only else ''}no safety tuning; {pii}.",
              "- Evaluation covers held-out bits per byte and the embedded tasks only; numbers are comparable "
              "only within one suite version."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: str | Path, evaluation: dict[str, dict[str, float]] | None = None,
                     name: str | None = None) -> Path:
    path = Path(model_dir) / CARD
    path.write_text(model_card(model_dir, evaluation, name))
    return path


def write_card_quietly(model_dir: Path, log: Callable[[str], None]) -> None:
    """A trainer's card at publish time: documentation, so a problem writing it is logged, never fatal
    to the run that has just produced the model."""
    try:
        write_model_card(model_dir)
    except (LlmcycleError, OSError, ValueError, KeyError) as e:
        log(f"model card: not written ({e})")

