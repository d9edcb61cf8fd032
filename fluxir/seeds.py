"""Seeds: one hash of integers, and the salt of every random stream, listed once.

A stream's generator is seeded with `mix_seed(<the run's seed or a row's seed>, ..., salt)`, so streams with
different salts never share draws. The values are part of every seeded result: changing one changes
the runs that use it.
"""
from __future__ import annotations


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64 finaliser, chained)."""
    mask = (1 << 64) - 1
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (int(v) & mask)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        z ^= z >> 31
    return z >> 1


class Salt:
    """The salt of each random stream (plain ints; some streams share a value but never a seed)."""
    # stage 0: a batch's times and noise, with (run seed, step, rank)
    PRETRAIN_BATCH = 7
    # stage 1: the input stream, with the run seed
    RL_INPUTS = 1
    # stage 1, per input row (its seed): start noise, step noise (mix_seed(RL_STEP, step index) salts
    # the rows of one explored step), the regressed state pair, the flow-matching anchor's (t, noise), the
    # window's branch step, the shuffled rewards' permutation, nft's (t, noise)
    RL_START = 1
    RL_STEP = 2
    RL_PAIR = 3
    RL_FM = 4
    RL_WINDOW = 5
    RL_SHUFFLE = 6
    RL_NFT = 7
    # stage 2, with the run seed: the calibration and validation crops, a crop's start noise, a student's batches
    DISTILL_CALIBRATION = 11
    DISTILL_VALIDATION = 12
    DISTILL_START = 13
    DISTILL_BATCH = 14
