"""``python -m medst_fast.reproduce``: the paper's pipeline in one resumable command.

    python -m medst_fast.reproduce --mimic-jpg DIR --mimic-reports DIR|ZIP|CSV --ms-cxr-t DIR --rsna DIR \\
        --covidx DIR --init MGCA_CKPT --text-init BERT_DIR --out RUN [--nproc N] [--mode official|fixed]
    python -m medst_fast.reproduce --smoke --out RUN        # synthetic data, medst_tiny, a few CPU steps

Stages, in order: prepare (series index of MIMIC-CXR-JPG + reports) -> pretrain (the official recipe,
docs/method.md §5) -> msxrt-image, msxrt-sentence, rsna-zeroshot, covidx-probe (docs/method.md §7.1-7.4) -> results
(``RUN/results.md`` and ``RUN/results.json``: every metric beside the paper's number, docs/method.md §7.5, and the gap).
``--smoke`` adds two stages in front: synth (a synthetic MIMIC-CXR-JPG tree and MS-CXR-T / RSNA / COVIDx-format
sets in ``RUN/synth``, for every input not given) and vocab (a WordPiece vocabulary of its reports).

Every stage calls the project's own entry points (prepare's and the evaluation CLI's ``main(argv)`` and
the trainer's, in this process; the trainer under torchrun for ``--nproc`` > 1). After a stage succeeds,
``RUN/stages/<name>.done`` is written atomically (its command, settings, timing and a fresh id). A stage is
skipped when its marker and its outputs exist and the stages it reads from were not redone since; it is
redone when its marker is missing. An interrupted pretrain resumes through the trainer's ``--resume auto``.
A marker recorded with other settings (another ``--mode``, other inputs) is an error: a reproduction must not
mix runs. One line per stage says ran or skipped (stdout and ``RUN/reproduce.log``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .files import atomic_write

log = logging.getLogger("medst_fast")

EVAL_TASKS = ("msxrt-image", "msxrt-sentence", "rsna-zeroshot", "covidx-probe")
# what each evaluation reads, and the flag that gives it
EVAL_INPUT_FLAG = {"msxrt-image": "--ms-cxr-t", "msxrt-sentence": "--ms-cxr-t", "rsna-zeroshot": "--rsna",
                   "covidx-probe": "--covidx"}
SYNTH_SUBDIR = {"--ms-cxr-t": "msxrt", "--rsna": "rsna", "--covidx": "covidx"}

# The official recipe (docs/method.md §5), passed to the trainer explicitly so that a change of the trainer's
# defaults cannot change what this command reproduces.
RECIPE = ["--model", "medst_vit_b16", "--epochs", "8", "--lr", "4e-5", "--min-lr", "1e-8", "--warmup-frac", "0.4",
          "--wd", "0.05", "--beta1", "0.9", "--beta2", "0.999", "--batch-series", "10", "--seed", "42",
          "--lambda-ita", "1", "--lambda-local", "1", "--lambda-temporal", "1"]
OFFICIAL_GPUS = 2  # the README's --gpus 2: 10 series per GPU, 20 per step
SMOKE_STEPS = 4
SMOKE_PATIENTS = 30

# Flags that say where or how fast a stage runs, not what it computes: left out of the settings a marker
# is compared on, so a rerun on another device or with other worker counts still skips finished stages.
RUN_ONLY_FLAGS = {"--workers", "--device", "--batch-size", "--progress", "--progress-interval", "--kernels"}

# ---------------------------------------------------------------------------------------- paper numbers
# Med-ST's reported numbers as docs/method.md §7.5 lists them (fractions). Only one cell could be found: MS-CXR-T
# pleural-effusion progression 67.4. The sources at hand do not say whether it is accuracy or macro-accuracy, nor 5- or
# 10-fold CV (docs/method.md §7.1, §7.5), so it stands beside each of the four pleural-effusion rows.
PAPER = [
    {"task": "msxrt_image", "subset": "pleural_effusion", "metrics": None, "value": 0.674,
     "source": "Med-ST 67.4 (docs/method.md §7.5, wizwand 'Macro Acc'; accuracy or macro-accuracy and 5- or 10-fold CV "
               "unknown, docs/method.md §7.1)"},
]
NOT_REPORTED = "not reported in the sources this project could read (docs/method.md §7.5)"
# Other models' numbers docs/method.md §7.5 lists: context only, never a gap (another model and another protocol).
REFERENCES = [
    {"task": "msxrt_sentence", "metric": "accuracy", "value": 0.8777,
     "source": "BioViL-T, HF microsoft/BiomedVLP-BioViL-T README (hi-ml's protocol and subset; docs/method.md §7.2)"},
    {"task": "msxrt_sentence", "metric": "auroc", "value": 0.933,
     "source": "BioViL-T, HF microsoft/BiomedVLP-BioViL-T README (hi-ml's protocol and subset; docs/method.md §7.2)"},
]


def paper_value(task: str, subset: str, metric: str) -> Tuple[Optional[float], str]:
    """(the paper's number for this cell as a fraction, its source) or (None, why there is none)."""
    for p in PAPER:
        if p["task"] == task and p["subset"] == subset and (p["metrics"] is None or metric in p["metrics"]):
            return p["value"], p["source"]
    return None, NOT_REPORTED


# --------------------------------------------------------------------------------------------- arguments
MODE_HELP = ("official (default): the semantics the paper's numbers were computed with, i.e. what the released "
             "code runs, quirks included: prepare --official-rows (a row per frontal image), pretrain --faithful "
             "--replicate-collate-bug (docs/method.md §6.2.1, §6.1.2, §6.1.4), sentences and prompts joined with \"\" "
             "(--official-join). fixed: the project's defaults, every quirk fixed (README 'Faithful vs default "
             "semantics'); numbers will differ from the paper's for that reason too")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medst_fast.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--mimic-jpg", help="MIMIC-CXR-JPG 2.0.0 root (files/, mimic-cxr-2.0.0-*.csv.gz); also where the "
                                       "MS-CXR-T images are looked up")
    g.add_argument("--mimic-reports", help="MIMIC-CXR reports: files/ tree, mimic-cxr-reports.zip or sectioned CSV")
    g.add_argument("--ms-cxr-t", help="MS-CXR-T 1.0.0 folder (both CSVs); without it both MS-CXR-T tasks are skipped")
    g.add_argument("--rsna", help="RSNA pneumonia folder (stage_2_train_labels.csv, stage_2_train_images/); "
                                  "without it rsna-zeroshot is skipped")
    g.add_argument("--covidx", help="COVIDx folder (train.txt, test.txt, train/, test/); without it covidx-probe "
                                    "is skipped")
    g.add_argument("--init", help="MGCA ViT-B checkpoint the image tower starts from (docs/method.md §2.5; required "
                                  "without --smoke)")
    g.add_argument("--init-kind", default="mgca", choices=["auto", "medst", "mgca"], help="layout of --init")
    g.add_argument("--text-init", help="Hugging Face BERT folder (Bio_ClinicalBERT) for the text tower; its "
                                       "vocab.txt is the vocabulary unless --vocab (required without --smoke)")
    g.add_argument("--vocab", help="WordPiece vocab.txt (default: --text-init's; --smoke: built from the reports)")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder: every stage's output, markers, results.md/json")
    g.add_argument("--mode", default="official", choices=["official", "fixed"], help=MODE_HELP)
    g.add_argument("--nproc", type=int, default=1,
                   help=f"training processes (GPUs); > 1 runs the trainer under torchrun. The official run used "
                        f"{OFFICIAL_GPUS} GPUs x 10 series; the global batch is 10 x N")
    g.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                   help="trainer autocast (default: the trainer's, bf16 on CUDA; the official trained in fp32: none)")
    g.add_argument("--eval-checkpoint", default="final", choices=["final", "best"],
                   help="model the evaluations load: the last step (final/) or the lowest validation loss (best/)")
    g.add_argument("--pretrain-arg", action="append", default=[], metavar="FLAG",
                   help="extra trainer flag, repeatable, e.g. --pretrain-arg=--compile (part of the run's settings)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default: each tool's own)")
    g = p.add_argument_group("smoke test")
    g.add_argument("--smoke", action="store_true",
                   help=f"tiny end-to-end run: inputs not given are synthetic (RUN/synth), medst_tiny trains "
                        f"{SMOKE_STEPS} steps from random weights (--init/--text-init optional), the evaluations "
                        f"run with small protocols. A check of the pipeline, not a result")
    g.add_argument("--synthetic-patients", type=int, default=SMOKE_PATIENTS, help="patients of the synthetic tree")
    return p


