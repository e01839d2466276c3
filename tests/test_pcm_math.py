"""pcm_solver.py against numbers derived by hand from PCM_SPEC §2, §3.3, §3.5-3.8.

Toy sigma table used throughout (12 entries, deliberately non-linear so that every solver
index gives a different step):  s[i] = (i+1)^2 / 144, i = 0..11, i.e. in units of 1/144:
    s = 1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 121, 144
Spec §2: r = T // N, e_k = (k+1)*r - 1, sigma_k = s[e_k], sigma_prev_0 = s[0],
sigma_prev_k = s[e_(k-1)], phase starts p_j = floor(j*N/P), end(k) = largest p_j <= k.
"""
import numpy as np
import paddle
import pytest

from pcm_solver import EulerSolver, cfg_velocity, consistency_loss

S12 = [(i + 1) ** 2 / 144 for i in range(12)]

# N -> (e_k, sigma_k * 144, sigma_prev_k * 144), all by hand from the table above:
#   N=1:  r=12, e=11                 sigma=144                 prev=s[0]=1
#   N=2:  r=6,  e=5,11               sigma=36,144              prev=1,36
#   N=3:  r=4,  e=3,7,11             sigma=16,64,144           prev=1,16,64
#   N=4:  r=3,  e=2,5,8,11           sigma=9,36,81,144         prev=1,9,36,81
#   N=6:  r=2,  e=1,3,5,7,9,11       sigma=4,16,36,64,100,144  prev=1,4,16,36,64,100
#   N=12: r=1,  e=0..11              sigma=(k+1)^2             prev=1,1,4,9,...,121
TOY_SOLVER = {
    1: ([11], [144], [1]),
    2: ([5, 11], [36, 144], [1, 36]),
    3: ([3, 7, 11], [16, 64, 144], [1, 16, 64]),
    4: ([2, 5, 8, 11], [9, 36, 81, 144], [1, 9, 36, 81]),
    6: ([1, 3, 5, 7, 9, 11], [4, 16, 36, 64, 100, 144], [1, 4, 16, 36, 64, 100]),
    12: (list(range(12)), [(k + 1) ** 2 for k in range(12)], [1] + [k**2 for k in range(1, 12)]),
}


def assert_close(actual, expected, **kwargs):
    """np.testing.assert_allclose on at-least-1-d arrays: ppdiffusers sets ``np.bool = bool``
    (ppdiffusers/utils/load_utils.py), which breaks numpy 2's comparison of 0-d values."""
    actual = np.atleast_1d(np.asarray(actual))
    np.testing.assert_allclose(actual, np.broadcast_to(np.asarray(expected), actual.shape), **kwargs)


def _f32(array):
    return paddle.to_tensor(np.asarray(array, dtype=np.float32))


def _i64(values):
    return paddle.to_tensor(np.asarray(values, dtype=np.int64))


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n", sorted(TOY_SOLVER))
def test_toy_table_timesteps_sigmas_and_previous_sigmas(n):
    timesteps, sigmas, prev = TOY_SOLVER[n]
    solver = EulerSolver(S12, n, 1)
    assert solver.num_euler_timesteps == n
    np.testing.assert_array_equal(solver.euler_timesteps, timesteps)
    assert_close(solver.sigmas.numpy(), np.array(sigmas) / 144, rtol=0, atol=1e-7)
    assert_close(solver.sigmas_prev.numpy(), np.array(prev) / 144, rtol=0, atol=1e-7)


