"""Monitoring: what the server did with every request (the request log), what it cost (prices), and the
commands that read it back (`llmcycle monitor usage|export`). The server enters it through one hook,
`RequestMonitor.begin` (monitor/tracker.py); docs/monitor.md."""