def _fail(msg: str):
    raise SystemExit(f"medst_fast.reproduce: error: {msg}")


def check_inputs(a: argparse.Namespace) -> None:
    """Every flag's path is checked before any stage runs: a missing one is an error naming flag and path."""
    if not a.smoke:
        for flag in ("mimic_jpg", "mimic_reports", "init", "text_init"):
            if getattr(a, flag) is None:
                why = ("the paper's recipe starts from it (docs/method.md §2.5)" if flag in ("init", "text_init")
                       else "the pretraining data")
                _fail(f"--{flag.replace('_', '-')} is required without --smoke ({why})")
    elif (a.mimic_jpg is None) != (a.mimic_reports is None):
        _fail("--smoke: give both --mimic-jpg and --mimic-reports, or neither (then both are synthetic)")
    kinds = {"mimic_jpg": "dir", "mimic_reports": "any", "ms_cxr_t": "any", "rsna": "dir", "covidx": "dir",
             "init": "file", "text_init": "dir", "vocab": "file"}
    for dest, kind in kinds.items():
        path = getattr(a, dest)
        if path is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if not os.path.exists(path):
            _fail(f"{flag} {path}: no such {'folder' if kind == 'dir' else 'file' if kind == 'file' else 'path'}")
        if kind == "dir" and not os.path.isdir(path):
            _fail(f"{flag} {path}: not a folder")
        if kind == "file" and not os.path.isfile(path):
            _fail(f"{flag} {path}: not a file")
    if a.text_init and not a.vocab and not os.path.isfile(os.path.join(a.text_init, "vocab.txt")):
        _fail(f"--text-init {a.text_init}: no vocab.txt in it; give --vocab")
    if not a.smoke and not (a.vocab or a.text_init):
        _fail("--vocab or --text-init (with its vocab.txt) is required without --smoke")
    if a.nproc < 1:
        _fail(f"--nproc must be >= 1, got {a.nproc}")
    if a.workers is not None and a.workers < 0:
        _fail(f"--workers must be >= 0, got {a.workers}")
    if a.synthetic_patients < 4:
        _fail(f"--synthetic-patients must be >= 4, got {a.synthetic_patients}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        _fail(f"--out {a.out}: exists and is not a folder")


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class Stage:
    name: str
    command: List[str]            # the command line it stands for (recorded in its marker)
    outputs: List[str]            # what must exist for the stage to count as done
    run: Callable[[], None]
    needs: Tuple[str, ...] = ()   # stages whose outputs it reads
    skip_reason: Optional[str] = None  # set: the stage cannot run (a missing optional input); reported

    @property
    def settings(self) -> List[str]:
        """The command without run-only flags: what a marker must match to be reused."""
        out, skip = [], False
        for tok in self.command:
            if skip:
                skip = False
                continue
            if tok in RUN_ONLY_FLAGS:
                skip = True
                continue
            out.append(tok)
        return out


@dataclass
class Summary:
    status: Dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "skipped" | "skipped: why" | "failed: why"
    failed: List[str] = field(default_factory=list)
    interrupted: Optional[int] = None
    results: Optional[str] = None


def _atomic_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=str) + "\n")


