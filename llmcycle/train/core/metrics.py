"""metrics.jsonl: the training record every trainer writes, one JSON object per line (and TensorBoard, asked)."""

from __future__ import annotations

import json
from pathlib import Path

from llmcycle.artifacts import atomic_write_text
from llmcycle.errors import LlmcycleError


class MetricsLog:
    """metrics.jsonl on the main process: one JSON object per record, flushed as written."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: bool = False):
        self.enabled = enabled
        self.path = path
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            # Drop records the interrupted run wrote after its last checkpoint: they will be redone.
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        elif resume_step is None:
            path.unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LlmcycleError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))
