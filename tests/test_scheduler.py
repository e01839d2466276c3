"""PCM schedulers against values derived by hand from PCM_SPEC §6.

Derivation used throughout (T = 1000 training timesteps, P = pcm_timesteps):
  * training sigma at u in (0, 1]:  sigma(u) = shift*u / (1 + (shift-1)*u)
  * PCM grid, descending: grid[i] = sigma((P - i) * (T // P) / T), i = 0..P-1
      (ascending positions (j+1)*(T//P) - 1 pick u = (j+1)*(T//P)/T; reversing gives P - i)
  * set_timesteps(n) picks i = floor(k * P / n), k = 0..n-1, then appends sigma = 0;
    timesteps = 1000 * sigma.
So for P = 50 grid[i] = sigma(1 - i/50); for P = 100 grid[i] = sigma(1 - i/100).
"""
import numpy as np
import paddle
import pytest

from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler
from pcm_fm_stochastic_scheduler import PCMFMStochasticScheduler

# floor(k * P / n) for k = 0..n-1, written out by hand:
#   P=50:  n=1 -> 0; n=2 -> 0, 25; n=4 -> 0, 12.5->12, 25, 37.5->37;
#          n=8 -> 0, 6.25->6, 12.5->12, 18.75->18, 25, 31.25->31, 37.5->37, 43.75->43
#   P=100: n=1 -> 0; n=2 -> 0, 50; n=4 -> 0, 25, 50, 75; n=8 -> 0, 12.5->12, 25, 37.5->37, 50, 62.5->62, 75, 87.5->87
GRID_POSITIONS = {
    (50, 1): [0],
    (50, 2): [0, 25],
    (50, 4): [0, 12, 25, 37],
    (50, 8): [0, 6, 12, 18, 25, 31, 37, 43],
    (100, 1): [0],
    (100, 2): [0, 50],
    (100, 4): [0, 25, 50, 75],
    (100, 8): [0, 12, 25, 37, 50, 62, 75, 87],
}


def shifted(u, shift):
    return shift * u / (1 + (shift - 1) * u)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("pcm_timesteps,steps", sorted(GRID_POSITIONS))
def test_timesteps_and_sigmas_match_hand_derivation(shift, pcm_timesteps, steps):
    scheduler = PCMFMDeterministicScheduler(1000, shift, pcm_timesteps)
    scheduler.set_timesteps(steps)
    expected_sigmas = [shifted(1 - i / pcm_timesteps, shift) for i in GRID_POSITIONS[(pcm_timesteps, steps)]]
    np.testing.assert_allclose(scheduler.sigmas.numpy(), expected_sigmas + [0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), [1000 * s for s in expected_sigmas], rtol=1e-6)
    assert len(scheduler.timesteps) == steps


def test_worked_examples():
    # shift 3, P 50, 4 steps: u = 1, 0.76, 0.5, 0.26 ->
    #   3*1/3 = 1;  2.28/2.52 = 0.9047619;  1.5/2 = 0.75;  0.78/1.52 = 0.5131579
    scheduler = PCMFMDeterministicScheduler(1000, 3, 50)
    scheduler.set_timesteps(4)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), [1000.0, 904.7619, 750.0, 513.1579], rtol=1e-6)
    # shift 1, P 50, 2 steps: sigmas 1.0, 0.5, then 0
    scheduler = PCMFMDeterministicScheduler(1000, 1, 50)
    scheduler.set_timesteps(2)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), [1.0, 0.5, 0.0])


def test_deterministic_sampling_loop():
    # With velocity v(x) = x, each Euler step multiplies x by 1 + (sigma_next - sigma).
    # shift 1, P 50, 4 steps: sigmas 1, .76, .5, .26, 0 -> factors .76, .74, .76, .74
    scheduler = PCMFMDeterministicScheduler(1000, 1.0, 50)
    scheduler.set_timesteps(4)
    x = paddle.full([1, 2, 2, 2], 2.0)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    np.testing.assert_allclose(x.numpy(), np.full([1, 2, 2, 2], 2.0 * 0.76 * 0.74 * 0.76 * 0.74), rtol=1e-6)


def test_constant_velocity_telescopes_to_minus_v():
    # Euler steps telescope: x_final = x_start + (0 - sigma_first) * v = x_start - v for sigma_first = 1.
    scheduler = PCMFMDeterministicScheduler(1000, 3.0, 100)
    scheduler.set_timesteps(8)
    x = paddle.to_tensor(np.arange(8, dtype="float32").reshape([1, 2, 2, 2]))
    v = paddle.full_like(x, 0.5)
    start = x.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(v, t, x, return_dict=False)[0]
    np.testing.assert_allclose(x.numpy(), (start - 0.5).numpy(), atol=1e-6)


