"""The engine serves LoRA adapters by name over one base: adapters made by PEFT (Llama, Qwen2, DoRA, rsLoRA)
and by llmcycle give PEFT's log-probs at every generated token, requests for different adapters share a
step and each equals its solo run, the base weights exist once, and the prefix cache never mixes adapters."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import randomize_  # noqa: E402
from llmcycle.errors import LlmcycleError  # noqa: E402
from llmcycle.model import Transformer  # noqa: E402
from llmcycle.optimize.config import LoRAConfig  # noqa: E402
from llmcycle.optimize.lora import apply_lora, save_adapter  # noqa: E402
from llmcycle.serve.engine import LLMEngine  # noqa: E402
from llmcycle.serve.lora import MultiLoRALinear  # noqa: E402
from llmcycle.serve.sampling import SamplingParams  # noqa: E402

VOCAB = 300
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)


def hf_base(tmp_path, cls_name: str):
    cfg = getattr(transformers, cls_name)(**BASE)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize_(model)
    model.save_pretrained(tmp_path / "base")
    return model, tmp_path / "base"


def peft_adapter(hf, path, seed: int, **kwargs):
    """A PEFT adapter with random non-zero B (and DoRA magnitudes off the row norms) saved at `path`."""
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **kwargs)
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(path)
    return pm.unload()  # the transformers model, without the adapter


def prompts(n: int, length: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (length + i,), generator=g).tolist() for i in range(n)]


def peft_logprobs(hf, adapter_dir, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """PEFT's log-probs of each generated token given the prompt and the tokens before it ([len(generated)])."""
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval() if adapter_dir else hf
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
        if adapter_dir:
            model.unload()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp[torch.arange(len(generated)), torch.tensor(generated)]


def engine_for(base, loras: dict, **kwargs) -> LLMEngine:
    model = Transformer.from_pretrained(base).eval()
    return LLMEngine(None, model=model, num_blocks=64, block_size=4, lora_modules=loras, **kwargs)


def run(engine: LLMEngine, requests: list[tuple[list[int], str | None]]) -> list:
    """Add every request, then step until all finish; outputs in request order."""
    ids = [engine.add_request(p, GREEDY, lora_name=a) for p, a in requests]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[i] for i in ids]


def chosen_logprobs(out) -> torch.Tensor:
    return torch.tensor([lp[t] for t, lp in zip(out.token_ids, out.logprobs)])


@pytest.mark.parametrize("cls_name", ["LlamaConfig", "Qwen2Config"])
def test_peft_adapters_served_in_one_batch_match_peft(cls_name, tmp_path):
    hf, base = hf_base(tmp_path, cls_name)
    hf = peft_adapter(hf, tmp_path / "rs", 1, r=6, lora_alpha=20, use_rslora=True,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    hf = peft_adapter(hf, tmp_path / "dora", 2, r=4, lora_alpha=8, use_dora=True,
                      target_modules=["q_proj", "v_proj", "gate_proj"])
    engine = engine_for(base, {"rs": tmp_path / "rs", "dora": tmp_path / "dora"})
    params_before = sum(p.numel() for p in engine.model.parameters())
    ps = prompts(6)
    requests = [(p, [None, "rs", "dora"][i % 3]) for i, p in enumerate(ps)]

    steps_with_all = []
    orig = engine.runner.adapters.set_batch

    def spy(row_ids, num_new, num_logits, device):
        steps_with_all.append(set(row_ids))
        orig(row_ids, num_new, num_logits, device)

    engine.runner.adapters.set_batch = spy
    outs = run(engine, requests)
    assert {0, 1, 2} in steps_with_all  # base, rs and dora rows in one forward

    for (prompt, name), out in zip(requests, outs):
        expected = peft_logprobs(hf, tmp_path / name if name else None, prompt, out.token_ids)
        torch.testing.assert_close(chosen_logprobs(out), expected, atol=1e-4, rtol=0)
        assert out.token_ids[0] == max(out.logprobs[0], key=out.logprobs[0].get)  # greedy: the top one

    # Each equals its solo run (a fresh engine, one request at a time).
    solo = engine_for(base, {"rs": tmp_path / "rs", "dora": tmp_path / "dora"})
    for req, out in zip(requests, outs):
        assert run(solo, [req])[0].token_ids == out.token_ids

    # The base weights exist once: the parameters are the base's, the adapters are extra tensors.
    assert sum(p.numel() for p in engine.model.parameters()) == params_before
    layer = engine.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MultiLoRALinear) and set(layer.adapters) == {1, 2}
    assert not isinstance(engine.model.model.layers[0].self_attn.k_proj.base_layer, MultiLoRALinear)


