"""The two distributions stay apart: volunteers never install the server stack, the server never torch."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"fastapi", "sqlalchemy", "alembic", "authlib", "asyncpg", "aiosqlite", "uvicorn", "argon2-cffi"}
CLIENT_ONLY = {"torch", "aiortc", "numpy"}


def dependency_names(pyproject: Path) -> set[str]:
    data = tomllib.loads(pyproject.read_text())
    names = set()
    for requirement in data["project"]["dependencies"]:
        name = requirement.split(";")[0]
        for separator in "[<>=~! ":
            name = name.split(separator)[0]
        names.add(name.strip().lower())
    return names


def test_client_does_not_pull_the_server_stack() -> None:
    assert dependency_names(ROOT / "volunteer_client" / "pyproject.toml").isdisjoint(SERVER_ONLY)


def test_server_does_not_pull_torch_or_aiortc() -> None:
    assert dependency_names(ROOT / "pyproject.toml").isdisjoint(CLIENT_ONLY)


def test_client_asks_for_a_torch_range_and_ci_pins_it() -> None:
    client_deps = tomllib.loads((ROOT / "volunteer_client" / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(dep for dep in client_deps if dep.startswith("torch"))
    assert "==" not in torch
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()


def test_every_server_package_is_listed() -> None:
    """The server's packages are listed by hand (package-dir mapping); a missing one would not ship."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {path: name for name, path in tool["package-dir"].items()}
    found = set()
    for directory, package in mapping.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / directory).parts
            found.add(".".join((package, *relative)))
    assert found == set(tool["packages"])
