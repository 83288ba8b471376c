"""Closing the cycle (issue 18): the model registry and its aliases, A/B tests, feedback, labelling with
agreement metrics, the export of what users said into training data, and the gated `llmcycle improve` loop.

Everything here lives in the monitor's database (the request log's SQLite file or PostgreSQL URL,
monitor/store.py), so feedback joins its request and an A/B report reads one database."""