def test_llmcycle_adapter_on_the_lm_head_and_speculative_decoding(tmp_path):
    hf, base = hf_base(tmp_path, "LlamaConfig")
    ours = Transformer.from_pretrained(base).eval()
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "down_proj", "lm_head"])
    torch.manual_seed(0)
    apply_lora(ours, cfg)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(ours, tmp_path / "ours", base, cfg)
    ps = prompts(3)
    # A draft model (the base itself) drafts without the adapter; verification applies it.
    engine = engine_for(base, {"ours": tmp_path / "ours"}, draft_model=base, num_speculative_tokens=2)
    requests = [(ps[0], "ours"), (ps[1], None), (ps[2], "ours")]
    for (prompt, name), out in zip(requests, run(engine, requests)):
        expected = peft_logprobs(hf, tmp_path / name if name else None, prompt, out.token_ids)
        torch.testing.assert_close(chosen_logprobs(out), expected, atol=1e-4, rtol=0)


def test_prefix_cache_is_shared_within_an_adapter_only(tmp_path):
    hf, base = hf_base(tmp_path, "LlamaConfig")
    peft_adapter(hf, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    engine = engine_for(base, {"a": tmp_path / "a"})
    prompt = prompts(1, length=17)[0]
    bm = engine.block_manager
    run(engine, [(prompt, None)])
    hits = bm.prefix_hits
    a = run(engine, [(prompt, "a")])[0]  # same tokens, other adapter: no hit
    assert bm.prefix_hits == hits
    assert run(engine, [(prompt, "a")])[0].token_ids == a.token_ids
    assert bm.prefix_hits == hits + 16  # same adapter again: its 4 full blocks hit
    run(engine, [(prompt, None)])
    assert bm.prefix_hits == hits + 32  # and the base still hits its own


def test_bad_adapters_are_refused_and_change_nothing(tmp_path):
    hf, base = hf_base(tmp_path, "LlamaConfig")
    peft_adapter(hf, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    engine = engine_for(base, {"a": tmp_path / "a"})
    with pytest.raises(LlmcycleError, match="no LoRA adapter named 'b'.*loaded: a"):
        engine.add_request(prompts(1)[0], GREEDY, lora_name="b")
    with pytest.raises(LlmcycleError, match="already loaded"):
        engine.add_lora("a", tmp_path / "a")
    with pytest.raises(LlmcycleError, match="not an adapter directory"):
        engine.add_lora("x", base)
    # Another model's adapter (wider layers): refused before any layer is touched.
    wide = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**(BASE | dict(hidden_size=96))))
    peft_adapter(wide, tmp_path / "wide", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(LlmcycleError, match="does not fit the layer"):
        engine.add_lora("wide", tmp_path / "wide")
    assert engine.lora_names == ["a"]
    assert not isinstance(engine.model.model.layers[0].self_attn.v_proj, MultiLoRALinear)
    # modules_to_save (a whole replaced head) is not served: merge such an adapter instead.
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "adapter_config.json").write_text(json.dumps(raw | {"modules_to_save": ["lm_head"]}))
    with pytest.raises(LlmcycleError, match="modules_to_save"):
        engine.add_lora("head", tmp_path / "head")


# ---- the HTTP server: adapters by name, as vLLM's --lora-modules ------------------------------------


