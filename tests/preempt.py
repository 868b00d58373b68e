"""A scheduler's preemption, for tests: SIGTERM to this process during a given training step."""

import os
import signal
from collections.abc import Callable
from typing import Any


def sigterm_at_step(train: Callable[..., Any], step: int) -> Callable[..., Any]:
    """``train`` (``prosparse_fx.training.loop.train``'s signature) that sends SIGTERM to this
    process after optimizer step ``step``, before the loop asks whether to stop."""

    def train_preempted(*args: Any, **kw: Any) -> Any:
        done, inner = [kw["start_step"]], kw["should_stop"]

        def should_stop() -> bool:
            done[0] += 1
            if done[0] == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return inner()

        return train(*args, **{**kw, "should_stop": should_stop})

    return train_preempted