def test_stochastic_last_step_returns_predicted_x0():
    # Stochastic step: x0 = x - sigma*v, then (1 - sigma_next)*x0 + sigma_next*noise; the last
    # sigma_next is 0, so a 1-step sample is exactly x - v (sigma = 1) whatever the noise.
    scheduler = PCMFMStochasticScheduler(1000, 1.0, 50)
    scheduler.set_timesteps(1)
    x = paddle.full([1, 1, 2, 2], 3.0)
    v = paddle.full([1, 1, 2, 2], 1.0)
    out = scheduler.step(v, scheduler.timesteps[0], x, generator=paddle.Generator().manual_seed(0)).prev_sample
    np.testing.assert_allclose(out.numpy(), np.full([1, 1, 2, 2], 2.0))


def test_stochastic_is_reproducible_with_a_generator_and_renoises():
    def sample(seed):
        scheduler = PCMFMStochasticScheduler(1000, 1.0, 50)
        scheduler.set_timesteps(2)  # sigmas 1, 0.5, 0
        x = paddle.zeros([1, 1, 4, 4])
        return scheduler.step(paddle.zeros_like(x), scheduler.timesteps[0], x,
                              generator=paddle.Generator().manual_seed(seed)).prev_sample.numpy()

    a, b, c = sample(1), sample(1), sample(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a).max() > 0  # x0 = 0, so the result is 0.5 * noise


def test_scale_noise_and_begin_index():
    scheduler = PCMFMDeterministicScheduler(1000, 1.0, 50)
    scheduler.set_timesteps(4)  # sigmas 1, .76, .5, .26
    scheduler.set_begin_index(2)
    sample, noise = paddle.full([1, 1, 1, 1], 4.0), paddle.full([1, 1, 1, 1], -2.0)
    out = scheduler.scale_noise(sample, scheduler.timesteps[2], noise)
    np.testing.assert_allclose(out.numpy().ravel(), [0.5 * -2.0 + 0.5 * 4.0])
    assert scheduler.begin_index == 2 and len(scheduler) == 1000


def test_save_and_load_round_trip(tmp_path):
    scheduler = PCMFMDeterministicScheduler(1000, 3.0, 100)
    scheduler.save_pretrained(str(tmp_path))
    loaded = PCMFMDeterministicScheduler.from_pretrained(str(tmp_path))
    for key in ("num_train_timesteps", "shift", "pcm_timesteps"):
        assert loaded.config[key] == scheduler.config[key]
    assert loaded.config.shift == 3.0 and loaded.config.pcm_timesteps == 100
    loaded.set_timesteps(4)
    scheduler.set_timesteps(4)
    np.testing.assert_array_equal(loaded.timesteps.numpy(), scheduler.timesteps.numpy())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(shift=0.0), "shift"),
        (dict(shift=-1.0), "shift"),
        (dict(pcm_timesteps=30), "divide"),
        (dict(pcm_timesteps=0), "pcm_timesteps"),
    ],
)
def test_invalid_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PCMFMDeterministicScheduler(**{"num_train_timesteps": 1000, **kwargs})


@pytest.mark.parametrize("steps", [0, 51])
def test_invalid_step_count(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        PCMFMDeterministicScheduler(1000, 1.0, 50).set_timesteps(steps)


def test_set_timesteps_prints_nothing(capsys):
    PCMFMDeterministicScheduler(1000, 3.0, 50).set_timesteps(4)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("euler, phases, pcm, coincide", [
    (100, 4, 100, [True, True, True]),   # the seed run sampled with PCMFMDeterministicScheduler(1000, 3, 100)
    (100, 4, 50, [False, True, False]),  # ... with the README snippet's 50: ceil(j*50/4)/50 = 0.26, 0.5, 0.76
    (50, 4, 50, [False, True, False]),   # floor(j*50/4)/50 = 0.24, 0.5, 0.74 vs ceil: 0.26, 0.5, 0.76
    (100, 4, 200, [True, True, True]),   # P divides N and Q: both grids hold j/P
    (100, 2, 50, [True]),
    (50, 8, 200, [False, False, False, True, False, False, False]),  # 8 does not divide 50: floor(j*50/8)/50 != j/8
])
def test_one_step_per_phase_lands_on_the_trained_phase_ends_when_both_grids_have_them(euler, phases, pcm, coincide):
    """With num_inference_steps = --multiphase, the sampler's intermediate sigmas are the trained phase ends
    (sigma_prev at each phase start, where the student's jumps land) exactly where both grids have the point."""
    from ppdiffusers import FlowMatchEulerDiscreteScheduler

    from pcm_solver import EulerSolver

    teacher = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    solver = EulerSolver(teacher.sigmas.numpy()[::-1][:1000].copy(), euler, phases)
    phase_ends = solver.sigmas_prev.numpy()[solver.phase_starts[1:]][::-1]  # descending, j = P-1 .. 1
    sampler = PCMFMDeterministicScheduler(1000, 3.0, pcm)
    sampler.set_timesteps(phases)
    visited = sampler.sigmas.numpy()[1:-1]  # after the first point (sigma 1), before the final 0
    assert list(np.isclose(visited, phase_ends, rtol=0, atol=1e-6)) == coincide[::-1]
