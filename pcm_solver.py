"""The maths of one PCM training step (PCM_SPEC §2, §3.3, §3.7, §3.8): the Euler solver on N
points of the teacher's sigma schedule, multiphase jumps, adversarial re-noising and the
consistency losses. Plain functions of tensors, so each is unit-tested against hand numbers.
"""
from __future__ import annotations

import numpy as np
import paddle


def _per_sample(values: paddle.Tensor, index: paddle.Tensor, ndim: int) -> paddle.Tensor:
    """``values[index]`` reshaped to ``[B, 1, 1, ...]`` so that it broadcasts over a sample of ``ndim`` dims."""
    return paddle.gather(values, index).reshape([-1] + [1] * (ndim - 1))


class EulerSolver:
    """Euler solver on ``N = num_euler_timesteps`` points of the training sigmas.

    ``sigmas_ascending`` are the teacher's 1000 training sigmas reversed (index 0 least noisy).
    With ``r = T // N``: solver timesteps ``e_k = (k+1)*r - 1``; ``sigma_k = s[e_k]``;
    ``sigma_prev_0 = s[0]`` and ``sigma_prev_k = s[e_(k-1)]``. Phase starts for ``P`` phases are
    ``p_j = floor(j*N/P)``; ``end(k)`` is the largest ``p_j <= k``.
    """

    def __init__(self, sigmas_ascending, num_euler_timesteps: int, multiphase: int):
        sigmas_ascending = np.asarray(sigmas_ascending, dtype=np.float32)
        total = len(sigmas_ascending)
        if num_euler_timesteps < 1 or total % num_euler_timesteps:
            raise ValueError(f"num_euler_timesteps ({num_euler_timesteps}) must divide the {total} training timesteps")
        if not 1 <= multiphase <= num_euler_timesteps:
            raise ValueError(f"multiphase ({multiphase}) must be between 1 and num_euler_timesteps ({num_euler_timesteps})")
        self.num_euler_timesteps = num_euler_timesteps
        self.multiphase = multiphase
        ratio = total // num_euler_timesteps
        self.euler_timesteps = np.arange(1, num_euler_timesteps + 1) * ratio - 1
        sigmas = sigmas_ascending[self.euler_timesteps]
        sigmas_prev = np.concatenate([sigmas_ascending[:1], sigmas[:-1]])
        self.phase_starts = np.floor(np.arange(multiphase) * num_euler_timesteps / multiphase).astype(np.int64)
        self.phase_length = num_euler_timesteps // multiphase
        self.sigmas = paddle.to_tensor(sigmas)
        self.sigmas_prev = paddle.to_tensor(sigmas_prev)
        self._phase_starts = paddle.to_tensor(self.phase_starts)

    def phase_end(self, index: paddle.Tensor) -> paddle.Tensor:
        """``end(k)``: the start of the phase each solver index lies in (the largest ``p_j <= k``)."""
        count = (index.unsqueeze(1) >= self._phase_starts.unsqueeze(0)).astype("int64").sum(axis=1)
        return paddle.gather(self._phase_starts, count - 1)

    def euler_step(self, sample: paddle.Tensor, velocity: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
        """One solver step down from index k: ``x + (sigma_prev_k - sigma_k) * v``."""
        sigma = _per_sample(self.sigmas, index, sample.ndim).astype(sample.dtype)
        sigma_prev = _per_sample(self.sigmas_prev, index, sample.ndim).astype(sample.dtype)
        return sample + (sigma_prev - sigma) * velocity

    def multiphase_jump(self, sample, velocity, index, is_target: bool = False):
        """Jump to the start of the phase: ``x + (sigma_prev_end(k) - sigma) * v`` with
        ``sigma = sigma_k`` for the student's prediction, ``sigma_prev_k`` for the target (which sits
        one solver step lower). Returns ``(jumped sample, end(k))``."""
        end = self.phase_end(index)
        sigma = _per_sample(self.sigmas_prev if is_target else self.sigmas, index, sample.ndim).astype(sample.dtype)
        sigma_end = _per_sample(self.sigmas_prev, end, sample.ndim).astype(sample.dtype)
        return sample + (sigma_end - sigma) * velocity, end

    def sample_adversarial_index(self, end: paddle.Tensor) -> paddle.Tensor:
        """Per sample ``a ~ U{end .. end + N//P - 1}`` (uses Paddle's global generator)."""
        offset = paddle.randint(0, self.phase_length, shape=end.shape, dtype="int64")
        return end + offset

    def adversarial_renoise(self, clean, end, adv_index, noise):
        """Re-noise a phase-start sample from ``sigma_e = sigma_prev_end`` up to ``sigma_a = sigma_prev_a``:
        ``((1 - sigma_a) * x + (sigma_a - sigma_e) * noise) / (1 - sigma_e)``."""
        sigma_e = _per_sample(self.sigmas_prev, end, clean.ndim).astype(clean.dtype)
        sigma_a = _per_sample(self.sigmas_prev, adv_index, clean.ndim).astype(clean.dtype)
        return ((1 - sigma_a) * clean + (sigma_a - sigma_e) * noise) / (1 - sigma_e)


def consistency_loss(prediction: paddle.Tensor, target: paddle.Tensor, loss_type: str, huber_c: float) -> paddle.Tensor:
    """``l2``: mean squared error; ``huber``: ``mean(sqrt((x - y)^2 + c^2) - c)``. Computed in fp32."""
    diff = prediction.astype("float32") - target.astype("float32")
    if loss_type == "l2":
        return (diff * diff).mean()
    if loss_type == "huber":
        return (paddle.sqrt(diff * diff + huber_c**2) - huber_c).mean()
    raise ValueError(f"--loss_type must be l2 or huber, got {loss_type!r}")


def cfg_velocity(cond: paddle.Tensor, uncond: paddle.Tensor, guidance: paddle.Tensor) -> paddle.Tensor:
    """Classifier-free guidance with a per-sample scale ``w``: ``v_c + w * (v_c - v_u)``."""
    w = guidance.reshape([-1] + [1] * (cond.ndim - 1)).astype(cond.dtype)
    return cond + w * (cond - uncond)
