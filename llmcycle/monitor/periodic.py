"""`Periodic`: a daemon thread that calls `tick()` every `every_s` seconds until `stop()`, the shape of the
server's background monitors (resources, drift, quality). A failing tick is logged and the next one runs."""

from __future__ import annotations

import abc
import logging
import threading

log = logging.getLogger(__name__)


class Periodic(abc.ABC):
    def __init__(self, every_s: float, name: str) -> None:
        self.every_s, self.name = every_s, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"llmcycle-{name}", daemon=True)

    @abc.abstractmethod
    def tick(self) -> None:
        """One round of the monitor's work."""

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - a failed tick must not stop the next one
                log.warning("%s: %s", self.name, e)
