"""discriminator.py against PCM_SPEC §3.8-3.9, on real (tiny, random) SD3 transformers.

Spec §3.9: per transformer block one head on the block's image tokens reshaped to
[B, C, H/p, W/p] (token t = row * (W/p) + col): 1x1 conv -> GroupNorm(32) -> LeakyReLU,
1x1 conv -> GroupNorm(32) -> LeakyReLU plus the residual, 1x1 conv to 1 channel. Head count =
config.num_layers, head width = num_attention_heads * attention_head_dim, grid read from the input.
Spec §3.8: L_D = sum_heads [mean(relu(1 + D(fake))) + mean(relu(1 - D(real)))] / #heads on detached
samples; L_G = sum_heads mean(relu(1 - D(fake))) / #heads, gradient through the frozen backbone.
"""
import numpy as np
import paddle
import paddle.nn as nn
import pytest
from conftest import load_frozen_transformer

from discriminator import Discriminator, DiscriminatorHead, block_features
from make_tiny_sd3 import make_tiny_sd3


def assert_close(actual, expected, **kwargs):
    """np.testing.assert_allclose on at-least-1-d arrays: ppdiffusers sets ``np.bool = bool``
    (ppdiffusers/utils/load_utils.py), which breaks numpy 2's comparison of 0-d values."""
    actual = np.atleast_1d(np.asarray(actual))
    np.testing.assert_allclose(actual, np.broadcast_to(np.asarray(expected), actual.shape), **kwargs)


load_frozen = load_frozen_transformer


@pytest.fixture(scope="module")
def teacher(tiny_sd3):
    return load_frozen(tiny_sd3)


@pytest.fixture(scope="module")
def variants(tiny_sd3, tmp_path_factory):
    """(num_layers, width) -> frozen transformer: the default 2 x 32, a 3-layer one, a width-64 one (8 heads x 8)."""
    three = make_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3-3layers")), seed=1, num_layers=3)
    wide = make_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3-w64")), seed=2, num_attention_heads=8, attention_head_dim=8)
    return {(2, 32): load_frozen(tiny_sd3), (3, 32): load_frozen(three), (2, 64): load_frozen(wide)}


def make_inputs(config, batch, height, width, seed, seq_len=7):
    gen = np.random.default_rng(seed)
    return (
        paddle.to_tensor(gen.standard_normal([batch, config.in_channels, height, width]).astype("float32")),
        paddle.to_tensor(gen.uniform(1.0, 999.0, [batch]).astype("float32")),
        paddle.to_tensor(gen.standard_normal([batch, seq_len, config.joint_attention_dim]).astype("float32")),
        paddle.to_tensor(gen.standard_normal([batch, config.pooled_projection_dim]).astype("float32")),
    )


def make_disc(backbone, seed=0, **kwargs):
    paddle.seed(seed)
    return Discriminator(backbone, **kwargs)


def hinge_d(fake_logits, real_logits):
    return sum(np.maximum(0, 1 + f).mean() + np.maximum(0, 1 - r).mean() for f, r in zip(fake_logits, real_logits)) / len(fake_logits)


def hinge_g(fake_logits):
    return sum(np.maximum(0, 1 - f).mean() for f in fake_logits) / len(fake_logits)


# ----------------------------------------------------------------------------- the head


def test_head_output_shape_and_grid_check():
    paddle.seed(0)
    head = DiscriminatorHead(32)
    tokens = paddle.randn([2, 12, 32])
    assert head(tokens, 3, 4).shape == [2, 1, 3, 4]
    assert head(tokens, 4, 3).shape == [2, 1, 4, 3]
    assert head(tokens, 1, 12).shape == [2, 1, 1, 12]
    assert head(paddle.randn([3, 64, 32]), 8, 8).shape == [3, 1, 8, 8]
    with pytest.raises(ValueError):
        head(tokens, 4, 4)  # 12 tokens are not a 4x4 grid
    with pytest.raises(ValueError):
        head(tokens, 2, 5)


