"""The learning-rate schedule against a re-implementation of the official stateful scheduler's rules."""
import math

import pytest
import torch

from medst_fast.train.args import parse_args
from medst_fast.train.schedule import cosine_warmup_lr


class OfficialStyleScheduler:
    """CosineAnnealingWarmupRestarts as Med-ST configures it (gamma 1, one cycle = the whole run),
    written from its documented rules: the base lr is min_lr, the constructor takes one step (so the first
    optimizer step runs at step_in_cycle 0), then one step() per optimizer step."""

    def __init__(self, total, max_lr, min_lr, warmup):
        self.total, self.max_lr, self.min_lr, self.warmup = total, max_lr, min_lr, warmup
        self.step_in_cycle = -1
        self.step()

    def step(self):
        self.step_in_cycle += 1
        if self.step_in_cycle >= self.total:  # restart (never reached inside a run)
            self.step_in_cycle -= self.total
        s, w = self.step_in_cycle, self.warmup
        if s < w:
            self.lr = (self.max_lr - self.min_lr) * s / w + self.min_lr
        else:
            self.lr = self.min_lr + (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * (s - w) / (self.total - w))) / 2


@pytest.mark.parametrize("total", [1, 2, 7, 40, 1001])
def test_matches_official_rules(total):
    ref = OfficialStyleScheduler(total, 4e-5, 1e-8, int(total * 0.4))
    for step in range(total):
        assert cosine_warmup_lr(step, total, 4e-5, 1e-8, 0.4) == pytest.approx(ref.lr, rel=1e-12, abs=1e-20), step
        ref.step()


def test_shape():
    total = 100
    lrs = [cosine_warmup_lr(s, total, 4e-5, 1e-8, 0.4) for s in range(total)]
    assert lrs[0] == 1e-8  # warm-up starts at min_lr
    assert lrs[40] == pytest.approx(4e-5)  # peak right after 40 % of the steps
    assert all(a < b for a, b in zip(lrs[:40], lrs[1:41]))  # linear rise
    assert all(a > b for a, b in zip(lrs[40:], lrs[41:]))  # cosine fall
    assert lrs[-1] < 1e-7 and lrs[-1] > 1e-8
    assert lrs[20] == pytest.approx(1e-8 + (4e-5 - 1e-8) * 0.5)


def test_no_warmup_and_bad_total():
    assert cosine_warmup_lr(0, 10, 1.0, 0.0, 0.0) == 1.0
    with pytest.raises(ValueError):
        cosine_warmup_lr(0, 0, 1.0)


def test_defaults_are_the_official_recipe():
    a = parse_args([])
    assert (a.lr, a.min_lr, a.warmup_frac, a.wd, a.beta1, a.beta2, a.epochs) == (4e-5, 1e-8, 0.4, 0.05, 0.9, 0.999, 8)
    assert (a.lambda_ita, a.lambda_local, a.lambda_temporal, a.batch_series, a.accum_steps) == (1.0, 1.0, 1.0, 10, 1)
    # the research switches (docs/method.md §8) default to the paper's loss
    assert (a.temporal_shuffle, a.local_weighting, a.local_scope, a.series_len, a.faithful) == (
        False, "learned", "sample", 4, False)
    assert a.amp is None and a.model is None  # resolved by device: bf16 + medst_vit_b16 on GPU, fp32 + medst_tiny on CPU
    from medst_fast.train.args import resolve

    r = resolve(a, cuda_available=False)
    assert (r.model, r.amp, r.device, r.dataset_type) == ("medst_tiny", "none", "cpu", "synthetic")
    r = resolve(parse_args([]), cuda_available=True)
    assert (r.model, r.amp, r.device) == ("medst_vit_b16", "bf16", "cuda")


def test_bad_flags_are_rejected(capsys):
    for argv in (["--batch-series", "0"], ["--resume", "auto"], ["--warmup-frac", "1.5"], ["--report-to", "mlflow"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_config_file_sets_defaults(tmp_path):
    p = tmp_path / "run.json"
    p.write_text('{"lr": 1e-4, "batch-series": 3}')
    a = parse_args(["--config", str(p), "--batch-series", "5"])
    assert a.lr == 1e-4 and a.batch_series == 5  # the command line wins over the file
    p.write_text('{"learning_rate": 1}')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(p)])


def test_adamw_weight_decay_on_all_params():
    """The trainer's optimizer: AdamW, one group, wd on every trainable parameter (official)."""
    from medst_fast.train.build import build_optimizer

    a = parse_args([])
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = build_optimizer(ps, a, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.05 and g["betas"] == (0.9, 0.999) and len(g["params"]) == 2
