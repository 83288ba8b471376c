"""The CUDA paths, on tiny random models: bf16 autocast training through the training session, the fused
AdamW it builds, the flash-attention eligibility of our attention call, the serving engine against
transformers' greedy `generate`, and the NCCL group torchrun runs get. Every test is marked `cuda` and
skips where no CUDA device is present (`pytest -m cuda tests/test_cuda.py` on a GPU machine; the whole
file takes seconds there). benchmarks/gpu.sh runs it first."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import make_serving_model, randomize_
from llmcycle.model.config import ModelConfig
from llmcycle.model.transformer import Transformer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

VOCAB = 512


def _config(**kw) -> ModelConfig:
    """2 layers, 4 query heads over 2 key/value heads (GQA), head_dim 32: flash-attention shapes."""
    args = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return ModelConfig(**{**args, **kw})


def _batch(batch: int = 4, seq: int = 64, seed: int = 0, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def _session(tmp_path, **train):
    """A pre-training Session (the one every trainer runs on) on the CUDA device, no data stage."""
    from llmcycle.train.config import PretrainConfig, TrainSection
    from llmcycle.train.core.session import Session

    t = dict(device="cuda", dtype="bf16", lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1,
             grad_clip=1.0, threads=2, seed=0, **train)
    cfg = PretrainConfig(out_dir=str(tmp_path / "run"), train=TrainSection(**t))
    return Session("pretrain", cfg, resume=False, end_of_turn=False)


# ---- training ------------------------------------------------------------------------------------


def test_bf16_autocast_training_step_through_the_session(tmp_path):
    """Session.step (autocast, loss normalisation, clipping, optimizer step) with the pre-training loss
    on CUDA: bf16 activations, fp32 master weights, the loss finite and falling on a repeated batch."""
    from llmcycle.train.core.session import MAIN
    from llmcycle.train.pretrain.loop import _loss

    x, y = _batch()
    seen: dict[str, torch.dtype] = {}
    with _session(tmp_path) as s:
        assert s.device.type == "cuda" and s.amp_dtype == torch.bfloat16
        torch.manual_seed(0)
        model = s.trained_modules(lambda: {MAIN: Transformer(_config())})[MAIN]
        assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())

        def loss_fn(mb):
            logits = model(mb[0])
            seen["logits"] = logits.dtype
            return _loss(lambda _: logits, mb)

        losses = []
        for _ in range(20):
            s.set_lr(20)
            out = s.step([(x, y)], lambda mb: mb[1].numel(), loss_fn)
            losses.append(out["loss"])
        usage = s.usage_metrics()
    assert seen["logits"] == torch.bfloat16  # the forward ran under bf16 autocast
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert abs(losses[0] - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5, losses[0]  # a random start
    assert losses[-1] < 0.5 * losses[0], losses  # memorising the one batch (6.25 -> 0.61 on CPU)
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 15, losses  # falling almost every step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert usage["train_peak_cuda_mb"] > 0 and usage["mean_step_seconds"] > 0


def test_trainer_builds_fused_adamw_on_cuda(tmp_path):
    from llmcycle.train.core.session import MAIN

    with _session(tmp_path) as s:
        s.trained_modules(lambda: {MAIN: Transformer(_config())})
        opt = s.optimizer
        assert isinstance(opt, torch.optim.AdamW)
        assert opt.defaults["fused"] is True
        params = [p for g in opt.param_groups for p in g["params"]]
        assert params and all(p.is_cuda for p in params)
        # the decay split is the trainer's: matrices decay, norms and embeddings do not
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        # one fused step moves the weights
        before = params[0].detach().clone()
        s.set_lr(1)
        x, y = _batch(batch=2, seq=16)
        s.step([(x, y)], lambda mb: mb[1].numel(),
               lambda mb: (F.cross_entropy(s.modules[MAIN](mb[0]).float().flatten(0, 1), mb[1].flatten(),
                                           reduction="sum"), {}))
        assert not torch.equal(before, params[0].detach())
        assert opt.state[params[0]]["exp_avg"].is_cuda


# ---- attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_attention_is_flash_eligible_and_matches_math(mode):
    """Our SDPA call (causal, no mask, GQA via enable_gqa) runs under the flash backend alone (a call the
    backend cannot take raises 'No available kernel'), forward and backward, and its bf16 logits match
    the math backend's within bf16 tolerance."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = Transformer(_config())
    randomize_(model)  # logits of order 1, so the tolerance below means something
    model = model.cuda()
    x, _ = _batch(batch=2, seq=128, seed=1)
    with torch.no_grad():
        ref = model(x).float()  # fp32 everywhere: the reference both bf16 runs are measured against
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)

    def forward(backend):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "autocast" else torch.autocast("cuda", enabled=False)
        with sdpa_kernel([backend]), ctx, torch.no_grad():
            return model(x)

    flash, math = forward(SDPBackend.FLASH_ATTENTION), forward(SDPBackend.MATH)
    assert flash.dtype == math.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    assert scale > 1.0
    assert (flash.float() - math.float()).abs().max().item() < 4e-2 * scale  # ~1.3% measured (CPU flash)
    assert (flash.float() - ref).abs().max().item() < 6e-2 * scale
    # backward through the flash kernel too (what training runs)
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "autocast" else torch.autocast("cuda", enabled=False)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), ctx:
        model(x).float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# ---- serving -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving_model(tiny_data, tmp_path_factory) -> str:
    return make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("cuda_engine") / "model")


