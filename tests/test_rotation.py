"""Rotated input thresholds (LaRoSA + WINA, ``calibrate_thresholds(rotate=...)``): exact with every input kept, on
the decode kernels and the prefill path, for Llama (nn.Linear) and GPT-2 (Conv1D); the rotation keeps more of a
correlated input than plain magnitude at equal sparsity; save/load round trip through save_pretrained /
from_pretrained; the checkpoint stays the original model; bad input raises."""

import copy
import json

import pytest
import torch
import transformers as tf
from helpers import tiny_llama

import hf_stochact  # noqa: F401  (save_pretrained writes the rotations)
from hf_stochact import ThresholdedLinear, Thresholds, calibrate_thresholds, sparsify, unsparsify
from hf_stochact.inference import rotation
from hf_stochact.kernels.reference import magnitude_mask


def calib(n=4, t=32, seed=0, vocab=97):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def tiny_gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def rotated_paths(model):
    return {p for p, m in model.named_modules() if isinstance(m, ThresholdedLinear) and m.rotation is not None}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("rotate", ["pca", "pca-all"])
def test_rotated_model_at_zero_sparsity_equals_the_original(build, rotate):
    model = build().eval()
    x = calib(1, 12, seed=5)
    with torch.no_grad():
        reference = model(x).logits
        th = calibrate_thresholds(model, calib(), 0.0, allocation="uniform", rotate=rotate)
        assert th.rotated and th.rotation == rotate and len(th.rotation_sha256) == 64
        sparsify(model)
        assert rotated_paths(model) == set(th.rotated)
        torch.testing.assert_close(model(x).logits, reference, rtol=1e-4, atol=1e-5)  # prefill: masked dense
        for t in range(1, 4):  # decode steps: one token, the C rows loop on rotated weights
            torch.testing.assert_close(model(x[:, :t]).logits[:, -1], reference[:, t - 1], rtol=1e-4, atol=1e-5)
    assert sum(hf_stochact.sparse_stats(model).values()) > 0


def test_pca_rotates_the_groups_whose_weights_outweigh_the_rotation():
    model = tiny_llama().eval()  # d=32: q/k/v stack 64x32, gate/up 128x32 > 32²; o 32x32, down 32x64 are not
    th = calibrate_thresholds(model, calib(), 0.3, allocation="uniform", rotate="pca", save=False)
    kinds = {p.rsplit(".", 1)[1] for p in th.rotated}
    assert kinds == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    all_ = calibrate_thresholds(model, calib(), 0.3, allocation="uniform", rotate="pca-all", save=False)
    assert set(all_.rotated) == set(all_.values)
    members = {p for g in th.groups for p in g}
    for p in th.rotated:  # a group shares one rotation
        group = next(g for g in th.groups if p in g) if p in members else [p]
        assert {th.rotated[q] for q in group} == {th.rotated[p]}


