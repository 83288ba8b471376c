"""The training core every trainer runs on: the session (model, optimizer, schedule, accumulation,
checkpoints, resume, divergence, metrics, publishing) and its small parts."""
