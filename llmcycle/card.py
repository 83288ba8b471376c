"""Model cards: `README.md` in a model directory, as on the Hugging Face Hub.

A card is written from the records alone: the model's manifest and the manifests on its lineage chain
(data sources and the filter funnel, tokenizer, every training stage's configuration and metrics), plus
evaluation results when the caller has them. Trainers write one when they publish a model; `llmcycle run`
rewrites it after evaluation. The card is documentation of the manifest, so the manifest does not hash
it (`manifest.CARD`) and rewriting it never invalidates an artifact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llmcycle.artifacts import atomic_write_text
from llmcycle.artifacts.lineage import show_path
from llmcycle.artifacts.manifest import CARD, MANIFEST
from llmcycle.errors import LlmcycleError

ADAPTER = "adapter_config.json"  # a PEFT adapter directory (optimize/lora.py), named here without torch

log = logging.getLogger(__name__)

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


POST_TRAINING = ("sft", "reward", "dpo", "ppo", "grpo")
# One example per embedded task (llmcycle.train.posttrain.synthetic), for the card's task list.
TASK_EXAMPLES = {
    "add": "What is 17 + 25? -> 42", "sub": "What is 52 - 17? -> 35", "max": "Which is larger, 37 or 52? -> 52",
    "last": "What is the last letter of 'socket'? -> t", "upper": "Write 'socket' in uppercase. -> SOCKET",
    "name": "Which function does `def urljoin(base, url, allow_fragments=True)` define? -> urljoin",
    "param": "What is the second parameter of `def urljoin(base, url, allow_fragments=True)`? -> url",
    "arity": "How many parameters does `def urljoin(base, url, allow_fragments=True)` take? -> 3",
    "import": "Write the import statement for `urljoin` from `urllib.parse`. -> from urllib.parse import urljoin",
    "reverse": "Reverse the word 'socket'. -> tekcos", "count": "How many times does 'e' occur in 'deepcopy'? -> 2",
}
# The model's license (the `license` field) is the project's: the weights are made by llmcycle's code. The
# embedded corpus it learns from is Python's documentation and standard-library source, under the PSF
# License 2.0 (Zero-Clause BSD for the documentation's code examples); the card says so next to it.
MODEL_LICENSE = "apache-2.0"
CORPUS_LICENSE = ("the embedded corpus is Python's documentation and standard-library source, distributed "
                  "under the PSF License Version 2 (code examples in the documentation under Zero-Clause BSD)")


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
    from llmcycle.artifacts.lineage import trace

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


def trained_tasks(chain: list[tuple[str, Path, dict]]) -> dict[str, dict[str, int] | list[str]]:
    """What each post-training stage on the chain trained on, first to last: {task: training items} for the
    embedded tasks, read from the info.json written beside its data and accepted only when the manifest's
    hash of a training file matches one info.json lists; else the training files the manifest names (the
    tasks in a user's own files are not recorded, so none are claimed)."""
    out: dict[str, dict[str, int] | list[str]] = {}
    for stage, d, m in reversed(chain):
        if stage not in POST_TRAINING:
            continue
        hashes = {v for v in ((m.get("inputs") or {}).get("data") or {}).values() if isinstance(v, str)}
        info_path = d.parent / "data" / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        trained = {f["sha256"] for n, f in (info.get("files") or {}).items() if n.endswith("_train")}
        if _get(m.get("config", {}), "data.train") == "embedded" and hashes & trained:
            out[stage] = {t: c["train"] for t, c in (info.get("counts") or {}).items() if c.get("train")}
        else:
            out[stage] = [show_path(Path(p)) for p in ((m.get("inputs") or {}).get("data") or {})]
    return out


def _tasks_section(tasks: dict[str, dict[str, int] | list[str]]) -> list[str]:
    if not tasks:
        return []
    lines = ["## Tasks", ""]
    embedded = {s: t for s, t in tasks.items() if isinstance(t, dict)}
    if embedded:
        names = list(dict.fromkeys(n for t in embedded.values() for n in t))
        lines += ["Post-trained on these tasks derived from the embedded corpus (training items per stage; the "
                  "held-out items of the same tasks are the evaluation's):", ""]
        lines += _table(["task", "example (prompt -> answer)", *embedded],
                        [[n, TASK_EXAMPLES.get(n, "-"), *(t.get(n) for t in embedded.values())] for n in names])
    for stage, files in tasks.items():
        if isinstance(files, list):
            lines += ["", f"- **{stage}** trained on " + (", ".join(f"`{f}`" for f in files) or "unrecorded data")
                      + " (its tasks are whatever those files hold; not recorded here)."]
    return lines


def _front_matter(name: str, stage: str, cfg: dict, chain, evaluation, tasks, embedded_only: bool,
                  adapter: dict | None = None) -> list[str]:
    """Hugging Face metadata: license, language, datasets, base_model and the evaluation as a model-index."""
    import yaml

    meta: dict[str, Any] = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation",
                            "tags": ["llmcycle", cfg.get("model_type", "llama"), stage, *(["lora"] if adapter else [])],
                            "license": MODEL_LICENSE if embedded_only else "other"}
    meta["language"] = ["en", "code"] if embedded_only else ["en"]
    datasets = (["python-stdlib-docs-and-source"] if embedded_only else []) + \
        (["llmcycle-embedded-tasks"] if any(isinstance(t, dict) for t in tasks.values()) else [])
    if datasets:
        meta["datasets"] = datasets
    parent = next((show_path(p) for s, p, _ in chain[1:] if s in TRAINING_STAGES), None)
    if parent and stage in POST_TRAINING:
        meta["base_model"] = parent
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    results = _model_index_results((evaluation or {}).get(stage) or {})
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---"]


