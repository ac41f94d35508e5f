"""Self-tuning scheduler: a UCB1 bandit over batch settings (maximum batch size, token budget) that the engine
consults at every decoding step.

The engine reports the tokens each step produced and how long it took. Every `epoch_steps` steps the current arm is
rewarded with the epoch's tokens/s, discounted by `(latency_bound_s / step_latency)**2` when the mean step latency
(the inter-token latency every request in the batch sees) exceeds the bound; the next arm is the one with the highest
upper confidence bound. Rewards are divided by the best reward seen so far, so the exploration constant does not
depend on the machine's speed.
"""

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["SchedulerSetting", "SelfTuningScheduler", "UCBBandit"]

_STATE_NAME = "scheduler.json"


@dataclass(frozen=True)
class SchedulerSetting:
    """One batch composition the engine may run with.

    Args:
        max_batch_size (`int`): most requests decoding together.
        max_batch_tokens (`int`): token budget: the most positions the batch's cache holds, rows x the longest row
            (padding included).
    """

    max_batch_size: int
    max_batch_tokens: int

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_size and max_batch_tokens must be positive, got {self}")


class UCBBandit:
    """UCB1 over `num_arms` arms: every arm once, then `argmax mean / scale + c sqrt(2 ln t / n)`, where `scale` is
    the largest reward seen (rewards are non-negative, e.g. tokens/s, and the constant `c` stays unit-free).

    Args:
        num_arms (`int`): number of arms.
        exploration (`float`, defaults to 0.5): the constant `c`.
    """

    def __init__(self, num_arms: int, exploration: float = 0.5):
        if num_arms < 1:
            raise ValueError(f"num_arms ({num_arms}) must be at least 1")
        self.exploration = exploration
        self.counts = [0] * num_arms
        self.sums = [0.0] * num_arms
        self.scale = 0.0

    def select(self) -> int:
        """The arm to play next."""
        for arm, count in enumerate(self.counts):
            if count == 0:
                return arm
        total = sum(self.counts)
        scale = self.scale if self.scale > 0 else 1.0
        scores = [
            mean_sum / count / scale + self.exploration * math.sqrt(2 * math.log(total) / count)
            for mean_sum, count in zip(self.sums, self.counts)
        ]
        return max(range(len(scores)), key=scores.__getitem__)

    def update(self, arm: int, reward: float) -> None:
        """Records a non-negative `reward` for `arm`."""
        if not reward >= 0.0:
            raise ValueError(f"reward ({reward}) must be a non-negative number")
        self.counts[arm] += 1
        self.sums[arm] += reward
        self.scale = max(self.scale, reward)

    def best_arm(self) -> int:
        """The arm with the highest mean reward (among those played)."""
        return max(
            range(len(self.counts)), key=lambda arm: self.sums[arm] / self.counts[arm] if self.counts[arm] else -1.0
        )


class SelfTuningScheduler:
    """Chooses the engine's `SchedulerSetting` online with a `UCBBandit`.

    Args:
        settings (`list[SchedulerSetting]`): the arms.
        latency_bound_s (`float`): inter-token latency (seconds per decoding step) the reward respects.
        epoch_steps (`int`, defaults to 8): decoding steps per bandit round.
        exploration (`float`, defaults to 0.5): the UCB constant.
        history_size (`int`, defaults to 1000): epochs kept in `history`, the (arm, reward) of the latest epochs (a
            ring buffer; the bandit's counts and sums cover every epoch).
    """

    def __init__(
        self,
        settings: list[SchedulerSetting],
        latency_bound_s: float,
        epoch_steps: int = 8,
        exploration: float = 0.5,
        history_size: int = 1000,
    ):
        if not settings:
            raise ValueError("settings must name at least one SchedulerSetting")
        if latency_bound_s <= 0 or epoch_steps < 1 or history_size < 1:
            raise ValueError(
                f"latency_bound_s ({latency_bound_s}), epoch_steps ({epoch_steps}) and history_size ({history_size}) "
                "must be positive"
            )
        self.settings = list(settings)
        self.latency_bound_s = latency_bound_s
        self.epoch_steps = epoch_steps
        self.bandit = UCBBandit(len(settings), exploration)
        self.arm = self.bandit.select()
        self.history: deque[tuple[int, float]] = deque(maxlen=history_size)
        self._tokens = 0
        self._seconds = 0.0
        self._steps = 0

    @property
    def current(self) -> SchedulerSetting:
        """The setting for the next step."""
        return self.settings[self.arm]

    def reward(self, tokens: int, seconds: float, steps: int) -> float:
        """Unnormalized reward of an epoch: tokens/s, discounted when the mean step latency exceeds the bound."""
        throughput = tokens / max(seconds, 1e-9)
        latency = seconds / max(steps, 1)
        if latency > self.latency_bound_s:
            throughput *= (self.latency_bound_s / latency) ** 2
        return throughput

    def record(self, tokens: int, seconds: float) -> None:
        """Reports one decoding step (tokens produced, wall seconds); closes the epoch after `epoch_steps` steps."""
        self._tokens += tokens
        self._seconds += seconds
        self._steps += 1
        if self._steps < self.epoch_steps:
            return
        value = self.reward(self._tokens, self._seconds, self._steps)
        self.bandit.update(self.arm, value)
        self.history.append((self.arm, value))
        self._tokens, self._seconds, self._steps = 0, 0.0, 0
        self.arm = self.bandit.select()

    def save(self, directory: str | Path) -> None:
        """Writes the arms, the bandit's counts and sums and the history size to `directory/scheduler.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "settings": [asdict(setting) for setting in self.settings],
            "latency_bound_s": self.latency_bound_s,
            "epoch_steps": self.epoch_steps,
            "exploration": self.bandit.exploration,
            "history_size": self.history.maxlen,
            "counts": self.bandit.counts,
            "sums": self.bandit.sums,
            "scale": self.bandit.scale,
        }
        (directory / _STATE_NAME).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "SelfTuningScheduler":
        """Loads what `save` wrote; the bandit continues from its saved counts."""
        path = Path(directory) / _STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {_STATE_NAME} in {directory}")
        state = json.loads(path.read_text())
        scheduler = cls(
            [SchedulerSetting(**setting) for setting in state["settings"]],
            state["latency_bound_s"],
            state["epoch_steps"],
            state["exploration"],
            state["history_size"],
        )
        scheduler.bandit.counts, scheduler.bandit.sums = state["counts"], state["sums"]
        scheduler.bandit.scale = state["scale"]
        scheduler.arm = scheduler.bandit.select()
        return scheduler
