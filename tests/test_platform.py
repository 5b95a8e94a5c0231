"""Backend decisions and process-wide tuning (`qdr_jax.platform`): importing sets
nothing; `tune_process` sets the CPU settings on a CPU process only."""

import os
import subprocess
import sys
import textwrap

import pytest

from qdr_jax import platform

_TUNED = ("OMP_WAIT_POLICY", "XLA_FLAGS", "QDR_JAX_RETAIN_HEAP", "JAX_PLATFORMS")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in _TUNED}
  env.update(extra)
  return env


def _run(code: str, **extra) -> str:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_clean_env(**extra),
                        capture_output=True, text=True, timeout=300, check=True).stdout.strip()


def test_importing_every_module_sets_nothing_process_wide():
  out = _run("""
      import os, pkgutil, importlib, qdr_jax
      for m in pkgutil.walk_packages(qdr_jax.__path__, 'qdr_jax.'):
        importlib.import_module(m.name)
      from qdr_jax import host_memory
      print(os.environ.get('XLA_FLAGS'), os.environ.get('OMP_WAIT_POLICY'), host_memory.applied)
      """)
  assert out.splitlines()[-1] == "None None False"


_YNN_PROBE = """
    import os, jax, jax.numpy as jnp
    from qdr_jax import platform
    print(platform.tune_process(restart=False))
    f = lambda x, w: jnp.sum(jax.nn.gelu(x @ w), axis=-1)
    x = jnp.ones((256, 64))
    hlo = jax.jit(f).lower(x, x.T).compile().as_text()
    print(os.environ.get('XLA_FLAGS'), os.environ.get('OMP_WAIT_POLICY'), sep='|')
    print(hlo.count('__ynn_fusion'))
    """


@pytest.mark.parametrize("user_flags, user_omp, expect_flags, ynn", [
    (None, None, "--xla_cpu_experimental_ynn_fusion_type=", False),
    ("--xla_cpu_enable_fast_math=false", "ACTIVE",
     "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type=", False),
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", None,
     "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", True),
])
def test_tune_process_on_cpu_sets_what_the_user_did_not(user_flags, user_omp, expect_flags, ynn):
  extra = {"JAX_PLATFORMS": "cpu"}
  if user_flags:
    extra["XLA_FLAGS"] = user_flags
  if user_omp:
    extra["OMP_WAIT_POLICY"] = user_omp
  out = _run(_YNN_PROBE, **extra).splitlines()
  flags, omp = out[-2].split("|")
  assert (flags, omp) == (expect_flags, user_omp or "PASSIVE")
  assert (int(out[-1]) > 0) == ynn  # the flag reached XLA: set before the backend started
  assert ("OMP_WAIT_POLICY" in out[-3]) == (user_omp is None)


@pytest.mark.parametrize("platforms", ["cuda", "tpu", "cuda,cpu"])
def test_tune_process_sets_nothing_where_an_accelerator_is_asked_for(platforms):
  # Decided from JAX_PLATFORMS without starting a backend (there is no GPU here).
  out = _run("""
      import os
      from qdr_jax import platform, host_memory
      print(platform.process_is_cpu(), platform.tune_process(), host_memory.applied,
            os.environ.get('XLA_FLAGS'), os.environ.get('OMP_WAIT_POLICY'))
      """, JAX_PLATFORMS=platforms)
  assert out.splitlines()[-1] == "False {} False None None"


def test_process_is_cpu_rule(monkeypatch):
  monkeypatch.setattr(platform.xla_bridge, "backends_are_initialized", lambda: False)
  assert platform.process_is_cpu({"JAX_PLATFORMS": "cpu"})
  assert not platform.process_is_cpu({"JAX_PLATFORMS": "tpu,cpu"})
  monkeypatch.setattr(platform, "_accelerator_installed", lambda: True)
  assert not platform.process_is_cpu({})
  monkeypatch.setattr(platform, "_accelerator_installed", lambda: False)
  assert platform.process_is_cpu({})
  # Once a backend has started, it is the one that counts.
  monkeypatch.setattr(platform.xla_bridge, "backends_are_initialized", lambda: True)
  assert platform.process_is_cpu({"JAX_PLATFORMS": "cuda"})


def test_a_script_restarts_once_to_set_the_openmp_policy(tmp_path):
  # FAISS loads OpenMP at import, before main runs; the runtime reads its wait policy
  # only then, so run_main restarts the script with it set.
  script = tmp_path / "probe.py"
  script.write_text(textwrap.dedent("""
      import os, faiss
      from qdr_jax.cli import run_main
      def main(argv):
        print('main', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('QDR_JAX_TUNED_RESTART'))
      if __name__ == '__main__':
        run_main(main)
      """))
  root = os.path.dirname(os.path.dirname(platform.__file__))
  env = _clean_env(JAX_PLATFORMS="cpu", PYTHONPATH=root)  # this checkout's qdr_jax
  done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                        text=True, timeout=300, check=True)
  assert done.stdout.split("\n").count("main PASSIVE None") == 1  # once, marker gone
  assert done.stderr.count("restarting with OMP_WAIT_POLICY=PASSIVE") == 1
  assert "tune_process: backend cpu, set OMP_WAIT_POLICY=PASSIVE (restarted)" in done.stderr


def test_forced_backend_and_attention_selection():
  assert platform.backend() == "cpu" and platform.attention_implementation(
      "bfloat16", 32, 64, 64) is None
  with platform.forced("gpu"):
    assert platform.backend() == "gpu" and not platform.is_cpu()
    assert platform.attention_implementation("bfloat16", 32, 64, 64) == "cudnn"
    assert platform.attention_implementation("float16", 128, 8, 8) == "cudnn"
    assert platform.attention_implementation("float32", 32, 64, 64) == "xla"  # dtype
    assert platform.attention_implementation("bfloat16", 12, 64, 64) == "xla"  # head dim
    assert platform.attention_implementation("bfloat16", 256, 64, 64) == "xla"
    assert platform.attention_implementation("bfloat16", 32, 63, 63) == "xla"  # odd length
    with platform.forced("tpu"):
      assert platform.attention_implementation("bfloat16", 32, 64, 64) == "xla"
    assert platform.backend() == "gpu"
  assert platform.backend() == "cpu"
  with pytest.raises(ValueError, match="cuda"):
    with platform.forced("cuda"):
      pass
