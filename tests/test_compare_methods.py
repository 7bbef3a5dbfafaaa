"""scripts/compare_methods.py end to end on a tiny Llama folder (one process, ZeRO-0): the plan
(learning-rate sweep, families, seeds), and a study interrupted mid-training that a rerun
resumes from its checkpoints while skipping what finished."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.train_helpers import load_script, set_subprocess_env, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture
def cm(monkeypatch):
    set_subprocess_env(monkeypatch)
    return load_script("compare_methods")


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder with its sentencepiece tokenizer."""
    from goat_dist.train.config import load_run_config
    from goat_dist.train.data import corpus_texts, load_splits
    from goat_dist.train.modeling import build_preset
    from goat_dist.train.tokenizer import train_sentencepiece_tokenizer

    tmp = tmp_path_factory.mktemp("tiny_hf")
    folder = str(tmp / "tiny_llama_hf")
    probe = load_run_config(tiny_config(str(tmp / "p.yaml"), str(tmp / "p")))
    tok = train_sentencepiece_tokenizer(
        corpus_texts(load_splits(probe.data, "causal_lm", 0).train, probe.data), 256, folder)
    build_preset("tiny-llama", len(tok), seed=0, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    return folder


def test_plan_sweeps_families_and_seeds(tmp_path, cm, capsys, tiny_folder):
    """Dry run: lora and goat are swept; pissa borrows lora's rate and molora goat's; a method
    whose family is not in the study is swept itself; every final method gets every seed."""
    cfg = tiny_config(str(tmp_path / "run.yaml"), str(tmp_path / "unused"),
                      model={"preset": None, "name_or_path": tiny_folder})
    base = ["--config", cfg, "--ds-config", "none", "--lrs", "1e-3", "2e-3", "--seeds", "0", "1",
            "--study-dir", str(tmp_path / "s"), "--dry-run"]
    assert cm.main(base + ["--methods", "lora", "pissa", "goat", "molora", "base"]) == 0
    out = last_json(capsys)
    assert (out["sweep_units"], out["final_units"]) == (2 * 2, 4 * 2 + 1)
    assert cm.main(base + ["--methods", "pissa"]) == 0
    assert last_json(capsys)["sweep_units"] == 2     # pissa has no lora to borrow from
    assert not os.path.exists(tmp_path / "s")        # a dry run writes nothing
    # bad input: an unknown method, a key each unit sets itself
    with pytest.raises(SystemExit) as e:
        cm.main(base + ["--methods", "lorax"])
    assert e.value.code == 2
    assert cm.main(base[:-1] + ["--set", "optim.lr=1"]) == 2
    # the expert grid: a cross product plus explicit E:k:ep points, repeats once, one lr = no sweep
    grid = base[:5] + ["1e-3", "--seeds", "0", "--study-dir", str(tmp_path / "s"), "--dry-run",
                       "--methods", "--expert-grid", "2", "4", "--top-k", "1", "2",
                       "--expert-points", "4:2:2", "4:2:1", "2:4:1"]
    assert cm.main(grid) == 0
    got = capsys.readouterr()
    out = json.loads(got.out.strip().splitlines()[-1])
    assert (out["sweep_units"], out["final_units"]) == (0, 5)     # 2:4:1 is skipped (k > E)
    planned = [ln.split()[1] for ln in got.err.splitlines() if ln.startswith("final")]
    assert planned == [f"goat_E{E}_k{k}_ep{ep}_lr0.001_s0"
                       for E, k, ep in ((2, 1, 1), (2, 2, 1), (4, 1, 1), (4, 2, 1), (4, 2, 2))]
    with pytest.raises(SystemExit) as e:
        cm.main(grid[:-3] + ["8:2"])
    assert e.value.code == 2
    # results.md says which kind of study it is
    assert cm.study_title(cm.parse_args(grid)) == "Expert-count study"
    assert cm.study_title(cm.parse_args(grid + ["--methods", "lora"])) == (
        "Method comparison and expert-count study")
    assert cm.study_title(cm.parse_args(base)) == "Method comparison"


def test_interrupted_study_resumes_and_skips_finished(tmp_path, cm, capsys, tiny_folder,
                                                     monkeypatch):
    """First invocation: training ends at step 2 of 4 with a checkpoint (as a job hitting its
    time limit), the base model is evaluated. Second: the run resumes at step 2, finishes, is
    evaluated; the base evaluation is not redone. Third: nothing runs."""
    cfg = tiny_config(str(tmp_path / "run.yaml"), str(tmp_path / "unused"),
                      model={"preset": None, "name_or_path": tiny_folder},
                      train={"max_steps": 4, "save_every": 2, "eval_every": 0})
    d = str(tmp_path / "study")
    argv = ["--config", cfg, "--ds-config", "none", "--procs", "1", "--methods", "lora", "base",
            "--seeds", "0", "--test-tasks", "cs_std_boolq", "cs_std_arc_easy", "--limit", "4",
            "--eval-dtype", "float32", "--eval-batch-size", "4", "--study-dir", d]
    assert cm.main(argv + ["--stop-after-steps", "2"]) == 1
    out = last_json(capsys)
    assert (out["stopped"], out["failed"], out["finished"]) == (1, 0, 1)
    run = os.path.join(d, "runs", "lora_lr0.005_s0")
    summary = json.load(open(os.path.join(run, "train", "summary.json")))
    assert summary["finished"] is False and summary["global_step"] == 2
    assert not os.path.exists(os.path.join(run, "eval_test"))
    base_eval = os.path.join(d, "runs", "base", "eval_test", "eval_results.json")
    mtime = os.stat(base_eval).st_mtime_ns

    assert cm.main(argv) == 0
    out = last_json(capsys)
    assert (out["stopped"], out["failed"], out["finished"]) == (0, 0, 2)
    summary = json.load(open(os.path.join(run, "train", "summary.json")))
    assert summary["finished"] is True and summary["global_step"] == 4
    assert summary["resumed_from"] and summary["resumed_from"].rstrip("/").endswith("2")
    assert os.stat(base_eval).st_mtime_ns == mtime
    unit = json.load(open(os.path.join(run, "unit.json")))
    assert unit["train"]["attempts"] == 2 and unit["eval"]["test"]["status"] == "ok"
    results = os.path.join(run, "eval_test", "eval_results.json")
    mtimes = (os.stat(results).st_mtime_ns, os.stat(base_eval).st_mtime_ns)
    # what a user commits: a rerun with nothing to do must leave every byte of it as it was
    committed = [os.path.join(d, f) for f in ("study.json", "results.csv", "results.md",
                                              "loss_curves.png", "accuracy.png")]
    committed += [os.path.join(d, "runs", u, "unit.json") for u in ("lora_lr0.005_s0", "base")]
    before = {}
    for f in committed:
        with open(f, "rb") as fh:
            before[f] = fh.read()

    # the clock reads 2100 for the rerun: any time stamp written now would differ
    real_strftime = time.strftime
    with monkeypatch.context() as m:                 # (cm's environment stays patched)
        m.setattr(time, "strftime",
                  lambda fmt, t=None: real_strftime(fmt, time.gmtime(4102444800)))
        assert cm.main(argv) == 0                    # everything finished: nothing reruns
    assert last_json(capsys)["finished"] == 2
    assert (os.stat(results).st_mtime_ns, os.stat(base_eval).st_mtime_ns) == mtimes
    for f in committed:
        with open(f, "rb") as fh:
            assert fh.read() == before[f], f"{f} changed on a rerun that ran nothing"
    with open(os.path.join(d, "results.md")) as f:
        md = f.read()
    assert "| lora | 0.005 | 1 |" in md and "| base |" in md
    assert "; the first 4 records of each task; updated " in md     # --limit 4: say so
    # each unit's precision, read from what ran (train.bf16 pinned off, --eval-dtype float32):
    # a study resumed on another machine type can mix them
    units = {l.split(" | ")[0][2:]: l for l in md.splitlines() if l.startswith("| lora_lr") or
             l.startswith("| base |")}
    assert " | fp32/fp32 | " in units["lora_lr0.005_s0"] and " | -/fp32 | " in units["base"]
    from goat_dist.study.report import compute_hours
    hours = compute_hours(os.path.join(d, "runs"))
    base_unit = json.load(open(os.path.join(d, "runs", "base", "unit.json")))
    assert hours["units"] == 2 and hours["train"] * 3600 == pytest.approx(unit["train"]["run_time_s"])
    assert hours["eval"] * 3600 == pytest.approx(unit["eval"]["test"]["run_time_s"]
                                                 + base_unit["eval"]["test"]["run_time_s"])
    assert f"Compute so far: {hours['total']:.1f} h wall-clock over 2 units" in md
    rows = open(os.path.join(d, "results.csv")).read()
    assert "cs_std_boolq" in rows and "cs_std_arc_easy_stderr" in rows
    for png in ("loss_curves.png", "accuracy.png"):
        with open(os.path.join(d, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # the folder as a fresh clone of a committed study holds it (results/.gitignore): no
    # checkpoints, no adapter export. Its evaluation is done, so nothing reruns ...
    import shutil
    train = os.path.join(run, "train")
    for heavy in ("checkpoints", "adapter"):
        shutil.rmtree(os.path.join(train, heavy))
    assert cm.main(argv) == 0
    assert os.stat(results).st_mtime_ns == mtimes[0]
    assert not os.path.exists(os.path.join(train, "adapter"))
    # ... but an evaluation still to do needs the adapter: the unit trains again, from scratch
    shutil.rmtree(os.path.join(run, "eval_test"))
    assert cm.main(argv) == 0
    summary = json.load(open(os.path.join(train, "summary.json")))
    assert summary["finished"] is True and summary["resumed_from"] is None
    unit = json.load(open(os.path.join(run, "unit.json")))
    assert unit["train"]["attempts"] == 1 and unit["eval"]["test"]["status"] == "ok"
    assert os.path.isfile(os.path.join(train, "adapter", "adapter_model.safetensors"))

    # other settings in the same folder are refused: rows would not be comparable
    assert cm.main([a if a != "4" else "3" for a in argv]) == 2


def test_commands_name_no_path_of_this_machine(cm):
    """A study folder inside the repository (results/...) gets commands that run from the
    repository root with repository-relative paths, so what the trainer and evaluator record in
    it (unit.json's commands, summary.json's output_dir, eval_results.json's adapter) holds no
    path of this machine; a folder outside the repository keeps absolute paths."""
    import sys

    args = cm.parse_args(["--config", os.path.join(cm.ROOT, "configs", "smollm2_std.yaml"),
                          "--methods", "goat", "--eval-procs", "2"])
    args.config, args.ds_config = os.path.abspath(args.config), os.path.abspath(args.ds_config)
    args.model = os.path.join(cm.ROOT, "models", "SmolLM2-135M-Instruct")
    args.test_data_dir, args.val_data_dir = None, os.path.join(cm.ROOT, "results", "s", "val")
    unit = cm.Unit(cm.variants_of(args)[0], 2e-4, 0, "final", "test")
    inside = os.path.join(cm.ROOT, "results", "s", "runs", unit.run_id)
    cmds = cm.train_cmd(args, unit, inside) + cm.eval_cmd(args, unit, inside)
    assert not [a for a in cmds if cm.ROOT in a], cmds
    assert "results/s/runs/goat_lr0.0002_s0/train" in cmds
    assert "configs/smollm2_std.yaml" in cmds and "launch/evaluate.py" in cmds
    if sys.executable.startswith(cm.ROOT + os.sep):     # the repository's .venv (scripts/setup_env.sh)
        assert cmds[0] == os.path.relpath(sys.executable, cm.ROOT)
    outside = os.path.join(os.sep, "elsewhere", "runs", unit.run_id)
    assert os.path.join(outside, "train") in cm.train_cmd(args, unit, outside)


def test_moving_average_is_a_trailing_mean():
    from goat_dist.study.report import moving_average

    assert moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert moving_average([1.0, 2.0, 3.0], 8) == [1.0, 1.5, 2.0]
    assert moving_average([], 3) == []


def test_sigterm_stops_the_running_unit_with_a_checkpoint(tmp_path, cm, tiny_folder):
    """SIGTERM (a batch system's preemption, `kill`, a script's stop: background jobs of a shell
    ignore Ctrl-C's SIGINT) stops the study as Ctrl-C does: the running unit's trainer gets it,
    writes a checkpoint and says so in summary.json, no process of the unit outlives the study,
    the interrupted attempt is recorded in unit.json, and the study exits 130 with the rerun
    hint."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cfg = tiny_config(str(tmp_path / "run.yaml"), str(tmp_path / "unused"),
                      model={"preset": None, "name_or_path": tiny_folder},
                      train={"max_steps": 5000, "save_every": 2, "eval_every": 0})
    d = str(tmp_path / "study")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(cm.ROOT, "scripts", "compare_methods.py"), "--config", cfg,
         "--ds-config", "none", "--procs", "1", "--methods", "lora", "--seeds", "0",
         "--study-dir", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train = os.path.join(d, "runs", "lora_lr0.005_s0", "train")
    unit_procs: list = []
    try:
        # signal once the trainer is in its loop (its first checkpoint exists), not before it
        # has installed its handlers: that is what makes the outcome deterministic. Wait for the
        # pointer, which stays once written, not for a step folder: with save_every=2 and
        # keep_checkpoints=2 the trainer deletes step_00000002 at step 6 (~0.4 s at the ~11
        # steps/s of this tiny model), and a poll that sleeps through that on a loaded machine
        # never sees it: the study then trains all 5000 steps and the test fails.
        pointer = os.path.join(train, "checkpoints", "latest.json")
        deadline = time.monotonic() + 300
        while not os.path.exists(pointer):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:       # the finally below stops its trainer too
                    unit_procs = psutil.Process(proc.pid).children(recursive=True)
                proc.kill()     # before communicate: a running study would block it to the end
                _, err = proc.communicate()
                pytest.fail(f"no checkpoint within 300 s (study exit {proc.returncode}): "
                            f"{err[-2000:]}")
            time.sleep(0.2)
        unit_procs = psutil.Process(proc.pid).children(recursive=True)
        assert unit_procs
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        alive = [p for p in unit_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in [proc] + unit_procs:     # a failure here must not leave a trainer running
            try:
                p.kill()
            except (OSError, psutil.Error):
                pass
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; rerun the same command to continue" in err
    summary = json.load(open(os.path.join(train, "summary.json")))
    assert summary["finished"] is False and summary["stopped_by"], summary
    assert summary["last_checkpoint_step"] == summary["global_step"] >= 2
    assert not alive, alive            # no orphaned trainer
    # the interrupted attempt is on record: a unit's time covers every attempt
    unit = json.load(open(os.path.join(d, "runs", "lora_lr0.005_s0", "unit.json")))
    assert unit["train"]["attempts"] == 1 and unit["train"]["status"] == "stopped"
    assert unit["train"]["run_time_s"] > 0


def test_loss_curve_of_a_run_resumed_without_history_takes_the_earlier_steps_from_tensorboard(
        tmp_path):
    """A unit resumed by a trainer that did not carry its history through checkpoints has only
    the steps since the restart in summary.json; the event files fill in the steps before."""
    from torch.utils.tensorboard import SummaryWriter

    from goat_dist.study.report import train_figures

    train = tmp_path / "train"
    w = SummaryWriter(str(train / "tensorboard"))
    for step, loss in ((4, 4.0), (8, 3.0), (12, 9.0)):     # 12 was redone after the restart
        w.add_scalar("train/loss", loss, step)
    w.close()
    history = [{"step": s, "loss": 2.0} for s in (9, 10, 11, 12)]
    (train / "summary.json").write_text(json.dumps({"history": history, "global_step": 12}))
    curve = train_figures(str(train))["loss_curve"]
    assert curve == [(4, 4.0), (8, 3.0), (9, 2.0), (10, 2.0), (11, 2.0), (12, 2.0)]


def test_ordering_beside_the_paper_ranks_on_the_tasks_both_have():
    from goat_dist.study.paper import paper_average, paper_task
    from goat_dist.study.report import beside_paper

    tasks = ["cs_std_arc_challenge", "cs_std_arc_easy", "cs_std_boolq", "cs_std_obqa",
             "cs_std_piqa", "cs_std_siqa", "cs_std_winogrande"]
    assert paper_task("cs_std_arc_easy") == "arc_easy" and paper_task("cs_arc_challenge") == (
        "arc_challenge")
    assert paper_task("cs_std_hellaswag") == "hellaswag" and paper_task("gsm8k") is None
    # Table 3's own 8-task averages (PiSSA's 73.7875 is printed truncated as 73.78), and the
    # 7-task ones without HellaSwag (hand-computed)
    for method, printed in [("goat", 82.73), ("pissa", 73.78), ("lora", 77.61), ("hydralora", 81.12)]:
        assert paper_average(method) == pytest.approx(printed, abs=0.01)
    assert paper_average("goat", tasks) == pytest.approx(574.72 / 7)
    assert paper_average("molora", tasks) == pytest.approx(568.93 / 7)
    assert paper_average("goat_mini") is None and paper_average("base") is None

    stats = {"goat": {"avg": 0.4608, "std": 0.0, "n": 1}, "lora": {"avg": 0.4698, "std": 0.01, "n": 3},
             "base": {"avg": 0.4089, "std": 0.0, "n": 1}, "molora": {"avg": 0.4646, "std": 0.0, "n": 1}}
    lines = beside_paper(stats, tasks)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # the paper's order over the 7 shared tasks: goat 82.10, molora 81.28, lora 76.76
    assert [r[0] for r in rows] == ["goat", "molora", "lora"]
    assert [r[2] for r in rows] == ["3", "2", "1"]          # ours: lora, molora, goat
    assert [r[4] for r in rows] == ["1", "2", "3"]
    assert rows[2][1] == "46.98 ± 1.00 (3)" and rows[0][3] == "82.10"
    assert rows[1][5] == "80.43"                             # as printed (the mean is 80.44)
    assert beside_paper({"base": stats["base"]}, tasks) == []
    assert beside_paper(stats, ["gsm8k"]) == []             # no task of Table 3: no ranking


def test_compute_hours_counts_a_training_once_however_many_evaluations_reuse_it(tmp_path):
    from goat_dist.study.report import compute_hours

    def unit(name, train_s, **evals_s):
        os.makedirs(tmp_path / name)
        rec = {"train": {"run_time_s": train_s} if train_s is not None else None,
               "eval": {k: {"run_time_s": v} for k, v in evals_s.items()}}
        (tmp_path / name / "unit.json").write_text(json.dumps(rec))

    unit("goat_lr0.0002_s0", 720.0, val=90.0, test=1200.0)   # sweep run reused as seed 0
    unit("base", None, test=960.0)
    os.makedirs(tmp_path / "half_written")                    # no unit.json yet: not counted
    h = compute_hours(str(tmp_path))
    assert h["units"] == 2
    assert h["train"] == pytest.approx(0.2) and h["eval"] == pytest.approx(2250 / 3600)
    assert h["total"] == pytest.approx(2970 / 3600)
    assert compute_hours(str(tmp_path / "missing")) == {"train": 0, "eval": 0, "total": 0, "units": 0}


def test_studies_script_plans_the_three_smollm2_studies(tiny_folder):
    """scripts/smollm2_studies.sh (the commands behind docs/RESULTS.md) stays runnable: every
    study's options parse, its configs and data exist, and the plans have the documented sizes.
    The model is swapped for the tiny folder (extra arguments go to every study)."""
    import subprocess

    from tests.train_helpers import ROOT

    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "smollm2_studies.sh"),
                           "--dry-run", "--model", tiny_folder],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(p["study_dir"].split(os.sep)[-1], p["sweep_units"], p["final_units"]) for p in plans] == [
        ("compare_methods", 8, 22), ("expert_count", 0, 9), ("llm_adapters_form", 0, 3)]
    assert all(p["dry_run"] for p in plans)


def test_significance_notes_judge_by_seeds_and_test_set_and_by_seeds_alone():
    from scipy import stats as scipy_stats

    from goat_dist.study.report import significance_notes

    # a gap far beyond the seed spread (std 0.1 points) but inside the test-set noise (SE 0.48)
    stats = {"goat": {"avg": 0.4608, "std": 0.001, "se": 0.0048, "n": 3},
             "lora": {"avg": 0.4698, "std": 0.001, "se": 0.0048, "n": 3},
             "base": {"avg": 0.4089, "std": 0.0, "se": 0.0047, "n": 1}}
    notes = significance_notes(stats, "goat")
    lora = next(n for n in notes if "goat - lora" in n)
    assert "-0.90 points (2 SE = 1.36): within noise" in lora
    p = scipy_stats.ttest_ind([0.4598, 0.4608, 0.4618], [0.4688, 0.4698, 0.4708]).pvalue
    assert f"seeds only (3 vs 3): Welch p = {p:.3f}" in lora and p < 0.001
    base = next(n for n in notes if "goat - base" in n)
    assert "+5.19 points" in base and base.endswith(": significant")    # one seed: no t-test
    assert "paired" not in lora                                          # no by_seed given
    assert significance_notes(stats, "goat_mini") == []


def test_paired_by_seed_removes_the_luck_that_runs_sharing_a_seed_share():
    from scipy import stats as scipy_stats

    from goat_dist.study.report import method_table, significance_notes

    # seed 2 lifts both methods by ~0.9 points (same sampler order and dropout masks): Welch
    # counts that as noise, the paired test sees a steady 0.9-point gap
    goat = {0: 0.4608, 1: 0.4624, 2: 0.4710}
    lora = {0: 0.4698, 1: 0.4712, 2: 0.4800, 3: 0.4700}     # seed 3: no partner, left out
    rows = [{"phase": "final", "variant": v, "eval": "test", "eval_status": "done", "seed": s,
             "lr": 2e-4, "avg": a, "avg_stderr": 0.0048, "train_time_s": 600.0}
            for v, by in (("goat", goat), ("lora", lora)) for s, a in by.items()]
    _, stats = method_table(rows, ("final",), "test", [], "acc")
    assert stats["goat"]["by_seed"] == goat and stats["lora"]["by_seed"] == lora
    line = significance_notes(stats, "goat")[0]
    welch = scipy_stats.ttest_ind(list(goat.values()), list(lora.values()), equal_var=False).pvalue
    paired = scipy_stats.ttest_rel([goat[s] for s in range(3)], [lora[s] for s in range(3)]).pvalue
    assert f"Welch p = {welch:.3f}" in line and welch > 0.1
    assert f"paired by seed (3 shared, gap -0.89 ± 0.01): p = {paired:.3f}" in line
    assert paired < 0.001

    # one shared seed: no paired test; identical gaps on every seed: p = 0, not nan
    one = {"goat": dict(stats["goat"], by_seed={0: 0.46}),
           "lora": dict(stats["lora"], by_seed={0: 0.47, 1: 0.47})}
    assert "paired" not in significance_notes(one, "goat")[0]
    same = {"goat": dict(stats["goat"], by_seed={0: 0.46, 1: 0.47}),
            "lora": dict(stats["lora"], by_seed={0: 0.47, 1: 0.48})}
    assert significance_notes(same, "goat")[0].endswith("): p = 0.000")
