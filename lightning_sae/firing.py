"""``FiringCounter``: the one record of which features fire on the training rows."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_sae.errors import UserError


class FiringCounter(nn.Module):
    """Per-feature firing state of the training rows, summed over all ranks.

    Feature i fires on a row when f_i > 0. Each training step, :meth:`update` counts the rows of
    the step's batch on which each feature fired (one ``all_reduce`` under DDP, no host
    synchronisation) and keeps r_i, the training rows since feature i last fired. Feature i is
    *dead* when r_i ≥ ``dead_after_tokens`` (Bricken et al. 2023; Gao et al. 2024: 10M tokens).

    Everyone who needs firing state reads it here: the AuxK penalty (through the forward pass's
    dead mask), the dead-feature tracker (its density windows and logs), resampling (which
    revives features), and the target-L0 controller (the step's L0).
    """

    def __init__(self, d_sae: int, dead_after_tokens: int) -> None:
        """
        Args:
            d_sae: Number of features m.
            dead_after_tokens: Training rows without firing after which a feature counts as dead.
        """
        super().__init__()
        if dead_after_tokens < 1:
            raise UserError(f"dead_after_tokens must be positive, got {dead_after_tokens}")
        self.dead_after_tokens = dead_after_tokens
        self.register_buffer("rows_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("step_counts", torch.zeros(d_sae, dtype=torch.long), persistent=False)
        self.step_rows = 0
        """Rows of the last training step, all ranks together."""
        self._dead_count = HostCopy()

    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        """Count the firings of one training step's features [..., m] (every rank calls it)."""
        fired = features.reshape(-1, features.shape[-1]) > 0
        if fired.is_cuda:  # summing bools converts them to int64 first; float16 read into a float32 sum does not
            counts = fired.half().sum(0, dtype=torch.float32).long()
        else:
            counts = fired.sum(0)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            world_size = dist.get_world_size()
        self.step_counts.copy_(counts)
        self.step_rows = fired.shape[0] * world_size  # every rank's batch holds the same rows
        self.rows_since_fired.add_(self.step_rows).masked_fill_(counts > 0, 0)
        self._dead_count.publish(self.dead_mask().sum())

    @property
    def known_dead_count(self) -> int:
        """The number of dead features as last known on the host, without waiting for the device:
        exact on a CPU, a step or two old on a GPU (−1: not known yet)."""
        return self._dead_count.value

    def dead_mask(self) -> Tensor:
        """[m] bool: features that fired on none of the last ``dead_after_tokens`` training rows."""
        return self.rows_since_fired >= self.dead_after_tokens

    def step_l0(self) -> Tensor:
        """Mean active features per row over the last training step, a scalar on the device."""
        return self.step_counts.sum() / max(1, self.step_rows)

    @torch.no_grad()
    def declare_dead_(self, indices: Tensor) -> None:
        """Count features ``indices`` as dead from now on (features just silenced), until they fire."""
        self.rows_since_fired[indices] = self.rows_since_fired[indices].clamp(min=self.dead_after_tokens)
        self._dead_count.forget()  # the known count may now be too low

    @torch.no_grad()
    def revive_(self, indices: Tensor) -> None:
        """Restart the count of rows without firing of ``indices`` (features just resampled)."""
        self.rows_since_fired[indices] = 0
        self._dead_count.forget()  # the known count may now be too high


class HostCopy:
    """The value of a device scalar on the host, brought over without making the host wait.

    On a CPU the value is read at once. On a GPU it is copied into page-locked memory
    asynchronously, and :attr:`value` is that of the last copy that has landed (an event query,
    never a wait). Copies in flight are not pickled or deep-copied.
    """

    def __init__(self) -> None:
        self.value = -1
        self._copy: Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def publish(self, scalar: Tensor) -> None:
        """Start bringing ``scalar`` (an integer tensor) to the host."""
        if scalar.device.type != "cuda":
            self.value = int(scalar)
            return
        if self._copied is not None:
            if not self._copied.query():
                return  # the previous copy is still on its way; a later call tries again
            self.value = int(self._copy)  # type: ignore[arg-type]
        if self._copy is None:
            self._copy = torch.empty((), dtype=torch.long, pin_memory=True)
        self._copy.copy_(scalar, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def forget(self) -> None:
        """Make the value unknown (−1) until the next :meth:`publish` lands."""
        self.value, self._copied = -1, None

    def __getstate__(self) -> dict[str, Any]:
        return {"value": self.value, "_copy": None, "_copied": None}
