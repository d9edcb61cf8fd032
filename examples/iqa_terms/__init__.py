"""Example plug-in reward terms for `rl.reward.terms` (see noref.py for how the reward workers import them)."""
