"""Install layout: mla_pass.runtime imports no torch; the public API is importable lazily."""
import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_runtime_imports_no_torch():
    proc = _run("import sys, mla_pass.runtime; assert 'torch' not in sys.modules, 'torch was imported'")
    assert proc.returncode == 0, proc.stderr


def test_package_import_is_lazy():
    proc = _run("import sys, mla_pass; assert 'torch' not in sys.modules; mla_pass.MLAConfig; print('ok')")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_export_package_maps_to_folder():
    proc = _run("import mla_pass.export, os; print(os.path.basename(os.path.dirname(mla_pass.export.__file__)))")
    assert proc.returncode == 0 and proc.stdout.strip() == "export", proc.stderr


def test_public_api_names():
    import mla_pass
    for name in ("MLAConfig", "convert", "load", "kv_cache_bytes_per_token", "MLAModel", "inspect_model"):
        assert getattr(mla_pass, name) is not None
