"""Requests-per-minute and tokens-per-minute limits over a sliding 60-second window, shared by the threads of
one process. A request reserves its estimated tokens; `settle` replaces the estimate with the real count."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Optional

WINDOW_S = 60.0


class RateLimiter:
    def __init__(self, requests_per_minute: Optional[float], tokens_per_minute: Optional[float],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.window = WINDOW_S
        if self.rpm and self.rpm < 1:
            # A partition's share below one request a minute: one request per longer window.
            self.window = WINDOW_S / self.rpm
            self.tpm = self.tpm * self.window / WINDOW_S if self.tpm else self.tpm
            self.rpm = 1
        self.clock = clock
        self.sleep = sleep
        self._events: deque[list] = deque()   # [time, tokens], oldest first
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.rpm) or bool(self.tpm)

    def acquire(self, tokens: int) -> list:
        """Block until a request of `tokens` fits in the window; returns its reservation (for `settle`)."""
        while True:
            with self._lock:
                now = self.clock()
                self._expire(now)
                wait = self._wait_needed(now, tokens)
                if wait <= 0:
                    event = [now, tokens]
                    self._events.append(event)
                    return event
            self.sleep(wait)

    def settle(self, event: list, tokens: int) -> None:
        with self._lock:
            event[1] = tokens

    def _expire(self, now: float) -> None:
        while self._events and now - self._events[0][0] >= self.window:
            self._events.popleft()

    def _wait_needed(self, now: float, tokens: int) -> float:
        if not self._events:
            return 0.0  # a lone request always goes, even one larger than the token limit
        over_requests = bool(self.rpm) and len(self._events) + 1 > self.rpm
        used = sum(e[1] for e in self._events)
        over_tokens = bool(self.tpm) and used + tokens > self.tpm
        if not (over_requests or over_tokens):
            return 0.0
        # Wait until the oldest reservation leaves the window, then check again.
        return max(0.01, self._events[0][0] + self.window - now)
