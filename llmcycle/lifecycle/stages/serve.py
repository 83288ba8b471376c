"""serve: the final model through the real HTTP server on loopback, talked to as a client would
(`llmcycle serve`); runs/<name>/serve/serve.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcycle import svg
from llmcycle.artifacts import atomic_write_json
from llmcycle.config import field_help as F
from llmcycle.lifecycle.stage import EARLIER, Stage, metrics_named

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section


@dataclass
class ServeStage:
    requests: int = F(16, "chat requests sent to the served final model")
    concurrency: int = F(4, "requests in flight at once")
    max_tokens: int = F(24, "tokens per answer at most")


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.serve.smoke import smoke_test
    from llmcycle.train.posttrain.synthetic import make_items, split_items

    cfg: ServeStage = lc.stage_config("serve")
    _, held = split_items(make_items(per_task=40))
    prompts = [it.prompt for it in held][: cfg.requests]
    result = smoke_test(lc.final_model(), prompts, cfg.concurrency, cfg.max_tokens)
    atomic_write_json(lc.dir("serve") / "serve.json", result)
    return {k: v for k, v in result.items() if k != "answers"}


def report(run: Records) -> list[Section]:
    """Throughput, latency per request, the stream/plain and /metrics checks, sample answers."""
    srv = run.metrics("serve")
    if not srv:
        return []
    blocks: list[Block] = [("p", f"The final model `{run.final_model()}` behind the real HTTP server on loopback "
                                 "(OpenAI chat API, streamed), answering held-out task prompts.")]
    blocks.append(("table", ["requests", "concurrency", "output tok/s", "median TTFT (s)", "median e2e (s)",
                             "stream == plain", "/metrics == usage"],
                   [[srv.get("requests"), srv.get("concurrency"), srv.get("output_tokens_per_s"),
                     srv.get("ttft_median_s"), srv.get("e2e_median_s"), srv.get("stream_equals_plain"),
                     srv.get("metrics_match_usage")]]))
    path = run.dir("serve") / "serve.json"
    answers = json.loads(path.read_text()).get("answers", []) if path.is_file() else []
    timed = [a for a in answers if a.get("e2e_s") is not None]
    if timed:
        ttft = [(i + 1, a["ttft_s"] * 1000) for i, a in enumerate(timed) if a.get("ttft_s") is not None]
        e2e = [(i + 1, a["e2e_s"] * 1000) for i, a in enumerate(timed)]
        blocks.append(("chart", svg.line_chart({"time to first token": ttft, "end to end": e2e},
                                               title="Serving latency", x_label="request", y_label="ms")))
    if answers:
        blocks.append(("p", "Sample answers from the served model:"))
        blocks.append(("table", ["prompt", "answer"], [[repr(a["prompt"]), repr(a["text"])] for a in answers[:5]]))
    return [("Serving smoke test (real HTTP server on loopback)", blocks)]


STAGE = Stage("serve", run, config=ServeStage, inputs=EARLIER,
              headline=metrics_named("output_tokens_per_s", "ttft_median_s"), report=report)
