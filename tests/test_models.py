"""`"stochastic"` inside real transformers architectures: construction paths, config persistence, checkpointing."""

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from helpers import tiny_llama

import hf_stochact
from hf_stochact import CONFIG_KEY, StochasticActivation, activation_field, configure, get_spec, stochastic_modules

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
# (config class, model class, extra config kwargs). The activation field is looked up, not hard-coded per model.
ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(SMALL, intermediate_size=64, num_key_value_heads=2)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(SMALL, intermediate_size=64, num_key_value_heads=2)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(SMALL, intermediate_size=64, num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(SMALL, intermediate_size=64, num_key_value_heads=2,
                                                         head_dim=8)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(SMALL, intermediate_size=64, num_key_value_heads=2,
                                                           head_dim=8)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(SMALL, intermediate_size=64, num_key_value_heads=2,
                                                               head_dim=8)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                                  max_position_embeddings=64)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(SMALL, intermediate_size=64)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(SMALL, intermediate_size=64, num_key_value_heads=2,
                                                     pad_token_id=0)),
    "bert": (tf.BertConfig, tf.BertForMaskedLM, dict(SMALL, intermediate_size=64)),
}
SETTINGS = {"p": 0.3, "eval_mode": "mean", "variant": "paper"}


def make_config(arch, **settings):
    config_cls, _, kwargs = ARCHS[arch]
    config = config_cls(**kwargs)
    setattr(config, activation_field(config), "stochastic")
    setattr(config, CONFIG_KEY, dict(settings or SETTINGS))
    return config


def tokens(n=2, t=12):
    return torch.randint(3, 90, (n, t))


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


def test_every_ffn_gets_configured_stochastic_modules(arch):
    config = make_config(arch)
    model = ARCHS[arch][1](config)
    mods = list(stochastic_modules(model))
    assert len(mods) >= config.num_hidden_layers
    assert all(m.spec.p == 0.3 and m.spec.eval_mode == "mean" for m in mods)


def test_save_load_round_trip_keeps_settings_and_outputs(arch, tmp_path):
    model = ARCHS[arch][1](make_config(arch)).eval()
    spec = configure(model, p=0.7, eval_mode="silu")
    ids = tokens()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = ARCHS[arch][1].from_pretrained(tmp_path).eval()
    assert get_spec(loaded) == spec and all(m.spec == spec for m in stochastic_modules(loaded))
    assert getattr(loaded.config, CONFIG_KEY)["p"] == 0.7
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_from_config_and_auto_classes_apply_settings(arch):
    config = make_config(arch, p=0.9, variant="blog")
    model = ARCHS[arch][1]._from_config(config)
    assert all(m.spec.p == 0.9 and m.spec.variant == "blog" for m in stochastic_modules(model))


def test_train_mode_samples_eval_mode_is_deterministic(arch):
    model = ARCHS[arch][1](make_config(arch, p=0.5))
    for m in model.modules():  # isolate the activation's randomness from dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = tokens()
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    c = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_configure_validates_and_updates_config():
    model = ARCHS["llama"][1](make_config("llama"))
    with pytest.raises(ValueError, match="p must be in"):
        configure(model, p=2.0)
    configure(model, choices={"relu": 0.5, "silu": 0.25, "gelu": 0.25})
    assert model.config.stochastic_activation["choices"] == [["relu", 0.5], ["silu", 0.25], ["gelu", 0.25]]
    silu_model = tf.LlamaForCausalLM(tf.LlamaConfig(**ARCHS["llama"][2]))
    with pytest.raises(ValueError, match="no stochastic activation"):
        configure(silu_model, p=0.5)


def test_invalid_settings_in_config_fail_at_construction():
    config = make_config("llama", p=-1)
    with pytest.raises(ValueError, match="p must be in"):
        tf.LlamaForCausalLM(config)


def test_gradient_checkpointing_recomputes_the_same_mask():
    config = make_config("llama", p=0.5)
    ids = tokens(4, 16)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(config).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.model.gradient_checkpointing
        torch.manual_seed(42)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # the same draws (a different mask moves gradients by O(1)); summation order may differ between the two
    # passes on some CPUs' kernels, hence a rounding-sized tolerance instead of bit equality
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_registration_is_idempotent_and_in_place():
    from transformers import activations

    table = activations.ACT2FN
    hf_stochact.install()
    hf_stochact.install()
    assert activations.ACT2FN is table
    assert isinstance(activations.ACT2FN["stochastic"], StochasticActivation)
    assert isinstance(activations.ACT2CLS["stochastic"](), StochasticActivation)  # zero-argument callable


def test_loading_without_the_plugin_fails_with_keyerror(tmp_path):
    """Documented behaviour: a process that never imports hf_stochact cannot build a stochastic model."""
    tf.LlamaForCausalLM(make_config("llama")).save_pretrained(tmp_path)
    code = textwrap.dedent(f"""
        import transformers
        try:
            transformers.LlamaForCausalLM.from_pretrained({str(tmp_path)!r})
        except KeyError as e:
            print("KeyError", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "KeyError 'stochastic'" in out.stdout, out.stdout + out.stderr


def test_k_way_choices_keep_their_order_and_masks_through_save_and_load(tmp_path):
    """choices are saved as an ordered list of pairs: after reload the same seed draws the same masks."""
    model = tiny_llama("stochastic")
    configure(model, choices={"silu": 0.3, "relu": 0.5, "gelu": 0.2})  # not in sorted order
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert get_spec(loaded).choices == (("silu", 0.3), ("relu", 0.5), ("gelu", 0.2))
    act, act_loaded = model.model.layers[0].mlp.act_fn.train(), loaded.model.layers[0].mlp.act_fn.train()
    x = -torch.rand(4096) - 0.5
    torch.manual_seed(3)
    a = act(x)
    torch.manual_seed(3)
    assert torch.equal(a, act_loaded(x))
