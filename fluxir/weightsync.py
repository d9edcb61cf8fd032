"""Versioned, checksummed sets of trainable tensors: what the learner ships to rollout actors.

A receiver verifies the set before loading it: every expected name present and nothing else,
every shape and dtype as expected, and the checksum recomputed over names, dtypes, shapes and
bytes equal to the sender's. A partial, tampered or mismatched set raises `WeightSyncError`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


class WeightSyncError(ValueError):
    """A weight set does not match the receiver's policy, or its checksum does not verify."""


@dataclass(frozen=True)
class WeightSet:
    version: int
    tensors: dict[str, torch.Tensor]
    checksum: str

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def weights_checksum(tensors: dict[str, torch.Tensor], algorithm: str = "blake2b") -> str:
    """A digest (blake2b-256 by default, or any `hashlib` name) over sorted (name, dtype, shape, raw bytes)."""
    digest = hashlib.blake2b(digest_size=32) if algorithm == "blake2b" else hashlib.new(algorithm)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_weight_set(tensors: dict[str, torch.Tensor], version: int, dtype: torch.dtype | None = None) -> WeightSet:
    """CPU copies of `tensors` in `dtype` (default: their own), the receivers' dtype: a bf16 policy gets
    bf16 tensors, half the bytes of fp32, and the checksum covers exactly what is shipped."""
    cpu = {k: v.detach().to("cpu", dtype or v.dtype).contiguous().clone() for k, v in tensors.items()}
    return WeightSet(version=version, tensors=cpu, checksum=weights_checksum(cpu))


def wire_format(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a receiver holding `tensors` expects on the wire: the same names, shapes and dtypes (any device).

    Meta tensors: names, shapes and dtype only, no memory.
    """
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}


def verify_weight_set(ws: WeightSet, expected: dict[str, torch.Tensor]) -> None:
    """Raise `WeightSyncError` unless `ws` carries exactly `expected`'s names, shapes and dtypes and verifies."""
    missing = sorted(set(expected) - set(ws.tensors))
    unexpected = sorted(set(ws.tensors) - set(expected))
    if missing or unexpected:
        raise WeightSyncError(f"weight set v{ws.version} is partial or foreign: {len(missing)} missing "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    for name, ref in expected.items():
        got = ws.tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise WeightSyncError(f"weight set v{ws.version}: {name} is {got.dtype}{tuple(got.shape)}, "
                                  f"expected {ref.dtype}{tuple(ref.shape)}")
    actual = weights_checksum(ws.tensors)
    if actual != ws.checksum:
        raise WeightSyncError(f"weight set v{ws.version}: checksum {actual[:16]}… != sent {ws.checksum[:16]}…")
