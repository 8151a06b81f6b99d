"""The GPU diagnostics in bench/ (profile_ntk_gpu.py, profile_psg_gpu.py, profile_host_gpu.py) run on a lent GPU only a few
minutes per session, so a script that breaks against the library costs that session its numbers (a
probe with a stale signature did once). Their --quick modes run here on CPU, tiny, end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def test_profile_ntk_gpu_quick(tmp_path):
    out = tmp_path / "profile.txt"
    stdout = _run(["bench/profile_ntk_gpu.py", "--quick", "--n", "16", "--t", "32", "--tiles", "8",
                   "--profile-n", "4", "--profile-tile", "4", "--phases-n", "16", "--phases-tile", "8",
                   "--out", str(out)], tmp_path)
    text = out.read_text()
    assert "empirical_ntk sample_tile=8" in text and "== phases of empirical_ntk" in text
    assert "backward[1]" in text  # the per-output backward probe saw both outputs' passes
    assert "== profile of empirical_ntk" in stdout


def test_profile_psg_gpu_quick(tmp_path):
    out = tmp_path / "psg.txt"
    _run(["bench/profile_psg_gpu.py", "--quick", "--out", str(out)], tmp_path)
    text = out.read_text()
    for row in ("build: torch.bmm", "gram of F: triton sym, auto split", "psg_gram sgd: triton, bf16 tiles",
                "psg_gram sgd: Triton features kernel"):
        line = next((ln for ln in text.splitlines() if ln.startswith(row)), None)
        assert line is not None and "ERROR" not in line, (row, text)
    meta = json.loads(out.with_suffix(".json").read_text())  # rows carry what harness rows carry
    assert {"git_commit", "date", "hardware", "versions"} <= set(meta), sorted(meta)


def test_profile_host_gpu_quick(tmp_path):
    out = tmp_path / "host.txt"
    _run(["bench/profile_host_gpu.py", "--quick", "--calls", "3", "--out", str(out)], tmp_path)
    text = out.read_text()
    for row in ("gram N=16 P=4096: torch a@a.T", "gram N=16 P=4096: linft reference",
                "psg sgd N=8 T=16 d=32: einsum materialize", "psg sgd N=8 T=16 d=32: linft reference bf16 tiles"):
        line = next((ln for ln in text.splitlines() if ln.startswith(row)), None)
        assert line is not None and "ERROR" not in line, (row, text)
    assert "cProfile over 3 calls" in text  # the linft ops' host profiles
    meta = json.loads(out.with_suffix(".json").read_text())
    assert {"git_commit", "date", "hardware", "versions"} <= set(meta), sorted(meta)
    assert all(r["issue_ms"] > 0 and r["sync_ms"] >= r["issue_ms"] for r in meta["rows"])


def test_harness_llama_preset_quick(tmp_path):
    """The llama-1b preset (gpu_run.sh's llama stages) with --llama-methods: only those methods run."""
    out = tmp_path / "llama.json"
    _run(["bench/harness.py", "--suite", "ntk", "--ntk-preset", "llama-1b", "--quick", "--ntk-n", "8",
          "--ntk-t", "16", "--llama-methods", "linft,fwdbwd", "--out", str(out)], tmp_path)
    rows = [r for r in json.loads(out.read_text()) if r.get("suite") == "ntk"]
    assert sorted(r["method"] for r in rows) == ["fwdbwd", "linft"]
    assert all(r["median_s"] and not r["errors"] for r in rows)
    (lin,) = [r for r in rows if r["method"] == "linft"]
    assert "new_autotune_keys" in lin["info"]  # one-time tuning inside the timed call is visible
    assert len(lin["again_s"]) == 1 and lin["ntk_cost_ratio_again"] > 0  # and a second call's time
    # linft alone (gpu_run.sh's llamab stage): no baseline in the file, the second call's time still is
    _run(["bench/harness.py", "--suite", "ntk", "--ntk-preset", "llama-1b", "--quick", "--ntk-n", "8",
          "--ntk-t", "16", "--llama-methods", "linft", "--out", str(out)], tmp_path)
    (lin,) = [r for r in json.loads(out.read_text()) if r.get("suite") == "ntk"]
    assert len(lin["again_s"]) == 1 and "ntk_cost_ratio_again" not in lin
