"""Offline post-training: SFT, reward models and the DPO family, with their data, batching and losses."""