def _cmd(module: str, argv: List[str]) -> List[str]:
    return ["python", "-m", module, *argv]


class Pipeline:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.run_dir = os.path.abspath(a.out)
        self.stage_dir = os.path.join(self.run_dir, "stages")
        self.synth_dir = os.path.join(self.run_dir, "synth")
        self.ids: Dict[str, str] = {}  # stage -> id of its current output (marker id, or the skip reason)
        self.summary = Summary()
        self.inputs = resolve_inputs(a, self.run_dir)

    # -- logging ---------------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        line = f"reproduce: {line}"
        print(line, flush=True)
        with open(os.path.join(self.run_dir, "reproduce.log"), "a", encoding="utf-8") as f:
            f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {line}\n")

    # -- markers ---------------------------------------------------------------------------------------
    def marker_path(self, name: str) -> str:
        return os.path.join(self.stage_dir, f"{name}.done")

    def read_marker(self, name: str) -> Optional[dict]:
        try:
            with open(self.marker_path(name), encoding="utf-8") as f:
                m = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as e:  # written atomically, so only a hand edit gets here: redo the stage
            self.say(f"[{name}] marker {self.marker_path(name)} unreadable ({e}); redoing the stage")
            return None
        return m if isinstance(m, dict) else None

    def why_redo(self, st: Stage, m: Optional[dict]) -> Optional[str]:
        """None when ``st`` may be skipped; else why it runs. Other settings than the marker's: an error."""
        if m is None:
            return "no marker"
        if m.get("settings") != st.settings:
            _fail(f"stage {st.name} in {self.run_dir} was done with other settings:\n  marker : "
                  f"{shlex.join(m.get('settings') or [])}\n  now    : {shlex.join(st.settings)}\nuse another "
                  f"--out, or delete {self.marker_path(st.name)} (and the stages after it) to redo it")
        upstream = {n: self.ids.get(n) for n in st.needs}
        changed = [n for n in st.needs if (m.get("upstream") or {}).get(n) != upstream[n]]
        if changed:
            return f"redone since: {', '.join(changed)}"
        missing = [o for o in st.outputs if not os.path.exists(o)]
        if missing:
            return f"output missing: {missing[0]}"
        return None

    def execute(self, st: Stage) -> bool:
        """Run or skip one stage; False when it failed (the pipeline goes on where it can)."""
        if st.skip_reason:
            self.ids[st.name] = f"skipped: {st.skip_reason}"
            self.summary.status[st.name] = f"skipped: {st.skip_reason}"
            self.say(f"[{st.name}] skipped: {st.skip_reason}")
            return True
        bad_up = [n for n in st.needs if n in self.summary.failed]
        if bad_up:
            self.summary.status[st.name] = f"failed: needs {', '.join(bad_up)}"
            self.summary.failed.append(st.name)
            self.say(f"[{st.name}] not run: {', '.join(bad_up)} failed")
            return False
        m = self.read_marker(st.name)
        why = self.why_redo(st, m)
        if why is None:
            self.ids[st.name] = m["id"]
            self.summary.status[st.name] = "skipped"
            self.say(f"[{st.name}] skipped: done {m.get('finished')} ({m.get('seconds')} s), "
                     f"{self.marker_path(st.name)}")
            return True
        if os.path.exists(self.marker_path(st.name)):
            os.remove(self.marker_path(st.name))  # a half-redone stage must not look done
        self.say(f"[{st.name}] running ({why}): {shlex.join(st.command)}")
        started, t0 = datetime.datetime.now(), time.time()
        st.run()
        marker = {"stage": st.name, "id": uuid.uuid4().hex, "command": st.command, "settings": st.settings,
                  "upstream": {n: self.ids.get(n) for n in st.needs}, "outputs": st.outputs,
                  "started": started.isoformat(timespec="seconds"),
                  "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                  "seconds": round(time.time() - t0, 1)}
        _atomic_json(self.marker_path(st.name), marker)
        self.ids[st.name] = marker["id"]
        self.summary.status[st.name] = "ran"
        self.say(f"[{st.name}] ran in {marker['seconds']} s")
        return True

    # -- the stages ------------------------------------------------------------------------------------
    def stages(self) -> List[Stage]:
        a, r = self.a, self.run_dir
        out: List[Stage] = []
        if a.smoke and self.inputs["synthetic"]:
            out.append(self.synth_stage())
        out.append(self.prepare_stage())
        if self.vocab_needs_building():
            out.append(self.vocab_stage())
        out.append(self.pretrain_stage())
        out.extend(self.eval_stage(t) for t in EVAL_TASKS)
        out.append(Stage("results", ["(table) " + os.path.join(r, "results.md")],
                         [os.path.join(r, "results.md"), os.path.join(r, "results.json")], self.write_results,
                         needs=EVAL_TASKS))
        return out

    def synth_stage(self) -> Stage:
        n = self.a.synthetic_patients
        argv = ["--out", self.synth_dir, "--patients", str(n), "--seed", "0", "--no-zip"]

        def run():
            from .data import synth

            synth.generate(self.synth_dir, patients=n, seed=0, extras=True, zip_reports=False)

        return Stage("synth", _cmd("medst_fast.data.synth", argv), [os.path.join(self.synth_dir, "ground_truth.json")],
                     run)

    def prepare_stage(self) -> Stage:
        a, index = self.a, os.path.join(self.run_dir, "index")
        argv = ["mimic", "--jpg-root", self.inputs["mimic_jpg"], "--reports", self.inputs["mimic_reports"],
                "--out", index, "--cache-size", "256"]
        if a.mode == "official":
            argv.append("--official-rows")
        if a.workers is not None or a.smoke:
            argv += ["--workers", str(0 if a.workers is None else a.workers)]

        def run():
            from .data import prepare

            rc = prepare.main(argv)
            if rc:
                _fail(f"stage prepare failed (exit status {rc}; the reason is logged above); a rerun resumes "
                      "its image cache")

        return Stage("prepare", _cmd("medst_fast.data.prepare", argv), [os.path.join(index, "meta.json")], run,
                     needs=("synth",) if self.inputs["mimic_synthetic"] else ())

    def vocab_needs_building(self) -> bool:
        return not (self.a.vocab or self.a.text_init)

    def vocab_path(self) -> str:
        a = self.a
        if a.vocab:
            return os.path.abspath(a.vocab)
        if a.text_init:
            return os.path.abspath(os.path.join(a.text_init, "vocab.txt"))
        return os.path.join(self.run_dir, "vocab", "vocab.txt")

    def vocab_stage(self) -> Stage:
        index, folder = os.path.join(self.run_dir, "index"), os.path.join(self.run_dir, "vocab")

        def run():
            from .data.index import SeriesIndex
            from .train.data import build_wordpiece_vocab

            texts = [s.text for s in SeriesIndex.load(index).studies if s.split == "train"]
            os.makedirs(folder, exist_ok=True)
            build_wordpiece_vocab(texts, folder)

        return Stage("vocab", ["(WordPiece of the training reports of) " + index], [self.vocab_path()], run,
                     needs=("prepare",))

    def pretrain_argv(self) -> List[str]:
        a, run = self.a, os.path.join(self.run_dir, "pretrain")
        argv = ["--data", os.path.join(self.run_dir, "index"), "--vocab", self.vocab_path(), "--out", run,
                "--resume", "auto"]
        if a.smoke:
            # medst_tiny from random weights, a handful of steps on CPU; the torch reference ops on CPU so an
            # exported TRITON_INTERPRET=1 cannot turn the smoke run into an interpreter run
            argv += ["--model", "medst_tiny", "--max-steps", str(SMOKE_STEPS), "--batch-series", "4",
                     "--log-every", "1", "--eval-every", "0", "--save-every", "1000"]
            if a.device in (None, "cpu"):
                argv += ["--kernels", "torch"]
        else:
            argv += RECIPE
        if a.mode == "official":
            argv += ["--faithful", "--replicate-collate-bug"]
        if a.init:
            argv += ["--init", os.path.abspath(a.init), "--init-kind", a.init_kind]
        if a.text_init:
            argv += ["--text-init", os.path.abspath(a.text_init)]
        if a.amp:
            argv += ["--amp", a.amp]
        if a.device:
            argv += ["--device", a.device]
        if a.workers is not None or a.smoke:
            argv += ["--workers", str(0 if a.workers is None else a.workers)]
        return argv + list(a.pretrain_arg)

    def pretrain_stage(self) -> Stage:
        a, argv = self.a, self.pretrain_argv()
        if a.nproc > 1:
            command = ["torchrun", "--standalone", f"--nproc_per_node={a.nproc}", "-m", "medst_fast.pretrain", *argv]
        else:
            command = _cmd("medst_fast.pretrain", argv)

        def run():
            if a.nproc > 1:
                self.run_torchrun(argv, command)
            else:
                self.run_trainer(argv)

        final = os.path.join(self.run_dir, "pretrain", "final")
        needs = ("prepare", "vocab") if self.vocab_needs_building() else ("prepare",)
        return Stage("pretrain", command, [os.path.join(final, n) for n in ("config.json", "model.safetensors",
                                                                             "vocab.txt")], run, needs=needs)

    def run_trainer(self, argv: List[str]) -> None:
        from .pretrain import main as pretrain
        from .train.run_dir import RunFolderError
        from .train.faults import TrainingDiverged
        from .weights import CheckpointError

        try:
            res = pretrain(argv)
        except (TrainingDiverged, CheckpointError, RunFolderError) as e:
            _fail(f"stage pretrain failed: {e}")
        if res.interrupted:
            self.summary.interrupted = res.interrupted
            self.say(f"[pretrain] interrupted by signal {res.interrupted} after step {res.step}; the same command "
                     "resumes it (--resume auto)")
            raise SystemExit(128 + res.interrupted)
        if self.a.eval_checkpoint == "best" and not res.best_dir:
            _fail("--eval-checkpoint best: the trainer exported no best/ (no validation ran: is the 'valid' split "
                  "empty?)")

    def run_torchrun(self, argv: List[str], command: List[str]) -> None:
        # torchrun's own module, so the launcher of this very interpreter is used
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.a.nproc}",
                  "-m", "medst_fast.pretrain", *argv]
        rc = subprocess.call(launch)
        if rc:
            _fail(f"stage pretrain: torchrun exited with status {rc}. The command was:\n  {shlex.join(command)}\n"
                  "run it yourself (it resumes with --resume auto), then rerun this command")

    def checkpoint(self) -> str:
        return os.path.join(self.run_dir, "pretrain", self.a.eval_checkpoint)

    def eval_argv(self, task: str, data: str) -> List[str]:
        a, smoke = self.a, self.a.smoke
        argv = [task, "--checkpoint", self.checkpoint(), "--data", data, "--out", self.eval_dir(task)]
        if task == "msxrt-image":
            argv += ["--images", self.inputs["msxrt_images"]]
            if smoke:
                argv += ["--seeds", "42", "--folds", "2"]
        if task in ("msxrt-sentence", "rsna-zeroshot") and a.mode == "official":
            argv.append("--official-join")
        if task == "rsna-zeroshot" and smoke:
            argv += ["--split", "all"]  # the synthetic set's 15 % test split holds a handful of images
        if task == "covidx-probe" and smoke:
            argv += ["--pcts", "1", "--max-epochs", "3"]
        if a.device:
            argv += ["--device", a.device]
        if task != "msxrt-sentence" and (a.workers is not None or smoke):
            argv += ["--workers", str(0 if a.workers is None else a.workers)]
        return argv

    def eval_dir(self, task: str) -> str:
        return os.path.join(self.run_dir, "eval", task)

    def eval_stage(self, task: str) -> Stage:
        data, reason = self.inputs["eval"][task]
        argv = self.eval_argv(task, data) if data else [task]
        result = os.path.join(self.eval_dir(task), "result.json")

        def run():
            from .eval.__main__ import main as evaluate

            res = evaluate(argv)
            _atomic_json(result, {"task": res.task, "rows": res.rows, "meta": res.meta})

        synthetic = bool(data) and os.path.commonpath([data, self.synth_dir]) == self.synth_dir
        return Stage(task, _cmd("medst_fast.eval", argv), [result], run,
                     needs=("pretrain", "synth") if synthetic else ("pretrain",), skip_reason=reason)

    def execute_eval(self, st: Stage) -> None:
        """An evaluation that fails is reported in the table and the exit status; the others still run."""
        try:
            self.execute(st)
        except ImportError as e:  # an optional dependency (sklearn, pydicom, ...) is missing: a reported skip
            self.ids[st.name] = f"skipped: {e}"
            self.summary.status[st.name] = f"skipped: missing optional dependency ({e})"
            self.say(f"[{st.name}] skipped: missing optional dependency ({e})")
        except (Exception, SystemExit) as e:
            if isinstance(e, SystemExit) and not isinstance(e.code, str):
                raise  # an exit status (e.g. an argument error of the evaluation CLI's parser) is final
            msg = str(e.code if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}")
            traceback.print_exc()
            self.summary.status[st.name] = f"failed: {msg}"
            self.summary.failed.append(st.name)
            self.say(f"[{st.name}] failed: {msg}")

    # -- results ---------------------------------------------------------------------------------------
    def write_results(self) -> None:
        tasks = {}
        for task in EVAL_TASKS:
            status = self.summary.status.get(task, "")
            entry = {"status": "evaluated", "reason": None, "rows": [], "meta": {}}
            if status.startswith(("skipped:", "failed:")):  # not evaluated: a missing input, or an error
                entry["status"], entry["reason"] = status.split(": ", 1)
            else:
                with open(os.path.join(self.eval_dir(task), "result.json"), encoding="utf-8") as f:
                    res = json.load(f)
                entry["name"], entry["meta"] = res["task"], res["meta"]
                for row in res["rows"]:
                    paper, source = paper_value(res["task"], row["subset"], row["metric"])
                    entry["rows"].append({**row, "paper": paper, "paper_source": source,
                                          "gap": None if paper is None else row["value"] - paper})
            tasks[task] = entry
        doc = {"run": self.run_dir, "mode": self.a.mode, "smoke": bool(self.a.smoke),
               "checkpoint": self.checkpoint(), "tasks": tasks, "references": REFERENCES,
               "written": datetime.datetime.now().isoformat(timespec="seconds"),
               "gap": "ours - paper, in the value's unit (fractions)"}
        _atomic_json(os.path.join(self.run_dir, "results.json"), doc)
        atomic_write(os.path.join(self.run_dir, "results.md"), results_markdown(doc))

    # -- all -------------------------------------------------------------------------------------------
    def run(self) -> Summary:
        os.makedirs(self.stage_dir, exist_ok=True)
        t0 = time.time()
        self.say(f"start: {self.run_dir} (mode {self.a.mode}{', smoke' if self.a.smoke else ''})")
        for st in self.stages():
            if st.name in EVAL_TASKS:
                self.execute_eval(st)
            elif st.name == "results" and self.summary.failed:
                if os.path.exists(self.marker_path("results")):
                    os.remove(self.marker_path("results"))  # the old marker would vouch for the new, partial table
                self.write_results()  # the table shows the failures; no marker, so a rerun redoes them
                self.summary.status["results"] = "ran (incomplete: " + ", ".join(self.summary.failed) + " failed)"
                self.say(f"[results] ran, without a marker: {', '.join(self.summary.failed)} failed")
            else:
                self.execute(st)
        self.summary.results = os.path.join(self.run_dir, "results.md")
        self.say(f"done in {time.time() - t0:.1f} s: {self.summary.results}")
        return self.summary


