"""vlm: vision-language models in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).parent
_REQS = [
  line.split("#")[0].strip()
  for line in (_HERE / "requirements.txt").read_text().splitlines()
  if line.split("#")[0].strip()
]

setup(
  name="vlm",
  version="0.1.0",
  description="Vision-language models in JAX/Flax: contrastive, generative, masked, MoME and LLM-based.",
  long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
  long_description_content_type="text/markdown",
  packages=find_packages(include=["vlm", "vlm.*"]),
  python_requires=">=3.11",
  install_requires=_REQS,
  extras_require={
    # filelock: trained fixtures shared by the xdist workers (tests/conftest.py:shared_run).
    # torch/transformers are parity oracles for the importers, pycocoevalcap (its pure-Python
    # BLEU and CIDEr scorers) for vlm.evals.caption_metrics: tests only.
    # torch==2.13.0 is the CPU build available on the project's machines. ruff: the formatter and linter
    # that .ci/run checks (pinned: another release may format differently).
    "test": [
      "pytest>=8.0",
      "pytest-xdist>=3.5",
      "filelock>=3.12",
      "torch==2.13.0",
      "transformers>=5.0",
      "matplotlib>=3.8",
      "ruff==0.17.6",
      "pycocoevalcap==1.2",
    ],
  },
)