# (N, P) -> phase starts floor(j*N/P), phase length N//P and end(k) for every k = 0..N-1:
#   N=4,  P=1: starts 0;            length 4; ends 0,0,0,0
#   N=4,  P=2: starts 0, 2;         length 2; ends 0,0,2,2
#   N=4,  P=4: starts 0,1,2,3;      length 1; ends 0,1,2,3 (every index starts its own phase)
#   N=10, P=4: 0, 2.5->2, 5, 7.5->7; length 2; ends 0,0,2,2,2,5,5,7,7,7
#   N=10, P=3: 0, 3.33->3, 6.67->6;  length 3; ends 0,0,0,3,3,3,6,6,6,6
#   N=50, P=8: 0, 6.25->6, 12.5->12, 18.75->18, 25, 31.25->31, 37.5->37, 43.75->43; length 6;
#              ends: each start repeated (next start - start) times: 6,6,6,7,6,6,6,7 (sum 50)
#   N=100, P=4 (the seed command): 0, 25, 50, 75; length 25; ends: each start 25 times
PHASES = {
    (4, 1): ([0], 4, [0, 0, 0, 0]),
    (4, 2): ([0, 2], 2, [0, 0, 2, 2]),
    (4, 4): ([0, 1, 2, 3], 1, [0, 1, 2, 3]),
    (10, 4): ([0, 2, 5, 7], 2, [0, 0, 2, 2, 2, 5, 5, 7, 7, 7]),
    (10, 3): ([0, 3, 6], 3, [0, 0, 0, 3, 3, 3, 6, 6, 6, 6]),
    (50, 8): (
        [0, 6, 12, 18, 25, 31, 37, 43], 6,
        [0] * 6 + [6] * 6 + [12] * 6 + [18] * 7 + [25] * 6 + [31] * 6 + [37] * 6 + [43] * 7,
    ),
    (100, 4): ([0, 25, 50, 75], 25, [0] * 25 + [25] * 25 + [50] * 25 + [75] * 25),
}


@pytest.mark.parametrize("n,p", sorted(PHASES))
def test_phase_starts_length_and_end_of_every_index(n, p):
    starts, length, ends = PHASES[(n, p)]
    solver = EulerSolver(np.linspace(0.001, 1.0, 1000), n, p)
    assert solver.multiphase == p
    np.testing.assert_array_equal(solver.phase_starts, starts)
    assert solver.phase_length == length
    assert len(ends) == n
    np.testing.assert_array_equal(solver.phase_end(_i64(range(n))).numpy(), ends)
    # one index at a time too (batch of 1), and in a shuffled order
    for k in (0, n - 1, n // 2):
        assert int(solver.phase_end(_i64([k])).numpy()[0]) == ends[k]
    order = np.random.default_rng(0).permutation(n)
    np.testing.assert_array_equal(solver.phase_end(_i64(order)).numpy(), np.array(ends)[order])


def test_twenty_entry_table_n10_p4():
    # s = 0.05, 0.10, ..., 1.00 (20 entries, s[i] = (i+1)/20); N=10 -> r=2, e_k = 2k+1 = 1,3,...,19
    # sigma_k = s[2k+1] = (k+1)/10 = 0.1..1.0; prev = s[0]=0.05, then sigma_(k-1) = 0.1..0.9
    solver = EulerSolver([(i + 1) / 20 for i in range(20)], 10, 4)
    np.testing.assert_array_equal(solver.euler_timesteps, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19])
    assert_close(solver.sigmas.numpy(), [(k + 1) / 10 for k in range(10)], atol=1e-7)
    assert_close(solver.sigmas_prev.numpy(), [0.05] + [k / 10 for k in range(1, 10)], atol=1e-7)
    np.testing.assert_array_equal(solver.phase_starts, [0, 2, 5, 7])
    assert solver.phase_length == 2


def _sd3_shift3(u):
    return 3 * u / (1 + 2 * u)


@pytest.fixture(scope="module")
def sd3_sigmas_ascending():
    """The teacher's 1000 training sigmas reversed, as the trainer builds them (index 0 least noisy)."""
    from ppdiffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return scheduler.sigmas.numpy()[::-1][:1000].copy()


def test_sd3_schedule_table_is_the_shifted_formula(sd3_sigmas_ascending):
    # s[i] = sigma(u) with u = (i+1)/1000: s[0] = 0.003/1.002 = 1/334, s[499] = 1.5/2 = 0.75, s[999] = 1
    s = sd3_sigmas_ascending
    assert len(s) == 1000
    assert_close([s[0], s[499], s[999]], [1 / 334, 0.75, 1.0], rtol=1e-6)


