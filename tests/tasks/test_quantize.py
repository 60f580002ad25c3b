"""The quantize stage runs quantizers in a child process, so nothing they leave behind (GPTQModel's
worker threads) slows the evaluation that runs next in the flow's process."""
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# In a fresh interpreter: Python threads after importing GPTQModel (the stage imports it to check the
# method; the import starts 4), after the stage quantized, and after quantizing once more in this
# process directly (GPTQModel's device-pool workers, 'DPWorker-*', stay). Python threads, not OS
# threads: reading the parquet split starts pyarrow's native pool, which is harmless.
SCRIPT = """
import sys, threading
from pathlib import Path
import gptqmodel  # noqa: F401
from models.config import QuantConfig
from models.quant import quantize_model
from tasks.etl import DatasetVersion
from tasks.quantize import quantize_candidates
def threads():
    return threading.active_count()
ft, ds, home = map(Path, sys.argv[1:])
cfg = QuantConfig(methods=["gptq-int4"], group_size=16, calibration_rows=4)
counts = [threads()]
out = quantize_candidates(ft, DatasetVersion("ds", ds), cfg, home, "cpu")
counts.append(threads())
quantize_model("gptq-int4", ft / "merged", home / "in-process", ["Bob from Oslo ordered 3 cups."] * 4, cfg)
counts.append(threads())
print("COUNTS", *counts, out["gptq-int4"])
"""


def test_gptq_quantizes_in_a_child_process_and_leaves_no_threads_behind(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "ft" / "merged")
    rows = [{"prompt": f"Bob from Oslo ordered {i} cups.", "completion": f'{{"qty": {i}}}'} for i in range(8)]
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "train.parquet")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ft"), str(tmp_path / "ds"), str(tmp_path / "home")],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("COUNTS"))
    imported, after_stage, after_in_process, artifact = line.split()[1:]
    assert int(after_stage) <= int(imported)  # the stage's quantizer took its threads with it
    assert int(after_in_process) > int(after_stage)  # what it avoids: GPTQModel in this process leaves threads
    assert (Path(artifact) / "model.safetensors").exists() or list(Path(artifact).glob("*.safetensors"))