def our_adapter(base_dir: str, path, seed: int) -> str:
    model = Transformer.from_pretrained(base_dir)
    cfg = LoRAConfig(r=4, alpha=16.0)
    torch.manual_seed(seed)
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    save_adapter(model, path, base_dir, cfg)
    return str(path)


def test_server_routes_requests_to_adapters_by_model_name(tiny_data, tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import make_serving_model
    from llmcycle.serve.async_engine import AsyncLLMEngine
    from llmcycle.serve.engine import LLM
    from llmcycle.serve.server import ServerState
    from llmcycle.serve.smoke import serve_in_thread

    base = make_serving_model(tiny_data["tokenizer"], tmp_path / "model")
    loras = {"sql": our_adapter(base, tmp_path / "sql", 1), "chat": our_adapter(base, tmp_path / "chat", 2)}
    engine = LLMEngine(base, block_size=4, num_blocks=256, lora_modules=loras)
    offline = LLM(base, block_size=4, num_blocks=256, lora_modules=loras)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = {name: offline.generate("def main", params, lora_name=name)[0].outputs[0].text
                for name in (None, "sql", "chat")}
    assert len(set(expected.values())) == 3  # the adapters change the answer

    with serve_in_thread(ServerState({"tiny": AsyncLLMEngine(engine)})) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"tiny", "sql", "chat"}
        assert models["sql"].parent == "tiny" and models["tiny"].parent is None
        for name in (None, "sql", "chat"):
            out = client.completions.create(model=name or "tiny", prompt="def main", max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == expected[name] and out.model == (name or "tiny")
        stream = client.completions.create(model="chat", prompt="def main", max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected["chat"]
        with pytest.raises(openai.NotFoundError, match="Served models: tiny, sql, chat"):
            client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_lora_modules_arguments(tmp_path):
    from llmcycle.serve.server import parse_lora_modules

    hf, base = hf_base(tmp_path, "LlamaConfig")
    peft_adapter(hf, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    a = str(tmp_path / "a")
    assert parse_lora_modules([f"x={a}"], {"m": str(base)}) == {"m": {"x": a}}
    two = {"m": str(base), "n": str(tmp_path / "other")}
    spec = json.dumps({"name": "x", "path": a, "base_model_name": "n"})
    assert parse_lora_modules([spec], two) == {"m": {}, "n": {"x": a}}
    with pytest.raises(LlmcycleError, match="several models are served"):
        parse_lora_modules([f"x={a}"], two)
    with pytest.raises(LlmcycleError, match="expected NAME=DIR"):
        parse_lora_modules([a], {"m": str(base)})
    with pytest.raises(LlmcycleError, match="not an adapter directory"):
        parse_lora_modules([f"x={base}"], {"m": str(base)})
    with pytest.raises(LlmcycleError, match="already taken"):
        parse_lora_modules([f"m={a}"], {"m": str(base)})
    with pytest.raises(LlmcycleError, match="is not served"):
        parse_lora_modules([json.dumps({"name": "x", "path": a, "base_model_name": "z"})], two)


def test_generate_runs_an_adapter_over_its_base_like_the_merged_model(tiny_data, tmp_path, capsys):
    from conftest import make_serving_model
    from llmcycle.cli import main
    from llmcycle.optimize.merge import merge_adapter

    base = make_serving_model(tiny_data["tokenizer"], tmp_path / "model")
    adapter = our_adapter(base, tmp_path / "adapter", 1)
    merge_adapter(adapter, tmp_path / "merged")
    capsys.readouterr()  # its log line, when an earlier main() set logging up to print
    answers = {}
    for name in ("adapter", "merged", "model"):
        assert main(["generate", str(tmp_path / name), "--prompt", "def main", "--temperature", "0",
                     "--max-new-tokens", "8"]) == 0
        answers[name] = capsys.readouterr().out
    assert answers["adapter"] == answers["merged"] != answers["model"]
    assert main(["eval", adapter]) != 0  # a model-reading command names both ways to use an adapter
    err = capsys.readouterr().err
    assert "a LoRA adapter, not a model" in err and "--lora-modules NAME=" in err and "llmcycle merge" in err
