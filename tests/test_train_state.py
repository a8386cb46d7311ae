"""train/state.py on dicts: what a resume must keep, what it may change only when allowed, and where it may start."""
import pytest

from medst_fast import get_model_config
from medst_fast import weights as W
from medst_fast.train import state as S

ARGS = {"lr": 4e-5, "max_steps": 4, "epochs": 8, "warmup_frac": 0.4, "lambda_temporal": 1.0, "clip_grad": None,
        "batch_series": 2, "seed": 42, "accum_steps": 1, "world_size": 1, "data_path": "/d", "vocab_sha256": "ab"}


def _ckpt(cfg, n_series=8, **args):
    return {"args": dict(ARGS, **args), "config": cfg.to_dict(), "n_series": n_series}


@pytest.mark.parametrize("flag,value", [("lr", 1e-3), ("max_steps", 6), ("epochs", 3), ("warmup_frac", 0.1),
                                        ("lambda_temporal", 0.0), ("clip_grad", 1.0), ("vocab_sha256", "cd")])
def test_a_changed_run_defining_setting_is_named(flag, value):
    changes = S.defining_changes(ARGS, dict(ARGS, **{flag: value}))
    assert changes == [f"--{flag.replace('_', '-')} {ARGS[flag]!r} -> {value!r}"]


def test_unchanged_settings_and_bookkeeping_are_no_change():
    assert S.defining_changes(ARGS, dict(ARGS)) == []
    assert S.defining_changes(ARGS, dict(ARGS, out="/elsewhere", log_every=5, keep=9)) == []  # not run-defining
    assert S.defining_changes({"lr": 1e-4}, dict(ARGS)) != []  # an older checkpoint's own keys still compared


@pytest.mark.parametrize("change,expect", [
    ({"batch_series": 4}, "--batch-series 2 -> 4"),
    ({"seed": 7}, "--seed 42 -> 7"),
    ({"accum_steps": 2}, "--accum-steps 1 -> 2"),
    ({"world_size": 2}, "world size 1 -> 2"),
])
def test_settings_that_fix_the_data_order_are_never_changed(change, expect):
    cfg = get_model_config("medst_tiny")
    new = dict(ARGS, **change)
    assert S.fixed_changes(ARGS, new, _ckpt(cfg), cfg, new["world_size"], 8) == [expect]


def test_a_changed_model_or_data_size_is_named():
    cfg = get_model_config("medst_tiny")
    assert S.fixed_changes(ARGS, ARGS, _ckpt(cfg), cfg, 1, 8) == []
    other = cfg.replace(vision={"depth": cfg.vision.depth + 1})
    assert S.fixed_changes(ARGS, ARGS, _ckpt(cfg), other, 1, 8) == ["model config differs"]
    assert S.fixed_changes(ARGS, ARGS, _ckpt(cfg), cfg, 1, 6) == [
        "the data set has 6 series, the checkpoint's run had 8"]


def test_loss_flags_are_not_architecture_and_old_configs_still_match():
    cfg = get_model_config("medst_tiny")
    flagged = cfg.replace(loss={"lambda_temporal": 0.5}).to_dict()
    assert S.architecture(flagged) == S.architecture(cfg.to_dict())  # compared as a run-defining flag instead
    old = cfg.to_dict()
    assert old["faithful"] is False
    del old["faithful"]  # as in a checkpoint written before the field existed: filled with its default
    assert S.architecture(old) == S.architecture(cfg.to_dict())
    with pytest.raises(W.CheckpointError, match="cannot be read by this version"):
        S.architecture({**cfg.to_dict(), "vision": {**cfg.to_dict()["vision"], "bogus": 1}})


@pytest.mark.parametrize("step,in_epoch,match", [(5, 0, "at step 5, past the end of this run"),
                                                 (3, 4, "at step 4 of its epoch, but an epoch now has 4 steps")])
def test_a_position_past_the_run_or_the_epoch_is_refused(step, in_epoch, match):
    S.check_position("c.pt", S.TrainState(step=4, step_in_epoch=3), total_steps=4, steps_per_epoch=4)  # fine
    with pytest.raises(W.CheckpointError, match=match):
        S.check_position("c.pt", S.TrainState(step=step, step_in_epoch=in_epoch), total_steps=4, steps_per_epoch=4)


def test_advance_moves_to_the_next_epoch_at_its_end():
    st = S.TrainState()
    for _ in range(3):
        st.advance(steps_per_epoch=3)
    assert (st.step, st.epoch, st.step_in_epoch) == (3, 1, 0)
    st.advance(steps_per_epoch=3)
    assert (st.step, st.epoch, st.step_in_epoch) == (4, 1, 1)


def test_loader_counts_continue_the_resumed_runs():
    from collections import Counter

    loader = type("L", (), {"bad": Counter(missing_image=2), "cpu_decoded": Counter()})()
    st = S.TrainState(counts_base={"bad": Counter(missing_image=3, dropped_study=1), "cpu_decoded": Counter(a=1)})
    c = st.loader_counts(loader)
    assert c["bad"] == Counter(missing_image=5, dropped_study=1) and c["cpu_decoded"] == Counter(a=1)
