"""Runtime checks are exceptions, not `assert` statements (which `python -O` removes)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_assert_statements_in_the_shipped_code():
    found = []
    for folder in ("osprey", "jobs", "serve"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Assert)
            ]
    assert not found, f"assert statements (gone under python -O): {found}"


def test_the_former_asserts_raise_errors_that_name_the_input():
    from osprey.data.converters.base import make_row
    from osprey.train.pretrain_llm import REGION_SLOT, Document

    with pytest.raises(ValueError, match="1 region slots but 0 contents"):
        Document(ids=[5, REGION_SLOT], contents=[])
    with pytest.raises(ValueError, match=r"answer flags \(1\) and ids \(2\)"):
        Document(ids=[5, 6], answer=[True])
    with pytest.raises(ValueError, match="sample s1: unknown task 'nope'"):
        make_row(sample_id="s1", source="x", task="nope", image=None)
