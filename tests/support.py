"""Constants shared by the tests (imported as `support`; conftest.py files are not importable by name)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ROOT / "examples" / "data" / "concepts.csv"
PROMPT = "generate a stable diffusion prompt for {concept}"