METRIC_NAMES = {"heldout_bpb": "held-out bits per byte", "heldout_perplexity": "held-out perplexity",
                "mc_accuracy": "multiple-choice accuracy", "exact_match": "exact match (greedy)"}


def _model_index_results(metrics: dict[str, float]) -> list[dict]:
    """The suite's numbers in HF's model-index schema: one result per dataset the suite measures on."""
    groups = (("llmcycle eval suite v1: held-out text", "llmcycle-heldout-text", ("heldout_bpb", "heldout_perplexity")),
              ("llmcycle eval suite v1: held-out embedded tasks", "llmcycle-embedded-tasks",
               ("mc_accuracy", "exact_match")))
    results = []
    for ds_name, ds_type, keys in groups:
        ms = [{"type": k, "value": round(float(metrics[k]), 4), "name": METRIC_NAMES[k]} for k in keys
              if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)]
        if ms:
            results.append({"task": {"type": "text-generation", "name": "Text Generation"},
                            "dataset": {"name": ds_name, "type": ds_type}, "metrics": ms})
    return results


def _license_text(embedded_only: bool) -> str:
    if embedded_only:
        return (f"The model: Apache-2.0 (`license: {MODEL_LICENSE}`), the license of llmcycle, whose code made "
                f"the weights. Its training text: {CORPUS_LICENSE}, a permissive license that asks to keep the "
                "copyright notice with copies of that text.")
    return ("`license: other`: llmcycle (Apache-2.0) made the weights, but they carry the terms of their training "
            "data (see Training data), which this card cannot know; set `license` to what those terms allow.")