@pytest.mark.parametrize("width", [16, 33, 48, 100])
def test_head_width_must_be_a_multiple_of_32(width):
    with pytest.raises(ValueError):
        DiscriminatorHead(width)


def test_head_structure():
    head = DiscriminatorHead(64)
    for block in (head.conv1, head.conv2):
        conv, norm, act = list(block.children())
        assert isinstance(conv, nn.Conv2D) and conv.weight.shape == [64, 64, 1, 1] and conv.bias.shape == [64]
        assert isinstance(norm, nn.GroupNorm) and norm._num_groups == 32 and norm.weight.shape == [64]
        assert isinstance(act, nn.LeakyReLU)
    assert isinstance(head.conv_out, nn.Conv2D) and head.conv_out.weight.shape == [1, 64, 1, 1]
    # parameters: 3 convs (weight + bias) and 2 GroupNorms (weight + bias) = 10 tensors,
    # 2*(64*64 + 64) + 2*(64 + 64) + (64 + 1) = 8320 + 256 + 65 = 8641 numbers
    assert len(head.parameters()) == 10
    assert sum(int(np.prod(p.shape)) for p in head.parameters()) == 8641


def _np_head(tokens, grid_h, grid_w, head):
    """Spec §3.9 by hand in float64 numpy from the head's own weights (GroupNorm eps 1e-5, biased
    variance; LeakyReLU slope 0.01, the default of both frameworks and of the reference)."""
    batch, _, channels = tokens.shape
    x = tokens.astype(np.float64).transpose(0, 2, 1).reshape(batch, channels, grid_h, grid_w)

    def conv(x, layer):
        w = layer.weight.numpy().astype(np.float64)[:, :, 0, 0]
        return np.einsum("oc,bchw->bohw", w, x) + layer.bias.numpy().astype(np.float64)[None, :, None, None]

    def group_norm(x, layer, groups=32):
        b, c, h, w = x.shape
        g = x.reshape(b, groups, c // groups, h, w)
        mean = g.mean(axis=(2, 3, 4), keepdims=True)
        var = ((g - mean) ** 2).mean(axis=(2, 3, 4), keepdims=True)
        y = ((g - mean) / np.sqrt(var + 1e-5)).reshape(b, c, h, w)
        return y * layer.weight.numpy()[None, :, None, None] + layer.bias.numpy()[None, :, None, None]

    def leaky(x):
        return np.where(x > 0, x, 0.01 * x)

    y1 = leaky(group_norm(conv(x, head.conv1[0]), head.conv1[1]))
    y2 = leaky(group_norm(conv(y1, head.conv2[0]), head.conv2[1])) + y1
    return conv(y2, head.conv_out)


@pytest.mark.parametrize("width,grid", [(32, (3, 4)), (64, (5, 2))])
def test_head_matches_hand_reimplementation(width, grid):
    paddle.seed(0)
    head = DiscriminatorHead(width)
    gen = np.random.default_rng(width)
    for param in head.parameters():  # random GroupNorm affine too, so every weight matters
        param.set_value(gen.standard_normal(param.shape).astype("float32") * 0.5)
    gh, gw = grid
    tokens = gen.standard_normal([2, gh * gw, width]).astype("float32")
    # a per-token offset so that a wrong token -> (row, col) layout changes the output map
    tokens += np.arange(gh * gw, dtype=np.float32)[None, :, None] * 0.3
    out = head(paddle.to_tensor(tokens), gh, gw).numpy()
    assert out.shape == (2, 1, gh, gw)
    assert_close(out, _np_head(tokens, gh, gw, head), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the discriminator


@pytest.mark.parametrize("key", [(2, 32), (3, 32), (2, 64)])
def test_heads_follow_the_transformer_config(variants, key):
    backbone = variants[key]
    num_layers, width = key
    config = backbone.config
    assert (config.num_layers, config.num_attention_heads * config.attention_head_dim) == key
    disc = make_disc(backbone)
    assert disc.backbone is backbone
    assert len(disc.heads) == num_layers and disc.num_heads == num_layers
    for group in disc.heads:
        assert len(group) == 1
        assert group[0].conv1[0].weight.shape == [width, width, 1, 1]
        assert group[0].conv_out.weight.shape == [1, width, 1, 1]
    # only the heads are parameters / state: 10 tensors and 2*(w*w + w) + 4w + (w + 1) numbers per head
    params = disc.parameters()
    assert len(params) == 10 * num_layers
    per_head = 2 * (width * width + width) + 4 * width + width + 1  # w=32: 2273, w=64: 8641
    assert sum(int(np.prod(p.shape)) for p in params) == num_layers * per_head
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert not backbone_ids & {id(p) for p in params}
    state = disc.state_dict()
    assert len(state) == 10 * num_layers and all(k.startswith("heads.") for k in state)
    assert all(not p.stop_gradient for p in params)
    assert all(p.stop_gradient for p in backbone.parameters())  # the discriminator leaves the backbone frozen


@pytest.mark.parametrize("key", [(2, 32), (3, 32), (2, 64)])
@pytest.mark.parametrize("latent_hw", [(8, 8), (16, 12)])
def test_logits_shapes_at_any_resolution(variants, key, latent_hw):
    # grid = latent / patch_size (2): 8x8 -> 4x4, 16x12 -> 8x6 (non-square; the reference assumed 64x64 tokens)
    backbone = variants[key]
    disc = make_disc(backbone)
    h, w = latent_hw
    with paddle.no_grad():
        logits = disc("logits", *make_inputs(backbone.config, 2, h, w, seed=1))
    assert len(logits) == key[0]
    for out in logits:
        assert out.shape == [2, 1, h // 2, w // 2]
        assert np.isfinite(out.numpy()).all()


def test_several_heads_per_block(teacher):
    disc = make_disc(teacher, num_heads_per_block=2)
    assert disc.num_heads == 4 and len(disc.heads) == 2 and all(len(g) == 2 for g in disc.heads)
    assert len(disc.parameters()) == 40
    with paddle.no_grad():
        logits = disc("logits", *make_inputs(teacher.config, 1, 8, 8, seed=2))
    assert len(logits) == 4
    # the two heads on one block see the same features but have their own weights
    assert not np.allclose(logits[0].numpy(), logits[1].numpy())


def test_unknown_mode_raises(teacher):
    with pytest.raises(ValueError):
        make_disc(teacher)("feature_loss")


@pytest.mark.parametrize("latent_hw", [(8, 8), (16, 12)])
def test_block_features_are_the_block_outputs(teacher, latent_hw):
    h, w = latent_hw
    sample, timestep, ehs, pooled = make_inputs(teacher.config, 2, h, w, seed=3)
    with paddle.no_grad():
        features = block_features(teacher, sample, timestep, ehs, pooled)
        # by hand: embeddings, then every block in turn, keeping the image stream
        hidden = teacher.pos_embed(sample)
        temb = teacher.time_text_embed(timestep, pooled)
        context = teacher.context_embedder(ehs)
        expected = []
        for block in teacher.transformer_blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            expected.append(hidden)
        # and the last feature is what the model's own forward turns into its output:
        # norm_out, proj_out, unpatchify [B, h, w, p, p, C] -> [B, C, h*p, w*p]
        model_out = teacher(hidden_states=sample, encoder_hidden_states=ehs, pooled_projections=pooled,
                            timestep=timestep).sample
        proj = teacher.proj_out(teacher.norm_out(features[-1], temb)).numpy()
    assert len(features) == teacher.config.num_layers == 2
    width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    for got, want in zip(features, expected):
        assert got.shape == [2, (h // 2) * (w // 2), width]
        assert_close(got.numpy(), want.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(features[0].numpy(), features[1].numpy())
    p, c = 2, 16
    unpatched = proj.reshape(2, h // p, w // p, p, p, c).transpose(0, 5, 1, 3, 2, 4).reshape(2, c, h, w)
    assert_close(unpatched, model_out.numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- hinge losses


@pytest.fixture
def sharp_disc(teacher):
    """Heads whose output convs are scaled up so that logits fall on both sides of -1 and +1,
    making both the active and the clipped branch of every relu count."""
    disc = make_disc(teacher, seed=5)
    for group in disc.heads:
        for head in group:
            head.conv_out.weight.set_value(head.conv_out.weight * 40.0)
    return disc


def test_d_loss_and_g_loss_match_hinge_formulas(teacher, sharp_disc):
    fake, timestep, ehs, pooled = make_inputs(teacher.config, 2, 8, 12, seed=6)
    real = paddle.to_tensor(np.random.default_rng(7).standard_normal(fake.shape).astype("float32"))
    with paddle.no_grad():
        fake_logits = [o.numpy().astype(np.float64) for o in sharp_disc("logits", fake, timestep, ehs, pooled)]
        real_logits = [o.numpy().astype(np.float64) for o in sharp_disc("logits", real, timestep, ehs, pooled)]
        d_loss = sharp_disc("d_loss", fake, real, timestep, ehs, pooled)
        g_loss = sharp_disc("g_loss", fake, timestep, ehs, pooled)
    everything = np.concatenate([x.ravel() for x in fake_logits + real_logits])
    assert (everything < -1).any() and (everything > 1).any() and (np.abs(everything) < 1).any()
    assert d_loss.shape == [] and g_loss.shape == []
    assert d_loss.dtype == paddle.float32 and g_loss.dtype == paddle.float32
    assert_close(float(d_loss), hinge_d(fake_logits, real_logits), rtol=1e-5, atol=1e-5)
    assert_close(float(g_loss), hinge_g(fake_logits), rtol=1e-5, atol=1e-5)


def test_hinge_losses_on_toy_logits_by_hand(teacher):
    # With heads that output a constant c everywhere (zero conv_out weight, bias = c per head):
    #   head 1: c = 0.5, head 2: c = -2
    #   L_D = [relu(1.5) + relu(0.5)] + [relu(-1) + relu(3)] = 2 + 3 -> / 2 heads = 2.5
    #   L_G = [relu(0.5)] + [relu(3)] = 3.5 -> / 2 = 1.75
    disc = make_disc(teacher)
    for group, c in zip(disc.heads, (0.5, -2.0)):
        group[0].conv_out.weight.set_value(paddle.zeros_like(group[0].conv_out.weight))
        group[0].conv_out.bias.set_value(paddle.to_tensor([c], dtype="float32"))
    fake, timestep, ehs, pooled = make_inputs(teacher.config, 2, 8, 8, seed=8)
    with paddle.no_grad():
        assert_close(float(disc("d_loss", fake, fake * 0.5, timestep, ehs, pooled)), 2.5, rtol=1e-6)
        assert_close(float(disc("g_loss", fake, timestep, ehs, pooled)), 1.75, rtol=1e-6)


def test_d_loss_detaches_samples_and_trains_heads(teacher, sharp_disc):
    fake, timestep, ehs, pooled = make_inputs(teacher.config, 2, 8, 8, seed=9)
    real = paddle.to_tensor(np.random.default_rng(10).standard_normal(fake.shape).astype("float32"))
    fake.stop_gradient = False
    real.stop_gradient = False
    loss = sharp_disc("d_loss", fake, real, timestep, ehs, pooled)
    loss.backward()
    assert fake.grad is None and real.grad is None
    grads = [p.grad for p in sharp_disc.parameters()]
    assert all(g is not None for g in grads)
    for group in sharp_disc.heads:  # every head's first and last conv receives a non-zero gradient
        assert np.abs(group[0].conv_out.weight.grad.numpy()).sum() > 0
        assert np.abs(group[0].conv1[0].weight.grad.numpy()).sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_g_loss_gradient_reaches_fake_through_frozen_backbone(teacher, sharp_disc):
    fake, timestep, ehs, pooled = make_inputs(teacher.config, 2, 8, 8, seed=11)
    fake.stop_gradient = False
    loss = sharp_disc("g_loss", fake, timestep, ehs, pooled)
    loss.backward()
    grad = fake.grad.numpy()
    assert grad.shape == (2, 16, 8, 8) and np.isfinite(grad).all() and np.abs(grad).sum() > 0
    assert np.abs(grad[0]).sum() > 0 and np.abs(grad[1]).sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # directional derivative check: (L(x + e d) - L(x - e d)) / 2e ~ <grad, d>
    direction = np.random.default_rng(12).standard_normal(grad.shape).astype("float32")
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    with paddle.no_grad():
        plus = float(sharp_disc("g_loss", fake + eps * paddle.to_tensor(direction), timestep, ehs, pooled))
        minus = float(sharp_disc("g_loss", fake - eps * paddle.to_tensor(direction), timestep, ehs, pooled))
    assert_close((plus - minus) / (2 * eps), float((grad * direction).sum()), rtol=2e-2, atol=1e-4)


def test_gradient_checkpointing_gives_same_features_and_gradients(tiny_sd3):
    backbone = load_frozen(tiny_sd3)
    disc = make_disc(backbone, seed=13)
    fake_np, timestep, ehs, pooled = make_inputs(backbone.config, 2, 8, 12, seed=14)

    def run():
        fake = paddle.to_tensor(fake_np.numpy(), stop_gradient=False)
        features = [f.numpy() for f in block_features(backbone, fake, timestep, ehs, pooled)]
        for param in disc.parameters():
            param.clear_gradient(False)
        loss = disc("g_loss", fake, timestep, ehs, pooled)
        loss.backward()
        head_grads = [p.grad.numpy() for p in disc.parameters()]
        return features, float(loss), fake.grad.numpy(), head_grads

    plain = run()
    backbone.enable_gradient_checkpointing()
    backbone.train()
    assert backbone.training and backbone.gradient_checkpointing
    checkpointed = run()
    assert len(checkpointed[0]) == len(plain[0]) == 2
    for a, b in zip(plain[0], checkpointed[0]):
        assert_close(b, a, rtol=0, atol=1e-6)
    assert_close(checkpointed[1], plain[1], rtol=0, atol=1e-6)
    assert np.abs(plain[2]).sum() > 0
    assert_close(checkpointed[2], plain[2], rtol=0, atol=1e-6)
    for a, b in zip(plain[3], checkpointed[3]):
        assert_close(b, a, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in backbone.parameters())


def test_heads_recompute_on_accelerators_only_unless_chosen(teacher, monkeypatch):
    """By default the heads run plain on CPU (the recomputation would only cost time) and as RecomputedHead on an
    accelerator; recompute_heads True or False chooses. The d_loss and its head gradients are the same bits."""
    import discriminator

    calls = []
    apply = discriminator.RecomputedHead.apply
    monkeypatch.setattr(discriminator.RecomputedHead, "apply", lambda *a: calls.append(1) or apply(*a))
    disc = make_disc(teacher)
    fake, t, embeds, pooled = make_inputs(teacher.config, 2, 8, 8, seed=9)
    real = make_inputs(teacher.config, 2, 8, 8, seed=10)[0]
    results = {}
    for choice in (None, True, False):
        monkeypatch.setattr(Discriminator, "recompute_heads", choice)
        disc.clear_gradients()
        loss = disc("d_loss", fake, real, t, embeds, pooled)
        loss.backward()
        results[choice] = [float(loss)] + [p.grad.numpy() for p in disc.parameters()]
        used = len(calls)
        calls.clear()
        expected = disc.num_heads if (choice or (choice is None and not paddle.get_device().startswith("cpu"))) else 0
        assert used == expected, (choice, used)
    for other in (True, False):
        assert results[other][0] == results[None][0]
        for a, b in zip(results[other][1:], results[None][1:]):
            np.testing.assert_array_equal(np.atleast_1d(a), np.atleast_1d(b))
