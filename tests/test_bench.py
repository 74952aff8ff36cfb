"""bench/pipelines.py runs (tiny sizes): a benchmark that cannot start is a benchmark nobody reruns.
It measures nothing here; its figures live in docs/benchmarks.md."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "pipelines.py"


def test_the_benchmark_runs_and_prints_its_table(data_dir, capsys):
    spec = importlib.util.spec_from_file_location("pipelines", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--data-dir", str(data_dir), "--device", "cpu", "--train-images", "64", "--test-images", "32",
                       "--batch-size", "32", "--width", "4", "--workers", "0", "--epochs", "1", "--aug-passes", "1",
                       "--accuracy-epochs", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| standard  |" in out and "| s11lib    |" in out and "| ratio     |" in out
    assert "standard: test accuracy after 1 epochs" in out and "s11lib: test accuracy after 1 epochs" in out
