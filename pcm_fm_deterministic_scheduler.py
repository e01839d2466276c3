"""PCM deterministic scheduler for flow-matching models (SD3), in Paddle.

Usable as ``StableDiffusion3Pipeline``'s scheduler exactly as in the PCM
inference snippet::

    from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler
    pipe = StableDiffusion3Pipeline.from_pretrained(MODEL,
        scheduler=PCMFMDeterministicScheduler(1000, shift, num_pcm_timesteps))

Maths (T = ``num_train_timesteps``, P = ``pcm_timesteps``):

* training sigmas ``sigma(u) = shift*u / (1 + (shift-1)*u)`` for ``u = T/T, (T-1)/T, ..., 1/T``;
* the PCM grid keeps the sigmas at ascending-noise positions ``(j+1)*(T//P) - 1``,
  ``j = 0..P-1``, stored descending: ``sigma((P-i)*(T//P)/T)`` for ``i = 0..P-1``;
* ``set_timesteps(n)`` takes grid positions ``floor(linspace(0, P, n, endpoint=False))``,
  timesteps ``sigma*T``, and appends ``sigma = 0``;
* ``step`` is one Euler step ``x + (sigma_next - sigma) * v`` to the next grid point.

Importing this module applies the project's Paddle 3 compatibility layer.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle_compat  # noqa: E402,F401  (before ppdiffusers)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from ppdiffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from ppdiffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402
from ppdiffusers.utils import BaseOutput  # noqa: E402


@dataclass
class PCMFMSchedulerOutput(BaseOutput):
    prev_sample: paddle.Tensor


def pcm_sigma_grid(num_train_timesteps: int, shift: float, pcm_timesteps: int) -> np.ndarray:
    """The P sigmas of the PCM grid, descending (float32, as the reference computes them)."""
    u = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / np.float32(num_train_timesteps)
    sigmas = np.float32(shift) * u / (np.float32(1) + np.float32(shift - 1) * u)  # descending
    positions = np.arange(1, pcm_timesteps + 1) * (num_train_timesteps // pcm_timesteps) - 1
    return sigmas[::-1][positions][::-1].astype(np.float32).copy()


class PCMFMDeterministicScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic multistep sampler on the PCM phase grid (Euler between grid points)."""

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, pcm_timesteps: int = 50):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if pcm_timesteps < 1 or num_train_timesteps % pcm_timesteps:
            raise ValueError(
                f"pcm_timesteps ({pcm_timesteps}) must be >= 1 and divide num_train_timesteps ({num_train_timesteps})"
            )
        self.pcm_sigmas = pcm_sigma_grid(num_train_timesteps, shift, pcm_timesteps)
        # Before set_timesteps the schedule is the whole grid, as in the reference.
        self.sigmas = paddle.to_tensor(np.append(self.pcm_sigmas, np.float32(0)))
        self.timesteps = paddle.to_tensor(self.pcm_sigmas * np.float32(num_train_timesteps))
        self.sigma_min = float(self.pcm_sigmas[-1])
        self.sigma_max = float(self.pcm_sigmas[0])
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        """Index of the current timestep; advances by one after each ``step``."""
        return self._step_index

    @property
    def begin_index(self):
        """First timestep index, set by a pipeline with ``set_begin_index`` (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, **unused):
        """Choose ``num_inference_steps`` points of the PCM grid (1 <= n <= pcm_timesteps)."""
        pcm_timesteps = self.config.pcm_timesteps
        if not 1 <= num_inference_steps <= pcm_timesteps:
            raise ValueError(f"num_inference_steps must be between 1 and pcm_timesteps={pcm_timesteps}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        positions = np.floor(np.linspace(0, pcm_timesteps, num=num_inference_steps, endpoint=False)).astype(np.int64)
        sigmas = self.pcm_sigmas[positions]
        self.timesteps = paddle.to_tensor(sigmas * np.float32(self.config.num_train_timesteps))
        self.sigmas = paddle.to_tensor(np.append(sigmas, np.float32(0)))
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        schedule = (schedule_timesteps if schedule_timesteps is not None else self.timesteps).numpy()
        value = float(timestep.item() if isinstance(timestep, paddle.Tensor) else timestep)
        indices = np.nonzero(schedule == np.float32(value))[0]
        if len(indices) == 0:
            raise ValueError(f"timestep {value} is not one of this scheduler's timesteps {schedule.tolist()}")
        # As the reference: with duplicates take the second, so a restart mid-schedule skips no sigma.
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def scale_noise(self, sample: paddle.Tensor, timestep, noise: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        """Forward flow-matching process to ``timestep``: ``sigma*noise + (1-sigma)*sample``."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index].astype(sample.dtype)
        return sigma * noise + (1.0 - sigma) * sample

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def _previous_sample(self, model_output, sample, sigma, sigma_next, generator):
        """Euler step along the predicted velocity to the next grid point."""
        return sample + (sigma_next - sigma) * model_output

    def step(
        self,
        model_output: paddle.Tensor,
        timestep: Union[float, paddle.Tensor],
        sample: paddle.Tensor,
        generator: Optional[paddle.Generator] = None,
        return_dict: bool = True,
    ) -> Union[PCMFMSchedulerOutput, Tuple]:
        """Move ``sample`` from the current grid point to the next one, given velocity ``model_output``."""
        if isinstance(timestep, int):
            raise ValueError("pass one of `scheduler.timesteps` as timestep, not an integer index")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index + 1 >= len(self.sigmas):
            raise ValueError("step called more times than there are timesteps; call set_timesteps again")
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        prev_sample = self._previous_sample(
            model_output.astype("float32"), sample.astype("float32"), sigma, sigma_next, generator
        ).astype(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return PCMFMSchedulerOutput(prev_sample=prev_sample)

    def __len__(self):
        return self.config.num_train_timesteps
