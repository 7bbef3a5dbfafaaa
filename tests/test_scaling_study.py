"""scripts/scaling_study.py end to end on one process (ZeRO-0, tiny-llama, 2 steps per point):
the planned grid and its skip reasons, the outputs of a real sweep, resuming, and a failing point.

Only ep_size 1 runs here: expert parallelism is not in the trainer yet.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from tests.train_helpers import load_script, set_subprocess_env, tiny_config

pytestmark = pytest.mark.slow

# tiny-llama: hidden 64, 4 heads / 2 kv heads -> k_proj, v_proj are 64 -> 32, so q_min = 32
Q_MIN = 32


@pytest.fixture
def study(monkeypatch):
    set_subprocess_env(monkeypatch)
    return load_script("scaling_study")


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_rows(path: str) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["point_id"]: row for row in csv.DictReader(f)}


def test_plan_derived_values_and_skip_reasons(tmp_path, study, capsys):
    """Dry run: r_e, s = alpha/r_e, init_cof = 1/E, L = 32//E in both rank modes; every kind of
    invalid point carries its reason; nothing is written."""
    cfg = tiny_config(str(tmp_path / "run.yaml"), str(tmp_path / "unused"))
    d = str(tmp_path / "study")
    base = ["--config", cfg, "--procs", "1", "--ds-config", "none", "--study-dir", d, "--dry-run"]
    assert study.main(base + ["--experts", "1", "2", "8", "16", "--top-k", "2",
                              "--ep-size", "1", "2", "--rank", "8"]) == 0
    got = {p["point_id"]: p for p in last_json(capsys)["planned"]}
    assert not os.path.exists(d)
    ok = got["E8_k2_ep1_r8"]
    assert ok["status"] == "planned" and ok["reason"] == ""
    assert (ok["r_e"], ok["s"], ok["init_cof"], ok["q_min"], ok["L"]) == (1, 16.0, 0.125, Q_MIN, 4)
    assert ok["L_layer"].endswith(("k_proj", "v_proj"))
    assert "top_k=2 > E=1" in got["E1_k2_ep1_r8"]["reason"]
    assert "E=16 does not divide r=8" in got["E16_k2_ep1_r8"]["reason"]
    assert "does not divide the process count 1" in got["E2_k2_ep2_r8"]["reason"]

    assert study.main(base + ["--experts", "2", "4", "8", "--top-k", "2",
                              "--rank-mode", "per-expert", "--rank", "4"]) == 0
    got = {p["point_id"]: p for p in last_json(capsys)["planned"]}
    assert set(got) == {"E2_k2_ep1_r8", "E4_k2_ep1_r16", "E8_k2_ep1_r32"}   # r = E * r_e
    assert (got["E4_k2_ep1_r16"]["r_e"], got["E4_k2_ep1_r16"]["s"]) == (4, 4.0)
    assert got["E4_k2_ep1_r16"]["status"] == "planned"
    # E=8: L = 32 // 8 = 4 = r_e still fits; r_e=8 would not
    assert got["E8_k2_ep1_r32"]["status"] == "planned"
    assert study.main(base + ["--experts", "8", "--top-k", "2", "--rank-mode", "per-expert",
                              "--rank", "8"]) == 0
    (p,) = last_json(capsys)["planned"]
    assert p["status"] == "invalid" and "chunk too short: L = 32//8 = 4 < r_e = 8" in p["reason"]


def test_sweep_outputs_and_resume(tmp_path, study, capsys):
    """Two runnable points + one invalid: CSV / Markdown / plots with the derived and measured
    values; a rerun skips the finished point (summary.json untouched) and reruns the point whose
    summary.json was removed (checkpoints left behind, as after a crash)."""
    cfg = tiny_config(str(tmp_path / "run.yaml"), str(tmp_path / "unused"))
    d = str(tmp_path / "study")
    argv = ["--config", cfg, "--procs", "1", "--ds-config", "none", "--experts", "2", "4", "16",
            "--top-k", "2", "--ep-size", "1", "--rank", "8", "--max-steps", "2",
            "--study-dir", d]
    assert study.main(argv) == 0
    out = last_json(capsys)
    assert (out["points"], out["run"], out["ok"], out["failed"], out["skipped_invalid"]) == \
        (3, 2, 2, 0, 1)
    for path in [out["results_csv"], out["results_md"]] + out["plots"]:
        assert os.path.isfile(path) and os.path.getsize(path) > 0, path
    assert {os.path.basename(p) for p in out["plots"]} == \
        {"tokens_per_s_vs_E.png", "loss_vs_E.png", "load_cv_vs_E.png"}
    for p in out["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    rows = read_rows(out["results_csv"])
    with open(out["results_csv"], newline="") as f:
        assert next(csv.reader(f)) == study.CSV_COLUMNS
    for pid, E, r_e in (("E2_k2_ep1_r8", 2, 4), ("E4_k2_ep1_r8", 4, 2)):
        row = rows[pid]
        assert row["status"] == "ok", row
        assert (int(row["E"]), int(row["r"]), int(row["r_e"])) == (E, 8, r_e)
        assert float(row["s"]) == pytest.approx(16 / r_e)       # lora scaling alpha / r_e
        assert float(row["init_cof"]) == pytest.approx(1 / E)
        assert (int(row["q_min"]), int(row["L"])) == (Q_MIN, Q_MIN // E)
        assert int(row["steps"]) == 2 and int(row["world_size"]) == 1
        for key in ("tokens_per_s", "peak_rss_mb_max", "wall_time_s", "run_time_s"):
            assert float(row[key]) > 0, key
        assert int(row["tokens_per_s_windows"]) == 1     # 2 log windows, the first left out
        per_rank = [float(x) for x in row["peak_rss_mb_per_rank"].split(";")]
        assert len(per_rank) == 1 and 50 < per_rank[0] <= float(row["peak_rss_mb_max"])
        for key in ("final_train_loss", "eval_loss", "eval_accuracy", "load_cv", "max_load"):
            assert math.isfinite(float(row[key])), key
    # top_k = 2 = E routes every token to both experts: perfectly balanced
    assert float(rows["E2_k2_ep1_r8"]["load_cv"]) == pytest.approx(0, abs=1e-6)
    assert float(rows["E4_k2_ep1_r8"]["max_load"]) >= 1.0
    assert rows["E16_k2_ep1_r8"]["status"] == "invalid"
    assert "does not divide" in rows["E16_k2_ep1_r8"]["reason"]
    with open(out["results_md"]) as f:
        md = f.read()
    assert "| E | k | ep | r | r_e | s | init_cof | L | status |" in md
    assert md.count("| ok |") == 2 and md.count("| invalid |") == 1

    kept = os.path.join(d, "E2_k2_ep1_r8", "summary.json")
    redo = os.path.join(d, "E4_k2_ep1_r8", "summary.json")
    mtime = os.stat(kept).st_mtime_ns
    os.remove(redo)
    assert study.main(argv) == 0
    out = last_json(capsys)
    assert (out["run"], out["ok"], out["skipped_finished"], out["skipped_invalid"]) == (1, 1, 1, 1)
    assert os.stat(kept).st_mtime_ns == mtime
    assert os.path.isfile(redo)
    rows = read_rows(out["results_csv"])
    assert rows["E2_k2_ep1_r8"]["status"] == "done"
    assert float(rows["E2_k2_ep1_r8"]["peak_rss_mb_max"]) > 0    # kept from the first run
    assert rows["E4_k2_ep1_r8"]["status"] == "ok"

    # other settings in the same folder are refused: rows would not be comparable
    assert study.main(argv[:-2] + ["--max-steps", "3"] + argv[-2:]) == 2


def test_failing_point_is_recorded(tmp_path, study, capsys):
    """A point whose run fails is reported (status failed, the trainer's error line) and the
    sweep goes on and exits 1."""
    cfg = tiny_config(str(tmp_path / "run.yaml"), str(tmp_path / "unused"))
    d = str(tmp_path / "study")
    rc = study.main(["--config", cfg, "--procs", "1", "--ds-config", "none", "--experts", "2",
                     "--top-k", "1", "2", "--rank", "8", "--max-steps", "1", "--study-dir", d,
                     "--set", f"data.train_file={tmp_path / 'missing.json'}"])
    out = last_json(capsys)
    assert rc == 1 and out["failed"] == 2 and out["run"] == 2
    assert out["failed_points"] == ["E2_k1_ep1_r8", "E2_k2_ep1_r8"]
    row = read_rows(out["results_csv"])["E2_k1_ep1_r8"]
    assert row["status"] == "failed" and row["returncode"] == "2"
    assert "goat_dist: error:" in row["reason"] and "missing.json" in row["reason"]
    assert row["stderr_tail"]


def test_error_summary_names_the_root_cause(study):
    """The reason line is the dying rank's error, not its peer's 'connection closed' or
    torchrun's ChildFailedError wrapper."""
    gloo = ("terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
            "  what():  [enforce fail at pair.cc:456] op.preamble.length <= op.nbytes. "
            "82432 vs 0.\n"
            "[rank0]: RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1\n"
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    reason, tail = study.error_summary(gloo)
    assert reason.startswith("what():") and "82432 vs 0" in reason
    assert tail.endswith("ChildFailedError:")
    chained = ("train: 50%|#####     | 1/2 [00:01<00:01]\r"
               "[rank1]: Traceback (most recent call last):\n"
               "[rank1]: KeyError: 'x'\n[rank1]: During handling of the above exception\n"
               "[rank1]: RuntimeError: later\n"
               "[rank0]: RuntimeError: Connection reset by peer\n")
    assert study.error_summary(chained)[0] == "KeyError: 'x'"
    assert "%|" not in study.error_summary(chained)[1]
    assert study.error_summary("x\ngoat_dist: error: bad data\ny\n")[0] == \
        "goat_dist: error: bad data"
