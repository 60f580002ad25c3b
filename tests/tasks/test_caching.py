from models.artifacts import code_digest
from tasks.caching import PACKAGES


def test_code_digest_changes_with_any_module_a_stage_may_call(tmp_path):
    for pkg in ("models", "tasks", "serving"):
        (tmp_path / pkg / "sub").mkdir(parents=True)
        (tmp_path / pkg / "sub" / "m.py").write_text("x = 1\n")
    def digest(root):
        return code_digest.__wrapped__(PACKAGES, root=root)  # the packages the Prefect cache policy hashes
    before = digest(root=tmp_path)
    assert digest(root=tmp_path) == before
    (tmp_path / "models" / "sub" / "m.py").write_text("x = 2\n")
    assert digest(root=tmp_path) != before
    changed = digest(root=tmp_path)
    (tmp_path / "serving" / "sub" / "m.py").write_text("x = 3\n")  # the Bento's code counts too
    assert digest(root=tmp_path) != changed
    (tmp_path / "README.md").write_text("docs do not count")
    after = digest(root=tmp_path)
    (tmp_path / "README.md").write_text("still do not count")
    assert digest(root=tmp_path) == after
