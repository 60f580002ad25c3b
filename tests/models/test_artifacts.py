import shutil
from pathlib import Path

import pytest

from models.artifacts import SOURCE_ROOT, artifact, code_digest


@pytest.fixture
def src(tmp_path):
    """A small source tree: two modules that make an artifact and one that does not."""
    root = tmp_path / "src"
    for rel in ("models/maker.py", "models/helper.py", "serving/service.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('"""Docstring."""\nx = 1\n')
    code_digest.cache_clear()
    yield root
    code_digest.cache_clear()  # the tests edit files a cached digest would hide


def edit(path: Path, text: str) -> None:
    path.write_text(text)
    code_digest.cache_clear()  # a real process sees one version of its code; these tests see several


def key_of(root: Path, *inputs, code=("models.maker", "models.helper")) -> str:
    return artifact(root.parent / "out", "thing", *inputs, code=code, root=root).path.name


def test_the_key_follows_the_inputs(src):
    assert key_of(src, {"lr": 1e-3}, "data-v1") == key_of(src, {"lr": 1e-3}, "data-v1")
    assert key_of(src, {"lr": 2e-3}, "data-v1") != key_of(src, {"lr": 1e-3}, "data-v1")
    assert key_of(src, {"lr": 1e-3}, "data-v2") != key_of(src, {"lr": 1e-3}, "data-v1")


def test_the_key_follows_the_named_code_and_ignores_the_rest(src):
    before = key_of(src, "in")
    edit(src / "serving" / "service.py", '"""An edited docstring."""\nx = 1\n')  # not named: no rebuild
    assert key_of(src, "in") == before
    edit(src / "models" / "helper.py", '"""Docstring."""\nx = 2\n')  # named: rebuild
    assert key_of(src, "in") != before


def test_code_may_name_a_package_or_a_file_and_a_missing_one_raises(src):
    assert code_digest(("models",), src) != code_digest(("models.maker",), src)
    assert code_digest(("models/maker.py",), src) == code_digest(("models.maker",), src)
    with pytest.raises(FileNotFoundError, match="models.moved"):
        code_digest(("models.moved",), src)  # a module moved away must not silently leave the key


def test_a_present_artifact_is_reused_without_calling_the_builder(tmp_path):
    art = artifact(tmp_path, "thing", "in", code=("models.artifacts",))
    assert art.ensure(lambda tmp: (tmp / "weights").write_text("first")) == art.path
    art.ensure(lambda tmp: pytest.fail("the builder ran although the artifact was present"))
    assert (art.path / "weights").read_text() == "first"
    report = artifact(tmp_path, "report", "in", code=("models.artifacts",), suffix=".json")
    assert report.ensure_json(lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}
    assert report.ensure_json(lambda: pytest.fail("the report was measured again")) == {"accuracy": 0.5}


def test_a_failed_build_leaves_nothing_that_looks_complete_and_keeps_the_work_dir(tmp_path):
    art = artifact(tmp_path, "thing", "in", code=("models.artifacts",))
    art.work.mkdir()
    (art.work / "checkpoint").write_text("step 3")

    def crash(tmp: Path) -> None:
        (tmp / "half-written").write_text("...")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        art.ensure(crash)
    assert not art.exists() and sorted(p.name for p in tmp_path.iterdir()) == [art.work.name]
    assert (art.work / "checkpoint").read_text() == "step 3"  # a rerun resumes from it
    report = artifact(tmp_path, "report", "in", code=("models.artifacts",), suffix=".json")
    with pytest.raises(ZeroDivisionError):
        report.ensure_json(lambda: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [art.work.name]
    art.ensure(lambda tmp: (tmp / "weights").write_text("done"))
    assert not art.work.exists()  # checkpoints are for resuming; the result is now in place


def test_concurrent_finishers_keep_the_first_copy(tmp_path):
    art = artifact(tmp_path, "thing", "in", code=("models.artifacts",))
    with art.build() as slow:
        (slow / "weights").write_text("slow")
        art.ensure(lambda fast: (fast / "weights").write_text("fast"))  # another run finishes first
    assert (art.path / "weights").read_text() == "fast"
    assert sorted(p.name for p in tmp_path.iterdir()) == [art.path.name]  # the loser's temp dir is gone

    report = artifact(tmp_path, "report", "in", code=("models.artifacts",), suffix=".json")

    def slow_measure() -> dict:
        report.ensure_json(lambda: {"run": "fast"})
        return {"run": "slow"}

    assert report.ensure_json(slow_measure) == {"run": "fast"}  # both runs see the published report
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([art.path.name, report.path.name])


def test_an_empty_name_makes_the_key_the_whole_name(tmp_path):
    art = artifact(tmp_path, "", "in", code=("models.artifacts",))
    assert len(art.path.name) == 12 and art.work.name == f".work-{art.path.name}"


@pytest.fixture
def repo_copy(tmp_path):
    root = tmp_path / "repo"
    for pkg in ("models", "tasks", "serving"):
        shutil.copytree(SOURCE_ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code_digest.cache_clear()
    yield root
    code_digest.cache_clear()


def test_the_embedded_base_is_rebuilt_for_its_own_code_only(repo_copy):
    from models.embedded import BASE_CODE
    from tasks.caching import PACKAGES

    base, everything = code_digest(BASE_CODE, repo_copy), code_digest(PACKAGES, repo_copy)
    service = repo_copy / "serving" / "service.py"
    edit(service, service.read_text().replace('"""', '"""Edited. ', 1))
    assert code_digest(PACKAGES, repo_copy) != everything  # the Prefect layer sees every package
    assert code_digest(BASE_CODE, repo_copy) == base  # pretraining (minutes) is not redone for it
    for module in ("embedded", "training"):
        path = repo_copy / "models" / f"{module}.py"
        edit(path, path.read_text() + "\n# changed\n")
        assert code_digest(BASE_CODE, repo_copy) != base
        base = code_digest(BASE_CODE, repo_copy)


def test_every_site_names_modules_that_exist():
    from models import embedded
    from tasks import etl, evaluate, quantize, train

    sites = [embedded.TOKENIZER_CODE, embedded.BASE_CODE, embedded.DRAFT_INIT_CODE, train.FINETUNE_CODE,
             train.DRAFT_CODE, quantize.QUANT_CODE, evaluate.CANDIDATE_CODE, evaluate.REFERENCE_CODE,
             evaluate.EVAL_CODE, etl.ETL_CODE]
    for code in sites:
        assert len(code_digest.__wrapped__(code)) == 16