@pytest.mark.parametrize("n,entries", [
    # N=50: r=20, e_k = 20k+19, u(e) = (e+1)/1000, sigma(u) = 3u/(1+2u)
    #   sigma_0  = s[19]  : u=0.02 -> 0.06/1.04 = 3/52
    #   prev_0   = s[0]   : u=0.001 -> 0.003/1.002 = 1/334
    #   sigma_24 = s[499] : u=0.5 -> 0.75;   prev_25 = s[e_24] = 0.75
    #   sigma_25 = s[519] : u=0.52 -> 1.56/2.04 = 13/17
    #   sigma_49 = s[999] : u=1 -> 1;        prev_49 = s[979]: u=0.98 -> 2.94/2.96 = 147/148
    (50, {"t": {0: 19, 24: 499, 25: 519, 49: 999},
          "sigma": {0: 3 / 52, 24: 0.75, 25: 13 / 17, 49: 1.0},
          "prev": {0: 1 / 334, 1: 3 / 52, 25: 0.75, 49: 147 / 148}}),
    # N=100: r=10, e_k = 10k+9
    #   sigma_0 = s[9]: u=0.01 -> 0.03/1.02 = 1/34; prev_1 = 1/34; prev_0 = 1/334
    #   sigma_49 = s[499] = 0.75 = prev_50;  sigma_99 = 1;  prev_99 = s[989]: u=0.99 -> 2.97/2.98 = 297/298
    (100, {"t": {0: 9, 49: 499, 99: 999},
           "sigma": {0: 1 / 34, 49: 0.75, 99: 1.0},
           "prev": {0: 1 / 334, 1: 1 / 34, 50: 0.75, 99: 297 / 298}}),
])
def test_sd3_schedule_solver_entries(sd3_sigmas_ascending, n, entries):
    solver = EulerSolver(sd3_sigmas_ascending, n, 4 if n == 100 else 8)
    sigmas, prev = solver.sigmas.numpy(), solver.sigmas_prev.numpy()
    assert len(sigmas) == len(prev) == n == len(solver.euler_timesteps)
    for k, e in entries["t"].items():
        assert solver.euler_timesteps[k] == e
        assert_close(_sd3_shift3((e + 1) / 1000), entries["sigma"][k], rtol=1e-12)  # the derivation
    for k, value in entries["sigma"].items():
        assert_close(sigmas[k], value, rtol=2e-6)
    for k, value in entries["prev"].items():
        assert_close(prev[k], value, rtol=2e-6)
    # ascending noise and one step apart: prev_k = sigma_(k-1)
    assert np.all(np.diff(sigmas) > 0)
    np.testing.assert_array_equal(prev[1:], sigmas[:-1])


def test_euler_step_per_sample():
    # N=4 on the toy table: (prev_k - sigma_k)*144 = 1-9 = -8, 9-36 = -27, 36-81 = -45, 81-144 = -63
    solver = EulerSolver(S12, 4, 2)
    x, v = _random([3, 2, 3, 2], 1), _random([3, 2, 3, 2], 2)
    index = _i64([0, 1, 3])
    coef = np.array([-8, -27, -63], dtype=np.float64).reshape(3, 1, 1, 1) / 144
    out = solver.euler_step(_f32(x), _f32(v), index)
    assert out.shape == [3, 2, 3, 2]
    assert_close(out.numpy(), x + coef * v, rtol=0, atol=1e-6)
    # 2-D samples (the reshape to [B, 1] must follow the sample's rank)
    out2 = solver.euler_step(_f32(x[:, 0, 0]), _f32(v[:, 0, 0]), index)
    assert_close(out2.numpy(), x[:, 0, 0] + coef[:, :, 0, 0] * v[:, 0, 0], atol=1e-6)