def test_rotation_matrices_are_inverse_and_the_basis_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=g) @ torch.randn(24, 24, generator=g)
    w = torch.randn(40, 24, generator=g)
    q, c = rotation.pca_rotation(x.double().t() @ x.double(), w.double())
    torch.testing.assert_close(q.t() @ q, torch.eye(24), atol=1e-5, rtol=0)
    r, r_inv = rotation.matrices(q, c)
    torch.testing.assert_close(r @ r_inv, torch.eye(24), atol=1e-4, rtol=0)
    torch.testing.assert_close((x @ r) @ rotation.rotated_weight(w, r_inv).t(), x @ w.t(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(c, (w.double() @ q.double()).norm(dim=0).float(), rtol=1e-5, atol=1e-6)


def test_rotation_keeps_more_of_a_correlated_input_than_plain_magnitude():
    """Inputs with a few dominant correlated directions (as LLM activations): at 50% sparsity the rotated input
    loses a smaller share of the layer's output than the plain one (the point of LaRoSA)."""
    g = torch.Generator().manual_seed(1)
    d = 64
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[:, None]
    x = torch.randn(4000, d, generator=g) @ mix
    w = torch.randn(96, d, generator=g)
    dense = x @ w.t()

    def error(inputs, weight):
        t = float(inputs.abs().flatten().kthvalue(int(0.5 * inputs.numel())).values)
        return float((magnitude_mask(inputs, t) @ weight.t() - dense).norm() / dense.norm())

    q, c = rotation.pca_rotation(x.double().t() @ x.double(), w.double())
    r, r_inv = rotation.matrices(q, c)
    plain, rotated = error(x, w), error(x @ r, rotation.rotated_weight(w, r_inv))
    assert rotated < 0.5 * plain, (rotated, plain)


def test_rotated_thresholds_lower_the_output_error_on_a_model():
    model = tiny_llama(layers=2).eval()
    x = calib(2, 24, seed=9)
    with torch.no_grad():
        reference = model(x).logits
        errors = {}
        for rotate in ("none", "pca-all"):
            th = calibrate_thresholds(model, calib(8, 32), 0.5, allocation="uniform", rotate=rotate, save=False)
            sparsify(model, thresholds=th)
            errors[rotate] = float((model(x).logits - reference).norm() / reference.norm())
            unsparsify(model)
    assert errors["pca-all"] < errors["none"], errors


def test_save_pretrained_writes_the_rotations_and_from_pretrained_finds_them(tmp_path):
    model = tiny_llama().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = calib(1, 10, seed=3)
    with torch.no_grad():
        dense = model(x).logits
        th = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca")
        sparsify(model)
        sparse = model(x).logits
        model.save_pretrained(tmp_path)  # while sparsified: the checkpoint holds the original weights
    assert (tmp_path / rotation.ROTATION_FILE).is_file()
    saved = json.loads((tmp_path / "config.json").read_text())["sparse_thresholds"]
    assert saved["rotation"] == "pca" and saved["rotation_sha256"] == th.rotation_sha256
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, dense, rtol=1e-4, atol=1e-5)  # stock: the dense model
        sparsify(loaded)  # thresholds from the config, rotations from the folder
        assert rotated_paths(loaded) == set(th.rotated)
        torch.testing.assert_close(loaded(x).logits, sparse, rtol=1e-4, atol=1e-5)


def test_a_missing_or_foreign_rotation_file_is_refused(tmp_path):
    model = tiny_llama().eval()
    calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca")
    model.save_pretrained(tmp_path / "a")
    other = tiny_llama().eval()
    calibrate_thresholds(other, calib(seed=7), 0.4, allocation="uniform", rotate="pca")
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / rotation.ROTATION_FILE).replace(tmp_path / "a" / rotation.ROTATION_FILE)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="does not match these thresholds"):
        sparsify(loaded)
    assert not hf_stochact.is_sparsified(loaded)
    (tmp_path / "a" / rotation.ROTATION_FILE).unlink()
    with pytest.raises(ValueError, match="there is no .*sparse_rotations.safetensors"):
        sparsify(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a"))
    (tmp_path / "a" / rotation.ROTATION_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sparsify(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a"))


def test_saving_unrotated_thresholds_removes_a_stale_rotation_file(tmp_path):
    model = tiny_llama().eval()
    calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca")
    model.save_pretrained(tmp_path)
    calibrate_thresholds(model, calib(), 0.4, allocation="uniform")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / rotation.ROTATION_FILE).exists()
    assert "rotation" not in json.loads((tmp_path / "config.json").read_text())["sparse_thresholds"]


def test_unsparsify_and_resparsify_restore_the_original_weights():
    model = tiny_llama().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rotated = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca-all", save=False)
    plain = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", save=False)
    sparsify(model, thresholds=rotated)
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(q.original.weight, original["model.layers.0.self_attn.q_proj.weight"], atol=1e-3)
    copied = copy.deepcopy(model)  # a copy keeps its own rotation and state-dict hook
    for k, v in copied.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6)
    sparsify(model, thresholds=plain)  # another rotation (none): the layers go back first
    assert not rotated_paths(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6)
    unsparsify(copied)
    for name, p in copied.named_parameters():
        torch.testing.assert_close(p.detach(), original[name], rtol=1e-5, atol=1e-6)


def test_bad_rotation_arguments_and_fields_raise():
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="rotate must be one of none, pca, pca-all"):
        calibrate_thresholds(model, calib(), 0.4, rotate="svd")
    th = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca", save=False).to_dict()
    with pytest.raises(ValueError, match="rotation must be one of"):
        Thresholds.from_dict({**th, "rotation": "qr"})
    with pytest.raises(ValueError, match="rotation_sha256 must be"):
        Thresholds.from_dict({**th, "rotation_sha256": "abc"})
    with pytest.raises(ValueError, match="rotated must map"):
        Thresholds.from_dict({**th, "rotated": {"nope": "x"}})
    with pytest.raises(ValueError, match="rotated names layers, but rotation is 'none'"):
        Thresholds.from_dict({**th, "rotation": "none"})
    restored = Thresholds.from_dict(json.loads(json.dumps(th)))
    assert restored.rotated == th["rotated"] and restored.rotation_sha256 == th["rotation_sha256"]
    sparsify(model, thresholds=calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca",
                                                    save=False))
    with pytest.raises(ValueError, match="unsparsify"):
        calibrate_thresholds(model, calib(), 0.4)


