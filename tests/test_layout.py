"""The import rules the README's layout section states, checked on the source: roles are folders, only the
driver knows every role, and core is the floor that imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rank1"
ROLES = ("trainer", "rollout", "rewards", "sae", "export")


def imports_of(folder: str) -> dict[str, set[str]]:
    """module path -> the rank1 subpackages (and third-party roots) it imports, at any depth of the file."""
    found: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        # each name as written, its rank1 subpackage (rank1.core) and its top-level package (torch)
        found[str(path.relative_to(PACKAGE))] = names | {".".join(n.split(".")[:2]) for n in names} | {n.split(".")[0] for n in names}
    return found


def offenders(folder: str, forbidden: set[str]) -> list[str]:
    return [f"{module} imports {sorted(names & forbidden)}" for module, names in imports_of(folder).items() if names & forbidden]


def test_core_imports_no_role_and_no_driver():
    assert not offenders("core", {f"rank1.{r}" for r in (*ROLES, "driver")})


def test_roles_import_only_core_and_themselves():
    for role in ROLES:
        others = {f"rank1.{r}" for r in (*ROLES, "driver") if r != role}
        assert not offenders(role, others), role


def test_rewards_know_no_model():
    assert not offenders("rewards", {"torch", "transformers", "peft", "vllm", "rank1.core.model", "rank1.core.adapter_io"})


def test_only_the_driver_and_the_cli_know_every_role():
    driver = set().union(*imports_of("driver").values())
    assert {"rank1.trainer", "rank1.rollout", "rank1.rewards"} <= driver
