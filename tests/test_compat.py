"""The Paddle 3 compatibility layer: each shim is needed (the gap shows without it) and closes its gap."""
import json

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from conftest import run_python

import paddle_compat

# Runs in a fresh interpreter; imports paddle_compat only when asked, reports each gap as "ok" or the error.
PROBE = r'''
import json, os, sys
os.environ["USE_PEFT_BACKEND"] = "True"
if sys.argv[2] == "with":
    import paddle_compat
import numpy as np, paddle
from ppdiffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from ppdiffusers.peft import LoraConfig
from ppdiffusers.peft.utils import get_peft_model_state_dict

model, report = sys.argv[1], {}
TARGETS = ["to_k", "to_q", "to_v", "to_add_out", "to_out.0", "proj_out", "ff.net.0.proj", "ff.net.2",
           "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "context_embedder",
           "text_embedder.linear_1", "timestep_embedder.linear_1", "pos_embed.proj"]
def base():
    return SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
rng = np.random.default_rng(0)
inputs = dict(hidden_states=paddle.to_tensor(rng.standard_normal([1, 16, 8, 8]).astype("float32")),
              timestep=paddle.to_tensor([500.0]),
              encoder_hidden_states=paddle.to_tensor(rng.standard_normal([1, 10, 64]).astype("float32")),
              pooled_projections=paddle.to_tensor(rng.standard_normal([1, 64]).astype("float32")))
try:
    t = base(); t.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k"])); report["add_adapter"] = "ok"
except Exception as e:
    report["add_adapter"] = f"{type(e).__name__}: {e}"
try:
    with paddle.no_grad():
        base()(**inputs)
    report["forward"] = "ok"
except Exception as e:
    report["forward"] = f"{type(e).__name__}: {e}"
try:
    t = base(); t.enable_gradient_checkpointing(); t.train()
    x = inputs["hidden_states"].clone(); x.stop_gradient = False
    t(**{**inputs, "hidden_states": x}).sample.mean().backward()
    report["checkpointing"] = "ok" if x.grad is not None else "no grad"
except Exception as e:
    report["checkpointing"] = f"{type(e).__name__}: {e}"
try:
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe(prompt=" ".join(["red dog"] * 60), num_inference_steps=1, height=32, width=32, output_type="np")
    report["long_prompt"] = "ok"
except Exception as e:
    report["long_prompt"] = f"{type(e).__name__}: {e}"
if sys.argv[2] == "without":  # close gaps 1 and 2 by hand (not via paddle_compat) to reach gap 3
    PD = paddle.nn.ParameterDict
    PD.keys, PD.items, PD.values = (lambda s: s._parameters.keys()), (lambda s: s._parameters.items()), (lambda s: s._parameters.values())
    def sdpa(q, k, v, **kw):
        q, k, v = (x.transpose([0, 2, 1, 3]) for x in (q, k, v))
        p = paddle.nn.functional.softmax(paddle.matmul(q, k, transpose_y=True) / q.shape[-1] ** 0.5, -1)
        return paddle.matmul(p, v).transpose([0, 2, 1, 3])
    paddle.nn.functional.scaled_dot_product_attention_ = sdpa
t = base(); t.add_adapter(LoraConfig(r=8, target_modules=TARGETS))
paddle.seed(1)
for n, p in t.named_parameters():
    if "lora_B" in n:
        p.set_value(paddle.randn(p.shape) * 0.1)
with paddle.no_grad():
    want = t(**inputs).sample.numpy()
StableDiffusion3Pipeline.save_lora_weights(sys.argv[3], transformer_lora_layers=get_peft_model_state_dict(t))
pipe = StableDiffusion3Pipeline.from_pretrained(model)
pipe.load_lora_weights(sys.argv[3])
with paddle.no_grad():
    got = pipe.transformer(**inputs, joint_attention_kwargs={"scale": 8 / 8}).sample.numpy()  # alpha 8 / rank 8
report["reload_max_abs_diff"] = float(np.abs(got - want).max())
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def probes(tiny_sd3, tmp_path_factory):
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE)
    reports = {}
    for mode in ("without", "with"):
        out = tmp_path_factory.mktemp(f"lora-{mode}")
        result = run_python([str(script), tiny_sd3, mode, str(out)])
        assert result.returncode == 0, result.stderr[-3000:]
        reports[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    return reports


def test_gaps_exist_without_the_layer(probes):
    """Pins the upstream behaviour each shim exists for (ppdiffusers 0.29 on Paddle 3.3)."""
    without = probes["without"]
    assert "ParameterDict" in without["add_adapter"] and "keys" in without["add_adapter"]
    assert "scaled_dot_product_attention_" in without["forward"]
    assert without["checkpointing"] != "ok"
    assert "Broadcast dimension mismatch" in without["long_prompt"]
    assert without["reload_max_abs_diff"] > 1e-3


def test_layer_closes_every_gap(probes):
    with_layer = probes["with"]
    assert with_layer["add_adapter"] == "ok"
    assert with_layer["forward"] == "ok"
    assert with_layer["checkpointing"] == "ok"
    assert with_layer["long_prompt"] == "ok"
    assert with_layer["reload_max_abs_diff"] <= 1e-5


def test_parameter_dict_mapping_methods():
    a = paddle.create_parameter([2], "float32")
    b = paddle.create_parameter([3], "float32")
    params = paddle.nn.ParameterDict({"a": a, "b": b})
    assert list(params.keys()) == ["a", "b"]
    assert [k for k, _ in params.items()] == ["a", "b"]
    assert [v.shape for v in params.values()] == [[2], [3]]


def test_math_attention_matches_softmax_formula():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal([2, 5, 3, 4]).astype("float32") for _ in range(3))  # [batch, seq, heads, dim]
    out = paddle_compat.scaled_dot_product_attention_(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v))
    # Reference: for each batch b and head h, softmax(q k^T / sqrt(d)) v over the sequence axis.
    expected = np.zeros_like(q)
    for bi in range(2):
        for h in range(3):
            scores = q[bi, :, h] @ k[bi, :, h].T / np.sqrt(4)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            expected[bi, :, h] = weights @ v[bi, :, h]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_math_attention_causal_and_mask():
    rng = np.random.default_rng(1)
    q, k, v = (paddle.to_tensor(rng.standard_normal([1, 3, 1, 2]).astype("float32")) for _ in range(3))
    causal = paddle_compat.math_attention(q, k, v, is_causal=True).numpy()
    np.testing.assert_allclose(causal[0, 0, 0], v.numpy()[0, 0, 0], rtol=1e-6)  # first query sees only key 0
    mask = paddle.to_tensor(np.array([[[[True, False, False]] * 3]]))  # [1, 1, 3, 3]: attend to key 0 only
    masked = paddle_compat.math_attention(q, k, v, attn_mask=mask).numpy()
    np.testing.assert_allclose(masked[0, :, 0], np.repeat(v.numpy()[0, :1, 0], 3, axis=0), rtol=1e-6)


def test_apply_is_idempotent_and_keeps_an_existing_attention():
    assert not any(paddle_compat.apply().values())
    existing = F.scaled_dot_product_attention_
    assert paddle_compat.apply()["scaled_dot_product_attention_"] is False
    assert F.scaled_dot_product_attention_ is existing


def test_gradient_checkpointing_gives_the_same_values_and_gradients(tiny_sd3):
    from ppdiffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    transformer.train()
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal([2, 16, 8, 8]).astype("float32")
    context = paddle.to_tensor(rng.standard_normal([2, 12, 64]).astype("float32"))
    pooled = paddle.to_tensor(rng.standard_normal([2, 64]).astype("float32"))
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        x = paddle.to_tensor(x0, stop_gradient=False)
        out = transformer(hidden_states=x, timestep=paddle.to_tensor([500.0, 20.0]),
                          encoder_hidden_states=context, pooled_projections=pooled).sample
        out.square().mean().backward()
        results.append((out.numpy(), x.grad.numpy()))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], atol=1e-7)


def test_paddle_lora_ranks_reads_paddle_layout():
    state = {"x.lora_B.weight": np.zeros([4, 96]), "conv.lora_B.weight": np.zeros([32, 4, 1, 1]),
             "x.lora_A.weight": np.zeros([16, 4])}
    assert paddle_compat.paddle_lora_ranks(state) == {"x.lora_B.weight": 4, "conv.lora_B.weight": 4}


def test_lora_linear_keeps_the_base_result_dtype():
    """PyTorch PEFT's rule (gap 6): the output has the base layer's result dtype, not the input's.
    Under fp16 autocast that is fp16 where ppdiffusers would return the fp32 of its LayerNorm input."""
    from ppdiffusers.peft.tuners.lora.layer import Linear as LoraLinear

    class Float64Result(paddle.nn.Linear):  # stands in for an autocast matmul whose result dtype differs
        def forward(self, x):
            return super().forward(x).astype("float64")

    paddle.seed(0)
    layer = LoraLinear(Float64Result(4, 3), "default", r=2, lora_alpha=4)
    paddle.nn.initializer.Normal()(layer.lora_B["default"].weight)
    x = paddle.randn([5, 4])
    out = layer(x)
    assert out.dtype == paddle.float64
    a, b = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()
    base = x.numpy() @ layer.base_layer.weight.numpy() + layer.base_layer.bias.numpy()
    np.testing.assert_allclose(out.numpy(), base + x.numpy() @ a @ b * 2.0, rtol=1e-5, atol=1e-6)
    layer._disable_adapters = True
    np.testing.assert_allclose(layer(x).numpy(), base, rtol=1e-6, atol=1e-6)


def test_lora_scale_one_does_not_walk_the_layers_and_other_scales_do(tiny_sd3, monkeypatch):
    """The SD3 transformer's forward calls scale/unscale_lora_layers: at weight 1.0 they return at once (diffusers'
    behaviour; ppdiffusers walked every sublayer to leave each scale unchanged), at 2.0 they still double every LoRA
    layer's scaling and restore it."""
    from conftest import add_random_lora, load_frozen_transformer
    from ppdiffusers.models import transformer_sd3

    assert transformer_sd3.scale_lora_layers is paddle_compat.scale_lora_layers
    assert transformer_sd3.unscale_lora_layers is paddle_compat.unscale_lora_layers
    model = add_random_lora(load_frozen_transformer(tiny_sd3), rank=4, seed=0)
    layers = [layer for layer in model.sublayers() if hasattr(layer, "scaling")]
    before = [dict(layer.scaling) for layer in layers]
    paddle_compat.scale_lora_layers(model, 2.0)
    assert [dict(layer.scaling) for layer in layers] == [{k: 2 * v for k, v in s.items()} for s in before]
    paddle_compat.unscale_lora_layers(model, 2.0)
    assert [dict(layer.scaling) for layer in layers] == before
    monkeypatch.setattr(type(model), "sublayers", lambda *a, **k: pytest.fail("walked the sublayers at weight 1.0"))
    paddle_compat.scale_lora_layers(model, 1.0)
    paddle_compat.unscale_lora_layers(model, 1.0)
    assert [dict(layer.scaling) for layer in layers] == before