def test_multiphase_jump_student_and_target():
    # N=4, P=2 on the toy table: starts 0, 2; k = 0,1,2,3 -> end = 0,0,2,2
    # sigma_prev_end * 144 = prev[0], prev[0], prev[2], prev[2] = 1, 1, 36, 36
    # student (sigma = sigma_k = 9,36,81,144):  coef*144 = 1-9=-8, 1-36=-35, 36-81=-45, 36-144=-108
    # target  (sigma = prev_k  = 1,9,36,81):    coef*144 = 1-1=0,  1-9=-8,   36-36=0,  36-81=-45
    solver = EulerSolver(S12, 4, 2)
    x, v = _random([4, 3, 2, 2], 3), _random([4, 3, 2, 2], 4)
    index = _i64([0, 1, 2, 3])
    student_coef = np.array([-8, -35, -45, -108], dtype=np.float64).reshape(4, 1, 1, 1) / 144
    target_coef = np.array([0, -8, 0, -45], dtype=np.float64).reshape(4, 1, 1, 1) / 144

    jumped, end = solver.multiphase_jump(_f32(x), _f32(v), index)
    np.testing.assert_array_equal(end.numpy(), [0, 0, 2, 2])
    assert_close(jumped.numpy(), x + student_coef * v, rtol=0, atol=1e-6)

    jumped_t, end_t = solver.multiphase_jump(_f32(x), _f32(v), index, is_target=True)
    np.testing.assert_array_equal(end_t.numpy(), [0, 0, 2, 2])
    assert_close(jumped_t.numpy(), x + target_coef * v, rtol=0, atol=1e-6)
    # a target already at its phase start (coef 0) is returned unchanged
    assert_close(jumped_t.numpy()[[0, 2]], x[[0, 2]], rtol=0, atol=1e-7)


def test_multiphase_jump_shuffled_batch_n10_p4():
    # 20-entry table s[i] = (i+1)/20; N=10: sigma_k = (k+1)/10, prev_0 = 0.05, prev_k = k/10; ends 0,0,2,2,2,5,5,7,7,7
    # k = 9: end 7, prev_end = 0.7; student: 0.7 - 1.0 = -0.3; target: 0.7 - 0.9 = -0.2
    # k = 4: end 2, prev_end = 0.2; student: 0.2 - 0.5 = -0.3; target: 0.2 - 0.4 = -0.2
    # k = 1: end 0, prev_end = 0.05; student: 0.05 - 0.2 = -0.15; target: 0.05 - 0.1 = -0.05
    # k = 5: end 5, prev_end = 0.5; student: 0.5 - 0.6 = -0.1; target: 0.5 - 0.5 = 0
    solver = EulerSolver([(i + 1) / 20 for i in range(20)], 10, 4)
    x, v = _random([4, 5], 5), _random([4, 5], 6)
    index = _i64([9, 4, 1, 5])
    jumped, end = solver.multiphase_jump(_f32(x), _f32(v), index)
    np.testing.assert_array_equal(end.numpy(), [7, 2, 0, 5])
    assert_close(jumped.numpy(), x + np.array([[-0.3], [-0.3], [-0.15], [-0.1]]) * v, atol=1e-6)
    jumped_t, _ = solver.multiphase_jump(_f32(x), _f32(v), index, is_target=True)
    assert_close(jumped_t.numpy(), x + np.array([[-0.2], [-0.2], [-0.05], [0.0]]) * v, atol=1e-6)


@pytest.mark.parametrize("n,p", [(50, 8), (10, 4), (4, 4), (100, 4)])
def test_adversarial_index_stays_in_phase_and_covers_it(n, p):
    # a ~ U{end .. end + N//P - 1}: N=50,P=8 -> offsets 0..5; N=10,P=4 -> 0..1; N=4,P=4 -> always 0;
    # N=100,P=4 -> 0..24
    starts, length, _ = PHASES[(n, p)]
    solver = EulerSolver(np.linspace(0.001, 1.0, 1000), n, p)
    paddle.seed(1234)
    draws = 400
    end = _i64(np.repeat(starts, draws))
    adv = solver.sample_adversarial_index(end)
    assert adv.dtype == paddle.int64
    offsets = (adv - end).numpy().reshape(len(starts), draws)
    assert offsets.min() >= 0 and offsets.max() <= length - 1
    for row in offsets:  # every phase sees its whole range (miss prob <= 25*(24/25)^400 ~ 2e-6)
        assert set(row.tolist()) == set(range(length))
    assert (adv.numpy() <= n - 1).all()
    # seeded: same draws again after the same seed
    paddle.seed(1234)
    np.testing.assert_array_equal(solver.sample_adversarial_index(end).numpy(), adv.numpy())