def test_engine_on_cuda_equals_transformers_greedy(serving_model):
    """LLM on CUDA in fp32, eight prompts of different lengths batched together with a token budget that
    forces chunked prefills beside decodes in one step: the greedy tokens are transformers' on CUDA."""
    from transformers import AutoModelForCausalLM

    from llmcycle.serve.engine import LLM
    from llmcycle.serve.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(8, 500, (n,), generator=g).tolist()] for n in (3, 17, 9, 30, 5, 22, 12, 1)]
    llm = LLM(serving_model, device="cuda", dtype=torch.float32, block_size=4, num_blocks=256,
              max_num_seqs=8, max_num_batched_tokens=16)
    engine = llm.engine
    assert engine.pool.device.type == "cuda" and engine.pool.dtype == torch.float32
    assert next(engine.model.parameters()).is_cuda

    steps: list[list[tuple[int, int]]] = []  # per step: (start, prompt length) of every scheduled row
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        steps.append([(s.start, len(s.seq.prompt_token_ids)) for s in batch.seqs])
        return batch

    engine.scheduler.schedule = spy
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    mixed = [st for st in steps if any(a >= n for a, n in st) and any(a < n for a, n in st)]
    assert mixed, "no step mixed a prefill with decodes"
    assert max(len(st) for st in steps) > 1

    hf = AutoModelForCausalLM.from_pretrained(serving_model, dtype=torch.float32).cuda().eval()
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- torchrun ------------------------------------------------------------------------------------


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="needs a CUDA device and a torch build with NCCL")
def test_nccl_group_through_init_distributed(monkeypatch):
    """init_distributed picks NCCL for a CUDA device (gloo beside it for the CPU tensors the trainers
    reduce), sets the device and joins the group torchrun's environment describes; all_reduce on CUDA and
    CPU tensors, barrier and shutdown go through it.

    One GPU cannot hold two NCCL ranks, and WORLD_SIZE=1 is (by design) one process without a group. So
    llmcycle's code reads a world of 2 (its own view of the environment) while the env:// rendezvous reads
    the real WORLD_SIZE=1: a one-process NCCL group formed by llmcycle's own init path."""
    from llmcycle.train.core import distributed as d

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert not dist.is_initialized()
    device = d.pick_device("auto", 0)
    assert device == torch.device("cuda:0")
    assert d.init_distributed(device) == d.DistInfo() and not dist.is_initialized()  # one process: no group

    import os

    monkeypatch.setattr(d, "os", SimpleNamespace(environ={**os.environ, "WORLD_SIZE": "2"}))
    try:
        info = d.init_distributed(device)
        assert info.enabled and info.rank == 0 and info.local_rank == 0
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert "cuda:nccl" in str(dist.get_backend_config())  # CUDA tensors go through NCCL
        assert torch.cuda.current_device() == 0
        t = torch.arange(4, dtype=torch.float32, device=device) + 1
        out = d.all_reduce_sum(t, info)  # NCCL
        torch.cuda.synchronize()
        assert out.is_cuda and out.tolist() == [1.0, 2.0, 3.0, 4.0]
        # Session.step reduces its token count and loss/metric sums as CPU tensors: gloo beside NCCL
        n = d.all_reduce_sum(torch.tensor(256.0), info)
        packed = d.all_reduce_sum(torch.tensor([2.5, 7.0], dtype=torch.float64), info)
        assert float(n) == 256.0 and packed.tolist() == [2.5, 7.0]
        gathered = [torch.empty(3)]
        dist.all_gather(gathered, torch.tensor([1.0, 2.0, 3.0]))  # the replica check's CPU all_gather
        assert gathered[0].tolist() == [1.0, 2.0, 3.0]
        d.barrier(info)
        d.shutdown(info)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
