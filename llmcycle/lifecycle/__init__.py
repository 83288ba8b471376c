"""`llmcycle run`: the lifecycle as a graph of stages, each reading artifacts and writing artifacts.

data (sources -> filters -> dedup -> tokenizer -> token shards) -> pretrain (causal LM on those shards)
-> sft -> dpo -> eval (every model stage) -> serve (a smoke test of the final model through the real
HTTP server) -> report (report.md, report.html, and a model card README.md in every model directory),
each into `runs/<name>/<stage>/` with a `stage.json` record.

- stage.py: `Stage`, a stage as one record (config section, inputs, outputs, run, headline, report).
- stages/: one module per stage, and the registry: the ordered list `STAGES`.
- graph.py: `Lifecycle`, the run: ordering, keys, skip / resume / --from, peak memory, records.
- config.py: `LifecycleConfig`, the recipe, derived from the registry.
- records.py: stage.json read and written, and `Records`, a run as its records say (report, cards, summary).
"""

from llmcycle.lifecycle.config import LifecycleConfig, lifecycle_config
from llmcycle.lifecycle.graph import Lifecycle, PeakMemory, discard_stale, stage_outputs, up_to_date
from llmcycle.lifecycle.records import Records, read_record, write_record
from llmcycle.lifecycle.stage import EARLIER, PREVIOUS_MODEL, Stage
from llmcycle.lifecycle.stages import STAGES

STAGE_NAMES = tuple(s.name for s in STAGES)

__all__ = ["EARLIER", "PREVIOUS_MODEL", "STAGES", "STAGE_NAMES", "Lifecycle", "LifecycleConfig", "PeakMemory",
           "Records", "Stage", "discard_stale", "lifecycle_config", "read_record", "stage_outputs", "up_to_date",
           "write_record"]