def test_adversarial_renoise_hand_numbers():
    # N=4, P=2 on the toy table, prev*144 = 1, 9, 36, 81 ; phase length 2
    #   (end, a) = (0,0): s_e = s_a = 1/144          -> x
    #   (end, a) = (0,1): s_e = 1/144, s_a = 9/144   -> ((135/144) x + (8/144) n)/(143/144) = (135x + 8n)/143
    #   (end, a) = (2,2): s_e = s_a = 36/144         -> x
    #   (end, a) = (2,3): s_e = 36/144, s_a = 81/144 -> ((63/144) x + (45/144) n)/(108/144) = (63x + 45n)/108
    solver = EulerSolver(S12, 4, 2)
    x, noise = _random([4, 2, 3, 3], 7), _random([4, 2, 3, 3], 8)
    out = solver.adversarial_renoise(_f32(x), _i64([0, 0, 2, 2]), _i64([0, 1, 2, 3]), _f32(noise)).numpy()
    assert out.shape == (4, 2, 3, 3)
    assert_close(out[0], x[0], rtol=0, atol=1e-6)
    assert_close(out[1], (135 * x[1] + 8 * noise[1]) / 143, rtol=0, atol=1e-6)
    assert_close(out[2], x[2], rtol=0, atol=1e-6)
    assert_close(out[3], (63 * x[3] + 45 * noise[3]) / 108, rtol=0, atol=1e-6)


def test_adversarial_renoise_a_equals_end_is_identity_on_sd3_schedule(sd3_sigmas_ascending):
    solver = EulerSolver(sd3_sigmas_ascending, 50, 8)
    starts = _i64([0, 6, 12, 18, 25, 31, 37, 43])
    x, noise = _random([8, 16, 4, 4], 9), 100 * _random([8, 16, 4, 4], 10)
    out = solver.adversarial_renoise(_f32(x), starts, starts, _f32(noise))
    assert_close(out.numpy(), x, rtol=0, atol=1e-6)


def test_consistency_loss_hand_numbers():
    # diffs = 1-1 = 0, 2-(-1) = 3, 3-7 = -4
    pred, target = _f32([[1.0, 2.0, 3.0]]), _f32([[1.0, -1.0, 7.0]])
    # l2: (0 + 9 + 16)/3 = 25/3
    l2 = consistency_loss(pred, target, "l2", 0.001)
    assert l2.shape == [] and l2.dtype == paddle.float32
    assert_close(float(l2), 25 / 3, rtol=1e-6)
    # huber c=1: (sqrt(1)-1 + sqrt(10)-1 + sqrt(17)-1)/3 = (sqrt(10) + sqrt(17) - 2)/3
    assert_close(float(consistency_loss(pred, target, "huber", 1.0)),
                               (np.sqrt(10) + np.sqrt(17) - 2) / 3, rtol=1e-6)
    # huber c=2: (0 + sqrt(13)-2 + sqrt(20)-2)/3
    assert_close(float(consistency_loss(pred, target, "huber", 2.0)),
                               (np.sqrt(13) + np.sqrt(20) - 4) / 3, rtol=1e-6)
    # huber with the default c = 0.001: d=0 gives sqrt(c^2) - c = 0, |d|>0 gives ~|d| - c (+ c^2/(2|d|) < 2e-7)
    #   -> (0 + (3 - c) + (4 - c))/3 = (7 - 0.002)/3
    assert_close(float(consistency_loss(pred, target, "huber", 0.001)), (7 - 0.002) / 3, atol=1e-6)


