"""Model directories in the Hugging Face layout.

`config.json`, `model.safetensors` (or `model-00001-of-0000N.safetensors` + `model.safetensors.index.json`
when large) and `generation_config.json`. Our parameter names are the HF names, so saving is a
`state_dict()` and loading is `load_state_dict()`: no renaming table to drift out of date.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llmcycle.artifacts import atomic_write_json
from llmcycle.errors import LlmcycleError
from llmcycle.model.config import ModelConfig
from llmcycle.model.transformer import Transformer
from llmcycle.paths import check_model_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that we recompute ourselves.
_IGNORED_KEYS = ("rotary_emb.inv_freq",)


def save_model(
    model: Transformer, path: str | Path, max_shard_size: int = 2 * 1024**3, state_dict: dict | None = None
) -> None:
    """Write `model` as a HF model directory. `state_dict` replaces model.state_dict() when the weights
    live elsewhere (e.g. gathered from FSDP shards onto one process)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors refuses aliases
    dtypes = {v.dtype for v in state.values()}
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    _write_json(path / "config.json", hf)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    _write_json(path / "generation_config.json", {k: v for k, v in gen.items() if v is not None})

    shards = _split_shards(state, max_shard_size)
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    _write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(path: str | Path) -> list[int]:
    """The ids `generation_config.json` ends generation on (`eos_token_id`, an int or a list, as
    transformers accepts); [] when the file or the field is missing or unreadable."""
    try:
        value = json.loads((Path(path) / GENERATION_CONFIG).read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def add_stop_ids_to_generation_config(path: str | Path, stop_ids: list[int]) -> None:
    """List `stop_ids` (eos and the chat template's end-of-turn) in the model's generation_config.json.

    A chat model ends its turn with the template's end-of-turn token (`<|end|>`), not with eos; without it
    in `eos_token_id`, transformers' `generate` repeats that token up to max_new_tokens. Does nothing when
    the directory has no generation_config.json (a tokenizer-only directory). Order: what was there first.
    """
    file = Path(path) / GENERATION_CONFIG
    if not file.is_file():
        return
    gen = json.loads(file.read_text(encoding="utf-8"))
    ids = list(dict.fromkeys([*generation_eos_ids(path), *stop_ids]))
    if not ids:
        return
    gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    _write_json(file, gen)


def add_end_of_turn_to_generation_config(path: str | Path) -> None:
    """For a model directory holding a chat tokenizer: list its eos and end-of-turn ids in
    generation_config.json (see `add_stop_ids_to_generation_config`), as chat models on the Hub do."""
    from llmcycle.tokenizer import Tokenizer  # here: the tokenizer package must not load for plain model I/O

    if not (Path(path) / GENERATION_CONFIG).is_file() or not (Path(path) / "tokenizer.json").is_file():
        return
    tok = Tokenizer.from_pretrained(path)
    if tok.chat_template is None:
        return
    ids = [tok.eos_id, tok.token_to_id(tok.end_of_turn_token)]
    add_stop_ids_to_generation_config(path, [i for i in ids if i is not None])


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, sort_keys=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (single file or sharded), with clear errors for bad files."""
    path = Path(path)
    files: list[Path]
    if (path / INDEX_FILE).exists():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            files = sorted({path / f for f in index["weight_map"].values()})
        except (json.JSONDecodeError, KeyError) as e:
            raise LlmcycleError(f"{path / INDEX_FILE}: not a valid safetensors index ({e}).") from None
    elif (path / SINGLE_FILE).exists():
        files = [path / SINGLE_FILE]
    elif (path / "pytorch_model.bin").exists():
        raise LlmcycleError(
            f"{path}: holds only pytorch_model.bin (pickle); llmcycle reads safetensors only. Convert it "
            "with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)."
        )
    else:
        raise LlmcycleError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found; is this a model directory?")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise LlmcycleError(f"{f}: listed in {INDEX_FILE} but missing.")
        try:
            state.update(_read_safetensors(f))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise LlmcycleError(f"{f}: corrupt or truncated safetensors file ({e}).") from None
    return state


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, each read into memory of its own.

    safetensors' `load_file` returns views of one private mmap of the whole file, mapped until the last of
    its tensors is freed: every page read stays in the process's RSS, so a model whose weights are copied
    or quantized keeps the file's full size resident beside them (QLoRA: the fp32 base next to its 4-bit
    copy). Plain reads leave those pages to the page cache. safetensors still validates the file (its
    header, the offsets against the file's size) first; a dtype not in `_DTYPES` (fp8) goes through it.
    """
    with safe_open(f, "pt"):  # raises SafetensorError on a bad header or a truncated file
        pass
    with open(f, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        if any(info["dtype"] not in _DTYPES for info in header.values()):
            return load_file(f)
        state = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            buf = bytearray(end - start)
            fh.seek(8 + size + start)
            if fh.readinto(buf) != len(buf):
                raise ValueError(f"{name}: the file ends inside its data")
            # frombuffer shares the bytearray's memory (no copy); an empty tensor cannot come from a buffer.
            t = torch.frombuffer(buf, dtype=_DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=_DTYPES[info["dtype"]])
            state[name] = t.reshape(info["shape"])
    return state


def load_model(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """Load a model directory written by llmcycle or by transformers (Llama, Qwen2, Mistral).

    dtype None loads float32 (the training default); pass torch.bfloat16 etc. for inference.
    """
    path = check_model_dir(path)
    config = ModelConfig.from_json_file(path / "config.json")
    if json.loads((path / "config.json").read_text()).get("quantization_config"):
        raise LlmcycleError(f"{path}: a quantized model; serve, generate or eval it (the engine loads it), or "
                            "train from the model it was quantized from.")
    state = read_state_dict(path)
    return model_from_state(config, state, source=str(path), device=device, dtype=dtype)


def model_from_state(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    source: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    modules: dict[str, torch.nn.Module] | None = None,
) -> Transformer:
    """A Transformer of `config` holding `state`; LlmcycleError naming any missing, unexpected or misshapen
    tensor. `modules`: layers given whole (a quantized linear layer, by its path), put in place after the
    rest is loaded and cast, so their own tensors are neither allocated twice nor cast."""
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    # Build on the meta device: no time spent initialising weights we overwrite next.
    with torch.device("meta"):
        model = Transformer(config)
    for name in modules or {}:
        _set_module(model, name, torch.nn.Identity())  # no tensors: nothing to allocate for it
    model = model.to_empty(device=device)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_KEYS)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise LlmcycleError(f"{source}: weights do not match config.json: {'; '.join(parts)}.")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise LlmcycleError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(shape)}."
            )
    # The loaded tensors become the parameters (assign), converted one at a time: a copy into the model's
    # own storage would hold the weights twice at the peak of loading (2x the model in RSS).
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype=dtype)
    for name, module in (modules or {}).items():
        _set_module(model, name, module.to(device))
    return model


def _set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
