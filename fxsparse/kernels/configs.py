"""Launch configs of the three kernels, and the plans each kernel tries in turn.

A plan is a list of `LaunchConfig`s, fastest first. The first whose compiled kernel fits the GPU's
shared memory is launched (`launch.launch_fitting`); the last one of each list fits any GPU, so an
A100 or a smaller GPU runs smaller tiles instead of failing. One function per kernel chooses the
plan from the problem (layout block, padded head dim, dtype) and the caller's `KernelOptions`.

This module imports neither triton nor the kernels: the options that name a config need neither.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel is launched.

    rows: the rows a program owns (query rows in the forward and dq kernels, key/value rows in the
        dk/dv kernel), a power of two >= 16; cols: the rows of the other side it streams per step, a
        power of two >= 32. A value larger than the layout's block is cut to the block.
    num_warps, num_stages: triton's launch settings (warps per program, software pipeline depth).
    look_ahead: read the next full block's index one tile ahead. It only takes effect where the
        options' look-ahead bound allows it (`KernelOptions.forward_look_ahead` and the like).
    """

    rows: int
    cols: int
    num_warps: int = 4
    num_stages: int = 2
    look_ahead: bool = True

    def __post_init__(self):
        for name in ("rows", "cols", "num_warps"):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(f"LaunchConfig.{name} must be a positive power of two, got {getattr(self, name)!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"LaunchConfig.num_stages must be an int >= 1, got {self.num_stages!r}")
        if self.rows < 16 or self.cols < 32:
            raise ValueError(f"LaunchConfig needs rows >= 16 (tl.dot's smallest tile) and cols >= 32 (a partial "
                             f"block's element mask is read in 32-bit words), got rows={self.rows}, cols={self.cols}")
        if not isinstance(self.look_ahead, bool):
            raise ValueError(f"LaunchConfig.look_ahead must be a bool, got {self.look_ahead!r}")

    def within(self, block: int, look_ahead: bool) -> LaunchConfig:
        """This config with its tiles cut to the layout's block and its look-ahead allowed or not."""
        return LaunchConfig(min(self.rows, block), min(self.cols, block), self.num_warps, self.num_stages,
                            self.look_ahead and look_ahead)


def forward_plans(block: int, d_pad: int, dtype: torch.dtype, options, interpret: bool = False) -> list[LaunchConfig]:
    """The forward kernel's plans. `options.forward_config`, when set, is the only plan."""
    look_ahead = d_pad <= options.forward_look_ahead
    if options.forward_config is not None:
        plans = [options.forward_config]
    elif interpret:  # whole blocks: the interpreter's cost is per tile
        plans = [LaunchConfig(block, block, 4, 1)]
    elif dtype == torch.float32 or d_pad > 128:
        plans = [LaunchConfig(64, 64, 4, 2), LaunchConfig(32, 32, 4, 1, False)]
    elif d_pad <= 64:  # bf16/fp16 at D <= 64: 64x64 tiles beat 128x128 at low density (docs/performance.md)
        plans = [LaunchConfig(64, 64, 4, 3), LaunchConfig(64, 64, 4, 2, False)]
    else:
        # D = 128: with the look-ahead, q and three K and three V tiles in flight need 229376 B of
        # shared memory (an H100 or H200; an A100 has 166912 B): then the same tiles without it,
        # then small tiles
        plans = [LaunchConfig(128, 128, 8, 3), LaunchConfig(128, 128, 8, 3, False), LaunchConfig(64, 64, 4, 2, False)]
    return [p.within(block, look_ahead) for p in plans]


def _backward_plans(config, default: LaunchConfig, block: int, look_ahead: bool) -> list[LaunchConfig]:
    small = LaunchConfig(min(32, block), min(32, block), 4, 1, False)  # fits any GPU
    return [(config or default).within(block, look_ahead), small]


def _backward_default(block: int, d_pad: int, dtype: torch.dtype, interpret: bool) -> LaunchConfig:
    if interpret:
        return LaunchConfig(block, block, 4, 1)
    if dtype == torch.float32 or d_pad > 128:
        return LaunchConfig(64, 32, 4, 1)
    return LaunchConfig(64, 64, 4, 3)  # bf16/fp16 at D = 64 and 128: the best of the sweep


def dq_plans(block: int, d_pad: int, dtype: torch.dtype, options, interpret: bool = False) -> list[LaunchConfig]:
    """The dq kernel's plans: rows = query rows, cols = key/value rows; `options.dq_config` first when set."""
    return _backward_plans(options.dq_config, _backward_default(block, d_pad, dtype, interpret), block,
                           d_pad <= options.dq_look_ahead)


def dkdv_plans(block: int, d_pad: int, dtype: torch.dtype, options, interpret: bool = False) -> list[LaunchConfig]:
    """The dk/dv kernel's plans: rows = key/value rows, cols = query rows; `options.dkdv_config` first when set."""
    return _backward_plans(options.dkdv_config, _backward_default(block, d_pad, dtype, interpret), block,
                           d_pad <= options.dkdv_look_ahead)