def test_consistency_loss_fp16_inputs_computed_in_fp32():
    # d = 300 - 0: d^2 = 90000 > 65504 (fp16 max) would be inf in fp16
    # l2 = (90000 + 0)/2 = 45000; huber c=1: (sqrt(90001) - 1 + 0)/2
    pred = paddle.to_tensor(np.array([300.0, 0.0], dtype=np.float16))
    target = paddle.to_tensor(np.array([0.0, 0.0], dtype=np.float16))
    l2 = consistency_loss(pred, target, "l2", 1.0)
    assert l2.dtype == paddle.float32
    assert_close(float(l2), 45000.0, rtol=1e-6)
    huber = consistency_loss(pred, target, "huber", 1.0)
    assert huber.dtype == paddle.float32
    assert_close(float(huber), (np.sqrt(90001.0) - 1) / 2, rtol=1e-6)
    # fp16 prediction against an fp32 target also works (mixed precision student vs target)
    assert_close(float(consistency_loss(pred, _f32([0.0, 0.0]), "l2", 1.0)), 45000.0, rtol=1e-6)


def test_consistency_loss_unknown_type():
    with pytest.raises(ValueError):
        consistency_loss(_f32([1.0]), _f32([2.0]), "l1", 0.001)


def test_consistency_loss_has_gradient():
    # d/dpred of mean(d^2) = 2 d / n: d = 0, 3, -4, n = 3 -> 0, 2, -8/3
    pred = _f32([1.0, 2.0, 3.0])
    pred.stop_gradient = False
    consistency_loss(pred, _f32([1.0, -1.0, 7.0]), "l2", 0.001).backward()
    assert_close(pred.grad.numpy(), [0.0, 2.0, -8 / 3], rtol=1e-6)


def test_cfg_velocity_per_sample_scale():
    # v_c + w (v_c - v_u):  (c=1, u=5, w=0) -> 1 ; (c=2, u=1, w=1) -> 3 ; (c=-1, u=1, w=3.5) -> -1 + 3.5*(-2) = -8
    cond = _f32(np.ones([3, 2, 2, 2]) * np.array([1.0, 2.0, -1.0]).reshape(3, 1, 1, 1))
    uncond = _f32(np.ones([3, 2, 2, 2]) * np.array([5.0, 1.0, 1.0]).reshape(3, 1, 1, 1))
    out = cfg_velocity(cond, uncond, _f32([0.0, 1.0, 3.5])).numpy()
    assert_close(out[0], 1.0)
    assert_close(out[1], 3.0)
    assert_close(out[2], -8.0)
    # random tensors, w drawn in [4, 5] (the seed command's w_min/w_max)
    c, u = _random([3, 16, 4, 4], 11), _random([3, 16, 4, 4], 12)
    w = np.array([4.0, 4.5, 5.0], dtype=np.float32)
    assert_close(cfg_velocity(_f32(c), _f32(u), _f32(w)).numpy(),
                               c + w.reshape(3, 1, 1, 1) * (c - u), rtol=1e-6, atol=1e-5)
    # w = 0 gives the conditional velocity, whatever the unconditional one is
    np.testing.assert_array_equal(cfg_velocity(_f32(c), _f32(u), _f32([0.0, 0.0, 0.0])).numpy(), c)


@pytest.mark.parametrize("n,p", [
    (5, 1),    # 12 % 5 != 0
    (0, 1),    # N must be >= 1
    (24, 1),   # 12 % 24 != 0 (more points than the table)
    (7, 1),    # 12 % 7 != 0
    (4, 0),    # multiphase 0
    (4, 5),    # multiphase > N
    (4, -1),
])
def test_invalid_solver_raises(n, p):
    with pytest.raises(ValueError):
        EulerSolver(S12, n, p)


@pytest.mark.parametrize("n,p", [(12, 12), (12, 1), (1, 1), (6, 4)])
def test_boundary_solver_configurations_are_valid(n, p):
    solver = EulerSolver(S12, n, p)
    assert len(solver.phase_starts) == p and solver.phase_starts[0] == 0