def test_save_refuses_a_config_whose_rotations_the_model_lacks(tmp_path):
    model = tiny_llama().eval()
    th = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca", save=False)
    model.config.sparse_thresholds = th.to_dict()  # the config names rotations, the model holds none
    with pytest.raises(ValueError, match="names rotations this model does not hold"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_load_state_dict_of_its_own_state_dict_leaves_a_rotated_model_as_it_was(build):
    """state_dict gives the original basis; load_state_dict rotates what it loads (Trainer's best-model reload and
    resume go through it); unsparsify afterwards still restores the original weights."""
    model = build().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_thresholds(model, calib(), sparsity=0.4, allocation="uniform", rotate="pca")
    sparsify(model)
    ids = calib(1, 12, seed=3)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.load_state_dict(model.state_dict())
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    unsparsify(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], atol=1e-5, rtol=1e-5)


def test_a_rotated_sparsified_model_pickles():
    import io

    model = tiny_llama().eval()
    calibrate_thresholds(model, calib(), sparsity=0.4, allocation="uniform", rotate="pca")
    sparsify(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = calib(1, 12, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        torch.testing.assert_close(loaded.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                                   model.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def _tampered(tmp_path, change):
    """A saved rotated model whose rotation file is changed by ``change(tensors)`` and whose config's checksum is
    updated to match (a file that passes the checksum but holds bad content)."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama().eval()
    calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca")
    model.save_pretrained(tmp_path)
    path = tmp_path / rotation.ROTATION_FILE
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    pairs = {}
    for name in tensors:
        key = name.rpartition(".")[0]
        pairs[key] = (tensors[f"{key}.q"], tensors[f"{key}.c"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["sparse_thresholds"]["rotation_sha256"] = rotation.digest(pairs)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def _first_q(tensors):
    return next(k for k in tensors if k.endswith(".q"))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[_first_q(t)].view(-1)[0].fill_(float("nan")), "non-finite values"),
    (lambda t: t[_first_q(t)].mul_(2.0), "not orthogonal"),
    (lambda t: t.update({k: (torch.eye(8) if k.endswith(".q") else torch.ones(8)) for k in list(t)}),
     "reads 32 inputs"),
], ids=["nan", "not-orthogonal", "wrong-size"])
def test_a_rotation_file_with_a_matching_checksum_but_bad_content_is_refused(tmp_path, damage, message):
    loaded = _tampered(tmp_path, damage)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        sparsify(loaded)
    assert not hf_stochact.is_sparsified(loaded)  # refused before anything changed
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())


def test_a_loaded_rotated_checkpoint_saves_again_before_sparsify(tmp_path):
    model = tiny_llama().eval()
    th = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca")
    model.save_pretrained(tmp_path / "a")
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")  # the file travels
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / f / rotation.ROTATION_FILE)) for f in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    sparsify(again)
    assert rotated_paths(again) == set(th.rotated)


def test_bf16_rotated_weights_survive_save_load_sparsify_cycles_bit_for_bit(tmp_path):
    model = tiny_llama().to(torch.bfloat16).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca")
    sparsify(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the exact bits, not W R R⁻¹
    model.load_state_dict(model.state_dict())
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "0")
    for i in range(2):
        loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / str(i), dtype=torch.bfloat16).eval()
        sparsify(loaded)
        loaded.save_pretrained(tmp_path / str(i + 1))
        assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items()), i
    unsparsify(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
