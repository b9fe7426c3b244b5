"""StochActSchedule: stage arithmetic, swaps on stock and stochastic models, gradient accumulation, resume,
logging, the final ReLU swap and a reload by stock transformers."""

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args
from transformers import TrainerCallback

from hf_stochact import CONFIG_KEY, Stage, StochActSchedule, StochasticActivation, ffn_activations


class Recorder(TrainerCallback):
    """Records, for every micro-batch forward, (global_step, activation class, p) of layer 0's FFN activation."""

    def __init__(self):
        self.seen = []
        self.state = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        mlp = model.model.layers[0].mlp
        mlp.register_forward_pre_hook(lambda m, inp: self.seen.append(
            (self.state.global_step, type(m.act_fn).__name__, getattr(m.act_fn, "p", None))))


class LogSink(TrainerCallback):
    """Stands for a reporting integration (TensorBoard, W&B): the Trainer calls those before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(model, tmp_path, schedule, resume=None, **kwargs):
    rec = Recorder()
    sink = LogSink()
    trainer = tf.Trainer(model=model, args=training_args(tmp_path, **kwargs), train_dataset=token_dataset(),
                         callbacks=[sink, schedule, rec])
    trainer.sink = sink
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


# ---- stage arithmetic -------------------------------------------------------------------------------------------

def test_presets_resolve_to_the_paper_recipes():
    sched = StochActSchedule(p=0.7, relu_fraction=0.25)
    assert sched.resolve(100) == [0, 75]
    assert [sched.stage_at(s, 100) for s in (0, 74, 75, 99)] == [(0, 0.7), (0, 0.7), (1, None), (1, None)]
    swi = StochActSchedule(preset="swi+ft", relu_fraction=0.1)
    assert [s.activation for s in swi.stages] == ["silu", "relu"] and swi.resolve(50) == [0, 45]
    assert [s.activation for s in StochActSchedule(relu_fraction=0.0).stages] == ["stochastic"]
    assert [s.activation for s in StochActSchedule(relu_fraction=1.0).stages] == ["relu"]


def test_linear_ramp_of_p():
    sched = StochActSchedule([Stage(0.0, "stochastic", p=1.0, ramp=True), Stage(0.5, "relu")])
    assert sched.stage_at(0, 100) == (0, 1.0)
    assert sched.stage_at(25, 100)[1] == pytest.approx(0.5)
    assert sched.stage_at(50, 100) == (1, None)
    two = StochActSchedule([Stage(0, "stochastic", p=0.2, ramp=True), Stage(10, "stochastic", p=0.6)])
    assert two.stage_at(5, 20)[1] == pytest.approx(0.4)


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: StochActSchedule(relu_fraction=1.5), ["relu_fraction", "[0, 1]"]),
        (lambda: StochActSchedule(relu_fraction=-0.1), ["relu_fraction"]),
        (lambda: StochActSchedule(p=2.0), ["p must be in"]),
        (lambda: StochActSchedule(preset="relu-only"), ["preset", "stocha+ft", "swi+ft"]),
        (lambda: StochActSchedule([Stage(0.5, "silu"), Stage(0.2, "relu")]), ["strictly increasing"]),
        (lambda: StochActSchedule([Stage(0.0, "swish-ish")]), ["Stage.activation", "swish-ish", "relu"]),
        (lambda: StochActSchedule([Stage(1.5, "relu")]), ["Stage.start", "[0, 1)"]),
        (lambda: StochActSchedule([Stage(0.0, "stochastic", p=-1)]), ["p must be in"]),
        (lambda: StochActSchedule([Stage(0.0, "relu", p=0.5)]), ["only to 'stochastic'"]),
        (lambda: StochActSchedule([Stage(0.0, "stochastic", ramp=True)]), ["last stage cannot ramp"]),
        (lambda: StochActSchedule([Stage(0.0, "stochastic", ramp=True), Stage(0.5, "gelu")]), ["ramp"]),
        (lambda: StochActSchedule(final_activation="stochastic"), ["final_activation"]),
    ],
)
def test_bad_arguments_raise_at_construction(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_stage_beyond_the_end_and_missing_max_steps_raise_at_train_begin(tmp_path):
    with pytest.raises(ValueError, match="beyond the end of training"):
        StochActSchedule([Stage(0, "silu"), Stage(10, "relu")]).resolve(8)
    sched = StochActSchedule()
    state = tf.TrainerState()
    state.max_steps = 0
    with pytest.raises(ValueError, match="max_steps"):
        sched.on_train_begin(None, state, None, model=tiny_llama())


# ---- in a Trainer -------------------------------------------------------------------------------------------------

def test_relufies_a_stock_silu_model_and_saves_plain_relu(tmp_path):
    model = tiny_llama("silu")
    trainer, rec = train(model, tmp_path, StochActSchedule(p=0.5, relu_fraction=0.25, monitor_every=1))
    kinds = {step: (kind, p) for step, kind, p in rec.seen}
    assert all(kinds[s] == ("StochasticActivation", 0.5) for s in range(6))
    assert all(kinds[s][0] == "ReLU" for s in (6, 7))
    assert all(type(m).__name__ == "ReLU" for *_, m in ffn_activations(model))
    assert model.config.hidden_act == "relu" and not hasattr(model.config, CONFIG_KEY)
    logs = [h for h in trainer.sink.logs if "loss" in h]
    assert [h["stochact/stage"] for h in logs[:6]] == [0] * 6 and logs[7]["stochact/stage"] == 1
    zeros = [h["stochact/ffn_zero_fraction"] for h in logs]
    assert all(0.0 < z < 1.0 for z in zeros)
    assert zeros[-1] > zeros[0]  # ReLU zeroes every negative, StochA(0.5) only half of them
    history = [h for h in trainer.state.log_history if "loss" in h]  # what trainer_state.json keeps
    assert [h["stochact/ffn_zero_fraction"] for h in history] == zeros


def test_schedule_uses_the_configured_p_and_logs_every_line_without_nan(tmp_path):
    import math

    model = tiny_llama("stochastic", stochastic_activation={"p": 0.7})
    trainer, rec = train(model, tmp_path, StochActSchedule(relu_fraction=0.25, monitor_every=3))
    assert {p for step, kind, p in rec.seen if step < 6} == {0.7}, "the config says 0.7: train at 0.7"
    logs = [h for h in trainer.sink.logs if "loss" in h]
    assert len(logs) == 8
    assert [h.get("stochact/p") for h in logs] == [0.7] * 6 + [None] * 2, "no p in ReLU stages (no NaN)"
    assert not any(isinstance(v, float) and math.isnan(v) for h in logs for v in h.values())
    assert all("stochact/ffn_zero_fraction" in h for h in logs), "zero fraction on every log line"
    assert not any(k.endswith("_step") for h in logs for k in h), "no step column beside the metric (own chart)"
    explicit = StochActSchedule(p=0.3, relu_fraction=0.25)
    explicit.on_train_begin(None, _state(8), None, model=tiny_llama("stochastic", stochastic_activation={"p": 0.7}))
    assert explicit.stage_at(0, 8) == (0, 0.3), "an explicit p wins over the config"


def test_zero_fraction_after_a_switch_is_measured_in_the_new_stage(tmp_path):
    # p=1 (paper variant): no zeros in the StochA stage; a monitor sampling one forward in 1000 measured only the
    # first forward of training, and the ReLU stage used to log that StochA-phase value (0.0) as its own
    model = tiny_llama("silu")
    trainer, _ = train(model, tmp_path, StochActSchedule(p=1.0, relu_fraction=0.25, monitor_every=1000))
    logs = [h for h in trainer.sink.logs if "loss" in h]
    stocha = [h["stochact/ffn_zero_fraction"] for h in logs if h["stochact/stage"] == 0]
    relu = [h["stochact/ffn_zero_fraction"] for h in logs if h["stochact/stage"] == 1]
    assert len(stocha) == 6 and len(relu) == 2
    assert stocha == [0.0] * 6
    assert all(0.3 < z < 0.7 for z in relu), relu  # ReLU zeroes the negatives: measured in the ReLU stage


def _state(max_steps):
    state = tf.TrainerState()
    state.max_steps = max_steps
    return state


def test_stochastic_model_follows_swi_ft_and_is_swapped(tmp_path):
    model = tiny_llama("stochastic")
    _, rec = train(model, tmp_path, StochActSchedule(preset="swi+ft", relu_fraction=0.5))
    silu_cls = type(tf.activations.ACT2FN["silu"]).__name__
    assert {k for s, k, _ in rec.seen if s < 4} == {silu_cls} and {k for s, k, _ in rec.seen if s >= 4} == {"ReLU"}
    assert not any(isinstance(m, StochasticActivation) for m in model.modules())


def test_gradient_accumulation_micro_batches_share_the_stage(tmp_path):
    sched = StochActSchedule([Stage(0.0, "stochastic", p=1.0, ramp=True), Stage(0.75, "relu")])
    _, rec = train(tiny_llama(), tmp_path, sched, gradient_accumulation_steps=2)
    by_step = {}
    for step, kind, p in rec.seen:
        by_step.setdefault(step, []).append((kind, p))
    assert sorted(by_step) == list(range(8))
    for step, views in by_step.items():
        assert len(views) == 2 and views[0] == views[1], (step, views)
    assert by_step[0][0][1] == 1.0 and by_step[3][0][1] == pytest.approx(0.5)  # p ramps 1 -> 0 over 6 steps


def test_resume_from_checkpoint_continues_the_schedule_exactly(tmp_path):
    sched = lambda: StochActSchedule([Stage(0.0, "stochastic", p=0.8, ramp=True), Stage(0.75, "relu")])  # noqa
    full_model = tiny_llama()
    _, full = train(full_model, tmp_path / "a", sched(), save_strategy="steps", save_steps=4)
    resumed_model = tiny_llama()
    _, part = train(resumed_model, tmp_path / "a", sched(), resume=str(tmp_path / "a" / "checkpoint-4"))
    assert [r for r in full.seen if r[0] >= 4] == part.seen
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)


def test_saved_relu_model_loads_in_stock_transformers_with_identical_outputs(tmp_path):
    model = tiny_llama("stochastic")
    train(model, tmp_path / "run", StochActSchedule(relu_fraction=0.25))
    model.save_pretrained(tmp_path / "final")
    ids = torch.randint(3, 97, (2, 16))
    torch.save({"ids": ids, "logits": model.eval()(input_ids=ids).logits}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import sys, torch, transformers
        m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'final')!r}).eval()
        e = torch.load({str(tmp_path / 'expected.pt')!r})
        assert m.config.hidden_act == "relu", m.config.hidden_act
        assert not hasattr(m.config, "stochastic_activation")
        assert "hf_stochact" not in sys.modules
        print("EQUAL" if torch.equal(m(input_ids=e["ids"]).logits, e["logits"]) else "DIFFERENT")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.stdout.strip().endswith("EQUAL"), out.stdout + out.stderr


def test_user_generator_with_gradient_checkpointing_warns(tmp_path):
    from hf_stochact.training.schedule import warn_generator_with_checkpointing

    model = tiny_llama("stochastic")
    assert not warn_generator_with_checkpointing(model)
    model.gradient_checkpointing_enable()
    assert not warn_generator_with_checkpointing(model), "torch's RNG is rewound by checkpointing: fine"
    ffn_activations(model)[0][3].generator = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        StochActSchedule(relu_fraction=0.25).on_train_begin(None, _state(8), None, model=model)
