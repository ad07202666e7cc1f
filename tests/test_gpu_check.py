"""`make gpu-check` (bench/gpu_check.sh) runs only where a GPU is lent, for a few minutes at a
time, so what can break it is checked here: the script parses, refuses a machine without a
GPU in one clear line, its summary reads both test phases' JUnit reports, and its host
profile of the eager workloads (bench/profile_host.py) runs -- here on the CPU."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    fake_python = tmp_path / "python"  # a Python whose torch sees no GPU, whatever this machine has
    fake_python.write_text("#!/bin/sh\nexit 1\n")
    fake_python.chmod(0o755)
    done = subprocess.run(["bash", str(SCRIPT), str(fake_python)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "torch sees no CUDA device here" in done.stderr


def test_a_failed_build_skips_the_rest_and_shows_why(tmp_path):
    """A build that fails (as the first GPU run's did) ends the check at once, with the build log's
    end on the screen, instead of spending GPU minutes timing the fallbacks."""
    fake_python = tmp_path / "python"  # sees a GPU, cannot build, and is this Python for the summary
    fake_python.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *"torch.cuda.is_available() else 1"*) exit 0 ;;\n'
        '  *"-m pip install"*) echo "ERROR: No matching distribution found for setuptools"; exit 1 ;;\n'
        "esac\n"
        f'exec "{sys.executable}" "$@"\n')
    fake_python.chmod(0o755)
    (tmp_path / "bench").symlink_to(ROOT / "bench")
    done = subprocess.run(["bash", str(SCRIPT), str(fake_python)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the build failed: tests, benchmarks and the profile are skipped" in done.stdout
    assert "No matching distribution found for setuptools" in done.stdout
    assert "== tests-gpu" not in done.stdout and "skipped: the build failed" in done.stdout


def test_the_summary_reports_each_test_phase(tmp_path):
    for phase, outcome in (("tests-gpu", '<failure message="boom"/>'), ("tests-rest", "")):
        (tmp_path / f"{phase}.xml").write_text(
            f'<testsuites><testsuite><testcase classname="tests.test_x" name="test_{phase}">{outcome}</testcase>'
            '<testcase classname="tests.test_x" name="test_ok"/></testsuite></testsuites>')
    (tmp_path / "phases.tsv").write_text("tests-gpu\tok\t12\ntests-rest\tstopped at 50 s budget\t50\n")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(tmp_path / "none.json"), "--summary",
                           "--device", "cuda", "--junit", str(tmp_path / "tests-gpu.xml"),
                           "--junit", str(tmp_path / "tests-rest.xml"), "--phases", str(tmp_path / "phases.tsv")],
                          capture_output=True, text=True, check=True, timeout=60)
    assert "tests-gpu: 1 passed, 1 failed" in done.stdout
    assert "FAILED tests.test_x::test_tests-gpu" in done.stdout
    assert "tests-rest: 2 passed, 0 failed" in done.stdout
    assert "stopped at 50 s budget" in done.stdout
    assert "SN refresh, whole SNDCGAN D <= 25 µs" in done.stdout  # the GPU targets, unmeasured here


def test_the_host_profile_reports_each_workload(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import profile_host
    import timing

    for setting in ("QUICK", "DEVICE"):  # main() configures the benchmarks' settings; restored after the test
        monkeypatch.setattr(timing, setting, getattr(timing, setting))

    report = tmp_path / "profile.md"
    assert profile_host.main(["--device", "cpu", "--workloads", "sn", "--calls", "2", "--top", "3",
                              "--out", str(report)]) == 0
    text = report.read_text()
    assert "### SN refresh, SNDCGAN D: torch parametrizations.spectral_norm" in text
    assert "### SN refresh, SNDCGAN D: fastgan multi-layer op (one launch) [cpp]" in text
    assert text.count("kernel launches per call (2 calls)") == 2 and "Self CPU" in text


def test_results_name_the_commit_and_say_when_the_files_differ_from_it(tmp_path, monkeypatch):
    """A GPU machine gets a copy of the working tree whose .git may be older than its files: the
    results then say "+changes" instead of naming a commit whose code did not run."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import timing

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "old.md").write_text("figures\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = git("rev-parse", "--short", "HEAD").strip()
    assert timing.source_commit(str(tmp_path)) == head
    (tmp_path / "bench" / "results" / "old.md").write_text("new figures\n")  # results being rewritten
    assert timing.source_commit(str(tmp_path)) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert timing.source_commit(str(tmp_path)) == head + "+changes"


def bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_the_summary_names_the_fastest_triton_launch_config():
    """The benchmark times the Triton SN kernels' launch configurations; the summary says
    which was fastest against the default (what the next choice of GPU rests on)."""
    report = bench_module("report")
    rows = [dict(variant="triton block_m 16 (default)", median_us=60.0, baseline=True),
            dict(variant="triton block_m 8", median_us=41.5, baseline=False)]
    text = report.summary({"spectral_norm": {"spectral_norm: triton launch configs (graph replay)": rows}}, "cuda",
                          [], None, None, [])
    assert "triton SN launch config: default 60.0 µs; fastest 41.5 µs (block_m 8)" in text


def test_the_summary_names_the_fastest_training_option():
    """The training benchmark times the speed options beside the targets' entries; the summary
    names the fastest against plain PyTorch, and the targets still read only their own entries."""
    report = bench_module("report")
    rows = [dict(variant="plain PyTorch", median_us=100.0, baseline=True),
            dict(variant="fastgan cuda graphs", median_us=80.0, baseline=False),
            dict(variant="fastgan graphs + amp", median_us=40.0, baseline=False),
            dict(variant="fastgan graphs, tf32 off (fastgan train's default)", median_us=120.0, baseline=False),
            dict(variant="plain PyTorch, graphed by GraphedStep", median_us=90.0, baseline=False)]
    groups = {"training": {"training: resnet_cifar wgan-gp, batch 64, n_disc 5": rows}}
    text = report.summary(groups, "cuda", [], None, None, [])
    assert ("resnet_cifar wgan-gp, batch 64, n_disc 5: fastest option 2.50× (fastgan graphs + amp); "
            "graphs with torch's numerics 1.25×; plain PyTorch graphed by GraphedStep 1.11×") in text
    assert re.search(r"MISSED resnet_cifar wgan-gp, batch 64, n_disc 5: graphs >= 3x plain\s+1.25×", text)


def test_the_summary_separates_the_graphs_share_of_the_d_step():
    """Beside the D-step target (like against like: tests/test_bench_report.py), the summary gives
    the eager fastgan figure and the plain penalty graphed, so the graph's share shows."""
    report = bench_module("report")
    rows = [dict(variant="plain autograd", median_us=120.0, baseline=True),
            dict(variant="fastgan [cuda]", median_us=125.0, baseline=False),
            dict(variant="plain autograd, graphed", median_us=80.0, baseline=False),
            dict(variant="fastgan [cuda], graphed", median_us=75.0, baseline=False)]
    text = report.summary({"gradient_penalty": {"gradient_penalty: wgan-gp D step": rows}}, "cuda", [], None, None, [])
    assert "wgan-gp D step: fastgan eager 0.96× (fastgan [cuda]); plain autograd graphed by GraphedStep 1.50×" in text