def usage_snippet(model_dir: Path) -> list[str]:
    """Load with transformers and generate one chat answer that stops at the end of the assistant's turn."""
    from llmcycle.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_pretrained(model_dir)
        stops = [t for t in dict.fromkeys((tok.end_of_turn_token, tok.eos_token)) if t]
        chat = bool(tok.chat_template)
    except (LlmcycleError, OSError, ValueError):
        stops, chat = [], False
    stop_ids = ", ".join(f"tok.convert_tokens_to_ids({t!r})" for t in stops) or "tok.eos_token_id"
    if chat:
        body = ['messages = [{"role": "user", "content": "What is 17 + 25?"}]',
                "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                "return_dict=True)"]
    else:
        body = ['inputs = tok("def ", return_tensors="pt")']
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"path = {str(model_dir)!r}", "tok = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForCausalLM.from_pretrained(path)", *body,
            f"stop = [{stop_ids}]  # end of turn (and end of text): the answer ends there",
            "out = model.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=stop)",
            'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```"]


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
    # A LoRA run publishes a PEFT adapter directory: the architecture is its base's.
    adapter = json.loads((d / ADAPTER).read_text()) if (d / ADAPTER).is_file() and not cfg else None
    if adapter is not None:
        base_cfg = Path(adapter.get("base_model_name_or_path") or "") / "config.json"
        cfg = json.loads(base_cfg.read_text()) if base_cfg.is_file() else {}
    params = parameter_count(d)
    size = f"{params / 1e6:.1f}M-parameter " if params else ""
    arch = (f"{cfg.get('num_hidden_layers')} layers, hidden size {cfg.get('hidden_size')}, "
            f"{cfg.get('num_attention_heads')} attention heads ({cfg.get('num_key_value_heads')} key/value), "
            f"vocabulary {cfg.get('vocab_size')}, context {cfg.get('max_position_embeddings')} tokens")
    versions = manifest.get("versions") or {}
    tasks = trained_tasks(chain)
    task_names = list(dict.fromkeys(n for t in tasks.values() if isinstance(t, dict) for n in t))
    made = (f"the output of `llmcycle {stage}` ({manifest.get('created', '?')}; llmcycle "
            f"{versions.get('llmcycle', '?')}, torch {versions.get('torch', '?')})")
    if adapter is None:
        intro = [f"A {size}{cfg.get('model_type', 'llama').capitalize()}-architecture causal language model "
                 f"({arch}), {made}.", "",
                 f"Use it with `llmcycle serve {d}` (OpenAI-compatible API) or `transformers` (the chat template "
                 "is in tokenizer_config.json):", "", *usage_snippet(d)]
    else:
        base = adapter.get("base_model_name_or_path")
        intro = [f"A LoRA adapter (PEFT format; rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on "
                 f"{', '.join(adapter.get('target_modules') or [])}) for the "
                 f"{cfg.get('model_type', 'llama').capitalize()}-architecture model `{base}` ({arch}), {made}.", "",
                 f"Load it with `peft` onto its base, or fold it in first (`llmcycle merge {d} --out DIR`) to "
                 "serve or evaluate a plain model:", "", "```python", "from peft import PeftModel",
                 "from transformers import AutoModelForCausalLM", "",
                 f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(d)!r})",
                 "```"]
        lora = (manifest.get("config") or {}).get("lora") or {}
        if lora.get("quantize"):  # QLoRA: say how it was trained; the adapter itself is the same kind
            dq = ", double quantization" if lora.get("double_quant") else ""
            intro[0] += (f" Trained as QLoRA: the base was held frozen in 4-bit {str(lora['quantize']).upper()} "
                         f"(blocksize {lora.get('blocksize')}{dq}) while the adapter trained; it goes on the "
                         "full-precision base above.")
    lines = [*_front_matter(name or d.name, stage, cfg, chain, evaluation, tasks, embedded_only, adapter), "",
             f"# {name or d.name}", "", *intro, "",
             "## License", "", _license_text(embedded_only), "",
             "## Lineage", "", f"`llmcycle lineage {d}` prints the chain back to the raw sources and re-checks "
             "every recorded content hash:", ""]
    lines += _table(["stage", "artifact", "created", "weights sha256"],
                    [[s, f"`{show_path(p)}`", m.get("created"), (m.get("outputs") or {}).get("model.safetensors", "")[:12]
                      or None] for s, p, m in chain])
    lines += ["", *_data_section(chain), "", *_training_section(chain), "",
              *([*_tasks_section(tasks), ""] if tasks else []),
              *_evaluation_section(evaluation, chain), "",
              "## Intended use", "",
              ("Learning, testing and demonstrating the model lifecycle: a small model trained end to end on "
               "one machine, whose every number can be traced to its data. It completes Python-flavoured "
               "English text" + (f" and answers the tasks it was tuned on ({', '.join(task_names)}; see Tasks) "
                                 "in the chat format of its template." if task_names else ".")
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
    atomic_write_text(path, model_card(model_dir, evaluation, name))
    return path


def write_card_quietly(model_dir: Path) -> None:
    """A trainer's card at publish time: documentation, so a problem writing it is a warning, never fatal
    to the run that has just produced the model."""
    try:
        write_model_card(model_dir)
    except (LlmcycleError, OSError, ValueError, KeyError) as e:
        log.warning(f"model card: not written ({e})")

