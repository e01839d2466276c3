"""PCM stochastic scheduler for flow-matching models (SD3), in Paddle.

Same grid and timesteps as :class:`PCMFMDeterministicScheduler`; each step
predicts the clean sample ``x0 = x - sigma*v`` and re-noises it to the next
grid point with fresh noise: ``(1 - sigma_next)*x0 + sigma_next*noise``
(the reference's ``PCMFMStochasticScheduler``). Pass a ``generator`` to the
pipeline for reproducible samples.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler, PCMFMSchedulerOutput  # noqa: E402
from ppdiffusers.utils.paddle_utils import randn_tensor  # noqa: E402

__all__ = ["PCMFMStochasticScheduler", "PCMFMSchedulerOutput"]


class PCMFMStochasticScheduler(PCMFMDeterministicScheduler):
    """Predict x0, then re-noise it to the next PCM grid point."""

    def _previous_sample(self, model_output, sample, sigma, sigma_next, generator):
        denoised = sample - sigma * model_output
        noise = randn_tensor(denoised.shape, generator=generator, dtype=denoised.dtype)
        return (1.0 - sigma_next) * denoised + sigma_next * noise
