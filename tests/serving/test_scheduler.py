"""Self-tuning scheduler: the UCB bandit converges to the best fixed setting on a synthetic load."""

import random

import pytest

from deepseekv3.serving import SchedulerSetting, SelfTuningScheduler, UCBBandit

# A synthetic load: one decoding step over a batch of b rows takes 4 ms + 0.5 ms per row (+-10 % noise), so tokens/s
# grows with b; the inter-token latency bound of 12 ms rules out b > 16. The best feasible setting is b = 16.
SETTINGS = [SchedulerSetting(batch, 64 * batch) for batch in (1, 2, 4, 8, 16, 32, 64)]
BEST = SETTINGS.index(SchedulerSetting(16, 1024))
EPOCHS = 300  # the convergence claim: within 300 epochs of 4 steps (1,200 decoding steps)


def run_synthetic_load(scheduler: SelfTuningScheduler, epochs: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    arms = []
    for _ in range(epochs * scheduler.epoch_steps):
        batch = scheduler.current.max_batch_size
        seconds = (0.004 + 0.0005 * batch) * rng.uniform(0.9, 1.1)
        arms.append(scheduler.arm)
        scheduler.record(batch, seconds)
    return arms[:: scheduler.epoch_steps]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bandit_converges_to_the_best_fixed_setting(seed):
    scheduler = SelfTuningScheduler(SETTINGS, latency_bound_s=0.012, epoch_steps=4)
    arms = run_synthetic_load(scheduler, EPOCHS, seed)
    last = arms[-100:]
    assert max(set(last), key=last.count) == BEST
    assert last.count(BEST) >= 80
    assert scheduler.bandit.best_arm() == BEST
    # the best fixed setting really is the best: its reward beats every other arm's
    rewards = {
        arm: scheduler.reward(4 * s.max_batch_size, 4 * (0.004 + 0.0005 * s.max_batch_size), 4)
        for arm, s in enumerate(SETTINGS)
    }
    assert max(rewards, key=rewards.get) == BEST


def test_reward_discounts_latency_over_the_bound():
    scheduler = SelfTuningScheduler(SETTINGS, latency_bound_s=0.01)
    assert scheduler.reward(100, 1.0, 100) == pytest.approx(100.0)  # 10 ms per step: within the bound
    assert scheduler.reward(100, 2.0, 100) == pytest.approx(50.0 * 0.25)  # 20 ms: (10/20)^2 of 50 tokens/s


def test_ucb_plays_every_arm_first_and_rejects_bad_input():
    bandit = UCBBandit(3)
    played = []
    for _ in range(3):
        played.append(bandit.select())
        bandit.update(played[-1], 1.0)
    assert sorted(played) == [0, 1, 2]
    with pytest.raises(ValueError, match="non-negative"):
        bandit.update(0, -1.0)
    with pytest.raises(ValueError, match="num_arms"):
        UCBBandit(0)
    with pytest.raises(ValueError, match="positive"):
        SchedulerSetting(0, 10)
    with pytest.raises(ValueError, match="at least one"):
        SelfTuningScheduler([], 1.0)


def test_scheduler_state_round_trip(tmp_path):
    scheduler = SelfTuningScheduler(SETTINGS, latency_bound_s=0.012, epoch_steps=4)
    run_synthetic_load(scheduler, 40, seed=0)
    scheduler.save(tmp_path)
    loaded = SelfTuningScheduler.load(tmp_path)
    assert loaded.settings == scheduler.settings
    assert (loaded.bandit.counts, loaded.bandit.sums) == (scheduler.bandit.counts, scheduler.bandit.sums)
    assert loaded.arm == scheduler.bandit.select()


def test_history_is_a_ring_buffer_of_the_latest_epochs(tmp_path):
    scheduler = SelfTuningScheduler(SETTINGS, latency_bound_s=0.012, epoch_steps=4, history_size=5)
    run_synthetic_load(scheduler, 40, seed=0)
    assert len(scheduler.history) == 5
    assert sum(scheduler.bandit.counts) == 40  # the bandit still counts every epoch
    scheduler.save(tmp_path)
    assert SelfTuningScheduler.load(tmp_path).history.maxlen == 5
    with pytest.raises(ValueError, match="history_size"):
        SelfTuningScheduler(SETTINGS, latency_bound_s=0.012, history_size=0)
