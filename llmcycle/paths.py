"""Where things live, and the one wording for a path that is not what it should be.

The quickstart (`llmcycle run`) writes every stage to `runs/default/<stage>/`, the model of a stage to
`runs/default/<stage>/model`. Standalone post-training commands start from those models by default and
write `runs/<stage>/` so that they never overwrite the quickstart's run.
"""

from __future__ import annotations

from pathlib import Path

from llmcycle.errors import LlmcycleError


def check_model_dir(path: str | Path, what: str = "model", marker: str = "config.json", hint: str = "") -> Path:
    """`path` as a Path when it is a directory holding `marker`; else LlmcycleError in the one wording:

    `X: model directory not found.` or `X: not a model directory (no config.json).`, followed by
    `Did you mean X/model?` when that one qualifies (a stage directory given for its model), else `hint`.
    `what` names the kind ("reward model", "artifact") and `marker` the file that makes one.
    """
    p = Path(path)
    if p.is_dir() and (p / marker).is_file():
        return p
    problem = (f"{p}: {what} directory not found." if not p.exists() else
               f"{p}: not {'an' if what[0] in 'aeiou' else 'a'} {what} directory (no {marker}).")
    if marker == "config.json" and (p / "adapter_config.json").is_file():
        raise LlmcycleError(f"{p}: a LoRA adapter, not a model. Serve it over its base with `llmcycle serve BASE "
                            f"--lora-modules NAME={p}`, or make a model of it with `llmcycle merge {p} --out DIR`.")
    inner = p / "model"
    if (inner / marker).is_file():
        raise LlmcycleError(f"{problem} Did you mean {inner}?")
    raise LlmcycleError(f"{problem} {hint}".rstrip())
