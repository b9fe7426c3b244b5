"""LoRA + StochActSchedule: the adapter folder records the final ReLU; hf_stochact.load_adapter reloads it onto a
fresh base with identical logits; plain PeftModel.from_pretrained warns."""

import json
import warnings

import pytest
import torch
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args

import hf_stochact
from hf_stochact import StochActSchedule, ffn_activations
from hf_stochact.integration.adapters import ACTIVATION_FILE

peft = pytest.importorskip("peft")


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def _ours(caught):
    return [w for w in caught if ACTIVATION_FILE in str(w.message)]


def _kinds(model):
    return {type(m).__name__ for *_, m in ffn_activations(model)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    model = _lora(tiny_llama("silu"))
    trainer = tf.Trainer(model=model, args=training_args(tmp / "run", max_steps=6), train_dataset=token_dataset(),
                         callbacks=[StochActSchedule(p=0.5, relu_fraction=0.5, monitor_every=0)])
    with pytest.warns(UserWarning, match="load_adapter"):  # told at the end of training, before any save
        trainer.train()
    model.eval()
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp / "adapter")
    return tmp / "adapter", ids, logits, model


def test_adapter_folder_records_the_relu_swap(trained):
    folder, _, _, model = trained
    assert _kinds(model) == {"ReLU"} and model.config.hidden_act == "relu"
    assert (folder / "adapter_config.json").is_file()
    record = json.loads((folder / ACTIVATION_FILE).read_text())
    assert record["field"] == "hidden_act" and record["activation"] == "relu"
    assert record["stochastic_activation"] is None and record["hf_stochact"] == hf_stochact.__version__


def test_load_adapter_restores_relu_and_the_trained_logits(trained):
    folder, ids, logits, _ = trained
    base = tiny_llama("silu")  # a fresh base, as from_pretrained of the original checkpoint gives it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = hf_stochact.load_adapter(base, folder)
    assert not _ours(caught), "the one call: nothing to warn about"
    reloaded.eval()
    assert _kinds(reloaded) == {"ReLU"} and base.config.hidden_act == "relu"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_plain_from_pretrained_warns_and_apply_saved_activation_fixes_it(trained):
    folder, ids, logits, _ = trained
    base = tiny_llama("silu")
    with pytest.warns(UserWarning, match=r"trained with FFN activation 'relu'.*base model has 'silu'"):
        plain = peft.PeftModel.from_pretrained(base, folder)
    plain.eval()
    assert _kinds(plain) == {"SiLUActivation"}
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, logits), "the silent mismatch this guards against"
    assert hf_stochact.apply_saved_activation(plain, folder) == "relu"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_an_adapter_of_an_unchanged_model_loads_without_a_warning(tmp_path):
    model = _lora(tiny_llama("silu"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ACTIVATION_FILE).read_text())["activation"] == "silu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(tiny_llama("silu"), tmp_path)
    assert not _ours(caught)
    assert hf_stochact.apply_saved_activation(tiny_llama("silu"), tmp_path / "missing") is None
