"""Every test session gets its own SMELT_HOME, set before Prefect, MLflow or BentoML is imported."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="smelt-test-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["SMELT_HOME"] = str(_HOME)
for var in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "BENTOML_HOME", "PREFECT_API_URL"):
    os.environ.pop(var, None)  # never touch a developer's real servers or stores

from models.settings import configure_environment  # noqa: E402

configure_environment(_HOME)


@pytest.fixture(scope="session")
def smelt_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init tiny Llama with a locally trained tokenizer and chat template (seconds to build)."""
    from models.config import TinyLlamaSpec
    from models.embedded import collect_docstrings, new_llama, train_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = train_tokenizer(collect_docstrings(100_000), 400)
    new_llama(TinyLlamaSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory, tiny_model_dir) -> Path:
    from transformers import AutoTokenizer

    from models.config import TinyLlamaSpec
    from models.embedded import new_llama

    out = tmp_path_factory.mktemp("tiny-draft")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    new_llama(TinyLlamaSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, seed=1).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def wide64_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A random-init Llama 64 wide: bitsandbytes' CPU 4-bit kernel packs blocks of 64 inputs
    (bnb-nf4 quantization, QLoRA training)."""
    from transformers import AutoTokenizer

    from models.config import TinyLlamaSpec
    from models.embedded import new_llama

    out = tmp_path_factory.mktemp("llama64")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    new_llama(TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128), tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out
