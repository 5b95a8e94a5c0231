"""experiments/smoke_accelerator.py runs on CPU with tiny settings and writes its JSON."""

import json
import os
import subprocess
import sys

import qdr_jax

ROOT = os.path.dirname(os.path.dirname(qdr_jax.__file__))


def test_smoke_run_on_cpu_checks_codes_and_times_the_step(tiny_encoder_dir, tmp_path):
  out = tmp_path / "smoke.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # this checkout's qdr_jax
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "smoke_accelerator.py"),
       f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:steps=5,mode=dback",
       f"--config.model.query_encoder={tiny_encoder_dir}", "--config.index.factory=IVF4,PQ4x8",
       "--config.negatives.k=4", "--config.train.batch_size=4",
       "--config.model.max_query_length=16", "--rows=600", "--steps=1", f"--out={out}"],
      env=env, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=900)
  result = json.loads(out.read_text())
  assert result["ok"] and result["backend"] == "cpu" and result["device_kind"] == "cpu"
  assert result["codes"]["codes_equal"] == 1.0 and result["codes"]["lists_equal"] == 1.0
  assert result["cpu_model"] and result["step_s"]["median"] > 0
  assert len(result["losses"]) == 2 and result["index"] == "IVF4,PQ4x8"