def resolve_inputs(a: argparse.Namespace, run_dir: str) -> dict:
    """Where each stage reads from: the given flags, and under --smoke RUN/synth for what is not given.

    ``eval`` maps each task to (data path, None) or (None, why it is skipped)."""
    synth = os.path.join(run_dir, "synth")
    mimic_jpg = os.path.abspath(a.mimic_jpg) if a.mimic_jpg else (synth if a.smoke else None)
    reports = os.path.abspath(a.mimic_reports) if a.mimic_reports else (synth if a.smoke else None)
    ev = {}
    for task in EVAL_TASKS:
        flag = EVAL_INPUT_FLAG[task]
        given = getattr(a, flag[2:].replace("-", "_"))
        if given:
            ev[task] = (os.path.abspath(given), None)
        elif a.smoke:
            path = os.path.join(synth, SYNTH_SUBDIR[flag])
            # synth writes no RSNA set without pydicom (DICOM files): then the task is a reported skip
            if task == "rsna-zeroshot" and not _has_module("pydicom"):
                ev[task] = (None, "no synthetic RSNA set: pydicom is not installed (pip install pydicom)")
            else:
                ev[task] = (path, None)
        else:
            ev[task] = (None, f"no {flag} given")
    mimic_synthetic = bool(a.smoke and a.mimic_jpg is None)
    synthetic = mimic_synthetic or any(d is not None and d.startswith(synth + os.sep) for d, _ in ev.values())
    return {"synthetic": synthetic, "mimic_synthetic": mimic_synthetic, "mimic_jpg": mimic_jpg,
            "mimic_reports": reports, "eval": ev, "msxrt_images": mimic_jpg or synth}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------- table
