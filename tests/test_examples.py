"""The examples run end to end on CPU and check their own claims (they exit non-zero otherwise)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multi_task_lora_example_matches_separate_training():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "multi_task_lora.py"), "--tasks", "4",
                          "--steps", "20"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MATCH" in out.stdout and "max relative loss difference" in out.stdout


def test_peft_adapters_example():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "peft_adapters.py")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MATCH" in out.stdout and "load_peft_adapter" in out.stdout and "from_peft" in out.stdout