def _is_pct(metric: str) -> bool:
    return "auroc" not in metric.lower()  # the evaluation tables' convention: AUROC as a fraction


def _fmt(v: Optional[float], pct: bool, signed: bool = False) -> str:
    if v is None:
        return ""
    v = 100 * v if pct else v
    return (f"{v:+.2f}" if signed else f"{v:.2f}") if pct else (f"{v:+.4f}" if signed else f"{v:.4f}")


def results_markdown(doc: dict) -> str:
    lines = [f"# Med-ST reproduction: {doc['run']}", "",
             f"- mode: {doc['mode']}", f"- model evaluated: {doc['checkpoint']}", f"- written: {doc['written']}"]
    if doc["smoke"]:
        lines += ["", "**Smoke run**: synthetic data, `medst_tiny`, a few CPU steps from random weights. The paper "
                      "column is the real one; the gaps say nothing about the reproduction."]
    lines += ["", "Accuracy-like metrics in percent, AUROC as a fraction; gap = ours - paper (points, or AUROC "
                  "units). `n/r`: " + NOT_REPORTED + ".", "",
              "| task | subset | metric | ours | std | n | paper (Med-ST) | gap |", "|---|---|---|---|---|---|---|---|"]
    sources = []
    for task, e in doc["tasks"].items():
        if not e["rows"]:
            lines.append(f"| {task} | | | {e['status']}: {e['reason']} | | | | |")
            continue
        for r in e["rows"]:
            pct = _is_pct(r["metric"])
            paper = "n/r" if r["paper"] is None else _fmt(r["paper"], pct)
            if r["paper"] is not None and r["paper_source"] not in sources:
                sources.append(r["paper_source"])
            lines.append(f"| {e.get('name', task)} | {r['subset']} | {r['metric']}{' (%)' if pct else ''} | "
                         f"{_fmt(r['value'], pct)} | {_fmt(r['std'], pct)} | {'' if r['n'] is None else r['n']} | "
                         f"{paper} | {_fmt(r['gap'], pct, signed=True)} |")
    lines += ["", "Paper numbers: " + "; ".join(sources) if sources else "", "",
              "Other models, for context only (no gap: another model and protocol):", ""]
    lines += [f"- {ref['task']} {ref['metric']}: {_fmt(ref['value'], _is_pct(ref['metric']))} ({ref['source']})"
              for ref in doc["references"]]
    skipped = [f"- {t}: {e['status']}: {e['reason']}" for t, e in doc["tasks"].items() if e["reason"]]
    if skipped:
        lines += ["", "Not evaluated:", ""] + skipped
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> Summary:
    """Parse ``argv`` (default sys.argv[1:]), check every input, run the stages; returns the Summary."""
    a = build_parser().parse_args(argv)
    check_inputs(a)
    if not a.smoke and a.nproc != OFFICIAL_GPUS:
        log.warning("--nproc %d: the official run used %d GPUs x 10 series; the global batch here is %d series",
                    a.nproc, OFFICIAL_GPUS, 10 * a.nproc)
    os.makedirs(a.out, exist_ok=True)
    return Pipeline(a).run()


def _cli() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = main()
    if s.failed:
        print(f"medst_fast.reproduce: failed stages: {', '.join(s.failed)} (see {s.results}); rerun the same "
              "command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
